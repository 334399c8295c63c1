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
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

from prometheus_client import Counter, Gauge, start_http_server

from pipeline.codec import Codec
from pipeline.config import Settings
from pipeline.invoicing import lifecycle as lc
from pipeline.runtime import postgres
from pipeline.runtime.kafka import IdempotentProducer
from pipeline.topology import Topics

log = logging.getLogger(__name__)

RELAY_LOCK = 0x1E5D6E7
PUBLISHED = Counter("pipeline_outbox_published_total", "outbox events published to invoice.events")
BACKLOG = Gauge("pipeline_outbox_backlog", "outbox events not yet published")


def encode_row(codec: Codec, payload: dict, seq: int) -> bytes:
    """An outbox row (JSON payload, sequence) as the Avro ``InvoiceEvent`` published."""
    return codec.encode(lc.event_from_json(payload, seq))


class Relay:
    """Publishes outbox rows until stopped (SIGTERM/SIGINT finish the current round).

    Raises ``KafkaIOError`` when Kafka does not acknowledge a round (the rows stay unsent and the
    process exits non-zero; a restart publishes them again).
    """

    def __init__(self, settings: Settings, codec: Codec) -> None:
        self.settings = settings
        self.codec = codec
        self.topic = Topics(settings).invoice_events
        self._db = postgres.Reconnecting(settings.database_url, give_up_s=600.0)
        self._stop = False

    def stop(self, *_: Any) -> None:
        """Finish the current round and return from ``run``."""
        self._stop = True

    def run(self) -> None:
        """Publish rounds until stopped."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        if self.settings.metrics_port:
            start_http_server(self.settings.metrics_port, addr=self.settings.metrics_addr)
        producer = IdempotentProducer(self.settings.kafka_bootstrap, linger_ms=5)
        log.info("relay: started (outbox → %s)", self.topic)
        try:
            while not self._stop:
                if self.round(producer) == 0:
                    time.sleep(self.settings.relay_poll_s)
        finally:
            self._db.close()
        log.info("relay: stopped cleanly")

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
                return 0
            for seq, account, payload in rows:
                producer.send(self.topic, account.encode(), encode_row(self.codec, payload, seq))
            producer.flush()  # every record acknowledged (or KafkaIOError: nothing is marked)
            conn.execute("UPDATE outbox SET sent_at = now() WHERE seq = ANY(%s)", ([r[0] for r in rows],))
            BACKLOG.set(conn.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL").fetchone()[0])
            return len(rows)

        n = self._db.run(work)
        PUBLISHED.inc(n)
        return n
