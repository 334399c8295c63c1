"""The portal's pure views (issue 17): usage and invoice JSON from the read model and the ledger summaries,
the chart geometry, and the page's escaping. Figures computed by hand."""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from pipeline.api.portal import chart, invoices_json, money, render_message, render_portal, usage_json
from pipeline.invoicing.report import ESTIMATED_NOTE, InvoiceLineSummary, InvoiceSummary
from pipeline.usage.model import MetricSnapshot
from pipeline.usage.projection import Projection
from pipeline.usage.query import UsageSnapshot

D = Decimal


def snap() -> UsageSnapshot:
    energy = MetricSnapshot(
        "ACC-1", "energy_import", date(2025, 3, 1), date(2025, 4, 1), "AUD", D("30.000000"), date(2025, 3, 3), 3, 31,
        [(date(2025, 3, 1), D("10"), D("2.50")), (date(2025, 3, 2), D("5"), D("1.25")),
         (date(2025, 3, 3), D("15"), D("3.75"))],
        D("10.50"), D("3.00"), {"OFFPEAK": D("12"), "PEAK": D("18")}, D("0.1000"),
        [Projection("DAILY_AVERAGE", D("310.000000"), D("0.40")),
         Projection("WEIGHTED_AVERAGE", D("333.333333"), D("0.35"))], D("80.50"))
    charges = MetricSnapshot("ACC-1", "", date(2025, 3, 1), date(2025, 4, 1), "AUD", D(0), None, 0, 31, [],
                             D("1.10"), D("1.10"), {}, None, [], D("1.10"))
    return UsageSnapshot("ACC-1", date(2025, 3, 1), date(2025, 4, 1), "AUD", D("11.60"), D("81.60"),
                         [charges, energy], 7)


def test_usage_json_prices_each_method_by_hand() -> None:
    u = usage_json(snap())
    assert u["period_to_date"] == {"as_of_day": "2025-03-03", "days_elapsed": 3, "days_remaining": 28,
                                   "period_days": 31, "cost": "11.60", "fixed_cost": "4.10"}
    # DAILY_AVERAGE: 3.00 fixed + 7.50 variable × 310/30 = 80.50, plus the other metric's 1.10 = 81.60
    # WEIGHTED_AVERAGE: 3.00 + 7.50 × 333.333333/30 = 86.3333332… → 86.33, plus 1.10 = 87.43
    assert u["projected_bill"] == {"amount": "81.60", "estimate": True, "method": "DAILY_AVERAGE",
                                   "confidence": "0.40", "by_method": [
                                       {"method": "DAILY_AVERAGE", "amount": "81.60", "confidence": "0.40"},
                                       {"method": "WEIGHTED_AVERAGE", "amount": "87.43", "confidence": "0.35"}]}
    energy = u["metrics"][1]
    assert energy["daily"][1] == {"date": "2025-03-02", "usage_kwh": "5", "variable_cost": "1.25"}
    assert energy["bands"] == {"OFFPEAK": "12", "PEAK": "18"}
    assert [p["cost"] for p in energy["projections"]] == ["80.50", "86.33"]


def test_invoices_json_marks_estimated_lines_and_skips_bills() -> None:
    est = InvoiceLineSummary("energy", "tou", "PEAK", D("18.5"), "kWh", D("0.30"), D("5.555"), 2,
                             quality_flags=("A", "E"))
    act = InvoiceLineSummary("supply", "fixed_daily", "", D("31"), "day", D("1.00"), D("31.00"), 1,
                             quality_flags=("A",))
    inv = InvoiceSummary("ACC-1|2025-03-01|AUD", "ACC-1", date(2025, 3, 1), date(2025, 4, 1), "AUD", "FINALIZED",
                         (est, act), "INV-1", date(2025, 4, 2), date(2025, 4, 16), D("10"), D("4"), D("42.56"))
    bill = InvoiceSummary("bill:b1", "ACC-1", date(2025, 3, 1), date(2025, 4, 1), "AUD", "OPEN", ())
    [got] = invoices_json([inv, bill])
    assert [(ln["amount"], ln["mark"], ln["quantity"], ln["rate"]) for ln in got["lines"]] == [
        ("5.56", "*", "18.5", "0.3"), ("31.00", "", "31", "1")]
    assert got["total"] == "36.56" and got["estimated_note"] == ESTIMATED_NOTE
    assert got["statement"] == {"previous_balance": "10.00", "charges_total": "36.56", "payments_total": "4.00",
                                "amount_due": "42.56"}


def test_page_shows_the_json_strings_and_escapes() -> None:
    u = usage_json(snap())
    page = render_portal("<b>ACC-1</b>", u, [])
    assert "<b>ACC-1</b>" not in page and "&lt;b&gt;ACC-1&lt;/b&gt;" in page
    assert re.search(r'data-testid="projection-WEIGHTED_AVERAGE-amount">87.43<', page)
    assert re.search(r'data-testid="cost-so-far">11.60<', page)
    assert 'data-testid="no-invoices"' in page
    assert "&lt;script&gt;" in render_message("x", "<script>", login=True, account="a")


@given(st.lists(st.decimals(min_value=-5, max_value=1000, places=3), max_size=40))
def test_chart_bars_fit_and_keep_order(kwh: list[Decimal]) -> None:
    metric = {"daily": [{"date": f"d{i}", "usage_kwh": str(k), "variable_cost": "0.00"} for i, k in enumerate(kwh)],
              "bands": {"A": "1", "B": "3"}}
    c = chart(metric)
    assert [b["date"] for b in c["bars"]] == [f"d{i}" for i in range(len(kwh))]
    assert all(0 <= b["h"] <= c["height"] - 20 and b["y"] == c["height"] - b["h"] for b in c["bars"])
    assert sum(b["w"] for b in c["bands"]) == c["width"]


def test_money_rounds_half_up_to_the_minor_unit() -> None:
    assert (money(D("1.005"), "AUD"), money(D("1.5"), "JPY"), money(D("2"), None)) == ("1.01", "2", "2.00")
