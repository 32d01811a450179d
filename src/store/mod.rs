//! The store: every SQL statement of the project lives under this module, behind one [`Store`]
//! API with two backends, Postgres ([`postgres`]) for production and several replicas, and SQLite
//! ([`sqlite`]) as the embedded default. Migrations under `migrations/<backend>/` run at start-up.
//!
//! Every task transition is a conditional write that checks status, worker and attempt, and says
//! whether it applied: a stale actor (an old attempt, another worker, a sweeper racing a report)
//! changes nothing.
//!
//! The two dialects share everything above the SQL: [`decode`] turns any row into the domain
//! types, [`sql`] holds the read statements both run as written, and [`policy`] holds the rules
//! (backoff, which lost attempts are charged, what a failure or a loss does to a task) that each
//! dialect binds as values. Each dialect is split by concern: submit, claim, report, requeue,
//! workers, read.

mod decode;
mod policy;
pub mod postgres;
mod sql;
pub mod sqlite;
pub mod stats;
#[doc(hidden)]
pub mod testing;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use crate::domain::PendingType;
use crate::{
    config::{DatabaseConfig, RetentionConfig, redact_url},
    cron::Firing,
    domain::{
        Assignment, Attempt, AttemptRecord, Candidate, Job, JobId, NewSchedule, NewTask, RequeueReason,
        Schedule, ScheduleId, Task, TaskId, TaskState, WorkerId, WorkerRecord, WorkerState, WorkerStats,
    },
    error_text::{migrate_text, sqlx_text},
};

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached at start-up (the message names the redacted URL).
    #[error("cannot connect to database {url}: {}", sqlx_text(source))]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database migration failed: {}", migrate_text(.0))]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database went away or timed out: callers should answer "unavailable".
    #[error("database unavailable: {}", sqlx_text(.0))]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {}", sqlx_text(.0))]
    Database(#[source] sqlx::Error),
    /// A row held a value this version cannot read.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("invalid database url {0:?}")]
    BadUrl(String),
    /// The database's schema is one this build cannot run on ([`schema_check`]).
    #[error("{0}")]
    Schema(String),
    /// A job submission's idempotency key names this job, made earlier or by a submission that
    /// committed first: nothing was created.
    #[error("job {0} has this idempotency key")]
    JobExists(JobId),
    /// A submission named parent tasks that do not exist.
    #[error("unknown parent task{}: {}", if .0.len() == 1 { "" } else { "s" }, .0.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", "))]
    UnknownParents(Vec<TaskId>),
    /// Another process holds this SQLite database (see [`sqlite::ProcessLock`]).
    #[error(
        "database {path} is in use by another coordinator process (SQLite allows one per file); \
         stop that one, or use another data directory: `coordinator dev --ephemeral`, or another database.url"
    )]
    InUse { path: String },
    #[error("cannot lock database {path}: {source}")]
    Lock {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => StoreError::Unavailable(e),
            sqlx::Error::Database(ref d) if d.code().as_deref().is_some_and(connection_class) => {
                StoreError::Unavailable(e)
            }
            other => StoreError::Database(other),
        }
    }
}

/// SQLSTATEs that mean "the server cannot serve this process now", not "the request is wrong":
/// class 08 (connection exception), 57P01..57P03 (admin or crash shutdown, cannot connect now),
/// class 53 (insufficient resources: too many connections, disk full, out of memory), and what a
/// new connection meets when the server is up but will not take it: 55000 (the database does
/// not allow connections), 3D000 (no such database: dropped, or not restored yet), 28000 and
/// 28P01 (the password or the access rules changed), 25006 (a read-only standby: the address
/// names a replica after a failover). A retry can fix them once the server is set right.
fn connection_class(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "57P01" | "57P02" | "57P03" | "55000" | "3D000" | "28000" | "28P01" | "25006")
}

/// Whether the database is reachable, as this process's store calls see it, and when it last
/// came back.
#[derive(Debug)]
pub struct DbHealth {
    origin: Instant,
    /// True from an "unavailable" failure until the next call that succeeds.
    down: AtomicBool,
    /// Milliseconds after `origin` of the first success after an outage, plus one; 0 = never.
    recovered_ms: AtomicU64,
}

impl Default for DbHealth {
    fn default() -> Self {
        Self { origin: Instant::now(), down: AtomicBool::new(false), recovered_ms: AtomicU64::new(0) }
    }
}

impl DbHealth {
    fn note<T>(&self, r: &Result<T>) {
        match r {
            Err(e) if e.is_unavailable() => self.down.store(true, Ordering::Relaxed),
            Err(_) => {}
            Ok(_) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    let ms = self.origin.elapsed().as_millis() as u64 + 1;
                    self.recovered_ms.store(ms, Ordering::Relaxed);
                }
            }
        }
    }

    /// Records an outage seen without an error (a call that hung instead of failing).
    pub fn mark_down(&self) {
        self.down.store(true, Ordering::Relaxed);
    }

    /// True while the database is down (as last seen), and for `window` after it came back.
    pub fn unavailable_within(&self, window: Duration) -> bool {
        if self.down.load(Ordering::Relaxed) {
            return true;
        }
        match self.recovered_ms.load(Ordering::Relaxed) {
            0 => false,
            ms => self.origin.elapsed().saturating_sub(Duration::from_millis(ms - 1)) < window,
        }
    }
}

impl StoreError {
    /// True when the database is down or overloaded rather than the request being wrong.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Connect { .. })
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub use policy::RetryPolicy;

/// The Postgres channel replicas wake each other on.
pub const NOTIFY_CHANNEL: &str = "coordinator_events";

/// The bytes of parents' results an assignment carries at most; the worker reads the rest.
pub(crate) const PARENT_RESULTS_BUDGET: usize = 4 << 20;

/// A task this worker holds under this attempt: the fence every worker-side write checks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Held {
    pub task_id: TaskId,
    pub worker_id: WorkerId,
    pub attempt: Attempt,
}

/// A successful result reported by a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub held: Held,
    pub result: Vec<u8>,
    /// When this process delivered the attempt, if it did: the attempt's start when its
    /// `running` mark has not landed yet. `None`: the report's own time.
    pub delivered: Option<Instant>,
}

/// A failure reported by a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub held: Held,
    pub error: String,
    pub retriable: bool,
    /// As [`Completion::delivered`].
    pub delivered: Option<Instant>,
}

/// How long ago `at` was, in whole microseconds, as the store binds it: `started_at` is written
/// as the database's `now()` minus this, so start and finish come from one clock (the
/// database's) and the duration is exact however late the write lands.
pub(crate) fn micros_ago(at: Instant) -> i64 {
    i64::try_from(at.elapsed().as_micros()).unwrap_or(i64::MAX)
}

/// Dependent tasks a transition settled, announced after its commit: released (their last parent
/// completed: now pending), or ended (a parent, or theirs, failed for good or was cancelled).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settled {
    pub released: Vec<TaskId>,
    /// Each with the state it ended in (failed or cancelled, by its `on_parent_failure`).
    pub ended: Vec<(TaskId, TaskState)>,
}

