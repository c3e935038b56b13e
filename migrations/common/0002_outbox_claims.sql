-- Deliveries are claimed before they are sent, so several instances of a
-- service never send the same delivery at once (claim, claimed_until: the
-- claimer's token and until when the claim holds; an expired claim is
-- taken over). A delivery that can never succeed (a permanent 4xx, or too
-- many attempts) is parked as dead (dead_at) instead of retried for ever;
-- `tiergate events retry` puts it back.
ALTER TABLE outbox_deliveries ADD COLUMN claim TEXT;
ALTER TABLE outbox_deliveries ADD COLUMN claimed_until BIGINT;
ALTER TABLE outbox_deliveries ADD COLUMN dead_at BIGINT;
CREATE INDEX outbox_deliveries_subscriber_due ON outbox_deliveries (subscriber, next_attempt_at);
