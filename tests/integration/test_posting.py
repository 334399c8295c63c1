"""Rating's posting policy over the real broker and real Postgres (issue 13, pipeline/rating/posting.py): with
changes held for weekly postings, the real NEM12 files still bill to the cent — the same totals per (account,
period, component) as the independent batch computation — with fewer ledger lines, each explaining its posting;
a SIGKILL of rating while changes are pending (held in its transactional state) loses and doubles nothing."""

from __future__ import annotations

import signal
import time

import pytest

from pipeline.ingest.nem12 import read_nem12
from tests.integration.conftest import Env, publish_files
from tests.integration.test_nem12_to_ledger import FILES, _assert_ledger_matches

pytestmark = pytest.mark.integration

REASONS = {"boundary", "period_end", "idle", "rerate"}


def test_held_changes_bill_to_the_cent_across_a_rating_kill(pipeline_env: Env) -> None:
    env = pipeline_env
    env.env.update({"PIPELINE_POSTING_INTERVAL_DAYS": "7", "PIPELINE_POSTING_IDLE_S": "3",
                    "PIPELINE_INVOICE_IDLE_CLOSE_S": "8"})
    env.start_all()
    half = len(FILES) // 2
    published = publish_files(env, FILES[:half])
    # rating holds some of what it rated: kill it without warning once it has committed some of its input
    deadline = time.monotonic() + 120
    while not env.sql("SELECT count(*) FROM invoice_lines")[0][0]:
        env.check_alive()
        assert time.monotonic() < deadline, env.log_tail("rating")
        time.sleep(0.2)
    rating = env.procs["rating"][0]
    rating.send_signal(signal.SIGKILL)
    rating.wait(30)
    env.procs["rating"].remove(rating)
    published += publish_files(env, FILES[half:])
    env.start("rating")
    assert published == sum(len(read_nem12(f).readings) for f in FILES)
    report = env.wait_accounted(published=published)
    assert (report.billed, report.dead_lettered, report.refused) == (published, 0, {})
    _assert_ledger_matches(env, FILES)

    lines = env.sql("SELECT account, period_start::text, line_kind, explanation FROM invoice_lines")
    assert lines
    usage = [(a, p, x) for a, p, kind, x in lines if "posting" in x]
    assert usage and {x["posting"]["reason"] for _a, _p, x in usage} <= REASONS
    for _a, _p, x in usage:
        posting = x["posting"]
        assert len(x.get("windows", [])) <= posting["windows_listed"] <= min(posting["windows_total"], 48)
        if posting["windows_total"] > posting["windows_listed"]:  # the rest summarised per local day
            assert sum(d["windows"] for d in posting["days"]) == posting["windows_total"]
    # each posting names its own cause (line ids hash it): no two postings of a period share one
    causes = [(a, p, x["cause"], x["component"], x["band"]) for a, p, x in usage]
    assert len(causes) == len(set(causes))
