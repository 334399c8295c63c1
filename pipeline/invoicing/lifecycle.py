"""Invoice lifecycle rules (SPEC §5), pure: close time, series and numbers, where a line goes,
the statement (previous balance + charges − payments = amount due) and the outbox events.

The Postgres side (``pipeline.invoicing.ledger``) applies these inside its transactions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from pipeline.money import ZERO
from pipeline.rating import rate as r
from pipeline.records import InvoiceEvent, Payment, RatedCharge


def close_time(period_end: date, tz: str, delay: timedelta) -> datetime:
    """When an invoice closes (UTC): local midnight of ``period_end`` (exclusive end of the billing
    period) in the account's time zone ``tz``, plus the close ``delay`` (SPEC §5 "period end + a
    close delay"). Raises ``zoneinfo.ZoneInfoNotFoundError`` for an unknown zone."""
    return datetime.combine(period_end, time(0), ZoneInfo(tz)).astimezone(UTC) + delay


def series_of(template: str, currency: str, bill_date: date) -> str:
    """The numbering series of an invoice: ``template`` with ``{year}`` (bill date year) and
    ``{currency}`` filled in, e.g. ``INV-{year}`` → ``INV-2005``. Raises ``KeyError`` for another
    placeholder."""
    return template.format(year=bill_date.year, currency=currency)


def invoice_number(series: str, n: int) -> str:
    """The printed invoice number: ``<series>-<n, 6 digits>``, e.g. ``INV-2005-000042``."""
    if n < 1:
        raise ValueError(f"invoice sequence numbers start at 1, got {n}")
    return f"{series}-{n:06d}"


def next_period(cycle: str, anchor: date, after: date) -> tuple[date, date]:
    """The billing period (start, exclusive end) that starts on or contains ``after``: where a
    prior-period adjustment goes when the account has no open invoice after the corrected one
    (``after`` = the latest invoice's period end). Raises ``KeyError`` for an unknown cycle."""
    p = r.period_containing(cycle, anchor, after)
    return p.start, p.end


@dataclass(frozen=True)
class InvoiceRef:
    """The invoice a line belongs to by its service period, as found in the ledger."""

    invoice_id: str
    status: str  # OPEN | REVIEW | FINALIZED
    invoice_number: str | None


@dataclass(frozen=True)
class Placement:
    """Where a charge line is appended: its own invoice (CHARGE) or, when that one is finalized,
    the account's next open invoice as a prior-period ADJUSTMENT naming the original."""

    invoice_id: str
    line_kind: str
    adjusts_invoice_id: str | None = None
    adjusts_invoice_number: str | None = None


def place(own: InvoiceRef, next_open_invoice_id: str | None) -> Placement:
    """SPEC §5: a delta for an OPEN invoice's period (or one in REVIEW: not final yet) is a CHARGE on it; a
    delta for a FINALIZED
    period is an ADJUSTMENT on ``next_open_invoice_id`` that names the original invoice (id and
    number). Raises ``ValueError`` when the period is finalized and no next open invoice is given."""
    if own.status in ("OPEN", "REVIEW"):
        return Placement(own.invoice_id, "CHARGE")
    if next_open_invoice_id is None:
        raise ValueError(f"invoice {own.invoice_id} is finalized and no open invoice follows it")
    return Placement(next_open_invoice_id, "ADJUSTMENT", own.invoice_id, own.invoice_number)


@dataclass(frozen=True)
class Statement:
    """The money summary frozen on a finalized invoice (SPEC §5), in the invoice's currency:
    ``amount_due = previous_balance + charges_total − payments_total``."""

    previous_balance: Decimal
    charges_total: Decimal
    payments_total: Decimal

    @property
    def amount_due(self) -> Decimal:
        return self.previous_balance + self.charges_total - self.payments_total


def statement(previous_amount_due: Decimal | None, line_amounts: list[Decimal],
              payment_amounts: list[Decimal]) -> Statement:
    """The statement of an invoice being finalized: the previous finalized invoice's amount due
    (``None`` for the account's first invoice in this currency), every line on this invoice
    (charges and prior-period adjustments), and the payments not yet on any invoice."""
    return Statement(previous_amount_due if previous_amount_due is not None else ZERO,
                     sum(line_amounts, ZERO), sum(payment_amounts, ZERO))


