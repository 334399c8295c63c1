"""The ingest hot path (``pipeline.ingest.wire`` and ``IngestProcessor._reading``) against the general path:
the same bytes as ``Codec``, the same outcomes, forwards, headers, state and counts (issue 13)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.codec import DecodeError, default_codec
from pipeline.config import Settings
from pipeline.ingest import wire
from pipeline.ingest.processor import IngestProcessor, IngestRules, Seen, state_codec, to_usage_event
from pipeline.records import DeadLetter, MeterReading, UsageEvent
from pipeline.reference import BUNDLED_REFERENCE, ReferenceData, ReferenceFile
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import FakeContext
from pipeline.topology import Topics

CODEC = default_codec()
TOPICS = Topics(Settings(topic_prefix=""))
REF = ReferenceData.from_file(ReferenceFile.read(BUNDLED_REFERENCE))
DAY_MS = 86_400_000
NOW_MS = int(datetime(2005, 6, 1, tzinfo=UTC).timestamp() * 1000)
RULES = IngestRules(future_bound_ms=DAY_MS, telemetry_horizon_ms=2 * DAY_MS, meter_horizon_ms=30 * DAY_MS,
                    out_of_orderness_ms=3_600_000)
HEADER = CODEC.header("MeterReading")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FEW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ms(dt: datetime) -> int:
    return (dt - EPOCH) // timedelta(milliseconds=1)


class General(IngestProcessor):
    """The processor with its hot path turned off: every reading takes the general path (``_meter``)."""

    def _reading(self, *args: object) -> bool:
        return False


# --- strategies ----------------------------------------------------------------------------------------------
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=70)


def mostly(common: list[str]) -> st.SearchStrategy[str]:
    """One of ``common`` 9 times in 10, else any text."""
    return st.tuples(st.integers(0, 9), st.sampled_from(common), texts).map(lambda t: t[1] if t[0] else t[2])


nmis = mostly(["NEM1201002", "NEM1201004", "NEM1202022", "NEM1311002", "NEM9999999"])
suffixes = mostly(["E1", "B1", "Q1", "K2", "e1", "X1"])
uoms = mostly(["kWh", "Wh", "MWh", "kVArh", "varh", "MVArh", "KWH", "gal"])
lengths_min = st.sampled_from([1, 5, 7, 15, 30, 60, 1440, 1441])
starts = st.one_of(
    st.integers(0, 60 * 24 * 90).map(lambda m: datetime(2005, 3, 1, tzinfo=UTC) + timedelta(minutes=m)),
    st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30), timezones=st.just(UTC)).map(
        lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)),
)
values = st.one_of(
    st.integers(-(10**7), 10**10).map(lambda u: Decimal(u).scaleb(-6)),
    st.integers(0, 10**10).map(lambda u: Decimal(u).scaleb(-6)),
    st.decimals(min_value=-(10**22), max_value=10**22, places=6, allow_nan=False, allow_infinity=False),
    st.sampled_from([Decimal("0.0005"), Decimal("0.0015"), Decimal("999999999999999.999999"),
                     Decimal("1000000000000000"), Decimal("-0.000001"), Decimal(0)]),
)


@st.composite
def readings(draw: st.DrawFn) -> MeterReading:
    if draw(st.integers(0, 3)) != 3:  # mostly aligned to the NEM day (AEST midnight = 14:00 UTC): mostly billable
        length = draw(st.sampled_from([30, 5, 15, 60, 1440, 1]))
        start = datetime(2005, 3, 9, 14, tzinfo=UTC) + timedelta(minutes=length * draw(st.integers(0, 80 * 24 * 2)))
        start = min(start, datetime(2005, 5, 31, 14, tzinfo=UTC))
    else:
        length = draw(lengths_min)
        start = draw(starts)
    end = start + timedelta(minutes=length)
    if end.year > 9999:
        end = start + timedelta(minutes=1)
    version = draw(st.one_of(st.just(start + timedelta(days=1)),
                             st.integers(0, 10).map(lambda h: datetime(2005, 5, 1, h, tzinfo=UTC))))
    return MeterReading(
        nmi=draw(nmis), suffix=draw(suffixes), uom=draw(uoms), interval_start=start, interval_end=end,
        value=draw(values), quality=draw(st.sampled_from("AESFNV")), reason_code=draw(st.none() | texts),
        version=version, version_source=draw(mostly(["UpdateDateTime", "MSATSLoadDateTime"])),
        source_file=draw(mostly(["NEM12#1#A#B.csv", "x" * 200])),
        source_record=draw(st.integers(0, 2**31 - 1)), correction=draw(st.booleans()),
    )


def encoded(reading: MeterReading) -> bytes | None:
    try:
        return CODEC.encode(reading)
    except (ValueError, ArithmeticError):  # beyond the schema (a value of more than 28 digits): never on the topic
        return None


# --- the reader ----------------------------------------------------------------------------------------------
@FEW
@given(readings())
def test_read_reading_gives_the_fields_codec_decodes(reading: MeterReading) -> None:
    data = encoded(reading)
    if data is None:
        return
    plain = wire.read_reading(data, HEADER)
    general = CODEC.decode_plain(data, "MeterReading")
    expected = wire.PlainReading(
        general["nmi"], general["suffix"], general["uom"], general["interval_start"], general["interval_end"],
        int.from_bytes(general["value"], "big", signed=True), general["quality"], general["reason_code"],
        general["version"], general["version_source"], general["source_file"], general["source_record"],
        general["correction"])
    short = all(len(getattr(reading, f).encode()) < 64 for f in ("nmi", "suffix", "uom", "quality", "version_source"))
    if short and all(0 <= t < wire.MAX_FAST_MS for t in (expected.start_ms, expected.end_ms, expected.version_ms)):
        assert plain is not None
    if plain is not None:
        assert wire.PlainReading(*plain) == expected


@FEW
@given(readings(), st.data())
def test_read_reading_never_accepts_what_codec_refuses(reading: MeterReading, data: st.DataObject) -> None:
    raw = encoded(reading)
    if raw is None:
        return
    cut = data.draw(st.integers(0, len(raw)))
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        mutated[i] = data.draw(st.integers(0, 255))
    tail = data.draw(st.binary(max_size=3))
    for candidate in (raw[:cut], bytes(mutated), raw + tail):
        plain = wire.read_reading(candidate, HEADER)  # never raises
        if plain is None:
            continue
        general = CODEC.decode_dict(candidate, "MeterReading")  # no DecodeError: the general path reads it too
        assert general["nmi"] == plain[0] and ms(general["interval_start"]) == plain[3]
        assert general["value"] == Decimal(plain[5]).scaleb(-6)


def test_read_reading_refuses_other_writers_and_garbage() -> None:
    assert wire.read_reading(b"", HEADER) is None
    assert wire.read_reading(HEADER, HEADER) is None
    assert wire.read_reading(b"\xc3\x01" + b"\x00" * 40, HEADER) is None
    assert wire.read_reading(HEADER + b"\xff" * 40, HEADER) is None


# --- the writers ---------------------------------------------------------------------------------------------
@FEW
@given(st.integers(-(2**63), 2**63 - 1), texts, st.integers(-(10**28) + 1, 10**28 - 1))
def test_writers_match_fastavro(n: int, s: str, micro: int) -> None:
    datum = {"time_ms": n, "version_ms": -n - 1}
    assert wire.seen_bytes(CODEC.header("IngestSeen"), n, -n - 1) == CODEC.encode(datum, "IngestSeen")
    assert wire.read_seen(CODEC.encode(datum, "IngestSeen"), CODEC.header("IngestSeen")) == (n, -n - 1)
    event = UsageEvent(s, "a", "b", "c", "d", EPOCH, EPOCH, Decimal(micro).scaleb(-6), EPOCH, "A", s)
    body = CODEC.encode(event)
    assert wire.avro_string(s) == body[10:10 + len(wire.avro_string(s))]
    assert body.endswith(wire.avro_string(s))
    dec, tail = wire.avro_decimal(micro), len(wire.avro_string(s)) + 3  # then version 0 (1 byte), quality "A" (2)
    assert body[-tail - len(dec):-tail] == dec


@FEW
@given(st.integers(-(2**63), 2**63 - 1))
def test_state_codec_round_trips_seen(n: int) -> None:
    encode, decode = state_codec(CODEC)
    seen = Seen(n, abs(n) // 2)
    raw = encode(b"m|NMI\x00E1\x000", seen)
    assert raw == CODEC.encode({"time_ms": seen.time_ms, "version_ms": seen.version_ms}, "IngestSeen")
    assert decode(b"m|NMI\x00E1\x000", raw) == seen


def test_state_codec_refuses_garbage() -> None:
    _, decode = state_codec(CODEC)
    try:
        decode(b"m|x", b"\xc3\x01garbage!")
    except DecodeError:
        return
    raise AssertionError("no DecodeError")


# --- the processor: hot path = general path ------------------------------------------------------------------
def outcome(proc: IngestProcessor, records: list[Incoming], batch: int) -> tuple[object, ...]:
    ctx = FakeContext()
    for i in range(0, len(records), batch):
        proc.process_batch(records[i:i + batch], ctx)
        proc.punctuate(NOW_MS, ctx)
    state = {p: dict(s.data) for p, s in ctx.stores.items()}
    forwarded = [(t, k, replace(CODEC.decode(v, DeadLetter), failed_at=EPOCH) if t == TOPICS.dlq_ingest else v)
                 for t, k, v in ctx.forwarded]  # a dead letter says when it was written: not compared
    return forwarded, ctx.headers, ctx.counts, state, proc.counts, proc.reasons


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(readings(), min_size=1, max_size=12), st.lists(st.integers(0, 11), max_size=6),
       st.integers(1, 5), st.booleans())
def test_hot_path_forwards_exactly_what_the_general_path_does(
        batch_readings: list[MeterReading], repeats: list[int], batch: int, timed: bool) -> None:
    values = [v for v in map(encoded, batch_readings) if v is not None]
    values += [values[i % len(values)] for i in repeats if values]  # duplicates (and supersessions below)
    headers = (("pipeline-arrived-ms", b"1234"),) if timed else ()
    records = [Incoming(TOPICS.meter_readings, len(v) % 2, offset, b"k", v, headers, 1_700_000_000_000 + offset)
               for offset, v in enumerate(values)]
    fast = IngestProcessor(TOPICS, CODEC, lambda: REF, rules=RULES, clock_ms=lambda: NOW_MS)
    general = General(TOPICS, CODEC, lambda: REF, rules=RULES, clock_ms=lambda: NOW_MS)
    assert outcome(fast, records, batch) == outcome(general, records, batch)


@FEW
@given(readings())
def test_usage_event_bytes_and_id_are_those_of_codec_encode(reading: MeterReading) -> None:
    """The hot path's event for an accepted reading is ``Codec.encode(to_usage_event(...))`` byte for byte."""
    reading = replace(reading, nmi="NEM1201002", suffix="E1", interval_start=datetime(2005, 4, 1, 14, tzinfo=UTC),
                      interval_end=datetime(2005, 4, 1, 14, 30, tzinfo=UTC))
    data = encoded(reading)
    if data is None:
        return
    ctx = FakeContext()
    proc = IngestProcessor(TOPICS, CODEC, lambda: REF, rules=RULES, clock_ms=lambda: NOW_MS)
    proc.process(Incoming(TOPICS.meter_readings, 0, 0, b"k", data, (), 5), ctx)
    if proc.counts != {"accepted": 1}:
        return  # refused or dead-lettered: the general path's (compared above)
    ((topic, key, value),) = ctx.forwarded
    event = to_usage_event(reading, REF)
    assert (topic, key, value) == (TOPICS.usage_events, event.account, CODEC.encode(event))
    assert CODEC.decode(value, UsageEvent).event_id == reading.identity
    assert ctx.headers == [[("pipeline-arrived-ms", b"5")]]


