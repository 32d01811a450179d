//! Conversions between wire types and domain types, and the validation of every request field.
//! Validation errors are `InvalidArgument` naming the field.

use std::time::Duration;

use chrono::{DateTime, Utc};
use prost_types::Timestamp;
use tonic::Status;

use super::status::invalid;
use crate::{
    domain::{
        self, Assignment, JobId, NewTask, PendingReason, Task, TaskId, TaskState, Waiting, WorkerId,
        WorkerState,
    },
    proto,
    registry::Push,
};

pub const MAX_ID_LEN: usize = 128;
pub const MAX_TASK_TYPE_LEN: usize = 128;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
pub const MAX_CAPABILITIES: usize = 256;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_LEN: usize = 256;
pub const MAX_CONCURRENT_TASKS: u32 = 10_000;
pub const MAX_PRIORITY: i32 = 1_000_000;
pub const MAX_ATTEMPTS: u32 = 100;
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
pub const MAX_BATCH: usize = 10_000;
pub const MAX_PAGE_SIZE: u32 = 1000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_ERROR_LEN: usize = 64 * 1024;
pub const MAX_RUNNING_TASKS: usize = 10_000;

pub fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn opt_timestamp(t: Option<DateTime<Utc>>) -> Option<Timestamp> {
    t.map(timestamp)
}

/// A worker or other identifier: non-empty, bounded, letters, digits and `._:@-`.
pub fn worker_id(field: &str, s: &str) -> Result<WorkerId, Status> {
    check_name(field, s, MAX_ID_LEN)?;
    Ok(WorkerId(s.to_owned()))
}

/// A task type: same rules as ids.
pub fn task_type(field: &str, s: &str) -> Result<String, Status> {
    check_name(field, s, MAX_TASK_TYPE_LEN)?;
    Ok(s.to_owned())
}

fn check_name(field: &str, s: &str, max: usize) -> Result<(), Status> {
    if s.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if s.len() > max {
        return Err(invalid(field, format!("longer than {max} bytes")));
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || "._:@-/".contains(*c))) {
        return Err(invalid(
            field,
            format!("character {c:?} is not allowed (use letters, digits and ._:@-/)"),
        ));
    }
    Ok(())
}

pub fn task_id(field: &str, s: &str) -> Result<TaskId, Status> {
    if s.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    s.parse().map_err(|_| invalid(field, "is not a task id (a UUID)"))
}

pub fn job_id(field: &str, s: &str) -> Result<JobId, Status> {
    if s.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    s.parse().map_err(|_| invalid(field, "is not a job id (a UUID)"))
}

pub fn attempt(field: &str, a: u32) -> Result<domain::Attempt, Status> {
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
) -> Result<Vec<(TaskId, domain::Attempt)>, Status> {
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

/// Longer than this, a worker's `held_ms` is not believed.
const MAX_HELD: Duration = Duration::from_secs(30 * 24 * 3600);

/// The moment a worker received an attempt it says it held for `held_ms`; `None` when it did not
/// say (0) or says more than [`MAX_HELD`].
pub fn held_since(held_ms: u64) -> Option<std::time::Instant> {
    let held = Duration::from_millis(held_ms);
    if held_ms == 0 || held > MAX_HELD {
        return None;
    }
    std::time::Instant::now().checked_sub(held)
}

/// Defaults and limits applied to submissions.
#[derive(Debug, Clone)]
pub struct SubmitLimits {
    pub default_max_attempts: u32,
    pub default_timeout: Duration,
    pub max_payload_size: usize,
}

pub fn new_task(
    field: &str,
    req: proto::SubmitTaskRequest,
    limits: &SubmitLimits,
) -> Result<NewTask, Status> {
    let task_type = task_type(&format!("{field}task_type"), &req.task_type)?;
    if req.payload.len() > limits.max_payload_size {
        return Err(Status::out_of_range(format!(
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
    let idempotency_key = match req.idempotency_key.as_str() {
        "" => None,
        k if k.len() > MAX_IDEMPOTENCY_KEY_LEN => {
            return Err(invalid(
                &format!("{field}idempotency_key"),
                format!("longer than {MAX_IDEMPOTENCY_KEY_LEN} bytes"),
            ));
        }
        k => Some(k.to_owned()),
    };
    Ok(NewTask {
        id: TaskId::new(),
        task_type,
        payload: req.payload,
        priority: req.priority,
        max_attempts: if req.max_attempts == 0 { limits.default_max_attempts } else { req.max_attempts },
        timeout,
        idempotency_key,
        job_id: None,
    })
}

pub fn task_state(s: TaskState) -> proto::TaskStatus {
    match s {
        TaskState::Pending => proto::TaskStatus::Pending,
        TaskState::Assigned => proto::TaskStatus::Assigned,
        TaskState::Running => proto::TaskStatus::Running,
        TaskState::Completed => proto::TaskStatus::Completed,
        TaskState::Failed => proto::TaskStatus::Failed,
        TaskState::Cancelled => proto::TaskStatus::Cancelled,
    }
}

/// `None` for UNSPECIFIED (no filter).
pub fn task_state_filter(field: &str, v: i32) -> Result<Option<TaskState>, Status> {
    match proto::TaskStatus::try_from(v) {
        Ok(proto::TaskStatus::Unspecified) => Ok(None),
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
    fn ids_are_checked() {
        assert!(worker_id("worker_id", "worker-1").is_ok());
        assert!(worker_id("worker_id", "host.example:7@a/b").is_ok());
        let e = worker_id("worker_id", "").unwrap_err();
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
        assert_eq!(new_task("", big, &limits()).unwrap_err().code(), tonic::Code::OutOfRange);
        let bad = proto::SubmitTaskRequest { task_type: "x".into(), max_attempts: 101, ..Default::default() };
        let e = new_task("tasks[2].", bad, &limits()).unwrap_err();
        assert!(e.message().starts_with("tasks[2].max_attempts"), "{}", e.message());
    }

    #[test]
    fn status_filter_maps_unspecified_to_none() {
        assert_eq!(task_state_filter("status", 0).unwrap(), None);
        assert_eq!(task_state_filter("status", 4).unwrap(), Some(TaskState::Completed));
        assert!(task_state_filter("status", 99).is_err());
    }
}
