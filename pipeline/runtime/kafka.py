"""Kafka clients for the pipeline: the only module that imports ``confluent_kafka``.

Every client on the money path is a confluent-kafka client: stages consume ``read_committed``
and produce transactionally (exactly-once v2: ``send_offsets_to_transaction`` with the
consumer's group metadata, KIP-447); gateways use an idempotent producer.

Broker faults (issue 12). What librdkafka 2.16 does, observed against the local broker
(``pipeline.stack.restart_kafka`` / ``pause_kafka``) with a transactional consume → produce →
``send_offsets_to_transaction`` → ``commit_transaction`` loop:

- ``send_offsets_to_transaction`` does not honour its timeout. With every broker down, the client
  re-bootstraps and decommissions the broker it knew; the group coordinator it cached stays the
  decommissioned handle, and the TxnOffsetCommit step waits for a state change of it that never
  comes (librdkafka issues #5511 and #5456: the coordinator request's timeout is never checked).
  After a SIGTERM or SIGKILL restart (down 25 s) a call given 60 s never returned (> 4 min, 4 runs
  of 4); given 10 s it returned only once the broker answered (26–36 s), with ``_TRANSPORT``
  (retriable, not abortable), after which ``abort_transaction`` failed with a fatal
  ``INVALID_TXN_STATE``. While the call hangs, every other transactional call on that producer
  fails with ``_CONFLICT`` ("Conflicting send_offsets_to_transaction API call is already in
  progress"): the producer can neither commit nor abort.
- With ``metadata.recovery.strategy=none`` on the transactional producer (no re-bootstrap, so
  the coordinator handle stays live) the same call completed 2–5 s after the broker answered and
  the transaction committed (SIGTERM and SIGKILL restarts).
- A paused broker (SIGSTOP 20–25 s, longer than the consumer session): the call returned when the
  broker resumed, with ``_TIMED_OUT`` (retriable) or ``UNKNOWN_MEMBER_ID`` (abortable);
  ``abort_transaction`` then succeeded.
- A new producer with the same ``transactional.id`` gets through ``init_transactions`` in 0.1–0.6 s
  once the broker answers: it fences the old instance and ends its open transaction.
- The consumer rides through every fault by itself: it reports ``_TRANSPORT`` /
  ``_ALL_BROKERS_DOWN`` as non-fatal errors, loses its partitions (``on_lost``) and rejoins.

Hence ``StageClients``: the transactional producer runs without re-bootstrap; every transactional
call gets a deadline (``call_timeout_s``); a commit that fails in any way other than an abortable
error, or does not return by its deadline, is answered by ``replace_producer`` (a new producer with
the same ``transactional.id``, the stuck one abandoned, never destroyed under a stuck call) and the
caller resumes from the last commit. A committer thread is bound to the producer generation it was
started for and never commits on a newer one (``bind_generation``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, NoReturn, TypeVar

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


class ProducerUnusable(KafkaIOError):
    """The transactional producer can neither commit nor abort its transaction: a fatal error
    (fenced, ``INVALID_TXN_STATE``), a failed abort, a conflicting call still in progress, or the
    call's deadline passed. The caller replaces it (``StageClients.replace_producer``: its
    ``init_transactions`` fences this one and ends its transaction) and resumes from the last
    commit."""


class StaleProducer(ProducerUnusable):
    """A commit was attempted by a thread bound to a producer that has since been replaced: it is
    refused (it would commit work the stage has thrown away)."""


class Deadline:
    """A moment ``seconds`` from now on the monotonic clock by which something must be done.

    ``clock`` is injectable for tests (seconds, monotonic).
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.seconds = seconds
        self.at = clock() + seconds

    def remaining(self) -> float:
        """Seconds left (0.0 once expired)."""
        return max(0.0, self.at - self._clock())

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self._clock() >= self.at

    def timeout(self, cap_s: float) -> float:
        """The timeout (seconds) to give one blocking call: the time left, at most ``cap_s``, at least
        1 ms (librdkafka reads 0 as "do not wait")."""
        return max(0.001, min(cap_s, self.remaining()))


