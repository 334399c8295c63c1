"""The windowing processor case by case (SPEC §3), exact outputs: supersession with identical content,
dead letters, per-series clocks, idle and marker closing, late data never refused, archive and revival,
the back-billing rule, aggregations, and a restore through the real RocksDB store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.records import DeadLetter, LateEvent, SeriesMarker, UsageEvent, UsageWindow
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import FakeContext
from pipeline.runtime.state import PartitionStore, open_fresh_store
from pipeline.topology import Topics
from pipeline.windowing import windows as w
from pipeline.windowing.processor import WIN_PREFIX, WindowingProcessor, state_codec

CODEC = default_codec()
TOPICS = Topics(Settings())
T0 = datetime(2024, 3, 1, tzinfo=UTC)
HOUR = 3_600_000
POLICY = w.WindowPolicy(size_ms=HOUR // 2, out_of_orderness_ms=HOUR, allowed_lateness_ms=24 * HOUR,
                        idle_timeout_ms=60_000)


def event(slot: int, value: str, version: int = 1, quality: str = "A", source: str = "f1#1",
          metric: str = "energy_import", account: str = "ACC-1", series: str = "NMI1/E1") -> UsageEvent:
    start = T0 + timedelta(minutes=5 * slot)
    return UsageEvent(f"nem12:{series}:{slot}", account, series, metric, "kWh", start, start + timedelta(minutes=5),
                      Decimal(value), T0 + timedelta(days=version), quality, source)


class Harness:
    def __init__(self, policy: w.WindowPolicy = POLICY, ctx: FakeContext | None = None) -> None:
        self.clock = [0]
        self.proc = WindowingProcessor(TOPICS, CODEC, lambda _m: policy, clock_ms=lambda: self.clock[0])
        self.ctx = ctx or FakeContext()
        self.proc.on_assign(0, self.ctx)
        self.offset = 0

    def send(self, *items: UsageEvent | SeriesMarker | bytes) -> None:
        """One batch, as the runtime hands it over, then the punctuation after it."""
        batch = []
        for item in items:
            raw = item if isinstance(item, bytes) else CODEC.encode(item)
            batch.append(Incoming(TOPICS.usage_events, 0, self.offset, b"ACC-1", raw, (("h", b"1"),), 0))
            self.offset += 1
        self.proc.process_batch(batch, self.ctx)
        self.proc.punctuate(self.clock[0], self.ctx)

    def close_all(self) -> None:
        self.clock[0] = 4_000_000_000_000
        self.proc.punctuate(self.clock[0], self.ctx)

    def out(self, topic: str, cls: type) -> list:
        return [CODEC.decode(v, cls) for t, _k, v in self.ctx.forwarded if t == topic]

    def windows(self) -> list[UsageWindow]:
        return self.out(TOPICS.usage_windows, UsageWindow)


def test_a_newer_version_with_identical_content_is_kept_but_not_re_emitted() -> None:
    h = Harness()
    h.send(event(0, "1.5"), event(1, "2"), event(20, "0"))  # the last moves the watermark past window 0
    assert [(x.revision, x.value, x.sources) for x in h.windows()] == [(0, Decimal("3.5"), ("f1#1",))]
    h.send(event(1, "2", version=2, source="f2#1"))  # same value and quality from a newer file
    assert len(h.windows()) == 1
    h.send(event(1, "2", version=3, quality="S", source="f3#1"))  # same value, another quality: re-emitted
    h.send(event(0, "1.5", version=1, source="f9#9"))  # an equal version: a duplicate, ignored
    wins = [x for x in h.windows() if x.window_start == T0]
    assert [(x.revision, x.timing, x.value, x.delta, x.qualities, x.sources) for x in wins] == [
        (0, "ON_TIME", Decimal("3.5"), Decimal("3.5"), ("A",), ("f1#1",)),
        (1, "LATE", Decimal("3.5"), Decimal("0"), ("A", "S"), ("f1#1", "f3#1")),
    ]
    assert h.proc.outcomes == {"accepted": 3, "superseded": 2, "duplicate": 1, "refused": 0}


def test_undecodable_records_go_to_the_dead_letter_topic_with_their_bytes() -> None:
    h = Harness()
    good = CODEC.encode(event(0, "1"))
    bad = [b"", b"not avro", good[:-1], good + b"\x00", good[:10] + b"\xff" * 40]
    h.send(*bad)
    dead = h.out(TOPICS.dlq_ingest, DeadLetter)
    assert [(d.stage, d.reason, d.value, d.offset, d.headers) for d in dead] == [
        ("windowing", "UNDECODABLE", b, i, (("h", b"1"),)) for i, b in enumerate(bad)
    ]
    assert h.proc.outcomes["dead_lettered"] == len(bad)
    assert h.ctx.stores[0].data == {}  # no window, no watermark


def revisions(h: Harness, series: str = "NMI1/E1", start: datetime = T0) -> list[tuple]:
    return [(x.revision, x.timing, x.value, x.delta) for x in h.windows()
            if x.series == series and x.window_start == start]


def test_nothing_is_too_late_a_change_long_after_the_window_closed_is_a_late_revision() -> None:
    h = Harness()
    h.send(event(0, "1"))
    h.send(event(12 * 24 * 400, "1"))  # 400 days later: window 0 closed long ago (and was archived)
    h.send(event(1, "7"))  # a reading of the first window arrives now
    assert revisions(h) == [(0, "ON_TIME", Decimal(1), Decimal(1)), (1, "LATE", Decimal(8), Decimal(7))]
    assert h.out(TOPICS.usage_late, LateEvent) == []
    assert h.proc.outcomes["accepted"] == 3


def test_one_series_clock_never_closes_another_series_window() -> None:
    """Account B's newer data (same partition) neither closes nor refuses anything of account A (SPEC §3)."""
    h = Harness()
    h.send(event(0, "1", account="A", series="A1/E1"))
    h.send(event(12 * 24 * 365 * 15, "1", account="B", series="B1/E1"))  # 15 years newer, another account
    h.send(event(1, "2", account="A", series="A1/E1"))
    assert revisions(h, "A1/E1") == []  # A's own clock has not passed the end of its window
    h.send(event(20, "0", account="A", series="A1/E1"))  # A's clock moves past it
    assert revisions(h, "A1/E1") == [(0, "ON_TIME", Decimal(3), Decimal(3))]


