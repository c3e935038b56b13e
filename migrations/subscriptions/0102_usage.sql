-- Usage the gateway metered. Each batch is counted once (its id is
-- remembered); its rows are summed per subject, user, route and business
-- day (YYYY-MM-DD in the business time zone).
CREATE TABLE usage_batches (
    batch_id TEXT PRIMARY KEY,
    -- the gateway's service name
    source TEXT NOT NULL,
    row_count BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE INDEX usage_batches_received ON usage_batches (received_at);

CREATE TABLE usage_daily (
    subject_kind TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    day TEXT NOT NULL,
    user_id TEXT NOT NULL,
    route TEXT NOT NULL,
    requests BIGINT NOT NULL,
    PRIMARY KEY (subject_kind, subject_id, day, user_id, route)
);
CREATE INDEX usage_daily_day ON usage_daily (day, user_id);
