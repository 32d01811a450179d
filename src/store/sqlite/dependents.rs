//! Task dependencies on SQLite (see the Postgres module of the same name). One writer runs at a
//! time, so a parent read here cannot change before this transaction commits.

use std::collections::{HashMap, HashSet};

use super::Tx;
use crate::{
    domain::{Assignment, NewTask, TaskId, TaskState},
    store::{
        Created, Result, Settled, StoreError,
        decode::{self, Cols},
        parent_ended,
        sql::PARENT_RESULTS,
    },
};

/// Ends the dependents of each root, and theirs: every descendant still blocked fails or is
/// cancelled by its `on_parent_failure`, with the root's end in its error.
pub(super) async fn end_dependents(
    tx: &mut Tx<'_>,
    roots: &[(TaskId, TaskState, Option<String>)],
    now: i64,
) -> Result<Vec<(TaskId, TaskState)>> {
    let mut ended = Vec::new();
    for (root, state, error) in roots {
        let rows = sqlx::query(
            "WITH RECURSIVE d(id) AS (
                 SELECT child FROM task_parents WHERE parent = $1
                 UNION
                 SELECT p.child FROM task_parents p JOIN d ON p.parent = d.id
             )
             UPDATE tasks
             SET status = CASE WHEN on_parent_failure = 'cancel' THEN 'cancelled' ELSE 'failed' END,
                 error = $2, finished_at = $3, updated_at = $3
             WHERE id IN (SELECT id FROM d) AND status = 'blocked'
             RETURNING id, status",
        )
        .bind(root.to_string())
        .bind(parent_ended(*root, *state, error.as_deref()))
        .bind(now)
        .fetch_all(&mut **tx)
        .await?;
        for r in rows {
            ended.push((TaskId(r.uuid("id")?), decode::state(&r.text("status")?)?));
        }
    }
    Ok(ended)
}

/// Dependents of a task that just completed: one parent fewer to wait for each, pending at none.
/// Returns the ones released.
pub(super) async fn release(tx: &mut Tx<'_>, parent: TaskId, now: i64) -> Result<Vec<TaskId>> {
    let rows = sqlx::query(
        "UPDATE tasks
         SET blocked_on = blocked_on - (SELECT count(*) FROM task_parents p WHERE p.child = tasks.id AND p.parent = $1),
             status = CASE WHEN status = 'blocked'
                            AND blocked_on <= (SELECT count(*) FROM task_parents p
                                               WHERE p.child = tasks.id AND p.parent = $1)
                           THEN 'pending' ELSE status END,
             updated_at = $2
         WHERE id IN (SELECT child FROM task_parents WHERE parent = $1)
         RETURNING id, status",
    )
    .bind(parent.to_string())
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;
    let mut released = Vec::new();
    for r in rows {
        if r.text("status")? == "pending" {
            released.push(TaskId(r.uuid("id")?));
        }
    }
    Ok(released)
}

