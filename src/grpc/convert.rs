//! Conversions between wire types and domain types, and the validation of every request field.
//! Validation errors are [`CoreError::InvalidArgument`] naming the field (a payload over its
//! limit is [`CoreError::TooLarge`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

pub use crate::core::SubmitLimits;
use crate::{
    core::{
        self, CoreError,
        client::{ListedWorker, Shown, Submitted, SubmittedTask, TaskUpdate},
        schedules::ScheduleRequest,
        worker::{Accepted, Registration},
    },
    domain::{
        self, Assignment, AttemptRecord, Job, JobId, MAX_REQUIREMENTS, MAX_WEIGHT, MissedRuns, Needs, NewJob,
        NewTask, ParentFailure, PendingReason, Requirement, Schedule, ScheduleId, Task, TaskId, TaskState,
        TaskTemplate, Waiting, WorkerId, WorkerState, WorkerStats,
    },
    proto,
    registry::Push,
    store::{FailureSummary, Held, Holding, RetryFilter, TaskFilter},
};

pub const MAX_ID_LEN: usize = 128;
pub const MAX_TASK_TYPE_LEN: usize = 128;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
pub const MAX_CAPABILITIES: usize = 256;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_LEN: usize = 256;
pub const MAX_CONCURRENT_TASKS: u32 = 10_000;
/// Most assignments a worker may queue beyond its slots.
pub const MAX_PREFETCH: u32 = 1024;
pub const MAX_PRIORITY: i32 = 1_000_000;
pub const MAX_ATTEMPTS: u32 = 100;
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// How far ahead a task may be scheduled (`run_at`, `delay_ms`).
pub const MAX_DELAY: Duration = Duration::from_secs(366 * 24 * 3600);
pub const MAX_BATCH: usize = 10_000;
/// Parents one task may name.
pub const MAX_PARENTS: usize = 10_000;
pub const MAX_PAGE_SIZE: u32 = 1000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_RUNNING_TASKS: usize = 10_000;
/// The longest error substring a bulk retry matches on.
pub const MAX_ERROR_FILTER_LEN: usize = 1024;

fn invalid(field: &str, message: impl std::fmt::Display) -> CoreError {
    CoreError::invalid(field, message)
}

pub fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn opt_timestamp(t: Option<DateTime<Utc>>) -> Option<Timestamp> {
    t.map(timestamp)
}

/// A worker or other identifier: non-empty, bounded, letters, digits and `._:@-`.
pub fn worker_id(field: &str, s: &str) -> Result<WorkerId, CoreError> {
    check_name(field, s, MAX_ID_LEN)?;
    Ok(WorkerId(s.to_owned()))
}

/// A task type: same rules as ids.
pub fn task_type(field: &str, s: &str) -> Result<String, CoreError> {
    check_name(field, s, MAX_TASK_TYPE_LEN)?;
    Ok(s.to_owned())
}

fn check_name(field: &str, s: &str, max: usize) -> Result<(), CoreError> {
    if s.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if s.len() > max {
        return Err(invalid(field, format!("longer than {max} bytes")));
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || "._:@-/".contains(*c))) {
        return Err(invalid(
            field,
            format!("character {} is not allowed (use letters, digits and ._:@-/)", shown(c)),
        ));
    }
    Ok(())
}

/// A character as a caller can read it whatever their language: `'é' (U+00E9)`, and the code
/// point alone for one that prints as nothing or as space (`U+0001`, `U+0020`).
fn shown(c: char) -> String {
    if c.is_control() || c.is_whitespace() {
        format!("U+{:04X}", c as u32)
    } else {
        format!("'{c}' (U+{:04X})", c as u32)
    }
}

pub fn task_id(field: &str, s: &str) -> Result<TaskId, CoreError> {
    if s.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    s.parse().map_err(|_| invalid(field, "is not a task id (a UUID)"))
}

pub fn job_id(field: &str, s: &str) -> Result<JobId, CoreError> {
    if s.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    s.parse().map_err(|_| invalid(field, "is not a job id (a UUID)"))
}

pub fn schedule_id(field: &str, s: &str) -> Result<ScheduleId, CoreError> {
    if s.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    s.parse().map(ScheduleId).map_err(|_| invalid(field, "is not a schedule id (a UUID)"))
}

/// A schedule to create; its task template is checked as a submission is.
pub fn schedule_request(
    req: proto::CreateScheduleRequest,
    limits: &SubmitLimits,
) -> Result<ScheduleRequest, CoreError> {
    let task = req.task.ok_or_else(|| invalid("task", "is required: the task each occurrence submits"))?;
    if !task.idempotency_key.is_empty() || task.run_at.is_some() || task.delay_ms != 0 {
        return Err(invalid(
            "task",
            "idempotency_key, run_at and delay_ms are set by the schedule; leave them empty",
        ));
    }
    if !task.depends_on.is_empty() {
        return Err(invalid("task.depends_on", "a schedule's task cannot depend on other tasks"));
    }
    let t = new_task("task.", task, limits)?;
    let missed = match proto::MissedRuns::try_from(req.missed) {
        Ok(proto::MissedRuns::Unspecified | proto::MissedRuns::Latest) => MissedRuns::Latest,
        Ok(proto::MissedRuns::Skip) => MissedRuns::Skip,
        Ok(proto::MissedRuns::All) => MissedRuns::All,
        Err(_) => return Err(invalid("missed", format!("{} is not a MissedRuns value", req.missed))),
    };
    Ok(ScheduleRequest {
        name: req.name,
        cron: req.cron,
        timezone: req.timezone,
        template: TaskTemplate {
            task_type: t.task_type,
            payload: t.payload,
            priority: t.priority,
            max_attempts: t.max_attempts,
            timeout: t.timeout,
        },
        missed,
        paused: req.paused,
    })
}

