"""An independent batch computation of the telemetry bills the pipeline must produce, for tests.

Written without the pipeline's ingest, windowing, rating or ledger code: it takes the generated
CloudEvents as attributes and data (not their bytes), keeps the first of each (source, id), reads the
metric definitions, subjects, accounts and price book straight from the reference JSON, and computes:

- per (subject, metric, window): a count of events (``count``), the sum of the values (``sum``) or the
  number of distinct values (``unique_count``); windows are epoch-aligned, ``window_minutes`` long;
- a window belongs to the billing period containing the local date (account time zone) of its
  start; periods are monthly from the account's anchor day;
- per (account, period, metric) the sum of its windows, priced: ``per_unit`` quantity × rate;
  ``tiered`` graduated, one line per tier slice (thresholds unprorated: the sample subjects cover
  every day of every period); ``tax`` a percentage of the rounded totals it names. Every line is
  rounded half-up to cents.
"""

from __future__ import annotations

import calendar
import json
from collections import defaultdict
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

CENT = Decimal("0.01")


def cents(x: Decimal) -> Decimal:
    return x.quantize(CENT, rounding=ROUND_HALF_UP)


def _monthly_period(day: date, anchor_day: int) -> date:
    """Start of the monthly period (anchored on ``anchor_day``, clamped to short months) containing ``day``."""
    def start_in(year: int, month: int) -> date:
        return date(year, month, min(anchor_day, calendar.monthrange(year, month)[1]))

    candidate = start_in(day.year, day.month)
    if day >= candidate:
        return candidate
    year, month = (day.year - 1, 12) if day.month == 1 else (day.year, day.month - 1)
    return start_in(year, month)


def _lookup(path: str, data: Any) -> Any:
    node = data
    for part in path.removeprefix("$.").split("."):
        node = node[part]
    return node


def expected_telemetry_bills(
    events: list[tuple[dict[str, Any], Any]], reference_json: Path
) -> dict[tuple[str, str], dict[str, Decimal]]:
    """(account, period start ISO) → {"book|component|band": rounded total, non-zero only} for the valid
    ``events`` (attributes, data) — every one must have a known type and a subject mapped on its date."""
    ref = json.loads(reference_json.read_text())
    by_type = {m["event_type"]: m for m in ref["metric_definitions"]}
    accounts = {a["account"]: a for a in ref["accounts"]}
    subjects = ref["telemetry_subjects"]

    def account_of(subject: str, day: date) -> str:
        for s in subjects:
            if s["subject"] == subject and date.fromisoformat(s["effective_from"]) <= day and (
                    s["effective_to"] is None or day < date.fromisoformat(s["effective_to"])):
                return s["account"]
        raise KeyError(subject)

    seen: set[tuple[str, str]] = set()
    windows: dict[tuple[str, str, str, int], list[Any]] = defaultdict(list)  # (account, subject, metric, start)
    for attrs, data in events:
        identity = (attrs["source"], attrs["id"])
        if identity in seen:
            continue
        seen.add(identity)
        m = by_type[attrs["type"]]
        at: datetime = attrs["time"].astimezone(UTC)
        size_ms = m["window_minutes"] * 60_000
        epoch_ms = int(at.timestamp() * 1000)
        start_ms = epoch_ms - epoch_ms % size_ms
        thing = None if m["aggregation"] == "count" else _lookup(m["value_path"], data)
        windows[(account_of(attrs["subject"], at.date()), attrs["subject"], m["metric"], start_ms)].append(thing)

    aggregation = {m["metric"]: m["aggregation"] for m in ref["metric_definitions"]}
    quantities: dict[tuple[str, date], dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for (account, _subject, metric, start_ms), things in windows.items():
        kind = aggregation[metric]
        if kind == "count":
            value = Decimal(len(things))
        elif kind == "sum":
            value = sum((Decimal(str(t)) for t in things), Decimal(0))
        elif kind == "unique_count":
            value = Decimal(len(set(things)))
        else:
            raise NotImplementedError(kind)
        a = accounts[account]
        local_day = datetime.fromtimestamp(start_ms / 1000, tz=UTC).astimezone(ZoneInfo(a["timezone"])).date()
        period = _monthly_period(local_day, date.fromisoformat(a["billing_anchor"]).day)
        quantities[(account, period)][metric] += value

    books = {b["id"]: b for b in ref["price_books"]}
    plans = {p["account"]: p["price_book_id"] for p in ref["plan_assignments"]}
    out: dict[tuple[str, str], dict[str, Decimal]] = {}
    for (account, period), per_metric in quantities.items():
        book = books[plans[account]]
        lines: dict[str, Decimal] = {}
        for c in book["components"]:
            qty = per_metric.get(c.get("metric", ""), Decimal(0))
            if c["kind"] == "per_unit":
                lines[f"{book['id']}|{c['id']}|"] = cents(qty * Decimal(c["rate"]))
            elif c["kind"] == "tiered":
                assert c["mode"] == "graduated"
                lower = Decimal(0)
                for i, tier in enumerate(c["tiers"], start=1):
                    upper = None if tier["up_to"] is None else Decimal(tier["up_to"])
                    slice_ = max((qty if upper is None else min(qty, upper)) - lower, Decimal(0))
                    lines[f"{book['id']}|{c['id']}|tier {i}"] = cents(slice_ * Decimal(tier["rate"]))
                    lower = upper if upper is not None else lower
        for c in book["components"]:
            if c["kind"] == "tax":
                base = sum((v for k, v in lines.items() if k.split("|")[1] in c["applies_to"]), Decimal(0))
                lines[f"{book['id']}|{c['id']}|"] = cents(base * Decimal(c["rate_percent"]) / 100)
        out[(account, period.isoformat())] = {k: v for k, v in lines.items() if v != 0}
    return out
