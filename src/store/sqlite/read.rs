//! Reads, on the reader pool: tasks, attempts, counts, workers, jobs and ownership. The
//! statements shared with Postgres come from [`sql`]; the ones here use SQLite's JSON functions
//! or its representation of ids and times.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use chrono::Utc;

use super::SqliteStore;
use crate::{
    domain::{AttemptRecord, Job, JobId, Task, TaskId, TaskState, WorkerId, WorkerRecord, WorkerStats},
    store::{
        Audit, Held, Ownership, PendingType, Result, TaskFilter,
        decode::{self, Cols, encode_json, micros},
        duration_ms,
        sql::{self, TASK_COLUMNS},
    },
};

/// Workers in a live state whose replica, or failing that their own heartbeat, was seen after
/// `$1` (a replica writes its workers' state changes; their heartbeats about once a minute).
const LIVE_WORKERS: &str = sql::worker_select!(
    "WHERE w.state IN ('active', 'suspect') AND (c.last_seen_at > $1 OR w.last_heartbeat_at > $1) ORDER BY w.id"
);

impl SqliteStore {
    pub(in crate::store) async fn get_task(&self, id: TaskId) -> Result<Option<Task>> {
        let row = sqlx::query(sql::TASK).bind(id.to_string()).fetch_optional(&self.reader).await?;
        row.map(|r| decode::task(&r)).transpose()
    }

