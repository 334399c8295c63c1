-- Reference data, the append-only invoice ledger, and the sink's consumed offsets (SPEC §5).

CREATE TABLE accounts (
    account         text PRIMARY KEY,
    name            text NOT NULL DEFAULT '',
    timezone        text NOT NULL,
    holiday_region  text NOT NULL,
    billing_cycle   text NOT NULL CHECK (billing_cycle IN ('MONTHLY', 'BIMONTHLY', 'QUARTERLY', 'ANNUAL')),
    billing_anchor  date NOT NULL,
    net_days        integer NOT NULL CHECK (net_days >= 0)
);

CREATE TABLE service_points (
    nmi             text NOT NULL,
    account         text NOT NULL REFERENCES accounts,
    effective_from  date NOT NULL,
    effective_to    date,
    PRIMARY KEY (nmi, effective_from),
    CHECK (effective_to IS NULL OR effective_to > effective_from)
);

-- a price book version is immutable: (id, version) is written once, with its content hash
CREATE TABLE price_books (
    id              text NOT NULL,
    version         integer NOT NULL CHECK (version >= 1),
    content_sha256  text NOT NULL,
    body            jsonb NOT NULL,
    published_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, version)
);

CREATE TABLE plan_assignments (
    account         text NOT NULL REFERENCES accounts,
    price_book_id   text NOT NULL,
    effective_from  date NOT NULL,
    effective_to    date,
    PRIMARY KEY (account, effective_from),
    CHECK (effective_to IS NULL OR effective_to > effective_from)
);

-- one invoice per (account, billing period, currency)
CREATE TABLE invoices (
    invoice_id      text PRIMARY KEY,
    account         text NOT NULL,
    period_start    date NOT NULL,
    period_end      date NOT NULL,
    currency        char(3) NOT NULL,
    status          text NOT NULL DEFAULT 'OPEN' CHECK (status IN ('OPEN', 'FINALIZED')),
    opened_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account, period_start, currency)
);

-- append-only: every correction is a new line (SPEC §5)
CREATE TABLE invoice_lines (
    line_id             text PRIMARY KEY,
    invoice_id          text NOT NULL REFERENCES invoices,
    account             text NOT NULL,
    period_start        date NOT NULL,
    period_end          date NOT NULL,
    currency            char(3) NOT NULL,
    component_id        text NOT NULL,
    component_kind      text NOT NULL,
    band                text NOT NULL,
    quantity            numeric(28, 6) NOT NULL,
    unit                text NOT NULL,
    rate                numeric(28, 6) NOT NULL,
    amount              numeric(28, 6) NOT NULL,
    period_total        numeric(28, 6) NOT NULL,
    price_book_id       text NOT NULL,
    price_book_version  integer NOT NULL,
    cause               text NOT NULL,
    explanation         jsonb NOT NULL,
    source_topic        text NOT NULL,
    source_partition    integer NOT NULL,
    source_offset       bigint NOT NULL,
    appended_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX invoice_lines_invoice ON invoice_lines (invoice_id);
CREATE INDEX invoice_lines_account_period ON invoice_lines (account, period_start);

CREATE FUNCTION reject_ledger_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'invoice_lines is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER invoice_lines_no_update BEFORE UPDATE OR DELETE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION reject_ledger_change();
CREATE TRIGGER invoice_lines_no_truncate BEFORE TRUNCATE ON invoice_lines
    FOR EACH STATEMENT EXECUTE FUNCTION reject_ledger_change();

-- the invoicing sink's input offsets, written in the same transaction as the lines
CREATE TABLE consumer_offsets (
    consumer_group  text NOT NULL,
    topic           text NOT NULL,
    partition       integer NOT NULL,
    next_offset     bigint NOT NULL,
    PRIMARY KEY (consumer_group, topic, partition)
);

-- records a sink stage could not accept (it has no Kafka producer): kept with their bytes
CREATE TABLE dead_letters (
    id              bigserial PRIMARY KEY,
    stage           text NOT NULL,
    reason          text NOT NULL,
    message         text NOT NULL,
    topic           text NOT NULL,
    partition       integer NOT NULL,
    "offset"        bigint NOT NULL,
    key             bytea,
    value           bytea,
    failed_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (topic, partition, "offset")
);