impl Settled {
    pub fn is_empty(&self) -> bool {
        self.released.is_empty() && self.ended.is_empty()
    }
}

/// Where a store sends what it settled (see [`Store::settled`]).
#[derive(Debug, Default)]
pub(crate) struct SettledSink(std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<Settled>>>);

impl SettledSink {
    /// Announces `s` (after its transaction committed); nothing when empty or nobody listens.
    pub(crate) fn send(&self, s: Settled) {
        if s.is_empty() {
            return;
        }
        if let Some(tx) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(s);
        }
    }
}

/// The error a dependent gets when `root` ended in `state` (failed or cancelled) with `error`.
pub(crate) fn parent_ended(root: TaskId, state: TaskState, error: Option<&str>) -> String {
    let how = if state == TaskState::Cancelled { "was cancelled" } else { "failed" };
    match error {
        Some(e) if !e.is_empty() => format!("parent task {root} {how}: {e}"),
        _ => format!("parent task {root} {how}"),
    }
}

/// What became of a report.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportOutcome {
    /// This report changed the task; it is now in `state`.
    Applied {
        state: TaskState,
    },
    /// The same report was accepted before; nothing changed.
    Duplicate {
        state: TaskState,
    },
    /// The worker/attempt no longer holds the task; nothing changed.
    Stale {
        state: TaskState,
        attempt: Attempt,
    },
    NotFound,
}

/// A task created (or found by its idempotency key).
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    pub task: Task,
    /// False when an existing task with the same idempotency key was returned.
    pub created: bool,
}

/// A schedule fired: the tasks of its occurrences (`created` false for an occurrence whose
/// task already existed).
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub schedule: Schedule,
    pub created: Vec<Created>,
}

/// The tasks of the occurrences `firing` picked out of `schedule`.
fn occurrence_tasks(schedule: &Schedule, firing: &Firing) -> Vec<NewTask> {
    firing.occurrences.iter().map(|o| schedule.template.task(schedule.id, *o)).collect()
}

/// A new job's id, named as the job of each of `tasks`.
pub fn new_job(tasks: &mut [NewTask]) -> JobId {
    let job_id = JobId::new();
    for t in tasks {
        t.job_id = Some(job_id);
    }
    job_id
}

/// How many of `created` are new: the runs a firing adds to its schedule.
fn new_runs(created: &[Created]) -> i64 {
    created.iter().filter(|c| c.created).count() as i64
}

/// A held task given back by the sweeper or a dropped stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Requeued {
    pub task_id: TaskId,
    pub task_type: String,
    pub worker_id: WorkerId,
    pub attempt: Attempt,
    /// `Pending` to run again, or `Failed` when out of attempts.
    pub state: TaskState,
    pub reason: RequeueReason,
}

impl Requeued {
    /// The attempt it took back.
    pub fn held(&self) -> Held {
        Held { task_id: self.task_id, worker_id: self.worker_id.clone(), attempt: self.attempt }
    }
}

/// The result of a cancel.
#[derive(Debug, Clone, PartialEq)]
pub struct Cancelled {
    pub task: Task,
    /// False when the task was already terminal (it is returned unchanged).
    pub applied: bool,
    /// The worker and attempt that held the task, to be told to stop.
    pub held_by: Option<Held>,
}

/// What a retry of one task found.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryOutcome {
    /// The task was failed or cancelled and is pending again, as now stored.
    Retried(Task),
    /// The task is in a state a retry does not touch; returned unchanged.
    Refused(Task),
}

/// Which tasks a bulk retry takes: failed ones (and cancelled ones when asked) matching every
/// filter that is set. Times compare with `finished_at`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryFilter {
    pub job_id: Option<JobId>,
    pub task_type: Option<String>,
    /// A substring of the task's error, case-sensitive.
    pub error_contains: Option<String>,
    /// Finished at or after.
    pub finished_after: Option<DateTime<Utc>>,
    /// Finished before.
    pub finished_before: Option<DateTime<Utc>>,
    pub include_cancelled: bool,
}

impl RetryFilter {
    /// True when no filter narrows the tasks (`include_cancelled` widens, it does not narrow).
    pub fn is_empty(&self) -> bool {
        self.job_id.is_none()
            && self.task_type.is_none()
            && self.error_contains.is_none()
            && self.finished_after.is_none()
            && self.finished_before.is_none()
    }
}

/// What failed in a time window; see [`Store::failure_summary`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureSummary {
    /// Tasks that failed for good in the window.
    pub failed: u64,
    /// Those tasks by type.
    pub failed_by_type: BTreeMap<String, u64>,
    /// The most frequent (type, error) pairs, most frequent first.
    pub top_errors: Vec<FailureGroup>,
    /// Attempts that ended in the window, by outcome (`completed`, `failed`, `lease_expired`,
    /// `worker_dead`, ...).
    pub attempt_outcomes: BTreeMap<String, u64>,
}

/// Failed tasks of one type with one error (its first line, cut to a length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureGroup {
    pub task_type: String,
    pub error: String,
    pub count: u64,
    /// The latest such task.
    pub sample: TaskId,
    pub last_failed_at: DateTime<Utc>,
}

/// A task a worker holds as the store sees it, for reconciliation.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldRow {
    pub held: Held,
    /// Slots it takes.
    pub weight: u32,
    pub session: Option<Uuid>,
    pub state: TaskState,
    pub assigned_at: Option<DateTime<Utc>>,
}

/// See [`Store::ownership`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ownership {
    pub sessions: HashMap<WorkerId, Uuid>,
    pub held: Vec<HeldRow>,
}

/// What a claim's `place` decides for its locked candidates: which worker takes which task, and
/// the session each of those workers is fenced by (see [`Store::claim_fenced`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    pub placed: Vec<(TaskId, WorkerId)>,
    /// A placement on a worker absent from here records no session and is not fenced.
    pub sessions: HashMap<WorkerId, Uuid>,
}

/// See [`Store::audit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Audit {
    pub tasks: u64,
    pub completed: u64,
    /// Completed tasks whose completing attempt had already lost the task (it also has an
    /// attempt row: taken back, failed or cancelled): a result accepted twice. Must be 0.
    pub accepted_twice: u64,
}

/// Which task types a claim may take, and so which candidates it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeFilter {
    /// Any type: the first `limit` by priority.
    Any,
    /// These types only: up to `limit` of each, so older tasks of one type never fill the list
    /// and hide the tasks of another that a free worker could run.
    Only(Vec<String>),
    /// Any type, as [`TypeFilter::Any`], and beyond those up to `limit` of each of these types:
    /// the free workers are of both kinds, some taking any type and some only these. The first
    /// `limit` alone can be all of types the specialized workers do not take, and leave them
    /// idle while their tasks wait behind.
    AnyAnd(Vec<String>),
}

/// Which tasks a claim may take: their types, and, for tasks that require labels or weigh more
/// than one slot, the shapes of the workers with room (see [`Shapes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimFilter {
    pub types: TypeFilter,
    /// `None`: no check here (placement still checks every task against every worker).
    pub shapes: Option<Shapes>,
}

