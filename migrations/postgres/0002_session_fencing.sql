-- Ownership by session: each assignment records the worker session it was made under, so taking
-- work back from a dead session takes exactly that session's tasks, and a replica that lost a
-- worker to another never touches them. A registration adopts the tasks its worker still holds.
ALTER TABLE tasks ADD COLUMN session_id UUID;

-- Claims take candidates per task type, so one type's backlog never hides another's tasks.
CREATE INDEX tasks_runnable_by_type ON tasks (task_type, priority DESC, id) WHERE status = 'pending';
