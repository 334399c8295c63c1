"""The strict NEM13 reader against the real MDFF example files (tests/data/nem13), the even daily spread,
and the spread readings through ingest, windowing and rating in memory (flat Home tariff, to the cent)."""

from __future__ import annotations

import io
import json
import zipfile
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.ingest.nem12 import read_nem12
from pipeline.ingest.nem13 import REASONS, SPREAD_MARK, Nem13Error, parse_nem13, read_nem13, spread_evenly
from pipeline.ingest.processor import IngestProcessor, to_usage_event
from pipeline.rating.processor import RatingProcessor
from pipeline.records import RatedCharge
from pipeline.reference import BUNDLED_REFERENCE, ReferenceData, ReferenceFile
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import FakeContext
from pipeline.topology import Topics
from pipeline.windowing.processor import WindowingProcessor, policies_from_settings

DATA = Path(__file__).resolve().parents[1] / "data"
NEM13 = sorted((DATA / "nem13").glob("*.zip"))
INCONSISTENT = "NEM13#000000000000011#CNRGYMDP#NEMMCO.zip"  # Quantity 31 but registers 38841 -> 39013
REF = ReferenceData.from_file(ReferenceFile.read(BUNDLED_REFERENCE))
NEM = timedelta(hours=10)


def _raw_csv(zip_path: Path) -> tuple[str, str]:
    with zipfile.ZipFile(zip_path) as zf:
        (member,) = zf.namelist()
        return member, zf.read(member).decode("ascii")


def _register_records(text: str) -> list[tuple[int, list[str]]]:
    """(line, fields) of every 250 record, read independently of the module under test."""
    return [(n, line.split(",")) for n, line in enumerate(text.splitlines(), 1) if line.startswith("250,")]


def _advance(prev: str, cur: str) -> Decimal:
    """current − previous; a lower current read wrapped at 10**digits (the register's width in the file)."""
    p, c = Decimal(prev), Decimal(cur)
    return c - p if c >= p else Decimal(10) ** max(len(prev), len(cur)) - p + c


def _nem_date(text14: str) -> date:
    return date(int(text14[:4]), int(text14[4:6]), int(text14[6:8]))


# --- the real files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", NEM13, ids=lambda p: p.name)
def test_every_real_file_is_read_or_rejected_for_a_stated_reason(path: Path):
    member, text = _raw_csv(path)
    if path.name == INCONSISTENT:
        with pytest.raises(Nem13Error) as caught:
            read_nem13(path)
        err = caught.value
        assert (err.reason, err.line, err.file) == ("QUANTITY_MISMATCH", 2, f"{path.name}!{member}")
        assert "says Quantity 31 KWH but the register advanced 172 (38841 -> 39013)" in str(err)
        return
    nem = read_nem13(path)
    records = _register_records(text)
    assert [r.line for r in nem.reads] == [n for n, _ in records]
    for read, (line, f) in zip(nem.reads, records, strict=True):
        advance = _advance(f[8], f[13])
        assert abs(Decimal(f[18])) == advance  # the file's Quantity agrees with its registers
        first, end = _nem_date(f[9]), _nem_date(f[14])
        days = max((end - first).days, 1)
        assert (read.nmi, read.register_suffix, read.direction, read.advance) == (f[1], f[4], f[7], advance)
        assert len(read.readings) == len(read.days) == days
        assert read.days[0] == first and read.days[-1] == first + timedelta(days=days - 1)
        assert sum(r.value for r in read.readings) == advance  # exactly, not approximately
        starts = [r.interval_start for r in read.readings]
        assert starts[0] == datetime(first.year, first.month, first.day, tzinfo=UTC) - NEM
        assert all(r.interval_end - r.interval_start == timedelta(days=1) for r in read.readings)
        assert all(b - a == timedelta(days=1) for a, b in pairwise(starts))
        assert {r.suffix for r in read.readings} == {("E" if f[7] == "E" else "B") + f[4]}
        assert {r.uom for r in read.readings} == {"kWh"}
        assert {r.source_record for r in read.readings} == {line}
        assert {r.source_file for r in read.readings} == {
            f"{SPREAD_MARK} {f[8]}->{f[13]} = {advance} kWh spread evenly over {days} days: {path.name}!{member}"}
    assert nem.readings == tuple(r for read in nem.reads for r in read.readings)


