//! Failures an operator can see and act on: what failed in a time window, by type and error;
//! retry a failed or cancelled task, or every task a filter picks out.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::{Core, CoreError, client::task_not_found, effects::Effects};
use crate::{
    domain::{Task, TaskId},
    store::{FailureSummary, RetryFilter, RetryOutcome},
};

/// The window of a failures summary that names no start: the last day.
pub const DEFAULT_SUMMARY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Errors a summary lists when the request names no number.
pub const DEFAULT_TOP_ERRORS: u32 = 10;
/// The most errors a summary lists.
pub const MAX_TOP_ERRORS: u32 = 100;
/// A summary groups errors by their first line cut to this many characters.
pub const SUMMARY_ERROR_LEN: u32 = 200;

/// Tasks a bulk retry takes when the request names no limit.
pub const DEFAULT_RETRY_LIMIT: u32 = 1_000;
/// The most tasks one bulk retry may take.
pub const MAX_RETRY_LIMIT: u32 = 10_000;
/// Tasks per statement of a bulk retry: each batch is one short transaction.
const RETRY_BATCH: u32 = 500;

/// The answer to a bulk retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkRetried {
    /// The tasks this call retried, in id order.
    pub ids: Vec<TaskId>,
    /// The limit was reached: more tasks may match.
    pub more: bool,
}

impl Core {
    /// Runs a failed or cancelled task again: pending, a fresh attempts budget, its history kept.
    pub async fn retry(&self, id: TaskId) -> Result<Task, CoreError> {
        let inner = self.inner.clone();
        // Detached: the effects run whatever happens to this request.
        let outcome = Effects::detached(async move {
            let r = inner.store.retry_task(id).await;
            if let Ok(Some(RetryOutcome::Retried(t))) = &r {
                inner.effects.retried(&[t.id]);
            }
            r
        })
        .await??;
        match outcome {
            Some(RetryOutcome::Retried(task)) => {
                info!(task_id = %id, attempt = task.attempt, "task retried");
                Ok(task)
            }
            Some(RetryOutcome::Refused(task)) => Err(CoreError::FailedPrecondition(format!(
                "task {id} is {}; only a failed or cancelled task can be retried",
                task.state
            ))),
            None => Err(task_not_found(id)),
        }
    }

    /// Retries up to `limit` tasks matching `filter`, in batches of conditional updates. An
    /// empty filter is refused: retrying every failure ever is not done by accident.
    pub async fn retry_many(&self, filter: RetryFilter, limit: u32) -> Result<BulkRetried, CoreError> {
        if filter.is_empty() {
            return Err(CoreError::InvalidArgument(
                "give at least one filter (job_id, task_type, error_contains, finished_after, finished_before)"
                    .into(),
            ));
        }
        if limit > MAX_RETRY_LIMIT {
            return Err(CoreError::invalid("limit", format!("must be at most {MAX_RETRY_LIMIT}")));
        }
        let limit = if limit == 0 { DEFAULT_RETRY_LIMIT } else { limit };
        let inner = self.inner.clone();
        let ids = Effects::detached(async move {
            let mut ids: Vec<TaskId> = Vec::new();
            while (ids.len() as u32) < limit {
                let want = (limit - ids.len() as u32).min(RETRY_BATCH);
                let batch = inner.store.retry_batch(&filter, ids.last().copied(), want).await.inspect_err(
                    |error| {
                        // What was retried before stays retried; its effects have run.
                        if !ids.is_empty() {
                            warn!(%error, retried = ids.len(), "bulk retry stopped part way");
                        }
                    },
                )?;
                inner.effects.retried(&batch);
                if batch.is_empty() {
                    break;
                }
                ids.extend(batch);
            }
            Ok::<_, crate::store::StoreError>(ids)
        })
        .await??;
        info!(retried = ids.len(), "tasks retried in bulk");
        let more = ids.len() as u32 >= limit;
        Ok(BulkRetried { ids, more })
    }

    /// What failed in `[since, until)` (defaults: the last day up to now): failed tasks by
    /// type, the `top` most frequent (type, error) pairs with a sample task, and attempts by
    /// outcome. Returns the window it used.
    pub async fn failure_summary(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        top: u32,
    ) -> Result<(DateTime<Utc>, DateTime<Utc>, FailureSummary), CoreError> {
        if top > MAX_TOP_ERRORS {
            return Err(CoreError::invalid("top", format!("must be at most {MAX_TOP_ERRORS}")));
        }
        let top = if top == 0 { DEFAULT_TOP_ERRORS } else { top };
        let until = until.unwrap_or_else(Utc::now);
        let window = chrono::TimeDelta::from_std(DEFAULT_SUMMARY_WINDOW).expect("a day fits");
        let since = since.unwrap_or(until - window);
        if since >= until {
            return Err(CoreError::invalid("since", "must be before until"));
        }
        let summary = self.inner.store.failure_summary(since, until, top, SUMMARY_ERROR_LEN).await?;
        Ok((since, until, summary))
    }
}
