-- Telemetry reference data (issue 6): metric definitions (CloudEvents type → metric, value, aggregation,
-- window size) and the effective-dated subject → account mapping, beside the service points of 0001.
-- depends: 0002_application_role

CREATE TABLE metric_definitions (
    metric                  text PRIMARY KEY,
    event_type              text NOT NULL UNIQUE,
    value_path              text,
    aggregation             text NOT NULL
        CHECK (aggregation IN ('sum', 'count', 'min', 'max', 'latest', 'unique_count')),
    unit                    text NOT NULL,
    window_minutes          integer NOT NULL CHECK (window_minutes > 0),
    allowed_lateness_days   double precision CHECK (allowed_lateness_days IS NULL OR allowed_lateness_days >= 0),
    allow_negative          boolean NOT NULL DEFAULT false,
    description             text NOT NULL DEFAULT '',
    CHECK (aggregation = 'count' OR value_path IS NOT NULL)
);

CREATE TABLE telemetry_subjects (
    subject         text NOT NULL,
    account         text NOT NULL REFERENCES accounts,
    effective_from  date NOT NULL,
    effective_to    date,
    PRIMARY KEY (subject, effective_from),
    CHECK (effective_to IS NULL OR effective_to > effective_from)
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipeline') AND current_user <> 'pipeline' THEN
        GRANT SELECT, INSERT, UPDATE ON metric_definitions, telemetry_subjects TO pipeline;
    END IF;
END
$$;
