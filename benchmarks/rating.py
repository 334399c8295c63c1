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
are produced to a fresh topic (4 partitions, key account) and the plain transactional consume → produce
passthrough of ``common.run_passthrough`` (same batch size and commit interval as the stages) runs over
them. Last line: ``rating/passthrough throughput ratio: X`` = revisions/s of the in-process rating run ÷
records/s of the passthrough. Basis: the rating side pays no Kafka consume, produce or transaction
commit, so X is an upper bound of what the rating stage with Kafka reaches (benchmarks/e2e.py measures
the stage processes with Kafka).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from common import bench_topics, run_passthrough

from pipeline.codec import default_codec
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
    parser.add_argument("--no-passthrough", action="store_true", help="skip the Kafka passthrough (no stack needed)")
    parser.add_argument("--posting-interval-days", type=int, default=Settings().posting_interval_days,
                        help="rating's posting policy (pipeline.rating.posting; 0 = post every batch, as before "
                             "issue 13); the product default")
    args = parser.parse_args()

    raw_book = json.loads(BUNDLED_REFERENCE.read_text())["price_books"][0]
    v1 = PriceBook.model_validate(raw_book)
    accounts = [Account(account=f"ACC-{i:05d}", timezone="Australia/Sydney", holiday_region="AU-ACT",
                        billing_anchor="2025-01-01") for i in range(args.accounts)]
    sps = [ServicePoint(nmi=f"NMI{i:07d}", account=a.account, effective_from="2025-01-01")
           for i, a in enumerate(accounts)]
    plans = [PlanAssignment(account=a.account, price_book_id=v1.id, effective_from="2025-01-01") for a in accounts]
    ref = {"data": ReferenceData.build(accounts, sps, plans, [v1])}

    codec = default_codec()
    topics = Topics(Settings())
    enc, dec = state_codec(codec)
    state_dir = Path(tempfile.mkdtemp(prefix="bench-rating-"))
    store = open_fresh_store(state_dir / "0", enc, dec)
    ctx = _Ctx(store)
    wall = [0]  # processing time (ms) of the posting policy's idle rule: 1 ms per batch, then the feed stops
    posting = PostingPolicy(args.posting_interval_days, 3_600_000, Settings().posting_max_listed_windows)
    proc = RatingProcessor(topics, codec, lambda: ref["data"], posting, wall_ms=lambda: wall[0])
    proc.on_assign(0, ctx)

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

    def commit() -> None:
        changes = store.encoded_changes()  # what the changelog carries (as the stage's commit builds it)
        store.flush(changes)

    proc.punctuate(0, ctx)
    commit()
    gc.set_threshold(*GC_THRESHOLDS)  # as a stage process runs (pipeline.runtime.loop)
    t0, c0, th0 = time.perf_counter(), time.process_time(), time.thread_time()
    for i in range(0, len(records), args.batch):
        proc.process_batch(records[i:i + args.batch], ctx)  # as the stage's loop calls it (pipeline.runtime.loop)
        wall[0] += 1
        proc.punctuate(0, ctx)
        commit()
    wall[0] += posting.idle_ms  # the feed stopped: whatever the posting policy holds is posted (timed too)
    proc.punctuate(0, ctx)
    commit()
    rated, cpu, thr = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - th0
    lines_first = ctx.forwarded
    print(f"{len(records):,} window revisions ({args.accounts} accounts × {per_account} windows) "
          f"rated in {rated:.1f}s: {len(records) / rated:,.0f} revisions/s, CPU {cpu / len(records) * 1e6:.1f} µs per "
          f"revision ({thr / len(records) * 1e6:.1f} µs in the rating thread), {lines_first:,} delta lines "
          f"({lines_first / args.accounts:.1f} per account-month; posting interval {args.posting_interval_days} days)")

    v2_raw = json.loads(json.dumps(raw_book))
    v2_raw["version"] = 2
    v2_raw["components"][0]["bands"][0]["rate"] = "0.3750"
    v2 = PriceBook.model_validate(v2_raw)
    ref["data"] = ReferenceData.build(accounts, sps, plans, [v1, v2])
    t1 = time.perf_counter()
    proc.punctuate(0, ctx)
    commit()
    rerate = time.perf_counter() - t1
    print(f"re-rate one month of 30-minute data for {args.accounts} accounts after a superseding version: "
          f"{rerate:.1f}s, {ctx.forwarded - lines_first:,} difference lines")
    store.close()
    shutil.rmtree(state_dir, ignore_errors=True)  # (hundreds of MB per run: leave nothing behind)
    if not args.no_passthrough:
        pt = passthrough(records)
        print(f"passthrough (transactional consume→produce, Kafka) over the same {len(records):,} revisions: "
              f"{len(records) / pt:,.0f} records/s ({pt:.1f}s)")
        print("basis: rating in-process without Kafka I/O ÷ the Kafka EOS passthrough (an upper bound for the stage)")
        print(f"rating/passthrough throughput ratio: {pt / rated:.3f}")


def passthrough(records: list[Incoming]) -> float:
    """Seconds of the plain EOS passthrough over ``records`` produced to a fresh 4-partition topic."""
    with bench_topics(BATCH, 4) as (settings, topics):
        producer = IdempotentProducer(settings.kafka_bootstrap)
        for rec in records:
            producer.send(topics.usage_windows, rec.key, rec.value)
        producer.flush(300)
        seconds, _cpu = run_passthrough(settings, topics, len(records), topics.usage_windows, topics.charges_rated)
        shutil.rmtree(settings.state_dir, ignore_errors=True)
        return seconds


if __name__ == "__main__":
    main()
