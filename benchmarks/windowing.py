"""Sustained throughput of the windowing stage (exactly-once on) vs a plain transactional
consume → produce passthrough over the same input, on the local stack.

    .venv/bin/pipeline stack up && .venv/bin/python benchmarks/windowing.py [--events 200000]

Both runs read the same pre-produced topic of UsageEvents (4 partitions, 1,000 series of 5-minute
intervals), use the same batch size, commit interval and transactional producer settings, and are
timed from the first record consumed to the last input offset committed. Prints the figures and,
last, ``windowing/passthrough throughput ratio: X``. A third run bounds what any windowing stage on
this stack can reach: it consumes the same input and decodes every event with the stage's fastavro
reader, committing offsets in the same transactions, with no state and no output. The CPU time of
the thread that consumes (per event, start-up and the idle polls at the end included) is printed
too: on a shared machine it varies less than the throughputs.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from tempfile import mkdtemp

from common import run_passthrough, wait_committed

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.records import UsageEvent
from pipeline.runtime.kafka import IdempotentProducer, create_topics
from pipeline.runtime.loop import StageRunner
from pipeline.stages import build_stage
from pipeline.topology import Topics
from pipeline.windowing.wire import EventReader

PARTITIONS = 4
CPU: dict[str, float] = {}  # run → CPU seconds of the consuming thread


def produce_input(settings: Settings, topics: Topics, n: int, series: int = 1000) -> None:
    codec = default_codec()
    producer = IdempotentProducer(settings.kafka_bootstrap)
    base = datetime(2025, 1, 1, tzinfo=UTC)
    per_series = n // series
    for slot in range(per_series):  # time-ordered, like a day's files landing
        start = base + timedelta(minutes=5 * slot)
        for s in range(series):
            account = f"ACC-{s % 250:04d}"
            ev = UsageEvent(f"nem12:NMI{s:06d}:E1:{slot}", account, f"NMI{s:06d}/E1", "energy_import", "kWh",
                            start, start + timedelta(minutes=5), Decimal(s % 97) / 100, base, "A", "bench#1")
            producer.send(topics.usage_events, account.encode(), codec.encode(ev))
    producer.flush()


def run_windowing(settings: Settings, n: int) -> float:
    spec = build_stage("windowing", settings)
    runner = StageRunner(settings, spec)
    first: list[float] = []
    original = spec.processor.process_batch  # type: ignore[attr-defined]

    def timed(records, ctx):  # type: ignore[no-untyped-def]
        if not first:
            first.append(time.monotonic())
        original(records, ctx)

    spec.processor.process_batch = timed  # type: ignore[attr-defined]
    topics = Topics(settings)
    result: list[float] = []

    def watch() -> None:
        result.append(wait_committed(settings, topics.group("windowing"), topics.usage_events, n, PARTITIONS))
        runner.stop()

    threading.Thread(target=watch, daemon=True).start()
    cpu0 = time.thread_time()
    runner.run()
    CPU["windowing"] = time.thread_time() - cpu0
    return result[0] - first[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=Settings().batch_max_records,
                        help="max records per transaction, for both runs (PIPELINE_BATCH_MAX_RECORDS)")
    args = parser.parse_args()
    tag = f"bench{uuid.uuid4().hex[:6]}."
    settings = Settings(topic_prefix=tag, partitions=PARTITIONS, state_dir=Path(mkdtemp(prefix="bench-state-")),
                        commit_interval_ms=250, batch_max_records=args.batch, idle_timeout_s=3600)
    topics = Topics(settings)
    create_topics(settings.kafka_bootstrap, topics.specs())
    t0 = time.monotonic()
    produce_input(settings, topics, args.events)
    n = (args.events // 1000) * 1000
    print(f"input: {n} usage events on {PARTITIONS} partitions, produced in {time.monotonic() - t0:.1f}s; "
          f"batch ≤ {args.batch} records, commit interval 250 ms")
    pt, CPU["passthrough"] = run_passthrough(settings, topics, n, topics.usage_events, topics.usage_windows)
    print(f"passthrough (transactional consume→produce): {n / pt:,.0f} events/s ({pt:.1f}s)")
    bound, CPU["decode only"] = run_passthrough(settings, topics, n, topics.usage_events, None,
                                                each=EventReader(default_codec()), group="decode-only")
    print(f"bound: consume + fastavro decode of each event + offsets in the transaction, no state, no output: "
          f"{n / bound:,.0f} events/s ({bound:.1f}s), ratio {(n / bound) / (n / pt):.2f}")
    wt = run_windowing(settings, n)
    print(f"windowing stage (exactly-once, RocksDB + changelog): {n / wt:,.0f} events/s ({wt:.1f}s)")
    print(f"CPU of the consuming thread per event: passthrough {CPU['passthrough'] / n * 1e6:.1f} µs, "
          f"decode only {CPU['decode only'] / n * 1e6:.1f} µs, windowing {CPU['windowing'] / n * 1e6:.1f} µs")
    print(f"windowing/passthrough throughput ratio: {(n / wt) / (n / pt):.2f}")


if __name__ == "__main__":
    main()
