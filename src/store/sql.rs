//! Statements both dialects run as written: the reads (and one write) whose SQL is the same on
//! Postgres and SQLite (`$1` placeholders work on both). Statements that differ (the clock,
//! arrays, locking) live in each dialect's module beside the code that runs them.

/// The columns [`super::decode::task`] reads.
macro_rules! task_columns {
    () => {
        "id, task_type, payload, status, priority, attempt, max_attempts, failures, timeout_ms, worker_id, \
         job_id, idempotency_key, result, error, run_after, lease_expires_at, created_at, updated_at, \
         assigned_at, started_at, finished_at, traceparent, requires, weight, affinity_key"
    };
}

pub(super) use task_columns;

/// Every column of a task ([`super::decode::task`] reads them by name).
pub(super) const TASK_COLUMNS: &str = task_columns!();

/// One task by id.
pub(super) const TASK: &str = concat!("SELECT ", task_columns!(), " FROM tasks WHERE id = $1");

/// A task by its idempotency key.
pub(super) const TASK_BY_KEY: &str =
    concat!("SELECT ", task_columns!(), " FROM tasks WHERE idempotency_key = $1");

/// The ids of a job's tasks, in submission order.
pub(super) const JOB_TASK_IDS: &str = "SELECT task_id FROM job_members WHERE job_id = $1 ORDER BY position";

/// A job's header.
pub(super) const JOB: &str = "SELECT name, total, created_at FROM jobs WHERE id = $1";

/// The tasks a worker holds.
pub(super) const HELD_BY: &str = "SELECT id, attempt, worker_id FROM tasks
     WHERE worker_id = $1 AND status IN ('assigned', 'running') ORDER BY id";

/// Whether any task is assigned to or running on a worker.
pub(super) const CHARGED_TO: &str =
    "SELECT EXISTS (SELECT 1 FROM tasks WHERE worker_id = $1 AND status IN ('assigned', 'running'))";

/// Removes a worker's row if `$2` is still its session.
pub(super) const DELETE_WORKER: &str = "DELETE FROM workers WHERE id = $1 AND session_id = $2";

/// A replica that stops or starts says no worker's process is connected to it: another replica
/// may take a new process under one of their ids for a restart at once.
pub(super) const DISCONNECT_REPLICA: &str =
    "UPDATE workers SET connected = false WHERE coordinator_id = $1 AND connected";

/// A registration's new session adopts the tasks its worker holds.
pub(super) const ADOPT: &str = "UPDATE tasks SET session_id = $2
     WHERE worker_id = $1 AND status IN ('assigned', 'running')
     RETURNING id, attempt, worker_id, weight";

/// A task's parents in the order it named them, with each one's state (none: pruned).
pub(super) const PARENTS: &str = "SELECT p.parent, t.status FROM task_parents p
     LEFT JOIN tasks t ON t.id = p.parent
     WHERE p.child = $1 ORDER BY p.position";

/// A task's assignment history, oldest first: the attempt rows (attempts that ended other than
/// completed), and the attempt in flight or the one that completed, read from the task's row.
pub(super) const ATTEMPTS: &str =
    "SELECT task_id, attempt, worker_id, assigned_at, started_at, finished_at, outcome, error
     FROM (
         SELECT task_id, attempt, worker_id, assigned_at, started_at, finished_at, outcome, error
         FROM task_attempts WHERE task_id = $1
         UNION ALL
         SELECT t.id, t.attempt, t.worker_id, t.assigned_at, t.started_at,
                CASE WHEN t.status = 'completed' THEN t.finished_at END,
                CASE WHEN t.status = 'completed' THEN 'completed' END, NULL
         FROM tasks t
         WHERE t.id = $1 AND t.status IN ('assigned', 'running', 'completed')
           AND t.worker_id IS NOT NULL AND t.assigned_at IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM task_attempts a WHERE a.task_id = t.id AND a.attempt = t.attempt)
     ) AS history
     ORDER BY attempt";

