"""``pipeline accounts|meters|plans``: reference data as operations (issue 15), typer sub-commands.

Every write goes through ``pipeline.accounts.store.run_operations`` (checked by the pure rules of
``pipeline.accounts.rules``, applied all-or-nothing with an audit row per change). Exit codes: 0 done (or
nothing to do), 1 refused (every problem printed on stderr, by line for imports), 2 bad usage.
"""

from __future__ import annotations

import getpass
import json
import os
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.accounts import rules
from pipeline.config import get_settings

accounts_app = typer.Typer(help="Billing accounts: create, import (CSV/JSON), list, show with history.",
                           no_args_is_help=True)
meters_app = typer.Typer(help="Meters (NMIs) and telemetry subjects: attach (move-in), move-out, list.",
                         no_args_is_help=True)
plans_app = typer.Typer(help="Plans: assign or switch an account's price book (per service) from a date, end one "
                             "(a contribution's opt-out), list.", no_args_is_help=True)

By = Annotated[str | None, typer.Option("--by", help="who makes the change (audit); default $PIPELINE_OPERATOR or "
                                                     "the login name")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="check and report, change nothing")]


def _by(by: str | None) -> str:
    return by or os.environ.get("PIPELINE_OPERATOR") or getpass.getuser()


def _date(text: str | None, what: str) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        typer.echo(f"{what} must be a date YYYY-MM-DD, got {text!r}", err=True)
        raise typer.Exit(2) from None


def _run(ops: list[tuple[int, rules.Operation]], by: str | None, source: str | dict[int, str], dry_run: bool,
         labels: dict[int, str] | None = None, parse_problems: list[tuple[int, rules.Problem]] | None = None,
         first_readings: dict[str, Any] | None = None, progress: bool = False, books: tuple[Any, ...] = ()) -> None:
    """Run ``ops`` through the store and print the outcome; exits 1 when anything is refused."""
    from tqdm import tqdm

    from pipeline.accounts.store import run_operations
    from pipeline.runtime import postgres

    settings = get_settings()
    with tqdm(total=len(ops), unit="change", desc="applying", disable=not progress or dry_run) as bar:
        outcome = postgres.with_reconnect(settings.database_url, lambda c: run_operations(
            c, ops, _by(by), source, dry_run or bool(parse_problems), first_readings, on_change=bar.update,
            books=books))
    problems = sorted([*(parse_problems or []), *outcome.problems], key=lambda lp: lp[0])
    name = (labels or {}).get
    for line, p in problems:
        where = name(line, f"line {line}") if labels is not None else ""
        typer.echo(f"{where + ': ' if where else ''}{p.code}: {p.message}", err=True)
    if problems:
        typer.echo(f"refused: {len(problems)} problem(s) on {len({n for n, _ in problems})} line(s); nothing was "
                   "changed", err=True)
        raise typer.Exit(1)
    for _line, c in outcome.changes:
        verb = "would" if dry_run else "done:"
        typer.echo(f"{verb} {c.operation} {c.entity_key}" + (f" (effective {c.effective})" if c.effective else ""))
    if dry_run:
        typer.echo(f"dry run: {len(outcome.changes)} change(s) would be applied, {len(ops)} operation(s) valid")
    else:
        typer.echo(f"applied {len(outcome.changes)} change(s)" + (" (nothing to do)" if not outcome.changes else ""))


# --- accounts -----------------------------------------------------------------------------------------------
@accounts_app.command("create")
def accounts_create(
    account: Annotated[str, typer.Argument(help="account id, e.g. ACC-2001")],
    timezone: Annotated[str, typer.Option(help="IANA time zone of its billing periods")],
    currency: Annotated[str, typer.Option(help="ISO 4217 billing currency")] = "AUD",
    billing_cycle: Annotated[str, typer.Option(help="MONTHLY, BIMONTHLY, QUARTERLY or ANNUAL")] = "MONTHLY",
    billing_anchor: Annotated[str | None, typer.Option(help="periods count from this date (default: today)")] = None,
    net_days: Annotated[int, typer.Option(help="days from bill date to due date")] = 14,
    holiday_region: Annotated[str, typer.Option(help="holidays region CC or CC-SUBDIV, e.g. AU-ACT")] = "AU-NSW",
    name: Annotated[str, typer.Option(help="customer name")] = "",
    by: By = None, dry_run: DryRun = False,
) -> None:
    """Create a billing account (an identical existing one: nothing to do; other fields: refused)."""
    anchor = _date(billing_anchor, "--billing-anchor") or date.today()
    _run([(1, rules.CreateAccount(account, timezone, billing_cycle.upper(), anchor, currency.upper(), net_days,
                                  holiday_region, name))], by, "cli", dry_run)


