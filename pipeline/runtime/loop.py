"""The one consume → process → produce → commit loop that runs every stage.

Commit order of a batch (transactional stages), all inside one Kafka transaction:

1. the processor handled the batch and its punctuation; its forwards are produced;
2. every pending state change is produced to the stage's changelog partition;
3. the input offsets are sent to the transaction with the consumer's group metadata and the
   transaction is committed (exactly-once v2).

Step 3 runs on a committer thread (the client waits for the broker without holding the GIL; the
group metadata is taken before, on the consuming thread) while the loop writes the batch's state
changes to the local RocksDB stores and polls the next batch;
the loop waits for the commit before it processes that batch, and a rebalance callback waits for
it before it hands a partition over or restores one. So a transaction is never open while the
next batch is processed, and a partition's changelog and offsets are complete before anyone else
restores it.

An abortable commit error (``TransactionAborted``: the group rebalanced while the offsets were
on their way, ``ILLEGAL_GENERATION``) costs no restart: the transaction is aborted, the batch polled
meanwhile is dropped, every owned store is rebuilt from the changelog and the consumer seeks back to
the committed offsets (as Kafka Streams does on ``TaskMigratedException``). Any other failure in
1–3 aborts the transaction, drops the pending state and ends the process with a non-zero exit: on
restart the input is re-read from the last committed offsets and every store is rebuilt from the
changelog (a store directory is never reused, so what a failed step 3 left in RocksDB is gone),
so nothing is lost or duplicated. Stages with an external sink (invoicing → Postgres) commit
output and offsets in the sink's own transaction instead.

SIGTERM/SIGINT: the current batch is finished and committed, the group is left, exit 0.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from pipeline.config import Settings
from pipeline.runtime.kafka import (
    TP,
    Incoming,
    KafkaIOError,
    StageClients,
    TransactionAborted,
    read_partition_to_end,
)
from pipeline.runtime.processor import ExternalSink, Processor
from pipeline.runtime.state import PartitionStore, open_fresh_store
from pipeline.topology import Topics

log = logging.getLogger(__name__)

RECORDS_IN = Counter("pipeline_records_in_total", "records consumed", ["stage"])
RECORDS_OUT = Counter("pipeline_records_out_total", "records produced", ["stage", "topic"])
COMMITS = Counter("pipeline_commits_total", "transactions committed", ["stage"])
COMMIT_SECONDS = Histogram("pipeline_commit_seconds", "time to commit one transaction", ["stage"])
RESTORE_SECONDS = Gauge("pipeline_state_restore_seconds", "last state restore time", ["stage", "partition"])
ASSIGNED = Gauge("pipeline_assigned_partitions", "input partitions owned", ["stage"])
_COMMIT_WAIT_S = 180  # longest wait for a commit in flight (send offsets + commit: 60 s each at most)
REWINDS = Counter("pipeline_transactions_aborted_total",
                  "transactions aborted by an abortable error (work redone from the last commit)", ["stage"])


@dataclass
class StageSpec:
    """What the runtime needs to run a stage.

    Attributes:
        name: stage name (``ingest``, ``windowing``, ``rating``, ``invoicing``); also the
            consumer group suffix and the changelog topic stem.
        input_topics: topics consumed.
        processor: the domain processor.
        state_encode / state_decode: how state values become changelog bytes and back; ``None``
            for a stateless stage.
        external_sink: ``True`` when the processor keeps output and offsets itself
            (``ExternalSink``); then no Kafka transaction is used.
    """

    name: str
    input_topics: list[str]
    processor: Processor
    state_encode: Callable[[bytes, Any], bytes] | None = None
    state_decode: Callable[[bytes, bytes], Any] | None = None
    external_sink: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class _Ctx:
    def __init__(self, runner: StageRunner) -> None:
        self._r = runner

    def forward(self, topic: str, key: bytes | str | None, value: bytes) -> None:
        if isinstance(key, str):
            key = key.encode()
        self._r.clients.produce(topic, key, value)
        self._r.produced[topic] = self._r.produced.get(topic, 0) + 1

    def store(self, partition: int) -> PartitionStore:
        return self._r.stores[partition]


class StageRunner:
    """Runs one stage process until SIGTERM/SIGINT (or ``stop()``)."""

    def __init__(self, settings: Settings, spec: StageSpec) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.settings = settings
        self.spec = spec
        self.topics = Topics(settings)
        self.stores: dict[int, PartitionStore] = {}
        self.offsets: dict[TP, int] = {}
        self.produced: dict[str, int] = {}
        self._assigned: set[TP] = set()  # a stage with several input topics shares one store per partition number
        self._stop = False
        self.ctx = _Ctx(self)
        stateful = spec.state_encode is not None
        self._changelog = self.topics.changelog(spec.name) if stateful else None
        txn_id = None if spec.external_sink else f"{self.topics.group(spec.name)}-{settings.instance_id}"
        self.clients = StageClients(settings.kafka_bootstrap, self.topics.group(spec.name), txn_id,
                                    settings.transaction_timeout_ms)
        self._committer = None if spec.external_sink else ThreadPoolExecutor(1, f"{spec.name}-commit")
        self._inflight: tuple[Future[None], float] | None = None  # the commit in flight, its start
        self._rewind = False  # a transaction was aborted: resume from the last commit

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish the current batch, commit and exit."""
        self._stop = True

    # --- partition ownership ---------------------------------------------------------------
    def _state_path(self, partition: int) -> Path:
        return self.settings.state_dir / self.topics.group(self.spec.name) / str(partition)

    def _restore(self, partition: int) -> None:
        """(Re)build the store of ``partition`` from its changelog partition."""
        # several input topics share one store per partition number: when another topic's partition
        # joins, a peer that owned it may have written to the changelog since our restore
        shared = self.stores.pop(partition, None)
        if shared is not None:
            shared.close()
        t0 = time.monotonic()
        store = open_fresh_store(
            self._state_path(partition), self.spec.state_encode, self.spec.state_decode  # type: ignore[arg-type]
        )
        n = store.apply_changelog(read_partition_to_end(self.settings.kafka_bootstrap, self._changelog, partition))
        self.stores[partition] = store
        took = time.monotonic() - t0
        RESTORE_SECONDS.labels(self.spec.name, str(partition)).set(took)
        log.info("%s: restored partition %d from %d changelog records in %.2fs", self.spec.name, partition, n, took)

    def _on_assign(self, tps: list[TP]) -> dict[TP, int]:
        self._await_commit()
        self._assigned.update(tps)
        for _topic, partition in tps:
            if self._changelog is not None:
                self._restore(partition)
            self.spec.processor.on_assign(partition, self.ctx)
        ASSIGNED.labels(self.spec.name).inc(len(tps))
        if self.spec.external_sink:
            return self.spec.processor.stored_offsets(tps)  # type: ignore[attr-defined]
        return {}

    def _on_revoke(self, tps: list[TP]) -> None:
        self._await_commit()  # what we committed for these partitions is complete before they go
        for topic, partition in tps:
            self.offsets.pop((topic, partition), None)
            self._assigned.discard((topic, partition))
            self.spec.processor.on_revoke(partition)
            if any(p == partition for _t, p in self._assigned):
                continue  # the same partition of another input topic is still ours: keep its store
            store = self.stores.pop(partition, None)
            if store is not None:
                store.close()
        ASSIGNED.labels(self.spec.name).dec(len(tps))

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        """Consume, process and commit until stopped. Raises on unrecoverable errors."""
        if self.settings.metrics_port:
            start_http_server(self.settings.metrics_port, addr=self.settings.metrics_addr)
        self.clients.subscribe(self.spec.input_topics, self._on_assign, self._on_revoke)
        timeout = self.settings.commit_interval_ms / 1000
        log.info("%s: started (group %s)", self.spec.name, self.clients.group)
        try:
            while not self._stop:
                batch = self.clients.poll_batch(self.settings.batch_max_records, timeout)
                self._await_commit()
                if self._rewind:
                    self._rewind_to_last_commit()  # the batch is dropped: it is read again
                    continue
                self._process(batch)
                self.spec.processor.punctuate(int(time.time() * 1000), self.ctx)
                self._commit()
            self._await_commit()
            if not self._rewind:  # after an abort, the work since the last commit is left to be redone
                self._commit()
                self._await_commit()
        except BaseException:
            self._abort()
            raise
        finally:
            if self._committer is not None:
                self._committer.shutdown()
            self.clients.close()
            for store in self.stores.values():
                store.close()
            self.stores.clear()
        log.info("%s: stopped cleanly", self.spec.name)

    def _process(self, batch: list[Incoming]) -> None:
        if not batch:
            return
        processor = self.spec.processor
        process_batch = getattr(processor, "process_batch", None)
        if process_batch is not None:
            process_batch(batch, self.ctx)
        else:
            for record in batch:
                processor.process(record, self.ctx)
        self.offsets.update({(r.topic, r.partition): r.offset + 1 for r in batch})  # in order: the last wins
        RECORDS_IN.labels(self.spec.name).inc(len(batch))

    def _commit(self) -> None:
        t0 = time.monotonic()
        if self.spec.external_sink:
            sink: ExternalSink = self.spec.processor  # type: ignore[assignment]
            if self.offsets:
                sink.commit(dict(self.offsets))
                # informative only (lag monitoring); the truth is in the sink
                self.offsets.clear()
            return
        encoded: dict[int, dict[bytes, bytes | None]] = {}
        for partition, store in self.stores.items():
            if store.has_pending():
                changes = dict(store.pending_changes())
                encoded[partition] = changes
                self.clients.produce_all(self._changelog, changes.items(), partition)  # type: ignore[arg-type]
        if not self.offsets and not encoded and not self.produced:
            return
        assert self._committer is not None and self._inflight is None
        # the group metadata is taken here: the client serializes calls to the consumer, and the
        # committer thread must not wait for a poll whose rebalance callback waits for it
        metadata = self.clients.group_metadata()
        self._inflight = (self._committer.submit(self.clients.commit, dict(self.offsets), metadata), t0)
        self.offsets.clear()
        for partition, changes in encoded.items():  # while the commit is in flight (see the module doc)
            self.stores[partition].flush(changes)
        for topic, n in self.produced.items():
            RECORDS_OUT.labels(self.spec.name, topic).inc(n)
        self.produced.clear()

    def _await_commit(self) -> None:
        """Wait for the transaction commit in flight, if any; raises what the commit raised
        (``KafkaIOError``)."""
        if self._inflight is None:
            return
        (future, t0), self._inflight = self._inflight, None
        try:
            future.result(timeout=_COMMIT_WAIT_S)
        except FutureTimeout as exc:  # the client's own timeouts are 60 s per call: never wait forever
            raise KafkaIOError(f"{self.spec.name}: the transaction commit did not end in {_COMMIT_WAIT_S} s") from exc
        except TransactionAborted as exc:
            log.warning("%s: %s; resuming from the last commit", self.spec.name, exc)
            REWINDS.labels(self.spec.name).inc()
            self._rewind = True
            return
        COMMITS.labels(self.spec.name).inc()
        COMMIT_SECONDS.labels(self.spec.name).observe(time.monotonic() - t0)

    def _rewind_to_last_commit(self) -> None:
        """After an aborted transaction: throw the work since the last commit away and resume from
        it. Every owned store is rebuilt from the changelog (the processor sees ``on_revoke`` then
        ``on_assign`` for each partition) and the consumer seeks back to the committed offsets."""
        self._rewind = False
        self.offsets.clear()
        self.produced.clear()
        tps = sorted(self._assigned)
        for _topic, partition in tps:
            self.spec.processor.on_revoke(partition)
        for store in self.stores.values():
            store.close()
        self.stores.clear()
        for _topic, partition in tps:
            if self._changelog is not None and partition not in self.stores:
                self._restore(partition)
            self.spec.processor.on_assign(partition, self.ctx)
        self.clients.rewind_to_committed(tps)

    def _abort(self) -> None:
        try:
            self._await_commit()  # never abort under a commit in flight
        except Exception as exc:  # it is what we are aborting
            log.error("commit failed: %s", exc)
        try:
            self.clients.abort()
        except KafkaIOError as exc:  # pragma: no cover - best effort
            log.error("abort: %s", exc)
        for store in self.stores.values():
            store.discard()
        if self.spec.external_sink:
            self.spec.processor.discard()  # type: ignore[attr-defined]
