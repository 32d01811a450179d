-- A job's idempotency key: a second SubmitJob with the same key returns the job the first one
-- made. Unique where set; the key lives as long as the job's row (retention prunes both).
-- Builds of migration 20 run on this schema: they write no key, and a NULL takes no part in the
-- index.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS idempotency_key TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency_key ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
