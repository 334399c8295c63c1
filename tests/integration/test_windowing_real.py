"""Windowing over the real broker (issue: watermarks, late re-emission, durable exactly-once state).

- correction: estimated NEM12 reads, then actuals with a newer UpdateDateTime → LATE revisions
  whose deltas are exactly the differences; the ledger changes by exactly the re-rated amount;
- crash: the windowing process is SIGKILLed at random points while real readings flow; a
  read_committed consumer of usage.windows sees every (window, revision) exactly once and the final
  values equal the batch aggregate;
- failover: two windowing processes, one is SIGKILLed, the survivor restores its partitions from
  the changelog and carries on with no loss or duplicate.
"""

from __future__ import annotations

import io
import random
import signal
import threading
import time
import zipfile
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.codec import default_codec
from pipeline.ingest.gateway import completion_markers
from pipeline.ingest.nem12 import read_nem12
from pipeline.records import UsageWindow
from pipeline.reference import BUNDLED_REFERENCE, ReferenceData, ReferenceFile
from pipeline.runtime.kafka import TransactionAborted, read_all
from pipeline.runtime.loop import StageRunner
from pipeline.stages import build_stage
from tests.batchbill import expected_bills, latest_readings
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

CODEC = default_codec()
REF = ReferenceData.from_file(ReferenceFile.read(BUNDLED_REFERENCE))
NEM = timedelta(hours=10)


def expected_windows(files: list[Path]) -> dict[str, Decimal]:
    """window id → sum of the latest version of every interval in it (30-minute windows)."""
    out: dict[str, Decimal] = defaultdict(Decimal)
    for r in latest_readings([r for f in files for r in read_nem12(f).readings]):
        account = REF.account_of(r.nmi, (r.interval_start + NEM).date())
        ms = int(r.interval_start.timestamp() * 1000)
        start = ms - ms % 1_800_000
        out[f"{account}|{r.nmi}/{r.suffix}|{start}"] += r.value
    return out


def windows_output(env: Env) -> list[UsageWindow]:
    return [CODEC.decode(m.value, UsageWindow) for m in read_all(env.settings.kafka_bootstrap,
                                                                  env.topics.usage_windows, timeout_s=120)]


def wait_windows_converged(env: Env, files: list[Path], timeout_s: float = 300) -> list[UsageWindow]:
    """The revisions on usage.windows once the latest revision of every window carries the batch aggregate
    of ``files`` (and no other window exists), or, after ``timeout_s``, whatever is there (the caller's
    assertions then say what is missing). Waits for an outcome, not for quiet: timing is input."""
    want = expected_windows(files)
    deadline = time.monotonic() + timeout_s
    while True:
        env.check_alive()
        out = windows_output(env)
        latest: dict[str, UsageWindow] = {}
        for w in out:
            if w.window_id not in latest or w.revision > latest[w.window_id].revision:
                latest[w.window_id] = w
        if {wid: w.value for wid, w in latest.items()} == want or time.monotonic() > deadline:
            return out
        time.sleep(1.0)


def assert_exactly_once_and_converged(out: list[UsageWindow], files: list[Path]) -> None:
    pairs = [(w.window_id, w.revision) for w in out]
    assert len(pairs) == len(set(pairs)), "a (window, revision) was seen twice"
    by_window: dict[str, list[UsageWindow]] = defaultdict(list)
    for w in out:
        by_window[w.window_id].append(w)
    want = expected_windows(files)
    assert set(by_window) == set(want)
    for wid, revs in by_window.items():
        revs.sort(key=lambda w: w.revision)
        assert [w.revision for w in revs] == list(range(len(revs))), wid
        assert revs[-1].value == want[wid], wid
        assert sum((w.delta for w in revs), Decimal(0)) == want[wid], wid


# --- correction ------------------------------------------------------------------------------------
ESTIMATED = DATA / "nem12" / "NEM12#000000000000004#CNRGYMDP#NEMMCO.zip"


