"""Demand across channels on the real broker and real Postgres (issue 14): a meter with a general (E1) and a
second (E2) import channel bills the same demand whichever channel reaches rating first, and that demand is
the peak of the meter's total import per interval, computed here by hand from the CSV text.

Real data: ``NEM12#000000000000001#CNRGYMDP#NEMMCO.zip``, NMI NEM1201002 (account ACC-1002), 2005-03-15 ..
2005-03-18 AEST, 30-minute E1 and E2 channels, all actual reads. The account is put on a demand tariff for the
test. One channel's readings (and its completion marker) are published and billed before the other's is
published, in both orders. An all-estimated file of another account checks the invoice's estimate marker.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from pipeline.codec import default_codec
from pipeline.ingest.gateway import completion_markers
from pipeline.ingest.nem12 import read_nem12
from pipeline.rating.pricebook import PriceBook
from pipeline.reference import BUNDLED_REFERENCE, PlanAssignment, ReferenceFile
from pipeline.refstore import load_reference_file
from pipeline.runtime import postgres
from tests.integration.conftest import DATA, Env

pytestmark = pytest.mark.integration

FILE = DATA / "nem12" / "NEM12#000000000000001#CNRGYMDP#NEMMCO.zip"
ESTIMATED = DATA / "nem12" / "NEM12#000000000000004#CNRGYMDP#NEMMCO.zip"  # NEM1204062 (ACC-1018): E and F reads
ACCOUNT, NMI = "ACC-1002", "NEM1201002"
DEMAND_RATE, ENERGY_RATE = Decimal("10.5000"), Decimal("0.1000")
BOOK = PriceBook.model_validate({
    "id": "TEST-DEMAND", "version": 1, "name": "flat energy + 30-minute demand (test)", "currency": "AUD",
    "timezone": "Etc/GMT-10", "holiday_region": None, "effective_from": "2004-01-01",
    "components": [
        {"id": "energy", "kind": "per_unit", "metric": "energy_import", "rate": str(ENERGY_RATE)},
        {"id": "demand", "kind": "demand", "metric": "energy_import", "rate": str(DEMAND_RATE),
         "interval_minutes": 30},
    ],
})


def cents(x: Decimal) -> Decimal:
    return x.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def by_hand() -> tuple[Decimal, dict[str, Decimal]]:
    """From the CSV text, independently of the reader: kWh per (day, interval) summed over E1 and E2; the
    total-import peak in kW (kWh ÷ 0.5 h), and each channel's own peak (what the old code could bill)."""
    with zipfile.ZipFile(FILE) as zf:
        (member,) = zf.namelist()
        text = zf.read(member).decode("ascii")
    total: dict[tuple[str, int], Decimal] = defaultdict(Decimal)
    own: dict[str, Decimal] = defaultdict(Decimal)
    suffix = ""
    for line in text.splitlines():
        f = line.split(",")
        if f[0] == "200":
            suffix = f[4]
        elif f[0] == "300":
            for i, v in enumerate(f[2:50]):
                total[(f[1], i)] += Decimal(v)
                own[suffix] = max(own[suffix], Decimal(v) * 2)
    return max(total.values()) * 2, dict(own)


def test_the_hand_computed_peak() -> None:
    peak, own = by_hand()
    # 2005-03-15 11:30-12:00 AEST: E1 602.400 + E2 489.450 = 1,091.850 kWh in half an hour
    assert peak == Decimal("2183.700")
    assert own == {"E1": Decimal("1204.800"), "E2": Decimal("978.900")}  # each channel alone: both wrong


def publish(env: Env, readings: list, name: str) -> int:
    producer, codec = env.producer(), default_codec()
    headers = [("source_file", name.encode())]
    for r in readings:
        producer.send(env.topics.meter_readings, r.nmi.encode(), codec.encode(r), headers=headers)
    for marker in completion_markers(name, readings):
        producer.send(env.topics.meter_readings, marker.nmi.encode(), codec.encode(marker), headers=headers)
    producer.flush()
    return len(readings)


