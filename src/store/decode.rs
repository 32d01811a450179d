//! Row decoding, written once for both dialects. The dialects store ids and times differently
//! (Postgres: `uuid` and `timestamptz`; SQLite: UUID text and integer microseconds since the Unix
//! epoch), so each row type implements [`Cols`], the handful of typed column reads; every domain
//! type is then decoded from any row by one function here.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use chrono::{DateTime, TimeZone, Utc};
use sqlx::{Row, postgres::PgRow, sqlite::SqliteRow};
use uuid::Uuid;

use super::{
    Audit, FailureGroup, FailureSummary, Held, HeldRow, PendingType, ReplicaRow, Result, StoreError,
    policy::Charges,
};
use crate::domain::{
    Assignment, AttemptRecord, Candidate, Job, JobId, MissedRuns, Needs, ParentResult, Requirement, Schedule,
    ScheduleId, Task, TaskId, TaskState, TaskTemplate, TypeLimit, WorkerId, WorkerRecord, WorkerState,
};

/// Typed reads of a row's columns by name, the same on both dialects.
pub(super) trait Cols {
    fn uuid(&self, col: &str) -> Result<Uuid>;
    fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>>;
    fn time(&self, col: &str) -> Result<DateTime<Utc>>;
    fn opt_time(&self, col: &str) -> Result<Option<DateTime<Utc>>>;
    /// An `INTEGER` column.
    fn int(&self, col: &str) -> Result<i32>;
    fn opt_int(&self, col: &str) -> Result<Option<i32>>;
    /// A `BIGINT` column or a count.
    fn bigint(&self, col: &str) -> Result<i64>;
    fn text(&self, col: &str) -> Result<String>;
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    fn bytes(&self, col: &str) -> Result<Vec<u8>>;
    fn opt_bytes(&self, col: &str) -> Result<Option<Vec<u8>>>;
    /// A `BOOLEAN` column (an integer 0/1 on SQLite).
    fn flag(&self, col: &str) -> Result<bool>;
}

/// The reads whose Rust type both dialects decode directly.
macro_rules! plain_cols {
    () => {
        fn int(&self, col: &str) -> Result<i32> {
            Ok(self.try_get(col)?)
        }
        fn opt_int(&self, col: &str) -> Result<Option<i32>> {
            Ok(self.try_get(col)?)
        }
        fn bigint(&self, col: &str) -> Result<i64> {
            Ok(self.try_get(col)?)
        }
        fn text(&self, col: &str) -> Result<String> {
            Ok(self.try_get(col)?)
        }
        fn opt_text(&self, col: &str) -> Result<Option<String>> {
            Ok(self.try_get(col)?)
        }
        fn bytes(&self, col: &str) -> Result<Vec<u8>> {
            Ok(self.try_get(col)?)
        }
        fn opt_bytes(&self, col: &str) -> Result<Option<Vec<u8>>> {
            Ok(self.try_get(col)?)
        }
        fn flag(&self, col: &str) -> Result<bool> {
            Ok(self.try_get(col)?)
        }
    };
}

impl Cols for PgRow {
    plain_cols!();

    fn uuid(&self, col: &str) -> Result<Uuid> {
        Ok(self.try_get(col)?)
    }
    fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>> {
        Ok(self.try_get(col)?)
    }
    fn time(&self, col: &str) -> Result<DateTime<Utc>> {
        Ok(self.try_get(col)?)
    }
    fn opt_time(&self, col: &str) -> Result<Option<DateTime<Utc>>> {
        Ok(self.try_get(col)?)
    }
}

impl Cols for SqliteRow {
    plain_cols!();

    fn uuid(&self, col: &str) -> Result<Uuid> {
        let s: String = self.try_get(col)?;
        parse_uuid(col, &s)
    }
    fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>> {
        self.try_get::<Option<String>, _>(col)?.map(|s| parse_uuid(col, &s)).transpose()
    }
    fn time(&self, col: &str) -> Result<DateTime<Utc>> {
        Ok(from_micros(self.try_get(col)?))
    }
    fn opt_time(&self, col: &str) -> Result<Option<DateTime<Utc>>> {
        Ok(self.try_get::<Option<i64>, _>(col)?.map(from_micros))
    }
}

pub(super) fn parse_uuid(col: &str, s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("{col} {s:?}: {e}")))
}

/// A SQLite time column's value: microseconds since the Unix epoch.
pub(super) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(super) fn from_micros(v: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(v).single().unwrap_or_default()
}

fn count(r: &impl Cols, col: &str) -> Result<u64> {
    Ok(r.bigint(col)?.max(0) as u64)
}

