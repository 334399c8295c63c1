"""Reading the usage read model: ``snapshot(conn_or_settings, account, as_of)`` (issue 17, seed 001 "Usage
Snapshots" and its real-time usage endpoint)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from pipeline.money import ZERO
from pipeline.usage.model import MetricSnapshot


@dataclass(frozen=True)
class UsageSnapshot:
    """An account's billing period as the ``usage`` stage last saw it.

    Attributes:
        account / period_start / period_end: the billing period containing ``as_of`` (local dates, end exclusive).
        currency: the bill's currency (``None`` before any charge was rated).
        cost / projected_cost: cost so far and projected cost of the period, currency units, summed over metrics.
        metrics: one ``MetricSnapshot`` per metric (usage kWh, daily series, TOU bands, projections).
        seq: the snapshot sequence (newest of the metrics).
    """

    account: str
    period_start: date
    period_end: date
    currency: str | None
    cost: Decimal
    projected_cost: Decimal
    metrics: list[MetricSnapshot]
    seq: int

    def metric(self, name: str) -> MetricSnapshot:
        """The snapshot of metric ``name``; raises ``KeyError`` when the period has none."""
        for m in self.metrics:
            if m.metric == name:
                return m
        raise KeyError(f"no usage of {name!r} for {self.account} in {self.period_start}..{self.period_end}")

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (the CLI's ``--json``)."""
        return {"account": self.account, "period_start": self.period_start.isoformat(),
                "period_end": self.period_end.isoformat(), "currency": self.currency, "cost": str(self.cost),
                "projected_cost": str(self.projected_cost), "seq": self.seq,
                "metrics": [m.to_json() for m in self.metrics]}


def snapshot(conn_or_settings: Any, account: str, as_of: date | None = None) -> UsageSnapshot | None:
    """The snapshot of ``account``'s billing period containing local date ``as_of`` (default: its latest period
    with a snapshot), or ``None`` when there is none. ``conn_or_settings``: an open connection
    (``pipeline.runtime.postgres.connect``) or a ``Settings`` (its ``database_url`` is used)."""
    if hasattr(conn_or_settings, "database_url"):
        from pipeline.runtime import postgres

        with postgres.connect(conn_or_settings.database_url) as conn:
            return snapshot(conn, account, as_of)
    conn = conn_or_settings
    if as_of is None:
        found = conn.execute("SELECT max(period_start) FROM usage_snapshots WHERE account = %s", (account,)).fetchone()
    else:
        found = conn.execute("SELECT max(period_start) FROM usage_snapshots WHERE account = %s AND period_start <= %s "
                             "AND period_end > %s", (account, as_of, as_of)).fetchone()
    if found is None or found[0] is None:
        return None
    rows = conn.execute("SELECT seq, snapshot FROM usage_snapshots WHERE account = %s AND period_start = %s "
                        "ORDER BY metric", (account, found[0])).fetchall()
    metrics = [MetricSnapshot.from_json(s) for _, s in rows]
    currency = next((m.currency for m in metrics if m.currency), None)
    return UsageSnapshot(account, metrics[0].period_start, metrics[0].period_end, currency,
                         sum((m.cost for m in metrics), ZERO), sum((m.projected_cost for m in metrics), ZERO),
                         metrics, max(seq for seq, _ in rows))


def describe(s: UsageSnapshot) -> list[str]:
    """The snapshot as lines for a person (seed 001 "Mid-Cycle Snapshot": estimates labelled as such)."""
    out = [f"{s.account}  period {s.period_start} .. {s.period_end} (exclusive)  snapshot #{s.seq}",
           f"  cost so far: {s.cost} {s.currency or ''}   projected (estimate): {s.projected_cost} {s.currency or ''}"]
    for m in s.metrics:
        share = "" if m.estimated_share is None else \
            f", estimated reads {(m.estimated_share * 100).quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}%"
        out.append(f"  {m.metric or '(account charges)'}: {m.usage_kwh} kWh to {m.as_of_day} "
                   f"({m.days_elapsed} of {m.period_days} days), cost {m.cost} (fixed {m.fixed_cost}){share}")
        if m.bands:
            out.append("    bands: " + ", ".join(f"{b} {v} kWh" for b, v in sorted(m.bands.items())))
        for p in m.projections:
            out.append(f"    projected {p.method}: {p.usage} kWh, confidence {p.confidence}")
        for d, kwh, cost in m.daily[-7:]:
            out.append(f"    {d}: {kwh} kWh, {cost} variable cost")
    return out
