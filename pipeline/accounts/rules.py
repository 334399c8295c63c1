"""Accounts, service points, telemetry subjects and plans as effective-dated operations (issue 15): pure rules.

An operation (``CreateAccount``, ``AttachMeter``, ``MoveOut``, ``AttachSubject``, ``DetachSubject``,
``AssignPlan``) is checked against a ``Registry`` (an in-memory copy of the reference data) and turns
into ``Change`` values: a new row, or the closing of an open effective range. Nothing is ever edited
in place: a move-out closes the service point's range (``effective_to`` = the move-out date), a plan
switch closes the current assignment at the switch date and adds the new one from it. Applying a
change to the registry lets a batch (a CSV file) be checked line by line against the lines before it.

Dates are local calendar dates; ranges are ``[effective_from, effective_to)`` (``effective_to`` ``None``
= open). A move-out date is the first day **without** service: no daily charge on it or after it.

Problems are values (``Problem``: code, message, field), never exceptions; ``check`` returns the
changes of an operation or the problems that refuse it, never both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pipeline.money import MINOR_UNITS
from pipeline.rating.pricebook import PriceBook, book_in_effect
from pipeline.reference import (
    Account,
    GasConversion,
    PlanAssignment,
    ReferenceData,
    ServicePoint,
    TelemetrySubject,
)

CYCLES = ("MONTHLY", "BIMONTHLY", "QUARTERLY", "ANNUAL")
_NMI = re.compile(r"^[A-Za-z0-9]{10,11}$")
_REGION = re.compile(r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")


@dataclass(frozen=True)
class Problem:
    """Why an operation is refused: ``code`` (machine-readable, e.g. ``OVERLAPPING_DATES``), ``message``
    (for people, naming the dates and rows involved) and ``field`` (the offending input field or ``None``)."""

    code: str
    message: str
    field: str | None = None


# --- operations -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CreateAccount:
    """A new billing account. ``billing_anchor``: the date billing periods are counted from;
    ``net_days``: days from bill date to due date; ``currency``: ISO 4217 (its plans' price books must
    bill in it); ``holiday_region``: ``CC`` or ``CC-SUBDIV`` for the ``holidays`` package."""

    account: str
    timezone: str
    billing_cycle: str
    billing_anchor: date
    currency: str
    net_days: int = 14
    holiday_region: str = "AU-NSW"
    name: str = ""

    def to_account(self) -> Account:
        return Account(account=self.account, name=self.name, timezone=self.timezone,
                       holiday_region=self.holiday_region, billing_cycle=self.billing_cycle,  # type: ignore[arg-type]
                       billing_anchor=self.billing_anchor, net_days=self.net_days, currency=self.currency)


@dataclass(frozen=True)
class AttachMeter:
    """Move-in: NMI ``nmi`` serves ``account`` from ``effective_from`` (to ``effective_to``, exclusive, or
    open). ``first_reading``: the local date of the NMI's first reading, when known (service must start
    on or before it, or those readings are refused as outside the service dates)."""

    account: str
    nmi: str
    effective_from: date
    effective_to: date | None = None
    first_reading: date | None = None


@dataclass(frozen=True)
class MoveOut:
    """Move-out: the service of ``nmi`` ends at ``on`` (its first day without service)."""

    nmi: str
    on: date


@dataclass(frozen=True)
class AttachSubject:
    """A CloudEvents ``subject`` bills ``account`` from ``effective_from`` (UTC dates)."""

    account: str
    subject: str
    effective_from: date
    effective_to: date | None = None


@dataclass(frozen=True)
class DetachSubject:
    """The telemetry ``subject`` stops billing its account at ``on`` (first UTC day without service)."""

    subject: str
    on: date


@dataclass(frozen=True)
class AssignPlan:
    """``account`` is billed on price book ``price_book_id`` from ``effective_from`` (to ``effective_to`` or
    open). A plan open on ``effective_from`` is closed there: a switch mid-period prorates as the rating
    stage always does (fixed charges by service days, tier limits by the fraction of the period). Only plans of
    the book's service are switched or overlap (seed 001: one plan per service; contributions per book)."""

    account: str
    price_book_id: str
    effective_from: date
    effective_to: date | None = None


@dataclass(frozen=True)
class EndPlan:
    """The plan of ``price_book_id`` of ``account`` ends at ``on`` (its first day off the plan): for a voluntary
    contribution, the opt-out (seed 001); for a service, the service stops being billed (no new plan)."""

    account: str
    price_book_id: str
    on: date


