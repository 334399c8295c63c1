"""Reference operations in Postgres (issue 15): apply checked changes with their audit rows, read history.

SQL only; the connection comes from ``pipeline.runtime.postgres`` (the one module importing psycopg).
``run_operations`` is the one write path of the CLI, the operator API and the CSV/JSON imports: in ONE
transaction, under an advisory lock (one reference change at a time), it reads the reference data,
checks every operation with ``pipeline.accounts.rules`` and, only if none has a problem (and not
``dry_run``), writes each change (an INSERT, or an UPDATE that closes an open range: ``effective_to IS
NULL`` → a date, refused if the range is no longer open) and one ``reference_changes`` row per change.
The stages see the change at their next reference refresh (``PIPELINE_REFERENCE_REFRESH_S``, and at once
on an NMI or subject they do not know), exactly as after ``pipeline load reference``; the rating stage then
re-rates the periods of an account whose service ranges or plans changed (``rating.processor``, ``ref|``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

from pipeline.accounts import rules
from pipeline.reference import Account, GasConversion, PlanAssignment, ServicePoint, TelemetrySubject
from pipeline.refstore import read_reference
from pipeline.runtime import postgres

NEM_TIME = timezone(timedelta(hours=10))  # the day ingest judges service dates on (pipeline.ingest.processor)
REFERENCE_LOCK = 0x2EF0_0015  # transaction-level advisory lock: one reference change at a time


class ConcurrentChange(RuntimeError):
    """A range to close was closed by someone else meanwhile (cannot happen under the lock)."""


@dataclass(frozen=True)
class Outcome:
    """What ``run_operations`` did: the changes (applied unless ``dry_run`` or problems), the problems by
    line (or by operation index) and the audit ids of the rows written."""

    changes: list[tuple[int, rules.Change]]
    problems: list[tuple[int, rules.Problem]]
    applied: bool
    change_ids: list[int]


INSERT_CHANGE = """
INSERT INTO reference_changes (changed_by, source, operation, entity, entity_key, account, effective, before, after)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING change_id"""


def run_operations(conn: Any, ops: list[tuple[int, rules.Operation]], by: str, source: str | dict[int, str],
                   dry_run: bool = False, first_readings: dict[str, datetime] | None = None,
                   on_change: Callable[[int], Any] | None = None, books: tuple[Any, ...] = ()) -> Outcome:
    """Check ``ops`` ((line, operation) in order) against the database's reference data and apply them all
    or none, in the caller's transaction. ``source``: the audit source of every change, or one per line.
    ``first_readings``: NMI → start (aware) of its first reading, to refuse a service starting after it
    (compared on the NEM day, UTC+10, as ingest judges service dates). ``on_change(1)`` is called per change
    written. ``books``: price book versions to check plans against beside the published ones (a dry run of a
    reference file whose books are not published yet)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (REFERENCE_LOCK,))
    reg = rules.Registry.of(read_reference(conn))
    reg.books.extend(b for b in books if (b.id, b.version) not in {(x.id, x.version) for x in reg.books})
    if first_readings:
        ops = [(n, _with_first_reading(op, first_readings)) for n, op in ops]
    changes, problems = rules.check_all(reg, ops)
    if problems or dry_run or not changes:
        return Outcome(changes, problems, False, [])
    ids = []
    for line, c in changes:
        ids.append(apply_change(conn, c, by, source if isinstance(source, str) else source.get(line, "")))
        if on_change is not None:
            on_change(1)
    return Outcome(changes, [], True, ids)


def _with_first_reading(op: rules.Operation, first: dict[str, datetime]) -> rules.Operation:
    if not isinstance(op, rules.AttachMeter) or op.first_reading is not None or op.nmi not in first:
        return op
    return dataclasses.replace(op, first_reading=first[op.nmi].astimezone(NEM_TIME).date())


