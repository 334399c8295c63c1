"""The posting policy of the rating stage (issue 13, ``pipeline.rating.posting``): a month of live 30-minute
windows posts a handful of lines per account-month instead of a line per changed charge per batch, with the
same period totals to the cent, unique line ids, explanations that still account for every window, and the
same lines after a restart from the serialized state."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.rating.posting import (
    BOUNDARY,
    EVERY_BATCH,
    IDLE,
    PERIOD_END,
    CauseDigest,
    PostingPolicy,
    posting_boundaries_ms,
    posting_reason,
)
from pipeline.rating.processor import RatingProcessor, state_codec
from pipeline.records import RatedCharge, UsageWindow
from pipeline.reference import BUNDLED_REFERENCE, ReferenceData, ReferenceFile
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import FakeContext
from pipeline.topology import Topics

CODEC = default_codec()
TOPICS = Topics(Settings())
REF = ReferenceData.from_file(ReferenceFile.read(BUNDLED_REFERENCE))
SYDNEY = ZoneInfo("Australia/Sydney")
APRIL = datetime(2005, 4, 1, tzinfo=SYDNEY).astimezone(UTC)  # ACC-1001's April 2005 period (TOU, Sydney)
WINDOW = timedelta(minutes=30)
MONTH_WINDOWS = 30 * 48
ms = lambda dt: int(dt.timestamp() * 1000)  # noqa: E731


def window(i: int, revision: int = 0, value: Decimal | None = None, lag: timedelta = timedelta(hours=1)) -> UsageWindow:
    """The i-th 30-minute import window of ACC-1001's meter in April 2005 (Sydney), watermark = its end − 1 h + lag."""
    start = APRIL + i * WINDOW
    v = value if value is not None else Decimal(i % 7 + 1) / 4
    return UsageWindow(f"ACC-1001|NEM1201001/E1|{ms(start)}", "ACC-1001", "NEM1201001/E1", "energy_import", "kWh",
                       start, start + WINDOW, revision, "ON_TIME" if revision == 0 else "LATE", v, v, 6,
                       ("A",), (f"april.csv#{i}",), start + WINDOW - timedelta(hours=1) + lag)


class Rig:
    """The rating processor over a FakeContext, fed batches; ``wall`` is its processing-time clock (ms)."""

    def __init__(self, policy: PostingPolicy | None, ctx: FakeContext | None = None) -> None:
        self.wall = 0
        self.ctx = ctx or FakeContext()
        self.rating = RatingProcessor(TOPICS, CODEC, lambda: REF, policy, wall_ms=lambda: self.wall)
        self.rating.on_assign(0, self.ctx)
        self.offset = 0

    def batch(self, windows: list[UsageWindow], seconds: float = 1.0) -> None:
        for win in windows:
            self.rating.process(Incoming(TOPICS.usage_windows, 0, self.offset, b"ACC-1001", CODEC.encode(win), (), 0),
                                self.ctx)
            self.offset += 1
        self.wall += int(seconds * 1000)
        self.rating.punctuate(self.wall, self.ctx)

    def lines(self) -> list[RatedCharge]:
        return [CODEC.decode(v, RatedCharge) for t, _k, v in self.ctx.forwarded if t == TOPICS.charges_rated]


def totals(lines: list[RatedCharge]) -> dict[tuple[str, str, str], Decimal]:
    out: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for c in lines:
        out[(c.period_start.isoformat(), c.component_id, c.band)] += c.amount
    return dict(out)


def stream(rig: Rig, first: int = 0, last: int = MONTH_WINDOWS, per_batch: int = 6) -> None:
    """Windows first..last, live: 3 hours of windows per batch."""
    for i in range(first, last, per_batch):
        rig.batch([window(j) for j in range(i, min(i + per_batch, last))])


POLICY = PostingPolicy(interval_days=7, idle_ms=60_000, max_listed_windows=48)


