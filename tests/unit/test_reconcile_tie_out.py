"""The tie-out of ``pipeline reconcile`` as a plain function (issue 15): readings = windows = ledger per
(account, period, metric, component), within the ledger's documented tolerance (a change too small to
move a line's total by a cent appends no line), and every kind of break named."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from pipeline.config import Settings
from pipeline.operations.reconcile import Forwarded, Input, LedgerLine, Snapshot, reconcile
from pipeline.records import UsageWindow
from pipeline.reference import BUNDLED_REFERENCE, ReferenceData, ReferenceFile
from pipeline.windowing import windows as w
from pipeline.windowing.processor import policies_from_settings

REF = ReferenceData.from_file(ReferenceFile.read(BUNDLED_REFERENCE))
POLICY = policies_from_settings(Settings())
ACCOUNT, SERIES, BOOK = "ACC-1001", "NEM1201001/E1", "ACTEWAGL-HOME-TOU"  # energy priced by TOU bands
START = datetime(2005, 4, 10, 3, 0, tzinfo=UTC)  # 13:00 Sydney, a Sunday: off-peak (weekend)
PERIOD = date(2005, 4, 1)


def _window(start: datetime, kwh: Decimal, revision: int = 0) -> UsageWindow:
    wid = w.window_id(ACCOUNT, SERIES, int(start.timestamp() * 1000))
    return UsageWindow(wid, ACCOUNT, SERIES, "energy_import", "kWh", start, start + timedelta(minutes=30),
                       revision, "ON_TIME", kwh, kwh, 1, ("A",), ("f.csv#3",), start)


def _snapshot(kwh: list[Decimal], ledger_qty: Decimal | None, rate: Decimal, *, amount: Decimal | None = None,
              outbox: int = 1) -> Snapshot:
    snap = Snapshot(caught_up=dict.fromkeys(("ingest", "windowing", "rating", "invoicing"), True))
    for i, q in enumerate(kwh):
        start = START + timedelta(minutes=30 * i)
        win = _window(start, q)
        snap.latest[win.window_id] = win
        snap.windows_at[(0, i)] = (win.window_id, 0)
        snap.forwarded.append(Forwarded(0, i, f"r{i}", ACCOUNT, SERIES, "energy_import",
                                        int(start.timestamp() * 1000), 1, w.to_micro(q), "A"))
    if ledger_qty is not None:
        total = (ledger_qty * rate).quantize(Decimal("0.01"))
        snap.ledger.append(LedgerLine("l1", ACCOUNT, PERIOD, "energy", "tou", "off_peak", ledger_qty, rate,
                                      total if amount is None else amount, total, BOOK, 1, (0, 7)))
    snap.outbox_lines = outbox if ledger_qty is not None else 0
    return snap


def test_readings_windows_and_ledger_tie_out():
    report = reconcile(_snapshot([Decimal("1.2"), Decimal("0.8")], Decimal("2.0"), Decimal("0.1")), POLICY, REF)
    assert report.clean and report.tie is not None
    (row,) = report.tie.rows
    assert (row.account, row.period_start, row.metric, row.price_book_id, row.component_id) == (
        ACCOUNT, PERIOD, "energy_import", BOOK, "energy")
    assert (row.accepted, row.windowed, row.ledger) == (2_000_000, 2_000_000, 2_000_000)
    assert row.tolerance == 99_999  # less than 0.01 / 0.1 = 0.1 kWh
    assert report.tie.breaks == []


@pytest.mark.parametrize(("ledger_qty", "broken"), [(Decimal("1.95"), False), (Decimal("1.900001"), False),
                                                    (Decimal("1.9"), True), (Decimal("2.2"), True)])
def test_the_ledger_may_trail_by_less_than_a_cents_worth(ledger_qty, broken):
    report = reconcile(_snapshot([Decimal("1.2"), Decimal("0.8")], ledger_qty, Decimal("0.1")), POLICY, REF)
    assert report.tie.rows[0].broken is broken and report.clean is not broken
    if broken:
        assert report.tie.breaks == [f"{ACCOUNT} {PERIOD} energy_import ({BOOK}|energy): readings 2, windows 2, "
                                     f"ledger {ledger_qty} (tolerance 0.099999)"]


def test_usage_without_a_ledger_line_is_a_break_and_a_window_short_of_its_readings_too():
    no_line = reconcile(_snapshot([Decimal("3")], None, Decimal("0.1")), POLICY, REF)
    assert not no_line.clean and no_line.tie.rows[0].ledger is None
    assert no_line.tie.breaks[0].endswith("readings 3, windows 3, ledger none (tolerance 0)")
    snap = _snapshot([Decimal("3")], Decimal("3"), Decimal("0.1"))
    snap.forwarded.append(Forwarded(0, 9, "late", ACCOUNT, SERIES, "energy_import",
                                    int(START.timestamp() * 1000) + 60_000, 1, 500_000, "A"))
    short = reconcile(snap, POLICY, REF)
    assert (short.tie.rows[0].accepted, short.tie.rows[0].windowed) == (3_500_000, 3_000_000)
    assert short.tie.rows[0].broken and not short.clean


def test_amounts_that_do_not_add_up_and_lines_missing_from_the_outbox_are_breaks():
    bad_sum = reconcile(_snapshot([Decimal("2")], Decimal("2"), Decimal("0.1"), amount=Decimal("0.19")), POLICY, REF)
    assert bad_sum.tie.breaks == [f"{ACCOUNT} {PERIOD} {BOOK}|energy|off_peak: the lines' amounts add up to 0.19, "
                                  f"the latest line's period total is 0.20"]
    no_event = reconcile(_snapshot([Decimal("2")], Decimal("2"), Decimal("0.1"), outbox=0), POLICY, REF)
    assert no_event.tie.breaks == ["the ledger holds 1 lines but the outbox announces 0 (LINE_APPENDED)"]


def test_a_window_rating_dead_lettered_is_counted_not_tied():
    snap = _snapshot([Decimal("2")], None, Decimal("0.1"))
    snap.rating_dead.add((0, 0))
    report = reconcile(snap, POLICY, REF)
    assert report.tie.rating_dead_windows == 1 and report.tie.rows == [] and report.clean


def test_zero_rate_lines_are_not_tied_and_filters_select_rows():
    free = reconcile(_snapshot([Decimal("2")], Decimal("0.5"), Decimal("0")), POLICY, REF)
    assert free.tie.rows[0].tolerance is None and free.clean
    other = reconcile(_snapshot([Decimal("2")], Decimal("9"), Decimal("0.1")), POLICY, REF, account="ACC-1002")
    assert other.tie.rows == [] and other.clean
    later = reconcile(_snapshot([Decimal("2")], Decimal("9"), Decimal("0.1")), POLICY, REF, period=date(2005, 5, 1))
    assert later.tie.rows == []


def test_duplicates_and_superseded_readings_are_counted():
    snap = _snapshot([Decimal("2")], Decimal("2"), Decimal("0.1"))
    snap.inputs = [Input("meter.readings", 0, 0, "r0", 1), Input("meter.readings", 0, 1, "r0", 1),
                   Input("meter.readings", 0, 2, "r0", 0), Input("meter.readings", 0, 3, None, 0)]
    snap.dead = {("meter.readings", 0, 3)}
    report = reconcile(snap, POLICY, REF)
    assert (report.inputs, report.billed, report.dead_lettered, report.duplicates, report.superseded) == (4, 3, 1, 1, 1)
    assert report.as_json()["clean"] is True and report.as_json()["tie_out"]["rows"][0]["ledger"] == "2"