pub fn schedule_out(s: Schedule) -> proto::Schedule {
    let missed = match s.missed {
        MissedRuns::Latest => proto::MissedRuns::Latest,
        MissedRuns::Skip => proto::MissedRuns::Skip,
        MissedRuns::All => proto::MissedRuns::All,
    };
    let t = s.template;
    proto::Schedule {
        schedule_id: s.id.to_string(),
        name: s.name,
        cron: s.cron,
        timezone: s.timezone,
        task: Some(proto::SubmitTaskRequest {
            task_type: t.task_type,
            payload: t.payload,
            priority: t.priority,
            max_attempts: t.max_attempts,
            timeout_ms: t.timeout.as_millis() as u64,
            ..Default::default()
        }),
        missed: missed as i32,
        paused: s.paused,
        next_run_at: opt_timestamp(s.next_run_at),
        last_run_at: opt_timestamp(s.last_run_at),
        runs: s.runs,
        created_at: Some(timestamp(s.created_at)),
    }
}

pub fn attempt(field: &str, a: u32) -> Result<domain::Attempt, CoreError> {
    if a == 0 {
        return Err(invalid(field, "must be at least 1 (the attempt from the assignment)"));
    }
    Ok(a)
}

/// A worker's list of the tasks it runs (heartbeats, registrations), at most
/// [`MAX_RUNNING_TASKS`].
pub fn running_tasks(
    field: &str,
    list: &[proto::RunningTask],
) -> Result<Vec<(TaskId, domain::Attempt)>, CoreError> {
    if list.len() > MAX_RUNNING_TASKS {
        return Err(invalid(field, format!("more than {MAX_RUNNING_TASKS}")));
    }
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            Ok((
                task_id(&format!("{field}[{i}].task_id"), &t.task_id)?,
                attempt(&format!("{field}[{i}].attempt"), t.attempt)?,
            ))
        })
        .collect()
}

pub fn new_task(
    field: &str,
    req: proto::SubmitTaskRequest,
    limits: &SubmitLimits,
) -> Result<NewTask, CoreError> {
    new_task_in(field, req, limits, &[], TaskId::new())
}

/// A submission of a batch whose tasks get the ids `batch` (so `#N` in `depends_on` names
/// `batch[N]`); this one gets `id`.
fn new_task_in(
    field: &str,
    req: proto::SubmitTaskRequest,
    limits: &SubmitLimits,
    batch: &[TaskId],
    id: TaskId,
) -> Result<NewTask, CoreError> {
    let depends_on = parents(&format!("{field}depends_on"), &req.depends_on, batch, id)?;
    let on_parent_failure = match proto::ParentFailurePolicy::try_from(req.on_parent_failure) {
        Ok(proto::ParentFailurePolicy::Fail) => ParentFailure::Fail,
        Ok(proto::ParentFailurePolicy::Cancel) => ParentFailure::Cancel,
        Err(_) => {
            return Err(invalid(
                &format!("{field}on_parent_failure"),
                format!("{} is not a ParentFailurePolicy value", req.on_parent_failure),
            ));
        }
    };
    let task_type = task_type(&format!("{field}task_type"), &req.task_type)?;
    if req.payload.len() > limits.max_payload_size {
        return Err(CoreError::TooLarge(format!(
            "{field}payload: {} bytes is over the limit of {} bytes",
            req.payload.len(),
            limits.max_payload_size
        )));
    }
    if req.priority.unsigned_abs() > MAX_PRIORITY.unsigned_abs() {
        return Err(invalid(&format!("{field}priority"), format!("must be within ±{MAX_PRIORITY}")));
    }
    if req.max_attempts > MAX_ATTEMPTS {
        return Err(invalid(&format!("{field}max_attempts"), format!("must be at most {MAX_ATTEMPTS}")));
    }
    let timeout = match req.timeout_ms {
        0 => limits.default_timeout,
        ms => Duration::from_millis(ms),
    };
    if timeout > MAX_TIMEOUT {
        return Err(invalid(&format!("{field}timeout_ms"), "must be at most 7 days"));
    }
    let idempotency_key = idempotency_key(&format!("{field}idempotency_key"), req.idempotency_key)?;
    let run_after = run_after(field, req.run_at, req.delay_ms, Utc::now())?;
    let needs = needs(field, req.requires, req.weight, req.affinity_key)?;
    Ok(NewTask {
        id,
        task_type,
        payload: req.payload,
        priority: req.priority,
        max_attempts: if req.max_attempts == 0 { limits.default_max_attempts } else { req.max_attempts },
        timeout,
        idempotency_key,
        job_id: None,
        run_after,
        traceparent: None,
        depends_on,
        on_parent_failure,
        needs,
    })
}

