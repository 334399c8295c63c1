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
the committed offsets (as Kafka Streams does on ``TaskMigratedException``). Stages with an external
sink (invoicing → Postgres) commit output and offsets in the sink's own transaction instead.

Broker faults (issue 12; what librdkafka does is in ``runtime/kafka.py``'s module doc). A commit that
fails otherwise (``ProducerUnusable``: fatal, abort impossible, ``_CONFLICT``), or has not returned
``kafka_call_timeout_s`` (+5 s) after it began, is given up together with its producer: the
committer is a daemon thread that is never joined, and the producer is replaced by a new one with
the same ``transactional.id`` (``StageClients.replace_producer``: fencing the old one and ending its
transaction). Then, as after an abortable error, the work since the last commit is redone in-process.
A stale committer that returns late cannot commit: it is bound to its producer's generation and that
producer is fenced. Rebalance callbacks wait for a commit in flight no longer than that either, and
replace a stuck producer before a partition is handed over or restored. A producer that lost every
broker is replaced between two transactions, before it can meet the hang (no rewind needed).
Bounds, in seconds (settings):

- a commit: ``kafka_call_timeout_s`` (30) + 5;
- a recovery step (a new producer ready, committed offsets read, one changelog partition restored):
  ``recovery_timeout_s`` (300) each, while the broker is away; then the process exits non-zero;
- more than 5 producer replacements within 10 minutes: exit non-zero (a zombie fencing us back);
- no progress of the loop at all for ``watchdog_s`` (180): the watchdog logs the stuck step and every
  thread's stack and ends the process with ``os._exit(70)``;
- shutdown: the clients get 30 s to close; if they (or an abandoned call) are still stuck, the
  process ends with ``os._exit`` rather than risk an interpreter shutdown that blocks behind them.

Any other failure aborts the transaction, drops the pending state and ends the process with a
non-zero exit: on restart the input is re-read from the last committed offsets and every store is
rebuilt from the changelog (a store directory is never reused, so what a failed step 3 left in RocksDB
is gone), so nothing is lost or duplicated.

Monitoring (issue 16): with ``metrics_port`` set, ``runtime.health`` serves ``/metrics``, ``/healthz`` (the
watchdog's view) and ``/readyz`` (group joined, every assigned partition restored; not ready while a rewind
rebuilds the stores). Every ``monitor_interval_s`` the loop sets each owned partition's consumer lag from the
consumer's local state (no broker call) and each store's size. Dead letters and refusals a processor counts
(``ctx.count``) reach their counters only when their batch's commit succeeded.

SIGTERM/SIGINT: the current batch is finished and committed, the group is left, exit 0 (also when
the stop comes while waiting for Kafka: the work since the last commit is then redone on restart).
`kill -USR1` prints every thread's stack (a stage run by ``pipeline run``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from prometheus_client import Counter, Gauge, Histogram

from pipeline.config import Settings
from pipeline.runtime import postgres
from pipeline.runtime.health import HealthServer
from pipeline.runtime.kafka import (
    TP,
    Incoming,
    KafkaIOError,
    ProducerUnusable,
    StageClients,
    TransactionAborted,
    read_partition_to_end,
    stuck_producer_calls,
)
from pipeline.runtime.processor import ExternalSink, Processor
from pipeline.runtime.state import PartitionStore, open_fresh_store
from pipeline.topology import Topics

log = logging.getLogger(__name__)

RECORDS_IN = Counter("pipeline_records_in_total", "records consumed", ["stage"])
RECORDS_OUT = Counter("pipeline_records_out_total", "records produced", ["stage", "topic"])
COMMITS = Counter("pipeline_commits_total", "transactions committed", ["stage"])
COMMIT_SECONDS = Histogram("pipeline_commit_seconds", "time to commit one transaction", ["stage"])
PROCESS_SECONDS = Histogram("pipeline_processing_seconds", "time to process one consumed batch (processor and "
                            "punctuation, before its commit)", ["stage"])
LAST_COMMIT = Gauge("pipeline_last_commit_timestamp_seconds", "wall-clock time of the last commit that consumed "
                    "input (Unix seconds)", ["stage"])
LAG = Gauge("pipeline_consumer_lag_records", "records of an input partition not yet processed and committed: high "
            "watermark − committed offset (transaction markers skipped)", ["stage", "topic", "partition"])
RESTORE_SECONDS = Gauge("pipeline_state_restore_seconds", "last state restore time", ["stage", "partition"])
STATE_BYTES = Gauge("pipeline_state_store_bytes", "size of a partition's local state store (RocksDB estimate of "
                    "live data + memtables)", ["stage", "partition"])
STATE_KEYS = Gauge("pipeline_state_store_keys", "keys in a partition's local state store (RocksDB estimate)",
                   ["stage", "partition"])
ASSIGNED = Gauge("pipeline_assigned_partitions", "input partitions owned", ["stage"])
READY = Gauge("pipeline_ready", "1 once the stage joined its group and restored every assigned partition", ["stage"])
DEAD_LETTERS = Counter("pipeline_dead_letters_total", "records dead-lettered (dlq.ingest, or the ledger's "
                       "dead_letters table), by stage and reason; counted once committed", ["stage", "reason"])
REFUSED = Counter("pipeline_refused_total", "readings refused by a billing rule (usage.late), by stage and reason; "
                  "counted once committed", ["stage", "reason"])
REWINDS = Counter("pipeline_transactions_aborted_total",
                  "transactions aborted by an abortable error (work redone from the last commit)", ["stage"])
REPLACEMENTS = Counter("pipeline_producer_replacements_total",
                       "transactional producers given up and replaced (work redone from the last commit)", ["stage"])

EXIT_STALLED = 70  # exit code of a process ended by its watchdog (or left with calls that never returned)
_COMMIT_GRACE_S = 5.0  # on top of kafka_call_timeout_s: the client's own timeouts run out by then
_CLOSE_TIMEOUT_S = 30.0  # the clients' close (abort, leave the group, flush) at shutdown
_MAX_REPLACEMENTS = 5  # producer replacements allowed within _REPLACEMENT_WINDOW_S before giving up
_REPLACEMENT_WINDOW_S = 600.0
# the cyclic garbage collector's thresholds in a stage process (``gc.set_threshold``; CPython's default is
# (700, 10, 10)): a stage allocates a few short-lived objects per record and keeps its state (windows,
# intervals, caches) as many long-lived ones, which the default makes the collector walk again and again
# (about 15 % of the windowing stage's CPU; benchmarks/windowing.py). Memory stays bounded: the stages
# make few reference cycles, and those are still collected, only less often.
GC_THRESHOLDS = (50_000, 50, 100)


def hard_exit(code: int) -> NoReturn:
    """Flush the logs and end the process at once (``os._exit``): no interpreter shutdown, which
    could block behind a client call that never returned (destroying its handle waits for it)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Watchdog:
    """Ends the process when its owner makes no progress for ``bound_s`` seconds.

    The owner calls ``beat(step)`` whenever it makes progress: each loop iteration, and each wait for
    a broker or database that is itself bounded by a deadline. A daemon thread looks every second (at
    most ``bound_s`` / 4); once the last beat is older than ``bound_s`` it logs the step the owner was
    in and the stack of every thread, then calls ``hard_exit(70)``. With ``exit_process=False`` (a
    stage run on a thread of another program, e.g. a test) it only logs, once per ``bound_s``.
    ``clock`` (monotonic seconds) is injectable for tests.
    """

    def __init__(self, name: str, bound_s: float, *, exit_process: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.bound_s = bound_s
        self.exit_process = exit_process
        self._clock = clock
        self._last = clock()
        self._step = "starting"
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, step: str | None = None) -> None:
        """Record progress (cheap: called once per batch); ``step`` names what comes next."""
        self._last = self._clock()
        if step is not None:
            self._step = step

    @property
    def step(self) -> str:
        """What the owner said comes next at its last beat."""
        return self._step

    def stalled_for(self) -> float | None:
        """Seconds since the last beat when that is more than ``bound_s``, else ``None``."""
        age = self._clock() - self._last
        return age if age > self.bound_s else None

    def start(self) -> None:
        """Start watching (a daemon thread)."""
        self.beat()
        self._thread = threading.Thread(target=self._watch, name=f"{self.name}-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching."""
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.bound_s / 4)):
            age = self.stalled_for()
            if age is None:
                continue
            log.critical("%s: no progress for %.0f s (watchdog bound %.0f s) while %s; %s", self.name, age,
                         self.bound_s, self._step, "ending the process" if self.exit_process else "still waiting")
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            if self.exit_process:
                hard_exit(EXIT_STALLED)
            self.beat()


