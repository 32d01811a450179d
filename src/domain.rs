//! Plain domain types shared by every component: identifiers, task and worker states, and the
//! records the store returns. No I/O here.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    str::FromStr,
    time::Duration,
};

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A task's id: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub Uuid);

impl TaskId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TaskId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// A job's id (a batch of tasks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// A worker's id, chosen by the worker and kept across its restarts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub String);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for WorkerId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// The fencing token of a task: incremented on every assignment. A report carries it back, and a
/// report for an attempt other than the current one changes nothing.
pub type Attempt = u32;

/// Where a task is in its lifecycle (see DESIGN.md, "Task lifecycle").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskState {
    /// Waiting for parent tasks to complete.
    Blocked,
    Pending,
    Assigned,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        TaskState::Blocked,
        TaskState::Pending,
        TaskState::Assigned,
        TaskState::Running,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Blocked => "blocked",
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Completed | TaskState::Failed | TaskState::Cancelled)
    }

    /// Held by a worker: the states a lease applies to.
    pub fn is_held(self) -> bool {
        matches!(self, TaskState::Assigned | TaskState::Running)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for TaskState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// A worker's liveness, driven by heartbeats in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkerState {
    Active,
    Suspect,
    Dead,
    /// Deregistered: no new work, may still report what it holds.
    Draining,
}

impl WorkerState {
    pub const ALL: [WorkerState; 4] =
        [WorkerState::Active, WorkerState::Suspect, WorkerState::Dead, WorkerState::Draining];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Active => "active",
            WorkerState::Suspect => "suspect",
            WorkerState::Dead => "dead",
            WorkerState::Draining => "draining",
        }
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WorkerState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WorkerState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// A task to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub id: TaskId,
    pub task_type: String,
    pub payload: Vec<u8>,
    pub priority: i32,
    pub max_attempts: u32,
    pub timeout: Duration,
    pub idempotency_key: Option<String>,
    pub job_id: Option<JobId>,
    /// Not runnable before this time; `None`: at once.
    pub run_after: Option<DateTime<Utc>>,
    /// The W3C trace context the task was submitted under, sent with each assignment.
    pub traceparent: Option<String>,
    /// Parent tasks, in order (existing tasks, or tasks of the same submission): the task is
    /// blocked until every one of them completed, and its assignment carries their results in
    /// this order.
    pub depends_on: Vec<TaskId>,
    /// What the task does when a parent fails for good or is cancelled.
    pub on_parent_failure: ParentFailure,
    /// Labels, slots and the preferred worker it asks for.
    pub needs: Needs,
}

/// A job to create: its name, its idempotency key, and its tasks in order.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub name: String,
    /// A job already made with this key is returned instead of a new one; the key lives as
    /// long as the job.
    pub idempotency_key: Option<String>,
    pub tasks: Vec<NewTask>,
}

/// What a dependent task does when one of its parents (or theirs) fails for good or is
/// cancelled: it cannot run, so it ends too, with the cause in its error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ParentFailure {
    /// It fails (the default).
    #[default]
    Fail,
    /// It is cancelled.
    Cancel,
}

impl ParentFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            ParentFailure::Fail => "fail",
            ParentFailure::Cancel => "cancel",
        }
    }
}

/// Checks the parents a batch names among its own tasks: no task may depend on itself, directly
/// or through others. Returns the position of a task on a cycle.
pub fn find_cycle(tasks: &[NewTask]) -> Option<usize> {
    let index: HashMap<TaskId, usize> = tasks.iter().enumerate().map(|(i, t)| (t.id, i)).collect();
    // Depth-first, iteratively: 0 unvisited, 1 on the current path, 2 done.
    let mut mark = vec![0u8; tasks.len()];
    for start in 0..tasks.len() {
        if mark[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = 1;
        while let Some((node, next)) = stack.last_mut() {
            let node = *node;
            let parents = &tasks[node].depends_on;
            if *next == parents.len() {
                mark[node] = 2;
                stack.pop();
                continue;
            }
            let parent = parents[*next];
            *next += 1;
            if let Some(&p) = index.get(&parent) {
                match mark[p] {
                    0 => {
                        mark[p] = 1;
                        stack.push((p, 0));
                    }
                    1 => return Some(p),
                    _ => {}
                }
            }
        }
    }
    None
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: TaskId,
    pub task_type: String,
    pub payload: Vec<u8>,
    pub state: TaskState,
    pub priority: i32,
    /// Current (or last) assignment's fencing token; 0 before the first assignment.
    pub attempt: Attempt,
    pub max_attempts: u32,
    /// Attempts that counted against `max_attempts` (failed, or lost with their worker).
    pub failures: u32,
    pub timeout: Duration,
    pub worker_id: Option<WorkerId>,
    pub job_id: Option<JobId>,
    pub idempotency_key: Option<String>,
    pub result: Option<Vec<u8>>,
    pub error: Option<String>,
    pub run_after: DateTime<Utc>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The W3C trace context the task was submitted under.
    pub traceparent: Option<String>,
    /// Labels, slots and the preferred worker it asks for.
    pub needs: Needs,
}

/// Why a pending task is not moving (worked out when it is read, never stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PendingReason {
    /// No live worker declared the task's type.
    NoWorker,
    /// Every live worker that runs the type has all its slots taken (or cannot take work now).
    WorkersBusy,
    /// Backing off after a failed attempt until `run_after`.
    Delayed,
    /// A worker that runs the type has room: the task waits its turn.
    Queued,
    /// No live worker that runs the type could ever take it: none has the labels it requires,
    /// or none has as many slots as it weighs.
    Unschedulable,
    /// Its type runs as many tasks as its concurrency limit allows.
    TypeLimit,
}

