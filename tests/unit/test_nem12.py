"""The strict NEM12 reader against the real MDFF example files (tests/data, see its README)."""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from nemreader import NEMFile

from pipeline.ingest.nem12 import REASONS, Nem12Error, parse_nem12, read_nem12

DATA = Path(__file__).resolve().parents[1] / "data"
VALID = sorted((DATA / "nem12").glob("*.zip"))
INVALID = sorted((DATA / "nem12-invalid").iterdir())
NEM13 = sorted((DATA / "nem13").glob("*.zip"))


def _raw_csv(zip_path: Path) -> tuple[str, str]:
    """(member name, text) of the single CSV inside a published example zip."""
    with zipfile.ZipFile(zip_path) as zf:
        (member,) = zf.namelist()
        return member, zf.read(member).decode("ascii")


def _reading(readings, suffix: str, start: datetime):
    (found,) = [r for r in readings if r.suffix == suffix and r.interval_start == start]
    return found


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- every real valid file ------------------------------------------------------------------------


def test_the_data_folders_are_complete():
    assert len(VALID) == 49
    assert len(INVALID) == 10
    assert len(NEM13) == 8


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_every_valid_file_parses_and_is_consistent_with_its_csv(path: Path):
    nem = read_nem12(path)
    member, text = _raw_csv(path)
    assert nem.name == path.name
    assert nem.created.tzinfo is UTC
    # Count what the CSV declares, independently: each 300 record is 1440 / IntervalLength intervals.
    expected, minutes, lines_300 = 0, None, set()
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split(",")
        if fields[0] == "200":
            minutes = int(fields[8])
        elif fields[0] == "300":
            expected += 1440 // minutes
            lines_300.add(lineno)
    assert len(nem.readings) == expected
    assert {r.source_record for r in nem.readings} == lines_300
    assert {r.source_file for r in nem.readings} == {f"{path.name}!{member}"}
    for r in nem.readings:
        assert r.interval_start.tzinfo is UTC and r.version.tzinfo is UTC
        assert r.interval_end - r.interval_start in (timedelta(minutes=15), timedelta(minutes=30))
        assert r.value >= 0 and isinstance(r.value, Decimal)
    # No interval twice in one file.
    assert len({r.identity for r in nem.readings}) == len(nem.readings)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_readings_agree_with_nemreader(path: Path):
    """nemreader (lenient, float values, naive NEM time) reads the same intervals, values and quality."""
    theirs = NEMFile(str(path), strict=True).nem_data().readings
    ours = read_nem12(path).readings
    expected = {}
    for nmi, channels in theirs.items():
        for suffix, reads in channels.items():
            for x in reads:
                start = x.t_start.replace(tzinfo=UTC) - timedelta(hours=10)  # AEST -> UTC
                expected[(nmi, suffix, start)] = (x.read_value, x.quality_method[0], x.t_end - x.t_start)
    got = {
        (r.nmi, r.suffix, r.interval_start): (float(r.value), r.quality, r.interval_end - r.interval_start)
        for r in ours
    }
    assert got == expected


# --- exact counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count", "per_channel"),
    [
        # 2 channels (E1, E2) x 4 days x 48 half-hours
        ("NEM12#000000000000001#CNRGYMDP#NEMMCO.zip", 384, {"E1": 192, "E2": 192}),
        # 4 channels x 4 days x 48
        ("NEM12#000000000000002#CNRGYMDP#NEMMCO.zip", 768, {"B1": 192, "E1": 192, "K1": 192, "Q1": 192}),
        # one channel whose interval length changes: 2 days of 15-minute + 2 days of 30-minute data
        ("NEM12#000000000000005#CNRGYMDP#NEMMCO.zip", 288, {"E1": 96 * 2 + 48 * 2}),
        # 4 channels x 4 days x 96 quarter-hours
        ("nem12#S02#INTEGM#NEMMCO.zip", 1536, {"B1": 384, "E1": 384, "K1": 384, "Q1": 384}),
        # E1 on 03-01 and 03-02 (under two 200 records); E2 and B2 on 03-02 and 03-03
        ("NEM12#SCENARIO10#UNITEDDP#NEMMCO.zip", 288, {"E1": 96, "E2": 96, "B2": 96}),
    ],
)
def test_exact_reading_counts(name: str, count: int, per_channel: dict[str, int]):
    readings = read_nem12(DATA / "nem12" / name).readings
    assert len(readings) == count
    assert Counter(r.suffix for r in readings) == per_channel


