"""`pipeline late replay` over the real broker and Postgres (issue 11, SPEC §3): readings refused because
their meter had no service point on their date are kept, with the original record, on usage.late; once the
operator extends the service point, the replay bills them exactly once, and replaying again adds nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest

from pipeline.codec import default_codec
from pipeline.ingest.nem12 import read_nem12
from pipeline.records import LateEvent, MeterReading
from pipeline.reference import BUNDLED_REFERENCE
from pipeline.runtime.kafka import read_all
from tests.batchbill import expected_bills
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

# NEM1201002 (ACC-1002) readings from 15 to 18 March 2005 (NEM dates); another meter beside it
FILES = [DATA / "nem12" / "NEM12#000000000000001#CNRGYMDP#NEMMCO.zip",
         DATA / "nem12" / "NEM12#000000000000005#CNRGYMDP#NEMMCO.zip"]
NMI, ACCOUNT, LATER_START = "NEM1201002", "ACC-1002", date(2005, 3, 17)


def nem_day(r: MeterReading) -> date:
    return (r.interval_start + timedelta(hours=10)).date()


def outside(r: MeterReading) -> bool:
    return r.nmi == NMI and nem_day(r) < LATER_START


def ledger(env: Env) -> dict[tuple[str, str], dict[str, object]]:
    return env.ledger_totals()


def bills(reference: Path, keep=None) -> dict[tuple[str, str], dict[str, object]]:  # type: ignore[no-untyped-def]
    return {(a, p.isoformat()): {k: v for k, v in lines.items() if v}
            for (a, p), lines in expected_bills(FILES, reference, keep=keep).items()}


def replay(env: Env, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "pipeline", "late", "replay", *args], env=env.env,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_refused_readings_are_billed_once_after_the_service_point_is_extended(pipeline_env: Env,
                                                                              tmp_path: Path) -> None:
    env = pipeline_env
    env.env["PIPELINE_REFERENCE_REFRESH_S"] = "1"  # the stages see the operator's change within a second
    # the service point starts two days later than the data: those days are outside its service dates
    assert env.execute("UPDATE service_points SET effective_from = %s WHERE nmi = %s", (LATER_START, NMI)) == 1
    shortened = json.loads(BUNDLED_REFERENCE.read_text())
    for sp in shortened["service_points"]:
        if sp["nmi"] == NMI:
            sp["effective_from"] = LATER_START.isoformat()
    (tmp_path / "shortened.json").write_text(json.dumps(shortened))
    env.start_all()
    published = publish_files(env, FILES)
    refused = [r for f in FILES for r in read_nem12(f).readings if outside(r)]
    assert 0 < len(refused) < published
    report = env.wait_accounted(published=published)
    assert (report.billed, report.dead_lettered, report.refused) == (
        published - len(refused), 0, {"OUTSIDE_SERVICE_DATES": len(refused)})
    codec = default_codec()
    late = [codec.decode(m.value, LateEvent) for m in read_all(env.settings.kafka_bootstrap, env.topics.usage_late)]
    assert {(x.reason, x.stage, x.event.account, x.input_topic) for x in late} == {
        ("OUTSIDE_SERVICE_DATES", "ingest", ACCOUNT, env.topics.meter_readings)}
    assert sorted(codec.decode(x.original, MeterReading).identity for x in late) == sorted(r.identity for r in refused)
    # the bill without the refused days (and 15 service days of supply in March instead of 17)
    assert ledger(env) == bills(tmp_path / "shortened.json", keep=lambda r: not outside(r))
    dry = replay(env, "--reason", "OUTSIDE_SERVICE_DATES", "--dry-run")
    assert f"would re-submit {len(refused):,} OUTSIDE_SERVICE_DATES to {env.topics.meter_readings}" in dry
    assert ledger(env) == bills(tmp_path / "shortened.json", keep=lambda r: not outside(r))

    # the operator fixes the cause, then replays: the readings are billed, exactly once
    assert env.execute("UPDATE service_points SET effective_from = %s WHERE nmi = %s", (date(2005, 3, 15), NMI)) == 1
    out = replay(env, "--reason", "OUTSIDE_SERVICE_DATES", "--account", ACCOUNT)
    assert f"re-submitted {len(refused):,} OUTSIDE_SERVICE_DATES to {env.topics.meter_readings}" in out
    report = env.wait_accounted(published=published + len(refused))
    # the originals stay refused on usage.late; their re-submitted copies are billed
    assert (report.billed, report.refused) == (published, {"OUTSIDE_SERVICE_DATES": len(refused)})
    full = bills(BUNDLED_REFERENCE)
    assert ledger(env) == full
    lines = env.sql("SELECT line_id, amount FROM invoice_lines ORDER BY line_id")

    # replaying again re-submits the same records: duplicates now, nothing changes on the bill
    replay(env, "--reason", "OUTSIDE_SERVICE_DATES")
    report = env.wait_accounted(published=published + 2 * len(refused))
    assert (report.billed, report.refused) == (published + len(refused), {"OUTSIDE_SERVICE_DATES": len(refused)})
    assert env.sql("SELECT line_id, amount FROM invoice_lines ORDER BY line_id") == lines
    assert ledger(env) == full
    assert env.sql("SELECT count(*) - count(DISTINCT line_id) FROM invoice_lines")[0][0] == 0
