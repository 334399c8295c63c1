"""``pipeline.codec``: Avro single-object encoding of every record, its failures and schema evolution."""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from fastavro import schema as avro_schema

from pipeline.codec import MAGIC, Codec, DecodeError
from pipeline.records import DeadLetter, LateEvent, MeterReading, RatedCharge, UsageEvent, UsageWindow
from tests.evolution import evolved_schema_dir


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


READING = MeterReading(
    nmi="NEM1201002", suffix="E1", uom="kWh",
    interval_start=utc(2005, 3, 15, 14, 0), interval_end=utc(2005, 3, 15, 14, 30),
    value=Decimal("0.123456"), quality="A", reason_code=None,
    version=utc(2005, 3, 20, 1, 2, 3, 456000), version_source="UpdateDateTime",
    source_file="NEM12#000000000000002#CNRGYMDP#NEMMCO.csv", source_record=7,
)
EVENT = UsageEvent(
    event_id="nem12:NEM1201002:E1:2005-03-15T14:00Z", account="ACC-1002", series="NEM1201002/E1",
    metric="energy_import", unit="kWh", event_time=utc(2005, 3, 15, 14, 0), event_end=utc(2005, 3, 15, 14, 30),
    value=Decimal("12.5"), version=utc(2005, 3, 20, 1, 2, 3, 999000), quality="E", source="f.csv#7",
)
WINDOW = UsageWindow(
    window_id="ACC-1002|NEM1201002/E1|2005-03-15T14:00Z", account="ACC-1002", series="NEM1201002/E1",
    metric="energy_import", unit="kWh", window_start=utc(2005, 3, 15, 14, 0), window_end=utc(2005, 3, 15, 14, 30),
    revision=3, timing="LATE", value=Decimal("1.000001"), delta=Decimal("-0.25"), count=2,
    qualities=("A", "S"), sources=("a.csv#3", "b.csv#9"), watermark=utc(2005, 3, 16, 0, 0, 0, 1000),
)
LATE = LateEvent(event=EVENT, reason="TOO_LATE", window_end=utc(2005, 3, 15, 14, 30),
                 watermark=utc(2006, 6, 1), lateness_ms=86_400_000 * 3 + 17)
CHARGE = RatedCharge(
    line_id="5f1c", account="ACC-1002", period_start=date(2005, 3, 1), period_end=date(2005, 4, 1),
    currency="AUD", component_id="energy", component_kind="tou", band="peak", quantity=Decimal("12.345"),
    unit="kWh", rate=Decimal("0.3403"), amount=Decimal("-0.07"), period_total=Decimal("4.20"),
    price_book_id="ACTEWAGL-HOME-TOU", price_book_version=1, cause="w|3", explanation='{"formula": "x"}',
)
DEAD = DeadLetter(
    stage="ingest", reason="UNKNOWN_NMI", message="NMI X has no service point", topic="meter.readings",
    partition=3, offset=2**40, key=b"NEM1209999", value=b"\x00\xffraw",
    headers=(("trace", b"abc"), ("empty", b"")), failed_at=utc(2024, 1, 2, 3, 4, 5, 6000),
)

RECORDS = [
    READING,
    replace(READING, reason_code="51", quality="S", value=Decimal("-3")),
    EVENT,
    WINDOW,
    replace(WINDOW, revision=0, timing="ON_TIME", qualities=(), sources=()),
    LATE,
    CHARGE,
    DEAD,
    replace(DEAD, key=None, value=None, headers=()),
]


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_round_trip_is_equal(codec: Codec, record: object) -> None:
    data = codec.encode(record)
    back = codec.decode(data, type(record))
    assert back == record
    assert type(back) is type(record)


def test_round_trip_restores_tuples_and_nested_records(codec: Codec) -> None:
    dead = codec.decode(codec.encode(DEAD), DeadLetter)
    assert dead.headers == (("trace", b"abc"), ("empty", b""))
    win = codec.decode(codec.encode(WINDOW), UsageWindow)
    assert win.qualities == ("A", "S") and isinstance(win.sources, tuple)
    late = codec.decode(codec.encode(LATE), LateEvent)
    assert isinstance(late.event, UsageEvent) and late.event == EVENT
    charge = codec.decode(codec.encode(CHARGE), RatedCharge)
    assert charge.period_start == date(2005, 3, 1) and charge.amount == Decimal("-0.07")


