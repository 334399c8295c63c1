"""Daily exports (issue 15, seed 004): the pure rules. No I/O, clock or drivers here: ``export_run``
reads the stores, writes the destination and records the history; this module decides.

What one export is: one **dataset** (``ledger_lines``, ``invoices``, ``usage_windows``) for one
**period**, a UTC day ``[D 00:00, D+1 00:00)``:

- ``ledger_lines``: the lines appended to the ledger during the day (``appended_at``), every column;
- ``invoices``: the invoices finalized during the day (``finalized_at``): numbered, frozen bills;
- ``usage_windows``: the latest revision (on ``usage.windows``) of every window that starts in the day.

The rows are cut into files of at most ``max_rows`` rows (``partition_rows``), each written as CSV and as
Parquet; a day without rows still gets one (empty) file of each format. A manifest (``build_manifest``)
names every file with its row count and SHA-256, the period, the generation and the version.

Prechecks (``precheck_*``), all run before anything is written; one failing exports nothing:

- **reconciliation**: ``operations.reconcile`` accounts for every input and its tie-out finds no break
  (``Report.clean``);
- **no open late windows**: no reading refused by a billing rule (``usage.late``) is still unresolved in
  the export's scope (``open_refusals``: resolved = the same reading, at that version or higher, was
  accepted onto ``usage.events`` since, e.g. through ``pipeline late replay``). The scope
  (``late_blocking``) is the day itself for usage windows, and each exported row's account and billing
  period for ledger lines and invoices (widened by a day on each side: the periods are local dates).

Versions (``plan_version``): exports of one (destination, generation, dataset, day) are numbered 1, 2,
...; exporting again writes the next version only if the content (``content_sha256``) or the maximum
rows per file differ from the latest complete export there; otherwise nothing is written (unchanged).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlparse

from pipeline.operations.reconcile import Forwarded, Report
from pipeline.records import LateEvent, UsageWindow
from pipeline.windowing.windows import _ms

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
FORMATS = ("csv", "parquet")
LIVE = "live"

# column kinds: text, int, decimal (numeric(28, 6)), date, timestamp (UTC, microseconds), json (text)
Column = tuple[str, str]

LEDGER_LINE_COLUMNS: tuple[Column, ...] = (
    ("line_id", "text"), ("invoice_id", "text"), ("account", "text"), ("period_start", "date"),
    ("period_end", "date"), ("currency", "text"), ("component_id", "text"), ("component_kind", "text"),
    ("band", "text"), ("quantity", "decimal"), ("unit", "text"), ("rate", "decimal"), ("amount", "decimal"),
    ("period_total", "decimal"), ("price_book_id", "text"), ("price_book_version", "int"), ("cause", "text"),
    ("line_kind", "text"), ("adjusts_invoice_id", "text"), ("adjusts_invoice_number", "text"),
    ("explanation", "json"), ("source_topic", "text"), ("source_partition", "int"), ("source_offset", "int"),
    ("appended_at", "timestamp"),
)
INVOICE_COLUMNS: tuple[Column, ...] = (
    ("invoice_id", "text"), ("invoice_number", "text"), ("account", "text"), ("period_start", "date"),
    ("period_end", "date"), ("currency", "text"), ("status", "text"), ("series", "text"),
    ("sequence_number", "int"), ("bill_date", "date"), ("due_date", "date"), ("previous_balance", "decimal"),
    ("charges_total", "decimal"), ("payments_total", "decimal"), ("amount_due", "decimal"),
    ("opened_at", "timestamp"), ("close_at", "timestamp"), ("finalized_at", "timestamp"),
)
USAGE_WINDOW_COLUMNS: tuple[Column, ...] = (
    ("window_id", "text"), ("account", "text"), ("series", "text"), ("metric", "text"), ("unit", "text"),
    ("window_start", "timestamp"), ("window_end", "timestamp"), ("revision", "int"), ("timing", "text"),
    ("value", "decimal"), ("delta", "decimal"), ("count", "int"), ("qualities", "text"), ("sources", "text"),
    ("watermark", "timestamp"),
)
COLUMNS: dict[str, tuple[Column, ...]] = {
    "ledger_lines": LEDGER_LINE_COLUMNS, "invoices": INVOICE_COLUMNS, "usage_windows": USAGE_WINDOW_COLUMNS,
}
DATASETS = tuple(COLUMNS)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ExportError(ValueError):
    """A request that cannot be exported as given (unknown dataset, bad date, destination or generation)."""


# --- what is exported ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Period:
    """One UTC day, ``[start, end)``."""

    day: date

    @property
    def start(self) -> datetime:
        return datetime.combine(self.day, time(0), UTC)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=1)

    @property
    def label(self) -> str:
        return self.day.isoformat()


def parse_period(text: str) -> Period:
    """``YYYY-MM-DD`` → the UTC day. Raises ``ExportError``."""
    try:
        return Period(date.fromisoformat(text))
    except ValueError:
        raise ExportError(f"the export date must be YYYY-MM-DD, got {text!r}") from None


def check_datasets(names: Iterable[str]) -> list[str]:
    """The datasets named, in ``DATASETS`` order, each once. Raises ``ExportError`` for an unknown one."""
    wanted = list(names)
    unknown = sorted(set(wanted) - set(DATASETS))
    if unknown:
        raise ExportError(f"unknown dataset {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    return [d for d in DATASETS if d in wanted]


def check_generation(name: str) -> str:
    """A generation name usable in a path (letters, digits, ``_ . -``; at most 63). Raises ``ExportError``."""
    if not _NAME.match(name):
        raise ExportError(f"generation {name!r} must be 1-63 letters, digits, '_', '.' or '-'")
    return name


@dataclass(frozen=True, slots=True)
class Destination:
    """Where exports go: ``file:///abs/path`` (scheme ``file``, ``root`` the folder) or ``s3://bucket/prefix``
    (``root`` the bucket, ``prefix`` without slashes at either end)."""

    url: str
    scheme: str
    root: str
    prefix: str


def parse_destination(url: str) -> Destination:
    """Parse ``file:///abs/path`` or ``s3://bucket[/prefix]``. Raises ``ExportError``."""
    parts = urlparse(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ExportError(f"a file destination needs an absolute path, file:///path, got {url!r}")
        return Destination(url, "file", parts.path.rstrip("/") or "/", "")
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ExportError(f"an s3 destination needs a bucket, s3://bucket/prefix, got {url!r}")
        return Destination(url, "s3", parts.netloc, parts.path.strip("/"))
    raise ExportError(f"destination {url!r}: the scheme must be file:// or s3://")


def export_folder(generation: str, dataset: str, period: Period, version: int) -> str:
    """The folder of one export under the destination: ``<generation>/<dataset>/<day>/v<version>``."""
    return f"{generation}/{dataset}/{period.label}/v{version}"


def file_name(index: int, fmt: str) -> str:
    """``part-00000.csv`` ... (``index`` from 0)."""
    return f"part-{index:05d}.{fmt}"


# --- files -------------------------------------------------------------------------------------------------
def partition_rows(n_rows: int, max_rows: int) -> list[range]:
    """Row index ranges of the files: consecutive, each at most ``max_rows`` long, covering ``0..n_rows``;
    one empty range when there are no rows (a day without rows still has a file). Raises ``ValueError``
    when ``max_rows`` < 1 or ``n_rows`` < 0."""
    if max_rows < 1 or n_rows < 0:
        raise ValueError(f"need max_rows >= 1 and n_rows >= 0, got {max_rows}, {n_rows}")
    if n_rows == 0:
        return [range(0, 0)]
    return [range(i, min(i + max_rows, n_rows)) for i in range(0, n_rows, max_rows)]


def _utc_text(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no time zone")
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def csv_value(kind: str, value: Any) -> str:
    """One cell as text: ``None`` → empty; decimals in plain notation (never exponent); dates ISO; timestamps
    ISO 8601 UTC with ``Z``; json compact with sorted keys."""
    if value is None:
        return ""
    if kind == "decimal":
        return format(Decimal(value), "f")
    if kind == "timestamp":
        return _utc_text(value)
    if kind == "date":
        return value.isoformat()
    if kind == "json":
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return str(value)


def csv_bytes(columns: Sequence[Column], rows: Sequence[Sequence[Any]]) -> bytes:
    """UTF-8 CSV (RFC 4180 quoting, ``\\n`` line ends): a header of the column names, then one line per row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([name for name, _ in columns])
    kinds = [kind for _, kind in columns]
    for row in rows:
        writer.writerow([csv_value(k, v) for k, v in zip(kinds, row, strict=True)])
    return out.getvalue().encode()


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def content_sha256(columns: Sequence[Column], rows: Sequence[Sequence[Any]]) -> str:
    """The SHA-256 of the whole dataset as one CSV (``csv_bytes``): equal for equal rows, whatever the file
    sizes."""
    return sha256(csv_bytes(columns, rows))


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One written file: ``name`` (relative to the export folder), ``format`` (csv, parquet), ``rows``,
    ``first_row`` (index of its first row in the dataset), ``size`` (bytes), ``sha256`` (hex)."""

    name: str
    format: str
    rows: int
    first_row: int
    size: int
    sha256: str


def build_manifest(*, dataset: str, period: Period, generation: str, version: int, destination: str,
                   folder: str, created_at: datetime, max_rows: int, row_count: int, content: str,
                   files: Sequence[FileEntry], prechecks: Sequence[Precheck]) -> dict[str, Any]:
    """The manifest of one export (written as ``manifest.json`` in its folder, after every file).

    Raises ``ValueError`` when the files of a format do not add up to ``row_count`` rows or one holds more
    than ``max_rows``."""
    for fmt in {f.format for f in files}:
        of_fmt = [f for f in files if f.format == fmt]
        if sum(f.rows for f in of_fmt) != row_count or any(f.rows > max_rows for f in of_fmt):
            raise ValueError(f"{fmt} files hold {[f.rows for f in of_fmt]} rows for {row_count} (max {max_rows})")
    return {
        "manifest_format": MANIFEST_FORMAT,
        "export_id": f"{folder}",
        "dataset": dataset,
        "generation": generation,
        "version": version,
        "period": {"day": period.label, "start": _utc_text(period.start), "end": _utc_text(period.end)},
        "destination": destination,
        "created_at": _utc_text(created_at),
        "max_rows_per_file": max_rows,
        "row_count": row_count,
        "content_sha256": content,
        "columns": [{"name": n, "type": k} for n, k in COLUMNS[dataset]],
        "files": [{"name": f.name, "format": f.format, "rows": f.rows, "first_row": f.first_row,
                   "bytes": f.size, "sha256": f.sha256} for f in files],
        "prechecks": [{"name": p.name, "passed": p.passed, "detail": list(p.detail)} for p in prechecks],
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as UTF-8 JSON (sorted keys, indented, final newline)."""
    return (json.dumps(manifest, sort_keys=True, indent=1) + "\n").encode()


# --- rows --------------------------------------------------------------------------------------------------
def usage_window_rows(latest: Iterable[UsageWindow], period: Period) -> list[tuple[Any, ...]]:
    """The rows of ``usage_windows``: the given latest revisions of the windows starting in ``period``,
    ordered by window id, in ``USAGE_WINDOW_COLUMNS`` order (qualities and sources joined with ``;``)."""
    chosen = sorted((w for w in latest if period.start <= w.window_start < period.end), key=lambda w: w.window_id)
    return [(w.window_id, w.account, w.series, w.metric, w.unit, w.window_start, w.window_end, w.revision, w.timing,
             w.value, w.delta, w.count, ";".join(w.qualities), ";".join(w.sources), w.watermark) for w in chosen]


# --- prechecks ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Precheck:
    """One precheck's outcome: ``name`` (``reconciliation``, ``late``), ``passed``, ``detail`` (lines for a
    person)."""

    name: str
    passed: bool
    detail: tuple[str, ...] = ()


def precheck_reconciliation(report: Report) -> Precheck:
    """Passes when every input is billed, dead-lettered or refused and the tie-out (when the report has
    one) found no break (``Report.clean``)."""
    return Precheck("reconciliation", report.clean, tuple(report.lines()))


def open_refusals(refused: Iterable[LateEvent], forwarded: Iterable[Forwarded]) -> list[LateEvent]:
    """The refusals not resolved since: a refusal is resolved once a usage event of the same reading
    (event id) at its version or higher is on ``usage.events`` and was not itself refused by windowing
    (``late replay`` re-submitted it after the cause was fixed, or the reading arrived again and was
    accepted). Order kept."""
    refusals = list(refused)
    refused_at = {(x.input_partition, x.input_offset) for x in refusals if x.stage == "windowing"}
    accepted: dict[str, int] = {}
    for ev in forwarded:
        if (ev.partition, ev.offset) not in refused_at:
            accepted[ev.event_id] = max(accepted.get(ev.event_id, -1), ev.version_ms)
    return [x for x in refusals if accepted.get(x.event.event_id, -1) < _ms(x.event.version)]


@dataclass(frozen=True, slots=True)
class Scope:
    """Usage that an export depends on: ``[start, end)`` (UTC), for ``account`` (``None``: every account)."""

    account: str | None
    start: datetime
    end: datetime


def day_scope(period: Period) -> list[Scope]:
    """The scope of a usage-window export: the day, every account."""
    return [Scope(None, period.start, period.end)]


def billing_scopes(periods: Iterable[tuple[str, date, date]]) -> list[Scope]:
    """The scope of ledger-line and invoice exports: each (account, billing period start, exclusive end),
    local dates, widened by one day each side (every time zone is within a day of UTC). Deduplicated."""
    out = {(a, datetime.combine(s, time(0), UTC) - timedelta(days=1), datetime.combine(e, time(0), UTC)
            + timedelta(days=1)) for a, s, e in periods}
    return [Scope(*x) for x in sorted(out)]


def late_blocking(open_: Iterable[LateEvent], scopes: Sequence[Scope]) -> list[LateEvent]:
    """The open refusals inside any of ``scopes`` (their reading's start time and account)."""
    by_account: dict[str | None, list[Scope]] = {}
    for s in scopes:
        by_account.setdefault(s.account, []).append(s)
    return [x for x in open_ if any(s.start <= x.event.event_time < s.end
                                    for s in by_account.get(x.event.account, []) + by_account.get(None, []))]


def precheck_late(blocking: Sequence[LateEvent]) -> Precheck:
    """Passes when no open refusal is in scope; otherwise names them by reason and account (and the first
    reading's time), with what to do."""
    if not blocking:
        return Precheck("late", True, ("no open late readings in scope",))
    counts = Counter((x.reason, x.event.account) for x in blocking)
    first = min(x.event.event_time for x in blocking)
    detail = [f"{n:,} refused readings still open: {reason} for {account}" for (reason, account), n
              in sorted(counts.items())]
    detail.append(f"earliest reading {_utc_text(first)}; fix the cause, then `pipeline late replay` "
                  "(see `pipeline late list`)")
    return Precheck("late", False, tuple(detail))


# --- versions ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PastExport:
    """One history row of the same (destination, generation, dataset, day): ``version``, ``status``
    (``WRITING``, ``COMPLETE``, ``FAILED``), ``content_sha256``, ``max_rows``."""

    version: int
    status: str
    content_sha256: str
    max_rows: int


@dataclass(frozen=True, slots=True)
class VersionPlan:
    """``version`` to write, or ``None`` with ``unchanged`` = the complete version that already holds this
    content."""

    version: int | None
    unchanged: int | None = None


def plan_version(history: Iterable[PastExport], content: str, max_rows: int) -> VersionPlan:
    """The rule: if the latest COMPLETE export holds the same content with the same ``max_rows``, nothing is
    written (``unchanged``); otherwise the next version after every one recorded (failed and unfinished ones
    included: their number is never reused)."""
    past = list(history)
    complete = [p for p in past if p.status == "COMPLETE"]
    if complete:
        latest = max(complete, key=lambda p: p.version)
        if latest.content_sha256 == content and latest.max_rows == max_rows:
            return VersionPlan(None, latest.version)
    return VersionPlan(max((p.version for p in past), default=0) + 1)
