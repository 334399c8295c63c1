"""Checks before finalizing (issue 17) over the real broker and Postgres, on real NEM12 files.

ACC-1021's March (NMI NEM1205084, 15-minute reads on 30 and 31 March 2005, `SCENARIO505033001`) is delivered
with 60 % of its 30-minute windows estimated: it waits in REVIEW (no number) while ACC-1026's March (actual
reads of NMI NEM1206104's K1 and Q1 channels, `SCENARIO705033001`) is finalized as INV-2005-000001 with every
check on; approved through the CLI, it is finalized as INV-2005-000002: one series, no gap. Every decision is
audited and the hold is announced on invoice.events.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.config import Settings
from tests.integration.conftest import DATA, Env, publish_files
from tests.integration.test_invoice_lifecycle import invoice, wait_for

pytestmark = pytest.mark.integration

ESTIMATED = DATA / "nem12" / "NEM12#SCENARIO505033001#ENERGEXM#NEMMCO.zip"
ACTUAL = DATA / "nem12" / "NEM12#SCENARIO705033001#ENERGEXM#NEMMCO.zip"
HELD = "ACC-1021|2005-03-01|AUD"
CLEAN = "ACC-1026|2005-03-01|AUD"


def with_estimates(tmp: Path) -> Path:
    """The real ACC-1021 file with its reads marked estimated (MDFF 400 records, quality E52): on 30 March the
    15-minute intervals 1–19 (30-minute windows 1–10: window 10 holds intervals 19 and 20), on 31 March every
    interval (windows 1–48). March then has 58 of 96 windows estimated: 60.4 % > the 50 % limit."""
    with zipfile.ZipFile(ESTIMATED) as z:
        text = z.read(z.namelist()[0]).decode()
    out = []
    for line in io.StringIO(text).read().splitlines():
        f = line.split(",")
        if f[0] == "300" and f[1] in ("20050330", "20050331"):
            n = len(f) - 7
            assert n == 96 and f[2 + n] == "A", "the real file: 15-minute actual reads"
            f[2 + n] = "V"
            out.append(",".join(f))
            if f[1] == "20050330":
                out += ["400,1,19,E52,,", "400,20,96,A,,"]
            else:
                out.append("400,1,96,E52,,")
            continue
        out.append(line)
    path = tmp / "NEM12#ESTIMATED#ENERGEXM#NEMMCO.csv"
    path.write_text("\r\n".join(out) + "\r\n")
    return path


def run_cli(env: Env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env.env, capture_output=True, text=True,
                          timeout=120)


def test_mostly_estimated_invoice_waits_for_approval_and_keeps_the_series_gap_free(
        pipeline_env: Env, tmp_path: Path) -> None:
    env = pipeline_env
    env.env.update({
        "PIPELINE_IDLE_TIMEOUT_S": "3600",  # time moves only with the data
        "PIPELINE_INVOICE_CLOSE_DELAY_HOURS": "1",
        "PIPELINE_INVOICE_CLOSE_CHECK_S": "1",
        "PIPELINE_RELAY_POLL_S": "0.2",
        "PIPELINE_REVIEW_CHECKS": json.dumps(
            ["ESTIMATED_SHARE", "USAGE_FAR_FROM_HISTORY", "NEGATIVE_TOTAL", "MISSING_SERVICE_DAYS"]),
        "PIPELINE_REVIEW_HOLD_HOURS": "inf",  # only an operator releases it
    })
    env.start_all(relay=True)
    publish_files(env, [with_estimates(tmp_path), ACTUAL])

    clean = wait_for(env, "ACC-1026 March finalized",
                     lambda: invoice(env, CLEAN).get("status") == "FINALIZED" and invoice(env, CLEAN), timeout_s=300)
    wait_for(env, "ACC-1021 March held", lambda: invoice(env, HELD).get("status") == "REVIEW", timeout_s=300)
    env.wait_quiet(min_wait_s=3)
    assert clean["invoice_number"] == "INV-2005-000001"
    held = invoice(env, HELD)
    assert held["status"] == "REVIEW" and held["invoice_number"] is None  # no number taken while held

    flags = env.sql("SELECT review_flags, review_until FROM invoices WHERE invoice_id = %s", (HELD,))[0]
    assert flags[1] is None  # hold = inf: until approved
    assert [f["code"] for f in flags[0]] == ["ESTIMATED_SHARE"]
    assert flags[0][0]["details"]["estimated_windows"] == 58 and flags[0][0]["details"]["windows"] == 96
    assert flags[0][0]["details"]["share"] == "0.6042"

    res = run_cli(env, "invoice", "review", "--json")
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert [h["invoice_id"] for h in listed] == [HELD] and listed[0]["approved_by"] is None
    charges = sum(r[0] for r in env.sql("SELECT amount FROM invoice_lines WHERE invoice_id = %s", (HELD,)))
    assert Decimal(listed[0]["total"]) == charges > 0

    # an invoice that is not in REVIEW cannot be approved
    res = run_cli(env, "invoice", "approve", CLEAN, "--by", "alice")
    assert res.returncode == 1 and "NOT_IN_REVIEW" in res.stderr

    res = run_cli(env, "invoice", "approve", HELD, "--by", "alice", "--note", "estimates confirmed with the MDP")
    assert res.returncode == 0, res.stderr
    final = wait_for(env, "ACC-1021 March finalized after approval",
                     lambda: invoice(env, HELD).get("status") == "FINALIZED" and invoice(env, HELD), timeout_s=120)
    assert final["invoice_number"] == "INV-2005-000002"
    assert final["charges_total"] == charges and final["amount_due"] == charges  # nothing added meanwhile
    numbers = [r[0] for r in env.sql("SELECT sequence_number FROM invoices WHERE series = 'INV-2005' "
                                     "ORDER BY sequence_number")]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) == 2  # gap-free

    audit = env.sql("SELECT decided_by, source, decision, note FROM invoice_reviews WHERE invoice_id = %s "
                    "ORDER BY review_id", (HELD,))
    assert audit == [("invoicing", "stage", "HELD", ""),
                     ("alice", "cli", "APPROVED", "estimates confirmed with the MDP")]
    assert env.sql("SELECT count(*) FROM invoice_reviews WHERE invoice_id <> %s", (HELD,))[0][0] == 0
    events = [r[0] for r in env.sql("SELECT event_type FROM outbox WHERE payload->>'invoice_id' = %s "
                                    "AND event_type <> 'LINE_APPENDED' ORDER BY seq", (HELD,))]
    assert events == ["INVOICE_HELD", "INVOICE_FINALIZED"]
    env.assert_invoice_structure()


def test_operator_api_lists_and_approves_held_invoices(base_settings: Settings, pipeline_env: Env) -> None:
    """The operator API's review endpoints on a held invoice (put in REVIEW the way the stage does): a viewer
    may list, only an operator may approve (403), an unknown invoice is 404, approving twice changes nothing."""
    from fastapi.testclient import TestClient

    from pipeline.api.operator import create_app
    from pipeline.config import OperatorKey

    env = pipeline_env
    env.execute("INSERT INTO invoices (invoice_id, account, period_start, period_end, currency, close_at) "
                "VALUES (%s, 'ACC-1021', '2005-03-01', '2005-04-01', 'AUD', now())", (HELD,))
    env.execute("UPDATE invoices SET status = 'REVIEW', review_since = now(), review_flags = %s::jsonb "
                "WHERE invoice_id = %s", (json.dumps([{"code": "NEGATIVE_TOTAL", "message": "m", "details": {}}]),
                                          HELD))
    settings = env.settings.model_copy(update={"operator_api_keys": [
        OperatorKey(name="alice", key="op-key", role="operator"),
        OperatorKey(name="dash", key="view-key", role="viewer")]})
    client = TestClient(create_app(settings))
    listed = client.get("/v1/invoices/review", headers={"X-API-Key": "view-key"})
    assert listed.status_code == 200 and [h["invoice_id"] for h in listed.json()] == [HELD]
    path = "/v1/invoices/ACC-1021%7C2005-03-01%7CAUD/approve"
    assert client.post(path, headers={"X-API-Key": "view-key"}).status_code == 403
    assert client.post("/v1/invoices/nope/approve", headers={"X-API-Key": "op-key"}).json()["error"]["code"] == \
        "UNKNOWN_INVOICE"
    for _ in range(2):
        ok = client.post(path, headers={"X-API-Key": "op-key"}, json={"note": "checked"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["approved_by"] == "alice"
        assert [d["decision"] for d in ok.json()["decisions"]] == ["APPROVED"]


def test_a_hold_that_expires_finalizes_the_invoice_and_says_so(pipeline_env: Env) -> None:
    """The ledger store on the real database (wall clock): a negative invoice is held for 1 s, then finalized
    with the next number when the hold expires, audited HELD then HOLD_EXPIRED; a clean invoice of the same
    account for the next period waits behind the held one (the balance chain keeps its order)."""
    import time
    from datetime import date, timedelta

    from pipeline.codec import default_codec
    from pipeline.invoicing.ledger import LedgerStore, PendingLine
    from pipeline.invoicing.validation import ReviewPolicy
    from pipeline.records import RatedCharge

    env = pipeline_env
    store = LedgerStore(env.settings.database_url, "review-test", default_codec(), close_delay=timedelta(0),
                        clock="wall", review=ReviewPolicy(hold=timedelta(seconds=1)))

    def line(n: int, start: date, end: date, amount: str) -> PendingLine:
        charge = RatedCharge(f"line-{n}", "ACC-1021", start, end, "AUD", "feed_in", "feed_in", "", Decimal(5),
                             "kWh", Decimal("0.1"), Decimal(amount), Decimal(amount), "book", 1, "test", "{}")
        return PendingLine(charge, "charges", 0, n)

    try:
        store.commit([line(1, date(2005, 3, 1), date(2005, 4, 1), "-12.50"),
                      line(2, date(2005, 4, 1), date(2005, 5, 1), "30.00")], [], {("charges", 0): 3})
        assert store.finalize_due() == []  # March held, April waits behind it
        assert invoice(env, HELD)["status"] == "REVIEW"
        assert invoice(env, "ACC-1021|2005-04-01|AUD")["status"] == "OPEN"
        time.sleep(1.5)
        assert store.finalize_due() == ["INV-2005-000001", "INV-2005-000002"]  # March (hold expired), then April
    finally:
        store.close()
    assert invoice(env, HELD)["amount_due"] == Decimal("-12.50")
    assert invoice(env, "ACC-1021|2005-04-01|AUD")["previous_balance"] == Decimal("-12.50")
    audit = env.sql("SELECT decision, flags->0->>'code' FROM invoice_reviews ORDER BY review_id")
    assert audit == [("HELD", "NEGATIVE_TOTAL"), ("HOLD_EXPIRED", "NEGATIVE_TOTAL")]