def test_register_roll_over_99890_to_02034_is_2144_kwh():
    (read,) = read_nem13(DATA / "nem13" / "NEM13#000000000000013#CNRGYMDP#NEMMCO.zip").reads
    assert (read.previous_read, read.current_read, read.advance) == (Decimal(99890), Decimal(2034), Decimal(2144))
    assert len(read.days) == 92  # 2004-11-17 .. 2005-02-16
    assert read.readings[0].value == Decimal("23.304347")
    assert read.readings[-1].value == Decimal("2144") - 91 * Decimal("23.304347") == Decimal("23.304423")


def test_an_import_register_with_negative_quantity_is_generation_on_a_b_channel():
    (read,) = read_nem13(DATA / "nem13" / "NEM13#000000000000012#CNRGYMDP#NEMMCO.zip").reads
    assert (read.direction, read.advance) == ("I", Decimal(1490))
    assert {r.suffix for r in read.readings} == {"B12"}
    event = to_usage_event(read.readings[0], REF)
    assert (event.metric, event.account) == ("energy_export", "ACC-1045")


def test_quality_is_actual_only_when_both_reads_are_actual():
    reads = read_nem13(DATA / "nem13" / "NEM13#000000000000018#CNRGYMDP#NEMMCO.zip").reads
    # A->A, A->A, A->S62 (reason 4), A->S62, S62->E62, S62->E62
    assert [(r.quality, r.reason_code) for r in reads] == [
        ("A", None), ("A", None), ("S", "4"), ("S", "4"), ("E", None), ("E", None)]
    assert all(x.quality == r.quality and x.reason_code == r.reason_code for r in reads for x in r.readings)


def test_version_is_the_update_datetime_in_utc():
    (read,) = read_nem13(DATA / "nem13" / "NEM13#000000000000014#CNRGYMDP#NEMMCO.zip").reads
    assert (read.version, read.version_source) == (datetime(2004, 11, 18, 7, 51, 26, tzinfo=UTC), "UpdateDateTime")
    assert {r.version for r in read.readings} == {read.version}


def test_nem12_files_are_not_nem13():
    with pytest.raises(Nem13Error) as caught:
        read_nem13(next((DATA / "nem12").glob("*.zip")))
    assert caught.value.reason == "NOT_NEM13" and "'NEM12'" in str(caught.value)


def test_spread_readings_become_usage_events_of_the_right_account_and_carry_the_mark():
    nem = read_nem13(DATA / "nem13" / "NEM13#000000000000015#CNRGYMDP#NEMMCO.zip")
    events = [to_usage_event(r, REF) for r in nem.readings]
    assert {(e.account, e.metric, e.unit) for e in events} == {("ACC-1049", "energy_import", "kWh")}
    assert {e.series for e in events} == {"NEM1315082/E41", "NEM1315082/E11"}
    assert len({e.event_id for e in events}) == len(events)  # one identity per register and day
    assert all(e.source.startswith(SPREAD_MARK) and e.source.endswith(f"#{r.source_record}")
               for e, r in zip(events, nem.readings, strict=True))
    assert sum(e.value for e in events) == 431 + 3 + 604 + 1


# --- the even spread ----------------------------------------------------------------------------------------
@given(total=st.decimals(min_value=-10**9, max_value=10**9, places=6, allow_nan=False, allow_infinity=False),
       days=st.integers(min_value=1, max_value=800))
