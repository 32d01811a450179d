-- A job's members without a row of their own.
--
-- Every task a job submission creates belongs to that job (tasks.job_id) at its position in the
-- submission (tasks.job_position): one row per task instead of two. job_tasks keeps only the
-- members a job shares with another: a task returned to the submission by its idempotency key
-- (created earlier, alone or by another job). job_members is the union, the one place a job's
-- members are read from.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS job_position INTEGER;

UPDATE tasks t SET job_position = j.position
FROM job_tasks j
WHERE j.task_id = t.id AND j.job_id = t.job_id AND t.job_position IS NULL;

DELETE FROM job_tasks j USING tasks t
WHERE t.id = j.task_id AND t.job_id = j.job_id AND t.job_position = j.position;

CREATE OR REPLACE VIEW job_members AS
    SELECT job_id, job_position AS position, id AS task_id FROM tasks
    WHERE job_id IS NOT NULL AND job_position IS NOT NULL
    UNION ALL
    SELECT job_id, position, task_id FROM job_tasks;