@dataclass(frozen=True)
class SetGasConversion:
    """The account's gas conversion factor from ``effective_from`` (seed 001): ``heating_value`` MJ/m³ and
    the ``pressure_correction`` factor (``reference.GasConversion``). An open factor starting earlier is
    closed there (like a plan switch); the stages re-read it at their next reference refresh."""

    account: str
    effective_from: date
    heating_value: Decimal
    pressure_correction: Decimal
    effective_to: date | None = None


Operation = (CreateAccount | AttachMeter | MoveOut | AttachSubject | DetachSubject | AssignPlan | EndPlan
             | SetGasConversion)


# --- changes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    """One row added (``before`` ``None``) or one open range closed (``before`` the open row) in ``entity``
    (``account``, ``service_point``, ``telemetry_subject``, ``plan_assignment``). ``row`` is the row as it is
    after the change; ``operation`` names what the operator did (``meter.move_out`` ...); ``effective`` the
    date it takes effect."""

    operation: str
    entity: str
    row: Account | ServicePoint | TelemetrySubject | PlanAssignment | GasConversion
    before: Account | ServicePoint | TelemetrySubject | PlanAssignment | GasConversion | None
    effective: date | None

    @property
    def is_close(self) -> bool:
        return self.before is not None

    @property
    def account(self) -> str:
        return self.row.account

    @property
    def entity_key(self) -> str:
        r = self.row
        if isinstance(r, Account):
            return r.account
        if isinstance(r, ServicePoint):
            return f"{r.nmi}@{r.effective_from}"
        if isinstance(r, TelemetrySubject):
            return f"{r.subject}@{r.effective_from}"
        if isinstance(r, PlanAssignment) and r.service != "electricity":  # seed 001: one plan per service
            return f"{r.account}@{r.effective_from}/{r.service}" + (
                f":{r.price_book_id}" if r.service == "contribution" else "")
        return f"{r.account}@{r.effective_from}"

    def audit(self) -> tuple[str, str, str, str, date | None, dict[str, Any] | None, dict[str, Any]]:
        """(operation, entity, entity key, account, effective, before, after) of the audit row (JSON-able)."""
        return (self.operation, self.entity, self.entity_key, self.account, self.effective,
                self.before.model_dump(mode="json") if self.before is not None else None,
                self.row.model_dump(mode="json"))


# --- the registry -------------------------------------------------------------------------------------------
@dataclass
class Registry:
    """A mutable in-memory copy of the reference data that operations are checked against. ``books``:
    every price book version (for ids, currencies and effective dates)."""

    accounts: dict[str, Account] = field(default_factory=dict)
    meters: dict[str, list[ServicePoint]] = field(default_factory=dict)  # nmi → ranges by effective_from
    subjects: dict[str, list[TelemetrySubject]] = field(default_factory=dict)
    plans: dict[str, list[PlanAssignment]] = field(default_factory=dict)  # account → ranges by effective_from
    books: list[PriceBook] = field(default_factory=list)
    gas: dict[str, list[GasConversion]] = field(default_factory=dict)  # account → factors by effective_from

    @classmethod
    def of(cls, ref: ReferenceData) -> Registry:
        return cls(dict(ref.accounts), {k: list(v) for k, v in ref.service_points.items()},
                   {k: list(v) for k, v in ref.subjects.items()}, {k: list(v) for k, v in ref.plans.items()},
                   list(ref.price_books), {k: list(v) for k, v in ref.gas.items()})

    def apply(self, change: Change) -> None:
        """Record ``change`` here (after ``check`` returned it)."""
        row = change.row
        if isinstance(row, Account):
            self.accounts[row.account] = row
            return
        if isinstance(row, ServicePoint):
            ranges: list[Any] = self.meters.setdefault(row.nmi, [])
        elif isinstance(row, TelemetrySubject):
            ranges = self.subjects.setdefault(row.subject, [])
        elif isinstance(row, GasConversion):
            ranges = self.gas.setdefault(row.account, [])
        else:
            ranges = self.plans.setdefault(row.account, [])
        if change.before is not None:
            ranges[ranges.index(change.before)] = row
        else:
            ranges.append(row)
            ranges.sort(key=lambda r: r.effective_from)


def _overlaps(a0: date, a1: date | None, b0: date, b1: date | None) -> bool:
    """Whether ``[a0, a1)`` and ``[b0, b1)`` share a day (``None`` = open end)."""
    return (a1 is None or b0 < a1) and (b1 is None or a0 < b1)


def _span(f: date, t: date | None) -> str:
    return f"{f}..{t if t is not None else 'open'}"


def _range_problems(start: date, end: date | None) -> list[Problem]:
    if end is not None and end <= start:
        return [Problem("EMPTY_RANGE", f"effective_to {end} must be after effective_from {start}", "effective_to")]
    return []


def check_account(reg: Registry, op: CreateAccount) -> list[Problem]:
    """Problems of a new account's fields: time zone, cycle, currency, holiday region, net days, and an
    existing account of that id with other fields (an identical one is fine: nothing to do)."""
    out: list[Problem] = []
    if not op.account.strip():
        out.append(Problem("INVALID_FIELD", "the account id is empty", "account"))
    try:
        ZoneInfo(op.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        out.append(Problem("BAD_TIMEZONE", f"unknown time zone {op.timezone!r} (an IANA name such as "
                                           "Australia/Sydney)", "timezone"))
    if op.billing_cycle not in CYCLES:
        out.append(Problem("BAD_BILLING_CYCLE", f"billing cycle {op.billing_cycle!r} is not one of "
                                                f"{', '.join(CYCLES)}", "billing_cycle"))
    if op.currency not in MINOR_UNITS:
        out.append(Problem("UNKNOWN_CURRENCY", f"currency {op.currency!r} is not one of "
                                               f"{', '.join(sorted(MINOR_UNITS))}", "currency"))
    if not _REGION.match(op.holiday_region):
        out.append(Problem("BAD_HOLIDAY_REGION", f"holiday region {op.holiday_region!r} is not CC or CC-SUBDIV "
                                                 "(e.g. AU-ACT)", "holiday_region"))
    if op.net_days < 0:
        out.append(Problem("INVALID_FIELD", f"net days {op.net_days} is negative", "net_days"))
    existing = reg.accounts.get(op.account)
    if existing is not None and not out and existing != op.to_account():
        diff = [k for k, v in op.to_account().model_dump().items() if getattr(existing, k) != v]
        out.append(Problem("ACCOUNT_EXISTS", f"account {op.account} exists with other {', '.join(diff)}: "
                                             "accounts are not edited in place", "account"))
    return out


def check(reg: Registry, op: Operation) -> tuple[list[Change], list[Problem]]:
    """The changes ``op`` makes to ``reg``'s data, or the problems that refuse it (exactly one list is
    non-empty, unless ``op`` changes nothing: an identical account or range already there)."""
    if isinstance(op, CreateAccount):
        problems = check_account(reg, op)
        if problems or op.account in reg.accounts:
            return [], problems
        return [Change("account.create", "account", op.to_account(), None, op.billing_anchor)], []
    if isinstance(op, AttachMeter):
        return _attach_meter(reg, op)
    if isinstance(op, MoveOut):
        return _close(reg.meters.get(op.nmi, []), op.on, "meter.move_out", "service_point", f"NMI {op.nmi}")
    if isinstance(op, AttachSubject):
        return _attach_subject(reg, op)
    if isinstance(op, DetachSubject):
        return _close(reg.subjects.get(op.subject, []), op.on, "subject.detach", "telemetry_subject",
                      f"subject {op.subject}")
    if isinstance(op, EndPlan):
        return _end_plan(reg, op)
    if isinstance(op, SetGasConversion):
        return _set_gas_conversion(reg, op)
    return _assign_plan(reg, op)


def _attach_meter(reg: Registry, op: AttachMeter) -> tuple[list[Change], list[Problem]]:
    for sp in reg.meters.get(op.nmi, []):
        if (sp.account, sp.effective_from, sp.effective_to) == (op.account, op.effective_from, op.effective_to):
            return [], []  # already there: nothing to do
    out = _range_problems(op.effective_from, op.effective_to)
    if op.account not in reg.accounts:
        out.append(Problem("UNKNOWN_ACCOUNT", f"account {op.account} does not exist", "account"))
    if not _NMI.match(op.nmi):
        out.append(Problem("BAD_NMI", f"NMI {op.nmi!r} is not 10 or 11 letters and digits", "nmi"))
    if op.first_reading is not None and op.effective_from > op.first_reading:
        out.append(Problem("SERVICE_STARTS_AFTER_FIRST_READING",
                           f"service of {op.nmi} starts {op.effective_from}, after its first reading on "
                           f"{op.first_reading}: those readings would be refused (OUTSIDE_SERVICE_DATES)",
                           "effective_from"))
    for sp in reg.meters.get(op.nmi, []):
        if _overlaps(op.effective_from, op.effective_to, sp.effective_from, sp.effective_to):
            if sp.account != op.account:
                out.append(Problem("NMI_ATTACHED_ELSEWHERE",
                                   f"NMI {op.nmi} is attached to account {sp.account} over "
                                   f"{_span(sp.effective_from, sp.effective_to)}, which overlaps "
                                   f"{_span(op.effective_from, op.effective_to)}: move it out first", "nmi"))
            else:
                out.append(Problem("OVERLAPPING_DATES",
                                   f"NMI {op.nmi} already serves {op.account} over "
                                   f"{_span(sp.effective_from, sp.effective_to)}, which overlaps "
                                   f"{_span(op.effective_from, op.effective_to)}", "effective_from"))
    if out:
        return [], out
    row = ServicePoint(nmi=op.nmi, account=op.account, effective_from=op.effective_from, effective_to=op.effective_to)
    return [Change("meter.attach", "service_point", row, None, op.effective_from)], []


def _attach_subject(reg: Registry, op: AttachSubject) -> tuple[list[Change], list[Problem]]:
    out = _range_problems(op.effective_from, op.effective_to)
    if op.account not in reg.accounts:
        out.append(Problem("UNKNOWN_ACCOUNT", f"account {op.account} does not exist", "account"))
    if not op.subject.strip():
        out.append(Problem("INVALID_FIELD", "the subject is empty", "subject"))
    row = TelemetrySubject(subject=op.subject, account=op.account, effective_from=op.effective_from,
                           effective_to=op.effective_to)
    for ts in reg.subjects.get(op.subject, []):
        if ts == row:
            return [], []
        if _overlaps(op.effective_from, op.effective_to, ts.effective_from, ts.effective_to):
            code = "SUBJECT_ATTACHED_ELSEWHERE" if ts.account != op.account else "OVERLAPPING_DATES"
            out.append(Problem(code, f"subject {op.subject} bills account {ts.account} over "
                                     f"{_span(ts.effective_from, ts.effective_to)}, which overlaps "
                                     f"{_span(op.effective_from, op.effective_to)}", "subject"))
    if out:
        return [], out
    return [Change("subject.attach", "telemetry_subject", row, None, op.effective_from)], []


def _close(ranges: list[Any], on: date, operation: str, entity: str, what: str) -> tuple[list[Change], list[Problem]]:
    """Close the open range of ``ranges`` at ``on`` (its first day without service)."""
    if not ranges:
        return [], [Problem("NOT_ATTACHED", f"{what} has never been attached", None)]
    current = next((r for r in ranges if r.effective_to is None), None)
    if current is None:
        last = ranges[-1]
        if last.effective_to == on:
            return [], []  # moved out on that date already: nothing to do
        return [], [Problem("ALREADY_ENDED", f"{what} has no open service: its last range "
                                             f"{_span(last.effective_from, last.effective_to)} already ends", "on")]
    if on <= current.effective_from:
        return [], [Problem("EMPTY_RANGE", f"{what} serves {current.account} from {current.effective_from}: "
                                           f"it cannot end on {on} (on or before its start)", "on")]
    return [Change(operation, entity, current.model_copy(update={"effective_to": on}), current, on)], []


def _assign_plan(reg: Registry, op: AssignPlan) -> tuple[list[Change], list[Problem]]:
    out = _range_problems(op.effective_from, op.effective_to)
    account = reg.accounts.get(op.account)
    if account is None:
        out.append(Problem("UNKNOWN_ACCOUNT", f"account {op.account} does not exist", "account"))
    versions = [b for b in reg.books if b.id == op.price_book_id]
    if not versions:
        out.append(Problem("UNKNOWN_PRICE_BOOK", f"price book {op.price_book_id} is not published "
                                                 "(pipeline pricebook publish FILE)", "price_book_id"))
    else:
        if book_in_effect(versions, op.price_book_id, op.effective_from) is None:
            first = min(b.effective_from for b in versions)
            out.append(Problem("PRICE_BOOK_NOT_IN_EFFECT",
                               f"no version of price book {op.price_book_id} is in effect on {op.effective_from} "
                               f"(the earliest starts {first}): publish a version covering it", "effective_from"))
        currency = getattr(account, "currency", None) if account is not None else None
        if currency is not None and versions[0].currency != currency:
            out.append(Problem("CURRENCY_MISMATCH", f"price book {op.price_book_id} bills in {versions[0].currency}, "
                                                    f"account {op.account} in {currency}", "price_book_id"))
    if out:
        return [], out
    service = max(versions, key=lambda b: b.version).service
    row = PlanAssignment(account=op.account, price_book_id=op.price_book_id, effective_from=op.effective_from,
                         effective_to=op.effective_to, service=service)
    changes: list[Change] = []
    for pa in reg.plans.get(op.account, []):
        if pa == row:
            return [], []
        if not _same_plan_slot(pa, row):  # another service (or another contribution): plans side by side
            continue
        if not _overlaps(op.effective_from, op.effective_to, pa.effective_from, pa.effective_to):
            continue
        if pa.effective_to is None and pa.effective_from < op.effective_from and not changes:
            # the switch: the current open plan ends where the new one starts
            changes.append(Change("plan.switch", "plan_assignment", pa.model_copy(update={"effective_to":
                                  op.effective_from}), pa, op.effective_from))
            continue
        out.append(Problem("OVERLAPPING_DATES",
                           f"account {op.account} is on {pa.price_book_id} over "
                           f"{_span(pa.effective_from, pa.effective_to)}, which overlaps "
                           f"{_span(op.effective_from, op.effective_to)} (only an open plan that "
                           "started before the new one is closed by a switch)", "effective_from"))
    if out:
        return [], out
    verb = "contribution.opt_in" if service == "contribution" else "plan.assign"
    return [*changes, Change(verb, "plan_assignment", row, None, op.effective_from)], []


def _same_plan_slot(a: PlanAssignment, b: PlanAssignment) -> bool:
    """Whether two plans of one account exclude each other in time: the same service (seed 001: one plan per
    service at a time), and for voluntary contributions the same book (several contributions at once)."""
    return a.service == b.service and (a.service != "contribution" or a.price_book_id == b.price_book_id)


def _end_plan(reg: Registry, op: EndPlan) -> tuple[list[Change], list[Problem]]:
    """Close the open plan of ``op.price_book_id`` at ``op.on`` (a contribution's opt-out)."""
    ranges = [pa for pa in reg.plans.get(op.account, []) if pa.price_book_id == op.price_book_id]
    service = ranges[-1].service if ranges else ""
    verb = "contribution.opt_out" if service == "contribution" else "plan.end"
    return _close(ranges, op.on, verb, "plan_assignment", f"account {op.account}'s plan {op.price_book_id}")


def _set_gas_conversion(reg: Registry, op: SetGasConversion) -> tuple[list[Change], list[Problem]]:
    out = _range_problems(op.effective_from, op.effective_to)
    if op.account not in reg.accounts:
        out.append(Problem("UNKNOWN_ACCOUNT", f"account {op.account} does not exist", "account"))
    for name in ("heating_value", "pressure_correction"):
        value = getattr(op, name)
        if not isinstance(value, Decimal) or not value.is_finite() or value <= 0:
            out.append(Problem("INVALID_FIELD", f"{name.replace('_', ' ')} {value} must be a positive decimal", name))
    if out:
        return [], out
    try:
        row = GasConversion(account=op.account, effective_from=op.effective_from, effective_to=op.effective_to,
                            heating_value=op.heating_value, pressure_correction=op.pressure_correction)
    except ValueError as exc:  # more than 6 decimal places, too many digits
        return [], [Problem("INVALID_FIELD", str(exc).splitlines()[-1].strip(), "heating_value")]
    changes: list[Change] = []
    for gc in reg.gas.get(op.account, []):
        if gc == row:
            return [], []
        if not _overlaps(op.effective_from, op.effective_to, gc.effective_from, gc.effective_to):
            continue
        if gc.effective_to is None and gc.effective_from < op.effective_from and not changes:
            changes.append(Change("gas.conversion_end", "gas_conversion",
                                  gc.model_copy(update={"effective_to": op.effective_from}), gc, op.effective_from))
            continue
        out.append(Problem("OVERLAPPING_DATES", f"account {op.account} has a gas conversion factor over "
                                                f"{_span(gc.effective_from, gc.effective_to)}, which overlaps "
                                                f"{_span(op.effective_from, op.effective_to)}", "effective_from"))
    if out:
        return [], out
    return [*changes, Change("gas.conversion", "gas_conversion", row, None, op.effective_from)], []


def check_all(reg: Registry, ops: list[tuple[int, Operation]]) -> tuple[list[tuple[int, Change]],
                                                                         list[tuple[int, Problem]]]:
    """Check a batch in order (each ``(line, op)`` against ``reg`` as changed by the lines before it);
    returns every change and every problem with its line. ``reg`` is changed by the valid lines."""
    changes: list[tuple[int, Change]] = []
    problems: list[tuple[int, Problem]] = []
    for line, op in ops:
        got, bad = check(reg, op)
        problems.extend((line, p) for p in bad)
        for c in got:
            reg.apply(c)
        changes.extend((line, c) for c in got)
    return changes, problems