def backoff(first_s: float = 0.2, factor: float = 2.0, max_s: float = 5.0) -> Iterator[float]:
    """Delays (seconds) between retries: ``first_s``, then multiplied by ``factor`` up to ``max_s``."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * factor, max_s)


def error_of(exc: BaseException) -> KafkaError | None:
    """The ``KafkaError`` a ``KafkaException`` carries (``None`` for anything else)."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


def txn_error_action(err: KafkaError | None) -> str:
    """What a failed transactional call asks for, by librdkafka's error attributes:

    ``"abort"``: abortable (``txn_requires_abort``, e.g. ``ILLEGAL_GENERATION``,
    ``UNKNOWN_MEMBER_ID``): abort, the producer stays usable; ``"retry"``: retriable (e.g.
    ``_TIMED_OUT``: commit/abort may be called again to resume); ``"replace"``: fatal, a
    conflicting call in progress (``_CONFLICT``), or anything else: the producer is given up.
    """
    if err is None or err.fatal() or err.code() in (KafkaError._CONFLICT, KafkaError._PREV_IN_PROGRESS):
        return "replace"  # _CONFLICT: another call (one that may never return) holds the producer
    if err.txn_requires_abort():
        return "abort"
    if err.retriable():
        return "retry"
    return "replace"


# transient conditions around broker restarts: worth calling again until a deadline
_TRANSIENT = frozenset({
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC,  # metadata not loaded yet after a restart
    KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._WAIT_COORD,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR,
    KafkaError.REQUEST_TIMED_OUT, KafkaError.NETWORK_EXCEPTION,
})


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a Kafka error that a later call may not hit (retriable, or one of the
    transport/coordinator conditions around a broker restart)."""
    err = error_of(exc)
    return err is not None and not err.fatal() and (err.retriable() or err.code() in _TRANSIENT)


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


def _headers(headers: list[tuple[str, bytes | None]]) -> tuple[tuple[str, bytes], ...]:
    """A message's headers as ``Incoming`` keeps them: a header without a value has ``b""``."""
    out = tuple(headers)
    for _k, v in out:
        if v is None:
            return tuple((k, v if v is not None else b"") for k, v in out)
    return out


def _incoming(msg: Message) -> Incoming:
    headers = msg.headers()
    return _new(Incoming, (  # Incoming(...) without the cost of its Python-level constructor
        msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
        _headers(headers) if headers else (), msg.timestamp()[1],
    ))