def _remove(metric: Any, *labels: str) -> None:
    """Drop one labelled series (a partition handed over), if it exists."""
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


class _Commit:
    """One transaction commit on its own daemon thread: never joined, so a client call that does not
    return can be walked away from. The thread is bound to the producer generation current when the
    commit was handed over (``StageClients.bind_generation``)."""

    def __init__(self, clients: StageClients, offsets: dict[TP, int], metadata: object, name: str) -> None:
        self.t0 = time.monotonic()
        self.offsets = offsets
        self.counts: dict[tuple[str, str], int] = {}
        self.generation = clients.generation
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(clients, offsets, metadata), name=name, daemon=True)
        self._thread.start()

    def _run(self, clients: StageClients, offsets: dict[TP, int], metadata: object) -> None:
        try:
            clients.bind_generation(self.generation)
            clients.commit(offsets, metadata)
        except BaseException as exc:
            # the tracebacks would keep this thread's frames, and the producer in them, alive in the
            # loop's hands: an abandoned producer must only ever be destroyed off the loop's thread
            seen: set[int] = set()
            cause: BaseException | None = exc
            while cause is not None and id(cause) not in seen:
                seen.add(id(cause))
                cause.__traceback__ = None
                cause = cause.__cause__ or cause.__context__
            self.error = exc
        finally:
            self.done.set()


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

    def forward(self, topic: str, key: bytes | str | None, value: bytes,
                headers: list[tuple[str, bytes]] | None = None) -> None:
        if isinstance(key, str):
            key = key.encode()
        r = self._r  # once per record forwarded: attribute lookups kept few
        r.clients.produce(topic, key, value, None, headers)
        produced = r.produced
        produced[topic] = produced.get(topic, 0) + 1

    def count(self, kind: str, reason: str) -> None:
        counts = self._r.counts
        counts[(kind, reason)] = counts.get((kind, reason), 0) + 1

    def store(self, partition: int) -> PartitionStore:
        return self._r.stores[partition]


