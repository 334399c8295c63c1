"""``pipeline.rating.rate``: billing periods and the pure rating function, to the cent."""

from __future__ import annotations

import copy
import json
from datetime import date
from decimal import Decimal

import pytest

from pipeline.rating.pricebook import PriceBook
from pipeline.rating.rate import (
    BillingPeriod,
    Part,
    add_months,
    line_key_of,
    period_containing,
    quantity_key,
    rate_period,
)
from pipeline.reference import BUNDLED_REFERENCE

BOOK_ID = "ACTEWAGL-HOME-TOU"


@pytest.fixture(scope="module")
def raw_book() -> dict:
    return json.loads(BUNDLED_REFERENCE.read_text())["price_books"][0]


@pytest.fixture(scope="module")
def v1(raw_book: dict) -> PriceBook:
    return PriceBook.model_validate(raw_book)


@pytest.fixture(scope="module")
def v2(raw_book: dict) -> PriceBook:
    """Version 2: new peak rate and supply charge; shoulder, off-peak, feed-in, GST unchanged."""
    raw = copy.deepcopy(raw_book)
    raw.update(version=2, effective_from="2005-03-16")
    raw["components"][0]["bands"][0]["rate"] = "0.4000"
    raw["components"][1]["rate"] = "1.0000"
    return PriceBook.model_validate(raw)


def q(book: PriceBook, component: str, band: str = "") -> str:
    return quantity_key(book, component, band)


# --- calendar arithmetic -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("anchor", "months", "expected"),
    [
        (date(2005, 1, 31), 1, date(2005, 2, 28)),
        (date(2004, 1, 31), 1, date(2004, 2, 29)),  # leap year
        (date(2004, 1, 31), 2, date(2004, 3, 31)),  # clamping does not accumulate
        (date(2004, 1, 31), 3, date(2004, 4, 30)),
        (date(2005, 3, 31), -1, date(2005, 2, 28)),
        (date(2005, 1, 15), -1, date(2004, 12, 15)),
        (date(2005, 12, 1), 1, date(2006, 1, 1)),
        (date(2005, 3, 15), 0, date(2005, 3, 15)),
        (date(2004, 2, 29), 12, date(2005, 2, 28)),
        (date(2004, 1, 1), 25, date(2006, 2, 1)),
    ],
)
def test_add_months(anchor: date, months: int, expected: date) -> None:
    assert add_months(anchor, months) == expected


