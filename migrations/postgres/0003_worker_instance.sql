-- The process a worker registered from. A worker that registers again lists the tasks it holds;
-- whatever the store has for it beyond that list is given back at once: uncharged when the
-- process is the same (the assignment never arrived), charged when it is a new process (the
-- attempt died with the old one).
ALTER TABLE workers ADD COLUMN instance_id TEXT;