/// What a submission asks of its worker: requirements, weight and affinity key, checked.
fn needs(field: &str, requires: Vec<String>, weight: u32, affinity_key: String) -> Result<Needs, CoreError> {
    if requires.len() > MAX_REQUIREMENTS {
        return Err(invalid(&format!("{field}requires"), format!("at most {MAX_REQUIREMENTS} requirements")));
    }
    let requires = requires
        .iter()
        .enumerate()
        .map(|(i, r)| Requirement::parse(r).map_err(|e| invalid(&format!("{field}requires[{i}]"), e)))
        .collect::<Result<Vec<_>, _>>()?;
    if weight > MAX_WEIGHT {
        return Err(invalid(&format!("{field}weight"), format!("must be at most {MAX_WEIGHT} slots")));
    }
    if affinity_key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(invalid(
            &format!("{field}affinity_key"),
            format!("longer than {MAX_IDEMPOTENCY_KEY_LEN} bytes"),
        ));
    }
    core::storable(&format!("{field}affinity_key"), &affinity_key)?;
    Ok(Needs {
        requires,
        weight: weight.max(1),
        affinity_key: (!affinity_key.is_empty()).then_some(affinity_key),
    })
}

/// A task's parents: task ids, or `#N` for the task at index N of the same request.
fn parents(field: &str, list: &[String], batch: &[TaskId], own: TaskId) -> Result<Vec<TaskId>, CoreError> {
    if list.len() > MAX_PARENTS {
        return Err(invalid(field, format!("names {} parents; at most {MAX_PARENTS}", list.len())));
    }
    list.iter()
        .enumerate()
        .map(|(j, p)| {
            let at = || format!("{field}[{j}]");
            let id = match p.strip_prefix('#') {
                Some(n) => {
                    let n: usize = n.parse().map_err(|_| invalid(&at(), format!("{p:?} is not #<index>")))?;
                    *batch.get(n).ok_or_else(|| match batch.len() {
                        0 => invalid(
                            &at(),
                            format!("{p} names a task of the same request, and only SubmitTasks and SubmitJob hold several"),
                        ),
                        len => invalid(&at(), format!("{p} is not a task of this request (#0 to #{})", len - 1)),
                    })?
                }
                None => task_id(&at(), p)?,
            };
            if id == own {
                return Err(invalid(&at(), "a task cannot depend on itself"));
            }
            Ok(id)
        })
        .collect()
}

/// A batch's tasks, each with the id `#N` names; a cycle among them is refused.
fn batch_tasks(
    list: Vec<proto::SubmitTaskRequest>,
    limits: &SubmitLimits,
) -> Result<Vec<NewTask>, CoreError> {
    let ids: Vec<TaskId> = list.iter().map(|_| TaskId::new()).collect();
    let tasks = list
        .into_iter()
        .enumerate()
        .map(|(i, t)| new_task_in(&format!("tasks[{i}]."), t, limits, &ids, ids[i]))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(i) = domain::find_cycle(&tasks) {
        return Err(invalid(
            &format!("tasks[{i}].depends_on"),
            "is part of a cycle: these tasks wait for each other",
        ));
    }
    Ok(tasks)
}

