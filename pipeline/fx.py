"""Exchange rates, pure: the ECB reference-rate CSV and cross-currency conversion (issue 17 part B).

The ECB publishes, per working day, how many units of each currency one euro buys
(https://www.ecb.europa.eu/stats/policy_and_exchange_rates/euro_reference_exchange_rates/): ``eurofxref.csv``
(one day, dates like ``05 December 2025``) and ``eurofxref-hist.csv`` (every day, ``2025-12-05``), both
with the header ``Date, USD, JPY, ...`` (spaces after commas, a trailing comma, ``N/A`` for a currency
not quoted that day). A rate row here is (date, base ``EUR``, quote, rate): 1 EUR = rate quote.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation

from pipeline.money import round_money

ECB_BASE = "EUR"


class RateError(ValueError):
    """A rate file that cannot be read, or a conversion without a rate (names the currency and date)."""


@dataclass(frozen=True, slots=True)
class Rate:
    """1 ``base`` = ``rate`` ``quote`` on ``rate_date``, as published by ``source``."""

    rate_date: date
    base: str
    quote: str
    rate: Decimal
    source: str


def _date(text: str) -> date:
    for fmt in ("%Y-%m-%d", "%d %B %Y"):
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise RateError(f"unreadable date {text!r}: expected YYYY-MM-DD or '05 December 2025'")


def parse_ecb_csv(text: str, source: str = "ECB") -> list[Rate]:
    """Every rate of an ECB reference-rate CSV (``eurofxref.csv`` or ``eurofxref-hist.csv``), base EUR.
    ``N/A`` and empty cells are skipped. Raises ``RateError`` naming the line for a missing ``Date``
    column, a bad date, a currency code that is not three letters, or a rate that is not a positive number."""
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff")), skipinitialspace=True))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows or rows[0][0].strip() != "Date":
        raise RateError("not an ECB reference-rate CSV: the first column must be 'Date'")
    header = [c.strip() for c in rows[0]]
    for code in header[1:]:
        if code and (len(code) != 3 or not code.isalpha() or not code.isupper()):
            raise RateError(f"line 1: {code!r} is not an ISO 4217 currency code")
    out: list[Rate] = []
    for n, row in enumerate(rows[1:], start=2):
        day = _date(row[0].strip())
        for code, cell in zip(header[1:], row[1:], strict=False):
            cell = cell.strip()
            if not code or not cell or cell == "N/A":
                continue
            try:
                value = Decimal(cell)
            except InvalidOperation:
                raise RateError(f"line {n}: {code} rate {cell!r} is not a number") from None
            if not value.is_finite() or value <= 0:
                raise RateError(f"line {n}: {code} rate {cell!r} must be a positive number")
            out.append(Rate(day, ECB_BASE, code, value, source))
    return out


def cross_rate(rates: dict[str, Decimal], frm: str, to: str, on: date) -> Decimal:
    """Units of ``to`` per unit of ``frm`` from ECB-style ``rates`` (quote → units per 1 EUR, of one day):
    ``rates[to] / rates[frm]`` (EUR counts 1), unrounded (28 significant digits). Raises ``RateError``
    naming the missing currency and ``on``."""
    def per_eur(code: str) -> Decimal:
        if code == ECB_BASE:
            return Decimal(1)
        if code not in rates:
            raise RateError(f"no {ECB_BASE}/{code} rate for {on.isoformat()}")
        return rates[code]

    return per_eur(to) / per_eur(frm)


def convert(amount: Decimal, frm: str, to: str, rates: dict[str, Decimal], on: date) -> Decimal:
    """``amount`` of ``frm`` in ``to``: ``amount × cross_rate``, rounded once, half-up to ``to``'s minor unit
    (``pipeline.money.round_money``). The same currency is returned unchanged (rounded). Raises ``RateError``
    when a rate is missing and ``KeyError`` for a currency ``pipeline.money`` does not know."""
    if frm == to:
        return round_money(amount, to)
    return round_money(amount * cross_rate(rates, frm, to, on), to)
