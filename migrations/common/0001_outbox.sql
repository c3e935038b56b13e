-- Transactional outbox and consumer dedupe, shared by every service.
-- An event is written in the same transaction as the change it reports
-- (outbox_events), with one delivery row per subscriber, so nothing is
-- lost between commit and delivery. processed_events makes consumers
-- idempotent: an event id is applied once per consumer.
CREATE TABLE outbox_events (
    id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE outbox_deliveries (
    event_id TEXT NOT NULL REFERENCES outbox_events (id),
    subscriber TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    delivered_at BIGINT,
    last_error TEXT,
    PRIMARY KEY (event_id, subscriber)
);

CREATE INDEX outbox_deliveries_due ON outbox_deliveries (delivered_at, next_attempt_at);

CREATE TABLE processed_events (
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    processed_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
