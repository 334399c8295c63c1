"""Projections (pipeline.usage.projection): properties of the three methods and the confidence rule, and the
seed 001 mid-cycle example (450 kWh in 15 of 30 days → 900 kWh, confidence 0.50)."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.usage import projection as pj

KWH = st.decimals(min_value=0, max_value=500, places=3, allow_nan=False, allow_infinity=False)


@st.composite
def series(draw: st.DrawFn) -> tuple[list[Decimal], int]:
    period = draw(st.integers(1, 92))
    daily = draw(st.lists(KWH, min_size=1, max_size=period))
    return daily, period


def test_seed_001_mid_cycle_example() -> None:
    daily = [Decimal(30)] * 15
    p = pj.daily_average(daily, 30)
    assert (p.usage, p.confidence) == (Decimal("900.000000"), Decimal("0.50"))
    w = pj.weighted_average(daily, 30)
    assert (w.usage, w.confidence) == (Decimal("900.000000"), Decimal("0.50"))


def test_weighted_average_uses_the_last_seven_days_linearly() -> None:
    daily = [Decimal(100)] * 3 + [Decimal(i) for i in range(1, 8)]  # 10 days, the last 7 are 1..7
    expected_mean = Decimal(sum(w * w for w in range(1, 8))) / 28  # Σ wᵢ·xᵢ / Σ wᵢ with xᵢ = wᵢ
    got = pj.weighted_average(daily, 30)
    assert got.usage == (Decimal(328) + expected_mean * 20).quantize(Decimal("0.000001"))
    assert pj.weights(10) == [1, 2, 3, 4, 5, 6, 7] and pj.weights(3) == [1, 2, 3]


def test_year_over_year_scales_by_last_years_shape() -> None:
    last = [Decimal(10)] * 10 + [Decimal(30)] * 20  # 700 kWh, 100 in the first 10 days
    p = pj.year_over_year([Decimal(12)] * 10, 30, last)
    assert p is not None and p.usage == Decimal("840.000000")  # 120 × 700 / 100
    assert pj.year_over_year([Decimal(12)] * 10, 30, []) is None
    assert pj.year_over_year([Decimal(12)] * 10, 30, [Decimal(0)] * 30) is None


@given(series())
def test_projection_is_at_least_usage_so_far_and_exact_when_the_period_is_over(s: tuple[list[Decimal], int]) -> None:
    daily, period = s
    so_far = sum(daily, Decimal(0))
    for p in (pj.daily_average(daily, period), pj.weighted_average(daily, period)):
        assert p.usage >= so_far.quantize(Decimal("0.000001"))
        assert Decimal(0) <= p.confidence <= Decimal(1)
        if len(daily) == period:
            assert p.usage == so_far.quantize(Decimal("0.000001"))


@given(series(), st.integers(1, 9))
def test_projection_scales_linearly_with_usage(s: tuple[list[Decimal], int], k: int) -> None:
    daily, period = s
    for method in (pj.daily_average, pj.weighted_average):
        base, scaled = method(daily, period), method([x * k for x in daily], period)
        assert abs(scaled.usage - base.usage * k) <= Decimal("0.00001") * k
        assert scaled.confidence == base.confidence  # the coefficient of variation does not change


@given(st.integers(1, 92), st.decimals(min_value=Decimal("0.001"), max_value=500, places=3), st.data())
def test_steady_use_is_projected_exactly_with_confidence_the_share_elapsed(period: int, kwh: Decimal,
                                                                           data: st.DataObject) -> None:
    n = data.draw(st.integers(1, period))
    for method in (pj.daily_average, pj.weighted_average):
        p = method([kwh] * n, period)
        assert p.usage == (kwh * period).quantize(Decimal("0.000001"))
        assert p.confidence == (Decimal(n) / period).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


@given(series())
def test_more_variable_days_never_raise_confidence(s: tuple[list[Decimal], int]) -> None:
    daily, period = s
    steady = [sum(daily, Decimal(0)) / len(daily)] * len(daily)
    assert pj.daily_average(daily, period).confidence <= pj.daily_average(steady, period).confidence or \
        sum(daily) == 0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        pj.daily_average([Decimal(1)] * 31, 30)
    with pytest.raises(ValueError):
        pj.weighted_average([], 0)


def test_projected_cost_keeps_fixed_charges_and_scales_the_rest() -> None:
    # seed 001: readiness to serve $15.00 for the period, usage $54.00 for 450 kWh → 900 kWh
    assert pj.projected_cost(Decimal("15.00"), Decimal("54.00"), Decimal(450), Decimal(900)) == Decimal("123.00")
    assert pj.projected_cost(Decimal("15.00"), Decimal("0"), Decimal(0), Decimal(0)) == Decimal("15.00")
