-- What `pipeline export` wrote (issue 15): one row per export of one dataset for one day to one
-- destination. A row is inserted (WRITING) before the first file, claiming its version; it becomes
-- COMPLETE once the manifest is written, or FAILED with the error. Versions of one (destination,
-- generation, dataset, day) are 1, 2, ... and never reused.
-- depends: 0005_account_billing_clock

CREATE TABLE export_history (
    export_id        text PRIMARY KEY,           -- <destination>#<generation>/<dataset>/<day>/v<version>
    destination      text NOT NULL,              -- file:///... or s3://bucket/prefix
    generation       text NOT NULL,
    dataset          text NOT NULL CHECK (dataset IN ('ledger_lines', 'invoices', 'usage_windows')),
    period_day       date NOT NULL,              -- the UTC day exported
    version          integer NOT NULL CHECK (version >= 1),
    location         text NOT NULL,              -- URL of the export's folder
    status           text NOT NULL CHECK (status IN ('WRITING', 'COMPLETE', 'FAILED')),
    row_count        bigint NOT NULL CHECK (row_count >= 0),
    file_count       integer NOT NULL CHECK (file_count >= 0),
    max_rows         integer NOT NULL CHECK (max_rows >= 1),
    content_sha256   text NOT NULL,
    manifest_sha256  text,
    manifest         jsonb,
    error            text,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (destination, generation, dataset, period_day, version)
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipeline') AND current_user <> 'pipeline' THEN
        GRANT SELECT, INSERT, UPDATE ON export_history TO pipeline;
    END IF;
END
$$;
