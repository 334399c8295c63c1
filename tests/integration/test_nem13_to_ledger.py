"""NEM13 accumulation reads end to end over the real broker and real Postgres: the real NEM13 files go
through `pipeline publish nem13`, the four stages and the ledger; every account's billed kWh equal its
register advances in the files, one account's bill is checked line by line to the cent, and the lines
say the kWh were spread from register reads.

The expectations are computed from the CSV text (``tests.batchbill``), independently of
``pipeline.ingest.nem13``. The sample spans 2004-02-12 .. 2005-06-18 (492 days), in whatever order the
ingest partitions interleave: nothing is ever too late to bill.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, timedelta
from decimal import Decimal

import pytest

from pipeline.reference import BUNDLED_REFERENCE
from pipeline.runtime.kafka import end_offsets
from tests.batchbill import advance, cents, monthly_kwh, register_reads, yyyymmdd
from tests.integration.conftest import DATA, Env

pytestmark = pytest.mark.integration

FOLDER = DATA / "nem13"
INCONSISTENT = "NEM13#000000000000011#CNRGYMDP#NEMMCO.zip"  # says Quantity 31, registers advanced 172
ENERGY, SUPPLY, FEED_IN = Decimal("0.255379"), Decimal("0.9375"), Decimal("0.0750")  # ACTEWAGL-HOME, $ excl. GST
BOOK = "ACTEWAGL-HOME"


def final_lines(env: Env, accounts: list[str]) -> dict[tuple[str, date, str], tuple[Decimal, Decimal, Decimal]]:
    """(account, period start, component) → (period quantity, period total, sum of amounts) as the ledger
    has them now: quantity and total from the latest line (highest offset of its account's partition)."""
    sums = {(a, p, c): s for a, p, c, s in env.sql(
        "SELECT account, period_start, component_id, sum(amount) FROM invoice_lines WHERE account = ANY(%s) "
        "GROUP BY 1, 2, 3", (accounts,))}
    return {(a, p, c): (q, t, sums[(a, p, c)]) for a, p, c, q, t in env.sql(
        "SELECT DISTINCT ON (account, period_start, component_id) account, period_start, component_id, quantity, "
        "period_total FROM invoice_lines WHERE account = ANY(%s) "
        "ORDER BY account, period_start, component_id, source_offset DESC", (accounts,))}


def test_real_nem13_files_bill_the_register_advances_to_the_cent(pipeline_env: Env) -> None:
    env = pipeline_env
    env.start_all()
    files = sorted(FOLDER.glob("*.zip"))
    accepted = [f for f in files if f.name != INCONSISTENT]
    assert len(files) == 8 and len(accepted) == 7

    res = subprocess.run([sys.executable, "-m", "pipeline", "publish", "nem13", "--no-progress", str(FOLDER)],
                         env=env.env, capture_output=True, text=True, timeout=120)
    days = sum(max((yyyymmdd(f[14]) - yyyymmdd(f[9])).days, 1) for p in accepted for f in register_reads(p))
    assert res.returncode == 1, (res.stdout, res.stderr)  # one file rejected, the rest published
    assert f"published {days} readings from 7 files" in res.stdout, res.stdout
    assert f"rejected [QUANTITY_MISMATCH] {INCONSISTENT}!" in res.stderr, res.stderr
    assert "says Quantity 31 KWH but the register advanced 172 (38841 -> 39013)" in res.stderr

    report = env.wait_accounted(published=days)
    assert (report.billed, report.dead_lettered, report.refused) == (days, 0, {})
    tps = [(t, p) for t in (env.topics.usage_late, env.topics.dlq_ingest) for p in range(3)]
    assert end_offsets(env.settings.kafka_bootstrap, tps) == dict.fromkeys(tps, 0)  # nothing late, nothing refused

    ref = json.loads(BUNDLED_REFERENCE.read_text())
    account_of = {sp["nmi"]: sp["account"] for sp in ref["service_points"]}
    expected = monthly_kwh(accepted)
    accounts = sorted({account_of[nmi] for nmi, _ in expected})
    got = final_lines(env, accounts)
    assert {b for (b,) in env.sql("SELECT DISTINCT price_book_id FROM invoice_lines")} == {BOOK}

    # every account: the kWh billed per month are the register advances spread over the read days; in total
    # exactly what its registers advanced (current − previous read, summed over its 250 records)
    for (nmi, direction), months in expected.items():
        account = account_of[nmi]
        component, rate = ("energy", ENERGY) if direction == "E" else ("feed_in", FEED_IN)
        billed = {p: q for (a, p, c), (q, _t, _s) in got.items() if a == account and c == component}
        assert billed == months, (nmi, billed, months)
        registers = sum(advance(f) for path in accepted for f in register_reads(path) if f[1] == nmi)
        assert sum(billed.values()) == registers, nmi
        for period, qty in months.items():
            _q, total, amount = got[(account, period, component)]
            sign = 1 if component == "energy" else -1
            assert total == amount == sign * cents(qty * rate), (nmi, period)

    # one account line by line: NEM1315082 (two registers, 41 and 11) = ACC-1049, from 2004-04-15
    account, start = "ACC-1049", date(2004, 4, 15)
    assert account_of["NEM1315082"] == account
    months = expected[("NEM1315082", "E")]
    assert sum(months.values()) == (6858 - 6427) + (38972 - 38969) + (7462 - 6858) + (38973 - 38972) == 1039
    want = {}
    for period, qty in months.items():
        end = (period + timedelta(days=32)).replace(day=1)
        energy, supply = cents(qty * ENERGY), cents((end - max(period, start)).days * SUPPLY)
        want[(account, period.isoformat())] = {f"{BOOK}|energy|": energy, f"{BOOK}|supply|": supply,
                                               f"{BOOK}|gst|": cents((energy + supply) * Decimal("0.10"))}
    assert {k: v for k, v in env.ledger_totals().items() if k[0] == account} == want

    # why is this on the bill: the energy line names the NEM13 register read it was spread from
    line_id, = env.sql("SELECT line_id FROM invoice_lines WHERE account = %s AND component_id = 'energy' "
                       "AND period_start = '2004-07-01' ORDER BY source_offset DESC LIMIT 1", (account,))[0]
    out = subprocess.run([sys.executable, "-m", "pipeline", "explain", line_id], env=env.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{BOOK} v1" in out.stdout and "quality flags: E" in out.stdout, out.stdout
    assert ("from NEM13 accumulation 06858->07462 = 604 kWh spread evenly over 102 days: "
            "NEM13#000000000000015#CNRGYMDP#NEMMCO.zip!NEM13#000000000000015#CNRGYMDP#NEMMCO.csv#4") in out.stdout
    assert env.stop_all() == {s: [0] for s in ("ingest", "windowing", "rating", "invoicing")}


# issue 14: after the real file's estimated read 06858 -> 07462 (E62, 2004-09-19), the actual read on 2004-10-20
# finds register 41 at 07452; the MDP sends it with Quantity -10: a correction, billed as a credit
CORRECTION = ("250,NEM1315082,1141,1,41,41,15082,E,07462,20040919000000,E62,,,07452,20041020093000,A,,,-10,KWH,"
              "20050519,20041021103616,")


def test_a_real_nem13_register_correction_is_credited_over_its_read_period(pipeline_env: Env, tmp_path) -> None:
    """The real NEM13 file of NEM1315082 with a correction read added (register down 10 kWh, Quantity −10)
    through the gateway, the four stages and the ledger: nothing dead-lettered, the account's energy over
    all periods is its registers' net advance (1,039 − 10 kWh), and the credit is spread over the correction's
    own read period (2004-09-19 .. 10-20: 31 days, 12 in September and 19 in October), to the cent at the
    flat rate. Expectations from the CSV text (``tests.batchbill``), independently of the reader."""
    import zipfile

    env = pipeline_env
    env.start_all()
    with zipfile.ZipFile(FOLDER / "NEM13#000000000000015#CNRGYMDP#NEMMCO.zip") as zf:
        (member,) = zf.namelist()
        lines = zf.read(member).decode("ascii").splitlines()
    lines.insert(len(lines) - 1, CORRECTION)  # before the 900 end record
    edited = tmp_path / member
    edited.write_text("\r\n".join(lines) + "\r\n", encoding="ascii")
    reads = [ln.split(",") for ln in lines if ln.startswith("250,")]
    days = sum(max((yyyymmdd(f[14]) - yyyymmdd(f[9])).days, 1) for f in reads)

    res = subprocess.run([sys.executable, "-m", "pipeline", "publish", "nem13", "--no-progress", str(edited)],
                         env=env.env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert f"published {days} readings from 1 files" in res.stdout, res.stdout
    report = env.wait_accounted(published=days)
    assert (report.billed, report.dead_lettered, report.refused) == (days, 0, {})

    got = final_lines(env, ["ACC-1049"])
    energy = {p: q for (_a, p, c), (q, _t, _s) in got.items() if c == "energy"}
    assert sum(energy.values()) == 1039 - 10
    # the correction alone in September: 12 days × -0.322580; October: 18 × -0.322580 - 0.322600 (the remainder)
    sept, octo = Decimal("-0.322580") * 12, Decimal("-0.322580") * 18 + Decimal("-0.322600")
    assert sept + octo == -10
    expected = dict(monthly_kwh([FOLDER / "NEM13#000000000000015#CNRGYMDP#NEMMCO.zip"])[("NEM1315082", "E")])
    expected[date(2004, 9, 1)] += sept  # the file ends with the estimate: October has only the credit
    expected[date(2004, 10, 1)] = octo
    assert energy == expected
    for period in (date(2004, 9, 1), date(2004, 10, 1)):
        _q, total, amount = got[("ACC-1049", period, "energy")]
        assert total == amount == cents(energy[period] * ENERGY), period
    assert env.stop_all() == {s: [0] for s in ("ingest", "windowing", "rating", "invoicing")}