def test_spread_sums_exactly_and_puts_the_remainder_on_the_last_day(total: Decimal, days: int):
    parts = spread_evenly(total, days)
    assert len(parts) == days
    assert sum(parts, Decimal(0)) == total
    assert len(set(parts[:-1])) <= 1
    sign = -1 if total < 0 else 1  # a correction spreads toward zero the same way
    assert all(p == p.quantize(Decimal("0.000001")) and sign * p >= 0 for p in parts)
    assert Decimal(0) <= sign * (parts[-1] - parts[0]) < days * Decimal("0.000001")


def test_spread_refuses_what_it_cannot_split_exactly():
    with pytest.raises(ValueError, match="days must be >= 1"):
        spread_evenly(Decimal(1), 0)
    with pytest.raises(ValueError, match="at most 6 decimal places"):
        spread_evenly(Decimal("0.0000001"), 1)
    assert spread_evenly(Decimal(-10), 3) == (Decimal("-3.333333"), Decimal("-3.333333"), Decimal("-3.333334"))


# --- structural rules on a small valid file -------------------------------------------------------------------
GOOD = [
    "100,NEM13,202401021200,MDP1,RET1",
    "250,NMI0000001,1141,1,11,11,M1,E,000100,20240101093000,A,,,000131,20240201080000,A,,,31,KWH,20240301,"
    "20240202031500,",
    "550,N,,A,",
    "250,NMI0000001,1141,1,11,11,M1,E,000131,20240201080000,A,,,000140,20240215080000,E52,,,9,KWH,,"
    "20240216031500,20240216041500",
    "900",
]


def parse_lines(lines: list[str], name: str = "test.csv"):
    return parse_nem13("\r\n".join(lines).encode(), name)


def rejected(lines: list[str]) -> Nem13Error:
    with pytest.raises(Nem13Error) as caught:
        parse_lines(lines)
    return caught.value


def test_good_file():
    nem = parse_lines(GOOD)
    first, second = nem.reads
    assert (first.days[0], first.days[-1], len(first.days)) == (date(2024, 1, 1), date(2024, 1, 31), 31)
    assert {r.value for r in first.readings} == {Decimal(1)}
    assert (second.days[0], second.days[-1], second.quality) == (date(2024, 2, 1), date(2024, 2, 14), "E")
    assert second.readings[-1].value == Decimal(9) - 13 * Decimal("0.642857")
    assert second.version_source == "UpdateDateTime"
    assert nem.created == datetime(2024, 1, 2, 2, 0, tzinfo=UTC)


def test_both_reads_on_one_day_spread_over_that_day():
    line = GOOD[1].replace("20240201080000", "20240101170000")
    (read,) = parse_lines([GOOD[0], line, "900"]).reads
    assert read.days == (date(2024, 1, 1),) and read.readings[0].value == Decimal(31)


def test_import_register_with_positive_quantity_is_accepted():
    (read,) = parse_lines([GOOD[0], GOOD[1].replace(",M1,E,", ",M1,I,"), "900"]).reads
    assert (read.direction, read.readings[0].suffix) == ("I", "B11")


def test_a_reactive_register_spreads_on_a_q_channel():
    (read,) = parse_lines([GOOD[0], GOOD[1].replace(",KWH,", ",kvarh,"), "900"]).reads
    assert (read.uom, read.readings[0].suffix) == ("kVArh", "Q11")


def test_a_bad_member_rejects_the_whole_zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.csv", "\r\n".join(GOOD))
        zf.writestr("b.csv", "\r\n".join(GOOD[:-1]))
    with pytest.raises(Nem13Error) as caught:
        parse_nem13(buf.getvalue(), "two.zip")
    assert (caught.value.reason, caught.value.file) == ("MISSING_END_RECORD", "two.zip!b.csv")


def _sub(i: int, old: str, new: str):
    def edit(ls: list[str]) -> list[str]:
        assert old in ls[i], (old, ls[i])
        return [*ls[:i], ls[i].replace(old, new, 1), *ls[i + 1:]]
    return edit


