"""The usage read model over the real broker and Postgres (issue 17 part A): a real NEM12 account streamed
through ingest → windowing → rating → usage; the snapshot's usage and cost equal a computation from the file
(usage: its latest readings summed by local day; cost: the independent batch bill ``tests.batchbill``), its
projections equal the formulas applied to that daily series; a budget alerts once per crossing although
windows are revised by later readings and the stage is restarted, and again after the cost dropped below."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from collections import defaultdict
from datetime import date, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from pipeline.codec import default_codec
from pipeline.ingest.nem12 import read_nem12
from pipeline.records import MeterReading, UsageAlert
from pipeline.reference import BUNDLED_REFERENCE
from pipeline.runtime.kafka import read_all
from pipeline.usage.query import snapshot
from tests.batchbill import expected_bills, latest_readings
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

FILE = DATA / "nem12" / "NEM12#000000000000009#CNRGYMDP#NEMMCO.zip"  # NMI NEM1209162, E1, A and E reads
ACCOUNT, PERIOD = "ACC-1036", date(2005, 3, 1)
SYDNEY = ZoneInfo("Australia/Sydney")  # the account's timezone (bundled reference data)
Q6 = Decimal("0.000001")


def daily_kwh(readings: list[MeterReading]) -> dict[date, Decimal]:
    out: dict[date, Decimal] = defaultdict(Decimal)
    for r in latest_readings(readings):
        out[r.interval_start.astimezone(SYDNEY).date()] += r.value
    return dict(out)


def alerts(env: Env) -> list[UsageAlert]:
    codec = default_codec()
    return [codec.decode(m.value, UsageAlert) for m in read_all(env.settings.kafka_bootstrap, env.topics.usage_alerts,
                                                                 timeout_s=60)]


def settle(env: Env, published: int) -> None:
    env.wait_accounted(published=published)
    for topic in (env.topics.usage_windows, env.topics.charges_rated):
        env.wait_consumed("usage", topic)


def ledger_total(env: Env) -> Decimal:
    return env.sql("SELECT coalesce(sum(amount), 0) FROM invoice_lines WHERE account = %s AND period_start = %s",
                   (ACCOUNT, PERIOD))[0][0]


def publish(env: Env, readings: list[MeterReading]) -> int:
    producer, codec = env.producer(), default_codec()
    for r in readings:
        producer.send(env.topics.meter_readings, r.nmi.encode(), codec.encode(r),
                      headers=[("source_file", r.source_file.encode())])
    producer.flush()
    return len(readings)


def test_snapshot_equals_the_file_and_a_budget_alerts_once_per_crossing(pipeline_env: Env) -> None:
    env = pipeline_env
    original = read_nem12(FILE).readings
    bill = expected_bills([FILE], BUNDLED_REFERENCE)[(ACCOUNT, PERIOD)]
    cost = sum(bill.values(), Decimal(0))
    energy_cost = sum((v for k, v in bill.items() if "|energy|" in k), Decimal(0))
    assert energy_cost > Decimal("1.00")  # so that zeroing the usage takes the cost below the budget
    budget = cost - Decimal("1.00")
    res = subprocess.run([sys.executable, "-m", "pipeline", "usage", "budget", "set", ACCOUNT, str(budget)],
                         env=env.env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    env.start_all()
    env.start("usage")
    published = publish_files(env, [FILE])
    settle(env, published)

    s = snapshot(env.settings, ACCOUNT, date(2005, 3, 15))
    assert s is not None and (s.period_start, s.period_end, s.currency) == (PERIOD, date(2005, 4, 1), "AUD")
    assert s.cost == cost == ledger_total(env)
    energy = s.metric("energy_import")
    by_day = daily_kwh(original)
    first, last = min(by_day), max(by_day)
    series = [by_day.get(first + timedelta(i), Decimal(0)) for i in range((last - first).days + 1)]
    assert [(d, k) for d, k, _ in energy.daily] == [(first + timedelta(i), k) for i, k in enumerate(series)]
    assert energy.usage_kwh == sum(series, Decimal(0)).quantize(Q6)
    assert sum(energy.bands.values(), Decimal(0)) == energy.usage_kwh
    estimated = sum((r.value for r in latest_readings(original) if r.quality in "ES"), Decimal(0))
    assert energy.estimated_share == (estimated / energy.usage_kwh).quantize(Decimal("0.0001"))
    assert sum((c for _, _, c in energy.daily), Decimal(0)) == energy.cost - energy.fixed_cost
    # DAILY_AVERAGE by hand: usage so far + mean × the days left from the first day with data to period end
    n, days = len(series), (date(2005, 4, 1) - first).days
    so_far = sum(series, Decimal(0))
    assert energy.projections[0].method == "DAILY_AVERAGE"
    assert energy.projections[0].usage == (so_far + so_far / n * (days - n)).quantize(Q6)
    w = list(range(1, min(n, 7) + 1))
    recent = series[-len(w):]
    wmean = sum((Decimal(a) * b for a, b in zip(w, recent, strict=True)), Decimal(0)) / sum(w)
    assert energy.projections[1].usage == (so_far + wmean * (days - n)).quantize(Q6)
    actual = [a for a in alerts(env) if a.kind == "ACTUAL"]
    assert [(a.account, a.period_start, a.crossing, a.budget) for a in actual] == [(ACCOUNT, PERIOD, 1, budget)]
    assert actual[0].amount >= budget

    res = subprocess.run([sys.executable, "-m", "pipeline", "usage", "show", ACCOUNT, "--json"], env=env.env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and f'"cost": "{s.cost}"' in res.stdout, res.stderr
    res = subprocess.run([sys.executable, "-m", "pipeline", "usage", "show", ACCOUNT], env=env.env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and f"cost so far: {s.cost} AUD" in res.stdout, res.stderr
    assert f"projected DAILY_AVERAGE: {energy.projections[0].usage} kWh" in res.stdout

    # late data revises windows while the usage stage is down: the cost rises, no second alert
    assert env.stop(env.procs["usage"][-1], signal.SIGTERM) == 0, env.log_tail("usage")
    later = [dataclasses.replace(r, value=r.value + 1, version=r.version + timedelta(days=1), source_file="late-1")
             for r in latest_readings(original)[:10]]
    published += publish(env, later)
    env.start("usage")
    settle(env, published)
    s2 = snapshot(env.settings, ACCOUNT)
    assert s2 is not None and s2.seq > s.seq
    assert s2.cost == ledger_total(env) > cost
    assert s2.metric("energy_import").usage_kwh == (so_far + 10).quantize(Q6)
    assert [a.crossing for a in alerts(env) if a.kind == "ACTUAL"] == [1]

    # every reading superseded by 0 kWh: the cost drops below the budget (re-arms, no alert) ...
    zero = [dataclasses.replace(r, value=Decimal(0), version=r.version + timedelta(days=2), source_file="late-2")
            for r in latest_readings(original)]
    published += publish(env, zero)
    settle(env, published)
    s3 = snapshot(env.settings, ACCOUNT)
    assert s3 is not None and s3.cost == ledger_total(env) < budget
    assert s3.metric("energy_import").usage_kwh == 0
    # ... and restored after a restart: a second crossing, alerted once
    assert env.stop(env.procs["usage"][-1], signal.SIGTERM) == 0, env.log_tail("usage")
    env.start("usage")
    back = [dataclasses.replace(r, version=r.version + timedelta(days=3), source_file="late-3")
            for r in latest_readings(original)]
    published += publish(env, back)
    settle(env, published)
    s4 = snapshot(env.settings, ACCOUNT)
    assert s4 is not None and s4.cost == ledger_total(env) == cost
    assert s4.metric("energy_import").usage_kwh == so_far.quantize(Q6)
    got = alerts(env)
    assert [a.crossing for a in got if a.kind == "ACTUAL"] == [1, 2]
    assert len({a.alert_id for a in got}) == len(got)  # no alert published twice
    for kind in ("ACTUAL", "PROJECTED"):
        assert [a.crossing for a in got if a.kind == kind] == list(range(1, 1 + sum(a.kind == kind for a in got)))


def test_an_older_snapshot_never_overwrites_a_newer_one(pipeline_env: Env) -> None:
    from pipeline.runtime import postgres
    from pipeline.usage.model import new_period, snapshots
    from pipeline.usage.store import upsert_snapshots

    env = pipeline_env
    ps = new_period(ACCOUNT, PERIOD, date(2005, 4, 1))
    ps["metrics"]["energy_import"] = {"days": {"2005-03-10": "5"}, "estimated": "0"}
    older = snapshots(ps)[0]
    ps["metrics"]["energy_import"]["days"]["2005-03-11"] = "7"
    newer = snapshots(ps)[0]
    with postgres.connect(env.settings.database_url) as conn:
        assert upsert_snapshots(conn, [(2, newer)]) == 1
        assert upsert_snapshots(conn, [(1, older)]) == 0  # a replayed older snapshot: nothing written
        assert upsert_snapshots(conn, [(2, newer)]) == 1  # the same one again (a redone batch): rewritten
    got = snapshot(env.settings, ACCOUNT, date(2005, 3, 31))
    assert got is not None and got.seq == 2 and got.metric("energy_import").usage_kwh == Decimal("12.000000")
    assert snapshot(env.settings, ACCOUNT, date(2005, 4, 1)) is None
