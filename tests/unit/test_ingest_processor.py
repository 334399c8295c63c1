"""``pipeline.ingest.processor``: readings → usage events keyed by account; everything else → dlq.ingest."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.ingest.processor import IngestProcessor
from pipeline.records import DeadLetter, LateEvent, MeterReading, UsageEvent
from pipeline.reference import BUNDLED_REFERENCE, ReferenceData, ReferenceFile
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import FakeContext
from pipeline.topology import Topics

CODEC = default_codec()
TOPICS = Topics(Settings(topic_prefix=""))
HEADERS = (("source", b"gateway-1"), ("trace-id", b"\x00\x01\x02"))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# 2005-03-16 10:00-10:30 AEST (NEM time) = 2005-03-16 00:00-00:30 UTC
READING = MeterReading(
    nmi="NEM1201002", suffix="E1", uom="kWh",
    interval_start=utc(2005, 3, 16, 0, 0), interval_end=utc(2005, 3, 16, 0, 30),
    value=Decimal("0.731"), quality="A", reason_code=None,
    version=utc(2005, 3, 20, 1, 0), version_source="UpdateDateTime",
    source_file="NEM12#000000000000002#CNRGYMDP#NEMMCO.csv", source_record=12,
)


@pytest.fixture(scope="module")
def reference() -> ReferenceData:
    return ReferenceData.from_file(ReferenceFile.read(BUNDLED_REFERENCE))


@pytest.fixture
def processor(reference: ReferenceData) -> IngestProcessor:
    return IngestProcessor(TOPICS, CODEC, lambda: reference)


def incoming(value: bytes | None, offset: int = 41, key: bytes | None = b"NEM1201002") -> Incoming:
    return Incoming(TOPICS.meter_readings, 2, offset, key, value, HEADERS, 1_700_000_000_000)


def run(processor: IngestProcessor, *records: Incoming) -> FakeContext:
    ctx = FakeContext()
    for r in records:
        processor.process(r, ctx)
    return ctx


def only_event(ctx: FakeContext) -> tuple[object, UsageEvent]:
    assert len(ctx.forwarded) == 1
    topic, key, value = ctx.forwarded[0]
    assert topic == "usage.events"
    return key, CODEC.decode(value, UsageEvent)


# --- accepted ----------------------------------------------------------------------------------------------
def test_import_reading_becomes_usage_event(processor: IngestProcessor) -> None:
    key, event = only_event(run(processor, incoming(CODEC.encode(READING))))
    assert key == "ACC-1002"
    assert event == UsageEvent(
        event_id="nem12:NEM1201002:E1:2005-03-16T00:00Z",
        account="ACC-1002",
        series="NEM1201002/E1",
        metric="energy_import",
        unit="kWh",
        event_time=utc(2005, 3, 16, 0, 0),
        event_end=utc(2005, 3, 16, 0, 30),
        value=Decimal("0.731"),
        version=utc(2005, 3, 20, 1, 0),
        quality="A",
        source="NEM12#000000000000002#CNRGYMDP#NEMMCO.csv#12",
    )
    assert processor.counts == {"accepted": 1}


def test_export_channel_is_energy_export(processor: IngestProcessor) -> None:
    key, event = only_event(run(processor, incoming(CODEC.encode(replace(READING, suffix="B1", quality="E")))))
    assert key == "ACC-1002"
    assert (event.metric, event.series, event.unit, event.quality) == (
        "energy_export", "NEM1201002/B1", "kWh", "E"
    )
    assert event.event_id == "nem12:NEM1201002:B1:2005-03-16T00:00Z"


@pytest.mark.parametrize(
    ("uom", "value", "unit", "expected"),
    [
        ("Wh", "1500", "kWh", "1.5"),
        ("WH", "0.4", "kWh", "0.0004"),
        ("wh", "0.0005", "kWh", "0.000001"),  # 0.0000005 kWh rounds half-up to 6 places
        ("MWh", "0.002", "kWh", "2"),
        ("kWh", "0", "kWh", "0"),
        ("kVArh", "3.25", "kVArh", "3.25"),
    ],
)
def test_units_are_converted(processor: IngestProcessor, uom: str, value: str, unit: str, expected: str) -> None:
    reading = replace(READING, uom=uom, value=Decimal(value), suffix="Q1" if "VAr" in uom else "E1")
    _, event = only_event(run(processor, incoming(CODEC.encode(reading))))
    assert event.unit == unit
    assert event.value == Decimal(expected)


def test_first_nem_day_of_service_point_is_accepted(processor: IngestProcessor) -> None:
    """NEM1201002 is served from 2005-03-15 (NEM date, AEST): 2005-03-14 14:00 UTC is 00:00 on the 15th."""
    reading = replace(READING, interval_start=utc(2005, 3, 14, 14, 0), interval_end=utc(2005, 3, 14, 14, 30))
    key, event = only_event(run(processor, incoming(CODEC.encode(reading))))
    assert key == "ACC-1002" and event.event_time == utc(2005, 3, 14, 14, 0)


# --- dead-lettered -------------------------------------------------------------------------------------------
REJECTS = [
    ("UNKNOWN_NMI", replace(READING, nmi="NEM1209999")),
    ("UNSUPPORTED_CHANNEL", replace(READING, suffix="X1")),
    ("UNSUPPORTED_UNIT", replace(READING, uom="kW")),
    ("UNSUPPORTED_UNIT", replace(READING, uom="litres")),
    ("NEGATIVE_VALUE", replace(READING, value=Decimal("-0.001"))),
]


def _only_dead_letter(ctx: FakeContext) -> tuple[object, DeadLetter]:
    assert len(ctx.forwarded) == 1
    topic, key, value = ctx.forwarded[0]
    assert topic == "dlq.ingest"
    return key, CODEC.decode(value, DeadLetter)


@pytest.mark.parametrize(("reason", "reading"), REJECTS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(REJECTS)])
def test_rejected_reading_goes_to_dlq_with_original_bytes(
    processor: IngestProcessor, reason: str, reading: MeterReading
) -> None:
    original = CODEC.encode(reading)
    key, dead = _only_dead_letter(run(processor, incoming(original, offset=77, key=b"K-" + reading.nmi.encode())))
    assert key == b"K-" + reading.nmi.encode()
    assert dead.reason == reason
    assert dead.stage == "ingest"
    assert (dead.topic, dead.partition, dead.offset) == ("meter.readings", 2, 77)
    assert dead.key == b"K-" + reading.nmi.encode()
    assert dead.value == original
    assert dead.headers == HEADERS
    assert dead.message
    assert dead.failed_at.tzinfo is not None
    assert processor.counts == {"dead_lettered": 1}
    # the original bytes in the dead letter still decode to the reading that was rejected
    assert CODEC.decode(dead.value, MeterReading) == reading


@pytest.mark.parametrize(
    "value",
    [b"not avro at all", b"", None, CODEC.encode(READING)[:-4], CODEC.encode(READING) + b"\x00",
     CODEC.encode(replace(READING, nmi="x"))[:2] + bytes(8) + CODEC.encode(READING)[10:]],
    ids=["garbage", "empty", "tombstone", "truncated", "trailing", "unknown-fingerprint"],
)
def test_undecodable_bytes_go_to_dlq(processor: IngestProcessor, value: bytes | None) -> None:
    key, dead = _only_dead_letter(run(processor, incoming(value)))
    assert key == b"NEM1201002"
    assert dead.reason == "UNDECODABLE"
    assert (dead.key, dead.value, dead.headers) == (b"NEM1201002", value, HEADERS)
    assert dead.offset == 41


def test_record_of_another_type_is_undecodable(processor: IngestProcessor) -> None:
    """A UsageEvent published to meter.readings by mistake is dead-lettered, not misread."""
    event = only_event(run(processor, incoming(CODEC.encode(READING))))[1]
    wrong = CODEC.encode(event)
    _, dead = _only_dead_letter(run(processor, incoming(wrong)))
    assert dead.reason == "UNDECODABLE" and dead.value == wrong


def test_unknown_nmi_retried_after_reference_refresh(reference: ReferenceData) -> None:
    """An UNKNOWN_NMI is re-checked once against refreshed reference data before dead-lettering."""
    refs = [ReferenceData.build(list(reference.accounts.values()), [], [], [])]
    refreshed: list[bool] = []

    def refresh() -> bool:
        refreshed.append(True)
        refs[0] = reference
        return True

    proc = IngestProcessor(TOPICS, CODEC, lambda: refs[0], refresh)
    key, event = only_event(run(proc, incoming(CODEC.encode(READING))))
    assert refreshed == [True] and key == "ACC-1002" and event.account == "ACC-1002"


# --- refused by a billing rule (SPEC §3) ------------------------------------------------------------------------
def test_the_day_before_the_service_point_starts_is_refused_not_dead_lettered(processor: IngestProcessor) -> None:
    """2005-03-14 13:30 UTC is 23:30 AEST on the 14th, the day before NEM1201002's service point starts: the
    meter is known, so this is not bad input but a billing rule, kept on usage.late for `late replay`."""
    reading = replace(READING, interval_start=utc(2005, 3, 14, 13, 30), interval_end=utc(2005, 3, 14, 14, 0))
    original = CODEC.encode(reading)
    ctx = run(processor, incoming(original, offset=5))
    ((topic, key, value),) = ctx.forwarded
    late = CODEC.decode(value, LateEvent)
    assert (topic, key) == ("usage.late", "ACC-1002")
    assert (late.reason, late.stage, late.input_topic, late.original, late.original_key, late.headers) == (
        "OUTSIDE_SERVICE_DATES", "ingest", "meter.readings", original, b"NEM1201002", HEADERS)
    assert (late.event.account, late.event.event_time, late.window_end, late.lateness_ms) == (
        "ACC-1002", utc(2005, 3, 14, 13, 30), utc(2005, 3, 14, 14, 0), 0)
    assert processor.counts == {"refused": 1} and processor.reasons == {"OUTSIDE_SERVICE_DATES": 1}


# --- counts -------------------------------------------------------------------------------------------------------
def test_every_input_is_accounted_for(processor: IngestProcessor) -> None:
    good = [
        READING,
        replace(READING, suffix="B1"),
        replace(READING, uom="Wh", value=Decimal("250"), interval_start=utc(2005, 3, 16, 1, 0),
                interval_end=utc(2005, 3, 16, 1, 30)),
        replace(READING, interval_start=utc(2005, 3, 16, 0, 30), interval_end=utc(2005, 3, 16, 1, 0)),
    ]
    outside = replace(READING, interval_start=utc(2005, 3, 14, 13, 30), interval_end=utc(2005, 3, 14, 14, 0))
    bad = [r for _, r in REJECTS]
    inputs = [incoming(CODEC.encode(r), offset=i) for i, r in enumerate([*good, *bad, outside])]
    inputs.append(incoming(b"\xc3\x01garbage", offset=len(inputs)))
    ctx = run(processor, *inputs)

    by_topic: dict[str, list[bytes]] = {}
    for topic, _key, value in ctx.forwarded:
        by_topic.setdefault(topic, []).append(value)
    assert len(by_topic["usage.events"]) == 4
    assert len(by_topic["dlq.ingest"]) == 6
    assert len(by_topic["usage.late"]) == 1
    assert len(ctx.forwarded) == len(inputs) == 11
    assert processor.counts == {"accepted": 4, "dead_lettered": 6, "refused": 1}
    reasons = sorted(CODEC.decode(v, DeadLetter).reason for v in by_topic["dlq.ingest"])
    assert reasons == [
        "NEGATIVE_VALUE", "UNDECODABLE", "UNKNOWN_NMI",
        "UNSUPPORTED_CHANNEL", "UNSUPPORTED_UNIT", "UNSUPPORTED_UNIT",
    ]
    offsets = sorted(CODEC.decode(v, DeadLetter).offset for v in by_topic["dlq.ingest"])
    assert offsets == [4, 5, 6, 7, 8, 10]
    assert [CODEC.decode(v, UsageEvent).value for v in by_topic["usage.events"]] == [
        Decimal("0.731"), Decimal("0.731"), Decimal("0.25"), Decimal("0.731")
    ]
