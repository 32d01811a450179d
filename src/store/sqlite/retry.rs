//! Retries: a failed or cancelled task back to pending with a fresh attempts budget, one at a
//! time or in batches by filter. The attempt counter (the fence) keeps counting; the history
//! stays.

use chrono::Utc;

use super::SqliteStore;
use crate::{
    domain::TaskId,
    store::{
        Result, RetryFilter, RetryOutcome,
        decode::{self, micros, parse_uuid},
        sql::TASK_COLUMNS,
    },
};

/// What a retry resets (`$1` is now); the attempt counter and the history are kept.
/// A task with parents that have not all completed waits for them again.
const RESET: &str = "status = CASE WHEN COALESCE(blocked_on, 0) > 0 THEN 'blocked' ELSE 'pending' END, failures = 0, error = NULL, result = NULL, worker_id = NULL,
     session_id = NULL, run_after = $1, lease_expires_at = NULL, assigned_at = NULL,
     started_at = NULL, finished_at = NULL, updated_at = $1";

impl SqliteStore {
    pub(in crate::store) async fn retry_task(&self, id: TaskId) -> Result<Option<RetryOutcome>> {
        let sql = format!(
            "UPDATE tasks SET {RESET} WHERE id = $2 AND status IN ('failed', 'cancelled')
             RETURNING {TASK_COLUMNS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(micros(Utc::now()))
            .bind(id.to_string())
            .fetch_optional(&self.writer)
            .await?;
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
        // One writer: the select and the update cannot interleave with another write.
        let sql = format!(
            "UPDATE tasks SET {RESET}
             WHERE status IN ('failed', 'cancelled') AND id IN (
                 SELECT id FROM tasks
                 WHERE status IN ('failed', CASE WHEN $2 THEN 'cancelled' END)
                   AND ($3 IS NULL OR id IN (SELECT task_id FROM job_members WHERE job_id = $3))
                   AND ($4 IS NULL OR task_type = $4)
                   AND ($5 IS NULL OR instr(error, $5) > 0)
                   AND ($6 IS NULL OR finished_at >= $6)
                   AND ($7 IS NULL OR finished_at < $7)
                   AND ($8 IS NULL OR id > $8)
                 ORDER BY id LIMIT $9
             )
             RETURNING id"
        );
        let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(micros(Utc::now()))
            .bind(f.include_cancelled)
            .bind(f.job_id.map(|j| j.to_string()))
            .bind(f.task_type.as_deref())
            .bind(f.error_contains.as_deref())
            .bind(f.finished_after.map(micros))
            .bind(f.finished_before.map(micros))
            .bind(after.map(|t| t.to_string()))
            .bind(i64::from(limit))
            .fetch_all(&self.writer)
            .await?;
        let mut ids = rows.iter().map(|(s,)| parse_uuid("id", s).map(TaskId)).collect::<Result<Vec<_>>>()?;
        ids.sort_unstable();
        Ok(ids)
    }
}
