"""The example price books of the README's tariff schema section are valid (pydantic) and say what the
README says of them; its quoted validation errors are the ones the model gives (issue 14)."""

from __future__ import annotations

import copy
import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.rating.pricebook import DemandComponent, PriceBook, TouComponent
from pipeline.rating.rate import quantity_key, rate_period

README = Path(__file__).resolve().parents[2] / "README.md"


def section() -> str:
    text = README.read_text()
    start = text.index("### Tariff schema: demand intervals, tiers inside TOU, block demand, books without holidays")
    return text[start:text.index("\n## ", start)]


def examples() -> dict[str, dict]:
    blocks = re.findall(r"```json\n(.*?)\n```", section(), re.S)
    books = [json.loads(b) for b in blocks]
    return {b["id"]: b for b in books}


def test_the_readme_shows_one_valid_example_of_each_new_field() -> None:
    books = {k: PriceBook.model_validate(v) for k, v in examples().items()}
    assert list(books) == ["BIZ-DEMAND", "HOME-TOU-BLOCKS", "NETWORK-BLOCK-DEMAND", "C&I-FLAT-TOU"]
    demand = [c for c in books["BIZ-DEMAND"].components if isinstance(c, DemandComponent)]
    assert [(c.interval_minutes, c.band) for c in demand] == [(15, None), (30, "peak")]
    tou = books["HOME-TOU-BLOCKS"].components[0]
    assert isinstance(tou, TouComponent) and len(tou.tiers) == 2 and all(b.rate is None for b in tou.bands)
    block = books["NETWORK-BLOCK-DEMAND"].components[1]
    assert isinstance(block, DemandComponent) and block.rate is None and len(block.blocks) == 2
    assert books["C&I-FLAT-TOU"].holiday_region is None


def test_the_readme_numbers_are_what_rating_computes() -> None:
    tou = PriceBook.model_validate(examples()["HOME-TOU-BLOCKS"])
    lines = rate_period({quantity_key(tou, "energy", "peak"): Decimal(600),
                         quantity_key(tou, "energy", "off_peak"): Decimal(900)}, {}, {(tou.id, 1): tou})
    assert sum(v.total for v in lines.values()) == Decimal("336.00")  # README: 120 + 90 + 72 + 54
    blocks = PriceBook.model_validate(examples()["NETWORK-BLOCK-DEMAND"])
    lines = rate_period({}, {}, {(blocks.id, 1): blocks}, None, {quantity_key(blocks, "demand", ""): Decimal("16.5")})
    assert [v.total for v in lines.values()] == [Decimal("120.00"), Decimal("52.00")]


@pytest.mark.parametrize(("book", "edit"), [
    ("HOME-TOU-BLOCKS", lambda b: b["components"][0]["tiers"][1]["rates"].pop("off_peak")),
    ("BIZ-DEMAND", lambda b: b["components"][1].update(interval_minutes=60)),
    ("C&I-FLAT-TOU", lambda b: b["components"][0]["bands"][0]["times"][0]["day_types"].append("holiday")),
])
def test_the_errors_the_readme_quotes_are_the_models(book: str, edit) -> None:
    raw = copy.deepcopy(examples()[book])
    edit(raw)
    with pytest.raises(ValidationError) as caught:
        PriceBook.model_validate(raw)
    message = caught.value.errors()[0]["msg"].removeprefix("Value error, ")
    assert f"`{message}`" in " ".join(section().split()), message


# --- multi-service accounts (issue 17 part C, seed 001) ------------------------------------------------------------
def service_examples() -> dict[str, PriceBook]:
    text = README.read_text()
    start = text.index("## Multi-service accounts and voluntary contributions")
    blocks = re.findall(r"```json\n(.*?)\n```", text[start:text.index("\n## ", start + 5)], re.S)
    return {b.id: b for b in (PriceBook.model_validate(json.loads(raw)) for raw in blocks)}


def test_the_readme_shows_a_valid_price_book_per_service() -> None:
    books = service_examples()
    assert {b.id: b.service for b in books.values()} == {
        "HOME-ELEC": "electricity", "HOME-GAS": "gas", "HOME-WATER": "water", "HOME-SEWERAGE": "sewerage",
        "GREEN-DONATION": "contribution"}


def test_the_readme_multi_service_numbers_are_what_rating_computes() -> None:
    from pipeline.rating.services import gas_energy_mj

    b = service_examples()
    mj = gas_energy_mj(Decimal(100), Decimal("38.5"), Decimal("0.9871"))
    assert mj == Decimal("3800.335000")
    lines = rate_period(
        {quantity_key(b["HOME-GAS"], "gas_usage", ""): mj,
         quantity_key(b["HOME-WATER"], "water_usage", ""): Decimal("26.5")},
        {("HOME-GAS", 1): 31, ("HOME-WATER", 1): 31, ("HOME-SEWERAGE", 1): 21, ("GREEN-DONATION", 1): 10},
        {(x.id, 1): x for x in b.values()}, 31)
    assert {k: v.total for k, v in lines.items()} == {
        "HOME-GAS|gas_usage|": Decimal("133.01"), "HOME-WATER|water_usage|tier 1": Decimal("50.00"),
        "HOME-WATER|water_usage|tier 2": Decimal("22.10"), "HOME-SEWERAGE|sewerage|": Decimal("20.32"),
        "GREEN-DONATION|green_power|": Decimal("1.61"),
        "HOME-GAS|gas_supply|": Decimal("21.70"), "HOME-WATER|water_service|": Decimal("25.00")}
