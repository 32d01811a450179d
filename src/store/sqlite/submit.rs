//! Submission: new tasks (batched, idempotency keys honoured) and jobs.

use std::collections::BTreeMap;

use chrono::Utc;

use super::{SqliteStore, Tx, dependents};
use crate::{
    domain::{Job, JobId, NewTask},
    store::{
        Created, Result, Settled, StoreError,
        decode::{self, from_micros, micros},
        duration_ms,
        sql::{self, TASK_COLUMNS},
    },
};

impl SqliteStore {
    /// Creates `tasks` pending: on SQLite the scheduler's claim places them (see
    /// [`crate::store::Store::assigns_at_submission`]).
    pub(in crate::store) async fn create_tasks_placed(
        &self,
        tasks: &[NewTask],
        _placement: &crate::store::Placement,
        _lease: std::time::Duration,
    ) -> Result<(Vec<Created>, Vec<crate::domain::Assignment>)> {
        Ok((self.create_tasks(tasks).await?, Vec::new()))
    }

    pub(in crate::store) async fn job_by_key(&self, key: &str) -> Result<Option<JobId>> {
        job_by_key(&self.reader, key).await
    }

    pub(in crate::store) async fn create_tasks(&self, tasks: &[NewTask]) -> Result<Vec<Created>> {
        let mut tx = self.writer.begin().await?;
        let (out, settled) = insert_tasks(&mut tx, tasks).await?;
        tx.commit().await?;
        self.settled.send(settled);
        Ok(out)
    }

    /// Creates the job and its tasks unassigned (pending, or blocked on parents), as
    /// [`Self::create_tasks_placed`] does.
    pub(in crate::store) async fn create_job(
        &self,
        job_id: JobId,
        name: &str,
        key: Option<&str>,
        tasks: &[NewTask],
        _placement: &crate::store::Placement,
        _lease: std::time::Duration,
    ) -> Result<(Job, Vec<Created>, Vec<crate::domain::Assignment>)> {
        let now = Utc::now();
        let mut tx = self.writer.begin().await?;
        // One writer: nothing commits between this check and the insert.
        if let Some(key) = key
            && let Some(id) = job_by_key(&mut *tx, key).await?
        {
            return Err(StoreError::JobExists(id));
        }
        sqlx::query(
            "INSERT INTO jobs (id, name, total, created_at, idempotency_key) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(job_id.to_string())
        .bind(name)
        .bind(tasks.len() as i64)
        .bind(micros(now))
        .bind(key)
        .execute(&mut *tx)
        .await?;
        let (created, settled) = insert_tasks(&mut tx, tasks).await?;
        // A task this submission created is a member by its own row (job_id, job_position); a
        // row of its own only for a task an idempotency key returned.
        for (position, c) in created.iter().enumerate().filter(|(_, c)| !c.created) {
            sqlx::query("INSERT INTO job_tasks (job_id, position, task_id) VALUES ($1, $2, $3)")
                .bind(job_id.to_string())
                .bind(position as i64)
                .bind(c.task.id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.settled.send(settled);
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
            Vec::new(),
        ))
    }
}

/// The job an idempotency key made.
pub(super) async fn job_by_key(
    conn: impl sqlx::Executor<'_, Database = sqlx::Sqlite>,
    key: &str,
) -> Result<Option<JobId>> {
    let id: Option<String> = sqlx::query_scalar("SELECT id FROM jobs WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(conn)
        .await?;
    id.map(|id| id.parse().map_err(|_| StoreError::Corrupt(format!("job id {id:?}")))).transpose()
}

/// Inserts `tasks` (a task naming parents starts blocked on all of them, then
/// [`dependents::link`] counts off those already completed); what each submission got, and the
/// dependents that settled at once.
pub(super) async fn insert_tasks(tx: &mut Tx<'_>, tasks: &[NewTask]) -> Result<(Vec<Created>, Settled)> {
    let now = micros(Utc::now());
    let sql = format!(
        "INSERT INTO tasks (id, task_type, payload, priority, max_attempts, timeout_ms, idempotency_key, job_id,
                            run_after, created_at, updated_at, traceparent, status, parents, blocked_on,
                            on_parent_failure, requires, weight, affinity_key, job_position)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, COALESCE($10, $9), $9, $9, $11,
                 CASE WHEN $12 IS NULL THEN 'pending' ELSE 'blocked' END, $12, $12, $13, $14, $15, $16, $17)
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING {TASK_COLUMNS}"
    );
    let mut out = Vec::with_capacity(tasks.len());
    // Only a job's submission names a job: its tasks, in order.
    for (position, t) in tasks.iter().enumerate() {
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
            .bind(t.run_after.map(micros))
            .bind(t.traceparent.as_deref())
            .bind((!t.depends_on.is_empty()).then_some(t.depends_on.len() as i64))
            .bind((!t.depends_on.is_empty()).then_some(t.on_parent_failure.as_str()))
            .bind(decode::encode_requires(&t.needs.requires))
            .bind((t.needs.weight > 1).then_some(i64::from(t.needs.weight)))
            .bind(t.needs.affinity_key.as_deref())
            .bind(t.job_id.map(|_| position as i64))
            .fetch_optional(&mut **tx)
            .await?;
        if let Some(row) = row {
            out.push(Created { task: decode::task(&row)?, created: true });
            continue;
        }
        let row = sqlx::query(sql::TASK_BY_KEY)
            .bind(t.idempotency_key.as_deref())
            .fetch_optional(&mut **tx)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("task {} was neither inserted nor found", t.id)))?;
        out.push(Created { task: decode::task(&row)?, created: false });
    }
    let settled = if tasks.iter().any(|t| !t.depends_on.is_empty()) {
        dependents::link(tx, tasks, &mut out, now).await?
    } else {
        Settled::default()
    };
    Ok((out, settled))
}