# --- outbox events (InvoiceEvent; the sequence is assigned by the outbox table) ------------------
def line_event(charge: RatedCharge, placement: Placement, at: datetime) -> InvoiceEvent:
    """``LINE_APPENDED`` for a newly appended line; event id ``line:<line id>``."""
    return InvoiceEvent(
        event_id=f"line:{charge.line_id}", event_type="LINE_APPENDED", sequence=0, account=charge.account,
        currency=charge.currency, occurred_at=at, invoice_id=placement.invoice_id, line_id=charge.line_id,
        line_kind=placement.line_kind, period_start=charge.period_start, period_end=charge.period_end,
        component_id=charge.component_id, band=charge.band, quantity=charge.quantity, unit=charge.unit,
        amount=charge.amount, adjusts_invoice_id=placement.adjusts_invoice_id,
        adjusts_invoice_number=placement.adjusts_invoice_number,
    )


def finalized_event(invoice_id: str, account: str, currency: str, number: str, period: tuple[date, date],
                    bill_date: date, due_date: date, st: Statement, at: datetime) -> InvoiceEvent:
    """``INVOICE_FINALIZED``; event id ``finalized:<invoice id>``."""
    return InvoiceEvent(
        event_id=f"finalized:{invoice_id}", event_type="INVOICE_FINALIZED", sequence=0, account=account,
        currency=currency, occurred_at=at, invoice_id=invoice_id, invoice_number=number,
        period_start=period[0], period_end=period[1], bill_date=bill_date, due_date=due_date,
        previous_balance=st.previous_balance, charges_total=st.charges_total, payments_total=st.payments_total,
        amount_due=st.amount_due,
    )


def held_event(invoice_id: str, account: str, currency: str, period: tuple[date, date], total: Decimal,
               at: datetime) -> InvoiceEvent:
    """``INVOICE_HELD``: a check flagged the invoice, which waits in REVIEW (``pipeline.invoicing.validation``);
    ``charges_total`` is its total when held. Event id ``held:<invoice id>`` (an invoice is held at most once)."""
    return InvoiceEvent(
        event_id=f"held:{invoice_id}", event_type="INVOICE_HELD", sequence=0, account=account, currency=currency,
        occurred_at=at, invoice_id=invoice_id, period_start=period[0], period_end=period[1], charges_total=total,
    )


def payment_event(payment: Payment, balance: Decimal, at: datetime) -> InvoiceEvent:
    """``PAYMENT_APPLIED`` with the account's balance after it; event id ``payment:<payment id>``."""
    return InvoiceEvent(
        event_id=f"payment:{payment.payment_id}", event_type="PAYMENT_APPLIED", sequence=0,
        account=payment.account, currency=payment.currency, occurred_at=at, payment_id=payment.payment_id,
        amount=payment.amount, balance=balance,
    )


# --- outbox rows: the event as JSON (cheap to write on the ledger path); the relay encodes Avro ---
_DECIMALS = frozenset({"quantity", "amount", "previous_balance", "charges_total", "payments_total", "amount_due",
                       "balance"})
_DATES = frozenset({"period_start", "period_end", "bill_date", "due_date"})
_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(InvoiceEvent) if f.name != "sequence")


def event_to_json(event: InvoiceEvent) -> str:
    """The outbox payload of ``event``: a JSON object of its set fields, decimals as strings, dates and
    times in ISO 8601 (``sequence`` is assigned by the outbox table, not stored here)."""
    out = {}
    for name in _EVENT_FIELDS:
        v = getattr(event, name)
        if v is None:
            continue
        t = type(v)
        if t is Decimal:
            v = str(v)
        elif t is date or t is datetime:
            v = v.isoformat()
        out[name] = v
    return json.dumps(out)


def event_from_json(payload: str | dict, sequence: int) -> InvoiceEvent:
    """The ``InvoiceEvent`` of an outbox row (inverse of ``event_to_json``) with its ``sequence``.
    Raises ``ValueError``/``KeyError`` on a payload that is not one."""
    d = dict(json.loads(payload) if isinstance(payload, str) else payload)
    for k, v in d.items():
        if k in _DECIMALS:
            d[k] = Decimal(v)
        elif k in _DATES:
            d[k] = date.fromisoformat(v)
    d["occurred_at"] = datetime.fromisoformat(d["occurred_at"])
    return InvoiceEvent(sequence=sequence, **d)
