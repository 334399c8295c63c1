"""Records of the windowing stage: usage events in, window revisions out, window state ⇄ changelog.

Every format is Avro single-object encoding, encoded and decoded by fastavro through
``pipeline.codec`` (Avro 1.11 specification). The hot path uses the codec's *plain* datums
(``Codec.decode_plain`` / ``Codec.encode_plain``: logical types in their Avro base form), so no
``datetime`` or ``Decimal`` is built per event (SPEC §3; throughput in ``benchmarks/windowing.py``):

- times are epoch milliseconds UTC (``timestamp-millis`` base form: ``long``);
- quantities are integer micro-units: the unscaled value of the ``decimal`` (bytes, precision 28,
  scale 6), converted with ``int.from_bytes``/``int.to_bytes`` (big-endian two's complement,
  the shortest length, as fastavro writes a ``Decimal``).

The hottest records also have a hand-written Avro binary path here (Avro 1.11 specification,
"Binary encoding": zig-zag varints, length-prefixed strings and bytes, arrays as one block then 0),
cheaper per record than fastavro's general reader and writer (about 2-3x for an event, a revision;
``benchmarks/windowing.py``). Varints of times seen lately are remembered (bounded caches): an
interval's times and a file's version repeat across events.

- ``EventReader`` reads a ``UsageEvent`` of the current schema itself when every string and the
  value are shorter than 64 bytes and every time fits 9 varint bytes (every real event); anything
  else (another writer schema, a long field, corrupt or truncated bytes) goes through
  ``Codec.decode_plain``, which gives the result or the ``DecodeError``;
- ``WindowWire`` writes window heads, events entries and window revisions by hand when their
  schemas are the ones it knows (``_shape``), and hands every value it cannot write (a string of
  4 KiB or more, a number beyond the Avro type, a value of the wrong type) to
  ``Codec.encode_plain``, so the bytes and the errors are the codec's.

``tests/unit/test_windowing_wire.py`` checks both against fastavro byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from pipeline import avrowire as aw
from pipeline.codec import Codec, DecodeError
from pipeline.windowing import windows as w

# what Codec.decode accepts: datetime's range in epoch ms, and decimals of ≤ 28 digits (precision 28)
_MIN_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_MAX_UNSCALED = 10**28
OLD_WM_KEY = b"wm"  # format 3: the partition watermark; dropped on upgrade (series clocks replace it)
WIN_PREFIX = b"w|"  # + <window id>: the head of a hot window
EVENTS_PREFIX = b"i|"  # + <window id>|<first input offset>: a WindowEvents entry
ARCHIVE_PREFIX = b"x|"  # + <window id>: an archived window (WindowArchive)
CLOCK_PREFIX = b"s|"  # + <account>|<series>|: a series clock (SeriesClockState)


def key_prefix(account: str, series: str) -> bytes:
    """The store key of a window of (account, series) without its start: ``WIN_PREFIX`` + ``account|series|``."""
    return WIN_PREFIX + f"{account}|{series}|".encode()


def clock_key(window_key_prefix: bytes) -> bytes:
    """The store key of the clock of the series whose windows' keys start with ``window_key_prefix``
    (``key_prefix``): ``s|account|series|``. It also names the series in the processor's tables."""
    return CLOCK_PREFIX + window_key_prefix[len(WIN_PREFIX):]


def archive_key(window_key: bytes) -> bytes:
    """The store key of the archive of the window whose head is (or was) at ``window_key``."""
    return ARCHIVE_PREFIX + window_key[len(WIN_PREFIX):]


def nem12_event_id(series: str, event_ms: int) -> str | None:
    """The event id ingest gives a NEM12/NEM13 interval of ``series`` (``NMI/suffix``) starting at
    ``event_ms``: ``nem12:<NMI>:<suffix>:<start, YYYY-MM-DDTHH:MMZ>`` (``MeterReading.identity``);
    ``None`` for a series that is not a meter channel. Archives leave such ids out."""
    nmi, sep, suffix = series.partition("/")
    if not sep or "/" in suffix or ":" in series:
        return None
    return f"nem12:{nmi}:{suffix}:{w._dt(event_ms):%Y-%m-%dT%H:%MZ}"


