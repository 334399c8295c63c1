"""Window aggregations (SPEC §3): sum, count, min, max, latest, unique count — with supersession."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from pipeline.records import UsageEvent
from pipeline.windowing import windows as w

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def ev(slot: int, value: str, version: int = 1, ident: str | None = None) -> UsageEvent:
    start = T0 + timedelta(minutes=5 * slot)
    return UsageEvent(ident or f"e{slot}", "ACC", "api/ACC", "api_requests", "request", start,
                      start + timedelta(minutes=5), Decimal(value), T0 + timedelta(days=version), "A", f"src#{slot}")


def fold(kind: str, events: list[UsageEvent]) -> Decimal:
    policy = w.WindowPolicy(3_600_000, 0, 86_400_000, 1000, aggregation=kind)
    first = events[0]
    state = w.new_window(first.account, first.series, first.metric, first.unit, w._ms(first.event_time), policy)
    for e in events:
        w.apply_interval(state, e.event_id, w.interval_of(e), w.NO_CLOCK)
    return state.value


EVENTS = [ev(0, "3"), ev(1, "7"), ev(2, "3"), ev(3, "5")]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("sum", "18"), ("count", "4"), ("min", "3"), ("max", "7"), ("latest", "5"), ("unique_count", "3")],
)
def test_each_aggregation(kind: str, expected: str) -> None:
    assert fold(kind, EVENTS) == Decimal(expected)


@pytest.mark.parametrize(
    ("kind", "expected"),
    # e1 superseded 7 → 1: sum 12, count 4, min 1, max 5, latest still e3 = 5, unique {3, 1, 5} = 3
    [("sum", "12"), ("count", "4"), ("min", "1"), ("max", "5"), ("latest", "5"), ("unique_count", "3")],
)
def test_aggregations_see_only_the_superseding_version(kind: str, expected: str) -> None:
    events = [*EVENTS, ev(1, "1", version=2), ev(1, "9", version=1)]  # the version-1 repeat is a duplicate
    assert fold(kind, events) == Decimal(expected)


def test_unknown_aggregation_is_refused() -> None:
    with pytest.raises(ValueError, match="aggregation"):
        w.WindowPolicy(1, 0, 0, 0, aggregation="median")