/// When a submitted task may first run: `run_at`, or `delay_ms` after `now`; `None` for at once
/// (neither given, or a time already past).
fn run_after(
    field: &str,
    run_at: Option<Timestamp>,
    delay_ms: u64,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, CoreError> {
    let latest = now + MAX_DELAY;
    let at = match (run_at, delay_ms) {
        (Some(_), 1..) => {
            return Err(invalid(&format!("{field}run_at"), "give run_at or delay_ms, not both"));
        }
        (Some(t), 0) => u32::try_from(t.nanos)
            .ok()
            .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
            .ok_or_else(|| invalid(&format!("{field}run_at"), "is not a valid time"))?,
        (None, 0) => return Ok(None),
        (None, ms) => {
            if Duration::from_millis(ms) > MAX_DELAY {
                return Err(invalid(&format!("{field}delay_ms"), "must be at most a year (366 days)"));
            }
            now + Duration::from_millis(ms)
        }
    };
    if at > latest {
        return Err(invalid(&format!("{field}run_at"), "must be at most a year (366 days) ahead"));
    }
    Ok((at > now).then_some(at))
}

pub fn task_state(s: TaskState) -> proto::TaskStatus {
    match s {
        TaskState::Blocked => proto::TaskStatus::Blocked,
        TaskState::Pending => proto::TaskStatus::Pending,
        TaskState::Assigned => proto::TaskStatus::Assigned,
        TaskState::Running => proto::TaskStatus::Running,
        TaskState::Completed => proto::TaskStatus::Completed,
        TaskState::Failed => proto::TaskStatus::Failed,
        TaskState::Cancelled => proto::TaskStatus::Cancelled,
    }
}

/// `None` for UNSPECIFIED (no filter).
pub fn task_state_filter(field: &str, v: i32) -> Result<Option<TaskState>, CoreError> {
    match proto::TaskStatus::try_from(v) {
        Ok(proto::TaskStatus::Unspecified) => Ok(None),
        Ok(proto::TaskStatus::Blocked) => Ok(Some(TaskState::Blocked)),
        Ok(proto::TaskStatus::Pending) => Ok(Some(TaskState::Pending)),
        Ok(proto::TaskStatus::Assigned) => Ok(Some(TaskState::Assigned)),
        Ok(proto::TaskStatus::Running) => Ok(Some(TaskState::Running)),
        Ok(proto::TaskStatus::Completed) => Ok(Some(TaskState::Completed)),
        Ok(proto::TaskStatus::Failed) => Ok(Some(TaskState::Failed)),
        Ok(proto::TaskStatus::Cancelled) => Ok(Some(TaskState::Cancelled)),
        Err(_) => Err(invalid(field, format!("unknown status {v}"))),
    }
}

pub fn worker_state(s: WorkerState) -> proto::WorkerState {
    match s {
        WorkerState::Active => proto::WorkerState::Active,
        WorkerState::Suspect => proto::WorkerState::Suspect,
        WorkerState::Dead => proto::WorkerState::Dead,
        WorkerState::Draining => proto::WorkerState::Draining,
    }
}

pub fn pending_reason(r: PendingReason) -> proto::PendingReason {
    match r {
        PendingReason::NoWorker => proto::PendingReason::NoWorker,
        PendingReason::WorkersBusy => proto::PendingReason::WorkersBusy,
        PendingReason::Delayed => proto::PendingReason::Delayed,
        PendingReason::Queued => proto::PendingReason::Queued,
        PendingReason::Unschedulable => proto::PendingReason::Unschedulable,
        PendingReason::TypeLimit => proto::PendingReason::TypeLimit,
    }
}

pub fn type_limit(l: domain::TypeLimit) -> proto::TypeLimit {
    proto::TypeLimit {
        task_type: l.task_type,
        max_in_flight: l.max_in_flight,
        source: l.source,
        in_flight: l.in_flight,
    }
}

/// A task with why it waits (for a pending task).
pub fn waiting_task(t: Task, waiting: Option<Waiting>) -> proto::Task {
    let mut p = proto::Task::from(t);
    if let Some(w) = waiting {
        p.pending_reason = pending_reason(w.reason) as i32;
        p.pending_detail = w.detail;
    }
    p
}

/// A watch event with why the task waits (for a pending task).
pub fn waiting_event(t: &Task, waiting: Option<&Waiting>) -> proto::TaskEvent {
    let mut e = proto::TaskEvent::from(t);
    if let Some(w) = waiting {
        e.pending_reason = pending_reason(w.reason) as i32;
        e.pending_detail = w.detail.clone();
    }
    e
}

impl From<Task> for proto::Task {
    fn from(t: Task) -> Self {
        proto::Task {
            task_id: t.id.to_string(),
            task_type: t.task_type,
            payload: t.payload,
            status: task_state(t.state) as i32,
            priority: t.priority,
            attempt: t.attempt,
            max_attempts: t.max_attempts,
            failures: t.failures,
            worker_id: t.worker_id.map(|w| w.0).unwrap_or_default(),
            job_id: t.job_id.map(|j| j.to_string()).unwrap_or_default(),
            idempotency_key: t.idempotency_key.unwrap_or_default(),
            result: t.result.unwrap_or_default(),
            error: t.error.unwrap_or_default(),
            timeout_ms: t.timeout.as_millis() as u64,
            created_at: Some(timestamp(t.created_at)),
            updated_at: Some(timestamp(t.updated_at)),
            run_after: Some(timestamp(t.run_after)),
            assigned_at: opt_timestamp(t.assigned_at),
            started_at: opt_timestamp(t.started_at),
            finished_at: opt_timestamp(t.finished_at),
            pending_reason: proto::PendingReason::Unspecified as i32,
            pending_detail: String::new(),
            attempts: Vec::new(),
            parents: Vec::new(),
            requires: t.needs.requires.iter().map(ToString::to_string).collect(),
            weight: t.needs.weight,
            affinity_key: t.needs.affinity_key.unwrap_or_default(),
        }
    }
}

impl From<&Task> for proto::TaskEvent {
    fn from(t: &Task) -> Self {
        proto::TaskEvent {
            task_id: t.id.to_string(),
            status: task_state(t.state) as i32,
            attempt: t.attempt,
            worker_id: t.worker_id.as_ref().map(|w| w.0.clone()).unwrap_or_default(),
            error: t.error.clone().unwrap_or_default(),
            result: if t.state == TaskState::Completed {
                t.result.clone().unwrap_or_default()
            } else {
                Vec::new()
            },
            at: Some(timestamp(t.updated_at)),
            pending_reason: proto::PendingReason::Unspecified as i32,
            pending_detail: String::new(),
        }
    }
}

impl From<Assignment> for proto::TaskAssignment {
    fn from(a: Assignment) -> Self {
        proto::TaskAssignment {
            kind: proto::AssignmentKind::Run as i32,
            task_id: a.task_id.to_string(),
            task_type: a.task_type,
            payload: a.payload,
            attempt: a.attempt,
            deadline: Some(timestamp(a.deadline)),
            priority: a.priority,
            job_id: a.job_id.map(|j| j.to_string()).unwrap_or_default(),
            traceparent: a.traceparent.unwrap_or_default(),
            weight: a.weight,
            parents: a
                .parents
                .into_iter()
                .map(|p| proto::ParentResult {
                    task_id: p.task_id.to_string(),
                    included: p.result.is_some(),
                    result: p.result.unwrap_or_default(),
                })
                .collect(),
        }
    }
}

impl From<Push> for proto::TaskAssignment {
    fn from(p: Push) -> Self {
        match p {
            Push::Run(a) => a.into(),
            Push::Cancel { task_id, attempt } => proto::TaskAssignment {
                kind: proto::AssignmentKind::Cancel as i32,
                task_id: task_id.to_string(),
                attempt,
                ..Default::default()
            },
        }
    }
}

/// The (worker, task, attempt) a report names.
pub fn held(worker: &str, task: &str, attempt_no: u32) -> Result<Held, CoreError> {
    Ok(Held {
        worker_id: worker_id("worker_id", worker)?,
        task_id: task_id("task_id", task)?,
        attempt: attempt("attempt", attempt_no)?,
    })
}

fn batch_size(n: usize) -> Result<(), CoreError> {
    if n == 0 || n > MAX_BATCH {
        return Err(invalid("tasks", format!("must hold 1 to {MAX_BATCH} tasks")));
    }
    Ok(())
}

/// A batch of submissions: 1 to [`MAX_BATCH`] tasks, each checked.
pub fn new_tasks(
    list: Vec<proto::SubmitTaskRequest>,
    limits: &SubmitLimits,
) -> Result<Vec<NewTask>, CoreError> {
    batch_size(list.len())?;
    batch_tasks(list, limits)
}

/// A job submission: its name and its tasks.
pub fn job(req: proto::SubmitJobRequest, limits: &SubmitLimits) -> Result<NewJob, CoreError> {
    batch_size(req.tasks.len())?;
    if req.name.len() > MAX_LABEL_LEN {
        return Err(invalid("name", format!("longer than {MAX_LABEL_LEN} bytes")));
    }
    core::storable("name", &req.name)?;
    let idempotency_key = idempotency_key("idempotency_key", req.idempotency_key)?;
    let tasks = batch_tasks(req.tasks, limits)?;
    Ok(NewJob { name: req.name, idempotency_key, tasks })
}

/// An idempotency key of a task or a job: empty is none.
fn idempotency_key(field: &str, key: String) -> Result<Option<String>, CoreError> {
    if key.is_empty() {
        return Ok(None);
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(invalid(field, format!("longer than {MAX_IDEMPOTENCY_KEY_LEN} bytes")));
    }
    core::storable(field, &key)?;
    Ok(Some(key))
}

/// A task listing's filter and page.
pub fn task_filter(req: proto::ListTasksRequest) -> Result<TaskFilter, CoreError> {
    let limit = match req.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n if n > MAX_PAGE_SIZE => {
            return Err(invalid("page_size", format!("must be at most {MAX_PAGE_SIZE}")));
        }
        n => n,
    };
    Ok(TaskFilter {
        state: task_state_filter("status", req.status)?,
        task_type: (!req.task_type.is_empty()).then(|| task_type("task_type", &req.task_type)).transpose()?,
        job_id: (!req.job_id.is_empty()).then(|| job_id("job_id", &req.job_id)).transpose()?,
        worker_id: (!req.worker_id.is_empty()).then(|| worker_id("worker_id", &req.worker_id)).transpose()?,
        after: (!req.page_token.is_empty()).then(|| task_id("page_token", &req.page_token)).transpose()?,
        limit,
    })
}

