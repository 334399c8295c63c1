"""``pipeline.windowing.wire``: the value conversions around the codec's plain datums (fastavro).

- ``EventReader`` gives what ``Codec.decode(data, UsageEvent)`` gives for any event, and refuses
  (``DecodeError``) exactly the bytes it refuses: corrupt, truncated or extended records included;
- the ``WindowHead`` and ``UsageWindow`` records are the bytes fastavro writes for the equivalent
  datums with logical types, and a head read back equals the head written; an events entry holds
  the events as consumed and folds back to the intervals the processor holds; an archive reads back
  as the window it was made of (clean), and a series clock round-trips;
- records of another ``UsageEvent`` writer schema are resolved as ``Codec.decode`` resolves them.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import fastavro
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.codec import Codec, DecodeError, default_codec
from pipeline.records import UsageEvent, UsageWindow
from pipeline.windowing import windows as w
from pipeline.windowing.wire import (
    EventReader,
    PlainEvent,
    WindowWire,
    events_key,
    events_prefix,
    micro_of,
    nem12_event_id,
    state_codec,
    unscaled_of,
)
from tests.evolution import evolved_schema_dir

CODEC = default_codec()
READER = EventReader(CODEC)
WIRE = WindowWire(CODEC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_MS = -62_135_596_800_000  # datetime's range, as Codec.decode accepts it
MAX_MS = 253_402_300_799_999


def plain_of(ev: UsageEvent) -> tuple:
    """The fields of ``PlainEvent`` (without key prefix) computed from the reference record."""
    return (ev.event_id, ev.account, ev.series, ev.metric, ev.unit, w._ms(ev.event_time), w.to_micro(ev.value),
            w._ms(ev.version), ev.quality, ev.source)


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=70)  # ≥ 64 bytes: multi-byte lengths
usual_ms = st.one_of(st.integers(2**34, 2**41 - 1), st.integers(-(2**41), -(2**34) - 1))
any_ms = st.one_of(usual_ms, st.integers(MIN_MS, MAX_MS), st.sampled_from([MIN_MS, MAX_MS, 0, -1, 1]))
micro = st.one_of(st.integers(-(10**12), 10**12), st.integers(-(10**27) + 1, 10**27 - 1))


@st.composite
def events(draw: st.DrawFn, ms: st.SearchStrategy[int] = any_ms) -> UsageEvent:
    def dt(v: int) -> datetime:
        return EPOCH + timedelta(milliseconds=v)

    return UsageEvent(
        draw(texts), draw(texts), draw(texts), draw(texts), draw(texts), dt(draw(ms)), dt(draw(ms)),
        w.to_decimal(draw(micro)), dt(draw(ms)), draw(st.sampled_from("AESFNV")), draw(texts),
    )


# --- usage events in ---------------------------------------------------------------------------------
@settings(max_examples=400, deadline=None)
@given(events())
def test_reader_reads_what_the_codec_reads(ev: UsageEvent) -> None:
    raw = CODEC.encode(ev)
    got = READER(raw)
    assert isinstance(got, PlainEvent)
    assert tuple(got[:10]) == plain_of(ev)
    assert got.key_prefix == f"w|{ev.account}|{ev.series}|".encode()


def test_reader_refuses_values_outside_what_the_codec_reads() -> None:
    ev = UsageEvent("e", "a", "s", "m", "u", EPOCH, EPOCH, Decimal("1"), EPOCH, "A", "f#1")
    good = CODEC.decode_plain(CODEC.encode(ev), "UsageEvent")
    for field, value in (("event_time", MAX_MS + 1), ("event_end", MIN_MS - 1), ("version", 2**62),
                         ("value", (10**28).to_bytes(12, "big", signed=True))):
        raw = CODEC.encode_plain({**good, field: value}, "UsageEvent")
        if field != "value":  # Codec.decode rounds a decimal of > 28 digits; a window cannot hold one
            with pytest.raises(DecodeError):
                CODEC.decode(raw, UsageEvent)
        with pytest.raises(DecodeError, match="invalid UsageEvent"):
            READER(raw)


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 200), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 200), st.just(0)),
    st.tuples(st.just("append"), st.integers(0, 255), st.integers(1, 3)),
)


def mutate(raw: bytes, how: tuple[str, int, int]) -> bytes:
    kind, a, b = how
    if kind == "flip":
        if len(raw) <= 10:
            return raw
        i = 10 + a % (len(raw) - 10)  # in the body: the header is checked before any decoding
        return raw[:i] + bytes([raw[i] ^ b]) + raw[i + 1:]
    if kind == "cut":
        return raw[: a % (len(raw) + 1)]
    return raw + bytes([a]) * b


@settings(max_examples=600, deadline=None)
@given(events(), st.lists(mutations, min_size=1, max_size=3))
def test_reader_refuses_exactly_what_the_codec_refuses(ev: UsageEvent, how: list[tuple[str, int, int]]) -> None:
    raw = CODEC.encode(ev)
    for m in how:
        raw = mutate(raw, m)
    try:
        expected = CODEC.decode(raw, UsageEvent)
    except DecodeError:
        with pytest.raises(DecodeError):
            READER(raw)
        return
    if abs(w.to_micro(expected.value)) >= 10**28:  # rounded by Codec.decode; more than a window can hold
        with pytest.raises(DecodeError, match="28 digits"):
            READER(raw)
        return
    assert tuple(READER(raw)[:10]) == plain_of(expected)


def test_reader_refuses_what_is_not_a_usage_event() -> None:
    for raw in (b"", b"\xc3\x01", b"garbage", CODEC.encode(UsageWindow(
            "a|b|0", "a", "b", "m", "u", EPOCH, EPOCH, 0, "ON_TIME", Decimal(1), Decimal(1), 1, (), (), EPOCH))):
        with pytest.raises(DecodeError):
            READER(raw)


def test_other_usage_event_schemas_are_resolved_as_the_codec_resolves_them(tmp_path: Path) -> None:
    evolved = Codec(evolved_schema_dir(tmp_path))
    reader = EventReader(evolved)
    ev = UsageEvent("e1", "ACC", "NMI1/E1", "energy_import", "kWh", EPOCH, EPOCH, Decimal("1.5"), EPOCH, "A", "f#1")
    old = CODEC.encode(ev)  # written with today's schema, now a history version
    new = evolved.encode({**asdict(ev), "tariff_hint": "x", "weight": 2}, "UsageEvent")
    assert tuple(reader(old)[:10]) == tuple(reader(new)[:10]) == plain_of(ev)
    with pytest.raises(DecodeError, match="unknown schema fingerprint"):
        READER(new)  # today's codec does not know tomorrow's schema: the same as Codec.decode


# --- window state and revisions out -------------------------------------------------------------------
def fastavro_bytes(codec: Codec, name: str, datum: dict) -> bytes:
    buf = io.BytesIO()
    buf.write(codec.header(name))
    fastavro.schemaless_writer(buf, codec.schema(name), datum)
    return buf.getvalue()


intervals = st.dictionaries(
    texts,
    st.tuples(st.integers(MIN_MS, MAX_MS), st.integers(-(10**20), 10**20), st.sampled_from("AESFNV"), texts,
              st.integers(MIN_MS, MAX_MS)),
    max_size=8,
)


@st.composite
def states(draw: st.DrawFn) -> w.WindowState:
    ivs = {
        eid: w.Interval(version, value, quality, source, event_ms)
        for eid, (version, value, quality, source, event_ms) in draw(intervals).items()
    }
    start = draw(st.integers(0, 2**45))
    return w.WindowState(
        f"{draw(texts)}|x|{start}", draw(texts), draw(texts), draw(texts), draw(texts), start,
        start + draw(st.integers(1, 10**9)), draw(st.sampled_from(w.AGGREGATIONS)), ivs,
        draw(st.integers(-1, 2**31 - 1)), draw(st.integers(-(10**27) + 1, 10**27 - 1)), draw(st.booleans()),
        draw(st.booleans()),
    )


def dt(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


@settings(max_examples=300, deadline=None)
@given(states())
def test_window_head_is_the_avro_fastavro_writes_and_reads_back(s: w.WindowState) -> None:
    encode, decode = state_codec(CODEC)
    raw = encode(b"w|" + s.window_id.encode(), s)
    datum = {
        "window_id": s.window_id, "account": s.account, "series": s.series, "metric": s.metric, "unit": s.unit,
        "start_ms": s.start_ms, "end_ms": s.end_ms, "aggregation": s.aggregation, "revision": s.revision,
        "emitted_value": w.to_decimal(s.emitted), "dirty": s.dirty, "late": s.late,
    }
    assert raw == fastavro_bytes(CODEC, "WindowHead", datum)
    back = decode(b"w|x", raw)
    assert back.intervals is None  # kept apart: loaded by the processor
    back.intervals = s.intervals
    assert back == s
    assert encode(b"w|x", back) == raw


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(events(ms=st.integers(MIN_MS, MAX_MS)), st.sampled_from(["a", "b", "c"])), max_size=6),
       st.integers(0, 3))
def test_events_entries_are_the_events_as_consumed_and_fold_back_to_the_highest_versions(evs, split: int) -> None:
    encode, decode = state_codec(CODEC)
    evs = [dataclasses.replace(ev, event_id=eid) for ev, eid in evs]  # a few identities, several versions each
    raws = [CODEC.encode(ev) for ev in evs]
    entries = [WIRE.events(raws[:split]), WIRE.events(raws[split:])]
    key = events_key(b"w|a|s|0", 41)
    assert key == b"i|a|s|0|00000000000000000041" and key.startswith(events_prefix(b"w|a|s|0"))
    assert events_key(b"w|a|s|0", 9) < events_key(b"w|a|s|0", 10)  # byte order = input order
    for entry in entries:
        assert encode(key, entry) is entry and decode(key, entry) is entry  # written and read as they are
        assert entry == fastavro_bytes(CODEC, "WindowEvents", {"events": CODEC.decode_dict(entry, "WindowEvents")
                                                                ["events"]})
    expected: dict[str, w.Interval] = {}
    for ev in evs:  # the processor's rule: a strictly higher version replaces the one held
        if ev.event_id not in expected or expected[ev.event_id].version_ms < w._ms(ev.version):
            expected[ev.event_id] = w.interval_of(ev)
    folded = WIRE.intervals(entries)
    assert folded == expected and list(folded) == list(expected)


@settings(max_examples=200, deadline=None)
@given(st.tuples(st.integers(-(2**62), 2**62), st.integers(-(2**62), 2**62), st.integers(-(2**62), 2**62), texts))
def test_series_clock_round_trips(fields: tuple) -> None:
    encode, decode = state_codec(CODEC)
    clock = w.SeriesClock(*fields)
    key = b"s|acc|NMI1/E1|"
    assert decode(key, encode(key, clock)) == clock


def test_a_format_3_partition_watermark_reads_as_nothing() -> None:
    _, decode = state_codec(CODEC)
    assert decode(b"wm", CODEC.encode({"max_event_ms": 1, "watermark_ms": 0}, "WatermarkState")) is None


@settings(max_examples=300, deadline=None)
@given(states(), st.booleans())
def test_an_archive_reads_back_as_the_clean_window_it_was_made_of(s: w.WindowState, meter_ids: bool) -> None:
    assume(all(s.start_ms - 2**62 < iv.event_ms - s.start_ms < 2**62 for iv in s.intervals.values()))
    if meter_ids:  # NEM12 interval ids are left out of the archive and derived again from the series
        s.series = "NMI0000001/E1"
        s.intervals = {nem12_event_id(s.series, iv.event_ms): iv for iv in s.intervals.values()
                       if 0 <= iv.event_ms <= MAX_MS}
    s.window_id = w.window_id(s.account, s.series, s.start_ms)
    raw = WIRE.archive(s)
    back = WIRE.read_archive(raw)
    assert back == dataclasses.replace(s, dirty=False, late=False)
    assert list(back.intervals) == list(s.intervals)
    assert WIRE.archive(back) == raw
    encode, decode = state_codec(CODEC)
    assert encode(b"x|k", raw) is raw and decode(b"x|k", raw) is raw  # stored as it is


def test_an_archive_is_compact() -> None:
    """A 30-minute window of six 5-minute NEM12 intervals from one file: the figure behind the state size
    per meter-month in docs/semantics.md (its hot form holds the six UsageEvent records, about 1 kB)."""
    start = 1_110_000_000_000 - 1_110_000_000_000 % 1_800_000
    ivs = {nem12_event_id("NEM1201002/E1", start + i * 300_000):
           w.Interval(1_111_111_111_000, 731_000 + i, "A", "NEM12#000000000000002#CNRGYMDP#NEMMCO.zip!x.csv#12",
                      start + i * 300_000) for i in range(6)}
    s = w.WindowState(w.window_id("ACC-1002", "NEM1201002/E1", start), "ACC-1002", "NEM1201002/E1",
                      "energy_import", "kWh", start, start + 1_800_000, "sum", ivs, 0, 4_386_015)
    assert len(WIRE.archive(s)) <= 210
    hot = sum(len(CODEC.encode(UsageEvent(eid, s.account, s.series, s.metric, s.unit, dt(iv.event_ms),
                                          dt(iv.event_ms + 300_000), w.to_decimal(iv.value), dt(iv.version_ms),
                                          iv.quality, iv.source))) for eid, iv in ivs.items())
    assert hot > 4.5 * len(WIRE.archive(s))


@settings(max_examples=300, deadline=None)
@given(states(), st.integers(0, 2**31 - 1), st.sampled_from(["ON_TIME", "LATE"]),
       st.integers(-(10**27) + 1, 10**27 - 1), st.integers(-(10**27) + 1, 10**27 - 1), st.lists(texts, max_size=4),
       st.lists(texts, max_size=4), st.integers(0, MAX_MS))
def test_revision_is_the_usage_window_codec_encode_writes(s: w.WindowState, revision: int, timing: str, value: int,
                                                          delta: int, qualities: list[str], sources: list[str],
                                                          watermark: int) -> None:
    assume(s.end_ms <= MAX_MS)
    rev = w.Revision(s.window_id, s.account, s.series, s.metric, s.unit, s.start_ms, s.end_ms, revision, timing,
                     value, delta, len(s.intervals), sorted(set(qualities)), sorted(set(sources)), watermark)
    record = UsageWindow(s.window_id, s.account, s.series, s.metric, s.unit, dt(s.start_ms), dt(s.end_ms),
                         revision, timing, w.to_decimal(value), w.to_decimal(delta), len(s.intervals),
                         tuple(rev.qualities), tuple(rev.sources), dt(watermark))
    assert WIRE.revision(rev) == CODEC.encode(record)
    assert CODEC.decode(WIRE.revision(rev), UsageWindow) == record  # written again: the remembered parts answer
    head = WIRE.state(s)  # the head shares its start with the revision (remembered by the first of them)
    assert head == CODEC.encode_plain({
        "window_id": s.window_id, "account": s.account, "series": s.series, "metric": s.metric, "unit": s.unit,
        "start_ms": s.start_ms, "end_ms": s.end_ms, "aggregation": s.aggregation, "revision": s.revision,
        "emitted_value": unscaled_of(s.emitted), "dirty": s.dirty, "late": s.late}, "WindowHead")


def test_decimals_beyond_the_schema_are_refused_like_the_codec_refuses_them() -> None:
    s = w.WindowState("a|b|0", "a", "b", "m", "u", 0, 1, emitted=10**28)
    encode, _ = state_codec(CODEC)
    with pytest.raises(ValueError, match="28 digits"):
        encode(b"w|a|b|0", s)


@given(st.integers(-(10**28) + 1, 10**28 - 1))
def test_unscaled_bytes_are_fastavros_decimal_bytes(micro: int) -> None:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, {"type": "bytes", "logicalType": "decimal", "precision": 28, "scale": 6},
                               w.to_decimal(micro))
    plain = io.BytesIO()
    fastavro.schemaless_writer(plain, "bytes", unscaled_of(micro))
    assert plain.getvalue() == buf.getvalue()
    assert micro_of(unscaled_of(micro)) == micro


# --- plain datums in the codec -------------------------------------------------------------------------
def test_plain_datums_are_the_base_form_of_the_logical_ones() -> None:
    ev = UsageEvent("e", "a", "s", "m", "u", dt(1_000), dt(2_000), Decimal("-1.25"), dt(3_000), "A", "f#1")
    raw = CODEC.encode(ev)
    plain = CODEC.decode_plain(raw, "UsageEvent")
    assert plain["event_time"] == 1_000 and plain["version"] == 3_000
    assert int.from_bytes(plain["value"], "big", signed=True) == -1_250_000
    assert CODEC.encode_plain(plain, "UsageEvent") == raw
    for bad in (b"x" * 12, raw[:2] + b"\x00" * 8 + raw[10:], raw + b"\x00", raw[:-1]):
        with pytest.raises(DecodeError):
            CODEC.decode_plain(bad, "UsageEvent")


def test_a_state_entry_that_is_not_a_window_head_is_refused_with_the_upgrade_path() -> None:
    _, decode = state_codec(CODEC)
    other = CODEC.encode({"max_event_ms": 1, "watermark_ms": 0}, "WatermarkState")  # a known schema, not a head
    old = CODEC.header("WindowHead")[:2] + bytes(8) + b"\x00"  # e.g. a format 2 record: fingerprint unknown
    for raw in (other, old):
        with pytest.raises(DecodeError, match=r"not a window head of format 3 or 4 .*docs/semantics.md"):
            decode(b"w|a|s|0", raw)


# --- the hand-written Avro paths (issue 13) are the codec's, byte for byte -------------------------------
def general_reader() -> EventReader:
    """An ``EventReader`` that always takes the codec's path (fastavro), to compare the hand-written one with."""
    reader = EventReader(CODEC)
    reader._header = None
    return reader


