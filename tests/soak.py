"""The crash soak (issue 12): the whole pipeline on the real local broker and Postgres, hit while it works.

    .venv/bin/python -m tests.soak [--kills 100] [--seed 1] [--duration 600] [--files 49] [--telemetry-days 2]
    make soak                      # the same, with its defaults

A stream of the bundled real NEM12 files and a generated CloudEvents telemetry stream (with repeats) is
published over ``--duration`` seconds, chunks of it published again, while the soak SIGKILLs random
stage processes (ingest, windowing, rating, invoicing, the outbox relay) at random moments and restarts
them, runs two windowing processes for part of the time, restarts the broker once and PostgreSQL once.
At the end it waits until every reading is accounted for (``pipeline reconcile``), then compares:

- the ledger per (account, service period, line) with an uninterrupted run of the same input (run first,
  in its own topics and database) and with the independent batch bill (``tests.batchbill``,
  ``tests.telemetrybill``);
- duplicates on every topic: usage events by (id, version), window revisions by (window, revision),
  rated lines and ledger lines by line id; the invoice events once deduplicated by event id;
- invoice numbering (gap-free per series) and statements (previous balance + charges − payments).

It prints one line: ``soak: PASS|FAIL kills=… restarts=… records=… mismatches=… duplicates=…
recovery median/max=…`` and exits 0 on PASS. Recovery is the time from a fault (a stage process killed and
started again; the broker or PostgreSQL answering again) to the next commit of each affected stage that had
input waiting; a stage that does not commit again within 60 s (``RECOVERY_LIMIT_S``) is a failure.
``run_soak`` is also the short soak of the integration tests.

A supervisor (as docker-compose's ``restart: unless-stopped`` or systemd's ``Restart=on-failure`` in a
deployment) starts again any stage process that ends by itself: the runtime's answer to a fault it cannot
recover from in-process is to exit non-zero within a bounded time (watchdog: 70). The verdict counts these
``exits`` by stage and code; an exit with any other code than 70 (a crash: an exception out of the loop) is a
problem.
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pipeline import stack
from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.ingest.telemetry import sample_stream
from pipeline.reference import BUNDLED_REFERENCE
from pipeline.runtime.kafka import read_all
from tests.batchbill import expected_bills
from tests.integration.conftest import DATA, Env, isolated_env, publish_files
from tests.telemetrybill import expected_telemetry_bills

STAGES = ("ingest", "windowing", "rating", "invoicing")
VICTIMS = (*STAGES, "relay")
RECOVERY_LIMIT_S = 60.0  # issue 12: every stage commits again within 60 s of the broker answering


@dataclass
class Input:
    """What the soak publishes: NEM12 files and a telemetry stream (attributes and data, for the batch bill)."""

    files: list[Path]
    telemetry: list  # SampleEvent
    republished: int = 0


@dataclass
class Verdict:
    """The soak's figures and every problem found (``problems`` empty: PASS)."""

    kills: Counter[str] = field(default_factory=Counter)
    broker_restarts: int = 0
    postgres_restarts: int = 0
    records: int = 0
    mismatches_reference: int = 0
    mismatches_batch: int = 0
    duplicates: Counter[str] = field(default_factory=Counter)
    recovery_s: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    exits: Counter[str] = field(default_factory=Counter)  # "<stage>:<code>" → processes that ended by themselves

    @property
    def passed(self) -> bool:
        return not self.problems

    def line(self) -> str:
        rec = (f"{statistics.median(self.recovery_s):.1f}/{max(self.recovery_s):.1f} s" if self.recovery_s
               else "n/a")
        kills = " ".join(f"{k}:{n}" for k, n in sorted(self.kills.items()))
        return (f"soak: {'PASS' if self.passed else 'FAIL'} kills={sum(self.kills.values())} ({kills}) "
                f"broker_restarts={self.broker_restarts} postgres_restarts={self.postgres_restarts} "
                f"records={self.records:,} mismatches={self.mismatches_reference}/{self.mismatches_batch} "
                f"(vs uninterrupted/batch) duplicates={sum(self.duplicates.values())} "
                f"recovery median/max={rec} exits={sum(self.exits.values())}"
                f"{' (' + ' '.join(f'{k}×{n}' for k, n in sorted(self.exits.items())) + ')' if self.exits else ''} "
                f"in {self.seconds:.0f} s")


