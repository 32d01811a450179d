//! The failures summary: failed tasks in a window by type and error, attempts by outcome.

use chrono::{DateTime, Utc};

use super::PgStore;
use crate::store::{FailureSummary, Result, decode};

impl PgStore {
    pub(in crate::store) async fn failure_summary(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        top: u32,
        error_len: u32,
    ) -> Result<FailureSummary> {
        let by_type = sqlx::query(
            "SELECT task_type, count(*) AS n FROM tasks
             WHERE status = 'failed' AND finished_at >= $1 AND finished_at < $2
             GROUP BY task_type",
        )
        .bind(since)
        .bind(until)
        .fetch_all(&self.pool)
        .await?;
        let top_errors = sqlx::query(
            "SELECT task_type, error, count(*) AS n, max(id::text) AS sample, max(finished_at) AS last_at
             FROM (
                 SELECT id, task_type, finished_at,
                        left(split_part(COALESCE(error, ''), E'\\n', 1), $3::int) AS error
                 FROM tasks WHERE status = 'failed' AND finished_at >= $1 AND finished_at < $2
             ) AS f
             GROUP BY task_type, error ORDER BY n DESC, task_type, error LIMIT $4",
        )
        .bind(since)
        .bind(until)
        .bind(error_len as i32)
        .bind(i64::from(top))
        .fetch_all(&self.pool)
        .await?;
        let outcomes = sqlx::query(
            "SELECT outcome, count(*) AS n FROM task_attempts
             WHERE outcome IS NOT NULL AND finished_at >= $1 AND finished_at < $2
             GROUP BY outcome
             UNION ALL
             SELECT 'completed', count(*) FROM tasks
             WHERE status = 'completed' AND finished_at >= $1 AND finished_at < $2
             HAVING count(*) > 0",
        )
        .bind(since)
        .bind(until)
        .fetch_all(&self.pool)
        .await?;
        decode::failure_summary(&by_type, &top_errors, &outcomes)
    }
}
