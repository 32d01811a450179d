//! Submission: new tasks (batched, idempotency keys honoured) and jobs.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use super::{PgStore, dependents, retry_conflicts};
use crate::{
    domain::{Job, JobId, NewTask, Task},
    store::{Created, Result, Settled, StoreError, decode, duration_ms, sql::TASK_COLUMNS},
};

impl PgStore {
    pub(in crate::store) async fn create_tasks(&self, tasks: &[NewTask]) -> Result<Vec<Created>> {
        // Parents are locked: a submission may meet a completion locking the same rows.
        let (out, settled) = retry_conflicts!(
            async {
                let mut tx = self.pool.begin().await?;
                let out = insert_tasks(&mut tx, tasks).await?;
                tx.commit().await?;
                Ok::<_, StoreError>(out)
            }
            .await
        )?;
        self.settled.send(settled);
        Ok(out)
    }

    pub(in crate::store) async fn create_job(
        &self,
        job_id: JobId,
        name: &str,
        tasks: &[NewTask],
    ) -> Result<(Job, Vec<Created>)> {
        retry_conflicts!(self.create_job_once(job_id, name, tasks).await)
    }

    async fn create_job_once(
        &self,
        job_id: JobId,
        name: &str,
        tasks: &[NewTask],
    ) -> Result<(Job, Vec<Created>)> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("INSERT INTO jobs (id, name, total) VALUES ($1, $2, $3) RETURNING created_at")
            .bind(job_id.0)
            .bind(name)
            .bind(tasks.len() as i32)
            .fetch_one(&mut *tx)
            .await?;
        let (created, settled) = insert_tasks(&mut tx, tasks).await?;
        // A task this submission created is a member by its own row (job_id, job_position); a
        // row of its own only for a task an idempotency key returned.
        let (positions, shared): (Vec<i32>, Vec<Uuid>) = created
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.created)
            .map(|(i, c)| (i as i32, c.task.id.0))
            .unzip();
        if !shared.is_empty() {
            sqlx::query(
                "INSERT INTO job_tasks (job_id, position, task_id)
                 SELECT $1, pos, id FROM unnest($2::int[], $3::uuid[]) AS m(pos, id)",
            )
            .bind(job_id.0)
            .bind(&positions)
            .bind(&shared)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.settled.send(settled);
        let mut counts = BTreeMap::new();
        for c in &created {
            *counts.entry(c.task.state).or_insert(0) += 1;
        }
        let job = Job {
            id: job_id,
            name: name.to_owned(),
            total: tasks.len() as u32,
            counts,
            created_at: row.try_get("created_at")?,
        };
        Ok((job, created))
    }
}

