"""Rating throughput: window revisions rated per second, and the time to re-rate one month of
30-minute data for N accounts after a superseding price book version, in one run.

    .venv/bin/python benchmarks/rating.py [--accounts 1000]

Runs the real rating processor over a real RocksDB store with Avro state encoding at every batch
commit (what the stage does between Kafka transactions); Kafka I/O is not included (see
benchmarks/windowing.py for the broker-bound comparison). Uses the bundled ActewAGL TOU price book.
Rating posts with the product's posting policy (``pipeline.rating.posting``: weekly boundaries and the period
end; the processing-time clock advances 1 ms per batch, and after the last batch the feed stops, so what is
still held is posted inside the timed run); ``--posting-interval-days 0`` posts every batch (before issue 13).

Then (unless ``--no-passthrough``; needs the local stack: ``pipeline stack up``) the same window revisions
are produced to a fresh topic (4 partitions, key account), and the plain transactional consume → produce
passthrough of ``common.run_passthrough`` (same batch size and commit interval as the stages) runs over
them, warmed up first as the other stage benchmarks do. ``--passes`` (3) timed passes of each side alternate:
a rating pass (a fresh store, a fresh reference snapshot), then a passthrough pass (a fresh consumer group),
so both sides are measured in the same minutes; each pass's figures are printed. Last line:
``rating/passthrough throughput ratio: X`` = the median revisions/s of the rating passes ÷ the median
records/s of the passthrough passes (on a shared 2-core machine one pass of either side moves by up to 40 %
from one minute to the next: the medians of alternating passes compare the code, not the minute). Basis: the
rating side pays no Kafka consume, produce or transaction commit, so X is an upper bound of what the rating
stage with Kafka reaches (benchmarks/e2e.py measures the stage processes with Kafka). The re-rate figure is
taken after the last rating pass.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from statistics import median
from typing import Any

from common import bench_topics, run_passthrough, warm_up

from pipeline.codec import Codec, default_codec
from pipeline.config import Settings
from pipeline.rating.posting import PostingPolicy
from pipeline.rating.pricebook import PriceBook
from pipeline.rating.processor import RatingProcessor, state_codec
from pipeline.records import UsageWindow
from pipeline.reference import BUNDLED_REFERENCE, Account, PlanAssignment, ReferenceData, ServicePoint
from pipeline.runtime.kafka import IdempotentProducer, Incoming
from pipeline.runtime.loop import GC_THRESHOLDS
from pipeline.runtime.state import open_fresh_store
from pipeline.topology import Topics

BATCH = 2000


class _Ctx:
    def __init__(self, store) -> None:  # type: ignore[no-untyped-def]
        self._store = store
        self.forwarded = 0

    def count(self, kind: str, reason: str) -> None:
        pass

    def forward(self, topic: str, key: object, value: bytes, headers: object = None) -> None:
        self.forwarded += 1

    def store(self, partition: int):  # type: ignore[no-untyped-def]
        return self._store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--batch", type=int, default=BATCH,
                        help="revisions per rating batch (the stage's batch size; larger batches touch each period "
                             "fewer times: a quicker way to build a month of state for the re-rating figure)")
    parser.add_argument("--passes", type=int, default=3,
                        help="timed passes of each side, alternating (rating, then the passthrough); the ratio is "
                             "of the medians")
    parser.add_argument("--no-passthrough", action="store_true", help="skip the Kafka passthrough (no stack needed)")
    parser.add_argument("--posting-interval-days", type=int, default=Settings().posting_interval_days,
                        help="rating's posting policy (pipeline.rating.posting; 0 = post every batch, as before "
                             "issue 13); the product default")
    args = parser.parse_args()
    if args.passes < 1:
        parser.error("--passes must be at least 1")

    raw_book = json.loads(BUNDLED_REFERENCE.read_text())["price_books"][0]
    v1 = PriceBook.model_validate(raw_book)
    accounts = [Account(account=f"ACC-{i:05d}", timezone="Australia/Sydney", holiday_region="AU-ACT",
                        billing_anchor="2025-01-01") for i in range(args.accounts)]
    sps = [ServicePoint(nmi=f"NMI{i:07d}", account=a.account, effective_from="2025-01-01")
           for i, a in enumerate(accounts)]
    plans = [PlanAssignment(account=a.account, price_book_id=v1.id, effective_from="2025-01-01") for a in accounts]
    ref: dict[str, ReferenceData] = {}  # the snapshot the processor reads (a fresh one per pass)

    codec = default_codec()
    topics = Topics(Settings())
    start = datetime(2025, 3, 1, tzinfo=UTC) - timedelta(hours=11)  # local March (AEDT)
    per_account = args.days * 48
    records: list[Incoming] = []
    for slot in range(per_account):
        ws = start + timedelta(minutes=30 * slot)
        for a in accounts:
            win = UsageWindow(f"{a.account}|NMI/E1|{slot}", a.account, "NMI/E1", "energy_import", "kWh", ws,
                              ws + timedelta(minutes=30), 0, "ON_TIME", Decimal(slot % 17) / 10,
                              Decimal(slot % 17) / 10, 2, ("A",), ("bench#1",), ws)
            records.append(Incoming(topics.usage_windows, 0, len(records), a.account.encode(),
                                    codec.encode(win), (), 0))

    rates: list[float] = []
    pts: list[float] = []
    with nullcontext() if args.no_passthrough else passthrough_topic(records) as passthrough:
        for i in range(args.passes):
            ref["data"] = ReferenceData.build(accounts, sps, plans, [v1])  # each pass: its own snapshot and memos
            run = RatingRun(topics, codec, ref, args)
            try:
                seconds, cpu, thread = run.rate(records)
                rates.append(len(records) / seconds)
                print(f"pass {i + 1}: {len(records):,} window revisions ({args.accounts} accounts × {per_account} "
                      f"windows) rated in {seconds:.1f}s: {rates[-1]:,.0f} revisions/s, CPU "
                      f"{cpu / len(records) * 1e6:.1f} µs per revision ({thread / len(records) * 1e6:.1f} µs in the "
                      f"rating thread), {run.ctx.forwarded:,} delta lines ({run.ctx.forwarded / args.accounts:.1f} per "
                      f"account-month; posting interval {args.posting_interval_days} days)")
                if i == args.passes - 1:
                    lines_first = run.ctx.forwarded
                    rerate = run.rerate(raw_book, accounts, sps, plans, v1)
                    print(f"re-rate one month of 30-minute data for {args.accounts} accounts after a superseding "
                          f"version: {rerate:.1f}s, {run.ctx.forwarded - lines_first:,} difference lines")
            finally:
                run.close()
            if passthrough is not None:
                pts.append(len(records) / passthrough(i))
                print(f"pass {i + 1}: passthrough (transactional consume→produce, Kafka) over the same "
                      f"{len(records):,} revisions: {pts[-1]:,.0f} records/s; this pass's ratio "
                      f"{rates[-1] / pts[-1]:.3f}")
    print(f"rating, median of {args.passes} passes: {median(rates):,.0f} revisions/s")
    if pts:
        print(f"passthrough, median of {args.passes} passes (each right after a rating pass): {median(pts):,.0f} "
              "records/s")
        print("basis: rating in-process without Kafka I/O ÷ the Kafka EOS passthrough (an upper bound for the stage); "
              "median rate of each side")
        print(f"rating/passthrough throughput ratio: {median(rates) / median(pts):.3f}")


class RatingRun:
    """One timed pass of the rating processor over the benchmark's revisions, on a fresh RocksDB store."""

    def __init__(self, topics: Topics, codec: Codec, ref: dict[str, ReferenceData], args: argparse.Namespace) -> None:
        self.ref, self.args = ref, args
        enc, dec = state_codec(codec)
        self.state_dir = Path(tempfile.mkdtemp(prefix="bench-rating-"))
        self.store = open_fresh_store(self.state_dir / "0", enc, dec)
        self.ctx = _Ctx(self.store)
        self.wall = [0]  # processing time (ms) of the posting policy's idle rule: 1 ms per batch, then the feed stops
        self.posting = PostingPolicy(args.posting_interval_days, 3_600_000, Settings().posting_max_listed_windows)
        self.proc = RatingProcessor(topics, codec, lambda: ref["data"], self.posting, wall_ms=lambda: self.wall[0])
        self.proc.on_assign(0, self.ctx)

    def commit(self) -> None:
        changes = self.store.encoded_changes()  # what the changelog carries (as the stage's commit builds it)
        self.store.flush(changes)

    def rate(self, records: list[Incoming]) -> tuple[float, float, float]:
        """(seconds, process CPU seconds, rating thread CPU seconds) to rate ``records`` in the stage's batches."""
        proc, ctx, wall = self.proc, self.ctx, self.wall
        proc.punctuate(0, ctx)
        self.commit()
        gc.collect()
        gc.set_threshold(*GC_THRESHOLDS)  # as a stage process runs (pipeline.runtime.loop)
        t0, c0, th0 = time.perf_counter(), time.process_time(), time.thread_time()
        for i in range(0, len(records), self.args.batch):
            proc.process_batch(records[i:i + self.args.batch], ctx)  # as the stage's loop calls it (runtime.loop)
            wall[0] += 1
            proc.punctuate(0, ctx)
            self.commit()
        wall[0] += self.posting.idle_ms  # the feed stopped: whatever the posting policy holds is posted (timed too)
        proc.punctuate(0, ctx)
        self.commit()
        return time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - th0

    def rerate(self, raw_book: dict[str, Any], accounts: list[Account], sps: list[ServicePoint],
               plans: list[PlanAssignment], v1: PriceBook) -> float:
        """Seconds to re-rate what was rated after a superseding version 2 of the price book (rate 0.3750)."""
        v2_raw = json.loads(json.dumps(raw_book))
        v2_raw["version"] = 2
        v2_raw["components"][0]["bands"][0]["rate"] = "0.3750"
        v2 = PriceBook.model_validate(v2_raw)
        self.ref["data"] = ReferenceData.build(accounts, sps, plans, [v1, v2])
        t1 = time.perf_counter()
        self.proc.punctuate(0, self.ctx)
        self.commit()
        return time.perf_counter() - t1

    def close(self) -> None:
        self.store.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)  # (hundreds of MB per run: leave nothing behind)


@contextmanager
def passthrough_topic(records: list[Incoming]) -> Iterator[Callable[[int], float]]:
    """The revisions produced once to a fresh 4-partition topic (key account), warmed up (untimed); yields
    ``run(i)``: the seconds of passthrough pass ``i`` (``common.run_passthrough``: the stages' batch size and commit
    interval; its own consumer group, from the first offset). The topics are deleted afterwards."""
    with bench_topics(BATCH, 4) as (settings, topics):
        producer = IdempotentProducer(settings.kafka_bootstrap)
        for rec in records:
            producer.send(topics.usage_windows, rec.key, rec.value)
        producer.flush(300)
        warm_up(settings, topics, topics.usage_windows)

        def run(i: int) -> float:
            seconds, _cpu = run_passthrough(settings, topics, len(records), topics.usage_windows,
                                            topics.charges_rated, group=f"passthrough-{i}")
            return seconds

        yield run


if __name__ == "__main__":
    main()