/// A pending task's [`PendingReason`] and the same in one line for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub reason: PendingReason,
    pub detail: String,
}

/// A runnable task offered to placement: just what placement needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: TaskId,
    pub task_type: String,
    pub priority: i32,
    pub needs: Needs,
}

/// A task handed to a worker: what goes down its stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub task_id: TaskId,
    pub task_type: String,
    pub payload: Vec<u8>,
    pub attempt: Attempt,
    /// Slots it takes on its worker.
    pub weight: u32,
    pub worker_id: WorkerId,
    pub priority: i32,
    pub job_id: Option<JobId>,
    pub deadline: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// The task's W3C trace context, for the worker to continue.
    pub traceparent: Option<String>,
    /// Its parents' results, in the order it named them (empty: it has none).
    pub parents: Vec<ParentResult>,
}

/// A completed parent's result as an assignment carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParentResult {
    pub task_id: TaskId,
    /// `None` when the results of all parents together were too large to carry: the worker
    /// reads this one with `GetTask`.
    pub result: Option<Vec<u8>>,
}

/// One row of the attempts history.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub worker_id: WorkerId,
    pub assigned_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub error: Option<String>,
}

/// Why an attempt ended without a report from its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequeueReason {
    /// The lease ran out: no heartbeat renewed it within `stale_task_timeout`.
    LeaseExpired,
    /// The worker went DEAD.
    WorkerDead,
    /// Assigned but never delivered: the stream was gone. Not charged as an attempt.
    Undelivered,
    /// Handed back unfinished by a draining worker. Not charged as an attempt.
    Released,
    /// The worker's process registered again without it: it never arrived (lost with a
    /// connection or a replica). Not charged as an attempt.
    NotReceived,
    /// The worker registered again from a new process: the attempt died with the old one.
    WorkerRestarted,
    /// Its deadline passed (`timeout` after the assignment) and the worker did not report it
    /// within a grace after that: the worker ignores deadlines, or its handler hangs.
    TimedOut,
}

impl RequeueReason {
    pub const ALL: [RequeueReason; 7] = [
        RequeueReason::LeaseExpired,
        RequeueReason::WorkerDead,
        RequeueReason::Undelivered,
        RequeueReason::Released,
        RequeueReason::NotReceived,
        RequeueReason::WorkerRestarted,
        RequeueReason::TimedOut,
    ];

    /// True when the lost attempt counts against `max_attempts`.
    pub fn charged(self) -> bool {
        matches!(
            self,
            RequeueReason::LeaseExpired
                | RequeueReason::WorkerDead
                | RequeueReason::WorkerRestarted
                | RequeueReason::TimedOut
        )
    }

    /// True when the worker may still be running the attempt it lost (it is alive and was not
    /// the one that gave it up): it is told to stop it.
    pub fn may_still_run(self) -> bool {
        matches!(self, RequeueReason::LeaseExpired | RequeueReason::TimedOut)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RequeueReason::LeaseExpired => "lease_expired",
            RequeueReason::WorkerDead => "worker_dead",
            RequeueReason::Undelivered => "undelivered",
            RequeueReason::Released => "released",
            RequeueReason::NotReceived => "not_received",
            RequeueReason::WorkerRestarted => "worker_restarted",
            RequeueReason::TimedOut => "timed_out",
        }
    }
}

