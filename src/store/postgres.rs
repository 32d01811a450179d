//! The Postgres backend. Claims lock candidates with `FOR UPDATE SKIP LOCKED`, so replicas never
//! claim the same task; batch operations take arrays and `unnest` them, one statement per batch.

use std::{
    collections::{BTreeMap, HashMap},
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use sqlx::{
    PgPool, Row,
    postgres::{PgConnectOptions, PgPoolOptions, PgRow},
};
use uuid::Uuid;

use super::{
    Cancelled, Completion, Created, DbHealth, Failure, Held, HeldRow, NOTIFY_CHANNEL, Ownership,
    Registration, ReportOutcome, Requeued, Result, RetryPolicy, StoreError, TaskFilter, TypeFilter,
    WorkerRegistration, classify_unapplied, decode_json, duration_ms, encode_json, micros_ago, parse_state,
    parse_worker_state,
};
use crate::{
    config::DatabaseConfig,
    domain::{
        Assignment, AttemptRecord, Candidate, Job, JobId, NewTask, RequeueReason, Task, TaskId, TaskState,
        WorkerId, WorkerRecord, WorkerState, WorkerStats,
    },
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

const TASK_COLUMNS: &str = "id, task_type, payload, status, priority, attempt, max_attempts, failures, \
     timeout_ms, worker_id, job_id, idempotency_key, result, error, run_after, lease_expires_at, \
     created_at, updated_at, assigned_at, started_at, finished_at";

/// Postgres-backed store. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    pub(super) health: Arc<DbHealth>,
}

/// Runs a statement group again when Postgres aborted it to break a deadlock or a serialization
/// conflict between two batches touching the same rows in different orders.
macro_rules! retry_conflicts {
    ($body:expr) => {{
        let mut tries = 0;
        loop {
            match $body {
                Err(StoreError::Database(sqlx::Error::Database(e)))
                    if tries < 5 && matches!(e.code().as_deref(), Some("40P01") | Some("40001")) =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(5 * tries)).await;
                }
                other => break other,
            }
        }
    }};
}

