"""Records ⇄ bytes: Avro single-object encoding with fastavro.

Wire format (Avro 1.11 specification, "Single object encoding"): two marker bytes ``C3 01``,
the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical Form,
then the Avro binary body. A reader looks the fingerprint up among every schema it knows
(``schemas/*.avsc`` plus retired versions in ``schemas/history/``) and resolves the writer
schema to its own, so records written by older producers stay readable.

Evolution rules (enforced by review and by ``tests/unit/test_codec.py``): add fields only with a
default; never remove a field that has no default; never change a field's type except by an Avro
promotion; never rename without an alias. A changed schema's previous text moves to
``schemas/history/<Name>.v<N>.avsc`` so its fingerprint stays resolvable.
"""

from __future__ import annotations

import dataclasses
import io
import json
from decimal import ROUND_HALF_UP, Decimal
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, TypeVar

import fastavro
from fastavro import schema as avro_schema

from pipeline import records

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
MAGIC = b"\xc3\x01"
_SCALE = Decimal("0.000001")  # every decimal in our schemas has scale 6

T = TypeVar("T")


class DecodeError(ValueError):
    """Bytes that are not a record we can read: bad marker, unknown fingerprint, bad body."""


def _strip_logical_types(raw: Any) -> Any:
    """The schema with every logical type replaced by its underlying Avro type (same binary encoding)."""
    if isinstance(raw, dict):
        if "logicalType" in raw:
            raw = {k: v for k, v in raw.items() if k not in ("logicalType", "precision", "scale")}
        return {k: _strip_logical_types(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_strip_logical_types(v) for v in raw]
    return raw


def _load_schema_files(paths: list[Path], plain: bool = False, base: list[Path] | None = None) -> dict[str, Any]:
    """Parse schema files in dependency order (named types may reference each other).

    ``plain``: parse them with logical types stripped (see ``Codec.decode_plain``). ``base``: schema
    files whose named types the ``paths`` may reference (a retired version refers to the current
    types it used by name); each of ``paths`` is then parsed on its own, without the current
    definition of its own name, and adds no type the others could reference.
    """
    named: dict[str, Any] = {}
    if base:
        for parsed_base in _load_schema_files(base, plain).values():
            avro_schema.parse_schema(parsed_base, named_schemas=named)
    pending = {p: json.loads(p.read_text()) for p in paths}
    if plain:
        pending = {p: _strip_logical_types(raw) for p, raw in pending.items()}
    parsed: dict[str, Any] = {}
    while pending:
        progress = False
        for path, raw in list(pending.items()):
            own = f"{raw.get('namespace', '')}.{raw['name']}".lstrip(".") if isinstance(raw, dict) else None
            scope = {k: v for k, v in named.items() if k != own} if base else named
            try:
                parsed_schema = avro_schema.parse_schema(raw, named_schemas=scope)
            except avro_schema.UnknownType:
                continue
            parsed[path.stem] = parsed_schema
            del pending[path]
            progress = True
        if not progress:
            raise avro_schema.UnknownType(f"unresolvable schema references in {sorted(map(str, pending))}")
    return parsed


class Codec:
    """Encodes the dataclasses of ``pipeline.records`` (and state values) as Avro single objects.

    ``encode(obj)`` picks the schema named like the object's class; ``decode(data, cls)`` reads
    any known writer version and resolves it to the current schema of ``cls``.
    Raises ``DecodeError`` on bytes it cannot read and ``ValueError`` when a value does not fit
    its schema (e.g. a Decimal with more than 6 decimal places).
    """

    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        files = sorted(schema_dir.glob("*.avsc"))
        current = _load_schema_files(files)
        plain = _load_schema_files(files, plain=True)
        self._by_name: dict[str, Any] = {}
        self._fingerprints: dict[bytes, Any] = {}
        self._plain_by_name: dict[str, Any] = {}  # the same schemas without logical types
        self._plain_by_fingerprint: dict[bytes, Any] = {}
        for stem, parsed in current.items():
            name = parsed["name"].split(".")[-1]
            fp = self._fingerprint(parsed)
            self._by_name[name] = parsed
            self._fingerprints[fp] = parsed
            self._plain_by_name[name] = self._plain_by_fingerprint[fp] = plain[stem]
        history = schema_dir / "history"
        if history.is_dir():
            old_files = sorted(history.glob("*.avsc"))
            old_plain = _load_schema_files(old_files, plain=True, base=files)
            for stem, old in _load_schema_files(old_files, base=files).items():
                fp = self._fingerprint(old)
                self._fingerprints[fp] = old
                self._plain_by_fingerprint[fp] = old_plain[stem]
        self._header = {name: MAGIC + self._fingerprint(s) for name, s in self._by_name.items()}

    @staticmethod
    def _fingerprint(parsed: Any) -> bytes:
        canonical = avro_schema.to_parsing_canonical_form(parsed)
        return bytes.fromhex(avro_schema.fingerprint(canonical, "CRC-64-AVRO"))

    def record_name(self, data: bytes) -> str | None:
        """The short name of the writer schema of single-object ``data`` (e.g. ``"SeriesMarker"``), from
        its fingerprint alone (nothing decoded); ``None`` when ``data`` is not a single object of a
        known schema. Lets a consumer of a topic carrying several record types dispatch cheaply."""
        if len(data) < 10 or data[:2] != MAGIC:
            return None
        writer = self._fingerprints.get(bytes(data[2:10]))
        return None if writer is None else writer["name"].rsplit(".", 1)[-1]

    def schema(self, name: str) -> Any:
        """The current parsed schema named ``name`` (e.g. ``"UsageWindow"``)."""
        return self._by_name[name]

    def encode(self, obj: Any, schema_name: str | None = None) -> bytes:
        """Encode a record dataclass (or a dict with ``schema_name``) as one Avro single object."""
        name = schema_name or type(obj).__name__
        parsed = self._by_name[name]
        datum = obj if isinstance(obj, dict) else _to_avro(obj)
        buf = io.BytesIO()
        buf.write(self._header[name])
        fastavro.schemaless_writer(buf, parsed, datum)
        return buf.getvalue()

    def decode_dict(self, data: bytes, schema_name: str) -> dict[str, Any]:
        """Decode to the plain Avro datum (dict), resolved to the current schema ``schema_name``."""
        return self._read(data, schema_name, self._fingerprints, self._by_name)

    @staticmethod
    def _read(data: bytes, schema_name: str, writers: dict[bytes, Any], readers: dict[str, Any]) -> dict[str, Any]:
        """Check the single-object marker, find the writer schema by fingerprint in ``writers`` and
        read the body resolved to ``readers[schema_name]``; ``DecodeError`` on anything unreadable."""
        if not isinstance(data, bytes | bytearray) or len(data) < 10 or data[:2] != MAGIC:
            raise DecodeError("not an Avro single-object record (missing C3 01 marker)")
        fp = bytes(data[2:10])
        writer = writers.get(fp)
        if writer is None:
            raise DecodeError(f"unknown schema fingerprint {fp.hex()}")
        reader = readers[schema_name]
        try:
            buf = io.BytesIO(data)
            buf.seek(10)
            datum = fastavro.schemaless_reader(buf, writer, None if writer is reader else reader)
            if buf.tell() != len(data):
                raise DecodeError(f"{len(data) - buf.tell()} trailing bytes after the record")
            return datum  # type: ignore[return-value]
        except DecodeError:
            raise
        except Exception as exc:  # fastavro raises many kinds on corrupt bodies
            raise DecodeError(f"cannot decode as {schema_name}: {type(exc).__name__}: {exc}") from exc

    # --- plain datums: logical types in their base form (hot paths) ----------------------------
    def header(self, schema_name: str) -> bytes:
        """The 10-byte single-object header (marker + fingerprint) of the current schema ``schema_name``."""
        return self._header[schema_name]

    def encode_plain(self, datum: dict[str, Any], schema_name: str) -> bytes:
        """Encode a plain datum: the same bytes as ``encode`` of the equivalent record, but the
        values of logical types are given in their Avro base form (see ``decode_plain``), which
        saves the conversions. Raises ``ValueError`` when a value does not fit the schema."""
        buf = io.BytesIO()
        buf.write(self._header[schema_name])
        fastavro.schemaless_writer(buf, self._plain_by_name[schema_name], datum)
        return buf.getvalue()

    def decode_plain(self, data: bytes, schema_name: str) -> dict[str, Any]:
        """Like ``decode_dict`` (same checks, writer versions resolved the same way, ``DecodeError``
        on unreadable bytes) but logical types stay in their Avro base form: ``timestamp-millis`` →
        epoch milliseconds (``int``), ``date`` → days since 1970-01-01, ``decimal`` (bytes) → the
        unscaled value as big-endian two's-complement bytes (scale from the schema: 6 for ours).

        Values are not range-checked: a timestamp after year 9999, which ``decode`` refuses, is
        returned as is (Avro 1.11 specification, "Logical Types").
        """
        return self._read(data, schema_name, self._plain_by_fingerprint, self._plain_by_name)

    def decode(self, data: bytes, cls: type[T]) -> T:
        """Decode bytes into an instance of the record dataclass ``cls``.

        Raises ``DecodeError`` when the bytes are unreadable or violate the record's invariants.
        """
        datum = self.decode_dict(data, cls.__name__)
        try:
            return _from_avro(cls, datum)
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"invalid {cls.__name__}: {exc}") from exc


