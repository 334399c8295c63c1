"""A multi-service account (issue 17 part C, seed 001) end to end on the real broker and real Postgres.

One account is billed for electricity (a real NEM12 file), gas (CloudEvents telemetry in m³, converted to MJ
with the account's conversion factor), water (telemetry in kL), a flat sewerage charge and a voluntary
contribution. The reference data goes in through the operations path (``pipeline accounts import`` of a JSON
file, then ``plans assign``, ``plans end`` and ``meters gas-factor``), each change audited. The finalized
invoice sums to the total computed by hand below, to the cent, and shows each service in its own section.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.ingest.nem12 import read_nem12
from pipeline.ingest.telemetry import encode_cloudevent
from pipeline.rating.pricebook import PriceBook
from pipeline.reference import ReferenceFile
from pipeline.refstore import load_reference_file
from pipeline.runtime import postgres
from tests.integration import test_operator_api
from tests.integration.conftest import DATA, Env, isolated_env, publish_files
from tests.integration.test_operator_api import OP, TestClient
from tests.integration.test_reference_operations import cli

pytestmark = pytest.mark.integration

ACCOUNT = "MULTI-1"
NEM12_FILE = DATA / "nem12" / "NEM12#000000000000005#CNRGYMDP#NEMMCO.zip"  # NMI NEM1205082, E1, 19–23 Mar 2005
CENT = Decimal("0.01")
client = test_operator_api.client  # the operator API fixture (FastAPI TestClient, operator key "alice")


def book(book_id: str, service: str, components: list[dict]) -> dict:
    return {"id": book_id, "version": 1, "service": service, "currency": "AUD", "timezone": "Australia/Brisbane",
            "holiday_region": None, "effective_from": "2005-01-01", "components": components}


BOOKS = [
    book("MS-ELEC", "electricity", [
        {"id": "energy", "kind": "per_unit", "metric": "energy_import", "unit": "kWh", "rate": "0.25"},
        {"id": "supply", "kind": "fixed_daily", "rate": "1.10"}]),
    book("MS-GAS", "gas", [
        {"id": "gas_usage", "kind": "per_unit", "metric": "gas_volume", "unit": "MJ", "rate": "0.035"},
        {"id": "gas_supply", "kind": "fixed_daily", "rate": "0.70"}]),
    book("MS-WATER", "water", [
        {"id": "water_usage", "kind": "per_unit", "metric": "water_volume", "unit": "kL", "rate": "3.10"},
        {"id": "water_service", "kind": "fixed_period", "rate": "25.00"}]),
    book("MS-SEWER", "sewerage", [{"id": "sewerage", "kind": "fixed_period", "rate": "30.00"}]),
    book("GREEN-DONATION", "contribution", [
        {"id": "green_power", "kind": "contribution", "per": "bill", "amount": "5.00",
         "description": "community solar fund"}]),
]
REFERENCE = {
    "accounts": [{"account": ACCOUNT, "name": "house with four services", "timezone": "Australia/Brisbane",
                  "holiday_region": "AU-QLD", "billing_cycle": "MONTHLY", "billing_anchor": "2005-03-01",
                  "net_days": 14, "currency": "AUD"}],
    "service_points": [{"nmi": "NEM1205082", "account": ACCOUNT, "effective_from": "2005-03-01"}],
    "telemetry_subjects": [{"subject": "gas-meter-7", "account": ACCOUNT, "effective_from": "2005-03-01"},
                           {"subject": "water-meter-7", "account": ACCOUNT, "effective_from": "2005-03-01"}],
    "metric_definitions": [
        {"metric": "gas_volume", "event_type": "au.meter.gas.read", "value_path": "$.m3", "aggregation": "sum",
         "unit": "m3", "window_minutes": 60},
        {"metric": "water_volume", "event_type": "au.meter.water.read", "value_path": "$.kl", "aggregation": "sum",
         "unit": "kL", "window_minutes": 60}],
    "price_books": BOOKS,
    "plan_assignments": [
        {"account": ACCOUNT, "price_book_id": "MS-ELEC", "effective_from": "2005-03-01"},
        {"account": ACCOUNT, "price_book_id": "MS-GAS", "service": "gas", "effective_from": "2005-03-01"},
        {"account": ACCOUNT, "price_book_id": "MS-WATER", "service": "water", "effective_from": "2005-03-01"}],
}
# (subject, event type, UTC time, data): each read in its own hourly window, midday in Brisbane (UTC+10)
READS = [
    ("gas-meter-7", "au.meter.gas.read", datetime(2005, 3, 5, 2, tzinfo=UTC), {"m3": "10.5"}),
    ("gas-meter-7", "au.meter.gas.read", datetime(2005, 3, 12, 2, tzinfo=UTC), {"m3": "20.25"}),
    ("gas-meter-7", "au.meter.gas.read", datetime(2005, 3, 20, 2, tzinfo=UTC), {"m3": "15.125"}),
    ("water-meter-7", "au.meter.water.read", datetime(2005, 3, 3, 2, tzinfo=UTC), {"kl": "0.35"}),
    ("water-meter-7", "au.meter.water.read", datetime(2005, 3, 15, 2, tzinfo=UTC), {"kl": "0.42"}),
    ("water-meter-7", "au.meter.water.read", datetime(2005, 3, 28, 2, tzinfo=UTC), {"kl": "0.28"}),
]


def cents(x: Decimal) -> Decimal:
    return x.quantize(CENT, rounding=ROUND_HALF_UP)  # SPEC §4: each component's period total, half-up


def expected_lines() -> dict[str, Decimal]:
    """The bill of March 2005 (31 days) by hand, from the inputs above; ``book|component`` → AUD."""
    kwh = sum((r.value for r in read_nem12(NEM12_FILE).readings), Decimal(0))
    assert kwh == Decimal("86617.500")  # the 288 E1 intervals of the file, all on 20–23 March (Brisbane)
    factor = Decimal("38.5") * Decimal("0.9871")  # heating value 38.5 MJ/m³ × pressure correction 0.9871
    assert factor == Decimal("38.00335")
    # each hourly window converted on its own, MJ kept to 6 dp (half-up):
    #   10.5 × 38.00335 = 399.035175;  20.25 × 38.00335 = 769.5678375 → 769.567838;
    #   15.125 × 38.00335 = 574.80066875 → 574.800669;  sum = 1743.403682 MJ
    mj = sum((Decimal(v).__mul__(factor).quantize(Decimal("0.000001"), ROUND_HALF_UP)
              for v in ("10.5", "20.25", "15.125")), Decimal(0))
    assert mj == Decimal("1743.403682")
    return {
        "MS-ELEC|energy": cents(kwh * Decimal("0.25")),               # 86617.5 × 0.25 = 21654.375 → 21654.38
        "MS-ELEC|supply": cents(31 * Decimal("1.10")),                 # 31 service days × 1.10 = 34.10
        "MS-GAS|gas_usage": cents(mj * Decimal("0.035")),              # 1743.403682 × 0.035 = 61.0191… → 61.02
        "MS-GAS|gas_supply": cents(31 * Decimal("0.70")),              # 31 × 0.70 = 21.70
        "MS-WATER|water_usage": cents(Decimal("1.05") * Decimal("3.10")),  # (0.35+0.42+0.28) kL × 3.10 = 3.255 → 3.26
        "MS-WATER|water_service": cents(Decimal("25.00")),             # per period, 31/31 days = 25.00
        "MS-SEWER|sewerage": cents(Decimal("30.00") * 21 / 31),        # from 11 Mar: 30 × 21/31 = 20.3225… → 20.32
        "GREEN-DONATION|green_power": cents(Decimal("5.00") * 10 / 31),  # opted in 17 Mar, out 27 Mar: 5 × 10/31 → 1.61
    }


def test_one_account_with_four_services_and_a_contribution_bills_to_the_cent(base_settings: Settings,
                                                                            tmp_path: Path) -> None:
    want = expected_lines()
    assert list(want.values()) == [Decimal(x) for x in ("21654.38", "34.10", "61.02", "21.70", "3.26", "25.00",
                                                         "20.32", "1.61")]
    total = sum(want.values(), Decimal(0))
    assert total == Decimal("21821.39")
    with isolated_env(base_settings, tmp_path / "multi", reference=False) as env:
        _onboard(env, tmp_path)
        env.env["PIPELINE_INVOICE_IDLE_CLOSE_S"] = "20"
        env.start_all()
        published = publish_files(env, [NEM12_FILE])
        producer = env.producer()
        for i, (subject, kind, at, data) in enumerate(READS):
            value, headers = encode_cloudevent({"id": f"read-{i}", "source": "/test/meters", "type": kind,
                                                "subject": subject, "time": at,
                                                "datacontenttype": "application/json"}, data)
            producer.send(env.topics.telemetry_events, subject.encode(), value, headers)
        producer.flush()
        report = env.wait_accounted(published=published + len(READS))
        assert (report.billed, report.dead_lettered, report.refused) == (published + len(READS), 0, {})
        env.wait_all_finalized()
        env.assert_invoice_structure()

        got = {f"{b}|{c}": t for b, c, t in env.sql(
            "SELECT price_book_id, component_id, sum(amount) FROM invoice_lines GROUP BY 1, 2")}
        assert got == want
        (status, charges), = env.sql("SELECT status, charges_total FROM invoices WHERE account = %s", (ACCOUNT,))
        assert (status, charges) == ("FINALIZED", total)

        shown = cli(env, "invoice", "show", ACCOUNT).stdout
        sections = _sections(shown)
        assert list(sections) == ["electricity", "gas", "water", "sewerage", "voluntary contributions"]
        assert sections == {
            "electricity": ["energy", "supply"], "gas": ["gas_usage", "gas_supply"],
            "water": ["water_usage", "water_service"], "sewerage": ["sewerage"],
            "voluntary contributions": ["green_power"]}
        for title, amount in [("electricity", "21688.48"), ("gas", "82.72"), ("water", "28.26"),
                              ("sewerage", "20.32"), ("voluntary contributions", "1.61")]:
            assert f"{title} subtotal" in shown and f" {amount} AUD" in shown.split(f"{title} subtotal")[1][:80]
        assert " 21821.39 AUD" in shown.split("CHARGES THIS PERIOD")[1].splitlines()[0]

        # every gas window's conversion is in the explanation of the line it caused
        gas = env.sql("SELECT line_id, explanation FROM invoice_lines WHERE component_id = 'gas_usage'")
        conversions = {(w["gas_conversion"]["volume_m3"], w["gas_conversion"]["energy_mj"])
                       for _, exp in gas for w in exp["windows"]}
        assert conversions == {("10.500000", "399.035175"), ("20.250000", "769.567838"),
                               ("15.125000", "574.800669")}
        assert {exp["service"] for _, exp in gas} == {"gas"}
        why = "\n".join(cli(env, "explain", line_id).stdout for line_id, _ in gas)
        assert "service: gas" in why and "gas: 20.250000 m³ × 38.5 MJ/m³ × 0.9871 = 769.567838 MJ" in why
        (donation,), = env.sql("SELECT line_id FROM invoice_lines WHERE component_id = 'green_power' LIMIT 1")
        assert "voluntary contribution: 5.00 AUD per bill (community solar fund)" in cli(env, "explain",
                                                                                          donation).stdout
        assert env.stop_all() == {s: [0] for s in ("ingest", "windowing", "rating", "invoicing")}


def _onboard(env: Env, tmp_path: Path) -> None:
    """Reference data through the operations path, then the changes an operator makes, each audited."""
    ref = tmp_path / "multi.json"
    ref.write_text(json.dumps(REFERENCE))
    cli(env, "accounts", "import", str(ref), "--no-progress")
    cli(env, "meters", "gas-factor", ACCOUNT, "--from", "2005-03-01", "--heating-value", "38.5",
        "--pressure-correction", "0.9871")
    cli(env, "plans", "assign", ACCOUNT, "MS-SEWER", "--from", "2005-03-11")
    cli(env, "plans", "assign", ACCOUNT, "GREEN-DONATION", "--from", "2005-03-17")
    cli(env, "plans", "end", ACCOUNT, "GREEN-DONATION", "--on", "2005-03-27")
    # a second electricity plan overlapping the first is refused: one plan per service at a time
    refused = cli(env, "plans", "assign", ACCOUNT, "MS-ELEC", "--from", "2005-03-01", "--to", "2005-03-05", ok=False)
    assert refused.returncode == 1 and "OVERLAPPING_DATES" in refused.stderr
    audit = env.sql("SELECT operation, entity, entity_key, effective::text FROM reference_changes "
                    "WHERE operation NOT IN ('account.create', 'meter.attach', 'subject.attach') ORDER BY change_id")
    assert audit == [
        ("plan.assign", "plan_assignment", f"{ACCOUNT}@2005-03-01", "2005-03-01"),
        ("plan.assign", "plan_assignment", f"{ACCOUNT}@2005-03-01/gas", "2005-03-01"),
        ("plan.assign", "plan_assignment", f"{ACCOUNT}@2005-03-01/water", "2005-03-01"),
        ("gas.conversion", "gas_conversion", f"{ACCOUNT}@2005-03-01", "2005-03-01"),
        ("plan.assign", "plan_assignment", f"{ACCOUNT}@2005-03-11/sewerage", "2005-03-11"),
        ("contribution.opt_in", "plan_assignment", f"{ACCOUNT}@2005-03-17/contribution:GREEN-DONATION", "2005-03-17"),
        ("contribution.opt_out", "plan_assignment", f"{ACCOUNT}@2005-03-17/contribution:GREEN-DONATION",
         "2005-03-27"),
    ]


def _sections(text: str) -> dict[str, list[str]]:
    """Section heading → the component ids listed under it, from ``invoice show``."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            current = line.strip()[:-1]
            out[current] = []
        elif current and line.startswith("    ") and "subtotal" not in line and "CHARGES THIS PERIOD" not in line:
            out[current].append(line.split()[0])
        elif "CHARGES THIS PERIOD" in line:
            current = None
    return out


