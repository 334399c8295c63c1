-- The usage read model (issue 17 part A, seed 001 real-time usage): one snapshot per (account, metric,
-- billing period), written by the `usage` stage with an upsert guarded by the snapshot sequence `seq`
-- (increasing per account and period in the stage's transactional state): a replayed, older snapshot never
-- overwrites a newer one. Budgets: one amount per account and billing period, in the bill's currency.
-- depends: 0007_export_history

CREATE TABLE IF NOT EXISTS usage_snapshots (
    account          text NOT NULL,
    metric           text NOT NULL,               -- usage metric, e.g. energy_import (kWh)
    period_start     date NOT NULL,               -- billing period, local dates, end exclusive
    period_end       date NOT NULL,
    seq              bigint NOT NULL CHECK (seq >= 1),
    as_of_day        date,                        -- the last local day with usage data (NULL: none yet)
    currency         text,
    usage_kwh        numeric(28, 6) NOT NULL,
    cost             numeric(28, 6) NOT NULL,     -- currency units, the period totals rating computed
    snapshot         jsonb NOT NULL,              -- daily series, bands, projections (pipeline.usage.model)
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, metric, period_start)
);

CREATE TABLE IF NOT EXISTS usage_budgets (
    account          text PRIMARY KEY,
    amount           numeric(20, 6) NOT NULL CHECK (amount > 0),  -- per billing period, currency units
    currency         text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipeline') AND current_user <> 'pipeline' THEN
        GRANT SELECT, INSERT, UPDATE ON usage_snapshots, usage_budgets TO pipeline;
    END IF;
END
$$;
