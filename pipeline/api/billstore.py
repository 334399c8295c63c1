"""Postgres reads and writes of the Bill API (issue 17 part B): customer keys, idempotency records, bills,
balances and exchange rates. Each function takes an open connection (``runtime.postgres``) and runs in the
caller's transaction; none commits."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from pipeline.api.idempotency import Stored
from pipeline.fx import Rate
from pipeline.invoicing import lifecycle as lc
from pipeline.invoicing.bills import bill_invoice_id


def key_sha256(key: str) -> str:
    """SHA-256 (hex) of an API key: what is stored; the key itself never is."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_customer_key(conn: Any, account: str, name: str, created_by: str) -> tuple[str, str]:
    """A new API key for ``account``: returns (key id, key ``ck_<key id>_<32 random url-safe chars>``); only
    its hash is stored. Raises ``LookupError`` for an unknown account."""
    if not account_exists(conn, account):
        raise LookupError(f"account {account} does not exist")
    key_id = secrets.token_hex(6)
    key = f"ck_{key_id}_{secrets.token_urlsafe(24)}"
    conn.execute("INSERT INTO customer_api_keys (key_id, account, key_sha256, name, created_by) "
                 "VALUES (%s, %s, %s, %s, %s)", (key_id, account, key_sha256(key), name, created_by))
    return key_id, key


def customer_of_key(conn: Any, key: str) -> tuple[str, str] | None:
    """(key id, account) of an unrevoked customer key, or ``None``."""
    row = conn.execute("SELECT key_id, account FROM customer_api_keys WHERE key_sha256 = %s AND revoked_at IS NULL",
                       (key_sha256(key),)).fetchone()
    return (row[0], row[1]) if row else None


def account_exists(conn: Any, account: str) -> bool:
    """Whether ``account`` is in the reference data."""
    return conn.execute("SELECT 1 FROM accounts WHERE account = %s", (account,)).fetchone() is not None


# --- idempotency ----------------------------------------------------------------------------------------
def idempotency_begin(conn: Any, principal: str, key: str, method: str, path: str, sha: str) -> Stored | None:
    """Record a first request with (``principal``, ``key``); returns ``None`` when it is the first, else the
    earlier record (``idempotency.decide`` says what to do)."""
    row = conn.execute(
        "INSERT INTO api_idempotency (principal, idempotency_key, method, path, request_sha256) "
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1", (principal, key, method, path, sha)
    ).fetchone()
    if row is not None:
        return None
    sha0, status, response = conn.execute(
        "SELECT request_sha256, status, response FROM api_idempotency WHERE principal = %s AND idempotency_key = %s",
        (principal, key)).fetchone()
    return Stored(sha0, status, response)


def idempotency_finish(conn: Any, principal: str, key: str, status: int, response: Any) -> None:
    """Store the answer every repeat of the request gets."""
    from pipeline.runtime.postgres import jsonb

    conn.execute("UPDATE api_idempotency SET status = %s, response = %s, answered_at = now() "
                 "WHERE principal = %s AND idempotency_key = %s AND status IS NULL",
                 (status, jsonb(response), principal, key))


# --- bills ----------------------------------------------------------------------------------------------
def create_bill(conn: Any, bill_id: str, account: str, currency: str, period: tuple[date, date],
                created_by: str) -> None:
    """Insert the bill's OPEN invoice (no close time: only its CLOSE record finalizes it); a repeat with the
    same ``bill_id`` changes nothing."""
    conn.execute(
        "INSERT INTO invoices (invoice_id, account, period_start, period_end, currency, bill_id, created_by) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (invoice_id) DO NOTHING",
        (bill_invoice_id(bill_id), account, period[0], period[1], currency, bill_id, created_by))


@dataclass(frozen=True, slots=True)
class BillHead:
    """A bill's invoice row: id, account, currency, service period, status, number and dates."""

    bill_id: str
    account: str
    currency: str
    period_start: date
    period_end: date
    status: str
    invoice_number: str | None
    bill_date: date | None
    due_date: date | None
    created_by: str | None


HEAD_SQL = ("SELECT bill_id, account, currency, period_start, period_end, status, invoice_number, bill_date, "
            "due_date, created_by FROM invoices WHERE bill_id = %s")


def bill_head(conn: Any, bill_id: str) -> BillHead | None:
    """The bill, or ``None``."""
    row = conn.execute(HEAD_SQL, (bill_id,)).fetchone()
    return BillHead(*row) if row else None


def bill_ids_of(conn: Any, account: str) -> list[str]:
    """The bills of ``account``, oldest first."""
    return [r[0] for r in conn.execute("SELECT bill_id FROM invoices WHERE account = %s AND bill_id IS NOT NULL "
                                       "ORDER BY opened_at, bill_id", (account,))]


