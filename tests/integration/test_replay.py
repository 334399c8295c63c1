"""Replay and re-rate over the real broker and Postgres (issue 15): a generation rebuilt from the live input
topics and reference data bills exactly what the live ledger holds (diff zero); with a superseding price
book its diff is exactly what the live rating stage's own re-rating appends once `pipeline replay apply`
publishes that version live, once: applying again adds nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.reference import BUNDLED_REFERENCE
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

FILES = sorted((DATA / "nem12").glob("NEM12#0000000000000*.zip"))[:2]  # ACC-1002, ACC-1007: ACTEWAGL-HOME-TOU


def cli(env: Env, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env.env, capture_output=True, text=True,
                          timeout=timeout)


def diff_rows(env: Env, name: str, path: Path) -> tuple[int, list[dict]]:
    res = cli(env, "replay", "diff", name, "--json", str(path))
    assert res.returncode in (0, 1), res.stderr
    return res.returncode, json.loads(path.read_text())


def test_replay_diffs_to_zero_and_applies_a_superseding_book_exactly_once(pipeline_env: Env, tmp_path) -> None:
    env = pipeline_env
    env.env["PIPELINE_REFERENCE_REFRESH_S"] = "1"
    env.start_all()
    published = publish_files(env, FILES)
    report = env.wait_accounted(published=published)
    assert report.billed == published
    live_before = env.ledger_totals()

    same = cli(env, "replay", "run", "same")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "generation same: the ledgers agree on every (account, period, line)" in same.stdout
    assert f"readings in {published:,} = billed {published:,}" in same.stdout

    # from a date: ACC-1002's readings (March) are not copied; ACC-1007's April period is compared
    april = cli(env, "replay", "run", "april", "--from", "2005-04-01")
    assert april.returncode == 0, april.stdout + april.stderr
    copied = int(april.stdout.split("generation april: ")[1].split(" input records")[0].replace(",", ""))
    assert 0 < copied < published
    assert "generation april: the ledgers agree on every (account, period, line)" in april.stdout

    v2 = json.loads(BUNDLED_REFERENCE.read_text())["price_books"][0]
    assert (v2["id"], v2["version"]) == ("ACTEWAGL-HOME-TOU", 1)
    v2["version"] = 2
    v2["components"][0]["bands"][0]["rate"] = "0.3750"  # peak, was 0.2541
    v2["components"][1]["rate"] = "1.0000"  # daily supply
    (tmp_path / "v2.json").write_text(json.dumps(v2))
    rerated = cli(env, "replay", "run", "v2", "--price-book", str(tmp_path / "v2.json"))
    assert rerated.returncode == 1, rerated.stdout + rerated.stderr
    code, rows = diff_rows(env, "v2", tmp_path / "v2-diff.json")
    assert code == 1 and rows
    assert {r["account"] for r in rows} == {"ACC-1002", "ACC-1007"}
    assert {r["line"].split("|")[1] for r in rows} == {"energy", "supply", "gst"}  # peak energy, supply, and tax
    assert all(Decimal(r["difference"]) > 0 for r in rows)  # both rates went up
    assert env.ledger_totals() == live_before  # the replay did not touch the live ledger

    lines_before = env.line_count()
    applied = cli(env, "replay", "apply", "v2")
    assert applied.returncode == 0 and "ACTEWAGL-HOME-TOU v2" in applied.stdout and "published" in applied.stdout
    deadline = time.monotonic() + 300
    while diff_rows(env, "v2", tmp_path / "after.json")[0] != 0:
        env.check_alive()
        assert time.monotonic() < deadline, "the live re-rating did not reach the replayed ledger"
        time.sleep(2)
    # what the live re-rating appended per (account, period, line) is exactly the diff
    after = env.ledger_totals()
    appended = {(a, p, k): after[(a, p)].get(k, Decimal(0)) - live_before.get((a, p), {}).get(k, Decimal(0))
                for (a, p) in after for k in after[(a, p)]}
    assert {k: v for k, v in appended.items() if v} == {
        (r["account"], r["period_start"], r["line"]): Decimal(r["difference"]) for r in rows}
    added = env.line_count() - lines_before
    assert added == len(rows)  # one difference line per differing (account, period, line)

    again = cli(env, "replay", "apply", "v2")
    assert again.returncode == 0 and "nothing to apply" in again.stdout
    time.sleep(3)  # more than PIPELINE_REFERENCE_REFRESH_S: a second re-rating would have started
    assert env.line_count() == lines_before + added and diff_rows(env, "v2", tmp_path / "again.json")[0] == 0

    for name in ("same", "april", "v2"):
        assert cli(env, "replay", "drop", name).returncode == 0
    assert cli(env, "replay", "diff", "same").returncode == 2
    assert env.stop_all() == {s: [0] for s in ("ingest", "windowing", "rating", "invoicing")}
