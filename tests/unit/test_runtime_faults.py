"""The pure parts of the runtime's fault handling (issue 12): deadlines, backoff, how a failed
transactional call is answered, the watchdog, the stale-committer guard and the Postgres retry beat.

Transaction behaviour itself is tested against the real broker (tests/integration/test_broker_faults.py);
nothing here imitates a broker. The librdkafka clients made here point at a closed port.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import psycopg
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from pipeline.runtime import postgres
from pipeline.runtime.kafka import (
    Deadline,
    KafkaIOError,
    StageClients,
    StaleProducer,
    _retrying,
    _Txn,
    backoff,
    is_transient,
    txn_error_action,
)
from pipeline.runtime.loop import Watchdog


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_deadline_counts_down_and_caps_each_call() -> None:
    clock = FakeClock()
    d = Deadline(30.0, clock)
    assert d.remaining() == 30.0 and not d.expired()
    assert d.timeout(10.0) == 10.0  # a single call gets at most its cap
    clock.now += 25
    assert d.remaining() == 5.0 and d.timeout(10.0) == 5.0  # ... and never more than is left
    clock.now += 5
    assert d.expired() and d.remaining() == 0.0
    assert d.timeout(10.0) == 0.001  # librdkafka reads 0 as "do not wait": the floor is 1 ms


def test_backoff_doubles_up_to_its_cap() -> None:
    delays = backoff(0.5, 2.0, 5.0)
    assert [next(delays) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


@pytest.mark.parametrize(("err", "action"), [
    (KafkaError(KafkaError._FENCED, "fenced", fatal=True), "replace"),
    (KafkaError(KafkaError.INVALID_TXN_STATE, "invalid state", fatal=True), "replace"),
    (KafkaError(KafkaError.ILLEGAL_GENERATION, "rebalanced", txn_requires_abort=True), "abort"),
    (KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "session expired", txn_requires_abort=True), "abort"),
    (KafkaError(KafkaError._TIMED_OUT, "retry call to resume", retriable=True), "retry"),
    # another call holds the producer (observed: send_offsets_to_transaction that never returns)
    (KafkaError(KafkaError._CONFLICT, "Conflicting send_offsets_to_transaction API call", retriable=True), "replace"),
    (KafkaError(KafkaError._STATE, "erroneous state"), "replace"),
    (None, "replace"),
])
def test_a_failed_transactional_call_is_answered_by_its_error_attributes(err: KafkaError | None, action: str) -> None:
    assert txn_error_action(err) == action


def test_transient_errors_are_the_ones_a_broker_restart_causes() -> None:
    assert is_transient(KafkaException(KafkaError(KafkaError._TRANSPORT)))
    assert is_transient(KafkaException(KafkaError(KafkaError._TIMED_OUT)))
    assert is_transient(KafkaException(KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)))
    # observed: get_watermark_offsets of a restore right after a SIGKILL restart (metadata not loaded yet)
    assert is_transient(KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION)))
    assert is_transient(KafkaException(KafkaError(KafkaError.NOT_ENOUGH_REPLICAS, retriable=True)))
    assert not is_transient(KafkaException(KafkaError(KafkaError._TIMED_OUT, fatal=True)))
    assert not is_transient(KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)))
    assert not is_transient(ValueError("not Kafka"))


def test_retrying_waits_out_transient_errors_until_its_deadline_only() -> None:
    calls: list[float] = []
    beats: list[int] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return "ok"

    assert _retrying(flaky, 10.0, lambda: beats.append(1)) == "ok"
    assert len(calls) == 3 and len(beats) == 2  # a liveness beat before each retry

    def down() -> None:
        raise KafkaException(KafkaError(KafkaError._ALL_BROKERS_DOWN))

    t0 = time.monotonic()
    with pytest.raises(KafkaException):
        _retrying(down, 0.5)
    assert 0.5 <= time.monotonic() - t0 < 3.0

    def refused() -> None:
        calls.append(0.0)
        raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))

    calls.clear()
    with pytest.raises(KafkaException):
        _retrying(refused, 10.0)
    assert len(calls) == 1  # not transient: raised at once


def test_watchdog_reports_a_stall_only_past_its_bound() -> None:
    clock = FakeClock()
    dog = Watchdog("stage", 180.0, clock=clock)
    dog.beat("polling")
    clock.now += 179.9
    assert dog.stalled_for() is None
    clock.now += 0.2
    assert dog.stalled_for() == pytest.approx(180.1)
    dog.beat("waiting for Kafka")  # a bounded wait beats
    assert dog.stalled_for() is None


def test_watchdog_thread_names_the_stuck_step(caplog: pytest.LogCaptureFixture) -> None:
    dog = Watchdog("stage", 0.3, exit_process=False)  # a stage on a test's thread: it only logs
    with caplog.at_level(logging.CRITICAL, logger="pipeline.runtime.loop"):
        dog.start()
        dog.beat("awaiting the commit in flight")
        deadline = time.monotonic() + 10
        while not any("no progress" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the watchdog never reported the stall"
            time.sleep(0.05)
        dog.stop()
    message = next(r.getMessage() for r in caplog.records if "no progress" in r.getMessage())
    assert "while awaiting the commit in flight" in message and "still waiting" in message


def test_a_committer_bound_to_a_replaced_producer_commits_nothing() -> None:
    """A committer thread that comes back after its producer was replaced is refused by the code,
    before any call on a producer (the broker fences the old producer as well)."""
    port = _closed_port()
    clients = StageClients(f"127.0.0.1:{port}", "g", None, init_timeout_s=0.5)
    # a transactional producer as StageClients makes it, not initialised (nothing answers on the port)
    clients._producer_conf = {"bootstrap.servers": f"127.0.0.1:{port}", "transactional.id": "t-unit",
                              "metadata.recovery.strategy": "none"}
    clients._txn = _Txn(Producer(clients._producer_conf), 0)
    stale_gen = clients.generation
    with pytest.raises(KafkaIOError):  # no broker: the replacement cannot get ready within 0.5 s
        clients.replace_producer()
    assert clients.generation == stale_gen + 1
    outcome: list[BaseException] = []

    def late_committer() -> None:
        clients.bind_generation(stale_gen)
        try:
            clients.commit({("t", 0): 5})
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=late_committer)
    thread.start()
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], StaleProducer)
    clients.consumer.close()


def test_reconnecting_beats_while_waiting_for_the_database_and_gives_up_in_time() -> None:
    beats: list[float] = []

    def beat() -> None:
        beats.append(time.monotonic())

    postgres.add_wait_listener(beat)
    try:
        db = postgres.Reconnecting(f"postgresql://nobody@127.0.0.1:{_closed_port()}/none", give_up_s=1.2,
                                   statement_timeout_s=5)
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            db.run(lambda conn: conn.execute("SELECT 1"))
        assert time.monotonic() - t0 < 1.2 + 5 + 1  # give_up_s, plus at most one last backoff sleep
        assert len(beats) >= 2
    finally:
        postgres.remove_wait_listener(beat)
