//! Task dependencies: a submission's edges and the parents it waits for, and the dependents a
//! parent's end settles (released when it completes, ended when it fails for good or is
//! cancelled), each in the transaction of that end.

use std::collections::{HashMap, HashSet};

use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use crate::{
    domain::{Assignment, NewTask, TaskId, TaskState},
    store::{Created, Result, Settled, StoreError, decode, parent_ended, sql::PARENT_RESULTS},
};

/// The dependents of tasks that just completed, locked in id order (as [`LOCK_BY_ID`]).
pub(super) const RELEASE_LOCK: &str =
    "SELECT 1 FROM tasks WHERE id = ANY(ARRAY(SELECT child FROM task_parents WHERE parent = ANY($1)))
         ORDER BY id::text COLLATE \"C\" FOR NO KEY UPDATE";

/// Dependents of tasks that just completed: one parent fewer each, pending at none.
pub(super) const RELEASE: &str = "WITH e AS (
             SELECT p.child, count(*)::int AS n FROM task_parents p
             WHERE p.parent = ANY($1) GROUP BY p.child
         ),
         rel AS (
             UPDATE tasks c
             SET blocked_on = c.blocked_on - e.n,
                 status = CASE WHEN c.status = 'blocked' AND c.blocked_on <= e.n THEN 'pending' ELSE c.status END,
                 updated_at = now()
             FROM e
             WHERE c.id = ANY(ARRAY[e.child])
             RETURNING c.id, c.status
         )
         SELECT id FROM rel WHERE status = 'pending'";

/// The parents of a submission: one more dependent each.
pub(super) const LINK_PARENTS: &str = "UPDATE tasks t SET dependents = COALESCE(t.dependents, 0) + v.n
         FROM (SELECT parent, count(*)::int AS n FROM unnest($1::uuid[]) AS e(parent) GROUP BY parent) v
         WHERE t.id = ANY(ARRAY[v.parent])
         RETURNING t.id, t.status, t.error";

/// New dependents of parents that already ended: released, or ended by the parent's end.
pub(super) const SETTLE_CHILDREN: &str = "UPDATE tasks t
         SET blocked_on = t.blocked_on - v.done,
             status = CASE WHEN v.error IS NOT NULL
                           THEN CASE WHEN t.on_parent_failure = 'cancel' THEN 'cancelled' ELSE 'failed' END
                           WHEN t.blocked_on - v.done <= 0 THEN 'pending' ELSE 'blocked' END,
             error = v.error,
             finished_at = CASE WHEN v.error IS NOT NULL THEN now() END,
             updated_at = now()
         FROM unnest($1::uuid[], $2::int[], $3::text[]) AS v(id, done, error)
         WHERE t.id = ANY(ARRAY[v.id])
         RETURNING t.id, t.status, t.error, t.finished_at, t.updated_at";

/// One level of the dependents of ended tasks, ended by `on_parent_failure`.
pub(super) const END_LEVEL: &str = "UPDATE tasks t
             SET status = CASE WHEN t.on_parent_failure = 'cancel' THEN 'cancelled' ELSE 'failed' END,
                 error = v.cause, finished_at = now(), updated_at = now()
             FROM unnest($1::uuid[], $2::text[]) AS v(id, cause)
             WHERE t.id = ANY(ARRAY[v.id]) AND (t.status = 'blocked') IS TRUE
             RETURNING t.id, t.status, v.cause";

/// Locks the tasks `$1` in id order. The order is written as the id's text (the same order, byte
/// by byte), not the id itself: the key's order would let a plan made on an empty table walk
/// all of `tasks_pkey` for it instead of looking up each task ([`super::batch_settings`]).
pub(super) const LOCK_BY_ID: &str =
    "SELECT 1 FROM tasks WHERE id = ANY($1) ORDER BY id::text COLLATE \"C\" FOR NO KEY UPDATE";

