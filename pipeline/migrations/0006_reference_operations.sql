-- Reference data as operations (issue 15): every change to accounts, service points, telemetry subjects
-- and plan assignments is effective-dated and kept. Operations only add rows or close an open
-- effective range (effective_to NULL -> a date); each change writes one row of reference_changes (who,
-- when, what, before/after), in the same transaction. Reference rows are never deleted.
-- depends: 0005_account_billing_clock

-- the account's billing currency (an invoice never mixes currencies); NULL for accounts loaded before
ALTER TABLE accounts ADD COLUMN currency char(3);

-- the audit trail: append-only, like the ledger
CREATE TABLE reference_changes (
    change_id    bigserial PRIMARY KEY,
    changed_at   timestamptz NOT NULL DEFAULT now(),
    changed_by   text NOT NULL,                 -- operator (CLI user, API key name)
    source       text NOT NULL,                 -- 'cli', 'api', 'csv FILE line N', 'json FILE'
    operation    text NOT NULL,                 -- account.create, meter.attach, meter.move_out, plan.assign ...
    entity       text NOT NULL CHECK (entity IN ('account', 'service_point', 'telemetry_subject', 'plan_assignment')),
    entity_key   text NOT NULL,                 -- account | nmi@effective_from | subject@effective_from | account@effective_from
    account      text NOT NULL,
    effective    date,                          -- the date the change takes effect (move-in, move-out, switch)
    before       jsonb,                         -- NULL for a new row
    after        jsonb NOT NULL
);
CREATE INDEX reference_changes_account ON reference_changes (account, change_id);
CREATE INDEX reference_changes_entity ON reference_changes (entity, entity_key, change_id);

CREATE FUNCTION reject_history_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is history: % is not allowed (add a row or close an open range)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER reference_changes_no_update BEFORE UPDATE OR DELETE ON reference_changes
    FOR EACH ROW EXECUTE FUNCTION reject_history_change();
CREATE TRIGGER reference_changes_no_truncate BEFORE TRUNCATE ON reference_changes
    FOR EACH STATEMENT EXECUTE FUNCTION reject_history_change();
-- reference rows are never removed: a service ends by closing its range
CREATE TRIGGER accounts_no_delete BEFORE DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION reject_history_change();
CREATE TRIGGER service_points_no_delete BEFORE DELETE ON service_points
    FOR EACH ROW EXECUTE FUNCTION reject_history_change();
CREATE TRIGGER telemetry_subjects_no_delete BEFORE DELETE ON telemetry_subjects
    FOR EACH ROW EXECUTE FUNCTION reject_history_change();
CREATE TRIGGER plan_assignments_no_delete BEFORE DELETE ON plan_assignments
    FOR EACH ROW EXECUTE FUNCTION reject_history_change();

-- an account's ranges, for its end of service (the invoicing stage looks it up per open invoice)
CREATE INDEX service_points_account ON service_points (account);
CREATE INDEX telemetry_subjects_account ON telemetry_subjects (account);

-- an account's end of service (move-out): the last exclusive end of its service points and telemetry
-- subjects, for accounts all of whose ranges are closed. Its final invoice closes at this date (local
-- midnight in the account's time zone) + the close delay instead of its period end + the close delay.
CREATE VIEW account_service_end AS
SELECT account, max(effective_to) AS service_end
FROM (SELECT account, effective_to FROM service_points
      UNION ALL SELECT account, effective_to FROM telemetry_subjects) ranges
GROUP BY account
HAVING bool_and(effective_to IS NOT NULL);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipeline') AND current_user <> 'pipeline' THEN
        GRANT SELECT, INSERT ON reference_changes TO pipeline;
        GRANT USAGE ON SEQUENCE reference_changes_change_id_seq TO pipeline;
        GRANT SELECT ON account_service_end TO pipeline;
    END IF;
END
$$;
