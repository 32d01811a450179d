//! Claims and the first steps of an attempt: candidates locked with `FOR UPDATE SKIP LOCKED`,
//! placed, assigned under the session fence; then marked running and its lease renewed. An
//! attempt in flight lives in its task's row only (see [`crate::store`] on attempt history).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use sqlx::Row;
use uuid::Uuid;

use super::{PgStore, held_arrays, retry_conflicts};
use crate::{
    domain::{Assignment, Candidate, TaskId},
    store::{
        self, ClaimFilter, Held, Placement, Result, StoreError, TypeFilter, decode, duration_ms, micros_ago,
    },
};

/// Assigns placed candidates under the session fence: the worker row is share-locked, so a
/// registration of a new session (which updates that row) either commits first and the placement
/// is dropped, or waits for this claim and then adopts what it assigned. Each candidate is found
/// where its locked row is (`$5`, its `ctid`, which cannot change while this transaction holds
/// the row): one row fetch each, whatever the table's statistics say. Its key is checked wrapped
/// in `IS TRUE`: a join on the key would let a plan made on an empty table walk all of
/// `tasks_pkey` instead ([`super::batch_settings`]). (A place is a safe way to a row only while
/// this transaction holds it: a row updated meanwhile has a newer version elsewhere.)
pub(super) const CLAIM_ASSIGN: &str =
    "WITH a AS (SELECT * FROM unnest($1::uuid[], $2::text[], $4::uuid[], $5::text[]::tid[])
                AS a(id, worker_id, session_id, row_at)),
     fence AS (
         SELECT w.id, w.session_id FROM workers w
         WHERE w.id IN (SELECT worker_id FROM a WHERE session_id IS NOT NULL)
         ORDER BY w.id
         FOR SHARE
     ),
     upd AS (
         UPDATE tasks t
         SET status = 'assigned', worker_id = a.worker_id, attempt = t.attempt + 1,
             session_id = a.session_id,
             assigned_at = now(), started_at = NULL, updated_at = now(),
             lease_expires_at = now() + $3::bigint * interval '1 millisecond'
         FROM a
         WHERE t.ctid = a.row_at AND (t.id = a.id) IS TRUE AND (t.status = 'pending') IS TRUE
           AND (a.session_id IS NULL
                OR EXISTS (SELECT 1 FROM fence f WHERE f.id = a.worker_id AND f.session_id = a.session_id))
         RETURNING t.id, t.task_type, t.payload, t.attempt, t.worker_id, t.priority, t.job_id,
                   t.timeout_ms, t.created_at, t.assigned_at, t.traceparent, t.parents, t.weight
     )
     SELECT * FROM upd";

/// Delivered assignments become `running`, started when they left on their stream. Each task
/// is found by its key ([`super::batch_settings`]).
pub(super) const MARK_RUNNING: &str =
    "WITH h AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::bigint[])
                AS h(id, worker_id, attempt, ago_us)),
     upd AS (
         UPDATE tasks t
         SET status = 'running', started_at = now() - h.ago_us * interval '1 microsecond',
             updated_at = now()
         FROM h
         WHERE t.id = ANY(ARRAY[h.id]) AND (t.worker_id = h.worker_id AND t.attempt = h.attempt) IS TRUE
           AND (t.status = 'assigned') IS TRUE
         RETURNING t.id
     )
     SELECT count(*) AS n FROM upd";

/// Renews the leases of attempts still held, by (task, worker, attempt); each task found by its
/// key ([`super::batch_settings`]).
pub(super) const RENEW: &str =
    "WITH h AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[]) AS h(id, worker_id, attempt)),
     upd AS (
         UPDATE tasks t
         SET lease_expires_at = now() + $4::bigint * interval '1 millisecond',
             status = 'running', started_at = COALESCE(t.started_at, now()), updated_at = now()
         FROM h
         WHERE t.id = ANY(ARRAY[h.id]) AND (t.worker_id = h.worker_id AND t.attempt = h.attempt) IS TRUE
           AND (t.status IN ('assigned', 'running')) IS TRUE
         RETURNING t.id, t.attempt, t.worker_id
     )
     SELECT id, attempt, worker_id FROM upd";