def actuals_delivery(tmp: Path) -> Path:
    """A later delivery of the same intervals derived from the real estimated file: quality A,
    values +25 % (3 dp), UpdateDateTime / MSATSLoadDateTime 30 days later, new file time, no 400 records."""
    with zipfile.ZipFile(ESTIMATED) as z:
        text = z.read(z.namelist()[0]).decode()
    lines = []
    for line in io.StringIO(text).read().splitlines():
        f = line.split(",")
        if f[0] == "400":  # the actuals are plain A days: no quality overrides
            continue
        if f[0] == "100":
            f[2] = "200506301200"
        elif f[0] == "300":
            n = len(f) - 7  # 300, date, values..., quality, reason, reason desc, update, msats
            values = [str((Decimal(v) * Decimal("1.25")).quantize(Decimal("0.001"))) for v in f[2:2 + n]]
            upd = datetime.strptime(f[-2], "%Y%m%d%H%M%S") + timedelta(days=30)
            f = [f[0], f[1], *values, "A", "", "", upd.strftime("%Y%m%d%H%M%S"), upd.strftime("%Y%m%d%H%M%S")]
        lines.append(",".join(f))
    out = tmp / "NEM12#000000000000004-ACTUALS#CNRGYMDP#NEMMCO.csv"
    out.write_text("\r\n".join(lines) + "\r\n")
    return out


def test_estimates_then_actuals_re_emit_late_revisions_and_re_rate_exactly(pipeline_env: Env, tmp_path: Path) -> None:
    env = pipeline_env
    actuals = actuals_delivery(tmp_path)
    est = read_nem12(ESTIMATED).readings
    act = read_nem12(actuals).readings
    assert {r.quality for r in est} == {"E", "F"} and {r.quality for r in act} == {"A"}
    assert len(act) == len(est) and all(a.version > e.version for a, e in zip(act, est, strict=True))

    env.start_all()
    publish_files(env, [ESTIMATED])
    first = wait_windows_converged(env, [ESTIMATED])
    assert {(w.revision, w.timing) for w in first} == {(0, "ON_TIME")}  # closed by the file's completion markers
    env.wait_accounted(published=len(est))
    ledger_before = env.ledger_totals()
    assert ledger_before == {
        (a, p.isoformat()): {k: v for k, v in lines.items() if v}
        for (a, p), lines in expected_bills([ESTIMATED], BUNDLED_REFERENCE).items()
    }

    publish_files(env, [actuals])
    out = wait_windows_converged(env, [ESTIMATED, actuals])
    rev0 = {w.window_id: w for w in out if w.revision == 0}
    rev1 = {w.window_id: w for w in out if w.revision == 1}
    assert set(rev1) == set(rev0) and max(w.revision for w in out) == 1
    for wid, w1 in rev1.items():
        assert w1.timing == "LATE"
        assert w1.delta == w1.value - rev0[wid].value
        assert w1.qualities == ("A",)
    assert_exactly_once_and_converged(out, [ESTIMATED, actuals])

    env.wait_accounted(published=len(est) + len(act))
    after = env.ledger_totals()
    want = {(a, p.isoformat()): {k: v for k, v in lines.items() if v}
            for (a, p), lines in expected_bills([ESTIMATED, actuals], BUNDLED_REFERENCE).items()}
    assert after == want
    # the ledger changed by exactly the re-rated amount, through new lines only
    for key, lines in want.items():
        for comp, total in lines.items():
            change = env.sql(
                "SELECT coalesce(sum(amount), 0) FROM invoice_lines WHERE account = %s AND period_start = %s "
                "AND price_book_id || '|' || component_id || '|' || band = %s AND explanation::text LIKE %s",
                (key[0], key[1], comp, '%"LATE"%'),
            )[0][0]
            if comp.split("|")[1] in ("energy",):
                assert change == total - ledger_before[key].get(comp, 0), (key, comp)


# --- crashes ---------------------------------------------------------------------------------------------
CRASH_FILES = sorted((DATA / "nem12").glob("*.zip"))[:30]


def _publish_slowly(env: Env, files: list[Path], done: threading.Event) -> None:
    for f in files:
        publish_files(env, [f])
        time.sleep(0.3)
    done.set()


def test_windowing_survives_sigkill_at_random_points(pipeline_env: Env) -> None:
    env = pipeline_env
    env.env["PIPELINE_IDLE_TIMEOUT_S"] = "10"
    env.start("ingest")
    env.start("windowing")
    done = threading.Event()
    publisher = threading.Thread(target=_publish_slowly, args=(env, CRASH_FILES, done))
    publisher.start()
    rng = random.Random(7)
    kills = 0
    while not done.is_set() or kills < 3:
        time.sleep(rng.uniform(1.0, 3.0))
        victim = env.procs["windowing"][-1]
        env.stop(victim, signal.SIGKILL)
        kills += 1
        env.start("windowing")  # same instance id: fences the dead transaction at once
    publisher.join()
    assert kills >= 3
    env.wait_consumed("ingest", env.topics.meter_readings)
    env.wait_consumed("windowing", env.topics.usage_events)
    out = wait_windows_converged(env, CRASH_FILES)
    assert_exactly_once_and_converged(out, CRASH_FILES)