STRUCTURAL = [
    (lambda ls: ls[:-1], "MISSING_END_RECORD", None, "no 900 end-of-data record"),
    (lambda ls: [*ls, GOOD[1]], "RECORD_AFTER_END", 6, "after the 900"),
    (lambda ls: [ls[0], ls[2], *ls[1:2], *ls[3:]], "OUT_OF_ORDER", 2, "550 record not directly after a 250"),
    (lambda ls: [ls[0], "200,NMI0000001,E1,1,E1,N1,M1,kWh,30,", *ls[1:]], "UNKNOWN_RECORD", 2, "'200'"),
    (lambda ls: [ls[1], *ls], "MISSING_HEADER", 1, "not the 100 header"),
    (lambda ls: [ls[0], ls[0], *ls[1:]], "BAD_HEADER", 2, "second 100 header"),
    (_sub(0, "NEM13", "NEM12"), "NOT_NEM13", 1, "'NEM12'"),
    (_sub(0, "202401021200", "202402301200"), "BAD_DATE", 1, "100 header DateTime '202402301200'"),
    (_sub(1, "20240202031500,", "20240202031500,,x"), "BAD_RECORD", 2, "250 record has 24 fields, expected 23"),
    (_sub(2, "550,N,,A,", "550,N,A"), "BAD_RECORD", 3, "550 record has 3 fields"),
    (_sub(1, "NMI0000001", "NMI-1"), "BAD_NMI", 2, "'NMI-1'"),
    (_sub(1, ",1,11,11,", ",1,1,11,"), "BAD_SUFFIX", 2, "NMISuffix '1'"),
    (_sub(1, ",1,11,11,", ",1,21,11,"), "BAD_SUFFIX", 2, "NMISuffix 21 is not one of the suffixes in "
                                                       "NMIConfiguration '1141'"),
    (_sub(1, ",M1,E,", ",M1,X,"), "BAD_DIRECTION", 2, "DirectionIndicator 'X'"),
    (_sub(1, ",KWH,", ",KWHH,"), "BAD_UOM", 2, "'KWHH'"),
    (_sub(1, ",KWH,", ",kW,"), "UNSUPPORTED_UOM", 2, "unit of measure 'kW': only energy registers"),
    (_sub(1, ",000131,", ",00013x,"), "BAD_REGISTER_READ", 2, "CurrentRegisterRead '00013x'"),
    (_sub(1, ",000100,", ",-100,"), "BAD_REGISTER_READ", 2, "PreviousRegisterRead '-100'"),
    (_sub(1, ",000131,", ",1234567890123456,"), "BAD_REGISTER_READ", 2, "(at most 15 digits)"),
    (_sub(1, ",31,KWH,", ",3e1,KWH,"), "BAD_QUANTITY", 2, "Quantity '3e1'"),
    (_sub(1, ",31,KWH,", ",31.0000001,KWH,"), "BAD_QUANTITY", 2, "more than 6 decimal places"),
    (_sub(1, ",31,KWH,", ",32,KWH,"), "QUANTITY_MISMATCH", 2, "says Quantity 32 KWH but the register advanced 31"),
    (_sub(1, ",31,KWH,", ",-31,KWH,"), "QUANTITY_MISMATCH", 2, "says Quantity -31"),
    (_sub(1, ",000131,20240201080000,A,", ",000099,20240201080000,A,"), "QUANTITY_MISMATCH", 2,
     "the register advanced 999999 (000100 -> 000099, rolled over)"),
    (_sub(1, ",A,,,000131,", ",X,,,000131,"), "BAD_QUALITY", 2, "PreviousQualityMethod 'X'"),
    (_sub(3, ",E52,", ",V,"), "BAD_QUALITY", 4, "CurrentQualityMethod 'V'"),
    (_sub(3, ",E52,,,", ",E52,x,,"), "BAD_REASON_CODE", 4, "CurrentReasonCode 'x'"),
    (_sub(1, "20240101093000", "20240132093000"), "BAD_DATE", 2, "PreviousRegisterReadDateTime '20240132093000'"),
    (_sub(1, ",20240301,", ",2024030,"), "BAD_DATE", 2, "NextScheduledReadDate '2024030'"),
    (_sub(3, "20240216041500", "2024021604"), "BAD_DATE", 4, "MSATSLoadDateTime '2024021604'"),
    (_sub(1, "20240201080000", "20240101093000"), "BAD_READ_PERIOD", 2, "is not after the previous read"),
    (_sub(3, ",000131,20240201080000,A,", ",000131,20240131080000,A,"), "OVERLAPPING_READS", 4,
     "read period 2024-01-31..2024-02-14 shares days with the read period 2024-01-01..2024-01-31 on line 2"),
    (lambda ls: [ls[0], ls[-1]], "NO_DATA", None, "no 250 basic meter data records"),
]


