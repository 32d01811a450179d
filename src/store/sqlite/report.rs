//! Reports: completions and failures fenced by (task, worker, attempt), classified when they
//! changed nothing; cancellation.

use std::time::Duration;

use chrono::Utc;
use sqlx::Row;

use super::{SqliteStore, Tx, dependents, plus_ms};
use crate::{
    domain::{Assignment, TaskId, TaskState},
    store::{
        Cancelled, Completion, Failure, Held, Refill, ReportOutcome, Result, RetryPolicy, Settled,
        decode::{self, Cols, micros},
        micros_ago, policy,
        sql::TASK_COLUMNS,
    },
};

/// Applies completions in `tx`: one outcome per report, what their completion settled
/// (dependents released), and the attempts that completed.
async fn complete_in(
    tx: &mut Tx<'_>,
    reports: &[Completion],
) -> Result<(Vec<ReportOutcome>, Settled, Vec<Held>)> {
    let now = micros(Utc::now());
    let mut out = Vec::with_capacity(reports.len());
    let mut settled = Settled::default();
    let mut completed = Vec::new();
    for c in reports {
        let h = &c.held;
        // A task whose `running` mark has not landed yet started when it was delivered.
        let started = c.delivered.map_or(now, |at| now - micros_ago(at));
        let r = sqlx::query(
            "UPDATE tasks SET status = 'completed', result = $4, error = NULL, finished_at = $5,
                 started_at = COALESCE(started_at, $6), updated_at = $5, lease_expires_at = NULL
             WHERE id = $1 AND worker_id = $2 AND attempt = $3 AND status IN ('assigned', 'running')
             RETURNING dependents",
        )
        .bind(h.task_id.to_string())
        .bind(&h.worker_id.0)
        .bind(i64::from(h.attempt))
        .bind(&c.result)
        .bind(now)
        .bind(started)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(r) = r {
            // The completed attempt is recorded in the task's row only.
            out.push(ReportOutcome::Applied { state: TaskState::Completed });
            completed.push(h.clone());
            if r.try_get::<Option<i64>, _>("dependents")?.is_some_and(|n| n > 0) {
                settled.released.extend(dependents::release(tx, h.task_id, now).await?);
            }
        } else {
            out.push(classify(tx, h, "completed").await?);
        }
    }
    Ok((out, settled, completed))
}

impl SqliteStore {
    pub(in crate::store) async fn complete(&self, reports: &[Completion]) -> Result<Vec<ReportOutcome>> {
        let mut tx = self.writer.begin().await?;
        let (out, settled, _) = complete_in(&mut tx, reports).await?;
        tx.commit().await?;
        self.settled.send(settled);
        Ok(out)
    }

    /// [`Self::complete`], and in the same transaction a claim for the slots it frees: `refill`
    /// is told which attempts completed and says what to claim ([`Refill`]).
    pub(in crate::store) async fn complete_and_claim(
        &self,
        reports: &[Completion],
        lease: Duration,
        refill: &mut dyn Refill,
    ) -> Result<(Vec<ReportOutcome>, Vec<Assignment>)> {
        let mut tx = self.writer.begin().await?;
        let (out, settled, completed) = complete_in(&mut tx, reports).await?;
        let assignments = match refill.wanted(&completed) {
            Some((limit, filter)) => {
                // The results do not depend on the claim: a claim that fails is undone alone
                // and left to the passes.
                sqlx::query("SAVEPOINT refill").execute(&mut *tx).await?;
                match super::claim::claim_in(&mut tx, limit, &filter, lease, |c, a| refill.place(c, a)).await
                {
                    Ok(assignments) => assignments,
                    Err(e) if e.is_unavailable() => return Err(e),
                    Err(e) => {
                        sqlx::query("ROLLBACK TO SAVEPOINT refill").execute(&mut *tx).await?;
                        refill.claim_failed(&e);
                        Vec::new()
                    }
                }
            }
            None => Vec::new(),
        };
        tx.commit().await?;
        self.settled.send(settled);
        Ok((out, assignments))
    }