impl ClaimFilter {
    pub fn types(types: TypeFilter) -> Self {
        Self { types, shapes: None }
    }
}

/// The distinct shapes of the workers with room, as JSON the claim's SQL reads: a task with
/// requirements or a weight is a candidate only if one of them could take it now, so tasks no
/// free worker fits never fill a claim and hide the tasks behind them. Each shape is
/// `{"c": capabilities or null for any, "l": ["key=value", ...], "n": [["key", number], ...],
/// "f": the most free slots (prefetch queue included), "s": the most slots, of a worker of that
/// shape}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shapes(pub String);

/// The most distinct worker shapes a claim carries; past that the claim does not check shapes
/// (placement still does), so a fleet where every worker has its own labels costs no more.
pub const MAX_SHAPES: usize = 256;

impl Shapes {
    /// The shapes of `workers` with free slots; `None` past [`MAX_SHAPES`].
    pub fn of(workers: &[crate::domain::WorkerSlot]) -> Option<Self> {
        type Key<'a> = (Option<&'a [String]>, &'a BTreeMap<String, String>);
        // The most free slots (queue included), and the most slots, of a worker of each shape.
        let mut shapes: BTreeMap<Key<'_>, (u32, u32)> = BTreeMap::new();
        for w in workers.iter().filter(|w| w.free > 0) {
            let caps = (!w.capabilities.is_empty()).then_some(w.capabilities.as_slice());
            let (f, s) = shapes.entry((caps, &w.labels)).or_default();
            *f = (*f).max(w.free);
            *s = (*s).max(w.slots);
            if shapes.len() > MAX_SHAPES {
                return None;
            }
        }
        let list: Vec<serde_json::Value> = shapes
            .into_iter()
            .map(|((caps, labels), (free, slots))| {
                let eq: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let num: Vec<serde_json::Value> = labels
                    .iter()
                    .filter_map(|(k, v)| {
                        crate::domain::label_number(Some(v)).map(|n| serde_json::json!([k, n]))
                    })
                    .collect();
                serde_json::json!({"c": caps, "l": eq, "n": num, "f": free, "s": slots})
            })
            .collect();
        Some(Self(serde_json::Value::Array(list).to_string()))
    }
}

/// How many more tasks of each limited type may start now: a type's concurrency limit less
/// its tasks assigned or running (none absent: no limit).
pub type Allowances = HashMap<String, u32>;

/// What a batch of completions claims for the slots it frees ([`Store::complete_and_claim`]).
/// Called inside the transaction, so neither may wait on the database.
pub trait Refill: Send {
    /// Once the completions are applied (`completed`: the attempts that completed): how many
    /// tasks to claim, at most, and which; `None` claims nothing.
    fn wanted(&mut self, completed: &[Held]) -> Option<(u32, ClaimFilter)>;

    /// Places the locked candidates, as the `place` of [`Store::claim_fenced`] does.
    fn place(&mut self, candidates: &[Candidate], allowances: &Allowances) -> Placement;

    /// The claim failed (`error`) and was rolled back; the completions commit without it.
    fn claim_failed(&mut self, error: &StoreError);
}

/// Filter and page of `list_tasks`; pages are ordered by id (creation order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    pub state: Option<TaskState>,
    pub task_type: Option<String>,
    pub job_id: Option<JobId>,
    pub worker_id: Option<WorkerId>,
    /// Return tasks with ids strictly after this one.
    pub after: Option<TaskId>,
    pub limit: u32,
}

/// A replica's row in `coordinators`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaRow {
    /// The process that last refreshed it (NULL in rows from before instances were recorded).
    pub instance: Option<String>,
    pub last_seen_at: DateTime<Utc>,
    /// How long ago that was.
    pub seen_ago: Duration,
}

/// What [`Store::forget_left_worker`] did with a drained worker's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaving {
    /// The row is gone: the worker left.
    Removed,
    /// The row belongs to a newer session (the worker registered again), or is already gone:
    /// nothing to do for this session.
    Superseded,
    /// A task is still assigned to or running on the worker: the row stays.
    Charged,
}

/// A worker's registration as written on `RegisterWorker`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRegistration {
    pub id: WorkerId,
    pub max_concurrent_tasks: u32,
    /// Assignments beyond `max_concurrent_tasks` the worker queues. Not stored: only the
    /// replica holding the session places work for it.
    pub prefetch: u32,
    pub capabilities: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub hostname: String,
    pub session_id: Uuid,
    pub coordinator_id: String,
    /// What the worker holds, when it says so; `None` for a worker that does not list its
    /// tasks: then every task the store has for it is adopted by the new session.
    pub holding: Option<Holding>,
}

/// A registering worker's own account of what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Holding {
    /// Names the worker's process; a new value means the worker restarted.
    pub instance: String,
    /// Every (task, attempt) the process runs or is still reporting.
    pub running: Vec<(TaskId, Attempt)>,
}

impl Holding {
    /// Splits the tasks the store has for the worker into those it holds and those it does not,
    /// and says how the latter are given back: never received by the same process (uncharged),
    /// or lost with a process that is gone (charged).
    pub fn split(
        &self,
        previous_instance: Option<&str>,
        assigned: Vec<Held>,
    ) -> (Vec<Held>, Vec<Held>, RequeueReason) {
        let running: HashSet<(TaskId, Attempt)> = self.running.iter().copied().collect();
        let (held, missing) = assigned.into_iter().partition(|h| running.contains(&(h.task_id, h.attempt)));
        let reason = if previous_instance == Some(self.instance.as_str()) {
            RequeueReason::NotReceived
        } else {
            RequeueReason::WorkerRestarted
        };
        (held, missing, reason)
    }
}

/// What a registration found: the tasks the new session holds, and those given back because the
/// worker does not hold them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registration {
    pub held: Vec<Held>,
    pub requeued: Vec<Requeued>,
    /// The slots each held task takes, for those that take more than one.
    pub weights: HashMap<TaskId, u32>,
}

/// What the pruner may delete: terminal tasks whose state's age has passed since they finished
/// (with their attempts, job memberships and idempotency keys), jobs left without members, and
/// workers not heard from for `workers` that hold no task. `None` keeps those rows forever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub completed: Option<Duration>,
    pub failed: Option<Duration>,
    pub cancelled: Option<Duration>,
    pub workers: Option<Duration>,
}

impl From<&RetentionConfig> for Retention {
    fn from(c: &RetentionConfig) -> Self {
        let age = |d: Duration| (!d.is_zero()).then_some(d);
        Retention {
            completed: age(c.completed),
            failed: age(c.failed),
            cancelled: age(c.cancelled),
            workers: age(c.workers),
        }
    }
}

