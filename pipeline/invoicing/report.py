"""Readable invoices from the ledger: per invoice, lines by component and band with quantity, rate
and amount; totals. Reads only (the ledger is append-only).

A line whose usage includes estimated or substituted reads (quality E, S or F, as the latest ledger line of
that component and band says) is marked ``*``, with a footnote, as retailers' bills mark estimated reads."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from pipeline.money import ZERO
from pipeline.rating.services import section_key, section_title
from pipeline.records import ESTIMATED_QUALITY_FLAGS


@dataclass(frozen=True)
class InvoiceLineSummary:
    """The net of all ledger lines of one component/band on one invoice; for prior-period
    adjustments, per corrected invoice and service period."""

    component_id: str
    component_kind: str
    band: str
    quantity: Decimal
    unit: str
    rate: Decimal
    amount: Decimal
    lines: int
    line_kind: str = "CHARGE"
    service_period_start: Any = None
    adjusts_invoice_number: str | None = None
    quality_flags: tuple[str, ...] = ()
    service: str = "electricity"  # the service its price book bills (seed 001): the invoice section it is in

    @property
    def estimated(self) -> bool:
        """Whether the line's usage includes estimated or substituted reads (``ESTIMATED_FLAGS``)."""
        return any(q in ESTIMATED_FLAGS for q in self.quality_flags)


ESTIMATED_FLAGS = ESTIMATED_QUALITY_FLAGS
"""MDFF quality flags of reads that are not actual: E forward estimate, S substituted, F final substituted."""
ESTIMATED_MARK = "*"
ESTIMATED_NOTE = ("* includes estimated or substituted meter reads (quality E, S or F); "
                  "when the actual reads arrive the difference is billed as an adjustment")


@dataclass(frozen=True)
class InvoiceSummary:
    """One invoice: (account, period, currency), status, number, dates, lines and statement.

    Amounts are in ``currency`` major units; ``previous_balance`` … ``amount_due`` are set once the
    invoice is FINALIZED (SPEC §5: previous balance + charges − payments = amount due).
    """

    invoice_id: str
    account: str
    period_start: Any
    period_end: Any
    currency: str
    status: str
    lines: tuple[InvoiceLineSummary, ...]
    invoice_number: str | None = None
    bill_date: Any = None
    due_date: Any = None
    previous_balance: Decimal | None = None
    payments_total: Decimal | None = None
    amount_due: Decimal | None = None

    @property
    def total(self) -> Decimal:
        """Charges on this invoice: its own lines plus prior-period adjustments."""
        return sum((ln.amount for ln in self.lines), ZERO)


KIND_ORDER = {"tou": 0, "per_unit": 0, "fixed_daily": 1, "feed_in": 2, "tax": 3, "contribution": 4}

SUMMARY_SQL = """
WITH net AS (
  SELECT invoice_id, line_kind, period_start AS service_start, adjusts_invoice_number, component_id, band,
         sum(amount) AS amount, count(*) AS n
  FROM invoice_lines WHERE (%(account)s::text IS NULL OR account = %(account)s)
  GROUP BY invoice_id, line_kind, period_start, adjusts_invoice_number, component_id, band
), latest AS (
  SELECT DISTINCT ON (invoice_id, line_kind, period_start, component_id, band) invoice_id, line_kind,
         period_start AS service_start, component_id, band, component_kind, quantity, unit, rate,
         explanation->'quality_flags' AS quality_flags, price_book_id
  FROM invoice_lines WHERE (%(account)s::text IS NULL OR account = %(account)s)
  ORDER BY invoice_id, line_kind, period_start, component_id, band, source_partition, source_offset DESC
)
SELECT i.invoice_id, i.account, i.period_start, i.period_end, i.currency, i.status, i.invoice_number, i.bill_date,
       i.due_date, i.previous_balance, i.payments_total, i.amount_due,
       l.component_id, l.component_kind, l.band, l.quantity, l.unit, l.rate, n.amount, n.n, n.line_kind,
       n.service_start, n.adjusts_invoice_number, l.quality_flags,
       (SELECT coalesce(pb.body->>'service', 'electricity') FROM price_books pb WHERE pb.id = l.price_book_id
        ORDER BY pb.version DESC LIMIT 1) AS service
FROM invoices i JOIN net n USING (invoice_id)
     JOIN latest l USING (invoice_id, line_kind, service_start, component_id, band)
WHERE (%(period)s::date IS NULL OR i.period_start = %(period)s)
ORDER BY i.account, i.period_start, i.currency
"""


