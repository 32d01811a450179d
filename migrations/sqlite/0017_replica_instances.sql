-- Which process holds each replica's name: a random id per start (see the Postgres migration).
ALTER TABLE coordinators ADD COLUMN instance_id TEXT;
