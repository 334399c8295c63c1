"""End-to-end throughput of the whole pipeline (ingest → windowing → rating → invoicing, exactly-once on,
four separate ``pipeline run <stage>`` processes) vs the raw EOS passthrough over the same input, on the
local stack.

    .venv/bin/pipeline stack up
    .venv/bin/python benchmarks/e2e.py [--accounts 1000] [--days 1] [--stream] [--replay] [--py-spy 30]

A fresh topic prefix, database (migrated, the bundled reference data plus N synthetic accounts, one NMI
each, on the bundled ACTEWAGL-HOME-TOU price book) and state folder; everything is dropped afterwards.
The input is N accounts × D days of 5-minute readings (channel E1) in the NEM12 gateway's record format:
``MeterReading`` Avro (``default_codec``), key NMI, header ``source_file``, then one completion marker per
channel (``SeriesComplete``), as ``pipeline publish nem12`` sends a file. The data is the last D days of last
month (Sydney time), so it ends with a billing period (``--mid-period``: it ends two days ago).

- default: the input is pre-produced to ``meter.readings``, then the four stages are started.
- ``--stream``: the stages are started first; each 5-minute interval of all accounts is produced as one
  batch, followed by a pause of ``--pause`` seconds (a live feed); the markers come after the last batch.

Measured: readings/s from the first record consumed by ingest (its ``pipeline_records_in_total`` on its
/metrics) to the last ledger line committed (the ledger count polled every 0.25 s, once every stage has
committed all of its input); reading-to-ledger latency p50/p99 from the invoicing stage's
``pipeline_reading_to_ledger_seconds`` histogram (bucket bounds: coarse; pre-produced input counts its time
waiting in the topic); CPU seconds per stage process (``/proc/<pid>/stat``: whole process, and within the
measured interval); ledger lines per account-month. ``--replay``: afterwards, a superseding price book
version (v2: peak rate changed) is published through ``pipeline pricebook publish``'s code path and the
seconds until the ledger is quiet again (rating's committed offsets, invoicing's offsets and the ledger
count unchanged for ``--quiet`` seconds) are reported; rating reads reference data every
``PIPELINE_REFERENCE_REFRESH_S`` (30 s), so the time from the first difference line is printed too.
``--py-spy S``: records every stage with py-spy for S seconds once ingest consumes (raw collapsed stacks
in ``--profile-dir``) and prints the top functions per stage (this perturbs the run: do not compare its
throughput). Then the stages are stopped and the plain transactional consume → produce passthrough
(``common.run_passthrough``) runs over the same ``meter.readings`` records. Last line:
``e2e/passthrough throughput ratio: X`` (records/s of the pipeline ÷ records/s of the passthrough).

Rating posts with the product's posting policy (``pipeline.rating.posting``: boundaries every
``--posting-interval-days``, default 7, and the period end) and posts what it still holds once a partition's
partition has had no input for ``--posting-idle-s`` (10 s here: the data ends, the feed stops; the product default is
an hour). ``--posting-interval-days 0`` posts every batch (the ledger growth before issue 13). ``--month YYYY-MM``
makes the data one whole billing period of every account (a calendar month in Sydney time), so that
"lines per account-month" is what it says: e.g. ``--accounts 100 --month 2026-11 --stream --pause 0``.

Every wait has a deadline (``--deadline``); a stage that dies or a pipeline that stops making progress
makes the benchmark exit non-zero (after cleaning up).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from tempfile import mkdtemp

from common import run_passthrough

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.rating.pricebook import PriceBook
from pipeline.records import MeterReading, SeriesComplete
from pipeline.reference import BUNDLED_REFERENCE, Account, PlanAssignment, ReferenceFile, ServicePoint
from pipeline.refstore import load_reference_file, price_book_record
from pipeline.runtime import postgres
from pipeline.runtime.kafka import IdempotentProducer, committed_offsets, create_topics, delete_topics, end_offsets
from pipeline.topology import Topics, TopicSpec

STAGES = ("ingest", "windowing", "rating", "invoicing")
BOOK = "ACTEWAGL-HOME-TOU"
CLK = os.sysconf("SC_CLK_TCK")


class BenchFailed(Exception):
    """The benchmark cannot finish (a stage died, a deadline passed): exit non-zero."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (``/proc/<pid>/stat``), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def scrape(port: int, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
        return r.read().decode()


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name) and line[len(name)] in "{ "
                and all(f'{k}="{v}"' in line for k, v in labels.items())):
            total += float(line.rsplit(" ", 1)[1])
    return total