    pub(in crate::store) async fn fail(
        &self,
        report: &Failure,
        policy: RetryPolicy,
    ) -> Result<ReportOutcome> {
        let h = &report.held;
        let mut tx = self.writer.begin().await?;
        let now = micros(Utc::now());
        let started = report.delivered.map_or(now, |at| now - micros_ago(at));
        let row = sqlx::query(
            "SELECT failures, max_attempts FROM tasks
             WHERE id = $1 AND worker_id = $2 AND attempt = $3 AND status IN ('assigned', 'running')",
        )
        .bind(h.task_id.to_string())
        .bind(&h.worker_id.0)
        .bind(i64::from(h.attempt))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let outcome = classify(&mut tx, h, "failed").await?;
            tx.commit().await?;
            return Ok(outcome);
        };
        let charges = decode::charges(&row)?;
        let next = policy::after_failure(charges, report.retriable, &report.error, policy);
        let run_after = next.retry_in_ms().map(|ms| plus_ms(now, ms));
        let finished_at = next.finished().then_some(now);
        sqlx::query(
            "UPDATE tasks SET failures = $4, status = $5, error = $6, lease_expires_at = NULL, updated_at = $7,
                 started_at = COALESCE(started_at, $8), run_after = COALESCE($9, run_after),
                 worker_id = CASE WHEN $10 THEN worker_id END, finished_at = $11
             WHERE id = $1 AND worker_id = $2 AND attempt = $3",
        )
        .bind(h.task_id.to_string())
        .bind(&h.worker_id.0)
        .bind(i64::from(h.attempt))
        .bind(i64::from(next.failures))
        .bind(next.state.as_str())
        .bind(next.error.as_deref())
        .bind(now)
        .bind(started)
        .bind(run_after)
        .bind(next.keeps_worker)
        .bind(finished_at)
        .execute(&mut *tx)
        .await?;
        close_attempt(&mut tx, h, now, started, "failed", Some(&report.error)).await?;
        let ended = if next.finished() {
            dependents::end_dependents(&mut tx, &[(h.task_id, next.state, next.error.clone())], now).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        self.settled.send(Settled { released: Vec::new(), ended });
        Ok(ReportOutcome::Applied { state: next.state })
    }

    pub(in crate::store) async fn cancel(&self, id: TaskId, reason: &str) -> Result<Option<Cancelled>> {
        let now = micros(Utc::now());
        let mut tx = self.writer.begin().await?;
        let sql = format!(
            "UPDATE tasks SET status = 'cancelled', error = $2, finished_at = $3, updated_at = $3,
                 lease_expires_at = NULL
             WHERE id = $1 AND status IN ('blocked', 'pending', 'assigned', 'running')
             RETURNING {TASK_COLUMNS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.to_string())
            .bind(reason)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(self.get_task(id).await?.map(|task| Cancelled {
                task,
                applied: false,
                held_by: None,
            }));
        };
        let task = decode::task(&row)?;
        let held_by =
            task.worker_id.clone().map(|worker_id| Held { task_id: id, worker_id, attempt: task.attempt });
        if let Some(h) = &held_by {
            close_attempt(&mut tx, h, now, now, "cancelled", Some(reason)).await?;
        }
        let ended =
            dependents::end_dependents(&mut tx, &[(id, TaskState::Cancelled, Some(reason.to_owned()))], now)
                .await?;
        tx.commit().await?;
        self.settled.send(Settled { released: Vec::new(), ended });
        Ok(Some(Cancelled { task, applied: true, held_by }))
    }
}

/// Records an attempt that ended other than completed, at `now`, from its task's row (its
/// assignment and start); `started` is its start if none was recorded. An attempt already
/// recorded keeps its row.
pub(super) async fn close_attempt(
    tx: &mut Tx<'_>,
    h: &Held,
    now: i64,
    started: i64,
    outcome: &str,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO task_attempts (task_id, attempt, worker_id, assigned_at, started_at, finished_at, outcome, error)
         SELECT id, $2, $3, COALESCE(assigned_at, $4), COALESCE(started_at, $7), $4, $5, $6 FROM tasks WHERE id = $1
         ON CONFLICT (task_id, attempt) DO NOTHING",
    )
    .bind(h.task_id.to_string())
    .bind(i64::from(h.attempt))
    .bind(&h.worker_id.0)
    .bind(now)
    .bind(outcome)
    .bind(error)
    .bind(started)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Classifies a report that matched no held row.
async fn classify(tx: &mut Tx<'_>, h: &Held, reported: &str) -> Result<ReportOutcome> {
    let task = sqlx::query("SELECT status, attempt, worker_id FROM tasks WHERE id = $1")
        .bind(h.task_id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    let (task, completed_by_this) = match task {
        Some(r) => {
            let state = decode::state(&r.text("status")?)?;
            let attempt = r.int("attempt")? as u32;
            let worker: Option<String> = r.try_get("worker_id")?;
            let this = state == TaskState::Completed
                && attempt == h.attempt
                && worker.as_deref() == Some(&h.worker_id.0);
            (Some((state, attempt)), this)
        }
        None => (None, false),
    };
    // A completed attempt has no attempt row: its task's row says it.
    if completed_by_this {
        return Ok(policy::classify_unapplied(task, Some("completed"), reported));
    }
    let prior: Option<String> = sqlx::query_scalar(
        "SELECT outcome FROM task_attempts WHERE task_id = $1 AND attempt = $2 AND worker_id = $3",
    )
    .bind(h.task_id.to_string())
    .bind(i64::from(h.attempt))
    .bind(&h.worker_id.0)
    .fetch_optional(&mut **tx)
    .await?
    .flatten();
    Ok(policy::classify_unapplied(task, prior.as_deref(), reported))
}