pub(super) fn state(s: &str) -> Result<TaskState> {
    s.parse().map_err(|e: crate::domain::UnknownState| StoreError::Corrupt(e.to_string()))
}

fn worker_state(s: &str) -> Result<WorkerState> {
    s.parse().map_err(|e: crate::domain::UnknownState| StoreError::Corrupt(e.to_string()))
}

pub(super) fn encode_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

fn decode_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("bad json {s:?}: {e}")))
}

/// A row of [`super::sql::TASK_COLUMNS`].
pub(super) fn task(r: &impl Cols) -> Result<Task> {
    Ok(Task {
        id: TaskId(r.uuid("id")?),
        task_type: r.text("task_type")?,
        payload: r.bytes("payload")?,
        state: state(&r.text("status")?)?,
        priority: r.int("priority")?,
        attempt: r.int("attempt")? as u32,
        max_attempts: r.int("max_attempts")? as u32,
        failures: r.int("failures")? as u32,
        timeout: Duration::from_millis(r.bigint("timeout_ms")?.max(0) as u64),
        worker_id: r.opt_text("worker_id")?.map(WorkerId),
        job_id: r.opt_uuid("job_id")?.map(JobId),
        idempotency_key: r.opt_text("idempotency_key")?,
        result: r.opt_bytes("result")?,
        error: r.opt_text("error")?,
        run_after: r.time("run_after")?,
        lease_expires_at: r.opt_time("lease_expires_at")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
        assigned_at: r.opt_time("assigned_at")?,
        started_at: r.opt_time("started_at")?,
        finished_at: r.opt_time("finished_at")?,
        traceparent: r.opt_text("traceparent")?,
        needs: needs(r)?,
    })
}

/// The `weight` column: slots the task takes (NULL: one).
fn weight(r: &impl Cols) -> Result<u32> {
    Ok(r.opt_int("weight")?.map_or(1, |w| w.max(1) as u32))
}

/// The `requires`, `weight` and `affinity_key` columns.
fn needs(r: &impl Cols) -> Result<Needs> {
    let requires = match r.opt_text("requires")? {
        Some(json) => decode_requires(&json)?,
        None => Vec::new(),
    };
    Ok(Needs { requires, weight: weight(r)?, affinity_key: r.opt_text("affinity_key")? })
}

/// Requirements as the `requires` column holds them (`None` when there are none): label
/// equalities as `key=value` strings and minimums as `[key, number]` pairs, the forms the
/// claim's SQL compares with a worker shape's (see [`super::Shapes`]).
pub(super) fn encode_requires(requires: &[Requirement]) -> Option<String> {
    if requires.is_empty() {
        return None;
    }
    let mut eq = Vec::new();
    let mut min = Vec::new();
    for r in requires {
        match r {
            Requirement::Equals { key, value } => eq.push(serde_json::json!(format!("{key}={value}"))),
            Requirement::AtLeast { key, min: n } => min.push(serde_json::json!([key, n])),
        }
    }
    Some(serde_json::json!({"eq": eq, "min": min}).to_string())
}

fn decode_requires(json: &str) -> Result<Vec<Requirement>> {
    #[derive(serde::Deserialize)]
    struct Stored {
        #[serde(default)]
        eq: Vec<String>,
        #[serde(default)]
        min: Vec<(String, f64)>,
    }
    let stored: Stored = decode_json(json)?;
    let mut out = Vec::with_capacity(stored.eq.len() + stored.min.len());
    for e in stored.eq {
        let (key, value) =
            e.split_once('=').ok_or_else(|| StoreError::Corrupt(format!("bad requirement {e:?}")))?;
        out.push(Requirement::Equals { key: key.into(), value: value.into() });
    }
    out.extend(stored.min.into_iter().map(|(key, min)| Requirement::AtLeast { key, min }));
    Ok(out)
}

/// The weights of the rows of [`super::sql::ADOPT`] that weigh more than one slot.
pub(super) fn weights<R: Cols>(rows: &[R]) -> Result<HashMap<TaskId, u32>> {
    let mut out = HashMap::new();
    for r in rows {
        let w = weight(r)?;
        if w > 1 {
            out.insert(TaskId(r.uuid("id")?), w);
        }
    }
    Ok(out)
}

/// A row of [`super::sql::TYPE_LIMITS`].
pub(super) fn type_limit(r: &impl Cols) -> Result<TypeLimit> {
    Ok(TypeLimit {
        task_type: r.text("task_type")?,
        max_in_flight: r.bigint("max_in_flight")?.max(0) as u32,
        source: r.text("source")?,
        in_flight: r.bigint("in_flight")?.max(0) as u32,
    })
}

