"""The pure rules of reference operations (issue 15): exact outcomes for each rule, the CSV format by line,
and properties over random operation sequences (ranges never overlap; nothing but an open range is changed)."""

from __future__ import annotations

from datetime import date, timedelta
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.accounts import imports, rules
from pipeline.accounts.rules import AssignPlan, AttachMeter, CreateAccount, MoveOut, Problem
from pipeline.rating.pricebook import PriceBook
from pipeline.reference import Account, PlanAssignment, ServicePoint

BOOK = PriceBook.model_validate({
    "id": "HOME", "version": 1, "currency": "AUD", "timezone": "Australia/Sydney", "holiday_region": None,
    "effective_from": "2025-01-01", "components": [{"id": "supply", "kind": "fixed_daily", "rate": "1.00"}]})
NZ_BOOK = BOOK.model_copy(update={"id": "KIWI", "currency": "NZD"})


def new_account(account: str = "A1", currency: str = "AUD", tz: str = "Australia/Sydney") -> CreateAccount:
    return CreateAccount(account, tz, "MONTHLY", date(2025, 1, 1), currency)


def registry() -> rules.Registry:
    reg = rules.Registry(books=[BOOK, NZ_BOOK])
    for a in ("A1", "A2"):
        (change,), problems = rules.check(reg, new_account(a))
        assert problems == []
        reg.apply(change)
    return reg


def codes(result: tuple[list, list[Problem]]) -> list[str]:
    return [p.code for p in result[1]]


def test_accounts() -> None:
    reg = registry()
    assert rules.check(reg, new_account("A1")) == ([], [])  # identical: nothing to do
    assert codes(rules.check(reg, new_account("A1", tz="Australia/Perth"))) == ["ACCOUNT_EXISTS"]
    assert codes(rules.check(reg, CreateAccount("A3", "Mars/Olympus", "WEEKLY", date(2025, 1, 1), "XXX", -1,
                                                "australia"))) == [
        "BAD_TIMEZONE", "BAD_BILLING_CYCLE", "UNKNOWN_CURRENCY", "BAD_HOLIDAY_REGION", "INVALID_FIELD"]
    (change,), _ = rules.check(reg, new_account("A3"))
    assert change.row == Account(account="A3", timezone="Australia/Sydney", holiday_region="AU-NSW",
                                 billing_cycle="MONTHLY", billing_anchor=date(2025, 1, 1), net_days=14, currency="AUD")


def test_meters_move_in_overlaps_and_move_out() -> None:
    reg = registry()
    (c,), _ = rules.check(reg, AttachMeter("A1", "NMI0000001", date(2025, 3, 1)))
    assert (c.operation, c.before, c.row) == ("meter.attach", None, ServicePoint(
        nmi="NMI0000001", account="A1", effective_from=date(2025, 3, 1)))
    reg.apply(c)
    assert rules.check(reg, AttachMeter("A1", "NMI0000001", date(2025, 3, 1))) == ([], [])  # already there
    _, (p,) = rules.check(reg, AttachMeter("A2", "NMI0000001", date(2025, 6, 1)))
    assert p == Problem("NMI_ATTACHED_ELSEWHERE", "NMI NMI0000001 is attached to account A1 over 2025-03-01..open, "
                        "which overlaps 2025-06-01..open: move it out first", "nmi")
    assert codes(rules.check(reg, AttachMeter("A1", "NMI0000001", date(2025, 1, 1), date(2025, 3, 2)))) == [
        "OVERLAPPING_DATES"]
    assert codes(rules.check(reg, AttachMeter("A9", "bad nmi", date(2025, 3, 2), date(2025, 3, 2)))) == [
        "EMPTY_RANGE", "UNKNOWN_ACCOUNT", "BAD_NMI"]
    assert codes(rules.check(reg, AttachMeter("A2", "NMI0000002", date(2025, 3, 5), first_reading=date(2025, 3, 4)))) \
        == ["SERVICE_STARTS_AFTER_FIRST_READING"]
    # move-out: closes the open range (its first day without service), nothing else
    assert codes(rules.check(reg, MoveOut("NMI0000001", date(2025, 3, 1)))) == ["EMPTY_RANGE"]
    assert codes(rules.check(reg, MoveOut("NMI0000009", date(2025, 3, 1)))) == ["NOT_ATTACHED"]
    (out,), _ = rules.check(reg, MoveOut("NMI0000001", date(2025, 6, 1)))
    assert (out.operation, out.before.effective_to, out.row.effective_to) == ("meter.move_out", None, date(2025, 6, 1))
    reg.apply(out)
    assert rules.check(reg, MoveOut("NMI0000001", date(2025, 6, 1))) == ([], [])  # the same move-out again
    assert codes(rules.check(reg, MoveOut("NMI0000001", date(2025, 7, 1)))) == ["ALREADY_ENDED"]
    # after the move-out the NMI can move in to another account from that day on, not before
    assert codes(rules.check(reg, AttachMeter("A2", "NMI0000001", date(2025, 5, 31)))) == ["NMI_ATTACHED_ELSEWHERE"]
    (c,), _ = rules.check(reg, AttachMeter("A2", "NMI0000001", date(2025, 6, 1)))
    assert c.row.account == "A2"