@pytest.mark.parametrize(
    ("cycle", "anchor", "day", "start", "end"),
    [
        ("MONTHLY", date(2004, 1, 1), date(2005, 3, 15), date(2005, 3, 1), date(2005, 4, 1)),
        ("MONTHLY", date(2004, 1, 1), date(2005, 3, 1), date(2005, 3, 1), date(2005, 4, 1)),
        ("MONTHLY", date(2004, 1, 1), date(2005, 3, 31), date(2005, 3, 1), date(2005, 4, 1)),
        ("MONTHLY", date(2004, 1, 15), date(2005, 3, 10), date(2005, 2, 15), date(2005, 3, 15)),
        ("MONTHLY", date(2004, 1, 15), date(2005, 3, 14), date(2005, 2, 15), date(2005, 3, 15)),
        ("MONTHLY", date(2004, 1, 15), date(2005, 3, 15), date(2005, 3, 15), date(2005, 4, 15)),
        ("MONTHLY", date(2004, 1, 31), date(2004, 3, 1), date(2004, 2, 29), date(2004, 3, 31)),
        ("MONTHLY", date(2004, 1, 31), date(2004, 2, 28), date(2004, 1, 31), date(2004, 2, 29)),
        ("QUARTERLY", date(2004, 1, 1), date(2005, 3, 15), date(2005, 1, 1), date(2005, 4, 1)),
        ("QUARTERLY", date(2004, 1, 1), date(2005, 4, 1), date(2005, 4, 1), date(2005, 7, 1)),
        ("QUARTERLY", date(2004, 2, 10), date(2005, 2, 9), date(2004, 11, 10), date(2005, 2, 10)),
        ("BIMONTHLY", date(2004, 2, 1), date(2005, 3, 15), date(2005, 2, 1), date(2005, 4, 1)),
        ("BIMONTHLY", date(2004, 1, 1), date(2005, 3, 15), date(2005, 3, 1), date(2005, 5, 1)),
        ("ANNUAL", date(2004, 7, 1), date(2005, 3, 15), date(2004, 7, 1), date(2005, 7, 1)),
        ("ANNUAL", date(2004, 7, 1), date(2005, 7, 1), date(2005, 7, 1), date(2006, 7, 1)),
        # before the anchor: periods extend backwards on the same grid
        ("MONTHLY", date(2004, 1, 15), date(2003, 12, 1), date(2003, 11, 15), date(2003, 12, 15)),
        ("MONTHLY", date(2004, 1, 1), date(2003, 12, 31), date(2003, 12, 1), date(2004, 1, 1)),
        ("QUARTERLY", date(2004, 1, 1), date(2003, 11, 20), date(2003, 10, 1), date(2004, 1, 1)),
        ("ANNUAL", date(2004, 7, 1), date(2003, 6, 30), date(2002, 7, 1), date(2003, 7, 1)),
    ],
)
def test_period_containing(cycle: str, anchor: date, day: date, start: date, end: date) -> None:
    period = period_containing(cycle, anchor, day)
    assert period == BillingPeriod(start, end)
    assert period.start <= day < period.end
    assert period.days == (end - start).days


def test_periods_tile_the_calendar() -> None:
    """Consecutive days never skip or overlap periods (anchor on the 31st, across a leap year)."""
    anchor = date(2004, 1, 31)
    day = date(2003, 6, 1)
    seen: list[BillingPeriod] = []
    while day < date(2006, 1, 1):
        p = period_containing("MONTHLY", anchor, day)
        assert p.start <= day < p.end
        if not seen or seen[-1] != p:
            assert not seen or seen[-1].end == p.start
            seen.append(p)
        day = date.fromordinal(day.toordinal() + 1)
    assert len(seen) == 32


def test_unknown_cycle_raises_key_error() -> None:
    with pytest.raises(KeyError):
        period_containing("WEEKLY", date(2004, 1, 1), date(2005, 1, 1))


def test_quantity_key_and_line_key(v2: PriceBook) -> None:
    assert quantity_key(v2, "energy", "peak") == "ACTEWAGL-HOME-TOU|2|energy|peak"
    assert line_key_of("ACTEWAGL-HOME-TOU|2|energy|peak") == "ACTEWAGL-HOME-TOU|energy|peak"


