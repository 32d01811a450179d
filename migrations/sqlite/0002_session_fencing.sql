-- Ownership by session: each assignment records the worker session it was made under, so taking
-- work back from a dead session takes exactly that session's tasks. A registration adopts the
-- tasks its worker still holds.
ALTER TABLE tasks ADD COLUMN session_id TEXT;