def _check_decimal(value: Decimal) -> Decimal:
    q = value.quantize(_SCALE, rounding=ROUND_HALF_UP)
    if q != value:
        raise ValueError(f"decimal {value} has more than 6 decimal places")
    return q


def _to_avro(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_avro(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Decimal):
        return _check_decimal(obj)
    if isinstance(obj, tuple | list):
        if obj and isinstance(obj[0], tuple) and len(obj[0]) == 2 and isinstance(obj[0][1], bytes):
            return [{"name": k, "value": v} for k, v in obj]  # headers
        return [_to_avro(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_avro(v) for k, v in obj.items()}
    return obj


@cache
def _nested_types(cls: type) -> dict[str, type]:
    hints = {}
    for f in dataclasses.fields(cls):
        target = getattr(records, str(f.type), None) if isinstance(f.type, str) else f.type
        if isinstance(target, type) and dataclasses.is_dataclass(target):
            hints[f.name] = target
    return hints


@cache
def _is_flat(cls: type) -> bool:
    """No nested records, tuples or headers: the Avro datum maps 1:1 onto the constructor."""
    return not _nested_types(cls) and all(
        "tuple" not in str(f.type) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
    )


@cache
def _field_count(cls: type) -> int:
    return len(dataclasses.fields(cls))  # type: ignore[arg-type]


def _from_avro(cls: type[T], datum: dict[str, Any]) -> T:
    if _is_flat(cls) and len(datum) == _field_count(cls):
        return cls(**datum)
    nested = _nested_types(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = datum[f.name]
        if f.name in nested:
            value = _from_avro(nested[f.name], value)
        elif f.name == "headers":
            value = tuple((h["name"], h["value"]) for h in value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


@lru_cache(maxsize=1)
def default_codec() -> Codec:
    """The process-wide codec over ``schemas/``."""
    return Codec()
