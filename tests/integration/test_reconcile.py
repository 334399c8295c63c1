"""`pipeline reconcile` over the real broker and Postgres (issue 15): after real NEM12 files are billed the
tie-out is clean (readings = windows = ledger per account, period, metric and component; the ledger's
amounts add up; every ledger line is in the outbox), and a break injected through the owner role — a
ledger line for usage that no window carries — is found, named, and makes the command exit 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.ingest.nem12 import read_nem12
from pipeline.runtime import postgres
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

FILES = sorted((DATA / "nem12").glob("NEM12#0000000000000*.zip"))[:3]


def reconcile(env: Env, path: Path, *args: str) -> tuple[int, str, dict]:
    """`pipeline reconcile --json path *args`: exit code, what it printed, the JSON report."""
    res = subprocess.run([sys.executable, "-m", "pipeline", "reconcile", "--json", str(path), *args], env=env.env,
                         capture_output=True, text=True, timeout=300)
    return res.returncode, res.stdout + res.stderr, json.loads(path.read_text())


def test_reconcile_is_clean_after_billing_and_finds_an_injected_ledger_line(pipeline_env: Env, tmp_path) -> None:
    env = pipeline_env
    env.start_all()
    published = publish_files(env, FILES)
    assert published == sum(len(read_nem12(f).readings) for f in FILES)
    report = env.wait_accounted(published=published)
    assert (report.billed, report.dead_lettered, report.refused) == (published, 0, {})

    code, text, data = reconcile(env, tmp_path / "clean.json")
    assert code == 0, text
    tie = data["tie_out"]
    assert data["clean"] and tie["breaks"] == [], text
    lines = env.sql("SELECT count(*) FROM invoice_lines")[0][0]
    assert lines > 0 and tie["ledger_lines"] == tie["outbox_lines"] == lines
    energy = [r for r in tie["rows"] if r["metric"] == "energy_import"]
    assert energy and all(r["accepted"] == r["windowed"] and not r["broken"] for r in tie["rows"])
    # every reading's kWh is in some energy row: the rows add up to the files' import readings
    kwh = sum(r.value for f in FILES for r in read_nem12(f).readings if r.suffix.upper().startswith("E"))
    assert sum(Decimal(r["windowed"]) for r in energy) == kwh
    assert all(abs(Decimal(r["ledger"]) - Decimal(r["windowed"])) <= Decimal(r["tolerance"]) for r in energy)

    # one account and period only
    some = energy[0]
    code, text, one = reconcile(env, tmp_path / "one.json", "--account", some["account"],
                                "--period", some["period_start"])
    assert code == 0, text
    assert {(r["account"], r["period_start"]) for r in one["tie_out"]["rows"]} == {(some["account"],
                                                                                    some["period_start"])}

    # a break: a ledger line (through the owner role: the application role may only append through the stage)
    # for 25 kWh of peak usage no window carries, with its amount, so the line's own arithmetic is right
    latest = env.sql("SELECT line_id, invoice_id, account, period_start, period_end, currency, component_id, "
                     "component_kind, band, quantity, unit, rate, period_total, price_book_id, price_book_version, "
                     "source_topic, source_partition, source_offset FROM invoice_lines WHERE account = %s AND "
                     "period_start = %s AND component_kind = 'tou' ORDER BY source_offset DESC LIMIT 1",
                     (some["account"], some["period_start"]))[0]
    (line_id, invoice_id, account, pstart, pend, cur, comp, kind, band, qty, unit, rate, total, book, version,
     topic, partition, offset) = latest
    extra = (Decimal(25) * rate).quantize(Decimal("0.01"))
    with postgres.connect(env.env["PIPELINE_DATABASE_OWNER_URL"]) as conn:
        conn.execute(
            "INSERT INTO invoice_lines (line_id, invoice_id, account, period_start, period_end, currency, "
            "component_id, component_kind, band, quantity, unit, rate, amount, period_total, price_book_id, "
            "price_book_version, cause, explanation, source_topic, source_partition, source_offset) VALUES "
            "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'injected', '{}', %s, %s, %s)",
            ("injected-" + line_id[:20], invoice_id, account, pstart, pend, cur, comp, kind, band, qty + 25, unit,
             rate, extra, total + extra, book, version, topic, partition, offset + 1_000_000))
        conn.commit()
    code, text, broken = reconcile(env, tmp_path / "broken.json")
    assert code == 1, text
    bad = [r for r in broken["tie_out"]["rows"] if r["broken"]]
    assert [(r["account"], r["period_start"], r["component_id"]) for r in bad] == [(account, pstart.isoformat(),
                                                                                    comp)]
    before = next(r for r in energy if (r["account"], r["period_start"], r["component_id"]) ==
                  (account, pstart.isoformat(), comp))
    assert Decimal(bad[0]["ledger"]) == Decimal(before["ledger"]) + 25
    assert any(b.startswith(f"{account} {pstart} energy_import") for b in broken["tie_out"]["breaks"]), text
    assert any("outbox announces" in b for b in broken["tie_out"]["breaks"]), text  # no LINE_APPENDED for it
    assert "BREAK" in text
    assert env.stop_all() == {s: [0] for s in ("ingest", "windowing", "rating", "invoicing")}
