"""Multi-service accounts and voluntary contributions (issue 17 part C, seed 001): the pure parts, exact.

Gas conversion (m³ → MJ), price books that name their service, flat charges prorated by service days
(SPEC §4), contribution lines, one plan per service, the rating of a window by the book of its service, and
the invoice's sections per service."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.accounts import rules
from pipeline.accounts.rules import AssignPlan, EndPlan, SetGasConversion
from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.invoicing.report import InvoiceLineSummary, InvoiceSummary, format_invoice, services_of
from pipeline.metrics_catalog import MetricDefinition
from pipeline.rating.pricebook import PriceBook
from pipeline.rating.processor import PeriodState, RatingProcessor, recompute, service_days
from pipeline.rating.rate import quantity_key, rate_period
from pipeline.rating.services import gas_energy_mj
from pipeline.records import DeadLetter, RatedCharge, UsageWindow
from pipeline.reference import Account, GasConversion, PlanAssignment, ReferenceData, ServicePoint, TelemetrySubject
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import FakeContext
from pipeline.topology import Topics

D = Decimal
CODEC = default_codec()
TOPICS = Topics(Settings(topic_prefix=""))


def book(book_id: str, service: str, components: list[dict], **extra: object) -> PriceBook:
    return PriceBook.model_validate({
        "id": book_id, "version": 1, "service": service, "currency": "AUD", "timezone": "Australia/Brisbane",
        "holiday_region": None, "effective_from": "2005-01-01", "components": components, **extra})


ELEC = book("ELEC", "electricity", [{"id": "energy", "kind": "per_unit", "metric": "energy_import", "rate": "0.25"},
                                    {"id": "supply", "kind": "fixed_daily", "rate": "1.10"}])
GAS = book("GAS", "gas", [{"id": "gas_usage", "kind": "per_unit", "metric": "gas_volume", "unit": "MJ",
                           "rate": "0.035"},
                          {"id": "gas_supply", "kind": "fixed_daily", "rate": "0.70"}])
WATER = book("WATER", "water", [{"id": "water_usage", "kind": "tiered", "mode": "graduated", "metric": "water_volume",
                                 "unit": "kL", "tiers": [{"up_to": "20", "rate": "2.50"}, {"up_to": None,
                                                                                          "rate": "3.40"}]}])
SEWER = book("SEWER", "sewerage", [{"id": "sewerage", "kind": "fixed_period", "rate": "30.00"}])
GREEN = book("GREEN", "contribution", [{"id": "green", "kind": "contribution", "per": "bill", "amount": "5.00"}])
TREES = book("TREES", "contribution", [{"id": "trees", "kind": "contribution", "per": "day", "amount": "0.10",
                                        "description": "a tree a month"}])


# --- gas conversion ----------------------------------------------------------------------------------------------
def test_gas_volume_converts_to_energy_exactly() -> None:
    # 20.25 m³ × 38.5 MJ/m³ × 0.9871 = 769.5678375 MJ → 769.567838 (6 dp, half-up)
    assert gas_energy_mj(D("20.25"), D("38.5"), D("0.9871")) == D("769.567838")
    # 100 m³ × 38.7 × 1.0 = 3870 MJ exactly; a credited correction converts the same way
    assert gas_energy_mj(D("100"), D("38.7"), D("1")) == D("3870.000000")
    assert gas_energy_mj(D("-1.5"), D("39.2"), D("0.98")) == D("-57.624000")  # 1.5 × 39.2 × 0.98 = 57.624


def test_a_gas_conversion_factor_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        gas_energy_mj(D("1"), D("0"), D("1"))
    with pytest.raises(ValidationError):
        GasConversion(account="A", effective_from=date(2005, 1, 1), heating_value=D("-38.5"),
                      pressure_correction=D("1"))


@given(st.decimals(min_value=0, max_value=10**6, places=3), st.decimals(min_value=30, max_value=45, places=2),
       st.decimals(min_value="0.9", max_value="1.1", places=4))
def test_conversion_is_the_product_to_six_places(m3: Decimal, hv: Decimal, pc: Decimal) -> None:
    mj = gas_energy_mj(m3, hv, pc)
    assert abs(mj - m3 * hv * pc) <= D("0.0000005") and mj.as_tuple().exponent == -6


# --- price books name their service --------------------------------------------------------------------------------
def test_an_electricity_book_keeps_its_canonical_json_and_hash() -> None:
    raw = ELEC.model_dump(mode="json")
    assert "service" not in raw  # the default is left out: books published before services keep their hash
    assert PriceBook.model_validate(raw).content_sha256() == ELEC.content_sha256()
    assert PriceBook.model_validate(raw).service == "electricity"
    assert GAS.model_dump(mode="json")["service"] == "gas"


@pytest.mark.parametrize(("service", "components", "message"), [
    ("gas", [{"id": "u", "kind": "per_unit", "metric": "gas_volume", "unit": "kWh", "rate": "1"}],
     "gas usage is priced in MJ: u (kWh)"),
    ("water", [{"id": "u", "kind": "per_unit", "metric": "water_volume", "unit": "L", "rate": "1"}],
     "water usage is priced in kL: u (L)"),
    ("sewerage", [{"id": "u", "kind": "per_unit", "metric": "x", "unit": "kL", "rate": "1"}],
     "'sewerage' is a flat service"),
    ("electricity", [{"id": "g", "kind": "contribution", "per": "bill", "amount": "1"}],
     "belong in a book of service 'contribution'"),
    ("contribution", [{"id": "s", "kind": "fixed_daily", "rate": "1"}], "contribution components only"),
    ("Gas!", [{"id": "s", "kind": "fixed_daily", "rate": "1"}], "String should match pattern"),
])
def test_components_must_fit_the_service(service: str, components: list[dict], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        book("B", service, components)


# --- rating: flat charges prorated by service days, contributions ----------------------------------------------
def test_flat_charges_and_contributions_prorate_by_service_days() -> None:
    """March 2005 (31 days): sewerage from the 11th (21 days), a per-bill contribution for 10 days, a per-day
    contribution for 15 days, gas supply all month."""
    books = {(b.id, 1): b for b in (SEWER, GREEN, TREES, GAS)}
    lines = rate_period({quantity_key(GAS, "gas_usage", ""): D("1743.403682")},
                        {("SEWER", 1): 21, ("GREEN", 1): 10, ("TREES", 1): 15, ("GAS", 1): 31}, books, 31)
    totals = {k: v.total for k, v in lines.items()}
    assert totals == {
        "SEWER|sewerage|": D("20.32"),      # 30.00 × 21/31 = 20.3225… → 20.32
        "GREEN|green|": D("1.61"),          # 5.00 × 10/31 = 1.6129… → 1.61
        "TREES|trees|": D("1.50"),          # 0.10 × 15 days = 1.50
        "GAS|gas_supply|": D("21.70"),      # 0.70 × 31 days
        "GAS|gas_usage|": D("61.02"),       # 1743.403682 MJ × 0.035 = 61.0191… → 61.02
    }
    assert lines["GREEN|green|"].component_kind == "contribution"
    assert (lines["GREEN|green|"].unit, lines["TREES|trees|"].unit) == ("period", "day")


def test_water_tiers_apply_to_the_period_quantity_in_kl() -> None:
    lines = rate_period({quantity_key(WATER, "water_usage", ""): D("26.5")}, {("WATER", 1): 31},
                        {("WATER", 1): WATER}, 31)
    # 20 kL × 2.50 = 50.00; 6.5 kL × 3.40 = 22.10
    assert {k: v.total for k, v in lines.items()} == {"WATER|water_usage|tier 1": D("50.00"),
                                                      "WATER|water_usage|tier 2": D("22.10")}


# --- reference data: one plan per service ---------------------------------------------------------------------------
GAS_M3 = MetricDefinition(metric="gas_volume", event_type="gas.read", value_path="$.m3", aggregation="sum", unit="m3")
ACC = Account(account="M1", timezone="Australia/Brisbane", holiday_region="AU-QLD", billing_anchor=date(2005, 3, 1),
              currency="AUD")


def plan(book_id: str, service: str, start: str, end: str | None = None) -> PlanAssignment:
    return PlanAssignment(account="M1", price_book_id=book_id, service=service, effective_from=start,
                          effective_to=end)


REF = ReferenceData.build(
    [ACC], [ServicePoint(nmi="NEM1205082", account="M1", effective_from=date(2005, 3, 1))],
    [plan("ELEC", "electricity", "2005-03-01"), plan("GAS", "gas", "2005-03-01"),
     plan("SEWER", "sewerage", "2005-03-11"), plan("GREEN", "contribution", "2005-03-17", "2005-03-27")],
    [ELEC, GAS, SEWER, GREEN],
    [GAS_M3],
    [TelemetrySubject(subject="gas-7", account="M1", effective_from=date(2005, 3, 1))],
    [GasConversion(account="M1", effective_from=date(2005, 3, 1), heating_value=D("38.5"),
                   pressure_correction=D("0.9871"))])


def test_each_metric_is_rated_by_the_book_of_its_service() -> None:
    day = date(2005, 3, 20)
    assert [b.id for b in REF.books_on("M1", day)] == ["ELEC", "GAS", "SEWER", "GREEN"]
    assert REF.book_for("M1", day, "gas_volume") == GAS
    assert REF.book_for("M1", day, "energy_import") == ELEC
    assert REF.book_for("M1", day, "unpriced_metric") == ELEC  # opens the period on the electricity plan
    assert REF.book_on("M1", day, "gas") == GAS and REF.book_on("M1", day) == ELEC
    assert REF.gas_conversion_on("M1", day).factor == D("38.00335")  # type: ignore[union-attr]
    assert REF.gas_conversion_on("M1", date(2005, 2, 28)) is None


def test_service_days_count_for_every_service_and_contribution() -> None:
    ps = PeriodState("M1", date(2005, 3, 1), date(2005, 4, 1))
    assert service_days(ps, REF) == {("ELEC", 1): 31, ("GAS", 1): 31, ("SEWER", 1): 21, ("GREEN", 1): 10}


def test_contribution_and_gas_lines_explain_themselves() -> None:
    ps = PeriodState("M1", date(2005, 3, 1), date(2005, 4, 1))
    ps.quantities[quantity_key(GAS, "gas_usage", "")] = D("769.567838")
    charges = {c.record.component_id: c.record for c in recompute(ps, [], REF)}
    assert {k: r.amount for k, r in charges.items()} == {
        "supply": D("34.10"),      # 31 × 1.10
        "gas_usage": D("26.93"),   # 769.567838 MJ × 0.035 = 26.9348… → 26.93
        "gas_supply": D("21.70"),  # 31 × 0.70
        "sewerage": D("20.32"),    # 30 × 21/31
        "green": D("1.61"),        # 5 × 10/31
    }
    green = json.loads(charges["green"].explanation)
    assert green["service"] == "contribution" and green["kind"] == "contribution"
    assert green["contribution"]["per"] == "bill" and green["contribution"]["amount"] == "5.00"
    assert json.loads(charges["gas_usage"].explanation)["service"] == "gas"


def gas_window(start: datetime, value: str, revision: int = 0, previous: str = "0") -> UsageWindow:
    end = start + timedelta(hours=1)
    return UsageWindow(
        window_id=f"M1|gas_volume|{start:%Y-%m-%dT%H:%MZ}", account="M1", series="gas_volume", metric="gas_volume",
        unit="m3", window_start=start, window_end=end, revision=revision,
        timing="ON_TIME" if revision == 0 else "LATE", value=D(value), delta=D(value) - D(previous), count=1,
        qualities=(), sources=("/test/gas-7",), watermark=end)


def rate_windows(ref: ReferenceData, *wins: UsageWindow) -> list[RatedCharge]:
    proc = RatingProcessor(TOPICS, CODEC, lambda: ref)
    ctx = FakeContext()
    proc.on_assign(0, ctx)
    for i, w in enumerate(wins):
        proc.process(Incoming(TOPICS.usage_windows, 0, i, b"M1", CODEC.encode(w), (), 0), ctx)
        proc.punctuate(0, ctx)
    return [CODEC.decode(v, RatedCharge) for _t, _k, v in ctx.forwarded]


def test_a_gas_window_in_m3_is_rated_in_mj_with_the_factor_of_its_day() -> None:
    """The rating stage converts a gas volume window (``gas_energy_mj``); a correction converts its new value."""
    charges = rate_windows(REF, gas_window(datetime(2005, 3, 8, tzinfo=UTC), "20.25"),
                           gas_window(datetime(2005, 3, 8, tzinfo=UTC), "21.25", revision=1, previous="20.25"))
    gas = [c for c in charges if c.component_id == "gas_usage"]
    # 20.25 m³ → 769.567838 MJ × 0.035 = 26.93; then 21.25 m³ → 807.571188 MJ (21.25 × 38.00335 = 807.57118750
    # → 807.571188) × 0.035 = 28.2649… → 28.26: a delta of 1.33
    assert [(c.quantity, c.unit, c.period_total, c.amount) for c in gas] == [
        (D("769.567838"), "MJ", D("26.93"), D("26.93")), (D("807.571188"), "MJ", D("28.26"), D("1.33"))]
    conversion = json.loads(gas[0].explanation)["windows"][0]["gas_conversion"]
    assert conversion == {"volume_m3": "20.250000", "heating_value_mj_per_m3": "38.5", "pressure_correction": "0.9871",
                          "energy_mj": "769.567838", "formula": "MJ = m³ × heating value × pressure correction"}


def test_a_gas_volume_without_a_conversion_factor_is_dead_lettered() -> None:
    ref = ReferenceData.build([ACC], [], [plan("GAS", "gas", "2005-03-01")], [GAS], [GAS_M3],
                              [TelemetrySubject(subject="gas-7", account="M1", effective_from=date(2005, 3, 1))])
    proc = RatingProcessor(TOPICS, CODEC, lambda: ref)
    ctx = FakeContext()
    proc.on_assign(0, ctx)
    w = gas_window(datetime(2005, 3, 8, tzinfo=UTC), "20.25")
    proc.process(Incoming(TOPICS.usage_windows, 0, 0, b"M1", CODEC.encode(w), (), 0), ctx)
    proc.punctuate(0, ctx)
    (topic, _key, value), = ctx.forwarded
    dead = CODEC.decode(value, DeadLetter)
    assert (topic, dead.reason) == (TOPICS.dlq_ingest, "NO_GAS_CONVERSION_FACTOR")


# --- reference operations -----------------------------------------------------------------------------------------
def registry() -> rules.Registry:
    reg = rules.Registry(books=[ELEC, GAS, SEWER, GREEN, TREES])
    (change,), _ = rules.check(reg, rules.CreateAccount("M1", "Australia/Brisbane", "MONTHLY", date(2005, 3, 1),
                                                        "AUD", holiday_region="AU-QLD"))
    reg.apply(change)
    return reg


def run(reg: rules.Registry, *ops: rules.Operation) -> tuple[list[tuple[str, str]], list[str]]:
    changes, problems = rules.check_all(reg, list(enumerate(ops, start=1)))
    return [(c.operation, c.entity_key) for _, c in changes], [p.code for _, p in problems]


def test_one_plan_per_service_and_contributions_side_by_side() -> None:
    reg = registry()
    assert run(reg, AssignPlan("M1", "ELEC", date(2005, 3, 1)), AssignPlan("M1", "GAS", date(2005, 3, 1)),
               AssignPlan("M1", "SEWER", date(2005, 3, 11)), AssignPlan("M1", "GREEN", date(2005, 3, 17)),
               AssignPlan("M1", "TREES", date(2005, 3, 17))) == ([
                   ("plan.assign", "M1@2005-03-01"), ("plan.assign", "M1@2005-03-01/gas"),
                   ("plan.assign", "M1@2005-03-11/sewerage"),
                   ("contribution.opt_in", "M1@2005-03-17/contribution:GREEN"),
                   ("contribution.opt_in", "M1@2005-03-17/contribution:TREES")], [])
    assert [p.service for p in reg.plans["M1"]] == ["electricity", "gas", "sewerage", "contribution", "contribution"]
    # the same contribution over days it already has: refused; a second gas plan from a later day: a switch
    assert run(reg, AssignPlan("M1", "GREEN", date(2005, 3, 10), date(2005, 3, 20))) == ([], ["OVERLAPPING_DATES"])
    assert run(reg, AssignPlan("M1", "GAS", date(2005, 4, 1))) == (
        [("plan.switch", "M1@2005-03-01/gas"), ("plan.assign", "M1@2005-04-01/gas")], [])
    # opting out closes the contribution; twice is nothing to do
    assert run(reg, EndPlan("M1", "GREEN", date(2005, 3, 27))) == (
        [("contribution.opt_out", "M1@2005-03-17/contribution:GREEN")], [])
    assert run(reg, EndPlan("M1", "GREEN", date(2005, 3, 27))) == ([], [])
    assert run(reg, EndPlan("M1", "GREEN", date(2005, 3, 29)))[1] == ["ALREADY_ENDED"]
    assert run(reg, EndPlan("M1", "NOPE", date(2005, 3, 29)))[1] == ["NOT_ATTACHED"]


def test_gas_conversion_factors_are_effective_dated() -> None:
    reg = registry()
    assert run(reg, SetGasConversion("M1", date(2005, 3, 1), D("38.5"), D("0.9871")),
               SetGasConversion("M1", date(2005, 4, 1), D("38.7"), D("0.9871"))) == (
        [("gas.conversion", "M1@2005-03-01"), ("gas.conversion_end", "M1@2005-03-01"),
         ("gas.conversion", "M1@2005-04-01")], [])
    assert [(g.effective_from, g.effective_to) for g in reg.gas["M1"]] == [
        (date(2005, 3, 1), date(2005, 4, 1)), (date(2005, 4, 1), None)]
    assert run(reg, SetGasConversion("M1", date(2005, 3, 15), D("38.5"), D("1"), date(2005, 3, 20)))[1] == [
        "OVERLAPPING_DATES"]
    assert run(reg, SetGasConversion("M1", date(2005, 6, 1), D("0"), D("1")))[1] == ["INVALID_FIELD"]
    assert run(reg, SetGasConversion("NOBODY", date(2005, 6, 1), D("38"), D("1")))[1] == ["UNKNOWN_ACCOUNT"]


# --- the invoice: one section per service -----------------------------------------------------------------------------
def summary_line(component: str, kind: str, amount: str, service: str, unit: str = "kWh") -> InvoiceLineSummary:
    return InvoiceLineSummary(component, kind, "", D("1"), unit, D("1"), D(amount), 1, service=service)


def test_a_multi_service_invoice_has_a_section_per_service_with_subtotals() -> None:
    inv = InvoiceSummary("M1|2005-03-01|AUD", "M1", date(2005, 3, 1), date(2005, 4, 1), "AUD", "OPEN", (
        summary_line("green", "contribution", "1.61", "contribution", "period"),
        summary_line("energy", "per_unit", "21654.38", "electricity"),
        summary_line("sewerage", "fixed_period", "20.32", "sewerage", "period"),
        summary_line("gas_usage", "per_unit", "61.02", "gas", "MJ"),
        summary_line("gas_supply", "fixed_daily", "21.70", "gas", "day")))
    text = format_invoice(inv)
    heads = [ln.strip() for ln in text.splitlines() if ln.startswith("  ") and not ln.startswith("   ")
             and ln.rstrip().endswith(":")]
    assert heads == ["electricity:", "gas:", "sewerage:", "voluntary contributions:"]
    assert "gas subtotal" in text and text.split("gas subtotal")[1].split()[0] == "82.72"
    assert text.split("CHARGES THIS PERIOD")[1].split()[0] == "21759.03"
    assert list(services_of(inv)) == ["electricity", "gas", "sewerage", "contribution"]


def test_a_single_service_invoice_looks_as_before() -> None:
    inv = InvoiceSummary("A|2005-03-01|AUD", "A", date(2005, 3, 1), date(2005, 4, 1), "AUD", "OPEN", (
        summary_line("energy", "per_unit", "10.00", "electricity"),))
    assert "subtotal" not in format_invoice(inv) and "electricity:" not in format_invoice(inv)


def test_a_reference_file_plan_takes_the_service_of_its_book() -> None:
    from pipeline.reference import ReferenceFile

    raw = {"accounts": [ACC.model_dump(mode="json")], "service_points": [],
           "price_books": [GAS.model_dump(mode="json"), ELEC.model_dump(mode="json")],
           "plan_assignments": [{"account": "M1", "price_book_id": "GAS", "effective_from": "2005-03-01"},
                                {"account": "M1", "price_book_id": "ELEC", "effective_from": "2005-03-01"}]}
    ref = ReferenceFile.model_validate(raw)
    assert [p.service for p in ref.plan_assignments] == ["gas", "electricity"]
    raw["plan_assignments"][0]["service"] = "water"
    with pytest.raises(ValidationError, match="names service 'water', but the book prices 'gas'"):
        ReferenceFile.model_validate(raw)
