//! Attempts taken back without a report: lease expired, past the deadline, worker dead,
//! undelivered, released, not held by a worker that registered again. [`policy::after_loss`]
//! decides what each task becomes.

use std::{collections::HashMap, time::Duration};

use sqlx::Row;
use uuid::Uuid;

use super::{PgStore, dependents, held_arrays, retry_conflicts};
use crate::{
    domain::{RequeueReason, TaskState, WorkerId},
    store::{Held, Requeued, Result, Settled, StoreError, decode, policy},
};

/// Held tasks whose lease ran out, at most `$1`.
pub(super) const EXPIRED: &str = "SELECT id, attempt, worker_id, failures, max_attempts FROM tasks
     WHERE status IN ('assigned', 'running') AND lease_expires_at < now()
     ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED";

/// Running tasks still unreported `$2` ms after their deadline, at most `$1`. Running only: an
/// attempt still `assigned` never reached its worker (a delivered one is marked running at
/// once), and goes back uncharged through the slot comparison. Among the tasks out on workers
/// (`tasks_worker` holds them all); in numeric, so no timeout however long overflows.
pub(super) const OVERDUE: &str = "SELECT id, attempt, worker_id, failures, max_attempts FROM tasks
     WHERE status = 'running'
       AND EXTRACT(EPOCH FROM now() - assigned_at) * 1000 > timeout_ms::numeric + $2
     ORDER BY assigned_at LIMIT $1 FOR UPDATE SKIP LOCKED";

impl PgStore {
    pub(in crate::store) async fn requeue_expired(&self, limit: u32) -> Result<Vec<Requeued>> {
        retry_conflicts!(self.requeue_expired_once(limit).await)
    }

    async fn requeue_expired_once(&self, limit: u32) -> Result<Vec<Requeued>> {
        let victims = sqlx::query(EXPIRED).bind(i64::from(limit));
        self.requeue_selected(victims, RequeueReason::LeaseExpired).await
    }

    /// Requeues for `reason` what `victims` selects and locks, in a transaction of its own.
    async fn requeue_selected<'q>(
        &self,
        victims: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        reason: RequeueReason,
    ) -> Result<Vec<Requeued>> {
        let mut tx = self.pool.begin().await?;
        let mut settled = Settled::default();
        let out = requeue(&mut tx, victims, reason, &mut settled).await?;
        tx.commit().await?;
        self.settled.send(settled);
        Ok(out)
    }

    pub(in crate::store) async fn requeue_overdue(
        &self,
        limit: u32,
        grace: Duration,
    ) -> Result<Vec<Requeued>> {
        retry_conflicts!(self.requeue_overdue_once(limit, grace).await)
    }

    async fn requeue_overdue_once(&self, limit: u32, grace: Duration) -> Result<Vec<Requeued>> {
        let victims = sqlx::query(OVERDUE).bind(i64::from(limit)).bind(crate::store::duration_ms(grace));
        self.requeue_selected(victims, RequeueReason::TimedOut).await
    }

    pub(in crate::store) async fn requeue_worker(
        &self,
        worker: &WorkerId,
        session: Uuid,
    ) -> Result<Vec<Requeued>> {
        retry_conflicts!(self.requeue_worker_once(worker, session).await)
    }

    async fn requeue_worker_once(&self, worker: &WorkerId, session: Uuid) -> Result<Vec<Requeued>> {
        // The worker row is locked first: a registration of a new session (which updates it)
        // either committed before, and nothing here matches, or waits until this is done.
        let victims = sqlx::query(
            "SELECT t.id, t.attempt, t.worker_id, t.failures, t.max_attempts FROM tasks t
             WHERE t.status IN ('assigned', 'running') AND t.worker_id = $1
               AND (t.session_id = $2 OR t.session_id IS NULL)
               AND EXISTS (SELECT 1 FROM workers w WHERE w.id = $1 AND w.session_id = $2 FOR UPDATE)
             ORDER BY t.id FOR UPDATE OF t",
        )
        .bind(&worker.0)
        .bind(session);
        self.requeue_selected(victims, RequeueReason::WorkerDead).await
    }

    /// Gives back held tasks named by (task, worker, attempt): `Undelivered` only while still
    /// `assigned` (they never reached the worker), the other reasons also when running.
    pub(in crate::store) async fn requeue_held(
        &self,
        held: &[Held],
        reason: RequeueReason,
    ) -> Result<Vec<Requeued>> {
        retry_conflicts!(
            async {
                let mut tx = self.pool.begin().await?;
                let mut settled = Settled::default();
                let out = requeue_held_in(&mut tx, held, reason, &mut settled).await?;
                tx.commit().await?;
                self.settled.send(settled);
                Ok::<_, StoreError>(out)
            }
            .await
        )
    }
}

