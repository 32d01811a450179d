//! Submission: new tasks (batched, idempotency keys honoured) and jobs.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use super::{PgStore, dependents, retry_conflicts};
use crate::{
    domain::{Assignment, Job, JobId, NewTask, Task, TaskId, WorkerId},
    store::{Created, Placement, Result, Settled, StoreError, decode, duration_ms, sql::TASK_COLUMNS},
};

impl PgStore {
    pub(in crate::store) async fn create_tasks(&self, tasks: &[NewTask]) -> Result<Vec<Created>> {
        // Parents are locked: a submission may meet a completion locking the same rows.
        let (out, settled) = retry_conflicts!(
            async {
                let mut tx = self.pool.begin().await?;
                let out = insert_tasks(&mut tx, tasks).await?;
                tx.commit().await?;
                Ok::<_, StoreError>(out)
            }
            .await
        )?;
        self.settled.send(settled);
        Ok(out)
    }

    /// Inserts `tasks`, those in `placement` already assigned to their worker where the insert
    /// finds that they may be (see [`DIRECT`]), the others as [`Self::create_tasks`] does; what
    /// each submission got, and the assignments made. In a claim's transaction set-up: the
    /// limits lock held shared, so a limit written meanwhile is seen (see [`super::claim`]).
    pub(in crate::store) async fn create_tasks_placed(
        &self,
        tasks: &[NewTask],
        placement: &Placement,
        lease: Duration,
    ) -> Result<(Vec<Created>, Vec<Assignment>)> {
        let direct = Direct::of(tasks, placement, lease);
        retry_conflicts!(
            async {
                let mut tx = self.pool.begin_with(DIRECT_BEGIN).await?;
                let inserted = insert(&mut tx, tasks, Some(&direct)).await?;
                tx.commit().await?;
                Ok::<_, StoreError>(inserted)
            }
            .await
        )
        .map(|i| {
            // A task with parents is never placed at submission: nothing settles here.
            self.settled.send(i.settled);
            (i.created, i.assigned)
        })
    }

    /// Creates the job and its tasks, those in `placement` inserted assigned as
    /// [`Self::create_tasks_placed`] inserts them.
    pub(in crate::store) async fn create_job(
        &self,
        job_id: JobId,
        name: &str,
        key: Option<&str>,
        tasks: &[NewTask],
        placement: &Placement,
        lease: Duration,
    ) -> Result<(Job, Vec<Created>, Vec<Assignment>)> {
        let direct = (!placement.placed.is_empty()).then(|| Direct::of(tasks, placement, lease));
        retry_conflicts!(self.create_job_once(job_id, name, key, tasks, direct.as_ref()).await)
    }

    pub(in crate::store) async fn job_by_key(&self, key: &str) -> Result<Option<JobId>> {
        let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM jobs WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(id.map(JobId))
    }

