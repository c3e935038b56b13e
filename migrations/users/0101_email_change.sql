-- A verification link can also confirm a new address: `email` holds the
-- address a pending change would switch to (NULL for the registration
-- link, which verifies the current one).
ALTER TABLE one_time_tokens ADD COLUMN email TEXT;
CREATE INDEX one_time_tokens_user ON one_time_tokens (user_id, purpose, created_at);
