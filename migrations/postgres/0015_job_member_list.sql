-- A job lists its members in its own row.
--
-- tasks_job (job_id) took an entry for each of the three versions a job's task writes (pending,
-- assigned, finished): about 240 bytes of WAL per task, a quarter of its index entries, to
-- answer reads that come once per job. jobs.members holds the job's task ids in submission
-- order (a task named twice, by the same idempotency key, twice), written once with the job;
-- its members are then read by key. tasks.job_id and job_position stay as they are, unindexed.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS members UUID[];

-- Every job stored so far, from what lists its members now (tasks_job still serves the lookup).
-- A job whose tasks were all pruned gets an empty list.
UPDATE jobs j SET members = COALESCE(
    (SELECT array_agg(m.task_id ORDER BY m.position) FROM job_members m WHERE m.job_id = j.id),
    '{}')
WHERE j.members IS NULL;

-- The members of a job: its list, or, for a job written without one (by a replica of an earlier
-- version while replicas are being upgraded), the tasks that name it and its job_tasks rows. The
-- second branch reads tasks only for such a job (OFFSET 0 keeps it a per-job lookup that is never
-- run when no job lacks a list), by a scan now that tasks_job is gone.
DROP VIEW IF EXISTS job_members;
CREATE VIEW job_members AS
    SELECT j.id AS job_id, (m.n - 1)::integer AS position, m.task_id
    FROM jobs j CROSS JOIN LATERAL unnest(j.members) WITH ORDINALITY AS m(task_id, n)
    UNION ALL
    SELECT j.id AS job_id, l.position, l.task_id
    FROM jobs j CROSS JOIN LATERAL (
        SELECT t.job_position AS position, t.id AS task_id FROM tasks t
        WHERE t.job_id = j.id AND t.job_position IS NOT NULL
        UNION ALL
        SELECT s.position, s.task_id FROM job_tasks s WHERE s.job_id = j.id
        OFFSET 0
    ) AS l
    WHERE j.members IS NULL;

DROP INDEX IF EXISTS tasks_job;
