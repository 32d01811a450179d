//! Reads: tasks, attempts, counts, workers, jobs and ownership. The statements shared with SQLite
//! come from [`sql`]; the ones here use Postgres arrays or its clock.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use super::PgStore;
use crate::{
    domain::{AttemptRecord, Job, JobId, Task, TaskId, TaskState, WorkerId, WorkerRecord, WorkerStats},
    store::{
        Audit, Held, Ownership, PendingType, Result, TaskFilter,
        decode::{self, Cols},
        duration_ms,
        sql::{self, TASK_COLUMNS},
    },
};

/// Workers in a live state whose replica, or failing that their own heartbeat, was seen within
/// `$1` ms (a replica writes its workers' state changes; their heartbeats about once a minute).
const LIVE_WORKERS: &str = sql::worker_select!(
    "WHERE w.state IN ('active', 'suspect')
       AND (c.last_seen_at > now() - $1::bigint * interval '1 millisecond'
            OR w.last_heartbeat_at > now() - $1::bigint * interval '1 millisecond')
     ORDER BY w.id"
);

impl PgStore {
    pub(in crate::store) async fn get_task(&self, id: TaskId) -> Result<Option<Task>> {
        let row = sqlx::query(sql::TASK).bind(id.0).fetch_optional(&self.pool).await?;
        row.map(|r| decode::task(&r)).transpose()
    }

    pub(in crate::store) async fn list_tasks(&self, f: &TaskFilter) -> Result<Vec<Task>> {
        let sql = list_tasks_query(f.state, f.job_id.is_some());
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(f.task_type.as_deref())
            .bind(f.job_id.map(|j| j.0))
            .bind(f.worker_id.as_ref().map(|w| w.0.as_str()))
            .bind(f.after.map(|t| t.0))
            .bind(i64::from(f.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode::task).collect()
    }

    pub(in crate::store) async fn held_by(&self, worker: &WorkerId) -> Result<Vec<Held>> {
        let rows = sqlx::query(sql::HELD_BY).bind(&worker.0).fetch_all(&self.pool).await?;
        rows.iter().map(decode::held).collect()
    }

    pub(in crate::store) async fn ownership(&self, workers: &[WorkerId]) -> Result<Ownership> {
        let ids: Vec<&str> = workers.iter().map(|w| w.0.as_str()).collect();
        let sessions = sqlx::query("SELECT id, session_id FROM workers WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((WorkerId(r.text("id")?), r.uuid("session_id")?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let held = sqlx::query(
            "SELECT id, attempt, worker_id, session_id, status, assigned_at, weight FROM tasks
             WHERE worker_id = ANY($1) AND status IN ('assigned', 'running')",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(decode::held_row)
        .collect::<Result<Vec<_>>>()?;
        Ok(Ownership { sessions, held })
    }

    pub(in crate::store) async fn attempts(&self, id: TaskId) -> Result<Vec<AttemptRecord>> {
        let rows = sqlx::query(sql::ATTEMPTS).bind(id.0).fetch_all(&self.pool).await?;
        rows.iter().map(decode::attempt).collect()
    }

    pub(in crate::store) async fn parents(&self, id: TaskId) -> Result<Vec<(TaskId, Option<TaskState>)>> {
        let rows = sqlx::query(sql::PARENTS).bind(id.0).fetch_all(&self.pool).await?;
        rows.iter().map(decode::parent).collect()
    }

    pub(in crate::store) async fn live_task_counts(&self) -> Result<BTreeMap<TaskState, u64>> {
        let rows = sqlx::query(LIVE_TASK_COUNTS).fetch_all(&self.pool).await?;
        rows.iter().map(decode::state_count).collect()
    }

    pub(in crate::store) async fn finished_task_counts(&self) -> Result<BTreeMap<TaskState, u64>> {
        let rows = sqlx::query(sql::FINISHED_TASK_COUNTS).fetch_all(&self.pool).await?;
        rows.iter().map(decode::state_count).collect()
    }

    pub(in crate::store) async fn audit(&self) -> Result<Audit> {
        decode::audit(&sqlx::query(sql::AUDIT).fetch_one(&self.pool).await?)
    }

    pub(in crate::store) async fn pending_by_type(&self) -> Result<BTreeMap<String, PendingType>> {
        let rows = sqlx::query(sql::PENDING_BY_TYPE).fetch_all(&self.pool).await?;
        rows.iter().map(decode::pending_type).collect()
    }

    pub(in crate::store) async fn get_worker(&self, id: &WorkerId) -> Result<Option<WorkerRecord>> {
        let row = sqlx::query(sql::WORKER).bind(&id.0).fetch_optional(&self.pool).await?;
        row.map(|r| decode::worker(&r)).transpose()
    }

    pub(in crate::store) async fn list_workers(
        &self,
        after: Option<&WorkerId>,
        limit: u32,
    ) -> Result<Vec<WorkerRecord>> {
        let after = after.map(|w| w.0.as_str()).unwrap_or("");
        let rows = sqlx::query(sql::WORKERS).bind(after).bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter().map(decode::worker).collect()
    }

    pub(in crate::store) async fn live_workers(&self, silence: Duration) -> Result<Vec<WorkerRecord>> {
        let rows = sqlx::query(LIVE_WORKERS).bind(duration_ms(silence)).fetch_all(&self.pool).await?;
        rows.iter().map(decode::worker).collect()
    }

    pub(in crate::store) async fn worker_stats(&self, id: &WorkerId) -> Result<Option<WorkerStats>> {
        let Some(worker) = self.get_worker(id).await? else {
            return Ok(None);
        };
        let r = sqlx::query(
            "WITH done AS (
                 SELECT 'completed' AS outcome, finished_at, started_at, assigned_at FROM tasks
                 WHERE worker_id = $1 AND status = 'completed'
                 UNION ALL
                 SELECT outcome, finished_at, started_at, assigned_at FROM task_attempts
                 WHERE worker_id = $1 AND outcome = 'failed'
             )
             SELECT count(*) FILTER (WHERE outcome = 'completed') AS completed,
                    count(*) FILTER (WHERE outcome = 'failed') AS failed,
                    COALESCE(sum(extract(epoch FROM finished_at - COALESCE(started_at, assigned_at)) * 1000), 0)::bigint
                        AS total_ms
             FROM done",
        )
        .bind(&id.0)
        .fetch_one(&self.pool)
        .await?;
        Ok(Some(WorkerStats {
            tasks_completed: r.bigint("completed")?.max(0) as u64,
            tasks_failed: r.bigint("failed")?.max(0) as u64,
            total_duration: Duration::from_millis(r.bigint("total_ms")?.max(0) as u64),
            in_flight: worker.in_flight,
        }))
    }

    pub(in crate::store) async fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        let Some(row) = sqlx::query(sql::JOB).bind(id.0).fetch_optional(&self.pool).await? else {
            return Ok(None);
        };
        let rows = sqlx::query(super::jobs::JOB_COUNTS).bind(id.0).fetch_all(&self.pool).await?;
        let counts =
            rows.iter().map(|r| decode::state_count(r).map(|(s, n)| (s, n as u32))).collect::<Result<_>>()?;
        decode::job(&row, id, counts).map(Some)
    }

