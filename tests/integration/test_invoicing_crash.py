"""The invoicing sink under failure (SPEC §5, invariant 2): SIGKILLed at random points while real data
flows, and PostgreSQL itself restarted mid-stream. Afterwards every line exists exactly once and the
ledger equals the independent batch computation."""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

from pipeline import stack
from pipeline.reference import BUNDLED_REFERENCE
from tests.batchbill import expected_bills
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

FILES = sorted((DATA / "nem12").glob("*.zip"))[20:40]


def test_invoicing_survives_sigkill_and_a_postgres_restart(pipeline_env: Env, base_settings) -> None:
    env = pipeline_env
    env.env["PIPELINE_ALLOWED_LATENESS_DAYS"] = "20000"  # 2005 data: nothing may become too late here
    env.env["PIPELINE_IDLE_TIMEOUT_S"] = "8"
    env.start_all()
    done = threading.Event()

    def publish() -> None:
        for f in FILES:
            publish_files(env, [f])
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
        env.stop(env.procs["invoicing"][-1], signal.SIGKILL)
        kills += 1
        env.start("invoicing")
    publisher.join()
    assert kills >= 3
    env.wait_quiet(min_wait_s=20, quiet_s=8)
    want = {(a, p.isoformat()): {k: v for k, v in lines.items() if v}
            for (a, p), lines in expected_bills(FILES, BUNDLED_REFERENCE).items()}
    assert env.ledger_totals() == want
    assert env.sql("SELECT count(*) - count(DISTINCT line_id) FROM invoice_lines")[0][0] == 0
    assert "database unavailable" in env.log_tail("invoicing", 500_000)  # the outage was really met
