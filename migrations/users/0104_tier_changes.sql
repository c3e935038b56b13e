-- The tier change feed: one row per change of a user's or an
-- organization's tier, in the order the changes committed, read by the
-- gateways (GET /internal/tier-changes) so a change reaches admission
-- without waiting for the next access token.
--
-- `seq` comes from the one-row counter below, incremented in the
-- transaction that changes the tier: the counter's row lock is held to
-- commit, so a reader that has seen seq N has seen every change below N
-- (no row commits later with a smaller number).
CREATE TABLE tier_change_counter (
    id INTEGER PRIMARY KEY,
    last BIGINT NOT NULL
);
INSERT INTO tier_change_counter (id, last) VALUES (1, 0);

CREATE TABLE tier_changes (
    seq BIGINT PRIMARY KEY,
    -- `user` or `organization`.
    subject_kind TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    -- When this service applied it (ms): tokens issued before carry the
    -- old tier.
    applied_at BIGINT NOT NULL
);
CREATE INDEX tier_changes_by_time ON tier_changes (applied_at);
