//! Jobs as a whole: a page of jobs with their counts, and cancelling every live task of one.

use std::time::Duration;

use super::{PgStore, retry_conflicts};
use crate::{
    domain::{Job, JobId, TaskId, TaskState},
    store::{
        Cancelled, Held, Result, StoreError,
        decode::{self, Cols},
        sql::{self, TASK_COLUMNS},
    },
};

/// The members of the jobs that satisfy `$cond` (on `m.job_id`), each with its task's row read
/// once, by key (`OFFSET 0`: never joined against a scan of every task): the job's list of
/// members (`job_members`), then each task by its id. A member whose task was pruned is left out.
macro_rules! member_tasks {
    ($columns:literal, $cond:literal) => {
        concat!(
            "SELECT ",
            $columns,
            " FROM job_members m, LATERAL (SELECT * FROM tasks t WHERE t.id = m.task_id OFFSET 0) AS t
             WHERE m.job_id ",
            $cond
        )
    };
}

/// A job's tasks, in submission order.
pub(super) const JOB_TASKS: &str = concat!(
    "SELECT ",
    sql::task_columns!(),
    " FROM (",
    member_tasks!("t.*, m.position AS member_position", "= $1"),
    ") AS members ORDER BY member_position"
);

/// A job's tasks counted by state.
pub(super) const JOB_COUNTS: &str =
    concat!(member_tasks!("t.status, count(*) AS n", "= $1"), " GROUP BY t.status");

/// A page of jobs, newest first, with their tasks counted by state (a job without tasks has one
/// row with a NULL state).
pub(super) const LIST_JOBS: &str = concat!(
    "WITH page AS (
         SELECT id, name, total, created_at FROM jobs
         WHERE ($1::uuid IS NULL OR id < $1) ORDER BY id DESC LIMIT $2
     ),
     members AS (",
    member_tasks!("m.job_id, t.status", "IN (SELECT id FROM page)"),
    ")
     SELECT p.id, p.name, p.total, p.created_at, m.status, count(m.status) AS n
     FROM page p LEFT JOIN members m ON m.job_id = p.id
     GROUP BY p.id, p.name, p.total, p.created_at, m.status
     ORDER BY p.id DESC"
);

impl PgStore {
    pub(in crate::store) async fn list_jobs(&self, before: Option<JobId>, limit: u32) -> Result<Vec<Job>> {
        let rows = sqlx::query(LIST_JOBS)
            .bind(before.map(|j| j.0))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        decode::jobs(&rows)
    }

    pub(in crate::store) async fn cancel_job(
        &self,
        id: JobId,
        reason: &str,
    ) -> Result<Option<Vec<Cancelled>>> {
        retry_conflicts!(self.cancel_job_once(id, reason).await)
    }

    async fn cancel_job_once(&self, id: JobId, reason: &str) -> Result<Option<Vec<Cancelled>>> {
        let mut tx = self.pool.begin().await?;
        if sqlx::query("SELECT 1 FROM jobs WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Ok(None);
        }
        // The job's live tasks locked in id order first, as completions lock tasks: locked in the
        // order the update below meets them, a cancel and a batch of completions of the job's
        // tasks could each hold a row the other waits for until the deadlock check aborts one.
        sqlx::query(
            "SELECT 1 FROM tasks
             WHERE id = ANY(ARRAY(SELECT task_id FROM job_members WHERE job_id = $1))
               AND status IN ('blocked', 'pending', 'assigned', 'running')
             ORDER BY id::text COLLATE \"C\" FOR NO KEY UPDATE",
        )
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
        // The same conditional update as a task's cancel, over the job's members.
        let sql = format!(
            "WITH c AS (
                 UPDATE tasks SET status = 'cancelled', error = $2, finished_at = now(), updated_at = now(),
                     lease_expires_at = NULL
                 WHERE id IN (SELECT task_id FROM job_members WHERE job_id = $1)
                   AND status IN ('blocked', 'pending', 'assigned', 'running')
                 RETURNING {TASK_COLUMNS}
             )
             SELECT * FROM c ORDER BY id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.0).bind(reason).fetch_all(&mut *tx).await?;
        let held: Vec<uuid::Uuid> = rows
            .iter()
            .filter_map(|r| decode::task(r).ok().filter(|t| t.worker_id.is_some()).map(|t| t.id.0))
            .collect();
        if !held.is_empty() {
            sqlx::query(super::CLOSE_CANCELLED_ATTEMPTS).bind(&held).bind(reason).execute(&mut *tx).await?;
        }
        // Dependents outside the job end with its tasks (those inside were cancelled above).
        let roots: Vec<_> = rows
            .iter()
            .map(|r| r.uuid("id").map(|id| (TaskId(id), TaskState::Cancelled, Some(reason.to_owned()))))
            .collect::<Result<_>>()?;
        let ended = super::dependents::end_dependents(&mut tx, &roots).await?;
        tx.commit().await?;
        self.settled.send(crate::store::Settled { released: Vec::new(), ended });
        rows.iter()
            .map(|r| {
                let task = decode::task(r)?;
                // Pending tasks have no worker; a held one is told to stop.
                let held_by = task.worker_id.clone().map(|worker_id| Held {
                    task_id: task.id,
                    worker_id,
                    attempt: task.attempt,
                });
                Ok(Cancelled { task, applied: true, held_by })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub(in crate::store) async fn job_task_ids(&self, id: JobId) -> Result<Vec<TaskId>> {
        let rows = sqlx::query(sql::JOB_TASK_IDS).bind(id.0).fetch_all(&self.pool).await?;
        rows.iter().map(|r| r.uuid("task_id").map(TaskId)).collect()
    }
}
