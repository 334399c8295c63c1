"""The ledger is append-only, enforced by the database (SPEC §5, invariant 4): through the
application's role UPDATE, DELETE and TRUNCATE on invoice lines fail (no privilege), and even the
schema owner is stopped by the triggers."""

from __future__ import annotations

from decimal import Decimal

import pytest

from pipeline.runtime import postgres
from tests.integration.conftest import Env

pytestmark = pytest.mark.integration


def _one_line(env: Env) -> str:
    with postgres.connect(env.settings.database_url) as conn, conn.transaction():
        conn.execute("INSERT INTO invoices (invoice_id, account, period_start, period_end, currency) "
                     "VALUES ('ACC-1001|2005-03-01|AUD', 'ACC-1001', '2005-03-01', '2005-04-01', 'AUD')")
        conn.execute(
            "INSERT INTO invoice_lines (line_id, invoice_id, account, period_start, period_end, currency, "
            "component_id, component_kind, band, quantity, unit, rate, amount, period_total, price_book_id, "
            "price_book_version, cause, explanation, source_topic, source_partition, source_offset) VALUES "
            "('L1', 'ACC-1001|2005-03-01|AUD', 'ACC-1001', '2005-03-01', '2005-04-01', 'AUD', 'energy', 'tou', "
            "'peak', 10, 'kWh', 0.3403, 3.40, 3.40, 'ACTEWAGL-HOME-TOU', 1, 'test', '{}', 't', 0, 0)")
    return "L1"


@pytest.mark.parametrize("statement", [
    "UPDATE invoice_lines SET amount = 0 WHERE line_id = 'L1'",
    "DELETE FROM invoice_lines WHERE line_id = 'L1'",
    "TRUNCATE invoice_lines",
    "TRUNCATE invoice_lines CASCADE",
])
@pytest.mark.parametrize("role", ["application", "owner"])
def test_ledger_lines_cannot_be_changed_or_removed(pipeline_env: Env, statement: str, role: str) -> None:
    env = pipeline_env
    _one_line(env)
    url = env.settings.database_url if role == "application" else env.settings.database_owner_url
    with postgres.connect(url) as conn:
        with pytest.raises(postgres.DatabaseError) as err:
            conn.execute(statement)
        conn.rollback()
        expected = "permission denied" if role == "application" else "append-only"
        assert expected in str(err.value)
    rows = env.sql("SELECT line_id, amount FROM invoice_lines")
    assert [(r[0], str(r[1])) for r in rows] == [("L1", "3.400000")]


def test_finalized_invoice_and_payments_never_change(pipeline_env: Env) -> None:
    """A FINALIZED invoice is frozen (UPDATE/DELETE refused, no line may be appended to it) and
    payments are append-only — for the application role and the schema owner alike."""
    from datetime import timedelta

    from pipeline.codec import default_codec
    from pipeline.invoicing.ledger import LedgerStore

    env = pipeline_env
    _one_line(env)
    with postgres.connect(env.settings.database_url) as conn, conn.transaction():
        conn.execute("UPDATE invoices SET close_at = '2005-04-01T00:00Z' WHERE invoice_id = 'ACC-1001|2005-03-01|AUD'")
        conn.execute("INSERT INTO payments (payment_id, account, currency, amount, received_at, source_topic, "
                     "source_partition, source_offset) VALUES ('P1', 'ACC-1001', 'AUD', 1.40, now(), 't', 0, 1)")
    store = LedgerStore(env.settings.database_url, "g", default_codec(), timedelta(hours=1), clock="wall")
    assert store.finalize_due() == ["INV-2005-000001"]
    assert store.finalize_due() == []
    store.close()
    assert env.sql("SELECT status, charges_total, payments_total, amount_due FROM invoices")[0] == (
        "FINALIZED", Decimal("3.400000"), Decimal("1.400000"), Decimal("2.000000"))
    refused = [
        ("UPDATE invoices SET amount_due = 0", "finalized and never changes"),
        ("DELETE FROM invoices", "never deleted"),
        ("INSERT INTO invoice_lines (line_id, invoice_id, account, period_start, period_end, currency, component_id, "
         "component_kind, band, quantity, unit, rate, amount, period_total, price_book_id, price_book_version, cause, "
         "explanation, source_topic, source_partition, source_offset) SELECT 'L2', invoice_id, account, period_start, "
         "period_end, currency, component_id, component_kind, band, quantity, unit, rate, 1, 1, price_book_id, "
         "price_book_version, cause, explanation, source_topic, source_partition, 99 FROM invoice_lines",
         "is finalized"),
        ("UPDATE payments SET amount = 100", "append-only"),
        ("DELETE FROM payments", "append-only"),
    ]
    for url in (env.settings.database_url, env.settings.database_owner_url):
        for statement, message in refused:
            with postgres.connect(url) as conn:
                with pytest.raises(postgres.DatabaseError) as err:
                    conn.execute(statement)
                conn.rollback()
                assert message in str(err.value) or "permission denied" in str(err.value), (statement, err.value)
    assert env.sql("SELECT count(*) FROM invoice_lines")[0][0] == 1
    assert env.sql("SELECT count(*) FROM outbox WHERE event_type = 'INVOICE_FINALIZED'")[0][0] == 1
