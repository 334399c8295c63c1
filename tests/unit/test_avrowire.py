"""``pipeline.avrowire``: the hand-written Avro binary primitives are the bytes fastavro writes, and
``FlatReader`` reads exactly what fastavro reads or raises (Avro 1.11 specification, "Binary encoding")."""

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
PLAIN = fastavro.parse_schema({  # what the hand reader gives: logical types in their base form
    "type": "record", "name": "PlainFlat",
    "fields": [{**f, "type": "long"} if f["name"] == "t" else f for f in SCHEMA["fields"]]})
READER = aw.FlatReader(aw.shape(SCHEMA["fields"]))
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=80)
longs = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-300, 300))
records = st.fixed_dictionaries({
    "s": texts, "b": st.binary(max_size=80), "i": st.integers(-(2**31), 2**31 - 1), "l": longs,
    "e": st.sampled_from(["X", "Y", "Z"]), "a": st.lists(texts, max_size=5), "t": longs,
})


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
    with pytest.raises(IndexError):
        aw.read_long(b"\xff\xff", 0)


@given(texts, st.binary(max_size=5000), st.lists(texts, max_size=6))
def test_strings_bytes_and_string_arrays_are_fastavro_bytes(s: str, b: bytes, items: list[str]) -> None:
    assert aw.string_bytes(s) == fastavro_bytes("string", s)
    assert aw.bytes_bytes(b) == fastavro_bytes("bytes", b)
    assert aw.string_array_bytes(items) == fastavro_bytes({"type": "array", "items": "string"}, items)
    with pytest.raises(TypeError):
        aw.string_bytes(b"not text")  # type: ignore[arg-type]


@given(records)
@settings(max_examples=300, deadline=None)
def test_flat_reader_reads_what_fastavro_reads(d: dict) -> None:
    raw = b"0123456789" + fastavro_bytes(SCHEMA, d)
    assert READER.read(raw, 10) == [d[f["name"]] for f in SCHEMA["fields"]]


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 400), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 400), st.just(0)),
    st.tuples(st.just("append"), st.integers(0, 255), st.integers(1, 3)),
)


@given(records, st.lists(mutations, min_size=1, max_size=3))
@settings(max_examples=500, deadline=None)
def test_flat_reader_never_reads_other_values_than_fastavro(d: dict, how: list[tuple[str, int, int]]) -> None:
    """On corrupt, truncated or extended bytes the hand reader raises, or reads exactly what fastavro reads from
    the same bytes (whole body, nothing left over)."""
    raw = fastavro_bytes(SCHEMA, d)
    for kind, a, b in how:
        if kind == "flip":
            if raw:
                i = a % len(raw)
                raw = raw[:i] + bytes([raw[i] ^ b]) + raw[i + 1:]
        elif kind == "cut":
            raw = raw[: a % (len(raw) + 1)]
        else:
            raw = raw + bytes([a]) * b
    try:
        got = READER.read(raw, 0)
    except (IndexError, OverflowError, UnicodeDecodeError, ValueError):
        return
    buf = io.BytesIO(raw)
    expected = fastavro.schemaless_reader(buf, PLAIN, None)
    assert buf.tell() == len(raw)
    assert got == [expected[f["name"]] for f in SCHEMA["fields"]]


def test_flat_reader_refuses_a_schema_with_other_types() -> None:
    with pytest.raises(ValueError, match="not read by hand"):
        aw.FlatReader([("x", "double")])