/// Finished tasks counted by state, through `tasks_finished`: the whole kept history (days of
/// it), so the gauges read it seldom.
pub(super) const FINISHED_TASK_COUNTS: &str = "SELECT status, count(*) AS n FROM tasks
     WHERE status IN ('completed', 'failed', 'cancelled') GROUP BY status";

/// Pending tasks counted by type.
pub(super) const PENDING_BY_TYPE: &str = "SELECT task_type, count(*) AS n, min(run_after) AS since
     FROM tasks WHERE status = 'pending' GROUP BY task_type";

/// The whole-table acceptance audit. A completion is written to the task's row only, so a
/// result accepted from an attempt that had already lost the task (taken back, failed or
/// cancelled: closed by an attempt row) shows as a completed task whose completing attempt also
/// has a row: `twice` counts those.
pub(super) const AUDIT: &str = "SELECT (SELECT count(*) FROM tasks) AS tasks,
        (SELECT count(*) FROM tasks WHERE status = 'completed') AS completed,
        (SELECT count(*) FROM tasks t JOIN task_attempts a ON a.task_id = t.id AND a.attempt = t.attempt
         WHERE t.status = 'completed') AS twice";

/// A worker's row with the number of tasks it holds and when its replica was last seen;
/// completed by a `WHERE` and an `ORDER BY`.
macro_rules! worker_select {
    ($rest:literal) => {
        concat!(
            "SELECT w.*, c.last_seen_at AS owner_seen_at, (SELECT count(*) FROM tasks t
                 WHERE t.worker_id = w.id AND t.status IN ('assigned', 'running')) AS in_flight
             FROM workers w LEFT JOIN coordinators c ON c.id = w.coordinator_id ",
            $rest
        )
    };
}
pub(super) use worker_select;

/// A page of workers by id, after `$1` (`''` for the first page), at most `$2`.
pub(super) const WORKERS: &str = worker_select!("WHERE w.id > $1 ORDER BY w.id LIMIT $2");

/// One worker.
pub(super) const WORKER: &str = worker_select!("WHERE w.id = $1");

/// Every column of a schedule ([`super::decode::schedule`] reads them by name).
pub(super) const SCHEDULE_COLUMNS: &str = "id, name, cron, timezone, task_type, payload, priority, max_attempts, \
     timeout_ms, missed, paused, next_run_at, last_run_at, runs, created_at";

/// Every schedule, by name.
pub(super) const SCHEDULES: &str = "SELECT id, name, cron, timezone, task_type, payload, priority, max_attempts, \
     timeout_ms, missed, paused, next_run_at, last_run_at, runs, created_at FROM schedules ORDER BY name";

/// One schedule.
pub(super) const SCHEDULE: &str = "SELECT id, name, cron, timezone, task_type, payload, priority, max_attempts, \
     timeout_ms, missed, paused, next_run_at, last_run_at, runs, created_at FROM schedules WHERE id = $1";

/// Deletes a schedule (its tasks stay).
pub(super) const DELETE_SCHEDULE: &str = "DELETE FROM schedules WHERE id = $1";

/// A task's parents, in the order it named them, each with its result while the results so far
/// fit in `$2` bytes (NULL past that, or for a parent no longer stored).
pub(super) const PARENT_RESULTS: &str = "SELECT p.parent AS id,
            CASE WHEN sum(COALESCE(length(t.result), 0)) OVER (ORDER BY p.position) <= $2 THEN t.result END
                AS result
     FROM task_parents p LEFT JOIN tasks t ON t.id = p.parent
     WHERE p.child = $1
     ORDER BY p.position";

/// Every type's concurrency limit and its tasks assigned or running now.
pub(super) const TYPE_LIMITS: &str =
    "SELECT l.task_type, CAST(l.max_in_flight AS BIGINT) AS max_in_flight, l.source,
            (SELECT count(*) FROM tasks r
             WHERE r.task_type = l.task_type AND r.status IN ('assigned', 'running')) AS in_flight
     FROM type_limits l ORDER BY l.task_type";