def test_a_quiet_series_is_emitted_after_the_idle_timeout_and_later_data_revises_it() -> None:
    h = Harness()
    h.send(event(0, "1"), event(1, "2"))
    h.clock[0] = POLICY.idle_timeout_ms - 1
    h.send()  # not quiet long enough yet
    assert revisions(h) == []
    h.clock[0] = POLICY.idle_timeout_ms
    h.send()
    assert revisions(h) == [(0, "ON_TIME", Decimal(3), Decimal(3))]
    h.send(event(2, "4"))  # the meter's next reading of the same window: a LATE revision, nothing refused
    h.clock[0] += POLICY.idle_timeout_ms
    h.send()
    assert revisions(h) == [(0, "ON_TIME", Decimal(3), Decimal(3)), (1, "LATE", Decimal(7), Decimal(4))]
    # the series' own clock (its latest event − out-of-orderness, at a window boundary) had not reached the end
    assert [x.watermark for x in h.windows()] == [T0 - timedelta(hours=1)] * 2


def test_an_active_series_is_not_idle() -> None:
    h = Harness()
    h.send(event(0, "1"))
    for step in range(1, 4):  # an event every half idle timeout keeps the series active
        h.clock[0] = step * POLICY.idle_timeout_ms // 2
        h.send(event(step, "1"))
    assert revisions(h) == []
    h.clock[0] += POLICY.idle_timeout_ms
    h.send()
    assert revisions(h) == [(0, "ON_TIME", Decimal(4), Decimal(4))]


def test_a_completion_marker_closes_its_series_windows_at_once() -> None:
    h = Harness()
    h.send(event(0, "1"), event(6, "2"), event(7, "3"), event(7, "4", series="NMI1/B1", metric="energy_export"))
    h.send(SeriesMarker("ACC-1", "NMI1/E1", T0 + timedelta(minutes=30), "NEM12#f.csv"))
    assert [(x.series, x.window_start, x.value) for x in h.windows()] == [("NMI1/E1", T0, Decimal(1))]
    h.send(SeriesMarker("ACC-1", "NMI1/E1", T0 + timedelta(minutes=60), "NEM12#f.csv"))
    assert [(x.series, x.window_start, x.value, x.timing) for x in h.windows()][1:] == [
        ("NMI1/E1", T0 + timedelta(minutes=30), Decimal(5), "ON_TIME")]
    assert h.windows()[1].watermark == T0 + timedelta(minutes=60)  # the account's clock downstream
    h.send(event(1, "10"))  # data after the marker is still billed
    h.close_all()
    assert revisions(h) == [(0, "ON_TIME", Decimal(1), Decimal(1)), (1, "LATE", Decimal(11), Decimal(10))]
    assert h.proc.outcomes["marker"] == 2 and h.out(TOPICS.dlq_ingest, DeadLetter) == []