def test_total_readings_across_all_valid_files():
    assert sum(len(read_nem12(p).readings) for p in VALID) == 21408


# --- values checked by hand against the CSV text --------------------------------------------------


def test_hand_checked_reading_30_minute_file():
    nem = read_nem12(DATA / "nem12" / "NEM12#000000000000001#CNRGYMDP#NEMMCO.zip")
    assert nem.created == utc(2005, 5, 18, 4, 32)  # 100,NEM12,200505181432 (AEST) -> 04:32Z
    assert (nem.from_participant, nem.to_participant) == ("CNRGYMDP", "NEMMCO")
    # line 2: 200,NEM1201002,E1E2,E1,E1,N1,01002,KWH,30,
    # line 3: 300,20050315,300.000,266.100,...,316.500,321.150,A,,,20050316014209,
    # 2005-03-15 00:00 AEST = 2005-03-14 14:00Z; UpdateDateTime 2005-03-16 01:42:09 AEST = 03-15 15:42:09Z
    first = _reading(nem.readings, "E1", utc(2005, 3, 14, 14, 0))
    assert first.nmi == "NEM1201002"
    assert first.uom == "kWh"  # "KWH" in the file; MDFF units are case-insensitive, canonical spelling
    assert first.interval_end == utc(2005, 3, 14, 14, 30)
    assert first.value == Decimal("300.000") and str(first.value) == "300.000"
    assert first.quality == "A" and first.reason_code is None
    assert first.version == utc(2005, 3, 15, 15, 42, 9)
    assert first.version_source == "UpdateDateTime"
    assert first.source_record == 3
    assert first.source_file == (
        "NEM12#000000000000001#CNRGYMDP#NEMMCO.zip!NEM12#000000000000001#CNRGYMDP#NEMMCO.csv"
    )
    # interval 48 of that day: 23:30-24:00 AEST = 13:30-14:00Z on the 15th, value 321.150
    last = _reading(nem.readings, "E1", utc(2005, 3, 15, 13, 30))
    assert last.value == Decimal("321.150") and last.interval_end == utc(2005, 3, 15, 14, 0)
    assert last.source_record == 3


def test_hand_checked_reading_15_minute_file_with_msats_time():
    nem = read_nem12(DATA / "nem12" / "nem12#S01#INTEGM#NEMMCO.zip")
    # line 2: 200,NEM1201006,E1E2,E1,E1,N1,01006,KWH,15,
    # line 4: 300,20040302,1.5,1.5,...,1.5,A,,,20040330095000,20041111100000
    # interval 3 of 2004-03-02: 00:30-00:45 AEST = 2004-03-01 14:30-14:45Z
    r = _reading(nem.readings, "E1", utc(2004, 3, 1, 14, 30))
    assert r.interval_end == utc(2004, 3, 1, 14, 45)
    assert r.value == Decimal("1.5")
    assert r.source_record == 4
    assert r.version == utc(2004, 3, 29, 23, 50)  # UpdateDateTime wins over MSATSLoadDateTime
    assert r.version_source == "UpdateDateTime"


