-- Retention: the pruner finds finished tasks of each state oldest first, jobs by age, and the
-- tasks still pointing at a job it would delete (only tasks in jobs carry a job id).
CREATE INDEX tasks_finished ON tasks (status, finished_at) WHERE status IN ('completed', 'failed', 'cancelled');
CREATE INDEX tasks_job ON tasks (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX jobs_created ON jobs (created_at);
