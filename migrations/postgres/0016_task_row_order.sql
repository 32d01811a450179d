-- The columns of `tasks` in a new order: what a task is given at submission first, what an
-- attempt changes last, in the order a claim and a completion change it.
--
-- An update whose new version fits on its row's page logs only the bytes between the first and
-- the last that differ from the version before. With the status near the front of the row and
-- the times at the back, a claim and a completion each logged almost the whole row: about 110
-- of a task's 1,500 bytes of WAL were columns neither changed. Now a claim changes `attempt`
-- to `updated_at` (and `started_at` on a retry), a completion `status` to `result`. Postgres cannot reorder the
-- columns of a table, so this rewrites it under an exclusive lock (replicas still running wait
-- for it; see docs/operations.md on upgrades), then builds its indexes again. The new table is
-- left unanalyzed, as a new one is: statistics of an empty table would make a connection's
-- batch statements plan for a table of no rows (autovacuum analyzes it once it has rows).
-- The view first: a read of job_members locks the view, then tasks. Locking tasks first would let
-- such a read hold the view while this waits for it, and each wait for the other.
DROP VIEW IF EXISTS job_members;

LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE;

CREATE TABLE tasks_reordered (
    id                UUID NOT NULL,
    timeout_ms        BIGINT NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    run_after         TIMESTAMPTZ NOT NULL DEFAULT now(),
    priority          INTEGER NOT NULL DEFAULT 0,
    max_attempts      INTEGER NOT NULL CONSTRAINT tasks_max_attempts_check CHECK (max_attempts > 0),
    job_id            UUID,
    job_position      INTEGER,
    parents           INTEGER,
    blocked_on        INTEGER,
    dependents        INTEGER,
    weight            INTEGER,
    task_type         TEXT NOT NULL,
    idempotency_key   TEXT,
    traceparent       TEXT,
    on_parent_failure TEXT CONSTRAINT tasks_on_parent_failure_check CHECK (on_parent_failure IN ('fail', 'cancel')),
    requires          TEXT,
    affinity_key      TEXT,
    payload           BYTEA NOT NULL,
    failures          INTEGER NOT NULL DEFAULT 0,
    -- What an attempt changes: a claim from here ...
    attempt           INTEGER NOT NULL DEFAULT 0,
    worker_id         TEXT,
    session_id        UUID,
    assigned_at       TIMESTAMPTZ,
    -- ... a completion from here ...
    status            TEXT NOT NULL DEFAULT 'pending' CONSTRAINT tasks_status_check
                      CHECK (status IN ('blocked', 'pending', 'assigned', 'running', 'completed', 'failed', 'cancelled')),
    lease_expires_at  TIMESTAMPTZ,
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- ... (a claim to here) ...
    started_at        TIMESTAMPTZ,
    finished_at       TIMESTAMPTZ,
    result            BYTEA,
    -- ... to here.
    error             TEXT
) WITH (fillfactor = 70);

INSERT INTO tasks_reordered (
    id, timeout_ms, created_at, run_after, priority, max_attempts, job_id, job_position, parents,
    blocked_on, dependents, weight, task_type, idempotency_key, traceparent, on_parent_failure,
    requires, affinity_key, payload, failures, attempt, worker_id, session_id, assigned_at, status,
    lease_expires_at, updated_at, started_at, finished_at, result, error)
SELECT
    id, timeout_ms, created_at, run_after, priority, max_attempts, job_id, job_position, parents,
    blocked_on, dependents, weight, task_type, idempotency_key, traceparent, on_parent_failure,
    requires, affinity_key, payload, failures, attempt, worker_id, session_id, assigned_at, status,
    lease_expires_at, updated_at, started_at, finished_at, result, error
FROM tasks;

DROP TABLE tasks;
ALTER TABLE tasks_reordered RENAME TO tasks;

-- The indexes of 0014 and 0009, as they were.
ALTER TABLE tasks ADD CONSTRAINT tasks_pkey PRIMARY KEY (id);
CREATE INDEX tasks_runnable ON tasks (priority DESC, id) WHERE status = 'pending';
CREATE INDEX tasks_runnable_by_type ON tasks (task_type, priority DESC, id) WHERE status = 'pending';
CREATE INDEX tasks_worker ON tasks (worker_id) WHERE status IN ('assigned', 'running');
CREATE INDEX tasks_status ON tasks (status, id) WHERE status IN ('blocked', 'pending');
CREATE INDEX tasks_finished ON tasks (status, finished_at) WHERE status IN ('completed', 'failed', 'cancelled');
CREATE INDEX tasks_completed_by ON tasks (worker_id) WHERE status = 'completed';
CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key) WHERE idempotency_key IS NOT NULL;

-- The view of 0015, as it was.
CREATE VIEW job_members AS
    SELECT j.id AS job_id, (m.n - 1)::integer AS position, m.task_id
    FROM jobs j CROSS JOIN LATERAL unnest(j.members) WITH ORDINALITY AS m(task_id, n)
    UNION ALL
    SELECT j.id AS job_id, l.position, l.task_id
    FROM jobs j CROSS JOIN LATERAL (
        SELECT t.job_position AS position, t.id AS task_id FROM tasks t
        WHERE t.job_id = j.id AND t.job_position IS NOT NULL
        UNION ALL
        SELECT s.position, s.task_id FROM job_tasks s WHERE s.job_id = j.id
        OFFSET 0
    ) AS l
    WHERE j.members IS NULL;

