"""A real published tariff applied to a real NEM12 file, checked against a hand computation.

Tariff: ActewAGL Retail, "ACT electricity prices – Schedule of charges from 1 July 2021"
(AAR2079-01-07-21), Home Time-of-use, GST-exclusive: peak 34.03 c/kWh (7–9am, 5–8pm), shoulder
23.62 c/kWh (9am–5pm, 8–10pm), off-peak 19.95 c/kWh (other times), supply 93.75 c/day; times in
AEST; GST 10 % on energy and supply. (Bundled as pipeline/data/reference.json, with its source.)

Data: NEM12#SCENARIO4#UNITEDDP#NEMMCO (NMI NEM1314069, E1, 30-minute, 2005-04-01..04), read here
from the raw CSV text with nothing from the pipeline's parser, windowing or rating.
"""

from __future__ import annotations

import zipfile
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from tests.unit.test_flow_inmemory import run_chain

FILE = Path(__file__).resolve().parent.parent / "data" / "nem12" / "NEM12#SCENARIO4#UNITEDDP#NEMMCO.zip"
RATES = {"peak": Decimal("0.3403"), "shoulder": Decimal("0.2362"), "off_peak": Decimal("0.1995")}


def band(minute_of_day_aest: int) -> str:
    h = minute_of_day_aest / 60
    if 7 <= h < 9 or 17 <= h < 20:
        return "peak"
    if 9 <= h < 17 or 20 <= h < 22:
        return "shoulder"
    return "off_peak"


def hand_bill() -> dict[str, Decimal]:
    with zipfile.ZipFile(FILE) as z:
        text = z.read(z.namelist()[0]).decode()
    kwh = {b: Decimal(0) for b in RATES}
    interval = None
    for line in text.splitlines():
        f = line.split(",")
        if f[0] == "200":
            interval = int(f[8])
        elif f[0] == "300":
            for i, v in enumerate(f[2:2 + 1440 // interval]):
                kwh[band(i * interval)] += Decimal(v)
    cents = Decimal("0.01")
    bill = {f"ACTEWAGL-HOME-TOU|energy|{b}": (q * RATES[b]).quantize(cents, ROUND_HALF_UP) for b, q in kwh.items()}
    # service from 2005-04-01 (move-in), April has 30 days
    bill["ACTEWAGL-HOME-TOU|supply|"] = (30 * Decimal("0.9375")).quantize(cents, ROUND_HALF_UP)
    bill["ACTEWAGL-HOME-TOU|gst|"] = (sum(bill.values()) / 10).quantize(cents, ROUND_HALF_UP)
    return bill


def test_real_tariff_on_real_file_matches_hand_computation_to_the_cent() -> None:
    expected = hand_bill()
    assert expected["ACTEWAGL-HOME-TOU|supply|"] == Decimal("28.13")  # 28.125 half-up
    got = run_chain([FILE])
    assert list(got) == [("ACC-1048", "2005-04-01")]
    assert {k: v for k, v in got[("ACC-1048", "2005-04-01")].items()} == expected
