-- Whether the worker's process is connected to its replica (coordinator_id): set by each
-- registration, cleared by that replica when the session's task stream closes or when the
-- replica stops. Another replica reads it to tell a second live process under a worker id
-- (refused) from a restart (a new process whose predecessor is gone).
ALTER TABLE workers ADD COLUMN connected BOOLEAN NOT NULL DEFAULT false;