def apply_change(conn: Any, c: rules.Change, by: str, source: str) -> int:
    """Write one change and its audit row; returns the audit row's ``change_id``. Raises
    ``ConcurrentChange`` when the range to close is not open any more."""
    row = c.row
    if isinstance(row, Account):
        conn.execute(
            "INSERT INTO accounts (account, name, timezone, holiday_region, billing_cycle, billing_anchor, net_days, "
            "currency) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (row.account, row.name, row.timezone, row.holiday_region, row.billing_cycle, row.billing_anchor,
             row.net_days, row.currency))
    elif isinstance(row, PlanAssignment | GasConversion) and (c.is_close or isinstance(row, GasConversion)):
        _write_multi_service(conn, c)
    elif isinstance(row, ServicePoint | TelemetrySubject | PlanAssignment):
        table, key_col, key = {
            ServicePoint: ("service_points", "nmi", getattr(row, "nmi", None)),
            TelemetrySubject: ("telemetry_subjects", "subject", getattr(row, "subject", None)),
            PlanAssignment: ("plan_assignments", "account", row.account),
        }[type(row)]
        if c.is_close:
            n = conn.execute(
                f"UPDATE {table} SET effective_to = %s WHERE {key_col} = %s AND effective_from = %s "
                "AND effective_to IS NULL", (row.effective_to, key, row.effective_from)).rowcount
            if n != 1:
                raise ConcurrentChange(f"{c.entity} {c.entity_key} is no longer open")
        elif isinstance(row, PlanAssignment):
            conn.execute("INSERT INTO plan_assignments (account, price_book_id, effective_from, effective_to, service) "
                         "VALUES (%s, %s, %s, %s, %s)", (row.account, row.price_book_id, row.effective_from,
                                                         row.effective_to, row.service))
        else:
            conn.execute(f"INSERT INTO {table} ({key_col}, account, effective_from, effective_to) "
                         "VALUES (%s, %s, %s, %s)", (key, row.account, row.effective_from, row.effective_to))
    op, entity, entity_key, account, effective, before, after = c.audit()
    return conn.execute(INSERT_CHANGE, (by, source, op, entity, entity_key, account, effective,
                                        postgres.jsonb(before) if before is not None else None,
                                        postgres.jsonb(after))).fetchone()[0]


def _write_multi_service(conn: Any, c: rules.Change) -> None:
    """Close a plan (one of several services or contributions of an account, migration 0010: the row is named
    by its service and book too), or add or close a gas conversion factor. Raises ``ConcurrentChange`` when
    the range to close is not open any more."""
    row = c.row
    if isinstance(row, PlanAssignment):
        n = conn.execute("UPDATE plan_assignments SET effective_to = %s WHERE account = %s AND service = %s "
                         "AND price_book_id = %s AND effective_from = %s AND effective_to IS NULL",
                         (row.effective_to, row.account, row.service, row.price_book_id, row.effective_from)).rowcount
    elif c.is_close:
        n = conn.execute("UPDATE gas_conversions SET effective_to = %s WHERE account = %s AND effective_from = %s "
                         "AND effective_to IS NULL", (row.effective_to, row.account, row.effective_from)).rowcount
    else:
        assert isinstance(row, GasConversion)
        n = conn.execute("INSERT INTO gas_conversions (account, effective_from, effective_to, heating_value, "
                         "pressure_correction) VALUES (%s, %s, %s, %s, %s)",
                         (row.account, row.effective_from, row.effective_to, row.heating_value,
                          row.pressure_correction)).rowcount
    if n != 1:
        raise ConcurrentChange(f"{c.entity} {c.entity_key} is no longer open")


# --- reads ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditRow:
    """One row of ``reference_changes``."""

    change_id: int
    changed_at: Any
    changed_by: str
    source: str
    operation: str
    entity: str
    entity_key: str
    account: str
    effective: date | None
    before: dict[str, Any] | None
    after: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"change_id": self.change_id, "changed_at": self.changed_at.isoformat(), "changed_by": self.changed_by,
                "source": self.source, "operation": self.operation, "entity": self.entity,
                "entity_key": self.entity_key, "account": self.account,
                "effective": self.effective.isoformat() if self.effective else None,
                "before": self.before, "after": self.after}


_AUDIT_COLS = ("change_id, changed_at, changed_by, source, operation, entity, entity_key, account, effective, "
               "before, after")


def history(conn: Any, account: str | None = None, entity_key: str | None = None, limit: int = 1000) -> list[AuditRow]:
    """Audit rows, oldest first: of one ``account`` (every entity it owns), or of one ``entity_key``
    prefix (``NEM1201001@`` = every range of that NMI), or all (at most ``limit``)."""
    where, params = [], []
    if account is not None:
        where.append("account = %s")
        params.append(account)
    if entity_key is not None:
        where.append("entity_key LIKE %s")
        params.append(entity_key.replace("%", r"\%").replace("_", r"\_") + "%")
    sql = f"SELECT {_AUDIT_COLS} FROM reference_changes"
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = conn.execute(sql + " ORDER BY change_id LIMIT %s", (*params, limit)).fetchall()
    return [AuditRow(*r) for r in rows]


def service_end(conn: Any, account: str) -> date | None:
    """The account's move-out date (``account_service_end``): set once every range it has is closed."""
    row = conn.execute("SELECT service_end FROM account_service_end WHERE account = %s", (account,)).fetchone()
    return row[0] if row else None