# --- rating with the bundled book -------------------------------------------------------------------------------
def test_rate_period_bundled_book_exact_lines(v1: PriceBook) -> None:
    lines = rate_period(
        {
            q(v1, "energy", "peak"): Decimal("12.345"),  # × 0.3403 = 4.2010035 → 4.20
            q(v1, "energy", "shoulder"): Decimal("20.4"),  # × 0.2362 = 4.81848 → 4.82
            q(v1, "energy", "off_peak"): Decimal("10"),  # × 0.1995 = 1.995 → 2.00 (half-up)
            q(v1, "feed_in", ""): Decimal("3"),  # × −0.075 = −0.225 → −0.23 (half-up, away from zero)
        },
        {(BOOK_ID, 1): 30},  # × 0.9375 = 28.125 → 28.13 (half-even would give 28.12)
        {(BOOK_ID, 1): v1},
    )
    totals = {k: v.total for k, v in lines.items()}
    assert totals == {
        "ACTEWAGL-HOME-TOU|energy|peak": Decimal("4.20"),
        "ACTEWAGL-HOME-TOU|energy|shoulder": Decimal("4.82"),
        "ACTEWAGL-HOME-TOU|energy|off_peak": Decimal("2.00"),
        "ACTEWAGL-HOME-TOU|feed_in|": Decimal("-0.23"),
        "ACTEWAGL-HOME-TOU|supply|": Decimal("28.13"),
        # 10 % of the ROUNDED energy + supply lines, feed-in excluded:
        # 4.20 + 4.82 + 2.00 + 28.13 = 39.15 → 3.915 → 3.92
        # (of the unrounded lines it would be 3.91; with feed-in 38.92 → 3.89)
        "ACTEWAGL-HOME-TOU|gst|": Decimal("3.92"),
    }
    assert all(str(t) == str(t.quantize(Decimal("0.01"))) for t in totals.values())  # every total in cents
    assert sum(totals.values()) == Decimal("42.84")

    gst = lines["ACTEWAGL-HOME-TOU|gst|"]
    assert (gst.component_kind, gst.quantity, gst.rate, gst.unit) == ("tax", Decimal("39.15"), Decimal("10"), "AUD")
    supply = lines["ACTEWAGL-HOME-TOU|supply|"]
    assert (supply.component_kind, supply.quantity, supply.rate, supply.unit) == (
        "fixed_daily", Decimal(30), Decimal("0.9375"), "day"
    )
    feed = lines["ACTEWAGL-HOME-TOU|feed_in|"]
    assert feed.component_kind == "feed_in" and feed.quantity == Decimal(3)
    assert feed.parts == (Part(1, Decimal("3"), Decimal("-0.0750"), Decimal("-0.2250")),)
    peak = lines["ACTEWAGL-HOME-TOU|energy|peak"]
    assert (peak.band, peak.component_id, peak.book_version, peak.currency) == ("peak", "energy", 1, "AUD")
    assert peak.parts == (Part(1, Decimal("12.345"), Decimal("0.3403"), Decimal("4.2010035")),)
    assert peak.formula.endswith("= 4.2010035 → 4.20 AUD")


@pytest.mark.parametrize(
    ("kwh", "expected"),
    [
        ("0", "0.00"),
        ("0.025062", "0.00"),  # × 0.1995 = 0.004999869 → 0.00
        ("0.025063", "0.01"),  # × 0.1995 = 0.0050000685 → 0.01
        ("2.5", "0.50"),  # × 0.1995 = 0.49875 → 0.50
        ("0.1", "0.02"),  # × 0.1995 = 0.01995 → 0.02
    ],
)
def test_rate_period_rounds_each_line_half_up(v1: PriceBook, kwh: str, expected: str) -> None:
    lines = rate_period({q(v1, "energy", "off_peak"): Decimal(kwh)}, {}, {(BOOK_ID, 1): v1})
    assert set(lines) == {"ACTEWAGL-HOME-TOU|energy|off_peak", "ACTEWAGL-HOME-TOU|gst|"}
    assert lines["ACTEWAGL-HOME-TOU|energy|off_peak"].total == Decimal(expected)


def test_zero_quantity_lines_are_present_with_zero_total(v1: PriceBook) -> None:
    lines = rate_period({q(v1, "energy", "peak"): Decimal(0)}, {(BOOK_ID, 1): 0}, {(BOOK_ID, 1): v1})
    assert {k: v.total for k, v in lines.items()} == {
        "ACTEWAGL-HOME-TOU|energy|peak": Decimal("0.00"),
        "ACTEWAGL-HOME-TOU|supply|": Decimal("0.00"),
        "ACTEWAGL-HOME-TOU|gst|": Decimal("0.00"),
    }


def test_missing_book_or_component_raises_key_error(v1: PriceBook) -> None:
    with pytest.raises(KeyError):
        rate_period({"ACTEWAGL-HOME-TOU|7|energy|peak": Decimal(1)}, {}, {(BOOK_ID, 1): v1})
    with pytest.raises(KeyError, match="no component 'water'"):
        rate_period({"ACTEWAGL-HOME-TOU|1|water|": Decimal(1)}, {}, {(BOOK_ID, 1): v1})
    with pytest.raises(KeyError, match="not a usage component"):
        rate_period({"ACTEWAGL-HOME-TOU|1|supply|": Decimal(1)}, {}, {(BOOK_ID, 1): v1})


