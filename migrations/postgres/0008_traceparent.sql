-- The W3C trace context a task was submitted under (`00-<trace id>-<span id>-<flags>`), sent
-- with each assignment so the worker continues the submitter's trace. NULL: none.
ALTER TABLE tasks ADD COLUMN traceparent TEXT;
