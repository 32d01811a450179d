//! Attempts taken back without a report: lease expired, past the deadline, worker dead,
//! undelivered, released, not held by a worker that registered again. [`policy::after_loss`]
//! decides what each task becomes.

use std::collections::HashSet;

use chrono::Utc;
use sqlx::Row;
use uuid::Uuid;

use super::{SqliteStore, Tx, plus_ms};
use crate::{
    domain::{RequeueReason, WorkerId},
    store::{
        Held, Requeued, Result, Settled,
        decode::{self, micros},
        policy,
    },
};

/// Held tasks whose lease ran out before `$1`, at most `$2`.
const EXPIRED: &str = "SELECT id, attempt, worker_id FROM tasks
     WHERE status IN ('assigned', 'running') AND lease_expires_at < $1
     ORDER BY lease_expires_at LIMIT $2";

/// Running tasks still unreported `$3` ms after their deadline at `$1`, at most `$2`. Running
/// only, as on Postgres; the index's own condition is stated too: SQLite uses a partial index
/// only for a query that repeats it, and would read every task otherwise. Times are
/// microseconds; the sum is taken in milliseconds since the assignment, so no timeout however
/// long overflows it.
const OVERDUE: &str = "SELECT id, attempt, worker_id FROM tasks
     WHERE status IN ('assigned', 'running') AND status = 'running'
       AND ($1 - assigned_at) / 1000 - $3 > timeout_ms
     ORDER BY assigned_at LIMIT $2";

impl SqliteStore {
    pub(in crate::store) async fn requeue_expired(&self, limit: u32) -> Result<Vec<Requeued>> {
        let now = micros(Utc::now());
        let mut tx = self.writer.begin().await?;
        let victims = sqlx::query(EXPIRED).bind(now).bind(i64::from(limit)).fetch_all(&mut *tx).await?;
        self.requeue_rows(tx, &victims, RequeueReason::LeaseExpired, now).await
    }

    /// Requeues for `reason` the held tasks in `victims` (id, attempt, worker_id) and commits.
    async fn requeue_rows(
        &self,
        mut tx: Tx<'_>,
        victims: &[sqlx::sqlite::SqliteRow],
        reason: RequeueReason,
        now: i64,
    ) -> Result<Vec<Requeued>> {
        let held = victims.iter().map(decode::held).collect::<Result<Vec<_>>>()?;
        let mut settled = Settled::default();
        let out = requeue(&mut tx, &held, reason, now, &mut settled).await?;
        tx.commit().await?;
        self.settled.send(settled);
        Ok(out)
    }

    pub(in crate::store) async fn requeue_overdue(
        &self,
        limit: u32,
        grace: std::time::Duration,
    ) -> Result<Vec<Requeued>> {
        let now = micros(Utc::now());
        let mut tx = self.writer.begin().await?;
        let victims = sqlx::query(OVERDUE)
            .bind(now)
            .bind(i64::from(limit))
            .bind(crate::store::duration_ms(grace))
            .fetch_all(&mut *tx)
            .await?;
        self.requeue_rows(tx, &victims, RequeueReason::TimedOut, now).await
    }

    pub(in crate::store) async fn requeue_worker(
        &self,
        worker: &WorkerId,
        session: Uuid,
    ) -> Result<Vec<Requeued>> {
        let now = micros(Utc::now());
        let mut tx = self.writer.begin().await?;
        let victims = sqlx::query(
            "SELECT id, attempt, worker_id FROM tasks
             WHERE status IN ('assigned', 'running') AND worker_id = $1
               AND (session_id = $2 OR session_id IS NULL)
               AND EXISTS (SELECT 1 FROM workers WHERE id = $1 AND session_id = $2)
             ORDER BY id",
        )
        .bind(&worker.0)
        .bind(session.to_string())
        .fetch_all(&mut *tx)
        .await?;
        self.requeue_rows(tx, &victims, RequeueReason::WorkerDead, now).await
    }

    pub(in crate::store) async fn requeue_held(
        &self,
        held: &[Held],
        reason: RequeueReason,
    ) -> Result<Vec<Requeued>> {
        let now = micros(Utc::now());
        let mut tx = self.writer.begin().await?;
        let mut settled = Settled::default();
        let out = requeue(&mut tx, held, reason, now, &mut settled).await?;
        tx.commit().await?;
        self.settled.send(settled);
        Ok(out)
    }
}

