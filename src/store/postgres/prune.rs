//! The pruner's deletes: finished tasks past their state's age with their attempts and job
//! memberships, jobs left without members, and workers long silent that hold no task.

use uuid::Uuid;

use super::PgStore;
use crate::store::{Pruned, Result, Retention, duration_ms};

/// The advisory lock one replica's pruner holds for each step, so replicas never prune at once:
/// this key with the hash of the schema the coordinator's tables are in, since advisory locks
/// are per database and two deployments may share one in schemas of their own.
pub const PRUNER_LOCK: i32 = 0x7072_756e;

/// Deletes up to `$2` jobs older than `$1` ms none of whose members is left. Members are added
/// only when a job is created, in the same transaction, so such a job is one the pruner emptied
/// (or an empty submission). Each old job is checked on its own, oldest first (the CASE keeps
/// the checks per job, never a join of every job's members against every task): through its
/// list, a key lookup per member until one is found; for a job without one (see migration 0015),
/// through its tasks' rows and `job_tasks`.
pub(super) const PRUNE_JOBS: &str = "DELETE FROM jobs WHERE id IN (
         SELECT j.id FROM jobs j
         WHERE j.created_at < now() - $1 * interval '1 millisecond'
           AND CASE WHEN j.members IS NOT NULL
               THEN NOT EXISTS (SELECT 1 FROM unnest(j.members) AS m(id)
                                WHERE EXISTS (SELECT 1 FROM tasks t WHERE t.id = m.id))
               ELSE NOT EXISTS (SELECT 1 FROM job_tasks s WHERE s.job_id = j.id)
                    AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.job_id = j.id)
               END
         ORDER BY j.created_at LIMIT $2 FOR UPDATE SKIP LOCKED)";

impl PgStore {
    pub(in crate::store) async fn prune(&self, rules: &Retention, limit: u32) -> Result<Option<Pruned>> {
        let mut tx = self.pool.begin().await?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema()))")
                .bind(PRUNER_LOCK)
                .fetch_one(&mut *tx)
                .await?;
        if !locked {
            tx.rollback().await?;
            return Ok(None);
        }
        let mut out = Pruned::default();
        let mut left = i64::from(limit);
        for (state, age) in rules.task_ages() {
            if left <= 0 {
                break;
            }
            // Locked, so a retry or a read-modify-write racing the pruner either went first (the
            // task is no longer in this state and is skipped) or waits and then finds nothing.
            let ids: Vec<Uuid> = sqlx::query_scalar(
                "SELECT id FROM tasks
                 WHERE status = $1 AND finished_at < now() - $2 * interval '1 millisecond'
                   AND NOT EXISTS (SELECT 1 FROM task_parents p JOIN tasks c ON c.id = p.child
                                   WHERE p.parent = tasks.id
                                     AND c.status IN ('blocked', 'pending', 'assigned', 'running'))
                 ORDER BY finished_at LIMIT $3 FOR UPDATE SKIP LOCKED",
            )
            .bind(state.as_str())
            .bind(duration_ms(age))
            .bind(left)
            .fetch_all(&mut *tx)
            .await?;
            // Again in a statement of its own: a submission that named one of these tasks as a
            // parent and committed while the locks above were taken is seen now (the check above
            // ran in the older snapshot); a completed parent a live task waits on is kept.
            let ids: Vec<Uuid> = sqlx::query_scalar(
                "SELECT id FROM tasks
                 WHERE id = ANY($1)
                   AND NOT EXISTS (SELECT 1 FROM task_parents p JOIN tasks c ON c.id = p.child
                                   WHERE p.parent = tasks.id
                                     AND c.status IN ('blocked', 'pending', 'assigned', 'running'))",
            )
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
            if ids.is_empty() {
                continue;
            }
            out.task_attempts += sqlx::query("DELETE FROM task_attempts WHERE task_id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query("DELETE FROM task_parents WHERE child = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            out.job_tasks += sqlx::query("DELETE FROM job_tasks WHERE task_id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let tasks = sqlx::query("DELETE FROM tasks WHERE id = ANY($1) AND status = $2")
                .bind(&ids)
                .bind(state.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
            out.tasks += tasks;
            left -= tasks as i64;
        }
        if let Some(age) = rules.shortest_task_age() {
            out.jobs = sqlx::query(PRUNE_JOBS)
                .bind(duration_ms(age))
                .bind(i64::from(limit))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        if let Some(age) = rules.workers {
            // The row lock makes a registration of the same worker either land first (its
            // heartbeat time is fresh and the row is skipped) or after (it inserts anew).
            out.workers = sqlx::query(
                "DELETE FROM workers WHERE id IN (
                     SELECT w.id FROM workers w
                     WHERE w.last_heartbeat_at < now() - $1 * interval '1 millisecond'
                       AND NOT EXISTS (SELECT 1 FROM tasks t
                                       WHERE t.worker_id = w.id AND t.status IN ('assigned', 'running'))
                     ORDER BY w.last_heartbeat_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(duration_ms(age))
            .bind(i64::from(limit))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            // Replicas gone as long (a clean stop removes its own row).
            sqlx::query(
                "DELETE FROM coordinators WHERE last_seen_at < now() - $1 * interval '1 millisecond'",
            )
            .bind(duration_ms(age))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Some(out))
    }
}
