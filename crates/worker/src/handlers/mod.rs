//! Task handlers a worker runs, each behind the [`Handler`] trait, and [`Handlers`], the
//! dispatcher that routes a task to the handler named by its task type.
//!
//! Built-ins ([`BUILTIN`]): [`echo`], [`noop`], [`sleep`], [`prime_count`], [`is_prime`],
//! [`merkle_proof`], [`sum_counts`]. [`exec`] runs a configured external command (a prover CLI, say) per task
//! type.
//!
//! Conventions shared by every handler:
//! - payloads and results are JSON (except `echo`, `noop` and `exec`, which pass bytes);
//! - a payload that can never succeed (not JSON, a missing field, out of range) is a
//!   non-retriable failure whose message names the problem;
//! - a task cancelled while it runs ends with a non-retriable failure saying "cancelled" (the
//!   worker does not report it anyway: a cancelled task belongs to nobody any more);
//! - running past `task.deadline` is a retriable failure saying "deadline exceeded".

use std::{collections::BTreeMap, sync::Arc};

use serde::de::DeserializeOwned;

use crate::{Handler, TaskContext, TaskFailure};

pub mod echo;
pub mod exec;
pub mod is_prime;
pub mod merkle_proof;
pub mod noop;
pub mod prime_count;
pub(crate) mod process;
pub mod sleep;
pub mod sum_counts;

pub use echo::Echo;
pub use exec::{Exec, ExecConfig};
pub use is_prime::IsPrime;
pub use merkle_proof::MerkleProof;
pub use noop::Noop;
pub use prime_count::PrimeCount;
pub use sleep::Sleep;
pub use sum_counts::SumCounts;

/// The built-in handlers, by the task type each one serves.
pub const BUILTIN: &[&str] =
    &["echo", "noop", "sleep", "prime_count", "is_prime", "merkle_proof", "sum_counts"];

/// The built-in handler named `name`, if there is one.
pub fn builtin(name: &str) -> Option<Arc<dyn Handler>> {
    Some(match name {
        "echo" => Arc::new(Echo),
        "noop" => Arc::new(Noop),
        "sleep" => Arc::new(Sleep),
        "prime_count" => Arc::new(PrimeCount),
        "is_prime" => Arc::new(IsPrime),
        "merkle_proof" => Arc::new(MerkleProof),
        "sum_counts" => Arc::new(SumCounts),
        _ => return None,
    })
}

/// Routes each task to the handler registered for its `task_type`; a type nobody registered is
/// a non-retriable failure.
#[derive(Clone, Default)]
pub struct Handlers {
    routes: BTreeMap<String, Arc<dyn Handler>>,
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handlers").field("task_types", &self.task_types()).finish()
    }
}

impl Handlers {
    /// No handlers: every task fails as unknown until some are added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves task type `name` with `handler` (replacing an earlier one of that name).
    pub fn with(mut self, name: impl Into<String>, handler: Arc<dyn Handler>) -> Self {
        self.routes.insert(name.into(), handler);
        self
    }

