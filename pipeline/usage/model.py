"""The usage read model's pure core (issue 17 part A, seed 001 "Real-Time Usage Reporting"): folding window
revisions and rated charge lines into a period's state, building a snapshot, and the budget crossing rule.
No I/O; state values are plain dicts (JSON-able, decimals as strings) kept by ``pipeline.usage.processor``.

Period state (``PeriodUsage``) of one (account, billing period):

- ``metrics``: metric → local day (ISO) → kWh of the latest revision of every window of that day, and the kWh
  of windows carrying an estimated or substituted read (quality ``E`` or ``S``, SPEC §2);
- ``lines``: charge line ``price book id|component id|band`` → the latest ``period_total`` and ``quantity``
  rating emitted for it (``RatedCharge``; each record carries the line's new period total, so the latest one
  replaces its predecessors: no delta is summed twice), its kind, band, unit, currency and the metric it is
  attributed to: the component's own metric, else (fixed, tax, surcharge, minimum) the book's first metric;
- ``seq``: increases with every change (guards the Postgres upsert); ``above`` / ``crossings``: per alert
  kind, whether the cost is at or above the budget, and how many crossings there were.

Cost is rating's figure (SPEC §4): the sum of the latest period totals. The daily cost is an allocation of the
*variable* cost (every line but fixed daily/per-period charges, which rating prices for the whole period at
once) to days by their share of the metric's usage, in minor units by largest remainder so the days sum exactly
to it; the fixed charges are reported beside it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from pipeline.money import ZERO, minor_unit_exponent, quantity
from pipeline.records import ESTIMATED_QUALITY_FLAGS
from pipeline.usage import projection as pj

FIXED_KINDS = frozenset({"fixed_daily", "fixed_period"})
ESTIMATED_FLAGS = ESTIMATED_QUALITY_FLAGS  # E, S and F, as the bill marks them
ALERT_KINDS = ("ACTUAL", "PROJECTED")


def new_period(account: str, period_start: date, period_end: date) -> dict[str, Any]:
    """An empty period state (see the module docstring)."""
    return {"account": account, "period_start": period_start.isoformat(), "period_end": period_end.isoformat(),
            "metrics": {}, "lines": {}, "seq": 0, "above": {}, "crossings": {}}


def add_window(ps: dict[str, Any], metric: str, day: date, kwh: Decimal, estimated: bool, sign: int) -> None:
    """Add (``sign`` 1) or remove (−1) one window revision's kWh on local ``day`` of ``metric``. Exact: removing
    the revision a later one replaces and adding the new one leaves the state as if only the new one came."""
    m = ps["metrics"].setdefault(metric, {"days": {}, "estimated": "0"})
    key = day.isoformat()
    value = Decimal(m["days"].get(key, "0")) + sign * kwh
    m["days"][key] = str(value)
    if estimated:
        m["estimated"] = str(Decimal(m["estimated"]) + sign * kwh)


def set_line(ps: dict[str, Any], line_key: str, period_total: Decimal, qty: Decimal, kind: str, band: str,
             unit: str, currency: str, metric: str) -> None:
    """Record the latest period total of one charge line (replaces the previous one)."""
    ps["lines"][line_key] = {"total": str(period_total), "quantity": str(qty), "kind": kind, "band": band,
                             "unit": unit, "currency": currency, "metric": metric}


def allocate(total: Decimal, weights: list[Decimal], exp: Decimal) -> list[Decimal]:
    """``total`` (currency units, a multiple of ``exp``) split over ``weights`` (≥ 0) in multiples of ``exp``
    by largest remainder: the parts sum exactly to ``total``; equal shares when the weights sum to 0.
    Raises ``ValueError`` for a negative weight or a ``total`` finer than ``exp``."""
    if not weights:
        return []
    if any(w < 0 for w in weights):
        raise ValueError("weights must be >= 0")
    units = total / exp
    if units != units.to_integral_value():
        raise ValueError(f"{total} is not a multiple of {exp}")
    n = int(units)
    sign, n = (-1 if n < 0 else 1), abs(n)
    ws = weights if sum(weights, ZERO) > 0 else [Decimal(1)] * len(weights)
    whole = sum(ws, ZERO)
    exact = [Decimal(n) * w / whole for w in ws]
    floors = [int(x) for x in exact]
    left = n - sum(floors)
    order = sorted(range(len(ws)), key=lambda i: (-(exact[i] - floors[i]), i))
    for i in order[:left]:
        floors[i] += 1
    return [sign * f * exp for f in floors]


def daily_series(days: dict[str, str], period_start: date, through: date) -> list[Decimal]:
    """kWh per local day from ``period_start`` through ``through`` (inclusive), 0 for a day without data."""
    n = (through - period_start).days + 1
    return [Decimal(days.get((period_start + timedelta(d)).isoformat(), "0")) for d in range(n)]


@dataclass(frozen=True)
class MetricSnapshot:
    """The snapshot of one (account, metric, billing period) (seed 001 "Usage Snapshots").

    Attributes:
        usage_kwh: usage so far, kWh (6 dp) for energy metrics; a telemetry metric's own unit otherwise;
            ``as_of_day``: last local day with data (``None``: none).
        days_elapsed / period_days: days from the period start through ``as_of_day`` / days in the period.
        daily: ``(day, kWh, variable cost)`` per day from the period's first day with data through ``as_of_day``
            (a day without data in between counts 0 kWh; cost: see the module docstring). Days before the first
            data (a meter that started mid-period) are left out, and projections extrapolate over the days from
            that first day to the period end.
        cost / fixed_cost: cost so far attributed to the metric and its fixed part, currency units.
        bands: TOU band → kWh so far (rating's line quantities); ``estimated_share``: share of the kWh from
            estimated or substituted reads (``None`` without usage).
        projections: each method's ``Projection``; ``projected_cost``: cost by the best projection (highest
            confidence), rounded half-up to the minor unit.
    """

    account: str
    metric: str
    period_start: date
    period_end: date
    currency: str | None
    usage_kwh: Decimal
    as_of_day: date | None
    days_elapsed: int
    period_days: int
    daily: list[tuple[date, Decimal, Decimal]]
    cost: Decimal
    fixed_cost: Decimal
    bands: dict[str, Decimal]
    estimated_share: Decimal | None
    projections: list[pj.Projection] = field(default_factory=list)
    projected_cost: Decimal = ZERO

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (decimals and dates as strings), stored in ``usage_snapshots.snapshot``."""
        return {
            "account": self.account, "metric": self.metric, "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(), "currency": self.currency, "usage_kwh": str(self.usage_kwh),
            "as_of_day": self.as_of_day.isoformat() if self.as_of_day else None,
            "days_elapsed": self.days_elapsed, "period_days": self.period_days,
            "daily": [[d.isoformat(), str(k), str(c)] for d, k, c in self.daily],
            "cost": str(self.cost), "fixed_cost": str(self.fixed_cost),
            "bands": {b: str(v) for b, v in sorted(self.bands.items())},
            "estimated_share": None if self.estimated_share is None else str(self.estimated_share),
            "projections": [{"method": p.method, "usage_kwh": str(p.usage), "confidence": str(p.confidence)}
                            for p in self.projections],
            "projected_cost": str(self.projected_cost),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MetricSnapshot:
        """Inverse of ``to_json``."""
        return cls(
            d["account"], d["metric"], date.fromisoformat(d["period_start"]), date.fromisoformat(d["period_end"]),
            d["currency"], Decimal(d["usage_kwh"]),
            date.fromisoformat(d["as_of_day"]) if d["as_of_day"] else None, d["days_elapsed"], d["period_days"],
            [(date.fromisoformat(a), Decimal(b), Decimal(c)) for a, b, c in d["daily"]],
            Decimal(d["cost"]), Decimal(d["fixed_cost"]), {b: Decimal(v) for b, v in d["bands"].items()},
            None if d["estimated_share"] is None else Decimal(d["estimated_share"]),
            [pj.Projection(p["method"], Decimal(p["usage_kwh"]), Decimal(p["confidence"])) for p in d["projections"]],
            Decimal(d["projected_cost"]))


def _full_year_before(last_year: dict[str, Any] | None, metric: str) -> list[Decimal]:
    """Last year's daily series of ``metric`` when that period has data through its last day, else []."""
    if last_year is None or metric not in last_year["metrics"]:
        return []
    days = last_year["metrics"][metric]["days"]
    start, end = date.fromisoformat(last_year["period_start"]), date.fromisoformat(last_year["period_end"])
    last = end - timedelta(days=1)
    if last.isoformat() not in days:
        return []
    return daily_series(days, start, last)


def snapshots(ps: dict[str, Any], last_year: dict[str, Any] | None = None) -> list[MetricSnapshot]:
    """The snapshot of every metric of a period state (usage metrics and metrics that only carry cost), in
    metric order. ``last_year``: the state of the same period one year earlier (for YEAR_OVER_YEAR)."""
    start, end = date.fromisoformat(ps["period_start"]), date.fromisoformat(ps["period_end"])
    period_days = (end - start).days
    currencies = {ln["currency"] for ln in ps["lines"].values()}
    currency = min(currencies) if currencies else None
    metrics = sorted(set(ps["metrics"]) | {ln["metric"] for ln in ps["lines"].values()})
    out = []
    for metric in metrics:
        m = ps["metrics"].get(metric, {"days": {}, "estimated": "0"})
        lines = [ln for ln in ps["lines"].values() if ln["metric"] == metric]
        cost = sum((Decimal(ln["total"]) for ln in lines), ZERO)
        fixed = sum((Decimal(ln["total"]) for ln in lines if ln["kind"] in FIXED_KINDS), ZERO)
        bands: dict[str, Decimal] = {}
        for ln in lines:
            if ln["kind"] == "tou" and ln["band"]:
                bands[ln["band"]] = bands.get(ln["band"], ZERO) + Decimal(ln["quantity"])
        with_data = [d for d in m["days"] if start.isoformat() <= d < end.isoformat()]
        first = date.fromisoformat(min(with_data)) if with_data else start
        as_of = date.fromisoformat(max(with_data)) if with_data else None
        daily = daily_series(m["days"], first, as_of) if as_of else []
        measured_days = (end - first).days  # the part of the period from its first day with data
        usage = quantity(sum(daily, ZERO))
        exp = minor_unit_exponent(currency) if currency else Decimal("0.01")
        costs = allocate((cost - fixed).quantize(exp), [max(k, ZERO) for k in daily], exp) if daily else []
        projections = [pj.daily_average(daily, measured_days), pj.weighted_average(daily, measured_days)]
        yoy = pj.year_over_year(daily, measured_days,
                                _full_year_before(last_year, metric)[(first - start).days:])
        if yoy is not None:
            projections.append(yoy)
        chosen = pj.best(projections) if daily else None
        projected = pj.projected_cost(fixed, cost - fixed, usage, chosen.usage if chosen else usage)
        out.append(MetricSnapshot(
            ps["account"], metric, start, end, currency, usage, as_of, (as_of - start).days + 1 if as_of else 0,
            period_days,
            [(first + timedelta(i), k, c) for i, (k, c) in enumerate(zip(daily, costs, strict=True))],
            cost, fixed, bands,
            (Decimal(m["estimated"]) / usage).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP) if usage else None,
            projections if daily else [], projected.quantize(exp, rounding=ROUND_HALF_UP)))
    return out


def cross(above: bool, amount: Decimal, budget: Decimal) -> tuple[bool, bool]:
    """The crossing rule of budget alerts (issue 17): returns ``(above now, alert now)``.

    A crossing is the move from below the budget (``amount < budget``) to at or above it (``amount ≥ budget``):
    it alerts once. While the amount stays at or above, nothing more alerts, however often it changes (late
    data, revisions, restarts: ``above`` is kept in the stage's transactional state). When it drops back below,
    the rule re-arms silently; reaching the budget again is a new crossing and alerts again."""
    now = amount >= budget
    return now, now and not above


def alert_id(account: str, period_start: date, kind: str, crossing: int) -> str:
    """Deterministic id of the ``crossing``-th crossing of ``kind`` in an account period (32 hex chars)."""
    return hashlib.sha256(f"{account}|{period_start}|{kind}|{crossing}".encode()).hexdigest()[:32]