def test_plans_assign_switch_and_price_books() -> None:
    reg = registry()
    assert codes(rules.check(reg, AssignPlan("A1", "NOPE", date(2025, 1, 1)))) == ["UNKNOWN_PRICE_BOOK"]
    _, (p,) = rules.check(reg, AssignPlan("A1", "HOME", date(2024, 12, 31)))
    assert p.code == "PRICE_BOOK_NOT_IN_EFFECT" and "the earliest starts 2025-01-01" in p.message
    assert codes(rules.check(reg, AssignPlan("A1", "KIWI", date(2025, 1, 1)))) == ["CURRENCY_MISMATCH"]
    (c,), _ = rules.check(reg, AssignPlan("A1", "HOME", date(2025, 1, 1)))
    reg.apply(c)
    # a switch mid-month: the open plan is closed where the new one starts; the new one is added
    switch, problems = rules.check(reg, AssignPlan("A1", "HOME", date(2025, 2, 15)))
    assert problems == []
    assert [(x.operation, x.before, x.row) for x in switch] == [
        ("plan.switch", PlanAssignment(account="A1", price_book_id="HOME", effective_from=date(2025, 1, 1)),
         PlanAssignment(account="A1", price_book_id="HOME", effective_from=date(2025, 1, 1),
                        effective_to=date(2025, 2, 15))),
        ("plan.assign", None, PlanAssignment(account="A1", price_book_id="HOME", effective_from=date(2025, 2, 15)))]
    for x in switch:
        reg.apply(x)
    # history is not rewritten: a plan inside a closed range, or on the day an open one starts, is refused
    assert codes(rules.check(reg, AssignPlan("A1", "HOME", date(2025, 1, 10)))) == ["OVERLAPPING_DATES"] * 2
    assert codes(rules.check(reg, AssignPlan("A1", "HOME", date(2025, 1, 10), date(2025, 1, 20)))) == [
        "OVERLAPPING_DATES"]
    assert codes(rules.check(reg, AssignPlan("A1", "HOME", date(2025, 2, 15), date(2025, 3, 1)))) == [
        "OVERLAPPING_DATES"]


def test_csv_lines_and_problems_by_line() -> None:
    text = ("account,timezone,billing_cycle,billing_anchor,currency,nmi,service_from,price_book_id,move_out\n"
            "A5,Australia/Sydney,MONTHLY,2025-01-01,AUD,NMI0000005,2025-03-01,HOME,\n"
            "\n"
            "A5,,,,,NMI0000005,,,2025-04-01\n"
            "A6,Australia/Sydney,MONTHLY,2025-02-30,AUD,,,,\n"
            "A7,Australia/Sydney\n"
            "A8,Australia/Sydney,,,,,,,\n"
            "A9,,,,,,,,\n")
    parsed = imports.parse_csv(text)
    assert parsed.ops == [
        (2, CreateAccount("A5", "Australia/Sydney", "MONTHLY", date(2025, 1, 1), "AUD")),
        (2, AttachMeter("A5", "NMI0000005", date(2025, 3, 1))),
        (2, AssignPlan("A5", "HOME", date(2025, 3, 1))),
        (4, MoveOut("NMI0000005", date(2025, 4, 1)))]
    assert [(n, p.code, p.field) for n, p in parsed.problems] == [
        (5, "INVALID_FIELD", "billing_anchor"), (6, "BAD_LINE", None), (7, "INVALID_FIELD", "billing_cycle"),
        (8, "INVALID_FIELD", None)]
    reg = registry()
    changes, problems = rules.check_all(reg, parsed.ops)
    assert problems == [] and [(n, c.operation) for n, c in changes] == [
        (2, "account.create"), (2, "meter.attach"), (2, "plan.assign"), (4, "meter.move_out")]
    assert imports.parse_csv("acount,nmi\n").problems[0][1].code == "BAD_HEADER"


# --- properties ------------------------------------------------------------------------------------------------
DAYS = st.integers(0, 60).map(lambda n: date(2025, 1, 1) + timedelta(days=n))
METER_OPS = st.lists(st.one_of(
    st.builds(AttachMeter, st.sampled_from(["A1", "A2"]), st.sampled_from(["NMI0000001", "NMI0000002"]), DAYS,
              st.one_of(st.none(), DAYS)),
    st.builds(MoveOut, st.sampled_from(["NMI0000001", "NMI0000002"]), DAYS)), max_size=25)
PLAN_OPS = st.lists(st.builds(AssignPlan, st.just("A1"), st.just("HOME"), DAYS, st.one_of(st.none(), DAYS)),
                    max_size=20)


def _no_overlaps(ranges: list) -> bool:
    ranges = sorted(ranges, key=lambda r: r.effective_from)
    return all(a.effective_to is not None and a.effective_to <= b.effective_from for a, b in pairwise(ranges))


@settings(max_examples=300, deadline=None)
@given(METER_OPS)
def test_service_points_never_overlap_and_only_open_ranges_close(ops: list) -> None:
    reg = registry()
    changes, problems = rules.check_all(reg, list(enumerate(ops, 1)))
    for nmi in ("NMI0000001", "NMI0000002"):
        assert _no_overlaps(reg.meters.get(nmi, []))
        assert sum(sp.effective_to is None for sp in reg.meters.get(nmi, [])) <= 1
    for _, c in changes:
        if c.before is not None:  # the only edit: an open range gets its end, after its start
            assert c.before.effective_to is None and c.row.effective_to > c.row.effective_from
            assert c.row.model_copy(update={"effective_to": None}) == c.before
    # every line is either applied or refused with a reason, never both
    assert {n for n, _ in changes}.isdisjoint({n for n, _ in problems})


@settings(max_examples=300, deadline=None)
@given(PLAN_OPS)
def test_plans_never_overlap_and_a_switch_only_closes_the_open_plan(ops: list) -> None:
    reg = registry()
    changes, _ = rules.check_all(reg, list(enumerate(ops, 1)))
    assert _no_overlaps(reg.plans.get("A1", []))
    for _, c in changes:
        if c.before is not None:
            assert c.operation == "plan.switch" and c.before.effective_to is None
            assert c.before.effective_from < c.row.effective_to