@pytest.mark.parametrize(("edit", "reason", "line", "text"), STRUCTURAL,
                         ids=[f"{r}-{i}" for i, (_e, r, _l, _t) in enumerate(STRUCTURAL)])
def test_structural_rules(edit, reason, line, text):
    err = rejected(edit(list(GOOD)))
    assert (err.reason, err.line) == (reason, line), str(err)
    assert text in str(err)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "EMPTY_FILE"), (b"\r\n\r\n", "EMPTY_FILE"), (b"PK\x03\x04broken", "BAD_ZIP"),
    ("\r\n".join(GOOD).encode().replace(b"MDP1", b"MDP\xff"), "BAD_ENCODING"),
])
def test_whole_file_problems(data: bytes, reason: str):
    with pytest.raises(Nem13Error) as caught:
        parse_nem13(data, "x.csv")
    assert caught.value.reason == reason


def test_every_reason_is_exercised():
    covered = {r for _e, r, _l, _t in STRUCTURAL} | {"EMPTY_FILE", "BAD_ZIP", "BAD_ENCODING"}
    assert covered == set(REASONS)


def test_error_is_a_value_error_and_pickles():
    import pickle

    err = rejected(GOOD[:-1])
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.file, again.line, again.reason, str(again)) == (err.file, err.line, err.reason, str(err))


# --- through the processors in memory: the flat Home tariff bills the register advance --------------------------
def _incoming(topic: str, offset: int, value: bytes) -> Incoming:
    return Incoming(topic, 0, offset, b"k", value, (), 0)


def test_spread_readings_bill_to_the_cent_on_the_flat_home_tariff():
    path = DATA / "nem13" / "NEM13#000000000000015#CNRGYMDP#NEMMCO.zip"
    settings = Settings(idle_timeout_s=1)
    topics, codec = Topics(settings), default_codec()
    clock = [0]
    ingest = IngestProcessor(topics, codec, lambda: REF)
    windowing = WindowingProcessor(topics, codec, policies_from_settings(settings), clock_ms=lambda: clock[0])
    rating = RatingProcessor(topics, codec, lambda: REF)
    ictx, wctx, rctx = FakeContext(), FakeContext(), FakeContext()
    for i, r in enumerate(read_nem13(path).readings):
        ingest.process(_incoming(topics.meter_readings, i, codec.encode(r)), ictx)
    windowing.on_assign(0, wctx)
    for i, (_t, _k, v) in enumerate(ictx.forwarded):
        windowing.process(_incoming(topics.usage_events, i, v), wctx)
    clock[0] = 2_000_000_000_000
    windowing.punctuate(clock[0], wctx)
    windowing.punctuate(clock[0] + 2000, wctx)
    rating.on_assign(0, rctx)
    for i, (t, _k, v) in enumerate(wctx.forwarded):
        if t == topics.usage_windows:
            rating.process(_incoming(t, i, v), rctx)
    rating.punctuate(0, rctx)
    charges = [codec.decode(v, RatedCharge) for _t, _k, v in rctx.forwarded]
    energy: dict[date, tuple[Decimal, Decimal]] = {}
    for c in charges:  # the last line of a period carries the period's quantity and total
        if c.component_id == "energy":
            energy[c.period_start] = (c.quantity, c.period_total)
    assert {c.price_book_id for c in charges} == {"ACTEWAGL-HOME"}

    # independently, from the CSV: each register's advance, day by day (remainder on the last day), per month
    _member, text = _raw_csv(path)
    per_month: dict[date, Decimal] = defaultdict(Decimal)
    for _line, f in _register_records(text):
        advance, first = _advance(f[8], f[13]), _nem_date(f[9])
        days = (_nem_date(f[14]) - first).days
        daily = (advance / days).quantize(Decimal("0.000001"), rounding=ROUND_DOWN)
        for i in range(days):
            day = first + timedelta(days=i)
            per_month[day.replace(day=1)] += daily if i < days - 1 else advance - daily * (days - 1)
    rate = Decimal("0.255379")
    assert energy == {m: (q, (q * rate).quantize(Decimal("0.01"), ROUND_HALF_UP)) for m, q in per_month.items()}
    assert sum(q for q, _ in energy.values()) == 431 + 3 + 604 + 1
    # every energy line says where its kWh came from: spread NEM13 register reads
    sources = {s for c in charges if c.component_id == "energy"
               for w in json.loads(c.explanation)["windows"] for s in w["sources"]}
    assert sources and all(s.startswith(SPREAD_MARK) for s in sources)


