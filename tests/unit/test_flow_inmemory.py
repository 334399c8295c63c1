"""The four processors chained in memory (FakeContext, no Kafka) over real NEM12 data must give exactly
the independent batch bill, line by line, to the cent."""

from __future__ import annotations

import random
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.ingest.nem12 import read_nem12
from pipeline.ingest.processor import IngestProcessor
from pipeline.rating.processor import RatingProcessor
from pipeline.records import RatedCharge
from pipeline.reference import BUNDLED_REFERENCE, ReferenceData, ReferenceFile
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import FakeContext
from pipeline.topology import Topics
from pipeline.windowing.processor import WindowingProcessor, policies_from_settings
from tests.batchbill import expected_bills

DATA = Path(__file__).resolve().parent.parent / "data" / "nem12"
FILES = sorted(DATA.glob("*.zip"))[:14]


def _incoming(topic: str, partition: int, offset: int, key, value: bytes) -> Incoming:
    return Incoming(topic, partition, offset, key if isinstance(key, bytes) else str(key).encode(), value, (), 0)


def run_chain(files: list[Path], shuffle_seed: int | None = None) -> dict[tuple[str, str], dict[str, Decimal]]:
    settings = Settings(idle_timeout_s=1)
    topics = Topics(settings)
    codec = default_codec()
    ref = ReferenceData.from_file(ReferenceFile.read(BUNDLED_REFERENCE))
    ingest = IngestProcessor(topics, codec, lambda: ref)
    clock = [0]
    windowing = WindowingProcessor(topics, codec, policies_from_settings(settings), clock_ms=lambda: clock[0])
    rating = RatingProcessor(topics, codec, lambda: ref)

    readings = [r for f in files for r in read_nem12(f).readings]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(readings)
    ictx = FakeContext()
    for i, r in enumerate(readings):
        ingest.process(_incoming(topics.meter_readings, 0, i, r.nmi, codec.encode(r)), ictx)
    events = [v for t, k, v in ictx.forwarded if t == topics.usage_events]
    assert len(events) == len(readings)

    wctx = FakeContext()
    windowing.on_assign(0, wctx)
    for i, v in enumerate(events):
        windowing.process(_incoming(topics.usage_events, 0, i, b"", v), wctx)
        if i % 500 == 0:
            windowing.punctuate(clock[0], wctx)
    clock[0] = 2_000_000_000_000  # idle: watermark follows the wall clock, every window closes
    windowing.punctuate(clock[0], wctx)
    windowing.punctuate(clock[0] + 2000, wctx)
    wins = [v for t, k, v in wctx.forwarded if t == topics.usage_windows]

    rctx = FakeContext()
    rating.on_assign(0, rctx)
    for i, v in enumerate(wins):
        rating.process(_incoming(topics.usage_windows, 0, i, b"", v), rctx)
        if i % 300 == 0:
            rating.punctuate(0, rctx)
    rating.punctuate(0, rctx)
    totals: dict[tuple[str, str], dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for t, _k, v in rctx.forwarded:
        assert t == topics.charges_rated, t
        c = codec.decode(v, RatedCharge)
        totals[(c.account, c.period_start.isoformat())][f"{c.price_book_id}|{c.component_id}|{c.band}"] += c.amount
    return totals


def _expected(files: list[Path]) -> dict[tuple[str, str], dict[str, Decimal]]:
    return {
        (a, p.isoformat()): lines for (a, p), lines in expected_bills(files, BUNDLED_REFERENCE).items()
    }


def test_chain_matches_batch_bill_to_the_cent() -> None:
    got = run_chain(FILES)
    want = _expected(FILES)
    assert set(got) == set(want)
    for key, lines in want.items():
        assert {k: v for k, v in got[key].items() if v != 0} == {k: v for k, v in lines.items() if v != 0}, key


def test_chain_is_order_independent() -> None:
    files = FILES[:6]
    assert run_chain(files, shuffle_seed=7) == run_chain(files)