def test_survivor_restores_partitions_of_a_killed_peer(pipeline_env: Env) -> None:
    env = pipeline_env
    env.env["PIPELINE_IDLE_TIMEOUT_S"] = "15"
    env.start("ingest")
    a = env.start("windowing", instance="a")
    env.start("windowing", instance="b")
    done = threading.Event()
    publisher = threading.Thread(target=_publish_slowly, args=(env, CRASH_FILES, done))
    publisher.start()
    time.sleep(4)
    env.stop(a, signal.SIGKILL)  # not restarted: "b" must take over its partitions
    env.procs["windowing"].remove(a)
    publisher.join()
    env.wait_consumed("ingest", env.topics.meter_readings)
    env.wait_consumed("windowing", env.topics.usage_events)
    out = wait_windows_converged(env, CRASH_FILES)
    assert_exactly_once_and_converged(out, CRASH_FILES)
    assert "restored partition" in env.log_tail("windowing", 200_000)


def test_an_aborted_transaction_is_redone_from_the_last_commit_without_a_restart(pipeline_env: Env) -> None:
    """An abortable commit error (e.g. ILLEGAL_GENERATION when the group rebalances while a commit is
    on its way) aborts the transaction; the runner drops what it did since the last commit, rebuilds
    its stores from the changelog, seeks back to the committed offsets and carries on in-process.

    The failure is injected at the client boundary: on two commits the transaction (holding that
    batch's windows and changelog records) is really aborted on the broker and ``TransactionAborted``
    raised, as ``StageClients.commit`` does on an abortable error."""
    env = pipeline_env
    env.start("ingest")
    files = CRASH_FILES[:12]
    publish_files(env, files)
    env.wait_consumed("ingest", env.topics.meter_readings)
    settings = env.settings.model_copy(update={"batch_max_records": 150, "idle_timeout_s": 15,
                                               "instance_id": "inproc"})
    runner = StageRunner(settings, build_stage("windowing", settings))
    real_commit = runner.clients.commit
    calls: list[int] = []

    def commit(offsets: dict, group_metadata: object = None) -> None:
        calls.append(len(offsets))
        if len(calls) in (3, 7):
            runner.clients.abort()  # the broker drops the batch's output and changelog records
            raise TransactionAborted("injected: ILLEGAL_GENERATION")
        real_commit(offsets, group_metadata)

    runner.clients.commit = commit  # type: ignore[method-assign]
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        env.wait_consumed("windowing", env.topics.usage_events)
        out = wait_windows_converged(env, files)
    finally:
        runner.stop()
        thread.join(60)
    assert not thread.is_alive()
    assert len(calls) > 7
    assert_exactly_once_and_converged(out, files)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_windowing_exports_prometheus_metrics(pipeline_env: Env) -> None:
    env = pipeline_env
    port = _free_port()
    env.start("ingest")
    env.start("windowing", PIPELINE_METRICS_PORT=str(port))
    files = [ESTIMATED]
    n = publish_files(env, files)
    out = wait_windows_converged(env, files)
    m = _scrape(port)
    assert m['pipeline_windowing_events_total{outcome="accepted"}'] == n
    emitted = {k: v for k, v in m.items() if k.startswith("pipeline_windowing_windows_emitted_total{")}
    assert sum(emitted.values()) == len(out) == len(expected_windows(files))
    assert all('timing="ON_TIME"' in k for k in emitted)  # closed by their series' clocks and the file's markers
    assert m['pipeline_records_in_total{stage="windowing"}'] == n + len(completion_markers(ESTIMATED.name,
                                                                                         read_nem12(ESTIMATED).readings))
    pending = [v for k, v in m.items() if k.startswith("pipeline_windowing_pending_windows{")]
    assert len(pending) == env.settings.partitions and not any(pending)
    assert any(k.startswith("pipeline_state_restore_seconds") for k in m)
    assert m['pipeline_commits_total{stage="windowing"}'] >= 1
