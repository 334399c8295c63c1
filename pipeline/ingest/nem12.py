"""Strict NEM12 reader: one file in, every interval out as ``MeterReading`` — or one ``Nem12Error``.

Pure: reads bytes, returns values; no Kafka, no clock.

Format (AEMO *Meter Data File Format Specification NEM12 & NEM13*, "MDFF"; the NEM12 part):

* **100 header record** — ``100,VersionHeader,DateTime,FromParticipant,ToParticipant``. Must be the
  first record; ``VersionHeader`` must be ``NEM12`` (``NEM13`` accumulation files are rejected as
  ``NOT_NEM12``); ``DateTime`` is the file creation time, DateTime(12) ``yyyymmddhhmm``.
* **200 NMI data details record** — ``200,NMI,NMIConfiguration,RegisterID,NMISuffix,
  MDMDataStreamIdentifier,MeterSerialNumber,UOM,IntervalLength[,NextScheduledReadDate]``. Opens a
  block for one NMI and one channel suffix (``E1`` import, ``B1`` export, ``Q1``/``K1`` reactive).
  ``UOM`` is a unit of measure from the MDFF list (``kWh``, ``kVArh``, ... — not case sensitive;
  readings carry the canonical spelling). ``IntervalLength`` is 5, 15 or 30 minutes.
* **300 interval data record** — ``300,IntervalDate,IntervalValue1..IntervalValueN,QualityMethod,
  ReasonCode,ReasonDescription,UpdateDateTime,MSATSLoadDateTime``: one day (Date(8)) of exactly
  N = 1440 / IntervalLength non-negative values (288, 96 or 48). ``QualityMethod`` is a quality flag
  (A actual, E estimated, S substituted, F final substituted, N null, V variable) optionally followed
  by a two-digit method flag (``E52``, ``S14``). ``UpdateDateTime`` and ``MSATSLoadDateTime`` are
  DateTime(14) ``yyyymmddhhmmss``; ``MSATSLoadDateTime`` may be omitted as the last field.
* **400 interval event record** — ``400,StartInterval,EndInterval,QualityMethod,ReasonCode,
  ReasonDescription``: overrides quality and reason for intervals StartInterval..EndInterval
  (1-based, inclusive) of the 300 record just before it. Mandatory after a 300 record with quality
  ``V``, and then the 400 records must cover 1..N exactly once; a 400 may not itself say ``V``.
  400 records after a 300 record of another quality are accepted and applied the same way (ranges
  inside 1..N, no overlaps), without the full-coverage rule.
* **500 B2B details record** — names the B2B transaction that delivered the data; not used here.
* **900 end of data record** — must be the last non-blank record.

Interval i (1-based) of a 300 record for date D starts at D 00:00 + (i-1) × IntervalLength in NEM
time (AEST, fixed UTC+10, no daylight saving); every datetime this module returns is UTC.

Each reading's ``version`` (SPEC §2) is the 300 record's UpdateDateTime, else its MSATSLoadDateTime,
else the 100 header's DateTime — all NEM time converted to UTC — and ``version_source`` names which
(``UpdateDateTime``, ``MSATSLoadDateTime``, ``FileDateTime``). Values are ``Decimal`` parsed from the
CSV text (never via float), in the 200 record's unit. ``source_record`` is the 1-based line number of
the 300 record in its CSV. ``source_file`` is the file's base name; for a zip it is
``<zip base name>!<member name>``, because the line number only identifies a record within one
member and a zip may hold several.

**Readings never land in a window shorter than themselves** (issue 14): given ``window_minutes`` (NMI suffix →
the length of the windows its readings are summed in, e.g. ``PIPELINE_WINDOW_MINUTES_ENERGY``), a channel
whose IntervalLength does not divide its window (30-minute data in 5-minute windows, or 15-minute data in
20-minute windows) is refused as ``INTERVAL_DOES_NOT_FIT_WINDOW`` at its 200 record: windowing puts a reading
whole into the window of its start, so such a reading would be billed in one window instead of spread over
the ones it covers, and demand (kWh ÷ window hours) would come out 3 or 6 times too high.

The whole file is validated before anything is returned: the first problem (in line order) raises
``Nem12Error`` and no reading from the file is returned, so a gateway publishes nothing from a
rejected file. ``nemreader`` supplies the field layout of the 100, 200 and 400 records and the MDFF
date parser; it is lenient (it accepts a missing header, skips short 300 rows, reads values as
float), so the record order, counts, values and line numbers are enforced by this module's own pass.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from nemreader.nem_reader import parse_200_row, parse_400_row

from pipeline.ingest.mdff import AEST, MdffError, MdffParser, decode_text
from pipeline.records import MeterReading

__all__ = [
    "AEST",
    "REASONS",
    "VERSION_SOURCES",
    "Nem12Error",
    "Nem12File",
    "parse_nem12",
    "read_nem12",
]


VERSION_SOURCES = ("UpdateDateTime", "MSATSLoadDateTime", "FileDateTime")
"""Possible ``MeterReading.version_source`` values, in order of preference (SPEC §2)."""

REASONS = {
    "EMPTY_FILE": "the file (or a zip member) has no records at all; or the zip has no members",
    "BAD_ZIP": "the file looks like a zip but cannot be read as one",
    "BAD_ENCODING": "the file is not UTF-8/ASCII text",
    "MISSING_HEADER": "the first record is not a 100 header record",
    "NOT_NEM12": "the 100 header names another format (e.g. NEM13)",
    "BAD_HEADER": "a 100 record with missing fields, or a second 100 record",
    "UNKNOWN_RECORD": "a record indicator other than 100/200/300/400/500/900",
    "OUT_OF_ORDER": "a 300 before any 200, a 400 not after a 300/400, a 500 before any 200",
    "BAD_RECORD": "a 200/300/400 record with too few or too many fields",
    "BAD_NMI": "NMI missing or not 1-10 alphanumeric characters",
    "BAD_SUFFIX": "NMI suffix not 2 alphanumeric characters",
    "BAD_UOM": "unit of measure not in the MDFF list",
    "BAD_INTERVAL_LENGTH": "interval length not 5, 15 or 30 minutes",
    "INTERVAL_DOES_NOT_FIT_WINDOW": "interval length does not divide the window its readings would be summed in "
                                    "(e.g. 30-minute data with 5-minute windows)",
    "WRONG_INTERVAL_COUNT": "a 300 record whose value count is not 1440 / interval length",
    "BAD_VALUE": "an interval value that is not a non-negative decimal number",
    "BAD_QUALITY": "a quality method not A/E/S/F/N/V (+ optional 2-digit method), or V in a 400",
    "BAD_REASON_CODE": "a reason code that is not a number",
    "BAD_DATE": "a malformed or impossible date/datetime field",
    "DUPLICATE_DAY": "the same NMI, suffix and date in two 300 records of one file",
    "MISSING_400": "a 300 record with quality V and no 400 records after it",
    "BAD_400_RANGE": "a 400 range outside 1..N, reversed, overlapping, or (after V) not covering 1..N",
    "RECORD_AFTER_END": "a non-blank record after the 900 end record",
    "MISSING_END_RECORD": "no 900 end record",
    "NO_DATA": "a well-formed file without any 300 record",
}
"""Every ``Nem12Error.reason`` this module raises, with what it means."""

_INTERVAL_LENGTHS = frozenset({5, 15, 30})
_MINUTES_PER_DAY = 24 * 60
_QUALITY_RE = re.compile(r"[AESFNV](?:[0-9]{2})?")
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_NUMBER_RE = re.compile(_NUMBER)
_VALUES_RE = re.compile(rf"{_NUMBER}(?:,{_NUMBER})*")
_ID_RE = re.compile(r"[A-Za-z0-9]{1,10}")
_SUFFIX_RE = re.compile(r"[A-Za-z0-9]{2}")
# MDFF units of measure (not case sensitive), keyed by upper case -> canonical spelling.
_UOMS = {
    u.upper(): u
    for u in ("MWh", "kWh", "Wh", "MVArh", "kVArh", "VArh", "MVAr", "kVAr", "VAr", "MW", "kW", "W",
              "MVAh", "kVAh", "VAh", "MVA", "kVA", "VA", "kV", "V", "kA", "A", "pf")
}
_FIELDS_AFTER_VALUES = ("QualityMethod", "ReasonCode", "ReasonDescription", "UpdateDateTime",
                        "MSATSLoadDateTime")


class Nem12Error(MdffError):
    """A NEM12 file was rejected (attributes of ``MdffError``; ``reason`` is one of ``REASONS``)."""


@dataclass(frozen=True, slots=True)
class Nem12File:
    """A fully validated NEM12 file.

    Attributes:
        name: the file's base name (for a zip: the zip's).
        created: the 100 header's DateTime (file creation), UTC. For a zip with several members:
            the first member's.
        from_participant / to_participant: the 100 header's participant ids (first member's).
        readings: every interval of every 300 record, in file order (record by record, interval
            1..N), quality and reason after 400 overrides.
    """

    name: str
    created: datetime
    from_participant: str
    to_participant: str
    readings: tuple[MeterReading, ...]


WindowMinutes = Callable[[str], int | None]
"""NMI suffix (``E1``) → minutes of the windows its readings are summed in; ``None``: not checked."""


def read_nem12(path: Path, window_minutes: WindowMinutes | None = None) -> Nem12File:
    """Read and validate a NEM12 ``.csv`` file, or a ``.zip`` holding one or more NEM12 files.

    Zip or not is decided by the content (zip magic bytes), not the extension; every member of a
    zip that is not a directory is read as a NEM12 CSV whatever its extension (``.csv``, ``.V01``,
    ``.mdff``, none ...). ``window_minutes``: refuse a channel whose interval length does not divide its
    windows (``INTERVAL_DOES_NOT_FIT_WINDOW``). Raises ``Nem12Error`` on the first problem anywhere;
    returns nothing then.
    """
    path = Path(path)
    return parse_nem12(path.read_bytes(), path.name, window_minutes)


def parse_nem12(data: bytes, name: str, window_minutes: WindowMinutes | None = None) -> Nem12File:
    """Like ``read_nem12`` for bytes already in memory; ``name`` is the file's base name."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _parse_zip(data, name, window_minutes)
    parsed = _Nem12Parser(decode_text(data, name, Nem12Error), name, window_minutes).parse()
    return Nem12File(name, parsed.created, parsed.from_participant, parsed.to_participant,
                     tuple(parsed.readings))