/// A `schedules` row.
pub(super) fn schedule(r: &impl Cols) -> Result<Schedule> {
    let missed = r.text("missed")?;
    Ok(Schedule {
        id: ScheduleId(r.uuid("id")?),
        name: r.text("name")?,
        cron: r.text("cron")?,
        timezone: r.text("timezone")?,
        template: TaskTemplate {
            task_type: r.text("task_type")?,
            payload: r.bytes("payload")?,
            priority: r.int("priority")?,
            max_attempts: r.int("max_attempts")? as u32,
            timeout: Duration::from_millis(r.bigint("timeout_ms")?.max(0) as u64),
        },
        missed: MissedRuns::parse(&missed)
            .ok_or_else(|| StoreError::Corrupt(format!("schedule missed policy {missed:?}")))?,
        paused: r.flag("paused")?,
        next_run_at: r.opt_time("next_run_at")?,
        last_run_at: r.opt_time("last_run_at")?,
        runs: count(r, "runs")?,
        created_at: r.time("created_at")?,
    })
}

/// A `coordinators` row, its age as of `now` (the database's clock where it has one).
pub(super) fn replica(r: &impl Cols, now: DateTime<Utc>) -> Result<ReplicaRow> {
    let last_seen_at = r.time("last_seen_at")?;
    Ok(ReplicaRow {
        instance: r.opt_text("instance_id")?,
        last_seen_at,
        seen_ago: (now - last_seen_at).to_std().unwrap_or_default(),
    })
}

/// A `workers` row with its `in_flight` count.
pub(super) fn worker(r: &impl Cols) -> Result<WorkerRecord> {
    Ok(WorkerRecord {
        id: WorkerId(r.text("id")?),
        state: worker_state(&r.text("state")?)?,
        max_concurrent_tasks: r.int("max_concurrent_tasks")? as u32,
        prefetch: r.int("prefetch")? as u32,
        capabilities: decode_json(&r.text("capabilities")?)?,
        labels: decode_json(&r.text("labels")?)?,
        version: r.text("version")?,
        hostname: r.text("hostname")?,
        session_id: r.uuid("session_id")?,
        coordinator_id: r.text("coordinator_id")?,
        instance: r.opt_text("instance_id")?,
        connected: r.flag("connected")?,
        registered_at: r.time("registered_at")?,
        last_heartbeat_at: r.time("last_heartbeat_at")?,
        owner_seen_at: r.opt_time("owner_seen_at")?,
        in_flight: count(r, "in_flight")? as u32,
    })
}

/// A `task_attempts` row.
pub(super) fn attempt(r: &impl Cols) -> Result<AttemptRecord> {
    Ok(AttemptRecord {
        task_id: TaskId(r.uuid("task_id")?),
        attempt: r.int("attempt")? as u32,
        worker_id: WorkerId(r.text("worker_id")?),
        assigned_at: r.time("assigned_at")?,
        started_at: r.opt_time("started_at")?,
        finished_at: r.opt_time("finished_at")?,
        outcome: r.opt_text("outcome")?,
        error: r.opt_text("error")?,
    })
}

/// A parent of a task (`parent`, `status`): its id and, unless pruned, its state.
pub(super) fn parent(r: &impl Cols) -> Result<(TaskId, Option<TaskState>)> {
    Ok((TaskId(r.uuid("parent")?), r.opt_text("status")?.as_deref().map(state).transpose()?))
}

/// A task's `id, worker_id, attempt`: the fence.
pub(super) fn held(r: &impl Cols) -> Result<Held> {
    Ok(Held {
        task_id: TaskId(r.uuid("id")?),
        worker_id: WorkerId(r.text("worker_id")?),
        attempt: r.int("attempt")? as u32,
    })
}

/// A held task's fence with its `session_id, status, assigned_at`.
pub(super) fn held_row(r: &impl Cols) -> Result<HeldRow> {
    Ok(HeldRow {
        held: held(r)?,
        weight: weight(r)?,
        session: r.opt_uuid("session_id")?,
        state: state(&r.text("status")?)?,
        assigned_at: r.opt_time("assigned_at")?,
    })
}

/// A claim candidate: `id, task_type, priority`.
pub(super) fn candidate(r: &impl Cols) -> Result<Candidate> {
    Ok(Candidate {
        id: TaskId(r.uuid("id")?),
        task_type: r.text("task_type")?,
        priority: r.int("priority")?,
        needs: needs(r)?,
    })
}

