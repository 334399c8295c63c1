"""Money and quantities: ``Decimal`` only, one rounding rule, currencies never mixed.

SPEC §4: quantities to 6 decimal places; a component's period total is rounded half-up to the
currency's minor unit; deltas are differences of rounded totals.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import NamedTuple

ZERO = Decimal(0)
QUANTITY_EXP = Decimal("0.000001")  # 6 dp (SPEC §4)

# ISO 4217 minor units of the currencies we bill in; extend as needed.
MINOR_UNITS: dict[str, int] = {"AUD": 2, "NZD": 2, "USD": 2, "EUR": 2, "GBP": 2, "JPY": 0, "SGD": 2, "CHF": 2}


def D(value: str | int | Decimal) -> Decimal:
    """The one constructor for numbers: from ``str``, ``int`` or ``Decimal``.

    Raises ``TypeError`` for ``float`` (binary floats have no place in billing) and
    ``decimal.InvalidOperation`` for text that is not a number.
    """
    if isinstance(value, (float, bool)):
        raise TypeError(f"refusing {type(value).__name__} {value!r}: use str or Decimal")
    return value if isinstance(value, Decimal) else Decimal(value)


def quantity(value: Decimal) -> Decimal:
    """``value`` rounded half-up to 6 decimal places (kWh, kW, days...)."""
    return value.quantize(QUANTITY_EXP, rounding=ROUND_HALF_UP)


def minor_unit_exponent(currency: str) -> Decimal:
    """``Decimal('0.01')`` for AUD, ``Decimal('1')`` for JPY; raises ``KeyError`` for unknown codes."""
    try:
        digits = MINOR_UNITS[currency]
    except KeyError:
        raise KeyError(f"unknown currency {currency!r}; known: {sorted(MINOR_UNITS)}") from None
    return Decimal(1).scaleb(-digits)


def round_money(value: Decimal, currency: str) -> Decimal:
    """``value`` rounded half-up to the currency's minor unit (SPEC §4): 1.0625 AUD → 1.06."""
    return value.quantize(minor_unit_exponent(currency), rounding=ROUND_HALF_UP)


class Money(NamedTuple):
    """An amount in one currency. Arithmetic between different currencies raises ``ValueError``."""

    amount: Decimal
    currency: str

    def __add__(self, other: object) -> Money:  # type: ignore[override]
        if not isinstance(other, Money):
            return NotImplemented
        _same_currency(self, other)
        return Money(self.amount + other.amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        _same_currency(self, other)
        return Money(self.amount - other.amount, self.currency)

    def rounded(self) -> Money:
        """This amount rounded half-up to the currency's minor unit."""
        return Money(round_money(self.amount, self.currency), self.currency)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency}"


def _same_currency(a: Money, b: Money) -> None:
    if a.currency != b.currency:
        raise ValueError(f"currency mismatch: {a.currency} vs {b.currency}")
