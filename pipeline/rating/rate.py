"""The pure rating function and billing periods (SPEC §4).

``rate_period`` maps a period's aggregates (quantity per price book version, component and band;
service days per price book version) to one rounded total per charge line. A charge line is
identified by ``book id|component id|band``; its total is the sum over the versions that priced
part of the period, rounded half-up once to the currency's minor unit.
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal

from pipeline.money import ZERO, round_money
from pipeline.rating.pricebook import (
    DemandComponent,
    FeedInComponent,
    FixedDailyComponent,
    FixedPeriodComponent,
    MinimumComponent,
    PackageComponent,
    PerUnitComponent,
    PriceBook,
    SurchargeComponent,
    TaxComponent,
    TieredComponent,
    TouComponent,
)

MONTHS_PER_CYCLE = {"MONTHLY": 1, "BIMONTHLY": 2, "QUARTERLY": 3, "ANNUAL": 12}


# --- billing periods -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, order=True)
class BillingPeriod:
    """A billing period ``[start, end)`` in the account's local dates."""

    start: date
    end: date

    @property
    def days(self) -> int:
        return (self.end - self.start).days

    @property
    def bill_date(self) -> date:
        """The invoice date: the day after the period's last day (= ``end``, local date)."""
        return self.end

    def due_date(self, net_days: int) -> date:
        """Payment due date: the bill date plus the account's net days (SPEC §4, "net N")."""
        return self.end + timedelta(days=net_days)


def add_months(anchor: date, months: int) -> date:
    """``anchor`` moved by ``months`` calendar months, the day clamped to the month's length."""
    idx = anchor.year * 12 + (anchor.month - 1) + months
    year, month = divmod(idx, 12)
    month += 1
    return date(year, month, min(anchor.day, calendar.monthrange(year, month)[1]))


def period_containing(cycle: str, anchor: date, day: date) -> BillingPeriod:
    """The billing period of ``cycle`` (MONTHLY, BIMONTHLY, QUARTERLY, ANNUAL) anchored at
    ``anchor`` that contains ``day``. Raises ``KeyError`` for an unknown cycle."""
    n = MONTHS_PER_CYCLE[cycle]
    k = ((day.year - anchor.year) * 12 + day.month - anchor.month) // n
    start = add_months(anchor, k * n)
    while day < start:
        k -= 1
        start = add_months(anchor, k * n)
    end = add_months(anchor, (k + 1) * n)
    while day >= end:
        k += 1
        start, end = end, add_months(anchor, (k + 1) * n)
    return BillingPeriod(start, end)


# --- quantity keys ------------------------------------------------------------------------------------
def quantity_key(book: PriceBook, component_id: str, band: str) -> str:
    """Aggregate key ``book id|version|component id|band``."""
    return f"{book.id}|{book.version}|{component_id}|{band}"


def line_key_of(qkey: str) -> str:
    """The charge line a quantity key belongs to: ``book id|component id|band`` (version dropped)."""
    book_id, _version, component, band = qkey.split("|")
    return f"{book_id}|{component}|{band}"


# --- rating ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Part:
    """One price book version's share of a line: quantity × rate = amount (unrounded)."""

    version: int
    quantity: Decimal
    rate: Decimal
    amount: Decimal


@dataclass(frozen=True, slots=True)
class LineTotal:
    """The rounded period total of one charge line, with what it was computed from.

    ``quantity`` is in ``unit`` (kWh, day, or the currency for a tax base); ``rate`` is the
    rate of the latest version (a percentage for taxes); ``total`` is rounded half-up.
    """

    key: str
    book_id: str
    book_version: int
    currency: str
    component_id: str
    component_kind: str
    band: str
    unit: str
    quantity: Decimal
    rate: Decimal
    total: Decimal
    parts: tuple[Part, ...]
    formula: str