GENERAL = general_reader()


def outcome(read: EventReader, raw: bytes) -> object:
    try:
        return tuple(read(raw))
    except DecodeError:
        return DecodeError


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(events(), st.sampled_from([0, 1, 2, 3, 4, 5]), st.lists(mutations, max_size=2)),
                min_size=1, max_size=8))
def test_hand_reader_reads_and_refuses_exactly_what_the_codec_path_does(stream: list) -> None:
    """A stream of events sharing their times, version, series strings, value or quality and source
    with the first (the remembered readings answer across events), some corrupted, truncated or
    extended: every one reads (or is refused) as through fastavro, also when read a second time."""
    first = stream[0][0]
    for ev, share, how in stream:
        if share == 1:  # the times of the first event: the remembered varints answer
            ev = dataclasses.replace(ev, event_time=first.event_time, event_end=first.event_end)
        elif share == 2:
            ev = dataclasses.replace(ev, version=first.version)
        elif share == 3:  # the series: account, series, metric and unit read once (with the key prefix)
            ev = dataclasses.replace(ev, account=first.account, series=first.series, metric=first.metric,
                                     unit=first.unit)
        elif share == 4:  # the value, the quality and the source
            ev = dataclasses.replace(ev, value=first.value, quality=first.quality, source=first.source)
        elif share == 5:  # everything but the event id
            ev = dataclasses.replace(first, event_id=ev.event_id)
        raw = CODEC.encode(ev)
        for m in how:
            raw = mutate(raw, m)
        assert outcome(READER, raw) == outcome(GENERAL, raw)
        assert outcome(READER, raw) == outcome(GENERAL, raw)  # the remembered readings answer now


