"""Strict NEM13 reader: accumulation (register) reads in, daily ``MeterReading``s out — or one ``Nem13Error``.

Pure: reads bytes, returns values; no Kafka, no clock.

Format (AEMO *Meter Data File Format Specification NEM12 & NEM13*, "MDFF"; the NEM13 part):

* **100 header record** — ``100,VersionHeader,DateTime,FromParticipant,ToParticipant``; must be first;
  ``VersionHeader`` must be ``NEM13`` (a NEM12 file is rejected as ``NOT_NEM13``: an MDFF file holds
  NEM12 or NEM13 data, never both).
* **250 basic meter data record** — one register read period of one NMI register::

      250,NMI,NMIConfiguration,RegisterID,NMISuffix,MDMDataStreamIdentifier,MeterSerialNumber,
      DirectionIndicator,PreviousRegisterRead,PreviousRegisterReadDateTime,PreviousQualityMethod,
      PreviousReasonCode,PreviousReasonDescription,CurrentRegisterRead,CurrentRegisterReadDateTime,
      CurrentQualityMethod,CurrentReasonCode,CurrentReasonDescription,Quantity,UOM,
      NextScheduledReadDate,UpdateDateTime[,MSATSLoadDateTime]

  (field layout as ``nemreader.nem_objects.BasicMeterData``). ``NMISuffix`` is the register's two
  characters (``11``, ``41`` ...) and must be listed in ``NMIConfiguration``. ``DirectionIndicator``
  is ``E`` (export from the network: the customer's consumption) or ``I`` (import into the network:
  generation). Register reads are unsigned decimals; the datetimes are DateTime(14) NEM time.
* **550 B2B details record** — the B2B transactions of the 250 record before it; checked for
  place and field count only.
* **900 end of data record** — must be the last non-blank record.

Consumption of a read period (what is billed) — the rule, after the MDFF specification's definitions of
the 250 fields: the **Quantity** is "the computed quantity, after the application of any multiplier value
and taking account of any meter rollover", i.e. the metered consumption, while the register reads are
written "as per the physical dial format", exclusive of multipliers: rounded to the dial's resolution.
So the Quantity wins, provided the registers agree with it within their resolution:

* the registers' advance is ``CurrentRegisterRead − PreviousRegisterRead``. When the current read is
  lower, the Quantity tells which of two things happened: the register **rolled over** (advance
  ``10**digits − previous + current``, digits = the integer digits written in the file, e.g. ``99890 →
  02034`` = 2144 on a 5-digit register), or the read is a **correction** (Quantity = ``current − previous``,
  negative, e.g. ``23220 → 23210`` with Quantity ``-10``: the earlier read was too high). A correction is
  a negative consumption: a credit spread over its own read period (the readings are negative and flagged
  ``MeterReading.correction``); it is never taken for a 99,990 kWh roll-over;
* the Quantity (or its negative on an ``I`` register: some MDPs sign generation negative) must be within
  the register's resolution of that advance: ``|Quantity − advance| < 10**-d``, d = the fewest decimals
  written in the two reads (1 kWh for whole-number dials: ``868`` against ``868.294`` is accepted). The
  Quantity is billed, and a difference is stated in every reading's source (``the registers advanced
  868, 0.294 less``). Further apart, the file is rejected as ``QUANTITY_MISMATCH`` with the numbers: a
  file that disagrees with itself is not billed. (Registers with a meter multiplier, where Quantity =
  advance × multiplier, are therefore not accepted.) The specification says a Quantity must not be
  negative; real files carry negative Quantities for register corrections (issue 14), so this reader
  accepts them as above rather than refusing the file.

Spreading (the reading this module produces): the advance is spread **evenly over the NEM days of
the read period** — from the previous read's date (inclusive) to the current read's date
(exclusive), or that one day when both reads fall on the same date — as one ``MeterReading`` per day
with ``interval_start``/``interval_end`` at NEM midnights (AEST, UTC+10, converted to UTC, as
``nem12`` does). ``spread_evenly`` gives each day the consumption ÷ days rounded toward zero to 6
decimal places and puts the rounding remainder on the **last day**, so the daily values sum exactly to
the consumption billed (``Decimal`` throughout, never float).

Each daily reading:

* ``suffix`` = the NEM12 channel letter of the register's direction and unit followed by the NEM13
  suffix: ``E11`` (active energy, consumption), ``B11`` (active energy, generation), ``Q11``/``K11``
  (reactive). The ingest stage maps the first letter to a metric exactly as for NEM12 channels, and
  the reading's identity (NMI, suffix, day start) stays distinct per register (SPEC §2);
* ``value`` in the 250 record's unit (``kWh``, ...);
* ``quality``: actual (``A``) only when both reads are actual, else the current read's flag, or the
  previous read's when the current one is actual; ``reason_code`` from the same read;
* ``version``: UpdateDateTime, else MSATSLoadDateTime, else the header's DateTime (SPEC §2);
* **marked as an accumulation spread**: ``source_file`` is
  ``NEM13 accumulation <previous>-><current> = <consumption> <uom>[ (<note>)] spread evenly over <n> days:
  <file>`` (the note names a correction, or the registers' difference from the Quantity) and
  ``source_record`` the 250 record's line, so the ingest stage's ``<source_file>#<line>`` source, every
  window and every charge explanation (``pipeline explain``) say where the kWh came from and that they
  were spread;
* ``correction``: set on the (negative) readings of a correction, and only there.

Only energy registers accumulate (Wh/kWh/MWh, VArh/kVArh/MVArh); any other unit (demand kW, kVA...)
is rejected as ``UNSUPPORTED_UOM``. Two read periods of one register that share a day are rejected
(``OVERLAPPING_READS``): each day's identity must come from one read. The whole file is validated
before anything is returned; the first problem (line order) raises ``Nem13Error`` and nothing from
the file is returned, so the gateway publishes nothing from a rejected file.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from pathlib import Path

from nemreader.nem_objects import BasicMeterData

from pipeline.ingest.mdff import AEST, MdffError, MdffParser, decode_text
from pipeline.records import MeterReading

__all__ = [
    "REASONS",
    "SPREAD_MARK",
    "Nem13Error",
    "Nem13File",
    "RegisterRead",
    "is_register_correction",
    "parse_nem13",
    "read_nem13",
    "spread_evenly",
]

SPREAD_MARK = "NEM13 accumulation"
"""Every spread reading's ``source_file`` starts with this (and so does its charge explanation's source)."""

REASONS = {
    "EMPTY_FILE": "the file (or a zip member) has no records at all; or the zip has no members",
    "BAD_ZIP": "the file looks like a zip but cannot be read as one",
    "BAD_ENCODING": "the file is not UTF-8/ASCII text",
    "MISSING_HEADER": "the first record is not a 100 header record",
    "NOT_NEM13": "the 100 header names another format (e.g. NEM12)",
    "BAD_HEADER": "a 100 record with missing fields, or a second 100 record",
    "UNKNOWN_RECORD": "a record indicator other than 100/250/550/900 (NEM12 records included)",
    "OUT_OF_ORDER": "a 550 record not directly after a 250 record",
    "BAD_RECORD": "a 250/550 record with too few or too many fields",
    "BAD_NMI": "NMI missing or not 1-10 alphanumeric characters",
    "BAD_SUFFIX": "NMI suffix not 2 alphanumeric characters, or not listed in NMIConfiguration",
    "BAD_DIRECTION": "DirectionIndicator not E or I",
    "BAD_UOM": "unit of measure not in the MDFF list",
    "UNSUPPORTED_UOM": "an MDFF unit that does not accumulate energy (kW, kVA, V, A, pf ...)",
    "BAD_REGISTER_READ": "a register read that is not an unsigned decimal number",
    "BAD_QUANTITY": "a Quantity that is not a decimal number, or with more than 6 decimal places",
    "QUANTITY_MISMATCH": "Quantity differs from the register advance (current - previous, with roll-over, or a "
                         "correction) by the register's resolution or more",
    "BAD_QUALITY": "a quality method not A/E/S/F/N (+ optional 2-digit method)",
    "BAD_REASON_CODE": "a reason code that is not a number",
    "BAD_DATE": "a malformed or impossible date/datetime field",
    "BAD_READ_PERIOD": "the current read is not after the previous read",
    "OVERLAPPING_READS": "two read periods of one NMI register share a day",
    "RECORD_AFTER_END": "a non-blank record after the 900 end record",
    "MISSING_END_RECORD": "no 900 end record",
    "NO_DATA": "a well-formed file without any 250 record",
}
"""Every ``Nem13Error.reason`` this module raises, with what it means."""

_FIELDS_250 = (
    "NMI", "NMIConfiguration", "RegisterID", "NMISuffix", "MDMDataStreamIdentifier", "MeterSerialNumber",
    "DirectionIndicator", "PreviousRegisterRead", "PreviousRegisterReadDateTime", "PreviousQualityMethod",
    "PreviousReasonCode", "PreviousReasonDescription", "CurrentRegisterRead", "CurrentRegisterReadDateTime",
    "CurrentQualityMethod", "CurrentReasonCode", "CurrentReasonDescription", "Quantity", "UOM",
    "NextScheduledReadDate", "UpdateDateTime", "MSATSLoadDateTime",
)  # the 250 fields after the record indicator, in the order of nemreader's BasicMeterData
assert len(_FIELDS_250) == len(BasicMeterData._fields)
_QUALITY_RE = re.compile(r"[AESFN](?:[0-9]{2})?")
_READ_RE = re.compile(r"([0-9]{1,15})(?:\.([0-9]{1,15}))?")  # at most 15 digits each side: exact in Decimal
_QUANTITY_RE = re.compile(r"-?[0-9]{1,15}(?:\.[0-9]{1,15})?")
_ID_RE = re.compile(r"[A-Za-z0-9]{1,10}")
_SUFFIX_RE = re.compile(r"[A-Za-z0-9]{2}")
_SCALE = Decimal("0.000001")  # quantities to 6 decimal places (SPEC §4)
_DAY = timedelta(days=1)
# MDFF units of measure that accumulate energy (not case sensitive): canonical spelling, channel letters
# (E direction, I direction) as NEM12 names channels: E/B active energy, Q/K reactive energy.
_ENERGY_UOMS = {
    **{u.upper(): (u, "E", "B") for u in ("MWh", "kWh", "Wh")},
    **{u.upper(): (u, "Q", "K") for u in ("MVArh", "kVArh", "VArh")},
}
_OTHER_UOMS = frozenset(
    u.upper() for u in ("MVAh", "kVAh", "VAh", "MVAr", "kVAr", "VAr", "MW", "kW", "W", "MVA", "kVA", "VA",
                        "kV", "V", "kA", "A", "pf")
)


class Nem13Error(MdffError):
    """A NEM13 file was rejected (attributes of ``MdffError``; ``reason`` is one of ``REASONS``)."""


@dataclass(frozen=True, slots=True)
class RegisterRead:
    """One validated 250 record: a register's consumption between two reads.

    Attributes:
        nmi / register_suffix / register_id: the NMI, its NEM13 suffix (``11``) and RegisterID.
        direction: ``E`` (consumption) or ``I`` (generation).
        previous_read / current_read: the register values as written (``Decimal``).
        previous_read_at / current_read_at: the read datetimes, UTC.
        advance: what the registers advanced (roll-over applied), in ``uom``; negative for a correction.
        consumption: what is billed, in ``uom``: the Quantity (its negative for an ``I`` register that
            signs generation negative), within ``resolution`` of ``advance``; negative for a correction.
        resolution: the registers' resolution, ``10**-d`` for the fewest decimals d written in the reads.
        correction: the register went down and the Quantity says so (negative consumption, a credit).
        uom: canonical MDFF unit (``kWh``, ...).
        quality / reason_code: the period's quality flag and reason code (see the module docstring).
        version / version_source: supersession version (UTC) and which field it came from.
        days: the NEM dates the advance is spread over, in order.
        line: 1-based line of the 250 record in its CSV.
        readings: the daily readings of this read period (``len(days)`` of them).
    """

    nmi: str
    register_suffix: str
    register_id: str
    direction: str
    previous_read: Decimal
    previous_read_at: datetime
    current_read: Decimal
    current_read_at: datetime
    advance: Decimal
    consumption: Decimal
    resolution: Decimal
    correction: bool
    uom: str
    quality: str
    reason_code: str | None
    version: datetime
    version_source: str
    days: tuple[date, ...]
    line: int
    readings: tuple[MeterReading, ...]


@dataclass(frozen=True, slots=True)
class Nem13File:
    """A fully validated NEM13 file.

    Attributes:
        name: the file's base name (for a zip: the zip's).
        created: the 100 header's DateTime (UTC); for a zip with several members, the first member's.
        from_participant / to_participant: the 100 header's participant ids (first member's).
        reads: every 250 record, in file order.
        readings: the daily readings of every read, in file order (read by read, day by day).
    """

    name: str
    created: datetime
    from_participant: str
    to_participant: str
    reads: tuple[RegisterRead, ...]
    readings: tuple[MeterReading, ...]


def spread_evenly(total: Decimal, days: int) -> tuple[Decimal, ...]:
    """``total`` split into ``days`` daily amounts that sum to it exactly.

    Every day but the last gets ``total / days`` rounded toward zero to 6 decimal places; the last day
    gets the rest (the rounding remainder: at most ``(days − 1) × 0.000001`` further from zero than the
    others). A negative ``total`` (a correction) spreads the same way, every day negative or zero.
    ``total`` must have at most 6 decimal places and ``days`` be ≥ 1, else ``ValueError``.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    if total.quantize(_SCALE) != total:
        raise ValueError(f"total must have at most 6 decimal places, got {total}")
    daily = (total / days).quantize(_SCALE, rounding=ROUND_DOWN)
    return (*([daily] * (days - 1)), total - daily * (days - 1))


