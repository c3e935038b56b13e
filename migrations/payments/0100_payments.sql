-- Payments: attempts at Midtrans (one row per order_id), the idempotency
-- store of `POST /api/payments`, every notification as received (the audit
-- trail), and refunds. Amounts are whole rupiah (BIGINT); instants are UTC
-- milliseconds. Nothing here is ever deleted but expired idempotency keys.

CREATE TABLE payments (
    id TEXT PRIMARY KEY,
    invoice_id TEXT NOT NULL,
    invoice_number TEXT NOT NULL,
    -- 1, 2, ... per invoice; order_id = invoice number (/ as -) + attempt.
    attempt INTEGER NOT NULL,
    order_id TEXT NOT NULL,
    -- snap, credit_card, bca_va, ... as the client chose.
    method TEXT NOT NULL,
    -- Midtrans's payment_type once known (what Snap's customer picked).
    channel TEXT,
    -- The state machine's state (state.rs).
    status TEXT NOT NULL,
    amount BIGINT NOT NULL,
    currency TEXT NOT NULL,
    subject_kind TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    -- The invoice while this attempt can still be paid: one open payment
    -- per invoice (NULL once it is paid, failed, cancelled or expired).
    open_invoice TEXT,
    transaction_id TEXT,
    fraud_status TEXT,
    -- What the customer needs to pay (JSON): VA number and bank, bill key
    -- and biller code, QR string, deeplink, redirect URL, Snap token.
    instructions TEXT,
    -- The charge request (JSON) until Midtrans has answered it: a retry
    -- after a crash sends the same one.
    request TEXT,
    -- Midtrans's last status_message, for support.
    status_message TEXT,
    refunded BIGINT NOT NULL,
    -- Midtrans confirmed another amount or currency: flagged, never settled.
    mismatch INTEGER NOT NULL,
    expires_at BIGINT,
    -- When the janitor next asks Midtrans; NULL: it need not.
    next_check_at BIGINT,
    checks INTEGER NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    paid_at BIGINT,
    CONSTRAINT payments_order_key UNIQUE (order_id),
    CONSTRAINT payments_open_key UNIQUE (open_invoice),
    CONSTRAINT payments_attempt_key UNIQUE (invoice_id, attempt)
);
CREATE INDEX payments_subject ON payments (subject_kind, subject_id, created_at);
CREATE INDEX payments_check ON payments (next_check_at);

-- `POST /api/payments` by (subject, Idempotency-Key): the request's hash,
-- the payment it made and, once final, the answer replayed to a retry.
-- `locked_until`: a request holding the key; a retry after it passed (the
-- holder died) takes over.
CREATE TABLE payment_requests (
    scope TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    payment_id TEXT,
    status_code INTEGER,
    response TEXT,
    locked_until BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (scope, idem_key)
);
CREATE INDEX payment_requests_created ON payment_requests (created_at);

-- Every notification with a valid signature, as received (the signature
-- itself left out), and what it did.
CREATE TABLE notifications (
    id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    transaction_status TEXT,
    body TEXT NOT NULL,
    outcome TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE INDEX notifications_order ON notifications (order_id, received_at);

-- Refunds, at Midtrans or recorded by hand (a bank transfer back).
-- `idem_key` is the admin's Idempotency-Key: the same key never refunds
-- twice; the row id is the refund_key sent to Midtrans.
CREATE TABLE refunds (
    id TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL REFERENCES payments (id),
    idem_key TEXT NOT NULL,
    amount BIGINT NOT NULL,
    reason TEXT NOT NULL,
    -- requested, done, failed.
    status TEXT NOT NULL,
    manual INTEGER NOT NULL,
    reference TEXT,
    status_message TEXT,
    by_user TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    completed_at BIGINT,
    CONSTRAINT refunds_key UNIQUE (payment_id, idem_key)
);
