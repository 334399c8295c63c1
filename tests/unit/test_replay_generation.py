"""Replay generations as plain values (issue 15): where a generation lives, and the ledger diff."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.operations.replay import DiffRow, ReplayError, database_of, diff_totals, generation


def test_a_generation_has_its_own_topics_groups_state_and_database():
    live = Settings(topic_prefix="prod.", database_url="postgresql://pipeline@db:5432/billing",
                    database_owner_url="postgresql://owner@db:5432/billing", state_dir=Path("/var/state"),
                    metrics_port=9100)
    gen = generation(live, "20261205a")
    assert gen.database == "billing_gen_20261205a"
    assert gen.settings.topic_prefix == "prod.gen-20261205a."
    assert gen.settings.database_url == "postgresql://pipeline@db:5432/billing_gen_20261205a"
    assert gen.settings.database_owner_url == "postgresql://owner@db:5432/billing_gen_20261205a"
    assert gen.settings.state_dir == Path("/var/state/gen-20261205a") and gen.settings.metrics_port == 0
    assert gen.env["PIPELINE_TOPIC_PREFIX"] == "prod.gen-20261205a."
    assert gen.env["PIPELINE_DATABASE_URL"] == gen.settings.database_url
    assert live.topic_prefix == "prod."  # the live settings are not changed


@pytest.mark.parametrize("name", ["", "A", "a-b", "a b", "x" * 32, "_a", "a;drop"])
def test_generation_names_are_checked(name):
    with pytest.raises(ReplayError, match="generation name"):
        generation(Settings(), name)


def test_a_url_without_a_database_is_refused():
    with pytest.raises(ReplayError, match="names no database"):
        database_of("postgresql://pipeline@db:5432")


def test_the_diff_lists_only_the_lines_that_differ_a_missing_side_counting_zero():
    live = {("A", "2005-04-01", "B|energy|peak"): Decimal("10.00"), ("A", "2005-04-01", "B|supply|"): Decimal("3"),
            ("C", "2005-04-01", "B|energy|peak"): Decimal("1.50")}
    replayed = {("A", "2005-04-01", "B|energy|peak"): Decimal("12.50"), ("A", "2005-04-01", "B|supply|"):
                Decimal("3.00"), ("D", "2005-05-01", "B|supply|"): Decimal("4")}
    rows = diff_totals(live, replayed)
    assert rows == [DiffRow("A", "2005-04-01", "B|energy|peak", Decimal("10.00"), Decimal("12.50")),
                    DiffRow("C", "2005-04-01", "B|energy|peak", Decimal("1.50"), Decimal(0)),
                    DiffRow("D", "2005-05-01", "B|supply|", Decimal(0), Decimal("4"))]
    assert [r.difference for r in rows] == [Decimal("2.50"), Decimal("-1.50"), Decimal("4")]
    assert diff_totals(live, dict(live)) == []


# --- a generation from a date ---------------------------------------------------------------------------------------
def test_a_generation_from_a_date_copies_readings_from_a_day_before_its_utc_midnight():
    from datetime import UTC, date, datetime, timedelta

    from pipeline.codec import default_codec
    from pipeline.operations.replay import copy_cutoff_ms, keep_record
    from pipeline.records import MeterReading, SeriesComplete

    codec = default_codec()
    cutoff = copy_cutoff_ms(date(2005, 4, 1))
    assert cutoff == int(datetime(2005, 3, 31, tzinfo=UTC).timestamp() * 1000)

    def reading(start: datetime) -> bytes:
        end = start + timedelta(minutes=30)
        return codec.encode(MeterReading("NEM1201002", "E1", "kWh", start, end, Decimal("1.5"), "A", None, start,
                                         "file", "f.csv", 3))

    # April 1 local in Sydney starts 2005-03-31 13:00 UTC: kept; the day before the cut-off: left out
    assert keep_record("meter", (), reading(datetime(2005, 3, 31, 13, 0, tzinfo=UTC)), cutoff, codec)
    assert keep_record("meter", (), reading(datetime(2005, 3, 31, 0, 0, tzinfo=UTC)), cutoff, codec)
    assert not keep_record("meter", (), reading(datetime(2005, 3, 30, 23, 30, tzinfo=UTC)), cutoff, codec)
    marker = codec.encode(SeriesComplete("NEM1201002", "E1", datetime(2005, 3, 1, tzinfo=UTC), "f.csv"))
    assert keep_record("meter", (), marker, cutoff, codec)  # markers and unreadable records are always copied
    assert keep_record("meter", (), b"\x00garbage", cutoff, codec)
    assert keep_record("telemetry", (), b"{not json", cutoff, codec)


def test_the_diff_from_a_date_compares_only_the_periods_starting_then_or_later():
    from datetime import date

    live = {("A", "2005-03-01", "B|energy|peak"): Decimal("10"), ("A", "2005-04-01", "B|energy|peak"): Decimal("5")}
    replayed = {("A", "2005-03-01", "B|energy|peak"): Decimal("1"), ("A", "2005-04-01", "B|energy|peak"): Decimal("6")}
    assert diff_totals(live, replayed, since=date(2005, 4, 1)) == [
        DiffRow("A", "2005-04-01", "B|energy|peak", Decimal("5"), Decimal("6"))]
    assert len(diff_totals(live, replayed)) == 2
