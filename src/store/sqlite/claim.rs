//! Claims and the first steps of an attempt: candidates read and assigned in one write
//! transaction (one writer: the session read is current until commit); then marked running and its
//! lease renewed.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use chrono::Utc;
use sqlx::Row;

use super::{SqliteStore, Tx, plus_ms};
use crate::{
    domain::{Assignment, Candidate, WorkerId},
    store::{
        self, ClaimFilter, Held, Placement, Result, TypeFilter,
        decode::{self, micros},
        duration_ms, micros_ago,
    },
};

/// Whether one of the worker shapes in `$4` (see [`store::Shapes`]; NULL: no check) could take
/// task `t` now. Tasks that require nothing and weigh one slot pass at once.
const FITS: &str = "((t.requires IS NULL AND t.weight IS NULL) OR $4 IS NULL OR EXISTS (
         SELECT 1 FROM json_each($4) AS w
         WHERE (json_type(w.value, '$.c') = 'null'
                OR EXISTS (SELECT 1 FROM json_each(w.value, '$.c') AS c WHERE c.value = t.task_type))
           AND json_extract(w.value, '$.f') >= COALESCE(t.weight, 1)
           AND json_extract(w.value, '$.s') >= COALESCE(t.weight, 1)
           AND (t.requires IS NULL OR (
                NOT EXISTS (
                    SELECT 1 FROM json_each(t.requires, '$.eq') AS e
                    WHERE NOT EXISTS (SELECT 1 FROM json_each(w.value, '$.l') AS l WHERE l.value = e.value))
                AND NOT EXISTS (
                    SELECT 1 FROM json_each(t.requires, '$.min') AS m
                    WHERE NOT EXISTS (
                        SELECT 1 FROM json_each(w.value, '$.n') AS n
                        WHERE json_extract(n.value, '$[0]') = json_extract(m.value, '$[0]')
                          AND json_extract(n.value, '$[1]') >= json_extract(m.value, '$[1]')))))))";

/// The limits of the types in flight or offered, and how many more of each may start: one
/// writer at a time, so what this reads holds until the claim commits.
async fn allowances(tx: &mut sqlx::SqliteConnection) -> Result<store::Allowances> {
    let rows = sqlx::query(
        "SELECT l.task_type,
                l.max_in_flight - (SELECT count(*) FROM tasks r
                                   WHERE r.task_type = l.task_type AND r.status IN ('assigned', 'running')) AS left
         FROM type_limits l",
    )
    .fetch_all(&mut *tx)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((r.try_get("task_type")?, r.try_get::<i64, _>("left")?.clamp(0, i64::from(u32::MAX)) as u32))
        })
        .collect()
}