/// Gives held tasks back: pending again, or failed when out of attempts. Each update is fenced by
/// (task, worker, attempt) and a held status, so a completion that won the race is untouched.
/// The dependents of the tasks that failed end with them (into `settled`).
pub(super) async fn requeue(
    tx: &mut Tx<'_>,
    held: &[Held],
    reason: RequeueReason,
    now: i64,
    settled: &mut Settled,
) -> Result<Vec<Requeued>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for h in held {
        if !seen.insert(h.clone()) {
            continue;
        }
        let row = sqlx::query(
            "SELECT task_type, failures, max_attempts FROM tasks
             WHERE id = $1 AND worker_id = $2 AND attempt = $3
               AND (status = 'assigned' OR (status = 'running' AND $4))",
        )
        .bind(h.task_id.to_string())
        .bind(&h.worker_id.0)
        .bind(i64::from(h.attempt))
        .bind(policy::takes_running(reason))
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else { continue };
        let charges = decode::charges(&row)?;
        let next = policy::after_loss(charges, reason, h);
        // One writer: the row read above is the row updated here.
        sqlx::query(
            "UPDATE tasks SET failures = $2, status = $3, error = COALESCE($4, error), finished_at = $5,
                 run_after = COALESCE($6, run_after), updated_at = $7,
                 worker_id = NULL, session_id = NULL, lease_expires_at = NULL
             WHERE id = $1",
        )
        .bind(h.task_id.to_string())
        .bind(i64::from(next.failures))
        .bind(next.state.as_str())
        .bind(next.error.as_deref())
        .bind(next.finished().then_some(now))
        .bind(next.retry_in_ms().map(|ms| plus_ms(now, ms)))
        .bind(now)
        .execute(&mut **tx)
        .await?;
        super::report::close_attempt(tx, h, now, now, reason.as_str(), None).await?;
        if next.finished() {
            let root = [(h.task_id, next.state, next.error.clone())];
            settled.ended.extend(super::dependents::end_dependents(tx, &root, now).await?);
        }
        out.push(Requeued {
            task_id: h.task_id,
            task_type: row.try_get("task_type")?,
            worker_id: h.worker_id.clone(),
            attempt: h.attempt,
            state: next.state,
            reason,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, testing::TestDb};

    /// The sweeper's statements read only the tasks out on workers (a partial index), never the
    /// whole table with its finished history, on every `cleanup_interval`.
    #[tokio::test]
    async fn the_sweeps_read_the_tasks_out_on_workers_only() {
        let db = TestDb::sqlite().await;
        let Store::Sqlite(s) = &db.store else { unreachable!("a SQLite test database") };
        for (name, sql, params) in [("expired", EXPIRED, 2), ("overdue", OVERDUE, 3)] {
            let mut query = sqlx::query_as::<_, (i64, i64, i64, String)>(sqlx::AssertSqlSafe(format!(
                "EXPLAIN QUERY PLAN {sql}"
            )));
            for _ in 0..params {
                query = query.bind(0i64);
            }
            let plan = query.fetch_all(s.pool()).await.unwrap_or_else(|e| panic!("{name}: {e}"));
            let plan: Vec<String> = plan.into_iter().map(|(_, _, _, detail)| detail).collect();
            let plan = plan.join("\n");
            // Each of these holds only the tasks out on workers (and what waits to run).
            let partial = ["tasks_lease", "tasks_worker", "tasks_status"];
            assert!(
                partial.iter().any(|i| plan.contains(&format!("USING INDEX {i}"))),
                "the {name} sweep reads every task:\n{plan}"
            );
        }
        db.cleanup().await;
    }

    /// The gauges' count of live tasks reads `tasks_status`, which holds only them, not the
    /// finished history.
    #[tokio::test]
    async fn the_live_counts_read_the_live_tasks_only() {
        let db = TestDb::sqlite().await;
        let Store::Sqlite(s) = &db.store else { unreachable!("a SQLite test database") };
        let sql = crate::store::sqlite::read::LIVE_TASK_COUNTS;
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                .fetch_all(s.pool())
                .await
                .unwrap();
        let plan: Vec<String> = plan.into_iter().map(|(_, _, _, detail)| detail).collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("USING COVERING INDEX tasks_status") || plan.contains("USING INDEX tasks_status"),
            "{plan}"
        );
        db.cleanup().await;
    }
}
