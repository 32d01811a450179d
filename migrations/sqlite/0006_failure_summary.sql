-- The failures summary counts the failed tasks that finished in a time window: an index of
-- their own keeps that read off the rest of the table.
CREATE INDEX tasks_failed_finished ON tasks (finished_at) WHERE status = 'failed';
