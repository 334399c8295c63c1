"""The ``pipeline`` command (typer): stack, topics, db, reference data, gateway, stages, demo, invoices."""

from __future__ import annotations

import getpass
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.accounts.cli import accounts_app, meters_app, plans_app
from pipeline.config import Settings, get_settings
from pipeline.usage.cli import usage_app

app = typer.Typer(help="Usage metering and billing pipeline on Kafka.", no_args_is_help=True)
stack_app = typer.Typer(help="The local Kafka broker and PostgreSQL cluster.", no_args_is_help=True)
topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
db_app = typer.Typer(help="The ledger database.", no_args_is_help=True)
load_app = typer.Typer(help="Load data.", no_args_is_help=True)
publish_app = typer.Typer(help="Meter gateways: publish readings.", no_args_is_help=True)
invoice_app = typer.Typer(help="Invoices in the ledger.", no_args_is_help=True)
pricebook_app = typer.Typer(help="Immutable, versioned price books.", no_args_is_help=True)
serve_app = typer.Typer(help="Servers: HTTP ingestion for gateways that do not speak Kafka; the operator API; the "
                        "Bill API.",
                        no_args_is_help=True)
late_app = typer.Typer(help="Readings refused by a billing rule (topic usage.late).", no_args_is_help=True)
replay_app = typer.Typer(help="Rebuild a generation of the pipeline from the input topics and compare ledgers.",
                         no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(topics_app, name="topics")
app.add_typer(db_app, name="db")
app.add_typer(load_app, name="load")
app.add_typer(publish_app, name="publish")
app.add_typer(invoice_app, name="invoice")
app.add_typer(pricebook_app, name="pricebook")
app.add_typer(serve_app, name="serve")
keys_app = typer.Typer(help="Customer API keys of the Bill API (stored hashed).", no_args_is_help=True)
rates_app = typer.Typer(help="Exchange rates (ECB reference rates) for cross-currency totals.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(rates_app, name="rates")
app.add_typer(late_app, name="late")
app.add_typer(replay_app, name="replay")
app.add_typer(accounts_app, name="accounts")
app.add_typer(meters_app, name="meters")
app.add_typer(plans_app, name="plans")
app.add_typer(usage_app, name="usage")

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_NEM12 = REPO_ROOT / "tests" / "data" / "nem12"


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --- stack ---------------------------------------------------------------------------------------
@stack_app.command("up")
def stack_up(
    with_monitoring: Annotated[bool, typer.Option(
        "--with-monitoring", help="also start a local Prometheus (PIPELINE_PROMETHEUS_PORT) scraping every process "
        "the CLI starts, with deploy/prometheus/alerts.yml; installs Debian's `prometheus` package if missing",
    )] = False,
) -> None:
    """Start Kafka (KRaft, 127.0.0.1) and PostgreSQL (127.0.0.1); create topics; migrate. Idempotent."""
    from pipeline import stack

    settings = get_settings()
    try:
        stack.up(settings, monitoring=with_monitoring)
    except stack.StackError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    topics_create()
    db_migrate()
    typer.echo(json.dumps(stack.status(settings), indent=1))


@stack_app.command("install-monitoring")
def stack_install_monitoring() -> None:
    """Make sure Prometheus is installed (Debian's `prometheus` package, with apt-get as root or `sudo -n`);
    prints the binary. Exit 1 with what to do when it cannot be installed."""
    from pipeline.monitoring import prometheus

    try:
        typer.echo(f"prometheus: {prometheus.ensure_installed(get_settings())}")
    except prometheus.PrometheusError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@stack_app.command("install-browser")
def stack_install_browser() -> None:
    """Make sure Chromium is installed for the portal's browser test (Debian's `chromium` package, with apt-get
    as root or `sudo -n`); prints the binary. Exit 1 with what to do when it cannot be installed."""
    from pipeline import browser

    try:
        typer.echo(f"chromium: {browser.ensure_chromium()}")
    except browser.BrowserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@stack_app.command("down")
def stack_down() -> None:
    """Stop what `stack up` started (Prometheus too)."""
    from pipeline import stack

    stack.down(get_settings())


@stack_app.command("status")
def stack_status() -> None:
    """Show whether Kafka and PostgreSQL are running."""
    from pipeline import stack

    typer.echo(json.dumps(stack.status(get_settings()), indent=1))


@stack_app.command("reset")
def stack_reset() -> None:
    """Stop the stack and delete its data (keeps the downloaded jars)."""
    from pipeline import stack

    stack.reset(get_settings())


# --- topics, db, reference ------------------------------------------------------------------------
@topics_app.command("create")
def topics_create() -> None:
    """Create every topic with its partitions, retention and compaction (existing ones are kept)."""
    from pipeline.runtime.kafka import create_topics
    from pipeline.topology import Topics

    settings = get_settings()
    created = create_topics(settings.kafka_bootstrap, Topics(settings).specs())
    typer.echo(f"topics created: {', '.join(created) if created else 'none (all exist)'}")


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending database migrations (yoyo)."""
    from pipeline.runtime import postgres

    applied = postgres.migrate(get_settings().database_owner_url)
    typer.echo(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")


@load_app.command("reference")
def load_reference(
    file: Annotated[Path | None, typer.Argument(help="reference JSON; default: the bundled file")] = None,
) -> None:
    """Load accounts, service points, plan assignments and price books into Postgres and `pricebooks` (a snapshot:
    rows upserted, every change recorded in reference_changes; `pipeline accounts import FILE` checks and refuses
    edits of history instead)."""
    from pipeline.codec import default_codec
    from pipeline.reference import BUNDLED_REFERENCE, ReferenceFile
    from pipeline.refstore import PriceBookConflict, load_reference_file, price_book_record
    from pipeline.runtime import postgres
    from pipeline.runtime.kafka import IdempotentProducer
    from pipeline.topology import Topics

    settings = get_settings()
    ref = ReferenceFile.read(file or BUNDLED_REFERENCE)
    _refuse_unmeasurable_demand(list(ref.price_books), settings, file or BUNDLED_REFERENCE)
    try:
        counts = postgres.with_reconnect(settings.database_url, lambda c: load_reference_file(
            c, ref, os.environ.get("PIPELINE_OPERATOR") or getpass.getuser(),
            f"json {(file or BUNDLED_REFERENCE).name}"))
    except PriceBookConflict as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    producer = IdempotentProducer(settings.kafka_bootstrap)
    codec = default_codec()
    for book in ref.price_books:
        key, value = price_book_record(codec, book)
        producer.send(Topics(settings).pricebooks, key.encode(), value)
    producer.flush()
    typer.echo(f"reference loaded: {counts}")


# --- price books --------------------------------------------------------------------------------
def _refuse_unmeasurable_demand(books: list[Any], settings: Any, file: Path) -> None:
    """Exit 2 when a demand component's interval is finer than (or not a multiple of) the windows this
    deployment makes of its metric (``pricebook.unmeasurable_demand``)."""
    from pipeline.rating.pricebook import unmeasurable_demand
    from pipeline.windowing.processor import policies_from_settings

    policy = policies_from_settings(settings)
    problems = [p for b in books for p in unmeasurable_demand(b, lambda m: policy(m).size_ms // 60_000)]
    if problems:
        typer.echo(f"error: {file}: " + "; ".join(problems), err=True)
        raise typer.Exit(2)


@pricebook_app.command("publish")
def pricebook_publish(file: Annotated[Path, typer.Argument(help="JSON price book version(s)")]) -> None:
    """Validate and publish price book versions to Postgres and the compacted `pricebooks` topic.

    A version is immutable: publishing a different body under an existing (id, version) is refused
    (exit 2); publishing the identical body again changes nothing. A later version covering past
    dates makes the rating stage re-rate those periods and emit only the differences.
    """
    from pydantic import ValidationError

    from pipeline.rating.pricebook import PriceBook

    settings = get_settings()
    raw = json.loads(file.read_text())
    try:
        books = [PriceBook.model_validate(b) for b in (raw if isinstance(raw, list) else [raw])]
    except ValidationError as exc:
        typer.echo(f"error: {file} is not a valid price book:\n{exc}", err=True)
        raise typer.Exit(2) from exc
    _refuse_unmeasurable_demand(books, settings, file)
    _publish_price_books(settings, books)


def _publish_price_books(settings: Settings, books: list[Any]) -> None:
    """Store ``books`` (``PriceBook`` versions) in Postgres and publish them to the ``pricebooks`` topic,
    printing each one's state; exit 2 when a version exists with another body."""
    from pipeline.codec import default_codec
    from pipeline.refstore import PriceBookConflict, price_book_record, store_price_book
    from pipeline.runtime import postgres
    from pipeline.runtime.kafka import IdempotentProducer
    from pipeline.topology import Topics

    try:
        new = postgres.with_reconnect(settings.database_url, lambda c: [store_price_book(c, b) for b in books])
    except PriceBookConflict as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    producer = IdempotentProducer(settings.kafka_bootstrap)
    codec = default_codec()
    for book, is_new in zip(books, new, strict=True):
        key, value = price_book_record(codec, book)
        producer.send(Topics(settings).pricebooks, key.encode(), value)
        state = "published" if is_new else "already published (identical), nothing changed"
        typer.echo(f"{book.id} v{book.version} sha256 {book.content_sha256()[:16]}…: {state}")
    producer.flush()


@pricebook_app.command("show")
def pricebook_show(
    book_id: Annotated[str, typer.Argument(help="price book id")],
    version: Annotated[int | None, typer.Argument(help="version; default: every version")] = None,
) -> None:
    """Print price book versions as published (canonical JSON, content hash, publication time)."""
    from pipeline.runtime import postgres

    with postgres.connect(get_settings().database_url) as conn:
        rows = conn.execute(
            "SELECT version, content_sha256, published_at, body FROM price_books WHERE id = %s "
            "AND (%s::int IS NULL OR version = %s) ORDER BY version", (book_id, version, version),
        ).fetchall()
    if not rows:
        typer.echo(f"no price book {book_id}" + (f" version {version}" if version else ""), err=True)
        raise typer.Exit(1)
    for v, sha, at, body in rows:
        typer.echo(f"# {book_id} v{v}  sha256 {sha}  published {at:%Y-%m-%d %H:%M:%S %Z}")
        typer.echo(json.dumps(body, indent=1, sort_keys=True))


# --- gateway ------------------------------------------------------------------------------------
def _publish_files(publish: Callable[..., Any], paths: list[Path], progress: bool) -> None:
    """Run a file gateway (``publish_nem12`` / ``publish_nem13``) to meter.readings and report; exit 1
    if any file was rejected."""
    from pipeline.codec import default_codec
    from pipeline.runtime.kafka import IdempotentProducer
    from pipeline.topology import Topics

    settings = get_settings()
    producer = IdempotentProducer(settings.kafka_bootstrap)
    report = publish(paths, producer, default_codec(), Topics(settings).meter_readings, progress)
    typer.echo(f"published {report.readings_published} readings from {report.files_published} files")
    for err in report.rejected:
        typer.echo(f"rejected [{err.reason}] {err}", err=True)
    if report.rejected:
        raise typer.Exit(1)


@publish_app.command("nem12")
def publish_nem12_cmd(
    paths: Annotated[list[Path], typer.Argument(help="NEM12 files (.csv or .zip) or folders of them")],
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Validate NEM12 files and publish one reading per interval per channel to `meter.readings`.

    A malformed file is rejected whole (nothing from it is published) with a message naming the
    problem; the exit code is then 1.
    """
    from functools import partial

    from pipeline.ingest.gateway import channel_windows, publish_nem12

    _publish_files(partial(publish_nem12, window_minutes=channel_windows(get_settings())), paths, progress)


@publish_app.command("telemetry")
def publish_telemetry_cmd(
    days: Annotated[float, typer.Option(help="hours of usage to generate, in days, ending --end")] = 3.0,
    end: Annotated[str | None, typer.Option(help="end (UTC, ISO 8601); default: the last UTC midnight")] = None,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same stream)")] = 1,
    duplicates: Annotated[float, typer.Option(help="share of events sent twice")] = 0.1,
) -> None:
    """Publish a generated sample stream of CloudEvents to `telemetry.events` (issue 6).

    API requests, storage GB-hours and active users of the bundled sample subjects (accounts TEL-*,
    price book SAMPLE-SAAS-USAGE), in binary and structured mode (CloudEvents Kafka protocol binding),
    a share of them repeated, all shuffled: ingest drops the repeats, windowing sorts out the order.
    """
    from datetime import UTC, datetime, timedelta

    from pipeline.ingest.telemetry import sample_stream
    from pipeline.runtime.kafka import IdempotentProducer
    from pipeline.topology import Topics

    settings = get_settings()
    stop = datetime.fromisoformat(end).astimezone(UTC) if end else \
        datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    stream, repeats = sample_stream(stop - timedelta(days=days), stop, seed, duplicates)
    producer = IdempotentProducer(settings.kafka_bootstrap)
    topic = Topics(settings).telemetry_events
    for event in stream:
        key, value, headers = event.record()
        producer.send(topic, key, value, headers)
    producer.flush()
    start = stop - timedelta(days=days)
    typer.echo(f"published {len(stream)} CloudEvents ({repeats} repeats) from {start:%Y-%m-%d %H:%M} "
               f"to {stop:%Y-%m-%d %H:%M} UTC to {topic}")


@publish_app.command("nem13")
def publish_nem13_cmd(
    paths: Annotated[list[Path], typer.Argument(help="NEM13 files (.csv or .zip) or folders of them")],
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Validate NEM13 accumulation files and publish each register read spread evenly over its read
    period's days (one reading per day, marked as a NEM13 spread) to `meter.readings`.

    A malformed file (or one whose Quantity disagrees with its register reads) is rejected whole,
    nothing from it published, with a message naming the problem; the exit code is then 1.
    """
    from pipeline.ingest.gateway import publish_nem13

    _publish_files(publish_nem13, paths, progress)


@serve_app.command("http")
def serve_http(
    host: Annotated[str | None, typer.Option(help="bind address; default PIPELINE_HTTP_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="port; default PIPELINE_HTTP_PORT")] = None,
) -> None:
    """HTTP ingestion (FastAPI + uvicorn): POST /v1/meter-readings and /v1/events, API keys from
    PIPELINE_API_KEYS, OpenAPI at /openapi.json. Answers 202 only once Kafka acknowledged the records.
    SIGTERM/SIGINT: stop accepting, finish requests in flight, exit 0."""
    import uvicorn

    from pipeline.codec import default_codec
    from pipeline.ingest.http import create_app
    from pipeline.runtime.kafka import IdempotentProducer

    settings = get_settings()
    if not settings.api_keys:
        typer.echo("error: no API keys configured (PIPELINE_API_KEYS='[\"key\"]'): every request would be refused",
                   err=True)
        raise typer.Exit(2)
    _logging(os.environ.get("PIPELINE_LOG_LEVEL", "INFO"))
    from pipeline.monitoring.prometheus import register_target, unregister_target
    from pipeline.runtime.signals import REQUESTED

    producer = IdempotentProducer(settings.kafka_bootstrap, linger_ms=5)
    app_ = create_app(settings, producer, default_codec())
    if REQUESTED:  # SIGTERM during start-up: a clean stop
        return
    port = settings.http_port if port is None else port
    target = register_target(settings.model_copy(update={"metrics_addr": host or settings.http_host}), "http", port,
                             settings.instance_id)  # /metrics is served by the app itself
    uvicorn.run(app_, host=host or settings.http_host, port=port, log_level="info")
    producer.flush(30)
    unregister_target(target)


@serve_app.command("operator")
def serve_operator(
    host: Annotated[str | None, typer.Option(help="bind address; default PIPELINE_OPERATOR_HTTP_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="port; default PIPELINE_OPERATOR_HTTP_PORT")] = None,
) -> None:
    """The operator API (FastAPI + uvicorn): accounts, meters and plans as audited operations; keys and roles
    from PIPELINE_OPERATOR_API_KEYS; OpenAPI at /openapi.json, Swagger UI at /docs."""
    import uvicorn

    from pipeline.api.operator import create_app

    settings = get_settings()
    if not settings.operator_api_keys:
        typer.echo('error: no operator API keys configured (PIPELINE_OPERATOR_API_KEYS=\'[{"name": "alice", '
                   '"key": "...", "role": "operator"}]\'): every request would be refused', err=True)
        raise typer.Exit(2)
    _logging(os.environ.get("PIPELINE_LOG_LEVEL", "INFO"))
    uvicorn.run(create_app(settings), host=host or settings.operator_http_host,
                port=settings.operator_http_port if port is None else port, log_level="info")


@serve_app.command("customer")
def serve_customer(
    host: Annotated[str | None, typer.Option(help="bind address; default PIPELINE_CUSTOMER_HTTP_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="port; default PIPELINE_CUSTOMER_HTTP_PORT")] = None,
) -> None:
    """The Bill API (FastAPI + uvicorn, issue 17 part B): ad-hoc bills, manual charges and credits through
    invoice.adjustments into the ledger (exactly once), balances across currencies. Customer keys from
    `pipeline keys create`, operator keys from PIPELINE_OPERATOR_API_KEYS; OpenAPI at /openapi.json, Swagger UI
    at /docs. Needs the invoicing stage running to apply writes."""
    import uvicorn

    from pipeline.api.customer import create_app
    from pipeline.codec import default_codec
    from pipeline.runtime.kafka import IdempotentProducer

    settings = get_settings()
    _logging(os.environ.get("PIPELINE_LOG_LEVEL", "INFO"))
    producer = IdempotentProducer(settings.kafka_bootstrap, linger_ms=2)
    uvicorn.run(create_app(settings, producer, default_codec()), host=host or settings.customer_http_host,
                port=settings.customer_http_port if port is None else port, log_level="info")
    producer.flush(30)


@keys_app.command("create")
def keys_create(
    account: Annotated[str, typer.Argument(help="the account the key reaches (and nothing else)")],
    name: Annotated[str, typer.Option(help="a label for the key")] = "",
) -> None:
    """Create a customer API key for ACCOUNT and print it ONCE (only its SHA-256 is stored)."""
    from pipeline.api.billstore import create_customer_key
    from pipeline.runtime import postgres

    try:
        key_id, key = postgres.with_reconnect(get_settings().database_url, lambda c: create_customer_key(
            c, account, name, f"cli:{getpass.getuser()}"), give_up_s=30.0)
    except LookupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"key {key_id} for {account} (shown once, keep it):\n{key}")


@rates_app.command("load")
def rates_load(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="ECB eurofxref.csv / eurofxref-hist.csv")],
    source: Annotated[str, typer.Option(help="recorded with each rate")] = "ECB",
) -> None:
    """Load an ECB reference-rate CSV (1 EUR = rate units of each currency, per day) into exchange_rates;
    rates already loaded for the same source and day are kept as they were."""
    from pipeline.api.billstore import load_rates
    from pipeline.fx import RateError, parse_ecb_csv
    from pipeline.runtime import postgres

    try:
        rates = parse_ecb_csv(file.read_text(encoding="utf-8"), source)
    except (RateError, UnicodeDecodeError) as exc:
        typer.echo(f"error: {file}: {exc}", err=True)
        raise typer.Exit(1) from None
    n = postgres.with_reconnect(get_settings().database_url, lambda c: load_rates(
        c, rates, f"cli:{getpass.getuser()}"), give_up_s=30.0)
    days = sorted({r.rate_date for r in rates})
    span = f"{days[0]} … {days[-1]}" if days else "no days"
    typer.echo(f"{len(rates)} rates ({span}) from {source}: {n} new")


# --- stages -----------------------------------------------------------------------------------------
@app.command("run")
def run_stage(
    stage: Annotated[str, typer.Argument(help="ingest | windowing | rating | invoicing | relay | usage")],
) -> None:
    """Run one stage (or the outbox relay) in this process until SIGTERM/SIGINT (clean shutdown after
    committing)."""
    from pipeline.runtime.loop import StageRunner
    from pipeline.runtime.signals import REQUESTED, install_early_handlers
    from pipeline.stages import build_stage

    install_early_handlers()  # keeps what `python -m pipeline` already recorded
    settings = get_settings()
    _logging(os.environ.get("PIPELINE_LOG_LEVEL", "INFO"))
    target = None
    if settings.metrics_port:  # announced to the local Prometheus (file-based discovery); kept if it fails
        from pipeline.monitoring.prometheus import register_target, unregister_target

        target = register_target(settings, stage, settings.metrics_port, settings.instance_id)
    if stage == "relay":
        from pipeline.codec import default_codec
        from pipeline.invoicing.relay import Relay

        relay = Relay(settings, default_codec())
        if REQUESTED:
            relay.stop()
        relay.run()
    else:
        runner = StageRunner(settings, build_stage(stage, settings))
        if REQUESTED:  # SIGTERM during start-up still means a clean exit
            runner.stop()
        runner.run()
    if target is not None:  # a clean stop: no longer expected up
        unregister_target(target)


# --- invoices --------------------------------------------------------------------------------------
@invoice_app.command("show")
def invoice_show(
    account: Annotated[str | None, typer.Argument(help="account; default: all")] = None,
    period: Annotated[str | None, typer.Argument(help="billing period start, YYYY-MM-DD; default: all")] = None,
) -> None:
    """Print the invoices of an account (or all), optionally of one billing period, from the ledger:
    lines, prior-period adjustments, and for finalized invoices number, dates and amount due."""
    from datetime import date

    from pipeline.invoicing.report import format_invoice, invoice_summaries
    from pipeline.runtime import postgres

    try:
        period_start = date.fromisoformat(period) if period else None
    except ValueError:
        typer.echo(f"period must be a date YYYY-MM-DD, got {period!r}", err=True)
        raise typer.Exit(2) from None
    with postgres.connect(get_settings().database_url) as conn:
        invoices = invoice_summaries(conn, account, period_start)
    for inv in invoices:
        typer.echo(format_invoice(inv) + "\n")
    if not invoices:
        typer.echo("no invoices")


@invoice_app.command("review")
def invoice_review(
    account: Annotated[str | None, typer.Argument(help="account; default: all")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of text")] = False,
) -> None:
    """List the invoices held in REVIEW by the checks before finalizing (issue 17): why, since when, until when
    the hold lasts, and their charges so far."""
    import json

    from pipeline.invoicing.review import held
    from pipeline.runtime import postgres

    rows = postgres.with_reconnect(get_settings().database_url, lambda c: held(c, account), give_up_s=30)
    if as_json:
        typer.echo(json.dumps([h.as_json() for h in rows], indent=2))
        return
    for h in rows:
        until = h.until.isoformat(timespec="seconds") if h.until else "approval"
        state = f"approved by {h.approved_by}, finalizing" if h.approved_by else f"held until {until}"
        typer.echo(f"{h.invoice_id}  {h.total:.2f} {h.currency}  {state}")
        for f in h.flags:
            typer.echo(f"  {f['code']}: {f['message']}")
    if not rows:
        typer.echo("no invoices in review")


@invoice_app.command("approve")
def invoice_approve(
    invoice_id: Annotated[str, typer.Argument(help="invoice id (account|period start|currency), see `invoice review`")],
    note: Annotated[str, typer.Option(help="why (kept in the audit)")] = "",
    by: Annotated[str | None, typer.Option("--by", help="who approves (audit); default $PIPELINE_OPERATOR or "
                                           "the login name")] = None,
) -> None:
    """Approve an invoice held in REVIEW: the invoicing stage finalizes it within seconds (next number of its
    series). Exit code 1 when the invoice is unknown or not in REVIEW."""
    from pipeline.invoicing.review import ReviewError, approve
    from pipeline.runtime import postgres

    who = by or os.environ.get("PIPELINE_OPERATOR") or getpass.getuser()
    try:
        h = postgres.with_reconnect(get_settings().database_url,
                                    lambda c: approve(c, invoice_id, who, "cli", note), give_up_s=30)
    except ReviewError as exc:
        typer.echo(f"{exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{h.invoice_id} approved by {who}; the invoicing stage finalizes it at its next close check")


@app.command("pay")
def pay(
    account: Annotated[str, typer.Argument(help="paying account")],
    amount: Annotated[str, typer.Argument(help="amount received, major units, e.g. 120.50")],
    currency: Annotated[str, typer.Option(help="ISO 4217 code")] = "AUD",
    payment_id: Annotated[str | None, typer.Option("--id", help="unique payment id; default: a new UUID")] = None,
    reference: Annotated[str, typer.Option(help="bank reference or similar")] = "",
) -> None:
    """Publish a payment to the payments topic (idempotent producer); invoicing records it once per id
    and counts it on the account's next finalized invoice (SPEC §5 balance)."""
    import uuid
    from datetime import UTC, datetime
    from decimal import Decimal, InvalidOperation

    from pipeline.codec import default_codec
    from pipeline.records import Payment
    from pipeline.runtime.kafka import IdempotentProducer
    from pipeline.topology import Topics

    try:
        payment = Payment(payment_id or str(uuid.uuid4()), account, currency, Decimal(amount), datetime.now(UTC),
                          reference)
    except InvalidOperation:
        typer.echo(f"invalid payment: amount {amount!r} is not a decimal number", err=True)
        raise typer.Exit(2) from None
    except (ValueError, TypeError) as exc:
        typer.echo(f"invalid payment: {exc}", err=True)
        raise typer.Exit(2) from None
    settings = get_settings()
    producer = IdempotentProducer(settings.kafka_bootstrap)
    producer.send(Topics(settings).payments, account.encode(), default_codec().encode(payment))
    producer.flush()
    typer.echo(f"payment {payment.payment_id}: {payment.amount} {currency} from {account} published")


@app.command("explain")
def explain(line_id: Annotated[str, typer.Argument(help="ledger line id")]) -> None:
    """Why is this line on the bill? The line, its formula and price book, the window revisions that
    caused it, their quality flags, and the NEM12 files and records they came from."""
    from pipeline.invoicing.report import explain_line
    from pipeline.runtime import postgres

    with postgres.connect(get_settings().database_url) as conn:
        text = explain_line(conn, line_id)
    if text is None:
        typer.echo(f"no ledger line {line_id}", err=True)
        raise typer.Exit(1)
    typer.echo(text)


@app.command("status")
def status_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="the facts as JSON")] = False,
) -> None:
    """One view for on-call without Grafana: each process the CLI started (up, ready, consumer lag, last commit),
    each stage's committed input, dead letters and refusals by stage and reason, ledger lines, invoices by
    status and the outbox backlog."""
    from pipeline.monitoring.status import gather, render

    facts = gather(get_settings())
    typer.echo(json.dumps(facts, indent=1) if as_json else render(facts))


@app.command("config")
def show_config() -> None:
    """Print the configuration in force (from PIPELINE_* environment variables)."""
    typer.echo(get_settings().model_dump_json(indent=1))


# --- refused readings, reconciliation ---------------------------------------------------------------
def _utc(text: str | None, what: str) -> Any:
    from datetime import UTC, datetime

    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        typer.echo(f"{what} must be an ISO 8601 date or time, got {text!r}", err=True)
        raise typer.Exit(2) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@late_app.command("list")
def late_list() -> None:
    """Count the refused readings on usage.late by reason, stage and account."""
    from collections import Counter

    from pipeline.codec import default_codec
    from pipeline.records import LateEvent
    from pipeline.runtime.kafka import read_all
    from pipeline.topology import Topics

    settings = get_settings()
    codec = default_codec()
    counts: Counter[tuple[str, str, str]] = Counter()
    for m in read_all(settings.kafka_bootstrap, Topics(settings).usage_late, timeout_s=120):
        late = codec.decode(m.value, LateEvent)
        counts[(late.reason, late.stage, late.event.account)] += 1
    for (reason, stage, account), n in sorted(counts.items()):
        typer.echo(f"{reason:22} {stage:10} {account:12} {n:>8,}")
    typer.echo(f"{sum(counts.values()):,} refused readings")


@late_app.command("replay")
def late_replay(
    account: Annotated[str | None, typer.Option(help="only this account's refusals")] = None,
    reason: Annotated[str | None, typer.Option(help="only this reason, e.g. OUTSIDE_SERVICE_DATES")] = None,
    since: Annotated[str | None, typer.Option("--from", help="readings starting at or after (ISO 8601, UTC)")] = None,
    until: Annotated[str | None, typer.Option("--to", help="readings starting before (ISO 8601, UTC)")] = None,
    dry_run: Annotated[bool, typer.Option(help="count what would be re-submitted, send nothing")] = False,
) -> None:
    """Re-submit refused readings after the cause was fixed (e.g. a service point extended): each goes back
    to where it was first consumed and is checked again. Billed once: running it again adds nothing."""
    from pipeline.operations.late_replay import Filter, replay

    which = Filter(account, reason, _utc(since, "--from"), _utc(until, "--to"))
    report = replay(get_settings(), which, dry_run)
    for (why, topic), n in sorted((report.resubmitted or {}).items()):
        typer.echo(f"{'would re-submit' if dry_run else 're-submitted'} {n:,} {why} to {topic}")
    typer.echo(f"{report.selected:,} refused readings selected" + (" (dry run: nothing sent)" if dry_run else ""))


@app.command("reconcile")
def reconcile_cmd(
    period: Annotated[str | None, typer.Option(help="tie out only the billing period starting on this date "
                                               "(YYYY-MM-DD, the account's local date)")] = None,
    account: Annotated[str | None, typer.Option(help="tie out only this account")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON here")] = None,
    metrics_file: Annotated[Path | None, typer.Option(
        help="also write the figures as Prometheus metrics (text format, for node_exporter's textfile "
             "collector): pipeline_reconcile_*")] = None,
) -> None:
    """Account for every reading (in = billed + dead-lettered + refused) and tie out readings = windows =
    ledger per (account, period, metric, component), the ledger's amounts and its outbox. Exit 1 on a break
    or while any reading is pending (naming the stage it waits on)."""
    from datetime import date

    from pipeline.operations.reconcile import reconcile, take_snapshot, write_metrics
    from pipeline.refstore import postgres_loader
    from pipeline.stages import window_policies

    settings = get_settings()
    try:
        period_start = date.fromisoformat(period) if period else None
    except ValueError as exc:
        raise typer.BadParameter(f"--period {period!r} is not a date (YYYY-MM-DD)") from exc
    ref = postgres_loader(settings.database_url)()
    report = reconcile(take_snapshot(settings), window_policies(settings), ref, account=account,
                       period=period_start)
    for line in report.lines():
        typer.echo(line)
    if json_out is not None:
        json_out.write_text(json.dumps(report.as_json(), indent=1))
    if metrics_file is not None:
        write_metrics(report, metrics_file)
    if not report.clean:
        raise typer.Exit(1)


# --- replay ----------------------------------------------------------------------------------------
@replay_app.command("run")
def replay_run(
    name: Annotated[str, typer.Argument(help="generation name ([a-z0-9_], e.g. 20261205a)")],
    price_book: Annotated[list[Path] | None, typer.Option(
        "--price-book", help="JSON price book version(s) the generation bills with, besides the live ones "
                             "(e.g. a superseding version); repeatable")] = None,
    since: Annotated[str | None, typer.Option(
        "--from", help="only billing periods starting on or after this date (YYYY-MM-DD): readings from a day "
                       "before it are copied, the diff compares those periods")] = None,
    timeout: Annotated[float, typer.Option(help="fail when nothing moves for this many seconds")] = 180.0,
) -> None:
    """Rebuild generation NAME from the live input topics and reference data (its own topics, consumer groups,
    state and ledger database), bill it with the four stages, stop them and print its diff with the live
    ledger. Exit 1 when it differs, 2 when it cannot be made."""
    from datetime import date

    from pydantic import ValidationError
    from tqdm import tqdm

    from pipeline.operations import replay
    from pipeline.rating.pricebook import PriceBook

    settings = get_settings()
    books = []
    for file in price_book or []:
        raw = json.loads(file.read_text())
        try:
            books += [PriceBook.model_validate(b) for b in (raw if isinstance(raw, list) else [raw])]
        except ValidationError as exc:
            typer.echo(f"error: {file} is not a valid price book:\n{exc}", err=True)
            raise typer.Exit(2) from exc
    try:
        start = date.fromisoformat(since) if since else None
    except ValueError as exc:
        raise typer.BadParameter(f"--from {since!r} is not a date (YYYY-MM-DD)") from exc
    try:
        gen = replay.generation(settings, name)
        with tqdm(unit="record", desc="copying input records") as bar:
            sent = replay.prepare(settings, gen, books, progress=lambda n: bar.update(n - bar.n), since=start)
    except replay.ReplayError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"generation {name}: {sent:,} input records copied to {gen.settings.topic_prefix}*, ledger "
               f"{gen.database}; billing it")
    log_dir = settings.stack_dir / "logs" / f"gen-{name}"
    procs = start_stage_processes(gen.settings, gen.env, log_dir=log_dir)
    try:
        report = wait_until_accounted(gen.settings, procs, 0, stall_s=timeout, log_dir=log_dir)
    except DemoFailed as exc:
        typer.echo(f"replay failed: {exc}", err=True)
        raise typer.Exit(2) from exc
    finally:
        codes = stop_stage_processes(procs)
    typer.echo("\n".join(report.lines()))
    typer.echo(f"stages stopped: {codes}")
    _print_diff(replay.diff(settings, gen), name)


@replay_app.command("diff")
def replay_diff(name: Annotated[str, typer.Argument(help="generation name")],
                json_out: Annotated[Path | None, typer.Option("--json", help="also write the rows here")] = None,
                ) -> None:
    """Compare generation NAME's ledger with the live one per (account, period, line): exit 0 when equal,
    1 when they differ (each difference printed), 2 when the generation does not exist."""
    from pipeline.operations import replay

    settings = get_settings()
    try:
        rows = replay.diff(settings, replay.generation(settings, name))
    except replay.ReplayError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if json_out is not None:
        json_out.write_text(json.dumps([{"account": r.account, "period_start": r.period_start, "line": r.line,
                                         "live": str(r.live), "replayed": str(r.replayed),
                                         "difference": str(r.difference)} for r in rows], indent=1))
    _print_diff(rows, name)


@replay_app.command("apply")
def replay_apply(name: Annotated[str, typer.Argument(help="generation name")]) -> None:
    """Bring generation NAME's differences to the live ledger through the normal path: publish live the price
    book versions the generation billed with that the live pipeline lacks; the live rating stage re-rates
    and appends the difference lines exactly once (`pipeline replay diff NAME` reaches zero when it is done).
    Applying again publishes nothing new. Exit 1 when the generation differs without any price book version to
    publish (nothing here can apply that), 2 when it does not exist or a version conflicts."""
    from pipeline.operations import replay

    settings = get_settings()
    try:
        books = replay.books_to_apply(settings, replay.generation(settings, name))
    except replay.ReplayError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if not books:
        rows = replay.diff(settings, replay.generation(settings, name))
        if rows:
            typer.echo(f"generation {name}: {len(rows):,} differences, but no price book version to publish: they "
                       f"do not come from price books (input or code changes), and re-rating cannot bring them to "
                       f"the live ledger; `pipeline replay diff {name}` lists them", err=True)
            raise typer.Exit(1)
        typer.echo(f"generation {name}: no price book version to publish; nothing to apply")
        return
    _publish_price_books(settings, books)


@replay_app.command("drop")
def replay_drop(name: Annotated[str, typer.Argument(help="generation name")]) -> None:
    """Remove generation NAME: its ledger database and topics (the live pipeline is not touched)."""
    from pipeline.operations import replay

    settings = get_settings()
    replay.drop(settings, replay.generation(settings, name))
    typer.echo(f"generation {name} dropped")


def _print_diff(rows: list[Any], name: str) -> None:
    if not rows:
        typer.echo(f"generation {name}: the ledgers agree on every (account, period, line)")
        return
    for r in rows:
        typer.echo(f"{r.account} {r.period_start} {r.line}: live {r.live:f} replayed {r.replayed:f} "
                   f"difference {r.difference:+f}")
    total = sum((r.difference for r in rows), start=type(rows[0].difference)(0))
    typer.echo(f"generation {name}: {len(rows):,} lines differ, in total {total:+f}")
    raise typer.Exit(1)


# --- exports (issue 15) -------------------------------------------------------------------------------
@app.command("export")
def export_cmd(
    datasets: Annotated[list[str] | None, typer.Argument(
        help="ledger_lines, invoices, usage_windows; default: all three")] = None,
    day: Annotated[str | None, typer.Option("--date", help="the UTC day, YYYY-MM-DD; default: yesterday")] = None,
    dest: Annotated[str | None, typer.Option(
        "--dest", help="file:///folder or s3://bucket/prefix; default: PIPELINE_EXPORT_DESTINATION")] = None,
    generation: Annotated[str | None, typer.Option(help="default: PIPELINE_EXPORT_GENERATION (live)")] = None,
    max_rows: Annotated[int | None, typer.Option(
        min=1, help="most rows per file; default: PIPELINE_EXPORT_MAX_ROWS")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Export a day of ledger lines (appended that day), invoices (finalized that day) or usage windows (starting
    that day, latest revision) as CSV and Parquet with a manifest, after the prechecks (reconciliation passes,
    no open refused readings in scope). Exit 0: written or unchanged; 1: a precheck failed (nothing written);
    2: a bad request; 3: the destination or the stack (Kafka, Postgres) failed."""
    from datetime import UTC, datetime, timedelta

    from pipeline.operations import export as ex
    from pipeline.operations.export_run import PrecheckFailed, run_export
    from pipeline.runtime.kafka import KafkaIOError
    from pipeline.runtime.objectstore import StoreError
    from pipeline.runtime.postgres import DatabaseError

    settings = get_settings()
    destination = dest or settings.export_destination
    try:
        if not destination:
            raise ex.ExportError("no destination: give --dest or set PIPELINE_EXPORT_DESTINATION")
        period = ex.parse_period(day) if day else ex.Period((datetime.now(UTC) - timedelta(days=1)).date())
        results = run_export(settings, list(datasets or ex.DATASETS), period, destination,
                             generation or settings.export_generation, max_rows or settings.export_max_rows,
                             progress=progress, echo=typer.echo)
    except ex.ExportError as exc:
        typer.echo(f"export refused: {exc}", err=True)
        raise typer.Exit(2) from None
    except PrecheckFailed as exc:
        typer.echo(f"nothing exported: {exc}", err=True)
        raise typer.Exit(1) from None
    except StoreError as exc:
        typer.echo(f"export failed (recorded as FAILED in export_history): {exc}", err=True)
        raise typer.Exit(3) from None
    except (KafkaIOError, DatabaseError) as exc:
        typer.echo(f"export failed: the stack did not answer: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(3) from None
    written = sum(r.version is not None for r in results)
    typer.echo(f"{written} export(s) written, {len(results) - written} unchanged")


@app.command("exports")
def exports_cmd(
    dataset: Annotated[str | None, typer.Option(help="only this dataset")] = None,
    day: Annotated[str | None, typer.Option("--date", help="only this day, YYYY-MM-DD")] = None,
) -> None:
    """The export history, newest first: when, dataset, day, version, status, rows, files, where."""
    from pipeline.operations import export as ex
    from pipeline.operations.export_run import history

    try:
        period = ex.parse_period(day) if day else None
    except ex.ExportError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    rows = history(get_settings(), dataset, period.day if period else None)
    for at, ds, d, version, status, n, files, location, error in rows:
        typer.echo(f"{at:%Y-%m-%d %H:%M:%S} {ds:14} {d} v{version:<3} {status:9} {n:>10,} rows {files:>4} files "
                   f"{location}" + (f"  ({error})" if error else ""))
    typer.echo(f"{len(rows)} export(s)")


# --- demo --------------------------------------------------------------------------------------------
def start_stage_processes(settings: Settings, extra_env: dict[str, str] | None = None,
                          log_dir: Path | None = None) -> dict[str, subprocess.Popen]:
    """Start the four stages and the outbox relay as separate processes (``pipeline run <stage>``), each with
    its /metrics, /healthz and /readyz on ``metrics_base_port`` + its index in ``stages.PROCESSES`` (none when
    ``extra_env`` sets PIPELINE_METRICS_PORT to 0); each announces itself to the local Prometheus."""
    from pipeline.stages import PROCESSES

    env = {**os.environ, **(extra_env or {})}
    log_dir = log_dir or settings.stack_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    for i, stage in enumerate(PROCESSES):
        log = open(log_dir / f"{stage}.log", "ab")  # noqa: SIM115 - handed to the child
        port = 0 if (extra_env or {}).get("PIPELINE_METRICS_PORT") == "0" else settings.metrics_base_port + i
        if port and _port_taken(settings.metrics_addr, port):  # monitoring never keeps a stage from starting
            typer.echo(f"warning: port {port} is taken: {stage} runs without /metrics (set "
                       "PIPELINE_METRICS_BASE_PORT)", err=True)
            port = 0
        stage_env = {**env, "PIPELINE_METRICS_PORT": str(port)}
        procs[stage] = subprocess.Popen([sys.executable, "-m", "pipeline", "run", stage], env=stage_env,
                                        stdout=log, stderr=subprocess.STDOUT)
    return procs


def _port_taken(addr: str, port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((addr, port))
        except OSError:
            return True
    return False


def stop_stage_processes(procs: dict[str, subprocess.Popen], timeout_s: float = 60) -> dict[str, int]:
    """SIGTERM every stage and wait; returns exit codes (SIGKILL after ``timeout_s``)."""
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            codes[name] = p.wait()
    return codes


class DemoFailed(Exception):
    """The demo cannot finish; the message names the stage and the count (printed without a traceback)."""


def wait_until_accounted(settings: Settings, procs: dict[str, subprocess.Popen], published: int,
                         stall_s: float = 180.0, log_dir: Path | None = None,
                         echo: Callable[[str], None] = typer.echo) -> Any:
    """Wait until every published reading is billed, dead-lettered or refused (``operations.reconcile``),
    printing each stage's progress; returns the final ``Report``.

    Raises ``DemoFailed`` when a stage process exits, or when nothing moved for ``stall_s`` seconds while
    readings are still pending (naming the stage they wait on and how many).
    """
    from pipeline.operations.reconcile import progress, reconcile, take_snapshot
    from pipeline.stages import window_policies

    policy = window_policies(settings)
    log_dir = log_dir or settings.stack_dir / "logs"
    last_state: Any = None
    last_move = time.monotonic()
    last_line = ""
    while True:
        for name, p in procs.items():
            if p.poll() is not None:
                raise DemoFailed(f"stage {name} exited with code {p.returncode}; see {log_dir / (name + '.log')}")
        state = progress(settings)
        line = "  ".join(f"{stage} {done:,}/{end:,}" for stage, (done, end) in state.items())
        if line != last_line:
            echo(f"progress: {line}")
            last_line = line
        if state != last_state:
            last_state, last_move = state, time.monotonic()
        behind = {stage: end - done for stage, (done, end) in state.items()}
        if all(n <= 2 * settings.partitions for n in behind.values()):  # at most transaction markers left
            report = reconcile(take_snapshot(settings), policy)
            if report.inputs >= published and report.complete:
                return report
            if time.monotonic() - last_move > stall_s:
                stage = next((s for s in ("ingest", "windowing", "rating", "invoicing") if report.pending.get(s)),
                             "ingest")
                raise DemoFailed(f"{report.pending.get(stage, published - report.inputs):,} readings are still "
                                 f"pending at {stage} after {stall_s:.0f} s without progress; see "
                                 f"{log_dir / (stage + '.log')}\n" + "\n".join(report.lines()))
        elif time.monotonic() - last_move > stall_s:
            stage = max(behind, key=lambda s: behind[s])
            raise DemoFailed(f"{stage} has {behind[stage]:,} records to consume and committed nothing for "
                             f"{stall_s:.0f} s; see {log_dir / (stage + '.log')}")
        time.sleep(1.0)


def tie_out_now(settings: Settings) -> Any:
    """The tie-out (``operations.reconcile.tie_out``: readings = windows = ledger, amounts, outbox) of the
    topics and ledger of ``settings`` now, with the reference data in Postgres."""
    from pipeline.operations.reconcile import reconcile, take_snapshot
    from pipeline.refstore import postgres_loader
    from pipeline.stages import window_policies

    report = reconcile(take_snapshot(settings), window_policies(settings), postgres_loader(settings.database_url)())
    return report.tie


def wait_finalized(settings: Settings, timeout_s: float) -> int:
    """Wait (at most ``timeout_s``) until no invoice is OPEN whose close time the wall clock has passed;
    returns how many are still OPEN."""
    from pipeline.runtime import postgres

    deadline = time.monotonic() + timeout_s
    while True:
        with postgres.connect(settings.database_url) as conn:
            waiting = conn.execute("SELECT count(*) FROM invoices WHERE status = 'OPEN' AND close_at <= now()"
                                   ).fetchone()[0]
        if waiting == 0 or time.monotonic() > deadline:
            return waiting
        time.sleep(1.0)


@app.command("demo")
def demo(
    data: Annotated[list[Path] | None, typer.Argument(help="NEM12 files/folders; default: bundled real data")] = None,
    with_monitoring: Annotated[bool, typer.Option(
        "--with-monitoring", help="also start the local Prometheus (see `stack up --with-monitoring`)")] = False,
) -> None:
    """Stack up, topics, reference data, the four stages; publish the bundled real NEM12 files; wait until every
    reading is billed, dead-lettered or refused (progress per stage, then the accounting); print every invoice;
    stop the stages. Exits 1 with the stage and count when something cannot finish."""
    _logging("WARNING")
    os.environ.setdefault("PIPELINE_IDLE_TIMEOUT_S", "5")  # historic data: a quiet meter's last windows close soon
    os.environ.setdefault("PIPELINE_INVOICE_IDLE_CLOSE_S", "10")  # ... and its last invoices are finalized
    # rating holds rated changes for weekly postings (pipeline/rating/posting.py); the sample files are short
    # pieces of history, so what is pending is posted 3 s after a partition's input stops
    os.environ.setdefault("PIPELINE_POSTING_IDLE_S", "3")
    # the checks before finalizing would hold 43 of the 46 invoices: the bundled sample files cover a few days of
    # most months (MISSING_SERVICE_DAYS); export PIPELINE_REVIEW_CHECKS to see them held (`pipeline invoice review`)
    os.environ.setdefault("PIPELINE_REVIEW_CHECKS", "[]")
    get_settings.cache_clear()
    settings = get_settings()
    t0 = time.monotonic()
    stack_up(with_monitoring)
    load_reference(None)
    procs = start_stage_processes(settings)
    failed: str | None = None
    try:
        from pipeline.codec import default_codec
        from pipeline.ingest.gateway import channel_windows, publish_nem12
        from pipeline.runtime.kafka import IdempotentProducer
        from pipeline.topology import Topics

        report = publish_nem12(data or [BUNDLED_NEM12], IdempotentProducer(settings.kafka_bootstrap),
                               default_codec(), Topics(settings).meter_readings, progress=True,
                               window_minutes=channel_windows(settings))
        typer.echo(f"published {report.readings_published:,} readings from {report.files_published} files "
                   f"(+{report.markers_published} completion markers)")
        for err in report.rejected:
            typer.echo(f"rejected [{err.reason}] {err}", err=True)
        accounted = wait_until_accounted(settings, procs, report.readings_published)
        typer.echo("")
        for line in accounted.lines():
            typer.echo(line)
        tie = tie_out_now(settings)
        typer.echo(tie.lines()[0])
        if tie.breaks:
            raise DemoFailed("the tie-out found breaks (`pipeline reconcile` prints them all):\n"
                             + "\n".join(tie.breaks[:10]))
        still_open = wait_finalized(settings, timeout_s=float(os.environ["PIPELINE_INVOICE_IDLE_CLOSE_S"]) + 60)
        typer.echo(f"every reading accounted for in {time.monotonic() - t0:.0f} s"
                   + (f"; {still_open} invoices past their close time still open" if still_open else "") + "\n")
        invoice_show(None, None)
        if not settings.review_checks:
            typer.echo("checks before finalizing: off in the demo (the sample files cover a few days of most months); "
                       "PIPELINE_REVIEW_CHECKS='[\"MISSING_SERVICE_DAYS\"]' make demo shows them held in REVIEW")
    except DemoFailed as exc:
        failed = str(exc)
    finally:
        codes = stop_stage_processes(procs)
        typer.echo(f"stages stopped: {codes}")
    if failed:
        typer.echo(f"demo failed: {failed}", err=True)
        raise typer.Exit(1)
