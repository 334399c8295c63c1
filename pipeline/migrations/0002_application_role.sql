-- The stages connect as the application role "pipeline"; the schema belongs to the owner that runs
-- migrations. The application may append ledger lines and read them, never change or remove them
-- (no UPDATE, DELETE or TRUNCATE privilege on invoice_lines; the triggers of 0001 also refuse them
-- for every role, the owner included).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipeline') AND current_user <> 'pipeline' THEN
        GRANT USAGE ON SCHEMA public TO pipeline;
        GRANT SELECT, INSERT ON invoice_lines TO pipeline;
        GRANT SELECT, INSERT, UPDATE ON invoices, consumer_offsets TO pipeline;
        GRANT SELECT, INSERT, UPDATE ON accounts, service_points, plan_assignments TO pipeline;
        GRANT SELECT, INSERT ON price_books, dead_letters TO pipeline;
        GRANT USAGE ON SEQUENCE dead_letters_id_seq TO pipeline;
    END IF;
END
$$;
