"""Projections of a billing period's usage to its end: pure functions, no I/O (seed 001 "Projection Methods").

Inputs are a daily usage series in kWh (``Decimal``; one entry per local day of the period elapsed so far,
oldest first, a day without data counting 0) and the period's length in days. Outputs are kWh for the
whole period, quantized to 6 decimal places half-up (SPEC §4, ``pipeline.money.quantity``), with a
confidence in [0, 1] (2 decimal places).

Methods (seed 001):

- ``daily_average``: usage so far + mean daily usage × remaining days (DAILY_AVERAGE).
- ``weighted_average``: usage so far + weighted mean of the last ``WEIGHT_DAYS`` = 7 days × remaining
  days, weights linear 1, 2, …, m from the oldest to the newest of those m ≤ 7 days (WEIGHTED_AVERAGE).
- ``year_over_year``: usage so far × (last year's same-period total ÷ last year's usage over the same
  number of elapsed days); only when last year's period is complete (YEAR_OVER_YEAR).

Confidence rule (seed 001 "Show confidence levels"; 15 of 30 days of steady use → 0.50 as in the seed):
``f / (1 + cv)`` where ``f`` = days elapsed ÷ days in the period and ``cv`` = the coefficient of
variation (population standard deviation ÷ mean) of the daily usage the method averages (all days for
the daily average, the last 7 for the weighted average, all days for year over year); ``cv`` = 1 when
the mean is 0 (nothing to extrapolate from). Year over year has last year's full period behind it, so
its ``f`` is ``f + (1 − f) / 2``. A projection with no day elapsed has confidence 0 and equals 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from pipeline.money import ZERO, quantity

WEIGHT_DAYS = 7
CONFIDENCE_EXP = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class Projection:
    """A projection of one period's usage.

    Attributes:
        method: ``DAILY_AVERAGE``, ``WEIGHTED_AVERAGE`` or ``YEAR_OVER_YEAR`` (seed 001).
        usage: projected usage of the whole period, kWh (6 dp).
        confidence: in [0, 1], 2 dp (module docstring rule).
    """

    method: str
    usage: Decimal
    confidence: Decimal


def _check(daily: Sequence[Decimal], period_days: int) -> None:
    if period_days < 1:
        raise ValueError(f"period_days must be >= 1, got {period_days}")
    if len(daily) > period_days:
        raise ValueError(f"{len(daily)} days of usage do not fit a {period_days}-day period")


def variation(values: Sequence[Decimal]) -> Decimal:
    """Coefficient of variation (population standard deviation ÷ mean) of ``values``; 1 when empty or the
    mean is 0; 0 when every value is equal."""
    if not values:
        return Decimal(1)
    mean = sum(values, ZERO) / len(values)
    if mean == 0:
        return Decimal(1)
    var = sum(((v - mean) ** 2 for v in values), ZERO) / len(values)
    return abs(var.sqrt() / mean)


def confidence(elapsed_share: Decimal, cv: Decimal) -> Decimal:
    """``elapsed_share / (1 + cv)`` clamped to [0, 1], 2 dp half-up (module docstring rule)."""
    c = elapsed_share / (1 + cv)
    return min(Decimal(1), max(ZERO, c)).quantize(CONFIDENCE_EXP, rounding=ROUND_HALF_UP)


def daily_average(daily: Sequence[Decimal], period_days: int) -> Projection:
    """DAILY_AVERAGE: ``sum(daily) + mean(daily) × (period_days − len(daily))`` kWh. Raises ``ValueError`` when
    more days are given than the period has or ``period_days`` < 1."""
    _check(daily, period_days)
    if not daily:
        return Projection("DAILY_AVERAGE", quantity(ZERO), ZERO)
    so_far = sum(daily, ZERO)
    mean = so_far / len(daily)
    f = Decimal(len(daily)) / period_days
    return Projection("DAILY_AVERAGE", quantity(so_far + mean * (period_days - len(daily))),
                      confidence(f, variation(daily)))


def weights(n: int) -> list[int]:
    """The linear weights of the last ``min(n, WEIGHT_DAYS)`` days, oldest first: 1, 2, …, m."""
    return list(range(1, min(n, WEIGHT_DAYS) + 1))


def weighted_average(daily: Sequence[Decimal], period_days: int) -> Projection:
    """WEIGHTED_AVERAGE: ``sum(daily) + Σ wᵢ·xᵢ / Σ wᵢ × remaining days`` over the last ≤ 7 days, weights
    ``weights(len(daily))``. Raises ``ValueError`` like ``daily_average``."""
    _check(daily, period_days)
    if not daily:
        return Projection("WEIGHTED_AVERAGE", quantity(ZERO), ZERO)
    w = weights(len(daily))
    recent = list(daily[-len(w):])
    wmean = sum((Decimal(wi) * x for wi, x in zip(w, recent, strict=True)), ZERO) / sum(w)
    so_far = sum(daily, ZERO)
    f = Decimal(len(daily)) / period_days
    return Projection("WEIGHTED_AVERAGE", quantity(so_far + wmean * (period_days - len(daily))),
                      confidence(f, variation(recent)))


def year_over_year(daily: Sequence[Decimal], period_days: int, last_year: Sequence[Decimal]) -> Projection | None:
    """YEAR_OVER_YEAR: ``sum(daily) × sum(last_year) / sum(last_year[:len(daily)])`` kWh, where ``last_year`` is
    the daily usage of the same period one year earlier, complete (one entry per day of that period).
    ``None`` when there is no such history (``last_year`` empty) or last year's elapsed days used nothing.
    Raises ``ValueError`` like ``daily_average``."""
    _check(daily, period_days)
    if not last_year or not daily:
        return None
    before = sum(last_year[:len(daily)], ZERO)
    if before == 0:
        return None
    so_far = sum(daily, ZERO)
    f = Decimal(len(daily)) / period_days
    return Projection("YEAR_OVER_YEAR", quantity(so_far * sum(last_year, ZERO) / before),
                      confidence(f + (1 - f) / 2, variation(daily)))


def best(projections: Sequence[Projection | None]) -> Projection | None:
    """The projection with the highest confidence (the first on a tie); ``None`` when there is none."""
    found = [p for p in projections if p is not None]
    return max(found, key=lambda p: p.confidence) if found else None


def projected_cost(fixed: Decimal, variable: Decimal, usage_so_far: Decimal, projected_usage: Decimal) -> Decimal:
    """A period's projected cost in currency units (unrounded): the fixed charges as rated (already for the
    whole period) plus the variable cost scaled by projected ÷ actual usage (the seed 001 mid-cycle example:
    readiness to serve at its full-period amount, usage charges scaled). With no usage so far the variable
    cost stays as it is. Tiers and percentage taxes are scaled proportionally: an estimate, labelled so."""
    if usage_so_far == 0:
        return fixed + variable
    return fixed + variable * projected_usage / usage_so_far