/// Each claim's transaction holds this advisory lock shared (taken with its `BEGIN`, in the same
/// round trip); writing limits holds it exclusively ([`super::limits`]). So a limit created
/// while a claim runs waits for that claim to commit, and a claim that starts after it sees it:
/// no claim assigns a type whose new limit it never saw while another claim already counts
/// against that limit. Keyed by schema, as the pruner's lock.
pub(super) const LIMITS_LOCK: i32 = 0x6c69_6d74;

/// A claim's `BEGIN`, in one round trip: the limits lock (above) and the planner settings of
/// [`super::BATCH_BEGIN`], in one statement.
pub(super) const CLAIM_BEGIN: &str = concat!(
    "BEGIN; SELECT pg_advisory_xact_lock_shared(1818848628, hashtext(current_schema())), ",
    super::batch_settings!()
);

/// Types at their concurrency limit: their tasks are no candidates. A hint read without locks;
/// the limit itself is held under the limit's row lock (see [`allowances`]).
const SATURATED: &str = "saturated AS MATERIALIZED (
         SELECT l.task_type FROM type_limits l
         WHERE l.max_in_flight <= (SELECT count(*) FROM tasks r
                                   WHERE r.task_type = l.task_type AND r.status IN ('assigned', 'running')))";

/// Whether one of the worker shapes in `$2` (see [`store::Shapes`]; NULL: no check) could take
/// task `t` now. Tasks that require nothing and weigh one slot pass at once.
const FITS: &str = "((t.requires IS NULL AND t.weight IS NULL) OR $2::jsonb IS NULL OR EXISTS (
         SELECT 1 FROM jsonb_array_elements($2::jsonb) AS w(v)
         WHERE (w.v->'c' = 'null'::jsonb OR w.v->'c' ? t.task_type)
           AND (w.v->>'f')::int >= COALESCE(t.weight, 1) AND (w.v->>'s')::int >= COALESCE(t.weight, 1)
           AND (t.requires IS NULL OR (
                (w.v->'l') @> COALESCE(t.requires::jsonb->'eq', '[]'::jsonb)
                AND NOT EXISTS (
                    SELECT 1 FROM jsonb_array_elements(COALESCE(t.requires::jsonb->'min', '[]'::jsonb)) AS m(v)
                    WHERE NOT EXISTS (
                        SELECT 1 FROM jsonb_array_elements(w.v->'n') AS n(v)
                        WHERE n.v->>0 = m.v->>0 AND (n.v->>1)::float8 >= (m.v->>1)::float8))))))";

/// The columns of a candidate, and whether its type has a limit.
const CANDIDATE_COLUMNS: &str = "t.id, t.task_type, t.priority, t.requires, t.weight, t.affinity_key,
         t.ctid::text AS row_at,
         EXISTS (SELECT 1 FROM type_limits l WHERE l.task_type = t.task_type) AS limited";

/// Locks the limits of `types` (in name order, so claims never wait on each other in a cycle)
/// and counts what runs of each, in a statement that starts after the locks are granted: a
/// claim that held one of them has committed by then, and its assignments are counted.
async fn allowances(tx: &mut sqlx::PgConnection, types: &[String]) -> Result<store::Allowances> {
    let limits = sqlx::query(
        "SELECT task_type, max_in_flight FROM type_limits WHERE task_type = ANY($1)
         ORDER BY task_type FOR UPDATE",
    )
    .bind(types)
    .fetch_all(&mut *tx)
    .await?;
    if limits.is_empty() {
        return Ok(store::Allowances::new());
    }
    let running: HashMap<String, i64> = sqlx::query(
        "SELECT task_type, count(*) AS n FROM tasks
         WHERE task_type = ANY($1) AND status IN ('assigned', 'running') GROUP BY task_type",
    )
    .bind(types)
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| Ok((r.try_get("task_type")?, r.try_get("n")?)))
    .collect::<Result<_>>()?;
    limits
        .iter()
        .map(|r| {
            let ty: String = r.try_get("task_type")?;
            let max: i32 = r.try_get("max_in_flight")?;
            let left = i64::from(max) - running.get(&ty).copied().unwrap_or(0);
            Ok((ty, left.clamp(0, i64::from(u32::MAX)) as u32))
        })
        .collect()
}