def test_fifteen_minute_files_give_96_readings_per_day():
    for name in ("nem12#S01#INTEGM#NEMMCO.zip", "NEM12#SCENARIO105032701#ENERGEXM#NEMMCO.zip",
                 "NEM12#mdffl0000000001#ACTEWM#NEMMCO.zip"):
        readings = read_nem12(DATA / "nem12" / name).readings
        per_day = Counter((r.suffix, r.source_record) for r in readings)
        assert set(per_day.values()) == {96}, name
        for r in readings:
            assert r.interval_end - r.interval_start == timedelta(minutes=15)
        # the day's 96 intervals tile 00:00-24:00 AEST = 14:00Z the day before to 14:00Z
        day = sorted(r.interval_start for r in readings if r.source_record == readings[0].source_record)
        assert day[0].hour == 14 and day[0].minute == 0 and day[-1] == day[0] + timedelta(minutes=15 * 95)


def test_400_records_override_quality_and_reason():
    readings = read_nem12(DATA / "nem12" / "NEM12#08150_05031502#WBAYM#NEMMCO.zip").readings
    # line 3: 300,20050315,91.56,...,123.47,V,,,20050422164610,
    # line 4: 400,1,22,A,,
    # line 5: 400,23,48,S14,76,Communications Fault
    # interval 22 = 10:30-11:00 AEST 2005-03-15 = 00:30Z; interval 23 = 11:00 AEST = 01:00Z
    i22 = _reading(readings, "E1", utc(2005, 3, 15, 0, 30))
    i23 = _reading(readings, "E1", utc(2005, 3, 15, 1, 0))
    assert (i22.quality, i22.reason_code, i22.value) == ("A", None, Decimal("142.6"))
    assert (i23.quality, i23.reason_code, i23.value) == ("S", "76", Decimal("153.95"))
    assert i23.version == utc(2005, 4, 22, 6, 46, 10)
    # line 6: 300,20050316,...,V,,,20050428142327,
    # lines 7-9: 400,1,9,F15,93,... / 400,10,35,F14,94,... / 400,36,48,F18,94,...
    day2 = sorted((r for r in readings if r.source_record == 6), key=lambda r: r.interval_start)
    assert [r.quality for r in day2] == ["F"] * 48
    assert [r.reason_code for r in day2] == ["93"] * 9 + ["94"] * 39
    # No V survives: every interval of a V day gets its quality from a 400 record.
    assert all(r.quality != "V" for p in VALID for r in read_nem12(p).readings)


def test_400_overrides_with_estimates():
    readings = read_nem12(DATA / "nem12" / "NEM12#000000000000004#CNRGYMDP#NEMMCO.zip").readings
    # line 3: 300,20040527,0,0,0,0.0,0,...,V,,,20040609153903,
    # line 4: 400,1,10,F52,71,   line 5: 400,11,48,E52,,
    day = sorted((r for r in readings if r.source_record == 3), key=lambda r: r.interval_start)
    assert [(r.quality, r.reason_code) for r in day] == [("F", "71")] * 10 + [("E", None)] * 38
    assert str(day[3].value) == "0.0"  # the text as written, not normalised


def test_sum_of_e1_values_equals_the_csv_text():
    path = DATA / "nem12" / "NEM12#SCENARIO1005032705#ENERGEXM#NEMMCO.zip"
    _member, text = _raw_csv(path)
    expected, suffix, n = Decimal(0), None, None
    for line in text.splitlines():
        fields = line.split(",")
        if fields[0] == "200":
            suffix, n = fields[4], 1440 // int(fields[8])
        elif fields[0] == "300" and suffix == "E1":
            expected += sum(Decimal(v) for v in fields[2 : 2 + n])
    got = sum(r.value for r in read_nem12(path).readings if r.suffix == "E1")
    assert expected == Decimal("104920.01")  # awk over the same CSV agrees (2 days x 48 values)
    assert got == expected


# --- every real invalid file ----------------------------------------------------------------------

