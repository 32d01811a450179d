-- Which process holds each replica's name: a random id per start. A replica that finds its name
-- refreshed by another running process refuses to start, and one whose row another process
-- writes while it runs says so (two replicas given the same coordinator.id).
ALTER TABLE coordinators ADD COLUMN instance_id TEXT;
