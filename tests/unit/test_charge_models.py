"""Charge models of ``pipeline.rating.rate.rate_period`` on small hand-built price books, to the cent:
tiered (graduated vs volume), plan switch with prorated fixed charges and tier thresholds, package
blocks, percentage and per-unit surcharges, minimum charges, taxes, demand; price-book validation."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.rating.pricebook import PriceBook, TouComponent, unmeasurable_demand
from pipeline.rating.rate import (
    BillingPeriod,
    LineTotal,
    period_containing,
    quantity_key,
    rate_period,
    tou_tier_allocation,
)

D = Decimal


def make_book(components: list[dict[str, Any]], book_id: str = "T", version: int = 1, currency: str = "AUD",
              **extra: Any) -> PriceBook:
    raw = {
        "id": book_id, "version": version, "currency": currency, "timezone": "Australia/Sydney",
        "holiday_region": "AU-NSW", "effective_from": "2024-01-01", "components": components,
    }
    raw.update(extra)
    return PriceBook.model_validate(raw)


def totals(lines: dict[str, LineTotal]) -> dict[str, Decimal]:
    return {k: v.total for k, v in lines.items()}


def rate_one(book: PriceBook, quantities: dict[str, str], days: int | None = None, period_days: int | None = None,
             peaks: dict[str, str] | None = None) -> dict[str, LineTotal]:
    """Rate ``book`` alone; ``quantities`` maps ``component|band`` → quantity, ``peaks`` component → kW."""
    qs = {quantity_key(book, *k.split("|")): D(v) for k, v in quantities.items()}
    sd = {} if days is None else {(book.id, book.version): days}
    pk = None if peaks is None else {quantity_key(book, k, ""): D(v) for k, v in peaks.items()}
    return rate_period(qs, sd, {(book.id, book.version): book}, period_days, pk)


# --- tiered: graduated vs volume over the same tiers ------------------------------------------------------------
TIERS = [{"up_to": "100", "rate": "0.20"}, {"up_to": "300", "rate": "0.15"}, {"up_to": None, "rate": "0.10"}]


def tiered_book(mode: str) -> PriceBook:
    return make_book([{"id": "energy", "kind": "tiered", "mode": mode, "metric": "energy_import", "tiers": TIERS}])


TIER_KEYS = ("T|energy|tier 1", "T|energy|tier 2", "T|energy|tier 3")


@pytest.mark.parametrize(
    ("kwh", "graduated", "graduated_qty", "volume", "volume_qty"),
    [
        # just below the first threshold: 99.999 × 0.20 = 19.9998 → 20.00
        ("99.999", ("20.00", "0.00", "0.00"), ("99.999", "0", "0"), ("20.00", "0.00", "0.00"), ("99.999", "0", "0")),
        # exactly at it: still tier 1 in both modes
        ("100", ("20.00", "0.00", "0.00"), ("100", "0", "0"), ("20.00", "0.00", "0.00"), ("100", "0", "0")),
        # just above: graduated adds 0.001 × 0.15 = 0.00015 → 0.00; volume re-prices all 100.001 at 0.15 = 15.00015
        ("100.001", ("20.00", "0.00", "0.00"), ("100", "0.001", "0"), ("0.00", "15.00", "0.00"),
         ("0", "100.001", "0")),
        # 0.05 × 0.15 = 0.0075 → 0.01 (half-up); volume 100.05 × 0.15 = 15.0075 → 15.01
        ("100.05", ("20.00", "0.01", "0.00"), ("100", "0.05", "0"), ("0.00", "15.01", "0.00"), ("0", "100.05", "0")),
        ("300", ("20.00", "30.00", "0.00"), ("100", "200", "0"), ("0.00", "45.00", "0.00"), ("0", "300", "0")),
        ("450", ("20.00", "30.00", "15.00"), ("100", "200", "150"), ("0.00", "0.00", "45.00"), ("0", "0", "450")),
    ],
)
def test_tiered_graduated_vs_volume_at_thresholds(
    kwh: str, graduated: tuple[str, ...], graduated_qty: tuple[str, ...], volume: tuple[str, ...],
    volume_qty: tuple[str, ...],
) -> None:
    grad = rate_one(tiered_book("graduated"), {"energy|": kwh})
    vol = rate_one(tiered_book("volume"), {"energy|": kwh})
    assert set(grad) == set(vol) == set(TIER_KEYS)
    assert [grad[k].total for k in TIER_KEYS] == [D(x) for x in graduated]
    assert [grad[k].quantity for k in TIER_KEYS] == [D(x) for x in graduated_qty]
    assert [vol[k].total for k in TIER_KEYS] == [D(x) for x in volume]
    assert [vol[k].quantity for k in TIER_KEYS] == [D(x) for x in volume_qty]
    assert [grad[k].band for k in TIER_KEYS] == ["tier 1", "tier 2", "tier 3"]
    assert [vol[k].rate for k in TIER_KEYS] == [D("0.20"), D("0.15"), D("0.10")]
    # volume: exactly one tier carries the whole quantity
    assert sum(1 for k in TIER_KEYS if vol[k].quantity != 0) == 1
    assert sum((vol[k].quantity for k in TIER_KEYS), D(0)) == D(kwh)
    assert sum((grad[k].quantity for k in TIER_KEYS), D(0)) == D(kwh)


# --- plan switch on day 10 of a 30-day month -----------------------------------------------------------------------
def plan_book(book_id: str, t1: str, t2: str, supply: str, period: str) -> PriceBook:
    return make_book([
        {"id": "energy", "kind": "tiered", "mode": "graduated", "metric": "energy_import",
         "tiers": [{"up_to": "300", "rate": t1}, {"up_to": None, "rate": t2}]},
        {"id": "supply", "kind": "fixed_daily", "rate": supply},
        {"id": "service", "kind": "fixed_period", "rate": period},
    ], book_id=book_id)


def test_plan_switch_on_day_10_prorates_fixed_charges_and_tier_thresholds() -> None:
    period = period_containing("MONTHLY", date(2024, 1, 1), date(2024, 11, 10))
    assert period == BillingPeriod(date(2024, 11, 1), date(2024, 12, 1))
    assert period.days == 30
    days_a = (date(2024, 11, 10) - period.start).days
    assert days_a == 9
    a = plan_book("A", "0.2500", "0.3100", "1.1000", "12.00")
    b = plan_book("B", "0.2200", "0.2900", "0.9500", "15.00")
    lines = rate_period(
        {quantity_key(a, "energy", ""): D("125.5"), quantity_key(b, "energy", ""): D("250")},
        {("A", 1): days_a, ("B", 1): period.days - days_a},
        {("A", 1): a, ("B", 1): b},
        period.days,
    )
    assert totals(lines) == {
        "A|energy|tier 1": D("22.50"),  # threshold 300 × 9/30 = 90 kWh × 0.25
        "A|energy|tier 2": D("11.01"),  # 35.5 × 0.31 = 11.005 → 11.01 (half-up)
        "A|supply|": D("9.90"),  # 9 days × 1.10
        "A|service|": D("3.60"),  # 12.00 × 9/30
        "B|energy|tier 1": D("46.20"),  # threshold 300 × 21/30 = 210 kWh × 0.22
        "B|energy|tier 2": D("11.60"),  # 40 × 0.29
        "B|supply|": D("19.95"),  # 21 days × 0.95
        "B|service|": D("10.50"),  # 15.00 × 21/30
    }
    assert lines["A|energy|tier 1"].quantity == D(90)
    assert lines["A|energy|tier 2"].quantity == D("35.5")
    assert lines["B|energy|tier 1"].quantity == D(210)
    assert lines["B|energy|tier 2"].quantity == D(40)
    assert lines["A|supply|"].quantity == D(9)
    assert lines["B|supply|"].quantity == D(21)
    assert lines["A|service|"].quantity == D("0.3")
    assert lines["B|service|"].quantity == D("0.7")
    assert {k: v.currency for k, v in lines.items()} == dict.fromkeys(lines, "AUD")
    # without proration (a full period on A) the whole 125.5 kWh sits in tier 1
    full = rate_one(a, {"energy|": "125.5"}, days=30, period_days=30)
    assert full["A|energy|tier 1"].total == D("31.38")  # 125.5 × 0.25 = 31.375 → 31.38
    assert full["A|energy|tier 2"].total == D("0.00")
    assert full["A|service|"].total == D("12.00")


# --- package / block pricing ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwh", "blocks", "total"),
    [("0", "0", "0.00"), ("1", "1", "5.00"), ("99.999999", "1", "5.00"), ("100", "1", "5.00"),
     ("100.000001", "2", "10.00"), ("200", "2", "10.00"), ("250", "3", "15.00")],
)
def test_package_charges_every_started_block(kwh: str, blocks: str, total: str) -> None:
    book = make_book([{"id": "blocks", "kind": "package", "metric": "energy_import",
                       "package_size": "100", "package_price": "5.00"}])
    lines = rate_one(book, {"blocks|": kwh})
    assert set(lines) == {"T|blocks|"}
    assert lines["T|blocks|"].quantity == D(blocks)
    assert lines["T|blocks|"].total == D(total)


# --- surcharges, minimum, tax -------------------------------------------------------------------------------------
def extras_book(minimum_applies_to: tuple[str, ...] = ("energy", "supply")) -> PriceBook:
    return make_book([
        {"id": "energy", "kind": "per_unit", "metric": "energy_import", "rate": "0.25"},
        {"id": "supply", "kind": "fixed_daily", "rate": "0.10"},
        {"id": "levy", "kind": "surcharge", "rate_percent": "5", "applies_to": ["energy"]},
        {"id": "env", "kind": "surcharge", "metric": "energy_import", "rate": "0.0123"},
        {"id": "minimum", "kind": "minimum", "amount": "30.00", "applies_to": list(minimum_applies_to)},
        {"id": "gst", "kind": "tax", "rate_percent": "10",
         "applies_to": ["energy", "supply", "levy", "env", "minimum"]},
    ], book_id="S")


def test_minimum_tops_up_and_tax_covers_surcharges_and_top_up() -> None:
    lines = rate_one(extras_book(), {"energy|": "37.36", "env|": "37.36"}, days=30, period_days=30)
    assert totals(lines) == {
        "S|energy|": D("9.34"),  # 37.36 × 0.25
        "S|supply|": D("3.00"),  # 30 × 0.10
        "S|levy|": D("0.47"),  # 5 % × 9.34 = 0.467
        "S|env|": D("0.46"),  # 37.36 × 0.0123 = 0.459528
        "S|minimum|": D("17.66"),  # 30.00 − (9.34 + 3.00)
        "S|gst|": D("3.09"),  # 10 % × (9.34 + 3.00 + 0.47 + 0.46 + 17.66 = 30.93) = 3.093
    }
    assert lines["S|gst|"].quantity == D("30.93")
    assert lines["S|minimum|"].quantity == D("12.34")
    assert lines["S|levy|"].quantity == D("9.34")
    assert lines["S|env|"].quantity == D("37.36")
    assert [lines[k].component_kind for k in ("S|levy|", "S|env|", "S|minimum|", "S|gst|")] == [
        "surcharge", "surcharge", "minimum", "tax"]


def test_minimum_is_zero_when_usage_exceeds_it() -> None:
    lines = rate_one(extras_book(), {"energy|": "168", "env|": "168"}, days=30, period_days=30)
    assert totals(lines) == {
        "S|energy|": D("42.00"),
        "S|supply|": D("3.00"),
        "S|levy|": D("2.10"),
        "S|env|": D("2.07"),  # 168 × 0.0123 = 2.0664
        "S|minimum|": D("0.00"),  # 45.00 ≥ 30.00
        "S|gst|": D("4.92"),  # 10 % × 49.17 = 4.917
    }


def test_minimum_without_period_days_is_not_prorated() -> None:
    lines = rate_one(extras_book(), {"energy|": "37.36", "env|": "37.36"}, days=30)
    assert lines["S|minimum|"].total == D("17.66")


def test_minimum_is_prorated_by_service_days() -> None:
    lines = rate_one(extras_book(), {"energy|": "20", "env|": "20"}, days=15, period_days=30)
    assert totals(lines) == {
        "S|energy|": D("5.00"),
        "S|supply|": D("1.50"),
        "S|levy|": D("0.25"),
        "S|env|": D("0.25"),  # 0.246
        "S|minimum|": D("8.50"),  # 30.00 × 15/30 = 15.00 − 6.50
        "S|gst|": D("1.55"),  # 10 % × 15.50
    }


def test_minimum_sees_surcharges_computed_before_it() -> None:
    lines = rate_one(extras_book(("energy", "supply", "levy")), {"energy|": "37.36", "env|": "37.36"},
                     days=30, period_days=30)
    assert lines["S|minimum|"].total == D("17.19")  # 30.00 − (9.34 + 3.00 + 0.47)
    assert lines["S|gst|"].total == D("3.05")  # 10 % × (9.34 + 3.00 + 0.47 + 0.46 + 17.19 = 30.46) = 3.046


def test_percentage_surcharge_works_on_rounded_totals() -> None:
    book = make_book([
        {"id": "energy", "kind": "per_unit", "metric": "energy_import", "rate": "0.25"},
        {"id": "half", "kind": "surcharge", "rate_percent": "50", "applies_to": ["energy"]},
    ])
    lines = rate_one(book, {"energy|": "40.02"})
    assert lines["T|energy|"].total == D("10.01")  # 10.005 → 10.01
    assert lines["T|half|"].total == D("5.01")  # 50 % of 10.01 = 5.005 → 5.01 (of the unrounded 10.005: 5.00)


# --- demand ----------------------------------------------------------------------------------------------------
def demand_book() -> PriceBook:
    weekdays = [{"day_types": ["weekday"], "start": "14:00", "end": "20:00"}]
    return make_book([
        {"id": "energy", "kind": "tou", "metric": "energy_import", "default_band": "off_peak",
         "bands": [{"band": "peak", "rate": "0.40", "times": weekdays}, {"band": "off_peak", "rate": "0.20"}]},
        {"id": "demand", "kind": "demand", "metric": "energy_import", "rate": "12.3456"},
        {"id": "peak_demand", "kind": "demand", "metric": "energy_import", "rate": "20.00",
         "tou_component": "energy", "band": "peak"},
    ], book_id="DM")


def test_demand_is_peak_kw_from_five_minute_data_times_rate() -> None:
    book = demand_book()
    five_minute_kwh = [D(x) for x in ("0.105", "0.210", "0.437", "0.398", "0.120", "0.004")]
    peak_band_kwh = [D(x) for x in ("0.105", "0.210", "0.398")]  # the intervals inside the peak band
    hours = D(5) / D(60)
    kw = max(five_minute_kwh) * 60 / 5  # = kWh ÷ (5/60), exactly
    peak_kw = max(peak_band_kwh) * 60 / 5
    assert kw == D("5.244")
    assert peak_kw == D("4.776")
    assert (max(five_minute_kwh) / hours).quantize(D("0.000001")) == kw
    lines = rate_one(book, {}, peaks={"demand": str(kw), "peak_demand": str(peak_kw)})
    assert totals(lines) == {
        "DM|demand|": D("64.74"),  # 5.244 × 12.3456 = 64.7403264
        "DM|peak_demand|": D("95.52"),  # 4.776 × 20.00
    }
    assert lines["DM|demand|"].quantity == D("5.244")
    assert lines["DM|demand|"].unit == "kW"
    assert lines["DM|demand|"].component_kind == "demand"


def test_demand_quantity_in_quantities_is_refused() -> None:
    book = demand_book()
    with pytest.raises(KeyError, match="demand"):
        rate_period({quantity_key(book, "demand", ""): D(1)}, {}, {(book.id, book.version): book})


def test_demand_limited_to_an_unknown_band_is_rejected() -> None:
    raw = demand_book().model_dump(mode="json")
    raw["components"][2]["band"] = "shoulder"
    with pytest.raises(ValidationError, match="has no TOU band 'shoulder'"):
        PriceBook.model_validate(raw)
    raw["components"][2].update(band="peak", tou_component="supply")
    with pytest.raises(ValidationError, match="has no TOU band 'peak'"):
        PriceBook.model_validate(raw)


# --- validation -------------------------------------------------------------------------------------------------
def _tiered(tiers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": "energy", "kind": "tiered", "mode": "graduated", "metric": "energy_import", "tiers": tiers}]


@pytest.mark.parametrize(
    ("components", "message"),
    [
        (_tiered([{"up_to": "300", "rate": "0.2"}, {"up_to": "100", "rate": "0.1"}, {"up_to": None, "rate": "0.1"}]),
         "tier limits must increase"),
        (_tiered([{"up_to": "100", "rate": "0.2"}, {"up_to": "100", "rate": "0.1"}, {"up_to": None, "rate": "0.1"}]),
         "tier limits must increase"),
        (_tiered([{"up_to": "100", "rate": "0.2"}, {"up_to": "300", "rate": "0.1"}]), "unlimited last tier"),
        (_tiered([{"up_to": None, "rate": "0.2"}, {"up_to": None, "rate": "0.1"}]), "unlimited last tier"),
        (_tiered([]), "unlimited last tier"),
        ([{"id": "energy", "kind": "per_unit", "metric": "energy_import", "rate": "0.25"},
          {"id": "s", "kind": "surcharge", "metric": "energy_import", "rate": "0.01", "rate_percent": "5",
           "applies_to": ["energy"]}], "either per unit"),
        ([{"id": "s", "kind": "surcharge"}], "either per unit"),
        ([{"id": "energy", "kind": "tou", "metric": "energy_import", "default_band": "off_peak",
           "bands": [{"band": "off_peak", "rate": "0.2"}]},
          {"id": "d", "kind": "demand", "metric": "energy_import", "rate": "1", "band": "off_peak"}],
         "needs both tou_component and band"),
        ([{"id": "energy", "kind": "tou", "metric": "energy_import", "default_band": "off_peak",
           "bands": [{"band": "off_peak", "rate": "0.2"}]},
          {"id": "d", "kind": "demand", "metric": "energy_import", "rate": "1", "tou_component": "energy"}],
         "needs both tou_component and band"),
        ([{"id": "b", "kind": "package", "metric": "energy_import", "package_size": "0", "package_price": "1"}],
         "package_size must be positive"),
        ([{"id": "m", "kind": "minimum", "amount": "30", "applies_to": ["nothing"]}], "unknown components"),
    ],
)
def test_invalid_components_are_rejected(components: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_book(components)


def test_float_rates_are_rejected() -> None:
    with pytest.raises(ValidationError, match="not float"):
        make_book([{"id": "b", "kind": "package", "metric": "energy_import", "package_size": 100.0,
                    "package_price": "5.00"}])


def test_tou_seasons_pick_the_band_by_month() -> None:
    """Seasons × day types × time bands: summer (Nov–Mar) peak 14:00–20:00 weekdays, winter (Jun–Aug)
    peak 17:00–21:00 weekdays, otherwise off-peak (timezone Australia/Sydney)."""
    from datetime import UTC, datetime

    book = PriceBook.model_validate({
        "id": "SEASONAL", "version": 1, "currency": "AUD", "timezone": "Australia/Sydney",
        "holiday_region": "AU-NSW", "effective_from": "2024-01-01",
        "components": [{"id": "energy", "kind": "tou", "metric": "energy_import", "default_band": "off_peak",
                        "bands": [
                            {"band": "peak", "rate": "0.50", "times": [
                                {"day_types": ["weekday"], "start": "14:00", "end": "20:00",
                                 "months": [11, 12, 1, 2, 3], "season": "summer"},
                                {"day_types": ["weekday"], "start": "17:00", "end": "21:00",
                                 "months": [6, 7, 8], "season": "winter"}]},
                            {"band": "off_peak", "rate": "0.20", "times": []}]}],
    })
    tou = book.components[0]
    # Tue 2024-02-13 15:00 AEDT (UTC+11) = 04:00 UTC: summer peak
    assert book.band_of(tou, datetime(2024, 2, 13, 4, 0, tzinfo=UTC)) == "peak"
    # Tue 2024-07-16 15:00 AEST (UTC+10) = 05:00 UTC: winter, before its peak
    assert book.band_of(tou, datetime(2024, 7, 16, 5, 0, tzinfo=UTC)) == "off_peak"
    # Tue 2024-07-16 18:00 AEST = 08:00 UTC: winter peak
    assert book.band_of(tou, datetime(2024, 7, 16, 8, 0, tzinfo=UTC)) == "peak"
    # Tue 2024-04-16 18:00 AEST = 08:00 UTC: shoulder season, no peak at all
    assert book.band_of(tou, datetime(2024, 4, 16, 8, 0, tzinfo=UTC)) == "off_peak"
    with pytest.raises(ValidationError):
        PriceBook.model_validate({**book.model_dump(mode="json"), "components": [
            {"id": "energy", "kind": "tou", "metric": "energy_import", "default_band": "off_peak", "bands": [
                {"band": "off_peak", "rate": "0.20", "times": [
                    {"day_types": ["weekday"], "start": "00:00", "end": "01:00", "months": [13]}]}]}]})


# --- tiers inside TOU (issue 14) ---------------------------------------------------------------------------------
def tiered_tou_book(mode: str = "graduated") -> PriceBook:
    """First 1,000 kWh of the month: peak 0.30, off-peak 0.15; above: peak 0.36, off-peak 0.18."""
    return make_book([{
        "id": "energy", "kind": "tou", "metric": "energy_import", "default_band": "off_peak", "tier_mode": mode,
        "bands": [{"band": "peak", "times": [{"day_types": ["weekday"], "start": "14:00", "end": "20:00"}]},
                  {"band": "off_peak"}],
        "tiers": [{"up_to": "1000", "rates": {"peak": "0.30", "off_peak": "0.15"}},
                  {"up_to": None, "rates": {"peak": "0.36", "off_peak": "0.18"}}],
    }], book_id="TT")


def test_tiers_inside_tou_allocate_each_tier_in_proportion_to_the_bands_share() -> None:
    """By hand: peak 600 + off-peak 900 = 1,500 kWh; tier 1 takes 1,000, tier 2 the other 500. Peak is 40 % of
    the month: 400 kWh in tier 1 (× 0.30 = 120.00) and 200 in tier 2 (× 0.36 = 72.00); off-peak 60 %: 600 in
    tier 1 (× 0.15 = 90.00) and 300 in tier 2 (× 0.18 = 54.00). Bill 336.00."""
    lines = rate_one(tiered_tou_book(), {"energy|peak": "600", "energy|off_peak": "900"})
    assert {k: (v.quantity, v.rate, v.total) for k, v in lines.items()} == {
        "TT|energy|peak, tier 1": (D(400), D("0.30"), D("120.00")),
        "TT|energy|peak, tier 2": (D(200), D("0.36"), D("72.00")),
        "TT|energy|off_peak, tier 1": (D(600), D("0.15"), D("90.00")),
        "TT|energy|off_peak, tier 2": (D(300), D("0.18"), D("54.00")),
    }
    assert sum(v.total for v in lines.values()) == D("336.00")
    assert {v.band for v in lines.values()} == {"peak, tier 1", "peak, tier 2", "off_peak, tier 1", "off_peak, tier 2"}
    # every line names both bands as its inputs: a peak kWh moves the off-peak lines' tier split too
    assert all(v.inputs == ("TT|energy|off_peak", "TT|energy|peak") for v in lines.values())


def test_tiers_inside_tou_below_the_first_limit_and_in_volume_mode() -> None:
    # below 1,000 kWh everything is tier 1 at each band's tier-1 rate; tier-2 lines are there, at zero
    low = rate_one(tiered_tou_book(), {"energy|peak": "123.456", "energy|off_peak": "10"})
    assert {k: v.total for k, v in low.items()} == {
        "TT|energy|peak, tier 1": D("37.04"),  # 123.456 × 0.30 = 37.0368
        "TT|energy|off_peak, tier 1": D("1.50"),
        "TT|energy|peak, tier 2": D("0.00"), "TT|energy|off_peak, tier 2": D("0.00"),
    }
    # volume: the whole 1,500 kWh at the rates of tier 2, where the total falls: 600 × 0.36 + 900 × 0.18
    vol = rate_one(tiered_tou_book("volume"), {"energy|peak": "600", "energy|off_peak": "900"})
    assert {k: v.total for k, v in vol.items() if v.total} == {"TT|energy|peak, tier 2": D("216.00"),
                                                               "TT|energy|off_peak, tier 2": D("162.00")}


def test_tiers_inside_tou_thresholds_are_prorated_on_a_plan_switch() -> None:
    # 10 of 30 days on this version: the tier-1 limit is 1,000 × 10/30 = 333.333… kWh of the 500 billed here
    lines = rate_one(tiered_tou_book(), {"energy|peak": "100", "energy|off_peak": "400"}, days=10, period_days=30)
    t1, total = D(1000) * D(10) / D(30), D(500)
    t2 = total - t1
    want = {"peak, tier 1": t1 * 100 / total * D("0.30"), "peak, tier 2": t2 * 100 / total * D("0.36"),
            "off_peak, tier 1": t1 * 400 / total * D("0.15"), "off_peak, tier 2": t2 * 400 / total * D("0.18")}
    assert {k.split("|")[2]: v.total for k, v in lines.items()} == {k: v.quantize(D("0.01")) for k, v in want.items()}
    assert lines["TT|energy|peak, tier 1"].total == D("20.00")  # 66.667 × 0.30


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5_000_000), min_size=2, max_size=2), st.integers(1, 30))
def test_tou_tier_allocation_adds_up_both_ways(micro: list[int], days: int) -> None:
    """Σ over bands of each tier = the tier's slice of the total; Σ over tiers of each band = the band's kWh; and
    with the same rate in every band, a tiered TOU component bills what the plain graduated tiers would."""
    comp = tiered_tou_book().components[0]
    assert isinstance(comp, TouComponent)
    bands = {"peak": D(micro[0]).scaleb(-3), "off_peak": D(micro[1]).scaleb(-3)}
    f = D(days) / D(30)
    alloc = tou_tier_allocation(comp, bands, f)
    total = sum(bands.values(), D(0))
    limit = D(1000) * f
    slices = [min(total, limit), max(total - limit, D(0))]
    for tier in (1, 2):
        assert abs(sum(q for _b, t, q in alloc if t == tier) - slices[tier - 1]) < D("1e-20")
    for band, q in bands.items():
        assert abs(sum(x for b, _t, x in alloc if b == band) - q) < D("1e-20")
    flat = make_book([{
        "id": "energy", "kind": "tou", "metric": "energy_import", "default_band": "off_peak",
        "bands": [{"band": "peak", "times": [{"day_types": ["weekday"], "start": "14:00", "end": "20:00"}]},
                  {"band": "off_peak"}],
        "tiers": [{"up_to": "1000", "rates": {"peak": "0.20", "off_peak": "0.20"}},
                  {"up_to": None, "rates": {"peak": "0.10", "off_peak": "0.10"}}]}])
    tou = rate_one(flat, {"energy|peak": str(bands["peak"]), "energy|off_peak": str(bands["off_peak"])}, days=days,
                   period_days=30)
    plain = rate_one(make_book([{"id": "energy", "kind": "tiered", "mode": "graduated", "metric": "energy_import",
                                 "tiers": [{"up_to": "1000", "rate": "0.20"}, {"up_to": None, "rate": "0.10"}]}]),
                     {"energy|": str(total)}, days=days, period_days=30)
    raw = sum((p.amount for v in tou.values() for p in v.parts), D(0))
    assert abs(raw - sum((p.amount for v in plain.values() for p in v.parts), D(0))) < D("1e-18")
    # each of the four lines rounds on its own (a documented choice): at most 2 cents from the plain bill
    assert abs(sum(v.total for v in tou.values()) - sum(v.total for v in plain.values())) <= D("0.02")


@pytest.mark.parametrize(("change", "message"), [
    ({"tiers": [{"up_to": "1000", "rates": {"peak": "0.30"}},
                {"up_to": None, "rates": {"peak": "0.36", "off_peak": "0.18"}}]},
     "tier 1 gives rates for \\['peak'\\], expected one for each band \\['off_peak', 'peak'\\]"),
    ({"tiers": [{"up_to": "1000", "rates": {"peak": "0.30", "off_peak": "0.1"}}]}, "unlimited last tier"),
    ({"tiers": [{"up_to": "0", "rates": {"peak": "0.30", "off_peak": "0.1"}},
                {"up_to": None, "rates": {"peak": "0.30", "off_peak": "0.1"}}]}, "limits must increase from above 0"),
    ({"tiers": []}, "bands \\['peak', 'off_peak'\\] have no rate"),
    ({"bands": [{"band": "peak", "rate": "0.3"}, {"band": "off_peak"}]}, "bands \\['peak'\\] must not have a rate"),
    ({"tier_mode": "stepped"}, "tier_mode"),
])
def test_invalid_tiered_tou_components_are_rejected(change: dict[str, Any], message: str) -> None:
    raw = tiered_tou_book().model_dump(mode="json")["components"][0]
    with pytest.raises(ValidationError, match=message):
        make_book([{**raw, **change}])


# --- block demand (issue 14) -------------------------------------------------------------------------------------
def block_book() -> PriceBook:
    """Demand: the first 10 kW at 12.00 per kW, the rest at 8.00 (30-minute demand intervals)."""
    return make_book([{"id": "demand", "kind": "demand", "metric": "energy_import", "interval_minutes": 30,
                       "blocks": [{"up_to": "10", "rate": "12.00"}, {"up_to": None, "rate": "8.00"}]}], book_id="BD")


@pytest.mark.parametrize(("peaks", "block1", "block2"), [
    # by hand: 16.5 kW = 10 × 12.00 + 6.5 × 8.00 = 120.00 + 52.00
    (["16.5"], ("10", "120.00"), ("6.5", "52.00")),
    (["7.25"], ("7.25", "87.00"), ("0", "0.00")),
    (["10"], ("10", "120.00"), ("0", "0.00")),
    (["0"], ("0", "0.00"), ("0", "0.00")),
    # two meters go through the blocks each: 16.5 → 10 + 6.5; 4 → 4 + 0
    (["16.5", "4"], ("14", "168.00"), ("6.5", "52.00")),
    (["-3"], ("0", "0.00"), ("0", "0.00")),  # a negative peak (only corrections) is no demand
])
def test_block_demand_charges_each_meters_peak_through_the_blocks(peaks: list[str], block1: tuple[str, str],
                                                                  block2: tuple[str, str]) -> None:
    book = block_book()
    lines = rate_period({}, {}, {(book.id, 1): book}, None, {quantity_key(book, "demand", ""): [D(p) for p in peaks]})
    got = {k: (v.quantity, v.total) for k, v in lines.items()}
    assert got == {"BD|demand|block 1": (D(block1[0]), D(block1[1])), "BD|demand|block 2": (D(block2[0]), D(block2[1]))}
    assert lines["BD|demand|block 1"].unit == "kW" and lines["BD|demand|block 2"].rate == D("8.00")


@pytest.mark.parametrize(("change", "message"), [
    ({"rate": "5"}, "either a rate \\(per kW\\) or blocks"),
    ({"blocks": []}, "either a rate \\(per kW\\) or blocks"),
    ({"blocks": [{"up_to": "10", "rate": "12"}]}, "unlimited last tier"),
    ({"interval_minutes": 60}, "the demand interval must be one of 5, 10, 15, 30 minutes"),
    ({"interval_minutes": 7}, "interval_minutes 7"),
])
def test_invalid_demand_components_are_rejected(change: dict[str, Any], message: str) -> None:
    raw = block_book().model_dump(mode="json")["components"][0]
    with pytest.raises(ValidationError, match=message):
        make_book([{**raw, **change}])


def test_a_band_limited_demand_needs_the_band_edges_on_its_interval_boundaries() -> None:
    raw = demand_book().model_dump(mode="json")
    raw["components"][0]["bands"][0]["times"][0]["start"] = "14:10"
    raw["components"][2]["interval_minutes"] = 15
    with pytest.raises(ValidationError, match="changes band at 14:10, inside an interval"):
        PriceBook.model_validate(raw)
    raw["components"][2]["interval_minutes"] = 10
    assert PriceBook.model_validate(raw).components[2].interval_minutes == 10


def test_unmeasurable_demand_names_the_components_the_windows_cannot_measure() -> None:
    book = demand_book()  # two demand components, 30-minute intervals (the default)
    assert unmeasurable_demand(book, lambda metric: 30) == []
    assert unmeasurable_demand(book, lambda metric: 5) == []
    problems = unmeasurable_demand(book, lambda metric: 60)
    assert len(problems) == 2 and problems[0].startswith(
        "DM v1 demand 'demand' is measured over 30-minute intervals, but energy_import is windowed in 60-minute "
        "windows")