def rate_period(
    quantities: Mapping[str, Decimal],
    service_days: Mapping[tuple[str, int], int],
    books: Mapping[tuple[str, int], PriceBook],
    period_days: int | None = None,
    peaks: Mapping[str, Decimal] | None = None,
) -> dict[str, LineTotal]:
    """Rate one (account, period).

    Args:
        quantities: ``quantity_key`` → period quantity (kWh...) of usage priced by that component/band.
        service_days: (book id, version) → service days in the period billed on that version.
        books: every price book version named in the two mappings.
        period_days: days in the billing period; fixed-per-period charges, tier thresholds and
            minimums are prorated by ``service days / period_days`` (``None``: no proration).
        peaks: ``quantity_key`` of a demand component → the period's peak demand in kW.
    Returns: line key → ``LineTotal``, including zero totals for lines with zero quantity.
    Order: usage and fixed lines, then percentage surcharges, minimum charges, taxes — each
    percentage or minimum works on the ROUNDED totals of the components it names.
    Raises ``KeyError`` when a key names a version or component missing from ``books``.
    """

    def fraction(book_id: str, version: int) -> Decimal:
        days = service_days.get((book_id, version), 0)
        return Decimal(1) if not period_days else Decimal(days) / Decimal(period_days)

    parts: dict[str, list[tuple[PriceBook, object, Decimal, Decimal]]] = {}
    cumulative: dict[tuple[str, int, str], Decimal] = {}
    for qkey, qty in sorted(quantities.items()):
        book_id, version, component_id, band = qkey.split("|")
        book = books[(book_id, int(version))]
        comp = _component(book, component_id)
        if isinstance(comp, DemandComponent):
            raise KeyError(f"{component_id} is a demand component: its peaks go in `peaks`, not `quantities`")
        if isinstance(comp, TieredComponent | PackageComponent):
            k = (book_id, int(version), component_id)
            cumulative[k] = cumulative.get(k, ZERO) + qty
            continue
        if isinstance(comp, TouComponent):
            rate = comp.rate_of(band)
        elif isinstance(comp, PerUnitComponent | FeedInComponent | SurchargeComponent):
            rate = comp.rate  # type: ignore[assignment]
        else:
            raise KeyError(f"{component_id} is not a usage component")
        sign = Decimal(-1) if isinstance(comp, FeedInComponent) else Decimal(1)
        parts.setdefault(line_key_of(qkey), []).append((book, comp, qty, sign * rate))
    for qkey, kw in sorted((peaks or {}).items()):
        book_id, version, component_id, _band = qkey.split("|")
        book = books[(book_id, int(version))]
        comp = _component(book, component_id)
        parts.setdefault(line_key_of(qkey), []).append((book, comp, kw, comp.rate))  # type: ignore[attr-defined]
    for (book_id, version, component_id), qty in sorted(cumulative.items()):
        book = books[(book_id, version)]
        comp = _component(book, component_id)
        if isinstance(comp, PackageComponent):
            # every started package: ceil(qty / size). Decimal ``//`` truncates toward zero, so the
            # ``-(-a // b)`` ceiling idiom of ints gives the floor here; divmod is exact.
            whole, rest = divmod(qty, comp.package_size)
            packages = whole + (1 if rest else 0) if qty > 0 else ZERO
            parts.setdefault(f"{book_id}|{component_id}|", []).append((book, comp, packages, comp.package_price))
            continue
        f = fraction(book_id, version)
        for band, q, rate in _tier_slices(comp, qty, f):  # type: ignore[arg-type]
            parts.setdefault(f"{book_id}|{component_id}|{band}", []).append((book, comp, q, rate))
    for (book_id, version), days in sorted(service_days.items()):
        book = books[(book_id, version)]
        for comp in book.components:
            if isinstance(comp, FixedDailyComponent):
                parts.setdefault(f"{book_id}|{comp.id}|", []).append((book, comp, Decimal(days), comp.rate))
            elif isinstance(comp, FixedPeriodComponent):
                parts.setdefault(f"{book_id}|{comp.id}|", []).append(
                    (book, comp, fraction(book_id, version), comp.rate))

    lines: dict[str, LineTotal] = {key: _line(key, items) for key, items in parts.items()}
    # components computed from other components' rounded totals, per book (latest version in play)
    latest: dict[str, PriceBook] = {}
    for book_id, version in {*service_days, *((q.split("|")[0], int(q.split("|")[1])) for q in quantities)}:
        b = books[(book_id, version)]
        if book_id not in latest or b.version > latest[book_id].version:
            latest[book_id] = b
    for kind in (SurchargeComponent, MinimumComponent, TaxComponent):
        for book_id, book in sorted(latest.items()):
            book_fraction = sum((fraction(book_id, v) for (bid, v) in service_days if bid == book_id), ZERO)
            for comp in book.components:
                if isinstance(comp, kind) and not (isinstance(comp, SurchargeComponent) and comp.metric):
                    line = _derived_line(book, comp, lines, book_fraction if period_days else Decimal(1))
                    lines[line.key] = line
    return lines


