"""``pipeline.rating.processor.RatingProcessor`` through ``FakeContext`` with hand-built reference data:
currencies per price book, window revisions as exact deltas, TOU bands across DST changes and public
holidays, and (hypothesis) that any arrival order and batching of window revisions bills exactly the
final values, deterministically."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.money import MINOR_UNITS
from pipeline.rating.pricebook import PriceBook, TouComponent
from pipeline.rating.processor import RatingProcessor
from pipeline.rating.rate import period_containing, quantity_key, rate_period
from pipeline.records import RatedCharge, UsageWindow
from pipeline.reference import Account, PlanAssignment, ReferenceData, ServicePoint
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import FakeContext
from pipeline.topology import Topics

D = Decimal
CODEC = default_codec()
TOPICS = Topics(Settings(topic_prefix=""))
ACC = "ACC-1"
NMI = "NMI0000001"
SYDNEY = ZoneInfo("Australia/Sydney")
ACCOUNT = Account(account=ACC, timezone="Australia/Sydney", holiday_region="AU-NSW", billing_anchor=date(2024, 1, 1))
SERVICE = ServicePoint(nmi=NMI, account=ACC, effective_from=date(2023, 1, 1))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def book(book_id: str, components: list[dict[str, Any]], currency: str = "AUD", timezone: str = "Australia/Sydney",
         region: str = "AU-NSW") -> PriceBook:
    return PriceBook.model_validate({
        "id": book_id, "version": 1, "currency": currency, "timezone": timezone, "holiday_region": region,
        "effective_from": "2024-01-01", "components": components,
    })


def flat_book(book_id: str, currency: str, energy: str, supply: str, gst: str, **kw: str) -> PriceBook:
    return book(book_id, [
        {"id": "energy", "kind": "per_unit", "metric": "energy_import", "rate": energy},
        {"id": "supply", "kind": "fixed_daily", "rate": supply},
        {"id": "gst", "kind": "tax", "rate_percent": gst, "applies_to": ["energy", "supply"]},
    ], currency=currency, **kw)


WEEKDAY_PEAK = [{"day_types": ["weekday"], "start": "14:00", "end": "20:00"}]
WEEKEND_SHOULDER = [{"day_types": ["weekend"], "start": "14:00", "end": "20:00"}]
RATES = {"peak": D("0.50"), "shoulder": D("0.30"), "off_peak": D("0.20")}
TOU_ENERGY = {"id": "energy", "kind": "tou", "metric": "energy_import", "default_band": "off_peak", "bands": [
    {"band": "peak", "rate": "0.50", "times": WEEKDAY_PEAK},
    {"band": "shoulder", "rate": "0.30", "times": WEEKEND_SHOULDER},
    {"band": "off_peak", "rate": "0.20"},
]}


def reference(books: list[PriceBook], plans: list[tuple[str, date, date | None]] | None = None) -> ReferenceData:
    plans = plans or [(books[0].id, date(2024, 1, 1), None)]
    return ReferenceData.build(
        [ACCOUNT], [SERVICE],
        [PlanAssignment(account=ACC, price_book_id=b, effective_from=f, effective_to=t) for b, f, t in plans],
        books,
    )


def window(start: datetime, value: str | Decimal, revision: int = 0, previous: str | Decimal = "0") -> UsageWindow:
    end = start + timedelta(minutes=30)
    value = D(value)
    return UsageWindow(
        window_id=f"{ACC}|{NMI}/E1|{start:%Y-%m-%dT%H:%MZ}", account=ACC, series=f"{NMI}/E1",
        metric="energy_import", unit="kWh", window_start=start, window_end=end, revision=revision,
        timing="ON_TIME" if revision == 0 else "LATE", value=value, delta=value - D(previous), count=1,
        qualities=("A",), sources=(f"file.csv#{revision}",), watermark=end + timedelta(hours=1),
    )


class Harness:
    """One rating processor on partition 0 of ``usage.windows`` with its fake context."""

    def __init__(self, ref: ReferenceData) -> None:
        self.processor = RatingProcessor(TOPICS, CODEC, lambda: ref)
        self.ctx = FakeContext()
        self.offset = 0
        self.processor.on_assign(0, self.ctx)

    def feed(self, *wins: UsageWindow) -> None:
        for w in wins:
            rec = Incoming(TOPICS.usage_windows, 0, self.offset, ACC.encode(), CODEC.encode(w), (), 0)
            self.processor.process(rec, self.ctx)
            self.offset += 1

    def flush(self) -> list[RatedCharge]:
        """Punctuate; the charges forwarded by this punctuation."""
        before = len(self.ctx.forwarded)
        self.processor.punctuate(0, self.ctx)
        out = []
        for topic, key, value in self.ctx.forwarded[before:]:
            assert topic == TOPICS.charges_rated
            assert key == ACC
            out.append(CODEC.decode(value, RatedCharge))
        return out

    def charges(self) -> list[RatedCharge]:
        return [CODEC.decode(v, RatedCharge) for _t, _k, v in self.ctx.forwarded]


def line(c: RatedCharge) -> str:
    return f"{c.price_book_id}|{c.component_id}|{c.band}"


def amounts(charges: list[RatedCharge]) -> dict[str, Decimal]:
    out: dict[str, Decimal] = defaultdict(Decimal)
    for c in charges:
        out[line(c)] += c.amount
    return dict(out)


# --- currencies -------------------------------------------------------------------------------------------
def test_two_currencies_in_one_period_make_two_invoices_that_never_mix() -> None:
    assert {"AUD", "NZD"} <= set(MINOR_UNITS)
    au = flat_book("AU-FLAT", "AUD", "0.30", "1.00", "10")
    nz = flat_book("NZ-FLAT", "NZD", "0.25", "2.00", "15", timezone="Pacific/Auckland", region="NZ")
    ref = reference([au, nz], [("AU-FLAT", date(2024, 1, 1), date(2024, 3, 16)), ("NZ-FLAT", date(2024, 3, 16), None)])
    h = Harness(ref)
    h.feed(window(utc(2024, 3, 10, 2, 0), "10.000"))  # 13:00 AEDT on the 10th: AU-FLAT
    first = h.flush()
    h.feed(window(utc(2024, 3, 20, 2, 0), "20.000"))  # 13:00 AEDT on the 20th: NZ-FLAT
    second = h.flush()
    assert amounts(first) == {
        "AU-FLAT|energy|": D("3.00"), "AU-FLAT|supply|": D("15.00"), "AU-FLAT|gst|": D("1.80"),
        "NZ-FLAT|supply|": D("32.00"), "NZ-FLAT|gst|": D("4.80"),  # 16 service days on NZ-FLAT, no usage yet
    }
    assert amounts(second) == {"NZ-FLAT|energy|": D("5.00"), "NZ-FLAT|gst|": D("0.75")}
    charges = first + second
    currency_of = {"AU-FLAT": "AUD", "NZ-FLAT": "NZD"}
    assert all(c.currency == currency_of[c.price_book_id] for c in charges)
    assert all(c.period_start == date(2024, 3, 1) and c.period_end == date(2024, 4, 1) for c in charges)
    invoices: dict[tuple[str, date, str], list[RatedCharge]] = defaultdict(list)
    for c in charges:
        invoices[(c.account, c.period_start, c.currency)].append(c)
    assert set(invoices) == {(ACC, date(2024, 3, 1), "AUD"), (ACC, date(2024, 3, 1), "NZD")}
    assert {c.price_book_id for c in invoices[(ACC, date(2024, 3, 1), "AUD")]} == {"AU-FLAT"}
    assert {c.price_book_id for c in invoices[(ACC, date(2024, 3, 1), "NZD")]} == {"NZ-FLAT"}
    assert sum(c.amount for c in invoices[(ACC, date(2024, 3, 1), "AUD")]) == D("19.80")
    assert sum(c.amount for c in invoices[(ACC, date(2024, 3, 1), "NZD")]) == D("42.55")
    # each line's running period total stays in one currency and equals the sum of its deltas
    per_line: dict[str, list[RatedCharge]] = defaultdict(list)
    for c in charges:
        per_line[line(c)].append(c)
    for cs in per_line.values():
        assert len({c.currency for c in cs}) == 1
        assert cs[-1].period_total == sum(c.amount for c in cs)
    # the NZD tax is computed from NZD lines only: 15 % × (5.00 + 32.00)
    assert per_line["NZ-FLAT|gst|"][-1].period_total == D("5.55")
    assert per_line["NZ-FLAT|gst|"][-1].quantity == D("37.00")
    assert per_line["AU-FLAT|supply|"][-1].quantity == D(15)
    assert per_line["NZ-FLAT|supply|"][-1].quantity == D(16)


# --- revisions ------------------------------------------------------------------------------------------------
def test_revision_emits_difference_of_rounded_totals_and_stale_revisions_nothing() -> None:
    h = Harness(reference([flat_book("AU-FLAT", "AUD", "0.30", "1.00", "10")]))
    start = utc(2024, 3, 10, 2, 0)
    h.feed(window(start, "1.234"))
    first = h.flush()
    assert amounts(first) == {
        "AU-FLAT|energy|": D("0.37"),  # 1.234 × 0.30 = 0.3702
        "AU-FLAT|supply|": D("31.00"),
        "AU-FLAT|gst|": D("3.14"),  # 10 % × 31.37 = 3.137
    }
    # revision 1: 1.250 × 0.30 = 0.375 → 0.38: delta 0.01 (the unrounded difference 0.0048 would round to 0.00);
    # gst 10 % × 31.38 = 3.138 → 3.14 is unchanged, so no gst line
    h.feed(window(start, "1.250", revision=1, previous="1.234"))
    second = h.flush()
    assert [(line(c), c.amount, c.period_total, c.quantity) for c in second] == [
        ("AU-FLAT|energy|", D("0.01"), D("0.38"), D("1.250000"))]
    assert second[0].line_id not in {c.line_id for c in first}
    assert second[0].cause != first[0].cause
    # revision 2 lowers the value: negative deltas on energy and gst
    h.feed(window(start, "0.010", revision=2, previous="1.250"))
    third = h.flush()
    assert amounts(third) == {"AU-FLAT|energy|": D("-0.38"), "AU-FLAT|gst|": D("-0.04")}  # 0.00; 10 % × 31.00
    # older and equal revisions afterwards (whatever their values) produce nothing
    h.feed(window(start, "9.999", revision=0), window(start, "5.000", revision=1), window(start, "7.000", revision=2))
    assert h.flush() == []
    assert amounts(h.charges()) == {"AU-FLAT|energy|": D("0.00"), "AU-FLAT|supply|": D("31.00"),
                                    "AU-FLAT|gst|": D("3.10")}


# --- TOU bands across DST changes and public holidays -----------------------------------------------------------
@pytest.mark.parametrize(
    ("start", "offset_h", "band"),
    [
        # DST ends Sun 2024-04-07 03:00 AEDT (UTC+11) → 02:00 AEST (UTC+10)
        (utc(2024, 4, 5, 2, 30), 11, "off_peak"),  # Fri 13:30 AEDT
        (utc(2024, 4, 5, 3, 0), 11, "peak"),  # Fri 14:00 AEDT
        (utc(2024, 4, 5, 8, 30), 11, "peak"),  # Fri 19:30 AEDT
        (utc(2024, 4, 5, 9, 0), 11, "off_peak"),  # Fri 20:00 AEDT
        (utc(2024, 4, 6, 3, 0), 11, "shoulder"),  # Sat 14:00 AEDT
        (utc(2024, 4, 6, 15, 30), 11, "off_peak"),  # Sun 02:30 AEDT (first pass through 02:00-03:00)
        (utc(2024, 4, 6, 16, 30), 10, "off_peak"),  # Sun 02:30 AEST (second pass)
        (utc(2024, 4, 7, 3, 0), 10, "off_peak"),  # Sun 13:00 AEST: the same UTC time as Saturday's shoulder
        (utc(2024, 4, 7, 4, 0), 10, "shoulder"),  # Sun 14:00 AEST
        (utc(2024, 4, 8, 3, 0), 10, "off_peak"),  # Mon 13:00 AEST: the same UTC time as Friday's peak
        (utc(2024, 4, 8, 4, 0), 10, "peak"),  # Mon 14:00 AEST
        (utc(2024, 4, 8, 9, 30), 10, "peak"),  # Mon 19:30 AEST: Friday's 09:00 UTC was off-peak
        (utc(2024, 4, 8, 10, 0), 10, "off_peak"),  # Mon 20:00 AEST
        # DST starts Sun 2024-10-06 02:00 AEST → 03:00 AEDT
        (utc(2024, 10, 4, 3, 0), 10, "off_peak"),  # Fri 13:00 AEST
        (utc(2024, 10, 4, 4, 0), 10, "peak"),  # Fri 14:00 AEST
        (utc(2024, 10, 5, 15, 30), 10, "off_peak"),  # Sun 01:30 AEST
        (utc(2024, 10, 5, 16, 0), 11, "off_peak"),  # Sun 03:00 AEDT
        (utc(2024, 10, 6, 3, 0), 11, "shoulder"),  # Sun 14:00 AEDT
        (utc(2024, 10, 7, 3, 0), 11, "off_peak"),  # Mon 14:00 AEDT, but Labour Day (NSW public holiday)
        (utc(2024, 10, 8, 2, 30), 11, "off_peak"),  # Tue 13:30 AEDT
        (utc(2024, 10, 8, 3, 0), 11, "peak"),  # Tue 14:00 AEDT: Friday's 03:00 UTC was off-peak
        (utc(2024, 10, 8, 8, 30), 11, "peak"),  # Tue 19:30 AEDT
        (utc(2024, 10, 8, 9, 0), 11, "off_peak"),  # Tue 20:00 AEDT
    ],
)
def test_tou_band_across_dst_changes(start: datetime, offset_h: int, band: str) -> None:
    assert start.astimezone(SYDNEY).utcoffset() == timedelta(hours=offset_h)
    h = Harness(reference([book("SYD-TOU", [TOU_ENERGY])]))
    h.feed(window(start, "1.000"))
    charges = h.flush()
    assert [(c.component_id, c.band, c.amount, c.quantity) for c in charges] == [
        ("energy", band, RATES[band], D("1.000000"))]
    period = period_containing("MONTHLY", date(2024, 1, 1), start.astimezone(SYDNEY).date())
    assert (charges[0].period_start, charges[0].period_end) == (period.start, period.end)


def test_public_holiday_is_off_peak_while_the_day_before_is_peak() -> None:
    b = book("SYD-TOU", [TOU_ENERGY])
    assert b.day_type(date(2024, 1, 26)) == "holiday"  # Australia Day, a Friday
    assert b.day_type(date(2024, 1, 25)) == "weekday"
    h = Harness(reference([b]))
    h.feed(window(utc(2024, 1, 25, 4, 0), "2.000"))  # Thu 15:00 AEDT
    before = h.flush()
    h.feed(window(utc(2024, 1, 26, 4, 0), "3.000"))  # Fri 15:00 AEDT, public holiday
    holiday = h.flush()
    assert [(c.band, c.amount) for c in before] == [("peak", D("1.00"))]
    assert [(c.band, c.amount) for c in holiday] == [("off_peak", D("0.60"))]
    # the same holiday in a region without it (NZ has no Australia Day) stays peak
    nz_calendar = book("SYD-TOU-NZCAL", [TOU_ENERGY], region="NZ")
    h2 = Harness(reference([nz_calendar]))
    h2.feed(window(utc(2024, 1, 26, 4, 0), "3.000"))
    assert [(c.band, c.amount) for c in h2.flush()] == [("peak", D("1.50"))]


# --- property: any arrival order and batching bills exactly the final values -------------------------------------
PROP_BOOK = book("PROP", [
    TOU_ENERGY,
    {"id": "network", "kind": "tiered", "mode": "graduated", "metric": "energy_import",
     "tiers": [{"up_to": "50", "rate": "0.0537"}, {"up_to": None, "rate": "0.0811"}]},
    {"id": "demand", "kind": "demand", "metric": "energy_import", "rate": "0.4567"},
    {"id": "peak_demand", "kind": "demand", "metric": "energy_import", "rate": "1.2345",
     "tou_component": "energy", "band": "peak"},
    {"id": "supply", "kind": "fixed_daily", "rate": "0.9375"},
    {"id": "levy", "kind": "surcharge", "rate_percent": "3.3", "applies_to": ["energy", "network"]},
    {"id": "gst", "kind": "tax", "rate_percent": "10",
     "applies_to": ["energy", "network", "demand", "peak_demand", "supply", "levy"]},
])
PROP_REF = reference([PROP_BOOK])
MAY = (date(2024, 5, 1), date(2024, 6, 1))

slots = st.tuples(st.integers(1, 30), st.integers(0, 47))  # UTC day in May, half hour: local dates stay in May
values = st.integers(0, 99_999).map(lambda i: D(i).scaleb(-3))  # 3 dp, 0.000 .. 99.999


def expected_totals(final: dict[datetime, Decimal]) -> dict[str, Decimal]:
    """Single batch rating of the final values with ``rate_period`` directly."""
    energy = next(c for c in PROP_BOOK.components if c.id == "energy")
    assert isinstance(energy, TouComponent)
    quantities: dict[str, Decimal] = defaultdict(Decimal)
    peaks: dict[str, Decimal] = {}
    for start, value in final.items():
        band = PROP_BOOK.band_of(energy, start)
        quantities[quantity_key(PROP_BOOK, "energy", band)] += value
        quantities[quantity_key(PROP_BOOK, "network", "")] += value
        kw = value * 2  # a 30-minute window: kWh ÷ 0.5 h
        for comp in ["demand"] + (["peak_demand"] if band == "peak" else []):
            k = quantity_key(PROP_BOOK, comp, "")
            peaks[k] = max(peaks.get(k, kw), kw)
    days = (MAY[1] - MAY[0]).days
    lines = rate_period(quantities, {("PROP", 1): days}, {("PROP", 1): PROP_BOOK}, days, peaks)
    return {k: v.total for k, v in lines.items()}


def run(sequence: list[UsageWindow], cuts: list[bool]) -> Harness:
    h = Harness(PROP_REF)
    for w, cut in zip(sequence, cuts, strict=True):
        h.feed(w)
        if cut:
            h.flush()
    h.flush()
    return h


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[list[UsageWindow], list[bool], dict[datetime, Decimal]]:
    chosen = draw(st.lists(slots, min_size=1, max_size=8, unique=True))
    revisions, final = [], {}
    for day, half_hour in chosen:
        start = utc(2024, 5, day) + timedelta(minutes=30 * half_hour)
        vals = draw(st.lists(values, min_size=1, max_size=3))
        revisions += [window(start, v, revision=i) for i, v in enumerate(vals)]
        final[start] = vals[-1]
    sequence = draw(st.permutations(revisions))
    cuts = draw(st.lists(st.booleans(), min_size=len(sequence), max_size=len(sequence)))
    return list(sequence), cuts, final


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrivals())
def test_any_order_and_batching_bills_the_final_values(case: tuple[list[UsageWindow], list[bool], dict]) -> None:
    sequence, cuts, final = case
    h = run(sequence, cuts)
    charges = h.charges()
    want = expected_totals(final)
    got = amounts(charges)
    for key in set(want) | set(got):
        assert got.get(key, D(0)) == want.get(key, D(0)), key
    assert all(c.amount != 0 for c in charges)
    assert all(c.currency == "AUD" and (c.period_start, c.period_end) == MAY for c in charges)
    assert len({c.line_id for c in charges}) == len(charges)  # the ledger keeps one line per id
    # the last emitted period total of each line is the sum of its deltas
    last: dict[str, Decimal] = {}
    for c in charges:
        last[line(c)] = c.period_total
    assert last == got
    # the same final values in one batch to a fresh processor give the same totals
    latest = {}
    for w in sequence:
        if w.window_id not in latest or w.revision > latest[w.window_id].revision:
            latest[w.window_id] = w
    single = run(sorted(latest.values(), key=lambda w: w.window_id), [False] * len(latest))
    assert {k: v for k, v in amounts(single.charges()).items() if v} == {k: v for k, v in want.items() if v}
    # determinism: the same input and batching give byte-identical records (same line ids)
    again = run(sequence, cuts)
    assert again.ctx.forwarded == h.ctx.forwarded


def test_expected_totals_example_is_exact() -> None:
    """A hand-checked instance of the property's oracle, so the oracle itself cannot drift."""
    final = {utc(2024, 5, 6, 5, 0): D("10.000"),  # Mon 15:00 AEST: peak, 20 kW
             utc(2024, 5, 6, 1, 0): D("60.000")}  # Mon 11:00 AEST: off-peak, 120 kW
    assert expected_totals(final) == {
        "PROP|energy|peak": D("5.00"),  # 10 × 0.50
        "PROP|energy|off_peak": D("12.00"),  # 60 × 0.20
        "PROP|network|tier 1": D("2.69"),  # 50 × 0.0537 = 2.685
        "PROP|network|tier 2": D("1.62"),  # 20 × 0.0811 = 1.622
        "PROP|demand|": D("54.80"),  # 120 kW × 0.4567 = 54.804
        "PROP|peak_demand|": D("24.69"),  # 20 kW × 1.2345
        "PROP|supply|": D("29.06"),  # 31 × 0.9375 = 29.0625
        "PROP|levy|": D("0.70"),  # 3.3 % × (5.00 + 12.00 + 2.69 + 1.62 = 21.31) = 0.70323
        "PROP|gst|": D("13.06"),  # 10 % × (21.31 + 54.80 + 24.69 + 29.06 + 0.70 = 130.56) = 13.056
    }
    h = Harness(PROP_REF)
    h.feed(*(window(s, v) for s, v in final.items()))
    assert amounts(h.flush()) == expected_totals(final)


