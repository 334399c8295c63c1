"""``pipeline.rating.pricebook`` and ``pipeline.reference``: validation, content hash, TOU bands,
day types (DST, public holidays), versions in effect, effective-dated NMI → account."""

from __future__ import annotations

import copy
import json
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.rating.pricebook import PriceBook, TouComponent, book_in_effect
from pipeline.reference import BUNDLED_REFERENCE, Account, ReferenceData, ReferenceFile, ServicePoint

BOOK_ID = "ACTEWAGL-HOME-TOU"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture(scope="module")
def raw_book() -> dict[str, Any]:
    return json.loads(BUNDLED_REFERENCE.read_text())["price_books"][0]


@pytest.fixture(scope="module")
def bundled() -> ReferenceFile:
    return ReferenceFile.read(BUNDLED_REFERENCE)


@pytest.fixture(scope="module")
def book(bundled: ReferenceFile) -> PriceBook:
    return bundled.price_books[0]


def _energy(book: PriceBook) -> TouComponent:
    comp = next(c for c in book.components if c.id == "energy")
    assert isinstance(comp, TouComponent)
    return comp


def _variant(raw: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    out.update(changes)
    return out


# --- the bundled reference file -----------------------------------------------------------------------
def test_bundled_reference_loads(bundled: ReferenceFile, book: PriceBook) -> None:
    metered = [a for a in bundled.accounts if not a.account.startswith("TEL-")]  # TEL-*: the telemetry sample
    assert len(metered) == 52
    assert len(bundled.service_points) == 52
    assert len([p for p in bundled.plan_assignments if not p.account.startswith("TEL-")]) == 52
    assert [b.id for b in bundled.price_books] == [BOOK_ID, "ACTEWAGL-HOME",  # + the flat Home plan (NEM13 NMIs)
                                                   "SAMPLE-SAAS-USAGE"]  # + the telemetry sample
    assert (book.id, book.version, book.currency, book.timezone) == (BOOK_ID, 1, "AUD", "Etc/GMT-10")
    energy = _energy(book)
    assert energy.default_band == "off_peak"
    assert [(b.band, b.rate) for b in energy.bands] == [
        ("peak", Decimal("0.3403")), ("shoulder", Decimal("0.2362")), ("off_peak", Decimal("0.1995"))
    ]
    ref = ReferenceData.from_file(bundled)
    assert ref.account_of("NEM1201002", date(2005, 3, 15)) == "ACC-1002"
    assert ref.account_of("NEM1201002", date(2005, 3, 14)) is None
    assert ref.book_on("ACC-1002", date(2005, 3, 15)) == book
    assert ref.book_on("ACC-1002", date(2003, 12, 31)) is None  # before the plan assignment


def test_reference_file_rejects_service_point_of_unknown_account() -> None:
    raw = json.loads(BUNDLED_REFERENCE.read_text())
    raw["service_points"].append({"nmi": "NEMX", "account": "ACC-NOPE", "effective_from": "2005-01-01"})
    with pytest.raises(ValidationError, match="unknown account ACC-NOPE"):
        ReferenceFile.model_validate(raw)


# --- validation ---------------------------------------------------------------------------------------
def test_float_rate_rejected(raw_book: dict[str, Any]) -> None:
    bad = copy.deepcopy(raw_book)
    bad["components"][1]["rate"] = 0.9375
    with pytest.raises(ValidationError, match="not float"):
        PriceBook.model_validate(bad)
    bad = copy.deepcopy(raw_book)
    bad["components"][0]["bands"][0]["rate"] = 0.3403
    with pytest.raises(ValidationError, match="not float"):
        PriceBook.model_validate(bad)


def test_float_rate_rejected_from_json_text(raw_book: dict[str, Any]) -> None:
    text = json.dumps(raw_book).replace('"rate_percent": "10"', '"rate_percent": 10.0')
    assert '"rate_percent": 10.0' in text
    with pytest.raises(ValidationError, match="not float"):
        PriceBook.model_validate(json.loads(text))


def test_negative_rate_rejected(raw_book: dict[str, Any]) -> None:
    bad = copy.deepcopy(raw_book)
    bad["components"][2]["rate"] = "-0.075"
    with pytest.raises(ValidationError):
        PriceBook.model_validate(bad)


def test_duplicate_component_ids_rejected(raw_book: dict[str, Any]) -> None:
    bad = copy.deepcopy(raw_book)
    bad["components"][2]["id"] = "supply"
    with pytest.raises(ValidationError, match="duplicate component ids"):
        PriceBook.model_validate(bad)


def test_tax_on_unknown_component_rejected(raw_book: dict[str, Any]) -> None:
    bad = copy.deepcopy(raw_book)
    bad["components"][3]["applies_to"] = ["energy", "supply", "metering"]
    with pytest.raises(ValidationError, match=r"applies to unknown components \['metering'\]"):
        PriceBook.model_validate(bad)


def test_unknown_currency_rejected(raw_book: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="unknown currency 'XYZ'"):
        PriceBook.model_validate(_variant(raw_book, currency="XYZ"))


@pytest.mark.parametrize("tz", ["Mars/Olympus_Mons", "Australia/Canberra_Nope"])
def test_unknown_timezone_rejected(raw_book: dict[str, Any], tz: str) -> None:
    with pytest.raises(ValidationError, match="unknown timezone"):
        PriceBook.model_validate(_variant(raw_book, timezone=tz))


@pytest.mark.parametrize(("start", "end"), [("09:00", "09:00"), ("22:00", "07:00")])
def test_empty_or_wrapping_time_range_rejected(raw_book: dict[str, Any], start: str, end: str) -> None:
    bad = copy.deepcopy(raw_book)
    bad["components"][0]["bands"][0]["times"][0].update(start=start, end=end)
    with pytest.raises(ValidationError, match="empty or wraps midnight"):
        PriceBook.model_validate(bad)


@pytest.mark.parametrize("hhmm", ["24:30", "07:60", "25:00"])
def test_bad_clock_time_rejected(raw_book: dict[str, Any], hhmm: str) -> None:
    bad = copy.deepcopy(raw_book)
    bad["components"][0]["bands"][0]["times"][0]["end"] = hhmm
    with pytest.raises(ValidationError, match="not HH:MM"):
        PriceBook.model_validate(bad)


def test_default_band_must_be_a_band(raw_book: dict[str, Any]) -> None:
    bad = copy.deepcopy(raw_book)
    bad["components"][0]["default_band"] = "super_off_peak"
    with pytest.raises(ValidationError, match="default band 'super_off_peak' is not among the bands"):
        PriceBook.model_validate(bad)


def test_unknown_holiday_region_and_bad_effective_range_rejected(raw_book: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="unknown holiday region"):
        PriceBook.model_validate(_variant(raw_book, holiday_region="XX-YY"))
    with pytest.raises(ValidationError, match="effective_to must be after effective_from"):
        PriceBook.model_validate(_variant(raw_book, effective_to="2004-01-01"))


def test_the_valid_book_passes(raw_book: dict[str, Any]) -> None:
    assert PriceBook.model_validate(raw_book).components[3].applies_to == ("energy", "supply")


# --- content hash ---------------------------------------------------------------------------------------
def test_content_sha256_stable_and_sensitive(raw_book: dict[str, Any], book: PriceBook) -> None:
    h = book.content_sha256()
    assert len(h) == 64 and int(h, 16) >= 0
    assert book.content_sha256() == h
    assert PriceBook.model_validate(copy.deepcopy(raw_book)).content_sha256() == h
    # round trip through its own canonical JSON gives the same hash (what the pricebooks topic carries)
    assert PriceBook.model_validate_json(book.canonical_json()).content_sha256() == h
    changed = copy.deepcopy(raw_book)
    changed["components"][0]["bands"][0]["rate"] = "0.3404"
    h_peak = PriceBook.model_validate(changed).content_sha256()
    assert h_peak != h
    supply = copy.deepcopy(raw_book)
    supply["components"][1]["rate"] = "0.9376"
    assert PriceBook.model_validate(supply).content_sha256() not in {h, h_peak}


# --- TOU bands of the bundled book (AEST, Etc/GMT-10, every day) ---------------------------------------
@pytest.mark.parametrize(
    ("at", "band"),
    [
        (utc(2005, 3, 15, 7, 30), "peak"),  # 17:30 AEST
        (utc(2005, 3, 14, 21, 0), "peak"),  # 07:00 AEST (start inclusive)
        (utc(2005, 3, 14, 22, 59), "peak"),  # 08:59 AEST
        (utc(2005, 3, 14, 23, 0), "shoulder"),  # 09:00 AEST (end exclusive)
        (utc(2005, 3, 15, 6, 59), "shoulder"),  # 16:59 AEST
        (utc(2005, 3, 15, 7, 0), "peak"),  # 17:00 AEST
        (utc(2005, 3, 15, 10, 0), "shoulder"),  # 20:00 AEST
        (utc(2005, 3, 15, 11, 59), "shoulder"),  # 21:59 AEST
        (utc(2005, 3, 15, 12, 0), "off_peak"),  # 22:00 AEST
        (utc(2005, 3, 15, 14, 0), "off_peak"),  # 00:00 AEST
        (utc(2005, 3, 14, 20, 59), "off_peak"),  # 06:59 AEST
        (utc(2005, 1, 15, 8, 0), "peak"),  # Saturday 18:00 AEST: every day type
        (utc(2005, 1, 26, 8, 0), "peak"),  # Australia Day 18:00 AEST: holidays too
        (utc(2005, 1, 26, 11, 0), "shoulder"),  # 21:00 AEST
        (utc(2005, 1, 26, 12, 0), "off_peak"),  # 22:00 AEST
    ],
)
def test_band_of_bundled_book(book: PriceBook, at: datetime, band: str) -> None:
    assert book.band_of(_energy(book), at) == band


def test_bundled_book_ignores_daylight_saving(book: PriceBook) -> None:
    """Summer instant: 2005-01-20 06:30 UTC is 16:30 AEST (shoulder) but 17:30 AEDT (peak)."""
    assert book.band_of(_energy(book), utc(2005, 1, 20, 6, 30)) == "shoulder"
    assert book.day_type(date(2005, 1, 26)) == "holiday"
    assert book.day_type(date(2005, 1, 22)) == "weekend"
    assert book.day_type(date(2005, 1, 20)) == "weekday"


# --- a Sydney book with DST and weekday-only peak ----------------------------------------------------------
def _sydney_book(raw_book: dict[str, Any]) -> PriceBook:
    raw = copy.deepcopy(raw_book)
    raw.update(id="NSW-TEST", timezone="Australia/Sydney", holiday_region="AU-NSW")
    raw["components"][0]["bands"] = [
        {"band": "peak", "rate": "0.50", "times": [
            {"day_types": ["weekday"], "start": "07:00", "end": "09:00"},
            {"day_types": ["weekday"], "start": "17:00", "end": "20:00"},
        ]},
        {"band": "shoulder", "rate": "0.30", "times": [
            {"day_types": ["weekend"], "start": "01:00", "end": "02:00"},
            {"day_types": ["weekend"], "start": "03:00", "end": "04:00"},
        ]},
        {"band": "off_peak", "rate": "0.20", "times": []},
    ]
    return PriceBook.model_validate(raw)


@pytest.mark.parametrize(
    ("at", "band"),
    [
        # Sunday 2024-10-06: 02:00 AEST → 03:00 AEDT at 16:00Z on the 5th
        (utc(2024, 10, 5, 14, 59), "off_peak"),  # 00:59 AEST
        (utc(2024, 10, 5, 15, 0), "shoulder"),  # 01:00 AEST
        (utc(2024, 10, 5, 15, 30), "shoulder"),  # 01:30 AEST (read as +11 it would be 02:30 → off_peak)
        (utc(2024, 10, 5, 15, 59), "shoulder"),  # 01:59 AEST
        (utc(2024, 10, 5, 16, 0), "shoulder"),  # 03:00 AEDT (read as +10 it would be 02:00 → off_peak)
        (utc(2024, 10, 5, 16, 30), "shoulder"),  # 03:30 AEDT
        (utc(2024, 10, 5, 16, 59), "shoulder"),  # 03:59 AEDT
        (utc(2024, 10, 5, 17, 0), "off_peak"),  # 04:00 AEDT
        (utc(2024, 10, 6, 7, 30), "off_peak"),  # Sunday 18:30 AEDT: peak is weekday-only
        # weekdays around the change: Friday in AEST, Tuesday in AEDT (Monday 7th is Labour Day)
        (utc(2024, 10, 4, 9, 30), "peak"),  # Fri 19:30 AEST
        (utc(2024, 10, 4, 10, 0), "off_peak"),  # Fri 20:00 AEST
        (utc(2024, 10, 8, 8, 30), "peak"),  # Tue 19:30 AEDT
        (utc(2024, 10, 8, 9, 30), "off_peak"),  # Tue 20:30 AEDT (would be 19:30 → peak at +10)
        (utc(2024, 10, 7, 20, 30), "peak"),  # Tue 07:30 AEDT (would be 06:30 → off_peak at +10)
        (utc(2024, 10, 7, 8, 30), "off_peak"),  # Mon 19:30 AEDT, Labour Day NSW: holiday
    ],
)
def test_band_of_sydney_book_across_dst(raw_book: dict[str, Any], at: datetime, band: str) -> None:
    book = _sydney_book(raw_book)
    assert book.band_of(_energy(book), at) == band


def test_public_holiday_priced_by_default_band(raw_book: dict[str, Any]) -> None:
    book = _sydney_book(raw_book)
    energy = _energy(book)
    assert book.day_type(date(2024, 1, 26)) == "holiday"  # Australia Day, a Friday
    assert book.day_type(date(2024, 1, 25)) == "weekday"
    assert book.day_type(date(2024, 1, 27)) == "weekend"
    assert book.day_type(date(2024, 10, 7)) == "holiday"  # Labour Day NSW
    # 07:30 UTC in January is 18:30 AEDT
    assert book.band_of(energy, utc(2024, 1, 25, 7, 30)) == "peak"
    assert book.band_of(energy, utc(2024, 1, 26, 7, 30)) == "off_peak"
    # the holiday follows the local date: 20:30Z on the 25th is already Friday the 26th in Sydney
    assert book.band_of(energy, utc(2024, 1, 25, 20, 30)) == "off_peak"  # Fri 26th 07:30 AEDT, holiday
    assert book.band_of(energy, utc(2024, 1, 24, 20, 30)) == "peak"  # Thu 25th 07:30 AEDT


def test_holiday_region_matters(raw_book: dict[str, Any]) -> None:
    """Canberra Day (2024-03-11) is a public holiday in the ACT only."""
    nsw = _sydney_book(raw_book)
    act = PriceBook.model_validate({**nsw.model_dump(mode="json"), "holiday_region": "AU-ACT"})
    assert nsw.day_type(date(2024, 3, 11)) == "weekday"  # Canberra Day 2024
    assert act.day_type(date(2024, 3, 11)) == "holiday"


def test_a_book_without_public_holidays(raw_book: dict[str, Any]) -> None:
    """``holiday_region: null`` (issue 14): commercial tariffs often have no public-holiday rule; Australia Day
    is then an ordinary Friday, priced as a weekday."""
    nsw = _sydney_book(raw_book)
    none = PriceBook.model_validate({**nsw.model_dump(mode="json"), "holiday_region": None})
    assert none.holiday_region is None
    assert nsw.day_type(date(2024, 1, 26)) == "holiday" and none.day_type(date(2024, 1, 26)) == "weekday"
    assert none.day_type(date(2024, 1, 27)) == "weekend"
    assert none.band_of(_energy(none), utc(2024, 1, 26, 7, 30)) == "peak"  # Fri 18:30 AEDT
    assert nsw.band_of(_energy(nsw), utc(2024, 1, 26, 7, 30)) == "off_peak"
    assert '"holiday_region":null' in none.canonical_json()
    assert PriceBook.model_validate_json(none.canonical_json()) == none


def test_holiday_region_must_be_given_and_real(raw_book: dict[str, Any]) -> None:
    missing = {k: v for k, v in raw_book.items() if k != "holiday_region"}
    with pytest.raises(ValidationError, match="holiday_region"):
        PriceBook.model_validate(missing)  # null is explicit: leaving it out is a mistake
    for region, problem in (("XX", "Country XX not available"), ("AU-XX", "does not have subdivision XX")):
        with pytest.raises(ValidationError, match=f"unknown holiday region '{region}'.*{problem}.*or null"):
            PriceBook.model_validate(_variant(raw_book, holiday_region=region))


def test_a_band_naming_holidays_needs_a_holiday_region(raw_book: dict[str, Any]) -> None:
    # the bundled book's bands apply to weekday, weekend and holiday: without holidays that is a contradiction
    with pytest.raises(ValidationError, match="bands \\['peak', 'shoulder'\\] name the day type 'holiday', but the "
                                              "book has no public holidays"):
        PriceBook.model_validate(_variant(raw_book, holiday_region=None))


def test_books_published_before_issue_14_keep_their_content_hash(book: PriceBook) -> None:
    """The fields added by issue 14 (demand interval and blocks, TOU tiers) are left out of the canonical JSON
    while at their defaults, so every version published before keeps its hash (``store_price_book`` would
    otherwise refuse to load the same file again)."""
    assert book.content_sha256() == "ada15cd003ac17835f1a1461d7b47b0f8eca7bd75796372cd45fc2f889a4a3af"
    from tests.unit.test_rating_processor import PROP_BOOK  # has two demand components without interval_minutes

    assert PROP_BOOK.content_sha256() == "61edc1975ae62972078d60660b0d354fe0d3b6045eaecf024a48053e05e388d5"
    body = json.loads(PROP_BOOK.canonical_json())
    later = {"demand": {"interval_minutes", "blocks"}, "tou": {"tiers", "tier_mode"}}
    assert all(not later.get(c["kind"], set()) & set(c) for c in body["components"])
    stated = json.loads(PROP_BOOK.canonical_json())
    stated["components"][2]["interval_minutes"] = 15
    assert PriceBook.model_validate(stated).content_sha256() != PROP_BOOK.content_sha256()
    assert '"interval_minutes":15' in PriceBook.model_validate(stated).canonical_json()


# --- versions in effect ----------------------------------------------------------------------------------
def test_book_in_effect_picks_highest_covering_version(raw_book: dict[str, Any]) -> None:
    v1 = PriceBook.model_validate(raw_book)
    v2 = PriceBook.model_validate(_variant(raw_book, version=2, effective_from="2005-03-16", effective_to="2005-04-01"))
    v3 = PriceBook.model_validate(_variant(raw_book, version=3, effective_from="2006-01-01"))
    other = PriceBook.model_validate(_variant(raw_book, id="OTHER", version=9))
    books = [v3, other, v2, v1]
    assert book_in_effect(books, BOOK_ID, date(2005, 3, 15)) is v1
    assert book_in_effect(books, BOOK_ID, date(2005, 3, 16)) is v2
    assert book_in_effect(books, BOOK_ID, date(2005, 3, 31)) is v2
    assert book_in_effect(books, BOOK_ID, date(2005, 4, 1)) is v1  # effective_to is exclusive
    assert book_in_effect(books, BOOK_ID, date(2006, 1, 1)) is v3
    assert book_in_effect(books, BOOK_ID, date(2003, 12, 31)) is None
    assert book_in_effect(books, "MISSING", date(2005, 3, 16)) is None
    assert book_in_effect([v2], BOOK_ID, date(2005, 4, 1)) is None


# --- NMI → account over time ------------------------------------------------------------------------------
def test_account_of_honours_effective_dates() -> None:
    accounts = [
        Account(account=a, timezone="Australia/Sydney", holiday_region="AU-NSW", billing_anchor=date(2020, 1, 1))
        for a in ("ACC-A", "ACC-B")
    ]
    points = [  # deliberately unsorted
        ServicePoint(nmi="NMI0000001", account="ACC-B", effective_from=date(2021, 7, 1)),
        ServicePoint(nmi="NMI0000001", account="ACC-A", effective_from=date(2020, 1, 1), effective_to=date(2021, 6, 1)),
        ServicePoint(nmi="NMI0000002", account="ACC-A", effective_from=date(2020, 1, 1)),
    ]
    ref = ReferenceData.build(accounts, points, [], [])
    assert ref.account_of("NMI0000001", date(2019, 12, 31)) is None
    assert ref.account_of("NMI0000001", date(2020, 1, 1)) == "ACC-A"
    assert ref.account_of("NMI0000001", date(2021, 5, 31)) == "ACC-A"
    assert ref.account_of("NMI0000001", date(2021, 6, 1)) is None  # moved out, nobody moved in yet
    assert ref.account_of("NMI0000001", date(2021, 6, 30)) is None
    assert ref.account_of("NMI0000001", date(2021, 7, 1)) == "ACC-B"
    assert ref.account_of("NMI0000001", date(2030, 1, 1)) == "ACC-B"
    assert ref.account_of("NMI0000002", date(2030, 1, 1)) == "ACC-A"
    assert ref.account_of("NMI9999999", date(2021, 7, 1)) is None
    assert sorted(sp.nmi for sp in ref.service_ranges("ACC-A")) == ["NMI0000001", "NMI0000002"]


def test_account_of_back_to_back_move() -> None:
    accounts = [
        Account(account=a, timezone="Australia/Sydney", holiday_region="AU-NSW", billing_anchor=date(2020, 1, 1))
        for a in ("ACC-A", "ACC-B")
    ]
    points = [
        ServicePoint(nmi="N1", account="ACC-A", effective_from=date(2020, 1, 1), effective_to=date(2021, 6, 1)),
        ServicePoint(nmi="N1", account="ACC-B", effective_from=date(2021, 6, 1)),
    ]
    ref = ReferenceData.build(accounts, points, [], [])
    assert ref.account_of("N1", date(2021, 5, 31)) == "ACC-A"
    assert ref.account_of("N1", date(2021, 6, 1)) == "ACC-B"
