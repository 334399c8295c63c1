"""What the stage benchmarks share: the plain transactional consume → produce passthrough they are
compared with, and waiting for a consumer group's committed offsets."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.config import Settings
from pipeline.runtime.kafka import Incoming, StageClients, committed_offsets
from pipeline.topology import Topics


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
                    each: Callable[[bytes], object] | None = None, group: str = "passthrough") -> tuple[float, float]:
    """Consume ``n`` records of ``in_topic`` and produce the same bytes to ``out_topic``, transactionally,
    offsets in the transaction, with the stages' batch size and commit interval.

    ``each``: also call it on every value (e.g. a decoder); ``out_topic`` ``None``: produce nothing
    (only the offsets are committed, in the transaction). ``group``: the consumer group's stem.
    Returns (seconds from the first record consumed to the last commit, CPU seconds of this thread)."""
    cpu0 = time.thread_time()
    group = topics.group(group)
    clients = StageClients(settings.kafka_bootstrap, group, f"{group}-bench")
    clients.subscribe([in_topic], lambda tps: {}, lambda tps: None)
    first = None
    seen = 0
    offsets: dict[tuple[str, int], int] = {}
    while seen < n:
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