impl PgStore {
    pub(super) async fn connect(cfg: &DatabaseConfig) -> std::result::Result<Self, sqlx::Error> {
        let options = PgConnectOptions::from_str(&cfg.url)?.application_name("coordinator");
        // One direct connection first: an unreachable or misconfigured server fails at once with
        // its real cause (refused, bad password, no such database) rather than a pool timeout.
        use sqlx::{ConnectOptions, Connection};
        let probe = tokio::time::timeout(cfg.acquire_timeout, options.connect())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        probe.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_open_conns)
            .min_connections(cfg.max_idle_conns)
            .max_lifetime(cfg.conn_max_lifetime)
            .acquire_timeout(cfg.acquire_timeout)
            .connect_with(options)
            .await?;
        Ok(Self { pool, health: Arc::default() })
    }

    pub(super) async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// The pool, for tests that inspect rows directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(super) async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }

    pub(super) fn pool_stats(&self) -> (u32, u32) {
        (self.pool.size(), self.pool.num_idle() as u32)
    }

    pub(super) async fn create_tasks(&self, tasks: &[NewTask]) -> Result<Vec<Created>> {
        let mut tx = self.pool.begin().await?;
        let out = insert_tasks(&mut tx, tasks).await?;
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn create_job(
        &self,
        job_id: JobId,
        name: &str,
        tasks: &[NewTask],
    ) -> Result<(Job, Vec<Created>)> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("INSERT INTO jobs (id, name, total) VALUES ($1, $2, $3) RETURNING created_at")
            .bind(job_id.0)
            .bind(name)
            .bind(tasks.len() as i32)
            .fetch_one(&mut *tx)
            .await?;
        let created = insert_tasks(&mut tx, tasks).await?;
        let members: Vec<Uuid> = created.iter().map(|c| c.task.id.0).collect();
        sqlx::query(
            "INSERT INTO job_tasks (job_id, position, task_id)
             SELECT $1, ord - 1, id FROM unnest($2::uuid[]) WITH ORDINALITY AS m(id, ord)",
        )
        .bind(job_id.0)
        .bind(&members)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
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
        Ok((job, created))
    }

    pub(super) async fn get_task(&self, id: TaskId) -> Result<Option<Task>> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.0).fetch_optional(&self.pool).await?;
        row.map(|r| task_from_row(&r)).transpose()
    }

    pub(super) async fn list_tasks(&self, f: &TaskFilter) -> Result<Vec<Task>> {
        // Absent filters are passed as NULL so the statement text never changes.
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks
             WHERE ($1::text IS NULL OR status = $1)
               AND ($2::text IS NULL OR task_type = $2)
               AND ($3::uuid IS NULL OR id IN (SELECT task_id FROM job_tasks WHERE job_id = $3))
               AND ($4::text IS NULL OR worker_id = $4)
               AND ($5::uuid IS NULL OR id > $5)
             ORDER BY id LIMIT $6"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(f.state.map(|s| s.as_str()))
            .bind(f.task_type.as_deref())
            .bind(f.job_id.map(|j| j.0))
            .bind(f.worker_id.as_ref().map(|w| w.0.as_str()))
            .bind(f.after.map(|t| t.0))
            .bind(i64::from(f.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(task_from_row).collect()
    }

    pub(super) async fn claim<F>(
        &self,
        limit: u32,
        types: &TypeFilter,
        lease: Duration,
        sessions: &HashMap<WorkerId, Uuid>,
        place: F,
    ) -> Result<Vec<Assignment>>
    where
        F: FnOnce(&[Candidate]) -> Vec<(TaskId, WorkerId)> + Send,
    {
        let mut tx = self.pool.begin().await?;
        let rows = match types {
            TypeFilter::Any => {
                sqlx::query(
                    "SELECT id, task_type, priority FROM tasks
                     WHERE status = 'pending' AND run_after <= now()
                     ORDER BY priority DESC, id
                     LIMIT $1
                     FOR UPDATE SKIP LOCKED",
                )
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?
            }
            // Up to `limit` candidates of each type, so older tasks of one type can never fill
            // the list and hide the tasks another free worker could run.
            TypeFilter::Only(types) => {
                sqlx::query(
                    "SELECT c.id, c.task_type, c.priority
                     FROM unnest($2::text[]) AS ty(name),
                     LATERAL (
                         SELECT id, task_type, priority FROM tasks
                         WHERE status = 'pending' AND run_after <= now() AND task_type = ty.name
                         ORDER BY priority DESC, id
                         LIMIT $1
                         FOR UPDATE SKIP LOCKED
                     ) AS c
                     ORDER BY c.priority DESC, c.id",
                )
                .bind(i64::from(limit))
                .bind(types)
                .fetch_all(&mut *tx)
                .await?
            }
        };
        let candidates = rows
            .iter()
            .map(|r| {
                Ok(Candidate {
                    id: TaskId(r.try_get("id")?),
                    task_type: r.try_get("task_type")?,
                    priority: r.try_get("priority")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let placed = super::only_candidates(&candidates, place(&candidates));
        if placed.is_empty() {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(placed.len());
        let mut workers = Vec::with_capacity(placed.len());
        let mut session_ids: Vec<Option<Uuid>> = Vec::with_capacity(placed.len());
        for (t, w) in placed {
            ids.push(t.0);
            session_ids.push(sessions.get(&w).copied());
            workers.push(w.0);
        }
        // The session fence: the worker row is share-locked, so a registration of a new session
        // (which updates that row) either commits first and the placement is dropped, or waits
        // for this claim and then adopts what it assigned.
        let rows = sqlx::query(
            "WITH a AS (SELECT * FROM unnest($1::uuid[], $2::text[], $4::uuid[]) AS a(id, worker_id, session_id)),
             fence AS (
                 SELECT w.id, w.session_id FROM workers w
                 WHERE w.id IN (SELECT worker_id FROM a WHERE session_id IS NOT NULL)
                 ORDER BY w.id
                 FOR SHARE
             ),
             upd AS (
                 UPDATE tasks t
                 SET status = 'assigned', worker_id = a.worker_id, attempt = t.attempt + 1,
                     session_id = a.session_id,
                     assigned_at = now(), started_at = NULL, updated_at = now(),
                     lease_expires_at = now() + $3::bigint * interval '1 millisecond'
                 FROM a
                 WHERE t.id = a.id AND t.status = 'pending'
                   AND (a.session_id IS NULL
                        OR EXISTS (SELECT 1 FROM fence f WHERE f.id = a.worker_id AND f.session_id = a.session_id))
                 RETURNING t.id, t.task_type, t.payload, t.attempt, t.worker_id, t.priority, t.job_id,
                           t.timeout_ms, t.created_at, t.assigned_at
             ),
             ins AS (
                 INSERT INTO task_attempts (task_id, attempt, worker_id, assigned_at)
                 SELECT id, attempt, worker_id, assigned_at FROM upd
             )
             SELECT * FROM upd",
        )
        .bind(&ids)
        .bind(&workers)
        .bind(duration_ms(lease))
        .bind(&session_ids)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter()
            .map(|r| {
                let assigned_at: DateTime<Utc> = r.try_get("assigned_at")?;
                let timeout_ms: i64 = r.try_get("timeout_ms")?;
                Ok(Assignment {
                    task_id: TaskId(r.try_get("id")?),
                    task_type: r.try_get("task_type")?,
                    payload: r.try_get("payload")?,
                    attempt: r.try_get::<i32, _>("attempt")? as u32,
                    worker_id: WorkerId(r.try_get("worker_id")?),
                    priority: r.try_get("priority")?,
                    job_id: r.try_get::<Option<Uuid>, _>("job_id")?.map(JobId),
                    deadline: assigned_at + chrono::Duration::milliseconds(timeout_ms),
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    pub(super) async fn mark_running(&self, delivered: &[(Held, Instant)]) -> Result<u64> {
        let held: Vec<Held> = delivered.iter().map(|(h, _)| h.clone()).collect();
        let (ids, workers, attempts) = held_arrays(&held);
        retry_conflicts!(
            sqlx::query(
                "WITH h AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::bigint[])
                            AS h(id, worker_id, attempt, ago_us)),
                 upd AS (
                     UPDATE tasks t
                     SET status = 'running', started_at = now() - h.ago_us * interval '1 microsecond',
                         updated_at = now()
                     FROM h
                     WHERE t.id = h.id AND t.worker_id = h.worker_id AND t.attempt = h.attempt
                       AND t.status = 'assigned'
                     RETURNING t.id, t.attempt, t.started_at
                 ),
                 att AS (
                     UPDATE task_attempts a SET started_at = upd.started_at
                     FROM upd WHERE a.task_id = upd.id AND a.attempt = upd.attempt
                 )
                 SELECT count(*) AS n FROM upd",
            )
            .bind(&ids)
            .bind(&workers)
            .bind(&attempts)
            // Measured at each try, just before the statement: `now()` is its start.
            .bind(delivered.iter().map(|(_, at)| micros_ago(*at)).collect::<Vec<i64>>())
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::from)
            .and_then(|r| Ok(r.try_get::<i64, _>("n")? as u64))
        )
    }

    pub(super) async fn renew_leases(&self, held: &[Held], lease: Duration) -> Result<Vec<Held>> {
        let (ids, workers, attempts) = held_arrays(held);
        let rows = retry_conflicts!(
            sqlx::query(
                "WITH h AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[]) AS h(id, worker_id, attempt)),
                 upd AS (
                     UPDATE tasks t
                     SET lease_expires_at = now() + $4::bigint * interval '1 millisecond',
                         status = 'running', started_at = COALESCE(t.started_at, now()), updated_at = now()
                     FROM h
                     WHERE t.id = h.id AND t.worker_id = h.worker_id AND t.attempt = h.attempt
                       AND t.status IN ('assigned', 'running')
                     RETURNING t.id, t.attempt, t.worker_id
                 ),
                 att AS (
                     UPDATE task_attempts a SET started_at = COALESCE(a.started_at, now())
                     FROM upd WHERE a.task_id = upd.id AND a.attempt = upd.attempt AND a.started_at IS NULL
                 )
                 SELECT id, attempt, worker_id FROM upd",
            )
            .bind(&ids)
            .bind(&workers)
            .bind(&attempts)
            .bind(duration_ms(lease))
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)
        )?;
        rows.iter().map(held_from_row).collect()
    }

    pub(super) async fn complete(&self, reports: &[Completion]) -> Result<Vec<ReportOutcome>> {
        retry_conflicts!(self.complete_once(reports).await)
    }

    async fn complete_once(&self, reports: &[Completion]) -> Result<Vec<ReportOutcome>> {
        let held: Vec<Held> = reports.iter().map(|c| c.held.clone()).collect();
        let (ids, workers, attempts) = held_arrays(&held);
        let results: Vec<&[u8]> = reports.iter().map(|c| c.result.as_slice()).collect();
        let mut tx = self.pool.begin().await?;
        // A task whose `running` mark has not landed yet started when it was delivered.
        let ago: Vec<Option<i64>> = reports.iter().map(|c| c.delivered.map(micros_ago)).collect();
        let applied = sqlx::query(
            "WITH r AS (
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
                 WHERE t.id = r.id AND t.worker_id = r.worker_id AND t.attempt = r.attempt
                   AND t.status IN ('assigned', 'running')
                 RETURNING t.id, t.attempt, t.worker_id, t.started_at
             ),
             att AS (
                 UPDATE task_attempts a
                 SET finished_at = now(), outcome = 'completed', started_at = COALESCE(a.started_at, upd.started_at)
                 FROM upd WHERE a.task_id = upd.id AND a.attempt = upd.attempt
             )
             SELECT id, attempt, worker_id FROM upd",
        )
        .bind(&ids)
        .bind(&workers)
        .bind(&attempts)
        .bind(&results)
        .bind(&ago)
        .fetch_all(&mut *tx)
        .await?;
        let applied: std::collections::HashSet<Held> = applied
            .iter()
            .map(|r| {
                Ok(Held {
                    task_id: TaskId(r.try_get("id")?),
                    worker_id: WorkerId(r.try_get("worker_id")?),
                    attempt: r.try_get::<i32, _>("attempt")? as u32,
                })
            })
            .collect::<Result<_>>()?;
        let outcomes = self.outcomes(&mut tx, &held, applied, "completed", |_| TaskState::Completed).await?;
        tx.commit().await?;
        Ok(outcomes)
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
            let rows = sqlx::query(
                "SELECT r.ord, t.status, t.attempt, a.outcome
                 FROM unnest($1::uuid[], $2::text[], $3::int[]) WITH ORDINALITY AS r(id, worker_id, attempt, ord)
                 LEFT JOIN tasks t ON t.id = r.id
                 LEFT JOIN task_attempts a ON a.task_id = r.id AND a.attempt = r.attempt AND a.worker_id = r.worker_id",
            )
            .bind(&ids)
            .bind(&workers)
            .bind(&attempts)
            .fetch_all(&mut **tx)
            .await?;
            for r in rows {
                let ord: i64 = r.try_get("ord")?;
                let status: Option<String> = r.try_get("status")?;
                let attempt: Option<i32> = r.try_get("attempt")?;
                let prior: Option<String> = r.try_get("outcome")?;
                let task = match (status, attempt) {
                    (Some(s), Some(a)) => Some((parse_state(&s)?, a as u32)),
                    _ => None,
                };
                out[rest[(ord - 1) as usize]] = Some(classify_unapplied(task, prior.as_deref(), reported));
            }
        }
        Ok(out.into_iter().map(|o| o.unwrap_or(ReportOutcome::NotFound)).collect())
    }

    pub(super) async fn fail(&self, report: &Failure, policy: RetryPolicy) -> Result<ReportOutcome> {
        retry_conflicts!(self.fail_once(report, policy).await)
    }

    async fn fail_once(&self, report: &Failure, policy: RetryPolicy) -> Result<ReportOutcome> {
        let h = &report.held;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "WITH upd AS (
                 UPDATE tasks t
                 SET failures = t.failures + 1,
                     status = CASE WHEN $5 AND t.failures + 1 < t.max_attempts THEN 'pending' ELSE 'failed' END,
                     run_after = CASE WHEN $5 AND t.failures + 1 < t.max_attempts
                         THEN now() + LEAST($6::bigint * power(2, LEAST(t.failures, 30))::bigint, $7::bigint)
                                      * interval '1 millisecond'
                         ELSE t.run_after END,
                     worker_id = CASE WHEN $5 AND t.failures + 1 < t.max_attempts THEN NULL ELSE t.worker_id END,
                     finished_at = CASE WHEN $5 AND t.failures + 1 < t.max_attempts THEN NULL ELSE now() END,
                     started_at = COALESCE(t.started_at, now() - $8::bigint * interval '1 microsecond', now()),
                     error = $4, lease_expires_at = NULL, updated_at = now()
                 WHERE t.id = $1 AND t.worker_id = $2 AND t.attempt = $3 AND t.status IN ('assigned', 'running')
                 RETURNING t.status
             ),
             att AS (
                 UPDATE task_attempts a
                 SET finished_at = now(), outcome = 'failed', error = $4,
                     started_at = COALESCE(a.started_at, now() - $8::bigint * interval '1 microsecond', now())
                 WHERE a.task_id = $1 AND a.attempt = $3 AND EXISTS (SELECT 1 FROM upd)
             )
             SELECT status FROM upd",
        )
        .bind(h.task_id.0)
        .bind(&h.worker_id.0)
        .bind(h.attempt as i32)
        .bind(&report.error)
        .bind(report.retriable)
        .bind(duration_ms(policy.base))
        .bind(duration_ms(policy.max))
        .bind(report.delivered.map(micros_ago))
        .fetch_optional(&mut *tx)
        .await?;
        let outcome = match row {
            Some(r) => ReportOutcome::Applied { state: parse_state(r.try_get("status")?)? },
            None => self
                .outcomes(&mut tx, std::slice::from_ref(h), Default::default(), "failed", |_| {
                    TaskState::Failed
                })
                .await?
                .remove(0),
        };
        tx.commit().await?;
        Ok(outcome)
    }

    pub(super) async fn cancel(&self, id: TaskId, reason: &str) -> Result<Option<Cancelled>> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "UPDATE tasks SET status = 'cancelled', error = $2, finished_at = now(), updated_at = now(),
                 lease_expires_at = NULL
             WHERE id = $1 AND status IN ('pending', 'assigned', 'running')
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
        let task = task_from_row(&row)?;
        // Pending tasks have no worker; a held one is told to stop.
        let held_by =
            task.worker_id.clone().map(|worker_id| Held { task_id: id, worker_id, attempt: task.attempt });
        if held_by.is_some() {
            sqlx::query(
                "UPDATE task_attempts SET finished_at = now(), outcome = 'cancelled', error = $3
                 WHERE task_id = $1 AND attempt = $2 AND outcome IS NULL",
            )
            .bind(id.0)
            .bind(task.attempt as i32)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Some(Cancelled { task, applied: true, held_by }))
    }

    pub(super) async fn requeue_expired(&self, limit: u32) -> Result<Vec<Requeued>> {
        requeue(
            &self.pool,
            "SELECT id, attempt, worker_id FROM tasks
             WHERE status IN ('assigned', 'running') AND lease_expires_at < now()
             ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
            RequeueReason::LeaseExpired,
            |q| q.bind(i64::from(limit)),
        )
        .await
    }

    pub(super) async fn requeue_worker(&self, worker: &WorkerId, session: Uuid) -> Result<Vec<Requeued>> {
        let worker = worker.0.clone();
        // The worker row is locked first: a registration of a new session (which updates it)
        // either committed before, and nothing here matches, or waits until this is done.
        retry_conflicts!(
            requeue(
                &self.pool,
                "SELECT t.id, t.attempt, t.worker_id FROM tasks t
                 WHERE t.status IN ('assigned', 'running') AND t.worker_id = $1
                   AND (t.session_id = $2 OR t.session_id IS NULL)
                   AND EXISTS (SELECT 1 FROM workers w WHERE w.id = $1 AND w.session_id = $2 FOR UPDATE)
                 ORDER BY t.id FOR UPDATE OF t",
                RequeueReason::WorkerDead,
                |q| q.bind(worker.clone()).bind(session),
            )
            .await
        )
    }

    /// Gives back held tasks named by (task, worker, attempt): `Undelivered` only while still
    /// `assigned` (they never reached the worker), the other reasons also when running.
    pub(super) async fn requeue_held(&self, held: &[Held], reason: RequeueReason) -> Result<Vec<Requeued>> {
        retry_conflicts!(requeue_held_in(&self.pool, held, reason).await)
    }

    pub(super) async fn held_by(&self, worker: &WorkerId) -> Result<Vec<Held>> {
        let rows = sqlx::query(
            "SELECT id, attempt FROM tasks WHERE worker_id = $1 AND status IN ('assigned', 'running') ORDER BY id",
        )
        .bind(&worker.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Held {
                    task_id: TaskId(r.try_get("id")?),
                    worker_id: worker.clone(),
                    attempt: r.try_get::<i32, _>("attempt")? as u32,
                })
            })
            .collect()
    }

    pub(super) async fn ownership(&self, workers: &[WorkerId]) -> Result<Ownership> {
        let ids: Vec<&str> = workers.iter().map(|w| w.0.as_str()).collect();
        let sessions = sqlx::query("SELECT id, session_id FROM workers WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((WorkerId(r.try_get("id")?), r.try_get("session_id")?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let held = sqlx::query(
            "SELECT id, attempt, worker_id, session_id, status, assigned_at FROM tasks
             WHERE worker_id = ANY($1) AND status IN ('assigned', 'running')",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(HeldRow {
                held: held_from_row(r)?,
                session: r.try_get("session_id")?,
                state: parse_state(r.try_get("status")?)?,
                assigned_at: r.try_get("assigned_at")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        Ok(Ownership { sessions, held })
    }

    /// Sends the payloads on the notification channel. The statement's commit does not wait for
    /// its WAL record to reach the disk (`synchronous_commit` off, for this transaction only): a
    /// notification is delivered at commit, and one lost in a crash costs latency only, so the
    /// other replicas hear of a submission one disk flush sooner.
    pub(super) async fn notify(&self, payloads: &[String]) -> Result<()> {
        sqlx::query(
            "WITH nosync AS (SELECT set_config('synchronous_commit', 'off', true))
             SELECT pg_notify($1, p) FROM nosync, unnest($2::text[]) AS p",
        )
        .bind(NOTIFY_CHANNEL)
        .bind(payloads)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn listen(&self) -> Result<sqlx::postgres::PgListener> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        Ok(listener)
    }

    pub(super) async fn attempts(&self, id: TaskId) -> Result<Vec<AttemptRecord>> {
        let rows = sqlx::query(
            "SELECT task_id, attempt, worker_id, assigned_at, started_at, finished_at, outcome, error
             FROM task_attempts WHERE task_id = $1 ORDER BY attempt",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AttemptRecord {
                    task_id: TaskId(r.try_get("task_id")?),
                    attempt: r.try_get::<i32, _>("attempt")? as u32,
                    worker_id: WorkerId(r.try_get("worker_id")?),
                    assigned_at: r.try_get("assigned_at")?,
                    started_at: r.try_get("started_at")?,
                    finished_at: r.try_get("finished_at")?,
                    outcome: r.try_get("outcome")?,
                    error: r.try_get("error")?,
                })
            })
            .collect()
    }

    pub(super) async fn task_counts(&self) -> Result<BTreeMap<TaskState, u64>> {
        let rows = sqlx::query("SELECT status, count(*) AS n FROM tasks GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((parse_state(r.try_get("status")?)?, r.try_get::<i64, _>("n")? as u64)))
            .collect()
    }

    pub(super) async fn audit(&self) -> Result<super::Audit> {
        let r = sqlx::query(
            "SELECT (SELECT count(*) FROM tasks) AS tasks,
                    (SELECT count(*) FROM tasks WHERE status = 'completed') AS completed,
                    (SELECT count(*) FROM (SELECT task_id FROM task_attempts WHERE outcome = 'completed'
                                           GROUP BY task_id HAVING count(*) > 1) AS twice) AS twice",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(super::Audit {
            tasks: r.try_get::<i64, _>("tasks")? as u64,
            completed: r.try_get::<i64, _>("completed")? as u64,
            accepted_twice: r.try_get::<i64, _>("twice")? as u64,
        })
    }

    pub(super) async fn pending_by_type(&self) -> Result<BTreeMap<String, u64>> {
        let rows = sqlx::query(
            "SELECT task_type, count(*) AS n FROM tasks WHERE status = 'pending' GROUP BY task_type",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("task_type")?, r.try_get::<i64, _>("n")? as u64))).collect()
    }

    pub(super) async fn upsert_worker(&self, w: &WorkerRegistration) -> Result<()> {
        upsert_worker(&self.pool, w).await
    }

    pub(super) async fn register_worker(&self, w: &WorkerRegistration) -> Result<Registration> {
        retry_conflicts!(self.register_worker_once(w).await)
    }

    /// One transaction: the worker row (its new session), the tasks it holds moved to that
    /// session, and those it says it does not hold given back.
    async fn register_worker_once(&self, w: &WorkerRegistration) -> Result<Registration> {
        let mut tx = self.pool.begin().await?;
        let previous: Option<Option<String>> =
            sqlx::query_scalar("SELECT instance_id FROM workers WHERE id = $1 FOR UPDATE")
                .bind(&w.id.0)
                .fetch_optional(&mut *tx)
                .await?;
        upsert_worker(&mut *tx, w).await?;
        let rows = sqlx::query(
            "UPDATE tasks SET session_id = $2
             WHERE worker_id = $1 AND status IN ('assigned', 'running')
             RETURNING id, attempt, worker_id",
        )
        .bind(&w.id.0)
        .bind(w.session_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut held = rows.iter().map(held_from_row).collect::<Result<Vec<_>>>()?;
        let mut requeued = Vec::new();
        if let Some(holding) = &w.holding {
            let (kept, missing, reason) = holding.split(previous.flatten().as_deref(), held);
            held = kept;
            if !missing.is_empty() {
                requeued = requeue_held_in(&mut *tx, &missing, reason).await?;
            }
        }
        tx.commit().await?;
        held.sort_by_key(|h| h.task_id);
        Ok(Registration { held, requeued })
    }

    pub(super) async fn set_worker_state(
        &self,
        id: &WorkerId,
        session: Uuid,
        state: WorkerState,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE workers SET state = $3, updated_at = now() WHERE id = $1 AND session_id = $2",
        )
        .bind(&id.0)
        .bind(session)
        .bind(state.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub(super) async fn flush_heartbeats(&self, beats: &[(WorkerId, DateTime<Utc>)]) -> Result<u64> {
        let ids: Vec<&str> = beats.iter().map(|(w, _)| w.0.as_str()).collect();
        let ts: Vec<DateTime<Utc>> = beats.iter().map(|(_, t)| *t).collect();
        let r = sqlx::query(
            "UPDATE workers w SET last_heartbeat_at = b.ts
             FROM unnest($1::text[], $2::timestamptz[]) AS b(id, ts)
             WHERE w.id = b.id AND w.last_heartbeat_at < b.ts",
        )
        .bind(&ids)
        .bind(&ts)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    pub(super) async fn get_worker(&self, id: &WorkerId) -> Result<Option<WorkerRecord>> {
        let row = sqlx::query(WORKER_SELECT_ONE).bind(&id.0).fetch_optional(&self.pool).await?;
        row.map(|r| worker_from_row(&r)).transpose()
    }

    pub(super) async fn list_workers(&self) -> Result<Vec<WorkerRecord>> {
        let rows = sqlx::query(WORKER_SELECT_ALL).fetch_all(&self.pool).await?;
        rows.iter().map(worker_from_row).collect()
    }

    pub(super) async fn live_workers(&self, silence: Duration) -> Result<Vec<WorkerRecord>> {
        let rows = sqlx::query(WORKER_SELECT_LIVE).bind(duration_ms(silence)).fetch_all(&self.pool).await?;
        rows.iter().map(worker_from_row).collect()
    }

    pub(super) async fn worker_stats(&self, id: &WorkerId) -> Result<Option<WorkerStats>> {
        let Some(worker) = self.get_worker(id).await? else {
            return Ok(None);
        };
        let r = sqlx::query(
            "SELECT count(*) FILTER (WHERE outcome = 'completed') AS completed,
                    count(*) FILTER (WHERE outcome = 'failed') AS failed,
                    COALESCE(sum(extract(epoch FROM finished_at - COALESCE(started_at, assigned_at)) * 1000)
                        FILTER (WHERE outcome IN ('completed', 'failed')), 0)::bigint AS total_ms
             FROM task_attempts WHERE worker_id = $1",
        )
        .bind(&id.0)
        .fetch_one(&self.pool)
        .await?;
        Ok(Some(WorkerStats {
            tasks_completed: r.try_get::<i64, _>("completed")? as u64,
            tasks_failed: r.try_get::<i64, _>("failed")? as u64,
            total_duration: Duration::from_millis(r.try_get::<i64, _>("total_ms")?.max(0) as u64),
            in_flight: worker.in_flight,
        }))
    }

    pub(super) async fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        let Some(row) = sqlx::query("SELECT id, name, total, created_at FROM jobs WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let counts = sqlx::query(
            "SELECT t.status, count(*) AS n FROM job_tasks j JOIN tasks t ON t.id = j.task_id
             WHERE j.job_id = $1 GROUP BY t.status",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((parse_state(r.try_get("status")?)?, r.try_get::<i64, _>("n")? as u32)))
        .collect::<Result<_>>()?;
        Ok(Some(Job {
            id,
            name: row.try_get("name")?,
            total: row.try_get::<i32, _>("total")? as u32,
            counts,
            created_at: row.try_get("created_at")?,
        }))
    }

    pub(super) async fn job_tasks(&self, id: JobId) -> Result<Vec<Task>> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM (
                 SELECT t.*, j.position AS job_position FROM tasks t JOIN job_tasks j ON j.task_id = t.id
                 WHERE j.job_id = $1
             ) AS members ORDER BY job_position"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.0).fetch_all(&self.pool).await?;
        rows.iter().map(task_from_row).collect()
    }
}

const WORKER_SELECT_ALL: &str = "SELECT w.*, (SELECT count(*) FROM tasks t
        WHERE t.worker_id = w.id AND t.status IN ('assigned', 'running')) AS in_flight
     FROM workers w ORDER BY w.id";
