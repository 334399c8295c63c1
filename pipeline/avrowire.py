"""Avro binary primitives for the hot paths that read or write records by hand (issue 13).

Avro 1.11 specification, "Binary encoding": ``int`` and ``long`` are zig-zag varints (little-endian
base 128); ``string`` and ``bytes`` are a ``long`` length then the bytes (UTF-8 for a string); an ``enum``
is the ``int`` index of its symbol; an ``array`` is blocks of ``long`` count then items, ended by a 0 count
(a negative count is followed by the block's size in bytes). Records are framed by ``pipeline.codec``
(single-object encoding: ``C3 01``, the 8-byte schema fingerprint, the body).

``pipeline.codec`` (fastavro) stays the reference: a hand path is taken only for a schema whose fields it
knows (``shape``), returns only what fastavro returns for the same bytes, and on anything unusual (a
truncated body, an overlong varint, a negative array block, bytes left over, invalid UTF-8) raises, so the
caller falls back to the codec, which gives the result or the ``DecodeError``. Used by rating's readers and
writers (``pipeline.rating.wire``). Property tests compare each
hand path with fastavro (``tests/unit/test_avrowire.py``, ``tests/unit/test_rating_fast_paths.py``).
"""

from __future__ import annotations

from typing import Any

_INT64 = 1 << 63
_ONE_BYTE = [bytes((i,)) for i in range(128)]
_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})


def long_bytes(v: int) -> bytes:
    """The Avro ``long`` encoding of ``v``: zig-zag, then a little-endian base-128 varint.
    ``OverflowError`` beyond 64 bits."""
    if not -_INT64 <= v < _INT64:
        raise OverflowError(v)
    n = (v << 1) ^ (v >> 63)
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def remember(memo: dict[Any, Any], key: Any, value: Any, limit: int = 65_536) -> Any:
    """Put ``value`` under ``key`` in the bounded memo ``memo`` (emptied first when it holds ``limit`` entries) and
    return it: the one rule of every memo of encoded bytes on the hot paths."""
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
    return value


_SEEN: dict[int, bytes] = {}


def long_bytes_seen(v: int) -> bytes:
    """``long_bytes(v)``, remembered (at most 65,536 values: window bounds and watermarks repeat across accounts)."""
    return _SEEN.get(v) or remember(_SEEN, v, long_bytes(v))


_STRINGS: dict[str, bytes] = {}


def string_bytes_seen(v: str) -> bytes:
    """``string_bytes(v)``, remembered (at most 65,536 strings: map keys, state keys and days repeat)."""
    return _STRINGS.get(v) or remember(_STRINGS, v, string_bytes(v))


SIZES = [long_bytes(i) for i in range(4096)]  # the Avro long of each length below 4 KiB


def size_bytes(n: int) -> bytes:
    """The Avro ``long`` of a length or block count ``n`` ≥ 0 (from ``SIZES`` below 4 KiB)."""
    return SIZES[n] if n < 4096 else long_bytes(n)


def string_bytes(v: str) -> bytes:
    """An Avro ``string``: its length, then its UTF-8 bytes. ``TypeError`` for what is not a ``str``."""
    if type(v) is not str:
        raise TypeError(type(v))
    b = v.encode()
    return size_bytes(len(b)) + b


def bytes_bytes(v: bytes) -> bytes:
    """An Avro ``bytes``: its length, then the bytes."""
    return size_bytes(len(v)) + v


def string_array_bytes(items: list[str] | tuple[str, ...]) -> bytes:
    """An Avro ``array`` of strings as fastavro writes it: one block (count, items), then 0."""
    if not items:
        return b"\x00"
    return long_bytes(len(items)) + b"".join(string_bytes(s) for s in items) + b"\x00"


def read_long(data: bytes, p: int) -> tuple[int, int]:
    """The Avro ``long`` at ``data[p]``: (value, position after it). ``IndexError`` past the end,
    ``OverflowError`` for a varint longer than 10 bytes or beyond 64 bits."""
    b = data[p]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), p + 1
    n = b & 0x7F
    shift = 7
    p += 1
    while True:
        b = data[p]
        p += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            if n >> 64:
                raise OverflowError("varint beyond 64 bits")
            return (n >> 1) ^ -(n & 1), p
        shift += 7
        if shift > 63:
            raise OverflowError("varint longer than 10 bytes")


def _type_name(t: Any) -> Any:
    if isinstance(t, dict) and t.get("type") in _PRIMITIVES:
        return t["type"]
    return t


def shape(fields: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(name, type) of each field of a parsed schema: logical types as their base type, an enum as
    ``("enum", symbols)``, an array as ``("array", item type)``; anything else as the schema has it."""
    out: list[tuple[str, Any]] = []
    for f in fields:
        t = f["type"]
        if isinstance(t, dict) and t.get("type") == "enum":
            t = ("enum", tuple(t["symbols"]))
        elif isinstance(t, dict) and t.get("type") == "array":
            t = ("array", _type_name(t["items"]))
        out.append((f["name"], _type_name(t)))
    return out