/// Ends the dependents of each root (a task that failed for good or was cancelled), and theirs:
/// every descendant still blocked fails or is cancelled by its `on_parent_failure`, with the
/// root's end in its error. Returns them with the state each ended in.
///
/// One level per statement, each level's rows locked in id order before they change: a level's
/// edges are read after the level above was locked, so a submission that named one of those
/// tasks (and updated its row) has committed and its new dependent is seen. Read in one
/// statement, a dependent submitted meanwhile two levels down would be missed and left blocked.
pub(super) async fn end_dependents(
    tx: &mut Transaction<'_, Postgres>,
    roots: &[(TaskId, TaskState, Option<String>)],
) -> Result<Vec<(TaskId, TaskState)>> {
    let mut ended = Vec::new();
    let mut ids: Vec<Uuid> = roots.iter().map(|(id, _, _)| id.0).collect();
    let mut causes: Vec<String> =
        roots.iter().map(|(id, state, error)| parent_ended(*id, *state, error.as_deref())).collect();
    while !ids.is_empty() {
        // The next level: each blocked dependent once, with the cause of one of its ended parents.
        let next = sqlx::query(
            "SELECT DISTINCT ON (p.child) p.child AS id, f.cause
             FROM task_parents p JOIN unnest($1::uuid[], $2::text[]) AS f(id, cause) ON p.parent = f.id
             ORDER BY p.child, f.id",
        )
        .bind(&ids)
        .bind(&causes)
        .fetch_all(&mut **tx)
        .await?;
        if next.is_empty() {
            break;
        }
        let mut level: Vec<(Uuid, String)> =
            next.iter().map(|r| Ok((r.try_get("id")?, r.try_get("cause")?))).collect::<Result<_>>()?;
        level.sort();
        let (level_ids, level_causes): (Vec<Uuid>, Vec<String>) = level.into_iter().unzip();
        sqlx::query(LOCK_BY_ID).bind(&level_ids).execute(&mut **tx).await?;
        let rows = sqlx::query(END_LEVEL).bind(&level_ids).bind(&level_causes).fetch_all(&mut **tx).await?;
        (ids, causes) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
        for r in rows {
            let id: Uuid = r.try_get("id")?;
            ended.push((TaskId(id), decode::state(r.try_get("status")?)?));
            ids.push(id);
            causes.push(r.try_get("cause")?);
        }
    }
    Ok(ended)
}

/// Dependents of tasks that just completed: one parent fewer to wait for each, pending at none.
/// Returns the ones released.
pub(super) async fn release(tx: &mut Transaction<'_, Postgres>, parents: &[Uuid]) -> Result<Vec<TaskId>> {
    if parents.is_empty() {
        return Ok(Vec::new());
    }
    // The dependents locked in id order first: two completions releasing the same children in
    // different orders would deadlock.
    sqlx::query(RELEASE_LOCK).bind(parents).execute(&mut **tx).await?;
    let rows = sqlx::query(RELEASE).bind(parents).fetch_all(&mut **tx).await?;
    rows.iter().map(|r| Ok(TaskId(r.try_get("id")?))).collect()
}

