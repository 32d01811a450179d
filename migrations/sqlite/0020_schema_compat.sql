-- The oldest build that can run on this schema (see the Postgres migration).
CREATE TABLE schema_compat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    oldest_build INTEGER NOT NULL
);
INSERT INTO schema_compat (id, oldest_build) VALUES (1, 20);