class StageRunner:
    """Runs one stage process until SIGTERM/SIGINT (or ``stop()``).

    Raises ``KafkaIOError`` from the constructor when the transactional producer cannot be made ready
    within ``recovery_timeout_s`` seconds.
    """

    def __init__(self, settings: Settings, spec: StageSpec) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.settings = settings
        self.spec = spec
        self.topics = Topics(settings)
        self.stores: dict[int, PartitionStore] = {}
        self.offsets: dict[TP, int] = {}
        self.produced: dict[str, int] = {}
        self.counts: dict[tuple[str, str], int] = {}  # (kind, reason) of this batch, published once committed
        self._consumed: dict[TP, int] = {}  # next offset after the last record processed, per partition
        self._committed: dict[TP, int] = {}  # next offset committed, per partition (this process's commits)
        self._ready = False  # joined the group, every assigned partition restored
        self._next_monitor = 0.0
        self._health: HealthServer | None = None
        self._assigned: set[TP] = set()  # a stage with several input topics shares one store per partition number
        self._stop = False
        self.ctx = _Ctx(self)
        stateful = spec.state_encode is not None
        self._changelog = self.topics.changelog(spec.name) if stateful else None
        self.watchdog = Watchdog(spec.name, settings.watchdog_s)
        txn_id = None if spec.external_sink else f"{self.topics.group(spec.name)}-{settings.instance_id}"
        self.clients = StageClients(settings.kafka_bootstrap, self.topics.group(spec.name), txn_id,
                                    settings.transaction_timeout_ms, call_timeout_s=settings.kafka_call_timeout_s,
                                    init_timeout_s=settings.recovery_timeout_s, on_wait=self._waiting_for_kafka)
        self._inflight: _Commit | None = None  # the commit in flight
        for counter in (RECORDS_IN, COMMITS, REWINDS, REPLACEMENTS):  # exported as 0 from the start, not absent
            counter.labels(spec.name)
        # the stage's own series of the per-batch metrics, looked up once (``labels`` takes a lock each call)
        self._records_in = RECORDS_IN.labels(spec.name)
        self._process_seconds = PROCESS_SECONDS.labels(spec.name)
        self._commits = COMMITS.labels(spec.name)
        self._commit_seconds = COMMIT_SECONDS.labels(spec.name)
        self._last_commit = LAST_COMMIT.labels(spec.name)
        self._records_out: dict[str, Any] = {}  # topic → its RECORDS_OUT series
        self._rewind = False  # a transaction was aborted or given up: resume from the last commit
        self._replace = False  # the transactional producer must be replaced first
        self._replacements: deque[float] = deque()
        self._closing = False

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish the current batch, commit and exit."""
        self._stop = True

    def _waiting_for_kafka(self) -> None:
        self.watchdog.beat("waiting for Kafka")

    def _waiting_for_postgres(self) -> None:
        self.watchdog.beat("waiting for Postgres")

    # --- partition ownership ---------------------------------------------------------------
    def _state_path(self, partition: int) -> Path:
        return self.settings.state_dir / self.topics.group(self.spec.name) / str(partition)

    def _restore(self, partition: int) -> None:
        """(Re)build the store of ``partition`` from its changelog partition (at most
        ``recovery_timeout_s`` seconds; ``KafkaIOError`` then)."""
        # several input topics share one store per partition number: when another topic's partition
        # joins, a peer that owned it may have written to the changelog since our restore
        shared = self.stores.pop(partition, None)
        if shared is not None:
            shared.close()
        t0 = time.monotonic()
        store = open_fresh_store(
            self._state_path(partition), self.spec.state_encode, self.spec.state_decode  # type: ignore[arg-type]
        )
        step = f"restoring partition {partition}"
        n = store.apply_changelog(read_partition_to_end(
            self.settings.kafka_bootstrap, self._changelog, partition, self.settings.recovery_timeout_s,
            lambda: self.watchdog.beat(step)))
        self.stores[partition] = store
        took = time.monotonic() - t0
        RESTORE_SECONDS.labels(self.spec.name, str(partition)).set(took)
        log.info("%s: restored partition %d from %d changelog records in %.2fs", self.spec.name, partition, n, took)

    def _settle(self) -> None:
        """Wait for the commit in flight (bounded) and, if its producer had to be given up, replace it
        now: called before partitions are handed over or restored, so that our transaction is ended
        (committed or aborted) before anyone reads those changelogs and offsets."""
        self._await_commit()
        if self._replace and not self._closing:  # at shutdown the broker ends it (transaction.timeout.ms)
            self._replace_producer()

    def _on_assign(self, tps: list[TP]) -> dict[TP, int]:
        self.watchdog.beat(f"assigning {tps}")
        self._settle()
        self._set_ready(False)
        self._assigned.update(tps)
        for _topic, partition in tps:
            if self._changelog is not None:
                self._restore(partition)
            self.spec.processor.on_assign(partition, self.ctx)
        ASSIGNED.labels(self.spec.name).inc(len(tps))
        self._set_ready(True)
        if self.spec.external_sink:
            return self.spec.processor.stored_offsets(tps)  # type: ignore[attr-defined]
        return {}

    def _on_revoke(self, tps: list[TP]) -> None:
        self.watchdog.beat(f"revoking {tps}")
        self._settle()  # what we committed for these partitions is complete before they go
        for topic, partition in tps:
            self.offsets.pop((topic, partition), None)
            self._assigned.discard((topic, partition))
            self._consumed.pop((topic, partition), None)
            self._committed.pop((topic, partition), None)
            _remove(LAG, self.spec.name, topic, str(partition))
            self.spec.processor.on_revoke(partition)
            if any(p == partition for _t, p in self._assigned):
                continue  # the same partition of another input topic is still ours: keep its store
            store = self.stores.pop(partition, None)
            if store is not None:
                store.close()
                _remove(STATE_BYTES, self.spec.name, str(partition))
                _remove(STATE_KEYS, self.spec.name, str(partition))
        ASSIGNED.labels(self.spec.name).dec(len(tps))

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        """Consume, process and commit until stopped. Raises on unrecoverable errors.

        Run on the process's main thread (``pipeline run``), the watchdog ends the process on a stall,
        and a process left with client calls that never returned ends with ``os._exit`` (0 after a
        clean stop, 1 after a failure, which is logged first) instead of an interpreter shutdown that
        could block behind them. Run on another thread (tests), it only raises or returns.
        """
        exit_process = threading.current_thread() is threading.main_thread()
        self.watchdog.exit_process = exit_process
        self.watchdog.start()
        if exit_process:  # `kill -USR1 <pid>` prints every thread's stack to stderr (diagnosing a slow stage)
            faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
            # the process is the stage's: fewer cyclic-GC passes (see GC_THRESHOLDS)
            gc.set_threshold(*GC_THRESHOLDS)
        postgres.add_wait_listener(self._waiting_for_postgres)
        failure: BaseException | None = None
        try:
            self._run()
        except KafkaIOError as exc:
            if not self._stop:
                failure = exc
            else:  # asked to stop while waiting for Kafka: nothing past the last commit counts, a clean stop
                log.warning("%s: stopped while waiting for Kafka (%s); the work since the last commit is redone "
                            "on restart", self.spec.name, exc)
            self._abort_quietly()
        except BaseException as exc:
            failure = exc
            self._abort_quietly()
        self.watchdog.beat("closing the clients")
        self._closing = True
        self._set_ready(False)
        if self._health is not None:
            self._health.close()
        closed = self.clients.close(_CLOSE_TIMEOUT_S)
        for store in self.stores.values():
            store.close()
        self.stores.clear()
        postgres.remove_wait_listener(self._waiting_for_postgres)
        stuck = not closed or stuck_producer_calls() > 0
        if exit_process and stuck:
            if failure is not None:
                log.critical("%s: ending the process after: %r", self.spec.name, failure, exc_info=failure)
            log.error("%s: client calls that never returned are left; ending the process without an "
                      "interpreter shutdown", self.spec.name)
            hard_exit(1 if failure is not None else 0)
        self.watchdog.stop()
        if failure is not None:
            raise failure
        log.info("%s: stopped cleanly", self.spec.name)

    def _run(self) -> None:
        if self.settings.metrics_port:
            self._health = HealthServer(self.settings.metrics_port, self.settings.metrics_addr,
                                        live=self._liveness, ready=self._readiness)
        READY.labels(self.spec.name).set(0)
        self.clients.subscribe(self.spec.input_topics, self._on_assign, self._on_revoke)
        timeout = self.settings.commit_interval_ms / 1000
        log.info("%s: started (group %s)", self.spec.name, self.clients.group)
        while not self._stop:
            self.watchdog.beat("polling")
            batch = self.clients.poll_batch(self.settings.batch_max_records, timeout)
            self.watchdog.beat("awaiting the commit in flight")
            self._await_commit()
            if self._rewind:
                self._recover()  # the batch is dropped: it is read again
                continue
            if not self.spec.external_sink and self.clients.producer_suspect():
                # it lost every broker: a fresh one now, while no transaction is open, costs no rewind
                self.watchdog.beat("refreshing the transactional producer")
                self.clients.replace_producer(stop=lambda: self._stop)
                log.info("%s: transactional producer refreshed (it had lost every broker, or failed)", self.spec.name)
            self.watchdog.beat("processing a batch")
            try:
                t0 = time.monotonic()
                self._process(batch)
                self.spec.processor.punctuate(int(time.time() * 1000), self.ctx)
                if batch:
                    self._process_seconds.observe(time.monotonic() - t0)
                self._commit()
                self._monitor()
            except ProducerUnusable as exc:  # producing on a fenced or failed producer
                log.error("%s: %s; replacing the producer and resuming from the last commit", self.spec.name, exc)
                self._replace = self._rewind = True
        self.watchdog.beat("final commit")
        self._await_commit()
        if not self._rewind:  # after an abort, the work since the last commit is left to be redone
            try:
                self._commit()
                self._await_commit()
            except ProducerUnusable as exc:
                log.error("%s: final commit: %s (the work since the last commit will be redone)", self.spec.name, exc)

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
        self._consumed.update(self.offsets)
        self._records_in.inc(len(batch))

    def _commit(self) -> None:
        t0 = time.monotonic()
        if self.spec.external_sink:
            sink: ExternalSink = self.spec.processor  # type: ignore[assignment]
            if self.offsets:
                sink.commit(dict(self.offsets))
                # informative only (lag monitoring); the truth is in the sink
                self._committed.update(self.offsets)
                self.offsets.clear()
                self._published(self.counts)
                self.counts = {}
                LAST_COMMIT.labels(self.spec.name).set(time.time())
            return
        encoded: dict[int, dict[bytes, bytes | None]] = {}
        for partition, store in self.stores.items():
            if store.has_pending():
                changes = store.encoded_changes()
                encoded[partition] = changes
                self.clients.produce_all(self._changelog, changes.items(), partition)  # type: ignore[arg-type]
        if not self.offsets and not encoded and not self.produced:
            return
        assert self._inflight is None
        # the group metadata is taken here: the client serializes calls to the consumer, and the
        # committer thread must not wait for a poll whose rebalance callback waits for it
        metadata = self.clients.group_metadata()
        self._inflight = _Commit(self.clients, dict(self.offsets), metadata, f"{self.spec.name}-commit")
        self._inflight.t0 = t0
        self._inflight.counts, self.counts = self.counts, {}
        self.offsets.clear()
        for partition, changes in encoded.items():  # while the commit is in flight (see the module doc)
            self.stores[partition].flush(changes)
        for topic, n in self.produced.items():
            series = self._records_out.get(topic)
            if series is None:
                series = self._records_out[topic] = RECORDS_OUT.labels(self.spec.name, topic)
            series.inc(n)
        self.produced.clear()

    def _await_commit(self) -> None:
        """Wait for the transaction commit in flight, if any, until ``kafka_call_timeout_s`` + 5 s after
        it began. An abortable error (``TransactionAborted``) asks for a rewind; a producer that cannot
        commit or abort (``ProducerUnusable``), or a commit still running at the deadline, asks for a
        producer replacement and a rewind (``_recover``); the committer thread is then abandoned, never
        joined. Raises anything else the commit raised."""
        if self._inflight is None:
            return
        commit, self._inflight = self._inflight, None
        wait_s = commit.t0 + self.settings.kafka_call_timeout_s + _COMMIT_GRACE_S - time.monotonic()
        if not commit.done.wait(max(0.0, wait_s)):
            log.error("%s: the transaction commit did not end within %.0f s (librdkafka's "
                      "send_offsets_to_transaction can block for ever after a broker restart); giving up "
                      "the producer and resuming from the last commit", self.spec.name,
                      time.monotonic() - commit.t0)
            self._replace = self._rewind = True
            return
        exc = commit.error
        if exc is None:
            self._commits.inc()
            self._commit_seconds.observe(time.monotonic() - commit.t0)
            self._committed.update(commit.offsets)
            self._published(commit.counts)
            if commit.offsets:
                self._last_commit.set(time.time())
            return
        if isinstance(exc, TransactionAborted):
            log.warning("%s: %s; resuming from the last commit", self.spec.name, exc)
            REWINDS.labels(self.spec.name).inc()
            self._rewind = True
            return
        if isinstance(exc, ProducerUnusable):
            log.error("%s: %s; replacing the producer and resuming from the last commit", self.spec.name, exc)
            self._replace = self._rewind = True
            return
        raise exc

    def _replace_producer(self) -> None:
        """A new transactional producer (``StageClients.replace_producer``), at most
        ``recovery_timeout_s`` seconds; raises ``KafkaIOError`` then, when stopped meanwhile, or after
        more than 5 replacements within 10 minutes."""
        now = time.monotonic()
        while self._replacements and now - self._replacements[0] > _REPLACEMENT_WINDOW_S:
            self._replacements.popleft()
        if len(self._replacements) >= _MAX_REPLACEMENTS:
            raise KafkaIOError(f"{self.spec.name}: the transactional producer had to be replaced "
                               f"{len(self._replacements) + 1} times within {_REPLACEMENT_WINDOW_S:.0f} s "
                               "(another process with the same PIPELINE_INSTANCE_ID?)")
        self._replacements.append(now)
        self.watchdog.beat("replacing the transactional producer")
        t0 = time.monotonic()
        self.clients.replace_producer(stop=lambda: self._stop)
        self._replace = False
        REPLACEMENTS.labels(self.spec.name).inc()
        log.warning("%s: new transactional producer ready in %.1fs", self.spec.name, time.monotonic() - t0)

    def _recover(self) -> None:
        """Resume from the last commit: a new producer first if the old one was given up, then
        ``_rewind_to_last_commit``."""
        if self._replace:
            self._replace_producer()
        self._rewind_to_last_commit()

    def _rewind_to_last_commit(self) -> None:
        """After an aborted transaction: throw the work since the last commit away and resume from
        it. Every owned store is rebuilt from the changelog (the processor sees ``on_revoke`` then
        ``on_assign`` for each partition) and the consumer seeks back to the committed offsets (read
        within ``recovery_timeout_s``)."""
        self._rewind = False
        self._set_ready(False)
        self.offsets.clear()
        self.produced.clear()
        self.counts = {}
        self._consumed.clear()
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
        self.watchdog.beat("reading the committed offsets")
        self.clients.rewind_to_committed(tps)
        self._set_ready(True)
        log.info("%s: resumed from the last commit (%d partitions)", self.spec.name, len(tps))

    # --- monitoring ----------------------------------------------------------------------------
    def _set_ready(self, ready: bool) -> None:
        self._ready = ready
        READY.labels(self.spec.name).set(1 if ready else 0)

    def _readiness(self) -> str | None:
        """``/readyz``: ``None`` once the group is joined and every assigned partition restored."""
        return None if self._ready else "not ready: joining the group or restoring state"

    def _liveness(self) -> str | None:
        """``/healthz``: ``None`` unless the watchdog saw no progress for ``watchdog_s``."""
        stalled = self.watchdog.stalled_for()
        return None if stalled is None else f"no progress for {stalled:.0f} s while {self.watchdog.step}"

    def _published(self, counts: dict[tuple[str, str], int]) -> None:
        """Add a committed batch's dead letters and refusals to their counters."""
        for (kind, reason), n in counts.items():
            (DEAD_LETTERS if kind == "dead_letter" else REFUSED).labels(self.spec.name, reason).inc(n)

    def _monitor(self) -> None:
        """Every ``monitor_interval_s``: consumer lag of each owned partition and the state stores' sizes.

        Lag = high watermark − where the committed work ends: the consumer's position when everything it
        consumed is committed (so transaction markers after the last record count as done), else the
        offset committed last. Local client state only (no broker request): cheap, never blocks."""
        now = time.monotonic()
        if now < self._next_monitor:
            return
        self._next_monitor = now + self.settings.monitor_interval_s
        name = self.spec.name
        for (topic, partition), (position, high) in self.clients.positions(sorted(self._assigned)).items():
            if high < 0:
                continue
            consumed = self._consumed.get((topic, partition))
            committed = self._committed.get((topic, partition), -1)
            if consumed is not None and committed < consumed:
                done = committed  # work in flight or not committed yet
            elif position >= 0:
                done = position
            else:
                continue
            LAG.labels(name, topic, str(partition)).set(max(0, high - max(done, 0)))
        for partition, store in list(self.stores.items()):
            size, keys = store.size()
            STATE_BYTES.labels(name, str(partition)).set(size)
            STATE_KEYS.labels(name, str(partition)).set(keys)

    def _abort_quietly(self) -> None:
        try:
            self._abort()
        except Exception as exc:  # the original failure is what is reported
            log.error("%s: abort after failure: %s", self.spec.name, exc)

    def _abort(self) -> None:
        try:
            self._await_commit()  # never abort under a commit in flight
        except Exception as exc:  # it is what we are aborting
            log.error("commit failed: %s", exc)
        if not self._replace:  # a producer given up has nothing to abort (its replacement never comes)
            self.clients.abort()
        for store in self.stores.values():
            store.discard()
        if self.spec.external_sink:
            self.spec.processor.discard()  # type: ignore[attr-defined]
