//! The SQLite backend: the embedded default for a laptop and for tests that need no server.
//!
//! All writes go through a pool of one connection, so transactions never contend for SQLite's
//! single write lock inside this process; reads use a separate pool and WAL mode lets them run
//! beside the writer. One coordinator process per database file (replicas need Postgres).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, TimeZone, Utc};
use sqlx::{
    Row, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous},
};
use uuid::Uuid;

use super::{
    Cancelled, Completion, Created, DbHealth, Failure, Held, HeldRow, Ownership, Registration, ReportOutcome,
    Requeued, Result, RetryPolicy, StoreError, TaskFilter, TypeFilter, WorkerRegistration,
    classify_unapplied, decode_json, duration_ms, encode_json, lost_error, micros_ago, parse_state,
    parse_worker_state,
};
use crate::{
    config::DatabaseConfig,
    domain::{
        Assignment, AttemptRecord, Candidate, Job, JobId, NewTask, RequeueReason, Task, TaskId, TaskState,
        WorkerId, WorkerRecord, WorkerState, WorkerStats,
    },
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

const TASK_COLUMNS: &str = "id, task_type, payload, status, priority, attempt, max_attempts, failures, \
     timeout_ms, worker_id, job_id, idempotency_key, result, error, run_after, lease_expires_at, \
     created_at, updated_at, assigned_at, started_at, finished_at";

/// An exclusive advisory lock on `<database>.lock` beside a SQLite database file, held by the
/// one process that serves that database: a second process on the same file would share its
/// rows and worker sessions while each believes it is alone. The operating system releases the
/// lock when the process exits, however it exits (kill -9 included), so there is nothing stale
/// to clean up.
#[derive(Debug)]
pub struct ProcessLock {
    /// Locked for as long as this value lives; closing the file releases the lock.
    _file: std::fs::File,
}

impl ProcessLock {
    /// Locks the database file `url` names; `None` for an in-memory database (nothing to
    /// share). Fails with [`StoreError::InUse`] when another process holds it.
    pub fn acquire(url: &str) -> Result<Option<ProcessLock>> {
        let options = SqliteConnectOptions::from_str(url).map_err(|_| StoreError::BadUrl(url.to_owned()))?;
        let db = options.get_filename();
        if url.contains(":memory:") || url.contains("mode=memory") || db.as_os_str().is_empty() {
            return Ok(None);
        }
        let mut path = db.as_os_str().to_owned();
        path.push(".lock");
        let path = std::path::PathBuf::from(path);
        let shown = db.display().to_string();
        let lock_err = |source| StoreError::Lock { path: shown.clone(), source };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(lock_err)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(lock_err)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(ProcessLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse { path: shown }),
            Err(std::fs::TryLockError::Error(e)) => Err(lock_err(e)),
        }
    }
}

/// SQLite-backed store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// One connection: every write transaction runs here, one at a time.
    writer: SqlitePool,
    /// Readers; WAL mode lets them read beside the writer.
    reader: SqlitePool,
    pub(super) health: Arc<DbHealth>,
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(v: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(v).single().unwrap_or_default()
}

