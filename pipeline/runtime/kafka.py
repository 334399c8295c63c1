"""Kafka clients for the pipeline: the only module that imports ``confluent_kafka``.

Every client on the money path is a confluent-kafka client: stages consume ``read_committed``
and produce transactionally (exactly-once v2: ``send_offsets_to_transaction`` with the
consumer's group metadata, KIP-447); gateways use an idempotent producer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.topology import TopicSpec

log = logging.getLogger(__name__)

TP = tuple[str, int]  # (topic, partition)
T = TypeVar("T")


class KafkaIOError(RuntimeError):
    """A Kafka operation failed in a way the stage cannot recover from in-process."""


class TransactionAborted(KafkaIOError):
    """The transaction could not commit and has been aborted, but the clients stay usable: an
    abortable error (librdkafka ``txn_requires_abort``), typically ``ILLEGAL_GENERATION`` when the
    group rebalanced while the offsets were on their way. The caller throws its work since the last
    commit away and resumes from the committed offsets and the changelog (as Kafka Streams does on
    ``TaskMigratedException``)."""


class Incoming(NamedTuple):
    """One consumed record, decoupled from the client library.

    Attributes: topic, partition, offset; key/value as raw bytes (``None`` when absent);
    headers as (name, bytes) pairs; timestamp_ms as set by the producer (CreateTime, ms UTC).
    An immutable tuple: built once per consumed record, so its construction is kept cheap.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int


_new = tuple.__new__


def _incoming(msg: Message) -> Incoming:
    headers = msg.headers()
    return _new(Incoming, (  # Incoming(...) without the cost of its Python-level constructor
        msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
        tuple((k, v if v is not None else b"") for k, v in headers) if headers else (), msg.timestamp()[1],
    ))


def _retrying(fn: Callable[[], T], timeout_s: float = 30.0) -> T:
    """Call ``fn`` until it stops raising retriable Kafka errors (e.g. NOT_LEADER just after a
    topic was created) or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            retriable = err is not None and (err.retriable() or err.code() in (
                KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                KafkaError.UNKNOWN_TOPIC_OR_PART))
            if not retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# admin
# ----------------------------------------------------------------------------------------------
def create_topics(bootstrap: str, specs: list[TopicSpec], timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; returns the names created.

    Raises ``KafkaIOError`` when creation fails for another reason than "already exists".
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    new = [
        NewTopic(s.name, num_partitions=s.partitions, replication_factor=1, config=s.config)
        for s in specs
        if s.name not in existing
    ]
    if not new:
        return []
    created = []
    for name, fut in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise KafkaIOError(f"cannot create topic {name}: {exc}") from exc
    # wait until metadata shows them (leaders elected)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=timeout_s).topics
        if all(
            n in md and md[n].error is None and md[n].partitions
            and all(pm.leader >= 0 and pm.error is None for pm in md[n].partitions.values())
            for n in created
        ):
            break
        time.sleep(0.2)
    return created


def delete_topics(bootstrap: str, names: list[str], timeout_s: float = 30.0) -> None:
    """Delete topics (used by tests to isolate runs); missing topics are ignored."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    todo = [n for n in names if n in existing]
    if todo:
        for fut in admin.delete_topics(todo, request_timeout=timeout_s).values():
            fut.result()


def broker_answers(bootstrap: str, timeout_s: float = 5.0) -> bool:
    """Whether a broker at ``bootstrap`` answers a metadata request within ``timeout_s``."""
    try:
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout_s)
        return True
    except KafkaException:
        return False


