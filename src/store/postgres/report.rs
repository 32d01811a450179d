//! Reports: completions and failures fenced by (task, worker, attempt), classified when they
//! changed nothing; cancellation.

use std::{collections::HashSet, time::Duration};

use sqlx::Row;

use uuid::Uuid;

use super::{PgStore, claim, dependents, held_arrays, retry_conflicts};
use crate::{
    domain::{Assignment, TaskId, TaskState},
    store::{
        Cancelled, Completion, Failure, Held, Refill, ReportOutcome, Result, RetryPolicy, Settled,
        StoreError, decode, micros_ago, policy, sql::TASK_COLUMNS,
    },
};

/// The completion statement, with `$lock` (a CTE or nothing) first and `$locked` (a condition or
/// nothing) on each updated row: see [`COMPLETE`] and [`COMPLETE_LOCKING`].
macro_rules! complete_sql {
    ($lock:literal, $locked:literal) => {
        concat!(
            "WITH ",
            $lock,
            "r AS (
         SELECT DISTINCT ON (id, worker_id, attempt) id, worker_id, attempt, result, ago_us
         FROM unnest($1::uuid[], $2::text[], $3::int[], $4::bytea[], $5::bigint[]) WITH ORDINALITY
             AS r(id, worker_id, attempt, result, ago_us, ord)
         ORDER BY id, worker_id, attempt, ord
     ),
     upd AS (
         UPDATE tasks t
         SET status = 'completed', result = r.result, error = NULL, finished_at = now(),
             started_at = COALESCE(t.started_at, now() - r.ago_us * interval '1 microsecond', now()),
             updated_at = now(), lease_expires_at = NULL
         FROM r
         WHERE t.id = ANY(ARRAY[r.id]) AND (t.worker_id = r.worker_id AND t.attempt = r.attempt) IS TRUE
           AND (t.status IN ('assigned', 'running')) IS TRUE",
            $locked,
            "
         RETURNING t.id, t.attempt, t.worker_id, t.dependents
     )
     SELECT id, attempt, worker_id, dependents FROM upd"
        )
    };
}

/// Completes held attempts, each named by (task, worker, attempt): the first report of each wins.
/// Each task is found by its key ([`super::batch_settings`]).
pub(super) const COMPLETE: &str = complete_sql!("", "");

/// [`COMPLETE`], which first share-locks the rows of the workers in `$6`, in id order, before it
/// touches any task ([`PgStore::complete_and_claim`]): the count of the locked rows is a condition
/// of every row of the update that depends on none of them, so the plan runs it once, before the
/// update reads its first row (`a_refilling_completion_locks_its_workers_before_their_tasks`).
pub(super) const COMPLETE_LOCKING: &str = complete_sql!(
    "lk AS MATERIALIZED (SELECT 1 FROM workers WHERE id = ANY($6::text[]) ORDER BY id FOR SHARE),
     ",
    "
           AND (SELECT count(*) FROM lk) >= 0"
);

/// The task row and the closed attempt of each unapplied report, to classify it; each found by its
/// key ([`super::batch_settings`]).
pub(super) const OUTCOMES: &str = "SELECT r.ord, t.status, t.attempt,
                CASE WHEN t.status = 'completed' AND t.attempt = r.attempt AND t.worker_id = r.worker_id
                     THEN 'completed' ELSE a.outcome END AS outcome
         FROM unnest($1::uuid[], $2::text[], $3::int[]) WITH ORDINALITY AS r(id, worker_id, attempt, ord)
         LEFT JOIN tasks t ON t.id = ANY(ARRAY[r.id])
         LEFT JOIN task_attempts a ON a.task_id = ANY(ARRAY[r.id])
             AND (a.attempt = r.attempt AND a.worker_id = r.worker_id) IS TRUE";

impl PgStore {
    pub(in crate::store) async fn complete(&self, reports: &[Completion]) -> Result<Vec<ReportOutcome>> {
        retry_conflicts!(self.complete_once(reports).await)
    }

    async fn complete_once(&self, reports: &[Completion]) -> Result<Vec<ReportOutcome>> {
        let mut tx = self.pool.begin_with(super::BATCH_BEGIN).await?;
        let (outcomes, released, _) = self.complete_in(&mut tx, reports, false).await?;
        tx.commit().await?;
        self.settled.send(Settled { released, ended: Vec::new() });
        Ok(outcomes)
    }

    /// [`Self::complete`], and in the same transaction a claim for the slots it frees: `refill`
    /// is told which attempts completed and says what to claim ([`Refill`]).
    pub(in crate::store) async fn complete_and_claim(
        &self,
        reports: &[Completion],
        lease: Duration,
        refill: &mut dyn Refill,
    ) -> Result<(Vec<ReportOutcome>, Vec<Assignment>)> {
        retry_conflicts!(self.complete_and_claim_once(reports, lease, &mut *refill).await)
    }

