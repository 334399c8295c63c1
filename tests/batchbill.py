"""An independent batch computation of the bills the pipeline must produce, for tests.

Deliberately written without the pipeline's windowing, rating or ledger code: it reads the NEM12
readings, keeps the highest version of each interval, and prices calendar months directly from the
reference JSON (interval kWh per TOU band × rate, service days × supply charge, export × feed-in,
GST on energy + supply), each line rounded half-up to cents. NEM13 accumulation reads are computed
from the CSV text (``monthly_kwh``), independently of ``pipeline.ingest.nem13``, and priced with the
flat price book of their accounts (``expected_nem13_bills``).
"""

from __future__ import annotations

import calendar
import json
import zipfile
from collections import defaultdict
from collections.abc import Callable
from datetime import date, timedelta, timezone
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
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
    files: list[Path], reference_json: Path, book: dict | None = None,
    keep: Callable[[MeterReading], bool] | None = None,
) -> dict[tuple[str, date], dict[str, Decimal]]:
    """(account, period start) → {"book|component|band": rounded total} for the given files,
    priced with the reference file's price book (or ``book``, e.g. a superseding version); ``keep``:
    only the readings it accepts (e.g. those a billing rule did not refuse)."""
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

    readings = latest_readings([r for f in files for r in read_nem12(f).readings if keep is None or keep(r)])
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


# --- NEM13 accumulation reads ----------------------------------------------------------------------------------
def yyyymmdd(text14: str) -> date:
    """The date of a 14-digit MDFF date-time (YYYYMMDDhhmmss)."""
    return date(int(text14[:4]), int(text14[4:6]), int(text14[6:8]))


def register_reads(path: Path) -> list[list[str]]:
    """The fields of every 250 record of a published NEM13 zip, straight from the CSV."""
    with zipfile.ZipFile(path) as zf:
        (member,) = zf.namelist()
        text = zf.read(member).decode("ascii")
    return [line.split(",") for line in text.splitlines() if line.startswith("250,")]


def advance(f: list[str]) -> Decimal:
    """CurrentRegisterRead − PreviousRegisterRead; a lower current read wrapped at 10**digits, unless the
    Quantity (field 19) is that negative difference: a correction (issue 14), billed negative."""
    p, c = Decimal(f[8]), Decimal(f[13])
    if c >= p:
        return c - p
    return c - p if Decimal(f[18]) == c - p else Decimal(10) ** max(len(f[8]), len(f[13])) - p + c


def read_days(f: list[str]) -> int:
    """Days a 250 record's advance is spread over: from the previous read's date to the day before the current's."""
    return max((yyyymmdd(f[14]) - yyyymmdd(f[9])).days, 1)


def monthly_kwh(files: list[Path]) -> dict[tuple[str, str], dict[date, Decimal]]:
    """(NMI, E|I) → month → kWh: each read's advance spread evenly over the days from the previous
    read's date to the day before the current read's date, 6 decimals, the remainder on the last day."""
    out: dict[tuple[str, str], dict[date, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for path in files:
        for f in register_reads(path):
            total, first = advance(f), yyyymmdd(f[9])
            days = read_days(f)
            daily = (total / days).quantize(Decimal("0.000001"), rounding=ROUND_DOWN)
            for i in range(days):
                day = first + timedelta(days=i)
                out[(f[1], f[7])][day.replace(day=1)] += daily if i < days - 1 else total - daily * (days - 1)
    return out


def expected_nem13_bills(files: list[Path], reference_json: Path) -> dict[tuple[str, date], dict[str, Decimal]]:
    """(account, period start) → {"book|component|band": rounded total} for NEM13 files: kWh per month
    (``monthly_kwh``) × the flat energy rate of the account's price book (export × feed-in, credited),
    service days × supply, GST on energy + supply."""
    ref = json.loads(reference_json.read_text())
    account_of = {sp["nmi"]: sp["account"] for sp in ref["service_points"]}
    start_of = {sp["account"]: date.fromisoformat(sp["effective_from"]) for sp in ref["service_points"]}
    plan_of = {pa["account"]: pa["price_book_id"] for pa in ref["plan_assignments"]}
    books = {b["id"]: b for b in ref["price_books"]}
    kwh: dict[tuple[str, date], dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for (nmi, direction), months in monthly_kwh(files).items():
        for month, q in months.items():
            kwh[(account_of[nmi], month)]["energy" if direction == "E" else "feed_in"] += q
    out: dict[tuple[str, date], dict[str, Decimal]] = {}
    for (account, period), q in kwh.items():
        book = books[plan_of[account]]
        comps = {c["id"]: c for c in book["components"]}
        bid = book["id"]
        lines: dict[str, Decimal] = {}
        if "energy" in q:
            lines[f"{bid}|energy|"] = cents(q["energy"] * Decimal(comps["energy"]["rate"]))
        if "feed_in" in q:
            lines[f"{bid}|feed_in|"] = -cents(q["feed_in"] * Decimal(comps["feed_in"]["rate"]))
        month_days = calendar.monthrange(period.year, period.month)[1]
        first = max(period, start_of[account])
        lines[f"{bid}|supply|"] = cents((period + timedelta(days=month_days) - first).days
                                       * Decimal(comps["supply"]["rate"]))
        base = sum((v for k, v in lines.items() if k.split("|")[1] in comps["gst"]["applies_to"]), Decimal(0))
        lines[f"{bid}|gst|"] = cents(base * Decimal(comps["gst"]["rate_percent"]) / 100)
        out[(account, period)] = lines
    return out
