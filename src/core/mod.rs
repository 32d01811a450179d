//! The use cases the adapters serve, and the effects of each task transition.
//!
//! [`Core`] owns every use case: the client side in [`client`] (submit, get, list, cancel and
//! watch tasks, jobs, the worker listing) and the worker side in [`worker`] (register,
//! heartbeat, the task stream, reports, deregister). It speaks domain types and answers
//! [`CoreError`]; the gRPC and REST adapters parse the wire, call in here, and map the answer.
//! [`failures`] holds the failures summary and retries (one task, or many by filter), [`jobs`] what acts on a job as a
//! whole (list, cancel).
//! [`effects`] runs after each transition's commit, and [`batches`] holds the batched writes
//! (completions, lease renewals, delivery marks) with the effects of each completion.
//!
//! Below the core: the store, the registry, the scheduler and the sweeper (which reach the
//! effects through [`crate::scheduler::OnRequeue`]).

pub mod batches;
pub mod client;
pub mod effects;
pub mod error;
pub mod failures;
pub mod jobs;
pub mod limits;
pub mod schedules;
pub mod worker;

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use tokio_util::sync::CancellationToken;

pub use batches::Batchers;
pub use error::CoreError;

use crate::{
    events::Events,
    fleet::Fleet,
    registry::Registry,
    scheduler::AtSubmission,
    store::{RetryPolicy, Store},
};
use effects::Effects;

/// A stream of answers that ends with an error or when its source is done.
pub type Updates<T> = Pin<Box<dyn Stream<Item = Result<T, CoreError>> + Send + 'static>>;

/// Defaults and limits applied to submissions.
#[derive(Debug, Clone)]
pub struct SubmitLimits {
    pub default_max_attempts: u32,
    pub default_timeout: Duration,
    pub max_payload_size: usize,
}

/// Settings the use cases need.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub coordinator_id: String,
    pub heartbeat_timeout: Duration,
    /// How long a lease runs (`coordinator.stale_task_timeout`); heartbeats renew one once it
    /// comes close to its end ([`CoreConfig::renew_after`]).
    pub lease: Duration,
    pub retry: RetryPolicy,
    pub limits: SubmitLimits,
    /// How often a `WatchTask` stream re-reads its task when no local event arrives (changes
    /// made through another replica, and a new reason a pending task waits).
    pub watch_poll: Duration,
    /// Refuse a submission of a type no live worker declared (`tasks.reject_unknown_types`);
    /// otherwise it is accepted with a warning.
    pub reject_unknown_types: bool,
}

impl CoreConfig {
    /// How long after a lease was granted or renewed a heartbeat renews it in the database:
    /// once no more than a third of it, or three heartbeat intervals (a heartbeat timeout) if
    /// longer, is left. With the defaults (a 5-minute lease, heartbeats every 10 s) a running
    /// task's lease is written every 200 s, not every 100 s, with 100 s (ten heartbeats) left for
    /// a renewal that a slow or unreachable database delays; a lease as short as the heartbeat
    /// timeout is renewed at every heartbeat. The lease a worker dies with is at most a whole
    /// term either way.
    pub fn renew_after(&self) -> Duration {
        self.lease.saturating_sub((self.lease / 3).max(self.heartbeat_timeout))
    }
}

/// The use cases. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Core {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: CoreConfig,
    store: Store,
    registry: Registry,
    effects: Effects,
    events: Events,
    /// The app spawned their loops; they end once every clone of the core is gone.
    batchers: Batchers,
    /// What the live workers run, across replicas.
    fleet: Fleet,
    /// Places submissions on free workers as they are stored; unset: the scheduler claims
    /// every task.
    at_submission: std::sync::OnceLock<AtSubmission>,
    /// Cancelled when shutdown begins: open streams end with `Unavailable` and new
    /// registrations and streams are refused.
    closing: CancellationToken,
}

impl Core {
    pub fn new(
        config: CoreConfig,
        store: Store,
        registry: Registry,
        effects: Effects,
        events: Events,
        batchers: Batchers,
        closing: CancellationToken,
    ) -> Self {
        let fleet = Fleet::new(store.clone(), registry.clone(), config.heartbeat_timeout);
        let at_submission = std::sync::OnceLock::new();
        let inner =
            Inner { config, store, registry, effects, events, batchers, fleet, at_submission, closing };
        Self { inner: Arc::new(inner) }
    }

    /// From now on, submissions are placed on free workers as they are stored, by `placer`
    /// (made by the scheduler it shares placement's turn with). Set once; a second call changes
    /// nothing.
    pub fn place_at_submission(&self, placer: AtSubmission) {
        let _ = self.inner.at_submission.set(placer);
    }

    pub fn config(&self) -> &CoreConfig {
        &self.inner.config
    }

    fn refuse_if_closing(&self) -> Result<(), CoreError> {
        if self.inner.closing.is_cancelled() { Err(CoreError::shutting_down()) } else { Ok(()) }
    }
}

/// Whether this replica should be sent work: what `/health` answers and what gRPC health
/// reports for the whole server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Shutdown has begun: clients and workers should go to another replica.
    pub shutting_down: bool,
    /// The database answered within [`DB_PROBE_TIMEOUT`]; without it nothing can be stored.
    pub database_reachable: bool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        !self.shutting_down && self.database_reachable
    }
}

/// How long a readiness probe waits for the database before calling it unreachable.
pub const DB_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Probes the database and says whether this replica is ready for work.
pub async fn readiness(store: &Store, closing: &CancellationToken) -> Readiness {
    let database_reachable = matches!(tokio::time::timeout(DB_PROBE_TIMEOUT, store.ping()).await, Ok(Ok(())));
    Readiness { shutting_down: closing.is_cancelled(), database_reachable }
}

/// Text that says what happened (a failure's error, a cancel's reason), made fit to store: each
/// U+0000, which no Postgres text column holds, replaced by U+FFFD, then cut to at most `max`
/// bytes on a character boundary. Such text is kept, never refused: a report is not lost to it.
fn stored_text(s: String, max: usize) -> String {
    let mut s = if s.contains('\0') { s.replace('\0', "\u{FFFD}") } else { s };
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Refuses text a caller chose (a key, a name, a filter) holding U+0000: valid UTF-8 that no
/// Postgres text column holds. Checked here, so both backends answer alike.
pub fn storable(field: &str, s: &str) -> Result<(), CoreError> {
    if s.contains('\0') {
        return Err(CoreError::invalid(field, "character U+0000 is not allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_text_replaces_u0000_then_cuts_on_a_character_boundary() {
        assert_eq!(stored_text("a\0b".into(), 64), "a\u{FFFD}b");
        // The replacement is 3 bytes: the cut comes after it, never inside it.
        assert_eq!(stored_text("ab\0".into(), 4), "ab");
        assert_eq!(stored_text("é".repeat(3), 5), "éé");
        assert_eq!(stored_text("plain".into(), 64), "plain");
        assert!(storable("k", "a\0").is_err_and(|e| e.to_string().contains("k: character U+0000")));
        assert!(storable("k", "a b").is_ok());
    }
}
