"""Invoice lifecycle over the real broker and real Postgres (SPEC §5), on a real NEM12 file:

- an invoice closes when its partition's usage watermark passes period end + close delay, driven by
  the stage, and is FINALIZED with a gap-free number, bill and due dates and a frozen statement;
- a superseding delivery for a finalized period lands on the next open invoice as prior-period
  adjustments naming the original invoice, which stays unchanged;
- payments (a repeat counted once) reduce the amount due: previous balance + charges − payments;
- closing survives a SIGKILL of the stage;
- the outbox relay, SIGKILLed mid-way, publishes every ledger change to invoice.events: after
  dropping repeated event ids a consumer sees each event once, in the account's commit order.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pipeline.codec import default_codec
from pipeline.records import InvoiceEvent, Payment
from pipeline.reference import BUNDLED_REFERENCE
from pipeline.runtime.kafka import read_all
from tests.batchbill import expected_bills
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

# NMI NEM1205084 (ACC-1021, monthly bills): 15-minute actuals from 30 March to 2 April 2005
SOURCE = DATA / "nem12" / "NEM12#SCENARIO505033001#ENERGEXM#NEMMCO.zip"
ACCOUNT = "ACC-1021"
MARCH = f"{ACCOUNT}|2005-03-01|AUD"
APRIL = f"{ACCOUNT}|2005-04-01|AUD"
MAY = f"{ACCOUNT}|2005-05-01|AUD"


def derived_delivery(tmp: Path, name: str, factor: str, update_days: int, shift_days: int) -> Path:
    """A later delivery derived from the real file: values × ``factor`` (3 dp), UpdateDateTime
    ``update_days`` later (a higher version supersedes), interval dates moved by ``shift_days``."""
    with zipfile.ZipFile(SOURCE) as z:
        text = z.read(z.namelist()[0]).decode()
    lines = []
    for line in io.StringIO(text).read().splitlines():
        f = line.split(",")
        if f[0] == "300":
            n = len(f) - 7
            day = datetime.strptime(f[1], "%Y%m%d") + timedelta(days=shift_days)
            values = [str((Decimal(v) * Decimal(factor)).quantize(Decimal("0.001"))) for v in f[2:2 + n]]
            upd = (datetime.strptime(f[-2], "%Y%m%d%H%M%S") + timedelta(days=update_days)).strftime("%Y%m%d%H%M%S")
            f = [f[0], day.strftime("%Y%m%d"), *values, f[2 + n], f[3 + n], f[4 + n], upd, f[-1]]
        lines.append(",".join(f))
    out = tmp / f"NEM12#{name}#ENERGEXM#NEMMCO.csv"
    out.write_text("\r\n".join(lines) + "\r\n")
    return out


def wait_for(env: Env, what: str, check: Callable[[], Any], timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        env.check_alive()
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def invoice(env: Env, invoice_id: str) -> dict:
    cols = ("status", "invoice_number", "bill_date", "due_date", "previous_balance", "charges_total",
            "payments_total", "amount_due")
    rows = env.sql(f"SELECT {', '.join(cols)} FROM invoices WHERE invoice_id = %s", (invoice_id,))
    return dict(zip(cols, rows[0], strict=True)) if rows else {}


def lines_of(env: Env, invoice_id: str) -> list[tuple]:
    return env.sql("SELECT line_id, line_kind, period_start::text, component_id, band, amount, adjusts_invoice_id, "
                   "adjusts_invoice_number FROM invoice_lines WHERE invoice_id = %s ORDER BY line_id", (invoice_id,))


def publish_payment(env: Env, payment: Payment, times: int = 1) -> None:
    producer = env.producer()
    for _ in range(times):
        producer.send(env.topics.payments, payment.account.encode(), default_codec().encode(payment))
    producer.flush()


def test_close_number_adjust_pay_and_announce(pipeline_env: Env, tmp_path: Path) -> None:
    env = pipeline_env
    env.env.update({
        "PIPELINE_IDLE_TIMEOUT_S": "3600",  # time moves only with the data in this test
        "PIPELINE_INVOICE_CLOSE_DELAY_HOURS": "1",
        "PIPELINE_INVOICE_CLOSE_CHECK_S": "1",
        "PIPELINE_RELAY_POLL_S": "0.2",
        "PIPELINE_RELAY_BATCH": "7",  # many small rounds, so a kill can land between publish and mark
    })
    correction = derived_delivery(tmp_path, "CORRECTION", "1.1", update_days=30, shift_days=0)
    next_month = derived_delivery(tmp_path, "NEXTMONTH", "1", update_days=0, shift_days=31)
    env.start_all(relay=True)

    # 1. the watermark passes 1 April + 1 h: March closes and is numbered; April stays open
    publish_files(env, [SOURCE])
    march = wait_for(env, "March finalized", lambda: invoice(env, MARCH).get("status") == "FINALIZED"
                     and invoice(env, MARCH))
    env.wait_quiet(min_wait_s=3)
    assert invoice(env, APRIL)["status"] == "OPEN"
    assert march["invoice_number"] == "INV-2005-000001"
    assert march["bill_date"] == date(2005, 4, 1) and march["due_date"] == date(2005, 4, 15)  # net 14
    assert march["previous_balance"] == 0 and march["payments_total"] == 0
    assert march["amount_due"] == march["charges_total"] > 0
    march_lines = lines_of(env, MARCH)
    assert {ln[1] for ln in march_lines} == {"CHARGE"}

    # 2. a payment, delivered three times (twice by a payment system, once more by `pipeline pay`), is
    # recorded once
    paid = Payment("PAY-0001", ACCOUNT, "AUD", Decimal("50.00"), datetime(2005, 4, 10, tzinfo=UTC), "BPAY 1234")
    publish_payment(env, paid, times=2)
    res = subprocess.run([sys.executable, "-m", "pipeline", "pay", ACCOUNT, "50.00", "--id", "PAY-0001"],
                         env=env.env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "PAY-0001" in res.stdout, res.stderr
    wait_for(env, "payment recorded", lambda: env.sql("SELECT count(*) FROM payments")[0][0] == 1)

    # 3. a superseding delivery for both months: March's differences become adjustments on April
    publish_files(env, [correction])
    wait_for(env, "adjustments", lambda: any(ln[1] == "ADJUSTMENT" for ln in lines_of(env, APRIL)))
    env.wait_quiet(min_wait_s=4)
    assert invoice(env, MARCH) == march and lines_of(env, MARCH) == march_lines  # the original never changes
    april_lines = lines_of(env, APRIL)
    adjustments = [ln for ln in april_lines if ln[1] == "ADJUSTMENT"]
    assert adjustments and {(ln[2], ln[6], ln[7]) for ln in adjustments} == {
        ("2005-03-01", MARCH, "INV-2005-000001")}  # own service period, names the original
    assert {ln[2] for ln in april_lines if ln[1] == "CHARGE"} == {"2005-04-01"}

    # 4. closing is driven by the stage and survives a crash: kill invoicing, restart, move time on
    inv = env.procs["invoicing"][-1]
    env.wait_started(inv, "invoicing")
    inv.send_signal(signal.SIGKILL)
    inv.wait(30)
    env.start("invoicing", instance="0")
    relay = env.procs["relay"][-1]
    relay.send_signal(signal.SIGKILL)  # the relay dies mid-stream too; its successor re-publishes
    relay.wait(30)
    env.start("relay", instance="0")
    publish_files(env, [next_month])
    april = wait_for(env, "April finalized", lambda: invoice(env, APRIL).get("status") == "FINALIZED"
                     and invoice(env, APRIL))
    env.wait_quiet(min_wait_s=4)
    assert invoice(env, MAY)["status"] == "OPEN"
    assert april["invoice_number"] == "INV-2005-000002"
    assert april["previous_balance"] == march["amount_due"]
    assert april["payments_total"] == Decimal("50.00")
    final_april_lines = lines_of(env, APRIL)  # + the windows the watermark released after step 3
    assert set(april_lines) < set(final_april_lines)
    assert april["charges_total"] == sum(ln[5] for ln in final_april_lines)
    assert april["amount_due"] == march["amount_due"] + april["charges_total"] - Decimal("50.00")
    env.assert_invoice_structure()

    # the ledger, by service period, equals the batch bill of everything delivered (May is still open:
    # its last hour of windows is not past the watermark yet, so only the closed months are compared)
    want = expected_bills([SOURCE, correction, next_month], BUNDLED_REFERENCE)
    got = env.ledger_totals()
    for month in (date(2005, 3, 1), date(2005, 4, 1)):
        assert got[(ACCOUNT, month.isoformat())] == {k: v for k, v in want[(ACCOUNT, month)].items() if v}
    # the supersession really moved money: March's adjustments are the difference the correction made
    est = {k: v for k, v in expected_bills([SOURCE], BUNDLED_REFERENCE)[(ACCOUNT, date(2005, 3, 1))].items()}
    assert sum(ln[5] for ln in adjustments) == sum(want[(ACCOUNT, date(2005, 3, 1))].values()) - sum(est.values())

    # `pipeline invoice show ACCOUNT PERIOD` prints the statement and names the adjusted invoice
    res = subprocess.run([sys.executable, "-m", "pipeline", "invoice", "show", ACCOUNT, "2005-04-01"], env=env.env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "INV-2005-000002" in res.stdout and "FINALIZED" in res.stdout
    assert "adjusts INV-2005-000001" in res.stdout and "service period 2005-03-01" in res.stdout
    assert f"{april['amount_due'].quantize(Decimal('0.01'))}" in res.stdout

    # `pipeline explain` on an adjustment names the invoice it corrects and the real file behind it
    res = subprocess.run([sys.executable, "-m", "pipeline", "explain", adjustments[0][0]], env=env.env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "prior-period adjustment of invoice INV-2005-000001" in res.stdout
    assert "invoice INV-2005-000002 [FINALIZED]" in res.stdout and "NEM12#CORRECTION#ENERGEXM#NEMMCO.csv" in res.stdout

    # 5. invoice.events: every ledger change exactly once after dropping repeated ids, in commit order
    wait_for(env, "outbox published", lambda: env.sql("SELECT count(*) FROM outbox WHERE sent_at IS NULL")[0][0] == 0)
    codec = default_codec()
    seen: dict[str, InvoiceEvent] = {}
    order: list[InvoiceEvent] = []
    raw = read_all(env.settings.kafka_bootstrap, env.topics.invoice_events, timeout_s=60)
    for m in raw:
        ev = codec.decode(m.value, InvoiceEvent)
        assert m.key == ev.account.encode()
        if ev.event_id in seen:
            assert seen[ev.event_id] == ev  # a re-publication is the same event
            continue
        seen[ev.event_id] = ev
        order.append(ev)
    assert len({m.partition for m in raw}) == 1  # one account → one partition
    ledger_ids = {r[0] for r in env.sql("SELECT line_id FROM invoice_lines")}
    assert {e.line_id for e in order if e.event_type == "LINE_APPENDED"} == ledger_ids
    assert sum(e.event_type == "LINE_APPENDED" for e in order) == len(ledger_ids)
    finals = [e for e in order if e.event_type == "INVOICE_FINALIZED"]
    assert [(e.invoice_id, e.invoice_number, e.amount_due) for e in finals] == [
        (MARCH, "INV-2005-000001", march["amount_due"]), (APRIL, "INV-2005-000002", april["amount_due"])]
    pays = [e for e in order if e.event_type == "PAYMENT_APPLIED"]
    assert [(e.payment_id, e.amount) for e in pays] == [("PAY-0001", Decimal("50.000000"))]
    assert [e.sequence for e in order] == sorted(e.sequence for e in order)  # account order = commit order
    assert len(order) == env.sql("SELECT count(*) FROM outbox")[0][0]
    # causal order: every line of an invoice is announced before the invoice's finalization
    pos = {e.event_id: i for i, e in enumerate(order)}
    for e in order:
        if e.event_type == "LINE_APPENDED":
            fin = f"finalized:{e.invoice_id}"
            assert fin not in pos or pos[e.event_id] < pos[fin]