impl Retention {
    /// The age of each terminal state that is pruned, shortest first.
    pub fn task_ages(&self) -> Vec<(TaskState, Duration)> {
        let mut ages: Vec<(TaskState, Duration)> = [
            (TaskState::Completed, self.completed),
            (TaskState::Failed, self.failed),
            (TaskState::Cancelled, self.cancelled),
        ]
        .into_iter()
        .filter_map(|(state, age)| Some((state, age?)))
        .collect();
        ages.sort_by_key(|(_, age)| *age);
        ages
    }

    /// The shortest task age: a job younger than this cannot have lost its members to the
    /// pruner, so it is not an empty job to delete yet.
    pub fn shortest_task_age(&self) -> Option<Duration> {
        self.task_ages().first().map(|(_, age)| *age)
    }
}

/// Rows one prune step deleted, by table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub tasks: u64,
    pub task_attempts: u64,
    pub job_tasks: u64,
    pub jobs: u64,
    pub workers: u64,
}

impl Pruned {
    /// Each table's name and count, as the metric labels them.
    pub fn by_table(&self) -> [(&'static str, u64); 5] {
        [
            ("tasks", self.tasks),
            ("task_attempts", self.task_attempts),
            ("job_tasks", self.job_tasks),
            ("jobs", self.jobs),
            ("workers", self.workers),
        ]
    }

    pub fn add(&mut self, o: Pruned) {
        self.tasks += o.tasks;
        self.task_attempts += o.task_attempts;
        self.job_tasks += o.job_tasks;
        self.jobs += o.jobs;
        self.workers += o.workers;
    }

    /// True when some table had `limit` rows to delete: there may be more.
    pub fn full(&self, limit: u32) -> bool {
        let limit = u64::from(limit);
        self.tasks >= limit || self.jobs >= limit || self.workers >= limit
    }
}

/// The store, with the backend chosen by the database URL. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Store {
    Postgres(postgres::PgStore),
    Sqlite(sqlite::SqliteStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Postgres($s) => $e,
            Store::Sqlite($s) => $e,
        }
    };
}

/// [`dispatch!`] for a database call, timed into `coordinator_db_query_seconds{op}` (errors
/// included: a slow failure is still time the caller waited), in a `tracing` span named after
/// the operation (`db.operation`), a child of the call or loop that made it.
macro_rules! timed {
    ($op:literal, $self:ident, $s:ident => $e:expr) => {{
        let start = std::time::Instant::now();
        let span = tracing::info_span!(
            "db",
            otel.name = $op,
            otel.kind = "client",
            db.system = $self.backend(),
            db.operation = $op,
        );
        let r = tracing::Instrument::instrument(async { dispatch!($self, $s => $e) }, span).await;
        crate::metrics::db_query($op, start.elapsed());
        $self.health().note(&r);
        r
    }};
}

/// Whether a build that knows the migrations `known` may run on a database where `applied` are
/// applied, `oldest_build` being the schema's (migration 20's `schema_compat`, `None` before it):
/// `Ok(None)` to migrate as usual, `Ok(Some(warning))` when newer migrations than its own are
/// applied and it may run on them (a replica of the earlier version restarted during an upgrade,
/// or every replica after a roll-back), an error when it may not.
pub fn schema_check(known: &[i64], applied: &[i64], oldest_build: Option<i64>) -> Result<Option<String>> {
    let newest_known = known.iter().copied().max().unwrap_or(0);
    let unknown: Vec<i64> = applied.iter().copied().filter(|v| !known.contains(v)).collect();
    let Some(newest) = unknown.iter().copied().max() else { return Ok(None) };
    if let Some(v) = unknown.iter().copied().find(|&v| v < newest_known) {
        return Err(StoreError::Schema(format!(
            "database migration {v} is applied but unknown to this build, whose migrations go up to \
             {newest_known}: the database was migrated by a build of other migrations"
        )));
    }
    match oldest_build {
        Some(oldest) if newest_known >= oldest => Ok(Some(format!(
            "the database schema is at migration {newest}, newer than this build's {newest_known}: \
             running on it, as replicas of an earlier version do while an upgrade goes on"
        ))),
        Some(oldest) => Err(StoreError::Schema(format!(
            "the database schema is at migration {newest}, which builds older than migration {oldest} \
             cannot run on; this build's migrations go up to {newest_known}: run a build of migration \
             {oldest} or newer"
        ))),
        None => Err(StoreError::Schema(format!(
            "the database schema is at migration {newest}, newer than this build's {newest_known}, and \
             does not say which builds run on it: run a build of migration {newest} or newer"
        ))),
    }
}

/// Runs `migrator` (`run`) on a schema judged by [`schema_check`] from `state` (the migrations
/// applied, the schema's oldest build) before, so that no migration of this build goes onto a
/// schema it cannot run on, and after: a replica of a newer build may have migrated meanwhile,
/// under the lock the run waited for.
async fn migrate_judged<S, R>(
    migrator: &sqlx::migrate::Migrator,
    state: impl Fn() -> S,
    run: impl FnOnce() -> R,
) -> Result<()>
where
    S: Future<Output = Result<(Vec<i64>, Option<i64>)>>,
    R: Future<Output = Result<()>>,
{
    let known: Vec<i64> = migrator.iter().map(|m| m.version).collect();
    let (applied, oldest) = state().await?;
    schema_check(&known, &applied, oldest)?;
    run().await?;
    let (applied, oldest) = state().await?;
    if let Some(warning) = schema_check(&known, &applied, oldest)? {
        tracing::warn!("{warning}");
    }
    Ok(())
}

