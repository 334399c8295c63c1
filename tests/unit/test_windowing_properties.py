"""Property tests of windowing (SPEC §3) through the real processor and a FakeContext.

For any arrival order, duplication and supersession of a generated event set and any watermark
progress (punctuation points):
- the last revision of every window equals the batch aggregate over the deduplicated, superseded
  events that were not too late;
- the deltas of a window's revisions sum to its final value;
- every event is counted exactly once as accepted, duplicate, superseded or too late;
- revisions of a window are 0, 1, 2, ... with no gap or repeat, ON_TIME only at revision 0.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.records import LateEvent, UsageEvent, UsageWindow
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import FakeContext
from pipeline.topology import Topics
from pipeline.windowing import windows as w
from pipeline.windowing.processor import WindowingProcessor

BASE = datetime(2024, 1, 1, tzinfo=UTC)
CODEC = default_codec()
TOPICS = Topics(Settings())
SERIES = ("NMI1/E1", "NMI1/B1")


def value_of(series: str, slot: int, version: int) -> Decimal:
    return Decimal(slot * 7 + version * 3 + len(series)) / 8


def make_event(series: str, slot: int, version: int) -> UsageEvent:
    start = BASE + timedelta(minutes=15 * slot)
    return UsageEvent(
        event_id=f"{series}:{slot}", account="ACC-1", series=series,
        metric="energy_import" if series.endswith("E1") else "energy_export", unit="kWh",
        event_time=start, event_end=start + timedelta(minutes=15), value=value_of(series, slot, version),
        version=BASE + timedelta(days=version), quality="E" if version == 1 else "A", source=f"f{version}.csv#{slot}",
    )


arrivals = st.lists(
    st.tuples(st.sampled_from(SERIES), st.integers(0, 40), st.integers(1, 3)), min_size=1, max_size=120
)


def run(events: list[UsageEvent], punctuate_at: set[int], lateness_ms: int):
    policy = w.WindowPolicy(size_ms=30 * 60_000, out_of_orderness_ms=60 * 60_000,
                            allowed_lateness_ms=lateness_ms, idle_timeout_ms=10_000)
    clock = [0]
    proc = WindowingProcessor(TOPICS, CODEC, lambda _m: policy, clock_ms=lambda: clock[0])
    ctx = FakeContext()
    proc.on_assign(0, ctx)
    for i, ev in enumerate(events):
        proc.process(Incoming(TOPICS.usage_events, 0, i, b"ACC-1", CODEC.encode(ev), (), 0), ctx)
        if i in punctuate_at:
            proc.punctuate(clock[0], ctx)
    clock[0] = 4_000_000_000_000  # idle → the watermark follows the wall clock: everything closes
    proc.punctuate(clock[0], ctx)
    windows = [CODEC.decode(v, UsageWindow) for t, _, v in ctx.forwarded if t == TOPICS.usage_windows]
    late = [CODEC.decode(v, LateEvent) for t, _, v in ctx.forwarded if t == TOPICS.usage_late]
    return proc, windows, late, ctx


def check(events: list[UsageEvent], windows: list[UsageWindow], late: list[LateEvent], proc) -> None:
    # every event counted exactly once
    assert sum(proc.outcomes.values()) == len(events)
    assert proc.outcomes["too_late"] == len(late)
    late_ids = [(le.event.event_id, le.event.version) for le in late]
    # batch aggregate over the events that were not too late: highest version per identity
    kept = list(events)
    for lid in late_ids:
        kept.remove(next(e for e in kept if (e.event_id, e.version) == lid))
    best: dict[str, UsageEvent] = {}
    for e in kept:
        if e.event_id not in best or e.version > best[e.event_id].version:
            best[e.event_id] = e
    expected: dict[str, Decimal] = defaultdict(Decimal)
    for e in best.values():
        start, _ = w.window_bounds(int(e.event_time.timestamp() * 1000), 30 * 60_000)
        expected[w.window_id(e.account, e.series, start)] += e.value
    by_window: dict[str, list[UsageWindow]] = defaultdict(list)
    for out in windows:
        by_window[out.window_id].append(out)
    assert set(by_window) == set(expected)
    for wid, revs in by_window.items():
        assert [r.revision for r in revs] == list(range(len(revs)))
        assert all(r.timing == "LATE" for r in revs[1:])
        assert revs[-1].value == expected[wid]
        assert sum((r.delta for r in revs), Decimal(0)) == revs[-1].value


@settings(max_examples=150, deadline=None)
@given(arrivals, st.sets(st.integers(0, 120)))
def test_final_revision_equals_batch_aggregate_without_too_late(arr, punct) -> None:
    events = [make_event(*a) for a in arr]
    proc, windows, late, _ = run(events, punct, lateness_ms=10 * 365 * 86_400_000)
    assert late == []
    check(events, windows, late, proc)


@settings(max_examples=150, deadline=None)
@given(arrivals, st.sets(st.integers(0, 120)))
def test_too_late_events_are_counted_and_excluded(arr, punct) -> None:
    events = [make_event(*a) for a in arr]
    proc, windows, late, _ = run(events, punct, lateness_ms=30 * 60_000)
    check(events, windows, late, proc)
    for le in late:
        assert le.lateness_ms >= 0 and le.reason == "TOO_LATE"


def test_late_supersession_re_emits_with_exact_delta() -> None:
    est = make_event("NMI1/E1", 0, 1)
    later = make_event("NMI1/E1", 20, 1)  # moves the watermark past window 0
    actual = make_event("NMI1/E1", 0, 2)
    stale = make_event("NMI1/E1", 0, 1)  # lower version after the actual: a duplicate
    proc, windows, _late, _ = run([est, later, actual, stale], {1, 2, 3}, lateness_ms=86_400_000)
    w0 = [x for x in windows if x.window_start == BASE]
    assert [(x.revision, x.timing) for x in w0] == [(0, "ON_TIME"), (1, "LATE")]
    assert w0[1].delta == actual.value - est.value
    assert w0[1].qualities == ("A",)
    assert proc.outcomes == {"accepted": 2, "superseded": 1, "duplicate": 1, "too_late": 0}
