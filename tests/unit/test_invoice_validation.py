"""The checks before finalizing (pipeline/invoicing/validation.py, issue 17): each rule at its boundary, the
facts an invoice's ledger lines give, and properties of the rules."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.invoicing.validation import CHECKS, InvoiceFacts, ReviewPolicy, facts_from_lines, review_flags

POLICY = ReviewPolicy()


def codes(facts: InvoiceFacts, policy: ReviewPolicy = POLICY) -> list[str]:
    return [f.code for f in review_flags(facts, policy)]


def test_a_clean_invoice_raises_nothing() -> None:
    facts = InvoiceFacts(total=Decimal("120.55"), windows=96, estimated_windows=10, usage_kwh=Decimal(300),
                         history_kwh=(Decimal(280), Decimal(320)), service_days=31, missing_count=0)
    assert review_flags(facts, POLICY) == []


def test_estimated_share_is_held_only_above_the_limit() -> None:
    assert codes(InvoiceFacts(total=Decimal(1), windows=96, estimated_windows=48)) == []  # exactly 50 %
    flags = review_flags(InvoiceFacts(total=Decimal(1), windows=96, estimated_windows=58), POLICY)
    assert [f.code for f in flags] == ["ESTIMATED_SHARE"]
    assert flags[0].details == {"estimated_windows": 58, "windows": 96, "share": "0.6042", "limit": "0.5"}
    assert flags[0].message.startswith("60.4 % of the usage windows")


def test_usage_far_from_history_needs_enough_history_and_is_symmetric() -> None:
    history = (Decimal(100), Decimal(120))  # mean 110: allowed 36.67 … 330 kWh
    assert codes(InvoiceFacts(total=Decimal(1), usage_kwh=Decimal(330), history_kwh=history)) == []
    assert codes(InvoiceFacts(total=Decimal(1), usage_kwh=Decimal("330.001"), history_kwh=history)) == \
        ["USAGE_FAR_FROM_HISTORY"]
    assert codes(InvoiceFacts(total=Decimal(1), usage_kwh=Decimal("36.66"), history_kwh=history)) == \
        ["USAGE_FAR_FROM_HISTORY"]
    assert codes(InvoiceFacts(total=Decimal(1), usage_kwh=Decimal(5000), history_kwh=(Decimal(100),))) == []
    flag = review_flags(InvoiceFacts(total=Decimal(1), usage_kwh=Decimal(440), history_kwh=history), POLICY)[0]
    assert flag.details == {"usage_kwh": "440", "history_mean_kwh": "110.000", "history_invoices": 2, "ratio": "4.00"}


def test_only_the_last_history_invoices_count() -> None:
    policy = ReviewPolicy(history_invoices=2)
    facts = InvoiceFacts(total=Decimal(1), usage_kwh=Decimal(100), history_kwh=(Decimal(90), Decimal(110), Decimal(1)))
    assert codes(facts, policy) == []  # the third (1 kWh) is older than the two averaged
    assert codes(facts, ReviewPolicy(history_invoices=3)) == []  # mean 67: 100 is within 3×


def test_negative_total_and_missing_days() -> None:
    assert codes(InvoiceFacts(total=Decimal("-0.01"))) == ["NEGATIVE_TOTAL"]
    assert codes(InvoiceFacts(total=Decimal(0))) == []
    facts = InvoiceFacts(total=Decimal(5), service_days=31, missing_days=("2005-03-04", "2005-03-09"), missing_count=2)
    flag = review_flags(facts, POLICY)[0]
    assert flag.code == "MISSING_SERVICE_DAYS" and flag.details["missing_days"] == 2
    assert "2 of 31 service days" in flag.message and "2005-03-04, 2005-03-09" in flag.message
    assert codes(InvoiceFacts(total=Decimal(5), service_days=None, missing_count=0)) == []


def test_checks_can_be_turned_off_and_unknown_ones_are_refused() -> None:
    facts = InvoiceFacts(total=Decimal(-5), windows=10, estimated_windows=10)
    assert codes(facts) == ["ESTIMATED_SHARE", "NEGATIVE_TOTAL"]
    assert codes(facts, ReviewPolicy(checks=("NEGATIVE_TOTAL",))) == ["NEGATIVE_TOTAL"]
    assert codes(facts, ReviewPolicy(checks=())) == []
    with pytest.raises(ValueError, match="unknown review checks"):
        ReviewPolicy(checks=("NOPE",))
    with pytest.raises(ValueError):
        ReviewPolicy(usage_ratio=Decimal(1))
    assert ReviewPolicy().hold == timedelta(hours=72)


def exp(**kw: object) -> dict:
    return dict(kw)


def test_facts_from_lines_take_the_latest_line_of_each_component_and_band() -> None:
    lines = [  # (component, band, kind, unit, quantity = the period's total so far, explanation)
        ("energy", "peak", "tou", "kWh", Decimal(10), exp(window_count=4, estimated_windows=4)),
        ("energy", "off_peak", "tou", "kWh", Decimal(20), exp(window_count=8, estimated_windows=0,
                                                               service_days=31, usage_days=2, missing_days=["x"])),
        ("network", "", "per_unit", "kWh", Decimal(30), exp(window_count=12, estimated_windows=4)),
        ("supply", "", "fixed_daily", "day", Decimal(31), exp(window_count=0, estimated_windows=0)),
        ("energy", "peak", "tou", "kWh", Decimal(15), exp(window_count=6, estimated_windows=5,
                                                          service_days=31, usage_days=31, missing_days=[])),
    ]
    facts = facts_from_lines(Decimal("12.34"), lines, (Decimal(7),))
    # energy: 15 + 20 = 35 kWh (the first peak line is superseded) > network's 30 kWh: energy counts
    assert facts.usage_kwh == Decimal(35)
    assert (facts.windows, facts.estimated_windows) == (14, 5)
    assert (facts.service_days, facts.missing_count, facts.missing_days) == (31, 0, ())  # the most recent view
    assert facts.total == Decimal("12.34") and facts.history_kwh == (Decimal(7),)


def test_facts_of_an_invoice_without_energy_lines() -> None:
    facts = facts_from_lines(Decimal(3), [("api_calls", "", "per_unit", "call", Decimal(900), exp(window_count=3))], ())
    assert (facts.usage_kwh, facts.windows, facts.service_days) == (Decimal(0), 0, None)
    assert review_flags(facts, POLICY) == []


@given(windows=st.integers(1, 10_000), data=st.data())
def test_estimated_share_flag_iff_share_above_limit(windows: int, data: st.DataObject) -> None:
    estimated = data.draw(st.integers(0, windows))
    limit = data.draw(st.decimals(Decimal(0), Decimal(1), places=2))
    flagged = codes(InvoiceFacts(total=Decimal(1), windows=windows, estimated_windows=estimated),
                    ReviewPolicy(max_estimated_share=limit)) == ["ESTIMATED_SHARE"]
    assert flagged == (Decimal(estimated) / Decimal(windows) > limit)


@given(usage=st.decimals(Decimal(0), Decimal(10**6), places=3),
       history=st.lists(st.decimals(Decimal("0.001"), Decimal(10**6), places=3), min_size=2, max_size=6))
def test_usage_rule_is_a_band_around_the_mean(usage: Decimal, history: list[Decimal]) -> None:
    mean = sum(history, Decimal(0)) / len(history)
    flagged = "USAGE_FAR_FROM_HISTORY" in codes(InvoiceFacts(total=Decimal(1), usage_kwh=usage,
                                                             history_kwh=tuple(history)))
    assert flagged == (usage > mean * 3 or usage < mean / 3)


@given(st.lists(st.sampled_from(CHECKS), unique=True))
def test_flags_come_in_check_order_and_only_for_checks_in_force(checks: list[str]) -> None:
    facts = InvoiceFacts(total=Decimal(-1), windows=2, estimated_windows=2, usage_kwh=Decimal(1000),
                         history_kwh=(Decimal(1), Decimal(1)), service_days=3, missing_days=("d",), missing_count=1)
    got = codes(facts, ReviewPolicy(checks=tuple(checks)))
    assert got == [c for c in CHECKS if c in checks]
