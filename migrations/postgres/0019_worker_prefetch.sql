-- Assignments the worker queues beyond max_concurrent_tasks, as its session registered them:
-- listings show a worker's in-flight count against both.
ALTER TABLE workers ADD COLUMN prefetch INTEGER NOT NULL DEFAULT 0;
