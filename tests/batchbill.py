"""An independent batch computation of the bills the pipeline must produce, for tests.

Deliberately written without the pipeline's windowing, rating or ledger code: it reads the NEM12
readings, keeps the highest version of each interval, and prices calendar months directly from the
reference JSON (interval kWh per TOU band × rate, service days × supply charge, export × feed-in,
GST on energy + supply), each line rounded half-up to cents.
"""

from __future__ import annotations

import calendar
import json
from collections import defaultdict
from datetime import date, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from pipeline.ingest.nem12 import read_nem12
from pipeline.records import MeterReading

CENT = Decimal("0.01")
NEM = timezone(timedelta(hours=10))


def cents(x: Decimal) -> Decimal:
    return x.quantize(CENT, rounding=ROUND_HALF_UP)


def latest_readings(readings: list[MeterReading]) -> list[MeterReading]:
    """Highest version per (NMI, suffix, interval start); the first one wins a tie."""
    best: dict[tuple, MeterReading] = {}
    for r in readings:
        k = (r.nmi, r.suffix, r.interval_start)
        if k not in best or r.version > best[k].version:
            best[k] = r
    return list(best.values())


def expected_bills(
    files: list[Path], reference_json: Path, book: dict | None = None
) -> dict[tuple[str, date], dict[str, Decimal]]:
    """(account, period start) → {"book|component|band": rounded total} for the given files,
    priced with the reference file's price book (or ``book``, e.g. a superseding version)."""
    ref = json.loads(reference_json.read_text())
    book = book or ref["price_books"][0]
    comps = {c["id"]: c for c in book["components"]}
    tou_tz = ZoneInfo(book["timezone"])
    acct_tz = {a["account"]: ZoneInfo(a["timezone"]) for a in ref["accounts"]}
    nmi_to = {sp["nmi"]: (sp["account"], date.fromisoformat(sp["effective_from"])) for sp in ref["service_points"]}
    start_of = {sp["account"]: date.fromisoformat(sp["effective_from"]) for sp in ref["service_points"]}

    def band(at) -> str:
        local = at.astimezone(tou_tz)
        minute = local.hour * 60 + local.minute
        for b in comps["energy"]["bands"]:
            for t in b["times"]:
                h1, m1 = map(int, t["start"].split(":"))
                h2, m2 = map(int, t["end"].split(":"))
                if h1 * 60 + m1 <= minute < h2 * 60 + m2:
                    return b["band"]
        return comps["energy"]["default_band"]

    readings = latest_readings([r for f in files for r in read_nem12(f).readings])
    kwh: dict[tuple[str, date], dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for r in readings:
        account, _ = nmi_to[r.nmi]
        local = r.interval_start.astimezone(acct_tz[account]).date()
        period = date(local.year, local.month, 1)
        bucket = kwh[(account, period)]
        if r.suffix.startswith("E"):
            bucket["energy:" + band(r.interval_start)] += r.value
        elif r.suffix.startswith("B"):
            bucket["export"] += r.value
        else:
            bucket.setdefault("other", Decimal(0))

    bid = book["id"]
    out: dict[tuple[str, date], dict[str, Decimal]] = {}
    for (account, period), q in kwh.items():
        lines: dict[str, Decimal] = {}
        rates = {b["band"]: Decimal(b["rate"]) for b in comps["energy"]["bands"]}
        for key, qty in q.items():
            if key.startswith("energy:"):
                b = key.split(":")[1]
                lines[f"{bid}|energy|{b}"] = cents(qty * rates[b])
        if "export" in q:
            lines[f"{bid}|feed_in|"] = -cents(q["export"] * Decimal(comps["feed_in"]["rate"]))
        month_days = calendar.monthrange(period.year, period.month)[1]
        first = max(period, start_of[account])
        days = (period + timedelta(days=month_days) - first).days
        lines[f"{bid}|supply|"] = cents(days * Decimal(comps["supply"]["rate"]))
        base = sum((v for k, v in lines.items() if k.split("|")[1] in comps["gst"]["applies_to"]), Decimal(0))
        lines[f"{bid}|gst|"] = cents(base * Decimal(comps["gst"]["rate_percent"]) / 100)
        out[(account, period)] = lines
    return out