/// Records the parents of the tasks a submission created (inserted blocked on all of them),
/// counts off those already completed, and ends at once a task whose parent already failed or
/// was cancelled (with its own dependents). The answered tasks are brought up to date.
pub(super) async fn link(
    tx: &mut Tx<'_>,
    tasks: &[NewTask],
    created: &mut [Created],
    now: i64,
) -> Result<Settled> {
    let actual: HashMap<TaskId, TaskId> =
        tasks.iter().zip(created.iter()).map(|(t, c)| (t.id, c.task.id)).collect();
    let mut edges = Vec::new();
    for (t, c) in tasks.iter().zip(created.iter()) {
        if !c.created {
            continue;
        }
        for (pos, p) in t.depends_on.iter().enumerate() {
            edges.push((c.task.id, pos as i64, *actual.get(p).unwrap_or(p)));
        }
    }
    if edges.is_empty() {
        return Ok(Settled::default());
    }
    let mut status: HashMap<TaskId, (TaskState, Option<String>)> = HashMap::new();
    let distinct: HashSet<TaskId> = edges.iter().map(|(_, _, p)| *p).collect();
    let mut named: HashMap<TaskId, i64> = HashMap::new();
    for (_, _, p) in &edges {
        *named.entry(*p).or_default() += 1;
    }
    for p in &distinct {
        let row = sqlx::query(
            "UPDATE tasks SET dependents = COALESCE(dependents, 0) + $2 WHERE id = $1 RETURNING status, error",
        )
        .bind(p.to_string())
        .bind(named[p])
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(r) = row {
            status.insert(*p, (decode::state(&r.text("status")?)?, r.opt_text("error")?));
        }
    }
    let mut unknown: Vec<TaskId> = distinct.iter().filter(|p| !status.contains_key(p)).copied().collect();
    if !unknown.is_empty() {
        unknown.sort();
        return Err(StoreError::UnknownParents(unknown));
    }
    let mut done: HashMap<TaskId, i64> = HashMap::new();
    let mut ended_by: HashMap<TaskId, String> = HashMap::new();
    for (child, position, parent) in &edges {
        sqlx::query("INSERT INTO task_parents (child, position, parent) VALUES ($1, $2, $3)")
            .bind(child.to_string())
            .bind(position)
            .bind(parent.to_string())
            .execute(&mut **tx)
            .await?;
        match &status[parent] {
            (TaskState::Completed, _) => *done.entry(*child).or_default() += 1,
            (s @ (TaskState::Failed | TaskState::Cancelled), error) => {
                ended_by.entry(*child).or_insert_with(|| parent_ended(*parent, *s, error.as_deref()));
            }
            _ => {}
        }
    }
    let fix: HashSet<TaskId> = done.keys().chain(ended_by.keys()).copied().collect();
    let at: HashMap<TaskId, usize> = created.iter().enumerate().map(|(i, c)| (c.task.id, i)).collect();
    let mut roots = Vec::new();
    for child in fix {
        let error = ended_by.get(&child);
        let r = sqlx::query(
            "UPDATE tasks
             SET blocked_on = blocked_on - $2,
                 status = CASE WHEN $3 IS NOT NULL
                               THEN CASE WHEN on_parent_failure = 'cancel' THEN 'cancelled' ELSE 'failed' END
                               WHEN blocked_on - $2 <= 0 THEN 'pending' ELSE 'blocked' END,
                 error = $3, finished_at = CASE WHEN $3 IS NOT NULL THEN $4 END, updated_at = $4
             WHERE id = $1
             RETURNING status",
        )
        .bind(child.to_string())
        .bind(done.get(&child).copied().unwrap_or(0))
        .bind(error.map(String::as_str))
        .bind(now)
        .fetch_one(&mut **tx)
        .await?;
        let state = decode::state(&r.text("status")?)?;
        if let Some(&i) = at.get(&child) {
            let task = &mut created[i].task;
            task.state = state;
            task.error = error.cloned();
            task.finished_at = error.map(|_| decode::from_micros(now));
            task.updated_at = decode::from_micros(now);
        }
        if state.is_terminal() {
            roots.push((child, state, error.cloned()));
        }
    }
    let ended = end_dependents(tx, &roots, now).await?;
    for (id, state) in &ended {
        if let Some(&i) = at.get(id) {
            created[i].task.state = *state;
        }
    }
    Ok(Settled { released: Vec::new(), ended })
}

/// Fills in the parents' results of the assignments that have parents (see the Postgres twin).
pub(super) async fn parent_results(
    tx: &mut Tx<'_>,
    assignments: &mut [Assignment],
    with_parents: &HashSet<TaskId>,
) -> Result<()> {
    for a in assignments.iter_mut().filter(|a| with_parents.contains(&a.task_id)) {
        let rows = sqlx::query(PARENT_RESULTS)
            .bind(a.task_id.to_string())
            .bind(crate::store::PARENT_RESULTS_BUDGET as i64)
            .fetch_all(&mut **tx)
            .await?;
        a.parents = rows.iter().map(decode::parent_result).collect::<Result<_>>()?;
    }
    Ok(())
}