def test_nem12_reader_still_rejects_nem13_files():
    from pipeline.ingest.nem12 import Nem12Error

    with pytest.raises(Nem12Error):
        read_nem12(NEM13[0])


# --- issue 14: a register that goes down is a correction, not a roll-over ------------------------------------------
REAL = DATA / "nem13" / "NEM13#000000000000015#CNRGYMDP#NEMMCO.zip"  # NEM1315082: registers 41 and 11
# after the real file's estimated read 06858 -> 07462 (E62, 2004-09-19), the actual read on 2004-10-20 finds the
# register at 07452: the estimate was at least 10 kWh too high, and the MDP sends the read with Quantity -10
CORRECTION = ("250,NEM1315082,1141,1,41,41,15082,E,07462,20040919000000,E62,,,07452,20041020093000,A,,,-10,KWH,"
              "20050519,20041021103616,")


def _edited(path: Path, edit) -> tuple[bytes, str]:
    """The real file's CSV with ``edit(lines)`` applied, and the member's name."""
    member, text = _raw_csv(path)
    lines = text.splitlines()
    edit(lines)
    return "\r\n".join(lines).encode(), member


def test_a_register_that_went_down_with_a_negative_quantity_is_a_correction_not_a_rollover():
    data, member = _edited(REAL, lambda ls: ls.insert(len(ls) - 1, CORRECTION))
    nem = parse_nem13(data, member)  # before issue 14: QUANTITY_MISMATCH, read as a 99,990 kWh roll-over
    *real, correction = nem.reads
    assert [r.correction for r in real] == [False] * 4 and all(not x.correction for r in real for x in r.readings)
    assert (correction.advance, correction.consumption, correction.correction) == (Decimal(-10), Decimal(-10), True)
    days = correction.days
    assert (days[0], days[-1], len(days)) == (date(2004, 9, 19), date(2004, 10, 19), 31)
    values = [r.value for r in correction.readings]
    assert values[:-1] == [Decimal("-0.322580")] * 30 and values[-1] == Decimal("-0.322600")
    assert sum(values) == Decimal(-10)  # a credit of exactly the correction, within its own read period
    # quality: the previous read (the E62 estimate the correction undoes) is not actual
    assert all(r.correction and r.suffix == "E41" and r.quality == "E" for r in correction.readings)
    assert correction.readings[0].source_file == (
        "NEM13 accumulation 07462->07452 = -10 kWh (a correction: the register went down, credited) spread evenly "
        f"over 31 days: {member}")
    from pipeline.ingest.nem13 import is_register_correction

    assert all(is_register_correction(r) for r in correction.readings)
    assert not any(is_register_correction(r) for r in real[0].readings)