/// A claim in `tx` (the writer's transaction): candidates read, placed by `place`, assigned
/// under the session fence. The caller commits.
pub(super) async fn claim_in<F>(
    tx: &mut Tx<'_>,
    limit: u32,
    filter: &ClaimFilter,
    lease: Duration,
    place: F,
) -> Result<Vec<Assignment>>
where
    F: FnOnce(&[Candidate], &store::Allowances) -> Placement + Send,
{
    // The clock after the wait for the writer: a task submitted during that wait is runnable.
    let now = Utc::now();
    let allowances = allowances(tx).await?;
    // Up to `limit` candidates of each type, so older tasks of one type can never fill the
    // list and hide the tasks another free worker could run; none of a type at its limit.
    let one_type: Vec<Option<&str>> = match &filter.types {
        TypeFilter::Any => vec![None],
        TypeFilter::Only(t) => t.iter().map(|t| Some(t.as_str())).collect(),
        TypeFilter::AnyAnd(t) => std::iter::once(None).chain(t.iter().map(|t| Some(t.as_str()))).collect(),
    };
    let saturated: Vec<&str> =
        allowances.iter().filter(|(_, left)| **left == 0).map(|(t, _)| t.as_str()).collect();
    let saturated = decode::encode_json(&saturated);
    let shapes = filter.shapes.as_ref().map(|s| s.0.as_str());
    let sql = format!(
        "SELECT id, task_type, priority, requires, weight, affinity_key FROM tasks t
         WHERE status = 'pending' AND run_after <= $1 AND ($3 IS NULL OR task_type = $3)
           AND task_type NOT IN (SELECT value FROM json_each($5)) AND {FITS}
         ORDER BY priority DESC, id
         LIMIT $2"
    );
    let mut rows = Vec::new();
    for task_type in one_type.into_iter().filter(|t| t.is_none_or(|t| allowances.get(t) != Some(&0))) {
        rows.extend(
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(micros(now))
                .bind(i64::from(limit))
                .bind(task_type)
                .bind(shapes)
                .bind(&saturated)
                .fetch_all(&mut **tx)
                .await?,
        );
    }
    let mut candidates = rows.iter().map(decode::candidate).collect::<Result<Vec<_>>>()?;
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    candidates.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
    // A task among the first of any type and the first of its own is read twice.
    candidates.dedup_by_key(|c| c.id);
    let offered: std::collections::HashSet<&str> = candidates.iter().map(|c| c.task_type.as_str()).collect();
    let allowances: store::Allowances =
        allowances.into_iter().filter(|(t, _)| offered.contains(t.as_str())).collect();
    let Placement { placed, sessions } = place(&candidates, &allowances);
    let placed = store::only_candidates(&candidates, placed, &allowances);
    let lease_until = plus_ms(micros(now), duration_ms(lease));
    let mut out = Vec::with_capacity(placed.len());
    let mut with_parents = HashSet::new();
    // The session fence: one writer runs at a time, so the session read here is the
    // worker's current one until this transaction commits.
    let mut current: HashMap<WorkerId, bool> = HashMap::new();
    for (task_id, worker_id) in placed {
        let session = sessions.get(&worker_id).copied();
        if let Some(session) = session {
            let fenced = match current.get(&worker_id) {
                Some(ok) => *ok,
                None => {
                    let ok = sqlx::query("SELECT 1 FROM workers WHERE id = $1 AND session_id = $2")
                        .bind(&worker_id.0)
                        .bind(session.to_string())
                        .fetch_optional(&mut **tx)
                        .await?
                        .is_some();
                    current.insert(worker_id.clone(), ok);
                    ok
                }
            };
            if !fenced {
                continue;
            }
        }
        let row = sqlx::query(
            "UPDATE tasks SET status = 'assigned', worker_id = $2, attempt = attempt + 1, session_id = $5,
                 assigned_at = $3, started_at = NULL, updated_at = $3, lease_expires_at = $4
             WHERE id = $1 AND status = 'pending'
             RETURNING id, worker_id, attempt, task_type, payload, priority, job_id, timeout_ms, created_at,
                       assigned_at, traceparent, parents, weight",
        )
        .bind(task_id.to_string())
        .bind(&worker_id.0)
        .bind(micros(now))
        .bind(lease_until)
        .bind(session.map(|s| s.to_string()))
        .fetch_optional(&mut **tx)
        .await?;
        let Some(r) = row else { continue };
        let a = decode::assignment(&r)?;
        if r.try_get::<Option<i64>, _>("parents")?.is_some_and(|n| n > 0) {
            with_parents.insert(a.task_id);
        }
        out.push(a);
    }
    if !with_parents.is_empty() {
        super::dependents::parent_results(tx, &mut out, &with_parents).await?;
    }
    Ok(out)
}

impl SqliteStore {
    pub(in crate::store) async fn claim<F>(
        &self,
        limit: u32,
        filter: &ClaimFilter,
        lease: Duration,
        place: F,
    ) -> Result<Vec<Assignment>>
    where
        F: FnOnce(&[Candidate], &store::Allowances) -> Placement + Send,
    {
        let mut tx = self.writer.begin().await?;
        let out = claim_in(&mut tx, limit, filter, lease, place).await?;
        tx.commit().await?;
        Ok(out)
    }

    pub(in crate::store) async fn mark_running(&self, delivered: &[(Held, Instant)]) -> Result<u64> {
        let mut tx = self.writer.begin().await?;
        let now = micros(Utc::now());
        let mut n = 0;
        for (h, at) in delivered {
            let started = now - micros_ago(*at);
            let r = sqlx::query(
                "UPDATE tasks SET status = 'running', started_at = $4, updated_at = $5
                 WHERE id = $1 AND worker_id = $2 AND attempt = $3 AND status = 'assigned'",
            )
            .bind(h.task_id.to_string())
            .bind(&h.worker_id.0)
            .bind(i64::from(h.attempt))
            .bind(started)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            n += r.rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    pub(in crate::store) async fn renew_leases(&self, held: &[Held], lease: Duration) -> Result<Vec<Held>> {
        let now = micros(Utc::now());
        let until = plus_ms(now, duration_ms(lease));
        let mut tx = self.writer.begin().await?;
        let mut renewed = Vec::new();
        let mut seen = HashSet::new();
        // Deduplicated by the whole fence: a stale holder listed first must not hide the
        // current holder of the same task in the same batch.
        for h in held.iter().filter(|h| seen.insert((*h).clone())) {
            let r = sqlx::query(
                "UPDATE tasks SET lease_expires_at = $4, status = 'running',
                     started_at = COALESCE(started_at, $5), updated_at = $5
                 WHERE id = $1 AND worker_id = $2 AND attempt = $3 AND status IN ('assigned', 'running')",
            )
            .bind(h.task_id.to_string())
            .bind(&h.worker_id.0)
            .bind(i64::from(h.attempt))
            .bind(until)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() == 1 {
                renewed.push(h.clone());
            }
        }
        tx.commit().await?;
        Ok(renewed)
    }
}