def _tier_slices(comp: TieredComponent, qty: Decimal, f: Decimal) -> list[tuple[str, Decimal, Decimal]]:
    """(band, quantity, rate) per tier; thresholds scaled by ``f``. Graduated: each slice at its
    tier's rate. Volume: the whole quantity at the rate of the tier it falls in, zero elsewhere."""
    out = []
    lower = ZERO
    placed = False
    for i, tier in enumerate(comp.tiers, start=1):
        upper = None if tier.up_to is None else tier.up_to * f
        if comp.mode == "graduated":
            top = qty if upper is None else min(qty, upper)
            out.append((f"tier {i}", max(top - lower, ZERO), tier.rate))
        else:
            inside = not placed and (upper is None or qty <= upper)
            out.append((f"tier {i}", qty if inside else ZERO, tier.rate))
            placed = placed or inside
        if upper is not None:
            lower = upper
    return out


def _derived_line(book: PriceBook, comp: object, lines: dict[str, LineTotal], f: Decimal) -> LineTotal:
    """A percentage surcharge, minimum or tax over the rounded totals of the named components."""
    applies_to = comp.applies_to  # type: ignore[attr-defined]
    base = sum((ln.total for ln in lines.values() if ln.book_id == book.id and ln.component_id in applies_to), ZERO)
    names = ", ".join(applies_to)
    if isinstance(comp, MinimumComponent):
        required = comp.amount * f
        raw = max(required - base, ZERO)
        rate, kind = comp.amount, "minimum"
        formula = f"max(0, {comp.amount} × {f.normalize():f} − {base} ({names})) = {raw}"
    else:
        rate = comp.rate_percent  # type: ignore[attr-defined]
        raw = base * rate / 100
        kind = "tax" if isinstance(comp, TaxComponent) else "surcharge"
        formula = f"{rate}% × {base} {book.currency} ({names}) = {raw}"
    total = round_money(raw, book.currency)
    key = f"{book.id}|{comp.id}|"  # type: ignore[attr-defined]
    return LineTotal(key, book.id, book.version, book.currency, comp.id, kind, "", book.currency,  # type: ignore[attr-defined]
                     base, rate, total, (Part(book.version, base, rate, raw),), f"{formula} → {total} {book.currency}")


def _component(book: PriceBook, component_id: str) -> object:
    for c in book.components:
        if c.id == component_id:
            return c
    raise KeyError(f"price book {book.id} v{book.version} has no component {component_id!r}")


def _line(key: str, items: list[tuple[PriceBook, object, Decimal, Decimal]]) -> LineTotal:
    latest_book, comp, _, latest_rate = max(items, key=lambda i: i[0].version)
    currency = latest_book.currency
    parts = tuple(Part(b.version, q, r, q * r) for b, _, q, r in items)
    raw = sum((p.amount for p in parts), ZERO)
    total = round_money(raw, currency)
    qty = sum((p.quantity for p in parts), ZERO)
    band = key.split("|")[2]
    unit = "package" if isinstance(comp, PackageComponent) else getattr(comp, "unit", "")
    terms = " + ".join(f"{p.quantity} {unit} × {p.rate} (v{p.version})" for p in parts)
    return LineTotal(
        key, latest_book.id, latest_book.version, currency, comp.id, comp.kind, band, unit,  # type: ignore[attr-defined]
        qty, latest_rate, total, parts, f"{terms} = {raw} → {total} {currency}",
    )