    async fn create_job_once(
        &self,
        job_id: JobId,
        name: &str,
        key: Option<&str>,
        tasks: &[NewTask],
        direct: Option<&Direct>,
    ) -> Result<(Job, Vec<Created>, Vec<Assignment>)> {
        let mut tx = match direct {
            Some(_) => self.pool.begin_with(DIRECT_BEGIN).await?,
            None => self.pool.begin().await?,
        };
        let Inserted { created, settled, assigned } = insert(&mut tx, tasks, direct).await?;
        // The job lists its members, in submission order: the tasks it created and those an
        // idempotency key returned. Its tasks are not indexed by job (see migration 0015).
        let members: Vec<Uuid> = created.iter().map(|c| c.task.id.0).collect();
        // A key another submission committed first (it waits here for that one's transaction):
        // no row, and this one rolls back, its tasks with it.
        let row = sqlx::query(
            "INSERT INTO jobs (id, name, total, members, idempotency_key) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING created_at",
        )
        .bind(job_id.0)
        .bind(name)
        .bind(tasks.len() as i32)
        .bind(&members)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM jobs WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
            tx.rollback().await?;
            // Pruned between the two statements (retention deletes old jobs only): worth a retry.
            return Err(id.map_or(StoreError::Unavailable(sqlx::Error::RowNotFound), |id| {
                StoreError::JobExists(JobId(id))
            }));
        };
        // A replica of an earlier version reads a job's members from its tasks' rows (job_id,
        // job_position, still written) and from job_tasks for a task an idempotency key returned.
        let (positions, shared): (Vec<i32>, Vec<Uuid>) = created
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.created)
            .map(|(i, c)| (i as i32, c.task.id.0))
            .unzip();
        if !shared.is_empty() {
            sqlx::query(
                "INSERT INTO job_tasks (job_id, position, task_id)
                 SELECT $1, pos, id FROM unnest($2::int[], $3::uuid[]) AS m(pos, id)",
            )
            .bind(job_id.0)
            .bind(&positions)
            .bind(&shared)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.settled.send(settled);
        let mut counts = BTreeMap::new();
        for c in &created {
            *counts.entry(c.task.state).or_insert(0) += 1;
        }
        let job = Job {
            id: job_id,
            name: name.to_owned(),
            total: tasks.len() as u32,
            counts,
            created_at: row.try_get("created_at")?,
        };
        Ok((job, created, assigned))
    }
}

/// Where a submission's placed tasks go: the worker and session of each task (in the
/// submission's order; `None`: not placed) and the lease an assignment gets.
pub(super) struct Direct {
    workers: Vec<Option<String>>,
    sessions: Vec<Option<Uuid>>,
    lease_ms: i64,
}

impl Direct {
    fn of(tasks: &[NewTask], placement: &Placement, lease: Duration) -> Self {
        let to: HashMap<TaskId, &WorkerId> = placement.placed.iter().map(|(t, w)| (*t, w)).collect();
        let (workers, sessions) = tasks
            .iter()
            .map(|t| match to.get(&t.id).and_then(|w| placement.sessions.get(*w).map(|s| (w, s))) {
                Some((w, s)) => (Some(w.0.clone()), Some(*s)),
                None => (None, None),
            })
            .unzip();
        Self { workers, sessions, lease_ms: duration_ms(lease) }
    }
}

/// The `BEGIN` of an insert with placed tasks: a claim's ([`super::claim::CLAIM_BEGIN`]), and
/// the statement's plan made once per connection rather than at each call. The insert is one
/// plan whatever its arguments (it reaches every row by key), and planning it each time took
/// 0.5 to 1.8 ms, most of the time from submission to push on an idle fleet.
const DIRECT_BEGIN: &str = super::claim::CLAIM_BEGIN;

/// Whether a placed task (`u`: its worker `wk` and session `ss`) is inserted assigned. Under the
/// same fence as a claim: its worker's row share-locked and still of that session (a worker
/// that registered again, here or on another replica, gets nothing of the old session's). Only
/// what a claim would take at once: no parents, runnable now, of a type without a concurrency
/// limit (a limit is counted under its row lock by claims), and nothing pending of its type at
/// its priority or above (those are older: they go first, by the claim).
const DIRECT: &str = "(u.wk IS NOT NULL AND u.n IS NULL AND (u.ra IS NULL OR u.ra <= now())
         AND EXISTS (SELECT 1 FROM fence f WHERE f.id = u.wk AND f.session_id = u.ss)
         AND NOT EXISTS (SELECT 1 FROM type_limits l WHERE l.task_type = u.ty)
         AND NOT EXISTS (SELECT 1 FROM tasks q WHERE q.status = 'pending' AND q.task_type = u.ty
                         AND q.priority >= u.pr AND q.run_after <= now()))";

/// What an insert made: each submission's task, the dependents that settled at once, and the
/// tasks inserted assigned.
pub(super) struct Inserted {
    pub created: Vec<Created>,
    pub settled: Settled,
    pub assigned: Vec<Assignment>,
}

