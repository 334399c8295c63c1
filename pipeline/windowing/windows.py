"""Event-time tumbling windows, per-series watermarks, closing and late revisions: pure functions
(SPEC §3). Nothing here does I/O or reads a clock; the processor passes times in epoch
milliseconds (UTC) and quantities in integer micro-units (value × 10⁶: every quantity has at
most 6 decimal places, SPEC §4, so integer arithmetic is exact and gives the same results as
``Decimal``).

Rules (SPEC §3, as rewritten for "every accepted reading is billed exactly once"):

- a window is ``[start, end)``, aligned to the epoch, ``size`` long, per (account, series);
- event-time progress is tracked **per series** (account + meter channel or metric), never per
  partition: ``SeriesClock.watermark_ms`` = the highest event time seen in the series − allowed
  out-of-orderness, never backwards; a gateway's completion marker ("complete through T")
  raises ``closed_through_ms``. Other series' data and processing-time pauses never move it;
- a window **closes** (is emitted) when ``closes_at(clock) ≥ end``, or when its series has been
  quiet for the idle timeout in processing time (the processor decides that), so a meter that
  stops reporting is still billed. Closing never refuses later data;
- a change to an emitted window gives revision n+1, LATE, with the new value and the delta;
  all changes within one commit interval give one revision;
- **nothing is too late**: there is no lateness refusal. ``allowed_lateness_ms`` only says how
  long after its end (on its series' clock) a window keeps its full state hot; then it is
  archived in a compact form and brought back when data for it arrives (``is_archivable``);
- the only refusal here is the explicit back-billing rule (``refuses_back_billing``);
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
    REFUSED = "refused"  # an explicit billing rule refused it (usage.late, with its reason)


# metrics whose quantity is credited to the customer (feed-in): a higher value lowers the bill
CREDIT_METRICS = frozenset({"energy_export"})


AGGREGATIONS = ("sum", "count", "min", "max", "latest", "unique_count")


@dataclass(frozen=True, slots=True)
class WindowPolicy:
    """Window size, time bounds (milliseconds) and the aggregation of one metric.

    Attributes:
        size_ms: tumbling window length.
        out_of_orderness_ms: a series' watermark trails its highest event time by this.
        allowed_lateness_ms: how long after its end (on its series' clock) a window keeps its full
            state hot before it is archived (``is_archivable``); data later than that is still billed.
        idle_timeout_ms: processing time without events after which a series' pending windows are
            emitted anyway (a meter that stops reporting is billed).
        aggregation: one of ``AGGREGATIONS``: ``sum`` of values, ``count`` of distinct
            intervals/events, ``min``, ``max``, ``latest`` (value of the latest event time) or
            ``unique_count`` (number of distinct values).

    Raises ``ValueError`` on bad values.
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
        late: the pending change makes the next revision LATE (the window was emitted before,
            or its series had closed past ``end_ms`` when the change arrived).
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


class SeriesClock(NamedTuple):
    """Event-time progress of one series (account + meter channel or metric), epoch ms UTC.

    Attributes:
        max_event_ms: the highest event time seen in the series.
        watermark_ms: ``max_event_ms − out-of-orderness``; never decreases (SPEC §3).
        closed_through_ms: the latest "complete through" time a gateway's completion marker gave
            for the series (files end, a meter's data is complete up to it); never decreases.
        metric: the series' metric ("" before its first event): its policy (window size, idle
            timeout, allowed lateness) applies to the whole series.

    Every decision taken from a clock depends only on ``closed_window(clock, size)``, the window
    boundary it has reached, so a clock need only be saved when that moves (the processor does so).
    """

    max_event_ms: int
    watermark_ms: int
    closed_through_ms: int
    metric: str = ""


NEVER = -(2**62)
NO_CLOCK = SeriesClock(NEVER, NEVER, NEVER)


def closes_at(clock: SeriesClock) -> int:
    """Up to when (epoch ms, exclusive) the series' windows are closed: the later of its watermark
    and its completion markers. A window with ``end ≤ closes_at`` is emitted (SPEC §3)."""
    return clock.watermark_ms if clock.watermark_ms >= clock.closed_through_ms else clock.closed_through_ms


def closed_window(clock: SeriesClock, size_ms: int) -> int:
    """``closes_at`` rounded down to a window boundary of ``size_ms``: the end of the last window of the
    series that has closed. Window ends are multiples of the size, so ``end ≤ closes_at`` exactly when
    ``end ≤ closed_window``; every rule here reads the clock through it."""
    at = closes_at(clock)
    return at - at % size_ms


def window_bounds(event_ms: int, size_ms: int) -> tuple[int, int]:
    """``(start, end)`` of the tumbling window containing ``event_ms`` (epoch-aligned, end exclusive)."""
    start = event_ms - (event_ms % size_ms)
    return start, start + size_ms


def window_id(account: str, series: str, start_ms: int) -> str:
    """The deterministic window identity ``account|series|start`` (start as epoch ms)."""
    return f"{account}|{series}|{start_ms}"


def advance(clock: SeriesClock, event_ms: int, policy: WindowPolicy) -> SeriesClock:
    """The series clock after seeing an event at ``event_ms``; never moves backwards. Only the
    series' own events move it: no other series, no processing time (SPEC §3)."""
    if event_ms <= clock.max_event_ms:
        return clock
    watermark = event_ms - policy.out_of_orderness_ms
    return SeriesClock(event_ms, watermark if watermark > clock.watermark_ms else clock.watermark_ms,
                       clock.closed_through_ms, clock.metric)


def close_through(clock: SeriesClock, through_ms: int) -> SeriesClock:
    """The series clock after a completion marker "complete through ``through_ms``" (epoch ms, exclusive):
    windows ending at or before it close now. Later data for them is still billed (a LATE revision)."""
    if through_ms <= clock.closed_through_ms:
        return clock
    return clock._replace(closed_through_ms=through_ms)


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


def apply_interval(state: WindowState, event_id: str, iv: Interval, clock: SeriesClock) -> Outcome:
    """Fold one event (identity ``event_id``, its version and value as ``iv``) into its window,
    changing ``state`` in place unless the outcome is ``DUPLICATE``. Never refuses: no event is too
    late (SPEC §3); the back-billing rule is checked by the caller first (``refuses_back_billing``).

    A higher version of a held identity supersedes it; when its value and quality are the same, the
    newer version is kept but the window has nothing new to emit (not marked dirty). A change to a
    window that was already emitted, or whose series has closed past its end, makes the next
    revision LATE.
    """
    intervals = state.intervals
    held = intervals.get(event_id)
    if held is not None and held.version_ms >= iv.version_ms:  # not supersedes(held, iv)
        return _DUPLICATE
    intervals[event_id] = iv
    if held is None:
        outcome = _ACCEPTED
    else:
        outcome = _SUPERSEDED
        if held.value == iv.value and held.quality == iv.quality:
            return outcome  # identical content: keep the newer version, nothing to re-emit
    state.dirty = True
    # the same as closed_window(...) >= end; closes_at(clock), inline
    if state.revision >= 0 or (clock.watermark_ms if clock.watermark_ms >= clock.closed_through_ms
                               else clock.closed_through_ms) >= state.end_ms:
        state.late = True
    return outcome


_ACCEPTED, _SUPERSEDED, _DUPLICATE = Outcome.ACCEPTED, Outcome.SUPERSEDED, Outcome.DUPLICATE  # looked up once


def is_due(state: WindowState, clock: SeriesClock) -> bool:
    """Whether the window has an unemitted change and its series has closed past its end."""
    return state.dirty and closes_at(clock) >= state.end_ms


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


def emit(state: WindowState, clock: SeriesClock) -> Revision:
    """The next revision of a due window; ``state`` records it (revision, emitted value, clean).

    Revision 0 is ON_TIME unless its data arrived after the series had closed past the window end;
    every later revision is LATE (SPEC §3). ``delta`` is the change from the previous revision.
    The reported watermark is the series' ``closed_window`` (the account's event clock downstream,
    SPEC §5), clamped at 0 (the epoch). Emitting does not need the series to have closed: a quiet
    series' windows are emitted too (the caller decides when).
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
        sorted(sources) if len(sources) > 1 else list(sources),
        max(closed_window(clock, state.end_ms - state.start_ms), 0),
    ))
    state.revision = revision
    state.emitted = value
    state.dirty = state.late = False
    return out


def is_archivable(state: WindowState, clock: SeriesClock, policy: WindowPolicy) -> bool:
    """Whether the window's hot state may be archived (SPEC §3 "state stays bounded"): emitted,
    nothing pending, and its series has closed ``allowed lateness`` past its end. An archived
    window is brought back, whole, when data for it arrives: archiving never refuses anything."""
    return not state.dirty and state.revision >= 0 and \
        closed_window(clock, policy.size_ms) >= state.end_ms + policy.allowed_lateness_ms


def raises_bill(metric: str, before: int, after: int) -> bool:
    """Whether changing a window of ``metric`` from ``before`` to ``after`` (micro-units) raises
    the customer's bill: more usage does, except on a credited metric (``CREDIT_METRICS``: feed-in
    export), where less does. Rule of the back-billing limit (SPEC §3): only an *undercharge* may be
    refused; a correction that lowers a bill is always credited (NERR rules 30 and 31; see
    ``docs/semantics.md``)."""
    if metric in CREDIT_METRICS:
        return after < before
    return after > before


def refuses_back_billing(limit_ms: int | None, account_clock_ms: int, end_ms: int, metric: str,
                         before: int, after: int) -> bool:
    """The back-billing rule (SPEC §3): refuse a change to a window that ended more than
    ``limit_ms`` before the account's billing clock (``account_clock_ms``: the highest event time
    of the account's own series) when it would raise the bill (``raises_bill``). ``limit_ms``
    ``None`` (the default): nothing is ever refused."""
    if limit_ms is None or account_clock_ms - end_ms <= limit_ms:
        return False
    return raises_bill(metric, before, after)


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