def invoice_summaries(conn: Any, account: str | None = None, period_start: Any = None) -> list[InvoiceSummary]:
    """Every invoice (of ``account``, or all; of the billing period starting ``period_start``, or
    all) with its net lines: charges per component/band, then prior-period adjustments per
    corrected invoice, service period and component/band."""
    rows = conn.execute(SUMMARY_SQL, {"account": account, "period": period_start}).fetchall()
    by_invoice: dict[str, list[Any]] = {}
    heads: dict[str, Any] = {}
    for row in rows:
        heads.setdefault(row[0], row[:12])
        by_invoice.setdefault(row[0], []).append(InvoiceLineSummary(*row[12:23], tuple(row[23] or ()),
                                                                    row[24] or "other"))
    out = []
    for inv_id, head in heads.items():
        lines = sorted(by_invoice[inv_id], key=lambda ln: (
            ln.line_kind, str(ln.adjusts_invoice_number), ln.service_period_start, section_key(ln.service),
            KIND_ORDER.get(ln.component_kind, 9), ln.component_id, ln.band))
        out.append(InvoiceSummary(*head[:6], tuple(lines), *head[6:]))  # type: ignore[misc]
    return out


def _money(x: Decimal) -> str:
    return str(x.quantize(Decimal("0.01")))


def _line_text(ln: InvoiceLineSummary, currency: str) -> str:
    label = ln.component_id + (f" ({ln.band})" if ln.band else "") + (f" {ESTIMATED_MARK}" if ln.estimated else "")
    if ln.component_kind == "tax":
        qty = f"{ln.rate.normalize():f}% of {ln.quantity.quantize(Decimal('0.01'))}"
    else:
        qty = f"{ln.quantity.normalize():f} {ln.unit} @ {ln.rate.normalize():f}"
    return f"    {label:<22} {qty:<34} {_money(ln.amount):>10} {currency}"


def services_of(inv: InvoiceSummary) -> dict[str, list[InvoiceLineSummary]]:
    """The invoice's lines by service (seed 001: electricity, gas, water, flat services, contributions), in
    section order (``rating.services.section_key``), each section's lines in invoice order."""
    out: dict[str, list[InvoiceLineSummary]] = {}
    for ln in sorted(inv.lines, key=lambda x: section_key(x.service)):
        out.setdefault(ln.service, []).append(ln)
    return out


def _charges_text(charges: list[InvoiceLineSummary], currency: str) -> list[str]:
    """The charge lines; on a multi-service invoice one section per service with its subtotal (seed 001)."""
    if len({ln.service for ln in charges}) <= 1:
        return [_line_text(ln, currency) for ln in charges]
    out = []
    sections: dict[str, list[InvoiceLineSummary]] = {}
    for ln in charges:
        sections.setdefault(ln.service, []).append(ln)
    for service in sorted(sections, key=section_key):
        lines = sections[service]
        out.append(f"  {section_title(service)}:")
        out += [_line_text(ln, currency) for ln in lines]
        subtotal = sum((ln.amount for ln in lines), ZERO)
        out.append(f"    {section_title(service) + ' subtotal':<57} {_money(subtotal):>10} {currency}")
    return out


def format_invoice(inv: InvoiceSummary) -> str:
    """A plain-text invoice: header (number, status, dates), charges, prior-period adjustments
    (naming the invoice each corrects and its service period), manual lines (Bill API, net), and the
    statement."""
    last_day = inv.period_end - timedelta(days=1)
    number = inv.invoice_number or "(not numbered until finalized)"
    out = [f"Invoice {number}  [{inv.status}]  {inv.invoice_id}",
           f"  account {inv.account}   service period {inv.period_start} – {last_day}"]
    if inv.bill_date is not None:
        out.append(f"  bill date {inv.bill_date}   due date {inv.due_date}")
    charges = [ln for ln in inv.lines if ln.line_kind == "CHARGE"]
    adjustments = [ln for ln in inv.lines if ln.line_kind == "ADJUSTMENT"]
    out += _charges_text(charges, inv.currency)
    if adjustments:
        out.append("  prior-period adjustments:")
        group = None
        for ln in adjustments:
            if (ln.adjusts_invoice_number, ln.service_period_start) != group:
                group = (ln.adjusts_invoice_number, ln.service_period_start)
                out.append(f"   adjusts {ln.adjusts_invoice_number} (service period {ln.service_period_start})")
            out.append(_line_text(ln, inv.currency))
    manual = [ln for ln in inv.lines if ln.line_kind == "MANUAL"]  # Bill API charges and credits, netted
    for ln in manual:
        label = f"manual charges and credits ({ln.lines} line{'s' if ln.lines != 1 else ''})"
        out.append(f"    {label:<57} {_money(ln.amount):>10} {inv.currency}")
    out.append(f"    {'CHARGES THIS PERIOD':<57} {_money(inv.total):>10} {inv.currency}")
    if inv.amount_due is not None:
        out += [f"    {'previous balance':<57} {_money(inv.previous_balance or ZERO):>10} {inv.currency}",
                f"    {'payments received':<57} {_money(-(inv.payments_total or ZERO)):>10} {inv.currency}",
                f"    {'AMOUNT DUE':<57} {_money(inv.amount_due):>10} {inv.currency}"]
    if any(ln.estimated for ln in inv.lines):
        out.append(f"  {ESTIMATED_NOTE}")
    return "\n".join(out)


