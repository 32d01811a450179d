-- Fewer index entries per task.
--
-- Every status change is an update that cannot be HOT (the status is in index predicates), so
-- each new version of a task's row takes an entry in every index whose predicate it meets. Only
-- the indexes a lookup needs stay, and each only for the states that lookup reads:
--   pending:   tasks_pkey, tasks_runnable, tasks_runnable_by_type, tasks_status
--   assigned:  tasks_pkey, tasks_worker
--   completed: tasks_pkey, tasks_finished, tasks_completed_by

-- Expired leases are looked for among the tasks out on workers (tasks_worker holds them all,
-- bounded by the fleet's slots); the lease itself is not indexed, so a renewal that changes
-- nothing else can be a HOT update.
DROP INDEX IF EXISTS tasks_lease;

-- Listing by status: the states that can pile up. Tasks out on workers are found by
-- tasks_worker.
DROP INDEX IF EXISTS tasks_status;
CREATE INDEX tasks_status ON tasks (status, id) WHERE status IN ('blocked', 'pending');

-- tasks_finished (status, finished_at) answers what this one did.
DROP INDEX IF EXISTS tasks_failed_finished;

-- Room on each page for a task's next versions: a status change that stays on its page writes
-- a smaller record and no separate lock of the old version. Applies to pages written from now on.
ALTER TABLE tasks SET (fillfactor = 70);