def bill_lines(conn: Any, bill_id: str) -> list[dict[str, Any]]:
    """The bill's ledger lines in append order: id, kind, amount, reason, who, Idempotency-Key, when."""
    rows = conn.execute(
        "SELECT line_id, line_kind, amount, explanation, appended_at FROM invoice_lines WHERE invoice_id = %s "
        "ORDER BY appended_at, source_partition, source_offset", (bill_invoice_id(bill_id),)).fetchall()
    return [{"line_id": lid, "line_kind": kind, "amount": amount, "reason": ex.get("reason", ""),
             "requested_by": ex.get("requested_by"), "idempotency_key": ex.get("idempotency_key"),
             "appended_at": at} for lid, kind, amount, ex, at in rows]


def bill_statement(conn: Any, head: BillHead) -> lc.Statement:
    """The bill's statement (SPEC §5: previous balance + charges − payments = amount due): frozen on a
    finalized bill; on an open one, what finalizing now would freeze (``lifecycle.statement``)."""
    inv = bill_invoice_id(head.bill_id)
    if head.status != "OPEN":
        prev, charges, pays = conn.execute(
            "SELECT previous_balance, charges_total, payments_total FROM invoices WHERE invoice_id = %s",
            (inv,)).fetchone()
        return lc.Statement(prev, charges, pays)
    prev = conn.execute("SELECT amount_due FROM invoices WHERE account = %s AND currency = %s AND status = "
                        "'FINALIZED' ORDER BY finalized_order DESC LIMIT 1", (head.account, head.currency)).fetchone()
    amounts = [r[0] for r in conn.execute("SELECT amount FROM invoice_lines WHERE invoice_id = %s", (inv,))]
    pays = [r[0] for r in conn.execute(
        "SELECT amount FROM payments p WHERE account = %s AND currency = %s AND NOT EXISTS "
        "(SELECT 1 FROM invoice_payments ip WHERE ip.payment_id = p.payment_id)", (head.account, head.currency))]
    return lc.statement(prev[0] if prev else None, amounts, pays)


def line_present(conn: Any, line_id: str) -> bool:
    """Whether the ledger has the line."""
    return conn.execute("SELECT 1 FROM invoice_lines WHERE line_id = %s", (line_id,)).fetchone() is not None


def balances(conn: Any, account: str) -> dict[str, Decimal]:
    """Per currency: everything charged minus everything paid (as ``LedgerStore._balance``), for ``account``."""
    out: dict[str, Decimal] = {}
    for cur, amount in conn.execute(
            "SELECT currency, sum(amount) FROM invoice_lines WHERE account = %s GROUP BY 1", (account,)):
        out[cur.strip()] = out.get(cur.strip(), Decimal(0)) + amount
    for cur, amount in conn.execute(
            "SELECT currency, sum(amount) FROM payments WHERE account = %s GROUP BY 1", (account,)):
        out[cur.strip()] = out.get(cur.strip(), Decimal(0)) - amount
    return dict(sorted(out.items()))


# --- exchange rates -------------------------------------------------------------------------------------
def load_rates(conn: Any, rates: list[Rate], loaded_by: str) -> int:
    """Insert ``rates``; a rate already loaded (same source, date, base, quote) keeps its first value.
    Returns the rows inserted."""
    n = 0
    for r in rates:
        n += conn.execute(
            "INSERT INTO exchange_rates (source, rate_date, base, quote, rate, loaded_by) VALUES (%s, %s, %s, %s, "
            "%s, %s) ON CONFLICT DO NOTHING", (r.source, r.rate_date, r.base, r.quote, r.rate, loaded_by)).rowcount
    return n


def rates_on(conn: Any, on: date | None) -> tuple[date, str, dict[str, Decimal]] | None:
    """The EUR-based rates of day ``on`` (or of the latest day loaded) as (date, source, quote → rate), or
    ``None`` when none is loaded for it. With several sources for a day, the first by name."""
    if on is None:
        row = conn.execute("SELECT max(rate_date) FROM exchange_rates WHERE base = 'EUR'").fetchone()
        if row[0] is None:
            return None
        on = row[0]
    src = conn.execute("SELECT min(source) FROM exchange_rates WHERE base = 'EUR' AND rate_date = %s",
                       (on,)).fetchone()[0]
    if src is None:
        return None
    rows = conn.execute("SELECT quote, rate FROM exchange_rates WHERE base = 'EUR' AND rate_date = %s AND source = %s",
                        (on, src)).fetchall()
    return on, src, {q.strip(): r for q, r in rows}
