"""The invoice ledger: rated delta lines → append-only invoice lines in Postgres (SPEC §5).

Pure part: ``invoice_id_of`` and ``line_row``. I/O part: ``LedgerStore`` writes a batch of lines,
their invoices and the consumed offsets in ONE Postgres transaction (the exactly-once sink);
line ids are unique, so a re-delivered record inserts nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.records import RatedCharge
from pipeline.runtime import postgres

log = logging.getLogger(__name__)


def invoice_id_of(account: str, period_start: Any, currency: str) -> str:
    """One invoice per (account, billing period, currency): ``account|period start|currency``."""
    return f"{account}|{period_start}|{currency}"


@dataclass(frozen=True, slots=True)
class PendingLine:
    """A rated charge with where it was read (for the ledger's source columns)."""

    charge: RatedCharge
    topic: str
    partition: int
    offset: int


def line_row(p: PendingLine) -> tuple[Any, ...]:
    """The ``invoice_lines`` row of a pending line (column order of ``INSERT_LINE``)."""
    c = p.charge
    return (
        c.line_id, invoice_id_of(c.account, c.period_start, c.currency), c.account, c.period_start,
        c.period_end, c.currency, c.component_id, c.component_kind, c.band, c.quantity, c.unit, c.rate,
        c.amount, c.period_total, c.price_book_id, c.price_book_version, c.cause, c.explanation,
        p.topic, p.partition, p.offset,
    )


INSERT_INVOICE = """
INSERT INTO invoices (invoice_id, account, period_start, period_end, currency)
VALUES (%s, %s, %s, %s, %s) ON CONFLICT (invoice_id) DO NOTHING"""
INSERT_LINE = """
INSERT INTO invoice_lines (line_id, invoice_id, account, period_start, period_end, currency, component_id,
  component_kind, band, quantity, unit, rate, amount, period_total, price_book_id, price_book_version, cause,
  explanation, source_topic, source_partition, source_offset)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s)
ON CONFLICT (line_id) DO NOTHING"""
UPSERT_OFFSET = """
INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset) VALUES (%s, %s, %s, %s)
ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset"""
INSERT_DEAD = """
INSERT INTO dead_letters (stage, reason, message, topic, partition, "offset", key, value)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (topic, partition, "offset") DO NOTHING"""


class LedgerStore:
    """Postgres side of the invoicing sink, with one long-lived connection that is re-opened
    (after waiting) whenever the server goes away."""

    def __init__(self, url: str, group: str, give_up_s: float = 600.0) -> None:
        self.group = group
        self._db = postgres.Reconnecting(url, give_up_s)
        self._run = self._db.run

    def stored_offsets(self, tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Next offsets to read per (topic, partition) as committed with the lines."""

        def work(conn: Any) -> dict[tuple[str, int], int]:
            rows = conn.execute(
                "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = %s",
                (self.group,),
            ).fetchall()
            wanted = set(tps)
            return {(t, p): o for t, p, o in rows if (t, p) in wanted}

        return self._run(work)

    def commit(
        self, lines: list[PendingLine], dead: list[tuple[Any, ...]], offsets: dict[tuple[str, int], int]
    ) -> int:
        """Append ``lines`` (and their invoices), record ``dead`` letters and store ``offsets``,
        all in one transaction. Returns the number of lines actually inserted (new ids)."""

        def work(conn: Any) -> int:
            inserted = 0
            with conn.cursor() as cur:
                invoices = {
                    invoice_id_of(p.charge.account, p.charge.period_start, p.charge.currency): (
                        p.charge.account, p.charge.period_start, p.charge.period_end, p.charge.currency)
                    for p in lines
                }
                if invoices:
                    cur.executemany(INSERT_INVOICE, [(k, *v) for k, v in sorted(invoices.items())])
                if lines:  # one round trip for the batch (pipeline mode); RETURNING tells new from replayed
                    cur.executemany(INSERT_LINE + " RETURNING 1", [line_row(p) for p in lines], returning=True)
                    while True:
                        inserted += len(cur.fetchall())
                        if not cur.nextset():
                            break
                if dead:
                    cur.executemany(INSERT_DEAD, dead)
                cur.executemany(UPSERT_OFFSET, [(self.group, t, p, o) for (t, p), o in sorted(offsets.items())])
            return inserted

        return self._run(work)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()