INVALID_EXPECTED = {
    # 200 declares 15-minute intervals, the 300 carries 48 values
    "Example_NEM12_15min_200_30min_300.csv": (
        "WRONG_INTERVAL_COUNT", 3,
        "300 record for 2023-02-25 has 48 interval values but the 200 record declares 15-minute intervals "
        "(96 expected)",
    ),
    # 96 values are right, but the V day's 400 records only cover 1-48 (30-minute numbering)
    "Example_NEM12_15min_200_30min_400.csv": (
        "BAD_400_RANGE", 3, "has quality V but its 400 records cover 48 of 96 intervals (not covered: 49-96)",
    ),
    # 200 declares 30-minute intervals, the 300 carries 96 values
    "Example_NEM12_30min_200_15min_300.csv": (
        "WRONG_INTERVAL_COUNT", 3,
        "has 96 interval values but the 200 record declares 30-minute intervals (48 expected)",
    ),
    # same, and its 400s use 15-minute numbering; the value count is the first problem
    "Example_NEM12_30min_200_15min_400.csv": (
        "WRONG_INTERVAL_COUNT", 3,
        "has 96 interval values but the 200 record declares 30-minute intervals (48 expected)",
    ),
    # 100 header then 900: nothing to bill
    "Example_NEM12_empty.csv": ("NO_DATA", None, "no 300 interval data records"),
    # line 3 is "300,20040201,V,,,20040202120025," with no values at all
    "Example_NEM12_incomplete_interval.csv": (
        "WRONG_INTERVAL_COUNT", 3, "300 record for 2004-02-01 has 0 interval values",
    ),
    # blank line 1, then a 200 record: no 100 header
    "Example_NEM12_missing_header.csv": ("MISSING_HEADER", 2, "not the 100 header record"),
    # Powercor style: no header and two files concatenated; the missing header comes first
    "Example_NEM12_powercor.csv": ("MISSING_HEADER", 2, "the first record is a '200' record"),
    # same, and its 300s lack UpdateDateTime/MSATSLoadDateTime; again the header comes first
    "Example_NEM12_powercor_missing_fields.csv": ("MISSING_HEADER", 2, "not the 100 header record"),
    # zero bytes
    "Example_empty_file.csv": ("EMPTY_FILE", None, "the file is empty"),
}


def test_every_invalid_file_has_an_expectation():
    assert sorted(INVALID_EXPECTED) == [p.name for p in INVALID]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_file_is_rejected_with_its_reason(path: Path):
    reason, line, text = INVALID_EXPECTED[path.name]
    with pytest.raises(Nem12Error) as caught:
        read_nem12(path)
    err = caught.value
    assert err.reason == reason and reason in REASONS
    assert err.file == path.name
    assert err.line == line
    assert text in str(err)
    assert str(err).startswith(f"{path.name} line {line}: " if line else f"{path.name}: ")


@pytest.mark.parametrize("path", NEM13, ids=lambda p: p.name)
def test_nem13_files_are_not_nem12(path: Path):
    with pytest.raises(Nem12Error) as caught:
        read_nem12(path)
    assert caught.value.reason == "NOT_NEM12"
    assert caught.value.line == 1
    assert "'NEM13'" in str(caught.value)


# --- rules checked on small edited files ----------------------------------------------------------

V48 = ",".join(["1.5"] * 48)
GOOD = [
    "100,NEM12,202401021200,MDP1,RET1",
    "200,NMI0000001,E1,1,E1,N1,M1,kWh,30,",
    f"300,20240101,{V48},A,,,20240102031500,20240102041500",
    "900",
]


def parse_lines(lines: list[str], name: str = "t.csv"):
    return parse_nem12(("\r\n".join(lines) + "\r\n").encode(), name)


def rejected(lines: list[str]) -> Nem12Error:
    with pytest.raises(Nem12Error) as caught:
        parse_lines(lines)
    return caught.value


def test_the_small_file_is_good():
    readings = parse_lines(GOOD).readings
    assert len(readings) == 48
    assert readings[0].interval_start == utc(2023, 12, 31, 14, 0)
    assert readings[0].version == utc(2024, 1, 1, 17, 15)