/// A worker as registered.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    pub id: WorkerId,
    pub state: WorkerState,
    pub max_concurrent_tasks: u32,
    /// Assignments it queues beyond `max_concurrent_tasks`.
    pub prefetch: u32,
    pub capabilities: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub hostname: String,
    pub session_id: Uuid,
    pub coordinator_id: String,
    /// The process that registered the session, when it said.
    pub instance: Option<String>,
    /// Whether that process is connected to its replica (`coordinator_id`): set by the
    /// registration, cleared by the replica when the session's task stream closes.
    pub connected: bool,
    pub registered_at: DateTime<Utc>,
    /// The last heartbeat the database learned of: written about once a minute, and at each
    /// state change.
    pub last_heartbeat_at: DateTime<Utc>,
    /// When the worker's replica (`coordinator_id`) was last seen, if it has a row. While it is
    /// alive, it keeps `state` current.
    pub owner_seen_at: Option<DateTime<Utc>>,
    /// Tasks the store says this worker holds (assigned or running).
    pub in_flight: u32,
}

impl WorkerRecord {
    /// Its row says its process is connected to a replica other than `me`, as that replica last
    /// wrote it (whether that replica still runs is the reader's to judge).
    pub fn connected_to_other_replica(&self, me: &str) -> bool {
        self.connected && self.coordinator_id != me
    }
}

/// Per-worker totals from the attempts history.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerStats {
    pub tasks_completed: u64,
    pub tasks_failed: u64,
    pub total_duration: Duration,
    pub in_flight: u32,
}

impl WorkerStats {
    pub fn mean_duration(&self) -> Duration {
        if self.tasks_completed + self.tasks_failed == 0 {
            Duration::ZERO
        } else {
            self.total_duration / (self.tasks_completed + self.tasks_failed) as u32
        }
    }
}

/// A job and its progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub name: String,
    pub total: u32,
    pub counts: BTreeMap<TaskState, u32>,
    pub created_at: DateTime<Utc>,
}

impl Job {
    pub fn count(&self, state: TaskState) -> u32 {
        self.counts.get(&state).copied().unwrap_or(0)
    }

    /// Tasks of the job the retention pruner deleted (they had finished): `total` less the
    /// tasks still counted.
    pub fn pruned(&self) -> u32 {
        self.total.saturating_sub(self.counts.values().sum())
    }

    /// Every task finished, pruned ones included.
    pub fn done(&self) -> bool {
        let terminal: u32 = TaskState::ALL.iter().filter(|s| s.is_terminal()).map(|s| self.count(*s)).sum();
        terminal + self.pruned() >= self.total
    }
}

/// A recurring schedule's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScheduleId(pub Uuid);

impl ScheduleId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for ScheduleId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ScheduleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What each occurrence of a schedule submits.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskTemplate {
    pub task_type: String,
    pub payload: Vec<u8>,
    pub priority: i32,
    pub max_attempts: u32,
    pub timeout: Duration,
}

impl TaskTemplate {
    /// The task of one occurrence: its idempotency key names the schedule and the occurrence, so
    /// an occurrence is one task however often it is fired.
    pub fn task(&self, schedule: ScheduleId, occurrence: DateTime<Utc>) -> NewTask {
        NewTask {
            id: TaskId::new(),
            task_type: self.task_type.clone(),
            payload: self.payload.clone(),
            priority: self.priority,
            max_attempts: self.max_attempts,
            timeout: self.timeout,
            idempotency_key: Some(format!("schedule:{schedule}:{}", occurrence.timestamp_micros())),
            job_id: None,
            // The database's clock gates the run too: a replica whose clock runs ahead creates
            // an occurrence early, but nothing claims it before its time.
            run_after: Some(occurrence),
            traceparent: None,
            depends_on: Vec::new(),
            on_parent_failure: ParentFailure::Fail,
            needs: Default::default(),
        }
    }
}

/// A schedule to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSchedule {
    pub id: ScheduleId,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub template: TaskTemplate,
    pub missed: MissedRuns,
    pub paused: bool,
    /// The first occurrence.
    pub next_run_at: Option<DateTime<Utc>>,
}

/// A schedule as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub id: ScheduleId,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub template: TaskTemplate,
    pub missed: MissedRuns,
    pub paused: bool,
    /// `None`: the expression matches no later time.
    pub next_run_at: Option<DateTime<Utc>>,
    pub last_run_at: Option<DateTime<Utc>>,
    /// Occurrences that created a task.
    pub runs: u64,
    pub created_at: DateTime<Utc>,
}

