-- Multi-service accounts and voluntary contributions (issue 17 part C, seed 001).
-- A plan assignment names the service its price book prices (PriceBook.service): an account has one plan
-- per service at a time (electricity, gas, water, a flat service) and any number of contribution plans
-- (voluntary add-ons: opting in is assigning such a book, opting out closes it). Gas meters read m3 are
-- billed in MJ with the account's conversion factor (heating value x pressure correction), reference data
-- with effective dates, changed only through operations audited in reference_changes (0006).
-- depends: 0006_reference_operations

ALTER TABLE plan_assignments ADD COLUMN service text NOT NULL DEFAULT 'electricity';
ALTER TABLE plan_assignments DROP CONSTRAINT plan_assignments_pkey;
ALTER TABLE plan_assignments ADD PRIMARY KEY (account, service, price_book_id, effective_from);
-- one plan of a service starts on a day (contributions: one per book and day, the primary key)
CREATE UNIQUE INDEX plan_assignments_service_start ON plan_assignments (account, service, effective_from)
    WHERE service <> 'contribution';

CREATE TABLE gas_conversions (
    account              text NOT NULL REFERENCES accounts,
    effective_from       date NOT NULL,
    effective_to         date,
    heating_value        numeric(18, 6) NOT NULL CHECK (heating_value > 0),        -- MJ per m3
    pressure_correction  numeric(18, 6) NOT NULL CHECK (pressure_correction > 0),  -- dimensionless
    PRIMARY KEY (account, effective_from),
    CHECK (effective_to IS NULL OR effective_to > effective_from)
);
CREATE TRIGGER gas_conversions_no_delete BEFORE DELETE ON gas_conversions
    FOR EACH ROW EXECUTE FUNCTION reject_history_change();

ALTER TABLE reference_changes DROP CONSTRAINT reference_changes_entity_check;
ALTER TABLE reference_changes ADD CONSTRAINT reference_changes_entity_check
    CHECK (entity IN ('account', 'service_point', 'telemetry_subject', 'plan_assignment', 'gas_conversion'));

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipeline') AND current_user <> 'pipeline' THEN
        GRANT SELECT, INSERT, UPDATE ON gas_conversions TO pipeline;
    END IF;
END
$$;
