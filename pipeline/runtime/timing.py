"""When a reading arrived and when its window closed, carried in Kafka headers down to the ledger (pure).

The gateways stamp nothing themselves: a record's Kafka timestamp (CreateTime, set by the gateway's
producer when it publishes the reading) is its arrival time. Ingest copies it into the header
``pipeline-arrived-ms`` of the usage event it forwards; windowing gives each window revision the
earliest arrival among the events folded into it since its previous revision (kept in memory only: a
revision emitted right after a restart carries none) and stamps ``pipeline-window-closed-ms`` when it
emits it; rating gives each charge line the earliest of each header among the revisions that caused it;
invoicing observes ``pipeline_reading_to_ledger_seconds`` and ``pipeline_window_close_to_ledger_seconds``
for every line it appends, once the ledger transaction committed. Times are epoch milliseconds (UTC).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

ARRIVED = "pipeline-arrived-ms"
CLOSED = "pipeline-window-closed-ms"

Headers = list[tuple[str, bytes]]


def read_ms(headers: Iterable[tuple[str, bytes]], name: str) -> int | None:
    """The epoch-ms value of header ``name``, or ``None`` when absent or not an integer."""
    for key, value in headers:
        if key == name:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def arrival_ms(record: Any) -> int:
    """When ``record`` (an ``Incoming``) entered the pipeline: its ``pipeline-arrived-ms`` header, else its
    Kafka timestamp (the gateway's publication time)."""
    arrived = read_ms(record.headers, ARRIVED)
    return record.timestamp_ms if arrived is None else arrived


def earliest(a: int | None, b: int | None) -> int | None:
    """The earlier of two optional times."""
    if a is None:
        return b
    if b is None:
        return a
    return a if a <= b else b


def headers(arrived_ms: int | None, closed_ms: int | None = None) -> Headers | None:
    """The headers carrying these times (``None`` when there is none to carry)."""
    out = []
    if arrived_ms is not None:
        out.append((ARRIVED, b"%d" % arrived_ms))
    if closed_ms is not None:
        out.append((CLOSED, b"%d" % closed_ms))
    return out or None