/// A page size of a listing (0: the default) and its token, parsed by `token`.
pub fn page<T>(
    size: u32,
    token: &str,
    parse: impl FnOnce(&str, &str) -> Result<T, CoreError>,
) -> Result<(Option<T>, u32), CoreError> {
    let limit = match size {
        0 => DEFAULT_PAGE_SIZE,
        n if n > MAX_PAGE_SIZE => {
            return Err(invalid("page_size", format!("must be at most {MAX_PAGE_SIZE}")));
        }
        n => n,
    };
    let after = (!token.is_empty()).then(|| parse("page_token", token)).transpose()?;
    Ok((after, limit))
}

/// A time in a request; seconds and nanoseconds in range.
pub fn time(field: &str, t: &Timestamp) -> Result<DateTime<Utc>, CoreError> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|n| DateTime::from_timestamp(t.seconds, n))
        .ok_or_else(|| invalid(field, "is not a valid time"))
}

/// A bulk retry's filter and limit (0: the default). Whether a filter is set at all, and the
/// limit's bounds, are the core's to check.
pub fn retry_filter(req: proto::RetryTasksRequest) -> Result<(RetryFilter, u32), CoreError> {
    if req.error_contains.len() > MAX_ERROR_FILTER_LEN {
        return Err(invalid("error_contains", format!("must be at most {MAX_ERROR_FILTER_LEN} bytes")));
    }
    core::storable("error_contains", &req.error_contains)?;
    let finished_after = req.finished_after.as_ref().map(|t| time("finished_after", t)).transpose()?;
    let finished_before = req.finished_before.as_ref().map(|t| time("finished_before", t)).transpose()?;
    if let (Some(a), Some(b)) = (finished_after, finished_before)
        && a >= b
    {
        return Err(invalid("finished_before", "must be after finished_after"));
    }
    let filter = RetryFilter {
        job_id: (!req.job_id.is_empty()).then(|| job_id("job_id", &req.job_id)).transpose()?,
        task_type: (!req.task_type.is_empty()).then(|| task_type("task_type", &req.task_type)).transpose()?,
        error_contains: (!req.error_contains.is_empty()).then_some(req.error_contains),
        finished_after,
        finished_before,
        include_cancelled: req.include_cancelled,
    };
    Ok((filter, req.limit))
}

