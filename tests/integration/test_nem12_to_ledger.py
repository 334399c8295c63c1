"""End to end over the real broker and real Postgres: real NEM12 files in, invoice lines out, equal
to the cent to an independent batch computation; replays change nothing; SIGTERM loses nothing."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.ingest.nem12 import read_nem12
from pipeline.reference import BUNDLED_REFERENCE
from pipeline.runtime.kafka import end_offsets
from tests.batchbill import expected_bills
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

FILES = sorted((DATA / "nem12").glob("*.zip"))[:24]


def _expected(files: list[Path]) -> dict[tuple[str, str], dict[str, object]]:
    return {
        (a, p.isoformat()): {k: v for k, v in lines.items() if v != 0}
        for (a, p), lines in expected_bills(files, BUNDLED_REFERENCE).items()
    }


def _assert_ledger_matches(env: Env, files: list[Path]) -> None:
    got = env.ledger_totals()
    want = _expected(files)
    assert set(got) == set(want), (sorted(set(got) ^ set(want)), env.log_tail("rating"))
    for key in want:
        assert got[key] == want[key], key


def test_real_nem12_files_bill_to_the_cent_and_replay_changes_nothing(pipeline_env: Env) -> None:
    env = pipeline_env
    env.env["PIPELINE_INVOICE_IDLE_CLOSE_S"] = "5"  # 2005 data: an account quiet for 5 s has its invoices closed
    env.start_all()
    published = publish_files(env, FILES)
    assert len(FILES) >= 10
    assert published == sum(len(read_nem12(f).readings) for f in FILES)
    report = env.wait_accounted(published=published)
    assert (report.billed, report.dead_lettered, report.refused) == (published, 0, {})
    lines = env.line_count()
    assert lines > 0
    _assert_ledger_matches(env, FILES)
    # every (account, billing period) billed has its invoice; data that arrived after its period closed
    # (its account's clock had passed period end + close delay, or it had been quiet past that time) sits
    # on a later invoice as a prior-period adjustment; every invoice is finalized once its account is quiet
    env.wait_all_finalized()
    env.assert_invoice_structure()
    homes = {(a, p) for a, p in env.sql("SELECT account, period_start::text FROM invoices")}
    assert homes >= set(_expected(FILES))
    for a, p in homes - set(_expected(FILES)):
        assert {k for (k,) in env.sql("SELECT DISTINCT line_kind FROM invoice_lines WHERE invoice_id = %s",
                                      (f"{a}|{p}|AUD",))} <= {"ADJUSTMENT"}

    # "why is this line on my bill?": an energy line walks back to the real NEM12 file it came from
    line_id, sources = env.sql(
        "SELECT line_id, explanation->'windows'->0->'sources' FROM invoice_lines "
        "WHERE component_id = 'energy' AND jsonb_array_length(explanation->'windows') > 0 LIMIT 1"
    )[0]
    res = subprocess.run([sys.executable, "-m", "pipeline", "explain", line_id], env=env.env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    real_file = sources[0].split("!")[0]
    assert real_file in {f.name for f in FILES}
    assert f"from {sources[0]}" in res.stdout and "rev 0 " in res.stdout and "ACTEWAGL-HOME-TOU v1" in res.stdout

    # publishing the same files again changes nothing in the ledger: every reading is a duplicate of one
    # billed already, accounted for as billed; nothing is refused or dead-lettered
    snapshot = env.sql("SELECT line_id, amount FROM invoice_lines ORDER BY line_id")
    again = publish_files(env, FILES)
    report = env.wait_accounted(published=published + again)
    assert (report.billed, report.dead_lettered, report.refused) == (published + again, 0, {})
    assert env.sql("SELECT line_id, amount FROM invoice_lines ORDER BY line_id") == snapshot
    tps = [(t, p) for t in (env.topics.usage_late, env.topics.dlq_ingest) for p in range(3)]
    assert end_offsets(env.settings.kafka_bootstrap, tps) == dict.fromkeys(tps, 0)
    assert env.stop_all() == {s: [0] for s in ("ingest", "windowing", "rating", "invoicing")}


def test_sigterm_mid_stream_loses_and_duplicates_nothing(pipeline_env: Env) -> None:
    env = pipeline_env
    env.start_all()
    rng = random.Random(42)
    files = FILES[:12]
    publisher = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "publish", "nem12", "--no-progress", *map(str, files)],
        env=env.env,
    )
    for _ in range(4):  # restart stages while data flows through them
        time.sleep(rng.uniform(0.5, 2.0))
        stage = rng.choice(["ingest", "windowing", "rating", "invoicing"])
        running = env.procs[stage][-1]
        env.wait_started(running, stage)
        assert env.stop(running, signal.SIGTERM) == 0, env.log_tail(stage)
        env.start(stage, instance="0")
    assert publisher.wait(120) == 0
    env.wait_accounted(published=sum(len(read_nem12(f).readings) for f in files))
    _assert_ledger_matches(env, files)
    dupes = env.sql("SELECT count(*) - count(DISTINCT line_id) FROM invoice_lines")[0][0]
    assert dupes == 0


def test_every_invalid_file_is_rejected_whole_and_publishes_nothing(pipeline_env: Env) -> None:
    env = pipeline_env
    invalid = sorted((DATA / "nem12-invalid").iterdir())
    assert len(invalid) == 10
    tps = [(env.topics.meter_readings, p) for p in range(3)]
    before = end_offsets(env.settings.kafka_bootstrap, tps)
    for f in invalid:
        res = subprocess.run([sys.executable, "-m", "pipeline", "publish", "nem12", "--no-progress", str(f)],
                             env=env.env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 1, (f.name, res.stdout, res.stderr)
        assert "rejected [" in res.stderr and f.name in res.stderr, res.stderr
        assert "published 0 readings from 0 files" in res.stdout
    assert end_offsets(env.settings.kafka_bootstrap, tps) == before
