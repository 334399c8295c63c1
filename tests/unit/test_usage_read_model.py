"""The usage read model's pure core and stage (pipeline.usage.model / processor) on the in-memory context:
revisions replace (never add to) their predecessors, cost is rating's period totals, the daily cost sums to
the variable cost, and a budget alerts once per crossing, across a restart."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.rating.processor import RatingProcessor
from pipeline.records import RatedCharge, UsageAlert, UsageWindow
from pipeline.reference import BUNDLED_REFERENCE, ReferenceData, ReferenceFile
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import FakeContext
from pipeline.topology import Topics
from pipeline.usage import model
from pipeline.usage import projection as pj
from pipeline.usage.processor import UsageProcessor, state_codec

CODEC = default_codec()
TOPICS = Topics(Settings(topic_prefix="t."))
REF = ReferenceData.from_file(ReferenceFile.read(BUNDLED_REFERENCE))
ACC, NMI = "ACC-1001", "NEM1201001"
CENT = Decimal("0.01")


# --- pure rules -----------------------------------------------------------------------------------------
@given(st.integers(-10**7, 10**7), st.lists(st.decimals(min_value=0, max_value=1000, places=6), min_size=1,
                                             max_size=40))
def test_allocation_sums_exactly_and_stays_within_a_cent_of_each_share(cents: int, weights: list[Decimal]) -> None:
    total = Decimal(cents) * CENT
    parts = model.allocate(total, weights, CENT)
    assert sum(parts, Decimal(0)) == total
    whole = sum(weights, Decimal(0))
    shares = [total * w / whole for w in weights] if whole else [total / len(weights)] * len(weights)
    assert all(abs(p - s) < CENT for p, s in zip(parts, shares, strict=True))


@given(st.lists(st.integers(0, 200), max_size=60), st.integers(1, 200))
def test_crossing_rule_alerts_once_per_move_from_below_to_at_or_above(amounts: list[int], budget: int) -> None:
    above, alerts, expected, prev_below = False, 0, 0, True
    for a in amounts:
        above, fire = model.cross(above, Decimal(a), Decimal(budget))
        alerts += fire
        expected += prev_below and a >= budget
        prev_below = a < budget
    assert alerts == expected


# --- the stage on the in-memory context -----------------------------------------------------------------
def window(start: datetime, value: str, revision: int = 0, quality: str = "A") -> UsageWindow:
    end = start + timedelta(minutes=30)
    return UsageWindow(
        window_id=f"{ACC}|{NMI}/E1|{start:%Y-%m-%dT%H:%MZ}", account=ACC, series=f"{NMI}/E1",
        metric="energy_import", unit="kWh", window_start=start, window_end=end, revision=revision,
        timing="ON_TIME" if revision == 0 else "LATE", value=Decimal(value), delta=Decimal(value), count=1,
        qualities=(quality,), sources=("f.csv#1",), watermark=end)


class Stages:
    """Rating and usage on partition 0, with a budget and the snapshots written."""

    def __init__(self, budget: Decimal | None) -> None:
        self.rating = RatingProcessor(TOPICS, CODEC, lambda: REF)
        self.rctx, self.uctx = FakeContext(), FakeContext()
        self.rating.on_assign(0, self.rctx)
        self.budget = budget
        self.written: list[tuple[int, model.MetricSnapshot]] = []
        self.usage = self.restart()
        self.offset = 0

    def restart(self) -> UsageProcessor:
        """A fresh processor over the same (committed) state: what a restarted stage sees."""
        budgets = (lambda: {ACC: (self.budget, "AUD")}) if self.budget is not None else dict
        self.usage = UsageProcessor(TOPICS, CODEC, lambda: REF, budgets, self.written.extend)
        return self.usage

    def feed(self, *wins: UsageWindow) -> None:
        before = len(self.rctx.forwarded)
        for w in wins:
            rec = Incoming(TOPICS.usage_windows, 0, self.offset, ACC.encode(), CODEC.encode(w), (), 0)
            self.rating.process(rec, self.rctx)
            self.usage.process(rec, self.uctx)
            self.offset += 1
        self.rating.punctuate(0, self.rctx)
        for _t, _k, value in self.rctx.forwarded[before:]:
            self.usage.process(Incoming(TOPICS.charges_rated, 0, self.offset, ACC.encode(), value, (), 0), self.uctx)
            self.offset += 1
        self.usage.punctuate(0, self.uctx)

    def charges(self) -> list[RatedCharge]:
        return [CODEC.decode(v, RatedCharge) for _t, _k, v in self.rctx.forwarded]

    def alerts(self) -> list[UsageAlert]:
        return [CODEC.decode(v, UsageAlert) for t, _k, v in self.uctx.forwarded if t == TOPICS.usage_alerts]

    def latest(self) -> dict[str, model.MetricSnapshot]:
        seq = max(s for s, _ in self.written)
        return {m.metric: m for s, m in self.written if s == seq}


def day_windows(day: date, kwh: str, quality: str = "A") -> list[UsageWindow]:
    """48 half-hour windows of one Sydney day (UTC+11 in January) of ``kwh`` each."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC) - timedelta(hours=11)
    return [window(start + timedelta(minutes=30 * i), kwh, quality=quality) for i in range(48)]


