"""Ingest state: duplicates and supersession (SPEC §2), horizons, restore, and impossible values (issue 6)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.ingest.processor import Clock, IngestProcessor, IngestRules, Seen, state_codec
from pipeline.ingest.telemetry import encode_cloudevent
from pipeline.records import DeadLetter, LateEvent, MeterReading, SeriesComplete, SeriesMarker, UsageEvent
from pipeline.reference import BUNDLED_REFERENCE, ReferenceData, ReferenceFile
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import FakeContext
from pipeline.topology import Topics

CODEC = default_codec()
TOPICS = Topics(Settings(topic_prefix=""))
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
NOW = datetime(2026, 11, 20, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
RULES = IngestRules(future_bound_ms=DAY_MS, telemetry_horizon_ms=2 * DAY_MS, meter_horizon_ms=10 * DAY_MS,
                    out_of_orderness_ms=HOUR_MS)
REF = ReferenceData.from_file(ReferenceFile.read(BUNDLED_REFERENCE))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


READING = MeterReading(
    nmi="NEM1201002", suffix="E1", uom="kWh",
    interval_start=utc(2005, 3, 16, 0, 0), interval_end=utc(2005, 3, 16, 0, 30),
    value=Decimal("0.731"), quality="E", reason_code=None,
    version=utc(2005, 3, 20, 1, 0), version_source="UpdateDateTime",
    source_file="NEM12#000000000000002#CNRGYMDP#NEMMCO.csv", source_record=12,
)


class Harness:
    """An ingest processor over FakeContext with a settable wall clock; offsets count up."""

    def __init__(self, ctx: FakeContext | None = None, rules: IngestRules = RULES) -> None:
        self.now = NOW_MS
        self.ctx = ctx or FakeContext()
        self.proc = IngestProcessor(TOPICS, CODEC, lambda: REF, rules=rules, clock_ms=lambda: self.now)
        self.offset = 0

    def send(self, topic: str, value: bytes | None, headers: list | tuple = (), partition: int = 0) -> None:
        self.proc.process(Incoming(topic, partition, self.offset, b"k", value, tuple(headers), 0), self.ctx)
        self.offset += 1

    def reading(self, r: MeterReading) -> None:
        self.send(TOPICS.meter_readings, CODEC.encode(r))

    def event(self, mode: str = "binary", data: object = None, **over: object) -> None:
        attrs = {"id": "e-1", "source": "/gw", "type": "com.example.storage.usage", "subject": "tenant-b",
                 "time": NOW - timedelta(hours=5), **over}
        value, headers = encode_cloudevent(attrs, data or {"usage": {"gb_hours": 2}}, mode)  # type: ignore[arg-type]
        self.send(TOPICS.telemetry_events, value, headers)

    def tick(self, advance_ms: int = 0) -> None:
        self.now += advance_ms
        self.proc.punctuate(self.now, self.ctx)

    def usage(self) -> list[UsageEvent]:
        return [CODEC.decode(v, UsageEvent) for t, _k, v in self.ctx.forwarded if t == TOPICS.usage_events]

    def dead(self) -> list[DeadLetter]:
        return [CODEC.decode(v, DeadLetter) for t, _k, v in self.ctx.forwarded if t == TOPICS.dlq_ingest]


# --- meter intervals: (NMI, suffix, interval start) with versions ---------------------------------------------
def test_meter_duplicate_supersession_and_stale_version() -> None:
    h = Harness()
    later = replace(READING, version=utc(2005, 4, 1), quality="A", value=Decimal("0.9"))
    h.reading(READING)                                   # accepted
    h.reading(READING)                                   # same version: duplicate
    h.reading(replace(READING, uom="Wh", value=Decimal(731)))  # same identity and version: duplicate
    h.reading(later)                                     # higher version: superseded, forwarded
    h.reading(READING)                                   # lower than the one held now: duplicate
    h.reading(replace(READING, suffix="B1"))             # another channel: accepted
    assert h.proc.counts == {"accepted": 2, "duplicate": 3, "superseded": 1}
    assert [(u.series, u.value, u.quality) for u in h.usage()] == [
        ("NEM1201002/E1", Decimal("0.731"), "E"), ("NEM1201002/E1", Decimal("0.9"), "A"),
        ("NEM1201002/B1", Decimal("0.731"), "E")]


def test_meter_identity_is_forgotten_after_its_horizon_and_older_inputs_pass_through() -> None:
    h = Harness()
    h.reading(READING)
    # a reading 11 days later moves the meter clock to its start − 1 h: the first interval's end + 10 days lateness
    # is behind it
    far = replace(READING, interval_start=utc(2005, 3, 27, 1, 0), interval_end=utc(2005, 3, 27, 1, 30))
    h.reading(far)
    h.tick()
    store = h.ctx.store(0)
    far_ms = int(far.interval_start.timestamp() * 1000)
    assert [k for k, _ in store.scan(b"m|")] == [b"m|NEM1201002\x00E1\x00%d" % far_ms]
    h.reading(READING)  # beyond the horizon: not deduplicated here, windowing finds it a duplicate
    assert h.proc.counts == {"accepted": 3}
    assert store.get(b"c|m") == Clock(far_ms, far_ms - HOUR_MS)


# --- telemetry: (source, id) ------------------------------------------------------------------------------------
def test_telemetry_repeat_is_a_duplicate_in_either_mode() -> None:
    h = Harness()
    h.event("binary")
    h.event("structured")                        # same (source, id) in the other mode
    h.event("binary", data={"usage": {"gb_hours": 7}})  # same identity, other content: still the same event
    h.event("binary", source="/other-gw")        # same id from another source: another event
    h.event("structured", id="e-2")
    assert h.proc.counts == {"accepted": 3, "duplicate": 2}
    assert [(u.value, u.source) for u in h.usage()] == [
        (Decimal(2), "/gw"), (Decimal(2), "/other-gw"), (Decimal(2), "/gw")]
    assert len({u.event_id for u in h.usage()}) == 3


def test_telemetry_dedupe_horizon_moves_with_data_only() -> None:
    h = Harness()
    h.event(id="old", time=NOW - timedelta(days=3))  # held until its time + 2 days
    h.event(id="new", time=NOW - timedelta(hours=2))
    h.tick()  # clock = now − 2 h − 1 h: "old" is past its horizon
    assert sorted(k for k, _ in h.ctx.store(0).scan(b"t|")) == [b"t|3:/gwnew"]
    h.event(id="old", time=NOW - timedelta(days=3))  # too old to tell: passes, windowing decides
    h.event(id="new", time=NOW - timedelta(hours=2))
    assert h.proc.counts == {"accepted": 3, "duplicate": 1}
    h.tick(29_000)
    assert h.ctx.store(0).get(b"c|t") == Clock(NOW_MS - 2 * HOUR_MS, NOW_MS - 3 * HOUR_MS)
    # processing time moves nothing: a week without telemetry forgets nothing and writes nothing
    writes = dict(h.ctx.store(0).data)
    h.tick(7 * DAY_MS)
    assert h.ctx.store(0).data == writes
    h.event(id="new", time=NOW - timedelta(hours=2))
    assert h.proc.counts["duplicate"] == 2
    # only data does: an event 2 days after "new" moves the clock past its horizon
    h.event(id="later", time=NOW + timedelta(days=2, hours=1))
    h.tick()
    assert sorted(k for k, _ in h.ctx.store(0).scan(b"t|")) == [b"t|3:/gwlater"]


def test_a_fresh_partition_keeps_old_data_deduplicated_however_long_it_waited() -> None:
    """A quiet start does not push old data past its horizon: only data moves the clock."""
    h = Harness()
    h.tick(10 * DAY_MS)  # nothing has arrived yet: no clock to advance
    h.reading(READING)  # 2005
    h.reading(READING)
    h.event(id="a", time=NOW)
    h.event(id="a", time=NOW)
    assert h.proc.counts == {"accepted": 2, "duplicate": 2}
    assert h.ctx.store(0).get(b"c|m") is None  # saved with the next punctuation
    h.tick()
    assert h.ctx.store(0).get(b"c|m") == Clock(int(READING.interval_start.timestamp() * 1000),
                                               int(READING.interval_start.timestamp() * 1000) - HOUR_MS)


def test_state_survives_a_restart_through_the_store() -> None:
    """A new process on the same (restored) store still knows what was forwarded and when to forget it."""
    first = Harness()
    first.event(id="a")
    first.reading(READING)
    first.tick()
    second = Harness(ctx=FakeContext(stores={0: first.ctx.store(0)}))
    second.proc.on_assign(0, second.ctx)
    second.event(id="a", mode="structured")
    second.reading(READING)
    assert second.proc.counts == {"duplicate": 2}
    second.tick(3 * DAY_MS)  # three days of processing time forget nothing
    assert len(list(second.ctx.store(0).scan(b"t|"))) == 1 and len(list(second.ctx.store(0).scan(b"m|"))) == 1
    second.event(id="a", mode="structured")
    assert second.proc.counts == {"duplicate": 3}


def test_partitions_keep_separate_state() -> None:
    h = Harness()
    h.event(id="a")
    value, headers = encode_cloudevent({"id": "a", "source": "/gw", "type": "com.example.api.request",
                                        "subject": "tenant-b", "time": NOW - timedelta(hours=5)}, None)
    h.send(TOPICS.telemetry_events, value, headers, partition=1)
    assert h.proc.counts == {"accepted": 2}


def test_state_codec_round_trips_every_kind_of_value() -> None:
    enc, dec = state_codec(CODEC)
    for key, value in [(b"c|m", Clock(-(2**62), 5)), (b"c|t", Clock(1, 0)), (b"t|3:/gwx", Seen(7, 7)),
                       (b"m|N\x00E1\x000", Seen(1_800_000, 1_111_111_111_000))]:
        assert dec(key, enc(key, value)) == value


# --- impossible values -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("reason", "reading"), [
    ("MISALIGNED_INTERVAL", replace(READING, interval_start=utc(2005, 3, 16, 0, 10),
                                    interval_end=utc(2005, 3, 16, 0, 40))),
    ("MISALIGNED_INTERVAL", replace(READING, interval_end=utc(2005, 3, 16, 0, 7))),  # 7 min does not divide a day
    ("FUTURE_EVENT", replace(READING, interval_start=NOW + timedelta(days=1, minutes=30),
                             interval_end=NOW + timedelta(days=1, minutes=60))),
    ("VALUE_OUT_OF_RANGE", replace(READING, value=Decimal(10) ** 15)),
    ("NEGATIVE_VALUE", replace(READING, suffix="B1", value=Decimal("-0.5"))),
])
def test_impossible_readings_are_dead_lettered(reason: str, reading: MeterReading) -> None:
    h = Harness()
    original = CODEC.encode(reading)
    h.send(TOPICS.meter_readings, original, [("h", b"\x00")])
    (dead,) = h.dead()
    assert (dead.reason, dead.stage, dead.value, dead.headers, dead.key) == (
        reason, "ingest", original, (("h", b"\x00"),), b"k")
    assert h.proc.counts == {"dead_lettered": 1} and h.proc.reasons == {reason: 1}


def test_aligned_intervals_of_every_nem12_length_pass() -> None:
    h = Harness()
    for minutes in (5, 15, 30):
        # 14:00 UTC is midnight in NEM time (UTC+10)
        start = utc(2005, 3, 16, 14, 0) + timedelta(minutes=minutes * 3)
        h.reading(replace(READING, interval_start=start, interval_end=start + timedelta(minutes=minutes)))
    assert h.proc.counts == {"accepted": 3}


def test_a_reading_that_breaks_the_record_rules_is_a_schema_violation() -> None:
    h = Harness()
    datum = CODEC.decode_dict(CODEC.encode(READING), "MeterReading")
    bad = CODEC.encode({**datum, "quality": "Z"}, "MeterReading")
    h.send(TOPICS.meter_readings, bad)
    backwards = CODEC.encode({**datum, "interval_end": datum["interval_start"]}, "MeterReading")
    h.send(TOPICS.meter_readings, backwards)
    assert [d.reason for d in h.dead()] == ["SCHEMA_VIOLATION", "SCHEMA_VIOLATION"]
    assert [d.value for d in h.dead()] == [bad, backwards]


def test_telemetry_dead_letter_keeps_bytes_headers_stage_and_reason() -> None:
    h = Harness()
    h.event("structured", subject="tenant-nobody")
    value, headers = encode_cloudevent({"id": "e-1", "source": "/gw", "type": "com.example.storage.usage",
                                        "subject": "tenant-nobody", "time": NOW - timedelta(hours=5)},
                                       {"usage": {"gb_hours": 2}}, "structured")
    (dead,) = h.dead()
    assert (dead.stage, dead.reason, dead.topic, dead.partition, dead.offset, dead.key, dead.value, dead.headers) == (
        "ingest", "UNKNOWN_SUBJECT", "telemetry.events", 0, 0, b"k", value, tuple(headers))
    assert "tenant-nobody" in dead.message


def test_unknown_subject_is_retried_once_after_a_reference_refresh() -> None:
    empty = ReferenceData.build(list(REF.accounts.values()), [], [], [], list(REF.metrics.values()), [])
    refs = [empty]

    def refresh() -> bool:
        refs[0] = REF
        return True

    proc = IngestProcessor(TOPICS, CODEC, lambda: refs[0], refresh, RULES, clock_ms=lambda: NOW_MS)
    value, headers = encode_cloudevent({"id": "e-1", "source": "/gw", "type": "com.example.api.request",
                                        "subject": "tenant-b", "time": NOW - timedelta(hours=5)}, None)
    ctx = FakeContext()
    proc.process(Incoming(TOPICS.telemetry_events, 0, 0, None, value, tuple(headers), 0), ctx)
    assert proc.counts == {"accepted": 1}
    assert CODEC.decode(ctx.forwarded[0][2], UsageEvent).account == "TEL-3002"



# --- billing rules and completion markers (SPEC §3) ---------------------------------------------------------------
def test_a_reading_outside_the_meters_service_dates_is_refused_to_usage_late_with_its_original() -> None:
    h = Harness()
    before = replace(READING, interval_start=utc(2005, 3, 13, 0, 0), interval_end=utc(2005, 3, 13, 0, 30))
    original = CODEC.encode(before)  # NEM1201002 is ACC-1002's from 2005-03-15 (NEM date 2005-03-13 is before)
    h.send(TOPICS.meter_readings, original, [("gw", b"1")])
    h.reading(READING)  # inside: accepted
    late = [CODEC.decode(v, LateEvent) for t, _k, v in h.ctx.forwarded if t == TOPICS.usage_late]
    assert [(x.reason, x.stage, x.event.account, x.event.event_id, x.input_topic, x.original_key, x.original,
             x.headers, x.lateness_ms) for x in late] == [
        ("OUTSIDE_SERVICE_DATES", "ingest", "ACC-1002", before.identity, TOPICS.meter_readings, b"k", original,
         (("gw", b"1"),), 0)]
    assert "no service point on 2005-03-13" in late[0].message
    assert h.proc.counts == {"refused": 1, "accepted": 1} and h.proc.reasons == {"OUTSIDE_SERVICE_DATES": 1}
    assert [u.event_id for u in h.usage()] == [READING.identity]
    start, end, version = (int(t.timestamp() * 1000) for t in (READING.interval_start, READING.interval_end,
                                                                READING.version))
    assert list(h.ctx.store(0).scan(b"m|")) == [(b"m|NEM1201002\x00E1\x00%d" % start, Seen(end, version))]
    # the refused reading was not remembered: once the service point covers it, it is billed
    extended = ReferenceData.build(list(REF.accounts.values()),
                                   [sp.model_copy(update={"effective_from": sp.effective_from - timedelta(days=30)})
                                    if sp.nmi == "NEM1201002" else sp
                                    for sps in REF.service_points.values() for sp in sps],
                                   [p for ps in REF.plans.values() for p in ps], REF.price_books)
    h.proc.reference = lambda: extended
    h.send(TOPICS.meter_readings, original)
    assert h.proc.counts == {"refused": 1, "accepted": 2}
    assert h.usage()[-1].event_id == before.identity


def test_a_never_registered_meter_is_still_bad_input() -> None:
    h = Harness()
    h.reading(replace(READING, nmi="NOSUCHNMI1"))
    (dead,) = h.dead()
    assert dead.reason == "UNKNOWN_NMI" and h.proc.counts == {"dead_lettered": 1}


def test_telemetry_outside_its_subjects_dates_is_refused() -> None:
    h = Harness()
    h.event(time=datetime(2023, 12, 31, 12, tzinfo=UTC))  # tenant-b is TEL-3002's from 2024-01-01
    (late,) = [CODEC.decode(v, LateEvent) for t, _k, v in h.ctx.forwarded if t == TOPICS.usage_late]
    assert (late.reason, late.event.account, late.input_topic) == ("OUTSIDE_SERVICE_DATES", "TEL-3002",
                                                                   TOPICS.telemetry_events)
    assert h.proc.counts == {"refused": 1}


def test_a_completion_marker_is_forwarded_to_the_channels_account() -> None:
    h = Harness()
    done = SeriesComplete("NEM1201002", "E1", utc(2005, 3, 16, 14, 0), "NEM12#x.csv")
    h.send(TOPICS.meter_readings, CODEC.encode(done))
    h.send(TOPICS.meter_readings, CODEC.encode(replace(done, nmi="NOSUCHNMI1")))  # no account: nothing to close
    markers = [CODEC.decode(v, SeriesMarker) for t, _k, v in h.ctx.forwarded if t == TOPICS.usage_events]
    assert markers == [SeriesMarker("ACC-1002", "NEM1201002/E1", utc(2005, 3, 16, 14, 0), "NEM12#x.csv")]
    assert h.proc.counts == {"marker": 2} and h.dead() == []