def is_register_correction(reading: MeterReading) -> bool:
    """Whether a (negative) reading is a day of a NEM13 register correction — a credit, not bad input: flagged
    ``correction`` by this reader, one NEM day long from NEM midnight, its source marked as a spread register
    read. Interval data (NEM12 files, the HTTP API) never is, so a negative interval value stays bad input
    (ingest's ``NEGATIVE_VALUE``)."""
    start = reading.interval_start.astimezone(AEST)
    return (reading.correction and reading.interval_end - reading.interval_start == _DAY
            and (start.hour, start.minute, start.second, start.microsecond) == (0, 0, 0, 0)
            and reading.source_file.startswith(SPREAD_MARK))


def read_nem13(path: Path) -> Nem13File:
    """Read and validate a NEM13 ``.csv`` file, or a ``.zip`` holding one or more NEM13 files.

    Zip or not is decided by the content (zip magic bytes); every member of a zip that is not a
    directory is read as a NEM13 CSV whatever its extension. Raises ``Nem13Error`` on the first
    problem anywhere; returns nothing then.
    """
    path = Path(path)
    return parse_nem13(path.read_bytes(), path.name)


def parse_nem13(data: bytes, name: str) -> Nem13File:
    """Like ``read_nem13`` for bytes already in memory; ``name`` is the file's base name."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                members = [(f"{name}!{i.filename}", zf.read(i)) for i in zf.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as exc:
            raise Nem13Error(name, None, "BAD_ZIP", f"cannot read the zip: {exc}") from exc
        if not members:
            raise Nem13Error(name, None, "EMPTY_FILE", "the zip has no files in it")
    else:
        members = [(name, data)]
    parsed = [_Nem13Parser(decode_text(body, source, Nem13Error), source).parse() for source, body in members]
    first = parsed[0]
    reads = tuple(r for p in parsed for r in p.reads)
    return Nem13File(name, first.created, first.from_participant, first.to_participant, reads,
                     tuple(x for r in reads for x in r.readings))


@dataclass(slots=True)
class _Parsed:
    created: datetime
    from_participant: str
    to_participant: str
    reads: list[RegisterRead]


class _Nem13Parser(MdffParser):
    """One pass over the lines of one NEM13 CSV: validates the structure and builds the reads."""

    error = Nem13Error
    version = "NEM13"

    def __init__(self, text: str, source: str) -> None:
        super().__init__(source)
        self.text = text
        self.reads: list[RegisterRead] = []
        # (nmi, suffix) -> [(first day, last day, line)] to refuse overlapping read periods
        self.periods: dict[tuple[str, str], list[tuple[date, date, int]]] = {}

    def parse(self) -> _Parsed:
        header = None
        end_line: int | None = None
        after_250 = False  # a 550 may follow only a 250 (its B2B details)
        for lineno, raw in enumerate(self.text.split("\n"), 1):
            line = raw.rstrip("\r")
            if not line.strip():
                continue
            fields = line.split(",") if '"' not in line else next(csv.reader([line]))
            indicator = fields[0].strip()
            if end_line is not None:
                raise self.fail(lineno, "RECORD_AFTER_END",
                                f"{indicator} record after the 900 end-of-data record on line {end_line}")
            if header is None:
                header = self.header(lineno, fields)
                continue
            if indicator == "250":
                self.record_250(lineno, fields)
            elif indicator == "550":
                if not after_250:
                    raise self.fail(lineno, "OUT_OF_ORDER", "550 record not directly after a 250 record")
                if not 4 <= len(fields) <= 5:
                    raise self.fail(lineno, "BAD_RECORD",
                                    f"550 record has {len(fields)} fields, expected 5 (550, PreviousTransCode, "
                                    "PreviousRetServiceOrder, CurrentTransCode, CurrentRetServiceOrder)")
            elif indicator == "900":
                end_line = lineno
            elif indicator == "100":
                raise self.fail(lineno, "BAD_HEADER", "second 100 header record (files must not be concatenated)")
            else:
                raise self.fail(lineno, "UNKNOWN_RECORD",
                                f"unknown record indicator {indicator!r} (NEM13 has 100, 250, 550 and 900; "
                                "an MDFF file holds NEM12 or NEM13 data, not both)")
            after_250 = indicator == "250"
        if header is None:
            raise self.fail(None, "EMPTY_FILE", "the file is empty (no records)")
        if end_line is None:
            raise self.fail(None, "MISSING_END_RECORD", "no 900 end-of-data record: the file may be truncated")
        if not self.reads:
            raise self.fail(None, "NO_DATA", "no 250 basic meter data records: header and end record only")
        assert self.created is not None
        return _Parsed(self.created, header.from_participant, header.to_participant, self.reads)

    # -- 250 ---------------------------------------------------------------------------------------

    def record_250(self, lineno: int, fields: list[str]) -> None:
        n = len(_FIELDS_250) + 1
        if len(fields) not in (n - 1, n):
            raise self.fail(lineno, "BAD_RECORD",
                            f"250 record has {len(fields)} fields, expected {n} (250, {', '.join(_FIELDS_250)}; "
                            "MSATSLoadDateTime may be omitted)")
        f = [x.strip() for x in fields] + [""] * (n - len(fields))
        (_, nmi, config, register_id, suffix, _stream, _serial, direction, prev_text, prev_at_text, prev_q,
         prev_reason, _prev_desc, cur_text, cur_at_text, cur_q, cur_reason, _cur_desc, qty_text, uom_text,
         next_read, update_text, msats_text) = f
        if not _ID_RE.fullmatch(nmi):
            raise self.fail(lineno, "BAD_NMI", f"250 record NMI {nmi!r} is not 1-10 letters/digits")
        what = f"250 record for {nmi}/{suffix}"
        if not _SUFFIX_RE.fullmatch(suffix):
            raise self.fail(lineno, "BAD_SUFFIX",
                            f"250 record for NMI {nmi} has NMISuffix {suffix!r}, expected 2 letters/digits such "
                            "as 11")
        suffix = suffix.upper()
        configured = {config[i : i + 2].upper() for i in range(0, len(config), 2)}
        if len(config) % 2 or suffix not in configured:
            raise self.fail(lineno, "BAD_SUFFIX",
                            f"{what}: NMISuffix {suffix} is not one of the suffixes in NMIConfiguration {config!r}")
        if direction not in ("E", "I"):
            raise self.fail(lineno, "BAD_DIRECTION",
                            f"{what} has DirectionIndicator {direction!r}, expected E (export from the network) "
                            "or I (import into the network)")
        uom_key = uom_text.upper()
        if uom_key not in _ENERGY_UOMS:
            if uom_key in _OTHER_UOMS:
                raise self.fail(lineno, "UNSUPPORTED_UOM",
                                f"{what} has unit of measure {uom_text!r}: only energy registers (kWh, kVArh ...) "
                                "accumulate consumption that can be spread over days")
            raise self.fail(lineno, "BAD_UOM",
                            f"{what} has unit of measure {uom_text!r}, not an MDFF unit (kWh, kVArh, ...)")
        uom, letter_e, letter_i = _ENERGY_UOMS[uom_key]
        previous = self.check_read(lineno, prev_text, f"{what} PreviousRegisterRead")
        current = self.check_read(lineno, cur_text, f"{what} CurrentRegisterRead")
        prev_at = self.check_datetime(lineno, prev_at_text, 14, f"{what} PreviousRegisterReadDateTime")
        cur_at = self.check_datetime(lineno, cur_at_text, 14, f"{what} CurrentRegisterReadDateTime")
        if cur_at <= prev_at:
            raise self.fail(lineno, "BAD_READ_PERIOD",
                            f"{what}: the current read ({cur_at_text}) is not after the previous read "
                            f"({prev_at_text})")
        for q, label in ((prev_q, "PreviousQualityMethod"), (cur_q, "CurrentQualityMethod")):
            if not _QUALITY_RE.fullmatch(q):
                raise self.fail(lineno, "BAD_QUALITY",
                                f"{what} has {label} {q!r}; expected a quality flag A, E, S, F or N optionally "
                                "followed by a 2-digit method flag")
        prev_reason_code = self.check_reason(lineno, prev_reason, f"{what} PreviousReasonCode")
        cur_reason_code = self.check_reason(lineno, cur_reason, f"{what} CurrentReasonCode")
        if cur_q[0] != "A":
            quality, reason = cur_q[0], cur_reason_code
        else:
            quality, reason = prev_q[0], prev_reason_code if prev_q[0] != "A" else cur_reason_code
        if not _QUANTITY_RE.fullmatch(qty_text):
            raise self.fail(lineno, "BAD_QUANTITY",
                            f"{what} has Quantity {qty_text!r}, not a decimal number (at most 15 digits)")
        stated = Decimal(qty_text)
        if stated.quantize(_SCALE) != stated or previous.quantize(_SCALE) != previous \
                or current.quantize(_SCALE) != current:
            raise self.fail(lineno, "BAD_QUANTITY",
                            f"{what} has Quantity {qty_text} or register reads with more than 6 decimal places")
        resolution = Decimal(1).scaleb(-min(len(_READ_RE.fullmatch(t).group(2) or "")  # type: ignore[union-attr]
                                             for t in (prev_text, cur_text)))
        match = self.consumption(prev_text, cur_text, previous, current, stated, direction, resolution)
        if match is None:
            if current >= previous:
                said = f"the register advanced {current - previous} ({prev_text} -> {cur_text})"
            else:
                said = (f"the register advanced {self.rollover(prev_text, cur_text, previous, current)} "
                        f"({prev_text} -> {cur_text}, rolled over) or, read as a correction, {current - previous}")
            raise self.fail(lineno, "QUANTITY_MISMATCH",
                            f"{what} says Quantity {qty_text} {uom_text} but {said}; they must agree within the "
                            f"register's resolution {resolution} {uom} (the reads' last decimal place)")
        advance, consumption, correction = match
        if next_read:
            self.check_date(lineno, next_read, f"{what} NextScheduledReadDate")
        if update_text:
            version, version_source = self.check_datetime(lineno, update_text, 14, f"{what} UpdateDateTime"), \
                "UpdateDateTime"
        elif msats_text:
            version, version_source = self.check_datetime(lineno, msats_text, 14, f"{what} MSATSLoadDateTime"), \
                "MSATSLoadDateTime"
        else:
            assert self.created is not None
            version, version_source = self.created, "FileDateTime"
        if update_text and msats_text:
            self.check_datetime(lineno, msats_text, 14, f"{what} MSATSLoadDateTime")

        first = prev_at.astimezone(AEST).date()
        last = max(first, cur_at.astimezone(AEST).date() - timedelta(days=1))
        for other_first, other_last, other_line in self.periods.get((nmi, suffix), []):
            if first <= other_last and other_first <= last:
                raise self.fail(lineno, "OVERLAPPING_READS",
                                f"{what} read period {first}..{last} shares days with the read period "
                                f"{other_first}..{other_last} on line {other_line}")
        self.periods.setdefault((nmi, suffix), []).append((first, last, lineno))
        days = tuple(first + timedelta(days=i) for i in range((last - first).days + 1))
        channel = (letter_e if direction == "E" else letter_i) + suffix
        notes = []
        if correction:
            notes.append("a correction: the register went down, credited")
        if consumption != advance:
            gap = consumption - advance
            notes.append(f"the Quantity; the registers advanced {advance}, {abs(gap)} {'less' if gap > 0 else 'more'}"
                         f", within their resolution {resolution}")
        note = f" ({'; '.join(notes)})" if notes else ""
        source_file = (f"{SPREAD_MARK} {prev_text}->{cur_text} = {consumption} {uom}{note} spread evenly over "
                       f"{len(days)} days: {self.source}")
        readings = tuple(
            MeterReading(nmi, channel, uom, start, start + timedelta(days=1), value, quality, reason, version,
                         version_source, source_file, lineno, correction)
            for start, value in zip((_nem_midnight(d) for d in days), spread_evenly(consumption, len(days)),
                                    strict=True)
        )
        self.reads.append(RegisterRead(
            nmi, suffix, register_id, direction, previous, prev_at, current, cur_at, advance, consumption,
            resolution, correction, uom, quality, reason, version, version_source, days, lineno, readings))

    @staticmethod
    def rollover(prev_text: str, cur_text: str, previous: Decimal, current: Decimal) -> Decimal:
        """The advance of a register that rolled over at 10**digits (digits as written in the file)."""
        digits = max(len(_READ_RE.fullmatch(t).group(1)) for t in (prev_text, cur_text))  # type: ignore[union-attr]
        return Decimal(10) ** digits - previous + current

    @classmethod
    def consumption(cls, prev_text: str, cur_text: str, previous: Decimal, current: Decimal, stated: Decimal,
                    direction: str, resolution: Decimal) -> tuple[Decimal, Decimal, bool] | None:
        """(register advance, consumption billed, is a correction) — the reading of the registers that the
        Quantity agrees with within ``resolution`` (see the module docstring), or ``None`` when none does.

        A forward advance or a roll-over bills the Quantity (its negative on an ``I`` register that signs
        generation negative), never below zero; a register that went down with the Quantity (either sign on
        an ``I`` register) matching ``current − previous`` is a correction: ``current − previous`` adjusted
        to the Quantity, negative."""
        signs = (1, -1) if direction == "I" else (1,)
        if current >= previous:
            readings = [(current - previous, False)]
        else:
            readings = [(cls.rollover(prev_text, cur_text, previous, current), False), (current - previous, True)]
        for advance, correction in readings:
            for sign in signs:
                billed = sign * stated  # in the register's orientation
                if not correction and billed < 0:
                    continue  # a forward advance or a roll-over is never below zero
                if correction:
                    if billed > 0 and direction != "I":
                        continue  # on an E register a correction says so with a negative Quantity
                    billed = -abs(billed)  # an I register may sign it either way
                if abs(billed - advance) < resolution:
                    return advance, billed, correction
        return None

    # -- field checks ------------------------------------------------------------------------------

    def check_read(self, lineno: int, text: str, what: str) -> Decimal:
        if not _READ_RE.fullmatch(text):
            raise self.fail(lineno, "BAD_REGISTER_READ",
                            f"{what} {text!r} is not an unsigned decimal number (at most 15 digits)")
        return Decimal(text)



def _nem_midnight(day: date) -> datetime:
    """00:00 NEM time (AEST, UTC+10) of ``day``, in UTC."""
    return datetime(day.year, day.month, day.day, tzinfo=AEST).astimezone(UTC)
