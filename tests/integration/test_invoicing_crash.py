"""The invoicing sink under failure (SPEC §5, invariant 2): the stage and the outbox relay SIGKILLed at
random points while real data and payments flow, and PostgreSQL itself restarted mid-stream.
Afterwards every line and payment exists exactly once, the ledger equals the independent batch
computation, the invoices keep their invariants, and invoice.events carries every change once."""

from __future__ import annotations

import random
import signal
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from pipeline import stack
from pipeline.codec import default_codec
from pipeline.records import Payment
from pipeline.reference import BUNDLED_REFERENCE
from tests.batchbill import expected_bills
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

FILES = sorted((DATA / "nem12").glob("*.zip"))[20:40]


def test_invoicing_survives_sigkill_and_a_postgres_restart(pipeline_env: Env, base_settings) -> None:
    env = pipeline_env
    env.env["PIPELINE_IDLE_TIMEOUT_S"] = "8"
    env.env["PIPELINE_INVOICE_IDLE_CLOSE_S"] = "8"  # 2005 data: an account quiet for 8 s has its invoices closed
    env.env["PIPELINE_INVOICE_CLOSE_CHECK_S"] = "1"
    env.start_all(relay=True)
    done = threading.Event()
    codec = default_codec()

    def publish() -> None:
        for i, f in enumerate(FILES):
            publish_files(env, [f])
            producer = env.producer()
            for account in (f"ACC-{1001 + i % 7}", f"ACC-{1010 + i % 5}"):  # repeats of an id count once
                pay = Payment(f"PAY-{i % 12:03d}-{account}", account, "AUD", Decimal("12.34"),
                              datetime(2005, 4, 1, tzinfo=UTC))
                producer.send(env.topics.payments, account.encode(), codec.encode(pay))
            producer.flush()
            time.sleep(0.8)
        done.set()

    publisher = threading.Thread(target=publish)
    publisher.start()
    # the database goes away under a running, assigned invoicing stage while lines flow
    env.wait_started(env.procs["invoicing"][-1], "invoicing")
    time.sleep(5)
    stack.stop_postgres(base_settings)
    time.sleep(4)
    stack.start_postgres(base_settings)
    rng = random.Random(11)
    kills = 0
    while not done.is_set() or kills < 3:
        time.sleep(rng.uniform(1.0, 2.5))
        victim = "relay" if kills % 3 == 2 else "invoicing"
        env.stop(env.procs[victim][-1], signal.SIGKILL)
        kills += 1
        env.start(victim)
    publisher.join()
    assert kills >= 3
    env.wait_accounted()
    want = {(a, p.isoformat()): {k: v for k, v in lines.items() if v}
            for (a, p), lines in expected_bills(FILES, BUNDLED_REFERENCE).items()}
    assert env.ledger_totals() == want
    assert env.sql("SELECT count(*) - count(DISTINCT line_id) FROM invoice_lines")[0][0] == 0
    assert "database unavailable" in env.log_tail("invoicing", 500_000)  # the outage was really met
    payments = env.sql("SELECT payment_id FROM payments")
    assert len(payments) == len({(f"PAY-{i % 12:03d}", 1001 + i % 7) for i in range(len(FILES))}) + len(
        {(f"PAY-{i % 12:03d}", 1010 + i % 5) for i in range(len(FILES))})
    env.wait_all_finalized()  # every account went quiet past its close times: every period has closed
    env.assert_invoice_structure()
    events = env.assert_invoice_events()
    assert sum(e.event_type == "PAYMENT_APPLIED" for e in events) == len(payments)
