-- The billing clock per account, not per partition (SPEC §5, issue 11): one account's newer data must
-- not finalize another account's periods before their own data arrived.
-- depends: 0004_metric_definitions

-- clock: the highest usage watermark carried by a charge of this account (its own series' event-time
-- progress, SPEC §3); last_line_at: the wall clock when a line last reached the account (an account
-- whose data stopped short of a close time is finalized once it has been quiet, see
-- PIPELINE_INVOICE_IDLE_CLOSE_S)
CREATE TABLE account_clock (
    consumer_group  text NOT NULL,
    account         text NOT NULL,
    clock           timestamptz,
    last_line_at    timestamptz NOT NULL,
    PRIMARY KEY (consumer_group, account)
);

-- the per-partition clock of 0003 is replaced: an invoice's clock_partition is no longer used
DROP TABLE billing_clock;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipeline') AND current_user <> 'pipeline' THEN
        GRANT SELECT, INSERT, UPDATE ON account_clock TO pipeline;
    END IF;
END
$$;