def test_a_live_month_posts_a_few_lines_with_the_same_totals_as_posting_every_batch() -> None:
    every, weekly = Rig(None), Rig(POLICY)
    stream(every)
    stream(weekly)
    weekly.batch([], seconds=61)  # the feed stopped: what is pending is posted (idle)
    a, b = every.lines(), weekly.lines()
    assert totals(a) == totals(b)
    assert sum(c.amount for c in b) == sum(c.amount for c in a) > 0
    assert len(a) > 500  # a delta per changed charge line per batch
    assert len(b) <= 30
    assert len({c.line_id for c in b}) == len(b)
    postings = {c.cause: json.loads(c.explanation)["posting"] for c in b}
    assert sum(p["windows_total"] for p in postings.values()) == MONTH_WINDOWS  # every window, once
    # 8th, 15th, 22nd, 29th, then the last window's watermark reaches 1 May: April is complete
    assert Counter(p["reason"] for p in postings.values()) == {BOUNDARY: 4, PERIOD_END: 1}
    for c in b:
        x = json.loads(c.explanation)
        assert len(x["windows"]) <= x["posting"]["windows_listed"] <= 48  # a band's line lists its own windows
        if x["posting"]["windows_total"] > 48:  # the rest summarised per local day, adding up to the total
            assert sum(d["windows"] for d in x["posting"]["days"]) == x["posting"]["windows_total"]


def test_nothing_is_posted_between_boundaries_and_the_period_end_posts_at_once() -> None:
    rig = Rig(POLICY)
    stream(rig, 0, 48 * 6)  # six days: no boundary crossed yet
    assert rig.lines() == []
    stream(rig, 48 * 6, 48 * 8)  # the clock crosses 8 April 00:00 (Sydney)
    first = rig.lines()
    assert first and {json.loads(c.explanation)["posting"]["reason"] for c in first} == {BOUNDARY}
    stream(rig, 48 * 8, MONTH_WINDOWS)
    # a window of May moves the clock past the period end: April is posted in that batch
    may = UsageWindow(f"ACC-1001|NEM1201001/E1|{ms(APRIL + 30 * 48 * WINDOW + timedelta(hours=2))}", "ACC-1001",
                      "NEM1201001/E1", "energy_import", "kWh", APRIL + 30 * 48 * WINDOW + timedelta(hours=2),
                      APRIL + 30 * 48 * WINDOW + timedelta(hours=2, minutes=30), 0, "ON_TIME", Decimal(1), Decimal(1),
                      6, ("A",), ("may.csv#1",), APRIL + 30 * 48 * WINDOW + timedelta(hours=2))
    rig.batch([may])
    april = [c for c in rig.lines() if c.period_start == date(2005, 4, 1)]
    assert {json.loads(c.explanation)["posting"]["reason"] for c in april[len(first):]} == {BOUNDARY, PERIOD_END}
    # a late correction of April, after its end: posted with the batch that brings it
    before = len(rig.lines())
    rig.batch([window(5, revision=1, value=Decimal("9.5"))])
    late = rig.lines()[before:]
    assert late and {json.loads(c.explanation)["posting"]["reason"] for c in late} == {PERIOD_END}
    assert json.loads(late[0].explanation)["windows"][0]["revision"] == 1


def restart_mid_period(changelog: Callable[[dict[bytes, bytes]], dict[bytes, bytes]] = lambda c: c) -> None:
    """A month streamed straight, and the same month with a restart after 10 days and 3 hours, from the serialized
    state (``changelog`` applied to its bytes first): the same lines, ids, amounts and explanations."""
    straight = Rig(POLICY)
    stream(straight)
    straight.batch([], seconds=61)

    first = Rig(POLICY)
    stream(first, 0, 48 * 10 + 6)  # stop mid-period, with changes pending and one posting made
    enc, dec = state_codec(CODEC)
    restored = FakeContext()
    serialized = changelog({key: enc(key, value) for key, value in first.ctx.store(0).data.items()})
    for key, raw in serialized.items():  # what the changelog would restore
        restored.store(0).put(key, dec(key, raw))
    assert any(k.startswith(b"rq|") for k in restored.store(0).data)
    second = Rig(POLICY, restored)
    second.wall, second.offset = first.wall, first.offset
    stream(second, 48 * 10 + 6)
    second.batch([], seconds=61)
    assert [c.line_id for c in first.lines() + second.lines()] == [c.line_id for c in straight.lines()]
    assert [c.amount for c in first.lines() + second.lines()] == [c.amount for c in straight.lines()]
    assert [c.explanation for c in first.lines() + second.lines()] == [c.explanation for c in straight.lines()]
    assert not [k for k in second.ctx.store(0).data if k.startswith((b"rq|", b"rqc|"))]  # all posted: none left


def test_a_restart_from_the_serialized_state_posts_the_same_lines() -> None:
    restart_mid_period()


