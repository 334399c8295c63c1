"""Rating's fast paths (issue 13) give exactly what the general ones give:

- ``wire.decode_window`` reads what ``Codec.decode(data, UsageWindow)`` reads; ``wire.encode_charge`` writes the
  bytes ``Codec.encode`` writes;
- a superseding price book version applied by re-keying a period's aggregates (``_rekey_period``: only rates
  changed, one version in effect over the period) emits the same lines, byte for byte (ids, explanations,
  amounts), as rebuilding the period from its windows, also for window revisions that arrive afterwards
  (their stored keys resolve through the period's ``rk|`` aliases) and over several versions in a row.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.codec import DecodeError
from pipeline.rating import processor as rp
from pipeline.rating import wire
from pipeline.rating.pricebook import PriceBook
from pipeline.rating.processor import RatingProcessor
from pipeline.rating.wire import Window, WindowStateWriter, decimal_bytes, decode_window, encode_charge
from pipeline.records import RatedCharge, UsageWindow
from tests.unit.test_rating_processor import ACC, CODEC, PROP_BOOK, TOPICS, Harness, reference, utc, window

D = Decimal
decimals = st.decimals(min_value=D("-1e15"), max_value=D("1e15"), places=6, allow_nan=False, allow_infinity=False)
moments = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1)).map(
    lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000, tzinfo=UTC))
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@given(st.builds(
    UsageWindow, window_id=names, account=names, series=names, metric=names, unit=names, window_start=moments,
    window_end=moments, revision=st.integers(0, 2**31 - 1), timing=st.sampled_from(["ON_TIME", "LATE"]),
    value=decimals, delta=decimals, count=st.integers(0, 2**31 - 1), qualities=st.lists(names).map(tuple),
    sources=st.lists(names).map(tuple), watermark=moments))
@settings(max_examples=300, deadline=None)
def test_decode_window_reads_what_codec_decode_reads(win: UsageWindow) -> None:
    data = CODEC.encode(win)
    fast, slow = decode_window(CODEC, data), CODEC.decode(data, UsageWindow)
    for name in UsageWindow.__dataclass_fields__:
        assert getattr(fast, name) == getattr(slow, name), name
        assert str(getattr(fast, name)) == str(getattr(slow, name)), name


def test_decode_window_refuses_what_codec_decode_refuses() -> None:
    with pytest.raises(rp.DecodeError):
        decode_window(CODEC, b"\xc3\x01garbage")
    d = CODEC.decode_plain(CODEC.encode(window(utc(2024, 5, 1), "1")), "UsageWindow")
    d["revision"] = -1
    with pytest.raises(rp.DecodeError, match="revision"):
        decode_window(CODEC, CODEC.encode_plain(d, "UsageWindow"))


@given(st.builds(
    RatedCharge, line_id=names, account=names, period_start=st.dates(), period_end=st.dates(), currency=names,
    component_id=names, component_kind=names, band=names, quantity=decimals, unit=names, rate=decimals,
    amount=decimals, period_total=decimals, price_book_id=names, price_book_version=st.integers(0, 2**31 - 1),
    cause=names, explanation=names, watermark=st.none() | moments))
@settings(max_examples=300, deadline=None)
def test_encode_charge_is_byte_identical_to_codec_encode(charge: RatedCharge) -> None:
    assert encode_charge(CODEC, charge) == CODEC.encode(charge)


any_decimals = st.decimals(allow_nan=False, allow_infinity=False) | decimals


@given(st.builds(
    RatedCharge, line_id=names, account=names, period_start=st.dates(), period_end=st.dates(), currency=names,
    component_id=names, component_kind=names, band=names, quantity=any_decimals, unit=names, rate=any_decimals,
    amount=any_decimals, period_total=any_decimals, price_book_id=names,
    price_book_version=st.integers(-(2**33), 2**33), cause=names, explanation=names,
    watermark=st.none() | st.datetimes(datetime(1900, 1, 1), datetime(2200, 1, 1), timezones=st.just(UTC))))
@settings(max_examples=500, deadline=None)
def test_encode_charge_gives_the_codec_bytes_or_the_codec_error(charge: RatedCharge) -> None:
    """Beyond what the stage writes (any decimal, versions beyond 32 bits, watermarks before 1970 or with
    microseconds): the hand writer's bytes are the codec's, or it raises what the codec raises."""
    try:
        expected = CODEC.encode(charge)
    except Exception as exc:
        with pytest.raises(type(exc)):
            encode_charge(CODEC, charge)
        return
    assert encode_charge(CODEC, charge) == expected


def test_encode_charge_refuses_more_than_six_decimals_like_codec_encode() -> None:
    charge = RatedCharge("id", ACC, date(2024, 5, 1), date(2024, 6, 1), "AUD", "c", "tou", "", D("1.0000001"), "kWh",
                         D("1"), D("1"), D("1"), "B", 1, "cause", "{}")
    with pytest.raises(ValueError, match="6 decimal places"):
        CODEC.encode(charge)
    with pytest.raises(ValueError, match="6 decimal places"):
        encode_charge(CODEC, charge)


@given(st.decimals(allow_nan=False, allow_infinity=False) | decimals)
@settings(max_examples=500, deadline=None)
def test_decimal_bytes_is_what_fastavro_writes_or_refuses(value: Decimal) -> None:
    state = {"revision": 1, "value": value, "period_key": "rp|A|2024-05-01", "keys": ["B|1|c|"], "demand_keys": [],
             "window_start_ms": 1, "kw": "0", "metric": "m", "window_end_ms": 2, "qualities": ["A"]}
    try:
        expected = CODEC.encode(state, "RatedWindowState")
    except ValueError:
        with pytest.raises(ValueError):
            decimal_bytes(value)
        return
    assert CODEC.encode_plain({**state, "value": decimal_bytes(value)}, "RatedWindowState") == expected


long_names = st.text(st.characters(exclude_categories=("Cs",)), max_size=70)  # ≥ 64 bytes: multi-byte lengths
windows = st.builds(
    UsageWindow, window_id=long_names, account=names, series=long_names, metric=names, unit=names,
    window_start=moments, window_end=moments, revision=st.integers(0, 2**31 - 1),
    timing=st.sampled_from(["ON_TIME", "LATE"]),
    value=decimals | st.decimals(min_value=D("-1e21"), max_value=D("1e21"), places=6), delta=decimals,
    count=st.integers(0, 2**31 - 1), qualities=st.lists(long_names, max_size=4).map(tuple),
    sources=st.lists(long_names, max_size=4).map(tuple), watermark=moments)
mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 400), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 400), st.just(0)),
    st.tuples(st.just("append"), st.integers(0, 255), st.integers(1, 3)),
)


def codec_window(raw: bytes) -> wire.Window:
    """``decode_window``'s general path (``Codec.decode_plain`` and its checks), never the hand reader."""
    return wire._checked(CODEC.decode_plain(raw, "UsageWindow"))


