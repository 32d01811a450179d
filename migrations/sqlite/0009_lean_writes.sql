-- A completed attempt is recorded in its task's row only (attempt rows are written for attempts
-- that end otherwise): a worker's completed tasks are found here.
CREATE INDEX tasks_completed_by ON tasks (worker_id) WHERE status = 'completed';

-- Listing by status only needs an index for the states that are few.
DROP INDEX IF EXISTS tasks_status;
CREATE INDEX tasks_status ON tasks (status, id) WHERE status IN ('pending', 'assigned', 'running');
