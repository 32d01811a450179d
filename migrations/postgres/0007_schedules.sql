-- Recurring schedules: each due occurrence creates one task from the template. The replica that
-- fires a schedule holds its row locked while it creates the occurrence's task (idempotency key
-- `schedule:<id>:<occurrence>`) and moves next_run_at on, in one transaction, so each occurrence
-- is created once across replicas.
CREATE TABLE schedules (
    id            UUID PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    cron          TEXT NOT NULL,
    timezone      TEXT NOT NULL,
    task_type     TEXT NOT NULL,
    payload       BYTEA NOT NULL,
    priority      INTEGER NOT NULL,
    max_attempts  INTEGER NOT NULL CHECK (max_attempts > 0),
    timeout_ms    BIGINT NOT NULL,
    missed        TEXT NOT NULL CHECK (missed IN ('latest', 'skip', 'all')),
    paused        BOOLEAN NOT NULL DEFAULT false,
    -- NULL: the expression matches no later time; the schedule has ended.
    next_run_at   TIMESTAMPTZ,
    last_run_at   TIMESTAMPTZ,
    runs          BIGINT NOT NULL DEFAULT 0,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX schedules_due ON schedules (next_run_at) WHERE NOT paused;