/// Inserts `tasks` (a task naming parents starts blocked on all of them, then
/// [`dependents::link`] counts off those already completed); what each submission got, and the
/// dependents that settled at once.
pub(super) async fn insert_tasks(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    tasks: &[NewTask],
) -> Result<(Vec<Created>, Settled)> {
    insert(tx, tasks, None).await.map(|i| (i.created, i.settled))
}

/// [`insert_tasks`], with the placed tasks of `direct` inserted assigned where [`DIRECT`] holds.
async fn insert(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    tasks: &[NewTask],
    direct: Option<&Direct>,
) -> Result<Inserted> {
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.id.0).collect();
    let types: Vec<&str> = tasks.iter().map(|t| t.task_type.as_str()).collect();
    let payloads: Vec<&[u8]> = tasks.iter().map(|t| t.payload.as_slice()).collect();
    let priorities: Vec<i32> = tasks.iter().map(|t| t.priority).collect();
    let max_attempts: Vec<i32> = tasks.iter().map(|t| t.max_attempts as i32).collect();
    let timeouts: Vec<i64> = tasks.iter().map(|t| duration_ms(t.timeout)).collect();
    let keys: Vec<Option<&str>> = tasks.iter().map(|t| t.idempotency_key.as_deref()).collect();
    let jobs: Vec<Option<Uuid>> = tasks.iter().map(|t| t.job_id.map(|j| j.0)).collect();
    // Only a job's submission names a job: its tasks, in order.
    let positions: Vec<Option<i32>> =
        tasks.iter().enumerate().map(|(i, t)| t.job_id.map(|_| i as i32)).collect();
    let run_after: Vec<Option<DateTime<Utc>>> = tasks.iter().map(|t| t.run_after).collect();
    let traceparents: Vec<Option<&str>> = tasks.iter().map(|t| t.traceparent.as_deref()).collect();
    let parents: Vec<Option<i32>> =
        tasks.iter().map(|t| (!t.depends_on.is_empty()).then_some(t.depends_on.len() as i32)).collect();
    let policies: Vec<Option<&str>> =
        tasks.iter().map(|t| (!t.depends_on.is_empty()).then_some(t.on_parent_failure.as_str())).collect();
    let requires: Vec<Option<String>> =
        tasks.iter().map(|t| decode::encode_requires(&t.needs.requires)).collect();
    let weights: Vec<Option<i32>> =
        tasks.iter().map(|t| (t.needs.weight > 1).then_some(t.needs.weight as i32)).collect();
    let affinity: Vec<Option<&str>> = tasks.iter().map(|t| t.needs.affinity_key.as_deref()).collect();
    // Without keys nothing can conflict, and the insert is a plain one: an insert that may
    // conflict writes a second record per row to confirm it.
    let on_conflict = if keys.iter().any(Option::is_some) {
        "ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
    } else {
        ""
    };
    let unnest = "unnest($1::uuid[], $2::text[], $3::bytea[], $4::int[], $5::int[], $6::bigint[],
                     $7::text[], $8::uuid[], $9::timestamptz[], $10::text[], $11::int[], $12::text[],
                     $13::text[], $14::int[], $15::text[], $16::int[]";
    let columns = "id, task_type, payload, priority, max_attempts, timeout_ms, idempotency_key, job_id,
                   run_after, traceparent, status, parents, blocked_on, on_parent_failure,
                   requires, weight, affinity_key, job_position";
    let values = "i, ty, p, pr, ma, tm, k, j, COALESCE(ra, now()), tp";
    let rest = "n, n, pol, rq, wt, ak, jp";
    let sql = match direct {
        None => format!(
            "INSERT INTO tasks ({columns})
             SELECT {values}, CASE WHEN n IS NULL THEN 'pending' ELSE 'blocked' END, {rest}
             FROM {unnest}) AS u(i, ty, p, pr, ma, tm, k, j, ra, tp, n, pol, rq, wt, ak, jp)
             {on_conflict}
             RETURNING {TASK_COLUMNS}"
        ),
        Some(_) => format!(
            "WITH fence AS (
                 SELECT w.id, w.session_id FROM workers w
                 WHERE w.id IN (SELECT unnest($17::text[])) ORDER BY w.id FOR SHARE
             ),
             u AS (
                 SELECT u.*, {DIRECT} AS go
                 FROM {unnest}, $17::text[], $18::uuid[])
                     AS u(i, ty, p, pr, ma, tm, k, j, ra, tp, n, pol, rq, wt, ak, jp, wk, ss)
             )
             INSERT INTO tasks ({columns}, worker_id, session_id, attempt, assigned_at, lease_expires_at)
             SELECT {values}, CASE WHEN go THEN 'assigned' WHEN n IS NULL THEN 'pending' ELSE 'blocked' END,
                    {rest}, CASE WHEN go THEN wk END, CASE WHEN go THEN ss END, CASE WHEN go THEN 1 ELSE 0 END,
                    CASE WHEN go THEN now() END,
                    CASE WHEN go THEN now() + $19::bigint * interval '1 millisecond' END
             FROM u
             {on_conflict}
             RETURNING {TASK_COLUMNS}"
        ),
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&ids)
        .bind(&types)
        .bind(&payloads)
        .bind(&priorities)
        .bind(&max_attempts)
        .bind(&timeouts)
        .bind(&keys)
        .bind(&jobs)
        .bind(&run_after)
        .bind(&traceparents)
        .bind(&parents)
        .bind(&policies)
        .bind(&requires)
        .bind(&weights)
        .bind(&affinity)
        .bind(&positions);
    let rows = match direct {
        None => rows.fetch_all(&mut **tx).await?,
        Some(d) => rows.bind(&d.workers).bind(&d.sessions).bind(d.lease_ms).fetch_all(&mut **tx).await?,
    };
    let mut assigned = Vec::new();
    for r in &rows {
        if r.try_get::<String, _>("status")? == "assigned" {
            assigned.push(decode::assignment(r)?);
        }
    }
    let mut inserted: std::collections::HashMap<Uuid, Task> =
        rows.iter().map(|r| decode::task(r).map(|t| (t.id.0, t))).collect::<Result<_>>()?;
    // Tasks not inserted collided on their idempotency key: return the task that holds it.
    let missing: Vec<&str> = tasks
        .iter()
        .filter(|t| !inserted.contains_key(&t.id.0))
        .filter_map(|t| t.idempotency_key.as_deref())
        .collect();
    let mut existing: std::collections::HashMap<String, Task> = std::collections::HashMap::new();
    if !missing.is_empty() {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE idempotency_key = ANY($1)");
        for r in sqlx::query(sqlx::AssertSqlSafe(sql)).bind(&missing).fetch_all(&mut **tx).await? {
            let t = decode::task(&r)?;
            existing.insert(t.idempotency_key.clone().unwrap_or_default(), t);
        }
    }
    let mut created =
        tasks
            .iter()
            .map(|t| {
                if let Some(task) = inserted.remove(&t.id.0) {
                    return Ok(Created { task, created: true });
                }
                let key = t.idempotency_key.as_deref().unwrap_or_default();
                existing.get(key).cloned().map(|task| Created { task, created: false }).ok_or_else(|| {
                    StoreError::Corrupt(format!("task {} was neither inserted nor found", t.id))
                })
            })
            .collect::<Result<Vec<_>>>()?;
    let settled = if tasks.iter().any(|t| !t.depends_on.is_empty()) {
        dependents::link(tx, tasks, &mut created).await?
    } else {
        Settled::default()
    };
    Ok(Inserted { created, settled, assigned })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_placed_insert_begins_as_a_claim() {
        let claim = super::super::claim::CLAIM_BEGIN;
        assert!(super::DIRECT_BEGIN.starts_with(claim), "{}", super::DIRECT_BEGIN);
    }
}