@pytest.mark.parametrize(("direction", "quantity", "accepted"), [
    ("E", "-10", True), ("E", "10", False), ("E", "99990", True),  # 99990: the roll-over reading of 07462 -> 07452
    ("I", "-10", True), ("I", "10", True),  # generation: either sign convention
    ("E", "-11", False), ("E", "-9.5", True),  # whole-number dials: within 1 kWh of the registers
])
def test_which_reading_of_a_lower_register_the_quantity_agrees_with(direction: str, quantity: str, accepted: bool):
    line = CORRECTION.replace(",E,07462,", f",{direction},07462,").replace(",-10,KWH,", f",{quantity},KWH,")
    data, member = _edited(REAL, lambda ls: ls.insert(len(ls) - 1, line))
    if not accepted:
        with pytest.raises(Nem13Error) as caught:
            parse_nem13(data, member)
        assert caught.value.reason == "QUANTITY_MISMATCH"
        assert (f"says Quantity {quantity} KWH but the register advanced 99990 (07462 -> 07452, rolled over) or, read "
                "as a correction, -10; they must agree within the register's resolution 1 kWh") in caught.value.problem
        return
    read = parse_nem13(data, member).reads[-1]
    rollover = quantity == "99990"
    assert read.correction is not rollover
    assert read.consumption == (Decimal(99990) if rollover else -abs(Decimal(quantity)))
    assert read.readings[0].suffix == ("E41" if direction == "E" else "B41")


# --- issue 14: Quantity against the registers: the Quantity wins within the registers' resolution ------------------
def _first_quantity(quantity: str, previous: str = "06427", current: str = "06858"):
    def edit(lines: list[str]) -> None:
        i = next(i for i, ln in enumerate(lines) if ln.startswith("250,"))
        lines[i] = lines[i].replace(",06427,", f",{previous},").replace(",06858,", f",{current},") \
            .replace(",431,KWH,", f",{quantity},KWH,")
    return _edited(REAL, edit)


def test_a_quantity_within_the_registers_resolution_is_billed_and_the_difference_named():
    """The real shape of the refused file: whole-number registers advanced 431 (06427 -> 06858), Quantity
    431.294. The Quantity is the metered consumption (the dials are rounded): billed, the difference noted."""
    data, member = _first_quantity("431.294")  # before issue 14: QUANTITY_MISMATCH
    read = parse_nem13(data, member).reads[0]
    assert (read.advance, read.consumption, read.resolution, read.correction) == (
        Decimal(431), Decimal("431.294"), Decimal(1), False)
    assert sum(r.value for r in read.readings) == Decimal("431.294")
    assert read.readings[0].source_file == (
        "NEM13 accumulation 06427->06858 = 431.294 kWh (the Quantity; the registers advanced 431, 0.294 less, within "
        f"their resolution 1) spread evenly over 55 days: {member}")
    lower = parse_nem13(*_first_quantity("430.2")).reads[0]
    assert lower.consumption == Decimal("430.2") and "430.2 kWh (the Quantity; the registers advanced 431, 0.8 more" \
        in lower.readings[0].source_file


@pytest.mark.parametrize(("quantity", "previous", "current", "resolution"), [
    ("432", "06427", "06858", "1"), ("432.5", "06427", "06858", "1"), ("429.9", "06427", "06858", "1"),
    ("431.3", "06427.5", "06858.7", "0.1"),  # one decimal on the dials: 0.1 kWh
    ("431.3", "06427.5", "06858.70", "0.1"),  # the coarser read decides
])
def test_a_quantity_beyond_the_registers_resolution_refuses_the_file_with_the_numbers(quantity, previous, current,
                                                                                      resolution):
    with pytest.raises(Nem13Error) as caught:
        parse_nem13(*_first_quantity(quantity, previous, current))
    err = caught.value
    advance = Decimal(current) - Decimal(previous)
    assert (err.reason, err.line) == ("QUANTITY_MISMATCH", 2)
    assert err.problem == (f"250 record for NEM1315082/41 says Quantity {quantity} KWH but the register advanced "
                           f"{advance} ({previous} -> {current}); they must agree within the register's resolution "
                           f"{resolution} kWh (the reads' last decimal place)")