def _parse_zip(data: bytes, name: str, window_minutes: WindowMinutes | None = None) -> Nem12File:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = [(i.filename, zf.read(i)) for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise Nem12Error(name, None, "BAD_ZIP", f"cannot read the zip: {exc}") from exc
    if not members:
        raise Nem12Error(name, None, "EMPTY_FILE", "the zip has no files in it")
    parsed = [
        _Nem12Parser(decode_text(body, f"{name}!{member}", Nem12Error), f"{name}!{member}", window_minutes).parse()
        for member, body in members
    ]
    readings: list[MeterReading] = []
    for p in parsed:
        readings.extend(p.readings)
    first = parsed[0]
    return Nem12File(name, first.created, first.from_participant, first.to_participant, tuple(readings))


@lru_cache(maxsize=256)
def _interval_bounds(day: date, minutes: int) -> tuple[tuple[datetime, datetime], ...]:
    """UTC (start, end) of every interval of ``day`` (NEM time) for ``minutes``-long intervals."""
    midnight = datetime(day.year, day.month, day.day, tzinfo=AEST).astimezone(UTC)
    step = timedelta(minutes=minutes)
    return tuple((midnight + i * step, midnight + (i + 1) * step)
                 for i in range(_MINUTES_PER_DAY // minutes))


def _iso(day: date) -> str:
    return day.isoformat()


@dataclass(slots=True)
class _Channel:
    """The current 200 record."""

    line: int
    nmi: str
    suffix: str
    uom: str
    minutes: int
    count: int  # intervals per day


@dataclass(slots=True)
class _Day:
    """A 300 record waiting for its 400 records."""

    line: int
    channel: _Channel
    day: date
    values: list[Decimal]
    quality: str  # the quality flag (first character of QualityMethod)
    reason: str | None
    version: datetime
    version_source: str
    events: list[tuple[int, int, str, str | None, int]]  # (start, end, flag, reason, line)


@dataclass(slots=True)
class _Parsed:
    created: datetime
    from_participant: str
    to_participant: str
    readings: list[MeterReading]


class _Nem12Parser(MdffParser):
    """One pass over the lines of one NEM12 CSV: validates the structure and builds the readings."""

    error = Nem12Error
    version = "NEM12"

    def __init__(self, text: str, source: str, window_minutes: WindowMinutes | None = None) -> None:
        super().__init__(source)
        self.text = text
        self.window_minutes = window_minutes
        self.readings: list[MeterReading] = []
        self.channel: _Channel | None = None
        self.pending: _Day | None = None
        self.days_seen: dict[tuple[str, str, date], int] = {}

    def parse(self) -> _Parsed:
        header = None
        end_line: int | None = None
        data_records = 0
        for lineno, raw in enumerate(self.text.split("\n"), 1):
            line = raw.rstrip("\r")
            if not line.strip():
                continue
            fields = line.split(",") if '"' not in line else _csv_fields(line)
            indicator = fields[0].strip()
            if end_line is not None:
                raise self.fail(lineno, "RECORD_AFTER_END",
                                f"{indicator} record after the 900 end-of-data record on line {end_line}")
            if header is None:
                header = self.header(lineno, fields)
                continue
            if indicator != "400":
                self.close_day()
            if indicator == "300":
                self.record_300(lineno, fields)
                data_records += 1
            elif indicator == "200":
                self.record_200(lineno, fields)
            elif indicator == "400":
                self.record_400(lineno, fields)
            elif indicator == "500":
                if self.channel is None:
                    raise self.fail(lineno, "OUT_OF_ORDER", "500 record before any 200 record")
            elif indicator == "900":
                end_line = lineno
            elif indicator == "100":
                raise self.fail(lineno, "BAD_HEADER", "second 100 header record (files must not be "
                                "concatenated)")
            else:
                raise self.fail(lineno, "UNKNOWN_RECORD",
                                f"unknown record indicator {indicator!r} (NEM12 has 100, 200, 300, 400, "
                                "500 and 900)")
        self.close_day()
        if header is None:
            raise self.fail(None, "EMPTY_FILE", "the file is empty (no records)")
        if end_line is None:
            raise self.fail(None, "MISSING_END_RECORD",
                            "no 900 end-of-data record: the file may be truncated")
        if data_records == 0:
            raise self.fail(None, "NO_DATA", "no 300 interval data records: header and end record only")
        assert self.created is not None
        return _Parsed(self.created, header.from_participant, header.to_participant, self.readings)

    # -- 200 ---------------------------------------------------------------------------------------

    def record_200(self, lineno: int, fields: list[str]) -> None:
        if not 9 <= len(fields) <= 10:
            raise self.fail(lineno, "BAD_RECORD",
                            f"200 record has {len(fields)} fields, expected 9 or 10 (200, NMI, NMIConfiguration,"
                            " RegisterID, NMISuffix, MDMDataStreamIdentifier, MeterSerialNumber, UOM, "
                            "IntervalLength[, NextScheduledReadDate])")
        fields = [f.strip() for f in fields]
        if not _ID_RE.fullmatch(fields[1]):
            raise self.fail(lineno, "BAD_NMI", f"200 record NMI {fields[1]!r} is not 1-10 letters/digits")
        if not _SUFFIX_RE.fullmatch(fields[4]):
            raise self.fail(lineno, "BAD_SUFFIX",
                            f"200 record for NMI {fields[1]} has NMISuffix {fields[4]!r}, expected 2 "
                            "letters/digits such as E1")
        uom = _UOMS.get(fields[7].upper())
        if uom is None:
            raise self.fail(lineno, "BAD_UOM",
                            f"200 record for {fields[1]}/{fields[4]} has unit of measure {fields[7]!r}, "
                            "not an MDFF unit (kWh, kVArh, ...)")
        if not fields[8].isdigit() or int(fields[8]) not in _INTERVAL_LENGTHS:
            raise self.fail(lineno, "BAD_INTERVAL_LENGTH",
                            f"200 record for {fields[1]}/{fields[4]} has IntervalLength {fields[8]!r}, "
                            "expected 5, 15 or 30 (minutes)")
        minutes = int(fields[8])
        window = self.window_minutes(fields[4].upper()) if self.window_minutes is not None else None
        if window is not None and window % minutes:
            raise self.fail(lineno, "INTERVAL_DOES_NOT_FIT_WINDOW",
                            f"200 record for {fields[1]}/{fields[4]} has {minutes}-minute intervals, but its readings "
                            f"would be summed in {window}-minute windows: each reading would land whole in the window "
                            f"of its start instead of the {minutes} minutes it covers; windows must be a whole number "
                            f"of intervals (PIPELINE_WINDOW_MINUTES_ENERGY a multiple of {minutes})")
        if len(fields) == 10 and fields[9]:
            self.check_date(lineno, fields[9], "200 record NextScheduledReadDate")
        details = parse_200_row(fields)
        self.channel = _Channel(lineno, details.nmi, details.nmi_suffix.upper(), uom, details.interval_length,
                                _MINUTES_PER_DAY // details.interval_length)

    # -- 300 ---------------------------------------------------------------------------------------

    def record_300(self, lineno: int, fields: list[str]) -> None:
        ch = self.channel
        if ch is None:
            raise self.fail(lineno, "OUT_OF_ORDER", "300 record before any 200 record (no NMI/channel)")
        day_text = fields[1].strip() if len(fields) > 1 else ""
        day = self.check_date(lineno, day_text, "300 record IntervalDate")
        what = f"300 record for {_iso(day)}"
        n = ch.count
        # Layout: 300, date, N values, then 5 fields (MSATSLoadDateTime may be omitted).
        if not (len(fields) in (n + 6, n + 7) and fields[2 + n].strip()[:1].isalpha()):
            found = next((i for i in range(2, len(fields)) if fields[i].strip()[:1].isalpha()), len(fields))
            # the fields between the date and the QualityMethod; empty ones only ("300,20240101,,A,...") are
            # no values at all, not one empty value
            count = found - 2 if any(f.strip() for f in fields[2:found]) else 0
            if count != n:
                raise self.fail(lineno, "WRONG_INTERVAL_COUNT",
                                f"{what} has {count} interval value{'' if count == 1 else 's'} but the 200 record "
                                f"declares {ch.minutes}-minute intervals ({n} expected)")
            after = len(fields) - found
            raise self.fail(lineno, "BAD_RECORD",
                            f"{what} has {after} fields after its {n} interval values, expected 5 "
                            f"({', '.join(_FIELDS_AFTER_VALUES)})")
        raw_values = fields[2 : 2 + n]
        if not _VALUES_RE.fullmatch(",".join(raw_values)):
            for i, v in enumerate(raw_values, 1):
                if not _NUMBER_RE.fullmatch(v):
                    raise self.fail(lineno, "BAD_VALUE",
                                    f"{what} interval {i} value {v!r} is not a non-negative decimal number")
        values = [Decimal(v) for v in raw_values]
        tail = [f.strip() for f in fields[2 + n :]]
        if len(tail) == 4:
            tail.append("")
        quality_method, reason_code, _description, update_text, msats_text = tail
        if not _QUALITY_RE.fullmatch(quality_method):
            raise self.fail(lineno, "BAD_QUALITY",
                            f"{what} has QualityMethod {quality_method!r}; expected a quality flag A, E, S, F,"
                            " N or V optionally followed by a 2-digit method flag")
        reason = self.check_reason(lineno, reason_code, f"{what} ReasonCode")
        if update_text:
            version = self.check_datetime(lineno, update_text, 14, f"{what} UpdateDateTime")
            version_source = "UpdateDateTime"
        elif msats_text:
            version = self.check_datetime(lineno, msats_text, 14, f"{what} MSATSLoadDateTime")
            version_source = "MSATSLoadDateTime"
        else:
            assert self.created is not None
            version, version_source = self.created, "FileDateTime"
        if update_text and msats_text:
            self.check_datetime(lineno, msats_text, 14, f"{what} MSATSLoadDateTime")
        key = (ch.nmi, ch.suffix, day)
        if key in self.days_seen:
            raise self.fail(lineno, "DUPLICATE_DAY",
                            f"{what} repeats NMI {ch.nmi} suffix {ch.suffix} already given on line "
                            f"{self.days_seen[key]}")
        self.days_seen[key] = lineno
        self.pending = _Day(lineno, ch, day, values, quality_method[0], reason, version, version_source, [])

    # -- 400 ---------------------------------------------------------------------------------------

    def record_400(self, lineno: int, fields: list[str]) -> None:
        day = self.pending
        if day is None:
            raise self.fail(lineno, "OUT_OF_ORDER", "400 record not directly after a 300 record or another 400")
        if not 4 <= len(fields) <= 6:
            raise self.fail(lineno, "BAD_RECORD",
                            f"400 record has {len(fields)} fields, expected 6 (400, StartInterval, EndInterval,"
                            " QualityMethod, ReasonCode, ReasonDescription)")
        fields = [f.strip() for f in fields] + [""] * (6 - len(fields))
        n = day.channel.count
        what = f"400 record for the {_iso(day.day)} 300 record on line {day.line}"
        if not (fields[1].isdigit() and fields[2].isdigit()):
            raise self.fail(lineno, "BAD_400_RANGE",
                            f"{what} has interval range {fields[1]!r}-{fields[2]!r}, not two numbers")
        start, end = int(fields[1]), int(fields[2])
        if not 1 <= start <= end <= n:
            raise self.fail(lineno, "BAD_400_RANGE",
                            f"{what} covers intervals {start}-{end}, outside 1-{n} "
                            f"({day.channel.minutes}-minute intervals) or reversed")
        for other_start, other_end, _q, _r, other_line in day.events:
            if start <= other_end and other_start <= end:
                raise self.fail(lineno, "BAD_400_RANGE",
                                f"{what} covers intervals {start}-{end}, overlapping {other_start}-{other_end} "
                                f"of the 400 record on line {other_line}")
        if not _QUALITY_RE.fullmatch(fields[3]) or fields[3][0] == "V":
            raise self.fail(lineno, "BAD_QUALITY",
                            f"{what} has QualityMethod {fields[3]!r}; expected A, E, S, F or N optionally "
                            "followed by a 2-digit method flag (V is not allowed in a 400 record)")
        reason = self.check_reason(lineno, fields[4], f"{what} ReasonCode")
        event = parse_400_row(fields, day.channel.minutes)
        day.events.append((event.start_interval, event.end_interval, event.quality_method[0], reason, lineno))

    # -- closing a 300 record: apply 400 overrides and build the readings ------------------------

    def close_day(self) -> None:
        day = self.pending
        if day is None:
            return
        self.pending = None
        ch = day.channel
        n = ch.count
        qualities = [day.quality] * n
        reasons: list[str | None] = [day.reason] * n
        if day.quality == "V":
            if not day.events:
                raise self.fail(day.line, "MISSING_400",
                                f"300 record for {_iso(day.day)} has quality V but no 400 records follow it")
            covered = sum(e - s + 1 for s, e, *_ in day.events)
            if covered != n:  # ranges are in 1..n and disjoint, so a short total means a gap
                spans = sorted((s, e) for s, e, *_ in day.events)
                missing, expect = [], 1
                for s, e in spans:
                    if s > expect:
                        missing.append(f"{expect}-{s - 1}")
                    expect = e + 1
                if expect <= n:
                    missing.append(f"{expect}-{n}")
                raise self.fail(day.line, "BAD_400_RANGE",
                                f"300 record for {_iso(day.day)} has quality V but its 400 records cover "
                                f"{covered} of {n} intervals (not covered: {', '.join(missing)})")
        for start, end, flag, reason, _line in day.events:
            qualities[start - 1 : end] = [flag] * (end - start + 1)
            reasons[start - 1 : end] = [reason] * (end - start + 1)
        bounds = _interval_bounds(day.day, ch.minutes)
        make = MeterReading
        nmi, suffix, uom, version, vsource, src, line = (
            ch.nmi, ch.suffix, ch.uom, day.version, day.version_source, self.source, day.line)
        self.readings.extend(
            make(nmi, suffix, uom, s, e, v, q, r, version, vsource, src, line)
            for (s, e), v, q, r in zip(bounds, day.values, qualities, reasons, strict=True)
        )


def _csv_fields(line: str) -> list[str]:
    """Split a line that uses CSV quoting (rare in NEM12; ReasonDescription may be quoted)."""
    return next(csv.reader([line]))