/// What a schedule does with occurrences missed while no replica could fire them (older than
/// a minute when one gets to them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum MissedRuns {
    /// Run the latest missed occurrence once, unless an on-time one runs anyway.
    #[default]
    Latest,
    /// Run none of them.
    Skip,
    /// Run each of them (the latest 1,000 at most).
    All,
}

impl MissedRuns {
    pub fn as_str(self) -> &'static str {
        match self {
            MissedRuns::Latest => "latest",
            MissedRuns::Skip => "skip",
            MissedRuns::All => "all",
        }
    }

    pub fn parse(s: &str) -> Option<MissedRuns> {
        [MissedRuns::Latest, MissedRuns::Skip, MissedRuns::All].into_iter().find(|m| m.as_str() == s)
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Worker RPCs only: register, receive tasks, heartbeat, report, deregister.
    Worker,
    /// Submit, get, list, watch and cancel tasks; jobs.
    Client,
    /// Everything, plus worker listing and statistics.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Worker and slot counts of one coordinator's fleet, for `/health` and the gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FleetCounts {
    pub total: u32,
    pub active: u32,
    pub suspect: u32,
    pub dead: u32,
    pub draining: u32,
    pub capacity_total: u32,
    pub capacity_used: u32,
    pub streams_open: u32,
}

/// A worker as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSlot {
    pub id: WorkerId,
    /// Task types it runs; empty means any.
    pub capabilities: Vec<String>,
    /// Slots free now.
    pub free: u32,
    /// Slots taken now (a task takes as many as it weighs).
    pub in_flight: u32,
    /// Assignments it takes at most: its slots and its prefetch queue.
    pub max: u32,
    /// Its slots (`max_concurrent_tasks`): a task that weighs more can never run on it.
    pub slots: u32,
    pub labels: BTreeMap<String, String>,
}

impl WorkerSlot {
    pub fn runs(&self, task_type: &str) -> bool {
        self.capabilities.is_empty() || self.capabilities.iter().any(|c| c == task_type)
    }

    /// Whether it could ever run `task`: its type, its labels, and slots for its weight.
    pub fn eligible(&self, task: &Candidate) -> bool {
        self.runs(&task.task_type) && task.needs.fits(&self.labels, self.slots)
    }
}

/// Wakes the scheduler. Cheap to clone; a wake with no waiter is remembered, so none is lost.
#[derive(Debug, Clone, Default)]
pub struct Wake(std::sync::Arc<tokio::sync::Notify>);

impl Wake {
    pub fn wake(&self) {
        self.0.notify_one();
    }

    pub async fn notified(&self) {
        self.0.notified().await;
    }
}

/// Pending tasks of one type, as the store counts them for the gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingType {
    pub count: u64,
    /// The earliest `run_after` among them: when the longest-waiting one became (or becomes)
    /// runnable. In the future when every one waits out a retry backoff.
    pub runnable_since: DateTime<Utc>,
}

impl PendingType {
    /// How long the longest-waiting task has been runnable at `now`; zero while none is yet.
    pub fn waited(&self, now: DateTime<Utc>) -> Duration {
        (now - self.runnable_since).to_std().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_state_round_trips_through_its_name() {
        for s in TaskState::ALL {
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), s);
        }
        assert!("bogus".parse::<TaskState>().is_err());
    }

    #[test]
    fn worker_state_round_trips_through_its_name() {
        for s in WorkerState::ALL {
            assert_eq!(s.as_str().parse::<WorkerState>().unwrap(), s);
        }
    }

    #[test]
    fn terminal_and_held_states() {
        assert!(TaskState::Completed.is_terminal());
        assert!(TaskState::Cancelled.is_terminal());
        assert!(!TaskState::Running.is_terminal());
        assert!(TaskState::Assigned.is_held() && TaskState::Running.is_held());
        assert!(!TaskState::Pending.is_held());
    }

    #[test]
    fn task_ids_sort_by_creation() {
        let a = TaskId::new();
        let b = TaskId::new();
        assert!(a < b);
    }

    #[test]
    fn job_done_counts_terminal_states() {
        let mut job = Job {
            id: JobId::new(),
            name: "j".into(),
            total: 2,
            counts: BTreeMap::new(),
            created_at: Utc::now(),
        };
        job.counts.insert(TaskState::Completed, 1);
        job.counts.insert(TaskState::Running, 1);
        assert!(!job.done());
        job.counts.insert(TaskState::Running, 0);
        job.counts.insert(TaskState::Failed, 1);
        assert!(job.done());
    }
}

