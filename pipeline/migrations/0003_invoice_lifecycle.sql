-- Invoice lifecycle, prior-period adjustments, payments and balance, and the outbox (SPEC §5).
-- depends: 0002_application_role

-- OPEN until close_at (period end in the account's time zone + the close delay), then FINALIZED:
-- numbered gap-free within a series, bill and due dates set, totals frozen.
ALTER TABLE invoices
    ADD COLUMN close_at          timestamptz,
    ADD COLUMN series            text,
    ADD COLUMN sequence_number   bigint,
    ADD COLUMN invoice_number    text UNIQUE,
    ADD COLUMN bill_date         date,
    ADD COLUMN due_date          date,
    ADD COLUMN previous_balance  numeric(28, 6),
    ADD COLUMN charges_total     numeric(28, 6),
    ADD COLUMN payments_total    numeric(28, 6),
    ADD COLUMN amount_due        numeric(28, 6),
    ADD COLUMN finalized_at      timestamptz,
    ADD COLUMN finalized_order   bigint UNIQUE,
    ADD UNIQUE (series, sequence_number),
    ADD CONSTRAINT finalized_complete CHECK (
        status = 'OPEN' OR (invoice_number IS NOT NULL AND bill_date IS NOT NULL AND due_date IS NOT NULL
                            AND amount_due IS NOT NULL AND finalized_order IS NOT NULL));
CREATE INDEX invoices_open_close_at ON invoices (close_at) WHERE status = 'OPEN';
CREATE INDEX invoices_account ON invoices (account, currency, period_start);
CREATE SEQUENCE invoices_finalized_order;

-- a finalized invoice never changes and no invoice is ever removed
CREATE FUNCTION reject_invoice_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'invoices are never deleted' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.status = 'FINALIZED' THEN
        RAISE EXCEPTION 'invoice % is finalized and never changes', OLD.invoice_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER invoices_frozen BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION reject_invoice_change();

-- one row per series: the next number to hand out; taken under the row lock in the finalizing
-- transaction, so a rolled-back finalization gives its number back (gap-free)
CREATE TABLE invoice_series (
    series       text PRIMARY KEY,
    next_number  bigint NOT NULL CHECK (next_number >= 1)
);

-- a line may only be appended to an OPEN invoice; a prior-period adjustment names the finalized
-- invoice it corrects and keeps its own service period (period_start, period_end)
ALTER TABLE invoice_lines
    ADD COLUMN line_kind               text NOT NULL DEFAULT 'CHARGE' CHECK (line_kind IN ('CHARGE', 'ADJUSTMENT')),
    ADD COLUMN adjusts_invoice_id      text REFERENCES invoices,
    ADD COLUMN adjusts_invoice_number  text,
    ADD CONSTRAINT adjustment_names_original CHECK (
        (line_kind = 'CHARGE' AND adjusts_invoice_id IS NULL)
        OR (line_kind = 'ADJUSTMENT' AND adjusts_invoice_id IS NOT NULL AND adjusts_invoice_number IS NOT NULL));

CREATE FUNCTION require_open_invoice() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT status FROM invoices WHERE invoice_id = NEW.invoice_id) <> 'OPEN' THEN
        RAISE EXCEPTION 'invoice % is finalized: lines go to the next open invoice', NEW.invoice_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER invoice_lines_open_invoice BEFORE INSERT ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION require_open_invoice();

-- the billing clock of the invoicing stage (event mode), per input partition of charges.rated (an
-- account's charges all come through one partition): the highest usage watermark seen on a charge
-- of that partition; an invoice is finalized once its close_at is at or before the clock of its
-- account's partition (invoices.clock_partition)
CREATE TABLE billing_clock (
    consumer_group  text NOT NULL,
    partition       integer NOT NULL,
    clock           timestamptz NOT NULL,
    PRIMARY KEY (consumer_group, partition)
);
ALTER TABLE invoices ADD COLUMN clock_partition integer;

-- payments (topic "payments"), append-only; each is counted on exactly one finalized invoice
CREATE TABLE payments (
    payment_id    text PRIMARY KEY,
    account       text NOT NULL,
    currency      char(3) NOT NULL,
    amount        numeric(28, 6) NOT NULL CHECK (amount > 0),
    received_at   timestamptz NOT NULL,
    reference     text NOT NULL DEFAULT '',
    source_topic      text NOT NULL,
    source_partition  integer NOT NULL,
    source_offset     bigint NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_account ON payments (account, currency);
CREATE TRIGGER payments_no_update BEFORE UPDATE OR DELETE ON payments
    FOR EACH ROW EXECUTE FUNCTION reject_ledger_change();
CREATE TRIGGER payments_no_truncate BEFORE TRUNCATE ON payments
    FOR EACH STATEMENT EXECUTE FUNCTION reject_ledger_change();

CREATE TABLE invoice_payments (
    payment_id  text PRIMARY KEY REFERENCES payments,
    invoice_id  text NOT NULL REFERENCES invoices
);

-- transactional outbox: written in the same transaction as the ledger change it announces;
-- the relay publishes unsent rows in seq order to invoice.events and then sets sent_at
CREATE TABLE outbox (
    seq          bigserial PRIMARY KEY,
    event_id     text NOT NULL UNIQUE,
    event_type   text NOT NULL CHECK (event_type IN ('LINE_APPENDED', 'INVOICE_FINALIZED', 'PAYMENT_APPLIED')),
    account      text NOT NULL,
    payload      jsonb NOT NULL,  -- the InvoiceEvent's fields; the relay encodes it as Avro
    created_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz
);
CREATE INDEX outbox_unsent ON outbox (seq) WHERE sent_at IS NULL;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipeline') AND current_user <> 'pipeline' THEN
        GRANT SELECT, INSERT, UPDATE ON invoice_series, billing_clock, outbox TO pipeline;
        GRANT SELECT, INSERT ON payments, invoice_payments TO pipeline;
        GRANT USAGE ON SEQUENCE outbox_seq_seq, invoices_finalized_order TO pipeline;
    END IF;
END
$$;