    async fn complete_and_claim_once(
        &self,
        reports: &[Completion],
        lease: Duration,
        refill: &mut dyn Refill,
    ) -> Result<(Vec<ReportOutcome>, Vec<Assignment>)> {
        let mut tx = self.pool.begin_with(claim::CLAIM_BEGIN).await?;
        // The reporting workers' rows before their tasks' rows, in the order registrations and
        // requeues lock them (worker, then its tasks): a session's tasks taken back while this
        // completes them wait for it or it for them, never both. The claim's fence below
        // share-locks them again.
        let (outcomes, released, completed) = self.complete_in(&mut tx, reports, true).await?;
        let assignments = match refill.wanted(&completed) {
            Some((limit, filter)) => {
                match claim::claim_in(&mut tx, limit, &filter, lease, |c, a| refill.place(c, a)).await {
                    Ok(assignments) => assignments,
                    Err(e) if e.is_unavailable() => return Err(e),
                    Err(e) => {
                        // The results do not depend on the claim: a claim that fails (a lock
                        // wait that times out, a row it cannot read) takes the transaction with
                        // it, and the results commit alone in one of their own; the passes
                        // refill. No savepoint on the way: one round trip less per batch.
                        tx.rollback().await?;
                        refill.claim_failed(&e);
                        return Ok((self.complete_once(reports).await?, Vec::new()));
                    }
                }
            }
            None => Vec::new(),
        };
        tx.commit().await?;
        self.settled.send(Settled { released, ended: Vec::new() });
        Ok((outcomes, assignments))
    }

    /// Applies completions in `tx`: one outcome per report, the tasks their completion
    /// released (dependents), and the attempts that completed. With `lock_workers`, the
    /// reporting workers' rows are share-locked first, in id order, in the same statement.
    async fn complete_in(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        reports: &[Completion],
        lock_workers: bool,
    ) -> Result<(Vec<ReportOutcome>, Vec<TaskId>, Vec<Held>)> {
        let held: Vec<Held> = reports.iter().map(|c| c.held.clone()).collect();
        let (ids, workers, attempts) = held_arrays(&held);
        let results: Vec<&[u8]> = reports.iter().map(|c| c.result.as_slice()).collect();
        // A task whose `running` mark has not landed yet started when it was delivered.
        let ago: Vec<Option<i64>> = reports.iter().map(|c| c.delivered.map(micros_ago)).collect();
        let query = sqlx::query(if lock_workers { COMPLETE_LOCKING } else { COMPLETE })
            .bind(&ids)
            .bind(&workers)
            .bind(&attempts)
            .bind(&results)
            .bind(&ago);
        let applied = if lock_workers {
            let mut lock: Vec<&str> = workers.iter().map(String::as_str).collect();
            lock.sort_unstable();
            lock.dedup();
            query.bind(lock).fetch_all(&mut **tx).await?
        } else {
            query.fetch_all(&mut **tx).await?
        };
        // A task's `dependents` as this update found it: a submission that named it committed
        // first (and the release below, a statement of its own, sees its edges), or it waits
        // for this commit and then finds the task completed.
        let mut parents = Vec::new();
        for r in &applied {
            if r.try_get::<Option<i32>, _>("dependents")?.is_some_and(|n| n > 0) {
                parents.push(r.try_get::<Uuid, _>("id")?);
            }
        }
        let released = dependents::release(tx, &parents).await?;
        let completed: Vec<Held> = applied.iter().map(decode::held).collect::<Result<_>>()?;
        let applied: HashSet<Held> = completed.iter().cloned().collect();
        let outcomes = self.outcomes(tx, &held, applied, "completed", |_| TaskState::Completed).await?;
        Ok((outcomes, released, completed))
    }

    /// One outcome per report: `Applied` for the first report of each applied (task, worker,
    /// attempt), otherwise classified from the task row and the attempts history.
    async fn outcomes(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        held: &[Held],
        mut applied: std::collections::HashSet<Held>,
        reported: &str,
        applied_state: impl Fn(&Held) -> TaskState,
    ) -> Result<Vec<ReportOutcome>> {
        let mut out = Vec::with_capacity(held.len());
        let mut rest = Vec::new();
        for (i, h) in held.iter().enumerate() {
            if applied.remove(h) {
                out.push(Some(ReportOutcome::Applied { state: applied_state(h) }));
            } else {
                out.push(None);
                rest.push(i);
            }
        }
        if !rest.is_empty() {
            let sub: Vec<Held> = rest.iter().map(|&i| held[i].clone()).collect();
            let (ids, workers, attempts) = held_arrays(&sub);
            // A completed attempt has no attempt row: its task's row says it.
            let rows =
                sqlx::query(OUTCOMES).bind(&ids).bind(&workers).bind(&attempts).fetch_all(&mut **tx).await?;
            for r in rows {
                let ord: i64 = r.try_get("ord")?;
                let status: Option<String> = r.try_get("status")?;
                let attempt: Option<i32> = r.try_get("attempt")?;
                let prior: Option<String> = r.try_get("outcome")?;
                let task = match (status, attempt) {
                    (Some(s), Some(a)) => Some((decode::state(&s)?, a as u32)),
                    _ => None,
                };
                out[rest[(ord - 1) as usize]] =
                    Some(policy::classify_unapplied(task, prior.as_deref(), reported));
            }
        }
        Ok(out.into_iter().map(|o| o.unwrap_or(ReportOutcome::NotFound)).collect())
    }

