-- Task dependencies. A task that names parents starts `blocked` and becomes `pending` when the
-- last of them completes: `blocked_on` counts the parents that have not completed yet, `parents`
-- how many it named (its assignment carries their results in that order), `on_parent_failure`
-- what it does when one of them fails for good or is cancelled ('fail' or 'cancel'). A parent
-- counts its dependents in `dependents`: a submission naming it updates its row, so a completion
-- waiting for that row sees the count and looks for the new dependents. All four are NULL for
-- the tasks that have none: nothing is stored for them.
ALTER TABLE tasks DROP CONSTRAINT IF EXISTS tasks_status_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_status_check
    CHECK (status IN ('blocked', 'pending', 'assigned', 'running', 'completed', 'failed', 'cancelled'));
ALTER TABLE tasks ADD COLUMN parents INTEGER;
ALTER TABLE tasks ADD COLUMN blocked_on INTEGER;
ALTER TABLE tasks ADD COLUMN dependents INTEGER;
ALTER TABLE tasks ADD COLUMN on_parent_failure TEXT CHECK (on_parent_failure IN ('fail', 'cancel'));

-- The edges, child first: a child's parents in the order it named them. A parent's completion
-- (or failure) finds its dependents by the second index.
CREATE TABLE task_parents (
    child     UUID NOT NULL,
    position  INTEGER NOT NULL,
    parent    UUID NOT NULL,
    PRIMARY KEY (child, position)
);
CREATE INDEX task_parents_parent ON task_parents (parent);

DROP INDEX IF EXISTS tasks_status;
CREATE INDEX tasks_status ON tasks (status, id) WHERE status IN ('blocked', 'pending', 'assigned', 'running');
