"""Pure invoice lifecycle rules (SPEC §5): close time, numbering, placement, statement, events."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.codec import default_codec
from pipeline.invoicing import lifecycle as lc
from pipeline.records import InvoiceEvent, Payment, RatedCharge


def test_close_time_is_local_midnight_of_period_end_plus_delay_across_dst() -> None:
    # Sydney: AEDT (+11) until 3 April 2005 03:00, AEST (+10) after
    assert lc.close_time(date(2005, 3, 1), "Australia/Sydney", timedelta(0)) == datetime(2005, 2, 28, 13, tzinfo=UTC)
    assert lc.close_time(date(2005, 5, 1), "Australia/Sydney", timedelta(hours=72)) == datetime(
        2005, 5, 3, 14, tzinfo=UTC)
    assert lc.close_time(date(2005, 5, 1), "UTC", timedelta(days=3)) == datetime(2005, 5, 4, tzinfo=UTC)


def test_series_and_numbers() -> None:
    assert lc.series_of("INV-{year}", "AUD", date(2005, 4, 1)) == "INV-2005"
    assert lc.series_of("{currency}-{year}", "NZD", date(2006, 1, 1)) == "NZD-2006"
    assert lc.invoice_number("INV-2005", 42) == "INV-2005-000042"
    with pytest.raises(ValueError):
        lc.invoice_number("INV-2005", 0)
    with pytest.raises(KeyError):
        lc.series_of("INV-{month}", "AUD", date(2005, 4, 1))


def test_next_period_after_the_latest_invoice() -> None:
    assert lc.next_period("MONTHLY", date(2004, 1, 1), date(2005, 4, 1)) == (date(2005, 4, 1), date(2005, 5, 1))
    assert lc.next_period("QUARTERLY", date(2004, 1, 15), date(2005, 4, 15)) == (date(2005, 4, 15), date(2005, 7, 15))


def test_placement_charge_on_open_adjustment_on_next_open() -> None:
    own_open = lc.InvoiceRef("A|2005-03-01|AUD", "OPEN", None)
    assert lc.place(own_open, None) == lc.Placement("A|2005-03-01|AUD", "CHARGE")
    own_final = lc.InvoiceRef("A|2005-03-01|AUD", "FINALIZED", "INV-2005-000007")
    assert lc.place(own_final, "A|2005-04-01|AUD") == lc.Placement(
        "A|2005-04-01|AUD", "ADJUSTMENT", "A|2005-03-01|AUD", "INV-2005-000007")
    with pytest.raises(ValueError):
        lc.place(own_final, None)


money = st.decimals(min_value=-10_000, max_value=10_000, places=2, allow_nan=False, allow_infinity=False)


@given(st.one_of(st.none(), money), st.lists(money, max_size=20), st.lists(money.map(abs), max_size=5))
def test_statement_amount_due_is_previous_plus_charges_minus_payments(prev, lines, pays) -> None:
    s = lc.statement(prev, lines, pays)
    assert s.amount_due == (prev or 0) + sum(lines) - sum(pays)
    assert s.charges_total == sum(lines) and s.payments_total == sum(pays)


def test_events_round_trip_through_avro_with_unique_ids() -> None:
    codec = default_codec()
    at = datetime(2005, 4, 2, tzinfo=UTC)
    charge = RatedCharge("L1", "A", date(2005, 3, 1), date(2005, 4, 1), "AUD", "energy", "tou", "peak",
                         Decimal("10"), "kWh", Decimal("0.34"), Decimal("3.40"), Decimal("3.40"), "B", 1, "c", "{}")
    placed = lc.place(lc.InvoiceRef("A|2005-03-01|AUD", "FINALIZED", "INV-2005-000001"), "A|2005-04-01|AUD")
    line = lc.line_event(charge, placed, at)
    st_ = lc.statement(Decimal("5"), [Decimal("3.40")], [Decimal("1")])
    fin = lc.finalized_event("A|2005-04-01|AUD", "A", "AUD", "INV-2005-000002", (date(2005, 4, 1), date(2005, 5, 1)),
                             date(2005, 5, 1), date(2005, 5, 15), st_, at)
    pay = lc.payment_event(Payment("P1", "A", "AUD", Decimal("1"), at), Decimal("7.40"), at)
    events = [line, fin, pay]
    assert len({e.event_id for e in events}) == 3
    for e in events:
        assert codec.decode(codec.encode(e), InvoiceEvent) == e
        assert lc.event_from_json(lc.event_to_json(e), e.sequence) == e  # the outbox row and back
    assert (line.line_kind, line.adjusts_invoice_number, line.period_start) == (
        "ADJUSTMENT", "INV-2005-000001", date(2005, 3, 1))
    assert fin.amount_due == Decimal("7.40")
