"""The pure rating function and billing periods (SPEC §4).

``rate_period`` maps a period's aggregates (quantity per price book version, component and band;
service days per price book version; peak demand per demand component and meter) to one rounded total per
charge line. A charge line is identified by ``book id|component id|band``; its total is the sum over the
versions that priced part of the period, rounded half-up once to the currency's minor unit.

Conventions stated here (and in docs/semantics.md):

- **Tiers inside TOU** (``TouComponent.tiers``): the tier limits apply to the period's total quantity over
  all bands; each tier's slice is allocated to the bands in proportion to each band's share of that
  total (``tou_tier_allocation``), priced at the band's rate in that tier; one line per band and tier.
- **Demand** (``DemandComponent``): one peak per meter (the highest total import of the meter's channels
  in one demand interval, kW); a rate charges peak × rate, blocks charge each meter's peak through the
  blocks (first ``up_to`` kW at the first rate ...); an account with several meters pays the sum. Demand
  charges are not prorated by days (kW is a rate, not a volume).
- A negative period quantity (a credited correction, e.g. a NEM13 register that went down) is credited
  at the first tier's rate; packages never go below zero.
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from functools import lru_cache

from pipeline.money import ZERO, round_money
from pipeline.rating.pricebook import (
    ContributionComponent,
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


@lru_cache(maxsize=65_536)
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
    inputs: tuple[str, ...] = ()  # ``book id|component id|band`` of the quantities feeding the line


def rate_period(
    quantities: Mapping[str, Decimal],
    service_days: Mapping[tuple[str, int], int],
    books: Mapping[tuple[str, int], PriceBook],
    period_days: int | None = None,
    peaks: Mapping[str, Decimal | Sequence[Decimal]] | None = None,
) -> dict[str, LineTotal]:
    """Rate one (account, period).

    Args:
        quantities: ``quantity_key`` → period quantity (kWh...) of usage priced by that component/band.
        service_days: (book id, version) → service days in the period billed on that version.
        books: every price book version named in the two mappings.
        period_days: days in the billing period; fixed-per-period charges, tier thresholds and
            minimums are prorated by ``service days / period_days`` (``None``: no proration).
        peaks: ``quantity_key`` of a demand component (band ``""``) → the period's peak demand in kW, or
            one peak per meter (each goes through the component's blocks on its own; negative peaks count
            as 0).
    Returns: line key → ``LineTotal``, including zero totals for lines with zero quantity.
    Order: usage and fixed lines, then percentage surcharges, minimum charges, taxes — each
    percentage or minimum works on the ROUNDED totals of the components it names.
    Raises ``KeyError`` when a key names a version or component missing from ``books``.
    """

    def fraction(book_id: str, version: int) -> Decimal:
        days = service_days.get((book_id, version), 0)
        return Decimal(1) if not period_days else Decimal(days) / Decimal(period_days)

    parts: dict[str, list[tuple[PriceBook, object, Decimal, Decimal]]] = {}
    inputs: dict[str, set[str]] = {}

    def add(key: str, book: PriceBook, comp: object, qty: Decimal, rate: Decimal, fed_by: list[str]) -> None:
        parts.setdefault(key, []).append((book, comp, qty, rate))
        inputs.setdefault(key, set()).update(fed_by)

    cumulative: dict[tuple[str, int, str], Decimal] = {}
    by_band: dict[tuple[str, int, str], dict[str, Decimal]] = {}  # tiered TOU: (book, version, comp) → band → qty
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
        if isinstance(comp, TouComponent) and comp.tiers:
            comp.rate_of(band, 1)  # KeyError for an unknown band
            bands = by_band.setdefault((book_id, int(version), component_id), {})
            bands[band] = bands.get(band, ZERO) + qty
            continue
        if isinstance(comp, TouComponent):
            rate = comp.rate_of(band)
        elif isinstance(comp, PerUnitComponent | FeedInComponent | SurchargeComponent):
            rate = comp.rate  # type: ignore[assignment]
        else:
            raise KeyError(f"{component_id} is not a usage component")
        sign = Decimal(-1) if isinstance(comp, FeedInComponent) else Decimal(1)
        add(line_key_of(qkey), book, comp, qty, sign * rate, [line_key_of(qkey)])
    for (book_id, version, component_id), bands in sorted(by_band.items()):
        book = books[(book_id, version)]
        comp = _component(book, component_id)
        assert isinstance(comp, TouComponent)
        fed_by = [f"{book_id}|{component_id}|{b}" for b in bands]
        for band, tier, qty in tou_tier_allocation(comp, bands, fraction(book_id, version)):
            add(f"{book_id}|{component_id}|{band}, tier {tier}", book, comp, qty, comp.rate_of(band, tier), fed_by)
    for qkey, kw in sorted((peaks or {}).items()):
        book_id, version, component_id, _band = qkey.split("|")
        book = books[(book_id, int(version))]
        comp = _component(book, component_id)
        if not isinstance(comp, DemandComponent):
            raise KeyError(f"{component_id} is not a demand component: its quantities go in `quantities`")
        meters = [max(p, ZERO) for p in ([kw] if isinstance(kw, Decimal) else kw)]
        fed_by = [line_key_of(qkey)]
        if comp.rate is not None:
            add(f"{book_id}|{component_id}|", book, comp, sum(meters, ZERO), comp.rate, fed_by)
            continue
        for i, block in enumerate(comp.blocks, start=1):
            slices = [_block_slices(comp, peak)[i - 1] for peak in meters]
            add(f"{book_id}|{component_id}|block {i}", book, comp, sum(slices, ZERO), block.rate, fed_by)
    for (book_id, version, component_id), qty in sorted(cumulative.items()):
        book = books[(book_id, version)]
        comp = _component(book, component_id)
        fed_by = [f"{book_id}|{component_id}|"]
        if isinstance(comp, PackageComponent):
            # every started package: ceil(qty / size). Decimal ``//`` truncates toward zero, so the
            # ``-(-a // b)`` ceiling idiom of ints gives the floor here; divmod is exact.
            whole, rest = divmod(qty, comp.package_size)
            packages = whole + (1 if rest else 0) if qty > 0 else ZERO
            add(f"{book_id}|{component_id}|", book, comp, packages, comp.package_price, fed_by)
            continue
        f = fraction(book_id, version)
        for band, q, rate in _tier_slices(comp, qty, f):  # type: ignore[arg-type]
            add(f"{book_id}|{component_id}|{band}", book, comp, q, rate, fed_by)
    for (book_id, version), days in sorted(service_days.items()):
        book = books[(book_id, version)]
        for comp in book.components:
            if isinstance(comp, FixedDailyComponent):
                add(f"{book_id}|{comp.id}|", book, comp, Decimal(days), comp.rate, [])
            elif isinstance(comp, FixedPeriodComponent):
                add(f"{book_id}|{comp.id}|", book, comp, fraction(book_id, version), comp.rate, [])
            elif isinstance(comp, ContributionComponent):  # seed 001: per day like fixed_daily, per bill prorated
                qty = Decimal(days) if comp.per == "day" else fraction(book_id, version)
                add(f"{book_id}|{comp.id}|", book, comp, qty, comp.amount, [])

    lines: dict[str, LineTotal] = {key: _line(key, items, tuple(sorted(inputs[key]))) for key, items in parts.items()}
    # components computed from other components' rounded totals, per book (latest version in play)
    latest: dict[str, PriceBook] = {}
    in_play = {*service_days, *((q.split("|")[0], int(q.split("|")[1])) for q in (*quantities, *(peaks or {})))}
    for book_id, version in in_play:
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


def _slices(limits: Sequence[Decimal | None], mode: str, qty: Decimal, f: Decimal) -> list[Decimal]:
    """``qty`` split over tiers with upper ``limits`` (``None`` = no limit) scaled by ``f``. Graduated: the
    slice of each tier (a negative ``qty`` all in the first); volume: all of it in the tier it falls in."""
    out = []
    lower = ZERO
    placed = False
    for i, limit in enumerate(limits):
        upper = None if limit is None else limit * f
        if mode == "graduated":
            top = qty if upper is None else min(qty, upper)
            out.append(top if i == 0 else max(top - lower, ZERO))
        else:
            inside = not placed and (upper is None or qty <= upper)
            out.append(qty if inside else ZERO)
            placed = placed or inside
        if upper is not None:
            lower = upper
    return out


def _tier_slices(comp: TieredComponent, qty: Decimal, f: Decimal) -> list[tuple[str, Decimal, Decimal]]:
    """(band, quantity, rate) per tier; thresholds scaled by ``f``. Graduated: each slice at its
    tier's rate. Volume: the whole quantity at the rate of the tier it falls in, zero elsewhere."""
    slices = _slices([t.up_to for t in comp.tiers], comp.mode, qty, f)
    return [(f"tier {i}", q, t.rate) for i, (t, q) in enumerate(zip(comp.tiers, slices, strict=True), start=1)]


