"""The ingest stage's hot path on the wire: Avro binary of ``MeterReading`` in, ``UsageEvent`` and
``IngestSeen`` out, read and written by hand (pure; throughput in ``benchmarks/ingest.py``).

Same bytes as ``pipeline.codec`` (Avro 1.11 specification, "Binary Encoding" and "Single object
encoding"): ``int``/``long`` are zig-zag varints, ``string``/``bytes`` a long length then the bytes,
``boolean`` one byte, a union the branch index as a long then the value, a ``decimal`` (bytes,
precision 28, scale 6) its unscaled value in big-endian two's complement, as short as fastavro writes
it; ``timestamp-millis`` its epoch milliseconds as a long. Tests prove the output byte-identical to
``Codec.encode`` (``tests/unit/test_ingest_wire.py``).

``split_reading`` (and ``read_reading``) accept only the common case and answer ``None`` for anything
else (an unknown or older writer schema, a truncated or odd body, a value outside the ranges below): the
caller then takes the general path through ``Codec``, which reads every writer version and names every error, so
nothing a reader of the general path would refuse or read differently is read here.
"""

from __future__ import annotations

from typing import NamedTuple

from pipeline import avrowire as aw

# what the fast reader accepts; the rest goes the general way (which may still accept it)
MAX_FAST_MS = 253_402_214_400_000  # 9999-12-31T00:00:00Z: within datetime's range (Codec.decode refuses beyond)
MAX_FAST_INT = 2**31  # Avro int: 32-bit signed
MAX_DECIMAL_BYTES = 12  # |unscaled| < 2**95 > 10**28: precision 28
MAX_UNSCALED = 10**28

SMALL_LONGS = [bytes((((n << 1) ^ (n >> 63)) & 0xFF,)) for n in range(64)]  # longs 0..63: one byte
_TIMES: dict[bytes, int] = {}  # 6 bytes of a complete 6-byte varint (epoch ms 2004 … 2039) → its value (``_time``)
_TIMES_MAX = 200_000


class PlainReading(NamedTuple):
    """The fields of a ``MeterReading`` in their Avro base form: times in epoch ms UTC, ``unscaled`` the
    value in micro-units of ``uom`` (scale 6)."""

    nmi: str
    suffix: str
    uom: str
    start_ms: int
    end_ms: int
    unscaled: int
    quality: str
    reason_code: str | None
    version_ms: int
    version_source: str
    source_file: str
    source_record: int
    correction: bool


