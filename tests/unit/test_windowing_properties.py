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
from pipeline.windowing.processor import WindowingProcessor, state_codec

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


def batch_aggregate(events: list[UsageEvent], late: list[LateEvent]) -> dict[str, Decimal]:
    """window id → the sum, over the events that were not too late, of the highest version of each
    identity (30-minute windows): what the last revision of each window must carry."""
    kept = list(events)
    for le in late:
        kept.remove(next(e for e in kept if (e.event_id, e.version) == (le.event.event_id, le.event.version)))
    best: dict[str, UsageEvent] = {}
    for e in kept:
        if e.event_id not in best or e.version > best[e.event_id].version:
            best[e.event_id] = e
    expected: dict[str, Decimal] = defaultdict(Decimal)
    for e in best.values():
        start, _ = w.window_bounds(int(e.event_time.timestamp() * 1000), 30 * 60_000)
        expected[w.window_id(e.account, e.series, start)] += e.value
    return expected


def check(events: list[UsageEvent], windows: list[UsageWindow], late: list[LateEvent], proc) -> None:
    # every event counted exactly once
    assert sum(proc.outcomes.values()) == len(events)
    assert proc.outcomes["too_late"] == len(late)
    expected = batch_aggregate(events, late)
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


# --- restore from the changelog, crashes: through the real state codec ------------------------------------
class ChangelogStore:
    """The state store as the runtime keeps it, over a dict standing for the changelog partition:
    committed values exist only as the bytes the state codec made of them; values read are decoded
    and then changed in place by the processor; writes stay pending until ``commit``."""

    def __init__(self, changelog: dict[bytes, bytes]) -> None:
        self.encode, self.decode = state_codec(CODEC)
        self.changelog = changelog
        self.live: dict[bytes, object] = {}
        self.pending: dict[bytes, object | None] = {}

    def get(self, key: bytes, default: object = None) -> object:
        if key in self.pending:
            value = self.pending[key]
            return default if value is None else value
        if key not in self.live:
            if key not in self.changelog:
                return default
            self.live[key] = self.decode(key, self.changelog[key])
        return self.live[key]

    def put(self, key: bytes, value: object) -> None:
        self.pending[key] = value

    def put_raw(self, key: bytes, raw: bytes) -> None:
        self.pending[key] = raw  # the state codec writes such entries as they are

    def delete(self, key: bytes) -> None:
        self.pending[key] = None

    def scan(self, prefix: bytes):
        keys = {k for k in self.changelog if k.startswith(prefix)} | {k for k in self.pending if k.startswith(prefix)}
        for key in sorted(keys):
            value = self.get(key)
            if value is not None:
                yield key, value

    def commit(self) -> None:
        for key, value in self.pending.items():
            if value is None:
                self.changelog.pop(key, None)
                self.live.pop(key, None)
            else:
                self.changelog[key] = self.encode(key, value)
                self.live[key] = value
        self.pending.clear()


class ChangelogContext(FakeContext):
    def __init__(self, changelog: dict[bytes, bytes]) -> None:
        super().__init__()
        self.the_store = ChangelogStore(changelog)

    def store(self, partition: int) -> ChangelogStore:  # type: ignore[override]
        return self.the_store


def run_batches(batches: list[list[UsageEvent]], fates: list[str], lateness_ms: int):
    """Each batch processed then punctuated, then: ``commit``; ``restart`` (commit, then a new process
    restores from the changelog); ``abort`` (a crash before the commit: the batch's output and state are
    lost, a new process restores from the changelog and processes the batch again, then commits)."""
    policy = w.WindowPolicy(size_ms=30 * 60_000, out_of_orderness_ms=60 * 60_000,
                            allowed_lateness_ms=lateness_ms, idle_timeout_ms=10_000)
    clock = [0]
    changelog: dict[bytes, bytes] = {}
    committed: list[tuple[str, object, bytes]] = []

    def start() -> tuple[WindowingProcessor, ChangelogContext]:
        proc = WindowingProcessor(TOPICS, CODEC, lambda _m: policy, clock_ms=lambda: clock[0])
        ctx = ChangelogContext(changelog)
        proc.on_assign(0, ctx)
        return proc, ctx

    def run_batch(proc: WindowingProcessor, ctx: ChangelogContext, batch: list[UsageEvent], first: int) -> None:
        proc.process_batch([Incoming(TOPICS.usage_events, 0, i, b"ACC-1", CODEC.encode(ev), (), 0)
                            for i, ev in enumerate(batch, first)], ctx)
        proc.punctuate(clock[0], ctx)

    proc, ctx = start()
    offset = 0
    for batch, fate in zip(batches, fates, strict=True):
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
    clock[0] = 4_000_000_000_000  # idle: every window closes
    proc.punctuate(clock[0], ctx)
    ctx.the_store.commit()
    committed += ctx.forwarded
    return committed, changelog


batches = st.lists(st.tuples(st.lists(st.tuples(st.sampled_from(SERIES), st.integers(0, 40), st.integers(1, 3)),
                                      max_size=25),
                             st.sampled_from(["commit", "commit", "restart", "abort"])),
                   min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(batches, st.sampled_from([30 * 60_000, 10 * 365 * 86_400_000]))
def test_restores_and_crashes_change_nothing(plan, lateness_ms: int) -> None:
    """Restoring from the changelog (and re-processing after a crash) gives exactly the output and
    the state of an uninterrupted run, record for record and byte for byte."""
    evs = [[make_event(*a) for a in arr] for arr, _fate in plan]
    fates = [fate for _arr, fate in plan]
    out, changelog = run_batches(evs, fates, lateness_ms)
    ref_out, ref_changelog = run_batches(evs, ["commit"] * len(evs), lateness_ms)
    assert out == ref_out
    assert changelog == ref_changelog
    windows = [CODEC.decode(v, UsageWindow) for t, _, v in out if t == TOPICS.usage_windows]
    late = [CODEC.decode(v, LateEvent) for t, _, v in out if t == TOPICS.usage_late]
    # the final revisions are still the batch aggregate (outcome counts: see the tests above)
    final = {x.window_id: x.value for x in windows}
    assert final == batch_aggregate([e for batch in evs for e in batch], late)
