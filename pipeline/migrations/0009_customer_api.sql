-- The Bill API (issue 17 part B, `pipeline serve customer`): per-account API keys (hashed), ad-hoc bills as
-- invoices of the existing lifecycle, manual ledger lines, idempotency records, and exchange rates.
-- depends: 0007_export_history

-- an ad-hoc bill is an invoice with a bill_id (invoice_id 'bill:<bill id>'): created by the API, OPEN until
-- the API's CLOSE command reaches the invoicing stage, then finalized there like any invoice (same series,
-- gap-free numbers, same balance chain). It has no close_at: the billing clock never closes it. Regular
-- invoices stay one per (account, period, currency); bills may share a period with them.
ALTER TABLE invoices ADD COLUMN bill_id text UNIQUE,
    ADD COLUMN created_by text;
ALTER TABLE invoices DROP CONSTRAINT invoices_account_period_start_currency_key;
CREATE UNIQUE INDEX invoices_one_regular_per_period ON invoices (account, period_start, currency)
    WHERE bill_id IS NULL;

-- a MANUAL line: a charge or credit added through the Bill API on an ad-hoc bill; line_id derives from the
-- caller and its Idempotency-Key, explanation names who, why and the key
ALTER TABLE invoice_lines DROP CONSTRAINT invoice_lines_line_kind_check;
ALTER TABLE invoice_lines DROP CONSTRAINT adjustment_names_original;
ALTER TABLE invoice_lines
    ADD CONSTRAINT invoice_lines_line_kind_check CHECK (line_kind IN ('CHARGE', 'ADJUSTMENT', 'MANUAL')),
    ADD CONSTRAINT adjustment_names_original CHECK (
        (line_kind IN ('CHARGE', 'MANUAL') AND adjusts_invoice_id IS NULL)
        OR (line_kind = 'ADJUSTMENT' AND adjusts_invoice_id IS NOT NULL AND adjusts_invoice_number IS NOT NULL));

-- customer API keys: one account each; only the SHA-256 of the key is kept (the key is shown once)
CREATE TABLE customer_api_keys (
    key_id       text PRIMARY KEY,
    account      text NOT NULL REFERENCES accounts,
    key_sha256   text NOT NULL UNIQUE,
    name         text NOT NULL DEFAULT '',
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX customer_api_keys_account ON customer_api_keys (account);

-- Idempotency-Key records of the Bill API: per caller and key, the request's fingerprint (method, path,
-- body) and, once answered, the response (status + body) that every repeat gets
CREATE TABLE api_idempotency (
    principal        text NOT NULL,
    idempotency_key  text NOT NULL,
    method           text NOT NULL,
    path             text NOT NULL,
    request_sha256   text NOT NULL,
    status           integer,
    response         jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    answered_at      timestamptz,
    PRIMARY KEY (principal, idempotency_key)
);

-- reference exchange rates as published (ECB: 1 base = rate quote, base EUR), with their source and date;
-- a reload of the same (source, date, base, quote) keeps the first value
CREATE TABLE exchange_rates (
    source      text NOT NULL,
    rate_date   date NOT NULL,
    base        char(3) NOT NULL,
    quote       char(3) NOT NULL,
    rate        numeric(28, 10) NOT NULL CHECK (rate > 0),
    loaded_by   text NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, rate_date, base, quote)
);
CREATE INDEX exchange_rates_date ON exchange_rates (rate_date, quote);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipeline') AND current_user <> 'pipeline' THEN
        GRANT SELECT, INSERT, UPDATE ON customer_api_keys, api_idempotency TO pipeline;
        GRANT SELECT, INSERT ON exchange_rates TO pipeline;
    END IF;
END
$$;