def split_reading(data: bytes, header: bytes) -> tuple[bytes, int, int, int, bytes, int, bool] | None:
    """The parts of single-object ``data`` written with the current ``MeterReading`` schema (whose 10-byte
    single-object header is ``header``): ``(head, start_ms, end_ms, unscaled, tail, source_record,
    correction)``, where ``head`` is the raw Avro of ``nmi``, ``suffix``, ``uom`` (``read_head``) and
    ``tail`` that of ``quality`` … ``source_file`` (``read_tail``): the parts a day's file repeats, which
    a caller may memoize. ``None`` when ``data`` is anything else or outside the fast path: another
    writer schema, a truncated body, trailing bytes, a string of 64 bytes or more (but ``source_file``
    and ``reason_code``), an interval time before 1970 or after 9998, ``source_record`` outside
    0 … 2³¹ − 1, an empty or over-long decimal, a union index or a boolean byte other than 0 or 1, a
    varint longer than 10 bytes. UTF-8 is checked by ``read_head`` and ``read_tail``."""
    if data[:10] != header:
        return None
    try:
        # short strings: a one-byte length (even: zig-zag of 0..63); a slice past the end leaves the
        # next read past it (IndexError) or the final position off the end: refused either way
        b = data[10]
        if b & 0x81:
            return None
        p = 11 + (b >> 1)
        b = data[p]
        if b & 0x81:
            return None
        p += 1 + (b >> 1)
        b = data[p]
        if b & 0x81:
            return None
        p += 1 + (b >> 1)
        head = data[10:p]
        start_ms = _TIMES.get(data[p:p + 6])  # a memo of 6-byte varints: a day's file repeats its times
        if start_ms is None:
            start_ms, p = _time(data, p)
        else:
            p += 6
        end_ms = _TIMES.get(data[p:p + 6])
        if end_ms is None:
            end_ms, p = _time(data, p)
        else:
            p += 6
        b = data[p]  # decimal: 1 … MAX_DECIMAL_BYTES bytes
        if b & 0x81 or not 0 < b >> 1 <= MAX_DECIMAL_BYTES:
            return None
        q = p + 1 + (b >> 1)
        if q > len(data):
            return None
        unscaled = int.from_bytes(data[p + 1:q], "big", signed=True)
        b = data[q]  # quality
        if b & 0x81:
            return None
        p = q + 1 + (b >> 1)
        b = data[p]  # reason_code: ["null", "string"]
        if b == 0:
            p += 1
        elif b == 2:
            p = _skip_string(data, p + 1)
        else:
            return None
        if data[p:p + 6] in _TIMES:  # version
            p += 6
        else:
            _, p = _time(data, p)
        b = data[p]  # version_source
        if b & 0x81:
            return None
        p = _skip_string(data, p + 1 + (b >> 1))  # source_file
        tail = data[q:p]
        b = data[p]
        if b < 0x80:
            source_record = (b >> 1) ^ -(b & 1)
            p += 1
        elif data[p + 1] < 0x80:  # 2 bytes: records 64 … 8191 of a file
            n = (b & 0x7F) | data[p + 1] << 7
            source_record = (n >> 1) ^ -(n & 1)
            p += 2
        else:
            source_record, p = _long(data, p)
        flag = data[p]
    except (IndexError, ValueError):  # truncated, negative length, over-long varint
        return None
    if p + 1 != len(data) or flag > 1 or not 0 <= source_record < MAX_FAST_INT \
            or not (0 <= start_ms < MAX_FAST_MS and 0 <= end_ms < MAX_FAST_MS):
        return None
    return head, start_ms, end_ms, unscaled, tail, source_record, flag == 1


def read_head(head: bytes) -> tuple[str, str, str] | None:
    """``(nmi, suffix, uom)`` of the ``head`` of ``split_reading``; ``None`` on invalid UTF-8."""
    try:
        p = 1 + (head[0] >> 1)
        q = p + 1 + (head[p] >> 1)
        return head[1:p].decode(), head[p + 1:q].decode(), head[q + 1:].decode()
    except (IndexError, ValueError):
        return None


def read_tail(tail: bytes) -> tuple[str, str | None, int, str, str] | None:
    """``(quality, reason_code, version_ms, version_source, source_file)`` of the ``tail`` of
    ``split_reading``; ``None`` on invalid UTF-8 or a version before 1970 or after 9998."""
    try:
        p = 1 + (tail[0] >> 1)
        quality = tail[1:p].decode()
        if tail[p] == 0:
            reason_code, p = None, p + 1
        else:
            reason_code, p = _string(tail, p + 1)
        version_ms, p = _time(tail, p)
        q = p + 1 + (tail[p] >> 1)
        version_source = tail[p + 1:q].decode()
        source_file, _ = _string(tail, q)
    except (IndexError, ValueError):
        return None
    if not 0 <= version_ms < MAX_FAST_MS:
        return None
    return quality, reason_code, version_ms, version_source, source_file


def read_reading(data: bytes, header: bytes) -> PlainReading | None:
    """``split_reading`` with its ``head`` and ``tail`` read: every field of the reading, or ``None``
    when any of the three does."""
    parts = split_reading(data, header)
    if parts is None:
        return None
    head, start_ms, end_ms, unscaled, tail, source_record, correction = parts
    names, rest = read_head(head), read_tail(tail)
    if names is None or rest is None:
        return None
    quality, reason_code, version_ms, version_source, source_file = rest
    return PlainReading(*names, start_ms, end_ms, unscaled, quality, reason_code, version_ms, version_source,
                        source_file, source_record, correction)


