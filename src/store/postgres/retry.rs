//! Retries: a failed or cancelled task back to pending with a fresh attempts budget, one at a
//! time or in batches by filter. The attempt counter (the fence) keeps counting; the history
//! stays.

use std::time::Duration;

use super::{PgStore, retry_conflicts};
use crate::{
    domain::TaskId,
    store::{Result, RetryFilter, RetryOutcome, StoreError, decode, sql::TASK_COLUMNS},
};

/// What a retry resets; the attempt counter and the history are kept.
/// A task with parents that have not all completed waits for them again.
const RESET: &str = "status = CASE WHEN COALESCE(blocked_on, 0) > 0 THEN 'blocked' ELSE 'pending' END, failures = 0, error = NULL, result = NULL, worker_id = NULL,
     session_id = NULL, run_after = now(), lease_expires_at = NULL, assigned_at = NULL,
     started_at = NULL, finished_at = NULL, updated_at = now()";

impl PgStore {
    pub(in crate::store) async fn retry_task(&self, id: TaskId) -> Result<Option<RetryOutcome>> {
        let sql = format!(
            "UPDATE tasks SET {RESET} WHERE id = $1 AND status IN ('failed', 'cancelled')
             RETURNING {TASK_COLUMNS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.0).fetch_optional(&self.pool).await?;
        if let Some(row) = row {
            return Ok(Some(RetryOutcome::Retried(decode::task(&row)?)));
        }
        Ok(self.get_task(id).await?.map(RetryOutcome::Refused))
    }

    pub(in crate::store) async fn retry_batch(
        &self,
        f: &RetryFilter,
        after: Option<TaskId>,
        limit: u32,
    ) -> Result<Vec<TaskId>> {
        retry_conflicts!(self.retry_batch_once(f, after, limit).await)
    }

    async fn retry_batch_once(
        &self,
        f: &RetryFilter,
        after: Option<TaskId>,
        limit: u32,
    ) -> Result<Vec<TaskId>> {
        let sql = retry_batch_query(f.job_id.is_some());
        let rows: Vec<(uuid::Uuid,)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(f.include_cancelled)
            .bind(f.job_id.map(|j| j.0))
            .bind(f.task_type.as_deref())
            .bind(f.error_contains.as_deref())
            .bind(f.finished_after)
            .bind(f.finished_before)
            .bind(after.map(|t| t.0))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?;
        let mut ids: Vec<TaskId> = rows.into_iter().map(|(id,)| TaskId(id)).collect();
        ids.sort_unstable();
        Ok(ids)
    }
}

/// Retries a batch of failed (and, with `$1`, cancelled) tasks by filter: `$2` job, `$3` type,
/// `$4` text in the error, `$5`..`$6` finished between, after `$7` in id order, at most `$8`.
/// Candidates are locked in id order; a task another retry moved first no longer matches the
/// status check when its lock is released, and is left alone. With a job (`by_job`) the
/// candidates are the job's members after the cursor, found by key: walking every task in id
/// order to find them reads the whole table.
pub(super) fn retry_batch_query(by_job: bool) -> String {
    let job = if by_job {
        "id = ANY (ARRAY(SELECT task_id FROM job_members
                         WHERE job_id = $2 AND ($7::uuid IS NULL OR task_id > $7)))"
    } else {
        "$2::uuid IS NULL"
    };
    format!(
        "WITH c AS (
             SELECT id FROM tasks
             WHERE status IN ('failed', CASE WHEN $1::boolean THEN 'cancelled' END)
               AND {job}
               AND ($3::text IS NULL OR task_type = $3)
               AND ($4::text IS NULL OR strpos(error, $4) > 0)
               AND ($5::timestamptz IS NULL OR finished_at >= $5)
               AND ($6::timestamptz IS NULL OR finished_at < $6)
               AND ($7::uuid IS NULL OR id > $7)
             ORDER BY id LIMIT $8
             FOR UPDATE
         )
         UPDATE tasks t SET {RESET}
         FROM c WHERE t.id = c.id AND t.status IN ('failed', 'cancelled')
         RETURNING t.id"
    )
}
