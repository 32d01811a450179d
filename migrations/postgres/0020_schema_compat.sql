-- The oldest build that can run on this schema, named by the last migration it knows. A build
-- that finds migrations newer than its own on the database (a replica of the earlier version
-- restarted during an upgrade, or every replica after a roll-back) starts, with a warning, as
-- long as it is not older than this; otherwise it stops with one line saying so. A migration
-- that earlier builds cannot run on raises it.
CREATE TABLE schema_compat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    oldest_build INTEGER NOT NULL
);
INSERT INTO schema_compat (id, oldest_build) VALUES (1, 20);
