"""Bulk import formats for reference operations (issue 15), pure: CSV text or a reference JSON file →
numbered operations for ``pipeline.accounts.rules.check_all``.

**CSV** (header required, columns in any order, unknown columns refused, empty cell = not given). One
line onboards one thing and may do up to four operations, in this order:

- ``account, timezone, billing_cycle, billing_anchor, currency`` [``net_days`` 14, ``holiday_region``
  AU-NSW, ``name``]: create the account (a line repeating an existing account's exact fields does
  nothing; other fields are refused: accounts are not edited in place);
- ``nmi, service_from`` [``service_to``]: attach the NMI to the account (move-in), or
  ``subject, service_from`` [``service_to``]: attach a telemetry subject;
- ``price_book_id`` [``plan_from`` (default ``service_from``), ``plan_to``]: assign or switch the plan;
- ``move_out``: end the service of ``nmi`` (or ``subject``) on that date (first day without service).

Dates are ``YYYY-MM-DD``. Line numbers are the file's (the header is line 1).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import date
from typing import Any

from pipeline.accounts import rules
from pipeline.reference import ReferenceFile

COLUMNS = ("account", "name", "timezone", "holiday_region", "billing_cycle", "billing_anchor", "currency",
           "net_days", "nmi", "subject", "service_from", "service_to", "price_book_id", "plan_from", "plan_to",
           "move_out")
_ACCOUNT_FIELDS = ("timezone", "billing_cycle", "billing_anchor", "currency")


@dataclass(frozen=True)
class Parsed:
    """Operations by line (``ops``), problems found while parsing (line, problem), and how to name a line
    in messages (``labels``: line → ``line 7`` or ``service_points[3]``)."""

    ops: list[tuple[int, rules.Operation]]
    problems: list[tuple[int, rules.Problem]]
    labels: dict[int, str]


def _date(text: str, name: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(name, f"{name} {text!r} is not a date YYYY-MM-DD") from None


def parse_csv(text: str) -> Parsed:
    """The operations of a CSV file's ``text`` (see the module docstring)."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return Parsed([], [(1, rules.Problem("EMPTY_FILE", "the file is empty: a header line is required"))], {})
    problems: list[tuple[int, rules.Problem]] = []
    unknown = [h for h in header if h not in COLUMNS]
    if unknown or "account" not in header:
        msg = (f"unknown columns {', '.join(unknown)}; " if unknown else "") + f"columns: {', '.join(COLUMNS)} " \
              "(account required)"
        return Parsed([], [(1, rules.Problem("BAD_HEADER", msg))], {1: "line 1"})
    ops: list[tuple[int, rules.Operation]] = []
    labels: dict[int, str] = {}
    for cells in reader:
        line = reader.line_num
        labels[line] = f"line {line}"
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            problems.append((line, rules.Problem("BAD_LINE", f"{len(cells)} fields, the header has {len(header)}")))
            continue
        row = {h: c.strip() for h, c in zip(header, cells, strict=True) if c.strip()}
        try:
            ops.extend((line, op) for op in row_operations(row))
        except ValueError as exc:
            name, message = exc.args if len(exc.args) == 2 else (None, str(exc))
            problems.append((line, rules.Problem("INVALID_FIELD", message, name)))
    return Parsed(ops, problems, labels)


