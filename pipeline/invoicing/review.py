"""Operators' side of the checks before finalizing (issue 17): list the invoices waiting in REVIEW, approve one.

An approval only records the decision (``invoices.approved_by`` and an ``invoice_reviews`` row, one
transaction); the invoicing stage finalizes the approved invoice at its next close check
(``PIPELINE_INVOICE_CLOSE_CHECK_S``, 5 s), under its finalizing lock, so numbering stays in one place and
gap-free. Functions take a DB-API connection (``pipeline.runtime.postgres``) inside the caller's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any


class ReviewError(Exception):
    """A refused approval: ``code`` is ``UNKNOWN_INVOICE`` or ``NOT_IN_REVIEW``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class HeldInvoice:
    """An invoice waiting in REVIEW: its flags (``[{code, message, details}]``), since when, until when the
    hold lasts (``None``: until approved), its charges so far (major units) and who approved it, if anyone
    did (it is finalized within seconds of that)."""

    invoice_id: str
    account: str
    period_start: date
    period_end: date
    currency: str
    flags: list[dict[str, Any]]
    since: datetime
    until: datetime | None
    total: Decimal
    approved_by: str | None

    def as_json(self) -> dict[str, Any]:
        """JSON-ready (dates ISO, amounts as strings)."""
        return {"invoice_id": self.invoice_id, "account": self.account,
                "period": [self.period_start.isoformat(), self.period_end.isoformat()], "currency": self.currency,
                "flags": self.flags, "since": self.since.isoformat(),
                "until": self.until.isoformat() if self.until else None, "total": str(self.total),
                "approved_by": self.approved_by}


def held(conn: Any, account: str | None = None) -> list[HeldInvoice]:
    """Invoices in REVIEW (of ``account``, or all), oldest hold first."""
    rows = conn.execute(
        "SELECT i.invoice_id, i.account, i.period_start, i.period_end, i.currency, i.review_flags, i.review_since, "
        "i.review_until, (SELECT coalesce(sum(amount), 0) FROM invoice_lines l WHERE l.invoice_id = i.invoice_id), "
        "i.approved_by FROM invoices i WHERE i.status = 'REVIEW' AND (%s::text IS NULL OR i.account = %s) "
        "ORDER BY i.review_since, i.invoice_id", (account, account)).fetchall()
    return [HeldInvoice(*row) for row in rows]


def approve(conn: Any, invoice_id: str, by: str, source: str, note: str = "") -> HeldInvoice:
    """Release ``invoice_id`` from REVIEW for finalization, recording who (``by``), how (``source``: ``cli`` or
    ``api``) and why (``note``). Approving an invoice already approved changes nothing (idempotent).
    Raises ``ReviewError`` (``UNKNOWN_INVOICE``; ``NOT_IN_REVIEW`` when it is OPEN or FINALIZED)."""
    row = conn.execute("SELECT status, approved_by FROM invoices WHERE invoice_id = %s FOR UPDATE",
                       (invoice_id,)).fetchone()
    if row is None:
        raise ReviewError("UNKNOWN_INVOICE", f"invoice {invoice_id} does not exist")
    status, approved_by = row
    if status != "REVIEW":
        raise ReviewError("NOT_IN_REVIEW", f"invoice {invoice_id} is {status}, not in REVIEW")
    if approved_by is None:
        conn.execute("UPDATE invoices SET approved_by = %s WHERE invoice_id = %s", (by, invoice_id))
        conn.execute("INSERT INTO invoice_reviews (invoice_id, decided_by, source, decision, flags, note) "
                     "SELECT invoice_id, %s, %s, 'APPROVED', review_flags, %s FROM invoices WHERE invoice_id = %s",
                     (by, source, note, invoice_id))
    return next(h for h in held(conn) if h.invoice_id == invoice_id)


def decisions(conn: Any, invoice_id: str) -> list[dict[str, Any]]:
    """The audit of one invoice's review, oldest first: ``{decided_at, decided_by, source, decision, flags,
    note}``."""
    rows = conn.execute("SELECT decided_at, decided_by, source, decision, flags, note FROM invoice_reviews "
                        "WHERE invoice_id = %s ORDER BY review_id", (invoice_id,)).fetchall()
    return [{"decided_at": r[0].isoformat(), "decided_by": r[1], "source": r[2], "decision": r[3], "flags": r[4],
             "note": r[5]} for r in rows]
