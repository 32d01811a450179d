//! `sleep`: payload `{"ms":N}` sleeps N milliseconds, result `{"slept_ms":N}`. N above 24 hours
//! is refused (non-retriable); a cancelled task stops sleeping at once.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use super::{cancelled, json_result, parse_payload};
use crate::{Handler, TaskContext, TaskFailure};

/// The longest sleep accepted: 24 hours.
pub const MAX_SLEEP_MS: u64 = 24 * 60 * 60 * 1000;

/// Sleeps as long as the payload says.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sleep;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    ms: u64,
}

#[tonic::async_trait]
impl Handler for Sleep {
    async fn run(&self, task: TaskContext) -> Result<Vec<u8>, TaskFailure> {
        let Payload { ms } = parse_payload("sleep", &task.payload, r#"{"ms":N}"#)?;
        if ms > MAX_SLEEP_MS {
            return Err(TaskFailure::permanent(format!(
                "invalid sleep payload: ms {ms} exceeds the maximum of {MAX_SLEEP_MS} (24h)"
            )));
        }
        let started = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => json_result(&json!({ "slept_ms": ms })),
            _ = task.cancelled.cancelled() => Err(cancelled(&format!(
                "sleep of {ms} ms stopped after {} ms", started.elapsed().as_millis()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::test_support::*;

    #[tokio::test]
    async fn sleeps_and_reports_how_long() {
        bounded(async {
            let started = Instant::now();
            let r = Sleep.run(task("sleep", r#"{"ms":50}"#)).await.unwrap();
            assert!(started.elapsed() >= Duration::from_millis(50));
            assert_eq!(json(&r), json!({"slept_ms": 50}));
            assert_eq!(json(&Sleep.run(task("sleep", r#"{"ms":0}"#)).await.unwrap()), json!({"slept_ms": 0}));
        })
        .await
    }

    #[tokio::test]
    async fn a_cancel_ends_the_sleep_early() {
        bounded(async {
            let t = task("sleep", r#"{"ms":60000}"#);
            let token = t.cancelled.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                token.cancel();
            });
            let started = Instant::now();
            let e = Sleep.run(t).await.unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(5));
            assert!(e.message.starts_with("cancelled"), "{}", e.message);
        })
        .await
    }

    #[tokio::test]
    async fn bad_payloads_are_permanent_failures() {
        bounded(async {
            let e = Sleep.run(task("sleep", format!(r#"{{"ms":{}}}"#, MAX_SLEEP_MS + 1))).await.unwrap_err();
            assert!(!e.retriable);
            assert!(e.message.contains("exceeds the maximum"), "{}", e.message);
            for bad in ["", "nope", r#"{"ms":-1}"#, r#"{"seconds":1}"#, r#"{"ms":"10"}"#] {
                let e = Sleep.run(task("sleep", bad)).await.unwrap_err();
                assert!(!e.retriable, "{bad}");
                assert!(e.message.starts_with("invalid sleep payload"), "{bad}: {}", e.message);
            }
        })
        .await
    }
}