@pytest.mark.parametrize("first", ["E1", "E2"])
def test_demand_is_the_total_import_peak_whichever_channel_arrives_first(pipeline_env: Env, first: str) -> None:
    env = pipeline_env
    ref = ReferenceFile.read(BUNDLED_REFERENCE)
    demand_plan = ReferenceFile(
        accounts=tuple(a for a in ref.accounts if a.account == ACCOUNT),
        service_points=tuple(sp for sp in ref.service_points if sp.account == ACCOUNT),
        price_books=(BOOK,),
        plan_assignments=(PlanAssignment(account=ACCOUNT, price_book_id=BOOK.id,
                                         effective_from=next(p.effective_from for p in ref.plan_assignments
                                                             if p.account == ACCOUNT)),),
    )
    postgres.with_reconnect(env.settings.database_url, lambda c: load_reference_file(c, demand_plan))
    env.start_all()

    readings = read_nem12(FILE).readings
    assert {r.suffix for r in readings} == {"E1", "E2"} and {r.nmi for r in readings} == {NMI}
    second = "E2" if first == "E1" else "E1"
    estimated = read_nem12(ESTIMATED).readings
    n = publish(env, estimated, ESTIMATED.name)
    n += publish(env, [r for r in readings if r.suffix == first], FILE.name)
    report = env.wait_accounted(published=n)  # the first channel is billed before the second is published
    assert (report.billed, report.dead_lettered, report.refused) == (n, 0, {})
    demand_before = env.sql("SELECT sum(amount) FROM invoice_lines WHERE account = %s AND component_id = 'demand'",
                            (ACCOUNT,))[0][0]
    own = by_hand()[1][first]
    assert demand_before == cents(own * DEMAND_RATE)  # so far only the first channel is known
    n += publish(env, [r for r in readings if r.suffix == second], FILE.name)
    report = env.wait_accounted(published=n)
    assert (report.billed, report.dead_lettered, report.refused) == (n, 0, {})

    peak, _own = by_hand()
    totals = env.ledger_totals()[(ACCOUNT, "2005-03-01")]
    energy = sum((r.value for r in readings), Decimal(0))
    assert totals == {"TEST-DEMAND|demand|": cents(peak * DEMAND_RATE),  # 2,183.7 kW × 10.50 = 22,928.85
                      "TEST-DEMAND|energy|": cents(energy * ENERGY_RATE)}
    assert totals["TEST-DEMAND|demand|"] == Decimal("22928.85")
    (quantity, explanation), = env.sql(
        "SELECT quantity, explanation FROM invoice_lines WHERE account = %s AND component_id = 'demand' "
        "ORDER BY source_offset DESC LIMIT 1", (ACCOUNT,))
    assert quantity == peak
    assert explanation["quality_flags"] == ["A"] and explanation["unit"] == "kW"

    # the bill: the all-actual account has no estimate marker; the estimated one has it on its energy lines
    out = subprocess.run([sys.executable, "-m", "pipeline", "invoice", "show", ACCOUNT], env=env.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "demand" in out.stdout and "22928.85 AUD" in out.stdout and "*" not in out.stdout, out.stdout
    out = subprocess.run([sys.executable, "-m", "pipeline", "invoice", "show", "ACC-1018"], env=env.env,
                         capture_output=True, text=True, timeout=60)
    energy_rows = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("energy (")]
    other_rows = [ln for ln in out.stdout.splitlines() if ln.strip().startswith(("supply", "gst"))]
    assert energy_rows and all(" *" in ln for ln in energy_rows), out.stdout
    assert other_rows and not any("*" in ln for ln in other_rows), out.stdout
    assert "* includes estimated or substituted meter reads (quality E, S or F)" in out.stdout
    assert env.stop_all() == {s: [0] for s in ("ingest", "windowing", "rating", "invoicing")}


def test_data_file_is_the_real_one() -> None:
    assert FILE.exists() and Path(ESTIMATED).exists()