def test_decimal_dials_accept_a_quantity_within_their_last_place():
    read = parse_nem13(*_first_quantity("431.25", "06427.5", "06858.7")).reads[0]
    assert (read.advance, read.consumption, read.resolution) == (Decimal("431.2"), Decimal("431.25"), Decimal("0.1"))


# --- issue 14: a correction is a credit on the bill -----------------------------------------------------------------
def test_a_correction_is_a_credit_on_the_flat_home_tariff_to_the_cent():
    """The corrected file through ingest's mapping, windowing and rating in memory: the correction days
    (``nem13.is_register_correction``) are accepted by ingest and billed as a credit in their own read period."""
    data, member = _edited(REAL, lambda ls: ls.insert(len(ls) - 1, CORRECTION))
    readings = parse_nem13(data, member).readings
    settings = Settings(idle_timeout_s=1)
    topics, codec = Topics(settings), default_codec()
    clock = [0]
    windowing = WindowingProcessor(topics, codec, policies_from_settings(settings), clock_ms=lambda: clock[0])
    rating = RatingProcessor(topics, codec, lambda: REF)
    wctx, rctx = FakeContext(), FakeContext()
    windowing.on_assign(0, wctx)
    for i, r in enumerate(readings):
        windowing.process(_incoming(topics.usage_events, i, codec.encode(to_usage_event(r, REF))), wctx)
    clock[0] = 2_000_000_000_000
    windowing.punctuate(clock[0], wctx)
    windowing.punctuate(clock[0] + 2000, wctx)
    rating.on_assign(0, rctx)
    for i, (t, _k, v) in enumerate(wctx.forwarded):
        if t == topics.usage_windows:
            rating.process(_incoming(t, i, v), rctx)
    rating.punctuate(0, rctx)
    charges = [codec.decode(v, RatedCharge) for _t, _k, v in rctx.forwarded]
    energy = {c.period_start: (c.quantity, c.period_total) for c in charges if c.component_id == "energy"}
    # by hand: October holds 19 of the correction's days only (the 604 kWh estimate ran 2004-06-09 .. 09-18):
    # -0.322580 × 18 - 0.322600 = -6.129040 kWh × 0.255379 = -1.5652... → a credit of 1.57
    assert energy[date(2004, 10, 1)] == (Decimal("-6.129040"), Decimal("-1.57"))
    # every month: the days of every read (both registers, the correction included), × the flat rate
    rate, per_month = Decimal("0.255379"), defaultdict(Decimal)
    for r in readings:
        per_month[(r.interval_start + NEM).date().replace(day=1)] += r.value
    assert energy == {m: (q, (q * rate).quantize(Decimal("0.01"), ROUND_HALF_UP)) for m, q in per_month.items()}
    assert sum(q for q, _t in energy.values()) == 431 + 3 + 604 + 1 - 10
    october_lines = [c for c in charges if c.period_start == date(2004, 10, 1) and c.component_id == "energy"]
    assert all(json.loads(c.explanation)["windows"] for c in october_lines)
    assert any("a correction: the register went down, credited" in s for c in october_lines
               for w in json.loads(c.explanation)["windows"] for s in w["sources"])


def test_ingest_accepts_nem13_register_corrections():
    from pipeline.ingest.processor import RejectedReading

    data, member = _edited(REAL, lambda ls: ls.insert(len(ls) - 1, CORRECTION))
    day = parse_nem13(data, member).readings[-1]
    assert to_usage_event(day, REF).value == Decimal("-0.322600")
    # interval data keeps its rule: a negative NEM12-style half hour is bad input, flag or not
    from dataclasses import replace

    half_hour = replace(day, interval_end=day.interval_start + timedelta(minutes=30), source_file="x.csv")
    for forged in (half_hour, replace(half_hour, correction=False), replace(day, correction=False)):
        with pytest.raises(RejectedReading, match="negative"):
            to_usage_event(forged, REF)