    /// The built-ins named in `names` (surrounding spaces and empty names are ignored); an
    /// unknown name is an error that names it and lists the known ones.
    pub fn builtin(names: &[String]) -> Result<Handlers, String> {
        let mut handlers = Handlers::new();
        for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
            let handler = builtin(name).ok_or_else(|| {
                format!("unknown built-in handler {name:?} (known: {})", BUILTIN.join(", "))
            })?;
            handlers = handlers.with(name, handler);
        }
        Ok(handlers)
    }

    /// Serves `config.task_type` by running `config.command`.
    pub fn with_exec(self, config: ExecConfig) -> Self {
        let name = config.task_type.clone();
        self.with(name, Arc::new(Exec::new(config)))
    }

    /// The task types served, sorted: the capabilities a worker registers with.
    pub fn task_types(&self) -> Vec<String> {
        self.routes.keys().cloned().collect()
    }

    /// The handler for `task_type`.
    pub fn get(&self, task_type: &str) -> Option<&Arc<dyn Handler>> {
        self.routes.get(task_type)
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[tonic::async_trait]
impl Handler for Handlers {
    async fn run(&self, task: TaskContext) -> Result<Vec<u8>, TaskFailure> {
        match self.routes.get(&task.task_type) {
            Some(handler) => handler.run(task).await,
            None => Err(TaskFailure::permanent(format!(
                "unknown task type {:?}: this worker runs {}",
                task.task_type,
                if self.routes.is_empty() { "nothing".to_owned() } else { self.task_types().join(", ") }
            ))),
        }
    }
}

/// Parses a JSON payload; a bad one is a non-retriable failure naming the task type, the
/// problem and the expected shape.
pub(crate) fn parse_payload<T: DeserializeOwned>(
    task_type: &str,
    payload: &[u8],
    expected: &str,
) -> Result<T, TaskFailure> {
    serde_json::from_slice(payload)
        .map_err(|e| TaskFailure::permanent(format!("invalid {task_type} payload: {e}; expected {expected}")))
}

/// Serializes a JSON result.
pub(crate) fn json_result<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, TaskFailure> {
    serde_json::to_vec(value).map_err(|e| TaskFailure::permanent(format!("cannot encode the result: {e}")))
}

/// The failure of a task cancelled while it ran.
pub(crate) fn cancelled(what: &str) -> TaskFailure {
    TaskFailure::permanent(format!("cancelled: {what}"))
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::time::{Duration, SystemTime};

    use tokio_util::sync::CancellationToken;

    use crate::TaskContext;

    pub fn task(task_type: &str, payload: impl Into<Vec<u8>>) -> TaskContext {
        TaskContext {
            task_id: "t-1".into(),
            task_type: task_type.into(),
            payload: payload.into(),
            attempt: 1,
            deadline: None,
            cancelled: CancellationToken::new(),
            parents: Vec::new(),
        }
    }

    pub fn with_deadline(mut task: TaskContext, in_: Duration) -> TaskContext {
        task.deadline = Some(SystemTime::now() + in_);
        task
    }

    /// Every test is bounded in time.
    pub async fn bounded<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(20), f).await.expect("test timed out")
    }

    pub fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).expect("result is JSON")
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::*, *};

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn routes_by_task_type_and_refuses_unknown_types() {
        bounded(async {
            let h = Handlers::builtin(&names(&["echo", "is_prime"])).unwrap();
            assert_eq!(h.task_types(), ["echo", "is_prime"]);
            assert_eq!(h.run(task("echo", "hi")).await.unwrap(), b"hi");
            let r = json(&h.run(task("is_prime", r#"{"number":19}"#)).await.unwrap());
            assert_eq!(r["is_prime"], true);
            let e = h.run(task("prove", "x")).await.unwrap_err();
            assert!(!e.retriable);
            assert!(e.message.contains("unknown task type \"prove\""), "{}", e.message);
            assert!(e.message.contains("echo, is_prime"), "{}", e.message);
            let e = Handlers::new().run(task("echo", "x")).await.unwrap_err();
            assert!(e.message.contains("runs nothing"), "{}", e.message);
        })
        .await
    }

    #[test]
    fn builtin_enables_every_listed_name_and_names_an_unknown_one() {
        let all = Handlers::builtin(&names(BUILTIN)).unwrap();
        let mut expected = names(BUILTIN);
        expected.sort();
        assert_eq!(all.task_types(), expected);
        let e = Handlers::builtin(&names(&["echo", "primes"])).unwrap_err();
        assert!(e.contains("\"primes\""), "{e}");
        assert!(e.contains("prime_count"), "{e}");
        assert!(Handlers::builtin(&names(&[" echo ", ""])).unwrap().task_types() == ["echo"]);
        assert!(Handlers::builtin(&[]).unwrap().is_empty());
    }

    #[tokio::test]
    async fn exec_and_custom_handlers_join_the_capabilities() {
        bounded(async {
            let h = Handlers::builtin(&names(&["noop"]))
                .unwrap()
                .with_exec(ExecConfig::new("shout", ["sh", "-c", "tr a-z A-Z"]))
                .with(
                    "twice",
                    crate::handler_fn(|t| async move { Ok([t.payload.clone(), t.payload].concat()) }),
                );
            assert_eq!(h.task_types(), ["noop", "shout", "twice"]);
            assert_eq!(h.run(task("shout", "abc")).await.unwrap(), b"ABC");
            assert_eq!(h.run(task("twice", "ab")).await.unwrap(), b"abab");
            assert_eq!(h.run(task("noop", "ignored")).await.unwrap(), b"");
            assert!(format!("{h:?}").contains("shout"));
        })
        .await
    }
}
