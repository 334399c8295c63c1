"""The invoicing stage: rated delta lines, payments and the Bill API's manual lines and bill closes
(``invoice.adjustments``) → the append-only Postgres ledger (SPEC §5).

An ``ExternalSink``: the runtime hands it each batch's offsets, and it writes the batch's lines,
payments, their outbox events and those offsets in one Postgres transaction; on assignment it
tells the runtime to resume from the offsets stored in Postgres (Kafka's own committed offsets are
never used). The stage also closes invoices: after a commit that advanced the billing clock, and
every ``close_check_s`` seconds, it finalizes every OPEN invoice whose close time has passed. The
clock and the invoices live in Postgres, so closing carries on where it was after a restart.
"""

from __future__ import annotations

import time
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram

from pipeline.codec import Codec, DecodeError
from pipeline.invoicing.bills import PendingAdjustment
from pipeline.invoicing.ledger import LedgerStore, PendingLine, PendingPayment
from pipeline.records import InvoiceAdjustment, Payment, RatedCharge
from pipeline.runtime import timing
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import Context, ProcessorBase

T = TypeVar("T")

LINES = Counter("pipeline_ledger_lines_total", "ledger lines by outcome", ["outcome"])
PAYMENTS = Counter("pipeline_ledger_payments_total", "payments by outcome", ["outcome"])
FINALIZED = Counter("pipeline_invoices_finalized_total", "invoices finalized")
MANUAL = Counter("pipeline_ledger_manual_lines_total", "Bill API records (invoice.adjustments) by outcome", ["outcome"])
INVOICES = Gauge("pipeline_invoices", "invoices in the ledger by status (OPEN, REVIEW, FINALIZED)", ["status"])
OVERDUE = Gauge("pipeline_invoices_overdue", "OPEN invoices whose close time passed more than an hour ago (wall "
                "clock): finalization may be stuck")
_LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
READING_TO_LEDGER = Histogram(
    "pipeline_reading_to_ledger_seconds", "from a reading's arrival at the gateway to the commit of the ledger line it "
    "caused (earliest reading of the line's causes; runtime.timing)", buckets=_LATENCY_BUCKETS)
WINDOW_CLOSE_TO_LEDGER = Histogram(
    "pipeline_window_close_to_ledger_seconds", "from the emission of a window revision to the commit of the ledger "
    "line it caused", buckets=_LATENCY_BUCKETS)