def test_a_day_of_readings_takes_the_hot_path() -> None:
    """Ordinary readings do not silently fall back to the general path (which would only be slower)."""
    proc = IngestProcessor(TOPICS, CODEC, lambda: REF, rules=RULES, clock_ms=lambda: NOW_MS)
    taken: list[bool] = []
    original = proc._reading

    def spy(*args: object) -> bool:
        taken.append(original(*args))  # type: ignore[arg-type]
        return taken[-1]

    proc._reading = spy  # type: ignore[method-assign]
    start = datetime(2005, 4, 1, 14, tzinfo=UTC)
    records = []
    for i, uom in enumerate(["kWh", "Wh", "MWh", "kVArh"] * 12):
        r = MeterReading("NEM1201002", "E1", uom, start + timedelta(minutes=30 * i),
                         start + timedelta(minutes=30 * (i + 1)),
                         (Decimal(i) / 7).quantize(Decimal("0.000001")), "A", None, start + timedelta(days=2),
                         "UpdateDateTime", "NEM12#1#A#B.csv", 10 + i)
        records.append(Incoming(TOPICS.meter_readings, 0, i, b"k", CODEC.encode(r), (), 0))
    ctx = FakeContext()
    proc.process_batch(records, ctx)
    assert taken == [True] * 48 and proc.counts == {"accepted": 48}


def test_the_generated_readings_are_mostly_billable() -> None:
    """The comparisons above see every outcome, accepted most (else they would prove little)."""
    seen: dict[str, int] = {}

    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(readings())
    def count(reading: MeterReading) -> None:
        data = encoded(reading)
        if data is None:
            return
        proc = IngestProcessor(TOPICS, CODEC, lambda: REF, rules=RULES, clock_ms=lambda: NOW_MS)
        proc.process(Incoming(TOPICS.meter_readings, 0, 0, b"k", data, (), 0), FakeContext())
        for k, v in proc.counts.items():
            seen[k] = seen.get(k, 0) + v

    count()
    assert seen.get("accepted", 0) >= 20 and seen.get("dead_lettered", 0) >= 20 and seen.get("refused", 0) >= 1, seen
