"""Integration fixtures: the REAL local Kafka broker and PostgreSQL (started by ``pipeline stack up``
if they are not running), a fresh topic prefix and a fresh database per test, stage processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline import stack
from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.reference import BUNDLED_REFERENCE, ReferenceFile
from pipeline.refstore import load_reference_file
from pipeline.runtime import postgres
from pipeline.runtime.kafka import (
    IdempotentProducer,
    committed_offsets,
    create_topics,
    delete_topics,
    read_all,
)
from pipeline.topology import Topics

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="session")
def base_settings() -> Iterator[Settings]:
    """The stack every integration test talks to (started here if needed, left running for others)."""
    settings = Settings()
    stack.up(settings)
    yield settings


def _superuser_url(settings: Settings) -> str:
    return f"postgresql://postgres@127.0.0.1:{settings.postgres_port}/postgres"


@dataclass
class Env:
    """One isolated pipeline: its own topics (prefix), database, state folder and stage processes."""

    settings: Settings
    env: dict[str, str]
    log_dir: Path
    procs: dict[str, list[subprocess.Popen]] = field(default_factory=dict)

    @property
    def topics(self) -> Topics:
        return Topics(self.settings)

    def start(self, stage: str, instance: str = "0", **extra: str) -> subprocess.Popen:
        env = {**self.env, "PIPELINE_INSTANCE_ID": instance, **extra}
        log = open(self.log_dir / f"{stage}-{instance}.log", "ab")  # noqa: SIM115
        p = subprocess.Popen([sys.executable, "-m", "pipeline", "run", stage], env=env, stdout=log,
                             stderr=subprocess.STDOUT)
        p.instance = instance  # type: ignore[attr-defined]  # who restarts it (tests/soak.py) starts the same one
        self.procs.setdefault(stage, []).append(p)
        return p

    def start_all(self, relay: bool = False) -> None:
        for stage in ("ingest", "windowing", "rating", "invoicing", *(("relay",) if relay else ())):
            self.start(stage)

    def stop(self, p: subprocess.Popen, sig: int = 15, timeout: float = 60) -> int:
        if p.poll() is None:
            p.send_signal(sig)
        return p.wait(timeout)

    def stop_all(self) -> dict[str, list[int]]:
        return {s: [self.stop(p) for p in ps] for s, ps in self.procs.items()}

    def wait_started(self, p: subprocess.Popen, stage: str, timeout: float = 60) -> None:
        """Wait until the stage process has joined its group and started its loop."""
        deadline = time.monotonic() + timeout
        while f"{stage}: started" not in self.log_tail(stage, 200_000).split("stopped cleanly")[-1]:
            assert p.poll() is None, self.log_tail(stage)
            assert time.monotonic() < deadline, f"{stage} did not start: {self.log_tail(stage)}"
            time.sleep(0.1)

    def wait_consumed(self, stage: str, topic: str, timeout_s: float = 300) -> None:
        """Wait until ``stage``'s group has committed the end offset of every partition of ``topic``."""
        tps = [(topic, p) for p in range(self.settings.partitions)]
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            # the end offset counts transaction markers: aim at the last committed data record + 1
            ends = {tp: 0 for tp in tps}
            for m in read_all(self.settings.kafka_bootstrap, topic, timeout_s=60):
                ends[(m.topic, m.partition)] = max(ends[(m.topic, m.partition)], m.offset + 1)
            done = committed_offsets(self.settings.kafka_bootstrap, self.topics.group(stage), tps)
            if all(max(done[tp], 0) >= ends[tp] for tp in tps):  # no commit yet (-1001) on an empty partition
                return
            assert time.monotonic() < deadline, f"{stage} has not consumed {topic}: {done} vs {ends}"
            time.sleep(0.5)

    def check_alive(self) -> None:
        for stage, ps in self.procs.items():
            for p in ps:
                if p.returncode is None and p.poll() is not None:
                    raise AssertionError(f"{stage} died with {p.returncode}: {self.log_tail(stage)}")

    def log_tail(self, stage: str, n: int = 4000) -> str:
        return "\n".join(f.read_text(errors="replace")[-n:] for f in self.log_dir.glob(f"{stage}-*.log"))

    def producer(self) -> IdempotentProducer:
        return IdempotentProducer(self.settings.kafka_bootstrap)

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with postgres.connect(self.settings.database_url) as conn:
            return conn.execute(query, params).fetchall()

    def execute(self, statement: str, params: tuple = ()) -> int:
        """Run one statement that returns no rows (committed); returns the rows it changed."""
        with postgres.connect(self.settings.database_url) as conn:
            return conn.execute(statement, params).rowcount

    def line_count(self) -> int:
        return self.sql("SELECT count(*) FROM invoice_lines")[0][0]

    def wait_quiet(self, min_wait_s: float, quiet_s: float = 6.0, timeout_s: float = 300) -> int:
        """Wait until the ledger stops changing (stages alive throughout); returns the line count."""
        start = time.monotonic()
        last, since = -1, start
        while True:
            self.check_alive()
            n = self.line_count()
            now = time.monotonic()
            if n != last:
                last, since = n, now
            elif now - start >= min_wait_s and now - since >= quiet_s:
                return n
            assert now - start < timeout_s, f"ledger still changing after {timeout_s}s"
            time.sleep(0.5)

    def wait_accounted(self, timeout_s: float = 300, published: int | None = None) -> Any:
        """Wait until every input reading is billed, dead-lettered or refused (``operations.reconcile``;
        stages alive throughout) and, if given, at least ``published`` inputs are on the topics; returns
        the report. The topics are read only once every stage has (nearly) caught up with its input
        (``reconcile.progress``). Fails with the report (what is pending, at which stage) after ``timeout_s``."""
        from pipeline.operations.reconcile import progress, reconcile, take_snapshot
        from pipeline.stages import window_policies

        policy = window_policies(self.settings)
        deadline = time.monotonic() + timeout_s
        report: Any = None
        while True:
            self.check_alive()
            behind = {stage: end - done for stage, (done, end) in progress(self.settings).items()}
            if all(n <= 2 * self.settings.partitions for n in behind.values()):
                report = reconcile(take_snapshot(self.settings), policy)
                if report.complete and report.inputs >= (published or 0):
                    return report
            assert time.monotonic() < deadline, "\n".join(report.lines()) if report else f"stages behind: {behind}"
            time.sleep(1.0)

    def wait_all_finalized(self, timeout_s: float = 120) -> None:
        """Wait until no invoice is OPEN (the billing clock passed every close time)."""
        deadline = time.monotonic() + timeout_s
        while self.sql("SELECT count(*) FROM invoices WHERE status = 'OPEN'")[0][0]:
            self.check_alive()
            assert time.monotonic() < deadline, self.sql("SELECT invoice_id, close_at FROM invoices WHERE "
                                                         "status = 'OPEN'")
            time.sleep(0.5)

    def assert_invoice_structure(self) -> None:
        """SPEC §5 invariants of the ledger as it stands: one invoice per (account, period, currency);
        a CHARGE line sits on the invoice of its own service period; an ADJUSTMENT line sits on a later
        invoice of its account and names the finalized invoice of its service period; finalized invoice
        numbers are gap-free 1..n per series; a finalized invoice's frozen totals are its lines and
        payments, and its amount due = previous balance + charges − payments. Ad-hoc bills (Bill API, invoice id
        ``bill:<id>``) may share a period with a regular invoice and carry only MANUAL lines."""
        inv = {r[0]: r for r in self.sql(
            "SELECT invoice_id, account, period_start, currency, status, invoice_number, series, sequence_number, "
            "previous_balance, charges_total, payments_total, amount_due, finalized_order FROM invoices")}
        regular = [r for r in inv.values() if not r[0].startswith("bill:")]
        assert len({(r[1], r[2], r[3]) for r in regular}) == len(regular)
        for line_id, invoice_id, account, p0, cur, kind, adj_id, adj_no in self.sql(
                "SELECT line_id, invoice_id, account, period_start, currency, line_kind, adjusts_invoice_id, "
                "adjusts_invoice_number FROM invoice_lines"):
            home = f"{account}|{p0}|{cur}"
            if kind == "CHARGE":
                assert invoice_id == home, line_id
            elif kind == "MANUAL":
                assert invoice_id.startswith("bill:") and adj_id is None, line_id
            else:
                assert adj_id == home and inv[home][4] == "FINALIZED" and inv[home][5] == adj_no, line_id
                assert inv[invoice_id][1] == account and inv[invoice_id][2] > p0, line_id
        by_series: dict[str, list[int]] = {}
        for r in inv.values():
            if r[4] == "FINALIZED":
                by_series.setdefault(r[6], []).append(r[7])
                assert r[5] == f"{r[6]}-{r[7]:06d}"
                assert r[11] == r[8] + r[9] - r[10]
                assert r[9] == self.sql("SELECT coalesce(sum(amount), 0) FROM invoice_lines WHERE invoice_id = %s",
                                        (r[0],))[0][0]
                assert r[10] == self.sql("SELECT coalesce(sum(p.amount), 0) FROM invoice_payments ip JOIN payments p "
                                         "USING (payment_id) WHERE ip.invoice_id = %s", (r[0],))[0][0]
                prev = [x for x in inv.values() if x[1] == r[1] and x[3] == r[3] and x[4] == "FINALIZED"
                        and x[12] < r[12]]
                assert r[8] == (max(prev, key=lambda x: x[12])[11] if prev else 0), r[0]
        for series, numbers in by_series.items():
            assert sorted(numbers) == list(range(1, len(numbers) + 1)), series

    def assert_invoice_events(self, timeout_s: float = 120) -> list:
        """Once the relay drained the outbox: a consumer of invoice.events that drops repeated event ids
        sees every ledger change exactly once — one LINE_APPENDED per ledger line, one
        INVOICE_FINALIZED per finalized invoice, one PAYMENT_APPLIED per payment — keyed by account,
        each account on one partition, in increasing outbox sequence (commit order). Returns the
        deduplicated events."""
        from pipeline.records import InvoiceEvent

        deadline = time.monotonic() + timeout_s
        while self.sql("SELECT count(*) FROM outbox WHERE sent_at IS NULL")[0][0]:
            self.check_alive()
            assert time.monotonic() < deadline, "the relay did not drain the outbox"
            time.sleep(0.3)
        codec = default_codec()
        seen: dict[str, InvoiceEvent] = {}
        order: list[InvoiceEvent] = []
        partition_of: dict[str, int] = {}
        for m in read_all(self.settings.kafka_bootstrap, self.topics.invoice_events, timeout_s=60):
            ev = codec.decode(m.value, InvoiceEvent)
            assert m.key == ev.account.encode()
            assert partition_of.setdefault(ev.account, m.partition) == m.partition
            if ev.event_id in seen:
                assert seen[ev.event_id] == ev  # a re-publication is the same event
                continue
            seen[ev.event_id] = ev
            order.append(ev)
        lines = {r[0] for r in self.sql("SELECT line_id FROM invoice_lines")}
        appended = [e.line_id for e in order if e.event_type == "LINE_APPENDED"]
        assert len(appended) == len(lines) and set(appended) == lines
        finalized = [e.invoice_id for e in order if e.event_type == "INVOICE_FINALIZED"]
        assert sorted(finalized) == sorted(r[0] for r in self.sql(
            "SELECT invoice_id FROM invoices WHERE status = 'FINALIZED'"))
        paid = [e.payment_id for e in order if e.event_type == "PAYMENT_APPLIED"]
        assert sorted(paid) == sorted(r[0] for r in self.sql("SELECT payment_id FROM payments"))
        by_account: dict[str, list[int]] = {}
        for e in order:
            by_account.setdefault(e.account, []).append(e.sequence)
        for account, seqs in by_account.items():
            assert seqs == sorted(seqs), account
        assert len(order) == self.sql("SELECT count(*) FROM outbox")[0][0]
        return order

    def ledger_totals(self) -> dict[tuple[str, str], dict[str, object]]:
        out: dict[tuple[str, str], dict[str, object]] = {}
        for account, period, key, total in self.sql(
            "SELECT account, period_start::text, price_book_id || '|' || component_id || '|' || band, sum(amount) "
            "FROM invoice_lines GROUP BY 1, 2, 3"
        ):
            if total != 0:
                out.setdefault((account, period), {})[key] = total
        return out


