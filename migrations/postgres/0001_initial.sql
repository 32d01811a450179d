-- Coordinator schema (Postgres). Every task transition is a conditional UPDATE on `tasks`
-- checking status, worker_id and attempt; `task_attempts` keeps the history of each assignment.

CREATE TABLE jobs (
    id          UUID PRIMARY KEY,
    name        TEXT NOT NULL DEFAULT '',
    total       INTEGER NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE tasks (
    id               UUID PRIMARY KEY,
    task_type        TEXT NOT NULL,
    payload          BYTEA NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'assigned', 'running', 'completed', 'failed', 'cancelled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    -- Fencing token: incremented on every assignment.
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts > 0),
    -- Attempts charged against max_attempts.
    failures         INTEGER NOT NULL DEFAULT 0,
    timeout_ms       BIGINT NOT NULL,
    worker_id        TEXT,
    job_id           UUID REFERENCES jobs (id),
    idempotency_key  TEXT UNIQUE,
    result           BYTEA,
    error            TEXT,
    run_after        TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_expires_at TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    assigned_at      TIMESTAMPTZ,
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ
);

-- The claim: highest priority first, then oldest (ids are UUIDv7).
CREATE INDEX tasks_runnable ON tasks (priority DESC, id) WHERE status = 'pending';
-- The sweeper: leases that ran out.
CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE status IN ('assigned', 'running');
-- Requeue all tasks of a worker; in-flight counts.
CREATE INDEX tasks_worker ON tasks (worker_id) WHERE status IN ('assigned', 'running');
CREATE INDEX tasks_status ON tasks (status, id);

-- Members of each job, in submission order. A task found by its idempotency key belongs to the
-- job that created it (tasks.job_id) and to every job whose submission returned it.
CREATE TABLE job_tasks (
    job_id    UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    position  INTEGER NOT NULL,
    task_id   UUID NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    PRIMARY KEY (job_id, position)
);

CREATE INDEX job_tasks_task ON job_tasks (task_id);

CREATE TABLE task_attempts (
    task_id      UUID NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    worker_id    TEXT NOT NULL,
    assigned_at  TIMESTAMPTZ NOT NULL,
    started_at   TIMESTAMPTZ,
    finished_at  TIMESTAMPTZ,
    -- completed | failed | lease_expired | worker_dead | undelivered | cancelled
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
    session_id           UUID NOT NULL,
    coordinator_id       TEXT NOT NULL,
    registered_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_heartbeat_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);