/// The candidates of a claim: `$1` the most of them (of each type, with `$3` the types), `$2`
/// the worker shapes ([`FITS`]).
pub(super) fn candidates_query(types: &TypeFilter) -> String {
    let any = format!(
        "SELECT {CANDIDATE_COLUMNS} FROM tasks t
         WHERE t.status = 'pending' AND t.run_after <= now()
           AND t.task_type NOT IN (SELECT task_type FROM saturated) AND {FITS}
         ORDER BY t.priority DESC, t.id
         LIMIT $1
         FOR UPDATE OF t SKIP LOCKED"
    );
    // Up to `limit` candidates of each type, so older tasks of one type can never fill the list
    // and hide the tasks another free worker could run.
    let each = format!(
        "SELECT c.* FROM (
             SELECT name FROM unnest($3::text[]) AS ty(name)
             WHERE name NOT IN (SELECT task_type FROM saturated)
         ) AS ty,
         LATERAL (
             SELECT {CANDIDATE_COLUMNS} FROM tasks t
             WHERE t.status = 'pending' AND t.run_after <= now() AND t.task_type = ty.name
               AND {FITS}
             ORDER BY t.priority DESC, t.id
             LIMIT $1
             FOR UPDATE OF t SKIP LOCKED
         ) AS c"
    );
    match types {
        TypeFilter::Any => format!("WITH {SATURATED} {any}"),
        TypeFilter::Only(_) => format!("WITH {SATURATED} {each} ORDER BY c.priority DESC, c.id"),
        // A task among the first of any type and the first of its own is read (and locked, by
        // this transaction both times) twice: the union keeps it once.
        TypeFilter::AnyAnd(_) => format!(
            "WITH {SATURATED}, top AS ({any}), each_type AS ({each})
             SELECT * FROM top UNION SELECT * FROM each_type
             ORDER BY priority DESC, id"
        ),
    }
}

/// A claim in `tx` (begun with [`CLAIM_BEGIN`]): candidates locked, placed by `place`, assigned
/// under the session fence. The caller commits.
pub(super) async fn claim_in<F>(
    tx: &mut sqlx::PgConnection,
    limit: u32,
    filter: &ClaimFilter,
    lease: Duration,
    place: F,
) -> Result<Vec<Assignment>>
where
    F: FnOnce(&[Candidate], &store::Allowances) -> Placement + Send,
{
    let shapes = filter.shapes.as_ref().map(|s| s.0.as_str());
    let sql = sqlx::AssertSqlSafe(candidates_query(&filter.types));
    let query = sqlx::query(sql).bind(i64::from(limit)).bind(shapes);
    let rows = match &filter.types {
        TypeFilter::Any => query.fetch_all(&mut *tx).await?,
        TypeFilter::Only(types) | TypeFilter::AnyAnd(types) => query.bind(types).fetch_all(&mut *tx).await?,
    };
    let candidates = rows.iter().map(decode::candidate).collect::<Result<Vec<_>>>()?;
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let mut limited: Vec<String> = Vec::new();
    for r in &rows {
        if r.try_get::<bool, _>("limited")? {
            limited.push(r.try_get("task_type")?);
        }
    }
    limited.sort();
    limited.dedup();
    let allowances =
        if limited.is_empty() { store::Allowances::new() } else { allowances(&mut *tx, &limited).await? };
    let Placement { placed, sessions } = place(&candidates, &allowances);
    let placed = store::only_candidates(&candidates, placed, &allowances);
    if placed.is_empty() {
        return Ok(Vec::new());
    }
    // Where each locked candidate's row is: it cannot move while this transaction holds it.
    let mut row_at: HashMap<Uuid, String> = HashMap::with_capacity(rows.len());
    for r in &rows {
        row_at.insert(r.try_get("id")?, r.try_get("row_at")?);
    }
    let mut ids = Vec::with_capacity(placed.len());
    let mut workers = Vec::with_capacity(placed.len());
    let mut session_ids: Vec<Option<Uuid>> = Vec::with_capacity(placed.len());
    let mut places = Vec::with_capacity(placed.len());
    for (t, w) in placed {
        places.push(row_at.get(&t.0).cloned().unwrap_or_else(|| "(0,0)".to_owned()));
        ids.push(t.0);
        session_ids.push(sessions.get(&w).copied());
        workers.push(w.0);
    }
    let rows = sqlx::query(CLAIM_ASSIGN)
        .bind(&ids)
        .bind(&workers)
        .bind(duration_ms(lease))
        .bind(&session_ids)
        .bind(&places)
        .fetch_all(&mut *tx)
        .await?;
    let mut assignments = rows.iter().map(decode::assignment).collect::<Result<Vec<_>>>()?;
    let mut with_parents = std::collections::HashSet::new();
    for r in &rows {
        if r.try_get::<Option<i32>, _>("parents")?.is_some_and(|n| n > 0) {
            with_parents.insert(TaskId(r.try_get("id")?));
        }
    }
    // In the claim's transaction: the assignments and what they carry commit (or fail) together.
    if !with_parents.is_empty() {
        super::dependents::parent_results(&mut *tx, &mut assignments, &with_parents).await?;
    }
    Ok(assignments)
}