def histogram_quantiles(text: str, name: str, qs: tuple[float, ...]) -> tuple[int, list[float | None]]:
    """(samples, quantiles) of a Prometheus histogram, linearly interpolated inside its buckets."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        m = re.match(rf'{name}_bucket{{.*le="([^"]+)".*}} (\S+)', line)
        if m:
            buckets.append((float(m.group(1)), float(m.group(2))))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    out: list[float | None] = []
    for q in qs:
        if not total:
            out.append(None)
            continue
        rank, lo_b, lo_c = q * total, 0.0, 0.0
        val = None
        for bound, count in buckets:
            if count >= rank:
                share = (rank - lo_c) / max(count - lo_c, 1e-9)
                val = bound if bound == float("inf") else lo_b + (bound - lo_b) * share
                break
            lo_b, lo_c = bound, count
        out.append(val if val != float("inf") else lo_b)
    return int(total), out


class E2E:
    """One isolated pipeline on the shared stack: topics, database, state, the four stage processes."""

    def __init__(self, args: argparse.Namespace) -> None:
        base = Settings()
        self.args = args
        self.tag = "e2e" + uuid.uuid4().hex[:8]
        self.folder = Path(mkdtemp(prefix=f"{self.tag}-"))
        self.super_url = f"postgresql://postgres@127.0.0.1:{base.postgres_port}/postgres"
        url = f"postgresql://pipeline@127.0.0.1:{base.postgres_port}/{self.tag}"
        owner = f"postgresql://pipeline_owner@127.0.0.1:{base.postgres_port}/{self.tag}"
        self.settings = Settings(kafka_bootstrap=base.kafka_bootstrap, database_url=url, database_owner_url=owner,
                                 topic_prefix=f"{self.tag}.", state_dir=self.folder / "state",
                                 partitions=args.partitions, stack_dir=self.folder / "stack")
        self.env = {**os.environ, "PIPELINE_DATABASE_URL": url, "PIPELINE_DATABASE_OWNER_URL": owner,
                    "PIPELINE_POSTING_INTERVAL_DAYS": str(args.posting_interval_days),
                    "PIPELINE_POSTING_IDLE_S": str(args.posting_idle_s),
                    "PIPELINE_TOPIC_PREFIX": f"{self.tag}.", "PIPELINE_STATE_DIR": str(self.folder / "state"),
                    "PIPELINE_STACK_DIR": str(self.folder / "stack"), "PIPELINE_PARTITIONS": str(args.partitions),
                    "PIPELINE_KAFKA_BOOTSTRAP": base.kafka_bootstrap}
        self.topics = Topics(self.settings)
        self.scratch = f"{self.tag}.bench.passthrough"
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.db_created = False
        self.topics_created = False

    # --- set-up and clean-up ---------------------------------------------------------------------
    def setup(self) -> None:
        with postgres.connect(self.super_url, autocommit=True, statement_timeout_s=60) as conn:
            conn.execute(f'CREATE DATABASE "{self.tag}" OWNER pipeline_owner')
        self.db_created = True
        postgres.migrate(self.settings.database_owner_url)
        bundled = ReferenceFile.read(BUNDLED_REFERENCE)
        since = date(2020, 1, 1)
        accounts = [Account(account=f"E2E-{a:05d}", timezone="Australia/Sydney", holiday_region="AU-ACT",
                            billing_anchor=since) for a in range(self.args.accounts)]
        points = [ServicePoint(nmi=self.nmi(a), account=f"E2E-{a:05d}", effective_from=since)
                  for a in range(self.args.accounts)]
        plans = [PlanAssignment(account=f"E2E-{a:05d}", price_book_id=BOOK, effective_from=since)
                 for a in range(self.args.accounts)]
        ref = ReferenceFile(accounts=bundled.accounts + tuple(accounts),
                            service_points=bundled.service_points + tuple(points),
                            price_books=bundled.price_books, plan_assignments=bundled.plan_assignments + tuple(plans),
                            metric_definitions=bundled.metric_definitions,
                            telemetry_subjects=bundled.telemetry_subjects)
        postgres.with_reconnect(self.settings.database_url, lambda c: load_reference_file(c, ref), give_up_s=60)
        create_topics(self.settings.kafka_bootstrap,
                      [*self.topics.specs(), TopicSpec(self.scratch, self.args.partitions, {})])
        self.topics_created = True
        producer = IdempotentProducer(self.settings.kafka_bootstrap)
        codec = default_codec()
        for book in ref.price_books:  # as `pipeline load reference` does
            key, value = price_book_record(codec, book)
            producer.send(self.topics.pricebooks, key.encode(), value)
        producer.flush(60)

    def cleanup(self) -> None:
        self.stop_stages(kill=True)
        if self.args.keep_logs and (self.folder / "logs").is_dir():
            shutil.copytree(self.folder / "logs", Path(self.args.keep_logs) / self.tag)
            print(f"stage logs kept in {Path(self.args.keep_logs) / self.tag}")
        if self.topics_created:
            try:
                delete_topics(self.settings.kafka_bootstrap,
                              [s.name for s in self.topics.specs()] + [self.scratch])
            except Exception as exc:
                print(f"warning: topics of {self.tag} not deleted: {exc}", file=sys.stderr)
        if self.db_created:
            try:
                with postgres.connect(self.super_url, autocommit=True, statement_timeout_s=60) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.tag}" WITH (FORCE)')
            except Exception as exc:
                print(f"warning: database {self.tag} not dropped: {exc}", file=sys.stderr)
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- stages -----------------------------------------------------------------------------------
    def start_stages(self) -> None:
        log_dir = self.folder / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        for stage in STAGES:
            self.ports[stage] = free_port()
            log = open(log_dir / f"{stage}.log", "ab")  # noqa: SIM115 - handed to the child
            self.procs[stage] = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", stage],
                env={**self.env, "PIPELINE_METRICS_PORT": str(self.ports[stage])}, stdout=log,
                stderr=subprocess.STDOUT)

    def check_alive(self) -> None:
        for stage, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.folder / "logs" / f"{stage}.log").read_text(errors="replace")[-3000:]
                raise BenchFailed(f"{stage} exited with {p.returncode}:\n{tail}")

    def stop_stages(self, kill: bool = False, timeout_s: float = 60) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)

    def cpu(self) -> dict[str, float]:
        return {s: cpu_seconds(p.pid) for s, p in self.procs.items()}

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for stage, port in self.ports.items():
            while True:
                self.check_alive()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchFailed(f"{stage} not ready after {timeout_s:.0f}s")
                time.sleep(0.2)

    # --- input ------------------------------------------------------------------------------------
    @staticmethod
    def nmi(a: int) -> str:
        return f"E2E{a:07d}"

    def base(self) -> datetime:
        """Where the data starts (UTC). With ``--month``: local midnight (Australia/Sydney, the accounts' time
        zone) of the month's first day, one whole billing period (the accounts' billing anchor is the 1st).
        Otherwise the last ``days`` days before local midnight of the current month's first day: the data ends
        with a billing period, as a month's last readings do, so rating posts the period as the data completes it
        (``--mid-period``: NEM midnight ``days`` + 2 days ago instead; the last posting then waits for
        ``--posting-idle-s``, the freshness cost of posting, inside the measured time)."""
        from zoneinfo import ZoneInfo

        sydney = ZoneInfo("Australia/Sydney")
        if self.args.month:
            year, month = map(int, self.args.month.split("-"))
            return datetime(year, month, 1, tzinfo=sydney).astimezone(UTC)
        if self.args.mid_period:
            day = datetime.now(UTC).replace(hour=14, minute=0, second=0, microsecond=0)
            return day - timedelta(days=self.args.days + 2)
        first = datetime.now(sydney).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return datetime(first.year, first.month, 1, tzinfo=sydney).astimezone(UTC) - timedelta(days=self.args.days)

    def produce(self, stream: bool) -> tuple[int, int]:
        """Produce the readings (and the markers); returns (readings, markers)."""
        codec = default_codec()
        producer = IdempotentProducer(self.settings.kafka_bootstrap)
        base = self.base()
        slots = self.args.days * 288
        version = base + timedelta(days=self.args.days)
        name = f"E2E_{base:%Y%m%d}.csv"
        headers = [("source_file", name.encode())]
        nmis = [self.nmi(a) for a in range(self.args.accounts)]
        keys = [n.encode() for n in nmis]
        for slot in range(slots):
            start = base + timedelta(minutes=5 * slot)
            end = start + timedelta(minutes=5)
            for a, nmi in enumerate(nmis):
                r = MeterReading(nmi, "E1", "kWh", start, end, Decimal((a + slot) % 97) / 100, "A", None, version,
                                 "UpdateDateTime", name, 2 + a)
                producer.send(self.topics.meter_readings, keys[a], codec.encode(r), headers=headers)
            if stream:
                producer.flush(60)
                self.check_alive()
                time.sleep(self.args.pause)
        through = base + timedelta(minutes=5 * slots)
        for a, nmi in enumerate(nmis):
            producer.send(self.topics.meter_readings, keys[a], codec.encode(SeriesComplete(nmi, "E1", through, name)),
                          headers=headers)
        producer.flush(120)
        return slots * len(nmis), len(nmis)

    # --- progress ---------------------------------------------------------------------------------
    def sql(self, query: str) -> list[tuple]:
        with postgres.connect(self.settings.database_url, statement_timeout_s=30) as conn:
            return conn.execute(query).fetchall()

    def ledger_count(self) -> int:
        return self.sql("SELECT count(*) FROM invoice_lines")[0][0]

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Per stage (committed, end) of its inputs (end counts transaction markers)."""
        boot, t, n = self.settings.kafka_bootstrap, self.topics, self.args.partitions
        inputs = {"ingest": t.meter_readings, "windowing": t.usage_events, "rating": t.usage_windows,
                  "invoicing": t.charges_rated}
        ledger = {(tp, p): o for tp, p, o in self.sql(
            "SELECT topic, partition, next_offset FROM consumer_offsets "
            f"WHERE consumer_group = '{t.group('invoicing')}'")}
        out = {}
        for stage, topic in inputs.items():
            tps = [(topic, p) for p in range(n)]
            done = ledger if stage == "invoicing" else committed_offsets(boot, t.group(stage), tps)
            ends = end_offsets(boot, tps)
            out[stage] = (sum(min(max(done.get(tp, 0), 0), ends[tp]) for tp in tps), sum(ends.values()))
        return out

    def wait_first_consumed(self, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if metric_sum(scrape(self.ports["ingest"]), "pipeline_records_in_total", stage="ingest") > 0:
                    return time.monotonic()
            except OSError:
                pass
            time.sleep(0.05)
        raise BenchFailed(f"ingest consumed nothing within {timeout_s:.0f}s")

    def wait_done(self, inputs: int, stall_s: float, timeout_s: float) -> tuple[float, int]:
        """Wait until ingest committed ``inputs`` records and every stage all of its input, the ledger count
        then unchanged for 3 s; returns (monotonic time the ledger count last changed, ledger lines).
        Raises ``BenchFailed`` when nothing moves for ``stall_s`` or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last_count, changed = -1, time.monotonic()
        last_progress, moved = None, time.monotonic()
        while True:
            self.check_alive()
            now = time.monotonic()
            count = self.ledger_count()
            if count != last_count:
                last_count, changed = count, now
            prog = self.offsets()
            if prog != last_progress:
                last_progress, moved = prog, now
            behind = {s: end - done for s, (done, end) in prog.items()}
            # a stage that consumed everything may trail by one transaction marker per partition
            caught_up = prog["ingest"][0] >= inputs and all(b <= 2 * self.args.partitions for b in behind.values())
            if caught_up and count > 0 and now - changed >= 3.0:
                return changed, count
            if now - moved > stall_s and now - changed > stall_s:
                raise BenchFailed(f"no progress for {stall_s:.0f}s: {prog}, ledger {count}")
            if now > deadline:
                raise BenchFailed(f"not done after {timeout_s:.0f}s: {prog}, ledger {count}")
            time.sleep(0.25)

    def wait_quiet(self, quiet_s: float, first_timeout_s: float, timeout_s: float) -> tuple[float | None, float, int]:
        """After a price book publication: wait for the first ledger change (at most ``first_timeout_s``),
        then until rating's and invoicing's committed offsets and the ledger count are unchanged for
        ``quiet_s``. Returns (time of the first change or None, time of the last change, lines)."""
        start = time.monotonic()
        deadline = start + timeout_s
        base_count = self.ledger_count()
        first = None
        last_state, changed = None, start
        while True:
            self.check_alive()
            now = time.monotonic()
            count = self.ledger_count()
            prog = self.offsets()
            state = (count, prog["rating"], prog["invoicing"])
            if state != last_state:
                last_state, changed = state, now
            if first is None and count != base_count:
                first = now
            if first is None and now - start > first_timeout_s:
                return None, now, count
            if first is not None and now - changed >= quiet_s:
                return first, changed, count
            if now > deadline:
                raise BenchFailed(f"ledger not quiet after {timeout_s:.0f}s")
            time.sleep(0.25)


def pyspy(e2e: E2E, seconds: int, out_dir: Path) -> dict[str, subprocess.Popen]:
    """Start ``py-spy record`` on every stage (raw collapsed stacks, 50 Hz, non-blocking)."""
    exe = Path(sys.executable).parent / "py-spy"
    out_dir.mkdir(parents=True, exist_ok=True)
    return {s: subprocess.Popen([str(exe), "record", "--pid", str(p.pid), "--duration", str(seconds), "--rate", "50",
                                 "--nonblocking", "--format", "raw", "-o", str(out_dir / f"{s}.txt")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for s, p in e2e.procs.items()}


ENTRY = ("pipeline/__main__.py", "pipeline/cli.py", "StageRunner.run ", "StageRunner._run ")


def summarise_profile(path: Path, top: int = 12) -> list[str]:
    """Top functions of a py-spy raw (collapsed) profile, line numbers folded into their function: by self
    samples (the frame on top), and by total samples (on the stack; project functions only, without the
    entry frames every sample has). Percentages of the samples py-spy took of non-idle threads."""
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        k = int(n)
        frames = [re.sub(r"\([^()]*site-packages/", "(", re.sub(r":\d+\)$", ")", f)) for f in stack.split(";")]
        samples += k
        self_c[frames[-1]] += k
        for f in set(frames):
            if "(pipeline/" in f and not any(e in f for e in ENTRY):
                total_c[f] += k
    out = [f"{path.stem}: {samples} samples"]
    out.append("  by self time:")
    out += [f"    {100 * n / samples:5.1f}%  {f}" for f, n in self_c.most_common(top)]
    out.append("  by total time (pipeline functions):")
    out += [f"    {100 * n / samples:5.1f}%  {f}" for f, n in total_c.most_common(top)]
    return out


def v2_book() -> PriceBook:
    raw = next(b for b in json.loads(BUNDLED_REFERENCE.read_text())["price_books"] if b["id"] == BOOK)
    raw = json.loads(json.dumps(raw))
    raw["version"] = 2
    raw["components"][0]["bands"][0]["rate"] = "0.3750"
    return PriceBook.model_validate(raw)


def run(e2e: E2E, args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    e2e.setup()
    print(f"set-up (database {e2e.tag}, {args.accounts} synthetic accounts on {BOOK}, topics with "
          f"{args.partitions} partitions): {time.monotonic() - t0:.1f}s; load: {os.getloadavg()[0]:.2f}")
    spy: dict[str, subprocess.Popen] = {}
    if args.stream:
        e2e.start_stages()
        e2e.wait_ready(args.deadline)
        cpu0 = e2e.cpu()
        t1 = time.monotonic()
        readings, markers = e2e.produce(stream=True)
        print(f"streamed {readings:,} readings in {args.days * 288} batches of {args.accounts} (pause "
              f"{args.pause}s) + {markers:,} markers in {time.monotonic() - t1:.1f}s")
        first = e2e.wait_first_consumed(args.deadline)  # consumed long since
    else:
        t1 = time.monotonic()
        readings, markers = e2e.produce(stream=False)
        print(f"pre-produced {readings:,} readings + {markers:,} markers to meter.readings in "
              f"{time.monotonic() - t1:.1f}s")
        e2e.start_stages()
        cpu0 = e2e.cpu()
        first = e2e.wait_first_consumed(args.deadline)
        cpu0 = e2e.cpu()
        if args.py_spy:
            spy = pyspy(e2e, args.py_spy, Path(args.profile_dir))
    inputs = readings + markers
    last, lines = e2e.wait_done(inputs, args.stall, args.deadline)
    if args.stream:
        first = t1  # from the first batch produced: the stages were waiting for it
    cpu1 = e2e.cpu()
    elapsed = last - first
    outcomes = {o: int(metric_sum(scrape(e2e.ports["ingest"]), "pipeline_ingest_records_total", outcome=o))
                for o in ("accepted", "duplicate", "superseded", "refused", "dead_lettered", "marker")}
    if outcomes["accepted"] != readings:
        print(f"warning: ingest accepted {outcomes['accepted']:,} of {readings:,} readings: {outcomes}")
    text = scrape(e2e.ports["invoicing"])
    n_lat, (p50, p99) = histogram_quantiles(text, "pipeline_reading_to_ledger_seconds", (0.5, 0.99))
    acct_months = e2e.sql("SELECT count(*) FROM (SELECT DISTINCT account, period_start FROM invoice_lines "
                          "WHERE account LIKE 'E2E-%') x")[0][0]
    mode = f"streaming ({args.days * 288} batches, pause {args.pause}s)" if args.stream else "pre-produced"
    postings = {r: int(metric_sum(scrape(e2e.ports["rating"]), "pipeline_rating_postings_total", reason=r))
                for r in ("every_batch", "boundary", "period_end", "idle", "rerate")}
    print(f"e2e ({mode}, exactly-once, 4 stage processes): {readings:,} readings in {elapsed:.1f}s = "
          f"{readings / elapsed:,.0f} readings/s (first record consumed by ingest → last ledger line committed); "
          f"ingest outcomes {outcomes}")
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}s"  # noqa: E731
    print(f"reading-to-ledger latency (invoicing histogram, {n_lat:,} lines, bucket-interpolated): "
          f"p50 {fmt(p50)}, p99 {fmt(p99)}")
    print("CPU seconds per stage process, measured interval (whole process): " + ", ".join(
        f"{s} {cpu1[s] - cpu0[s]:.1f} ({cpu1[s]:.1f})" for s in STAGES)
        + f"; sum {sum(cpu1[s] - cpu0[s] for s in STAGES):.1f} = "
          f"{sum(cpu1[s] - cpu0[s] for s in STAGES) / readings * 1e6:.0f} µs/reading")
    print(f"ledger: {lines:,} lines, {acct_months:,} account-months: {lines / max(acct_months, 1):.1f} lines per "
          f"account-month ({mode}, {args.days} day(s) of data per account); {lines / (args.accounts * args.days):.1f} "
          f"lines per account per day of data; posting interval {args.posting_interval_days} days, idle "
          f"{args.posting_idle_s:g}s; rating postings by reason {({k: v for k, v in postings.items() if v})}")
    for p in spy.values():
        try:
            p.wait(args.py_spy + 60)
        except subprocess.TimeoutExpired:
            p.kill()
    if args.replay:
        from pipeline.cli import _publish_price_books

        cpu2 = e2e.cpu()
        t2 = time.monotonic()
        _publish_price_books(e2e.settings, [v2_book()])
        first_change, last_change, after = e2e.wait_quiet(args.quiet, args.deadline, args.deadline)
        cpu3 = e2e.cpu()
        print("replay CPU seconds per stage process, publish → quiet (the re-rate's work, whatever the refresh "
              "wait): " + ", ".join(f"{s} {cpu3[s] - cpu2[s]:.1f}" for s in STAGES))
        if first_change is None:
            print(f"replay: no difference line within {args.deadline:.0f}s of publishing v2")
        else:
            print(f"replay (re-rate {args.days} day(s) × {args.accounts} accounts after {BOOK} v2): ledger quiet "
                  f"{last_change - t2:.1f}s after publishing ({last_change - first_change:.1f}s from the first "
                  f"difference line; rating reads reference data every {e2e.settings.reference_refresh_s:.0f}s), "
                  f"{after - lines:,} difference lines")
    e2e.stop_stages()
    for s, p in spy.items():
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        path = Path(args.profile_dir) / f"{s}.txt"
        if path.exists() and path.stat().st_size:
            print("\n".join(summarise_profile(path)))
        else:
            print(f"py-spy {s}: no profile ({err.strip()[-300:]})")
    pt, _cpu = run_passthrough(e2e.settings, e2e.topics, inputs, e2e.topics.meter_readings, e2e.scratch,
                               group="e2e-passthrough")
    print(f"passthrough (transactional consume→produce) over the same {inputs:,} records: {inputs / pt:,.0f} "
          f"records/s ({pt:.1f}s); e2e over them: {inputs / elapsed:,.0f} records/s; load: {os.getloadavg()[0]:.2f}")
    print(f"e2e/passthrough throughput ratio: {pt / elapsed:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--days", type=int, default=1)
    parser.add_argument("--keep-logs", default=None, metavar="DIR", help="copy the stage logs there at the end")
    parser.add_argument("--mid-period", action="store_true",
                        help="the data ends 2 days ago (mid-period) instead of at last month's end")
    parser.add_argument("--month", default=None, metavar="YYYY-MM",
                        help="the data covers this calendar month (Sydney time) instead of --days ending 2 days ago")
    parser.add_argument("--posting-interval-days", type=int, default=Settings().posting_interval_days,
                        help="rating's posting boundaries (PIPELINE_POSTING_INTERVAL_DAYS; 0 = post every batch)")
    parser.add_argument("--posting-idle-s", type=float, default=10.0,
                        help="rating posts what it holds once a partition had no input this long "
                             "(PIPELINE_POSTING_IDLE_S; the feed here stops at the end of the data; shorter, and a "
                             "stage starved of CPU for that long looks like a stopped feed: extra postings)")
    parser.add_argument("--partitions", type=int, default=Settings().partitions)
    parser.add_argument("--stream", action="store_true", help="produce each 5-minute interval as one batch, live")
    parser.add_argument("--pause", type=float, default=0.1, help="--stream: seconds between batches")
    parser.add_argument("--replay", action="store_true", help="then publish a superseding price book and time it")
    parser.add_argument("--quiet", type=float, default=10.0, help="--replay: seconds without change = quiet")
    parser.add_argument("--py-spy", type=int, default=0, metavar="S", help="profile every stage for S seconds")
    parser.add_argument("--profile-dir", default="/tmp/e2e-profile")
    parser.add_argument("--stall", type=float, default=120.0, help="fail when nothing moves for this long")
    parser.add_argument("--deadline", type=float, default=1200.0, help="fail when a phase takes longer")
    args = parser.parse_args()
    if args.month:
        year, month = map(int, args.month.split("-"))
        args.days = ((date(year + month // 12, month % 12 + 1, 1)) - date(year, month, 1)).days
    e2e = E2E(args)
    try:
        run(e2e, args)
    except (BenchFailed, TimeoutError) as exc:
        print(f"e2e benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        e2e.cleanup()


if __name__ == "__main__":
    main()