/// Inserts `tasks` (a task naming parents starts blocked on all of them, then
/// [`dependents::link`] counts off those already completed); what each submission got, and the
/// dependents that settled at once.
pub(super) async fn insert_tasks(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    tasks: &[NewTask],
) -> Result<(Vec<Created>, Settled)> {
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.id.0).collect();
    let types: Vec<&str> = tasks.iter().map(|t| t.task_type.as_str()).collect();
    let payloads: Vec<&[u8]> = tasks.iter().map(|t| t.payload.as_slice()).collect();
    let priorities: Vec<i32> = tasks.iter().map(|t| t.priority).collect();
    let max_attempts: Vec<i32> = tasks.iter().map(|t| t.max_attempts as i32).collect();
    let timeouts: Vec<i64> = tasks.iter().map(|t| duration_ms(t.timeout)).collect();
    let keys: Vec<Option<&str>> = tasks.iter().map(|t| t.idempotency_key.as_deref()).collect();
    let jobs: Vec<Option<Uuid>> = tasks.iter().map(|t| t.job_id.map(|j| j.0)).collect();
    // Only a job's submission names a job: its tasks, in order.
    let positions: Vec<Option<i32>> =
        tasks.iter().enumerate().map(|(i, t)| t.job_id.map(|_| i as i32)).collect();
    let run_after: Vec<Option<DateTime<Utc>>> = tasks.iter().map(|t| t.run_after).collect();
    let traceparents: Vec<Option<&str>> = tasks.iter().map(|t| t.traceparent.as_deref()).collect();
    let parents: Vec<Option<i32>> =
        tasks.iter().map(|t| (!t.depends_on.is_empty()).then_some(t.depends_on.len() as i32)).collect();
    let policies: Vec<Option<&str>> =
        tasks.iter().map(|t| (!t.depends_on.is_empty()).then_some(t.on_parent_failure.as_str())).collect();
    let requires: Vec<Option<String>> =
        tasks.iter().map(|t| decode::encode_requires(&t.needs.requires)).collect();
    let weights: Vec<Option<i32>> =
        tasks.iter().map(|t| (t.needs.weight > 1).then_some(t.needs.weight as i32)).collect();
    let affinity: Vec<Option<&str>> = tasks.iter().map(|t| t.needs.affinity_key.as_deref()).collect();
    let sql = format!(
        "INSERT INTO tasks (id, task_type, payload, priority, max_attempts, timeout_ms, idempotency_key, job_id,
                            run_after, traceparent, status, parents, blocked_on, on_parent_failure,
                            requires, weight, affinity_key, job_position)
         SELECT i, ty, p, pr, ma, tm, k, j, COALESCE(ra, now()), tp,
                CASE WHEN n IS NULL THEN 'pending' ELSE 'blocked' END, n, n, pol, rq, wt, ak, jp
         FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::int[], $5::int[], $6::bigint[],
                     $7::text[], $8::uuid[], $9::timestamptz[], $10::text[], $11::int[], $12::text[],
                     $13::text[], $14::int[], $15::text[], $16::int[])
              AS u(i, ty, p, pr, ma, tm, k, j, ra, tp, n, pol, rq, wt, ak, jp)
         ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
         RETURNING {TASK_COLUMNS}"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&ids)
        .bind(&types)
        .bind(&payloads)
        .bind(&priorities)
        .bind(&max_attempts)
        .bind(&timeouts)
        .bind(&keys)
        .bind(&jobs)
        .bind(&run_after)
        .bind(&traceparents)
        .bind(&parents)
        .bind(&policies)
        .bind(&requires)
        .bind(&weights)
        .bind(&affinity)
        .bind(&positions)
        .fetch_all(&mut **tx)
        .await?;
    let mut inserted: std::collections::HashMap<Uuid, Task> =
        rows.iter().map(|r| decode::task(r).map(|t| (t.id.0, t))).collect::<Result<_>>()?;
    // Tasks not inserted collided on their idempotency key: return the task that holds it.
    let missing: Vec<&str> = tasks
        .iter()
        .filter(|t| !inserted.contains_key(&t.id.0))
        .filter_map(|t| t.idempotency_key.as_deref())
        .collect();
    let mut existing: std::collections::HashMap<String, Task> = std::collections::HashMap::new();
    if !missing.is_empty() {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE idempotency_key = ANY($1)");
        for r in sqlx::query(sqlx::AssertSqlSafe(sql)).bind(&missing).fetch_all(&mut **tx).await? {
            let t = decode::task(&r)?;
            existing.insert(t.idempotency_key.clone().unwrap_or_default(), t);
        }
    }
    let mut created =
        tasks
            .iter()
            .map(|t| {
                if let Some(task) = inserted.remove(&t.id.0) {
                    return Ok(Created { task, created: true });
                }
                let key = t.idempotency_key.as_deref().unwrap_or_default();
                existing.get(key).cloned().map(|task| Created { task, created: false }).ok_or_else(|| {
                    StoreError::Corrupt(format!("task {} was neither inserted nor found", t.id))
                })
            })
            .collect::<Result<Vec<_>>>()?;
    let settled = if tasks.iter().any(|t| !t.depends_on.is_empty()) {
        dependents::link(tx, tasks, &mut created).await?
    } else {
        Settled::default()
    };
    Ok((created, settled))
}