def rated_total(charges: list[RatedCharge]) -> Decimal:
    latest: dict[str, Decimal] = {}
    for c in charges:
        latest[f"{c.price_book_id}|{c.component_id}|{c.band}"] = c.period_total
    return sum(latest.values(), Decimal(0))


def test_snapshot_is_usage_of_latest_revisions_and_cost_rating_computed() -> None:
    s = Stages(budget=None)
    s.feed(*day_windows(date(2006, 1, 1), "0.5"), *day_windows(date(2006, 1, 2), "0.25", quality="E"))
    first = s.latest()["energy_import"]
    assert first.usage_kwh == Decimal("36.000000")  # 48 × 0.5 + 48 × 0.25
    assert [k for _, k, _ in first.daily] == [Decimal(24), Decimal(12)]
    assert first.estimated_share == Decimal("0.3333")
    # a revision of one window replaces its predecessor (+0.5 kWh, not +1.0); a replayed revision 0 is ignored
    w = day_windows(date(2006, 1, 2), "0.25")[10]
    s.feed(UsageWindow(**{**{f: getattr(w, f) for f in w.__dataclass_fields__}, "revision": 1, "timing": "LATE",
                          "value": Decimal("0.75"), "delta": Decimal("0.5"), "qualities": ("A",)}))
    s.feed(w)
    snap = s.latest()["energy_import"]
    assert snap.usage_kwh == Decimal("36.500000")
    assert [k for _, k, _ in snap.daily] == [Decimal(24), Decimal("12.5")]
    assert snap.estimated_share == (Decimal("11.75") / Decimal("36.5")).quantize(Decimal("0.0001"))
    cost = snap.cost + sum((m.cost for k, m in s.latest().items() if k != "energy_import"), Decimal(0))
    assert cost == rated_total(s.charges())
    assert sum(snap.bands.values(), Decimal(0)) == snap.usage_kwh  # every kWh lands in one TOU band
    assert sum((c for _, _, c in snap.daily), Decimal(0)) == snap.cost - snap.fixed_cost
    assert snap.fixed_cost == (Decimal("0.9375") * 31).quantize(CENT)  # supply, full January at once
    daily = [k for _, k, _ in snap.daily]
    assert snap.projections[:2] == [pj.daily_average(daily, 31), pj.weighted_average(daily, 31)]
    assert snap.daily[0][0] == date(2006, 1, 1) and (snap.days_elapsed, snap.period_days) == (2, 31)


def test_days_before_the_first_data_are_not_counted_as_zero_use() -> None:
    s = Stages(budget=None)
    s.feed(*day_windows(date(2006, 1, 11), "0.5"), *day_windows(date(2006, 1, 13), "0.5"))
    snap = s.latest()["energy_import"]
    assert [(d, k) for d, k, _ in snap.daily] == [(date(2006, 1, 11), Decimal(24)), (date(2006, 1, 12), Decimal(0)),
                                                 (date(2006, 1, 13), Decimal(24))]
    assert snap.days_elapsed == 13
    assert snap.projections[0] == pj.daily_average([Decimal(24), Decimal(0), Decimal(24)], 21)  # Jan 11 .. 31
    assert snap.projections[0].usage == Decimal("336.000000")  # 48 + 16 × 18


def test_state_survives_its_changelog_encoding() -> None:
    s = Stages(budget=None)
    s.feed(*day_windows(date(2006, 1, 1), "0.5"))
    enc, dec = state_codec(CODEC)
    for key, value in s.uctx.store(0).data.items():
        assert dec(key, enc(key, value)) == value