impl PgStore {
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
        let mut tx = self.pool.begin_with(CLAIM_BEGIN).await?;
        let assignments = claim_in(&mut tx, limit, filter, lease, place).await?;
        if assignments.is_empty() {
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
        Ok(assignments)
    }

    pub(in crate::store) async fn mark_running(&self, delivered: &[(Held, Instant)]) -> Result<u64> {
        // In task id order, as completions and requeues lock tasks' rows: in the order the
        // assignments left, a batch of marks and a batch of completions could each hold a row
        // the other waits for, until the deadlock check aborts one of them a second later.
        let mut delivered = delivered.to_vec();
        delivered.sort_unstable_by_key(|(h, _)| h.task_id);
        let held: Vec<Held> = delivered.iter().map(|(h, _)| h.clone()).collect();
        let (ids, workers, attempts) = held_arrays(&held);
        retry_conflicts!(self.mark_running_once(&ids, &workers, &attempts, &delivered).await)
    }

    async fn mark_running_once(
        &self,
        ids: &[Uuid],
        workers: &[String],
        attempts: &[i32],
        delivered: &[(Held, Instant)],
    ) -> Result<u64> {
        // The connection first, then the ages: `now()` is the statement's start, so an age taken
        // before waiting for a connection would date the start later by that wait.
        let mut tx = self.pool.begin_with(super::BATCH_BEGIN).await?;
        let ago: Vec<i64> = delivered.iter().map(|(_, at)| micros_ago(*at)).collect();
        let marked = sqlx::query(MARK_RUNNING)
            .bind(ids)
            .bind(workers)
            .bind(attempts)
            .bind(&ago)
            .fetch_one(&mut *tx)
            .await?
            .try_get::<i64, _>("n")? as u64;
        tx.commit().await?;
        Ok(marked)
    }

    pub(in crate::store) async fn renew_leases(&self, held: &[Held], lease: Duration) -> Result<Vec<Held>> {
        // In task id order, as every batch that locks tasks' rows (see `mark_running`).
        let mut held = held.to_vec();
        held.sort_unstable_by_key(|h| h.task_id);
        let (ids, workers, attempts) = held_arrays(&held);
        let rows = retry_conflicts!(
            async {
                let mut tx = self.pool.begin_with(super::BATCH_BEGIN).await?;
                let rows = sqlx::query(RENEW)
                    .bind(&ids)
                    .bind(&workers)
                    .bind(&attempts)
                    .bind(duration_ms(lease))
                    .fetch_all(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, StoreError>(rows)
            }
            .await
        )?;
        rows.iter().map(decode::held).collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn claims_take_the_lock_that_limit_writers_take() {
        assert!(super::CLAIM_BEGIN.contains(&format!("({}, ", super::LIMITS_LOCK)), "{}", super::CLAIM_BEGIN);
    }
}
