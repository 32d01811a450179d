-- Replicas and when each was last seen (microseconds since the epoch). A replica refreshes its row
-- every few seconds and writes each state change of its workers as it happens, so while a
-- worker's replica is alive its row's state is current, and heartbeats need not reach the
-- database: `workers.last_heartbeat_at` is written about once a minute per worker.
CREATE TABLE coordinators (
    id            TEXT PRIMARY KEY,
    started_at    INTEGER NOT NULL,
    last_seen_at  INTEGER NOT NULL
);
