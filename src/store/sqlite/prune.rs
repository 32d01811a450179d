//! The pruner's deletes: finished tasks past their state's age with their attempts and job
//! memberships, jobs left without members, and workers long silent that hold no task. One
//! process serves a SQLite database, so there is no other pruner to exclude.

use chrono::Utc;

use super::{SqliteStore, plus_ms};
use crate::store::{Pruned, Result, Retention, decode::micros, duration_ms};

impl SqliteStore {
    pub(in crate::store) async fn prune(&self, rules: &Retention, limit: u32) -> Result<Option<Pruned>> {
        let now = micros(Utc::now());
        let before = |age| plus_ms(now, -duration_ms(age));
        let mut tx = self.writer.begin().await?;
        let mut out = Pruned::default();
        let mut left = i64::from(limit);
        for (state, age) in rules.task_ages() {
            if left <= 0 {
                break;
            }
            // The one writer: the ids read here are the rows deleted below.
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT id FROM tasks WHERE status = $1 AND finished_at < $2
                   AND NOT EXISTS (SELECT 1 FROM task_parents p JOIN tasks c ON c.id = p.child
                                   WHERE p.parent = tasks.id
                                     AND c.status IN ('blocked', 'pending', 'assigned', 'running'))
                 ORDER BY finished_at LIMIT $3",
            )
            .bind(state.as_str())
            .bind(before(age))
            .bind(left)
            .fetch_all(&mut *tx)
            .await?;
            if ids.is_empty() {
                continue;
            }
            let ids = serde_json::Value::from(ids).to_string();
            out.task_attempts +=
                sqlx::query("DELETE FROM task_attempts WHERE task_id IN (SELECT value FROM json_each($1))")
                    .bind(&ids)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            sqlx::query("DELETE FROM task_parents WHERE child IN (SELECT value FROM json_each($1))")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            out.job_tasks +=
                sqlx::query("DELETE FROM job_tasks WHERE task_id IN (SELECT value FROM json_each($1))")
                    .bind(&ids)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            let tasks = sqlx::query(
                "DELETE FROM tasks WHERE id IN (SELECT value FROM json_each($1)) AND status = $2",
            )
            .bind(&ids)
            .bind(state.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            out.tasks += tasks;
            left -= tasks as i64;
        }
        if let Some(age) = rules.shortest_task_age() {
            out.jobs = sqlx::query(
                "DELETE FROM jobs WHERE id IN (
                     SELECT j.id FROM jobs j
                     WHERE j.created_at < $1
                       AND NOT EXISTS (SELECT 1 FROM job_tasks m WHERE m.job_id = j.id)
                       AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.job_id = j.id)
                     ORDER BY j.created_at LIMIT $2)",
            )
            .bind(before(age))
            .bind(i64::from(limit))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        if let Some(age) = rules.workers {
            out.workers = sqlx::query(
                "DELETE FROM workers WHERE id IN (
                     SELECT w.id FROM workers w
                     WHERE w.last_heartbeat_at < $1
                       AND NOT EXISTS (SELECT 1 FROM tasks t
                                       WHERE t.worker_id = w.id AND t.status IN ('assigned', 'running'))
                     ORDER BY w.last_heartbeat_at LIMIT $2)",
            )
            .bind(before(age))
            .bind(i64::from(limit))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            // Replicas gone as long (a clean stop removes its own row).
            sqlx::query("DELETE FROM coordinators WHERE last_seen_at < $1")
                .bind(before(age))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Some(out))
    }
}