    pub(in crate::store) async fn list_tasks(&self, f: &TaskFilter) -> Result<Vec<Task>> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks
             WHERE ($1 IS NULL OR status = $1)
               AND ($2 IS NULL OR task_type = $2)
               AND ($3 IS NULL OR id IN (SELECT task_id FROM job_members WHERE job_id = $3))
               AND ($4 IS NULL OR worker_id = $4)
               AND ($5 IS NULL OR id > $5)
             ORDER BY id LIMIT $6"
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
        rows.iter().map(decode::task).collect()
    }

    pub(in crate::store) async fn held_by(&self, worker: &WorkerId) -> Result<Vec<Held>> {
        let rows = sqlx::query(sql::HELD_BY).bind(&worker.0).fetch_all(&self.reader).await?;
        rows.iter().map(decode::held).collect()
    }

    pub(in crate::store) async fn ownership(&self, workers: &[WorkerId]) -> Result<Ownership> {
        let ids = encode_json(&workers.iter().map(|w| w.0.as_str()).collect::<Vec<_>>());
        let sessions =
            sqlx::query("SELECT id, session_id FROM workers WHERE id IN (SELECT value FROM json_each($1))")
                .bind(&ids)
                .fetch_all(&self.reader)
                .await?
                .iter()
                .map(|r| Ok((WorkerId(r.text("id")?), r.uuid("session_id")?)))
                .collect::<Result<HashMap<_, _>>>()?;
        let held = sqlx::query(
            "SELECT id, attempt, worker_id, session_id, status, assigned_at, weight FROM tasks
             WHERE worker_id IN (SELECT value FROM json_each($1)) AND status IN ('assigned', 'running')",
        )
        .bind(&ids)
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(decode::held_row)
        .collect::<Result<Vec<_>>>()?;
        Ok(Ownership { sessions, held })
    }

    pub(in crate::store) async fn attempts(&self, id: TaskId) -> Result<Vec<AttemptRecord>> {
        let rows = sqlx::query(sql::ATTEMPTS).bind(id.to_string()).fetch_all(&self.reader).await?;
        rows.iter().map(decode::attempt).collect()
    }

    pub(in crate::store) async fn parents(&self, id: TaskId) -> Result<Vec<(TaskId, Option<TaskState>)>> {
        let rows = sqlx::query(sql::PARENTS).bind(id.to_string()).fetch_all(&self.reader).await?;
        rows.iter().map(decode::parent).collect()
    }

    pub(in crate::store) async fn live_task_counts(&self) -> Result<BTreeMap<TaskState, u64>> {
        let rows = sqlx::query(LIVE_TASK_COUNTS).fetch_all(&self.reader).await?;
        rows.iter().map(decode::state_count).collect()
    }

    pub(in crate::store) async fn finished_task_counts(&self) -> Result<BTreeMap<TaskState, u64>> {
        let rows = sqlx::query(sql::FINISHED_TASK_COUNTS).fetch_all(&self.reader).await?;
        rows.iter().map(decode::state_count).collect()
    }

    pub(in crate::store) async fn audit(&self) -> Result<Audit> {
        decode::audit(&sqlx::query(sql::AUDIT).fetch_one(&self.reader).await?)
    }

    pub(in crate::store) async fn pending_by_type(&self) -> Result<BTreeMap<String, PendingType>> {
        let rows = sqlx::query(sql::PENDING_BY_TYPE).fetch_all(&self.reader).await?;
        rows.iter().map(decode::pending_type).collect()
    }

    pub(in crate::store) async fn get_worker(&self, id: &WorkerId) -> Result<Option<WorkerRecord>> {
        let row = sqlx::query(sql::WORKER).bind(&id.0).fetch_optional(&self.reader).await?;
        row.map(|r| decode::worker(&r)).transpose()
    }

    pub(in crate::store) async fn list_workers(
        &self,
        after: Option<&WorkerId>,
        limit: u32,
    ) -> Result<Vec<WorkerRecord>> {
        let after = after.map(|w| w.0.as_str()).unwrap_or("");
        let rows =
            sqlx::query(sql::WORKERS).bind(after).bind(i64::from(limit)).fetch_all(&self.reader).await?;
        rows.iter().map(decode::worker).collect()
    }

    pub(in crate::store) async fn live_workers(&self, silence: Duration) -> Result<Vec<WorkerRecord>> {
        let since = Utc::now() - chrono::Duration::milliseconds(duration_ms(silence));
        let rows = sqlx::query(LIVE_WORKERS).bind(micros(since)).fetch_all(&self.reader).await?;
        rows.iter().map(decode::worker).collect()
    }

    pub(in crate::store) async fn worker_stats(&self, id: &WorkerId) -> Result<Option<WorkerStats>> {
        let Some(worker) = self.get_worker(id).await? else {
            return Ok(None);
        };
        let r = sqlx::query(
            "SELECT COALESCE(sum(outcome = 'completed'), 0) AS completed,
                    COALESCE(sum(outcome = 'failed'), 0) AS failed,
                    COALESCE(sum(finished_at - COALESCE(started_at, assigned_at)), 0) AS total_us
             FROM (
                 SELECT 'completed' AS outcome, finished_at, started_at, assigned_at FROM tasks
                 WHERE worker_id = $1 AND status = 'completed'
                 UNION ALL
                 SELECT outcome, finished_at, started_at, assigned_at FROM task_attempts
                 WHERE worker_id = $1 AND outcome = 'failed'
             )",
        )
        .bind(&id.0)
        .fetch_one(&self.reader)
        .await?;
        Ok(Some(WorkerStats {
            tasks_completed: r.bigint("completed")?.max(0) as u64,
            tasks_failed: r.bigint("failed")?.max(0) as u64,
            total_duration: Duration::from_micros(r.bigint("total_us")?.max(0) as u64),
            in_flight: worker.in_flight,
        }))
    }

    pub(in crate::store) async fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        let Some(row) = sqlx::query(sql::JOB).bind(id.to_string()).fetch_optional(&self.reader).await? else {
            return Ok(None);
        };
        let rows = sqlx::query(super::jobs::JOB_COUNTS).bind(id.to_string()).fetch_all(&self.reader).await?;
        let counts =
            rows.iter().map(|r| decode::state_count(r).map(|(s, n)| (s, n as u32))).collect::<Result<_>>()?;
        decode::job(&row, id, counts).map(Some)
    }

    pub(in crate::store) async fn job_tasks(&self, id: JobId) -> Result<Vec<Task>> {
        let rows = sqlx::query(super::jobs::JOB_TASKS).bind(id.to_string()).fetch_all(&self.reader).await?;
        rows.iter().map(decode::task).collect()
    }
}

/// Tasks in the live states counted by state, through `tasks_status` (which holds exactly
/// them), never the finished history beside them.
pub(in crate::store) const LIVE_TASK_COUNTS: &str = "SELECT status, count(*) AS n FROM tasks
     WHERE status IN ('blocked', 'pending', 'assigned', 'running') GROUP BY status";
