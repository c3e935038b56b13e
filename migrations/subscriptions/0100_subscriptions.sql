-- The subscriptions service's tables. Instants are Unix milliseconds
-- (UTC); amounts whole rupiah before PPN.

-- One subscription per subject (a user, or an organization).
CREATE TABLE subscriptions (
    id TEXT PRIMARY KEY,
    subject_kind TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    -- who acted last for the subject
    user_id TEXT NOT NULL,
    plan TEXT NOT NULL,
    cycle TEXT NOT NULL,
    -- pending | active | past_due | canceled | expired
    state TEXT NOT NULL,
    -- periods are computed from it in the business calendar
    anchor_at BIGINT NOT NULL,
    period_start BIGINT NOT NULL,
    period_end BIGINT NOT NULL,
    cancel_at_period_end INTEGER NOT NULL DEFAULT 0,
    -- a downgrade, taking effect at the period's end
    scheduled_plan TEXT,
    scheduled_cycle TEXT,
    created_at BIGINT NOT NULL,
    -- optimistic concurrency: every write checks the value it read
    updated_at BIGINT NOT NULL,
    CONSTRAINT subscriptions_subject UNIQUE (subject_kind, subject_id)
);
CREATE INDEX subscriptions_due ON subscriptions (state, period_end);

-- What a subject asked for and what renews it: each change is billed by
-- one invoice and applied when that invoice is paid.
CREATE TABLE changes (
    id TEXT PRIMARY KEY,
    subject_kind TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    -- checkout | renewal
    kind TEXT NOT NULL,
    plan TEXT NOT NULL,
    cycle TEXT NOT NULL,
    -- the plan it replaces (a checkout from a paid plan)
    from_plan TEXT,
    -- the unused part of the replaced plan's period, credited
    credit BIGINT NOT NULL DEFAULT 0,
    -- JSON: how the credit was computed
    credit_detail TEXT,
    -- JSON: the invoice lines asked of billing
    lines TEXT NOT NULL,
    -- creating (billing not answered yet) | pending | applied | superseded
    status TEXT NOT NULL,
    -- a checkout's Idempotency-Key and the SHA-256 of its request
    idem_key TEXT,
    request_hash TEXT,
    -- a renewal's <subscription id>:<period start>: one invoice per period
    renewal_key TEXT,
    invoice_id TEXT,
    invoice_number TEXT,
    invoice_total BIGINT,
    -- the checkout's answer, replayed for the same key
    answer TEXT,
    applied_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    CONSTRAINT changes_key UNIQUE (subject_kind, subject_id, idem_key),
    CONSTRAINT changes_renewal UNIQUE (renewal_key)
);
CREATE INDEX changes_subject ON changes (subject_kind, subject_id, status);
CREATE INDEX changes_invoice ON changes (invoice_id);
