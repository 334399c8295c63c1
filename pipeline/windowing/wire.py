"""Records of the windowing stage: usage events in, window revisions out, window state ⇄ changelog.

Every format is Avro single-object encoding, encoded and decoded by fastavro through
``pipeline.codec`` (Avro 1.11 specification). The hot path uses the codec's *plain* datums
(``Codec.decode_plain`` / ``Codec.encode_plain``: logical types in their Avro base form), so no
``datetime`` or ``Decimal`` is built per event (SPEC §3; throughput in ``benchmarks/windowing.py``):

- times are epoch milliseconds UTC (``timestamp-millis`` base form: ``long``);
- quantities are integer micro-units: the unscaled value of the ``decimal`` (bytes, precision 28,
  scale 6), converted with ``int.from_bytes``/``int.to_bytes`` (big-endian two's complement,
  the shortest length, as fastavro writes a ``Decimal``).

This module only converts values; it writes and reads no Avro bytes itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

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
    """``UsageEvent`` bytes → ``PlainEvent``, through ``Codec.decode_plain`` (fastavro).

    Accepts and rejects what ``Codec.decode(data, UsageEvent)`` does: besides the codec's own
    checks (marker, fingerprint, body, trailing bytes), a time outside ``datetime``'s range or a
    decimal of more than 28 digits raises ``DecodeError`` as there. Every ``UsageEvent`` schema
    (current and ``schemas/history``) has scale 6, so the unscaled value is the micro-units.
    """

    def __init__(self, codec: Codec) -> None:
        self._decode = codec.decode_plain

    def __call__(self, data: bytes) -> PlainEvent:
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


# --- window state ⇄ changelog, window revisions out ---------------------------------------------------
def events_key(window_key: bytes, first_offset: int) -> bytes:
    """The store key of the events a batch added to the window stored at ``window_key``
    (``w|<window id>``): ``i|<window id>|<first input offset, 20 digits>``, so a window's entries
    share the prefix ``events_prefix`` and sort in input order. A replayed batch writes the same key."""
    return events_prefix(window_key) + b"%020d" % first_offset


def events_prefix(window_key: bytes) -> bytes:
    """The key prefix of every events entry of the window stored at ``window_key``."""
    return EVENTS_PREFIX + window_key[len(WIN_PREFIX):] + b"|"


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

    def state(self, s: w.WindowState) -> bytes:
        """The changelog value of a window's head (everything but its intervals)."""
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
        """The ``WindowEvents`` entry of the ``UsageEvent`` records ``raws`` (as consumed, in order)."""
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
        """The ``UsageWindow`` record of ``rev``."""
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

    def encode(key: bytes, value: Any) -> bytes:
        prefix = key[:2]
        if prefix == CLOCK_PREFIX:
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
