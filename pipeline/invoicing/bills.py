"""Ad-hoc bills in the ledger (issue 17 part B): manual lines and closing, applied by the invoicing stage.

The Bill API (``pipeline.api.customer``) creates a bill as an OPEN invoice with a ``bill_id`` and sends
every change as an ``InvoiceAdjustment`` on ``invoice.adjustments``. The invoicing stage applies those
records in the same Postgres transaction as its other lines and its consumed offsets (SPEC §5 exactly-once):

- ``LINE``: one append-only ``MANUAL`` line whose id is the record's ``adjustment_id`` (derived from the
  caller and its Idempotency-Key), so a record produced twice appends once; its explanation names who,
  why and the key; an outbox ``LINE_APPENDED`` event announces it.
- ``CLOSE``: the bill is finalized like any invoice (``LedgerStore._finalize``: the next gap-free number
  of its series, frozen statement, outbox event). Records of one account share a partition, so every
  line the API accepted before the close is in the ledger before the bill closes.

A record for an unknown bill, a line for a closed bill, or a record whose account or currency differ from
its bill's is dead-lettered with a reason; nothing else is lost.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from pipeline.records import InvoiceAdjustment, InvoiceEvent

LINE_KIND = "MANUAL"


def manual_line_id(principal: str, idempotency_key: str) -> str:
    """The ledger line id of a manual line: ``manual:`` + the first 32 hex digits of
    SHA-256(``principal`` NUL ``idempotency_key``). The same caller retrying with the same key gets the
    same id, so the ledger's unique line id keeps ONE line (SPEC §5)."""
    return "manual:" + hashlib.sha256(f"{principal}\0{idempotency_key}".encode()).hexdigest()[:32]


def bill_id_of(principal: str, idempotency_key: str) -> str:
    """A bill's id: ``B-`` + 20 hex digits of SHA-256(``principal`` NUL ``idempotency_key``); a repeated
    create with the same key names the same bill."""
    return "B-" + hashlib.sha256(f"bill\0{principal}\0{idempotency_key}".encode()).hexdigest()[:20]


def bill_invoice_id(bill_id: str) -> str:
    """The invoice id of a bill: ``bill:<bill id>`` (regular invoices are ``account|period|currency``)."""
    return f"bill:{bill_id}"


def explanation(adj: InvoiceAdjustment) -> str:
    """The JSON explanation stored on a manual line: who, why, the Idempotency-Key, when (SPEC §6.5)."""
    return json.dumps({"source": "bill-api", "bill_id": adj.bill_id, "requested_by": adj.requested_by,
                       "reason": adj.reason, "idempotency_key": adj.idempotency_key,
                       "requested_at": adj.requested_at.isoformat()}, sort_keys=True)


@dataclass(frozen=True, slots=True)
class PendingAdjustment:
    """An ``InvoiceAdjustment`` with where it was read."""

    adjustment: InvoiceAdjustment
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class BillRow:
    """The bill's invoice as found in the ledger: id, account, currency, status, service period."""

    invoice_id: str
    account: str
    currency: str
    status: str
    period_start: date
    period_end: date


def check(adj: InvoiceAdjustment, bill: BillRow | None, closing: bool) -> tuple[str, str] | None:
    """Why ``adj`` cannot be applied, as (dead-letter reason, message), or ``None`` when it can.
    ``closing``: the bill was closed earlier in the same batch. A repeated CLOSE of a closed bill is
    fine (nothing to do)."""
    if bill is None:
        return "UNKNOWN_BILL", f"bill {adj.bill_id} does not exist"
    if (adj.account, adj.currency) != (bill.account, bill.currency):
        return "BILL_MISMATCH", (f"bill {adj.bill_id} is {bill.account}/{bill.currency}, the record says "
                                 f"{adj.account}/{adj.currency}")
    if adj.kind == "LINE" and (bill.status != "OPEN" or closing):
        return "BILL_CLOSED", f"bill {adj.bill_id} is closed: line {adj.adjustment_id} not appended"
    return None


def line_row(p: PendingAdjustment, bill: BillRow) -> tuple[Any, ...]:
    """The ``invoice_lines`` row (columns of ``ledger.COPY_LINES``) of a manual line: component ``manual``,
    quantity 1 ``item`` at ``amount``, the bill's service period, no price book (``''``, version 0)."""
    a = p.adjustment
    return (a.adjustment_id, bill.invoice_id, a.account, bill.period_start, bill.period_end, a.currency, "manual",
            "MANUAL", "", 1, "item", a.amount, a.amount, a.amount, "", 0, f"manual:{a.idempotency_key}",
            explanation(a), p.topic, p.partition, p.offset, LINE_KIND, None, None)


def line_event(p: PendingAdjustment, bill: BillRow, at: datetime) -> InvoiceEvent:
    """``LINE_APPENDED`` for a manual line; event id ``line:<line id>`` (as for rated lines)."""
    a = p.adjustment
    return InvoiceEvent(
        event_id=f"line:{a.adjustment_id}", event_type="LINE_APPENDED", sequence=0, account=a.account,
        currency=a.currency, occurred_at=at, invoice_id=bill.invoice_id, line_id=a.adjustment_id,
        line_kind=LINE_KIND, period_start=bill.period_start, period_end=bill.period_end, component_id="manual",
        band="", quantity=Decimal(1), unit="item", amount=a.amount)