# ----------------------------------------------------------------------------------------------
# producers
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OutRecord:
    """One record to produce: topic, key, value and headers as (name, bytes) pairs."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None = None


class IdempotentProducer:
    """An idempotent producer (``enable.idempotence``, ``acks=all``) for gateways and relays.

    ``send`` queues; ``flush`` blocks until every queued record is acknowledged and raises
    ``KafkaIOError`` if any delivery failed.
    """

    def __init__(self, bootstrap: str, linger_ms: int = 20) -> None:
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": linger_ms,
                "compression.type": "lz4",
                "queue.buffering.max.messages": 500_000,
            }
        )
        self._errors: list[str] = []

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._errors.append(str(err))

    def send(self, topic: str, key: bytes | str, value: bytes, headers: list | None = None) -> None:
        """Queue one record (blocks briefly when the local queue is full)."""
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers, on_delivery=self._on_delivery)
                return
            except BufferError:
                self._producer.poll(0.1)

    def flush(self, timeout_s: float = 120.0) -> None:
        """Wait for all acknowledgements; raises ``KafkaIOError`` on any failed delivery."""
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise KafkaIOError(f"{remaining} records not acknowledged within {timeout_s}s")
        if self._errors:
            errors, self._errors = self._errors, []
            raise KafkaIOError(f"{len(errors)} deliveries failed, first: {errors[0]}")

    def send_and_wait(self, records: Sequence[OutRecord], timeout_s: float = 30.0) -> None:
        """Send ``records`` and block until the broker has acknowledged every one of them (``acks=all``).

        Each call waits for its own records only (per-call delivery callbacks), so request handlers
        on several threads may share one producer. Raises ``KafkaIOError`` naming the first failed
        delivery, or when not all are acknowledged within ``timeout_s``; the outcome of the records
        is then unknown (some may still land), so a caller retries them idempotently.
        """
        if not records:
            return
        lock = threading.Lock()
        done = threading.Event()
        errors: list[str] = []
        pending = [len(records)]

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            with lock:
                if err is not None:
                    errors.append(str(err))
                pending[0] -= 1
                if pending[0] == 0:
                    done.set()

        try:
            for rec in records:
                while True:
                    try:
                        self._producer.produce(rec.topic, rec.value, rec.key, headers=rec.headers,
                                               on_delivery=on_delivery)
                        break
                    except BufferError:
                        self._producer.poll(0.05)
        except KafkaException as exc:
            raise KafkaIOError(f"cannot send to Kafka: {exc}") from exc
        deadline = time.monotonic() + timeout_s
        while not done.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                raise KafkaIOError(f"{pending[0]} of {len(records)} records not acknowledged within {timeout_s}s")
            self._producer.poll(min(0.05, left))
        if errors:
            raise KafkaIOError(f"{len(errors)} of {len(records)} deliveries failed, first: {errors[0]}")


# ----------------------------------------------------------------------------------------------
# the stage's clients
# ----------------------------------------------------------------------------------------------
class StageClients:
    """The consumer and (optionally transactional) producer of one stage process.

    ``transactional_id`` set: the producer is transactional; ``commit(offsets)`` sends the
    offsets into the open transaction and commits it (exactly-once v2). Otherwise the producer
    is unused and offsets are kept elsewhere (the invoicing stage keeps them in Postgres).
    """

    def __init__(
        self,
        bootstrap: str,
        group: str,
        transactional_id: str | None,
        transaction_timeout_ms: int = 60_000,
    ) -> None:
        self.group = group
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "partition.assignment.strategy": "cooperative-sticky",
                "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 1_000,
                "max.poll.interval.ms": 300_000,
            }
        )
        self.producer: Producer | None = None
        self._in_txn = False
        if transactional_id is not None:
            self.producer = Producer(
                {
                    "bootstrap.servers": bootstrap,
                    "transactional.id": transactional_id,
                    "transaction.timeout.ms": transaction_timeout_ms,
                    "linger.ms": 5,
                    "compression.type": "lz4",
                    "queue.buffering.max.messages": 1_000_000,
                }
            )
            # fences an earlier incarnation with the same id and aborts its open transaction
            self.producer.init_transactions(60)

    # --- consuming ------------------------------------------------------------------------
    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[list[TP]], dict[TP, int]],
        on_revoke: Callable[[list[TP]], None],
    ) -> None:
        """Subscribe; ``on_assign`` may return start offsets to seek to (e.g. kept in Postgres)."""

        def _assign(consumer: Consumer, parts: list[TopicPartition]) -> None:
            tps = [(p.topic, p.partition) for p in parts]
            offsets = on_assign(tps)
            for p in parts:
                if (p.topic, p.partition) in offsets:
                    p.offset = offsets[(p.topic, p.partition)]
            consumer.incremental_assign(parts)

        def _revoke(consumer: Consumer, parts: list[TopicPartition]) -> None:
            on_revoke([(p.topic, p.partition) for p in parts])
            consumer.incremental_unassign(parts)

        self.consumer.subscribe(topics, on_assign=_assign, on_revoke=_revoke, on_lost=_revoke)

    def poll_batch(self, max_records: int, timeout_s: float) -> list[Incoming]:
        """Up to ``max_records`` records; raises ``KafkaIOError`` on a fatal consumer error."""
        out = []
        for msg in self.consumer.consume(max_records, timeout_s):
            err = msg.error()
            if err is None:
                out.append(_incoming(msg))
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif err.fatal() or not err.retriable():
                raise KafkaIOError(f"consumer error: {err}")
            else:
                log.warning("retriable consumer error: %s", err)
        return out

    def rewind_to_committed(self, tps: list[TP]) -> None:
        """Seek each owned partition back to the group's committed offset (its beginning when the
        group has none): what was fetched beyond it is consumed again."""
        if not tps:
            return
        for part in self.consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=30):
            if part.offset < 0:
                part.offset = OFFSET_BEGINNING
            self.consumer.seek(part)

    # --- producing in a transaction -----------------------------------------------------
    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Produce inside the current transaction (begun on first use)."""
        self._begin()
        kwargs = {} if partition is None else {"partition": partition}
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers, **kwargs)
                return
            except BufferError:
                self.producer.poll(0.05)

    def _begin(self) -> None:
        """Begin the transaction unless one is open."""
        assert self.producer is not None, "stage has no transactional producer"
        if not self._in_txn:
            self.producer.begin_transaction()
            self._in_txn = True

    def produce_all(self, topic: str, records: Iterable[tuple[bytes, bytes | None]], partition: int) -> None:
        """Produce (key, value) ``records`` to one partition inside the current transaction (begun on
        first use): ``produce`` for many records, e.g. a batch of changelog records."""
        self._begin()
        produce = self.producer.produce  # type: ignore[union-attr]
        for key, value in records:
            while True:
                try:
                    produce(topic, value, key, partition)
                    break
                except BufferError:
                    self.producer.poll(0.05)

    def group_metadata(self) -> object:
        """The consumer's group metadata (member id, generation) for ``commit``: take it on the
        consuming thread, as the client serializes calls to the consumer."""
        return self.consumer.consumer_group_metadata()

    def commit(self, offsets: dict[TP, int], group_metadata: object | None = None) -> None:
        """Commit the transaction together with the next offsets to consume (exactly-once v2).

        ``group_metadata``: from ``group_metadata()``; taken here when ``None`` (then this must run
        on the consuming thread: a call to the consumer waits while another thread polls).

        Raises ``TransactionAborted`` when the transaction hit an abortable error (it is aborted
        here; the next one can begin) and ``KafkaIOError`` when it cannot commit at all (the caller
        must exit).
        """
        assert self.producer is not None
        if not offsets and not self._in_txn:
            return
        self._begin()
        try:
            if offsets:
                tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
                self.producer.send_offsets_to_transaction(
                    tps, group_metadata if group_metadata is not None else self.group_metadata(), 60
                )
            self.producer.commit_transaction(60)
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if err is None or not err.txn_requires_abort():
                raise KafkaIOError(f"transaction commit failed: {exc}") from exc
            try:
                self.producer.abort_transaction(30)
            except KafkaException as abort_exc:
                raise KafkaIOError(f"transaction commit failed ({exc}), then its abort: {abort_exc}") from exc
            raise TransactionAborted(f"transaction aborted: {exc}") from exc
        finally:
            self._in_txn = False

    def abort(self) -> None:
        """Abort the open transaction, if any (best effort)."""
        if self.producer is not None and self._in_txn:
            try:
                self.producer.abort_transaction(30)
            except KafkaException as exc:
                log.error("abort failed: %s", exc)
            self._in_txn = False

    def close(self) -> None:
        """Leave the group and release the clients."""
        self.abort()
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close: %s", exc)
        if self.producer is not None:
            self.producer.flush(10)