def test_the_back_billing_limit_refuses_only_undercharges_older_than_it() -> None:
    day = 86_400_000
    h = Harness()
    h.proc = WindowingProcessor(TOPICS, CODEC, lambda _m: POLICY, clock_ms=lambda: h.clock[0],
                                back_billing_limit_ms=270 * day)
    h.proc.on_assign(0, h.ctx)
    h.send(event(0, "5"), event(1, "1", series="NMI1/B1", metric="energy_export"))
    h.send(*(SeriesMarker("ACC-1", s, T0 + timedelta(hours=1), "f") for s in ("NMI1/E1", "NMI1/B1")))
    h.send(event(12 * 24 * 300, "1", series="NMI1/B2", metric="energy_export"))  # the account's clock: 300 days on
    undercharge = event(2, "3")  # more import in a window 300 days behind: refused
    h.send(undercharge)
    h.send(event(0, "4", version=2))  # less import: an overcharge, always credited
    h.send(event(1, "2", version=2, series="NMI1/B1", metric="energy_export"))  # more export: a credit
    h.send(event(1, "0.5", version=3, series="NMI1/B1", metric="energy_export"))  # less export: undercharge
    h.close_all()
    (late, less_export) = h.out(TOPICS.usage_late, LateEvent)
    assert (late.reason, late.stage, late.event, late.original, late.window_end) == (
        "BACK_BILLING_LIMIT", "windowing", undercharge, CODEC.encode(undercharge), T0 + timedelta(minutes=30))
    assert late.watermark == T0 + timedelta(minutes=5 * 12 * 24 * 300)
    assert late.lateness_ms == 300 * day - 30 * 60_000 - 270 * day
    assert less_export.event.value == Decimal("0.5")
    assert revisions(h) == [(0, "ON_TIME", Decimal(5), Decimal(5)), (1, "LATE", Decimal(4), Decimal(-1))]
    assert revisions(h, "NMI1/B1") == [(0, "ON_TIME", Decimal(1), Decimal(1)), (1, "LATE", Decimal(2), Decimal(1))]
    assert h.proc.outcomes["refused"] == 2
    # within the limit nothing is refused: an undercharge 200 days behind the account's clock is billed
    h.send(event(12 * 24 * 100, "1"))
    h.send(event(12 * 24 * 100, "2", version=2))
    assert h.proc.outcomes["refused"] == 2


def test_old_windows_are_archived_and_brought_back_whole_by_late_data() -> None:
    h = Harness()
    h.send(event(0, "1"))
    h.send(event(1, "2"), event(2, "3"))
    key = WIN_PREFIX + f"ACC-1|NMI1/E1|{w._ms(T0)}".encode()
    added = [b"i|" + key[2:] + b"|%020d" % offset for offset in (0, 1)]  # one entry per batch, first offset
    assert set(added) <= set(h.ctx.stores[0].data)
    assert key not in h.ctx.stores[0].data  # a new window has no head until it is emitted: its entries say it exists
    events = CODEC.decode_dict(h.ctx.stores[0].data[added[1]], "WindowEvents")["events"]
    assert events == [CODEC.encode(event(1, "2")), CODEC.encode(event(2, "3"))]  # as consumed, in order
    h.send(event(12 * 40, "1"))  # 40 h later: the series' clock (39 h) passes end (0:30) + 24 h, then a sweep
    archive = b"x|" + key[2:]
    assert not {key, *added} & set(h.ctx.stores[0].data)  # the hot state is gone ...
    assert archive in h.ctx.stores[0].data  # ... replaced by one compact record
    assert [(x.window_start, x.value) for x in h.windows()] == [(T0, Decimal(6))]
    h.send(event(1, "2", version=1, source="again#1"))  # a repeat of an archived interval: a duplicate
    h.send(event(2, "5", version=2))  # a correction of an archived interval: brought back, revised
    h.send(event(3, "1"))  # a new interval of it
    revs = [x for x in h.windows() if x.window_start == T0]
    assert [(x.revision, x.timing, x.value, x.delta, x.count, x.sources) for x in revs] == [
        (0, "ON_TIME", Decimal(6), Decimal(6), 3, ("f1#1",)),
        (1, "LATE", Decimal(8), Decimal(2), 3, ("f1#1",)),
        (2, "LATE", Decimal(9), Decimal(1), 4, ("f1#1",)),
    ]
    assert h.proc.outcomes == {"accepted": 5, "superseded": 1, "duplicate": 1, "refused": 0}
    assert key not in h.ctx.stores[0].data  # archived again right after each revision (its clock is far ahead)


