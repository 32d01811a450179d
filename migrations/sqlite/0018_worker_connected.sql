-- Whether the worker's process is connected to its replica (see the Postgres migration).
ALTER TABLE workers ADD COLUMN connected BOOLEAN NOT NULL DEFAULT 0;
