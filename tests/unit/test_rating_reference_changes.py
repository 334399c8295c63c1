"""The rating stage re-rates an account's periods when its service ranges or plans change (issue 15): a
move-out recorded after the usage was rated takes the daily charges after it off the bill, once; a plan
switch from a past date re-prices the windows after it; a change made while the stage was down is applied
on start; nothing changes twice."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from pipeline.rating.processor import REF_PREFIX, RatingProcessor, reference_fingerprint, state_codec
from pipeline.reference import PlanAssignment, ReferenceData, ServicePoint
from tests.unit.test_rating_processor import (
    ACC,
    ACCOUNT,
    CODEC,
    NMI,
    TOPICS,
    Harness,
    amounts,
    flat_book,
    utc,
    window,
)

D = Decimal
A = flat_book("FLAT-A", "AUD", "0.30", "1.00", "10")
B = flat_book("FLAT-B", "AUD", "0.50", "2.00", "10")


def ref(service_to: date | None = None, plans: list[tuple[str, date, date | None]] | None = None) -> ReferenceData:
    plans = plans or [("FLAT-A", date(2024, 1, 1), None)]
    return ReferenceData.build(
        [ACCOUNT], [ServicePoint(nmi=NMI, account=ACC, effective_from=date(2023, 1, 1), effective_to=service_to)],
        [PlanAssignment(account=ACC, price_book_id=b, effective_from=f, effective_to=t) for b, f, t in plans], [A, B])


class Switchable(Harness):
    def __init__(self, data: ReferenceData) -> None:
        super().__init__(data)
        self.data = data
        self.processor = RatingProcessor(TOPICS, CODEC, lambda: self.data)
        self.processor.on_assign(0, self.ctx)

    def restart(self, data: ReferenceData) -> None:
        """A new processor on the same state (as after a restart), reading ``data``."""
        self.data = data
        self.processor = RatingProcessor(TOPICS, CODEC, lambda: self.data)
        self.processor.on_assign(0, self.ctx)


def test_a_move_out_recorded_after_the_usage_was_rated_takes_the_later_daily_charges_off_once() -> None:
    h = Switchable(ref())
    h.feed(window(utc(2024, 3, 10, 2, 0), "10.000"))  # 13:00 AEDT, 10 March
    assert amounts(h.flush()) == {"FLAT-A|energy|": D("3.00"), "FLAT-A|supply|": D("31.00"),
                                  "FLAT-A|gst|": D("3.40")}
    assert h.flush() == []
    h.data = ref(service_to=date(2024, 3, 15))  # moved out: 14 days of March in service
    moved = h.flush()
    assert amounts(moved) == {"FLAT-A|supply|": D("-17.00"), "FLAT-A|gst|": D("-1.70")}
    assert {c.cause for c in moved} == {f"reference:1:{reference_fingerprint(h.data, ACC)}"}
    assert {c.period_total for c in moved if c.component_id == "supply"} == {D("14.00")}
    assert h.flush() == []
    h.restart(h.data)  # the same reference data after a restart: nothing new
    assert h.flush() == []
    h.restart(ref(service_to=date(2024, 3, 20)))  # corrected while the stage was down: applied on start
    later = h.flush()
    assert amounts(later) == {"FLAT-A|supply|": D("5.00"), "FLAT-A|gst|": D("0.50")}
    assert {c.cause.split(":")[1] for c in later} == {"2"}
    assert sum(c.amount for c in h.charges() if c.component_id == "supply") == D("19.00")


def test_a_plan_switch_from_a_past_date_reprices_the_windows_after_it() -> None:
    h = Switchable(ref())
    h.feed(window(utc(2024, 3, 10, 2, 0), "10.000"), window(utc(2024, 3, 20, 2, 0), "20.000"))
    h.flush()
    h.data = ref(plans=[("FLAT-A", date(2024, 1, 1), date(2024, 3, 16)), ("FLAT-B", date(2024, 3, 16), None)])
    switched = amounts(h.flush())
    # energy of the 20th moves to B (20 kWh x 0.50); supply prorates by service days: 15 on A, 16 on B
    assert switched == {"FLAT-A|energy|": D("-6.00"), "FLAT-B|energy|": D("10.00"), "FLAT-A|supply|": D("-16.00"),
                        "FLAT-B|supply|": D("32.00"), "FLAT-A|gst|": D("-2.20"), "FLAT-B|gst|": D("4.20")}
    totals: dict[str, Decimal] = {}
    for c in h.charges():
        totals[f"{c.price_book_id}|{c.component_id}"] = totals.get(f"{c.price_book_id}|{c.component_id}", D(0)) \
            + c.amount
    assert totals == {"FLAT-A|energy": D("3.00"), "FLAT-A|supply": D("15.00"), "FLAT-A|gst": D("1.80"),
                      "FLAT-B|energy": D("10.00"), "FLAT-B|supply": D("32.00"), "FLAT-B|gst": D("4.20")}


def test_the_fingerprint_survives_the_state_codec() -> None:
    encode, decode = state_codec(CODEC)
    key = REF_PREFIX + ACC.encode()
    assert decode(key, encode(key, ["0123456789abcdef", "3"])) == ["0123456789abcdef", "3"]