const WORKER_SELECT_LIVE: &str = "SELECT w.*, (SELECT count(*) FROM tasks t
        WHERE t.worker_id = w.id AND t.status IN ('assigned', 'running')) AS in_flight
     FROM workers w
     WHERE w.state IN ('active', 'suspect') AND w.last_heartbeat_at > now() - $1::bigint * interval '1 millisecond'
     ORDER BY w.id";
const WORKER_SELECT_ONE: &str = "SELECT w.*, (SELECT count(*) FROM tasks t
        WHERE t.worker_id = w.id AND t.status IN ('assigned', 'running')) AS in_flight
     FROM workers w WHERE w.id = $1";

async fn insert_tasks(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    tasks: &[NewTask],
) -> Result<Vec<Created>> {
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.id.0).collect();
    let types: Vec<&str> = tasks.iter().map(|t| t.task_type.as_str()).collect();
    let payloads: Vec<&[u8]> = tasks.iter().map(|t| t.payload.as_slice()).collect();
    let priorities: Vec<i32> = tasks.iter().map(|t| t.priority).collect();
    let max_attempts: Vec<i32> = tasks.iter().map(|t| t.max_attempts as i32).collect();
    let timeouts: Vec<i64> = tasks.iter().map(|t| duration_ms(t.timeout)).collect();
    let keys: Vec<Option<&str>> = tasks.iter().map(|t| t.idempotency_key.as_deref()).collect();
    let jobs: Vec<Option<Uuid>> = tasks.iter().map(|t| t.job_id.map(|j| j.0)).collect();
    let sql = format!(
        "INSERT INTO tasks (id, task_type, payload, priority, max_attempts, timeout_ms, idempotency_key, job_id)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::int[], $5::int[], $6::bigint[],
                              $7::text[], $8::uuid[])
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING {TASK_COLUMNS}"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&ids)
        .bind(&types)
        .bind(&payloads)
        .bind(&priorities)
        .bind(&max_attempts)
        .bind(&timeouts)
        .bind(&keys)
        .bind(&jobs)
        .fetch_all(&mut **tx)
        .await?;
    let mut inserted: std::collections::HashMap<Uuid, Task> =
        rows.iter().map(|r| task_from_row(r).map(|t| (t.id.0, t))).collect::<Result<_>>()?;
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
            let t = task_from_row(&r)?;
            existing.insert(t.idempotency_key.clone().unwrap_or_default(), t);
        }
    }
    tasks
        .iter()
        .map(|t| {
            if let Some(task) = inserted.remove(&t.id.0) {
                return Ok(Created { task, created: true });
            }
            let key = t.idempotency_key.as_deref().unwrap_or_default();
            existing
                .get(key)
                .cloned()
                .map(|task| Created { task, created: false })
                .ok_or_else(|| StoreError::Corrupt(format!("task {} was neither inserted nor found", t.id)))
        })
        .collect()
}