# --- what a line tells the checks before finalizing (issue 17) ---------------------------------------------------
def test_lines_carry_window_counts_estimates_and_days_without_usage() -> None:
    """Two days of windows in a 31-day period, one window estimated (E): the latest energy line says 3 windows, 1
    estimated; of the period's service days only the two with windows have usage, the rest are listed first
    five; a superseding revision that makes the estimate actual takes it out of the count."""
    h = Harness(reference([flat_book("FLAT", "AUD", "0.30", "1.00", "10")]))
    est = dataclasses.replace(window(utc(2024, 3, 1, 1), "1.5"), qualities=("E",))
    h.feed(window(utc(2024, 3, 1, 0), "1.0"), est, window(utc(2024, 3, 2, 0), "2.0"))
    energy = [c for c in h.flush() if c.component_id == "energy"][-1]
    facts = json.loads(energy.explanation)
    assert (facts["window_count"], facts["estimated_windows"]) == (3, 1)
    service = sum(1 for d in range(31) if SERVICE.covers(date(2024, 3, 1) + timedelta(days=d)))
    days_with_windows = {(utc(2024, 3, 1, 0) + timedelta(hours=h_)).astimezone(ZoneInfo("Australia/Sydney")).date()
                         for h_ in (0, 1, 24)}
    assert facts["service_days"] == service
    assert facts["usage_days"] == len(days_with_windows)
    assert len(facts["missing_days"]) == 5 and all(d not in {x.isoformat() for x in days_with_windows}
                                                   for d in facts["missing_days"])
    h.feed(window(utc(2024, 3, 1, 1), "1.6", revision=1, previous="1.5"))  # the actual read (quality A)
    energy = [c for c in h.flush() if c.component_id == "energy"][-1]
    assert json.loads(energy.explanation)["estimated_windows"] == 0
