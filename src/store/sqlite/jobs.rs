//! Jobs as a whole: a page of jobs with their counts, and cancelling every live task of one.

use chrono::Utc;

use super::{SqliteStore, report::close_attempt};
use crate::{
    domain::{Job, JobId, TaskId, TaskState},
    store::{
        Cancelled, Held, Result,
        decode::{self, Cols, micros},
        sql::{self, TASK_COLUMNS},
    },
};

/// The rows of job `$1`'s tasks, each read once, with the member's position in the submission:
/// the tasks it created (their own row says so) and those it shares with another submission
/// (a row of `job_tasks` each). The `job_members` view lists the same members, but a task read
/// through it is read twice (the view, then the task by its id).
macro_rules! job_member_tasks {
    () => {
        "SELECT t.*, t.job_position AS member_position FROM tasks t
         WHERE t.job_id = $1 AND t.job_position IS NOT NULL
         UNION ALL
         SELECT t.*, m.position AS member_position FROM job_tasks m JOIN tasks t ON t.id = m.task_id
         WHERE m.job_id = $1"
    };
}

/// A job's tasks, in submission order.
pub(super) const JOB_TASKS: &str = concat!(
    "SELECT ",
    sql::task_columns!(),
    " FROM (",
    job_member_tasks!(),
    ") AS members ORDER BY member_position"
);

/// A job's tasks counted by state.
pub(super) const JOB_COUNTS: &str =
    concat!("SELECT status, count(*) AS n FROM (", job_member_tasks!(), ") AS members GROUP BY status");

/// After a `WITH page AS (...)` of jobs (id, name, total, created_at): those jobs with their tasks
/// counted by state, each task read once (as [`JOB_COUNTS`]); a job without tasks has one row
/// with a NULL state.
macro_rules! page_counts {
    () => {
        ", members AS (
             SELECT t.job_id, t.status FROM tasks t
             WHERE t.job_id IN (SELECT id FROM page) AND t.job_position IS NOT NULL
             UNION ALL
             SELECT m.job_id, t.status FROM job_tasks m JOIN tasks t ON t.id = m.task_id
             WHERE m.job_id IN (SELECT id FROM page)
         )
         SELECT p.id, p.name, p.total, p.created_at, m.status, count(m.status) AS n
         FROM page p LEFT JOIN members m ON m.job_id = p.id
         GROUP BY p.id, p.name, p.total, p.created_at, m.status
         ORDER BY p.id DESC"
    };
}

impl SqliteStore {
    pub(in crate::store) async fn list_jobs(&self, before: Option<JobId>, limit: u32) -> Result<Vec<Job>> {
        let rows = sqlx::query(concat!(
            "WITH page AS (
                 SELECT id, name, total, created_at FROM jobs
                 WHERE ($1 IS NULL OR id < $1) ORDER BY id DESC LIMIT $2
             )",
            page_counts!()
        ))
        .bind(before.map(|j| j.to_string()))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        decode::jobs(&rows)
    }

    pub(in crate::store) async fn cancel_job(
        &self,
        id: JobId,
        reason: &str,
    ) -> Result<Option<Vec<Cancelled>>> {
        let now = micros(Utc::now());
        let mut tx = self.writer.begin().await?;
        let known = sqlx::query("SELECT 1 FROM jobs WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if known.is_none() {
            return Ok(None);
        }
        // The same conditional update as a task's cancel, over the job's members.
        let sql = format!(
            "UPDATE tasks SET status = 'cancelled', error = $2, finished_at = $3, updated_at = $3,
                 lease_expires_at = NULL
             WHERE id IN (SELECT task_id FROM job_members WHERE job_id = $1)
               AND status IN ('blocked', 'pending', 'assigned', 'running')
             RETURNING {TASK_COLUMNS}"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.to_string())
            .bind(reason)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let task = decode::task(r)?;
            // Pending tasks have no worker; a held one is told to stop.
            let held_by = task.worker_id.clone().map(|worker_id| Held {
                task_id: task.id,
                worker_id,
                attempt: task.attempt,
            });
            if let Some(h) = &held_by {
                close_attempt(&mut tx, h, now, now, "cancelled", Some(reason)).await?;
            }
            out.push(Cancelled { task, applied: true, held_by });
        }
        // Dependents outside the job end with its tasks (those inside were cancelled above).
        let roots: Vec<_> =
            out.iter().map(|c| (c.task.id, TaskState::Cancelled, Some(reason.to_owned()))).collect();
        let ended = super::dependents::end_dependents(&mut tx, &roots, now).await?;
        tx.commit().await?;
        self.settled.send(crate::store::Settled { released: Vec::new(), ended });
        out.sort_by_key(|c| c.task.id);
        Ok(Some(out))
    }

    pub(in crate::store) async fn job_task_ids(&self, id: JobId) -> Result<Vec<TaskId>> {
        let rows = sqlx::query(sql::JOB_TASK_IDS).bind(id.to_string()).fetch_all(&self.reader).await?;
        rows.iter().map(|r| r.uuid("task_id").map(TaskId)).collect()
    }
}
