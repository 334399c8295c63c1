"""SPEC §7: the worked bill must come out at exactly $115.06, line by line."""

from __future__ import annotations

from decimal import Decimal

from pipeline.rating.pricebook import PriceBook
from pipeline.rating.rate import period_containing, quantity_key, rate_period

BOOK = PriceBook.model_validate({
    "id": "SPEC7", "version": 1, "currency": "USD", "timezone": "America/Detroit", "holiday_region": "US-MI",
    "effective_from": "2020-01-01",
    "components": [
        {"id": "readiness", "kind": "fixed_period", "rate": "15.00"},
        {"id": "energy", "kind": "tiered", "mode": "graduated", "metric": "energy_import",
         "tiers": [{"up_to": "500", "rate": "0.10"}, {"up_to": None, "rate": "0.12"}]},
        {"id": "pscr", "kind": "surcharge", "metric": "energy_import", "rate": "0.00125"},
        {"id": "saf", "kind": "fixed_period", "rate": "7.00"},
    ],
})


def test_spec_worked_example_is_115_06_line_by_line() -> None:
    period = period_containing("MONTHLY", BOOK.effective_from, BOOK.effective_from.replace(month=12, day=15))
    assert (period.start.isoformat(), period.end.isoformat()) == ("2020-12-01", "2021-01-01")
    kwh = Decimal(850)
    lines = rate_period(
        {quantity_key(BOOK, "energy", ""): kwh, quantity_key(BOOK, "pscr", ""): kwh},
        {("SPEC7", 1): period.days}, {("SPEC7", 1): BOOK}, period.days,
    )
    totals = {k: v.total for k, v in lines.items()}
    assert totals == {
        "SPEC7|readiness|": Decimal("15.00"),
        "SPEC7|energy|tier 1": Decimal("50.00"),
        "SPEC7|energy|tier 2": Decimal("42.00"),
        "SPEC7|pscr|": Decimal("1.06"),  # 850 × 0.00125 = 1.0625, half-up
        "SPEC7|saf|": Decimal("7.00"),
    }
    assert sum(totals.values()) == Decimal("115.06")
    assert lines["SPEC7|energy|tier 2"].quantity == Decimal(350)


def test_bill_date_and_due_date_follow_the_period_and_net_days() -> None:
    period = period_containing("QUARTERLY", BOOK.effective_from, BOOK.effective_from.replace(month=5, day=20))
    assert (period.start.isoformat(), period.end.isoformat()) == ("2020-04-01", "2020-07-01")
    assert period.bill_date.isoformat() == "2020-07-01"
    assert period.due_date(14).isoformat() == "2020-07-15"
