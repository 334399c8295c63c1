"""Event-time tumbling windows, watermarks, late data and supersession: pure functions (SPEC §3).

Nothing here does I/O or reads a clock; the processor passes times in epoch milliseconds (UTC)
and quantities in integer micro-units (value × 10⁶: every quantity has at most 6 decimal places,
SPEC §4, so integer arithmetic is exact and gives the same results as ``Decimal``).

Rules (SPEC §3, the Flink/Beam convention):
- a window is ``[start, end)``, aligned to the epoch, ``size`` long;
- the partition watermark is the highest event time seen − allowed out-of-orderness and never
  moves backwards; after an idle timeout it follows processing time (see ``idle_advance``);
- ``watermark ≥ end``: the window is due; it is emitted once per change (revision n+1);
- an event is too late when ``watermark ≥ end + allowed lateness``;
- inside a window an interval's identity keeps its highest version: a higher version
  supersedes (the aggregate changes by new − old), an equal or lower one is a duplicate.

A ``WindowState`` is a mutable value owned by the state store: ``apply_interval`` and ``emit``
change it in place (copying a window per event was the stage's main cost); the caller writes it
back to the store after every change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from enum import StrEnum
from operator import attrgetter
from typing import NamedTuple

from pipeline.records import UsageEvent

MICRO = 1_000_000  # micro-units per unit: quantities carry 6 decimal places (SPEC §4)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)  # no rounding


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


class Interval(NamedTuple):
    """The version of one interval (identity) held in a window.

    Attributes:
        version_ms: supersession version, epoch ms UTC (SPEC §2).
        value: the quantity in micro-units of the window's unit (``Decimal`` value × 10⁶).
        quality: quality flag (A, E, S, F, N, V).
        source: ``<file name>#<record line>``.
        event_ms: the interval's event time, epoch ms UTC (orders ``latest``).
    """

    version_ms: int
    value: int
    quality: str
    source: str
    event_ms: int


@dataclass(slots=True)
class WindowState:
    """One window's state: its intervals by identity and what was last emitted.

    Attributes:
        window_id: ``account|series|start`` (see ``window_id``).
        start_ms / end_ms: the window ``[start, end)``, epoch ms UTC.
        aggregation: one of ``AGGREGATIONS``.
        intervals: event id → the highest version held of that interval; ``None`` for a window
            read back from the state store before its interval entries are loaded (the store
            keeps them apart, see ``pipeline.windowing.wire``): the pure functions here need them.
        revision: last emitted revision, −1 before the first emission.
        emitted: the value (micro-units) carried by that revision (0 before).
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
    aggregation: str = "sum"
    intervals: dict[str, Interval] | None = field(default_factory=dict)
    revision: int = -1
    emitted: int = 0
    dirty: bool = False
    late: bool = False

    @property
    def value(self) -> Decimal:
        """The current aggregate of the held interval values (see ``aggregate``), as a ``Decimal``."""
        return to_decimal(aggregate(self.aggregation, self.intervals))


def aggregate(kind: str, intervals: dict[str, Interval]) -> int:
    """Aggregate the current version of every interval of a window (SPEC §3 aggregations), in
    micro-units (``count`` and ``unique_count`` are counts × 10⁶, i.e. plain numbers of units).

    Because only the highest version of each identity is held, supersession works the same way
    for every aggregation. Raises ``ValueError`` for an unknown ``kind``.
    """
    if kind == "sum":
        return sum(map(_VALUE, intervals.values()))
    if kind == "count":
        return len(intervals) * MICRO
    if kind == "unique_count":
        return len({iv.value for iv in intervals.values()}) * MICRO
    if not intervals:
        if kind in AGGREGATIONS:
            return 0
        raise ValueError(f"unknown aggregation {kind!r}")
    if kind == "min":
        return min([iv.value for iv in intervals.values()])
    if kind == "max":
        return max([iv.value for iv in intervals.values()])
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


def new_window(account: str, series: str, metric: str, unit: str, event_ms: int, policy: WindowPolicy) -> WindowState:
    """An empty window for an event of (account, series) at ``event_ms`` (epoch ms UTC)."""
    start = event_ms - (event_ms % policy.size_ms)
    return WindowState(window_id(account, series, start), account, series, metric, unit, start,
                       start + policy.size_ms, policy.aggregation)


def supersedes(held: Interval | None, iv: Interval) -> bool:
    """Whether ``iv`` takes the place of ``held``, the version held of the same interval identity
    (``None``: none): a new identity, or a strictly higher version (SPEC §2). Otherwise ``iv`` is a
    duplicate."""
    return held is None or held.version_ms < iv.version_ms


