"""Multi-service accounts (seed 001, issue 17 part C): pure rules shared by rating and the invoice report.

An account may be billed for several services at once, each on its own price book (``PriceBook.service``):
electricity (kWh, NEM12), gas (MJ; metered in m³ or MJ), water (kL), flat services (fixed charges, no meter)
and voluntary contributions (opt-in add-ons). Gas and water readings arrive as CloudEvents telemetry (metric
definitions, migration 0004): NEM12 is the NEM's *electricity* meter data format (its 200 record's UOM is an
electrical unit such as kWh, kW or kVArh), so it cannot carry gas volumes or water.

**Gas conversion.** Gas is metered by volume and billed by energy::

    energy (MJ) = volume (m³) × heating value (MJ/m³) × pressure correction factor

the formula printed on Australian retail gas bills and used by the distributors under the gas distribution
codes (e.g. Victoria's Gas Distribution System Code, Essential Services Commission): the heating value is the
energy content of a standard cubic metre of the gas delivered (published for each heating value zone, by
AEMO for Victoria's declared transmission system), the pressure correction factor converts the volume at the
meter's delivery pressure (and altitude, temperature) to standard conditions. Both are reference data with
effective dates (``reference.GasConversion``). Quantities are kept to 6 decimal places (SPEC §4).
"""

from __future__ import annotations

from decimal import Decimal

from pipeline.money import quantity

VOLUME_UNITS = frozenset({"m3", "m³"})
"""Metric definition units of gas read as a volume (converted to MJ); a metric in ``MJ`` is billed as it is."""
SECTION_ORDER = {"electricity": 0, "gas": 1, "water": 2, "contribution": 9}
"""Order of the invoice's service sections: metered services, then flat services (by name), contributions last."""


def gas_energy_mj(volume_m3: Decimal, heating_value: Decimal, pressure_correction: Decimal) -> Decimal:
    """Gas energy in MJ of ``volume_m3`` cubic metres: ``volume × heating value (MJ/m³) × pressure correction``
    (see the module docstring for the formula's source), rounded half-up to 6 decimal places (SPEC §4).
    Negative volumes (a credited correction) convert the same way. Raises ``ValueError`` when a factor is not
    positive."""
    if heating_value <= 0 or pressure_correction <= 0:
        raise ValueError(f"gas conversion factors must be positive: heating value {heating_value} MJ/m³, "
                         f"pressure correction {pressure_correction}")
    return quantity(volume_m3 * heating_value * pressure_correction)


def section_key(service: str) -> tuple[int, str]:
    """Sort key of an invoice section: electricity, gas, water, flat services by name, contributions."""
    return SECTION_ORDER.get(service, 5), service


def section_title(service: str) -> str:
    """The heading of a service's invoice section (``"voluntary contributions"`` for contributions)."""
    return "voluntary contributions" if service == "contribution" else service