impl Store {
    /// Connects, creating the SQLite file if needed, and applies migrations.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Store> {
        let url = cfg.url.as_str();
        let connect_err = |source| StoreError::Connect { url: redact_url(url), source };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let store = postgres::PgStore::connect(cfg).await.map_err(connect_err)?;
            store.migrate().await?;
            Ok(Store::Postgres(store))
        } else if url.starts_with("sqlite:") {
            let store = sqlite::SqliteStore::connect(cfg).await.map_err(connect_err)?;
            store.migrate().await?;
            Ok(Store::Sqlite(store))
        } else {
            Err(StoreError::BadUrl(redact_url(url)))
        }
    }

    /// `"postgres"` or `"sqlite"`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    /// A round trip to the database, for `/health`.
    pub async fn ping(&self) -> Result<()> {
        timed!("ping", self, s => s.ping().await)
    }

    /// Closes the pool; waits for connections in use to be returned.
    pub async fn close(&self) {
        dispatch!(self, s => s.close().await)
    }

    /// When the database last failed as unreachable.
    pub fn health(&self) -> &Arc<DbHealth> {
        dispatch!(self, s => &s.health)
    }

    /// The dependents this store's transitions settle, each announced after its commit, for
    /// the core to apply their effects. One listener: a second call replaces the first.
    pub fn settled(&self) -> tokio::sync::mpsc::UnboundedReceiver<Settled> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let sink = dispatch!(self, s => &s.settled);
        *sink.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// Pool sizes: (open, idle).
    pub fn pool_stats(&self) -> (u32, u32) {
        dispatch!(self, s => s.pool_stats())
    }

    /// Sends notifications to every replica listening on [`NOTIFY_CHANNEL`] (Postgres), in
    /// one statement. SQLite serves one process: nothing to tell.
    pub async fn notify(&self, payloads: &[String]) -> Result<()> {
        match self {
            Store::Postgres(s) if !payloads.is_empty() => {
                timed!("notify", self, _s => s.notify(payloads).await)
            }
            _ => Ok(()),
        }
    }

    /// A dedicated connection listening on [`NOTIFY_CHANNEL`]; `None` on SQLite.
    pub async fn listen(&self) -> Option<Result<sqlx::postgres::PgListener>> {
        match self {
            Store::Postgres(s) => Some(s.listen().await),
            Store::Sqlite(_) => None,
        }
    }

    // ---- tasks ----

    /// Creates tasks in one transaction. A task whose idempotency key already exists is not
    /// created; the existing task is returned with `created = false`.
    pub async fn create_tasks(&self, tasks: &[NewTask]) -> Result<Vec<Created>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        timed!("create_tasks", self, s => s.create_tasks(tasks).await)
    }

    /// Whether [`Store::create_tasks_placed`] can assign at submission (Postgres); on SQLite,
    /// whose one writer serializes every claim, it only creates.
    pub fn assigns_at_submission(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    /// Creates tasks as [`Store::create_tasks`], those `placement` places already assigned to
    /// their worker, under the session fence of a claim, where nothing a claim would check stands
    /// in the way (parents, a later start, a concurrency limit, older pending tasks of the type):
    /// those come back as assignments, to push. The others are created pending (or blocked).
    pub async fn create_tasks_placed(
        &self,
        tasks: &[NewTask],
        placement: &Placement,
        lease: Duration,
    ) -> Result<(Vec<Created>, Vec<Assignment>)> {
        if tasks.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        if placement.placed.is_empty() {
            return Ok((self.create_tasks(tasks).await?, Vec::new()));
        }
        timed!("create_tasks", self, s => s.create_tasks_placed(tasks, placement, lease).await)
    }

    /// Creates a job and its tasks in one transaction.
    pub async fn create_job(&self, name: &str, tasks: Vec<NewTask>) -> Result<(Job, Vec<Created>)> {
        self.create_job_keyed(name, None, tasks).await
    }

    /// [`Store::create_job`] with the job's idempotency key: when a job with `key` exists (or
    /// commits first, from a submission racing this one), nothing is created and the answer is
    /// [`StoreError::JobExists`] naming it.
    pub async fn create_job_keyed(
        &self,
        name: &str,
        key: Option<&str>,
        mut tasks: Vec<NewTask>,
    ) -> Result<(Job, Vec<Created>)> {
        let job_id = new_job(&mut tasks);
        let (job, created, _) =
            self.create_job_placed(job_id, name, key, &tasks, &Placement::default(), Duration::ZERO).await?;
        Ok((job, created))
    }

    /// The job an idempotency key made, while it is kept.
    pub async fn job_by_key(&self, key: &str) -> Result<Option<JobId>> {
        timed!("job_by_key", self, s => s.job_by_key(key).await)
    }

    /// Creates job `job_id` (each of `tasks` names it: see [`new_job`]) and its tasks in one
    /// transaction, those `placement` places already assigned to their worker where
    /// [`Store::create_tasks_placed`] would assign them; those come back as assignments, to push.
    pub async fn create_job_placed(
        &self,
        job_id: JobId,
        name: &str,
        key: Option<&str>,
        tasks: &[NewTask],
        placement: &Placement,
        lease: Duration,
    ) -> Result<(Job, Vec<Created>, Vec<Assignment>)> {
        timed!("create_job", self, s => s.create_job(job_id, name, key, tasks, placement, lease).await)
    }

    pub async fn get_task(&self, id: TaskId) -> Result<Option<Task>> {
        timed!("get_task", self, s => s.get_task(id).await)
    }

    pub async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>> {
        timed!("list_tasks", self, s => s.list_tasks(filter).await)
    }

    /// Claims up to `limit` runnable tasks (pending, `run_after` passed, type allowed), highest
    /// priority then oldest first, hands them to `place`, and assigns the tasks it placed:
    /// status `assigned`, the chosen worker, `attempt + 1`, a lease of `lease`, and an attempts
    /// row. Tasks `place` leaves out stay pending. On Postgres the candidates are locked with
    /// `FOR UPDATE SKIP LOCKED`, so concurrent claimers (other replicas) never get the same task.
    pub async fn claim<F>(
        &self,
        limit: u32,
        types: &TypeFilter,
        lease: Duration,
        place: F,
    ) -> Result<Vec<Assignment>>
    where
        F: FnOnce(&[Candidate]) -> Vec<(TaskId, WorkerId)> + Send,
    {
        let filter = ClaimFilter::types(types.clone());
        self.claim_fenced(limit, &filter, lease, |c, _| Placement {
            placed: place(c),
            sessions: HashMap::new(),
        })
        .await
    }

    /// [`Store::claim`] for registered sessions: `place` runs once the candidates are locked and
    /// names, with its placements, the session of each worker it placed on. A placement is made
    /// only while that session is still the worker's current one in the database, and the
    /// assignment records it. (A placement on a worker it names no session for is not fenced:
    /// tools and tests that assign directly.)
    ///
    /// Types with a concurrency limit (see [`Store::set_type_limit`]) are held to it here: a
    /// type at its limit offers no candidates, `place` is told how many more of each limited
    /// type may start ([`Allowances`]), and placements beyond that are dropped. On Postgres
    /// the limit's row is locked until the claim commits, so claims of one limited type from
    /// any number of replicas count each other's assignments.
    pub async fn claim_fenced<F>(
        &self,
        limit: u32,
        filter: &ClaimFilter,
        lease: Duration,
        place: F,
    ) -> Result<Vec<Assignment>>
    where
        F: FnOnce(&[Candidate], &Allowances) -> Placement + Send,
    {
        if limit == 0 || matches!(&filter.types, TypeFilter::Only(t) if t.is_empty()) {
            return Ok(Vec::new());
        }
        timed!("claim", self, s => s.claim(limit, filter, lease, place).await)
    }

    /// Marks assignments `running` (assigned -> running) as started now. Returns how many
    /// applied.
    pub async fn mark_running(&self, held: &[Held]) -> Result<u64> {
        let now = Instant::now();
        let delivered: Vec<(Held, Instant)> = held.iter().map(|h| (h.clone(), now)).collect();
        self.mark_delivered(&delivered).await
    }

    /// Marks delivered assignments `running` (assigned -> running), each started when it went
    /// down its worker's stream (this process's clock). Returns how many applied.
    pub async fn mark_delivered(&self, delivered: &[(Held, Instant)]) -> Result<u64> {
        if delivered.is_empty() {
            return Ok(0);
        }
        timed!("mark_running", self, s => s.mark_running(delivered).await)
    }

    /// Renews the leases of tasks workers report as running, in one statement, and marks them
    /// running. Returns the (task, worker, attempt) still held; the others were revoked
    /// (cancelled, requeued, done, or a newer attempt).
    pub async fn renew_leases(&self, held: &[Held], lease: Duration) -> Result<Vec<Held>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        timed!("renew_leases", self, s => s.renew_leases(held, lease).await)
    }

    /// Completes tasks; one outcome per report, in order. Fenced by (task, worker, attempt).
    pub async fn complete(&self, reports: &[Completion]) -> Result<Vec<ReportOutcome>> {
        if reports.is_empty() {
            return Ok(Vec::new());
        }
        timed!("complete", self, s => s.complete(reports).await)
    }

    /// Completes tasks as [`Store::complete`] does and, in the same transaction, claims work for
    /// the slots the completions free, as [`Store::claim_fenced`] claims it: `refill` is told
    /// which attempts completed and answers how many tasks to claim and of which types (or
    /// nothing), then places the locked candidates. A worker's next tasks are assigned in the
    /// transaction that records its last results, without a claim of their own. A claim that
    /// fails does not fail the completions: they still commit (on Postgres in a transaction of
    /// their own, the first one rolled back; on SQLite past a savepoint), and `refill` is told
    /// ([`Refill::claim_failed`]).
    pub async fn complete_and_claim(
        &self,
        reports: &[Completion],
        lease: Duration,
        refill: &mut dyn Refill,
    ) -> Result<(Vec<ReportOutcome>, Vec<Assignment>)> {
        if reports.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        timed!("complete_and_claim", self, s => s.complete_and_claim(reports, lease, &mut *refill).await)
    }

    /// Records a failure: back to pending after backoff while attempts remain and the failure is
    /// retriable, else `failed`. Fenced by (task, worker, attempt).
    pub async fn fail(&self, report: &Failure, policy: RetryPolicy) -> Result<ReportOutcome> {
        timed!("fail", self, s => s.fail(report, policy).await)
    }

    /// Cancels a task that is not yet terminal. `Ok(None)` when there is no such task.
    pub async fn cancel(&self, id: TaskId, reason: &str) -> Result<Option<Cancelled>> {
        timed!("cancel", self, s => s.cancel(id, reason).await)
    }

    /// Puts a failed or cancelled task back to pending with a fresh attempts budget (failures
    /// 0, no error, no result), runnable now. The attempt counter keeps counting (it is the
    /// fence) and the attempt history stays. `Ok(None)` when there is no such task.
    pub async fn retry_task(&self, id: TaskId) -> Result<Option<RetryOutcome>> {
        timed!("retry_task", self, s => s.retry_task(id).await)
    }

    /// One batch of a bulk retry: up to `limit` tasks matching `filter` with ids after `after`,
    /// in id order, each retried as [`Store::retry_task`] does; returns their ids, sorted. Each
    /// task is moved by a conditional update on its status, so two bulk retries racing over the
    /// same tasks retry each one once.
    pub async fn retry_batch(
        &self,
        filter: &RetryFilter,
        after: Option<TaskId>,
        limit: u32,
    ) -> Result<Vec<TaskId>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        timed!("retry_batch", self, s => s.retry_batch(filter, after, limit).await)
    }

    /// Requeues (or fails, when out of attempts) up to `limit` held tasks whose lease ran out.
    pub async fn requeue_expired(&self, limit: u32) -> Result<Vec<Requeued>> {
        timed!("requeue_expired", self, s => s.requeue_expired(limit).await)
    }

    /// Requeues (or fails, when out of attempts) up to `limit` running tasks still unreported
    /// `grace` after their deadline (their `timeout` after the assignment), charging an
    /// attempt (`timed_out`). One still `assigned` never reached its worker: it is left to the
    /// slot comparison, which gives it back uncharged.
    pub async fn requeue_overdue(&self, limit: u32, grace: Duration) -> Result<Vec<Requeued>> {
        timed!("requeue_overdue", self, s => s.requeue_overdue(limit, grace).await)
    }

    /// Requeues every task `worker` holds under `session` (it went DEAD), charging an attempt,
    /// but only while `session` is still the worker's current session in the database: a worker
    /// that registered again (here or on another replica) keeps its tasks. Tasks assigned
    /// without a recorded session count as the current session's.
    pub async fn requeue_worker(&self, worker: &WorkerId, session: Uuid) -> Result<Vec<Requeued>> {
        timed!("requeue_worker", self, s => s.requeue_worker(worker, session).await)
    }

    /// Puts tasks a draining worker hands back unfinished to pending without charging an
    /// attempt (outcome `released`). Fenced by (task, worker, attempt).
    pub async fn requeue_released(&self, held: &[Held]) -> Result<Vec<Requeued>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        timed!("requeue_released", self, s => s.requeue_held(held, RequeueReason::Released).await)
    }

    /// Puts assignments that never reached their worker back to pending without charging an
    /// attempt. Only tasks still `assigned` under the same worker and attempt move.
    pub async fn requeue_undelivered(&self, held: &[Held]) -> Result<Vec<Requeued>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        timed!("requeue_undelivered", self, s => s.requeue_held(held, RequeueReason::Undelivered).await)
    }

    /// Makes the configured concurrency limits the `config` ones: writes each (an admin's limit
    /// of the same type stays), and drops the `config` limits of types no longer configured.
    pub async fn seed_type_limits(&self, limits: &BTreeMap<String, u32>) -> Result<()> {
        timed!("seed_type_limits", self, s => s.seed_type_limits(limits).await)
    }

    /// Sets (an admin's) concurrency limit of `task_type`, or with `None` removes its limit.
    /// Claims from then on hold to it; tasks already running beyond a lowered limit run on.
    pub async fn set_type_limit(&self, task_type: &str, max_in_flight: Option<u32>) -> Result<()> {
        timed!("set_type_limit", self, s => s.set_type_limit(task_type, max_in_flight).await)
    }

    /// Every type's concurrency limit, with its tasks assigned or running now.
    pub async fn type_limits(&self) -> Result<Vec<crate::domain::TypeLimit>> {
        timed!("type_limits", self, s => s.type_limits().await)
    }

    /// Which of `types` have a concurrency limit: one key lookup each, nothing counted.
    pub async fn limited_types(&self, types: &[String]) -> Result<HashSet<String>> {
        if types.is_empty() {
            return Ok(HashSet::new());
        }
        timed!("limited_types", self, s => s.limited_types(types).await)
    }

    /// Tasks the store says `worker` holds (assigned or running), with their attempts.
    pub async fn held_by(&self, worker: &WorkerId) -> Result<Vec<Held>> {
        timed!("held_by", self, s => s.held_by(worker).await)
    }

    /// What the store says these workers hold, and each worker's current session: the
    /// registry's reconciliation compares it with its in-memory slots.
    pub async fn ownership(&self, workers: &[WorkerId]) -> Result<Ownership> {
        if workers.is_empty() {
            return Ok(Ownership::default());
        }
        timed!("ownership", self, s => s.ownership(workers).await)
    }

    /// The assignment history of a task, oldest first.
    pub async fn attempts(&self, id: TaskId) -> Result<Vec<AttemptRecord>> {
        timed!("attempts", self, s => s.attempts(id).await)
    }

    /// A task's parents in the order it named them, each with its state (`None`: pruned).
    pub async fn parents(&self, id: TaskId) -> Result<Vec<(TaskId, Option<TaskState>)>> {
        timed!("parents", self, s => s.parents(id).await)
    }

    /// Number of tasks in each state: the live counts and the finished ones, the latter a read
    /// of the whole kept history.
    pub async fn task_counts(&self) -> Result<BTreeMap<TaskState, u64>> {
        let mut counts = self.live_task_counts().await?;
        counts.extend(self.finished_task_counts().await?);
        Ok(counts)
    }

    /// Number of tasks in each live state (blocked, pending, assigned, running), read through
    /// the partial indexes that hold only them: bounded by the backlog and the fleet, not by
    /// the kept history.
    pub async fn live_task_counts(&self) -> Result<BTreeMap<TaskState, u64>> {
        timed!("live_task_counts", self, s => s.live_task_counts().await)
    }

    /// Number of tasks in each finished state: a read of the whole kept history, for seldom use.
    pub async fn finished_task_counts(&self) -> Result<BTreeMap<TaskState, u64>> {
        timed!("finished_task_counts", self, s => s.finished_task_counts().await)
    }

    /// Whole-table acceptance audit: how many tasks are completed, and how many have more than
    /// one accepted (completed) attempt, which must never happen.
    pub async fn audit(&self) -> Result<Audit> {
        timed!("audit", self, s => s.audit().await)
    }

    /// Pending tasks by type (runnable now or later) and since when the earliest is runnable,
    /// in one grouped statement: the gauges of pending work, queue age and unschedulable tasks.
    pub async fn pending_by_type(&self) -> Result<BTreeMap<String, PendingType>> {
        timed!("pending_by_type", self, s => s.pending_by_type().await)
    }

    /// One prune step in one transaction: up to `limit` tasks (oldest finished first, per
    /// state), `limit` empty jobs and `limit` silent workers, each delete conditional on the
    /// row still qualifying (a task retried meanwhile is not terminal any more, a worker that
    /// took a task holds one). On Postgres one replica prunes at a time: `None` when another
    /// holds the pruner's advisory lock.
    pub async fn prune(&self, rules: &Retention, limit: u32) -> Result<Option<Pruned>> {
        timed!("prune", self, s => s.prune(rules, limit).await)
    }

    // ---- schedules ----

    /// Creates a schedule; `None` when another has its name.
    pub async fn create_schedule(&self, schedule: &NewSchedule) -> Result<Option<Schedule>> {
        timed!("create_schedule", self, s => s.create_schedule(schedule).await)
    }

    /// Every schedule, by name.
    pub async fn list_schedules(&self) -> Result<Vec<Schedule>> {
        timed!("list_schedules", self, s => s.list_schedules().await)
    }

    /// Deletes a schedule; the tasks it created stay. False for an unknown one.
    pub async fn delete_schedule(&self, id: ScheduleId) -> Result<bool> {
        timed!("delete_schedule", self, s => s.delete_schedule(id).await)
    }

    /// Pauses a schedule, or resumes it with `next` as its next run time (what fell due while it
    /// was paused is not made up); a schedule already in that state is left as it is (a resume
    /// of a running schedule moves nothing). `None` for an unknown schedule.
    pub async fn pause_schedule(
        &self,
        id: ScheduleId,
        paused: bool,
        next: Option<DateTime<Utc>>,
    ) -> Result<Option<Schedule>> {
        timed!("pause_schedule", self, s => s.pause_schedule(id, paused, next).await)
    }

    /// Fires up to `limit` schedules due at `now`, in one transaction: `plan` says which
    /// occurrences of each get a task and when it is next due; each occurrence's task carries
    /// the key `schedule:<id>:<occurrence>`. On Postgres the due rows are locked
    /// (`SKIP LOCKED`), so replicas firing at once never fire one schedule twice.
    pub async fn fire_schedules<F>(&self, now: DateTime<Utc>, limit: u32, plan: F) -> Result<Vec<Fired>>
    where
        F: FnMut(&Schedule) -> Firing,
    {
        timed!("fire_schedules", self, s => s.fire_schedules(now, limit, plan).await)
    }

    /// The tasks that failed for good with `finished_at` in `[since, until)`: counted by type,
    /// and the `top` most frequent (type, error) pairs, each error cut to its first line and
    /// `error_len` characters, with the latest task as a sample; and the attempts that ended in
    /// the window, by outcome.
    pub async fn failure_summary(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        top: u32,
        error_len: u32,
    ) -> Result<FailureSummary> {
        timed!("failure_summary", self, s => s.failure_summary(since, until, top, error_len).await)
    }

    // ---- workers ----

    /// Inserts or replaces a worker's registration; state becomes `active`.
    pub async fn upsert_worker(&self, w: &WorkerRegistration) -> Result<()> {
        timed!("upsert_worker", self, s => s.upsert_worker(w).await)
    }

    /// Registers a worker's new session in one transaction: the registration is written, the
    /// tasks the worker still holds move to the new session, and they are returned. A DEAD
    /// notice about an older session is a no-op from then on.
    pub async fn register_worker(&self, w: &WorkerRegistration) -> Result<Registration> {
        timed!("register_worker", self, s => s.register_worker(w).await)
    }

    /// Sets a worker's state if `session` is still its session. Returns whether it applied.
    /// Records a state change of the worker's session `session` (nothing if another session
    /// replaced it), with the last heartbeat seen.
    pub async fn set_worker_state(
        &self,
        id: &WorkerId,
        session: Uuid,
        state: WorkerState,
        last_seen: DateTime<Utc>,
    ) -> Result<bool> {
        timed!("set_worker_state", self, s => s.set_worker_state(id, session, state, last_seen).await)
    }

    /// Removes the row of a worker whose session `session` deregistered and left cleanly, if
    /// that is still its session and no task is charged to it: a worker that drained leaves no
    /// row behind. The row is locked before the tasks are looked at, so a claim fenced by that
    /// row either committed first (and its task keeps the row) or waits and then finds no row.
    pub async fn forget_left_worker(&self, id: &WorkerId, session: Uuid) -> Result<Leaving> {
        timed!("forget_left_worker", self, s => s.forget_left_worker(id, session).await)
    }

    /// Notes that replica `id`, run by the process `instance`, is alive (its row's
    /// `last_seen_at` is now); answers the instance that held the row before, if any.
    pub async fn touch_coordinator(&self, id: &str, instance: &str) -> Result<Option<String>> {
        timed!("touch_coordinator", self, s => s.touch_coordinator(id, instance).await)
    }

    /// Replica `id`'s row: which process last refreshed it, when, and how long ago by the
    /// database's clock.
    pub async fn coordinator_row(&self, id: &str) -> Result<Option<ReplicaRow>> {
        timed!("coordinator_row", self, s => s.coordinator_row(id).await)
    }

    /// Removes replica `id`'s row (it stopped cleanly).
    pub async fn forget_coordinator(&self, id: &str) -> Result<()> {
        timed!("forget_coordinator", self, s => s.forget_coordinator(id).await)
    }

    /// Notes that no worker's process is connected to replica `id` (it has just started).
    pub async fn disconnect_replica(&self, id: &str) -> Result<u64> {
        timed!("disconnect_replica", self, s => s.disconnect_replica(id).await)
    }

    /// Notes that these sessions' task streams closed on this replica (false: their processes
    /// are no longer connected to it) or opened again (true), in the order given: the last
    /// change of a session wins. A session that was replaced meanwhile is left alone. Answers
    /// the rows changed.
    pub async fn streams_changed(&self, changes: &[(WorkerId, Uuid, bool)]) -> Result<u64> {
        let mut last: HashMap<(&WorkerId, Uuid), bool> = HashMap::with_capacity(changes.len());
        for (worker, session, connected) in changes {
            last.insert((worker, *session), *connected);
        }
        if last.is_empty() {
            return Ok(0);
        }
        // In id order, as every batch that locks workers' rows (see `flush_heartbeats`).
        let mut changes: Vec<(WorkerId, Uuid, bool)> =
            last.into_iter().map(|((w, session), connected)| (w.clone(), session, connected)).collect();
        changes.sort_unstable_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        timed!("streams_changed", self, s => s.streams_changed(&changes).await)
    }

    /// Writes the latest heartbeat time of many workers in one statement.
    pub async fn flush_heartbeats(&self, beats: &[(WorkerId, DateTime<Utc>)]) -> Result<u64> {
        if beats.is_empty() {
            return Ok(0);
        }
        timed!("flush_heartbeats", self, s => s.flush_heartbeats(beats).await)
    }

    pub async fn get_worker(&self, id: &WorkerId) -> Result<Option<WorkerRecord>> {
        timed!("get_worker", self, s => s.get_worker(id).await)
    }

    /// Up to `limit` workers by id, after `after`, each with the tasks it holds.
    pub async fn list_workers(&self, after: Option<&WorkerId>, limit: u32) -> Result<Vec<WorkerRecord>> {
        timed!("list_workers", self, s => s.list_workers(after, limit).await)
    }

    /// Workers that can take work as the database sees them, whichever replica they are
    /// connected to: ACTIVE or SUSPECT and heard from within `silence` (the row of a worker whose
    /// replica died stays `active`, but its heartbeat time stops moving), each with the tasks it
    /// holds. One statement, on an index of live rows.
    pub async fn live_workers(&self, silence: Duration) -> Result<Vec<WorkerRecord>> {
        timed!("live_workers", self, s => s.live_workers(silence).await)
    }

    /// Totals from the attempts history; `None` for an unknown worker.
    pub async fn worker_stats(&self, id: &WorkerId) -> Result<Option<WorkerStats>> {
        timed!("worker_stats", self, s => s.worker_stats(id).await)
    }

    // ---- jobs ----

    pub async fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        timed!("get_job", self, s => s.get_job(id).await)
    }

    /// A page of jobs, newest first, each with its tasks counted by state: those created before
    /// `before` (a job id from the previous page), at most `limit`.
    pub async fn list_jobs(&self, before: Option<JobId>, limit: u32) -> Result<Vec<Job>> {
        timed!("list_jobs", self, s => s.list_jobs(before, limit).await)
    }

    /// The ids of a job's tasks in submission order (its membership never changes; on SQLite a
    /// member retention pruned is left out).
    pub async fn job_task_ids(&self, id: JobId) -> Result<Vec<TaskId>> {
        timed!("job_task_ids", self, s => s.job_task_ids(id).await)
    }

    /// Cancels every task of a job that is not yet terminal, each as [`Store::cancel`] does, in
    /// one transaction; returns them in id order. `Ok(None)` when there is no such job.
    pub async fn cancel_job(&self, id: JobId, reason: &str) -> Result<Option<Vec<Cancelled>>> {
        timed!("cancel_job", self, s => s.cancel_job(id, reason).await)
    }

    /// A job's tasks, in submission order.
    pub async fn job_tasks(&self, id: JobId) -> Result<Vec<Task>> {
        timed!("job_tasks", self, s => s.job_tasks(id).await)
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What `place` decided, kept to the candidates it was offered (each once) and, whatever it
/// decided, to each limited type's allowance: the limit holds in the claim itself.
fn only_candidates(
    candidates: &[Candidate],
    placed: Vec<(TaskId, WorkerId)>,
    allowances: &Allowances,
) -> Vec<(TaskId, WorkerId)> {
    let offered: HashMap<TaskId, &str> = candidates.iter().map(|c| (c.id, c.task_type.as_str())).collect();
    let mut seen = std::collections::HashSet::new();
    let mut left = allowances.clone();
    placed
        .into_iter()
        .filter(|(t, _)| {
            let Some(ty) = offered.get(t) else { return false };
            if !seen.insert(*t) {
                return false;
            }
            match left.get_mut(*ty) {
                Some(0) => false,
                Some(n) => {
                    *n -= 1;
                    true
                }
                None => true,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_class_errors_are_unavailable_and_others_are_not() {
        for code in [
            "08006", "08001", "08P01", "57P01", "57P02", "57P03", "53300", "53100", "55000", "3D000",
            "28P01", "25006",
        ] {
            assert!(connection_class(code), "{code}");
        }
        for code in ["23505", "40001", "22P02", "42P01"] {
            assert!(!connection_class(code), "{code}");
        }
    }

    #[test]
    fn health_holds_while_down_and_for_a_window_after_the_first_success() {
        let h = DbHealth::default();
        let window = Duration::from_millis(40);
        assert!(!h.unavailable_within(window), "never failed");
        h.note::<()>(&Err(StoreError::Database(sqlx::Error::RowNotFound)));
        assert!(!h.unavailable_within(window), "a bad request is no outage");
        h.note::<()>(&Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut)));
        std::thread::sleep(window * 2);
        assert!(h.unavailable_within(window), "still down, however long ago it failed");
        h.note(&Ok(()));
        assert!(h.unavailable_within(window), "just came back");
        std::thread::sleep(window * 2);
        assert!(!h.unavailable_within(window), "the window after recovery has passed");
    }

    /// A newer build that migrates while this one waits for the lock to run its own: the schema
    /// is judged again after the run, and one this build cannot run on stops it then.
    #[tokio::test]
    async fn a_schema_migrated_past_this_build_during_its_run_is_judged_after_it() {
        let migrator = sqlx::migrate::Migrator::DEFAULT;
        let states = std::sync::Mutex::new(vec![(vec![21], Some(22)), (vec![], None)]);
        let state = || {
            let next = states.lock().unwrap().pop().unwrap();
            async move { Ok(next) }
        };
        let err = migrate_judged(&migrator, state, || async { Ok(()) }).await.unwrap_err();
        assert!(err.to_string().contains("run a build of migration 22 or newer"), "{err}");
        assert!(states.lock().unwrap().is_empty(), "judged before and after the run");
    }
}
