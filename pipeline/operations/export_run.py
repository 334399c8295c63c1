"""``pipeline export``: read the ledger and the topics, run the prechecks, write the files and the manifest,
record the history. The rules it applies are ``pipeline.operations.export`` (pure); this module does the I/O.

Order, so that a failure leaves nothing half-done:

1. the rows of every requested dataset are read from Postgres (ledger lines, invoices), then the topics
   (``reconcile.take_snapshot``: every input, refusal and latest window revision, ``read_committed``): the
   reconciliation then covers at least what the rows hold;
2. every precheck of every dataset runs; one failure raises ``PrecheckFailed`` before anything is written
   (but when only ledger lines and invoices are asked for and each is unchanged since its latest complete
   export to the destination, nothing is checked or written: a daily re-run without news is cheap);
3. per dataset: ``plan_version`` against ``export_history`` (unchanged content: nothing is written); the
   history row is inserted (``WRITING``, claiming the version under a unique key), the files are written,
   the manifest last; the row becomes ``COMPLETE`` (or ``FAILED`` with the error, re-raised).

Deadlines: Kafka reads 120 s each (``take_snapshot``), Postgres connect 10 s and statements
``PIPELINE_POSTGRES_STATEMENT_TIMEOUT_S``, S3 calls as ``runtime.objectstore`` says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tqdm import tqdm

from pipeline.operations import export as ex

LEDGER_SQL = ("SELECT " + ", ".join(n for n, _ in ex.LEDGER_LINE_COLUMNS)
              + " FROM invoice_lines WHERE appended_at >= %s AND appended_at < %s ORDER BY line_id COLLATE \"C\"")
INVOICES_SQL = ("SELECT " + ", ".join(n for n, _ in ex.INVOICE_COLUMNS)
                + " FROM invoices WHERE finalized_at >= %s AND finalized_at < %s ORDER BY invoice_id COLLATE \"C\"")
HISTORY_SQL = ("SELECT version, status, content_sha256, max_rows FROM export_history WHERE destination = %s "
               "AND generation = %s AND dataset = %s AND period_day = %s")
CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}


class PrecheckFailed(RuntimeError):
    """A precheck failed: nothing was exported. ``failed``: (dataset, Precheck) of every failed check."""

    def __init__(self, failed: list[tuple[str, ex.Precheck]]) -> None:
        self.failed = failed
        lines = []
        for dataset, check in failed:
            lines.append(f"precheck {check.name} failed for {dataset}:")
            lines.extend(f"  {d}" for d in check.detail)
        super().__init__("\n".join(lines))


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What one dataset's export did: ``version`` written (``None`` when unchanged, then ``unchanged`` is the
    version holding the same content), ``rows``, ``files`` (per format), ``location`` (folder URL)."""

    dataset: str
    version: int | None
    unchanged: int | None
    rows: int
    files: int
    location: str


def _read_rows(settings: Any, datasets: list[str], period: ex.Period) -> dict[str, list[tuple]]:
    from pipeline.runtime import postgres

    rows: dict[str, list[tuple]] = {}
    wanted = [d for d in datasets if d in ("ledger_lines", "invoices")]
    if not wanted:
        return rows
    with postgres.connect(settings.database_url, statement_timeout_s=settings.postgres_statement_timeout_s) as conn:
        for d in wanted:
            sql = LEDGER_SQL if d == "ledger_lines" else INVOICES_SQL
            rows[d] = [tuple(r) for r in conn.execute(sql, (period.start, period.end))]
    return rows


def _scope_of(dataset: str, rows: list[tuple], period: ex.Period) -> list[ex.Scope]:
    if dataset == "usage_windows":
        return ex.day_scope(period)
    names = [n for n, _ in ex.COLUMNS[dataset]]
    a, s, e = names.index("account"), names.index("period_start"), names.index("period_end")
    return ex.billing_scopes((r[a], r[s], r[e]) for r in rows)


def run_export(settings: Any, datasets: list[str], period: ex.Period, destination: str, generation: str,
               max_rows: int, progress: bool = True, echo: Callable[[str], None] = print) -> list[ExportResult]:
    """Export ``datasets`` for ``period`` to ``destination`` (see the module doc). Returns one result per dataset.

    Raises ``ExportError`` (bad request), ``PrecheckFailed`` (nothing written), ``StoreError`` (the destination
    failed; the history row says FAILED), ``KafkaIOError`` or a database error when the stack does not answer.
    """
    from pipeline.operations.reconcile import reconcile, take_snapshot
    from pipeline.refstore import postgres_loader
    from pipeline.runtime import postgres
    from pipeline.runtime.objectstore import open_store
    from pipeline.stages import window_policies

    dest = ex.parse_destination(destination)
    ex.check_generation(generation)
    datasets = ex.check_datasets(datasets)
    store = open_store(dest, settings)
    db = postgres.Reconnecting(settings.database_url, give_up_s=60.0,
                               statement_timeout_s=settings.postgres_statement_timeout_s)
    try:
        rows = _read_rows(settings, datasets, period)
        if "usage_windows" not in datasets:  # nothing changed since the last export: nothing to check or write
            plans = {d: _plan(db, dest, generation, d, rows[d], period, max_rows) for d in datasets}
            if all(p.version is None for p in plans.values()):
                return [_unchanged(store, d, rows[d], period, generation, plans[d], echo) for d in datasets]
        echo("reading the topics for the prechecks (reconciliation, refused readings) ...")
        snap = take_snapshot(settings)
        if "usage_windows" in datasets:
            rows["usage_windows"] = ex.usage_window_rows(snap.latest.values(), period)
        ref = postgres_loader(settings.database_url)()
        recon = ex.precheck_reconciliation(reconcile(snap, window_policies(settings), ref))
        open_late = ex.open_refusals(snap.refused, snap.forwarded)
        checks = {d: [recon, ex.precheck_late(ex.late_blocking(open_late, _scope_of(d, rows[d], period)))]
                  for d in datasets}
        failed = [(d, c) for d in datasets for c in checks[d] if not c.passed]
        if failed:
            raise PrecheckFailed(failed)
        return [_export_one(db, store, dest, d, rows[d], period, generation, max_rows, checks[d], progress, echo)
                for d in datasets]
    finally:
        db.close()