class InvoicingProcessor(ProcessorBase):
    """Buffers a batch's decoded charges and payments; ``commit`` appends them with the offsets.

    Args:
        codec: decodes ``RatedCharge`` (topic ``charges.rated``) and ``Payment`` (``payments_topic``).
        store: the ledger.
        payments_topic: full name of the payments topic.
        adjustments_topic: full name of the Bill API's ``invoice.adjustments`` topic (``InvoiceAdjustment``:
            manual lines and bill closes, ``pipeline.invoicing.bills``); ``None``: not read.
        close_check_s: how often (seconds) to look for invoices to finalize when nothing else
            triggers it.
    """

    def __init__(self, codec: Codec, store: LedgerStore, payments_topic: str = "payments",
                 close_check_s: float = 5.0, adjustments_topic: str | None = None) -> None:
        self.codec = codec
        self.store = store
        self.payments_topic = payments_topic
        self.close_check_s = close_check_s
        self.adjustments_topic = adjustments_topic
        self._adjustments: list[PendingAdjustment] = []
        self._lines: list[PendingLine] = []
        self._payments: list[PendingPayment] = []
        self._dead: list[tuple] = []
        self._times: dict[str, tuple[int | None, int | None]] = {}  # line id → (arrived, window closed) ms
        self._last_close = 0.0

    def process(self, record: Incoming, ctx: Context) -> None:
        if record.topic == self.payments_topic:
            self._process_payment(record, ctx)
            return
        if record.topic == self.adjustments_topic:
            self._process_adjustment(record, ctx)
            return
        try:
            charge = self.codec.decode(record.value or b"", RatedCharge)
        except DecodeError as exc:
            self._dead_letter(record, "UNDECODABLE", str(exc), ctx)
            return
        self._lines.append(PendingLine(charge, record.topic, record.partition, record.offset))
        if record.headers:
            self._times[charge.line_id] = (timing.read_ms(record.headers, timing.ARRIVED),
                                           timing.read_ms(record.headers, timing.CLOSED))

    def _process_payment(self, record: Incoming, ctx: Context) -> None:
        payment = self._decode(record, Payment, "INVALID_PAYMENT", PAYMENTS, ctx)
        if payment is not None:
            self._payments.append(PendingPayment(payment, record.topic, record.partition, record.offset))

    def _process_adjustment(self, record: Incoming, ctx: Context) -> None:
        adj = self._decode(record, InvoiceAdjustment, "INVALID_ADJUSTMENT", MANUAL, ctx)
        if adj is not None:
            self._adjustments.append(PendingAdjustment(adj, record.topic, record.partition, record.offset))

    def _decode(self, record: Incoming, cls: type[T], invalid_reason: str, outcomes: Counter, ctx: Context) -> T | None:
        """``record`` as a ``cls``, or ``None`` after dead-lettering it: ``invalid_reason`` when it decodes but
        breaks a rule of ``cls``, ``UNDECODABLE`` otherwise (counted on ``outcomes`` as ``dead_lettered``)."""
        try:
            return self.codec.decode(record.value or b"", cls)
        except DecodeError as exc:
            reason = invalid_reason if str(exc).startswith(f"invalid {cls.__name__}") else "UNDECODABLE"
            self._dead_letter(record, reason, str(exc), ctx)
            outcomes.labels("dead_lettered").inc()
            return None

    def _dead_letter(self, record: Incoming, reason: str, message: str, ctx: Context) -> None:
        ctx.count("dead_letter", reason)
        self._dead.append(("invoicing", reason, message, record.topic, record.partition, record.offset,
                           record.key, record.value))

    def punctuate(self, wallclock_ms: int, ctx: Context) -> None:
        if time.monotonic() - self._last_close >= self.close_check_s:
            self._close()

    def _close(self) -> None:
        self._last_close = time.monotonic()
        FINALIZED.inc(len(self.store.finalize_due()))
        counts = self.store.invoice_counts()
        for status in ("OPEN", "REVIEW", "FINALIZED"):
            INVOICES.labels(status).set(counts.get(status, 0))
        OVERDUE.set(counts["OVERDUE"])

    # --- ExternalSink --------------------------------------------------------------------------
    def stored_offsets(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        return self.store.stored_offsets(partitions)

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        result = self.store.commit(self._lines, self._dead, offsets, self._payments, self._adjustments)
        MANUAL.labels("appended").inc(result.manual)
        MANUAL.labels("bill_closed").inc(len(result.bills_closed))
        FINALIZED.inc(len(result.bills_closed))
        LINES.labels("appended").inc(result.lines - result.adjustments)
        LINES.labels("adjustment").inc(result.adjustments)
        LINES.labels("replayed").inc(len(self._lines) - result.lines)
        LINES.labels("dead_lettered").inc(len(self._dead))
        PAYMENTS.labels("recorded").inc(result.payments)
        PAYMENTS.labels("replayed").inc(len(self._payments) - result.payments)
        now_ms = time.time() * 1000
        for line_id in result.appended:  # lines replayed (known ids) reached the ledger before: not observed
            arrived, closed = self._times.get(line_id, (None, None))
            if arrived is not None:
                READING_TO_LEDGER.observe(max(0.0, now_ms - arrived) / 1000)
            if closed is not None:
                WINDOW_CLOSE_TO_LEDGER.observe(max(0.0, now_ms - closed) / 1000)
        self.discard()
        if result.clock_advanced:
            self._close()

    def discard(self) -> None:
        self._lines.clear()
        self._payments.clear()
        self._adjustments.clear()
        self._dead.clear()
        self._times.clear()
