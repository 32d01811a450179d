//! Jobs as a whole: list them, cancel one, watch one until it ends.

use std::collections::HashSet;

use tokio::sync::broadcast;
use tracing::info;

use super::{Core, CoreError, Updates, effects::Effects, stored_text};
use crate::{
    domain::{Job, JobId, TaskId},
    events::ANY_TASK,
};

/// Cancellation reasons are cut to this many bytes.
const MAX_REASON_LEN: usize = 1024;

/// The answer to a job's cancel.
#[derive(Debug, Clone, PartialEq)]
pub struct JobCancelled {
    /// How many of its tasks this call cancelled (the others had ended already).
    pub cancelled: u32,
    /// The job after the cancel.
    pub job: Job,
}

impl Core {
    /// A page of jobs, newest first, with their counts.
    pub async fn list_jobs(&self, before: Option<JobId>, limit: u32) -> Result<Vec<Job>, CoreError> {
        Ok(self.inner.store.list_jobs(before, limit).await?)
    }

    /// Cancels every task of a job that has not ended, as a task's cancel does: the worker
    /// holding one is told to stop. An empty reason says "job cancelled by client".
    pub async fn cancel_job(&self, id: JobId, reason: String) -> Result<JobCancelled, CoreError> {
        let reason = match stored_text(reason, MAX_REASON_LEN) {
            r if r.is_empty() => "job cancelled by client".to_owned(),
            r => r,
        };
        let inner = self.inner.clone();
        // Detached: the effects run whatever happens to this request.
        let cancelled = Effects::detached(async move {
            let r = inner.store.cancel_job(id, &reason).await;
            if let Ok(Some(all)) = &r {
                for c in all {
                    inner.effects.cancelled(c);
                }
            }
            r
        })
        .await??;
        let not_found = || CoreError::NotFound(format!("job {id} not found"));
        let cancelled = cancelled.ok_or_else(not_found)?.len() as u32;
        info!(job_id = %id, cancelled, "job cancelled");
        let job = self.inner.store.get_job(id).await?.ok_or_else(not_found)?;
        Ok(JobCancelled { cancelled, job })
    }

    /// The job now, then again each time its counts change, until every task has ended (or
    /// shutdown begins: the stream ends with `Unavailable`). Changes are seen through the task
    /// events, which carry other replicas' terminal transitions too (LISTEN/NOTIFY); the
    /// `watch_poll` re-read covers what no event names.
    pub async fn watch_job(&self, id: JobId) -> Result<Updates<Job>, CoreError> {
        self.refuse_if_closing()?;
        // Subscribe before the first read so no change between the two is missed.
        let mut events = self.inner.events.subscribe();
        let not_found = move || CoreError::NotFound(format!("job {id} not found"));
        let first = self.inner.store.get_job(id).await?.ok_or_else(not_found)?;
        let members: HashSet<TaskId> = self.inner.store.job_task_ids(id).await?.into_iter().collect();
        let core = self.clone();
        let stream = async_stream::stream! {
            let inner = &core.inner;
            let done = first.done();
            let mut last = first.counts.clone();
            yield Ok(first);
            if done {
                return;
            }
            loop {
                let ours = |t: TaskId| t == ANY_TASK || members.contains(&t);
                let wait = async {
                    loop {
                        match events.recv().await {
                            Ok(changed) if ours(changed) => break,
                            Ok(_) => continue,
                            // Missed some: re-read to be safe.
                            Err(broadcast::error::RecvError::Lagged(_)) => break,
                            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                        }
                    }
                    // A burst of changes (a batch of completions) is one re-read.
                    while events.try_recv().is_ok() {}
                };
                tokio::select! {
                    biased;
                    _ = inner.closing.cancelled() => {
                        yield Err(CoreError::shutting_down());
                        return;
                    }
                    _ = wait => {}
                    _ = tokio::time::sleep(inner.config.watch_poll) => {}
                }
                let job = match inner.store.get_job(id).await {
                    Ok(Some(j)) => j,
                    Ok(None) => {
                        yield Err(not_found());
                        return;
                    }
                    Err(e) => {
                        yield Err(CoreError::from(e));
                        return;
                    }
                };
                let done = job.done();
                if job.counts != last {
                    last = job.counts.clone();
                    yield Ok(job);
                }
                if done {
                    return;
                }
            }
        };
        Ok(Box::pin(stream))
    }
}