@accounts_app.command("import")
def accounts_import(
    file: Annotated[Path, typer.Argument(help="CSV (see pipeline/accounts/imports.py) or reference JSON")],
    dry_run: DryRun = False, by: By = None,
    nem12: Annotated[list[Path] | None, typer.Option(help="NEM12 files or folders: refuse a service starting "
                                                          "after its NMI's first reading in them")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Bulk import, all or nothing: every problem is reported with its line and nothing is applied unless
    every line is valid (one transaction). A reference JSON file (``pipeline load reference`` format) is
    imported as operations too; its price books are published first."""
    from pipeline.accounts import imports

    if not file.exists():
        typer.echo(f"no such file: {file}", err=True)
        raise typer.Exit(2)
    books: tuple[Any, ...] = ()
    if file.suffix.lower() == ".json":
        from pipeline.reference import ReferenceFile

        ref = ReferenceFile.read(file)
        books = ref.price_books
        parsed = imports.reference_operations(ref)
        if not dry_run:
            _publish_catalog(ref, file)
    else:
        parsed = imports.parse_csv(file.read_text(encoding="utf-8-sig"))
    first = _first_readings(nem12, progress) if nem12 else None
    sources = {n: f"{file.name} {label}" for n, label in parsed.labels.items()}
    _run(parsed.ops, by, sources, dry_run, parsed.labels, parsed.problems, first, progress, books)


def _publish_catalog(ref: Any, file: Path) -> None:
    """Price books and metric definitions of a JSON import, as ``load reference`` writes them: price books to
    Postgres and the compacted ``pricebooks`` topic (immutable versions), metric definitions upserted."""
    from pipeline.cli import _refuse_unmeasurable_demand
    from pipeline.codec import default_codec
    from pipeline.reference import ReferenceFile
    from pipeline.refstore import PriceBookConflict, load_reference_file, price_book_record
    from pipeline.runtime import postgres
    from pipeline.runtime.kafka import IdempotentProducer
    from pipeline.topology import Topics

    settings = get_settings()
    books = list(ref.price_books)
    _refuse_unmeasurable_demand(books, settings, file)
    catalog = ReferenceFile(accounts=(), service_points=(), plan_assignments=(), price_books=ref.price_books,
                            metric_definitions=ref.metric_definitions)
    try:
        postgres.with_reconnect(settings.database_url, lambda c: load_reference_file(c, catalog))
    except PriceBookConflict as exc:
        typer.echo(f"error: {file}: {exc}", err=True)
        raise typer.Exit(1) from exc
    producer, codec = IdempotentProducer(settings.kafka_bootstrap), default_codec()
    for book in books:
        key, value = price_book_record(codec, book)
        producer.send(Topics(settings).pricebooks, key.encode(), value)
    producer.flush(60)


def _first_readings(paths: list[Path], progress: bool) -> dict[str, Any]:
    """NMI → UTC start of its first interval in the NEM12 files of ``paths`` (files or folders)."""
    from tqdm import tqdm

    from pipeline.ingest.nem12 import read_nem12

    files = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p]) if f.is_file()]
    first: dict[str, Any] = {}
    for f in tqdm(files, unit="file", desc="reading NEM12", disable=not progress):
        for r in read_nem12(f).readings:
            if r.nmi not in first or r.interval_start < first[r.nmi]:
                first[r.nmi] = r.interval_start
    return first


def _snapshot() -> Any:
    from pipeline.refstore import read_reference
    from pipeline.runtime import postgres

    return postgres.with_reconnect(get_settings().database_url, read_reference)


@accounts_app.command("list")
def accounts_list(as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False) -> None:
    """Every account with its cycle, currency, meters in service today and its current plan."""
    ref = _snapshot()
    today = date.today()
    for a in sorted(ref.accounts.values(), key=lambda x: x.account):
        meters = [sp.nmi for sp in ref.by_account.get(a.account, ()) if sp.covers(today)]
        plan = ref.plan_on(a.account, today)
        row = {**a.model_dump(mode="json"), "meters_in_service": meters,
               "plan": plan.price_book_id if plan else None}
        typer.echo(json.dumps(row) if as_json else
                   f"{a.account:12} {a.billing_cycle:9} {a.currency or '-':4} {a.timezone:20} "
                   f"meters {len(meters):>3}  plan {row['plan'] or '-'}")


@accounts_app.command("show")
def accounts_show(account: Annotated[str, typer.Argument(help="account id")]) -> None:
    """An account, its meters, telemetry subjects and plans over time, its move-out, and its change history."""
    from pipeline.accounts.store import history, service_end
    from pipeline.runtime import postgres

    ref = _snapshot()
    a = ref.accounts.get(account)
    if a is None:
        typer.echo(f"no account {account}", err=True)
        raise typer.Exit(1)
    url = get_settings().database_url
    rows, end = postgres.with_reconnect(url, lambda c: (history(c, account=account), service_end(c, account)))
    typer.echo(f"{a.account}  {a.name}\n  timezone {a.timezone}, holidays {a.holiday_region}, {a.billing_cycle} from "
               f"{a.billing_anchor}, currency {a.currency or '(of its price books)'}, net {a.net_days} days")
    if end is not None:
        from datetime import timedelta

        from pipeline.invoicing.lifecycle import close_time

        closes = close_time(end, a.timezone, timedelta(hours=get_settings().invoice_close_delay_hours))
        typer.echo(f"  service ended {end} (move-out): its final invoice closes at {closes:%Y-%m-%d %H:%M %Z} "
                   "(move-out + PIPELINE_INVOICE_CLOSE_DELAY_HOURS)")
    typer.echo("  meters:")
    for sp in sorted(ref.by_account.get(account, ()), key=lambda s: (s.effective_from, s.nmi)):
        typer.echo(f"    {sp.nmi:12} {sp.effective_from} .. {sp.effective_to or 'open'}")
    for ts in ref.subjects_by_account.get(account, ()):
        typer.echo(f"    subject {ts.subject} {ts.effective_from} .. {ts.effective_to or 'open'}")
    typer.echo("  plans:")
    for pa in ref.plans.get(account, ()):
        typer.echo(f"    {pa.price_book_id:24} {pa.service:12} {pa.effective_from} .. {pa.effective_to or 'open'}")
    for gc in ref.gas.get(account, ()):
        typer.echo(f"  gas conversion {gc.heating_value} MJ/m³ × {gc.pressure_correction} {gc.effective_from} .. "
                   f"{gc.effective_to or 'open'}")
    typer.echo("  history:")
    for r in rows:
        before = f" before {json.dumps(r.before, sort_keys=True)}" if r.before else ""
        typer.echo(f"    #{r.change_id} {r.changed_at:%Y-%m-%d %H:%M:%S} {r.changed_by} ({r.source}) {r.operation} "
                   f"{r.entity_key}{' effective ' + str(r.effective) if r.effective else ''}{before} "
                   f"after {json.dumps(r.after, sort_keys=True)}")


# --- meters ---------------------------------------------------------------------------------------------------
@meters_app.command("attach")
def meters_attach(
    account: Annotated[str, typer.Argument(help="account id")],
    nmi: Annotated[str | None, typer.Option(help="the NMI (or --subject)")] = None,
    subject: Annotated[str | None, typer.Option(help="a CloudEvents subject instead of an NMI")] = None,
    since: Annotated[str, typer.Option("--from", help="move-in date: first day of service")] = "",
    until: Annotated[str | None, typer.Option("--to", help="first day without service (default: open)")] = None,
    by: By = None, dry_run: DryRun = False,
) -> None:
    """Move-in: attach an NMI or a telemetry subject to an account from a date."""
    start = _date(since or None, "--from")
    if start is None or (nmi is None) == (subject is None):
        typer.echo("give --from and exactly one of --nmi and --subject", err=True)
        raise typer.Exit(2)
    end = _date(until, "--to")
    op = (rules.AttachMeter(account, nmi, start, end) if nmi is not None
          else rules.AttachSubject(account, subject or "", start, end))
    _run([(1, op)], by, "cli", dry_run)


@meters_app.command("move-out")
def meters_move_out(
    nmi: Annotated[str, typer.Argument(help="the NMI (or the subject, with --subject)")],
    on: Annotated[str, typer.Option("--on", help="move-out date: the first day WITHOUT service (no daily charge)")],
    subject: Annotated[bool, typer.Option("--subject", help="the argument is a telemetry subject")] = False,
    by: By = None, dry_run: DryRun = False,
) -> None:
    """Move-out: the service ends; daily charges stop; once the account has no service left its final
    invoice closes at the move-out + the close delay."""
    day = _date(on, "--on")
    assert day is not None
    _run([(1, rules.DetachSubject(nmi, day) if subject else rules.MoveOut(nmi, day))], by, "cli", dry_run)


@meters_app.command("list")
def meters_list(account: Annotated[str | None, typer.Option(help="only this account's")] = None) -> None:
    """Every service point (NMI → account over time) and telemetry subject."""
    ref = _snapshot()
    for nmi, points in sorted(ref.service_points.items()):
        for sp in points:
            if account is None or sp.account == account:
                typer.echo(f"{nmi:12} {sp.account:12} {sp.effective_from} .. {sp.effective_to or 'open'}")
    for subject, ranges in sorted(ref.subjects.items()):
        for ts in ranges:
            if account is None or ts.account == account:
                typer.echo(f"{subject:24} {ts.account:12} {ts.effective_from} .. {ts.effective_to or 'open'}")


# --- plans ----------------------------------------------------------------------------------------------------
@plans_app.command("assign")
def plans_assign(
    account: Annotated[str, typer.Argument(help="account id")],
    price_book: Annotated[str, typer.Argument(help="price book id (published)")],
    since: Annotated[str, typer.Option("--from", help="first day on the plan; an open plan before it ends here")],
    until: Annotated[str | None, typer.Option("--to", help="first day off the plan (default: open)")] = None,
    by: By = None, dry_run: DryRun = False,
) -> None:
    """Assign or switch an account's plan from a date (mid-period switches prorate as always). Only the plan of
    the book's service is switched: an account has one plan per service (electricity, gas, water, a flat service)
    side by side; a ``contribution`` book is a voluntary contribution opted into (seed 001; ``plans end`` opts
    out)."""
    start = _date(since, "--from")
    assert start is not None
    _run([(1, rules.AssignPlan(account, price_book, start, _date(until, "--to")))], by, "cli", dry_run)


@plans_app.command("end")
def plans_end(
    account: Annotated[str, typer.Argument(help="account id")],
    price_book: Annotated[str, typer.Argument(help="the price book of the plan to end")],
    on: Annotated[str, typer.Option("--on", help="first day off the plan (a contribution's opt-out date)")],
    by: By = None, dry_run: DryRun = False,
) -> None:
    """End a plan from a date without a successor: a voluntary contribution's opt-out (seed 001), or a service
    (gas, water, a flat service) no longer billed. Audited as ``contribution.opt_out`` / ``plan.end``."""
    day = _date(on, "--on")
    assert day is not None
    _run([(1, rules.EndPlan(account, price_book, day))], by, "cli", dry_run)


@plans_app.command("list")
def plans_list(account: Annotated[str | None, typer.Option(help="only this account's")] = None) -> None:
    """Every plan assignment over time, with the service it bills (electricity, gas, water, a flat service,
    contribution)."""
    ref = _snapshot()
    for acc, plans in sorted(ref.plans.items()):
        if account is None or acc == account:
            for pa in plans:
                typer.echo(f"{acc:12} {pa.price_book_id:24} {pa.service:12} {pa.effective_from} .. "
                           f"{pa.effective_to or 'open'}")


# --- gas conversion factors (seed 001) ---------------------------------------------------------------------------
@meters_app.command("gas-factor")
def meters_gas_factor(
    account: Annotated[str, typer.Argument(help="account id")],
    since: Annotated[str, typer.Option("--from", help="first day the factor applies (an open factor ends here)")],
    heating_value: Annotated[str, typer.Option(help="heating value, MJ per m³ (decimal), e.g. 38.5")],
    pressure_correction: Annotated[str, typer.Option(help="pressure correction factor (decimal), e.g. 0.987")],
    until: Annotated[str | None, typer.Option("--to", help="first day without it (default: open)")] = None,
    by: By = None, dry_run: DryRun = False,
) -> None:
    """Set the account's gas conversion factor from a date: gas read in m³ is billed in MJ = m³ × heating value
    × pressure correction (``pipeline.rating.services``). Audited in the reference history."""
    from decimal import Decimal, InvalidOperation

    start = _date(since, "--from")
    assert start is not None
    try:
        hv, pc = Decimal(heating_value), Decimal(pressure_correction)
    except InvalidOperation:
        typer.echo("--heating-value and --pressure-correction must be decimal numbers", err=True)
        raise typer.Exit(2) from None
    _run([(1, rules.SetGasConversion(account, start, hv, pc, _date(until, "--to")))], by, "cli", dry_run)