def test_version_falls_back_to_msats_then_file_time():
    msats = parse_lines([*GOOD[:2], f"300,20240101,{V48},A,,,,20240102041500", "900"]).readings[0]
    assert (msats.version, msats.version_source) == (utc(2024, 1, 1, 18, 15), "MSATSLoadDateTime")
    file_time = parse_lines([*GOOD[:2], f"300,20240101,{V48},A,,,,", "900"]).readings[0]
    assert (file_time.version, file_time.version_source) == (utc(2024, 1, 2, 2, 0), "FileDateTime")
    # MSATSLoadDateTime may be left out altogether (4 fields after the values)
    short = parse_lines([*GOOD[:2], f"300,20240101,{V48},A,,,20240102031500", "900"]).readings[0]
    assert short.version_source == "UpdateDateTime"


@pytest.mark.parametrize(("values", "count"), [
    ("", 0),  # "300,20240101,,A,...": one empty field is no values at all (said "1 interval values")
    (",", 0),
    ("1.5", 1),
    ("1.5,2.5", 2),
])
def test_wrong_interval_count_counts_values_not_empty_fields(values: str, count: int):
    err = rejected([*GOOD[:2], f"300,20240101,{values},A,,,20240102031500,20240102041500", "900"])
    assert err.reason == "WRONG_INTERVAL_COUNT" and err.line == 3
    noun = "value" if count == 1 else "values"
    assert err.problem == (f"300 record for 2024-01-01 has {count} interval {noun} but the 200 record declares "
                           "30-minute intervals (48 expected)")


def test_zip_with_two_members_reads_both_and_names_each():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.csv", "\r\n".join(GOOD))
        zf.writestr("b.V01", "\r\n".join(GOOD).replace("NMI0000001", "NMI0000002"))
    nem = parse_nem12(buf.getvalue(), "two.zip")
    assert nem.name == "two.zip" and len(nem.readings) == 96
    assert {r.source_file for r in nem.readings} == {"two.zip!a.csv", "two.zip!b.V01"}


def test_a_bad_member_rejects_the_whole_zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.csv", "\r\n".join(GOOD))
        zf.writestr("b.csv", "\r\n".join(GOOD[:-1]))
    with pytest.raises(Nem12Error) as caught:
        parse_nem12(buf.getvalue(), "two.zip")
    assert (caught.value.reason, caught.value.file) == ("MISSING_END_RECORD", "two.zip!b.csv")


