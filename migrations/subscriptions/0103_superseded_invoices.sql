-- A superseded checkout's invoice is voided at billing (so nobody pays
-- it); when that was done, or found paid.
ALTER TABLE changes ADD COLUMN invoice_settled_at BIGINT;
CREATE INDEX changes_superseded ON changes (status, invoice_settled_at);
