"""``pipeline.avrowire``: the hand-written Avro binary primitives are the bytes fastavro writes, and
``read_long`` reads exactly what fastavro reads or raises (Avro 1.11 specification, "Binary encoding")."""

from __future__ import annotations

import io

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import avrowire as aw

SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "Flat", "fields": [
        {"name": "s", "type": "string"}, {"name": "b", "type": "bytes"}, {"name": "i", "type": "int"},
        {"name": "l", "type": "long"}, {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["X", "Y", "Z"]}},
        {"name": "a", "type": {"type": "array", "items": "string"}},
        {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ]})
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=80)
longs = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-300, 300))


def fastavro_bytes(schema: object, datum: object) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, datum)
    return buf.getvalue()


@given(longs)
def test_long_bytes_is_fastavro_long_and_reads_back(v: int) -> None:
    raw = aw.long_bytes(v)
    assert raw == aw.long_bytes_seen(v) == fastavro_bytes("long", v)
    assert aw.read_long(raw + b"\x07", 0) == (v, len(raw))


def test_long_bytes_refuses_more_than_64_bits() -> None:
    with pytest.raises(OverflowError):
        aw.long_bytes(2**63)
    with pytest.raises(OverflowError):
        aw.read_long(b"\xff" * 11, 0)
    with pytest.raises(OverflowError):  # ten bytes, 70 bits
        aw.read_long(b"\xff" * 9 + b"\x7f", 0)
    with pytest.raises(IndexError):
        aw.read_long(b"\xff\xff", 0)


@given(texts, st.binary(max_size=5000), st.lists(texts, max_size=6))
def test_strings_bytes_and_string_arrays_are_fastavro_bytes(s: str, b: bytes, items: list[str]) -> None:
    assert aw.string_bytes(s) == fastavro_bytes("string", s)
    assert aw.bytes_bytes(b) == fastavro_bytes("bytes", b)
    assert aw.string_array_bytes(items) == fastavro_bytes({"type": "array", "items": "string"}, items)
    with pytest.raises(TypeError):
        aw.string_bytes(b"not text")  # type: ignore[arg-type]


@given(st.binary(max_size=12) | st.binary(min_size=9, max_size=11).map(lambda b: b"\xff" * 9 + b))
@settings(max_examples=500)
def test_read_long_reads_what_fastavro_reads_or_raises(raw: bytes) -> None:
    try:
        got = aw.read_long(raw, 0)
    except (IndexError, OverflowError):
        return
    buf = io.BytesIO(raw)
    assert got == (fastavro.schemaless_reader(buf, "long", None), buf.tell())


def test_shape_names_base_types_enums_and_arrays() -> None:
    assert aw.shape(SCHEMA["fields"]) == [
        ("s", "string"), ("b", "bytes"), ("i", "int"), ("l", "long"), ("e", ("enum", ("X", "Y", "Z"))),
        ("a", ("array", "string")), ("t", "long")]