@contextmanager
def isolated_env(base_settings: Settings, folder: Path, reference: bool = True) -> Iterator[Env]:
    """A fresh, isolated pipeline on the shared real stack (its own topic prefix, database, state and log
    folders under ``folder``); stage processes are killed, topics and database dropped afterwards.
    ``reference``: load the bundled reference JSON (else the reference tables start empty)."""
    tag = "t" + uuid.uuid4().hex[:10]
    dbname = tag
    with postgres.connect(_superuser_url(base_settings), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}" OWNER pipeline_owner')
    url = f"postgresql://pipeline@127.0.0.1:{base_settings.postgres_port}/{dbname}"
    owner_url = f"postgresql://pipeline_owner@127.0.0.1:{base_settings.postgres_port}/{dbname}"
    env = {
        **os.environ,
        "PIPELINE_KAFKA_BOOTSTRAP": base_settings.kafka_bootstrap,
        "PIPELINE_DATABASE_URL": url,
        "PIPELINE_DATABASE_OWNER_URL": owner_url,
        "PIPELINE_TOPIC_PREFIX": f"{tag}.",
        "PIPELINE_STATE_DIR": str(folder / "state"),
        # stages started with a metrics port announce themselves to <stack dir>/prometheus/targets: the test's
        # own folder, never the shared stack's (a killed stage would stay there as a target that is down)
        "PIPELINE_STACK_DIR": str(folder / "stack"),
        "PIPELINE_IDLE_TIMEOUT_S": "4",
        "PIPELINE_COMMIT_INTERVAL_MS": "200",
        "PIPELINE_PARTITIONS": "3",
        # the checks before finalizing hold invoices in REVIEW (pipeline/invoicing/validation.py); the tests of other
        # things finalize as they always did (partial months of the real files would be held); test_invoice_review
        # turns them on
        "PIPELINE_REVIEW_CHECKS": "[]",
        # rating posts every batch's changes (SPEC §4 as first written): the tests of other things assert the lines
        # that gives; test_posting turns the posting policy on (pipeline/rating/posting.py)
        "PIPELINE_POSTING_INTERVAL_DAYS": "0",
    }
    settings = Settings(
        kafka_bootstrap=base_settings.kafka_bootstrap, database_url=url, database_owner_url=owner_url,
        topic_prefix=f"{tag}.",
        state_dir=folder / "state", idle_timeout_s=4, partitions=3,
    )
    postgres.migrate(owner_url)
    if reference:
        ref = ReferenceFile.read(BUNDLED_REFERENCE)
        postgres.with_reconnect(url, lambda c: load_reference_file(c, ref))
    topics = Topics(settings)
    create_topics(settings.kafka_bootstrap, topics.specs())
    log_dir = folder / "logs"
    log_dir.mkdir(parents=True)
    e = Env(settings, env, log_dir)
    try:
        yield e
    finally:
        for ps in e.procs.values():
            for p in ps:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        delete_topics(settings.kafka_bootstrap, [s.name for s in topics.specs()])
        with postgres.connect(_superuser_url(base_settings), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@pytest.fixture
def pipeline_env(base_settings: Settings, tmp_path: Path) -> Iterator[Env]:
    """A fresh, isolated pipeline on the shared real stack; stage processes are stopped afterwards."""
    with isolated_env(base_settings, tmp_path) as env:
        yield env


def publish_files(env: Env, files: list[Path]) -> int:
    """Publish NEM12 files through the real gateway; returns readings published."""
    from pipeline.ingest.gateway import publish_nem12

    report = publish_nem12(files, env.producer(), default_codec(), env.topics.meter_readings, progress=False)
    assert not report.rejected, report.rejected
    return report.readings_published


@pytest.fixture
def cpu_hog() -> Iterator[list[subprocess.Popen]]:
    """Both cores kept busy (one spinning process per core) for the length of the test: timing is input."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        yield hogs
    finally:
        for h in hogs:
            h.kill()
            h.wait()


# --- broker and database faults (issue 12) --------------------------------------------------------------
STAGE_INPUTS = {
    "ingest": ("meter_readings", "telemetry_events"),
    "windowing": ("usage_events",),
    "rating": ("usage_windows",),
    "invoicing": ("charges_rated", "payments"),
}


def stage_progress(env: Env, stage: str, timeout_s: float = 60) -> int:
    """How far ``stage`` has committed: the sum over its input partitions of the next offsets it
    committed (a partition without a commit counts 0), so it grows with every commit that consumed
    input. Kafka's committed offsets of the stage's group; for invoicing, the offsets it keeps in
    Postgres. Retried while the broker or the database is coming back, for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if stage == "invoicing":
                return int(env.sql("SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE "
                                   "consumer_group = %s", (env.topics.group(stage),))[0][0])
            tps = [(getattr(env.topics, t), p) for t in STAGE_INPUTS[stage] for p in range(env.settings.partitions)]
            return sum(max(o, 0) for o in committed_offsets(env.settings.kafka_bootstrap, env.topics.group(stage),
                                                            tps).values())
        except Exception:  # the broker or database still on its way back
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_committing(env: Env, since: dict[str, int], start: float, timeout_s: float) -> dict[str, float]:
    """Wait until every stage in ``since`` has committed beyond ``since[stage]`` (``stage_progress``),
    every stage process staying alive. Returns, per stage, the seconds from ``start``
    (``time.monotonic()``) until its progress was seen. Raises ``AssertionError`` naming the stages
    still not committing, with their log tails, after ``timeout_s`` seconds from ``start``."""
    seen: dict[str, float] = {}
    while True:
        env.check_alive()
        for stage in since:
            if stage not in seen and stage_progress(env, stage) > since[stage]:
                seen[stage] = time.monotonic() - start
        if len(seen) == len(since):
            return seen
        if time.monotonic() - start > timeout_s:
            missing = sorted(set(since) - set(seen))
            raise AssertionError(f"not committing {timeout_s:.0f} s after the fault: {missing} (committed: {seen})\n"
                                 + "\n".join(f"--- {s} ---\n{env.log_tail(s, 3000)}" for s in missing))
        time.sleep(0.5)