/// A worker's registration: at most [`MAX_CONCURRENT_TASKS`] slots (0 means 1), at most
/// [`MAX_CAPABILITIES`] task types, at most [`MAX_LABELS`] labels, bounded strings.
pub fn registration(req: proto::RegisterWorkerRequest) -> Result<Registration, CoreError> {
    let id = worker_id("worker_id", &req.worker_id)?;
    let max = match req.max_concurrent_tasks {
        0 => 1,
        n if n > MAX_CONCURRENT_TASKS => {
            return Err(invalid("max_concurrent_tasks", format!("must be at most {MAX_CONCURRENT_TASKS}")));
        }
        n => n,
    };
    if req.prefetch > MAX_PREFETCH {
        return Err(invalid("prefetch", format!("must be at most {MAX_PREFETCH}")));
    }
    if req.capabilities.len() > MAX_CAPABILITIES {
        return Err(invalid("capabilities", format!("more than {MAX_CAPABILITIES}")));
    }
    let mut capabilities = Vec::with_capacity(req.capabilities.len());
    for (i, c) in req.capabilities.iter().enumerate() {
        capabilities.push(task_type(&format!("capabilities[{i}]"), c)?);
    }
    capabilities.sort();
    capabilities.dedup();
    if req.labels.len() > MAX_LABELS
        || req.labels.iter().any(|(k, v)| {
            k.is_empty()
                || k.len() > MAX_LABEL_LEN
                || v.len() > MAX_LABEL_LEN
                || k.contains(['=', '>', '<'])
                || k.chars().chain(v.chars()).any(char::is_control)
        })
    {
        return Err(invalid(
            "labels",
            format!(
                "at most {MAX_LABELS} labels of at most {MAX_LABEL_LEN} bytes each, keys not empty and \
                 without = < >, no control characters"
            ),
        ));
    }
    if req.version.len() > MAX_LABEL_LEN || req.hostname.len() > MAX_LABEL_LEN {
        return Err(invalid("version", "version and hostname are at most 256 bytes"));
    }
    if req.instance_id.len() > MAX_LABEL_LEN {
        return Err(invalid("instance_id", "is at most 256 bytes"));
    }
    for (field, s) in
        [("version", &req.version), ("hostname", &req.hostname), ("instance_id", &req.instance_id)]
    {
        if let Some(c) = s.chars().find(|c| c.is_control()) {
            return Err(invalid(
                field,
                format!("character {} is not allowed (no control characters)", shown(c)),
            ));
        }
    }
    let holding = if req.instance_id.is_empty() {
        None
    } else {
        Some(Holding {
            instance: req.instance_id,
            running: running_tasks("running_tasks", &req.running_tasks)?,
        })
    };
    Ok(Registration {
        id,
        max_concurrent_tasks: max,
        prefetch: req.prefetch,
        capabilities,
        labels: req.labels.into_iter().collect(),
        version: req.version,
        hostname: req.hostname,
        holding,
    })
}

/// One submitted task on the wire.
pub fn submitted_task(t: SubmittedTask, warnings: Vec<String>) -> proto::SubmitTaskResponse {
    proto::SubmitTaskResponse {
        task_id: t.task.id.to_string(),
        created: t.created,
        task: Some(waiting_task(t.task, t.waiting)),
        warnings,
    }
}

impl From<Submitted> for proto::SubmitTasksResponse {
    fn from(s: Submitted) -> Self {
        proto::SubmitTasksResponse {
            results: s.tasks.into_iter().map(|t| submitted_task(t, Vec::new())).collect(),
            warnings: s.warnings,
        }
    }
}

impl From<Shown> for proto::Task {
    fn from(s: Shown) -> Self {
        let mut task = waiting_task(s.task, s.waiting);
        task.attempts = s.attempts.into_iter().map(Into::into).collect();
        task.parents = s
            .parents
            .into_iter()
            .map(|(id, state)| proto::TaskParent {
                task_id: id.to_string(),
                status: state.map_or(proto::TaskStatus::Unspecified, task_state) as i32,
            })
            .collect();
        task
    }
}