/// One condition a task puts on the labels of the worker that runs it.
#[derive(Debug, Clone, PartialEq)]
pub enum Requirement {
    /// `key=value`: the worker's label `key` is exactly `value`.
    Equals { key: String, value: String },
    /// `key>=number`: the worker's label `key` is a number at least this.
    AtLeast { key: String, min: f64 },
}

/// The longest label key or value a requirement names (as a worker's labels).
pub const MAX_REQUIREMENT_LEN: usize = 256;

impl Requirement {
    /// Parses `key=value` or `key>=number`. The error is one line for the caller.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("requirement {s:?}: {why} (expected key=value or key>=number)");
        let (key, req) = if let Some((k, v)) = s.split_once(">=") {
            let min: f64 = v.trim().parse().map_err(|_| bad("the minimum is not a number"))?;
            if !min.is_finite() {
                return Err(bad("the minimum is not a finite number"));
            }
            (k.trim(), Requirement::AtLeast { key: k.trim().to_owned(), min })
        } else if let Some((k, v)) = s.split_once('=') {
            let v = v.trim();
            if v.is_empty() || v.len() > MAX_REQUIREMENT_LEN {
                return Err(bad(&format!("the value must be 1 to {MAX_REQUIREMENT_LEN} bytes")));
            }
            (k.trim(), Requirement::Equals { key: k.trim().to_owned(), value: v.to_owned() })
        } else {
            return Err(bad("no operator"));
        };
        if key.is_empty() || key.len() > MAX_REQUIREMENT_LEN || key.contains(['=', '>', '<']) {
            return Err(bad(&format!("the key must be 1 to {MAX_REQUIREMENT_LEN} bytes, without = < >")));
        }
        if s.chars().any(char::is_control) {
            return Err(bad("control characters are not allowed"));
        }
        Ok(req)
    }

    pub fn key(&self) -> &str {
        match self {
            Requirement::Equals { key, .. } | Requirement::AtLeast { key, .. } => key,
        }
    }

    /// Whether a worker with `labels` meets it. A minimum needs a label that parses as a number.
    pub fn met_by(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals { key, value } => labels.get(key) == Some(value),
            Requirement::AtLeast { key, min } => label_number(labels.get(key)).is_some_and(|n| n >= *min),
        }
    }
}

/// A label's value as a number a minimum compares with: a finite number, blanks around it
/// ignored (`"512"`, `" 1e3 "`); anything else (`"lots"`, `"inf"`, `"NaN"`) is none.
pub fn label_number(value: Option<&String>) -> Option<f64> {
    value.and_then(|v| v.trim().parse::<f64>().ok()).filter(|n| n.is_finite())
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Equals { key, value } => write!(f, "{key}={value}"),
            Requirement::AtLeast { key, min } => write!(f, "{key}>={min}"),
        }
    }
}

/// What a task asks of the worker that runs it, beyond its type: labels, slots and a preferred
/// worker. The default asks nothing: any worker that runs the type, one slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Needs {
    /// Every one must hold on the worker's labels.
    pub requires: Vec<Requirement>,
    /// Slots the task takes on its worker (at least 1).
    pub weight: u32,
    /// Tasks with the same key go to the same worker while it is live and has room.
    pub affinity_key: Option<String>,
}

impl Default for Needs {
    fn default() -> Self {
        Self { requires: Vec::new(), weight: 1, affinity_key: None }
    }
}

/// The most slots one task may take.
pub const MAX_WEIGHT: u32 = 1024;
/// The most requirements one task may name.
pub const MAX_REQUIREMENTS: usize = 16;

impl Needs {
    /// Asks for anything beyond a slot of a worker of its type (affinity is a preference, not a
    /// condition).
    pub fn constrains(&self) -> bool {
        !self.requires.is_empty() || self.weight > 1
    }

    /// Whether a worker with these labels and this many slots in all could ever run it.
    pub fn fits(&self, labels: &BTreeMap<String, String>, slots: u32) -> bool {
        self.weight <= slots && self.requires.iter().all(|r| r.met_by(labels))
    }

    /// `gpu=h100, mem_gb>=256`: the requirements in one line.
    pub fn requirements_text(&self) -> String {
        self.requires.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    }
}

/// A task type's concurrency limit across every replica, and what runs of it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeLimit {
    pub task_type: String,
    /// At most this many of its tasks assigned or running at once.
    pub max_in_flight: u32,
    /// `config` (written at startup from the configuration) or `admin` (set at runtime).
    pub source: String,
    /// Its tasks assigned or running now.
    pub in_flight: u32,
}