def apply_interval(state: WindowState, event_id: str, iv: Interval, wm: Watermark, policy: WindowPolicy) -> Outcome:
    """Fold one event (identity ``event_id``, its version and value as ``iv``) into its window,
    changing ``state`` in place unless the outcome is ``DUPLICATE`` or ``TOO_LATE``.

    The caller checks ``is_too_late`` first only to route the event; this function also refuses
    too-late events (``Outcome.TOO_LATE``, state unchanged). A higher version of a held identity
    supersedes it; when its value and quality are the same, the newer version is kept but the
    window has nothing new to emit (not marked dirty).
    """
    end = state.end_ms
    if wm.watermark_ms >= end + policy.allowed_lateness_ms:
        return Outcome.TOO_LATE
    intervals = state.intervals
    held = intervals.get(event_id)
    if not supersedes(held, iv):
        return Outcome.DUPLICATE
    if held is None:
        intervals[event_id] = iv
        outcome = Outcome.ACCEPTED
    else:
        intervals[event_id] = iv
        outcome = Outcome.SUPERSEDED
        if held.value == iv.value and held.quality == iv.quality:
            return outcome  # identical content: keep the newer version, nothing to re-emit
    state.dirty = True
    if wm.watermark_ms >= end:
        state.late = True
    return outcome


def is_due(state: WindowState, wm: Watermark) -> bool:
    """Whether the window has an unemitted change and the watermark has reached its end."""
    return state.dirty and wm.watermark_ms >= state.end_ms


class Revision(NamedTuple):
    """One emitted revision of a window (the content of a ``UsageWindow`` record, SPEC §3).

    Times in epoch ms UTC, ``value`` and ``delta`` in micro-units; ``qualities`` and
    ``sources`` sorted and distinct.
    """

    window_id: str
    account: str
    series: str
    metric: str
    unit: str
    start_ms: int
    end_ms: int
    revision: int
    timing: str
    value: int
    delta: int
    count: int
    qualities: list[str]
    sources: list[str]
    watermark_ms: int


_VALUE, _QUALITY, _SOURCE = attrgetter("value"), attrgetter("quality"), attrgetter("source")


def emit(state: WindowState, wm: Watermark) -> Revision:
    """The next revision of a due window; ``state`` records it (revision, emitted value, clean).

    Revision 0 is ON_TIME unless its data arrived after the watermark passed the window end;
    every later revision is LATE (SPEC §3). ``delta`` is the change from the previous revision.
    The reported watermark is clamped at 0 (the epoch).
    """
    ivs = state.intervals.values()
    value = aggregate(state.aggregation, state.intervals)
    revision = state.revision + 1
    qualities = set(map(_QUALITY, ivs))
    sources = set(map(_SOURCE, ivs))
    out = tuple.__new__(Revision, (  # Revision(...) without the cost of its Python-level constructor
        state.window_id, state.account, state.series, state.metric, state.unit, state.start_ms, state.end_ms,
        revision, "ON_TIME" if revision == 0 and not state.late else "LATE", value, value - state.emitted,
        len(ivs), sorted(qualities) if len(qualities) > 1 else list(qualities),
        sorted(sources) if len(sources) > 1 else list(sources), max(wm.watermark_ms, 0),
    ))
    state.revision = revision
    state.emitted = value
    state.dirty = state.late = False
    return out


def is_expired(state: WindowState, wm: Watermark, policy: WindowPolicy) -> bool:
    """State can be purged: no pending change and no event can reach it any more."""
    return not state.dirty and is_too_late(state.end_ms, wm, policy)


# --- conversions ------------------------------------------------------------------------------------
def interval_of(event: UsageEvent) -> Interval:
    """The ``Interval`` an event contributes.

    Raises ``ValueError`` when the value has more than 6 decimal places.
    """
    return Interval(_ms(event.version), to_micro(event.value), event.quality, event.source, _ms(event.event_time))


def to_micro(value: Decimal) -> int:
    """``value`` × 10⁶ as an exact integer; ``ValueError`` if it has more than 6 decimal places."""
    numerator, denominator = value.as_integer_ratio()  # exact; ValueError for NaN, OverflowError for ∞
    micro, rest = divmod(numerator * MICRO, denominator)
    if rest:
        raise ValueError(f"{value} has more than 6 decimal places")
    return micro


def to_decimal(micro: int) -> Decimal:
    """The ``Decimal`` of ``micro`` micro-units, with 6 decimal places."""
    return Decimal(micro).scaleb(-6, _EXACT)


def _ms(dt: datetime) -> int:
    """Epoch milliseconds of an aware datetime, exactly (integer arithmetic; sub-ms truncated toward −∞)."""
    return (dt - _EPOCH) // _ONE_MS


def _dt(ms: int) -> datetime:
    """The UTC datetime of epoch milliseconds ``ms``."""
    return _EPOCH + timedelta(milliseconds=ms)
