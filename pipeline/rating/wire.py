"""Rating's hot-path codecs (issue 13): the window revisions it reads and the charge lines it writes, without
the generic dataclass conversions of ``pipeline.codec`` (same bytes, same values).

- ``decode_window``: a ``usage.windows`` record as a ``Window`` (the attributes of ``records.UsageWindow``;
  its datetimes built only when asked for), from ``Codec.decode_plain``: the same writer-version resolution
  and the same ``DecodeError`` on unreadable bytes as ``Codec.decode(data, UsageWindow)``.
- ``encode_charge``: a ``RatedCharge`` as ``Codec.encode`` writes it (byte-identical; tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

from pipeline import avrowire as aw
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


_WINDOW_SHAPE = [
    ("window_id", "string"), ("account", "string"), ("series", "string"), ("metric", "string"), ("unit", "string"),
    ("window_start", "long"), ("window_end", "long"), ("revision", "int"), ("timing", ("enum", ("ON_TIME", "LATE"))),
    ("value", "bytes"), ("delta", "bytes"), ("count", "int"), ("qualities", ("array", "string")),
    ("sources", ("array", "string")), ("watermark", "long"),
]
_HEADERS: dict[int, tuple[Codec, bytes | None]] = {}
_DECIMALS: dict[bytes, Decimal] = {}  # unscaled bytes → Decimal, remembered (values repeat: 0.1 kWh steps)
_TIMING = ("ON_TIME", "LATE")
_BOUNDS: dict[bytes, tuple[int, int, int]] = {}  # 20 bytes at the window bounds → (start ms, end ms, their length)
_WATERMARKS: dict[bytes, int] = {}  # a record's last bytes (its watermark) → the watermark, ms
_ONE_STRING: dict[bytes, tuple[str]] = {}  # a one-string array's bytes → its strings
_NAMES: dict[bytes, tuple[str, str, str, str]] = {}  # the bytes of account, series, metric, unit → the four strings
_read_long = aw.read_long
_s = aw.string_bytes_seen
_size_bytes = aw.size_bytes
_remember = aw.remember
_new_window = object.__new__


def _window_header(codec: Codec) -> bytes | None:
    """The single-object header of the current ``UsageWindow`` schema when it is the one ``_read_window`` reads
    (``_WINDOW_SHAPE``), else ``None`` (every record goes through the codec)."""
    found = _HEADERS.get(id(codec))
    if found is None or found[0] is not codec:
        same = aw.shape(codec.schema("UsageWindow")["fields"]) == _WINDOW_SHAPE
        found = _HEADERS[id(codec)] = (codec, codec.header("UsageWindow") if same else None)
    return found[1]


def _short_decimal(raw: bytes) -> Decimal:
    d = _DECIMALS.get(raw)
    if d is None:
        d = _remember(_DECIMALS, raw, _decimal(raw))
    return d


def _read_window(data: bytes) -> Window:
    """The ``Window`` of a current-schema ``UsageWindow`` (``_WINDOW_SHAPE``; Avro 1.11 binary encoding) after its
    10-byte header, read by hand. Strings and decimals shorter than 64 bytes only (a one-byte length); anything
    else, a truncated body, bytes left over, a negative revision or a timestamp outside years 1–9999 raise
    ``ValueError``, ``IndexError``, ``OverflowError`` or ``UnicodeDecodeError`` (the caller then asks the codec,
    which gives the value or the ``DecodeError``). Positions only grow, so one check at the end (``p ==
    len(data)``) catches every overrun of a slice. What repeats across windows is remembered by its bytes, only
    once it was read and checked: the account, series, metric and unit (one span), the bounds, the watermark."""
    w = _new_window(Window)
    n = data[10]
    if n > 0x7F or n & 1:
        raise ValueError("long or negative length")
    p = 11 + (n >> 1)
    w.window_id = data[11:p].decode()
    # account, series, metric, unit: four one-byte lengths and their texts, the same span for every window of a series
    a = data[p]
    q = p + 1 + (a >> 1)
    b = data[q]
    q += 1 + (b >> 1)
    c = data[q]
    q += 1 + (c >> 1)
    d = data[q]
    q += 1 + (d >> 1)
    if (a | b | c | d) & 0x81:
        raise ValueError("long or negative length")
    span = data[p:q]
    names = _NAMES.get(span)
    if names is None:
        if q > len(data):
            raise ValueError("truncated")
        names = []
        i = 0
        for _ in range(4):
            j = i + 1 + (span[i] >> 1)
            names.append(span[i + 1:j].decode())
            i = j
        names = _remember(_NAMES, span, tuple(names))
    w.account, w.series, w.metric, w.unit = names
    p = q
    bounds = data[p:p + 20]  # a window's bounds repeat across accounts: their reading is remembered by their bytes
    seen = _BOUNDS.get(bounds)
    if seen is None:
        start, q = _read_long(data, p)
        end, q = _read_long(data, q)
        if not (_MIN_MS <= start <= _MAX_MS and _MIN_MS <= end <= _MAX_MS):
            raise ValueError("a bound outside years 1-9999")
        seen = (start, end, q - p)
        if q - p <= len(bounds):  # both ended inside the 20 bytes: the same bytes always read this way
            _remember(_BOUNDS, bounds, seen)
    w.window_start_ms, w.window_end_ms = seen[0], seen[1]
    p += seen[2]
    n = data[p]
    if n < 0x80:  # a one-byte varint: a revision below 64 (the zig-zag of a negative one is odd)
        if n & 1:
            raise ValueError("negative revision")
        w.revision = n >> 1
        p += 1
    else:
        w.revision, p = _read_long(data, p)
        if w.revision < 0:
            raise ValueError("negative revision")
    n = data[p]
    if n != 0 and n != 2:  # the zig-zag of index 0 or 1; anything else: the codec decides
        raise ValueError("not a Timing symbol")
    w.timing = _TIMING[n >> 1]
    n = data[p + 1]
    if n > 0x7F or n & 1:
        raise ValueError("long or negative length")
    q = p + 2 + (n >> 1)
    raw = data[p + 2:q]
    v = _DECIMALS.get(raw)
    w.value = _short_decimal(raw) if v is None else v
    n = data[q]
    if n > 0x7F or n & 1:
        raise ValueError("long or negative length")
    p = q + 1 + (n >> 1)
    raw = data[q + 1:p]
    v = _DECIMALS.get(raw)
    w.delta = _short_decimal(raw) if v is None else v
    n = data[p]
    if n < 0x80:  # a one-byte varint: a count from -64 to 63
        w.count = (n >> 1) ^ -(n & 1)
        p += 1
    else:
        w.count, p = _read_long(data, p)
    w.qualities, p = _strings(data, p)
    w.sources, p = _strings(data, p)
    tail = data[p:]  # the watermark, the last field: it repeats across accounts (remembered by its bytes)
    wm = _WATERMARKS.get(tail)
    if wm is None:
        wm, q = _read_long(data, p)
        if q != len(data):
            raise ValueError("truncated, or bytes left over")
        if not _MIN_MS <= wm <= _MAX_MS:
            raise ValueError("a watermark outside years 1-9999")
        _remember(_WATERMARKS, tail, wm)
    w.watermark_ms = wm
    return w


def _strings(data: bytes, p: int) -> tuple[tuple[str, ...], int]:
    """An Avro array of strings at ``data[p]`` (blocks until a 0 count) and the position after it; a one-item
    array of a short string (a window's usual quality flag or source) is remembered by its bytes. Errors as
    ``_read_window``."""
    n = data[p]
    if n == 2:  # one item
        size = data[p + 1]
        if size < 0x80 and not size & 1:
            q = p + 2 + (size >> 1)
            raw = data[p:q + 1]  # count, size, text, and the closing 0 count
            found = _ONE_STRING.get(raw)
            if found is not None:
                return found, q + 1
            if data[q] == 0:
                found = (data[p + 2:q].decode(),)
                if q + 1 <= len(data):
                    _remember(_ONE_STRING, raw, found)
                return found, q + 1
    items: list[str] = []
    n, p = _read_long(data, p)
    while n:
        if n < 0:
            raise ValueError("negative array block count")
        for _ in range(n):
            size, p = _read_long(data, p)
            if size < 0:
                raise ValueError("negative length")
            q = p + size
            items.append(data[p:q].decode())
            p = q
        n, p = _read_long(data, p)
    return tuple(items), p


def decode_window(codec: Codec, data: bytes) -> Window:
    """Decode a ``UsageWindow`` record. Raises ``DecodeError`` as ``Codec.decode`` does: unreadable bytes, a
    negative revision, a timestamp outside years 1–9999.

    A record of the current schema is read by hand (``_read_window``: the same values as fastavro, tested); any
    other writer schema, and anything the hand reader does not read exactly, goes through ``Codec.decode_plain``."""
    return window_reader(codec)(data)


def window_reader(codec: Codec) -> Callable[[bytes], Window]:
    """``decode_window`` with ``codec`` bound (its schema header looked up once: a batch's reader)."""
    header = _window_header(codec)

    def read(data: bytes) -> Window:
        if header is not None and type(data) is bytes and data[:10] == header:
            try:
                return _read_window(data)
            except (IndexError, OverflowError, UnicodeDecodeError, ValueError):
                pass
        return _checked(codec.decode_plain(data, "UsageWindow"))

    return read


def _checked(d: dict[str, Any]) -> Window:
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
    """``codec.encode(c)``: the same bytes, written by hand (``pipeline.avrowire``) when the current ``RatedCharge``
    schema is the one it knows (``_CHARGE_SHAPE``) and ``c`` holds what it writes exactly (strings, dates, decimals
    of at most 6 places and 28 digits, a 32-bit version, a time-zone-aware watermark or none); anything else goes
    through the codec, which gives the bytes or the error (``ValueError`` for a decimal of more than 6 places)."""
    header = _charge_header(codec)
    if header is not None:
        try:
            return _write_charge(header, c)
        except (TypeError, ValueError, OverflowError, AttributeError, ArithmeticError):
            pass  # the codec decides
    return codec.encode({
        "line_id": c.line_id, "account": c.account, "period_start": c.period_start, "period_end": c.period_end,
        "currency": c.currency, "component_id": c.component_id, "component_kind": c.component_kind, "band": c.band,
        "quantity": _exact(c.quantity), "unit": c.unit, "rate": _exact(c.rate), "amount": _exact(c.amount),
        "period_total": _exact(c.period_total), "price_book_id": c.price_book_id,
        "price_book_version": c.price_book_version, "cause": c.cause, "explanation": c.explanation,
        "watermark": c.watermark,
    }, "RatedCharge")


_CHARGE_SHAPE = [
    ("line_id", "string"), ("account", "string"), ("period_start", "int"), ("period_end", "int"),
    ("currency", "string"), ("component_id", "string"), ("component_kind", "string"), ("band", "string"),
    ("quantity", "bytes"), ("unit", "string"), ("rate", "bytes"), ("amount", "bytes"), ("period_total", "bytes"),
    ("price_book_id", "string"), ("price_book_version", "int"), ("cause", "string"), ("explanation", "string"),
    ("watermark", ["null", {"logicalType": "timestamp-millis", "type": "long"}]),
]


@lru_cache(maxsize=8)
def _charge_header(codec: Codec) -> bytes | None:
    """The ``RatedCharge`` single-object header when ``_write_charge`` writes the codec's current schema, else
    ``None``."""
    return codec.header("RatedCharge") if aw.shape(codec.schema("RatedCharge")["fields"]) == _CHARGE_SHAPE else None


def _write_charge(header: bytes, c: RatedCharge) -> bytes:
    """The bytes of ``c`` after ``header`` (``TypeError``, ``ValueError``, ``OverflowError`` on what it does not write
    exactly). Decimals at 6 places as ``Codec.encode`` gives them to fastavro (``_exact``); the watermark in epoch ms
    as fastavro computes it for an aware ``datetime`` (whole days, seconds, then milliseconds of the difference)."""
    wm = c.watermark
    if wm is None:
        watermark = b"\x00"
    else:
        if type(wm) is not datetime or wm.tzinfo is None:
            raise TypeError(type(wm))
        delta = wm - _EPOCH
        watermark = b"\x02" + aw.long_bytes((delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000)
    return b"".join((
        header, aw.string_bytes(c.line_id), _s(c.account), aw.long_bytes_seen(_day_number(c.period_start)),
        aw.long_bytes_seen(_day_number(c.period_end)), _s(c.currency), _s(c.component_id), _s(c.component_kind),
        _s(c.band), _decimal_field(c.quantity), _s(c.unit), _decimal_field(c.rate), _decimal_field(c.amount),
        _decimal_field(c.period_total), _s(c.price_book_id), _int_bytes(c.price_book_version),
        aw.string_bytes(c.cause), aw.string_bytes(c.explanation), watermark,
    ))


def _decimal_field(value: Decimal) -> bytes:
    """An Avro ``decimal`` (precision 28, scale 6) field: ``value`` at 6 places (``_exact``), as fastavro writes it."""
    if type(value) is not Decimal:
        raise TypeError(type(value))
    return aw.bytes_bytes(decimal_bytes(_exact(value)))


_RW_SHAPE = [
    ("revision", "int"), ("value", "bytes"), ("period_key", "string"), ("keys", ("array", "string")),
    ("demand_keys", ("array", "string")), ("window_start_ms", "long"), ("kw", "string"), ("metric", "string"),
    ("window_end_ms", "long"), ("qualities", ("array", "string")),
]
_INT32 = 1 << 31
_MEMO_MAX = 100_000
_LISTED_MEMO_MAX = 16_384  # pending periods whose listed ids' bytes are remembered (≤ 48 ids, ~1 kB each)


class WindowStateWriter:
    """``RatedWindowState`` (rating's ``rw|`` state) → its ``Codec.encode_plain`` bytes, written by hand
    (``pipeline.avrowire``) when the current schema is the one it knows (``_RW_SHAPE``), else through the codec.

    ``writer(revision, value, period_key, keys, demand_keys, window_start_ms, kw, metric, window_end_ms,
    qualities)`` with ``value`` a ``Decimal`` (scale ≤ 6) and ``kw`` its text. The parts shared by the windows of
    one period (period key, quantity and demand keys; kW and metric; quality flags) are remembered as bytes
    (bounded memos). Errors as the codec's: ``ValueError`` for a value the schema cannot hold."""

    def __init__(self, codec: Codec) -> None:
        self._codec = codec
        self._hand = aw.shape(codec.schema("RatedWindowState")["fields"]) == _RW_SHAPE
        self._header = codec.header("RatedWindowState") if self._hand else b""
        self._keys: dict[tuple[str, tuple[str, ...], tuple[str, ...]], bytes] = {}
        self._tail: dict[tuple[str, str], bytes] = {}
        self._flags: dict[tuple[str, ...], bytes] = {}
        self._values: dict[Decimal, bytes] = {}

    def __call__(self, revision: int, value: Decimal, period_key: str, keys: list[str], demand_keys: list[str],
                 window_start_ms: int, kw: str, metric: str, window_end_ms: int, qualities: list[str]) -> bytes:
        if self._hand and -_INT32 <= revision < _INT32:
            try:
                return self._write(revision, value, period_key, keys, demand_keys, window_start_ms, kw, metric,
                                   window_end_ms, qualities)
            except (TypeError, OverflowError, AttributeError):
                pass  # the codec decides (and raises what it raises)
        return self._codec.encode_plain({
            "revision": revision, "value": decimal_bytes(value), "period_key": period_key, "keys": list(keys),
            "demand_keys": list(demand_keys), "window_start_ms": window_start_ms, "kw": kw, "metric": metric,
            "window_end_ms": window_end_ms, "qualities": list(qualities)}, "RatedWindowState")

    def _write(self, revision: int, value: Decimal, period_key: str, keys: list[str], demand_keys: list[str],
               window_start_ms: int, kw: str, metric: str, window_end_ms: int, qualities: list[str]) -> bytes:
        memo_key = (period_key, tuple(keys), tuple(demand_keys))
        mid = self._keys.get(memo_key)
        if mid is None:
            mid = _remember(self._keys, memo_key, aw.string_bytes(period_key) + aw.string_array_bytes(memo_key[1])
                            + aw.string_array_bytes(memo_key[2]), _MEMO_MAX)
        tail = self._tail.get((kw, metric))
        if tail is None:
            tail = _remember(self._tail, (kw, metric), aw.string_bytes(kw) + aw.string_bytes(metric), _MEMO_MAX)
        fkey = tuple(qualities)
        flags = self._flags.get(fkey)
        if flags is None:
            flags = _remember(self._flags, fkey, aw.string_array_bytes(fkey), _MEMO_MAX)
        raw = self._values.get(value)
        if raw is None:  # an equal Decimal always has the same unscaled bytes (one that needs > 6 places never hits)
            raw = _remember(self._values, value, aw.bytes_bytes(decimal_bytes(value)), _MEMO_MAX)
        seen = aw.long_bytes_seen
        return b"".join((self._header, aw.long_bytes(revision), raw, mid, seen(window_start_ms), tail,
                         seen(window_end_ms), flags))


_PS_SHAPE = [
    ("account", "string"), ("period_start", "int"), ("period_end", "int"),
    ("quantities", {"type": "map", "values": "bytes"}),
    ("qualities", {"type": "map", "values": {"type": "array", "items": "string"}}),
    ("windows", {"type": "map", "values": "int"}), ("emitted", {"type": "map", "values": "bytes"}),
    ("demand", {"type": "map", "values": {"type": "map", "values": "string"}}),
    ("quality_counts", {"type": "map", "values": {"type": "map", "values": "int"}}),
    ("demand_kwh", {"type": "map", "values": {"type": "map", "values": "bytes"}}), ("format", "int"),
    ("days", {"type": "map", "values": "int"}),
]
_QUANTUM = Decimal("0.000001")
_MILLION = Decimal(1_000_000)
_EPOCH_DAY = date(1970, 1, 1).toordinal()


class PeriodStateWriter:
    """``PeriodState`` (rating's ``rp|`` state) → the bytes ``Codec.encode`` writes for its ``RatingPeriodState``
    datum, written by hand (``pipeline.avrowire``; Avro maps as fastavro writes them: one block in the dict's order,
    then 0) when the current schema is the one it knows (``_PS_SHAPE``); otherwise, or on any value it does not
    write exactly (a number beyond its Avro type, a decimal of more than 6 places or 28 digits, a value of the wrong
    type), ``None``: the caller encodes through the codec, which gives the bytes or the error.

    Quantities and demand kWh are written at 6 places (quantized, as the state encoder gives them to the codec);
    emitted totals as they are. Strings and decimals seen lately are remembered as bytes (bounded memos)."""

    def __init__(self, codec: Codec) -> None:
        shape = [(f["name"], _strip(f["type"])) for f in codec.schema("RatingPeriodState")["fields"]]
        self._hand = shape == _PS_SHAPE
        self._header = codec.header("RatingPeriodState") if self._hand else b""
        self._decimals: dict[Decimal, bytes] = {}
        self._same: dict[int, tuple[Decimal, bytes]] = {}
        self._entries: dict[tuple[str, int], bytes] = {}

    def __call__(self, ps: Any) -> bytes | None:
        if not self._hand:
            return None
        try:
            return self._write(ps)
        except (TypeError, OverflowError, AttributeError, ValueError, KeyError, ArithmeticError):
            return None

    def _int_map(self, m: dict[str, int]) -> bytes:
        """An Avro map of ``int``: its (key, value) entries remembered as bytes (day and window counts repeat)."""
        parts: list[bytes] = []
        self._int_entries(m, parts)
        return b"".join(parts)

    def _int_maps(self, m: dict[str, dict[str, int]]) -> bytes:
        """An Avro map of maps of ``int`` (``quality_counts``)."""
        if type(m) is not dict:
            raise TypeError(type(m))
        if not m:
            return b"\x00"
        parts = [_size_bytes(len(m))]
        for k, inner in m.items():
            parts.append(_s(k))
            self._int_entries(inner, parts)
        parts.append(b"\x00")
        return b"".join(parts)

    def _int_entries(self, m: dict[str, int], parts: list[bytes]) -> None:
        """Append the Avro map of ``int`` ``m`` to ``parts``: one block of remembered entries, then 0."""
        if type(m) is not dict:
            raise TypeError(type(m))
        if m:
            memo = self._entries
            get = memo.get
            parts.append(_size_bytes(len(m)))
            for item in m.items():  # (a loop, not a comprehension: most maps here hold 1-3 entries)
                parts.append(get(item) or _remember(memo, item, _s(item[0]) + _int_bytes(item[1]), _MEMO_MAX))
        parts.append(b"\x00")

    def _decimal_map(self, m: dict[str, Decimal], quantize: bool) -> bytes:
        """An Avro map of ``decimal`` (scale 6): at 6 places when ``quantize``, else as given. Quantized values are
        remembered by value (equal Decimals, the same 6-place bytes); values as given by identity (an unchanged
        emitted total is the same object from one batch to the next; an equal value of more places must still be
        refused)."""
        if type(m) is not dict:
            raise TypeError(type(m))
        if not m:
            return b"\x00"
        parts = [_size_bytes(len(m))]
        if quantize:
            get, miss = self._decimals.get, self._quantized
            for k, v in m.items():
                if type(v) is not Decimal:  # (an equal int would find a Decimal's bytes)
                    raise TypeError(type(v))
                parts.append(_s(k))
                parts.append(get(v) or miss(v))
        else:
            same = self._same
            for k, v in m.items():
                parts.append(_s(k))
                found = same.get(id(v))
                if found is not None and found[0] is v:
                    parts.append(found[1])
                    continue
                if type(v) is not Decimal or not v.is_finite():
                    raise TypeError(type(v))
                b = aw.bytes_bytes(decimal_bytes(v))
                _remember(same, id(v), (v, b), _MEMO_MAX)  # holds v: its id is not reused while remembered
                parts.append(b)
        parts.append(b"\x00")
        return b"".join(parts)

    def _quantized(self, v: Decimal) -> bytes:
        """The bytes of the ``Decimal`` ``v`` at 6 places (``TypeError`` for a non-finite value; ``InvalidOperation``
        when that needs more than 28 digits, where the codec refuses too), remembered by value."""
        if not v.is_finite():
            raise TypeError(type(v))
        n = int(v.quantize(_QUANTUM) * _MILLION)  # exact: the quantized coefficient has ≤ 28 digits
        b = aw.bytes_bytes(n.to_bytes(((-n if n < 0 else n).bit_length() + 8) // 8, "big", signed=True))
        return _remember(self._decimals, v, b, _MEMO_MAX)  # type: ignore[no-any-return]

    def _nested(self, m: dict[str, Any], inner: Callable[[Any], bytes]) -> bytes:
        """An Avro map of maps (or arrays): each value written by ``inner``."""
        if type(m) is not dict:
            raise TypeError(type(m))
        if not m:
            return b"\x00"
        return b"".join([aw.long_bytes(len(m)), *(_s(k) + inner(v) for k, v in m.items()), b"\x00"])

    def _strings_map(self, m: dict[str, Any]) -> bytes:
        if type(m) is not dict:
            raise TypeError(type(m))
        if not m:
            return b"\x00"
        return b"".join([aw.long_bytes(len(m)), *(_s(k) + _s(str(v)) for k, v in m.items()), b"\x00"])

    def _write(self, ps: Any) -> bytes:
        """The record's bytes (``TypeError``, ``OverflowError``, ``ValueError`` on a value it does not write)."""
        return b"".join((
            self._header, _s(ps.account), aw.long_bytes_seen(_day_number(ps.period_start)),
            aw.long_bytes_seen(_day_number(ps.period_end)), self._decimal_map(ps.quantities, True),
            self._nested(ps.qualities, _string_array), self._int_map(ps.windows),
            self._decimal_map(ps.emitted, False), self._nested(ps.demand, self._strings_map),
            self._int_maps(ps.quality_counts),
            self._nested(ps.demand_kwh, lambda m: self._decimal_map(m, True)), _int_bytes(ps.format),
            self._int_map(ps.days),
        ))


def _string_array(items: Any) -> bytes:
    if type(items) is not list:
        raise TypeError(type(items))
    return aw.string_array_bytes(items)


def _strip(t: Any) -> Any:
    """A schema type with logical types as their base type (``date`` → ``int``, ``decimal`` → ``bytes``)."""
    if isinstance(t, dict):
        if t.get("type") == "map":
            return {"type": "map", "values": _strip(t["values"])}
        if t.get("type") == "array":
            return {"type": "array", "items": _strip(t["items"])}
        if "logicalType" in t or t.get("type") in aw._PRIMITIVES:
            return t["type"]
    return t


def _day_number(d: Any) -> int:
    """An Avro ``date``: days since 1970-01-01 (``TypeError`` for what is not a date)."""
    if type(d) is not date:
        raise TypeError(type(d))
    return d.toordinal() - _EPOCH_DAY


def _int_bytes(v: int) -> bytes:
    """An Avro ``int`` (``OverflowError`` beyond 32 bits, ``TypeError`` for what is not an ``int``)."""
    if type(v) is not int:
        raise TypeError(type(v))
    if not -_INT32 <= v < _INT32:
        raise OverflowError(v)
    return aw.long_bytes(v)


_PENDING_SHAPE = [
    ("since_clock_ms", "long"), ("watermark_ms", ["null", "long"]), ("arrived_ms", ["null", "long"]),
    ("closed_ms", ["null", "long"]), ("cause_ids", ["null", {"type": "array", "items": "string"}]), ("chain", "string"),
    ("count", "int"),
    ("days", {"type": "map", "values": {"type": "record", "name": "meterbilling.state.PendingDay", "fields": [
        {"name": "windows", "type": "int"}, {"name": "delta", "type": "string"}]}}),
    ("listed_stored", "int"),
]
_LISTED_CAUSE_SHAPE = [("window", "bytes"), ("keys", ("array", "string"))]  # the items of RatingPendingCauses


def _listed_causes_known(codec: Codec) -> bool:
    """Whether ``RatingPendingCauses`` is the schema ``PendingWriter.causes`` writes: one field, an array of records
    of ``_LISTED_CAUSE_SHAPE``."""
    fields = codec.schema("RatingPendingCauses")["fields"]
    t = fields[0]["type"] if len(fields) == 1 and fields[0]["name"] == "causes" else None
    items = t.get("items") if isinstance(t, dict) and t.get("type") == "array" else None
    return (isinstance(items, dict) and items.get("type") == "record"
            and aw.shape(items["fields"]) == _LISTED_CAUSE_SHAPE)


class PendingWriter:
    """Rating's posting-policy state written by hand (``pipeline.avrowire``) as ``Codec.encode`` writes it, when the
    current schemas are the ones it knows (``_PENDING_SHAPE``, ``_LISTED_CAUSE_SHAPE``); otherwise, or for a value it
    does not write exactly, ``None`` (the caller encodes through the codec, which gives the bytes or the error).

    - ``of(pending)``: the ``RatingPending`` of a held period (``processor._Touched``), read from its attributes: the
      bytes the codec writes for ``processor._pending_datum`` (a union ``[null, long]`` or ``[null, array]`` as
      index 0 or 1 then the value), no datum built;
    - ``causes(listed)``: a ``RatingPendingCauses``, the causes a period listed in one batch (``listed``: pairs of a
      window revision's record bytes and its keys). (One ``RatingPendingCause`` per key, what earlier versions wrote,
      is only read.)"""

    def __init__(self, codec: Codec) -> None:
        def shape(name: str) -> list[tuple[str, Any]]:
            return [(f["name"], _strip(f["type"])) for f in codec.schema(name)["fields"]]

        self._header = codec.header("RatingPending") if shape("RatingPending") == _PENDING_SHAPE else None
        self._causes = codec.header("RatingPendingCauses") if _listed_causes_known(codec) else None
        self._days: dict[tuple[str, int, str], bytes] = {}
        self._same_delta: dict[int, tuple[Decimal, str]] = {}
        self._listed: dict[int, tuple[list[str], int, str, bytes]] = {}  # id(ids) → (ids, written, last, bytes)

    def causes(self, listed: list[tuple[bytes, Sequence[str]]]) -> bytes | None:
        if self._causes is None:
            return None
        try:
            parts = [self._causes]
            if listed:
                parts.append(_size_bytes(len(listed)))
                for window, keys in listed:
                    if type(window) is not bytes:
                        raise TypeError(type(window))
                    parts.append(aw.bytes_bytes(window))
                    parts.append(aw.string_array_bytes(keys))
            parts.append(b"\x00")
            return b"".join(parts)
        except (TypeError, OverflowError, AttributeError):
            return None

    def of(self, pending: Any) -> bytes | None:
        """The ``RatingPending`` bytes of a period held by the posting policy, read from its attributes
        (``processor._Touched`` and its ``CauseDigest``) without building the datum: a day summary's delta is written
        as ``str`` of its ``Decimal``, remembered by the object's identity (a pending period's unchanged days keep
        theirs). ``None`` for what it does not write exactly (an int beyond 32 bits: the codec decides)."""
        if self._header is None:
            return None
        try:
            digest = pending.digest
            same = self._same_delta
            days = []
            for day, summary in digest.days.items():
                delta = summary.delta
                found = same.get(id(delta))
                if found is None or found[0] is not delta:
                    if type(delta) is not Decimal:
                        raise TypeError(type(delta))
                    found = _remember(same, id(delta), (delta, str(delta)), _MEMO_MAX)  # holds delta: id not reused
                days.append((day, summary.windows, found[1]))
            return self._bytes(pending.since_clock_ms, pending.watermark_ms, pending.arrived_ms, pending.closed_ms,
                               digest.ids, digest.chain, digest.count, days, pending.listed_stored)
        except (TypeError, OverflowError, AttributeError, KeyError):
            return None

    def _ids_bytes(self, ids: list[str]) -> bytes:
        """The Avro strings of a pending period's listed cause ids, one after the other. The list only grows (a few ids
        per batch, ``CauseDigest.add``) and its header is written every batch: the bytes written last time for the same
        list object are remembered and only the ids added since are written (a list whose last written id is no longer
        the same object is written whole)."""
        found = self._listed.get(id(ids))
        n = len(ids)
        if found is not None and found[0] is ids and found[1] <= n and ids[found[1] - 1] is found[2]:
            body = found[3] + b"".join(map(_s, ids[found[1]:])) if found[1] < n else found[3]
        else:
            body = b"".join(map(_s, ids))
        _remember(self._listed, id(ids), (ids, n, ids[-1], body), _LISTED_MEMO_MAX)  # holds ids: its id is not reused
        return body

    def _bytes(self, since_clock_ms: Any, watermark_ms: Any, arrived_ms: Any, closed_ms: Any, ids: Any, chain: Any,
               count: Any, days: list[tuple[Any, Any, Any]], listed_stored: Any) -> bytes:
        out = [self._header, _long(since_clock_ms)]  # (clocks and watermarks repeat across the periods of a batch)
        for v in (watermark_ms, arrived_ms, closed_ms):
            out.append(b"\x00" if v is None else b"\x02" + _long(v))
        if ids is None:
            out.append(b"\x00")
        else:
            if type(ids) is not list:
                raise TypeError(type(ids))
            out.append(b"\x02")
            if ids:
                out.append(_size_bytes(len(ids)))
                out.append(self._ids_bytes(ids))
            out.append(b"\x00")
        out.append(aw.string_bytes(chain))
        out.append(_int_bytes(count))
        if days:
            out.append(_size_bytes(len(days)))
            memo = self._days
            for entry in days:  # (day, windows, delta text): most days of a pending period are unchanged
                b = memo.get(entry)
                if b is None:
                    b = _remember(memo, entry, _s(entry[0]) + _int_bytes(entry[1]) + aw.string_bytes(entry[2]),
                                  _MEMO_MAX)
                out.append(b)
        out.append(b"\x00")
        out.append(_int_bytes(listed_stored))
        return b"".join(out)


def _long(v: int) -> bytes:
    """An Avro ``long``, remembered (``avrowire.long_bytes_seen``); ``TypeError`` for what is not an ``int``."""
    if type(v) is not int:
        raise TypeError(type(v))
    return aw.long_bytes_seen(v)