def _retrying(fn: Callable[[], T], timeout_s: float = 30.0, on_wait: Callable[[], None] | None = None) -> T:
    """Call ``fn`` until it stops raising transient Kafka errors (``is_transient``: e.g. NOT_LEADER
    just after a topic was created, a timeout while the broker restarts) or ``timeout_s`` passes;
    then the last error is raised. ``on_wait`` is called before each retry (a liveness beat)."""
    deadline = Deadline(timeout_s)
    delays = backoff(0.2, 2.0, 2.0)
    logged = -1e9
    while True:
        try:
            return fn()
        except KafkaException as exc:
            if not is_transient(exc) or deadline.expired():
                raise
            if time.monotonic() - logged >= 30.0:  # a wait for the broker is visible in the log
                logged = time.monotonic()
                log.warning("%s; retrying for at most %.0f s more", exc, deadline.remaining())
            if on_wait is not None:
                on_wait()
            time.sleep(min(next(delays), deadline.remaining()))


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
    ``KafkaIOError`` if any delivery failed. ``fatal_error`` is set once the client hit a fatal
    error (it can then deliver nothing more: make a new one).
    """

    def __init__(self, bootstrap: str, linger_ms: int = 20) -> None:
        self.fatal_error: str | None = None
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": linger_ms,
                "compression.type": "lz4",
                "queue.buffering.max.messages": 500_000,
                "error_cb": self._on_error,
            }
        )
        self._errors: list[str] = []

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.fatal_error = str(err)
            log.error("idempotent producer: fatal error %s", err)

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._errors.append(str(err))

    def send(self, topic: str, key: bytes | str | None, value: bytes | None, headers: list | None = None,
             partition: int | None = None) -> None:
        """Queue one record (blocks briefly when the local queue is full), to ``partition`` if given, else
        to the partition of its key. Raises ``KafkaIOError`` when the client refuses it (e.g. after a
        fatal error)."""
        where = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers, on_delivery=self._on_delivery, **where)
                return
            except BufferError:
                self._producer.poll(0.1)
            except KafkaException as exc:
                raise KafkaIOError(f"cannot send to Kafka: {exc}") from exc

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
class _Txn:
    """One transactional producer instance and what the clients track about it."""

    __slots__ = ("abandoned", "calls", "generation", "in_txn", "producer", "suspect")

    def __init__(self, producer: Producer, generation: int, suspect: threading.Event | None = None) -> None:
        self.producer: Producer | None = producer
        self.generation = generation
        self.in_txn = False  # a transaction is open (begun, not yet committed or aborted)
        self.calls = 0  # blocking transactional calls in progress on a committer thread
        self.abandoned = False  # replaced: nothing may commit on it any more
        # set when it lost every broker: its next coordinator request may never end
        self.suspect = suspect or threading.Event()


# Producers given up while a call on them was still in progress: kept referenced (destroying a
# librdkafka instance under a call that never returns would block) until that call returns.
_STUCK: list[_Txn] = []
_STUCK_LOCK = threading.Lock()


def stuck_producer_calls() -> int:
    """How many abandoned producers of this process still have a call in progress (a call that
    never returned: the process should not rely on an orderly interpreter shutdown)."""
    with _STUCK_LOCK:
        return sum(1 for t in _STUCK if t.calls > 0)


def _retire(txn: _Txn) -> None:
    """Destroy an abandoned producer on a daemon thread (``rd_kafka_destroy`` may take a while)."""
    producer, txn.producer = txn.producer, None
    with _STUCK_LOCK:
        if txn in _STUCK:
            _STUCK.remove(txn)
    if producer is None:
        return

    box = [producer]
    del producer

    def destroy() -> None:
        p = box.pop()
        with contextlib.suppress(KafkaException, RuntimeError):
            p.purge(True, True, False)  # queued and in-flight records of an abandoned transaction
        del p  # the last reference: the instance is destroyed here, not on a stage's thread

    threading.Thread(target=destroy, name="producer-retire", daemon=True).start()


class StageClients:
    """The consumer and (optionally transactional) producer of one stage process.

    ``transactional_id`` set: the producer is transactional; ``commit(offsets)`` sends the
    offsets into the open transaction and commits it (exactly-once v2). Otherwise the producer
    is unused and offsets are kept elsewhere (the invoicing stage keeps them in Postgres).

    Deadlines (seconds): ``call_timeout_s`` bounds one commit (offsets + commit, resumed calls
    included), one abort and one ``committed()`` lookup; ``init_timeout_s`` bounds getting a
    transactional producer ready (``init_transactions`` retried while the broker is away), at
    start-up and in ``replace_producer``. ``on_wait`` is called while waiting for the broker (a
    liveness beat for a watchdog).

    Raises ``KafkaIOError`` from the constructor when the producer cannot be made ready in time.
    """

    def __init__(
        self,
        bootstrap: str,
        group: str,
        transactional_id: str | None,
        transaction_timeout_ms: int = 60_000,
        *,
        call_timeout_s: float = 30.0,
        init_timeout_s: float = 300.0,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.group = group
        self.call_timeout_s = call_timeout_s
        self.init_timeout_s = init_timeout_s
        self._on_wait = on_wait or (lambda: None)
        self._consumer_errors: dict[int, float] = {}  # error code -> last logged (monotonic)
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
        self._lock = threading.Lock()
        self._local = threading.local()
        self._producer_conf: dict[str, object] | None = None
        self._txn: _Txn | None = None
        self.producer: Producer | None = None
        if transactional_id is not None:
            self._producer_conf = {
                "bootstrap.servers": bootstrap,
                "transactional.id": transactional_id,
                "transaction.timeout.ms": transaction_timeout_ms,
                "linger.ms": 5,
                "compression.type": "lz4",
                "queue.buffering.max.messages": 1_000_000,
                # no re-bootstrap when every broker is down: re-bootstrapping decommissions the broker
                # handle the group coordinator is cached as, and send_offsets_to_transaction then never
                # returns (module doc); with it off the call completes once the broker is back
                "metadata.recovery.strategy": "none",
            }
            self._txn = self._new_txn(0)
            self.producer = self._txn.producer
            # fences an earlier incarnation with the same id and aborts its open transaction
            self._init_transactions(Deadline(init_timeout_s), lambda: False)

    # --- the transactional producer and its generations -----------------------------------
    @property
    def generation(self) -> int:
        """The generation of the current transactional producer (0 at start, +1 per replacement)."""
        return self._txn.generation if self._txn is not None else 0

    def bind_generation(self, generation: int) -> None:
        """Bind the calling thread to producer ``generation``: ``commit``/``abort`` on this thread then
        refuse (``StaleProducer``) once that producer has been replaced. Call it first thing on a
        committer thread, with the generation current when its commit was handed over."""
        self._local.generation = generation

    def _bound(self) -> _Txn:
        """The producer the calling thread may use: the current one, unless the thread is bound to an
        older generation (then ``StaleProducer``)."""
        with self._lock:
            txn = self._txn
            bound = getattr(self._local, "generation", None)
            if txn is None:
                raise KafkaIOError("stage has no transactional producer")
            if bound is not None and bound != txn.generation:
                raise StaleProducer(f"producer generation {bound} was replaced by {txn.generation}")
            return txn

    def _new_txn(self, generation: int) -> _Txn:
        suspect = threading.Event()  # what the callback may reference: not the producer (no cycle, so the
        # producer is destroyed where its last reference goes, never by the garbage collector elsewhere)

        def on_error(err: KafkaError) -> None:
            if err.code() == KafkaError._ALL_BROKERS_DOWN and not suspect.is_set():
                suspect.set()
                log.warning("transactional producer (generation %d) lost every broker: it is replaced before "
                            "its next transaction", generation)

        return _Txn(Producer({**self._producer_conf, "error_cb": on_error}), generation, suspect)  # type: ignore[dict-item]

    def producer_suspect(self) -> bool:
        """Whether the current transactional producer should be replaced (``replace_producer``) while
        no transaction is open: it lost every broker since it was made ready (``_ALL_BROKERS_DOWN``,
        seen by serving its callbacks here; a transaction begun on it could meet a coordinator request
        that never ends, module doc), or it is in a fatal state (e.g. an abort failed). Cheap: call it
        between transactions."""
        txn = self._txn
        if txn is None or txn.producer is None:
            return False
        try:
            txn.producer.poll(0)  # serves error callbacks (and nothing else: no delivery callbacks are set)
        except KafkaException as exc:  # the client raises its fatal error here
            log.error("transactional producer (generation %d): %s", txn.generation, exc)
            txn.suspect.set()
        return txn.suspect.is_set() and not txn.in_txn

    def replace_producer(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Give up the current transactional producer and make a new one with the same
        ``transactional.id`` ready: its ``init_transactions`` fences the old one (which can then
        commit nothing) and ends the old one's open transaction (aborted, or completed if its
        commit had already reached the coordinator), so afterwards the committed offsets and the
        changelogs are final. A call still in progress on the old producer is left running on its
        thread; that producer is destroyed once the call returns, never under it.

        Retries ``init_transactions`` while the broker is away, for at most ``init_timeout_s``
        seconds or until ``stop()`` is true; raises ``KafkaIOError`` then.
        """
        assert self._producer_conf is not None, "stage has no transactional producer"
        with self._lock:
            old = self._swap_locked()
            idle = old.calls == 0
            if not idle:
                with _STUCK_LOCK:
                    _STUCK.append(old)
        if idle:
            _retire(old)
        log.warning("transactional producer replaced (generation %d -> %d)%s", old.generation,
                    old.generation + 1, "" if idle else "; the old one still has a call in progress")
        self._init_transactions(Deadline(self.init_timeout_s), stop)

    def _swap_locked(self) -> _Txn:
        """Abandon the current transactional producer and bind a new one, the next generation; returns the
        old one. The caller holds ``self._lock``."""
        old = self._txn
        assert old is not None
        old.abandoned = True
        self._txn = self._new_txn(old.generation + 1)
        self.producer = self._txn.producer
        return old

    def _init_transactions(self, deadline: Deadline, stop: Callable[[], bool]) -> None:
        delays = backoff(0.5, 2.0, 5.0)
        while True:
            txn = self._bound()
            producer = txn.producer
            assert producer is not None
            try:
                producer.init_transactions(deadline.timeout(10.0))
                # brokers lost while it got ready do not count: it has no group coordinator cached yet
                producer.poll(0)  # (the error callbacks queued meanwhile run now, before the clear)
                txn.suspect.clear()
                return
            except KafkaException as exc:
                err = error_of(exc)
                if deadline.expired() or stop():
                    raise KafkaIOError(f"no transactional producer within {deadline.seconds:.0f} s: {exc}") from exc
                log.warning("init_transactions: %s; retrying", exc)
                if err is None or err.fatal() or not err.retriable():
                    # e.g. fenced by a zombie that raced us: start over with a fresh instance
                    del producer  # it is destroyed on _retire's thread, never on this one
                    with self._lock:
                        old = self._swap_locked()
                    _retire(old)
            self._on_wait()
            time.sleep(min(next(delays), deadline.remaining()))

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
        """Up to ``max_records`` records, waiting at most ``timeout_s`` seconds (plus the rebalance
        callbacks run meanwhile). Non-fatal consumer errors (the broker away: ``_TRANSPORT``,
        ``_ALL_BROKERS_DOWN``, ...) are logged, at most once per 30 s per error code: the client
        recovers from them by itself. Raises ``KafkaIOError`` on a fatal consumer error."""
        out: list[Incoming] = []
        append, new, incoming = out.append, _new, Incoming
        for msg in self.consumer.consume(max_records, timeout_s):
            err = msg.error()
            if err is None:  # _incoming(msg), inline: once per record
                headers = msg.headers()
                append(new(incoming, (msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
                                      _headers(headers) if headers else (), msg.timestamp()[1])))
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif err.fatal():
                raise KafkaIOError(f"consumer error: {err}")
            else:
                now = time.monotonic()
                if now - self._consumer_errors.get(err.code(), -1e9) >= 30.0:
                    self._consumer_errors[err.code()] = now
                    log.warning("consumer error (the client retries by itself): %s", err)
        return out

    def positions(self, tps: list[TP]) -> dict[TP, tuple[int, int]]:
        """(position, high watermark) of each owned partition, as the consumer knows them locally (no
        request to the broker, never blocks): the position is the next offset the application will be
        given (past transaction markers it has read), the high watermark the one of the last fetch
        response. A value not known yet is negative. For consumer lag (monitoring); call it on the
        consuming thread."""
        if not tps:
            return {}
        out: dict[TP, tuple[int, int]] = {}
        try:
            positions = self.consumer.position([TopicPartition(t, p) for t, p in tps])
        except KafkaException:
            return {}
        for part in positions:
            try:
                marks = self.consumer.get_watermark_offsets(TopicPartition(part.topic, part.partition), cached=True)
                high = marks[1] if marks else -1
            except KafkaException:
                high = -1
            out[(part.topic, part.partition)] = (part.offset, high)
        return out

    def rewind_to_committed(self, tps: list[TP], timeout_s: float | None = None) -> None:
        """Seek each owned partition back to the group's committed offset (its beginning when the
        group has none): what was fetched beyond it is consumed again. The lookup is retried while
        the broker is away, for at most ``timeout_s`` seconds (default ``init_timeout_s``); raises
        ``KafkaIOError`` then."""
        if not tps:
            return
        deadline = Deadline(self.init_timeout_s if timeout_s is None else timeout_s)
        parts = [TopicPartition(t, p) for t, p in tps]
        try:
            committed = _retrying(lambda: self.consumer.committed(parts, timeout=deadline.timeout(self.call_timeout_s)),
                                  deadline.remaining(), self._on_wait)
        except KafkaException as exc:
            raise KafkaIOError(f"committed offsets of {tps} not readable within {deadline.seconds:.0f} s: "
                               f"{exc}") from exc
        for part in committed:
            if part.offset < 0:
                part.offset = OFFSET_BEGINNING
            self.consumer.seek(part)

    # --- producing in a transaction -----------------------------------------------------
    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Produce inside the current transaction (begun on first use)."""
        txn = self._txn  # once per record: the transaction already open on the producer this thread may use
        if txn is not None and txn.in_txn and getattr(self._local, "generation", None) in (None, txn.generation):
            producer = txn.producer  # what _begin() returns then, without its lock (one attribute read is atomic)
        else:
            producer = self._begin()
        while True:
            try:
                if partition is None:
                    producer.produce(topic, value, key, headers=headers)  # type: ignore[union-attr]
                else:
                    producer.produce(topic, value, key, partition, headers=headers)  # type: ignore[union-attr]
                return
            except BufferError:
                producer.poll(0.05)
            except KafkaException as exc:  # the producer is in a fatal state (e.g. fenced)
                raise ProducerUnusable(f"produce failed: {exc}") from exc

    def _begin(self) -> Producer:
        """Begin the transaction unless one is open; returns the producer to use. Raises
        ``ProducerUnusable`` when the producer cannot begin one (e.g. it was fenced)."""
        txn = self._bound()
        if not txn.in_txn:
            try:
                txn.producer.begin_transaction()  # type: ignore[union-attr]
            except KafkaException as exc:
                raise ProducerUnusable(f"begin_transaction failed: {exc}") from exc
            txn.in_txn = True
        return txn.producer  # type: ignore[return-value]

    def produce_all(self, topic: str, records: Iterable[tuple[bytes, bytes | None]], partition: int) -> None:
        """Produce (key, value) ``records`` to one partition inside the current transaction (begun on
        first use): ``produce`` for many records, e.g. a batch of changelog records. Raises
        ``ProducerUnusable`` when the producer is in a fatal state."""
        producer = self._begin()
        produce = producer.produce
        try:
            for key, value in records:
                while True:
                    try:
                        produce(topic, value, key, partition)
                        break
                    except BufferError:
                        producer.poll(0.05)
        except KafkaException as exc:
            raise ProducerUnusable(f"produce failed: {exc}") from exc

    def group_metadata(self) -> object:
        """The consumer's group metadata (member id, generation) for ``commit``: take it on the
        consuming thread, as the client serializes calls to the consumer."""
        return self.consumer.consumer_group_metadata()

    def commit(self, offsets: dict[TP, int], group_metadata: object | None = None) -> None:
        """Commit the transaction together with the next offsets to consume (exactly-once v2),
        within ``call_timeout_s`` seconds, on the producer the calling thread is bound to.

        ``group_metadata``: from ``group_metadata()``; taken here when ``None`` (then this must run
        on the consuming thread: a call to the consumer waits while another thread polls).

        Raises ``TransactionAborted`` when the transaction hit an abortable error (it is aborted
        here; the next one can begin), ``ProducerUnusable`` when it can be neither committed nor
        aborted or the deadline passed (the caller replaces the producer: ``replace_producer``), and
        ``StaleProducer`` when the thread's producer was replaced meanwhile (nothing is committed).
        ``send_offsets_to_transaction`` may also never return (module doc): run this on a thread
        the caller can walk away from.
        """
        txn = self._bound()
        if not offsets and not txn.in_txn:
            return
        deadline = Deadline(self.call_timeout_s)
        with self._lock:
            txn.calls += 1
        producer = txn.producer
        assert producer is not None
        try:
            if not txn.in_txn:
                try:
                    producer.begin_transaction()
                except KafkaException as exc:
                    raise ProducerUnusable(f"begin_transaction failed: {exc}") from exc
                txn.in_txn = True
            if offsets:
                tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
                try:
                    producer.send_offsets_to_transaction(
                        tps, group_metadata if group_metadata is not None else self.group_metadata(),
                        deadline.timeout(self.call_timeout_s),
                    )
                except KafkaException as exc:
                    self._failed(txn, exc, "send_offsets_to_transaction", deadline)
            while True:
                if txn.abandoned:  # the producer was replaced while the offsets were on their way
                    raise StaleProducer(f"producer generation {txn.generation} was replaced; not committing")
                try:
                    producer.commit_transaction(deadline.timeout(self.call_timeout_s))
                    break
                except KafkaException as exc:
                    if txn_error_action(error_of(exc)) == "retry" and not deadline.expired():
                        log.warning("commit_transaction: %s; resuming it", exc)
                        time.sleep(min(0.1, deadline.remaining()))
                        continue
                    self._failed(txn, exc, "commit_transaction", deadline)
            txn.in_txn = False
        finally:
            with self._lock:
                txn.calls -= 1
                retire = txn.abandoned and txn.calls == 0 and txn.producer is not None
            if retire:
                _retire(txn)

    def _failed(self, txn: _Txn, exc: KafkaException, call: str, deadline: Deadline) -> NoReturn:
        """A transactional call failed: abort on an abortable error (``TransactionAborted``), else
        ``ProducerUnusable``."""
        if txn_error_action(error_of(exc)) != "abort":
            raise ProducerUnusable(f"{call} failed: {exc}") from exc
        self._abort_txn(txn, deadline)
        raise TransactionAborted(f"transaction aborted: {exc}") from exc

    def _abort_txn(self, txn: _Txn, deadline: Deadline) -> None:
        """Abort ``txn``'s open transaction, resuming a timed-out abort until ``deadline``; raises
        ``ProducerUnusable`` when it cannot be aborted."""
        producer = txn.producer
        assert producer is not None
        while True:
            try:
                producer.abort_transaction(deadline.timeout(self.call_timeout_s))
                txn.in_txn = False
                return
            except KafkaException as exc:
                if txn_error_action(error_of(exc)) == "retry" and not deadline.expired():
                    log.warning("abort_transaction: %s; resuming it", exc)
                    time.sleep(min(0.1, deadline.remaining()))
                    continue
                raise ProducerUnusable(f"abort_transaction failed: {exc}") from exc

    def abort(self) -> None:
        """Abort the open transaction of the calling thread's producer, if any (best effort, at most
        ``call_timeout_s`` seconds; a failure is logged: the broker aborts the transaction after
        ``transaction.timeout.ms``, or a replacement producer does)."""
        if self._txn is None:
            return
        try:
            txn = self._bound()
        except StaleProducer:
            return
        if txn.in_txn:
            try:
                self._abort_txn(txn, Deadline(self.call_timeout_s))
            except ProducerUnusable as exc:
                log.error("abort failed: %s; the producer will be replaced", exc)
                txn.suspect.set()
            txn.in_txn = False

    def close(self, timeout_s: float = 30.0) -> bool:
        """Abort an open transaction, leave the group and release the clients, within ``timeout_s``
        seconds: the work runs on a daemon thread, and if it has not finished by then (a call that
        never returns) it is left behind. Returns whether it finished."""
        done = threading.Event()

        def work() -> None:
            try:
                self.abort()
                try:
                    self.consumer.close()
                except (KafkaException, RuntimeError) as exc:
                    log.warning("consumer close: %s", exc)
                if self._txn is not None and self._txn.producer is not None:
                    self._txn.producer.flush(min(10.0, timeout_s))
            finally:
                done.set()

        threading.Thread(target=work, name="clients-close", daemon=True).start()
        if not done.wait(timeout_s):
            log.error("Kafka clients did not close within %.0f s; leaving them behind", timeout_s)
            return False
        return True


def _high_watermark(config: dict[str, object], topic: str, partition: int, deadline: Deadline,
                    beat: Callable[[], None]) -> int:
    """The high watermark of one partition, asked through a new client on each attempt until
    ``deadline``: a client keeps the metadata it first got, and one made while the partition had no
    leader (a broker just back: observed for a SIGSTOPped one) answers ``_UNKNOWN_PARTITION`` from its
    cache for minutes without asking again. Raises ``KafkaIOError``."""
    delays = backoff(0.2, 2.0, 2.0)
    logged = -1e9
    while True:
        consumer = Consumer(config)
        try:
            return consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                  timeout=deadline.timeout(10.0), cached=False)[1]
        except KafkaException as exc:
            if not is_transient(exc) or deadline.expired():
                raise KafkaIOError(f"end offset of {topic}[{partition}] not readable: {exc}") from exc
            if time.monotonic() - logged >= 30.0:
                logged = time.monotonic()
                log.warning("end offset of %s[%d]: %s; retrying with a new client", topic, partition, exc)
        finally:
            consumer.close()
        beat()
        time.sleep(min(next(delays), deadline.remaining()))


def read_partition_to_end(
    bootstrap: str, topic: str, partition: int, timeout_s: float = 120.0,
    on_progress: Callable[[], None] | None = None,
) -> Iterator[tuple[bytes, bytes | None]]:
    """Every committed record of one partition from the beginning to its current end.

    Used to restore state from a compacted changelog. Reads ``read_committed``; yields
    (key, value) with ``value`` ``None`` for tombstones. The whole read, the end-offset lookup
    included, must finish within ``timeout_s`` seconds: the broker being away meanwhile is waited
    out (the client reconnects by itself) until then. ``on_progress`` is called about every 0.5 s
    (a liveness beat). Raises ``KafkaIOError`` on timeout or on a fatal error.
    """
    deadline = Deadline(timeout_s)
    beat = on_progress or (lambda: None)
    config = {
        "bootstrap.servers": bootstrap,
        "group.id": "restore-unused",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "fetch.max.bytes": 52_428_800,
    }
    high = _high_watermark(config, topic, partition, deadline, beat)
    if high <= 0:
        return
    consumer = Consumer(config)
    try:
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        while True:
            if deadline.expired():
                raise KafkaIOError(f"restore of {topic}[{partition}] did not reach offset {high} in {timeout_s:.0f} s")
            beat()
            msgs = consumer.consume(10_000, 0.5)
            at_eof = not msgs
            for msg in msgs:
                err = msg.error()
                if err is None:
                    yield msg.key(), msg.value()
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_eof = True
                elif err.fatal():
                    raise KafkaIOError(f"restore of {topic}[{partition}]: {err}")
                else:
                    log.warning("restore of %s[%d]: %s (retrying)", topic, partition, err)
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