/// Shared requeue: `victims` selects and locks (id, attempt, worker_id); those tasks go back
/// to pending, or to failed when out of attempts, and their attempt rows are closed.
async fn requeue<'q, 'e>(
    exec: impl sqlx::PgExecutor<'e>,
    victims: &'static str,
    reason: RequeueReason,
    bind: impl FnOnce(
        sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> Result<Vec<Requeued>> {
    let charge = i32::from(reason.charged());
    // The highest parameter number the victims statement uses; charge and reason follow it.
    let n = victims
        .split('$')
        .skip(1)
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    let sql = format!(
        "WITH v AS ({victims}),
         upd AS (
             UPDATE tasks t
             SET failures = t.failures + ${c},
                 status = CASE WHEN t.failures + ${c} >= t.max_attempts THEN 'failed' ELSE 'pending' END,
                 error = CASE WHEN t.failures + ${c} >= t.max_attempts
                     THEN 'attempt ' || v.attempt || ' lost: ' || ${r} || ' on worker ' || v.worker_id
                     ELSE t.error END,
                 finished_at = CASE WHEN t.failures + ${c} >= t.max_attempts THEN now() ELSE NULL END,
                 worker_id = NULL, session_id = NULL, lease_expires_at = NULL, run_after = now(),
                 updated_at = now()
             FROM v WHERE t.id = v.id
             RETURNING t.id, t.task_type, t.status, v.attempt, v.worker_id
         ),
         att AS (
             UPDATE task_attempts a SET finished_at = now(), outcome = ${r}
             FROM upd WHERE a.task_id = upd.id AND a.attempt = upd.attempt
         )
         SELECT * FROM upd",
        c = n + 1,
        r = n + 2,
    );
    let q = bind(sqlx::query(sqlx::AssertSqlSafe(sql))).bind(charge).bind(reason.as_str());
    let rows = q.fetch_all(exec).await?;
    rows.iter()
        .map(|r| {
            Ok(Requeued {
                task_id: TaskId(r.try_get("id")?),
                task_type: r.try_get("task_type")?,
                worker_id: WorkerId(r.try_get("worker_id")?),
                attempt: r.try_get::<i32, _>("attempt")? as u32,
                state: parse_state(r.try_get("status")?)?,
                reason,
            })
        })
        .collect()
}

/// [`requeue`] of the tasks named by (task, worker, attempt).
async fn requeue_held_in<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    held: &[Held],
    reason: RequeueReason,
) -> Result<Vec<Requeued>> {
    let (ids, workers, attempts) = held_arrays(held);
    let only_assigned = reason == RequeueReason::Undelivered;
    requeue(
        exec,
        "SELECT t.id, t.attempt, t.worker_id
         FROM tasks t JOIN unnest($1::uuid[], $2::text[], $3::int[]) AS h(id, worker_id, attempt)
           ON t.id = h.id AND t.worker_id = h.worker_id AND t.attempt = h.attempt
         WHERE t.status = 'assigned' OR (t.status = 'running' AND NOT $4)
         ORDER BY t.id FOR UPDATE OF t",
        reason,
        |q| q.bind(ids).bind(workers).bind(attempts).bind(only_assigned),
    )
    .await
}

async fn upsert_worker<'e>(exec: impl sqlx::PgExecutor<'e>, w: &WorkerRegistration) -> Result<()> {
    sqlx::query(
        "INSERT INTO workers (id, state, max_concurrent_tasks, capabilities, labels, version, hostname,
                              session_id, coordinator_id, instance_id, registered_at, last_heartbeat_at,
                              updated_at)
         VALUES ($1, 'active', $2, $3, $4, $5, $6, $7, $8, $9, now(), now(), now())
         ON CONFLICT (id) DO UPDATE SET
             state = 'active', max_concurrent_tasks = EXCLUDED.max_concurrent_tasks,
             capabilities = EXCLUDED.capabilities, labels = EXCLUDED.labels, version = EXCLUDED.version,
             hostname = EXCLUDED.hostname, session_id = EXCLUDED.session_id,
             coordinator_id = EXCLUDED.coordinator_id, instance_id = EXCLUDED.instance_id,
             registered_at = now(), last_heartbeat_at = now(), updated_at = now()",
    )
    .bind(&w.id.0)
    .bind(w.max_concurrent_tasks as i32)
    .bind(encode_json(&w.capabilities))
    .bind(encode_json(&w.labels))
    .bind(&w.version)
    .bind(&w.hostname)
    .bind(w.session_id)
    .bind(&w.coordinator_id)
    .bind(w.holding.as_ref().map(|h| h.instance.as_str()))
    .execute(exec)
    .await?;
    Ok(())
}