def tou_tier_allocation(comp: TouComponent, bands: Mapping[str, Decimal], f: Decimal = Decimal(1),
                        ) -> list[tuple[str, int, Decimal]]:
    """The quantity of each (band, tier) of a tiered TOU component: (band, tier number, quantity), bands in
    the component's order, every band of the component and every tier present (zero where nothing falls).

    The tiers (limits × ``f``, ``comp.tier_mode``) slice the period's total Q = Σ ``bands``; band b's share of
    tier i is ``slice_i × q_b / Q`` (proportional to its share of the period's total; 0 when Q = 0). Exact:
    Σ over bands of tier i = slice_i and Σ over tiers of band b = q_b, up to Decimal's 28 digits.
    ``bands`` must name bands of ``comp`` (``KeyError`` otherwise).
    """
    names = [b.band for b in comp.bands]
    unknown = set(bands) - set(names)
    if unknown:
        raise KeyError(f"{comp.id} has no band {sorted(unknown)}")
    total = sum(bands.values(), ZERO)
    slices = _slices([t.up_to for t in comp.tiers], comp.tier_mode, total, f)
    out = []
    for band in names:
        q = bands.get(band, ZERO)
        for i, s in enumerate(slices, start=1):
            out.append((band, i, ZERO if not total else s * q / total))
    return out


def _block_slices(comp: DemandComponent, kw: Decimal) -> list[Decimal]:
    """A meter's peak ``kw`` (≥ 0) split over the component's demand blocks (graduated, never prorated)."""
    return _slices([b.up_to for b in comp.blocks], "graduated", kw, Decimal(1))


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


def _line(key: str, items: list[tuple[PriceBook, object, Decimal, Decimal]], inputs: tuple[str, ...] = ()) -> LineTotal:
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
        qty, latest_rate, total, parts, f"{terms} = {raw} → {total} {currency}", inputs,
    )
