"""Replay: rebuild a *generation* of the pipeline from the input topics and compare its ledger with the
live one (issue 15: "operators replaying topics to re-rate").

A generation ``G`` of a live pipeline (``Settings``) has its own topics (prefix ``<live prefix>gen-G.``),
consumer groups (they follow the prefix), local state folder and ledger (the database
``<live database>_gen_G`` on the same server, created by the owner role, which needs ``CREATEDB``). It
starts from the live reference data (accounts, service points, plans, every price book version, metric
definitions), optionally with more price book versions (say a superseding version), and from a copy of
every record of the live input topics (``meter.readings``, ``telemetry.events``: same partition, key,
value and headers, in offset order). The four stages then bill it exactly as the live pipeline would;
nothing of the live pipeline is read or written meanwhile except its input topics and reference data.

A generation may start **from a date** ``D``: it then gets only the input readings whose interval starts
on or after ``D`` 00:00 UTC less a day (so every local billing period starting on or after ``D``, in any
timezone, holds all its readings), completion markers and unreadable records (dead-lettered alike), and
``diff`` compares only the periods starting on or after ``D``.

``diff`` compares the two ledgers per (account, billing period, line: price book | component | band): the
sum of the amounts. Replaying unchanged input and reference data gives no difference; replaying with a
superseding price book gives exactly what the live rating stage's own re-rating adds once that version is
published live, which is how the difference reaches the live ledger: ``pipeline replay apply`` publishes
the generation's extra price book versions live (as ``pipeline pricebook publish`` does), the rating stage
re-rates and appends the difference lines, each explained with both versions, exactly once; applying again
publishes nothing new and adds nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline.config import Settings

NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,30}$")
LedgerKey = tuple[str, str, str]  # account, period start (ISO date), price book | component | band
LEDGER_TOTALS = ("SELECT account, period_start::text, price_book_id || '|' || component_id || '|' || band, "
                 "sum(amount) FROM invoice_lines WHERE line_kind <> 'MANUAL' GROUP BY 1, 2, 3")  # not from usage


class ReplayError(RuntimeError):
    """A replay cannot be made or compared (bad generation name, generation exists or is missing, the owner
    role may not create databases); the message says what to do."""


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def database_of(url: str) -> str:
    """The database name of a PostgreSQL URL (``postgresql://user@host:port/NAME``)."""
    name = urlsplit(url).path.lstrip("/")
    if not name:
        raise ReplayError(f"the database URL {url!r} names no database")
    return name


@dataclass(frozen=True)
class Generation:
    """Where generation ``name`` of a live pipeline lives.

    Attributes:
        name: ``[a-z0-9_]``, 1–31 characters, starting with a letter or digit.
        settings: the live settings with the generation's topic prefix, database URLs and state folder.
        env: environment overrides for the generation's stage processes (``PIPELINE_*``).
        database: the generation's database name.
    """

    name: str
    settings: Settings
    env: dict[str, str]
    database: str


def generation(live: Settings, name: str) -> Generation:
    """Generation ``name`` of the pipeline ``live`` (pure). Raises ``ReplayError`` for a bad name."""
    if not NAME.match(name):
        raise ReplayError(f"generation name {name!r} must match {NAME.pattern}")
    database = f"{database_of(live.database_url)}_gen_{name}"
    prefix = f"{live.topic_prefix}gen-{name}."
    url, owner = _with_database(live.database_url, database), _with_database(live.database_owner_url, database)
    state = live.state_dir / f"gen-{name}"
    settings = live.model_copy(update={"topic_prefix": prefix, "database_url": url, "database_owner_url": owner,
                                       "state_dir": state, "metrics_port": 0})
    env = {"PIPELINE_TOPIC_PREFIX": prefix, "PIPELINE_DATABASE_URL": url, "PIPELINE_DATABASE_OWNER_URL": owner,
           "PIPELINE_STATE_DIR": str(state), "PIPELINE_METRICS_PORT": "0"}
    return Generation(name, settings, env, database)


@dataclass(frozen=True)
class DiffRow:
    """One ledger key whose totals differ: ``live`` and ``replayed`` are the sums of the amounts (currency
    major units; zero where a ledger has no line), ``difference`` = replayed − live."""

    account: str
    period_start: str
    line: str
    live: Decimal
    replayed: Decimal

    @property
    def difference(self) -> Decimal:
        return self.replayed - self.live


def diff_totals(live: Mapping[LedgerKey, Decimal], replayed: Mapping[LedgerKey, Decimal],
                since: date | None = None) -> list[DiffRow]:
    """The keys whose totals differ, sorted (pure). A key absent from one side counts as zero there; with
    ``since``, only periods starting on or after it are compared."""
    zero = Decimal(0)
    keys = set(live) | set(replayed)
    if since is not None:
        keys = {k for k in keys if date.fromisoformat(k[1]) >= since}
    return [DiffRow(*key, live.get(key, zero), replayed.get(key, zero))
            for key in sorted(keys) if live.get(key, zero) != replayed.get(key, zero)]


def copy_cutoff_ms(since: date) -> int:
    """Epoch ms (UTC) from which input readings are copied into a generation starting ``since``: a day
    before its UTC midnight, so a billing period starting ``since`` in any timezone (UTC−12 .. UTC+14)
    has all its readings."""
    return int((datetime(since.year, since.month, since.day, tzinfo=UTC) - timedelta(days=1)).timestamp() * 1000)


def keep_record(topic_kind: str, headers: tuple[tuple[str, bytes], ...], value: bytes | None, cutoff_ms: int,
                codec: Any) -> bool:
    """Whether an input record goes into a generation with copy cut-off ``cutoff_ms`` (pure):
    ``topic_kind`` ``"meter"`` (``meter.readings``) or ``"telemetry"``. A reading or CloudEvent before the
    cut-off is left out; completion markers and records that cannot be read (dead-lettered in either
    pipeline alike) are kept."""
    from pipeline.codec import DecodeError
    from pipeline.ingest.telemetry import RejectedInput, read_cloudevent
    from pipeline.records import MeterReading

    if topic_kind == "telemetry":
        try:
            return read_cloudevent(headers, value).time_ms >= cutoff_ms
        except RejectedInput:
            return True
    raw = value or b""
    try:
        if codec.record_name(raw) != "MeterReading":
            return True
        reading = codec.decode(raw, MeterReading)
    except DecodeError:
        return True
    return reading.interval_start.timestamp() * 1000 >= cutoff_ms


def ledger_totals(url: str) -> dict[LedgerKey, Decimal]:
    """(account, period start, book|component|band) → sum of the amounts in the ledger at ``url``."""
    from pipeline.runtime import postgres

    with postgres.connect(url) as conn:
        return {(a, p, k): total for a, p, k, total in conn.execute(LEDGER_TOTALS)}


def diff(live: Settings, gen: Generation) -> list[DiffRow]:
    """The differences between the live ledger and generation ``gen``'s (from the generation's start date,
    if it has one). Raises ``ReplayError`` when the generation has no ledger."""
    from pipeline.runtime import postgres

    if not _database_exists(live, gen.database):
        raise ReplayError(f"generation {gen.name} has no ledger (database {gen.database}): "
                          f"run `pipeline replay run {gen.name}` first")
    with postgres.connect(gen.settings.database_url) as conn:
        row = conn.execute("SELECT since FROM replay_generation").fetchone()
    return diff_totals(ledger_totals(live.database_url), ledger_totals(gen.settings.database_url),
                       row[0] if row else None)


def _database_exists(live: Settings, database: str) -> bool:
    from pipeline.runtime import postgres

    with postgres.connect(live.database_owner_url, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is not None


def prepare(live: Settings, gen: Generation, price_books: Iterable[Any] = (),
            progress: Callable[[int], None] = lambda n: None, since: date | None = None) -> int:
    """Create generation ``gen``: its database (migrated), the live reference data plus ``price_books``
    (``PriceBook`` versions), its topics, and a copy of every live input record (with ``since``, of the
    records ``keep_record`` keeps). Returns the number of input records copied; ``progress(n)`` is called
    as they are sent.

    Raises ``ReplayError`` when the generation exists already or the database cannot be created,
    ``KafkaIOError`` / a database error when the stack does not answer.
    """
    from pipeline.codec import default_codec
    from pipeline.reference import ReferenceFile
    from pipeline.refstore import load_reference_file, read_reference, store_price_book
    from pipeline.runtime import postgres
    from pipeline.runtime.kafka import IdempotentProducer, create_topics, read_all
    from pipeline.topology import Topics

    if _database_exists(live, gen.database):
        raise ReplayError(f"generation {gen.name} exists (database {gen.database}); "
                          f"`pipeline replay drop {gen.name}` removes it")
    with postgres.connect(live.database_owner_url, autocommit=True) as conn:
        try:
            conn.execute(f'CREATE DATABASE "{gen.database}"')
        except postgres.DatabaseError as exc:
            raise ReplayError(f"cannot create the generation's database {gen.database} as the owner role "
                              f"(it needs CREATEDB): {exc}") from exc
    postgres.migrate(gen.settings.database_owner_url)
    ref = postgres.with_reconnect(live.database_url, read_reference)
    copy = ReferenceFile(
        accounts=tuple(ref.accounts.values()),
        service_points=tuple(sp for sps in ref.service_points.values() for sp in sps),
        price_books=ref.price_books,
        plan_assignments=tuple(pa for pas in ref.plans.values() for pa in pas),
        metric_definitions=tuple(ref.metrics.values()),
        telemetry_subjects=tuple(ts for tss in ref.subjects.values() for ts in tss),
    )
    books = list(price_books)

    def load(conn: Any) -> None:
        load_reference_file(conn, copy)
        for book in books:
            store_price_book(conn, book)

    with postgres.connect(gen.settings.database_owner_url) as conn:
        conn.execute("CREATE TABLE replay_generation (name text PRIMARY KEY, since date, "
                     "created_at timestamptz NOT NULL DEFAULT now())")
        conn.execute("INSERT INTO replay_generation (name, since) VALUES (%s, %s)", (gen.name, since))
        conn.execute("GRANT SELECT ON replay_generation TO pipeline")
        conn.commit()

    postgres.with_reconnect(gen.settings.database_url, load)
    live_topics, gen_topics = Topics(live), Topics(gen.settings)
    create_topics(live.kafka_bootstrap, gen_topics.specs())
    producer = IdempotentProducer(live.kafka_bootstrap)
    codec, cutoff = default_codec(), (copy_cutoff_ms(since) if since is not None else None)
    sent = 0
    for kind, source, target in (("meter", live_topics.meter_readings, gen_topics.meter_readings),
                                 ("telemetry", live_topics.telemetry_events, gen_topics.telemetry_events)):
        for rec in sorted(read_all(live.kafka_bootstrap, source, timeout_s=300), key=lambda m: (m.partition, m.offset)):
            if cutoff is not None and not keep_record(kind, rec.headers, rec.value, cutoff, codec):
                continue
            producer.send(target, rec.key, rec.value, list(rec.headers) or None, partition=rec.partition)
            sent += 1
            if sent % 1000 == 0:
                progress(sent)
    producer.flush()
    progress(sent)
    return sent


def books_to_apply(live: Settings, gen: Generation) -> list[Any]:
    """The price book versions generation ``gen`` bills with that the live pipeline does not have (what
    ``pipeline replay apply`` publishes live). Raises ``ReplayError`` when the generation does not exist
    or a version differs in content between the two (versions are immutable)."""
    from pipeline.refstore import read_reference
    from pipeline.runtime import postgres

    if not _database_exists(live, gen.database):
        raise ReplayError(f"generation {gen.name} has no ledger (database {gen.database})")
    live_books = {(b.id, b.version): b for b in postgres.with_reconnect(live.database_url, read_reference).price_books}
    out = []
    for book in postgres.with_reconnect(gen.settings.database_url, read_reference).price_books:
        held = live_books.get((book.id, book.version))
        if held is None:
            out.append(book)
        elif held.content_sha256() != book.content_sha256():
            raise ReplayError(f"{book.id} v{book.version} differs between generation {gen.name} and the live "
                              f"pipeline: price book versions are immutable; publish a new version instead")
    return sorted(out, key=lambda b: (b.id, b.version))


def drop(live: Settings, gen: Generation) -> None:
    """Remove generation ``gen``: its database and topics (the live pipeline is not touched)."""
    from pipeline.runtime import postgres
    from pipeline.runtime.kafka import delete_topics
    from pipeline.topology import Topics

    with postgres.connect(live.database_owner_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{gen.database}" WITH (FORCE)')
    delete_topics(live.kafka_bootstrap, [spec.name for spec in Topics(gen.settings).specs()])
