"""Sustained throughput of the ingest stage (exactly-once on: duplicate-detection state in RocksDB + changelog,
output, changelog and offsets in one Kafka transaction) vs a plain transactional consume → produce
passthrough over the same input, on the local stack.

    .venv/bin/pipeline stack up && .venv/bin/python benchmarks/ingest.py [--readings 200000] [--events 50000]

Both runs read the same pre-produced topic of MeterReadings (4 partitions, 1,000 NMIs of 5-minute
intervals, time-ordered like a day's files landing, keyed by NMI), use the same batch size, commit
interval and transactional producer settings, and are timed from the first record consumed to the last
input offset committed. The ingest stage is the real ``IngestProcessor`` and state codec in the real
``StageRunner``; only its reference data is an in-memory snapshot (1,000 service points, no Postgres).
With ``--events`` it also times the same stage on CloudEvents (binary and structured mode). Prints the
figures and, last, ``ingest/passthrough throughput ratio: X``.
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from common import batch_argument, bench_topics, run_passthrough, wait_committed, warm_up

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.ingest import processor as ingest
from pipeline.ingest.telemetry import SampleEvent, sample_stream
from pipeline.records import MeterReading
from pipeline.reference import BUNDLED_REFERENCE, Account, ReferenceData, ReferenceFile, ServicePoint, TelemetrySubject
from pipeline.runtime.kafka import (
    IdempotentProducer,
)
from pipeline.runtime.loop import StageRunner, StageSpec
from pipeline.topology import Topics

PARTITIONS = 4
NMIS = 1000


def reference() -> ReferenceData:
    """1,000 NMIs on 250 accounts, and the telemetry sample's metric definitions on 4 subjects."""
    bundled = ReferenceData.from_file(ReferenceFile.read(BUNDLED_REFERENCE))
    accounts = [Account(account=f"ACC-{a:04d}", timezone="Australia/Sydney", holiday_region="AU-ACT",
                        billing_anchor=date(2020, 1, 1)) for a in range(250)]
    points = [ServicePoint(nmi=f"NMI{n:07d}", account=f"ACC-{n % 250:04d}", effective_from=date(2020, 1, 1))
              for n in range(NMIS)]
    subjects = [TelemetrySubject(subject=s, account="ACC-0000", effective_from=date(2020, 1, 1))
                for s in ("tenant-a/app-1", "tenant-a/app-2", "tenant-b", "tenant-c")]
    return ReferenceData.build(accounts, points, [], [], list(bundled.metrics.values()), subjects)


def produce_readings(settings: Settings, topics: Topics, n: int) -> datetime:
    codec = default_codec()
    producer = IdempotentProducer(settings.kafka_bootstrap)
    # NEM midnight (14:00 UTC) 20 days ago: recent, aligned, never "in the future"
    base = (datetime.now(UTC) - timedelta(days=20)).replace(hour=14, minute=0, second=0, microsecond=0)
    for slot in range(n // NMIS):
        start = base + timedelta(minutes=5 * slot)
        for m in range(NMIS):
            nmi = f"NMI{m:07d}"
            r = MeterReading(nmi, "E1", "kWh", start, start + timedelta(minutes=5), Decimal(m % 97) / 100, "A", None,
                             base, "UpdateDateTime", "bench.csv", slot + 2)
            producer.send(topics.meter_readings, nmi.encode(), codec.encode(r))
    producer.flush()
    return base


def produce_events(settings: Settings, topics: Topics, n: int) -> None:
    producer = IdempotentProducer(settings.kafka_bootstrap)
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    hours = 1
    stream: list[SampleEvent] = []
    while len(stream) < n:  # ~25 events per hour for the 4 sample subjects
        hours = max(hours * 2, n // 20)
        stream, _ = sample_stream(end - timedelta(hours=hours), end, seed=3, duplicate_share=0.0)
    for e in stream[:n]:
        key, value, headers = e.record()
        producer.send(topics.telemetry_events, key, value, headers)
    producer.flush()


def run_ingest(settings: Settings, topic: str, n: int, processor: ingest.IngestProcessor) -> tuple[float, float]:
    """(seconds from the first record processed to the last offset committed, CPU seconds of the stage's
    thread in that time: processing, producing, committing; not librdkafka's own threads)."""
    enc, dec = ingest.state_codec(default_codec())
    topics = Topics(settings)
    spec = StageSpec("ingest", [topics.meter_readings, topics.telemetry_events], processor, enc, dec)
    runner = StageRunner(settings, spec)
    first: list[float] = []
    processed = [0]
    name = "process_batch" if hasattr(processor, "process_batch") else "process"  # what the runtime calls
    original = getattr(processor, name)

    def timed(records, ctx):  # type: ignore[no-untyped-def]
        if not first:
            first.append(time.monotonic())
            first.append(time.thread_time())
        original(records, ctx)
        processed[0] += len(records) if name == "process_batch" else 1

    setattr(processor, name, timed)
    result: list[float] = []

    def watch() -> None:
        # the group's offsets are asked of the broker (a new client each time) only once the stage has processed
        # every record: asking every 0.2 s meanwhile loads the 2 cores the stage runs on, which the passthrough,
        # counting its own records, does not pay
        while processed[0] < n:
            time.sleep(0.05)
        result.append(wait_committed(settings, topics.group("ingest"), topic, n, PARTITIONS))
        runner.stop()

    threading.Thread(target=watch, daemon=True).start()
    runner.run()
    return result[0] - first[0], time.thread_time() - first[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--events", type=int, default=0, help="also time N telemetry CloudEvents (0 = skip)")
    batch_argument(parser)
    args = parser.parse_args()
    with bench_topics(args.batch, PARTITIONS) as (settings, topics):
        run_all(settings, topics, args)
        shutil.rmtree(settings.state_dir, ignore_errors=True)


def run_all(settings: Settings, topics: Topics, args: argparse.Namespace) -> None:
    ref = reference()
    t0 = time.monotonic()
    produce_readings(settings, topics, args.readings)
    n = (args.readings // NMIS) * NMIS
    print(f"input: {n} meter readings on {PARTITIONS} partitions, produced in {time.monotonic() - t0:.1f}s; "
          f"batch ≤ {args.batch} records, commit interval 250 ms")
    warm_up(settings, topics, topics.meter_readings)
    pt, _cpu = run_passthrough(settings, topics, n, topics.meter_readings, topics.usage_events)
    print(f"passthrough (transactional consume→produce): {n / pt:,.0f} readings/s ({pt:.1f}s)")
    rules = ingest.IngestRules.from_settings(settings)
    proc = ingest.IngestProcessor(topics, default_codec(), lambda: ref, rules=rules)
    it, cpu = run_ingest(settings, topics.meter_readings, n, proc)
    print(f"ingest stage (exactly-once, duplicate state in RocksDB + changelog): {n / it:,.0f} readings/s "
          f"({it:.1f}s); outcomes {proc.counts}; stage thread CPU {cpu:.1f}s = {cpu / n * 1e6:.0f} µs per reading "
          f"(passthrough thread: {_cpu / n * 1e6:.0f} µs per reading)")
    if args.events:
        produce_events(settings, topics, args.events)
        proc = ingest.IngestProcessor(topics, default_codec(), lambda: ref, rules=rules)
        et, _ = run_ingest(settings, topics.telemetry_events, args.events, proc)
        print(f"ingest stage on CloudEvents (binary + structured): {args.events / et:,.0f} events/s ({et:.1f}s); "
              f"outcomes {proc.counts}")
    print(f"ingest/passthrough throughput ratio: {(n / it) / (n / pt):.2f}")


if __name__ == "__main__":
    main()
