-- A job's members without a row of their own: a task a job submission creates belongs to that
-- job (tasks.job_id) at its position (tasks.job_position); job_tasks keeps only the members a job
-- shares with another (returned by an idempotency key). job_members is the union.
ALTER TABLE tasks ADD COLUMN job_position INTEGER;

UPDATE tasks SET job_position = (
    SELECT j.position FROM job_tasks j WHERE j.task_id = tasks.id AND j.job_id = tasks.job_id
)
WHERE job_id IS NOT NULL;

DELETE FROM job_tasks
WHERE EXISTS (
    SELECT 1 FROM tasks t
    WHERE t.id = job_tasks.task_id AND t.job_id = job_tasks.job_id AND t.job_position = job_tasks.position
);

CREATE VIEW job_members AS
    SELECT job_id, job_position AS position, id AS task_id FROM tasks
    WHERE job_id IS NOT NULL AND job_position IS NOT NULL
    UNION ALL
    SELECT job_id, position, task_id FROM job_tasks;
