-- Replicas and when each was last seen. A replica refreshes its row every few seconds and writes
-- each state change of its workers (suspect, dead, draining, active again) as it happens, so
-- while a worker's replica is alive its row's state is current, and heartbeats need not reach
-- the database: `workers.last_heartbeat_at` is written about once a minute per worker. When the
-- replica is gone, the worker's own heartbeat time says how long it has been silent.
CREATE TABLE coordinators (
    id            TEXT PRIMARY KEY,
    started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