class Supervisor:
    """Starts again every stage process of ``env`` that ended by itself (checked every second), as a deployment's
    supervisor does; the soak's own kills and stops happen under ``lock`` and take the process out of
    ``env.procs`` first, so they are never mistaken for exits. Exits go to ``verdict.exits``; a code other than
    70 (the watchdog's) also to ``verdict.problems`` with the end of the stage's log."""

    def __init__(self, env: Env, verdict: Verdict) -> None:
        self.env = env
        self.verdict = verdict
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="soak-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            with self.lock:
                for stage, procs in list(self.env.procs.items()):
                    for proc in list(procs):
                        code = proc.poll()
                        if code is None:
                            continue
                        procs.remove(proc)
                        self.verdict.exits[f"{stage}:{code}"] += 1
                        if code != 70:
                            self.verdict.problems.append(f"{stage} exited with {code} by itself: "
                                                         f"{self.env.log_tail(stage, 1500)}")
                        self.env.start(stage, instance=getattr(proc, "instance", "0"))


def soak_input(files: int, telemetry_days: float, seed: int) -> Input:
    """The first ``files`` bundled NEM12 files and ``telemetry_days`` days of sample telemetry ending an hour
    before the last UTC midnight."""
    end = (datetime.now(UTC) - timedelta(hours=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    stream, _repeats = sample_stream(end - timedelta(days=telemetry_days), end, seed=seed, duplicate_share=0.1)
    return Input(sorted((DATA / "nem12").glob("*.zip"))[:files], stream)


def batch_bill(inp: Input) -> dict[tuple[str, str], dict[str, object]]:
    bills = {(a, p.isoformat()): lines for (a, p), lines in expected_bills(inp.files, BUNDLED_REFERENCE).items()}
    bills.update(expected_telemetry_bills([(e.attributes, e.data) for e in inp.telemetry], BUNDLED_REFERENCE))
    return {k: {c: v for c, v in lines.items() if v != 0} for k, lines in bills.items()}


def publish_telemetry(env: Env, events: list) -> None:
    producer = env.producer()
    for e in events:
        key, value, headers = e.record()
        producer.send(env.topics.telemetry_events, key, value, headers)
    producer.flush()


def stage_progress(env: Env, stage: str) -> int | None:
    """``conftest.stage_progress`` (the sum of the next offsets ``stage`` committed over its input
    partitions), or ``None`` while the broker or the database does not answer."""
    from tests.integration.conftest import stage_progress as progress

    try:
        return progress(env, stage, timeout_s=2)
    except Exception:  # a fault in progress: no answer yet
        return None


def configure(env: Env) -> None:
    env.env.update({
        "PIPELINE_INVOICE_IDLE_CLOSE_S": "6",  # invoices close while data is still arriving: adjustments too
        # rating holds changes for weekly postings (pipeline/rating/posting.py) and posts them once a partition's
        # input has stopped for 2 s: faults meet pending changes too
        "PIPELINE_POSTING_INTERVAL_DAYS": "7",
        "PIPELINE_POSTING_IDLE_S": "2",
        "PIPELINE_INVOICE_CLOSE_CHECK_S": "1",
        "PIPELINE_TELEMETRY_DEDUPE_HORIZON_S": str(30 * 86_400),
    })


def run_reference(base: Settings, inp: Input, folder: Path) -> dict[tuple[str, str], dict[str, object]]:
    """The ledger of an uninterrupted run of ``inp`` (its own topics and database)."""
    with isolated_env(base, folder) as env:
        configure(env)
        env.start_all(relay=True)
        n = publish_files(env, inp.files)
        publish_telemetry(env, inp.telemetry)
        env.wait_accounted(timeout_s=900, published=n + len(inp.telemetry))
        return env.ledger_totals()


def run_soak(base: Settings, inp: Input, folder: Path, kills: int, seed: int, duration_s: float,
             reference: dict[tuple[str, str], dict[str, object]] | None, accounted_timeout_s: float = 900) -> Verdict:
    """Publish ``inp`` over ``duration_s`` seconds while killing stages ``kills`` times (and restarting the
    broker and PostgreSQL once each), then check everything (see the module doc). Never raises for a
    finding: it lands in ``Verdict.problems``."""
    rng = random.Random(seed)
    verdict = Verdict()
    t0 = time.monotonic()
    with isolated_env(base, folder) as env:
        configure(env)
        env.start_all(relay=True)
        for stage in STAGES:
            env.wait_started(env.procs[stage][-1], stage, timeout=120)
        supervisor = Supervisor(env, verdict)
        supervisor.start()
        try:
            files = list(inp.files)
            chunks = [inp.telemetry[i::len(files)] for i in range(len(files))]
            published = [0]
            done = threading.Event()

            def publisher() -> None:
                pace = duration_s / max(len(files), 1)
                for i, f in enumerate(files):
                    published[0] += publish_files(env, [f])
                    publish_telemetry(env, chunks[i])
                    published[0] += len(chunks[i])
                    if rng.random() < 0.2:  # a chunk published again: a gateway retrying a delivery
                        again = rng.choice(files[: i + 1])
                        published[0] += publish_files(env, [again])
                        inp.republished += 1
                    time.sleep(pace)
                done.set()

            thread = threading.Thread(target=publisher, daemon=True)
            thread.start()
            broker_at, postgres_at = kills // 3, 2 * kills // 3
            for k in range(kills):
                time.sleep(rng.uniform(0.3, 1.2) * duration_s / max(kills, 1))
                if k == broker_at:
                    fault_and_recover(env, base, "broker", rng, verdict)
                    verdict.broker_restarts += 1
                if k == postgres_at:
                    fault_and_recover(env, base, "postgres", rng, verdict)
                    verdict.postgres_restarts += 1
                with supervisor.lock:
                    if k == kills // 4:  # a second windowing process for part of the time: partitions move
                        env.start("windowing", instance="w2")
                    if k == 3 * kills // 4:
                        for proc in [p for p in env.procs["windowing"] if p.instance == "w2"]:  # type: ignore[attr-defined]
                            env.procs["windowing"].remove(proc)
                            env.stop(proc, signal.SIGKILL)
                victim = rng.choice(VICTIMS)
                waiting = victim in STAGES and has_input(env, victim)
                before = stage_progress(env, victim) if waiting else None
                with supervisor.lock:
                    procs = [p for p in env.procs[victim] if p.poll() is None]
                    if not procs:  # ended by itself just now: the supervisor starts it on its next look
                        continue
                    proc = rng.choice(procs)
                    env.procs[victim].remove(proc)
                    env.stop(proc, signal.SIGKILL)
                    env.start(victim, instance=proc.instance)  # type: ignore[attr-defined]
                verdict.kills[victim] += 1
                if before is not None:
                    took = wait_progress(env, victim, before, time.monotonic(), RECOVERY_LIMIT_S)
                    if took is None:
                        verdict.problems.append(
                            f"{victim} did not commit within {RECOVERY_LIMIT_S:.0f} s of its restart")
                    else:
                        verdict.recovery_s.append(took)
            thread.join(timeout=duration_s * 3 + 300)
            if thread.is_alive():
                verdict.problems.append("the publisher did not finish")
            verdict.records = published[0]
            try:
                report = env.wait_accounted(timeout_s=accounted_timeout_s, published=published[0])
                if report.dead_lettered or report.refused:
                    verdict.problems.append(f"dead-lettered {report.dead_lettered}, refused {report.refused}")
            except AssertionError as exc:
                verdict.problems.append(f"not every reading accounted for: {exc}")
                for procs in env.procs.values():  # every thread's stack into the stage logs (runtime: SIGUSR1)
                    for proc in procs:
                        if proc.poll() is None:
                            proc.send_signal(signal.SIGUSR1)
                time.sleep(2)
                verdict.problems.append(f"thread dumps of the live stages are in {env.log_dir}")
        except Exception as exc:  # a fault the soak could not inject or undo is a finding, with its trace
            verdict.problems.append(f"the soak stopped early: {exc!r}\n{traceback.format_exc()}")
            try:  # bring back whatever the fault left down, so the checks can still say what was lost
                stack.up(base)
            except Exception as again:
                verdict.problems.append(f"the stack does not come back up: {again!r}")
        finally:
            supervisor.stop()
        check(env, inp, reference, verdict)
        codes = env.stop_all()
        if any(c not in (0, -9) for cs in codes.values() for c in cs):
            verdict.problems.append(f"stage exit codes after SIGTERM: {codes}")
    verdict.seconds = time.monotonic() - t0
    return verdict


def wait_progress(env: Env, stage: str, before: int, start: float, timeout_s: float) -> float | None:
    """Seconds from ``start`` until ``stage`` committed beyond ``before`` (``None`` after ``timeout_s``)."""
    while time.monotonic() - start < timeout_s:
        now = stage_progress(env, stage)
        if now is not None and now > before:
            return time.monotonic() - start
        if all(p.poll() is not None for p in env.procs[stage]):
            return None
        time.sleep(0.25)
    return None


def has_input(env: Env, stage: str) -> bool:
    """Whether ``stage`` has records to consume (more than the transaction markers a caught-up stage trails)."""
    from pipeline.operations.reconcile import progress

    try:
        done, end = progress(env.settings)[stage]
    except Exception:  # the broker or the database does not answer: no figure
        return False
    return end - done > 2 * env.settings.partitions


def fault_and_recover(env: Env, base: Settings, what: str, rng: random.Random, verdict: Verdict) -> None:
    """Restart the broker (SIGTERM or SIGKILL) or PostgreSQL; every stage that has input waiting must commit
    again within ``RECOVERY_LIMIT_S`` of the service answering again (the times go to ``verdict``)."""
    before = {s: stage_progress(env, s) or 0 for s in STAGES}
    if what == "broker":
        back = stack.restart_kafka(base, sig=rng.choice((signal.SIGTERM, signal.SIGKILL)))
    else:
        back = stack.restart_postgres(base)
    for stage in STAGES:
        if not has_input(env, stage) and stage_progress(env, stage) == before[stage]:
            continue  # nothing to consume: nothing to measure
        took = wait_progress(env, stage, before[stage], back, RECOVERY_LIMIT_S)
        if took is None:
            verdict.problems.append(f"{stage} did not commit within {RECOVERY_LIMIT_S:.0f} s of the {what} answering")
        else:
            verdict.recovery_s.append(took)


def check(env: Env, inp: Input, reference: dict | None, verdict: Verdict) -> None:
    """Compare the ledger and count duplicates (see the module doc); findings go to ``verdict``."""
    from pipeline.records import UsageWindow

    got = env.ledger_totals()
    want = batch_bill(inp)
    verdict.mismatches_batch = sum(got.get(k) != v for k, v in want.items()) + len(set(got) - set(want))
    if reference is not None:
        verdict.mismatches_reference = sum(got.get(k) != v for k, v in reference.items()) + len(
            set(got) - set(reference))
    if verdict.mismatches_batch or verdict.mismatches_reference:
        wrong = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:5]
        verdict.problems.append(f"ledger differs from the batch bill / uninterrupted run: {wrong}")
    codec = default_codec()
    boot = env.settings.kafka_bootstrap
    events = Counter()
    for m in read_all(boot, env.topics.usage_events, timeout_s=120):
        if codec.record_name(m.value) == "UsageEvent":
            d = codec.decode_plain(m.value, "UsageEvent")
            events[(d["event_id"], d["version"])] += 1
    verdict.duplicates["usage.events"] = sum(n - 1 for n in events.values())
    revisions = Counter((w.window_id, w.revision) for w in (codec.decode(m.value, UsageWindow)
                                                          for m in read_all(boot, env.topics.usage_windows,
                                                                            timeout_s=120)))
    verdict.duplicates["usage.windows"] = sum(n - 1 for n in revisions.values())
    lines = Counter(codec.decode_dict(m.value, "RatedCharge")["line_id"]
                    for m in read_all(boot, env.topics.charges_rated, timeout_s=120))
    verdict.duplicates["charges.rated"] = sum(n - 1 for n in lines.values())
    verdict.duplicates["ledger"] = env.sql("SELECT count(*) - count(DISTINCT line_id) FROM invoice_lines")[0][0]
    if sum(verdict.duplicates.values()):
        verdict.problems.append(f"duplicates: {dict(verdict.duplicates)}")
    deadline = time.monotonic() + 300  # invoices past their close time are finalized (the accounts are quiet)
    while env.sql("SELECT count(*) FROM invoices WHERE status = 'OPEN' AND close_at <= now()")[0][0]:
        if time.monotonic() > deadline:
            verdict.problems.append("invoices past their close time still open after 300 s")
            break
        time.sleep(1)
    for name, assertion in (("invoices", env.assert_invoice_structure), ("invoice.events", env.assert_invoice_events)):
        try:
            assertion()
        except AssertionError as exc:
            verdict.problems.append(f"{name}: {str(exc)[:500]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs of random stage processes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=600, help="seconds over which the input is published")
    parser.add_argument("--files", type=int, default=49, help="how many of the bundled NEM12 files")
    parser.add_argument("--telemetry-days", type=float, default=2.0)
    parser.add_argument("--no-reference-run", action="store_true", help="skip the uninterrupted run")
    args = parser.parse_args()
    base = Settings()
    stack.up(base)
    inp = soak_input(args.files, args.telemetry_days, args.seed)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        reference = None if args.no_reference_run else run_reference(base, inp, Path(tmp) / "reference")
        verdict = run_soak(base, inp, Path(tmp) / "soak", args.kills, args.seed, args.duration, reference)
    for problem in verdict.problems:
        print(f"  problem: {problem}", file=sys.stderr)
    print(verdict.line())
    sys.exit(0 if verdict.passed else 1)


if __name__ == "__main__":
    main()
