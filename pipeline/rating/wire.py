"""Rating's hot-path codecs (issue 13): the window revisions it reads and the charge lines it writes, without
the generic dataclass conversions of ``pipeline.codec`` (same bytes, same values).

- ``decode_window``: a ``usage.windows`` record as a ``Window`` (the attributes of ``records.UsageWindow``;
  its datetimes built only when asked for), from ``Codec.decode_plain``: the same writer-version resolution
  and the same ``DecodeError`` on unreadable bytes as ``Codec.decode(data, UsageWindow)``.
- ``encode_charge``: a ``RatedCharge`` as ``Codec.encode`` writes it (byte-identical; tested).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pipeline.codec import Codec, DecodeError
from pipeline.records import RatedCharge

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_SCALE = Decimal("0.000001")


def _ms_datetime(ms: int) -> datetime:
    """Epoch milliseconds → aware UTC datetime (as fastavro reads ``timestamp-millis``)."""
    return _EPOCH + timedelta(microseconds=ms * 1000)


def _decimal(raw: bytes) -> Decimal:
    """An Avro ``decimal`` (bytes, scale 6) from its unscaled big-endian two's-complement bytes."""
    return Decimal(int.from_bytes(raw, "big", signed=True)).scaleb(-6)


class Window:
    """One window revision as rating reads it: the attributes of ``records.UsageWindow`` (UTC datetimes
    computed on access from the epoch-ms fields ``window_start_ms``, ``window_end_ms``, ``watermark_ms``)."""

    __slots__ = (
        "account",
        "count",
        "delta",
        "metric",
        "qualities",
        "revision",
        "series",
        "sources",
        "timing",
        "unit",
        "value",
        "watermark_ms",
        "window_end_ms",
        "window_id",
        "window_start_ms",
    )

    def __init__(self, d: dict[str, Any]) -> None:
        self.window_id: str = d["window_id"]
        self.account: str = d["account"]
        self.series: str = d["series"]
        self.metric: str = d["metric"]
        self.unit: str = d["unit"]
        self.window_start_ms: int = d["window_start"]
        self.window_end_ms: int = d["window_end"]
        self.revision: int = d["revision"]
        self.timing: str = d["timing"]
        self.value: Decimal = _decimal(d["value"])
        self.delta: Decimal = _decimal(d["delta"])
        self.count: int = d["count"]
        self.qualities: tuple[str, ...] = tuple(d["qualities"])
        self.sources: tuple[str, ...] = tuple(d["sources"])
        self.watermark_ms: int = d["watermark"]

    @property
    def window_start(self) -> datetime:
        return _ms_datetime(self.window_start_ms)

    @property
    def window_end(self) -> datetime:
        return _ms_datetime(self.window_end_ms)

    @property
    def watermark(self) -> datetime:
        return _ms_datetime(self.watermark_ms)


def decode_window(codec: Codec, data: bytes) -> Window:
    """Decode a ``UsageWindow`` record. Raises ``DecodeError`` as ``Codec.decode`` does: unreadable bytes, a
    negative revision, a timestamp outside years 1–9999."""
    d = codec.decode_plain(data, "UsageWindow")
    if d["revision"] < 0:
        raise DecodeError("invalid UsageWindow: revision must be >= 0")
    for name in ("window_start", "window_end", "watermark"):
        if not _MIN_MS <= d[name] <= _MAX_MS:
            raise DecodeError(f"invalid UsageWindow: {name} {d[name]} ms is outside years 1-9999")
    return Window(d)


def _exact(value: Decimal) -> Decimal:
    """``value`` at 6 decimal places; ``ValueError`` when that loses digits (``pipeline.codec``'s rule)."""
    q = value.quantize(_SCALE)
    if q != value:
        raise ValueError(f"decimal {value} has more than 6 decimal places")
    return q


def decimal_bytes(value: Decimal) -> bytes:
    """An Avro ``decimal`` (precision 28, scale 6) in its base form, the unscaled big-endian two's-complement
    bytes, exactly as fastavro writes a ``Decimal`` (for ``Codec.encode_plain``). ``ValueError`` as fastavro:
    more than 28 digits, or more than 6 decimal places."""
    _sign, digits, exponent = value.as_tuple()
    if len(digits) > 28:
        raise ValueError("The decimal precision is bigger than allowed by schema")
    if not isinstance(exponent, int) or exponent < -6:
        raise ValueError("Scale provided in schema does not match the decimal")
    n = int(value.scaleb(6))
    return n.to_bytes(((-n if n < 0 else n).bit_length() + 8) // 8, "big", signed=True)


def encode_charge(codec: Codec, c: RatedCharge) -> bytes:
    """``codec.encode(c)`` without the generic dataclass walk: the same bytes."""
    return codec.encode({
        "line_id": c.line_id, "account": c.account, "period_start": c.period_start, "period_end": c.period_end,
        "currency": c.currency, "component_id": c.component_id, "component_kind": c.component_kind, "band": c.band,
        "quantity": _exact(c.quantity), "unit": c.unit, "rate": _exact(c.rate), "amount": _exact(c.amount),
        "period_total": _exact(c.period_total), "price_book_id": c.price_book_id,
        "price_book_version": c.price_book_version, "cause": c.cause, "explanation": c.explanation,
        "watermark": c.watermark,
    }, "RatedCharge")
