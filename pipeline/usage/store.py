"""Postgres side of the usage read model: snapshot upserts (written by the ``usage`` stage) and budgets.

Why Postgres rather than a compacted ``usage.snapshots`` topic: portals ask "this account, this period" at
random; a primary-key lookup answers that directly, while a compacted topic needs a reader that consumes it
whole (or a second store anyway). The write is idempotent and ordered without a second transaction: each
snapshot carries ``seq``, which increases per (account, period) in the stage's Kafka-transactional state, and
the upsert only replaces a row whose ``seq`` is not newer (``<=``: a batch redone after an aborted Kafka
transaction rewrites the same ``seq``, recomputed from the same state). A replayed older snapshot never
overwrites a newer one. SQL lives here; connections come from ``pipeline.runtime.postgres``.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from pipeline.runtime import postgres
from pipeline.usage.model import MetricSnapshot

UPSERT = """
INSERT INTO usage_snapshots (account, metric, period_start, period_end, seq, as_of_day, currency, usage_kwh,
                             cost, snapshot, updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())
ON CONFLICT (account, metric, period_start) DO UPDATE SET
    period_end = EXCLUDED.period_end, seq = EXCLUDED.seq, as_of_day = EXCLUDED.as_of_day,
    currency = EXCLUDED.currency, usage_kwh = EXCLUDED.usage_kwh, cost = EXCLUDED.cost,
    snapshot = EXCLUDED.snapshot, updated_at = now()
WHERE usage_snapshots.seq <= EXCLUDED.seq
"""


def upsert_snapshots(conn: Any, rows: list[tuple[int, MetricSnapshot]]) -> int:
    """Upsert ``(seq, snapshot)`` rows (guarded by ``seq``, module docstring); returns the rows written."""
    written = 0
    for seq, s in rows:
        cur = conn.execute(UPSERT, (s.account, s.metric, s.period_start, s.period_end, seq, s.as_of_day,
                                    s.currency, s.usage_kwh, s.cost, postgres.jsonb(s.to_json())))
        written += cur.rowcount
    return written


def snapshot_writer(url: str) -> Callable[[list[tuple[int, MetricSnapshot]]], None]:
    """A writer for the stage: one Postgres transaction per call, reconnecting while the database is away
    (``postgres.Reconnecting``: bounded retries, statement timeout)."""
    db = postgres.Reconnecting(url)

    def write(rows: list[tuple[int, MetricSnapshot]]) -> None:
        if rows:
            db.run(lambda conn: upsert_snapshots(conn, rows))

    return write


def set_budget(conn: Any, account: str, amount: Decimal, currency: str) -> None:
    """Set (or replace) the budget of ``account``: ``amount`` > 0 currency units per billing period."""
    if amount <= 0:
        raise ValueError(f"budget must be > 0, got {amount}")
    conn.execute("INSERT INTO usage_budgets (account, amount, currency) VALUES (%s, %s, %s) "
                 "ON CONFLICT (account) DO UPDATE SET amount = EXCLUDED.amount, currency = EXCLUDED.currency, "
                 "updated_at = now()", (account, amount, currency))


def read_budgets(conn: Any) -> dict[str, tuple[Decimal, str]]:
    """account → (amount per billing period, currency)."""
    return {a: (amount, cur) for a, amount, cur in
            conn.execute("SELECT account, amount, currency FROM usage_budgets ORDER BY account").fetchall()}


def budget_loader(url: str) -> Callable[[], dict[str, tuple[Decimal, str]]]:
    """``read_budgets`` on a fresh connection (for ``refstore.ReferenceCache``-style caching by the caller)."""
    return lambda: postgres.with_reconnect(url, read_budgets, give_up_s=60)
