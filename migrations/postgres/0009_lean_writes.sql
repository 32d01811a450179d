-- Fewer writes per task on the hot path.
--
-- Foreign keys from tasks, job_tasks and task_attempts made Postgres share-lock the parent row
-- (a task, or the one job row every member of a job points at) on each insert: a lock written
-- to the WAL and contended across a job's inserts. The store writes these rows itself and keeps
-- them consistent: members and attempts are inserted with or after their task in one
-- transaction, and the pruner deletes them before their task and a job only once it has no
-- members left.
ALTER TABLE tasks DROP CONSTRAINT IF EXISTS tasks_job_id_fkey;
ALTER TABLE job_tasks DROP CONSTRAINT IF EXISTS job_tasks_job_id_fkey;
ALTER TABLE job_tasks DROP CONSTRAINT IF EXISTS job_tasks_task_id_fkey;
ALTER TABLE task_attempts DROP CONSTRAINT IF EXISTS task_attempts_task_id_fkey;

-- Idempotency keys are unique where they are given. Most tasks have none, and a full unique
-- index took an entry for their NULL on every insert and every status change.
ALTER TABLE tasks DROP CONSTRAINT IF EXISTS tasks_idempotency_key_key;
CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Listing by status only needs an index for the states that are few; finished tasks are most of
-- the table and are found in id order directly (and by tasks_finished for retention).
DROP INDEX IF EXISTS tasks_status;
CREATE INDEX tasks_status ON tasks (status, id) WHERE status IN ('pending', 'assigned', 'running');

-- A completed attempt is recorded in its task's row only (attempt rows are written for attempts
-- that end otherwise): a worker's completed tasks are found here.
CREATE INDEX tasks_completed_by ON tasks (worker_id) WHERE status = 'completed';
