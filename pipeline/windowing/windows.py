"""Event-time tumbling windows, watermarks, late data and supersession: pure functions (SPEC §3).

Nothing here does I/O or reads a clock; the processor passes times in epoch milliseconds (UTC).

Rules (SPEC §3, the Flink/Beam convention):
- a window is ``[start, end)``, aligned to the epoch, ``size`` long;
- the partition watermark is the highest event time seen − allowed out-of-orderness and never
  moves backwards; after an idle timeout it follows processing time (see ``idle_advance``);
- ``watermark ≥ end``: the window is due; it is emitted once per change (revision n+1);
- an event is too late when ``watermark ≥ end + allowed lateness``;
- inside a window an interval's identity keeps its highest version: a higher version
  supersedes (the aggregate changes by new − old), an equal or lower one is a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum

from pipeline.records import UsageEvent, UsageWindow

ZERO = Decimal(0)


class Outcome(StrEnum):
    """What happened to one incoming event; every event gets exactly one."""

    ACCEPTED = "accepted"  # a new interval in its window
    SUPERSEDED = "superseded"  # replaced a lower version of the same interval
    DUPLICATE = "duplicate"  # equal or lower version than the one held: no change
    TOO_LATE = "too_late"  # watermark ≥ window end + allowed lateness


AGGREGATIONS = ("sum", "count", "min", "max", "latest", "unique_count")


@dataclass(frozen=True, slots=True)
class WindowPolicy:
    """Window size, lateness bounds (milliseconds) and the aggregation of one metric.

    ``aggregation`` is one of ``AGGREGATIONS``: ``sum`` of values, ``count`` of distinct
    intervals/events, ``min``, ``max``, ``latest`` (value of the latest event time) or
    ``unique_count`` (number of distinct values). Raises ``ValueError`` on bad values.
    """

    size_ms: int
    out_of_orderness_ms: int
    allowed_lateness_ms: int
    idle_timeout_ms: int
    aggregation: str = "sum"

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.size_ms <= 0:
            raise ValueError("window size must be positive")
        if min(self.out_of_orderness_ms, self.allowed_lateness_ms, self.idle_timeout_ms) < 0:
            raise ValueError("durations must be >= 0")


@dataclass(frozen=True, slots=True)
class IntervalValue:
    """The version of one interval (identity) held in a window."""

    version_ms: int
    value: Decimal
    quality: str
    source: str
    event_ms: int = 0


@dataclass(frozen=True, slots=True)
class WindowState:
    """One window's state: its intervals by identity and what was last emitted.

    Attributes:
        revision: last emitted revision, −1 before the first emission.
        emitted_value: the value carried by that revision (0 before).
        dirty: changed since the last emission.
        late: a pending change arrived when the watermark had already passed ``end_ms``.
    """

    window_id: str
    account: str
    series: str
    metric: str
    unit: str
    start_ms: int
    end_ms: int
    intervals: dict[str, IntervalValue]
    revision: int = -1
    emitted_value: Decimal = ZERO
    dirty: bool = False
    late: bool = False
    aggregation: str = "sum"

    @property
    def value(self) -> Decimal:
        """The current aggregate of the held interval values (see ``aggregate``)."""
        return aggregate(self.aggregation, self.intervals)


def aggregate(kind: str, intervals: dict[str, IntervalValue]) -> Decimal:
    """Aggregate the current version of every interval of a window (SPEC §3 aggregations).

    Because only the highest version of each identity is held, supersession works the same way
    for every aggregation. Raises ``ValueError`` for an unknown ``kind``.
    """
    values = [iv.value for iv in intervals.values()]
    if kind == "sum":
        return sum(values, ZERO)
    if kind == "count":
        return Decimal(len(values))
    if kind == "unique_count":
        return Decimal(len(set(values)))
    if not values:
        return ZERO
    if kind == "min":
        return min(values)
    if kind == "max":
        return max(values)
    if kind == "latest":
        return max(intervals.items(), key=lambda kv: (kv[1].event_ms, kv[0]))[1].value
    raise ValueError(f"unknown aggregation {kind!r}")


@dataclass(frozen=True, slots=True)
class Watermark:
    """A partition's event-time progress (epoch ms). ``watermark_ms`` never decreases."""

    max_event_ms: int
    watermark_ms: int


NO_WATERMARK = Watermark(max_event_ms=-(2**62), watermark_ms=-(2**62))


def window_bounds(event_ms: int, size_ms: int) -> tuple[int, int]:
    """``(start, end)`` of the tumbling window containing ``event_ms`` (epoch-aligned, end exclusive)."""
    start = event_ms - (event_ms % size_ms)
    return start, start + size_ms


def window_id(account: str, series: str, start_ms: int) -> str:
    """The deterministic window identity ``account|series|start`` (start as epoch ms)."""
    return f"{account}|{series}|{start_ms}"