    pub(in crate::store) async fn fail(
        &self,
        report: &Failure,
        policy: RetryPolicy,
    ) -> Result<ReportOutcome> {
        retry_conflicts!(self.fail_once(report, policy).await)
    }

    async fn fail_once(&self, report: &Failure, policy: RetryPolicy) -> Result<ReportOutcome> {
        let h = &report.held;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT failures, max_attempts FROM tasks
             WHERE id = $1 AND worker_id = $2 AND attempt = $3 AND status IN ('assigned', 'running')
             FOR UPDATE",
        )
        .bind(h.task_id.0)
        .bind(&h.worker_id.0)
        .bind(h.attempt as i32)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let outcome = self
                .outcomes(&mut tx, std::slice::from_ref(h), Default::default(), "failed", |_| {
                    TaskState::Failed
                })
                .await?
                .remove(0);
            tx.commit().await?;
            return Ok(outcome);
        };
        let charges = decode::charges(&row)?;
        let next = policy::after_failure(charges, report.retriable, &report.error, policy);
        // The row is locked: the fence was checked by the read above.
        sqlx::query(
            "WITH upd AS (
                 UPDATE tasks t
                 SET failures = $4, status = $5, error = $6,
                     run_after = COALESCE(now() + $7::bigint * interval '1 millisecond', t.run_after),
                     worker_id = CASE WHEN $8 THEN t.worker_id END,
                     finished_at = CASE WHEN $9 THEN now() END,
                     started_at = COALESCE(t.started_at, now() - $10::bigint * interval '1 microsecond', now()),
                     lease_expires_at = NULL, updated_at = now()
                 WHERE t.id = $1 AND t.worker_id = $2 AND t.attempt = $3
                 RETURNING t.id, t.attempt, t.assigned_at, t.started_at
             )
             INSERT INTO task_attempts (task_id, attempt, worker_id, assigned_at, started_at, finished_at, outcome, error)
             SELECT id, attempt, $2, assigned_at, started_at, now(), 'failed', $6 FROM upd
             ON CONFLICT (task_id, attempt) DO NOTHING",
        )
        .bind(h.task_id.0)
        .bind(&h.worker_id.0)
        .bind(h.attempt as i32)
        .bind(next.failures as i32)
        .bind(next.state.as_str())
        .bind(next.error.as_deref())
        .bind(next.retry_in_ms())
        .bind(next.keeps_worker)
        .bind(next.finished())
        .bind(report.delivered.map(micros_ago))
        .execute(&mut *tx)
        .await?;
        let ended = if next.finished() {
            dependents::end_dependents(&mut tx, &[(h.task_id, next.state, next.error.clone())]).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        self.settled.send(Settled { released: Vec::new(), ended });
        Ok(ReportOutcome::Applied { state: next.state })
    }

    pub(in crate::store) async fn cancel(&self, id: TaskId, reason: &str) -> Result<Option<Cancelled>> {
        retry_conflicts!(self.cancel_once(id, reason).await)
    }

    async fn cancel_once(&self, id: TaskId, reason: &str) -> Result<Option<Cancelled>> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "UPDATE tasks SET status = 'cancelled', error = $2, finished_at = now(), updated_at = now(),
                 lease_expires_at = NULL
             WHERE id = $1 AND status IN ('blocked', 'pending', 'assigned', 'running')
             RETURNING {TASK_COLUMNS}"
        );
        let row =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.0).bind(reason).fetch_optional(&mut *tx).await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(self.get_task(id).await?.map(|task| Cancelled {
                task,
                applied: false,
                held_by: None,
            }));
        };
        let task = decode::task(&row)?;
        // Pending tasks have no worker; a held one is told to stop.
        let held_by =
            task.worker_id.clone().map(|worker_id| Held { task_id: id, worker_id, attempt: task.attempt });
        if held_by.is_some() {
            sqlx::query(super::CLOSE_CANCELLED_ATTEMPTS)
                .bind(vec![id.0])
                .bind(reason)
                .execute(&mut *tx)
                .await?;
        }
        let ended =
            dependents::end_dependents(&mut tx, &[(id, TaskState::Cancelled, Some(reason.to_owned()))])
                .await?;
        tx.commit().await?;
        self.settled.send(Settled { released: Vec::new(), ended });
        Ok(Some(Cancelled { task, applied: true, held_by }))
    }
}
