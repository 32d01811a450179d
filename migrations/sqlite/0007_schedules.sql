-- Recurring schedules (see the Postgres migration). Times are INTEGER microseconds.
CREATE TABLE schedules (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    cron          TEXT NOT NULL,
    timezone      TEXT NOT NULL,
    task_type     TEXT NOT NULL,
    payload       BLOB NOT NULL,
    priority      INTEGER NOT NULL,
    max_attempts  INTEGER NOT NULL CHECK (max_attempts > 0),
    timeout_ms    INTEGER NOT NULL,
    missed        TEXT NOT NULL CHECK (missed IN ('latest', 'skip', 'all')),
    paused        INTEGER NOT NULL DEFAULT 0,
    next_run_at   INTEGER,
    last_run_at   INTEGER,
    runs          INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE INDEX schedules_due ON schedules (next_run_at) WHERE NOT paused;