def test_two_versions_in_one_period(v1: PriceBook, v2: PriceBook) -> None:
    lines = rate_period(
        {
            q(v1, "energy", "peak"): Decimal("5"),  # × 0.3403 = 1.7015
            q(v2, "energy", "peak"): Decimal("1.01"),  # × 0.4000 = 0.404 → sum 2.1055 → 2.11 (not 1.70 + 0.40)
            q(v1, "energy", "shoulder"): Decimal("3"),  # × 0.2362 = 0.7086
            q(v2, "energy", "shoulder"): Decimal("2"),  # × 0.2362 = 0.4724 → 1.1810 → 1.18
            q(v2, "energy", "off_peak"): Decimal("4"),  # × 0.1995 = 0.798 → 0.80 (only in v2)
        },
        {(BOOK_ID, 1): 15, (BOOK_ID, 2): 16},  # 14.0625 + 16 = 30.0625 → 30.06
        {(BOOK_ID, 1): v1, (BOOK_ID, 2): v2},
    )
    totals = {k: v.total for k, v in lines.items()}
    assert totals == {
        "ACTEWAGL-HOME-TOU|energy|peak": Decimal("2.11"),
        "ACTEWAGL-HOME-TOU|energy|shoulder": Decimal("1.18"),
        "ACTEWAGL-HOME-TOU|energy|off_peak": Decimal("0.80"),
        "ACTEWAGL-HOME-TOU|supply|": Decimal("30.06"),
        # 2.11 + 1.18 + 0.80 + 30.06 = 34.15 → 3.415 → 3.42
        "ACTEWAGL-HOME-TOU|gst|": Decimal("3.42"),
    }
    peak = lines["ACTEWAGL-HOME-TOU|energy|peak"]
    assert peak.parts == (
        Part(1, Decimal("5"), Decimal("0.3403"), Decimal("1.7015")),
        Part(2, Decimal("1.01"), Decimal("0.4000"), Decimal("0.404")),
    )
    assert (peak.quantity, peak.rate, peak.book_version) == (Decimal("6.01"), Decimal("0.4000"), 2)
    assert "(v1)" in peak.formula and "(v2)" in peak.formula
    assert [p.version for p in lines["ACTEWAGL-HOME-TOU|energy|shoulder"].parts] == [1, 2]
    assert [p.version for p in lines["ACTEWAGL-HOME-TOU|energy|off_peak"].parts] == [2]
    supply = lines["ACTEWAGL-HOME-TOU|supply|"]
    assert supply.parts == (
        Part(1, Decimal(15), Decimal("0.9375"), Decimal("14.0625")),
        Part(2, Decimal(16), Decimal("1.0000"), Decimal("16.0000")),
    )
    assert supply.quantity == Decimal(31)
    assert lines["ACTEWAGL-HOME-TOU|gst|"].quantity == Decimal("34.15")
    assert lines["ACTEWAGL-HOME-TOU|gst|"].book_version == 2


def test_rating_is_independent_of_input_order(v1: PriceBook, v2: PriceBook) -> None:
    quantities = {
        q(v2, "energy", "peak"): Decimal("1.01"),
        q(v1, "energy", "peak"): Decimal("5"),
        q(v1, "feed_in"): Decimal("7.77"),
    }
    books = {(BOOK_ID, 2): v2, (BOOK_ID, 1): v1}
    a = rate_period(quantities, {(BOOK_ID, 2): 1, (BOOK_ID, 1): 2}, books)
    b = rate_period(dict(reversed(quantities.items())), {(BOOK_ID, 1): 2, (BOOK_ID, 2): 1}, books)
    assert a == b
    assert a["ACTEWAGL-HOME-TOU|feed_in|"].total == Decimal("-0.58")  # 7.77 × 0.075 = 0.58275