def _plan(db: Any, dest: ex.Destination, generation: str, dataset: str, rows: list[tuple], period: ex.Period,
          max_rows: int) -> ex.VersionPlan:
    content = ex.content_sha256(ex.COLUMNS[dataset], rows)
    past = db.run(lambda c: [ex.PastExport(*r) for r in c.execute(
        HISTORY_SQL, (dest.url, generation, dataset, period.day)).fetchall()])
    return ex.plan_version(past, content, max_rows)


def _unchanged(store: Any, dataset: str, rows: list[tuple], period: ex.Period, generation: str,
               plan: ex.VersionPlan, echo: Callable[[str], None]) -> ExportResult:
    location = store.url(ex.export_folder(generation, dataset, period, plan.unchanged or 0))
    echo(f"{dataset} {period.label}: unchanged since v{plan.unchanged} ({len(rows):,} rows), nothing written: "
         f"{location}")
    return ExportResult(dataset, None, plan.unchanged, len(rows), 0, location)


def _export_one(db: Any, store: Any, dest: ex.Destination, dataset: str, rows: list[tuple], period: ex.Period,
                generation: str, max_rows: int, checks: list[ex.Precheck], progress: bool,
                echo: Callable[[str], None]) -> ExportResult:
    from pipeline.runtime import postgres
    from pipeline.runtime.parquet import parquet_bytes

    columns = ex.COLUMNS[dataset]
    content = ex.content_sha256(columns, rows)
    plan = _plan(db, dest, generation, dataset, rows, period, max_rows)
    if plan.version is None:
        return _unchanged(store, dataset, rows, period, generation, plan, echo)
    folder = ex.export_folder(generation, dataset, period, plan.version)
    location = store.url(folder)
    export_id = f"{dest.url}#{folder}"
    parts = ex.partition_rows(len(rows), max_rows)
    try:
        db.run(lambda c: c.execute(
            "INSERT INTO export_history (export_id, destination, generation, dataset, period_day, version, location, "
            "status, row_count, file_count, max_rows, content_sha256) VALUES (%s, %s, %s, %s, %s, %s, %s, 'WRITING', "
            "%s, %s, %s, %s)", (export_id, dest.url, generation, dataset, period.day, plan.version, location,
                                len(rows), len(parts), max_rows, content)))
    except postgres.IntegrityError as exc:
        raise ex.ExportError(f"{dataset} {period.label} v{plan.version} is being written by another export "
                             f"right now; run again once it has finished") from exc
    try:
        files: list[ex.FileEntry] = []
        with tqdm(total=len(rows), unit="row", disable=not progress, desc=f"exporting {dataset}") as bar:
            for i, part in enumerate(parts):
                chunk = rows[part.start:part.stop]
                for fmt in ex.FORMATS:
                    data = ex.csv_bytes(columns, chunk) if fmt == "csv" else parquet_bytes(columns, chunk)
                    name = ex.file_name(i, fmt)
                    store.put(f"{folder}/{name}", data, CONTENT_TYPES[fmt])
                    files.append(ex.FileEntry(name, fmt, len(chunk), part.start, len(data), ex.sha256(data)))
                bar.update(len(chunk))
        manifest = ex.build_manifest(
            dataset=dataset, period=period, generation=generation, version=plan.version, destination=dest.url,
            folder=folder, created_at=datetime.now(UTC), max_rows=max_rows, row_count=len(rows), content=content,
            files=files, prechecks=checks)
        body = ex.manifest_bytes(manifest)
        store.put(f"{folder}/{ex.MANIFEST_NAME}", body, "application/json")
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        db.run(lambda c: c.execute("UPDATE export_history SET status = 'FAILED', error = %s, finished_at = now() "
                                   "WHERE export_id = %s", (error, export_id)))
        raise
    db.run(lambda c: c.execute(
        "UPDATE export_history SET status = 'COMPLETE', manifest = %s, manifest_sha256 = %s, finished_at = now() "
        "WHERE export_id = %s", (postgres.jsonb(manifest), ex.sha256(body), export_id)))
    echo(f"{dataset} {period.label}: v{plan.version}, {len(rows):,} rows in {len(parts)} file(s) per format: "
         f"{location}")
    return ExportResult(dataset, plan.version, None, len(rows), len(parts), location)


def history(settings: Any, dataset: str | None = None, day: Any = None) -> list[tuple]:
    """Rows of ``export_history`` (optionally of one dataset and day), newest first: (started_at, dataset,
    period_day, version, status, row_count, file_count, location, error)."""
    from pipeline.runtime import postgres

    where, params = [], []
    if dataset:
        where.append("dataset = %s")
        params.append(dataset)
    if day:
        where.append("period_day = %s")
        params.append(day)
    sql = ("SELECT started_at, dataset, period_day, version, status, row_count, file_count, location, error "
           "FROM export_history" + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY started_at DESC, export_id")
    with postgres.connect(settings.database_url, statement_timeout_s=settings.postgres_statement_timeout_s) as conn:
        return [tuple(r) for r in conn.execute(sql, tuple(params))]