def _time(data: bytes, pos: int) -> tuple[int, int]:
    """``_long`` for the common size of epoch milliseconds now (6 bytes: 2004 … 2039), unrolled; remembers
    such a varint in ``_TIMES`` (what ``split_reading`` looks its times up in first)."""
    raw = data[pos:pos + 6]
    b0, b1, b2, b3, b4, b5 = raw  # ValueError when fewer are left
    if b0 & b1 & b2 & b3 & b4 & 0x80 and b5 < 0x80:
        n = (b0 & 0x7F) | (b1 & 0x7F) << 7 | (b2 & 0x7F) << 14 | (b3 & 0x7F) << 21 | (b4 & 0x7F) << 28 | b5 << 35
        if len(_TIMES) >= _TIMES_MAX:
            _TIMES.clear()
        n = _TIMES[raw] = (n >> 1) ^ -(n & 1)
        return n, pos + 6
    return _long(data, pos)


def _long(data: bytes, pos: int) -> tuple[int, int]:
    """The zig-zag varint at ``pos`` and the position after it; ``ValueError`` beyond 10 bytes,
    ``IndexError`` when truncated."""
    b = data[pos]
    pos += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), pos


def _skip_string(data: bytes, pos: int) -> int:
    """The position after the Avro string at ``pos``; ``ValueError``/``IndexError`` when it is not one."""
    b = data[pos]
    if b < 0x80:
        n = (b >> 1) ^ -(b & 1)
        pos += 1
    else:
        n, pos = _long(data, pos)
    stop = pos + n
    if n < 0 or stop > len(data):
        raise ValueError("bad string length")
    return stop


def _string(data: bytes, pos: int) -> tuple[str, int]:
    """The Avro string at ``pos`` and the position after it; ``ValueError``/``IndexError`` when it is
    not one (a negative or too long length)."""
    b = data[pos]
    if b < 0x80:
        n = (b >> 1) ^ -(b & 1)
        pos += 1
    else:
        n, pos = _long(data, pos)
    stop = pos + n
    if n < 0 or stop > len(data):
        raise ValueError("bad string length")
    return data[pos:stop].decode(), stop


# --- writing ----------------------------------------------------------------------------------------------
avro_long = aw.long_bytes  # an Avro ``long`` (also ``int``); the shared primitives (pipeline.avrowire)
avro_string = aw.string_bytes  # an Avro ``string``: its UTF-8 length as a long, then the UTF-8 bytes


def avro_decimal(unscaled: int) -> bytes:
    """An Avro ``decimal`` (bytes, precision 28, scale 6) of ``unscaled`` micro-units: the length, then
    big-endian two's complement as short as fastavro writes the equivalent ``Decimal``.
    ``ValueError`` beyond 28 digits."""
    if not -MAX_UNSCALED < unscaled < MAX_UNSCALED:
        raise ValueError(f"decimal of {unscaled} micro-units has more than 28 digits")
    raw = unscaled.to_bytes((abs(unscaled).bit_length() + 8) // 8, "big", signed=True)
    return SMALL_LONGS[len(raw)] + raw


def seen_bytes(header: bytes, time_ms: int, version_ms: int) -> bytes:
    """``IngestSeen`` (``schemas/ingest_seen.avsc``) as a single object, ``header`` its 10-byte header."""
    return header + avro_long(time_ms) + avro_long(version_ms)


def read_seen(data: bytes, header: bytes) -> tuple[int, int] | None:
    """``(time_ms, version_ms)`` of an ``IngestSeen`` single object written with ``header``, or ``None``
    when it is anything else (the caller then decodes it through ``Codec``)."""
    if data[:10] != header:
        return None
    try:
        time_ms, pos = _long(data, 10)
        version_ms, pos = _long(data, pos)
    except (IndexError, ValueError):
        return None
    return (time_ms, version_ms) if pos == len(data) else None