def test_budget_alerts_once_per_crossing_across_revisions_and_a_restart() -> None:
    s = Stages(budget=Decimal("40.00"))
    s.feed(*day_windows(date(2006, 1, 1), "0.5"))  # ~24 kWh: energy + supply (31 × 0.9375) + GST
    below = rated_total(s.charges())
    assert below < Decimal(40)
    assert [a.kind for a in s.alerts()] == ["PROJECTED"]  # one day of 31 projects far above the budget
    s.feed(*day_windows(date(2006, 1, 2), "0.5"))
    crossed_at = rated_total(s.charges())
    assert crossed_at >= Decimal(40)
    assert [(a.kind, a.crossing) for a in s.alerts()] == [("PROJECTED", 1), ("ACTUAL", 1)]
    assert s.alerts()[1].amount == crossed_at and s.alerts()[1].budget == Decimal(40)
    s.feed(*day_windows(date(2006, 1, 3), "0.5"))  # more cost above the budget: no new alert
    assert len(s.alerts()) == 2
    # late revisions raise the cost further and the stage restarts: still one alert for this crossing
    s.restart()
    s.feed(*[window(w.window_start, "0.6", revision=1) for w in day_windows(date(2006, 1, 3), "0.5")[:4]])
    assert len(s.alerts()) == 2
    # revisions lower the cost below the budget (re-arms silently) and then raise it again: a new crossing
    s.feed(*[window(w.window_start, "0", revision=2) for d in (2, 3) for w in day_windows(date(2006, 1, d), "0.5")])
    assert rated_total(s.charges()) < Decimal(40) and len(s.alerts()) == 2
    s.restart()
    s.feed(*[window(w.window_start, "0.5", revision=3) for d in (2, 3) for w in day_windows(date(2006, 1, d), "0.5")])
    assert [(a.kind, a.crossing) for a in s.alerts()] == [("PROJECTED", 1), ("ACTUAL", 1), ("ACTUAL", 2)]
    assert len({a.alert_id for a in s.alerts()}) == 3


@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 3), st.integers(0, 400)), min_size=1, max_size=60))
def test_usage_is_the_latest_revision_of_each_window_whatever_the_order_and_repeats(
        arrivals: list[tuple[int, int, int]]) -> None:
    """Windows 0..9 (two days), revisions 0..3 arriving in any order, repeated: the usage per day is the sum of
    each window's highest revision seen, never a sum of revisions (a revision's value depends only on it)."""
    ctx, written = FakeContext(), []
    proc = UsageProcessor(TOPICS, CODEC, lambda: REF, dict, written.extend)
    starts = [datetime(2006, 1, 1, 13, tzinfo=UTC) + timedelta(hours=5 * i) for i in range(10)]
    value = lambda w, rev: Decimal(w * 7 + rev * 100 + 1) / 8  # noqa: E731
    latest: dict[int, int] = {}
    for offset, (w, rev, _) in enumerate(arrivals):
        rec = Incoming(TOPICS.usage_windows, 0, offset, ACC.encode(), CODEC.encode(window(starts[w], str(value(w, rev)),
                                                                                             revision=rev)), (), 0)
        proc.process(rec, ctx)
        latest[w] = max(latest.get(w, -1), rev)
        if offset % 7 == 0:
            proc.punctuate(0, ctx)
    proc.punctuate(0, ctx)
    seq = max(s for s, _ in written)
    snap = next(m for s, m in written if s == seq)
    by_day: dict[date, Decimal] = {}
    for w, rev in latest.items():
        day = starts[w].astimezone(REF.accounts[ACC].tz).date()
        by_day[day] = by_day.get(day, Decimal(0)) + value(w, rev)
    assert {d: k for d, k, _ in snap.daily if k} == {d: k for d, k in by_day.items() if k}
    assert snap.usage_kwh == sum(by_day.values(), Decimal(0)).quantize(Decimal("0.000001"))


def test_undecodable_input_is_dead_lettered_with_its_bytes() -> None:
    from pipeline.records import DeadLetter

    ctx, written = FakeContext(), []
    proc = UsageProcessor(TOPICS, CODEC, lambda: REF, dict, written.extend)
    proc.process(Incoming(TOPICS.charges_rated, 1, 5, b"ACC-1", b"not avro", (), 0), ctx)
    proc.punctuate(0, ctx)
    [(topic, key, value)] = ctx.forwarded
    dead = CODEC.decode(value, DeadLetter)
    assert (topic, key, dead.stage, dead.reason, dead.value, dead.offset) == (
        TOPICS.dlq_ingest, b"ACC-1", "usage", "UNDECODABLE", b"not avro", 5)
    assert ctx.counts == {("dead_letter", "UNDECODABLE"): 1} and written == []
