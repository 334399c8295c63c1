"""Timing does not change the bill (issue 11, SPEC §6 invariant 1), over the real broker and Postgres.

The same set of real NEM12 and NEM13 files is published under each timing scenario below, while a CPU
hog keeps both cores busy: stages started long before the data, a publisher that pauses, windowing
and rating stopped mid-stream and restarted, the newest files first, every file twice (in reverse
order the second time). Every scenario pauses for three times the idle timeout somewhere, so quiet
windows are emitted early and invoices close before all of their data arrived (a short invoice idle
close): later data must still be billed, as LATE revisions and prior-period adjustments.

Each scenario must end with every reading accounted for (``pipeline reconcile``: billed, with nothing
refused or dead-lettered) and a ledger that, summed per (account, service period, line), equals the
independent batch bill of all the data to the cent.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from pipeline.codec import default_codec
from pipeline.ingest.gateway import publish_nem13
from pipeline.reference import BUNDLED_REFERENCE
from pipeline.runtime.kafka import end_offsets
from tests.batchbill import expected_bills, expected_nem13_bills
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

IDLE_S = 4  # the env's PIPELINE_IDLE_TIMEOUT_S
PAUSE_S = 3 * IDLE_S
NEM12 = [DATA / "nem12" / name for name in (
    "nem12#S06#INTEGM#NEMMCO.zip", "nem12#S07#INTEGM#NEMMCO.zip",  # one meter, S07 supersedes S06
    "NEM12#06110_05021206#WBAYM#NEMMCO.zip", "NEM12#07130_05021202#WBAYM#NEMMCO.zip",  # the same again
    "NEM12#mdffl0000000001#ACTEWM#NEMMCO.zip", "NEM12#000000000000001#CNRGYMDP#NEMMCO.zip",
    "NEM12#000000000000002#CNRGYMDP#NEMMCO.zip", "NEM12#SCENARIO505033001#ENERGEXM#NEMMCO.zip",
    "NEM12#000000000000006#CNRGYMDP#NEMMCO.zip", "NEM12#000000000000007#CNRGYMDP#NEMMCO.zip",
)]
NEM13 = sorted(f for f in (DATA / "nem13").glob("*.zip") if "000000000000011" not in f.name)  # 011 is refused whole
SCENARIOS = ["stages_started_early", "publisher_paused", "windowing_and_rating_restarted", "newest_first",
             "every_file_twice_reversed"]


def batch_bill() -> dict[tuple[str, str], dict[str, object]]:
    bills = {**expected_bills(NEM12, BUNDLED_REFERENCE), **expected_nem13_bills(NEM13, BUNDLED_REFERENCE)}
    assert len(bills) == len(expected_bills(NEM12, BUNDLED_REFERENCE)) + len(expected_nem13_bills(NEM13,
                                                                                                     BUNDLED_REFERENCE))
    return {(a, p.isoformat()): {k: v for k, v in lines.items() if v != 0} for (a, p), lines in bills.items()}


def by_event_time(files: list[Path]) -> list[Path]:
    """Oldest first, as the gateway would send them (the first interval of each file)."""
    from pipeline.ingest.nem12 import read_nem12
    from pipeline.ingest.nem13 import read_nem13

    def first(f: Path):  # type: ignore[no-untyped-def]
        reader = read_nem13 if f.name.upper().startswith("NEM13") else read_nem12
        return min(r.interval_start for r in reader(f).readings)

    return sorted(files, key=first)


def publish(env: Env, files: list[Path]) -> int:
    """Publish ``files`` one by one, in the order given (the gateway sorts the files of one call)."""
    n = 0
    for f in files:
        if f.name.upper().startswith("NEM13"):
            report = publish_nem13([f], env.producer(), default_codec(), env.topics.meter_readings, progress=False)
            assert not report.rejected, report.rejected
            n += report.readings_published
        else:
            n += publish_files(env, [f])
    return n


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_reading_is_billed_whatever_the_timing(pipeline_env: Env, cpu_hog: list, scenario: str) -> None:
    env = pipeline_env
    env.env["PIPELINE_INVOICE_IDLE_CLOSE_S"] = str(IDLE_S)  # invoices close while data is still on its way
    files = by_event_time(NEM12 + NEM13)
    half = len(files) // 2
    env.start_all()
    if scenario == "stages_started_early":
        for stage in ("ingest", "windowing", "rating", "invoicing"):
            env.wait_started(env.procs[stage][-1], stage, timeout=120)
        time.sleep(PAUSE_S)
        published = publish(env, files)
    elif scenario == "publisher_paused":
        published = publish(env, files[:half])
        time.sleep(PAUSE_S)
        published += publish(env, files[half:])
    elif scenario == "windowing_and_rating_restarted":
        published = publish(env, files[:half])
        for stage in ("windowing", "rating"):
            assert env.stop(env.procs[stage][-1], signal.SIGTERM, timeout=120) == 0, env.log_tail(stage)
        published += publish(env, files[half:])
        time.sleep(PAUSE_S)
        for stage in ("windowing", "rating"):
            env.start(stage)
    elif scenario == "newest_first":
        published = publish(env, files[::-1][:half])
        time.sleep(PAUSE_S)
        published += publish(env, files[::-1][half:])
    else:  # every_file_twice_reversed
        published = publish(env, files)
        time.sleep(PAUSE_S)
        published += publish(env, files[::-1])

    report = env.wait_accounted(timeout_s=600, published=published)
    assert (report.inputs, report.billed, report.dead_lettered, report.refused) == (published, published, 0, {})
    got = env.ledger_totals()
    want = batch_bill()
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for key in sorted(want):
        assert got[key] == want[key], key
    # nothing went to usage.late or the dead-letter topic: no rule refused anything here
    tps = [(t, p) for t in (env.topics.usage_late, env.topics.dlq_ingest) for p in range(3)]
    assert end_offsets(env.settings.kafka_bootstrap, tps) == dict.fromkeys(tps, 0)
    assert env.sql("SELECT count(*) - count(DISTINCT line_id) FROM invoice_lines")[0][0] == 0
    env.assert_invoice_structure()