def row_operations(row: dict[str, str]) -> list[rules.Operation]:
    """The operations of one CSV line (``row``: column → non-empty cell). Raises ``ValueError(field,
    message)`` for a cell that does not parse or a missing required one."""
    account = row["account"]
    out: list[rules.Operation] = []
    given = [f for f in _ACCOUNT_FIELDS if f in row]
    if given:
        missing = [f for f in _ACCOUNT_FIELDS if f not in row]
        if missing:
            raise ValueError(missing[0], f"creating account {account} needs {', '.join(missing)}")
        try:
            net_days = int(row.get("net_days", "14"))
        except ValueError:
            raise ValueError("net_days", f"net_days {row['net_days']!r} is not a whole number") from None
        out.append(rules.CreateAccount(account, row["timezone"], row["billing_cycle"],
                                       _date(row["billing_anchor"], "billing_anchor"), row["currency"], net_days,
                                       row.get("holiday_region", "AU-NSW"), row.get("name", "")))
    start = _date(row["service_from"], "service_from") if "service_from" in row else None
    end = _date(row["service_to"], "service_to") if "service_to" in row else None
    if "nmi" in row and "subject" in row:
        raise ValueError("subject", "give nmi or subject on a line, not both")
    for key in ("nmi", "subject"):
        if key in row and start is not None:
            out.append(rules.AttachMeter(account, row["nmi"], start, end) if key == "nmi"
                       else rules.AttachSubject(account, row["subject"], start, end))
    if "price_book_id" in row:
        plan_from = _date(row["plan_from"], "plan_from") if "plan_from" in row else start
        if plan_from is None:
            raise ValueError("plan_from", "a plan needs plan_from (or service_from)")
        plan_to = _date(row["plan_to"], "plan_to") if "plan_to" in row else None
        out.append(rules.AssignPlan(account, row["price_book_id"], plan_from, plan_to))
    if "move_out" in row:
        on = _date(row["move_out"], "move_out")
        if "nmi" in row:
            out.append(rules.MoveOut(row["nmi"], on))
        elif "subject" in row:
            out.append(rules.DetachSubject(row["subject"], on))
        else:
            raise ValueError("move_out", "move_out needs the nmi or subject that moves out")
    if not out:
        raise ValueError(None, f"the line does nothing for account {account}: give account fields, an nmi or "
                               "subject with service_from, a price_book_id or a move_out")
    return out


def reference_operations(ref: ReferenceFile) -> Parsed:
    """The operations of a reference JSON file (``pipeline/data/reference.json`` format): accounts, then
    service points, telemetry subjects, plan assignments; an account without ``currency`` bills in the
    currency of its first plan's price book in the file (AUD when there is none). Its price books and
    metric definitions are not operations (they are published as they always were)."""
    book_currency = {b.id: b.currency for b in ref.price_books}
    first_plan: dict[str, str] = {}
    for pa in sorted(ref.plan_assignments, key=lambda p: p.effective_from):
        first_plan.setdefault(pa.account, pa.price_book_id)
    ops: list[tuple[int, rules.Operation]] = []
    labels: dict[int, str] = {}

    def add(label: str, op: Any) -> None:
        n = len(ops) + 1
        ops.append((n, op))
        labels[n] = label

    for i, a in enumerate(ref.accounts):
        currency = a.currency or book_currency.get(first_plan.get(a.account, ""), "AUD")
        add(f"accounts[{i}]", rules.CreateAccount(a.account, a.timezone, a.billing_cycle, a.billing_anchor, currency,
                                                  a.net_days, a.holiday_region, a.name))
    for i, sp in enumerate(ref.service_points):
        add(f"service_points[{i}]", rules.AttachMeter(sp.account, sp.nmi, sp.effective_from, sp.effective_to))
    for i, ts in enumerate(ref.telemetry_subjects):
        add(f"telemetry_subjects[{i}]", rules.AttachSubject(ts.account, ts.subject, ts.effective_from, ts.effective_to))
    for i, pa in enumerate(ref.plan_assignments):
        add(f"plan_assignments[{i}]", rules.AssignPlan(pa.account, pa.price_book_id, pa.effective_from,
                                                       pa.effective_to))
    for i, gc in enumerate(ref.gas_conversions):
        add(f"gas_conversions[{i}]", rules.SetGasConversion(gc.account, gc.effective_from, gc.heating_value,
                                                            gc.pressure_correction, gc.effective_to))
    return Parsed(ops, [], labels)