def test_a_restart_from_state_with_one_listed_cause_per_key_posts_the_same_lines() -> None:
    """State written before listed causes were stored one entry per batch (one ``RatingPendingCause`` under
    ``rqc|<period key>|<index>`` each) restores the same pending periods."""
    converted: list[int] = []

    def one_per_key(changelog: dict[bytes, bytes]) -> dict[bytes, bytes]:
        out = {}
        for key, raw in changelog.items():
            if not key.startswith(b"rqc|"):
                out[key] = raw
                continue
            prefix, _, first = key.rpartition(b"|")
            for i, c in enumerate(CODEC.decode_dict(raw, "RatingPendingCauses")["causes"]):
                out[b"%s|%05d" % (prefix, int(first) + i)] = CODEC.encode(c, "RatingPendingCause")
                converted.append(i)
        return out

    restart_mid_period(one_per_key)
    assert len(converted) > 1 and max(converted) > 0  # batches of several causes became one key each


def test_a_feed_that_stops_is_posted_once_its_clock_has_been_idle() -> None:
    rig = Rig(POLICY)
    stream(rig, 0, 48 * 3)  # its clock last moved 1 s before the last punctuate
    rig.batch([], seconds=58)
    assert rig.lines() == []
    rig.batch([], seconds=2)  # 61 s without the event clock moving
    lines = rig.lines()
    assert lines and {json.loads(c.explanation)["posting"]["reason"] for c in lines} == {IDLE}
    assert sum(c.quantity for c in lines if c.component_id == "energy") == sum(
        window(i).value for i in range(48 * 3))
    rig.batch([], seconds=120)
    assert len(rig.lines()) == len(lines)  # nothing pending: nothing more


def test_posting_every_batch_is_the_default() -> None:
    rig = Rig(None)
    rig.batch([window(0), window(1)])
    lines = rig.lines()
    assert lines and all("posting" not in json.loads(c.explanation) for c in lines)
    assert posting_reason(PostingPolicy(), (), 0, 0, 0) == EVERY_BATCH


def test_boundaries_are_local_midnights_every_interval_and_the_period_end() -> None:
    got = posting_boundaries_ms(date(2005, 4, 1), date(2005, 5, 1), SYDNEY, 7)
    want = [date(2005, 4, d) for d in (8, 15, 22, 29)] + [date(2005, 5, 1)]
    assert got == tuple(ms(datetime(d.year, d.month, d.day, tzinfo=SYDNEY)) for d in want)
    assert posting_boundaries_ms(date(2005, 4, 1), date(2005, 5, 1), SYDNEY, 0) == (got[-1],)


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=40), st.integers(1, 60))
def test_posting_reason_is_boundary_exactly_when_one_is_crossed(clocks: list[int], idle_s: int) -> None:
    bounds = (2_000, 4_000, 6_000, 8_000)
    policy = PostingPolicy(interval_days=1, idle_ms=idle_s * 1000)
    since = clocks[0]
    for clock in sorted(clocks):
        reason = posting_reason(policy, bounds, since, clock, 0)
        if clock >= bounds[-1]:
            assert reason == PERIOD_END
        elif any(since < b <= clock for b in bounds):
            assert reason == BOUNDARY
        else:
            assert reason is None
            assert posting_reason(policy, bounds, since, clock, idle_s * 1000) == IDLE


def test_the_cause_of_a_fully_listed_posting_is_the_one_batch_formula() -> None:
    digest = CauseDigest()
    for i in range(3):
        assert digest.add(f"w{i}@0", "2005-04-01", Decimal("0.25"), 3)
    import hashlib

    assert digest.cause() == "windows:" + hashlib.sha256(b"w0@0\nw1@0\nw2@0").hexdigest()[:24]
    assert not digest.add("w3@0", "2005-04-02", Decimal("0.5"), 3)
    assert digest.ids is None and digest.count == 4
    assert digest.days["2005-04-01"].windows == 3 and digest.days["2005-04-02"].delta == Decimal("0.5")
    assert digest.cause().startswith("windows:") and digest.cause() != "windows:" + hashlib.sha256(
        b"w0@0\nw1@0\nw2@0\nw3@0").hexdigest()[:24]


def test_settings_refuse_an_idle_posting_slower_than_the_invoice_idle_close() -> None:
    with pytest.raises(ValueError, match="PIPELINE_POSTING_IDLE_S"):
        Settings(posting_idle_s=700, invoice_idle_close_s=600)
    Settings(posting_idle_s=700, invoice_idle_close_s=600, posting_interval_days=0)  # posting every batch: fine
