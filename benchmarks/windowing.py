"""Sustained throughput of the windowing stage (exactly-once on) vs a plain transactional
consume → produce passthrough over the same input, on the local stack.

    .venv/bin/pipeline stack up && .venv/bin/python benchmarks/windowing.py [--events 200000]

Both runs read the same pre-produced topic of UsageEvents (4 partitions, 1,000 series of 5-minute
intervals), use the same batch size, commit interval and transactional producer settings, and are
timed from the first record consumed to the last input offset committed (both in-process: to the return
of the commit that covered it; the broker's committed offsets are checked after). Prints the figures and,
last, ``windowing/passthrough throughput ratio: X``. The passthrough runs twice, first and last
(a run right after the input was produced can find the broker still busy), and X is taken against
the faster of the two. A third run bounds what any windowing stage on
this stack can reach: it consumes the same input and decodes every event with the stage's reader
(``EventReader``: hand-written Avro for the current schema, fastavro otherwise), committing offsets
in the same transactions, with no state and no output. The CPU time of
the thread that consumes (per event, start-up and the idle polls at the end included) is printed
too: on a shared machine it varies less than the throughputs.
"""

from __future__ import annotations

import argparse
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from common import batch_argument, bench_topics, run_passthrough, wait_committed, warm_up

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.records import UsageEvent
from pipeline.runtime.kafka import IdempotentProducer
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
    """Run the stage until its commits cover the ``n`` input records; returns the seconds from its first
    batch to the return of the transaction commit that covered the last of them (as the passthrough
    is timed: in-process, to the commit's return). The broker's committed offsets are checked after."""
    spec = build_stage("windowing", settings)
    runner = StageRunner(settings, spec)
    first: list[float] = []
    original = spec.processor.process_batch  # type: ignore[attr-defined]

    def timed(records, ctx):  # type: ignore[no-untyped-def]
        if not first:
            first.append(time.monotonic())
        original(records, ctx)

    spec.processor.process_batch = timed  # type: ignore[attr-defined]
    committed: dict[tuple[str, int], int] = {}
    done: list[float] = []
    commit = runner.clients.commit

    def counted(offsets, group_metadata=None):  # type: ignore[no-untyped-def]
        commit(offsets, group_metadata)  # on the stage's committer thread; raises if the commit failed
        returned = time.monotonic()
        committed.update(offsets)
        if not done and sum(committed.values()) >= n:
            done.append(returned)
            runner.stop()

    runner.clients.commit = counted  # type: ignore[method-assign]
    deadline = threading.Timer(900, runner.stop)  # the run is given up after 15 minutes (then RuntimeError)
    deadline.daemon = True
    deadline.start()
    cpu0 = time.thread_time()
    runner.run()
    CPU["windowing"] = time.thread_time() - cpu0
    deadline.cancel()
    if not done:
        raise RuntimeError(f"the windowing stage did not commit {n} records within 900 s")
    topics = Topics(settings)
    wait_committed(settings, topics.group("windowing"), topics.usage_events, n, PARTITIONS, timeout_s=60)
    return done[0] - first[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    batch_argument(parser)
    args = parser.parse_args()
    with bench_topics(args.batch, PARTITIONS) as (settings, topics):
        run_all(settings, topics, args.events, args.batch)


def run_all(settings: Settings, topics: Topics, events: int, batch: int) -> None:
    t0 = time.monotonic()
    produce_input(settings, topics, events)
    n = (events // 1000) * 1000
    print(f"input: {n} usage events on {PARTITIONS} partitions, produced in {time.monotonic() - t0:.1f}s; "
          f"batch ≤ {batch} records, commit interval 250 ms")
    warm_up(settings, topics, topics.usage_events)
    pt, CPU["passthrough"] = run_passthrough(settings, topics, n, topics.usage_events, topics.usage_windows)
    print(f"passthrough (transactional consume→produce): {n / pt:,.0f} events/s ({pt:.1f}s)")
    bound, CPU["decode only"] = run_passthrough(settings, topics, n, topics.usage_events, None,
                                                each=EventReader(default_codec()), group="decode-only")
    print(f"bound: consume + EventReader decode of each event + offsets in the transaction, no state, no output: "
          f"{n / bound:,.0f} events/s ({bound:.1f}s)")
    wt = run_windowing(settings, n)
    print(f"windowing stage (exactly-once, RocksDB + changelog): {n / wt:,.0f} events/s ({wt:.1f}s)")
    again, _cpu = run_passthrough(settings, topics, n, topics.usage_events, topics.usage_windows,
                                  group="passthrough-again")
    print(f"passthrough again, after the stage: {n / again:,.0f} events/s ({again:.1f}s)")
    print(f"CPU of the consuming thread per event: passthrough {CPU['passthrough'] / n * 1e6:.1f} µs, "
          f"decode only {CPU['decode only'] / n * 1e6:.1f} µs, windowing {CPU['windowing'] / n * 1e6:.1f} µs")
    best = min(pt, again)
    print(f"decode-only bound/passthrough throughput ratio: {best / bound:.2f}")
    print(f"windowing/passthrough throughput ratio: {best / wt:.2f}")


if __name__ == "__main__":
    main()