def micro_of(unscaled: bytes, from_bytes: Callable[..., int] = int.from_bytes) -> int:
    """Micro-units of the base form of an Avro ``decimal`` (bytes, scale 6): its unscaled value,
    big-endian two's complement (Avro 1.11 specification, "Decimal")."""
    return from_bytes(unscaled, "big", signed=True)


def unscaled_of(micro: int) -> bytes:
    """The base form of an Avro ``decimal`` (bytes, precision 28, scale 6) of ``micro`` micro-units:
    the unscaled value in big-endian two's complement, as short as fastavro writes it for the
    equivalent ``Decimal``. ``ValueError`` beyond 28 digits (as ``Codec.encode``)."""
    if not -_MAX_UNSCALED < micro < _MAX_UNSCALED:
        raise ValueError(f"decimal {w.to_decimal(micro)} has more than 28 digits")
    return micro.to_bytes((abs(micro).bit_length() + 8) // 8, "big", signed=True)


# --- the hand-written Avro binary path (module doc) -----------------------------------------------------
_new = tuple.__new__
_INT32 = 1 << 31
_long = aw.long_bytes  # the shared Avro primitives (pipeline.avrowire)
_SIZES = aw.SIZES
_long_seen = aw.long_bytes_seen
_shape = aw.shape


def _int(v: int) -> bytes:
    """An Avro ``int`` (``OverflowError`` beyond 32 bits: the codec then decides)."""
    if not -_INT32 <= v < _INT32:
        raise OverflowError(v)
    return _long(v)


def _boolean(v: bool) -> bytes:
    """An Avro ``boolean``: one byte, 1 or 0."""
    if type(v) is not bool:
        raise TypeError(type(v))
    return b"\x01" if v else b"\x00"


def _put_strings(out: list[bytes], strings: Iterable[str]) -> None:
    """Append the Avro ``string`` of each of ``strings`` to ``out`` (``IndexError`` at 4 KiB or more,
    ``AttributeError`` for what is not a string: the caller's general path decides)."""
    for v in strings:
        b = v.encode()
        out.append(_SIZES[len(b)])
        out.append(b)


def _string_parts(v: str) -> tuple[bytes, bytes]:
    """The Avro ``string`` of ``v`` as (length, UTF-8 bytes); errors as ``_put_strings``."""
    b = v.encode()
    return _SIZES[len(b)], b


def _put_string_array(out: list[bytes], strings: list[str]) -> None:
    """Append an Avro ``array`` of strings to ``out`` as fastavro writes it (one block, then 0)."""
    if type(strings) not in (list, tuple):
        raise TypeError(type(strings))
    if strings:
        out.append(_long(len(strings)))
        _put_strings(out, strings)
    out.append(b"\x00")


_WINDOW_PARTS: dict[tuple[Any, ...], bytes] = {}  # see _window_part
_ARRAYS: dict[tuple[Any, ...], bytes] = {}  # see _string_array


def _window_part(window_id: str, account: str, series: str, metric: str, unit: str, start: int, end: int) -> bytes:
    """The Avro of the five strings and two longs a window head and a window revision both start with
    (``_HEAD_SHAPE``, ``_REVISION_SHAPE``), remembered (at most 65,536 windows): a window's head and
    its revision are written at the same emission. Errors as ``_put_strings`` and ``_long`` (nothing
    is remembered then); ``TypeError`` for times that are not ``int``."""
    if type(start) is not int or type(end) is not int:
        raise TypeError("window bounds must be int")
    key = (window_id, account, series, metric, unit, start, end)
    got = _WINDOW_PARTS.get(key)
    if got is None:
        out: list[bytes] = []
        _put_strings(out, (window_id, account, series, metric, unit))
        out += (_long(start), _long(end))
        got = b"".join(out)
        if len(_WINDOW_PARTS) >= 65_536:
            _WINDOW_PARTS.clear()
        _WINDOW_PARTS[key] = got
    return got


def _string_array(strings: list[str]) -> bytes:
    """``_put_string_array`` as bytes, remembered (at most 65,536 arrays): a window's qualities and
    sources repeat from revision to revision."""
    if type(strings) not in (list, tuple):
        raise TypeError(type(strings))
    key = tuple(strings)
    got = _ARRAYS.get(key)
    if got is None:
        out: list[bytes] = []
        _put_string_array(out, strings)
        got = b"".join(out)
        if len(_ARRAYS) >= 65_536:
            _ARRAYS.clear()
        _ARRAYS[key] = got
    return got


# UsageEvent as EventReader reads it by hand (``_shape`` of the current schema)
_EVENT_SHAPE = [
    ("event_id", "string"), ("account", "string"), ("series", "string"), ("metric", "string"), ("unit", "string"),
    ("event_time", "long"), ("event_end", "long"), ("value", "bytes"), ("version", "long"), ("quality", "string"),
    ("source", "string"),
]


# --- usage events in ----------------------------------------------------------------------------------
class PlainEvent(NamedTuple):
    """What the windowing stage uses of a ``UsageEvent``: times in epoch ms UTC, ``value`` in
    micro-units (``event_end`` is checked, not kept), ``key_prefix`` the start of its window's
    store key (``WIN_PREFIX`` + ``account|series|``)."""

    event_id: str
    account: str
    series: str
    metric: str
    unit: str
    event_time: int
    value: int
    version: int
    quality: str
    source: str
    key_prefix: bytes


class EventReader:
    """``UsageEvent`` bytes → ``PlainEvent``: by hand for the current schema (module doc), else
    through ``Codec.decode_plain`` (fastavro).

    Accepts and rejects what ``Codec.decode(data, UsageEvent)`` does: besides the codec's own
    checks (marker, fingerprint, body, trailing bytes), a time outside ``datetime``'s range or a
    decimal of more than 28 digits raises ``DecodeError`` as there. Every ``UsageEvent`` schema
    (current and ``schemas/history``) has scale 6, so the unscaled value is the micro-units. The
    hand-written path returns only what the codec's path would return for the same bytes; on
    anything unusual it steps aside and the codec's path decides.
    """

    def __init__(self, codec: Codec) -> None:
        self._decode = codec.decode_plain
        fields = codec.schema("UsageEvent")["fields"]
        same = _shape(fields) == _EVENT_SHAPE
        self._header = codec.header("UsageEvent") if same else None

    def __call__(self, data: bytes) -> PlainEvent:
        if self._header is not None and type(data) is bytes and data[:10] == self._header:
            try:
                got = _read_event(data)
            except (IndexError, OverflowError, UnicodeDecodeError):
                got = None
            if got is not None:
                return got
        d = self._decode(data, "UsageEvent")
        event_time, version, value = d["event_time"], d["version"], micro_of(d["value"])
        if not (_MIN_MS <= event_time <= _MAX_MS and _MIN_MS <= d["event_end"] <= _MAX_MS
                and _MIN_MS <= version <= _MAX_MS):
            raise DecodeError("invalid UsageEvent: a time outside 0001-01-01 .. 9999-12-31")
        if not -_MAX_UNSCALED < value < _MAX_UNSCALED:
            raise DecodeError("invalid UsageEvent: value has more than 28 digits")
        account, series = d["account"], d["series"]
        return tuple.__new__(PlainEvent, (d["event_id"], account, series, d["metric"], d["unit"], event_time, value,
                                          version, d["quality"], d["source"], key_prefix(account, series)))


# Avro longs read lately, by the bytes they start (``_longs``): an interval's times and a file's version repeat
_TIMES: dict[bytes, tuple[int, int, int]] = {}  # event_time and event_end
_VERSIONS: dict[bytes, tuple[int, int, int]] = {}  # version
_LONGS_MAX = 65_536


def _longs(seen: dict[bytes, tuple[int, int, int]], data: bytes, p: int, width: int,
           count: int) -> tuple[int, int, int]:
    """``count`` (1 or 2) Avro longs at ``data[p]``: (first, second or 0, position after them). The
    same ``width`` bytes always read the same way when the varints end within them (each ends at its
    first byte below 0x80), so such readings are remembered, by those bytes (events of one interval
    share their times, events of one file their version), in ``seen`` (one per ``width`` and ``count``).
    ``IndexError``/``OverflowError`` as ``avrowire.read_long``."""
    window = data[p:p + width]
    got = seen.get(window)
    if got is not None:
        return got[0], got[1], p + got[2]
    first, q = aw.read_long(data, p)
    second = 0
    if count == 2:
        second, q = aw.read_long(data, q)
    if q - p <= len(window):  # they ended inside the window: remember it
        if len(seen) >= _LONGS_MAX:
            seen.clear()
        seen[window] = (first, second, q - p)
    return first, second, q


_SERIES: dict[bytes, tuple[str, str, str, str, bytes]] = {}  # account..unit bytes → the strings, key prefix
_TAILS: dict[bytes, tuple[str, str]] = {}  # quality and source bytes (the end of an event) → the strings
_VALUES: dict[bytes, int] = {}  # a value's bytes (length byte included) → micro-units


def _series_of(segment: bytes) -> tuple[str, str, str, str, bytes] | None:
    """(account, series, metric, unit, key prefix) of the four Avro strings ``segment`` holds exactly
    (each shorter than 64 bytes, as ``_read_event`` checked), remembered (at most 65,536) in
    ``_SERIES``; ``None`` when they do not end where the segment does. ``UnicodeDecodeError`` as
    ``bytes.decode``."""
    strings = []
    p = 0
    for _ in range(4):
        q = p + 1 + (segment[p] >> 1)
        strings.append(segment[p + 1:q])
        p = q
    if p != len(segment):
        return None
    account, series, metric, unit = strings
    got = (account.decode(), series.decode(), metric.decode(), unit.decode(),
           WIN_PREFIX + account + b"|" + series + b"|")
    if len(_SERIES) >= _LONGS_MAX:
        _SERIES.clear()
    _SERIES[segment] = got
    return got


def _tail_of(tail: bytes) -> tuple[str, str] | None:
    """(quality, source) of the two Avro strings ``tail`` holds exactly, each shorter than 64 bytes,
    remembered (at most 65,536) in ``_TAILS``; ``None`` for anything else (bytes left over, a
    longer or negative length). ``IndexError`` (truncated) and ``UnicodeDecodeError`` as there."""
    n = tail[0]
    if n > 0x7F or n & 1:
        return None
    q = 1 + (n >> 1)
    n = tail[q]
    if n > 0x7F or n & 1 or q + 1 + (n >> 1) != len(tail):
        return None
    got = tail[1:q].decode(), tail[q + 1:].decode()
    if len(_TAILS) >= _LONGS_MAX:
        _TAILS.clear()
    _TAILS[tail] = got
    return got


def _read_event(data: bytes, from_bytes: Callable[..., int] = int.from_bytes) -> PlainEvent | None:
    """The ``PlainEvent`` of the body of a current-schema ``UsageEvent`` (after its 10-byte header),
    read by hand (``_EVENT_SHAPE``), or ``None`` when the general path must decide: a string or the
    value of 64 bytes or more, bytes left over, a value out of range. ``IndexError`` (truncated),
    ``OverflowError`` (a varint beyond 10 bytes or 64 bits) and ``UnicodeDecodeError`` mean the same.
    A length byte ``n`` below 0x80 with its low bit clear is the length ``n >> 1`` (zig-zag).

    What repeats from event to event is read once and remembered by its bytes (bounded caches): the
    series' strings (account, series, metric, unit) with its key prefix, the times, the value, the
    version, and the quality with the source; the same bytes always read the same way."""
    n = data[10]
    if n > 0x7F or n & 1:  # 64 bytes or more, or a negative length
        return None
    s = p = 11 + (n >> 1)  # the event id ends, the account starts
    n = data[p]
    if n > 0x7F or n & 1:
        return None
    p += 1 + (n >> 1)
    n = data[p]
    if n > 0x7F or n & 1:
        return None
    p += 1 + (n >> 1)
    n = data[p]
    if n > 0x7F or n & 1:
        return None
    p += 1 + (n >> 1)
    n = data[p]
    if n > 0x7F or n & 1:
        return None
    p += 1 + (n >> 1)
    if p > len(data):  # truncated inside the unit
        return None
    segment = data[s:p]
    names = _SERIES.get(segment) or _series_of(segment)
    if names is None:
        return None
    got = _TIMES.get(data[p:p + 12])  # _longs(_TIMES, data, p, 12, 2), its remembered case inline
    if got is not None:
        event_time, event_end, p = got[0], got[1], p + got[2]
    else:
        event_time, event_end, p = _longs(_TIMES, data, p, 12, 2)  # 6 bytes each from 1971 to 2109
    n = data[p]
    if n > 0x7F or n & 1:
        return None
    q = p + 1 + (n >> 1)
    raw_value = data[p:q]
    value = _VALUES.get(raw_value)
    if value is None:
        if q > len(data):
            return None
        value = from_bytes(raw_value[1:], "big", signed=True)
        if len(_VALUES) >= _LONGS_MAX:
            _VALUES.clear()
        _VALUES[raw_value] = value
    got = _VERSIONS.get(data[q:q + 6])
    if got is not None:
        version, p = got[0], q + got[2]
    else:
        version, _, p = _longs(_VERSIONS, data, q, 6, 1)
    tail = data[p:]
    strings = _TAILS.get(tail) or _tail_of(tail)
    if strings is None or not (_MIN_MS <= event_time <= _MAX_MS and _MIN_MS <= event_end <= _MAX_MS
                               and _MIN_MS <= version <= _MAX_MS and -_MAX_UNSCALED < value < _MAX_UNSCALED):
        return None
    account, series, metric, unit, prefix = names
    return _new(PlainEvent, (data[11:s].decode(), account, series, metric, unit, event_time, value, version,
                             strings[0], strings[1], prefix))


# --- window state ⇄ changelog, window revisions out ---------------------------------------------------
def events_key(window_key: bytes, first_offset: int) -> bytes:
    """The store key of the events a batch added to the window stored at ``window_key``
    (``w|<window id>``): ``i|<window id>|<first input offset, 20 digits>``, so a window's entries
    share the prefix ``events_prefix`` and sort in input order. A replayed batch writes the same key."""
    return events_prefix(window_key) + b"%020d" % first_offset


def events_prefix(window_key: bytes) -> bytes:
    """The key prefix of every events entry of the window stored at ``window_key``."""
    return EVENTS_PREFIX + window_key[len(WIN_PREFIX):] + b"|"


# the schemas WindowWire writes by hand (``_shape``); another schema goes through the codec
_HEAD_SHAPE = [
    ("window_id", "string"), ("account", "string"), ("series", "string"), ("metric", "string"), ("unit", "string"),
    ("start_ms", "long"), ("end_ms", "long"), ("aggregation", "string"), ("revision", "int"),
    ("emitted_value", "bytes"), ("dirty", "boolean"), ("late", "boolean"),
]
_REVISION_SHAPE = [
    ("window_id", "string"), ("account", "string"), ("series", "string"), ("metric", "string"), ("unit", "string"),
    ("window_start", "long"), ("window_end", "long"), ("revision", "int"), ("timing", ("enum", ("ON_TIME", "LATE"))),
    ("value", "bytes"), ("delta", "bytes"), ("count", "int"), ("qualities", ("array", "string")),
    ("sources", ("array", "string")), ("watermark", "long"),
]
_CLOCK_SHAPE = [("max_event_ms", "long"), ("watermark_ms", "long"), ("closed_through_ms", "long"), ("metric", "string")]
_TIMING = {"ON_TIME": _long(0), "LATE": _long(1)}  # the enum's index


class WindowWire:
    """Window state (changelog) and window revisions (``usage.windows``) as plain datums for the codec.

    A window is stored as a head, ``state``/``read_state``: ``WindowState`` without its intervals
    ⇄ a ``WindowHead`` record (``schemas/window_head.avsc``), written only when it changes; and
    one ``WindowEvents`` entry (``schemas/window_events.avsc``) per batch that changed it,
    ``events``: the ``UsageEvent`` records it accepted, exactly as consumed. ``intervals`` folds
    a window's entries back into its intervals. So a batch costs one small entry per window it
    touched, however many intervals the window holds.

    ``revision``: the ``UsageWindow`` record of a revision: the same bytes as ``Codec.encode`` of
    the equivalent ``UsageWindow``. ``ValueError`` (from the codec or ``unscaled_of``) for values
    the schemas cannot hold.
    """

    def __init__(self, codec: Codec) -> None:
        self._encode = codec.encode_plain
        self._decode = codec.decode_plain
        self._read = EventReader(codec)
        known = [(f["name"], f["type"]) for f in codec.schema("WindowEvents")["fields"]] == \
            [("events", {"type": "array", "items": "bytes"})]
        self._events_header = codec.header("WindowEvents") if known else None
        known = _shape(codec.schema("WindowHead")["fields"]) == _HEAD_SHAPE
        self._head_header = codec.header("WindowHead") if known else None
        known = _shape(codec.schema("UsageWindow")["fields"]) == _REVISION_SHAPE
        self._revision_header = codec.header("UsageWindow") if known else None

    def state(self, s: w.WindowState) -> bytes:
        """The changelog value of a window's head (everything but its intervals): by hand when the
        schema is the one known here (``_HEAD_SHAPE``), the same bytes as ``Codec.encode_plain``."""
        if self._head_header is not None:
            try:
                emitted = unscaled_of(s.emitted)
                return b"".join((self._head_header,
                                 _window_part(s.window_id, s.account, s.series, s.metric, s.unit, s.start_ms, s.end_ms),
                                 *_string_parts(s.aggregation), _int(s.revision), _SIZES[len(emitted)], emitted,
                                 _boolean(s.dirty), _boolean(s.late)))
            except (IndexError, TypeError, ValueError, OverflowError, AttributeError, UnicodeError):
                pass  # the codec writes it, or says why not
        return self._encode({
            "window_id": s.window_id, "account": s.account, "series": s.series, "metric": s.metric, "unit": s.unit,
            "start_ms": s.start_ms, "end_ms": s.end_ms, "aggregation": s.aggregation, "revision": s.revision,
            "emitted_value": unscaled_of(s.emitted), "dirty": s.dirty, "late": s.late,
        }, "WindowHead")

    def read_state(self, raw: bytes) -> w.WindowState:
        """The ``WindowState`` of a head, its ``intervals`` ``None`` (not loaded); ``DecodeError``
        if it is not one."""
        d = self._decode(raw, "WindowHead")
        return w.WindowState(
            d["window_id"], d["account"], d["series"], d["metric"], d["unit"], d["start_ms"], d["end_ms"],
            d["aggregation"], None, d["revision"], micro_of(d["emitted_value"]), d["dirty"], d["late"],
        )

    def archive(self, s: w.WindowState) -> bytes:
        """The ``WindowArchive`` record of a window with its intervals loaded: its head and the
        highest version of each interval, compactly (NEM12 ids left out, sources listed once)."""
        sources: dict[str, int] = {}
        intervals = []
        previous = 0
        for event_id, iv in s.intervals.items():
            intervals.append({
                "id": None if event_id == nem12_event_id(s.series, iv.event_ms) else event_id,
                "offset_ms": iv.event_ms - s.start_ms, "version_step_ms": iv.version_ms - previous,
                "value": unscaled_of(iv.value), "quality": iv.quality,
                "source": sources.setdefault(iv.source, len(sources)),
            })
            previous = iv.version_ms
        return self._encode({
            "account": s.account, "series": s.series, "metric": s.metric, "unit": s.unit, "start_ms": s.start_ms,
            "end_ms": s.end_ms, "aggregation": s.aggregation, "revision": s.revision,
            "emitted_value": unscaled_of(s.emitted), "sources": list(sources), "intervals": intervals,
        }, "WindowArchive")

    def read_archive(self, raw: bytes) -> w.WindowState:
        """The clean ``WindowState`` (intervals loaded) of a ``WindowArchive`` record; ``DecodeError``
        if it is not one."""
        d = self._decode(raw, "WindowArchive")
        series, start, sources = d["series"], d["start_ms"], d["sources"]
        held: dict[str, w.Interval] = {}
        version = 0
        for iv in d["intervals"]:
            event_ms = start + iv["offset_ms"]
            event_id = iv["id"] if iv["id"] is not None else nem12_event_id(series, event_ms)
            if event_id is None:
                raise DecodeError(f"archived interval of {series!r} has no id")
            version += iv["version_step_ms"]
            held[event_id] = w.Interval(version, micro_of(iv["value"]), iv["quality"], sources[iv["source"]],
                                        event_ms)
        return w.WindowState(
            w.window_id(d["account"], series, start), d["account"], series, d["metric"], d["unit"], start,
            d["end_ms"], d["aggregation"], held, d["revision"], micro_of(d["emitted_value"]), False, False,
        )

    def fresh_window(self, entries: list[bytes], policy: Callable[[str], w.WindowPolicy]) -> w.WindowState:
        """The live state of a window created on time and never emitted, from its ``WindowEvents``
        entries (in key order) alone: its fields from its first event, its intervals folded, pending
        (dirty), revision −1. ``policy``: metric → its window policy (size, aggregation). ``DecodeError``
        on an entry that is not one."""
        first = self._read(self._decode(entries[0], "WindowEvents")["events"][0])
        pol = policy(first.metric)
        state = w.new_window(first.account, first.series, first.metric, first.unit, first.event_time, pol)
        state.intervals = self.intervals(entries)
        state.dirty = True
        return state

    def events(self, raws: list[bytes]) -> bytes:
        """The ``WindowEvents`` entry of the ``UsageEvent`` records ``raws`` (as consumed, in order):
        written by hand (one array block, then 0) when the schema is the one known here, the same
        bytes as ``Codec.encode_plain``."""
        if self._events_header is not None and raws:
            try:
                sizes = _SIZES
                return b"".join([self._events_header, _long(len(raws)),
                                 *[x for raw in raws for x in (sizes[len(raw)], raw)], b"\x00"])
            except (IndexError, TypeError):  # 4 KiB or more, or not bytes: the codec writes them
                pass
        return self._encode({"events": raws}, "WindowEvents")

    def intervals(self, entries: Iterable[bytes], base: dict[str, w.Interval] | None = None) -> dict[str, w.Interval]:
        """A window's intervals from its ``WindowEvents`` entries in key (input) order, folded onto
        ``base`` (the intervals of its archive, if it was brought back from one): each event as the
        processor takes it (``EventReader``), the highest version of each event id kept (SPEC §2), in
        first-seen order. ``DecodeError`` on an entry or event that is not one."""
        read = self._read
        held: dict[str, w.Interval] = dict(base) if base else {}
        for entry in entries:
            for raw in self._decode(entry, "WindowEvents")["events"]:
                ev = read(raw)
                iv = w.Interval(ev.version, ev.value, ev.quality, ev.source, ev.event_time)
                if w.supersedes(held.get(ev.event_id), iv):
                    held[ev.event_id] = iv
        return held

    def revision(self, rev: w.Revision) -> bytes:
        """The ``UsageWindow`` record of ``rev``: by hand when the schema is the one known here
        (``_REVISION_SHAPE``), the same bytes as ``Codec.encode_plain``."""
        if self._revision_header is not None:
            try:
                value, delta = unscaled_of(rev.value), unscaled_of(rev.delta)
                return b"".join((
                    self._revision_header,
                    _window_part(rev.window_id, rev.account, rev.series, rev.metric, rev.unit, rev.start_ms,
                                 rev.end_ms),
                    _int(rev.revision), _TIMING[rev.timing], _SIZES[len(value)], value, _SIZES[len(delta)], delta,
                    _int(rev.count), _string_array(rev.qualities), _string_array(rev.sources),
                    _long_seen(rev.watermark_ms)))
            except (KeyError, IndexError, TypeError, ValueError, OverflowError, AttributeError, UnicodeError):
                pass  # the codec writes it, or says why not
        return self._encode({
            "window_id": rev.window_id, "account": rev.account, "series": rev.series, "metric": rev.metric,
            "unit": rev.unit, "window_start": rev.start_ms, "window_end": rev.end_ms, "revision": rev.revision,
            "timing": rev.timing, "value": unscaled_of(rev.value), "delta": unscaled_of(rev.delta),
            "count": rev.count, "qualities": rev.qualities, "sources": rev.sources, "watermark": rev.watermark_ms,
        }, "UsageWindow")


def state_codec(codec: Codec) -> tuple[Callable[[bytes, Any], bytes], Callable[[bytes, bytes], Any]]:
    """``(encode, decode)`` for the windowing store (format 4): ``s|<account>|<series>|`` →
    ``SeriesClock`` (``SeriesClockState``), ``w|<window id>`` → ``WindowState`` head (``WindowHead``,
    see ``WindowWire``), ``i|…`` (``WindowEvents``) and ``x|…`` (``WindowArchive``) → their bytes,
    unchanged (encoded by the processor, staged with ``put_raw``). The format 3 partition watermark
    (``wm``) decodes to ``None``: the processor drops it (series clocks replace it).

    ``decode`` raises ``DecodeError`` on bytes that are not such a state (a head of format 2
    included, see ``docs/semantics.md``).
    """
    wire = WindowWire(codec)
    known = _shape(codec.schema("SeriesClockState")["fields"]) == _CLOCK_SHAPE
    clock_header = codec.header("SeriesClockState") if known else None

    def encode(key: bytes, value: Any) -> bytes:
        prefix = key[:2]
        if prefix == CLOCK_PREFIX:
            if clock_header is not None:
                try:
                    return b"".join((clock_header, _long_seen(value.max_event_ms), _long_seen(value.watermark_ms),
                                     _long_seen(value.closed_through_ms), *_string_parts(value.metric)))
                except (IndexError, TypeError, OverflowError, AttributeError, UnicodeError):
                    pass  # the codec writes it, or says why not
            return codec.encode_plain(value._asdict(), "SeriesClockState")
        if prefix in (EVENTS_PREFIX, ARCHIVE_PREFIX):
            return value  # type: ignore[no-any-return]
        return wire.state(value)

    def decode(key: bytes, raw: bytes) -> Any:
        prefix = key[:2]
        if prefix == CLOCK_PREFIX:
            d = codec.decode_plain(raw, "SeriesClockState")
            return w.SeriesClock(d["max_event_ms"], d["watermark_ms"], d["closed_through_ms"], d["metric"])
        if prefix in (EVENTS_PREFIX, ARCHIVE_PREFIX):
            return raw
        if key == OLD_WM_KEY:
            return None
        try:
            return wire.read_state(raw)
        except DecodeError as exc:
            raise DecodeError(f"windowing state entry {key!r} is not a window head of format 3 or 4 ({exc}); a "
                              "changelog of an older format cannot be restored (docs/semantics.md)") from exc

    return encode, decode