/// Shared requeue: `victims` selects and locks the lost attempts (id, attempt, worker_id,
/// failures, max_attempts); [`policy::after_loss`] decides what each task becomes (pending again,
/// or failed when out of attempts), and their attempt rows are closed, in the caller's
/// transaction. The dependents of the tasks that failed end with them (into `settled`, for the
/// caller to announce after its commit).
async fn requeue<'q>(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    victims: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    reason: RequeueReason,
    settled: &mut Settled,
) -> Result<Vec<Requeued>> {
    let rows = victims.fetch_all(&mut **tx).await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut lost = Vec::with_capacity(rows.len());
    let mut nexts = Vec::with_capacity(rows.len());
    for r in &rows {
        let h = decode::held(r)?;
        let charges = decode::charges(r)?;
        nexts.push(policy::after_loss(charges, reason, &h));
        lost.push(h);
    }
    let (ids, workers, attempts) = held_arrays(&lost);
    let failures: Vec<i32> = nexts.iter().map(|n| n.failures as i32).collect();
    let states: Vec<&str> = nexts.iter().map(|n| n.state.as_str()).collect();
    let errors: Vec<Option<&str>> = nexts.iter().map(|n| n.error.as_deref()).collect();
    let finished: Vec<bool> = nexts.iter().map(|n| n.finished()).collect();
    let delays: Vec<Option<i64>> = nexts.iter().map(|n| n.retry_in_ms()).collect();
    let rows = sqlx::query(
        "WITH v AS (
             SELECT * FROM unnest($1::uuid[], $2::int[], $3::int[], $4::text[], $5::text[], $6::bool[], $7::bigint[],
                                  $9::text[])
                 AS v(id, attempt, failures, status, error, finished, delay_ms, worker_id)
         ),
         upd AS (
             UPDATE tasks t
             SET failures = v.failures, status = v.status, error = COALESCE(v.error, t.error),
                 finished_at = CASE WHEN v.finished THEN now() END,
                 run_after = COALESCE(now() + v.delay_ms * interval '1 millisecond', t.run_after),
                 worker_id = NULL, session_id = NULL, lease_expires_at = NULL, updated_at = now()
             FROM v WHERE t.id = v.id
             RETURNING t.id, t.task_type, t.status, v.attempt, v.worker_id, t.assigned_at, t.started_at
         ),
         att AS (
             INSERT INTO task_attempts (task_id, attempt, worker_id, assigned_at, started_at, finished_at, outcome)
             SELECT id, attempt, worker_id, COALESCE(assigned_at, now()), started_at, now(), $8 FROM upd
             ON CONFLICT (task_id, attempt) DO NOTHING
         )
         SELECT id, task_type, status FROM upd",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&failures)
    .bind(&states)
    .bind(&errors)
    .bind(&finished)
    .bind(&delays)
    .bind(reason.as_str())
    .bind(&workers)
    .fetch_all(&mut **tx)
    .await?;
    let mut updated: HashMap<Uuid, (String, TaskState)> = HashMap::new();
    for r in rows {
        updated.insert(r.try_get("id")?, (r.try_get("task_type")?, decode::state(r.try_get("status")?)?));
    }
    let roots: Vec<_> = lost
        .iter()
        .zip(&nexts)
        .filter(|(h, n)| n.finished() && updated.contains_key(&h.task_id.0))
        .map(|(h, n)| (h.task_id, n.state, n.error.clone()))
        .collect();
    if !roots.is_empty() {
        settled.ended.extend(dependents::end_dependents(tx, &roots).await?);
    }
    lost.into_iter()
        .filter_map(|h| {
            let (task_type, state) = updated.remove(&h.task_id.0)?;
            Some(Requeued {
                task_id: h.task_id,
                task_type,
                worker_id: h.worker_id,
                attempt: h.attempt,
                state,
                reason,
            })
        })
        .map(Ok)
        .collect()
}

/// [`requeue`] of the tasks named by (task, worker, attempt).
pub(super) async fn requeue_held_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    held: &[Held],
    reason: RequeueReason,
    settled: &mut Settled,
) -> Result<Vec<Requeued>> {
    let (ids, workers, attempts) = held_arrays(held);
    let victims = sqlx::query(
        "SELECT t.id, t.attempt, t.worker_id, t.failures, t.max_attempts
         FROM tasks t JOIN unnest($1::uuid[], $2::text[], $3::int[]) AS h(id, worker_id, attempt)
           ON t.id = h.id AND t.worker_id = h.worker_id AND t.attempt = h.attempt
         WHERE t.status = 'assigned' OR (t.status = 'running' AND $4)
         ORDER BY t.id FOR UPDATE OF t",
    )
    .bind(ids)
    .bind(workers)
    .bind(attempts)
    .bind(policy::takes_running(reason));
    requeue(tx, victims, reason, settled).await
}
