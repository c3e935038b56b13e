-- Billing: invoices (numbered at issue, gapless per year), their lines,
-- credit notes (their own gapless series), the payments recorded against
-- invoices, overpayments to resolve, and the daily reconciliation reports.
-- Amounts are whole rupiah (BIGINT); instants are UTC milliseconds.
-- Nothing numbered is ever deleted.

-- One row per series and year: `next` is the last number given. Issuing
-- increments it inside the issuing transaction (the row lock on
-- PostgreSQL, the write transaction on SQLite), so a rolled-back issue
-- gives its number back and no two issues share one.
CREATE TABLE counters (
    series TEXT NOT NULL,
    year INTEGER NOT NULL,
    last BIGINT NOT NULL,
    PRIMARY KEY (series, year)
);

CREATE TABLE invoices (
    id TEXT PRIMARY KEY,
    -- INV/2026/11/000123; NULL while a draft.
    number TEXT,
    -- draft, open, paid, void.
    status TEXT NOT NULL,
    subject_kind TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    -- The person who acted (bought) and their details at issue.
    user_id TEXT NOT NULL,
    buyer_name TEXT NOT NULL,
    buyer_email TEXT NOT NULL,
    buyer_legal_name TEXT,
    buyer_npwp TEXT,
    buyer_nitku TEXT,
    buyer_address TEXT,
    -- What it bills, as the caller named it (JSON), and its canonical key:
    -- the same reference never yields two invoices.
    reference TEXT NOT NULL,
    reference_key TEXT NOT NULL,
    -- SHA-256 of the request that created it: the same reference with a
    -- different request is a conflict.
    request_hash TEXT NOT NULL,
    plan TEXT,
    cycle TEXT,
    period_start BIGINT,
    period_end BIGINT,
    -- The plan's price per cycle before PPN (for MRR: a prorated or
    -- credited invoice still names the full recurring price).
    recurring_price BIGINT,
    currency TEXT NOT NULL,
    subtotal BIGINT NOT NULL,
    dpp BIGINT NOT NULL,
    ppn BIGINT NOT NULL,
    total BIGINT NOT NULL,
    amount_paid BIGINT NOT NULL,
    amount_refunded BIGINT NOT NULL,
    payment_method TEXT,
    -- Faktur Pajak serial (NSFP, 17 digits) once DJP assigns it.
    nsfp TEXT,
    created_at BIGINT NOT NULL,
    issued_at BIGINT,
    due_at BIGINT,
    paid_at BIGINT,
    voided_at BIGINT,
    void_reason TEXT,
    updated_at BIGINT NOT NULL,
    CONSTRAINT invoices_number_key UNIQUE (number),
    CONSTRAINT invoices_reference_key UNIQUE (reference_key)
);
CREATE INDEX invoices_subject ON invoices (subject_kind, subject_id, created_at);
CREATE INDEX invoices_status ON invoices (status, due_at);
CREATE INDEX invoices_issued ON invoices (issued_at);
CREATE INDEX invoices_paid ON invoices (paid_at);
CREATE INDEX invoices_period ON invoices (status, period_end);

CREATE TABLE invoice_lines (
    invoice_id TEXT NOT NULL REFERENCES invoices (id),
    position INTEGER NOT NULL,
    description TEXT NOT NULL,
    quantity BIGINT NOT NULL,
    unit_price BIGINT NOT NULL,
    amount BIGINT NOT NULL,
    PRIMARY KEY (invoice_id, position)
);

-- Rendered documents: an invoice's PDF at issue and again once paid
-- (`kind` = invoice), a credit note's (`kind` = credit_note).
CREATE TABLE documents (
    owner_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    -- The invoice state the bytes show (open, paid, void).
    state TEXT NOT NULL,
    pdf BYTEA NOT NULL,
    rendered_at BIGINT NOT NULL
);

CREATE TABLE credit_notes (
    id TEXT PRIMARY KEY,
    -- CN/2026/000012.
    number TEXT NOT NULL,
    invoice_id TEXT NOT NULL REFERENCES invoices (id),
    -- What the buyer gets back, PPN included, and its two parts.
    amount BIGINT NOT NULL,
    price BIGINT NOT NULL,
    ppn BIGINT NOT NULL,
    reason TEXT NOT NULL,
    created_by TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    CONSTRAINT credit_notes_number_key UNIQUE (number)
);
CREATE INDEX credit_notes_invoice ON credit_notes (invoice_id);
CREATE INDEX credit_notes_issued ON credit_notes (issued_at);

-- Payments as payments reported them, one row per (payment, kind): a
-- redelivered or re-sent event changes nothing. `invoice_id` may name
-- no invoice here (reconciliation lists it).
CREATE TABLE payments (
    payment_id TEXT NOT NULL,
    -- settled or refunded.
    kind TEXT NOT NULL,
    invoice_id TEXT NOT NULL,
    amount BIGINT NOT NULL,
    method TEXT,
    occurred_at BIGINT NOT NULL,
    recorded_at BIGINT NOT NULL,
    -- What it did: paid, partial, overpaid, unknown_invoice, refund.
    outcome TEXT NOT NULL,
    PRIMARY KEY (payment_id, kind)
);
CREATE INDEX payments_invoice ON payments (invoice_id);
CREATE INDEX payments_occurred ON payments (occurred_at);

-- Money received beyond what an invoice asked (more than its total, a
-- second payment of a paid invoice, a payment of a void one): an admin
-- refunds or credits it.
CREATE TABLE overpayments (
    id TEXT PRIMARY KEY,
    invoice_id TEXT NOT NULL,
    payment_id TEXT NOT NULL,
    amount BIGINT NOT NULL,
    -- open, refunded, credited.
    status TEXT NOT NULL,
    note TEXT,
    created_at BIGINT NOT NULL,
    resolved_at BIGINT,
    CONSTRAINT overpayments_payment_key UNIQUE (payment_id)
);

-- The daily reconciliation, one report per business day.
CREATE TABLE reconciliations (
    day TEXT PRIMARY KEY,
    report TEXT NOT NULL,
    mismatches BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
