-- Which task types the live fleet runs, across replicas: submissions warn about (or refuse) a
-- type no live worker declared, and a pending task says why it waits. Rows of workers that
-- left stay behind, so the live ones are found on an index of their own.
CREATE INDEX workers_live ON workers (last_heartbeat_at) WHERE state IN ('active', 'suspect');