@pytest.mark.parametrize("record", RECORDS[::2], ids=lambda r: type(r).__name__)
def test_wire_is_single_object_encoding(codec: Codec, record: object) -> None:
    data = codec.encode(record)
    assert data[:2] == b"\xc3\x01" == MAGIC
    canonical = avro_schema.to_parsing_canonical_form(codec.schema(type(record).__name__))
    assert data[2:10] == bytes.fromhex(avro_schema.fingerprint(canonical, "CRC-64-AVRO"))
    assert len(data) > 10


def test_fingerprint_matches_avro_reference_algorithm(codec: Codec) -> None:
    """CRC-64-AVRO per the Avro spec, computed here independently of fastavro."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    canonical = avro_schema.to_parsing_canonical_form(codec.schema("UsageEvent"))
    fp = empty
    for byte in canonical.encode():
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    assert codec.encode(EVENT)[2:10] == fp.to_bytes(8, "little")


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc3", b"garbage bytes, not avro", b"\x00\x01" + b"\x00" * 30, b"{\"nmi\": \"NEM1201002\"}"],
)
def test_garbage_raises_decode_error(codec: Codec, data: bytes) -> None:
    with pytest.raises(DecodeError):
        codec.decode(data, MeterReading)


def test_garbage_body_after_valid_header_raises_decode_error(codec: Codec) -> None:
    header = codec.encode(READING)[:10]
    with pytest.raises(DecodeError):
        codec.decode(header + b"\xff" * 40, MeterReading)


def test_truncated_record_raises_decode_error(codec: Codec) -> None:
    data = codec.encode(EVENT)
    for cut in range(1, len(data)):
        with pytest.raises(DecodeError):
            codec.decode(data[:-cut], UsageEvent)


def test_unknown_fingerprint_raises_decode_error(codec: Codec) -> None:
    data = codec.encode(EVENT)
    forged = data[:2] + bytes(8) + data[10:]
    with pytest.raises(DecodeError, match="unknown schema fingerprint 0000000000000000"):
        codec.decode(forged, UsageEvent)


def test_trailing_bytes_raise_decode_error(codec: Codec) -> None:
    data = codec.encode(EVENT)
    with pytest.raises(DecodeError, match="1 trailing bytes"):
        codec.decode(data + b"\x00", UsageEvent)


def test_record_of_another_schema_is_not_silently_accepted(codec: Codec) -> None:
    with pytest.raises(DecodeError):
        codec.decode(codec.encode(DEAD), MeterReading)


def test_decimal_with_seven_places_raises_on_encode(codec: Codec) -> None:
    with pytest.raises(ValueError, match="more than 6 decimal places"):
        codec.encode(replace(EVENT, value=Decimal("0.1234567")))
    # trailing zeros beyond 6 places are not extra precision
    assert codec.decode(codec.encode(replace(EVENT, value=Decimal("0.1234560"))), UsageEvent).value == Decimal(
        "0.123456"
    )


def test_decode_rejects_record_invariants(codec: Codec) -> None:
    """Bytes that parse but violate the record's invariants are a DecodeError, not a crash later."""
    datum = {
        "nmi": "N", "suffix": "E1", "uom": "kWh", "interval_start": utc(2005, 1, 1, 1), "interval_end": utc(2005, 1, 1),
        "value": Decimal(1), "quality": "A", "reason_code": None, "version": utc(2005, 1, 1),
        "version_source": "x", "source_file": "f", "source_record": 1,
    }
    with pytest.raises(DecodeError, match="interval_end"):
        codec.decode(codec.encode(datum, "MeterReading"), MeterReading)


# --- evolution --------------------------------------------------------------------------------------------
def test_new_reader_resolves_old_writer_with_defaults(codec: Codec, tmp_path: Path) -> None:
    new = Codec(evolved_schema_dir(tmp_path))
    old_bytes = codec.encode(EVENT)
    assert new.encode({**asdict(EVENT), "tariff_hint": "x", "weight": 1}, "UsageEvent")[2:10] != old_bytes[2:10]

    datum = new.decode_dict(old_bytes, "UsageEvent")
    assert datum["tariff_hint"] == "none"
    assert datum["weight"] is None
    assert datum["account"] == "ACC-1002"
    assert datum["value"] == Decimal("12.5")
    assert datum["event_time"] == utc(2005, 3, 15, 14, 0)
    # the dataclass view of the old bytes is unchanged
    assert new.decode(old_bytes, UsageEvent) == EVENT


def test_old_fingerprint_unknown_without_history(codec: Codec, tmp_path: Path) -> None:
    schemas = evolved_schema_dir(tmp_path)
    shutil.rmtree(schemas / "history")
    with pytest.raises(DecodeError, match="unknown schema fingerprint"):
        Codec(schemas).decode_dict(codec.encode(EVENT), "UsageEvent")

