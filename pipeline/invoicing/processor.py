"""The invoicing stage: rated delta lines → the append-only Postgres ledger (SPEC §5).

An ``ExternalSink``: the runtime hands it each batch's offsets, and it writes the batch's lines,
their invoices and those offsets in one Postgres transaction; on assignment it tells the runtime
to resume from the offsets stored in Postgres. Kafka's own committed offsets are never used.
"""

from __future__ import annotations

from prometheus_client import Counter

from pipeline.codec import Codec, DecodeError
from pipeline.invoicing.ledger import LedgerStore, PendingLine
from pipeline.records import RatedCharge
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import Context, ProcessorBase

LINES = Counter("pipeline_ledger_lines_total", "ledger lines by outcome", ["outcome"])


class InvoicingProcessor(ProcessorBase):
    """Buffers decoded charges of a batch; ``commit`` appends them with the offsets."""

    def __init__(self, codec: Codec, store: LedgerStore) -> None:
        self.codec = codec
        self.store = store
        self._lines: list[PendingLine] = []
        self._dead: list[tuple] = []

    def process(self, record: Incoming, ctx: Context) -> None:
        try:
            charge = self.codec.decode(record.value or b"", RatedCharge)
        except DecodeError as exc:
            self._dead.append(("invoicing", "UNDECODABLE", str(exc), record.topic, record.partition,
                               record.offset, record.key, record.value))
            return
        self._lines.append(PendingLine(charge, record.topic, record.partition, record.offset))

    # --- ExternalSink --------------------------------------------------------------------------
    def stored_offsets(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        return self.store.stored_offsets(partitions)

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        inserted = self.store.commit(self._lines, self._dead, offsets)
        LINES.labels("appended").inc(inserted)
        LINES.labels("replayed").inc(len(self._lines) - inserted)
        LINES.labels("dead_lettered").inc(len(self._dead))
        self._lines.clear()
        self._dead.clear()

    def discard(self) -> None:
        self._lines.clear()
        self._dead.clear()