def advance(wm: Watermark, event_ms: int, policy: WindowPolicy) -> Watermark:
    """The watermark after seeing an event at ``event_ms``; never moves backwards."""
    max_event = max(wm.max_event_ms, event_ms)
    return Watermark(max_event, max(wm.watermark_ms, max_event - policy.out_of_orderness_ms))


def idle_advance(wm: Watermark, wallclock_ms: int, last_activity_ms: int, policy: WindowPolicy) -> Watermark:
    """After ``idle_timeout`` without records, the watermark follows processing time (SPEC §3).

    It moves to ``wallclock − out-of-orderness`` (never backwards), so quiet partitions still
    close their windows.
    """
    if wallclock_ms - last_activity_ms < policy.idle_timeout_ms:
        return wm
    return Watermark(wm.max_event_ms, max(wm.watermark_ms, wallclock_ms - policy.out_of_orderness_ms))


def is_too_late(end_ms: int, wm: Watermark, policy: WindowPolicy) -> bool:
    """SPEC §3: too late when ``watermark ≥ window end + allowed lateness``."""
    return wm.watermark_ms >= end_ms + policy.allowed_lateness_ms


def new_window(event: UsageEvent, policy: WindowPolicy) -> WindowState:
    """An empty window for ``event``'s (account, series, window start)."""
    start, end = window_bounds(_ms(event.event_time), policy.size_ms)
    return WindowState(
        window_id(event.account, event.series, start), event.account, event.series,
        event.metric, event.unit, start, end, {}, aggregation=policy.aggregation,
    )


def apply_event(
    state: WindowState, event: UsageEvent, wm: Watermark, policy: WindowPolicy
) -> tuple[WindowState, Outcome]:
    """Fold one event into its window (``state`` from ``new_window`` or the store).

    Returns the new state (``state`` itself when nothing changed) and the outcome.
    The caller checks ``is_too_late`` first only to route the event; this function also
    refuses too-late events (returns ``Outcome.TOO_LATE`` and the unchanged state).
    """
    if is_too_late(state.end_ms, wm, policy):
        return state, Outcome.TOO_LATE
    version = _ms(event.version)
    held = state.intervals.get(event.event_id)
    if held is not None and held.version_ms >= version:
        return state, Outcome.DUPLICATE
    intervals = dict(state.intervals)
    intervals[event.event_id] = IntervalValue(version, event.value, event.quality, event.source,
                                              _ms(event.event_time))
    outcome = Outcome.ACCEPTED if held is None else Outcome.SUPERSEDED
    if held is not None and held.value == event.value and held.quality == event.quality:
        # a newer version with identical content: keep the newer version, nothing to re-emit
        dirty, late = state.dirty, state.late
    else:
        dirty, late = True, state.late or wm.watermark_ms >= state.end_ms
    return WindowState(  # the constructor, not dataclasses.replace: this is the hot path
        state.window_id, state.account, state.series, state.metric, state.unit, state.start_ms, state.end_ms,
        intervals, state.revision, state.emitted_value, dirty, late, state.aggregation,
    ), outcome


def is_due(state: WindowState, wm: Watermark) -> bool:
    """Whether the window has an unemitted change and the watermark has reached its end."""
    return state.dirty and wm.watermark_ms >= state.end_ms


def emit(state: WindowState, wm: Watermark) -> tuple[UsageWindow, WindowState]:
    """The next revision of a due window and the state after emitting it.

    Revision 0 is ON_TIME unless its data arrived after the watermark passed the window end;
    every later revision is LATE (SPEC §3). ``delta`` is the change from the previous revision.
    """
    value = state.value
    revision = state.revision + 1
    timing = "ON_TIME" if revision == 0 and not state.late else "LATE"
    ivs = state.intervals.values()
    out = UsageWindow(
        window_id=state.window_id,
        account=state.account,
        series=state.series,
        metric=state.metric,
        unit=state.unit,
        window_start=_dt(state.start_ms),
        window_end=_dt(state.end_ms),
        revision=revision,
        timing=timing,
        value=value,
        delta=value - state.emitted_value,
        count=len(state.intervals),
        qualities=tuple(sorted({iv.quality for iv in ivs})),
        sources=tuple(sorted({iv.source for iv in ivs})),
        watermark=_dt(max(wm.watermark_ms, 0)),
    )
    return out, replace(state, revision=revision, emitted_value=value, dirty=False, late=False)


def is_expired(state: WindowState, wm: Watermark, policy: WindowPolicy) -> bool:
    """State can be purged: no pending change and no event can reach it any more."""
    return not state.dirty and is_too_late(state.end_ms, wm, policy)


# --- time helpers ---------------------------------------------------------------------------------
def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