/// A task just assigned: its fence, `task_type, payload, priority, job_id, timeout_ms, created_at`,
/// `traceparent` and `assigned_at`, from which the deadline runs.
pub(super) fn assignment(r: &impl Cols) -> Result<Assignment> {
    let held = held(r)?;
    let timeout_ms = r.bigint("timeout_ms")?;
    Ok(Assignment {
        task_id: held.task_id,
        task_type: r.text("task_type")?,
        payload: r.bytes("payload")?,
        attempt: held.attempt,
        weight: weight(r)?,
        worker_id: held.worker_id,
        priority: r.int("priority")?,
        job_id: r.opt_uuid("job_id")?.map(JobId),
        deadline: r.time("assigned_at")? + chrono::Duration::milliseconds(timeout_ms),
        created_at: r.time("created_at")?,
        traceparent: r.opt_text("traceparent")?,
        parents: Vec::new(),
    })
}

/// A parent's `id` and its `result` (NULL: not carried).
pub(super) fn parent_result(r: &impl Cols) -> Result<ParentResult> {
    Ok(ParentResult { task_id: TaskId(r.uuid("id")?), result: r.opt_bytes("result")? })
}

/// A `status, n` row of a count by state.
pub(super) fn state_count(r: &impl Cols) -> Result<(TaskState, u64)> {
    Ok((state(&r.text("status")?)?, count(r, "n")?))
}

/// A `task_type, n` row of a count by type.
pub(super) fn type_count(r: &impl Cols) -> Result<(String, u64)> {
    Ok((r.text("task_type")?, count(r, "n")?))
}

/// A row of [`super::sql::PENDING_BY_TYPE`].
pub(super) fn pending_type(r: &impl Cols) -> Result<(String, PendingType)> {
    Ok((r.text("task_type")?, PendingType { count: count(r, "n")?, runnable_since: r.time("since")? }))
}

/// A row of a failures summary's top errors: `task_type, error, n, sample, last_at`.
pub(super) fn failure_group(r: &impl Cols) -> Result<FailureGroup> {
    Ok(FailureGroup {
        task_type: r.text("task_type")?,
        error: r.text("error")?,
        count: count(r, "n")?,
        sample: TaskId(parse_uuid("sample", &r.text("sample")?)?),
        last_failed_at: r.time("last_at")?,
    })
}

/// An `outcome, n` row of attempts counted by outcome.
pub(super) fn outcome_count(r: &impl Cols) -> Result<(String, u64)> {
    Ok((r.text("outcome")?, count(r, "n")?))
}

/// A failures summary from its three reads: failed tasks by type, the top (type, error)
/// groups, attempts by outcome.
pub(super) fn failure_summary(
    by_type: &[impl Cols],
    top_errors: &[impl Cols],
    outcomes: &[impl Cols],
) -> Result<FailureSummary> {
    let failed_by_type: BTreeMap<String, u64> = by_type.iter().map(type_count).collect::<Result<_>>()?;
    Ok(FailureSummary {
        failed: failed_by_type.values().sum(),
        failed_by_type,
        top_errors: top_errors.iter().map(failure_group).collect::<Result<_>>()?,
        attempt_outcomes: outcomes.iter().map(outcome_count).collect::<Result<_>>()?,
    })
}

/// The row of [`super::sql::AUDIT`].
pub(super) fn audit(r: &impl Cols) -> Result<Audit> {
    Ok(Audit {
        tasks: count(r, "tasks")?,
        completed: count(r, "completed")?,
        accepted_twice: count(r, "twice")?,
    })
}

/// The row of [`super::sql::JOB`], with the job's counts by state.
pub(super) fn job(r: &impl Cols, id: JobId, counts: BTreeMap<TaskState, u32>) -> Result<Job> {
    Ok(Job {
        id,
        name: r.text("name")?,
        total: r.int("total")? as u32,
        counts,
        created_at: r.time("created_at")?,
    })
}

/// A page of jobs from rows of `id, name, total, created_at, status, n` (a job's rows side by
/// side, `status` NULL for a job with no tasks), in the order of the rows.
pub(super) fn jobs(rows: &[impl Cols]) -> Result<Vec<Job>> {
    let mut jobs: Vec<Job> = Vec::new();
    for r in rows {
        let id = JobId(r.uuid("id")?);
        if jobs.last().is_none_or(|j| j.id != id) {
            jobs.push(job(r, id, BTreeMap::new())?);
        }
        if let Some(status) = r.opt_text("status")? {
            let n = count(r, "n")? as u32;
            jobs.last_mut().expect("pushed above").counts.insert(state(&status)?, n);
        }
    }
    Ok(jobs)
}

/// A held task's `failures, max_attempts`, for [`super::policy`].
pub(super) fn charges(r: &impl Cols) -> Result<Charges> {
    Ok(Charges { failures: r.int("failures")? as u32, max_attempts: r.int("max_attempts")? as u32 })
}