@pytest.mark.parametrize(
    ("edit", "reason", "line", "text"),
    [
        (lambda ls: ls[:-1], "MISSING_END_RECORD", None, "no 900 end-of-data record"),
        (lambda ls: [*ls, "200,NMI0000001,E1,1,E1,N1,M1,kWh,30,"], "RECORD_AFTER_END", 5, "after the 900"),
        (lambda ls: [ls[0], ls[2], ls[1], ls[3]], "OUT_OF_ORDER", 2, "300 record before any 200 record"),
        (lambda ls: [ls[0], ls[1], "400,1,48,A,,", ls[2], ls[3]], "OUT_OF_ORDER", 3, "400 record not"),
        (lambda ls: [ls[0].replace("NEM12", "NEM13"), *ls[1:]], "NOT_NEM12", 1, "'NEM13'"),
        (lambda ls: [ls[0].replace("202401021200", "202402301200"), *ls[1:]], "BAD_DATE", 1,
         "100 header DateTime '202402301200'"),
        (lambda ls: [ls[0], ls[1].replace(",30,", ",60,"), *ls[2:]], "BAD_INTERVAL_LENGTH", 2, "'60'"),
        (lambda ls: [ls[0], ls[1].replace("kWh", "kWhh"), *ls[2:]], "BAD_UOM", 2, "'kWhh'"),
        (lambda ls: [*ls[:2], ls[2].replace("300,20240101,1.5,1.5", "300,20240101,1.5,-1.5"), ls[3]],
         "BAD_VALUE", 3, "interval 2 value '-1.5' is not a non-negative decimal"),
        (lambda ls: [*ls[:2], ls[2].replace("300,20240101,1.5", "300,20240101,1e3"), ls[3]],
         "BAD_VALUE", 3, "interval 1 value '1e3'"),
        (lambda ls: [*ls[:2], ls[2].replace("300,20240101,1.5", "300,20240101,NaN"), ls[3]],
         "BAD_VALUE", 3, "interval 1 value 'NaN'"),
        (lambda ls: [*ls[:2], ls[2].replace(",A,", ",X,"), ls[3]], "BAD_QUALITY", 3, "QualityMethod 'X'"),
        (lambda ls: [*ls[:2], ls[2].replace("20240101", "20240230"), ls[3]], "BAD_DATE", 3, "'20240230'"),
        (lambda ls: [*ls[:2], ls[2].replace("20240102031500", "2024010203"), ls[3]], "BAD_DATE", 3,
         "UpdateDateTime '2024010203'"),
        (lambda ls: [*ls[:3], ls[2], ls[3]], "DUPLICATE_DAY", 4, "already given on line 3"),
        (lambda ls: [*ls[:2], ls[2].replace(",A,", ",V,"), ls[3]], "MISSING_400", 3, "no 400 records"),
        (lambda ls: [*ls[:2], ls[2].replace(",A,", ",V,"), "400,1,20,A,,", "400,30,48,E52,,", ls[3]],
         "BAD_400_RANGE", 3, "cover 39 of 48 intervals (not covered: 21-29)"),
        (lambda ls: [*ls[:2], ls[2].replace(",A,", ",V,"), "400,1,20,A,,", "400,20,48,E52,,", ls[3]],
         "BAD_400_RANGE", 5, "overlapping 1-20 of the 400 record on line 4"),
        (lambda ls: [*ls[:2], ls[2].replace(",A,", ",V,"), "400,0,48,A,,", ls[3]],
         "BAD_400_RANGE", 4, "covers intervals 0-48, outside 1-48"),
        (lambda ls: [*ls[:2], ls[2].replace(",A,", ",V,"), "400,1,49,A,,", ls[3]],
         "BAD_400_RANGE", 4, "covers intervals 1-49, outside 1-48"),
        (lambda ls: [*ls[:2], ls[2].replace(",A,", ",V,"), "400,1,48,V,,", ls[3]],
         "BAD_QUALITY", 4, "V is not allowed in a 400 record"),
        (lambda ls: [*ls[:3], "250,NMI0000001,11,1,11,11,M1,E,1,20040101000000,A,,,2,20040201000000,A,,,"
                     "1,KWH,20050519,20040416092850,", ls[3]], "UNKNOWN_RECORD", 4, "'250'"),
    ],
    ids=lambda v: v if isinstance(v, str) and v in REASONS else None,
)
def test_structural_rules(edit, reason, line, text):
    err = rejected(edit(list(GOOD)))
    assert (err.reason, err.line) == (reason, line)
    assert reason in REASONS
    assert text in str(err)


def test_error_is_a_value_error_and_pickles():
    import pickle

    err = rejected(GOOD[:-1])
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.file, again.line, again.reason, str(again)) == (err.file, err.line, err.reason, str(err))


def test_a_day_of_five_minute_data_for_1000_nmis_parses_every_interval():
    """288,000 readings from one file, each in place (how fast: benchmarks/ingest.py, not a timed test)."""
    values = ",".join(f"{i % 997 / 1000:.3f}" for i in range(288))
    lines = ["100,NEM12,202401021200,MDP1,RET1"]
    for i in range(1000):
        lines += [f"200,NMI{i:07d},E1,1,E1,N1,M{i},kWh,5,", f"300,20240101,{values},A,,,20240102031500,"]
    lines.append("900")
    nem = parse_lines(lines, "five-minute.csv")
    assert len(nem.readings) == 288_000
    assert nem.readings[-1].interval_end == utc(2024, 1, 1, 14, 0)
    assert nem.readings[-1].value == Decimal("0.287")  # value 288 is (287 % 997) / 1000
    assert {r.nmi for r in nem.readings[::288]} == {f"NMI{i:07d}" for i in range(1000)}