@pytest.mark.parametrize(
    ("aggregation", "first", "final"),
    [("sum", "10", "9"), ("count", "3", "3"), ("min", "2", "1"), ("max", "5", "5"), ("latest", "3", "3"),
     ("unique_count", "3", "3")],
)
def test_aggregations_through_the_processor(aggregation: str, first: str, final: str) -> None:
    policy = w.WindowPolicy(HOUR // 2, HOUR, 24 * HOUR, 60_000, aggregation)
    h = Harness(policy)
    h.send(event(0, "2", metric="m"), event(1, "5", metric="m"), event(2, "3", metric="m"))
    h.send(event(20, "0", metric="m"))
    h.send(event(0, "1", version=2, metric="m"))  # 2 → 1: supersession after the first emission
    revs = [x for x in h.windows() if x.window_start == T0]
    assert [(x.revision, x.value, x.delta) for x in revs] == [
        (0, Decimal(first), Decimal(first)), (1, Decimal(final), Decimal(final) - Decimal(first))
    ]


# --- the real store: RocksDB behind the write cache, restored from the changelog ----------------------------
class StoreContext(FakeContext):
    def __init__(self, store) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.real = store

    def store(self, partition: int):  # type: ignore[no-untyped-def, override]
        return self.real


def test_restore_through_rocksdb_and_the_changelog_continues_exactly(tmp_path: Path) -> None:
    enc, dec = state_codec(CODEC)
    first = [event(s, str(s)) for s in range(0, 30)] + [event(3, "100", version=2)]
    second = [event(s, "1", version=3) for s in range(25, 40)] + [event(5, "7", version=4)]

    reference = Harness()
    reference.send(*first)
    reference.send(*second)
    reference.close_all()

    changelog: dict[bytes, bytes | None] = {}

    def commit(store) -> None:  # type: ignore[no-untyped-def]
        changes = dict(store.pending_changes())
        changelog.update(changes)
        store.flush(changes)

    store = open_fresh_store(tmp_path / "a", enc, dec)
    h = Harness(ctx=StoreContext(store))
    h.send(*first)
    commit(store)
    committed = list(h.ctx.forwarded)
    h.send(*second[:5])  # states changed in place, then lost: a crash before the commit
    store.discard()
    store.close()

    restored = open_fresh_store(tmp_path / "b", enc, dec)
    assert restored.apply_changelog(iter(changelog.items())) == len(changelog)
    h2 = Harness(ctx=StoreContext(restored))  # on_assign scans the restored windows
    h2.send(*second)
    h2.close_all()
    commit(restored)
    assert committed + h2.ctx.forwarded == reference.ctx.forwarded  # byte for byte
    # windows 0 and 1 in the first batch; 0 again (rev 1), 2 and 3 in the second; 4, 5 and 6 when idle
    assert [(x.window_start, x.revision) for x in reference.windows()] == [
        (T0 + timedelta(minutes=30 * i), r) for i, r in ((0, 0), (1, 0), (0, 1), (2, 0), (3, 0), (4, 0), (5, 0), (6, 0))
    ]
    restored.close()


def test_windows_read_back_during_a_batch_stay_live_whatever_the_store_cache_size(tmp_path: Path) -> None:
    enc, dec = state_codec(CODEC)
    first = [event(s, "1") for s in (0, 6, 12, 18)]  # four windows of 30 minutes
    second = [event(1, "2"), event(7, "2"), event(13, "2"), event(19, "2"), event(2, "4")]
    reference = Harness()
    reference.send(*first)
    reference.send(*second)
    reference.close_all()

    store = open_fresh_store(tmp_path / "s", enc, dec)
    h = Harness(ctx=StoreContext(store))
    h.send(*first)
    store.flush()  # committed
    store.close()
    reopened = PartitionStore(tmp_path / "s", enc, dec, cache_max=2)  # nothing cached, a tiny cache
    h2 = Harness(ctx=StoreContext(reopened))
    h2.send(*second)  # window 0 is read back, changed in place (its head unchanged), then read again
    h2.close_all()
    assert h.ctx.forwarded + h2.ctx.forwarded == reference.ctx.forwarded
    assert [(x.window_start, x.revision, x.value) for x in h2.windows()][:2] == [
        (T0, 1, Decimal("7")), (T0 + timedelta(minutes=30), 0, Decimal("3"))
    ]
    reopened.close()
