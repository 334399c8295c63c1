"""What the stage benchmarks share: the plain transactional consume → produce passthrough they are
compared with, and waiting for a consumer group's committed offsets."""

from __future__ import annotations

import argparse
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import mkdtemp

from pipeline.config import Settings
from pipeline.runtime.kafka import Incoming, StageClients, committed_offsets, create_topics, delete_topics
from pipeline.topology import Topics


def batch_argument(parser: argparse.ArgumentParser) -> None:
    """``--batch``: max records per transaction, the same for every run of a benchmark."""
    parser.add_argument("--batch", type=int, default=Settings().batch_max_records,
                        help="max records per transaction, for every run (PIPELINE_BATCH_MAX_RECORDS)")


@contextmanager
def bench_topics(batch: int, partitions: int) -> Iterator[tuple[Settings, Topics]]:
    """Settings and created topics for one benchmark: a fresh topic prefix and state folder, the
    stages' commit interval (250 ms), ``batch`` records per transaction at most, no idle timeout.
    The topics and the state folder are deleted afterwards (the broker and the disk are shared: leave nothing
    behind)."""
    settings = Settings(topic_prefix=f"bench{uuid.uuid4().hex[:6]}.", partitions=partitions,
                        state_dir=Path(mkdtemp(prefix="bench-state-")), commit_interval_ms=250,
                        batch_max_records=batch, idle_timeout_s=3600)
    topics = Topics(settings)
    create_topics(settings.kafka_bootstrap, topics.specs())
    try:
        yield settings, topics
    finally:
        delete_topics(settings.kafka_bootstrap, [spec.name for spec in topics.specs()])
        shutil.rmtree(settings.state_dir, ignore_errors=True)


def wait_committed(settings: Settings, group: str, topic: str, n: int, partitions: int,
                   timeout_s: float = 900) -> float:
    """Wait until ``group`` has committed ``n`` records of ``topic``; returns ``time.monotonic()`` then.
    Raises ``TimeoutError`` after ``timeout_s``."""
    tps = [(topic, p) for p in range(partitions)]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = sum(max(o, 0) for o in committed_offsets(settings.kafka_bootstrap, group, tps).values())
        if done >= n:
            return time.monotonic()
        time.sleep(0.2)
    raise TimeoutError(f"{group} did not commit {n} records")


def run_passthrough(settings: Settings, topics: Topics, n: int, in_topic: str, out_topic: str | None,
                    each: Callable[[bytes], object] | None = None, group: str = "passthrough",
                    timeout_s: float = 900) -> tuple[float, float]:
    """Consume ``n`` records of ``in_topic`` and produce the same bytes to ``out_topic``, transactionally,
    offsets in the transaction, with the stages' batch size and commit interval.

    ``each``: also call it on every value (e.g. a decoder); ``out_topic`` ``None``: produce nothing
    (only the offsets are committed, in the transaction). ``group``: the consumer group's stem.
    Returns (seconds from the first record consumed to the last commit, CPU seconds of this thread).
    Raises ``TimeoutError`` when the ``n`` records are not through after ``timeout_s``."""
    cpu0 = time.thread_time()
    group = topics.group(group)
    clients = StageClients(settings.kafka_bootstrap, group, f"{group}-bench")
    clients.subscribe([in_topic], lambda tps: {}, lambda tps: None)
    first = None
    seen = 0
    offsets: dict[tuple[str, int], int] = {}
    deadline = time.monotonic() + timeout_s
    while seen < n:
        if time.monotonic() > deadline:
            clients.close()
            raise TimeoutError(f"passthrough: {seen} of {n} records after {timeout_s:.0f}s")
        batch: list[Incoming] = clients.poll_batch(settings.batch_max_records, settings.commit_interval_ms / 1000)
        if batch and first is None:
            first = time.monotonic()
        for rec in batch:
            if each is not None:
                each(rec.value)  # type: ignore[arg-type]
            if out_topic is not None:
                clients.produce(out_topic, rec.key, rec.value)
            offsets[(rec.topic, rec.partition)] = rec.offset + 1
        seen += len(batch)
        if batch:
            clients.commit(offsets)
            offsets = {}
    end = time.monotonic()
    cpu = time.thread_time() - cpu0
    clients.close()
    return end - (first or end), cpu


def warm_up(settings: Settings, topics: Topics, topic: str) -> None:
    """An untimed transactional pass over the first 1,000 records of ``topic``, so the broker's
    transaction and group coordinators are loaded before the first timed run (right after
    ``pipeline stack up`` the first run would otherwise pay for it)."""
    run_passthrough(settings, topics, 1000, topic, None, group="warm-up")