@given(windows, st.lists(mutations, max_size=3))
@settings(max_examples=600, deadline=None)
def test_hand_window_reader_reads_or_refuses_exactly_what_the_codec_does(
        win: UsageWindow, how: list[tuple[str, int, int]]) -> None:
    """Long and multi-byte strings, large values, corrupt, truncated or extended bodies: ``decode_window`` (hand
    reader first) gives the codec's window or its ``DecodeError``."""
    raw = CODEC.encode(win)
    for kind, a, b in how:
        if kind == "flip":
            if len(raw) > 10:  # in the body: the header is checked before any decoding
                i = 10 + a % (len(raw) - 10)
                raw = raw[:i] + bytes([raw[i] ^ b]) + raw[i + 1:]
        elif kind == "cut":
            raw = raw[: a % (len(raw) + 1)]
        else:
            raw = raw + bytes([a]) * b
    try:
        expected = codec_window(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            decode_window(CODEC, raw)
        return
    got = decode_window(CODEC, raw)
    for name in Window.__slots__:
        assert getattr(got, name) == getattr(expected, name), name
        assert str(getattr(got, name)) == str(getattr(expected, name)), name


def test_hand_window_reader_steps_aside_for_another_schema_and_odd_enum_bytes() -> None:
    raw = CODEC.encode(window(utc(2024, 5, 1), "1.5"))
    assert wire._window_header(CODEC) == raw[:10]
    d = CODEC.decode_plain(raw, "UsageWindow")
    late = CODEC.encode_plain({**d, "timing": "LATE"}, "UsageWindow")
    assert decode_window(CODEC, late).timing == "LATE"
    on_time = CODEC.encode_plain({**d, "timing": "ON_TIME"}, "UsageWindow")
    (i,) = [i for i in range(len(late)) if late[i] != on_time[i]]  # the enum's index byte: 2 (LATE) vs 0
    for odd in (0x01, 0x04, 0x06):  # index -1, 2, 3: no such symbol; the hand reader leaves them to the codec
        raw = late[:i] + bytes([odd]) + late[i + 1:]
        with pytest.raises(ValueError, match="Timing"):
            wire._read_window(raw)
        try:
            expected = codec_window(raw).timing
        except DecodeError:
            with pytest.raises(DecodeError):
                decode_window(CODEC, raw)
            continue
        assert decode_window(CODEC, raw).timing == expected  # fastavro reads index -1 as the last symbol


state_lists = st.lists(long_names, max_size=4)


@given(st.integers(-(2**40), 2**40), decimals | st.decimals(allow_nan=False, allow_infinity=False), long_names,
       state_lists, state_lists, st.integers(-(2**63), 2**63 - 1), st.sampled_from(["0", "1.5"]), names,
       st.integers(-(2**63), 2**63 - 1), state_lists)
@settings(max_examples=400, deadline=None)
def test_window_state_writer_is_byte_identical_to_the_codec_or_refuses_like_it(
        revision: int, value: Decimal, period_key: str, keys: list[str], demand_keys: list[str], start: int, kw: str,
        metric: str, end: int, qualities: list[str]) -> None:
    writer = WindowStateWriter(CODEC)
    state = {"revision": revision, "value": value, "period_key": period_key, "keys": keys,
             "demand_keys": demand_keys, "window_start_ms": start, "kw": kw, "metric": metric, "window_end_ms": end,
             "qualities": qualities}
    args = (revision, value, period_key, keys, demand_keys, start, kw, metric, end, qualities)
    try:
        expected = CODEC.encode(state, "RatedWindowState")
    except (ValueError, OverflowError) as exc:
        with pytest.raises(type(exc)):
            writer(*args)
        return
    assert writer(*args) == expected
    assert writer(*args) == expected  # again, from its memos


int32 = st.integers(-(2**31), 2**31 - 1)
any_decimals = decimals | st.decimals(allow_nan=False, allow_infinity=False, places=8) | st.decimals(
    min_value=D("-1e22"), max_value=D("1e22"), places=6)
period_states = st.builds(
    rp.PeriodState, account=long_names, period_start=st.dates(), period_end=st.dates(),
    quantities=st.dictionaries(long_names, any_decimals, max_size=4),
    qualities=st.dictionaries(names, st.lists(names, max_size=3), max_size=2),
    windows=st.dictionaries(long_names, int32 | st.integers(2**31, 2**40), max_size=4),
    emitted=st.dictionaries(long_names, any_decimals, max_size=4),
    demand=st.dictionaries(names, st.dictionaries(names, decimals, max_size=2), max_size=2),
    quality_counts=st.dictionaries(long_names, st.dictionaries(names, int32, max_size=3), max_size=3),
    demand_kwh=st.dictionaries(names, st.dictionaries(long_names, any_decimals, max_size=3), max_size=2),
    format=st.integers(1, 3), days=st.dictionaries(names, int32, max_size=40))


@given(period_states)
@settings(max_examples=400, deadline=None)
def test_period_state_is_written_by_hand_as_the_codec_writes_it_or_left_to_it(ps: rp.PeriodState) -> None:
    """The rating store's ``rp|`` bytes: the hand writer's, when it writes them, are the codec's. When the codec
    refuses a state (a total of more than 6 places, a quantity of more than 28 digits) the hand writer leaves it
    (``None``) and the store's encoder raises the codec's error; a count beyond 32 bits (which fastavro writes as a
    long) it leaves to the codec too."""
    encode, decode = rp.state_codec(CODEC)
    writer = wire.PeriodStateWriter(CODEC)
    try:
        datum = {"account": ps.account, "period_start": ps.period_start, "period_end": ps.period_end,
                 "quantities": {k: v.quantize(rp.QUANTUM) for k, v in ps.quantities.items()},
                 "qualities": ps.qualities, "windows": ps.windows, "emitted": ps.emitted,
                 "demand": {k: {w: str(kw) for w, kw in v.items()} for k, v in ps.demand.items()},
                 "quality_counts": ps.quality_counts,
                 "demand_kwh": {k: {s: v.quantize(rp.QUANTUM) for s, v in m.items()} for k, m in ps.demand_kwh.items()},
                 "format": ps.format, "days": ps.days}
        expected = CODEC.encode(datum, "RatingPeriodState")
    except Exception as exc:  # whatever fastavro raises, the store's encoder raises too
        assert writer(ps) is None
        with pytest.raises(type(exc)):
            encode(b"rp|x", ps)
        return
    counts = [*ps.windows.values(), *ps.days.values(), *(n for m in ps.quality_counts.values() for n in m.values())]
    if all(-(2**31) <= n < 2**31 for n in counts):  # what the stage holds: written by hand
        assert writer(ps) == expected
        assert writer(ps) == expected  # again, from its memos
    else:  # fastavro writes an int beyond 32 bits as a long; the hand writer leaves it to the codec
        assert writer(ps) is None
    assert encode(b"rp|x", ps) == expected
    back = decode(b"rp|x", expected)
    assert (back.account, back.quantities.keys(), back.days) == (ps.account, ps.quantities.keys(), ps.days)


maybe_ms = st.none() | st.integers(-(2**63), 2**63 - 1)
pending_headers = st.fixed_dictionaries({
    "since_clock_ms": st.integers(-(2**63), 2**63 - 1), "watermark_ms": maybe_ms, "arrived_ms": maybe_ms,
    "closed_ms": maybe_ms, "cause_ids": st.none() | st.lists(long_names, max_size=5), "chain": long_names,
    "count": int32 | st.integers(2**31, 2**33),
    "listed_stored": int32,
})
deltas = st.decimals(allow_nan=False, allow_infinity=False, places=6, min_value=-(10**9), max_value=10**9)
day_summaries = st.dictionaries(names, st.tuples(int32, deltas), max_size=12)


def held_period(header: dict[str, Any], count: int) -> Any:
    """A ``_Touched`` with the header's fields and ``count`` causes (its day summaries empty)."""
    digest = rp.CauseDigest(header["cause_ids"], header["chain"], count, {})
    return rp._Touched(0, digest=digest, since_clock_ms=header["since_clock_ms"], watermark_ms=header["watermark_ms"],
                       arrived_ms=header["arrived_ms"], closed_ms=header["closed_ms"],
                       listed_stored=header["listed_stored"])


@given(pending_headers, day_summaries, st.binary(max_size=300), st.lists(long_names, max_size=4))
@settings(max_examples=400, deadline=None)
def test_pending_state_is_written_by_hand_as_the_codec_writes_it(header: dict[str, Any],
                                                                   days: dict[str, tuple[int, Decimal]],
                                                                   window: bytes, keys: list[str]) -> None:
    """The posting policy's ``rq|`` header and ``rqc|`` causes (none, one or two): the hand writer's bytes are the
    codec's; an int beyond 32 bits it leaves to the codec (``None``)."""
    writer = wire.PendingWriter(CODEC)
    touched = held_period(header, header["count"])
    touched.digest.days = {day: rp.DaySummary(n, delta) for day, (n, delta) in days.items()}
    expected = CODEC.encode(rp._pending_datum(touched), "RatingPending")
    if -(2**31) <= header["count"] < 2**31:
        assert writer.of(touched) == expected
    else:
        assert writer.of(touched) is None
    listed = [(window, keys), (window[:7], keys[1:])][:len(keys)]
    assert writer.causes(listed) == CODEC.encode({"causes": [{"window": w, "keys": k} for w, k in listed]},
                                                 "RatingPendingCauses")


@given(pending_headers, st.lists(st.tuples(day_summaries, st.lists(long_names, max_size=3), st.booleans()),
                                  min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_a_held_period_is_written_from_its_attributes_as_the_codec_writes_its_datum(
        header: dict[str, Any], batches: list[tuple[dict[str, tuple[int, Decimal]], list[str], bool]]) -> None:
    """``PendingWriter.of`` (what the store's encoder calls for ``rq|``) reads a ``_Touched`` and its digest as they
    are: its bytes are the codec's for ``_pending_datum`` of the same period, batch after batch (day summaries
    remembered by identity, listed ids growing or their last one replaced), and an equal delta written with more
    places is written as its own text."""
    writer = wire.PendingWriter(CODEC)
    touched = held_period(header, header["count"] % 2**31)
    digest = touched.digest
    for days, new_ids, replace_last in batches:
        for day, (n, delta) in days.items():
            digest.days[day] = rp.DaySummary(n, delta)
        if digest.ids is not None:
            digest.ids.extend(new_ids)  # listed in this batch
            if replace_last and digest.ids:
                digest.ids[-1] = digest.ids[-1] + "x"  # (not what the stage does: the bytes must follow anyway)
        assert writer.of(touched) == CODEC.encode(rp._pending_datum(touched), "RatingPending")
    if digest.days:  # the same value, another exponent: its own text, not the remembered one
        day = next(iter(digest.days))
        before = digest.days[day].delta
        digest.days[day] = rp.DaySummary(digest.days[day].windows, before.quantize(Decimal("0.0000001")))
        expected = CODEC.encode(rp._pending_datum(touched), "RatingPending")
        assert writer.of(touched) == expected and str(digest.days[day].delta) != str(before)


def version(n: int, peak: str = "0.50", **changes: Any) -> PriceBook:
    raw = PROP_BOOK.model_dump(mode="json")
    raw["version"] = n
    for comp in raw["components"]:
        if comp["id"] == "energy":
            comp["bands"][0]["rate"] = peak
        if comp["id"] == "demand":
            comp["rate"] = f"0.4{n}"
    raw.update(changes)
    return PriceBook.model_validate(raw)


class Stage(Harness):
    def __init__(self, books: list[PriceBook]) -> None:
        super().__init__(reference(books))
        self.data = reference(books)
        self.processor = RatingProcessor(TOPICS, CODEC, lambda: self.data)
        self.processor.on_assign(0, self.ctx)

    def raw(self) -> list[bytes]:
        return [v for _t, _k, v in self.ctx.forwarded]


MAY_SLOTS = [utc(2024, 4, 30, 14, 0) + timedelta(hours=7 * i + 0.5 * (i % 3)) for i in range(100)]
SUPERSEDING = {
    "rates": lambda n: version(n, peak=f"0.5{n}"),  # same bands: re-keyed in place
    "bands": lambda n: version(n, peak=f"0.5{n}", components=[
        {**c, "bands": [{**c["bands"][0], "times": [{"day_types": ["weekday"], "start": "15:00", "end": "20:00"}]},
                        *c["bands"][1:]]} if c["id"] == "energy" else c
        for c in PROP_BOOK.model_dump(mode="json")["components"]]),
    "mid_period": lambda n: version(n, peak=f"0.5{n}", effective_from="2024-05-15"),
}


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, Any]]:
    steps: list[tuple[str, Any]] = []
    revisions: dict[int, int] = {}
    for _ in range(draw(st.integers(3, 14))):
        kind = draw(st.sampled_from(["windows", "windows", "publish"]))
        if kind == "publish":
            steps.append(("publish", draw(st.sampled_from(sorted(SUPERSEDING)))))
            continue
        batch = []
        for slot in draw(st.lists(st.integers(0, len(MAY_SLOTS) - 1), min_size=1, max_size=6)):
            rev = revisions.get(slot, -1) + 1
            revisions[slot] = rev
            batch.append((slot, rev, draw(st.decimals(min_value=0, max_value=9, places=3))))
        steps.append(("windows", batch))
    return steps


def run(history: list[tuple[str, Any]], fast: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[list[bytes], int]:
    monkeypatch.setattr(rp, "_rekey_period", rp._rekey_period if fast else lambda *a: False)
    books = [PROP_BOOK]
    stage = Stage(books)
    values: dict[int, Decimal] = {}
    for kind, arg in history:
        if kind == "publish":
            books = [*books, SUPERSEDING[arg](len(books) + 1)]
            stage.data = reference(books)
        else:
            for slot, rev, value in arg:
                stage.feed(window(MAY_SLOTS[slot], value, rev, values.get(slot, "0")))
                values[slot] = value
        stage.flush()
    aliases = sum(1 for k, _v in stage.ctx.store(0).scan(rp.REKEY_PREFIX))
    monkeypatch.undo()
    return stage.raw(), aliases


@given(histories())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_rekeying_a_period_emits_what_rebuilding_it_from_its_windows_emits(
        monkeypatch: pytest.MonkeyPatch, history: list[tuple[str, Any]]) -> None:
    fast, _ = run(history, True, monkeypatch)
    slow, none = run(history, False, monkeypatch)
    assert none == 0
    assert fast == slow


def test_rates_only_versions_are_rekeyed_in_place_and_later_revisions_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    history: list[tuple[str, Any]] = [
        ("windows", [(0, 0, D("1.5")), (5, 0, D("2.25")), (40, 0, D("3"))]),
        ("publish", "rates"),
        ("windows", [(5, 1, D("4")), (41, 0, D("1"))]),
        ("publish", "rates"),
        ("windows", [(0, 1, D("0.5")), (5, 2, D("0")), (41, 1, D("2"))]),
        ("publish", "bands"),
        ("windows", [(40, 1, D("7"))]),
    ]
    for cut in range(1, len(history) + 1):
        fast, _ = run(history[:cut], True, monkeypatch)
        slow, _ = run(history[:cut], False, monkeypatch)
        assert fast == slow, cut
    _, aliases = run(history[:5], True, monkeypatch)
    assert aliases == 1  # the May period re-keyed v1 → v2 → v3 in place
    _, aliases = run(history, True, monkeypatch)
    assert aliases == 0  # a version that moves band times rebuilds the period from its windows (aliases dropped)
    charges = [CODEC.decode(v, RatedCharge) for v in run(history[:2], True, monkeypatch)[0]]
    assert charges[-1].cause == "pricebook:PROP:v2"
    assert rp.key_structure(version(2, peak="0.99")) == rp.key_structure(PROP_BOOK)
    assert rp.key_structure(SUPERSEDING["bands"](2)) != rp.key_structure(PROP_BOOK)


def test_period_writer_memos_never_stand_in_for_a_value_the_codec_refuses() -> None:
    """One writer across states: an emitted total equal to one it wrote before but of 7 places (which the codec
    refuses) is not written from the memo; a quantity given as an ``int`` equal to a remembered ``Decimal`` is not
    either (the codec decides both)."""
    writer = wire.PeriodStateWriter(CODEC)
    first = rp.PeriodState("A", date(2025, 3, 1), date(2025, 4, 1), quantities={"k": Decimal("5")},
                           emitted={"line": Decimal("1.000000")})
    assert writer(first) == rp.state_codec(CODEC)[0](b"rp|x", first)
    seven = rp.PeriodState("A", date(2025, 3, 1), date(2025, 4, 1), quantities={"k": Decimal("5")},
                           emitted={"line": Decimal("1.0000000")})
    assert writer(seven) is None
    with pytest.raises(ValueError):
        CODEC.encode({"account": "A", "period_start": date(2025, 3, 1), "period_end": date(2025, 4, 1),
                      "quantities": {}, "qualities": {}, "windows": {}, "emitted": {"line": Decimal("1.0000000")},
                      "demand": {}, "quality_counts": {}, "demand_kwh": {}, "format": 3, "days": {}},
                     "RatingPeriodState")
    as_int = rp.PeriodState("A", date(2025, 3, 1), date(2025, 4, 1), quantities={"k": 5})  # type: ignore[dict-item]
    assert writer(as_int) is None
    again = rp.PeriodState("A", date(2025, 3, 1), date(2025, 4, 1), quantities={"k": Decimal("5.0")},
                           emitted={"line": Decimal("1.000000")})
    assert writer(again) == writer(first)  # equal values: the same bytes, from the memos


explanation_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12)


@given(st.dictionaries(st.text(max_size=10).filter(lambda k: k != "windows"), explanation_values, max_size=6),
       st.lists(st.tuples(st.text(max_size=20), st.integers(0, 9), st.sampled_from(["ON_TIME", "LATE"]),
                          decimals, st.lists(st.text(max_size=4), max_size=2)), max_size=5),
       st.booleans())
@settings(max_examples=300, deadline=None)
def test_explanation_json_is_json_dumps_of_the_whole_explanation(base: dict[str, Any], causes: list[Any],
                                                                 collide: bool) -> None:
    """A line's explanation text with each window entry serialized once per posting and spliced in is exactly
    ``json.dumps(explanation, sort_keys=True)``, also when another string of the explanation holds the slot."""
    if collide:
        base["note"] = rp._WINDOWS_SLOT
    wins = []
    for window_id, revision, timing, value, flags in causes:
        w = object.__new__(wire.Window)
        w.window_id, w.revision, w.timing, w.value, w.delta = window_id, revision, timing, value, value
        w.qualities, w.sources, w.metric = tuple(flags), ("src",), "energy_import"
        wins.append(w)
    book = PROP_BOOK
    ref = reference([PROP_BOOK])
    expected = json.dumps({**base, "windows": [
        {"window_id": w.window_id, "revision": w.revision, "timing": w.timing, "value": str(w.value),
         "delta": str(w.delta), "qualities": list(w.qualities), "sources": list(w.sources)} for w in wins]},
        sort_keys=True)
    memo: dict[tuple[int, str, int], str] = {}
    for _ in range(2):  # the second time from the memo
        got = rp._explanation_json({**base, "windows": rp._WINDOWS_SLOT}, wins, book, ref, memo)
        assert got == expected
