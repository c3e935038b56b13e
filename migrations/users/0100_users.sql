-- The users service's tables. Ids are UUIDv7 text, times Unix ms, so the
-- same SQL runs on SQLite and PostgreSQL. Emails are stored lower-cased;
-- tokens only as SHA-256 hashes, so a database leak reveals none.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    email_verified_at BIGINT,
    roles TEXT NOT NULL,
    tier TEXT NOT NULL,
    -- occurred_at of the subscription event that set `tier`: an older
    -- event delivered late must not undo a newer one.
    tier_changed_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Single-use tokens: e-mail verification and password reset.
CREATE TABLE one_time_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id),
    purpose TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    created_at BIGINT NOT NULL
);

-- Refresh tokens, rotated on every use. A family is one login's chain of
-- rotations; presenting a rotated token again revokes the whole family.
CREATE TABLE refresh_tokens (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id),
    family_id TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    rotated_at BIGINT,
    revoked_at BIGINT
);

CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);
