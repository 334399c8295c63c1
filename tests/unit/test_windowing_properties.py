"""Property tests of windowing (SPEC §3) through the real processor and a FakeContext.

For any arrival order, duplication and supersession of a generated event set over several accounts
and series, any processing-time pauses (idle steps), completion markers and punctuation points, and
any allowed lateness (small: windows are archived and brought back):
- the last revision of every window equals the batch aggregate over the deduplicated, superseded
  events: nothing is ever too late;
- the deltas of a window's revisions sum to its final value;
- every event is counted exactly once as accepted, duplicate or superseded;
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
from pipeline.records import SeriesMarker, UsageEvent, UsageWindow
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import ChangelogStore, FakeContext
from pipeline.topology import Topics
from pipeline.windowing import windows as w
from pipeline.windowing.processor import WindowingProcessor, state_codec

BASE = datetime(2024, 1, 1, tzinfo=UTC)
CODEC = default_codec()
TOPICS = Topics(Settings())
SERIES = (("ACC-1", "NMI1/E1"), ("ACC-1", "NMI1/B1"), ("ACC-2", "NMI2/E1"))
IDLE_MS = 10_000
FAR = 4_000_000_000_000  # a wall clock far past every idle deadline: everything pending closes


def value_of(series: str, slot: int, version: int) -> Decimal:
    return Decimal(slot * 7 + version * 3 + len(series)) / 8


def make_event(account_series: tuple[str, str], slot: int, version: int) -> UsageEvent:
    account, series = account_series
    start = BASE + timedelta(minutes=15 * slot)
    return UsageEvent(
        event_id=f"{series}:{slot}", account=account, series=series,
        metric="energy_export" if series.endswith("B1") else "energy_import", unit="kWh",
        event_time=start, event_end=start + timedelta(minutes=15), value=value_of(series, slot, version),
        version=BASE + timedelta(days=version), quality="E" if version == 1 else "A", source=f"f{version}.csv#{slot}",
    )


# one step of a stream: an event, an idle pause (processing time passes), or a completion marker
steps = st.one_of(
    st.tuples(st.just("event"), st.sampled_from(SERIES), st.integers(0, 300), st.integers(1, 3)),
    st.tuples(st.just("idle")),
    st.tuples(st.just("marker"), st.sampled_from(SERIES), st.integers(0, 300)),
)
streams = st.lists(steps, min_size=1, max_size=120)
LATENESS = st.sampled_from([30 * 60_000, 6 * 3_600_000, 10 * 365 * 86_400_000])


def policy(lateness_ms: int) -> w.WindowPolicy:
    return w.WindowPolicy(size_ms=30 * 60_000, out_of_orderness_ms=60 * 60_000, allowed_lateness_ms=lateness_ms,
                          idle_timeout_ms=IDLE_MS)


def record(step: tuple) -> bytes | None:
    if step[0] == "event":
        return CODEC.encode(make_event(*step[1:]))
    if step[0] == "marker":
        (account, series), slot = step[1], step[2]
        return CODEC.encode(SeriesMarker(account, series, BASE + timedelta(minutes=15 * slot), "f.csv"))
    return None


def run(stream: list[tuple], punctuate_at: set[int], lateness_ms: int):
    clock = [0]
    proc = WindowingProcessor(TOPICS, CODEC, lambda _m: policy(lateness_ms), clock_ms=lambda: clock[0])
    ctx = FakeContext()
    proc.on_assign(0, ctx)
    for i, step in enumerate(stream):
        raw = record(step)
        if raw is None:  # a pause: more than the idle timeout of processing time passes, nothing arrives
            clock[0] += IDLE_MS
            proc.punctuate(clock[0], ctx)
            continue
        proc.process(Incoming(TOPICS.usage_events, 0, i, b"k", raw, (), 0), ctx)
        if i in punctuate_at:
            proc.punctuate(clock[0], ctx)
    clock[0] = FAR
    proc.punctuate(clock[0], ctx)
    windows = [CODEC.decode(v, UsageWindow) for t, _, v in ctx.forwarded if t == TOPICS.usage_windows]
    assert [t for t, _, _ in ctx.forwarded if t != TOPICS.usage_windows] == []  # no refusal, no dead letter
    return proc, windows, ctx


def batch_aggregate(events: list[UsageEvent]) -> dict[str, Decimal]:
    """window id → the sum of the highest version of each identity (30-minute windows): what the
    last revision of each window must carry, whenever its events arrived."""
    best: dict[str, UsageEvent] = {}
    for e in events:
        if e.event_id not in best or e.version > best[e.event_id].version:
            best[e.event_id] = e
    expected: dict[str, Decimal] = defaultdict(Decimal)
    for e in best.values():
        start, _ = w.window_bounds(int(e.event_time.timestamp() * 1000), 30 * 60_000)
        expected[w.window_id(e.account, e.series, start)] += e.value
    return expected


def events_of(stream: list[tuple]) -> list[UsageEvent]:
    return [make_event(*step[1:]) for step in stream if step[0] == "event"]


def check(events: list[UsageEvent], windows: list[UsageWindow], proc) -> None:
    # every event counted exactly once, none refused
    assert proc.outcomes["accepted"] + proc.outcomes["superseded"] + proc.outcomes["duplicate"] == len(events)
    assert proc.outcomes["refused"] == 0
    expected = batch_aggregate(events)
    by_window: dict[str, list[UsageWindow]] = defaultdict(list)
    for out in windows:
        by_window[out.window_id].append(out)
    assert set(by_window) == set(expected)
    for wid, revs in by_window.items():
        assert [r.revision for r in revs] == list(range(len(revs)))
        assert all(r.timing == "LATE" for r in revs[1:])
        assert revs[-1].value == expected[wid]
        assert sum((r.delta for r in revs), Decimal(0)) == revs[-1].value


@settings(max_examples=200, deadline=None)
@given(streams, st.sets(st.integers(0, 120)), LATENESS)
def test_final_revision_equals_batch_aggregate_whatever_the_timing(stream, punct, lateness_ms: int) -> None:
    proc, windows, _ = run(stream, punct, lateness_ms)
    check(events_of(stream), windows, proc)


def test_late_supersession_re_emits_with_exact_delta() -> None:
    est = ("event", SERIES[0], 0, 1)
    later = ("event", SERIES[0], 20, 1)  # moves the series' clock past window 0
    actual = ("event", SERIES[0], 0, 2)
    stale = ("event", SERIES[0], 0, 1)  # lower version after the actual: a duplicate
    proc, windows, _ = run([est, later, actual, stale], {1, 2, 3}, lateness_ms=86_400_000)
    w0 = [x for x in windows if x.window_start == BASE and x.series == "NMI1/E1"]
    assert [(x.revision, x.timing) for x in w0] == [(0, "ON_TIME"), (1, "LATE")]
    assert w0[1].delta == make_event(SERIES[0], 0, 2).value - make_event(SERIES[0], 0, 1).value
    assert w0[1].qualities == ("A",)
    assert proc.outcomes == {"accepted": 2, "superseded": 1, "duplicate": 1, "refused": 0}


# --- restore from the changelog, crashes: through the real state codec ------------------------------------
class ChangelogContext(FakeContext):
    def __init__(self, changelog: dict[bytes, bytes]) -> None:
        super().__init__()
        self.the_store = ChangelogStore(*state_codec(CODEC), changelog)

    def store(self, partition: int) -> ChangelogStore:  # type: ignore[override]
        return self.the_store


def run_batches(batches: list[list[tuple]], fates: list[str], lateness_ms: int):
    """Each batch (events and markers; an idle step lets processing time pass after the batch) processed
    then punctuated, then: ``commit``; ``restart`` (commit, then a new process restores from the
    changelog); ``abort`` (a crash before the commit: the batch's output and state are lost, a new process
    restores from the changelog and processes the batch again, then commits)."""
    pol = policy(lateness_ms)
    clock = [0]
    changelog: dict[bytes, bytes] = {}
    committed: list[tuple[str, object, bytes]] = []

    def start() -> tuple[WindowingProcessor, ChangelogContext]:
        proc = WindowingProcessor(TOPICS, CODEC, lambda _m: pol, clock_ms=lambda: clock[0])
        ctx = ChangelogContext(changelog)
        proc.on_assign(0, ctx)
        return proc, ctx

    def run_batch(proc: WindowingProcessor, ctx: ChangelogContext, batch: list[tuple], first: int) -> None:
        proc.process_batch([Incoming(TOPICS.usage_events, 0, i, b"k", raw, (), 0)
                            for i, raw in enumerate((record(s) for s in batch), first) if raw is not None], ctx)
        proc.punctuate(clock[0], ctx)

    proc, ctx = start()
    offset = 0
    for batch, fate in zip(batches, fates, strict=True):
        if any(s[0] == "idle" for s in batch):
            clock[0] += IDLE_MS  # processing time passes before this batch (the same for every run)
        run_batch(proc, ctx, batch, offset)
        if fate == "abort":
            proc, ctx = start()  # nothing of the first attempt was committed
            run_batch(proc, ctx, batch, offset)
        ctx.the_store.commit()
        committed += ctx.forwarded
        ctx.forwarded.clear()
        if fate == "restart":
            proc, ctx = start()
        offset += len(batch)
    clock[0] = FAR  # idle: every window closes
    proc.punctuate(clock[0], ctx)
    ctx.the_store.commit()
    committed += ctx.forwarded
    return committed, changelog


FATES = st.sampled_from(["commit", "commit", "restart", "abort"])
event_time_steps = steps.filter(lambda s: s[0] != "idle")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(event_time_steps, max_size=25), FATES), min_size=1, max_size=8), LATENESS)
def test_restores_and_crashes_change_nothing(plan, lateness_ms: int) -> None:
    """Restoring from the changelog (and re-processing after a crash) gives exactly the output and
    the state of an uninterrupted run, record for record and byte for byte, as long as processing time
    plays no part (a restart starts the idle timers again: see the next test)."""
    stream = [batch for batch, _fate in plan]
    fates = [fate for _batch, fate in plan]
    out, changelog = run_batches(stream, fates, lateness_ms)
    ref_out, ref_changelog = run_batches(stream, ["commit"] * len(stream), lateness_ms)
    assert out == ref_out
    assert changelog == ref_changelog
    windows = [CODEC.decode(v, UsageWindow) for t, _, v in out if t == TOPICS.usage_windows]
    # the final revisions are still the batch aggregate (outcome counts: see the tests above)
    final = {x.window_id: x.value for x in windows}
    assert final == batch_aggregate([e for batch in stream for e in events_of(batch)])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(steps, max_size=25), FATES), min_size=1, max_size=8), LATENESS)
def test_restores_and_crashes_with_pauses_still_bill_every_event_once(plan, lateness_ms: int) -> None:
    """With processing-time pauses too, a restart may emit quiet windows at other moments (its idle
    timers start again), so revisions can be split differently; but every (window, revision) is
    committed once, revisions count up from 0, their deltas add up, and the final values are the batch
    aggregate, as in an uninterrupted run."""
    stream = [batch for batch, _fate in plan]
    out, _changelog = run_batches(stream, [fate for _batch, fate in plan], lateness_ms)
    windows = [CODEC.decode(v, UsageWindow) for t, _, v in out if t == TOPICS.usage_windows]
    assert len(windows) == len(out)
    by_window: dict[str, list[UsageWindow]] = defaultdict(list)
    for x in windows:
        by_window[x.window_id].append(x)
    expected = batch_aggregate([e for batch in stream for e in events_of(batch)])
    assert set(by_window) == set(expected)
    for wid, revs in by_window.items():
        assert [r.revision for r in revs] == list(range(len(revs)))
        assert sum((r.delta for r in revs), Decimal(0)) == revs[-1].value == expected[wid]