fn opt_time(r: &SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>> {
    Ok(r.try_get::<Option<i64>, _>(col)?.map(from_micros))
}

fn time(r: &SqliteRow, col: &str) -> Result<DateTime<Utc>> {
    Ok(from_micros(r.try_get(col)?))
}

fn uuid_col(r: &SqliteRow, col: &str) -> Result<Uuid> {
    let s: String = r.try_get(col)?;
    Uuid::parse_str(&s).map_err(|e| StoreError::Corrupt(format!("{col} {s:?}: {e}")))
}

fn opt_uuid_col(r: &SqliteRow, col: &str) -> Result<Option<Uuid>> {
    r.try_get::<Option<String>, _>(col)?
        .map(|s| Uuid::parse_str(&s).map_err(|e| StoreError::Corrupt(format!("{col} {s:?}: {e}"))))
        .transpose()
}

impl SqliteStore {
    pub(super) async fn connect(cfg: &DatabaseConfig) -> std::result::Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::from_str(&cfg.url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode survives a process crash (kill -9); only an OS crash or power
            // loss can drop the last transactions.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(cfg.acquire_timeout.max(Duration::from_secs(5)));
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(sqlx::Error::Io)?;
        }
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(cfg.acquire_timeout)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(cfg.max_open_conns.clamp(1, 8))
            .acquire_timeout(cfg.acquire_timeout)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { writer, reader, health: Arc::default() })
    }

    /// The single writer connection's pool: a test that holds it makes every write wait.
    pub fn writer_pool(&self) -> &SqlitePool {
        &self.writer
    }

    pub(super) async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    /// The write pool, for tests that inspect rows directly.
    pub fn pool(&self) -> &SqlitePool {
        &self.writer
    }

    pub(super) async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    pub(super) async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    pub(super) fn pool_stats(&self) -> (u32, u32) {
        (self.writer.size() + self.reader.size(), (self.writer.num_idle() + self.reader.num_idle()) as u32)
    }

    pub(super) async fn create_tasks(&self, tasks: &[NewTask]) -> Result<Vec<Created>> {
        let mut tx = self.writer.begin().await?;
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
        let now = Utc::now();
        let mut tx = self.writer.begin().await?;
        sqlx::query("INSERT INTO jobs (id, name, total, created_at) VALUES (?1, ?2, ?3, ?4)")
            .bind(job_id.to_string())
            .bind(name)
            .bind(tasks.len() as i64)
            .bind(micros(now))
            .execute(&mut *tx)
            .await?;
        let created = insert_tasks(&mut tx, tasks).await?;
        for (position, c) in created.iter().enumerate() {
            sqlx::query("INSERT INTO job_tasks (job_id, position, task_id) VALUES (?1, ?2, ?3)")
                .bind(job_id.to_string())
                .bind(position as i64)
                .bind(c.task.id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let mut counts = BTreeMap::new();
        for c in &created {
            *counts.entry(c.task.state).or_insert(0) += 1;
        }
        Ok((
            Job {
                id: job_id,
                name: name.to_owned(),
                total: tasks.len() as u32,
                counts,
                created_at: from_micros(micros(now)),
            },
            created,
        ))
    }

    pub(super) async fn get_task(&self, id: TaskId) -> Result<Option<Task>> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1");
        let row =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.to_string()).fetch_optional(&self.reader).await?;
        row.map(|r| task_from_row(&r)).transpose()
    }

    pub(super) async fn list_tasks(&self, f: &TaskFilter) -> Result<Vec<Task>> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks
             WHERE (?1 IS NULL OR status = ?1)
               AND (?2 IS NULL OR task_type = ?2)
               AND (?3 IS NULL OR id IN (SELECT task_id FROM job_tasks WHERE job_id = ?3))
               AND (?4 IS NULL OR worker_id = ?4)
               AND (?5 IS NULL OR id > ?5)
             ORDER BY id LIMIT ?6"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(f.state.map(|s| s.as_str()))
            .bind(f.task_type.as_deref())
            .bind(f.job_id.map(|j| j.to_string()))
            .bind(f.worker_id.as_ref().map(|w| w.0.as_str()))
            .bind(f.after.map(|t| t.to_string()))
            .bind(i64::from(f.limit))
            .fetch_all(&self.reader)
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
        let now = Utc::now();
        let mut tx = self.writer.begin().await?;
        // Up to `limit` candidates of each type, so older tasks of one type can never fill the
        // list and hide the tasks another free worker could run.
        let one_type: Vec<Option<&str>> = match types {
            TypeFilter::Any => vec![None],
            TypeFilter::Only(t) => t.iter().map(|t| Some(t.as_str())).collect(),
        };
        let mut rows = Vec::new();
        for task_type in one_type {
            rows.extend(
                sqlx::query(
                    "SELECT id, task_type, priority FROM tasks
                     WHERE status = 'pending' AND run_after <= ?1 AND (?3 IS NULL OR task_type = ?3)
                     ORDER BY priority DESC, id
                     LIMIT ?2",
                )
                .bind(micros(now))
                .bind(i64::from(limit))
                .bind(task_type)
                .fetch_all(&mut *tx)
                .await?,
            );
        }
        let mut candidates = rows
            .iter()
            .map(|r| {
                Ok(Candidate {
                    id: TaskId(uuid_col(r, "id")?),
                    task_type: r.try_get("task_type")?,
                    priority: r.try_get("priority")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        candidates.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
        let placed = super::only_candidates(&candidates, place(&candidates));
        let lease_until = micros(now) + duration_ms(lease).saturating_mul(1000);
        let mut out = Vec::with_capacity(placed.len());
        // The session fence: one writer runs at a time, so the session read here is the
        // worker's current one until this transaction commits.
        let mut current: HashMap<WorkerId, bool> = HashMap::new();
        for (task_id, worker_id) in placed {
            let session = sessions.get(&worker_id).copied();
            if let Some(session) = session {
                let fenced = match current.get(&worker_id) {
                    Some(ok) => *ok,
                    None => {
                        let ok = sqlx::query("SELECT 1 FROM workers WHERE id = ?1 AND session_id = ?2")
                            .bind(&worker_id.0)
                            .bind(session.to_string())
                            .fetch_optional(&mut *tx)
                            .await?
                            .is_some();
                        current.insert(worker_id.clone(), ok);
                        ok
                    }
                };
                if !fenced {
                    continue;
                }
            }
            let row = sqlx::query(
                "UPDATE tasks SET status = 'assigned', worker_id = ?2, attempt = attempt + 1, session_id = ?5,
                     assigned_at = ?3, started_at = NULL, updated_at = ?3, lease_expires_at = ?4
                 WHERE id = ?1 AND status = 'pending'
                 RETURNING task_type, payload, attempt, priority, job_id, timeout_ms, created_at",
            )
            .bind(task_id.to_string())
            .bind(&worker_id.0)
            .bind(micros(now))
            .bind(lease_until)
            .bind(session.map(|s| s.to_string()))
            .fetch_optional(&mut *tx)
            .await?;
            let Some(r) = row else { continue };
            let attempt = r.try_get::<i64, _>("attempt")? as u32;
            sqlx::query("INSERT INTO task_attempts (task_id, attempt, worker_id, assigned_at) VALUES (?1, ?2, ?3, ?4)")
                .bind(task_id.to_string())
                .bind(i64::from(attempt))
                .bind(&worker_id.0)
                .bind(micros(now))
                .execute(&mut *tx)
                .await?;
            let timeout_ms: i64 = r.try_get("timeout_ms")?;
            out.push(Assignment {
                task_id,
                task_type: r.try_get("task_type")?,
                payload: r.try_get("payload")?,
                attempt,
                worker_id,
                priority: r.try_get("priority")?,
                job_id: opt_uuid_col(&r, "job_id")?.map(JobId),
                deadline: from_micros(micros(now)) + chrono::Duration::milliseconds(timeout_ms),
                created_at: time(&r, "created_at")?,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn mark_running(&self, delivered: &[(Held, Instant)]) -> Result<u64> {
        let mut tx = self.writer.begin().await?;
        let now = micros(Utc::now());
        let mut n = 0;
        for (h, at) in delivered {
            let started = now - micros_ago(*at);
            let r = sqlx::query(
                "UPDATE tasks SET status = 'running', started_at = ?4, updated_at = ?5
                 WHERE id = ?1 AND worker_id = ?2 AND attempt = ?3 AND status = 'assigned'",
            )
            .bind(h.task_id.to_string())
            .bind(&h.worker_id.0)
            .bind(i64::from(h.attempt))
            .bind(started)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() == 1 {
                n += 1;
                set_attempt_started(&mut tx, h, started).await?;
            }
        }
        tx.commit().await?;
        Ok(n)
    }

    pub(super) async fn renew_leases(&self, held: &[Held], lease: Duration) -> Result<Vec<Held>> {
        let now = micros(Utc::now());
        let until = now + duration_ms(lease).saturating_mul(1000);
        let mut tx = self.writer.begin().await?;
        let mut renewed = Vec::new();
        let mut seen = HashSet::new();
        // Deduplicated by the whole fence: a stale holder listed first must not hide the
        // current holder of the same task in the same batch.
        for h in held.iter().filter(|h| seen.insert((*h).clone())) {
            let r = sqlx::query(
                "UPDATE tasks SET lease_expires_at = ?4, status = 'running',
                     started_at = COALESCE(started_at, ?5), updated_at = ?5
                 WHERE id = ?1 AND worker_id = ?2 AND attempt = ?3 AND status IN ('assigned', 'running')",
            )
            .bind(h.task_id.to_string())
            .bind(&h.worker_id.0)
            .bind(i64::from(h.attempt))
            .bind(until)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() == 1 {
                renewed.push(h.clone());
                set_attempt_started(&mut tx, h, now).await?;
            }
        }
        tx.commit().await?;
        Ok(renewed)
    }

    pub(super) async fn complete(&self, reports: &[Completion]) -> Result<Vec<ReportOutcome>> {
        let mut tx = self.writer.begin().await?;
        let now = micros(Utc::now());
        let mut out = Vec::with_capacity(reports.len());
        for c in reports {
            let h = &c.held;
            // A task whose `running` mark has not landed yet started when it was delivered.
            let started = c.delivered.map_or(now, |at| now - micros_ago(at));
            let r = sqlx::query(
                "UPDATE tasks SET status = 'completed', result = ?4, error = NULL, finished_at = ?5,
                     started_at = COALESCE(started_at, ?6), updated_at = ?5, lease_expires_at = NULL
                 WHERE id = ?1 AND worker_id = ?2 AND attempt = ?3 AND status IN ('assigned', 'running')",
            )
            .bind(h.task_id.to_string())
            .bind(&h.worker_id.0)
            .bind(i64::from(h.attempt))
            .bind(&c.result)
            .bind(now)
            .bind(started)
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() == 1 {
                close_attempt(&mut tx, h, now, started, "completed", None).await?;
                out.push(ReportOutcome::Applied { state: TaskState::Completed });
            } else {
                out.push(classify(&mut tx, h, "completed").await?);
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn fail(&self, report: &Failure, policy: RetryPolicy) -> Result<ReportOutcome> {
        let h = &report.held;
        let mut tx = self.writer.begin().await?;
        let now = micros(Utc::now());
        let started = report.delivered.map_or(now, |at| now - micros_ago(at));
        let row = sqlx::query(
            "SELECT failures, max_attempts FROM tasks
             WHERE id = ?1 AND worker_id = ?2 AND attempt = ?3 AND status IN ('assigned', 'running')",
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
        let failures = row.try_get::<i64, _>("failures")? as u32 + 1;
        let max_attempts = row.try_get::<i64, _>("max_attempts")? as u32;
        let retry = report.retriable && failures < max_attempts;
        let state = if retry { TaskState::Pending } else { TaskState::Failed };
        let run_after = now + duration_ms(policy.backoff(failures)).saturating_mul(1000);
        sqlx::query(
            "UPDATE tasks SET failures = ?4, status = ?5, error = ?6, lease_expires_at = NULL, updated_at = ?7,
                 started_at = COALESCE(started_at, ?10),
                 run_after = CASE WHEN ?8 THEN ?9 ELSE run_after END,
                 worker_id = CASE WHEN ?8 THEN NULL ELSE worker_id END,
                 finished_at = CASE WHEN ?8 THEN NULL ELSE ?7 END
             WHERE id = ?1 AND worker_id = ?2 AND attempt = ?3",
        )
        .bind(h.task_id.to_string())
        .bind(&h.worker_id.0)
        .bind(i64::from(h.attempt))
        .bind(i64::from(failures))
        .bind(state.as_str())
        .bind(&report.error)
        .bind(now)
        .bind(retry)
        .bind(run_after)
        .bind(started)
        .execute(&mut *tx)
        .await?;
        close_attempt(&mut tx, h, now, started, "failed", Some(&report.error)).await?;
        tx.commit().await?;
        Ok(ReportOutcome::Applied { state })
    }

    pub(super) async fn cancel(&self, id: TaskId, reason: &str) -> Result<Option<Cancelled>> {
        let now = micros(Utc::now());
        let mut tx = self.writer.begin().await?;
        let sql = format!(
            "UPDATE tasks SET status = 'cancelled', error = ?2, finished_at = ?3, updated_at = ?3,
                 lease_expires_at = NULL
             WHERE id = ?1 AND status IN ('pending', 'assigned', 'running')
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
        let task = task_from_row(&row)?;
        let held_by =
            task.worker_id.clone().map(|worker_id| Held { task_id: id, worker_id, attempt: task.attempt });
        if let Some(h) = &held_by {
            close_attempt(&mut tx, h, now, now, "cancelled", Some(reason)).await?;
        }
        tx.commit().await?;
        Ok(Some(Cancelled { task, applied: true, held_by }))
    }

    pub(super) async fn requeue_expired(&self, limit: u32) -> Result<Vec<Requeued>> {
        let now = micros(Utc::now());
        let mut tx = self.writer.begin().await?;
        let victims = sqlx::query(
            "SELECT id, attempt, worker_id FROM tasks
             WHERE status IN ('assigned', 'running') AND lease_expires_at < ?1
             ORDER BY lease_expires_at LIMIT ?2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let held = held_from_rows(&victims)?;
        let out = requeue(&mut tx, &held, RequeueReason::LeaseExpired, now).await?;
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn requeue_worker(&self, worker: &WorkerId, session: Uuid) -> Result<Vec<Requeued>> {
        let now = micros(Utc::now());
        let mut tx = self.writer.begin().await?;
        let victims = sqlx::query(
            "SELECT id, attempt, worker_id FROM tasks
             WHERE status IN ('assigned', 'running') AND worker_id = ?1
               AND (session_id = ?2 OR session_id IS NULL)
               AND EXISTS (SELECT 1 FROM workers WHERE id = ?1 AND session_id = ?2)
             ORDER BY id",
        )
        .bind(&worker.0)
        .bind(session.to_string())
        .fetch_all(&mut *tx)
        .await?;
        let held = held_from_rows(&victims)?;
        let out = requeue(&mut tx, &held, RequeueReason::WorkerDead, now).await?;
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn requeue_held(&self, held: &[Held], reason: RequeueReason) -> Result<Vec<Requeued>> {
        let now = micros(Utc::now());
        let mut tx = self.writer.begin().await?;
        let out = requeue(&mut tx, held, reason, now).await?;
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn ownership(&self, workers: &[WorkerId]) -> Result<Ownership> {
        let ids = encode_json(&workers.iter().map(|w| w.0.as_str()).collect::<Vec<_>>());
        let sessions =
            sqlx::query("SELECT id, session_id FROM workers WHERE id IN (SELECT value FROM json_each(?1))")
                .bind(&ids)
                .fetch_all(&self.reader)
                .await?
                .iter()
                .map(|r| Ok((WorkerId(r.try_get("id")?), uuid_col(r, "session_id")?)))
                .collect::<Result<HashMap<_, _>>>()?;
        let held = sqlx::query(
            "SELECT id, attempt, worker_id, session_id, status, assigned_at FROM tasks
             WHERE worker_id IN (SELECT value FROM json_each(?1)) AND status IN ('assigned', 'running')",
        )
        .bind(&ids)
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(|r| {
            Ok(HeldRow {
                held: Held {
                    task_id: TaskId(uuid_col(r, "id")?),
                    attempt: r.try_get::<i64, _>("attempt")? as u32,
                    worker_id: WorkerId(r.try_get("worker_id")?),
                },
                session: opt_uuid_col(r, "session_id")?,
                state: parse_state(r.try_get("status")?)?,
                assigned_at: opt_time(r, "assigned_at")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        Ok(Ownership { sessions, held })
    }

    pub(super) async fn held_by(&self, worker: &WorkerId) -> Result<Vec<Held>> {
        let rows = sqlx::query(
            "SELECT id, attempt, worker_id FROM tasks
             WHERE worker_id = ?1 AND status IN ('assigned', 'running') ORDER BY id",
        )
        .bind(&worker.0)
        .fetch_all(&self.reader)
        .await?;
        held_from_rows(&rows)
    }

    pub(super) async fn attempts(&self, id: TaskId) -> Result<Vec<AttemptRecord>> {
        let rows = sqlx::query(
            "SELECT task_id, attempt, worker_id, assigned_at, started_at, finished_at, outcome, error
             FROM task_attempts WHERE task_id = ?1 ORDER BY attempt",
        )
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AttemptRecord {
                    task_id: TaskId(uuid_col(r, "task_id")?),
                    attempt: r.try_get::<i64, _>("attempt")? as u32,
                    worker_id: WorkerId(r.try_get("worker_id")?),
                    assigned_at: time(r, "assigned_at")?,
                    started_at: opt_time(r, "started_at")?,
                    finished_at: opt_time(r, "finished_at")?,
                    outcome: r.try_get("outcome")?,
                    error: r.try_get("error")?,
                })
            })
            .collect()
    }

    pub(super) async fn task_counts(&self) -> Result<BTreeMap<TaskState, u64>> {
        let rows = sqlx::query("SELECT status, count(*) AS n FROM tasks GROUP BY status")
            .fetch_all(&self.reader)
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
        .fetch_one(&self.reader)
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
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("task_type")?, r.try_get::<i64, _>("n")? as u64))).collect()
    }

    pub(super) async fn upsert_worker(&self, w: &WorkerRegistration) -> Result<()> {
        upsert_worker(&self.writer, w).await
    }

    /// One transaction: the worker row (its new session), the tasks it holds moved to that
    /// session, and those it says it does not hold given back.
    pub(super) async fn register_worker(&self, w: &WorkerRegistration) -> Result<Registration> {
        let mut tx = self.writer.begin().await?;
        let previous: Option<Option<String>> =
            sqlx::query_scalar("SELECT instance_id FROM workers WHERE id = ?1")
                .bind(&w.id.0)
                .fetch_optional(&mut *tx)
                .await?;
        upsert_worker(&mut *tx, w).await?;
        let rows = sqlx::query(
            "UPDATE tasks SET session_id = ?2
             WHERE worker_id = ?1 AND status IN ('assigned', 'running')
             RETURNING id, attempt, worker_id",
        )
        .bind(&w.id.0)
        .bind(w.session_id.to_string())
        .fetch_all(&mut *tx)
        .await?;
        let mut held = held_from_rows(&rows)?;
        let mut requeued = Vec::new();
        if let Some(holding) = &w.holding {
            let (kept, missing, reason) = holding.split(previous.flatten().as_deref(), held);
            held = kept;
            if !missing.is_empty() {
                requeued = requeue(&mut tx, &missing, reason, micros(Utc::now())).await?;
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
        let r =
            sqlx::query("UPDATE workers SET state = ?3, updated_at = ?4 WHERE id = ?1 AND session_id = ?2")
                .bind(&id.0)
                .bind(session.to_string())
                .bind(state.as_str())
                .bind(micros(Utc::now()))
                .execute(&self.writer)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    pub(super) async fn flush_heartbeats(&self, beats: &[(WorkerId, DateTime<Utc>)]) -> Result<u64> {
        // One statement for the whole batch: the pairs travel as a JSON array.
        let json = serde_json::Value::Array(
            beats.iter().map(|(w, t)| serde_json::json!([w.0, micros(*t)])).collect(),
        );
        let r = sqlx::query(
            "UPDATE workers SET last_heartbeat_at = b.ts
             FROM (SELECT value ->> 0 AS id, value ->> 1 AS ts FROM json_each(?1)) AS b
             WHERE workers.id = b.id AND workers.last_heartbeat_at < b.ts",
        )
        .bind(json.to_string())
        .execute(&self.writer)
        .await?;
        Ok(r.rows_affected())
    }

    pub(super) async fn get_worker(&self, id: &WorkerId) -> Result<Option<WorkerRecord>> {
        let row = sqlx::query(WORKER_SELECT_ONE).bind(&id.0).fetch_optional(&self.reader).await?;
        row.map(|r| worker_from_row(&r)).transpose()
    }

    pub(super) async fn list_workers(&self) -> Result<Vec<WorkerRecord>> {
        let rows = sqlx::query(WORKER_SELECT_ALL).fetch_all(&self.reader).await?;
        rows.iter().map(worker_from_row).collect()
    }

    pub(super) async fn live_workers(&self, silence: Duration) -> Result<Vec<WorkerRecord>> {
        let since = Utc::now() - chrono::Duration::milliseconds(duration_ms(silence));
        let rows = sqlx::query(WORKER_SELECT_LIVE).bind(micros(since)).fetch_all(&self.reader).await?;
        rows.iter().map(worker_from_row).collect()
    }

    pub(super) async fn worker_stats(&self, id: &WorkerId) -> Result<Option<WorkerStats>> {
        let Some(worker) = self.get_worker(id).await? else {
            return Ok(None);
        };
        let r = sqlx::query(
            "SELECT COALESCE(sum(outcome = 'completed'), 0) AS completed,
                    COALESCE(sum(outcome = 'failed'), 0) AS failed,
                    COALESCE(sum(CASE WHEN outcome IN ('completed', 'failed')
                        THEN finished_at - COALESCE(started_at, assigned_at) END), 0) AS total_us
             FROM task_attempts WHERE worker_id = ?1",
        )
        .bind(&id.0)
        .fetch_one(&self.reader)
        .await?;
        Ok(Some(WorkerStats {
            tasks_completed: r.try_get::<i64, _>("completed")? as u64,
            tasks_failed: r.try_get::<i64, _>("failed")? as u64,
            total_duration: Duration::from_micros(r.try_get::<i64, _>("total_us")?.max(0) as u64),
            in_flight: worker.in_flight,
        }))
    }

    pub(super) async fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        let Some(row) = sqlx::query("SELECT name, total, created_at FROM jobs WHERE id = ?1")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?
        else {
            return Ok(None);
        };
        let counts = sqlx::query(
            "SELECT t.status, count(*) AS n FROM job_tasks j JOIN tasks t ON t.id = j.task_id
             WHERE j.job_id = ?1 GROUP BY t.status",
        )
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(|r| Ok((parse_state(r.try_get("status")?)?, r.try_get::<i64, _>("n")? as u32)))
        .collect::<Result<_>>()?;
        Ok(Some(Job {
            id,
            name: row.try_get("name")?,
            total: row.try_get::<i64, _>("total")? as u32,
            counts,
            created_at: time(&row, "created_at")?,
        }))
    }

    pub(super) async fn job_tasks(&self, id: JobId) -> Result<Vec<Task>> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM (
                 SELECT t.*, j.position AS job_position FROM tasks t JOIN job_tasks j ON j.task_id = t.id
                 WHERE j.job_id = ?1
             ) AS members ORDER BY job_position"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.to_string()).fetch_all(&self.reader).await?;
        rows.iter().map(task_from_row).collect()
    }
}

const WORKER_SELECT_ALL: &str = "SELECT w.*, (SELECT count(*) FROM tasks t
        WHERE t.worker_id = w.id AND t.status IN ('assigned', 'running')) AS in_flight
     FROM workers w ORDER BY w.id";
const WORKER_SELECT_LIVE: &str = "SELECT w.*, (SELECT count(*) FROM tasks t
        WHERE t.worker_id = w.id AND t.status IN ('assigned', 'running')) AS in_flight
     FROM workers w WHERE w.state IN ('active', 'suspect') AND w.last_heartbeat_at > ?1 ORDER BY w.id";
const WORKER_SELECT_ONE: &str = "SELECT w.*, (SELECT count(*) FROM tasks t
        WHERE t.worker_id = w.id AND t.status IN ('assigned', 'running')) AS in_flight
     FROM workers w WHERE w.id = ?1";

type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;

async fn insert_tasks(tx: &mut Tx<'_>, tasks: &[NewTask]) -> Result<Vec<Created>> {
    let now = micros(Utc::now());
    let sql = format!(
        "INSERT INTO tasks (id, task_type, payload, priority, max_attempts, timeout_ms, idempotency_key, job_id,
                            run_after, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?9)
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING {TASK_COLUMNS}"
    );
    let existing_sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE idempotency_key = ?1");
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        let row = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(t.id.to_string())
            .bind(&t.task_type)
            .bind(&t.payload)
            .bind(t.priority)
            .bind(i64::from(t.max_attempts))
            .bind(duration_ms(t.timeout))
            .bind(t.idempotency_key.as_deref())
            .bind(t.job_id.map(|j| j.to_string()))
            .bind(now)
            .fetch_optional(&mut **tx)
            .await?;
        if let Some(row) = row {
            out.push(Created { task: task_from_row(&row)?, created: true });
            continue;
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(existing_sql.clone()))
            .bind(t.idempotency_key.as_deref())
            .fetch_optional(&mut **tx)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("task {} was neither inserted nor found", t.id)))?;
        out.push(Created { task: task_from_row(&row)?, created: false });
    }
    Ok(out)
}

async fn set_attempt_started(tx: &mut Tx<'_>, h: &Held, now: i64) -> Result<()> {
    sqlx::query(
        "UPDATE task_attempts SET started_at = COALESCE(started_at, ?3) WHERE task_id = ?1 AND attempt = ?2",
    )
    .bind(h.task_id.to_string())
    .bind(i64::from(h.attempt))
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Closes an attempt at `now`; `started` is its start if none was recorded.
async fn close_attempt(
    tx: &mut Tx<'_>,
    h: &Held,
    now: i64,
    started: i64,
    outcome: &str,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "UPDATE task_attempts SET finished_at = ?3, outcome = ?4, error = ?5, started_at = COALESCE(started_at, ?6)
         WHERE task_id = ?1 AND attempt = ?2 AND outcome IS NULL",
    )
    .bind(h.task_id.to_string())
    .bind(i64::from(h.attempt))
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
    let task = sqlx::query("SELECT status, attempt FROM tasks WHERE id = ?1")
        .bind(h.task_id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    let task = match task {
        Some(r) => Some((parse_state(r.try_get("status")?)?, r.try_get::<i64, _>("attempt")? as u32)),
        None => None,
    };
    let prior: Option<String> = sqlx::query_scalar(
        "SELECT outcome FROM task_attempts WHERE task_id = ?1 AND attempt = ?2 AND worker_id = ?3",
    )
    .bind(h.task_id.to_string())
    .bind(i64::from(h.attempt))
    .bind(&h.worker_id.0)
    .fetch_optional(&mut **tx)
    .await?
    .flatten();
    Ok(classify_unapplied(task, prior.as_deref(), reported))
}

async fn upsert_worker<'e>(exec: impl sqlx::SqliteExecutor<'e>, w: &WorkerRegistration) -> Result<()> {
    let now = micros(Utc::now());
    sqlx::query(
        "INSERT INTO workers (id, state, max_concurrent_tasks, capabilities, labels, version, hostname,
                              session_id, coordinator_id, instance_id, registered_at, last_heartbeat_at,
                              updated_at)
         VALUES (?1, 'active', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?10, ?9, ?9, ?9)
         ON CONFLICT (id) DO UPDATE SET
             state = 'active', max_concurrent_tasks = excluded.max_concurrent_tasks,
             capabilities = excluded.capabilities, labels = excluded.labels, version = excluded.version,
             hostname = excluded.hostname, session_id = excluded.session_id,
             coordinator_id = excluded.coordinator_id, instance_id = excluded.instance_id,
             registered_at = excluded.registered_at, last_heartbeat_at = excluded.last_heartbeat_at,
             updated_at = excluded.updated_at",
    )
    .bind(&w.id.0)
    .bind(i64::from(w.max_concurrent_tasks))
    .bind(encode_json(&w.capabilities))
    .bind(encode_json(&w.labels))
    .bind(&w.version)
    .bind(&w.hostname)
    .bind(w.session_id.to_string())
    .bind(&w.coordinator_id)
    .bind(now)
    .bind(w.holding.as_ref().map(|h| h.instance.as_str()))
    .execute(exec)
    .await?;
    Ok(())
}

fn held_from_rows(rows: &[SqliteRow]) -> Result<Vec<Held>> {
    rows.iter()
        .map(|r| {
            Ok(Held {
                task_id: TaskId(uuid_col(r, "id")?),
                attempt: r.try_get::<i64, _>("attempt")? as u32,
                worker_id: WorkerId(r.try_get("worker_id")?),
            })
        })
        .collect()
}

/// Gives held tasks back: pending again, or failed when out of attempts. Each update is fenced by
/// (task, worker, attempt) and a held status, so a completion that won the race is untouched.
async fn requeue(tx: &mut Tx<'_>, held: &[Held], reason: RequeueReason, now: i64) -> Result<Vec<Requeued>> {
    let charge = i64::from(reason.charged());
    let only_assigned = reason == RequeueReason::Undelivered;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for h in held {
        if !seen.insert(h.clone()) {
            continue;
        }
        let row = sqlx::query(
            "UPDATE tasks SET failures = failures + ?4,
                 status = CASE WHEN failures + ?4 >= max_attempts THEN 'failed' ELSE 'pending' END,
                 error = CASE WHEN failures + ?4 >= max_attempts THEN ?5 ELSE error END,
                 finished_at = CASE WHEN failures + ?4 >= max_attempts THEN ?6 ELSE NULL END,
                 worker_id = NULL, session_id = NULL, lease_expires_at = NULL, run_after = ?6, updated_at = ?6
             WHERE id = ?1 AND worker_id = ?2 AND attempt = ?3
               AND (status = 'assigned' OR (status = 'running' AND NOT ?7))
             RETURNING task_type, status",
        )
        .bind(h.task_id.to_string())
        .bind(&h.worker_id.0)
        .bind(i64::from(h.attempt))
        .bind(charge)
        .bind(lost_error(reason, &h.worker_id, h.attempt))
        .bind(now)
        .bind(only_assigned)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else { continue };
        close_attempt(tx, h, now, now, reason.as_str(), None).await?;
        out.push(Requeued {
            task_id: h.task_id,
            task_type: row.try_get("task_type")?,
            worker_id: h.worker_id.clone(),
            attempt: h.attempt,
            state: parse_state(row.try_get("status")?)?,
            reason,
        });
    }
    Ok(out)
}

fn task_from_row(r: &SqliteRow) -> Result<Task> {
    Ok(Task {
        id: TaskId(uuid_col(r, "id")?),
        task_type: r.try_get("task_type")?,
        payload: r.try_get("payload")?,
        state: parse_state(r.try_get("status")?)?,
        priority: r.try_get("priority")?,
        attempt: r.try_get::<i64, _>("attempt")? as u32,
        max_attempts: r.try_get::<i64, _>("max_attempts")? as u32,
        failures: r.try_get::<i64, _>("failures")? as u32,
        timeout: Duration::from_millis(r.try_get::<i64, _>("timeout_ms")?.max(0) as u64),
        worker_id: r.try_get::<Option<String>, _>("worker_id")?.map(WorkerId),
        job_id: opt_uuid_col(r, "job_id")?.map(JobId),
        idempotency_key: r.try_get("idempotency_key")?,
        result: r.try_get("result")?,
        error: r.try_get("error")?,
        run_after: time(r, "run_after")?,
        lease_expires_at: opt_time(r, "lease_expires_at")?,
        created_at: time(r, "created_at")?,
        updated_at: time(r, "updated_at")?,
        assigned_at: opt_time(r, "assigned_at")?,
        started_at: opt_time(r, "started_at")?,
        finished_at: opt_time(r, "finished_at")?,
    })
}

fn worker_from_row(r: &SqliteRow) -> Result<WorkerRecord> {
    Ok(WorkerRecord {
        id: WorkerId(r.try_get("id")?),
        state: parse_worker_state(r.try_get("state")?)?,
        max_concurrent_tasks: r.try_get::<i64, _>("max_concurrent_tasks")? as u32,
        capabilities: decode_json(r.try_get("capabilities")?)?,
        labels: decode_json(r.try_get("labels")?)?,
        version: r.try_get("version")?,
        hostname: r.try_get("hostname")?,
        session_id: uuid_col(r, "session_id")?,
        coordinator_id: r.try_get("coordinator_id")?,
        registered_at: time(r, "registered_at")?,
        last_heartbeat_at: time(r, "last_heartbeat_at")?,
        in_flight: r.try_get::<i64, _>("in_flight")? as u32,
    })
}