def test_the_operator_api_assigns_services_sets_gas_factors_and_records_opt_outs(client: TestClient,
                                                                                pipeline_env: Env) -> None:
    """The same operations through the operator API (issue 15 pattern): audited with the key's name."""
    env = pipeline_env
    catalog = ReferenceFile(accounts=(), service_points=(), plan_assignments=(),
                            price_books=tuple(PriceBook.model_validate(b) for b in BOOKS))
    postgres.with_reconnect(env.settings.database_url, lambda c: load_reference_file(c, catalog))
    r = client.post("/v1/accounts", json={"account": "MULTI-2", "timezone": "Australia/Brisbane",
                                          "billing_cycle": "MONTHLY", "billing_anchor": "2005-03-01",
                                          "currency": "AUD", "holiday_region": "AU-QLD"}, headers=OP)
    assert r.status_code == 201
    for book_id in ("MS-ELEC", "MS-GAS", "GREEN-DONATION"):
        r = client.post("/v1/accounts/MULTI-2/plans", json={"price_book_id": book_id, "effective_from": "2005-03-01"},
                        headers=OP)
        assert r.status_code == 201, r.json()
    r = client.post("/v1/accounts/MULTI-2/gas-conversion", json={
        "effective_from": "2005-03-01", "heating_value": "38.5", "pressure_correction": "0.9871"}, headers=OP)
    assert r.status_code == 201 and r.json()["changes"][0]["operation"] == "gas.conversion"
    r = client.post("/v1/accounts/MULTI-2/gas-conversion", json={
        "effective_from": "2005-04-01", "heating_value": "-1", "pressure_correction": "1"}, headers=OP)
    assert r.status_code == 422 and r.json()["error"]["code"] == "INVALID_FIELD"
    r = client.post("/v1/accounts/MULTI-2/plans/GREEN-DONATION/end", json={"on": "2005-03-20"}, headers=OP)
    assert r.status_code == 200
    assert [(c["operation"], c["after"]["effective_to"]) for c in r.json()["changes"]] == [
        ("contribution.opt_out", "2005-03-20")]
    shown = client.get("/v1/accounts/MULTI-2", headers=OP).json()
    assert [(p["price_book_id"], p.get("service", "electricity"), p["effective_to"])
            for p in shown["plan_assignments"]] == [
        ("GREEN-DONATION", "contribution", "2005-03-20"), ("MS-ELEC", "electricity", None), ("MS-GAS", "gas", None)]
    assert shown["gas_conversions"] == [{"account": "MULTI-2", "effective_from": "2005-03-01", "effective_to": None,
                                         "heating_value": "38.500000", "pressure_correction": "0.987100"}]
    assert env.sql("SELECT operation, changed_by FROM reference_changes WHERE account = 'MULTI-2' ORDER BY change_id") \
        == [("account.create", "alice"), ("plan.assign", "alice"), ("plan.assign", "alice"),
            ("contribution.opt_in", "alice"), ("gas.conversion", "alice"), ("contribution.opt_out", "alice")]