def test_hand_reader_hands_long_fields_to_the_codec_path() -> None:
    for size in (63, 64, 200, 5000):
        ev = UsageEvent("e" * size, "ACC", "NMI1/E1", "energy_import", "kWh", EPOCH, EPOCH + timedelta(minutes=5),
                        Decimal("1.5"), EPOCH, "A", "s" * size)
        raw = CODEC.encode(ev)
        assert tuple(READER(raw)) == tuple(GENERAL(raw))
        assert tuple(READER(raw)[:10]) == plain_of(ev)


def test_hand_reader_takes_only_the_schema_it_knows(tmp_path: Path) -> None:
    assert READER._header == CODEC.header("UsageEvent")
    assert EventReader(Codec(evolved_schema_dir(tmp_path)))._header is None  # another UsageEvent: the codec's path


@settings(max_examples=200, deadline=None)
@given(st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1),
                 texts))
def test_series_clock_is_the_avro_fastavro_writes(fields: tuple) -> None:
    encode, _ = state_codec(CODEC)
    clock = w.SeriesClock(*fields)
    assert encode(b"s|a|b|", clock) == fastavro_bytes(CODEC, "SeriesClockState", clock._asdict())


def test_hand_writers_hand_what_they_cannot_write_to_the_codec() -> None:
    """Strings of 4 KiB or more, numbers beyond the Avro type, empty arrays and events entries: the same
    bytes as fastavro, or the same error."""
    encode, _ = state_codec(CODEC)
    big = "x" * 5000
    s = w.WindowState(f"{big}|b|0", big, "b", "m", "u", 0, 1, "sum", {}, -1, 0, True, False)
    datum = {"window_id": s.window_id, "account": big, "series": "b", "metric": "m", "unit": "u", "start_ms": 0,
             "end_ms": 1, "aggregation": "sum", "revision": -1, "emitted_value": Decimal(0), "dirty": True,
             "late": False}
    assert encode(b"w|x", s) == fastavro_bytes(CODEC, "WindowHead", datum)
    clock = w.SeriesClock(2**63, 0, 0, "m")  # beyond a long: whatever the codec does
    with pytest.raises(Exception) as hand:
        encode(b"s|a|b|", clock)
    with pytest.raises(Exception) as general:
        CODEC.encode_plain(clock._asdict(), "SeriesClockState")
    assert type(hand.value) is type(general.value)
    rev = w.Revision("a|b|0", "a", "b", "m", "u", 0, 1, 0, "ON_TIME", 5, 5, 0, [], [], 0)
    assert WIRE.revision(rev) == CODEC.encode(UsageWindow("a|b|0", "a", "b", "m", "u", dt(0), dt(1), 0, "ON_TIME",
                                                          w.to_decimal(5), w.to_decimal(5), 0, (), (), dt(0)))
    for raws in ([], [b"q" * 5000, b""], [b"r" * 4095] * 3):
        assert WIRE.events(raws) == fastavro_bytes(CODEC, "WindowEvents", {"events": raws})
