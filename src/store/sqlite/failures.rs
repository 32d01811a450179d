//! The failures summary: failed tasks in a window by type and error, attempts by outcome.

use chrono::{DateTime, Utc};

use super::SqliteStore;
use crate::store::{
    FailureSummary, Result,
    decode::{self, micros},
};

impl SqliteStore {
    pub(in crate::store) async fn failure_summary(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        top: u32,
        error_len: u32,
    ) -> Result<FailureSummary> {
        let (since, until) = (micros(since), micros(until));
        let by_type = sqlx::query(
            "SELECT task_type, count(*) AS n FROM tasks
             WHERE status = 'failed' AND finished_at >= $1 AND finished_at < $2
             GROUP BY task_type",
        )
        .bind(since)
        .bind(until)
        .fetch_all(&self.reader)
        .await?;
        let top_errors = sqlx::query(
            "SELECT task_type, error, count(*) AS n, max(id) AS sample, max(finished_at) AS last_at
             FROM (
                 SELECT id, task_type, finished_at,
                        substr(CASE WHEN instr(e, char(10)) > 0 THEN substr(e, 1, instr(e, char(10)) - 1)
                                    ELSE e END, 1, $3) AS error
                 FROM (SELECT id, task_type, finished_at, COALESCE(error, '') AS e FROM tasks
                       WHERE status = 'failed' AND finished_at >= $1 AND finished_at < $2)
             ) AS f
             GROUP BY task_type, error ORDER BY n DESC, task_type, error LIMIT $4",
        )
        .bind(since)
        .bind(until)
        .bind(i64::from(error_len))
        .bind(i64::from(top))
        .fetch_all(&self.reader)
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
        .fetch_all(&self.reader)
        .await?;
        decode::failure_summary(&by_type, &top_errors, &outcomes)
    }
}