def read_partition_to_end(
    bootstrap: str, topic: str, partition: int, timeout_s: float = 120.0
) -> Iterator[tuple[bytes, bytes | None]]:
    """Every committed record of one partition from the beginning to its current end.

    Used to restore state from a compacted changelog. Reads ``read_committed``; yields
    (key, value) with ``value`` ``None`` for tombstones. Raises ``KafkaIOError`` on timeout.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "restore-unused",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.max.bytes": 52_428_800,
        }
    )
    try:
        _low, high = _retrying(
            lambda: consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30, cached=False)
        )
        if high <= 0:
            return
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() > deadline:
                raise KafkaIOError(f"restore of {topic}[{partition}] did not reach offset {high}")
            msgs = consumer.consume(10_000, 0.5)
            at_eof = False
            for msg in msgs:
                err = msg.error()
                if err is None:
                    yield msg.key(), msg.value()
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_eof = True
                else:
                    raise KafkaIOError(f"restore of {topic}[{partition}]: {err}")
            if at_eof:
                pos = consumer.position([TopicPartition(topic, partition)])[0].offset
                if pos >= high:
                    return
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, tps: list[TP]) -> dict[TP, int]:
    """The committed offsets of ``group`` (negative when none), for monitoring and tests."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=30)
        return {(p.topic, p.partition): p.offset for p in parts}
    finally:
        consumer.close()


def end_offsets(bootstrap: str, tps: list[TP]) -> dict[TP, int]:
    """High watermarks of the given partitions."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "end-offsets-unused"})
    try:
        return {
            (t, p): _retrying(
                lambda t=t, p=p: consumer.get_watermark_offsets(TopicPartition(t, p), timeout=30, cached=False)
            )[1]
            for t, p in tps
        }
    finally:
        consumer.close()


def read_all(
    bootstrap: str, topic: str, timeout_s: float = 60.0, idle_s: float = 2.0
) -> list[Incoming]:
    """Every committed record of every partition of ``topic`` up to its end (tests, CLI tools)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "read-all-unused",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=30).topics[topic]
        parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.partitions]
        highs = {
            tp.partition: _retrying(
                lambda q=tp.partition: consumer.get_watermark_offsets(TopicPartition(topic, q), cached=False)
            )[1]
            for tp in parts
        }
        consumer.assign(parts)
        out: list[Incoming] = []
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < deadline:
            msgs = consumer.consume(10_000, 0.5)
            for msg in msgs:
                if msg.error() is None:
                    out.append(_incoming(msg))
                    last = time.monotonic()
            if not msgs:
                positions = {
                    p.partition: p.offset
                    for p in consumer.position([TopicPartition(topic, q) for q in highs])
                }
                done = all(positions[q] >= h or h == 0 for q, h in highs.items() if positions[q] >= 0)
                if done and all(positions[q] >= 0 or highs[q] == 0 for q in highs):
                    break
                if time.monotonic() - last > idle_s and all(h == 0 for h in highs.values()):
                    break
        return out
    finally:
        consumer.close()