    pub(in crate::store) async fn job_tasks(&self, id: JobId) -> Result<Vec<Task>> {
        let rows = sqlx::query(super::jobs::JOB_TASKS).bind(id.0).fetch_all(&self.pool).await?;
        rows.iter().map(decode::task).collect()
    }
}

/// Tasks by filter, in id order from `$4`: `$1` type, `$2` job, `$3` worker, `$5` the most. The
/// state is part of the statement's text, so that even a generic plan uses the index of that
/// state; the other absent filters are passed as NULL. With a job (`by_job`) the tasks are
/// read from the job's members, then ordered: walking every task in id order to find them
/// reads all the tasks older than the job's before its first page.
pub(super) fn list_tasks_query(state: Option<TaskState>, by_job: bool) -> String {
    // Each member once (a submission may name a task twice, by the same idempotency key), each
    // found by its id (`OFFSET 0`: never joined against a scan of every task).
    let members = "(SELECT t.* FROM (SELECT DISTINCT task_id FROM job_members WHERE job_id = $2) AS m,
         LATERAL (SELECT * FROM tasks t WHERE t.id = m.task_id OFFSET 0) AS t) AS members";
    let from = match (state, by_job) {
        (None, true) => members.to_owned(),
        (Some(s), true) => format!("{members} WHERE status = '{}'", s.as_str()),
        (None, false) => "tasks".to_owned(),
        // Tasks out on workers are found by tasks_worker: all of them (as many as the fleet has
        // slots), then ordered, rather than walking every task in id order.
        (Some(s @ (TaskState::Assigned | TaskState::Running)), false) => format!(
            "(SELECT * FROM tasks WHERE status IN ('assigned', 'running') OFFSET 0) AS live
             WHERE status = '{}'",
            s.as_str()
        ),
        (Some(s), false) => format!("tasks WHERE status = '{}'", s.as_str()),
    };
    let filter = if state.is_some() { "AND" } else { "WHERE" };
    // Without a job `$2` is NULL; with one, the members above are the job's.
    let job = if by_job { "$2::uuid IS NOT NULL" } else { "$2::uuid IS NULL" };
    format!(
        "SELECT {TASK_COLUMNS} FROM {from}
         {filter} ($1::text IS NULL OR task_type = $1)
           AND {job}
           AND ($3::text IS NULL OR worker_id = $3)
           AND id > COALESCE($4::uuid, '00000000-0000-0000-0000-000000000000')
         ORDER BY id LIMIT $5"
    )
}

/// Tasks in the live states counted by state, each half through the partial index that holds
/// exactly it (`tasks_status`: blocked and pending; `tasks_worker`: out on workers), never the
/// finished history beside them.
pub(in crate::store) const LIVE_TASK_COUNTS: &str = "SELECT status, count(*) AS n FROM tasks
     WHERE status IN ('blocked', 'pending') GROUP BY status
     UNION ALL
     SELECT status, count(*) AS n FROM tasks
     WHERE status IN ('assigned', 'running') GROUP BY status";