/// Records the parents of the tasks a submission created (`created[i]` answers `tasks[i]`), which
/// were inserted blocked on all of them. Each parent's row is updated (its `dependents` count),
/// so a parent completing now either committed first (and counts as completed here) or waits
/// for this submission and then sees that it has dependents to release. Parents already
/// completed are taken off each count; a task with a parent that already failed or was
/// cancelled ends at once, as would its dependents. The answered tasks are brought up to date.
pub(super) async fn link(
    tx: &mut Transaction<'_, Postgres>,
    tasks: &[NewTask],
    created: &mut [Created],
) -> Result<Settled> {
    // A parent named by its batch id that met an existing task by idempotency key is that task.
    let actual: HashMap<TaskId, TaskId> =
        tasks.iter().zip(created.iter()).map(|(t, c)| (t.id, c.task.id)).collect();
    let (mut children, mut positions, mut parents) = (Vec::new(), Vec::new(), Vec::new());
    for (t, c) in tasks.iter().zip(created.iter()) {
        if !c.created {
            continue;
        }
        for (pos, p) in t.depends_on.iter().enumerate() {
            children.push(c.task.id.0);
            positions.push(pos as i32);
            parents.push(actual.get(p).unwrap_or(p).0);
        }
    }
    if children.is_empty() {
        return Ok(Settled::default());
    }
    sqlx::query(
        "INSERT INTO task_parents (child, position, parent)
         SELECT * FROM unnest($1::uuid[], $2::int[], $3::uuid[])",
    )
    .bind(&children)
    .bind(&positions)
    .bind(&parents)
    .execute(&mut **tx)
    .await?;
    let mut distinct: Vec<Uuid> = parents.iter().copied().collect::<HashSet<_>>().into_iter().collect();
    distinct.sort();
    // Locked in id order first, so two submissions naming the same parents cannot deadlock.
    sqlx::query(LOCK_BY_ID).bind(&distinct).execute(&mut **tx).await?;
    let rows = sqlx::query(LINK_PARENTS).bind(&parents).fetch_all(&mut **tx).await?;
    let mut status: HashMap<Uuid, (TaskState, Option<String>)> = HashMap::with_capacity(rows.len());
    for r in &rows {
        status.insert(r.try_get("id")?, (decode::state(r.try_get("status")?)?, r.try_get("error")?));
    }
    let mut unknown: Vec<TaskId> =
        distinct.iter().filter(|p| !status.contains_key(p)).map(|p| TaskId(*p)).collect();
    if !unknown.is_empty() {
        unknown.sort();
        return Err(StoreError::UnknownParents(unknown));
    }
    // Per child: parents already completed, and the first (in its order) that ended otherwise.
    let mut done: HashMap<Uuid, i32> = HashMap::new();
    let mut ended_by: HashMap<Uuid, String> = HashMap::new();
    for ((child, _), parent) in children.iter().zip(&positions).zip(&parents) {
        match &status[parent] {
            (TaskState::Completed, _) => *done.entry(*child).or_default() += 1,
            (s @ (TaskState::Failed | TaskState::Cancelled), error) => {
                ended_by.entry(*child).or_insert_with(|| parent_ended(TaskId(*parent), *s, error.as_deref()));
            }
            _ => {}
        }
    }
    let fix: Vec<Uuid> =
        done.keys().chain(ended_by.keys()).copied().collect::<HashSet<_>>().into_iter().collect();
    if fix.is_empty() {
        return Ok(Settled::default());
    }
    let counts: Vec<i32> = fix.iter().map(|c| done.get(c).copied().unwrap_or(0)).collect();
    let errors: Vec<Option<&str>> = fix.iter().map(|c| ended_by.get(c).map(String::as_str)).collect();
    let rows =
        sqlx::query(SETTLE_CHILDREN).bind(&fix).bind(&counts).bind(&errors).fetch_all(&mut **tx).await?;
    let at: HashMap<TaskId, usize> = created.iter().enumerate().map(|(i, c)| (c.task.id, i)).collect();
    let mut roots = Vec::new();
    for r in rows {
        let id = TaskId(r.try_get("id")?);
        let state = decode::state(r.try_get("status")?)?;
        let error: Option<String> = r.try_get("error")?;
        if let Some(&i) = at.get(&id) {
            let task = &mut created[i].task;
            task.state = state;
            task.error = error.clone();
            task.finished_at = r.try_get("finished_at")?;
            task.updated_at = r.try_get("updated_at")?;
        }
        if state.is_terminal() {
            roots.push((id, state, error));
        }
    }
    // A task of this submission that ended at once takes its own dependents (in this same
    // submission: nothing older can depend on it) with it.
    let ended = end_dependents(tx, &roots).await?;
    for (id, state) in &ended {
        if let Some(&i) = at.get(id) {
            created[i].task.state = *state;
        }
    }
    Ok(Settled { released: Vec::new(), ended })
}

/// Fills in the parents' results of the assignments that have parents, each in the order its
/// task named them, while they fit the budget of an assignment (later ones are left for the
/// worker to read).
pub(super) async fn parent_results(
    conn: &mut sqlx::PgConnection,
    assignments: &mut [Assignment],
    with_parents: &HashSet<TaskId>,
) -> Result<()> {
    for a in assignments.iter_mut().filter(|a| with_parents.contains(&a.task_id)) {
        let rows = sqlx::query(PARENT_RESULTS)
            .bind(a.task_id.0)
            .bind(crate::store::PARENT_RESULTS_BUDGET as i64)
            .fetch_all(&mut *conn)
            .await?;
        a.parents = rows.iter().map(decode::parent_result).collect::<Result<_>>()?;
    }
    Ok(())
}
