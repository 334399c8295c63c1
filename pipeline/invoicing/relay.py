"""The outbox relay: publishes ledger events from the Postgres ``outbox`` to ``invoice.events``.

Each round takes the oldest unsent rows (in ``seq`` order), publishes them keyed by account with
the idempotent producer, waits until Kafka acknowledged every one, and only then marks them
sent. A crash between publishing and marking publishes those rows again on restart: delivery is
at-least-once, every event carries its unique ``event_id`` and its outbox ``sequence``, and a
consumer that drops event ids it has seen gets each event exactly once, in account order: one
account → one partition, and rows are published in ``seq`` order. Events that depend on each other
(a line and the finalization of its invoice; two lines of one invoice) are written under the same
invoice row lock, so the later one takes its ``seq`` only after the earlier one committed.

Only one relay publishes at a time (each round is one Postgres transaction holding an advisory
lock), so several relay processes can run for availability without reordering anything.

Faults (issue 12), bounds in seconds: a round waits at most ``kafka_call_timeout_s`` (30) for Kafka's
acknowledgements; a round that fails on Kafka is rolled back (its rows stay unsent) and retried after
a backoff (0.5 s doubling to 10 s), and the relay exits non-zero only when no round has succeeded for
``recovery_timeout_s`` (300). Records of a failed round may still reach the topic later, before their
retry: a repeat of an event comes after its first copy, so deduplicating consumers still see account
order. Postgres going away is waited out by ``Reconnecting`` for up to 600 s (statements cancelled
after ``postgres_statement_timeout_s``). A watchdog ends the process (exit 70) when a round makes no
progress for ``watchdog_s`` (180).
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
import threading
import time
from typing import Any

from prometheus_client import Counter, Gauge

from pipeline.codec import Codec
from pipeline.config import Settings
from pipeline.invoicing import lifecycle as lc
from pipeline.runtime import postgres
from pipeline.runtime.health import HealthServer
from pipeline.runtime.kafka import IdempotentProducer, KafkaIOError, backoff
from pipeline.runtime.loop import Watchdog
from pipeline.topology import Topics

log = logging.getLogger(__name__)

RELAY_LOCK = 0x1E5D6E7
PUBLISHED = Counter("pipeline_outbox_published_total", "outbox events published to invoice.events")
BACKLOG = Gauge("pipeline_outbox_backlog", "outbox events not yet published")
OLDEST = Gauge("pipeline_outbox_oldest_unsent_age_seconds",
               "age of the oldest outbox event not yet published (0: none)")
LAST_ROUND = Gauge("pipeline_relay_last_round_timestamp_seconds", "wall-clock time of the relay's last successful "
                   "round (Unix seconds)")


def encode_row(codec: Codec, payload: dict, seq: int) -> bytes:
    """An outbox row (JSON payload, sequence) as the Avro ``InvoiceEvent`` published."""
    return codec.encode(lc.event_from_json(payload, seq))


class Relay:
    """Publishes outbox rows until stopped (SIGTERM/SIGINT finish the current round).

    Raises ``KafkaIOError`` when no round has succeeded for ``recovery_timeout_s`` seconds (the rows
    stay unsent and the process exits non-zero; a restart publishes them again).
    """

    def __init__(self, settings: Settings, codec: Codec) -> None:
        self.settings = settings
        self.codec = codec
        self.topic = Topics(settings).invoice_events
        self._db = postgres.Reconnecting(settings.database_url, give_up_s=600.0)
        self._stop = False
        self._ready = False  # a round succeeded (Postgres and Kafka answered)
        self.watchdog = Watchdog("relay", settings.watchdog_s)

    def stop(self, *_: Any) -> None:
        """Finish the current round and return from ``run``."""
        self._stop = True

    def _waiting_for_postgres(self) -> None:
        self.watchdog.beat("waiting for Postgres")

    def _sleep(self, seconds: float) -> None:
        """Sleep, waking early when stopped."""
        deadline = time.monotonic() + seconds
        while not self._stop and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def run(self) -> None:
        """Publish rounds until stopped; a round failing on Kafka is retried (see the module doc)."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        health = None
        if self.settings.metrics_port:
            health = HealthServer(self.settings.metrics_port, self.settings.metrics_addr, live=self._liveness,
                                  ready=lambda: None if self._ready else "not ready: no successful round yet")
        self.watchdog.exit_process = threading.current_thread() is threading.main_thread()
        self.watchdog.start()
        if self.watchdog.exit_process:  # `kill -USR1 <pid>` prints every thread's stack to stderr (as the stages)
            faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        postgres.add_wait_listener(self._waiting_for_postgres)
        producer = IdempotentProducer(self.settings.kafka_bootstrap, linger_ms=5)
        log.info("relay: started (outbox → %s)", self.topic)
        last_ok = time.monotonic()
        delays = backoff(0.5, 2.0, 10.0)
        try:
            while not self._stop:
                self.watchdog.beat("publishing a round")
                try:
                    n = self.round(producer)
                except KafkaIOError as exc:
                    if time.monotonic() - last_ok > self.settings.recovery_timeout_s:
                        raise KafkaIOError(f"relay: no round succeeded for {self.settings.recovery_timeout_s:.0f} s; "
                                           f"last error: {exc}") from exc
                    if producer.fatal_error is not None:  # the idempotent producer cannot go on: a new one
                        producer = IdempotentProducer(self.settings.kafka_bootstrap, linger_ms=5)
                    delay = next(delays)
                    log.warning("relay: round failed (%s); its rows stay unsent, retrying in %.1f s", exc, delay)
                    self._sleep(delay)
                    continue
                last_ok = time.monotonic()
                self._ready = True
                LAST_ROUND.set(time.time())
                delays = backoff(0.5, 2.0, 10.0)
                if n == 0:
                    self._sleep(self.settings.relay_poll_s)
        finally:
            self._db.close()
            postgres.remove_wait_listener(self._waiting_for_postgres)
            self.watchdog.stop()
            if health is not None:
                health.close()
        log.info("relay: stopped cleanly")

    def _liveness(self) -> str | None:
        stalled = self.watchdog.stalled_for()
        return None if stalled is None else f"no progress for {stalled:.0f} s while {self.watchdog.step}"

    def round(self, producer: IdempotentProducer) -> int:
        """Publish one batch of unsent rows and mark them sent, in one transaction that holds the
        relay lock (another relay's round does nothing meanwhile); returns how many were published."""

        def work(conn: Any) -> int:
            if not conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (RELAY_LOCK,)).fetchone()[0]:
                return 0
            rows = conn.execute(
                "SELECT seq, account, payload FROM outbox WHERE sent_at IS NULL ORDER BY seq LIMIT %s",
                (self.settings.relay_batch,)).fetchall()
            if not rows:
                BACKLOG.set(0)
                OLDEST.set(0)
                return 0
            for seq, account, payload in rows:
                producer.send(self.topic, account.encode(), encode_row(self.codec, payload, seq))
            # every record acknowledged within kafka_call_timeout_s (or KafkaIOError: nothing is marked)
            producer.flush(self.settings.kafka_call_timeout_s)
            conn.execute("UPDATE outbox SET sent_at = now() WHERE seq = ANY(%s)", ([r[0] for r in rows],))
            left, oldest = conn.execute("SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0) "
                                        "FROM outbox WHERE sent_at IS NULL").fetchone()
            BACKLOG.set(left)
            OLDEST.set(float(oldest))
            return len(rows)

        n = self._db.run(work)
        PUBLISHED.inc(n)
        return n
