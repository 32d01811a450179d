-- Coordinator schema (SQLite). Same shape as the Postgres schema; ids are TEXT (UUID strings) and
-- timestamps are INTEGER microseconds since the Unix epoch, so they compare and sort as numbers.

CREATE TABLE jobs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL DEFAULT '',
    total       INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE tasks (
    id               TEXT PRIMARY KEY,
    task_type        TEXT NOT NULL,
    payload          BLOB NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'assigned', 'running', 'completed', 'failed', 'cancelled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts > 0),
    failures         INTEGER NOT NULL DEFAULT 0,
    timeout_ms       INTEGER NOT NULL,
    worker_id        TEXT,
    job_id           TEXT REFERENCES jobs (id),
    idempotency_key  TEXT UNIQUE,
    result           BLOB,
    error            TEXT,
    run_after        INTEGER NOT NULL,
    lease_expires_at INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    assigned_at      INTEGER,
    started_at       INTEGER,
    finished_at      INTEGER
);

CREATE INDEX tasks_runnable ON tasks (priority DESC, id) WHERE status = 'pending';
CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE status IN ('assigned', 'running');
CREATE INDEX tasks_worker ON tasks (worker_id) WHERE status IN ('assigned', 'running');
CREATE INDEX tasks_status ON tasks (status, id);

-- Members of each job, in submission order. A task found by its idempotency key belongs to the
-- job that created it (tasks.job_id) and to every job whose submission returned it.
CREATE TABLE job_tasks (
    job_id    TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    position  INTEGER NOT NULL,
    task_id   TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    PRIMARY KEY (job_id, position)
);

CREATE INDEX job_tasks_task ON job_tasks (task_id);

CREATE TABLE task_attempts (
    task_id      TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    worker_id    TEXT NOT NULL,
    assigned_at  INTEGER NOT NULL,
    started_at   INTEGER,
    finished_at  INTEGER,
    outcome      TEXT,
    error        TEXT,
    PRIMARY KEY (task_id, attempt)
);

CREATE INDEX task_attempts_worker ON task_attempts (worker_id, outcome);

CREATE TABLE workers (
    id                   TEXT PRIMARY KEY,
    state                TEXT NOT NULL CHECK (state IN ('active', 'suspect', 'dead', 'draining')),
    max_concurrent_tasks INTEGER NOT NULL,
    capabilities         TEXT NOT NULL DEFAULT '[]',
    labels               TEXT NOT NULL DEFAULT '{}',
    version              TEXT NOT NULL DEFAULT '',
    hostname             TEXT NOT NULL DEFAULT '',
    session_id           TEXT NOT NULL,
    coordinator_id       TEXT NOT NULL,
    registered_at        INTEGER NOT NULL,
    last_heartbeat_at    INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
);
