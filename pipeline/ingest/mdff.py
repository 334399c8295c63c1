"""What NEM12 and NEM13 files share (AEMO Meter Data File Format, MDFF): the rejection error, text
decoding, the 100 header record and the field checks. ``nem12`` and ``nem13`` build on it."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, timezone

from nemreader.nem_reader import parse_100_row, parse_datetime

AEST = timezone(timedelta(hours=10), "AEST")  # MDFF times are NEM time: AEST all year
_REASON_CODE_RE = re.compile(r"[0-9]{1,3}")


class MdffError(ValueError):
    """An MDFF file was rejected (``Nem12Error`` / ``Nem13Error``).

    Attributes:
        file: the file's base name (``zip!member`` for a member of a zip).
        line: 1-based line number of the offending record, or ``None`` for whole-file problems.
        reason: short machine code (the reader's ``REASONS``).
        problem: the human explanation, naming the record and what is wrong with it.
    """

    def __init__(self, file: str, line: int | None, reason: str, problem: str) -> None:
        self.file = file
        self.line = line
        self.reason = reason
        self.problem = problem
        where = f"{file} line {line}" if line is not None else file
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep it picklable (multiprocessing, logging handlers)
        return (type(self), (self.file, self.line, self.reason, self.problem))


def decode_text(data: bytes, source: str, error: type[MdffError]) -> str:
    """The file's text (UTF-8, BOM allowed; ASCII is a subset). Raises ``error`` with reason
    ``BAD_ENCODING`` and the line of the first undecodable byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(source, line, "BAD_ENCODING",
                    f"byte 0x{data[exc.start]:02x} is not UTF-8/ASCII text") from exc


class MdffParser:
    """Base of the line parsers: ``fail`` builds the reader's error; ``header`` checks the 100
    record (MDFF clause 4.1: 100, VersionHeader, DateTime(12), FromParticipant, ToParticipant);
    the ``check_*`` methods validate fields. Subclasses set ``error`` and ``version``."""

    error: type[MdffError] = MdffError
    version = ""

    def __init__(self, source: str) -> None:
        self.source = source
        self.created: datetime | None = None

    def fail(self, line: int | None, reason: str, problem: str) -> MdffError:
        return self.error(self.source, line, reason, problem)

    def header(self, lineno: int, fields: list[str]):
        indicator = fields[0].strip()
        if indicator != "100":
            raise self.fail(lineno, "MISSING_HEADER",
                            f"the first record is a {indicator!r} record, not the 100 header record")
        if len(fields) < 5:
            raise self.fail(lineno, "BAD_HEADER",
                            f"100 header record has {len(fields)} fields, expected 5 (100, VersionHeader, "
                            "DateTime, FromParticipant, ToParticipant)")
        version = fields[1].strip()
        if version.upper() != self.version:
            kind = "interval" if self.version == "NEM12" else "accumulation"
            raise self.fail(lineno, f"NOT_{self.version}",
                            f"100 header says {version!r}: only {self.version} {kind} data files are accepted")
        self.created = self.check_datetime(lineno, fields[2], 12, "100 header DateTime")
        return parse_100_row([f.strip() for f in fields], self.source)

    def check_reason(self, lineno: int, text: str, what: str) -> str | None:
        """A ReasonCode (up to 3 digits) or ``None`` when empty; ``what`` names the field."""
        if not text:
            return None
        if not _REASON_CODE_RE.fullmatch(text):
            raise self.fail(lineno, "BAD_REASON_CODE", f"{what} {text!r} is not a number")
        return text

    def check_date(self, lineno: int, text: str, what: str) -> date:
        """An MDFF Date(8) ``yyyymmdd``."""
        parsed = parse_datetime(text) if len(text) == 8 and text.isdigit() else None
        if parsed is None:
            raise self.fail(lineno, "BAD_DATE", f"{what} {text!r} is not a valid date yyyymmdd")
        return parsed.date()

    def check_datetime(self, lineno: int, text: str, width: int, what: str) -> datetime:
        """An MDFF DateTime(12) or DateTime(14) in NEM time, returned in UTC."""
        text = text.strip()
        parsed = parse_datetime(text) if len(text) == width and text.isdigit() else None
        if parsed is None:
            layout = "yyyymmddhhmm" if width == 12 else "yyyymmddhhmmss"
            raise self.fail(lineno, "BAD_DATE", f"{what} {text!r} is not a valid datetime {layout}")
        return parsed.replace(tzinfo=AEST).astimezone(UTC)