impl From<AttemptRecord> for proto::TaskAttempt {
    fn from(a: AttemptRecord) -> Self {
        proto::TaskAttempt {
            attempt: a.attempt,
            worker_id: a.worker_id.0,
            assigned_at: Some(timestamp(a.assigned_at)),
            started_at: opt_timestamp(a.started_at),
            finished_at: opt_timestamp(a.finished_at),
            outcome: a.outcome.unwrap_or_default(),
            error: a.error.unwrap_or_default(),
        }
    }
}

impl From<TaskUpdate> for proto::TaskEvent {
    fn from(u: TaskUpdate) -> Self {
        match u {
            TaskUpdate::Changed(s) => waiting_event(&s.task, s.waiting.as_ref()),
            TaskUpdate::Started { task_id, attempt, worker_id, at } => proto::TaskEvent {
                task_id: task_id.to_string(),
                status: proto::TaskStatus::Running as i32,
                attempt,
                worker_id: worker_id.0,
                at: Some(timestamp(at)),
                ..Default::default()
            },
        }
    }
}

/// A job on the wire, with the results of `tasks` (empty when they were not asked for).
pub fn job_out(job: Job, tasks: Vec<Task>) -> proto::Job {
    let results = tasks
        .into_iter()
        .map(|t| proto::JobTaskResult {
            task_id: t.id.to_string(),
            status: task_state(t.state) as i32,
            duration_ms: match (t.started_at.or(t.assigned_at), t.finished_at) {
                (Some(s), Some(f)) => (f - s).num_milliseconds().max(0) as u64,
                _ => 0,
            },
            result: t.result.unwrap_or_default(),
            error: t.error.unwrap_or_default(),
            worker_id: t.worker_id.map(|w| w.0).unwrap_or_default(),
        })
        .collect();
    proto::Job {
        job_id: job.id.to_string(),
        name: job.name.clone(),
        total: job.total,
        pending: job.count(TaskState::Pending),
        assigned: job.count(TaskState::Assigned),
        running: job.count(TaskState::Running),
        completed: job.count(TaskState::Completed),
        failed: job.count(TaskState::Failed),
        cancelled: job.count(TaskState::Cancelled),
        blocked: job.count(TaskState::Blocked),
        done: job.done(),
        created_at: Some(timestamp(job.created_at)),
        results,
    }
}

impl From<ListedWorker> for proto::WorkerInfo {
    fn from(l: ListedWorker) -> Self {
        let w = l.record;
        proto::WorkerInfo {
            worker_id: w.id.0,
            state: worker_state(l.state) as i32,
            max_concurrent_tasks: w.max_concurrent_tasks,
            in_flight: w.in_flight,
            capabilities: w.capabilities,
            labels: w.labels.into_iter().collect(),
            version: w.version,
            hostname: w.hostname,
            last_heartbeat: Some(timestamp(l.last_seen)),
            registered_at: Some(timestamp(w.registered_at)),
            connected: l.connected,
            coordinator_id: w.coordinator_id,
            prefetch: w.prefetch,
            connected_elsewhere: l.connected_elsewhere,
        }
    }
}

/// A worker's statistics on the wire.
pub fn worker_stats(id: WorkerId, stats: WorkerStats, state: WorkerState) -> proto::WorkerStats {
    proto::WorkerStats {
        worker_id: id.0,
        tasks_completed: stats.tasks_completed,
        tasks_failed: stats.tasks_failed,
        total_duration_ms: stats.total_duration.as_millis() as u64,
        mean_duration_ms: stats.mean_duration().as_millis() as u64,
        in_flight: stats.in_flight,
        state: worker_state(state) as i32,
    }
}

impl From<Accepted> for proto::ReportResponse {
    fn from(a: Accepted) -> Self {
        proto::ReportResponse { duplicate: a.duplicate, status: task_state(a.state) as i32 }
    }
}

/// Entries one `ReportCompletions` call may carry.
pub const MAX_REPORTS: usize = 1_000;

pub fn report_count(n: usize) -> Result<(), CoreError> {
    if n > MAX_REPORTS {
        return Err(invalid("completions", format!("must hold at most {MAX_REPORTS} entries")));
    }
    Ok(())
}

/// One entry's answer, as `ReportCompletion` would have answered it alone.
pub fn completion_verdict(r: Result<Accepted, CoreError>) -> proto::CompletionVerdict {
    match r {
        Ok(a) => proto::CompletionVerdict {
            code: tonic::Code::Ok as i32,
            message: String::new(),
            duplicate: a.duplicate,
            status: task_state(a.state) as i32,
        },
        Err(e) => {
            let s = tonic::Status::from(e);
            proto::CompletionVerdict {
                code: s.code() as i32,
                message: s.message().to_owned(),
                duplicate: false,
                status: proto::TaskStatus::Unspecified as i32,
            }
        }
    }
}

