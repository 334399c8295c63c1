"""``pipeline.money``: the one number constructor, half-up rounding to the minor unit, Money arithmetic."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

import pytest

from pipeline.money import D, Money, minor_unit_exponent, quantity, round_money


# --- D ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [1.5, 0.0, float("nan"), True, False])
def test_d_rejects_float_and_bool(value: object) -> None:
    with pytest.raises(TypeError):
        D(value)  # type: ignore[arg-type]


def test_d_accepts_str_int_and_decimal() -> None:
    assert D("0.3403") == Decimal("0.3403")
    assert str(D("0.3403")) == "0.3403"  # exact text, no binary float in between
    assert D(7) == Decimal(7)
    assert isinstance(D(7), Decimal)
    dec = Decimal("1.10")
    assert D(dec) is dec
    assert str(D("-12.500")) == "-12.500"


def test_d_rejects_text_that_is_not_a_number() -> None:
    with pytest.raises(InvalidOperation):
        D("twelve")


# --- rounding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "currency", "expected"),
    [
        ("1.0625", "AUD", "1.06"),
        ("1.065", "AUD", "1.07"),  # half-up, not half-even (which would give 1.06)
        ("1.075", "AUD", "1.08"),
        ("-1.065", "AUD", "-1.07"),  # half away from zero
        ("-1.0649", "AUD", "-1.06"),
        ("0.005", "AUD", "0.01"),
        ("2.5", "AUD", "2.50"),
        ("1234.5", "JPY", "1235"),
        ("1234.49", "JPY", "1234"),
        ("-0.5", "JPY", "-1"),
        ("0.125", "USD", "0.13"),
    ],
)
def test_round_money_half_up_to_minor_unit(value: str, currency: str, expected: str) -> None:
    got = round_money(Decimal(value), currency)
    assert got == Decimal(expected)
    assert str(got) == expected  # the exponent is the currency's minor unit too


def test_minor_unit_exponent() -> None:
    assert minor_unit_exponent("AUD") == Decimal("0.01")
    assert minor_unit_exponent("JPY") == Decimal(1)


@pytest.mark.parametrize("fn", [minor_unit_exponent, lambda c: round_money(Decimal("1.00"), c)])
def test_unknown_currency_raises_key_error(fn) -> None:
    with pytest.raises(KeyError, match="XYZ"):
        fn("XYZ")


def test_quantity_rounds_half_up_to_six_places() -> None:
    assert str(quantity(Decimal("1.0000005"))) == "1.000001"
    assert str(quantity(Decimal("1.00000049"))) == "1.000000"
    assert str(quantity(Decimal("1.5"))) == "1.500000"


# --- Money ---------------------------------------------------------------------------------------------
def test_money_add_and_sub_same_currency() -> None:
    a = Money(Decimal("10.25"), "AUD")
    b = Money(Decimal("0.30"), "AUD")
    assert a + b == Money(Decimal("10.55"), "AUD")
    assert a - b == Money(Decimal("9.95"), "AUD")
    assert b - a == Money(Decimal("-9.95"), "AUD")
    assert (a + b).currency == "AUD"


def test_money_currency_mismatch_raises_value_error() -> None:
    aud = Money(Decimal("1.00"), "AUD")
    nzd = Money(Decimal("1.00"), "NZD")
    with pytest.raises(ValueError, match="currency mismatch"):
        _ = aud + nzd
    with pytest.raises(ValueError, match="currency mismatch"):
        _ = aud - nzd


def test_money_add_non_money_is_type_error() -> None:
    with pytest.raises(TypeError):
        _ = Money(Decimal(1), "AUD") + Decimal(1)


def test_money_rounded_and_str() -> None:
    assert Money(Decimal("1.065"), "AUD").rounded() == Money(Decimal("1.07"), "AUD")
    assert Money(Decimal("99.5"), "JPY").rounded() == Money(Decimal("100"), "JPY")
    assert str(Money(Decimal("1.07"), "AUD")) == "1.07 AUD"