EXPLAIN_SQL = """
SELECT l.line_id, l.invoice_id, l.account, l.period_start, l.period_end, l.currency, l.component_id, l.band,
       l.quantity, l.unit, l.rate, l.amount, l.period_total, l.price_book_id, l.price_book_version, l.cause,
       l.explanation, l.source_topic, l.source_partition, l.source_offset, l.appended_at, l.line_kind,
       l.adjusts_invoice_number, i.invoice_number, i.status
FROM invoice_lines l JOIN invoices i USING (invoice_id) WHERE l.line_id = %s
"""


def explain_line(conn: Any, line_id: str) -> str | None:
    """Why a ledger line exists: its invoice, component, formula and price book versions, and the window
    revisions that caused it with their quality flags and source files (NEM12 file!member#line).
    Returns ``None`` for an unknown line id."""
    row = conn.execute(EXPLAIN_SQL, (line_id,)).fetchone()
    if row is None:
        return None
    (lid, invoice, account, p0, p1, cur, comp, band, qty, unit, rate, amount, total, book, version, cause,
     exp, topic, partition, offset, appended, kind, adjusts_number, number, status) = row
    out = [
        f"line {lid}",
        f"  invoice {number or invoice} [{status}]  account {account}  service period {p0} – {p1 - timedelta(days=1)}",
        f"  component {comp}{f' ({band})' if band else ''}: {amount.quantize(Decimal('0.01'))} {cur} "
        f"(component's period total after this line: {total.quantize(Decimal('0.01'))} {cur})",
        *([f"  prior-period adjustment of invoice {adjusts_number} (finalized before this correction arrived)"]
          if kind == "ADJUSTMENT" else []),
        f"  price book {book} v{version}"
        + (f", superseding v{', v'.join(map(str, exp['price_book']['previous_versions']))}"
           if exp.get("price_book", {}).get("previous_versions") else ""),
        f"  quantity {qty.normalize():f} {unit} at {rate.normalize():f}",
        f"  formula: {exp.get('formula', '')}",
        f"  quality flags: {', '.join(exp.get('quality_flags', [])) or '-'}",
        f"  cause: {cause}",
        f"  appended {appended:%Y-%m-%d %H:%M:%S %Z} from {topic}[{partition}]@{offset}",
    ]
    if exp.get("service"):
        out.insert(3, f"  service: {section_title(exp['service'])}")
    if exp.get("contribution"):
        c = exp["contribution"]
        out.append(f"  voluntary contribution: {c['amount']} {cur} per {c['per']}"
                   f"{' (' + c['description'] + ')' if c.get('description') else ''}; {c['opted_in']}")
    windows = exp.get("windows", [])
    posting = exp.get("posting")
    if posting:  # rating held the changes and posted them together (pipeline/rating/posting.py)
        out.append(f"  posted ({posting['reason']}) for {posting['windows_total']} window revisions of the period"
                   + (f"; the first {posting['windows_listed']} listed, this line's below" if posting.get("days")
                      else ""))
        for day in posting.get("days", []):
            out.append(f"    {day['date']}: {day['windows']} window revisions, delta {day['delta']}")
    if windows:
        out.append(f"  window revisions ({len(windows)}):")
        for w in windows:
            out.append(f"    {w['window_id']} rev {w['revision']} {w['timing']}: value {w['value']} "
                       f"(delta {w['delta']}), quality {','.join(w['qualities'])}")
            if "gas_conversion" in w:
                g = w["gas_conversion"]
                out.append(f"      gas: {g['volume_m3']} m³ × {g['heating_value_mj_per_m3']} MJ/m³ × "
                           f"{g['pressure_correction']} = {g['energy_mj']} MJ")
            for src in w["sources"]:
                out.append(f"      from {src}")
    elif cause.startswith("pricebook:"):
        out.append("  caused by publishing a superseding price book version (no new usage)")
    else:
        out.append("  derived from other lines of the same period (fixed, surcharge, minimum or tax)")
    return "\n".join(out)
