"""The pure rules together (issue 11, SPEC §6 invariant 1): windowing then rating, as plain processors over
FakeContexts, for any interleaving of several series' readings (two accounts, import and export, across a
billing-period boundary), duplicates, supersessions, completion markers and processing-time pauses (idle
steps), with rating consuming the window revisions as they come and recomputing at any points.

The final billed quantity per (account, billing period, metric), and the sum of each line's deltas, equal
the batch computation over the same readings after deduplication and supersession: nothing is ever too
late, and no interleaving bills anything twice or not at all.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.rating.posting import PostingPolicy
from pipeline.rating.processor import RatingProcessor
from pipeline.records import RatedCharge, SeriesMarker, UsageEvent
from pipeline.reference import BUNDLED_REFERENCE, ReferenceData, ReferenceFile
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import FakeContext
from pipeline.topology import Topics
from pipeline.windowing import windows as w
from pipeline.windowing.processor import WindowingProcessor

CODEC = default_codec()
TOPICS = Topics(Settings())
REF = ReferenceData.from_file(ReferenceFile.read(BUNDLED_REFERENCE))
SYDNEY = ZoneInfo("Australia/Sydney")
# two real accounts of the bundled reference data (TOU tariff, feed-in on export), in service then
SERIES = (("ACC-1001", "NEM1201001", "E1"), ("ACC-1001", "NEM1201001", "B1"), ("ACC-1002", "NEM1201002", "E1"))
BASE = datetime(2005, 3, 30, 13, 0, tzinfo=UTC)  # 31 March 00:00 in Sydney: slots run into April
IDLE_MS = 10_000


def reading(series: tuple[str, str, str], slot: int, version: int) -> UsageEvent:
    account, nmi, suffix = series
    start = BASE + timedelta(minutes=30 * slot)
    return UsageEvent(
        f"nem12:{nmi}:{suffix}:{start:%Y-%m-%dT%H:%MZ}", account, f"{nmi}/{suffix}",
        "energy_export" if suffix.startswith("B") else "energy_import", "kWh", start, start + timedelta(minutes=30),
        Decimal(slot % 7 + version * 3) / 4, BASE + timedelta(days=version), "E" if version == 1 else "A",
        f"f{version}.csv#{slot}")


# few slots, so that readings meet in their windows; 46..51 straddle 1 April 00:00 in Sydney (a new period)
SLOTS = st.sampled_from([*range(0, 6), *range(46, 52)])
steps = st.lists(st.one_of(
    st.tuples(st.just("reading"), st.sampled_from(SERIES), SLOTS, st.integers(1, 3)),
    st.tuples(st.just("idle")),
    st.tuples(st.just("marker"), st.sampled_from(SERIES), SLOTS),
    st.tuples(st.just("rate")),
), min_size=4, max_size=80)


def run(plan: list[tuple], lateness_ms: int, posting: PostingPolicy | None = None,
        ) -> dict[tuple[str, str, str], tuple[Decimal, Decimal, Decimal]]:
    """(account, period start, line) → (last quantity, last period total, sum of deltas). ``posting``: rating's
    posting policy (default: post every batch); its idle rule runs on the same processing-time clock."""
    policy = w.WindowPolicy(30 * 60_000, 3_600_000, lateness_ms, IDLE_MS)
    clock = [0]
    windowing = WindowingProcessor(TOPICS, CODEC, lambda _m: policy, clock_ms=lambda: clock[0])
    rating = RatingProcessor(TOPICS, CODEC, lambda: REF, posting, wall_ms=lambda: clock[0])
    wctx, rctx = FakeContext(), FakeContext()
    windowing.on_assign(0, wctx)
    rating.on_assign(0, rctx)
    fed = 0

    def feed_rating() -> None:
        nonlocal fed
        revisions = [v for t, _k, v in wctx.forwarded if t == TOPICS.usage_windows]
        for i, raw in enumerate(revisions[fed:], fed):
            rating.process(Incoming(TOPICS.usage_windows, 0, i, b"k", raw, (), 0), rctx)
        fed = len(revisions)

    for offset, step in enumerate(plan):
        if step[0] == "idle":
            clock[0] += IDLE_MS
            windowing.punctuate(clock[0], wctx)
        elif step[0] == "rate":
            feed_rating()
            rating.punctuate(clock[0], rctx)
        else:
            if step[0] == "reading":
                raw = CODEC.encode(reading(*step[1:]))
            else:
                account, nmi, suffix = step[1]
                raw = CODEC.encode(SeriesMarker(account, f"{nmi}/{suffix}", BASE + timedelta(minutes=30 * step[2]),
                                                "f.csv"))
            windowing.process(Incoming(TOPICS.usage_events, 0, offset, b"k", raw, (), 0), wctx)
            windowing.punctuate(clock[0], wctx)
    clock[0] = 4_000_000_000_000  # every quiet series closes
    windowing.punctuate(clock[0], wctx)
    feed_rating()
    rating.punctuate(clock[0], rctx)
    clock[0] += 2 * IDLE_MS  # the feed stopped: rating posts whatever its posting policy still holds
    rating.punctuate(clock[0], rctx)
    assert [t for t, _k, _v in wctx.forwarded if t != TOPICS.usage_windows] == []  # nothing refused
    out: dict[tuple[str, str, str], tuple[Decimal, Decimal, Decimal]] = {}
    for t, _k, v in rctx.forwarded:
        assert t == TOPICS.charges_rated
        c = CODEC.decode(v, RatedCharge)
        key = (c.account, c.period_start.isoformat(), f"{c.component_id}|{c.band}")
        held = out.get(key, (Decimal(0), Decimal(0), Decimal(0)))
        out[key] = (c.quantity, c.period_total, held[2] + c.amount)
    return out


def batch_quantities(plan: list[tuple]) -> dict[tuple[str, str, str], Decimal]:
    """(account, period start, metric) → kWh: the highest version of each interval, summed per local month."""
    best: dict[str, UsageEvent] = {}
    for step in plan:
        if step[0] == "reading":
            e = reading(*step[1:])
            if e.event_id not in best or e.version > best[e.event_id].version:
                best[e.event_id] = e
    out: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for e in best.values():
        month = e.event_time.astimezone(SYDNEY).date().replace(day=1).isoformat()
        out[(e.account, month, e.metric)] += e.value
    return dict(out)


@settings(max_examples=120, deadline=None)
@given(steps, st.sampled_from([30 * 60_000, 10 * 365 * 86_400_000]))
def test_billed_quantity_per_account_and_period_is_the_batch_total_whatever_the_interleaving(
        plan: list[tuple], lateness_ms: int) -> None:
    lines = run(plan, lateness_ms)
    billed: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for (account, period, line), (quantity, total, deltas) in lines.items():
        assert deltas == total  # a line's deltas add up to its period total: no drift, nothing twice
        component = line.split("|")[0]
        if component == "energy":  # one line per TOU band: together, the period's import
            billed[(account, period, "energy_import")] += quantity
        elif component == "feed_in":
            billed[(account, period, "energy_export")] += quantity
    want = batch_quantities(plan)
    assert {k: v for k, v in billed.items() if v} == {k: v for k, v in want.items() if v}


@settings(max_examples=120, deadline=None)
@given(steps, st.sampled_from([30 * 60_000, 10 * 365 * 86_400_000]))
def test_holding_changes_for_posting_bills_the_same_whatever_the_interleaving(plan: list[tuple],
                                                                               lateness_ms: int) -> None:
    """Issue 13: with rating's posting policy on (a boundary every day, few windows listed), the ledger still
    converges to the batch total; only how the deltas are grouped into lines changes."""
    lines = run(plan, lateness_ms, PostingPolicy(interval_days=1, idle_ms=IDLE_MS, max_listed_windows=2))
    billed: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for (account, period, line), (quantity, total, deltas) in lines.items():
        assert deltas == total
        component = line.split("|")[0]
        if component == "energy":
            billed[(account, period, "energy_import")] += quantity
        elif component == "feed_in":
            billed[(account, period, "energy_export")] += quantity
    want = batch_quantities(plan)
    assert {k: v for k, v in billed.items() if v} == {k: v for k, v in want.items() if v}
