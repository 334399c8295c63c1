-- Checks before finalizing (issue 17, pipeline/invoicing/validation.py): an invoice whose close time has
-- passed and that a check flags waits in REVIEW (no number yet) until an operator approves it or its hold
-- expires; it is then finalized like any other, so the number series stays gap-free. Lines may still be
-- appended to an invoice in REVIEW (it is not final). Every decision is one row of invoice_reviews.
-- depends: 0007_export_history

ALTER TABLE invoices DROP CONSTRAINT invoices_status_check;
ALTER TABLE invoices ADD CONSTRAINT invoices_status_check CHECK (status IN ('OPEN', 'REVIEW', 'FINALIZED'));
ALTER TABLE invoices DROP CONSTRAINT finalized_complete;
ALTER TABLE invoices ADD CONSTRAINT finalized_complete CHECK (
    status IN ('OPEN', 'REVIEW') OR (invoice_number IS NOT NULL AND bill_date IS NOT NULL AND due_date IS NOT NULL
                                     AND amount_due IS NOT NULL AND finalized_order IS NOT NULL));
ALTER TABLE invoices
    ADD COLUMN review_flags   jsonb,          -- the flags that held it ([{code, message, details}])
    ADD COLUMN review_since   timestamptz,
    ADD COLUMN review_until   timestamptz,    -- the hold's expiry (NULL: until approved)
    ADD COLUMN approved_by    text,           -- the operator who released it (NULL: the hold expired)
    ADD COLUMN usage_kwh      numeric(28, 6); -- metered usage at finalization: the history the checks compare to
CREATE INDEX invoices_review ON invoices (review_until) WHERE status = 'REVIEW';
-- the hold is announced on invoice.events
ALTER TABLE outbox DROP CONSTRAINT outbox_event_type_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_event_type_check
    CHECK (event_type IN ('LINE_APPENDED', 'INVOICE_FINALIZED', 'PAYMENT_APPLIED', 'INVOICE_HELD'));

CREATE OR REPLACE FUNCTION require_open_invoice() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT status FROM invoices WHERE invoice_id = NEW.invoice_id) NOT IN ('OPEN', 'REVIEW') THEN
        RAISE EXCEPTION 'invoice % is finalized: lines go to the next open invoice', NEW.invoice_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;

-- the audit of review decisions: append-only
CREATE TABLE invoice_reviews (
    review_id    bigserial PRIMARY KEY,
    invoice_id   text NOT NULL REFERENCES invoices,
    decided_at   timestamptz NOT NULL DEFAULT now(),
    decided_by   text NOT NULL,                 -- 'invoicing' (the stage), an operator, an API key name
    source       text NOT NULL,                 -- 'stage', 'cli', 'api'
    decision     text NOT NULL CHECK (decision IN ('HELD', 'APPROVED', 'HOLD_EXPIRED')),
    flags        jsonb NOT NULL,                -- the flags at the time of the decision
    note         text NOT NULL DEFAULT ''
);
CREATE INDEX invoice_reviews_invoice ON invoice_reviews (invoice_id, review_id);
CREATE TRIGGER invoice_reviews_no_update BEFORE UPDATE OR DELETE ON invoice_reviews
    FOR EACH ROW EXECUTE FUNCTION reject_history_change();
CREATE TRIGGER invoice_reviews_no_truncate BEFORE TRUNCATE ON invoice_reviews
    FOR EACH STATEMENT EXECUTE FUNCTION reject_history_change();

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipeline') AND current_user <> 'pipeline' THEN
        GRANT SELECT, INSERT ON invoice_reviews TO pipeline;
        GRANT USAGE ON SEQUENCE invoice_reviews_review_id_seq TO pipeline;
    END IF;
END
$$;