fn held_from_row(r: &PgRow) -> Result<Held> {
    Ok(Held {
        task_id: TaskId(r.try_get("id")?),
        worker_id: WorkerId(r.try_get("worker_id")?),
        attempt: r.try_get::<i32, _>("attempt")? as u32,
    })
}

fn held_arrays(held: &[Held]) -> (Vec<Uuid>, Vec<String>, Vec<i32>) {
    let mut ids = Vec::with_capacity(held.len());
    let mut workers = Vec::with_capacity(held.len());
    let mut attempts = Vec::with_capacity(held.len());
    for h in held {
        ids.push(h.task_id.0);
        workers.push(h.worker_id.0.clone());
        attempts.push(h.attempt as i32);
    }
    (ids, workers, attempts)
}

fn task_from_row(r: &PgRow) -> Result<Task> {
    Ok(Task {
        id: TaskId(r.try_get("id")?),
        task_type: r.try_get("task_type")?,
        payload: r.try_get("payload")?,
        state: parse_state(r.try_get("status")?)?,
        priority: r.try_get("priority")?,
        attempt: r.try_get::<i32, _>("attempt")? as u32,
        max_attempts: r.try_get::<i32, _>("max_attempts")? as u32,
        failures: r.try_get::<i32, _>("failures")? as u32,
        timeout: Duration::from_millis(r.try_get::<i64, _>("timeout_ms")?.max(0) as u64),
        worker_id: r.try_get::<Option<String>, _>("worker_id")?.map(WorkerId),
        job_id: r.try_get::<Option<Uuid>, _>("job_id")?.map(JobId),
        idempotency_key: r.try_get("idempotency_key")?,
        result: r.try_get("result")?,
        error: r.try_get("error")?,
        run_after: r.try_get("run_after")?,
        lease_expires_at: r.try_get("lease_expires_at")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        assigned_at: r.try_get("assigned_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}

fn worker_from_row(r: &PgRow) -> Result<WorkerRecord> {
    Ok(WorkerRecord {
        id: WorkerId(r.try_get("id")?),
        state: parse_worker_state(r.try_get("state")?)?,
        max_concurrent_tasks: r.try_get::<i32, _>("max_concurrent_tasks")? as u32,
        capabilities: decode_json(r.try_get("capabilities")?)?,
        labels: decode_json(r.try_get("labels")?)?,
        version: r.try_get("version")?,
        hostname: r.try_get("hostname")?,
        session_id: r.try_get("session_id")?,
        coordinator_id: r.try_get("coordinator_id")?,
        registered_at: r.try_get("registered_at")?,
        last_heartbeat_at: r.try_get("last_heartbeat_at")?,
        in_flight: r.try_get::<i64, _>("in_flight")? as u32,
    })
}
