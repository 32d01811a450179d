-- Task dependencies (see the Postgres migration of the same name). SQLite cannot change a CHECK
-- constraint in place, so `tasks` is rebuilt with the `blocked` state and the new columns. The
-- member and attempt tables lose their foreign keys to `tasks` on the way, as on Postgres: the
-- store keeps them consistent, and dropping the old `tasks` must not cascade into them.
CREATE TABLE tasks_new (
    id                TEXT PRIMARY KEY,
    task_type         TEXT NOT NULL,
    payload           BLOB NOT NULL,
    status            TEXT NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('blocked', 'pending', 'assigned', 'running', 'completed', 'failed', 'cancelled')),
    priority          INTEGER NOT NULL DEFAULT 0,
    attempt           INTEGER NOT NULL DEFAULT 0,
    max_attempts      INTEGER NOT NULL CHECK (max_attempts > 0),
    failures          INTEGER NOT NULL DEFAULT 0,
    timeout_ms        INTEGER NOT NULL,
    worker_id         TEXT,
    job_id            TEXT REFERENCES jobs (id),
    idempotency_key   TEXT UNIQUE,
    result            BLOB,
    error             TEXT,
    run_after         INTEGER NOT NULL,
    lease_expires_at  INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    assigned_at       INTEGER,
    started_at        INTEGER,
    finished_at       INTEGER,
    session_id        TEXT,
    traceparent       TEXT,
    parents           INTEGER,
    blocked_on        INTEGER,
    dependents        INTEGER,
    on_parent_failure TEXT CHECK (on_parent_failure IN ('fail', 'cancel'))
);
INSERT INTO tasks_new (id, task_type, payload, status, priority, attempt, max_attempts, failures, timeout_ms,
                       worker_id, job_id, idempotency_key, result, error, run_after, lease_expires_at,
                       created_at, updated_at, assigned_at, started_at, finished_at, session_id, traceparent)
SELECT id, task_type, payload, status, priority, attempt, max_attempts, failures, timeout_ms,
       worker_id, job_id, idempotency_key, result, error, run_after, lease_expires_at,
       created_at, updated_at, assigned_at, started_at, finished_at, session_id, traceparent
FROM tasks;

CREATE TABLE job_tasks_new (
    job_id    TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    position  INTEGER NOT NULL,
    task_id   TEXT NOT NULL,
    PRIMARY KEY (job_id, position)
);
INSERT INTO job_tasks_new (job_id, position, task_id) SELECT job_id, position, task_id FROM job_tasks;

CREATE TABLE task_attempts_new (
    task_id      TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    worker_id    TEXT NOT NULL,
    assigned_at  INTEGER NOT NULL,
    started_at   INTEGER,
    finished_at  INTEGER,
    outcome      TEXT,
    error        TEXT,
    PRIMARY KEY (task_id, attempt)
);
INSERT INTO task_attempts_new SELECT task_id, attempt, worker_id, assigned_at, started_at, finished_at, outcome, error
FROM task_attempts;

DROP TABLE job_tasks;
DROP TABLE task_attempts;
DROP TABLE tasks;
ALTER TABLE tasks_new RENAME TO tasks;
ALTER TABLE job_tasks_new RENAME TO job_tasks;
ALTER TABLE task_attempts_new RENAME TO task_attempts;

CREATE INDEX tasks_runnable ON tasks (priority DESC, id) WHERE status = 'pending';
CREATE INDEX tasks_runnable_by_type ON tasks (task_type, priority DESC, id) WHERE status = 'pending';
CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE status IN ('assigned', 'running');
CREATE INDEX tasks_worker ON tasks (worker_id) WHERE status IN ('assigned', 'running');
CREATE INDEX tasks_status ON tasks (status, id) WHERE status IN ('blocked', 'pending', 'assigned', 'running');
CREATE INDEX tasks_finished ON tasks (status, finished_at) WHERE status IN ('completed', 'failed', 'cancelled');
CREATE INDEX tasks_job ON tasks (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX tasks_failed_finished ON tasks (finished_at) WHERE status = 'failed';
CREATE INDEX tasks_completed_by ON tasks (worker_id) WHERE status = 'completed';
CREATE INDEX job_tasks_task ON job_tasks (task_id);
CREATE INDEX task_attempts_worker ON task_attempts (worker_id, outcome);

CREATE TABLE task_parents (
    child     TEXT NOT NULL,
    position  INTEGER NOT NULL,
    parent    TEXT NOT NULL,
    PRIMARY KEY (child, position)
);
CREATE INDEX task_parents_parent ON task_parents (parent);
