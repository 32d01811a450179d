-- Assignments the worker queues beyond max_concurrent_tasks (see the Postgres migration).
ALTER TABLE workers ADD COLUMN prefetch INTEGER NOT NULL DEFAULT 0;
