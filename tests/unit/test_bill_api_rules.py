"""Pure parts of the Bill API (issue 17 part B): the error shape, Idempotency-Key decisions, ECB CSV parsing,
currency conversion rounding (``pipeline.money``), line ids from idempotency keys, and which records the
ledger refuses."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import fx
from pipeline.api.errors import from_http, from_validation
from pipeline.api.idempotency import Stored, decide, fingerprint
from pipeline.invoicing import bills
from pipeline.money import round_money
from pipeline.records import InvoiceAdjustment

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "ecb" / "eurofxref-hist-sample.csv"


def test_validation_errors_become_the_structured_shape() -> None:
    err = from_validation([
        {"loc": ("body", "amount"), "msg": "String should match pattern", "type": "string_pattern_mismatch"},
        {"loc": ("body", "reason"), "msg": "Field required", "type": "missing"}])
    assert err.status == 422
    assert err.body() == {"code": "invalid_argument", "message": "body.amount: String should match pattern",
                          "details": {"errors": [
                              {"field": "body.amount", "message": "String should match pattern",
                               "type": "string_pattern_mismatch"},
                              {"field": "body.reason", "message": "Field required", "type": "missing"}]}}
    assert from_validation([]).body() == {"code": "invalid_argument", "message": "invalid request", "details": {}}
    assert from_http(404, "Not Found").body() == {"code": "not_found", "message": "Not Found", "details": {}}
    assert from_http(405, "Method Not Allowed").body()["code"] == "method_not_allowed"
    assert from_http(418, "teapot").body()["code"] == "unknown"


def test_idempotency_same_body_replays_other_body_conflicts() -> None:
    a = fingerprint("POST", "/v1/bills/B-1/line-items", {"type": "charge", "amount": "1.00", "reason": "x"})
    same = fingerprint("post", "/v1/bills/B-1/line-items", {"reason": "x", "amount": "1.00", "type": "charge"})
    other = fingerprint("POST", "/v1/bills/B-1/line-items", {"type": "charge", "amount": "1.01", "reason": "x"})
    elsewhere = fingerprint("POST", "/v1/bills/B-2/line-items", {"type": "charge", "amount": "1.00", "reason": "x"})
    assert a == same and len({a, other, elsewhere}) == 3
    assert decide(None, a) == "run"
    assert decide(Stored(a, None, None), a) == "run"  # never answered: run again (ids derived from the key)
    assert decide(Stored(a, 201, {"line_id": "x"}), a) == "replay"
    assert decide(Stored(a, 201, {"line_id": "x"}), other) == "conflict"
    assert decide(Stored(a, None, None), other) == "conflict"


def test_line_and_bill_ids_derive_from_caller_and_key() -> None:
    line = bills.manual_line_id("alice", "k-1")
    assert line == bills.manual_line_id("alice", "k-1") and line.startswith("manual:") and len(line) == 39
    assert len({line, bills.manual_line_id("alice", "k-2"), bills.manual_line_id("bob", "k-1")}) == 3
    assert bills.bill_id_of("alice", "k-1") != bills.bill_id_of("bob", "k-1")
    assert bills.bill_invoice_id("B-1") == "bill:B-1"


def test_ecb_hist_sample_parses_with_na_skipped() -> None:
    rates = fx.parse_ecb_csv(SAMPLE.read_text(), "ECB")
    assert len(rates) == 2 * 29  # 30 currencies a day, BGN is N/A
    by = {(r.rate_date, r.quote): r for r in rates}
    assert by[(date(2025, 12, 5), "USD")] == fx.Rate(date(2025, 12, 5), "EUR", "USD", Decimal("1.1650"), "ECB")
    assert by[(date(2025, 12, 4), "JPY")].rate == Decimal("180.88")
    assert (date(2025, 12, 5), "BGN") not in by


def test_ecb_daily_format_and_errors() -> None:
    daily = "Date, USD, JPY, \n05 December 2025, 1.1650, 180.55, \n"
    assert [(r.rate_date, r.quote, r.rate) for r in fx.parse_ecb_csv(daily)] == [
        (date(2025, 12, 5), "USD", Decimal("1.1650")), (date(2025, 12, 5), "JPY", Decimal("180.55"))]
    with pytest.raises(fx.RateError, match="first column must be 'Date'"):
        fx.parse_ecb_csv("Day,USD\n2025-12-05,1.1\n")
    with pytest.raises(fx.RateError, match="line 2: USD rate 'abc'"):
        fx.parse_ecb_csv("Date,USD\n2025-12-05,abc\n")
    with pytest.raises(fx.RateError, match="positive"):
        fx.parse_ecb_csv("Date,USD\n2025-12-05,-1\n")
    with pytest.raises(fx.RateError, match="unreadable date"):
        fx.parse_ecb_csv("Date,USD\n5/12/2025,1.1\n")
    with pytest.raises(fx.RateError, match="not an ISO 4217"):
        fx.parse_ecb_csv("Date,usd\n2025-12-05,1.1\n")


def test_conversion_by_hand() -> None:
    rates = {"USD": Decimal("1.1650"), "AUD": Decimal("1.7610"), "JPY": Decimal("180.55")}
    on = date(2025, 12, 5)
    # 100.00 AUD → EUR: 100 / 1.7610 = 56.7859… → 56.79
    assert fx.convert(Decimal("100.00"), "AUD", "EUR", rates, on) == Decimal("56.79")
    # 100.00 AUD → USD: 100 × 1.1650 / 1.7610 = 66.1556… → 66.16
    assert fx.convert(Decimal("100.00"), "AUD", "USD", rates, on) == Decimal("66.16")
    # 10.00 EUR → JPY (no minor unit): 1805.5 → half-up 1806
    assert fx.convert(Decimal("10.00"), "EUR", "JPY", rates, on) == Decimal("1806")
    assert fx.convert(Decimal("-12.345"), "USD", "USD", rates, on) == Decimal("-12.35")  # half-up, away from 0
    with pytest.raises(fx.RateError, match="no EUR/GBP rate for 2025-12-05"):
        fx.convert(Decimal(1), "GBP", "EUR", rates, on)


@given(st.decimals(min_value=Decimal("-1000000"), max_value=Decimal("1000000"), places=2),
       st.decimals(min_value=Decimal("0.0001"), max_value=Decimal("50000"), places=4),
       st.decimals(min_value=Decimal("0.0001"), max_value=Decimal("50000"), places=4))
def test_conversion_rounds_once_to_the_minor_unit(amount: Decimal, r_from: Decimal, r_to: Decimal) -> None:
    rates = {"USD": r_from, "JPY": r_to}
    got = fx.convert(amount, "USD", "JPY", rates, date(2025, 12, 5))
    assert got == round_money(amount * (r_to / r_from), "JPY")
    assert got == got.to_integral_value()  # JPY has no minor unit
    back = fx.convert(amount, "USD", "EUR", rates, date(2025, 12, 5))
    assert abs(back - amount / r_from) <= Decimal("0.005")


def _adj(kind: str = "LINE", account: str = "A", currency: str = "AUD") -> InvoiceAdjustment:
    return InvoiceAdjustment("manual:x", kind, "B-1", account, currency, Decimal("1.00") if kind == "LINE"
                             else Decimal(0), "why", "alice", "k", datetime(2025, 12, 5, tzinfo=UTC))


def test_which_records_the_ledger_refuses() -> None:
    bill = bills.BillRow("bill:B-1", "A", "AUD", "OPEN", date(2025, 12, 1), date(2026, 1, 1))
    closed = bills.BillRow("bill:B-1", "A", "AUD", "FINALIZED", date(2025, 12, 1), date(2026, 1, 1))
    assert bills.check(_adj(), bill, False) is None
    assert bills.check(_adj(), None, False)[0] == "UNKNOWN_BILL"
    assert bills.check(_adj(account="B"), bill, False)[0] == "BILL_MISMATCH"
    assert bills.check(_adj(currency="USD"), bill, False)[0] == "BILL_MISMATCH"
    assert bills.check(_adj(), closed, False)[0] == "BILL_CLOSED"
    assert bills.check(_adj(), bill, True)[0] == "BILL_CLOSED"  # closed earlier in the same batch
    assert bills.check(_adj("CLOSE"), closed, False) is None  # a repeated close: nothing to do, no dead letter
    with pytest.raises(ValueError, match="non-zero"):
        InvoiceAdjustment("m", "LINE", "B", "A", "AUD", Decimal(0), "", "a", "k", datetime(2025, 1, 1, tzinfo=UTC))
    row = bills.line_row(bills.PendingAdjustment(_adj(), "t", 1, 7), bill)
    assert row[0] == "manual:x" and row[1] == "bill:B-1" and row[12] == Decimal("1.00") and row[21] == "MANUAL"
    assert '"idempotency_key": "k"' in row[17] and '"requested_by": "alice"' in row[17]
