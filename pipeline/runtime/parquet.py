"""Parquet files: the only module that imports ``pyarrow``.

Column kinds (``pipeline.operations.export``) map to Arrow types: text and json → ``string``, int →
``int64``, decimal → ``decimal128(28, 6)`` (the ledger's ``numeric(28, 6)``: exact, never float),
date → ``date32``, timestamp → ``timestamp[us, UTC]``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_TYPES = {
    "text": pa.string(), "json": pa.string(), "int": pa.int64(), "decimal": pa.decimal128(28, 6),
    "date": pa.date32(), "timestamp": pa.timestamp("us", tz="UTC"),
}


def _cell(kind: str, value: Any) -> Any:
    if value is not None and kind == "json":
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return value


def parquet_bytes(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> bytes:
    """One Parquet file (snappy) of ``rows`` (tuples in ``columns`` order; ``None`` = null).

    Raises ``KeyError`` for an unknown column kind and ``pyarrow.ArrowInvalid`` (a ``ValueError``) when a
    value does not fit its type (e.g. a decimal with more than 6 places)."""
    arrays = [pa.array([_cell(kind, row[i]) for row in rows], type=_TYPES[kind])
              for i, (_, kind) in enumerate(columns)]
    table = pa.Table.from_arrays(arrays, schema=pa.schema([pa.field(n, _TYPES[k]) for n, k in columns]))
    out = io.BytesIO()
    pq.write_table(table, out, compression="snappy")
    return out.getvalue()


def read_parquet(data: bytes) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows (Python values: ``Decimal``, ``date``, aware ``datetime``) of a Parquet file."""
    table = pq.read_table(io.BytesIO(data))
    columns = table.to_pydict()
    names = list(table.column_names)
    return names, list(zip(*(columns[n] for n in names), strict=True)) if names else []
