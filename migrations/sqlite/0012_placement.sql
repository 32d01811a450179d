-- Placement beyond task types: what a task asks of its worker, and per-type concurrency limits.
-- Each new task column is NULL when the task asks nothing of it.

-- Label requirements as JSON text: {"eq": ["key=value", ...], "min": [["key", number], ...]}.
ALTER TABLE tasks ADD COLUMN requires TEXT;
-- Slots the task takes on its worker, when more than one (checked at submission: a CHECK here
-- would scan the whole table when the column is added).
ALTER TABLE tasks ADD COLUMN weight INTEGER;
-- Tasks with the same key prefer the same worker.
ALTER TABLE tasks ADD COLUMN affinity_key TEXT;

-- At most max_in_flight tasks of a type assigned or running at once. `source` says who set it:
-- limits from the configuration are written at startup; an admin's limit stays until cleared.
CREATE TABLE type_limits (
    task_type     TEXT PRIMARY KEY,
    max_in_flight INTEGER NOT NULL CHECK (max_in_flight >= 0),
    source        TEXT NOT NULL CHECK (source IN ('config', 'admin')),
    updated_at    INTEGER NOT NULL
);