pub fn failure_summary(
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    s: FailureSummary,
) -> proto::FailureSummary {
    proto::FailureSummary {
        since: Some(timestamp(since)),
        until: Some(timestamp(until)),
        failed: s.failed,
        failed_by_type: s.failed_by_type.into_iter().collect(),
        top_errors: s
            .top_errors
            .into_iter()
            .map(|g| proto::FailureGroup {
                task_type: g.task_type,
                error: g.error,
                count: g.count,
                sample_task_id: g.sample.to_string(),
                last_failed_at: Some(timestamp(g.last_failed_at)),
            })
            .collect(),
        attempt_outcomes: s.attempt_outcomes.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SubmitLimits {
        SubmitLimits {
            default_max_attempts: 3,
            default_timeout: Duration::from_secs(60),
            max_payload_size: 1024,
        }
    }

    #[test]
    fn a_refused_character_is_named_in_plain_terms() {
        let said = |s: &str| check_name("task_type", s, 128).unwrap_err().to_string();
        assert!(said("a\u{1}b").contains("character U+0001 is not allowed"), "{}", said("a\u{1}b"));
        assert!(said("a b").contains("character U+0020 is not allowed"), "{}", said("a b"));
        assert!(said("prové").contains("character 'é' (U+00E9) is not allowed"), "{}", said("prové"));
    }

    #[test]
    fn a_parent_by_index_names_a_task_of_the_request() {
        let batch = [TaskId::new(), TaskId::new()];
        let own = TaskId::new();
        let said = |list: &[&str], batch: &[TaskId]| {
            let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
            parents("depends_on", &list, batch, own).map_err(|e| e.to_string())
        };
        assert_eq!(said(&["#1", "#0"], &batch), Ok(vec![batch[1], batch[0]]));
        assert_eq!(
            said(&["#2"], &batch),
            Err("depends_on[0]: #2 is not a task of this request (#0 to #1)".into())
        );
        assert_eq!(
            said(&["#0"], &[]),
            Err("depends_on[0]: #0 names a task of the same request, and only SubmitTasks and SubmitJob hold several"
                .into())
        );
        assert!(said(&["#x"], &batch).unwrap_err().contains("is not #<index>"));
    }

    #[test]
    fn ids_are_checked() {
        assert!(worker_id("worker_id", "worker-1").is_ok());
        assert!(worker_id("worker_id", "host.example:7@a/b").is_ok());
        let e = tonic::Status::from(worker_id("worker_id", "").unwrap_err());
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("worker_id:"));
        assert!(worker_id("worker_id", "a b").is_err());
        assert!(worker_id("worker_id", &"x".repeat(129)).is_err());
        assert!(task_id("task_id", "nope").is_err());
    }

    #[test]
    fn submissions_get_defaults_and_limits() {
        let t = new_task(
            "",
            proto::SubmitTaskRequest {
                task_type: "prove".into(),
                payload: b"{}".to_vec(),
                ..Default::default()
            },
            &limits(),
        )
        .unwrap();
        assert_eq!(t.max_attempts, 3);
        assert_eq!(t.timeout, Duration::from_secs(60));
        assert_eq!(t.idempotency_key, None);

        let big =
            proto::SubmitTaskRequest { task_type: "x".into(), payload: vec![0; 2000], ..Default::default() };
        assert_eq!(
            tonic::Status::from(new_task("", big, &limits()).unwrap_err()).code(),
            tonic::Code::OutOfRange
        );
        let bad = proto::SubmitTaskRequest { task_type: "x".into(), max_attempts: 101, ..Default::default() };
        let e = tonic::Status::from(new_task("tasks[2].", bad, &limits()).unwrap_err());
        assert!(e.message().starts_with("tasks[2].max_attempts"), "{}", e.message());
    }

    #[test]
    fn status_filter_maps_unspecified_to_none() {
        assert_eq!(task_state_filter("status", 0).unwrap(), None);
        assert_eq!(task_state_filter("status", 4).unwrap(), Some(TaskState::Completed));
        assert!(task_state_filter("status", 99).is_err());
    }

    #[test]
    fn a_task_runs_at_its_time_or_after_its_delay() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let at = |secs: i64| Some(timestamp(now + chrono::Duration::seconds(secs)));
        let ra = |run_at, delay_ms| run_after("", run_at, delay_ms, now);
        assert_eq!(ra(None, 0).unwrap(), None);
        assert_eq!(ra(at(90), 0).unwrap(), Some(now + chrono::Duration::seconds(90)));
        assert_eq!(ra(at(-90), 0).unwrap(), None, "a time already past runs now");
        assert_eq!(ra(None, 1500).unwrap(), Some(now + chrono::Duration::milliseconds(1500)));
        let year = 366 * 24 * 3600;
        assert!(ra(at(year), 0).is_ok());
        for (run_at, delay_ms, field) in [
            (at(year + 1), 0, "run_at"),
            (None, year as u64 * 1000 + 1, "delay_ms"),
            (at(10), 10, "run_at"),
            (Some(Timestamp { seconds: 0, nanos: -1 }), 0, "run_at"),
            (Some(Timestamp { seconds: i64::MAX, nanos: 0 }), 0, "run_at"),
        ] {
            let err = ra(run_at, delay_ms).expect_err(field);
            assert!(matches!(&err, CoreError::InvalidArgument(m) if m.starts_with(field)), "{err:?}");
        }
    }
}
