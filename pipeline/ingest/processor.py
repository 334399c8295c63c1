"""The ingest stage: meter readings and telemetry CloudEvents → usage events keyed by account.

Two input topics, one stage (SPEC §1): ``meter.readings`` (Avro ``MeterReading``, key NMI) and
``telemetry.events`` (CloudEvents, Kafka protocol binding; ``pipeline.ingest.telemetry``). Resolves
NMI → account from the effective-dated service-point registry and subject → account from the
telemetry subjects; turns the NEM12 channel or the event type into a metric.

Every input record gets exactly one outcome (counted in ``counts`` and in the Prometheus counter
``pipeline_ingest_records_total{input, outcome, reason}``):

- ``accepted``: forwarded to ``usage.events``;
- ``superseded``: a meter interval (NMI, suffix, interval start) already forwarded with a lower
  version: forwarded too, windowing replaces the value (SPEC §2);
- ``duplicate``: a meter interval with an equal or lower version than one forwarded, or a
  telemetry (source, id) already forwarded: dropped, it would change nothing (SPEC §2);
- ``refused``: an explicit billing rule refused it: ``OUTSIDE_SERVICE_DATES`` (the meter or subject
  is known, but no service point of any account covered the reading's date): sent to ``usage.late``
  with the original record, so that ``pipeline late replay`` re-submits it once the service point is
  fixed (SPEC §3);
- ``dead_lettered``: sent to ``dlq.ingest`` with the original bytes, headers, a reason code and the
  stage; nothing stops the stage (SPEC §1);
- ``marker``: a gateway's completion marker (``SeriesComplete``), forwarded to ``usage.events`` as a
  ``SeriesMarker`` of the meter channel's account (SPEC §3).

Duplicate detection keeps state through ``ctx.store`` (RocksDB + the compacted changelog
``ingest.state.changelog``, committed in the batch's Kafka transaction like windowing):
``t|<identity bytes>`` → first-seen event time, ``m|<nmi>\\0<suffix>\\0<start ms>`` → (interval end,
highest version), ``c|m`` / ``c|t`` → the partition's event-time clock of meter readings / telemetry.
The clock is highest event time − out-of-orderness, never backwards, moved only by data (never by
processing time: a paused gateway or a restart changes nothing). An identity is forgotten once the
clock passes its horizon: a telemetry id ``dedupe horizon`` after its event time, a meter interval
``PIPELINE_METER_DEDUPE_HORIZON_DAYS`` after its end. An input older than its horizon is forwarded
as ``accepted``: windowing, which keeps every window (hot or archived), then finds it a duplicate or
bills it.

Throughput (issue 13): ``process_batch`` takes an ordinary meter reading (current schema, accepted,
superseded or duplicate) through a hot path that reads and writes the Avro by hand (``pipeline.ingest.wire``:
integer milliseconds and micro-units, byte-identical to ``Codec``), memoizes what the channel, the file
and the NMI's service point give, and builds no dataclass; anything else, and any reading the hot path
does not accept at once, takes the general path (``check_reading``, ``to_usage_event``), which decides it
exactly as before. ``tests/unit/test_ingest_wire.py`` proves the two paths forward, keep and count the same.
Both paths read the store only for an identity the partition holds (``_Partition.held``, the keys of the expiry
heaps): a new identity costs no RocksDB read (``tests/unit/test_ingest_held.py``).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple

from prometheus_client import Counter

from pipeline.codec import Codec, DecodeError
from pipeline.config import Settings
from pipeline.ingest.nem13 import is_register_correction
from pipeline.ingest.telemetry import OutsideServiceDates, RejectedInput, identity_bytes, read_cloudevent
from pipeline.ingest.telemetry import to_usage_event as telemetry_usage_event
from pipeline.ingest.wire import (
    SMALL_LONGS,
    avro_decimal,
    avro_long,
    avro_string,
    read_head,
    read_seen,
    read_tail,
    seen_bytes,
    split_reading,
)
from pipeline.money import quantity
from pipeline.records import QUALITY_FLAGS, LateEvent, MeterReading, SeriesComplete, SeriesMarker, UsageEvent
from pipeline.reference import ReferenceData
from pipeline.runtime import timing
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import Context, ProcessorBase, dead_letter
from pipeline.topology import Topics

log = logging.getLogger(__name__)

NEM_TIME = timezone(timedelta(hours=10))  # MDFF times are AEST all year
NEM_OFFSET_MS = 10 * 3_600_000
DAY_MS = 86_400_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)
MAX_ABS_VALUE = Decimal(10) ** 15  # no interval measures this much: a corrupt or hostile value
MAX_ABS_UNSCALED = 10**21  # MAX_ABS_VALUE in micro-units (scale 6)
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
OUTCOMES = Counter("pipeline_ingest_records_total", "ingest records by input, outcome and dead-letter reason",
                   ["input", "outcome", "reason"])
OUTCOME_NAMES = ("accepted", "duplicate", "superseded", "refused", "dead_lettered", "marker")

# NMI suffix first letter → metric (MDFF / NEM12: E import, B export active energy; Q, K reactive)
CHANNEL_METRICS = {"E": "energy_import", "B": "energy_export", "Q": "reactive_import", "K": "reactive_export"}
# unit of measure → (canonical unit, factor)
UNITS = {
    "kwh": ("kWh", Decimal(1)), "wh": ("kWh", Decimal("0.001")), "mwh": ("kWh", Decimal(1000)),
    "kvarh": ("kVArh", Decimal(1)), "varh": ("kVArh", Decimal("0.001")), "mvarh": ("kVArh", Decimal(1000)),
}

_USAGE_FIELDS = tuple(f.name for f in dataclasses.fields(UsageEvent))  # flat: the Avro datum is its fields
_OUTCOME_COUNTERS: dict[tuple[str, str, str], Any] = {}
_ACCOUNT_MEMO = "ingest.account"  # ReferenceData.memo: (NMI, NEM day number) → (account, its Avro string) | None
_MEMO_MAX = 1_000_000  # entries of a memo before it starts again
_MISSING = object()

CLOCK_PREFIX = b"c|"
METER_PREFIX = b"m|"
TELEMETRY_PREFIX = b"t|"
METER, TELEMETRY = "m", "t"
_LABELS = {outcome: (METER, outcome, "") for outcome in ("accepted", "superseded", "duplicate")}  # of the hot path


class RejectedReading(RejectedInput):
    """A reading ingest cannot accept; ``reason`` is the dead-letter reason code."""


def _ms(dt: datetime) -> int:
    return (dt - EPOCH) // MS


def check_reading(reading: MeterReading, now_ms: int, future_bound_ms: int) -> None:
    """Refuse impossible readings (pure; issue 6).

    Raises ``RejectedReading``: ``MISALIGNED_INTERVAL`` when the interval length does not divide a
    day or its start is not a multiple of its length in NEM time (AEST: NEM12 intervals start at
    00:00 + k × length, MDFF spec §4.3); ``FUTURE_EVENT`` when the interval starts after
    ``now_ms + future_bound_ms``; ``VALUE_OUT_OF_RANGE`` when |value| ≥ 10^15.
    """
    start, end = _ms(reading.interval_start), _ms(reading.interval_end)
    length = end - start
    if DAY_MS % length or (start + NEM_OFFSET_MS) % length:
        raise RejectedReading("MISALIGNED_INTERVAL", f"interval {reading.interval_start:%Y-%m-%dT%H:%M:%S.%f}Z of "
                              f"{length / 60_000:g} min is not aligned to the NEM day")
    if start > now_ms + future_bound_ms:
        raise RejectedReading("FUTURE_EVENT", f"interval {reading.interval_start.isoformat()} starts more than "
                              f"{future_bound_ms // 1000} s ahead of the clock")
    if abs(reading.value) >= MAX_ABS_VALUE:
        raise RejectedReading("VALUE_OUT_OF_RANGE", f"interval value {reading.value} is out of range")


def to_usage_event(reading: MeterReading, ref: ReferenceData) -> UsageEvent:
    """Map one reading to a usage event (pure).

    Raises ``RejectedReading`` with reason ``UNKNOWN_NMI`` (no service point ever),
    ``UNSUPPORTED_CHANNEL``, ``UNSUPPORTED_UNIT`` or ``NEGATIVE_VALUE`` (a negative value that is not a day of a
    NEM13 register correction, ``nem13.is_register_correction``: those are credits, docs/semantics.md), and
    ``OutsideServiceDates`` when the NMI has service points but none on the interval's NEM date (a billing
    rule, not bad input).
    """
    nem_day = reading.interval_start.astimezone(NEM_TIME).date()
    account = ref.account_of(reading.nmi, nem_day)
    outside = account is None
    if outside:
        account = ref.nearest_account(reading.nmi, nem_day)
        if account is None:
            raise RejectedReading("UNKNOWN_NMI", f"NMI {reading.nmi!r} has no service point")
    metric = CHANNEL_METRICS.get(reading.suffix[:1].upper())
    if metric is None:
        raise RejectedReading("UNSUPPORTED_CHANNEL", f"channel suffix {reading.suffix!r} is not billed")
    unit = UNITS.get(reading.uom.lower())
    if unit is None:
        raise RejectedReading("UNSUPPORTED_UNIT", f"unit of measure {reading.uom!r} is not supported")
    if reading.value < 0 and not is_register_correction(reading):
        raise RejectedReading("NEGATIVE_VALUE", f"interval value {reading.value} is negative")
    event = UsageEvent(
        event_id=reading.identity,
        account=account,
        series=f"{reading.nmi}/{reading.suffix}",
        metric=metric,
        unit=unit[0],
        event_time=reading.interval_start,
        event_end=reading.interval_end,
        value=quantity(reading.value * unit[1]),
        version=reading.version,
        quality=reading.quality,
        source=f"{reading.source_file}#{reading.source_record}",
    )
    if outside:
        raise OutsideServiceDates(event, f"NMI {reading.nmi} had no service point on {nem_day} (nearest: account "
                                  f"{account}); re-submit with `pipeline late replay` once the service point covers it")
    return event


@dataclass(frozen=True, slots=True)
class IngestRules:
    """Bounds of the ingest stage, milliseconds (see ``from_settings``)."""

    future_bound_ms: int = DAY_MS
    telemetry_horizon_ms: int = 7 * DAY_MS
    meter_horizon_ms: int = 450 * DAY_MS
    out_of_orderness_ms: int = 3_600_000

    @classmethod
    def from_settings(cls, settings: Settings) -> IngestRules:
        """``PIPELINE_FUTURE_BOUND_S``, ``PIPELINE_TELEMETRY_DEDUPE_HORIZON_S``,
        ``PIPELINE_METER_DEDUPE_HORIZON_DAYS``, ``PIPELINE_OUT_OF_ORDERNESS_S``."""
        return cls(
            future_bound_ms=settings.future_bound_s * 1000,
            telemetry_horizon_ms=settings.telemetry_dedupe_horizon_s * 1000,
            meter_horizon_ms=int(settings.meter_dedupe_horizon_days * DAY_MS),
            out_of_orderness_ms=settings.out_of_orderness_s * 1000,
        )


@dataclass(frozen=True, slots=True)
class Clock:
    """Event-time progress of one input kind in one partition (epoch ms); ``watermark_ms`` never decreases."""

    max_event_ms: int
    watermark_ms: int


NO_CLOCK = Clock(-(2**62), -(2**62))


class Seen(NamedTuple):
    """An identity forwarded: ``time_ms`` = telemetry first-seen event time or meter interval end;
    ``version_ms`` = the highest meter version forwarded (the event time for telemetry). Immutable (a named
    tuple: made once per reading forwarded, so its construction is kept cheap)."""

    time_ms: int
    version_ms: int


_new = tuple.__new__  # Seen(a, b) without the keyword handling: _new(Seen, (a, b))


@dataclass
class _Partition:
    clocks: dict[str, Clock]
    expiry: dict[str, list[tuple[int, bytes]]]  # heap of (horizon end, key) per kind
    dirty: set[str] = field(default_factory=set)
    live: set[str] = field(default_factory=set)  # kinds this process has read here since it (re)loaded the state
    # every identity key the store holds (pending writes included): the keys of ``expiry``. A key not in it needs
    # no store read (most readings are new: no RocksDB miss per reading). Exact, as the store of a partition is
    # written by this processor only and the view is rebuilt from the store after a restore or an abort
    held: set[bytes] = field(default_factory=set)


class IngestProcessor(ProcessorBase):
    """Validates meter readings and telemetry CloudEvents, drops duplicates, forwards usage events
    keyed by account; dead-letters the rest. ``counts``: outcome → records; ``reasons``: dead-letter
    reason → records."""

    def __init__(
        self,
        topics: Topics,
        codec: Codec,
        reference: Callable[[], ReferenceData],
        refresh: Callable[[], bool] = lambda: False,
        rules: IngestRules | None = None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.topics = topics
        self.codec = codec
        self.reference = reference
        self.refresh = refresh
        self.rules = rules or IngestRules()
        self.clock_ms = clock_ms
        self.counts: dict[str, int] = {}
        self.reasons: dict[str, int] = {}
        self._parts: dict[int, _Partition] = {}
        self._horizon = {METER: self.rules.meter_horizon_ms, TELEMETRY: self.rules.telemetry_horizon_ms}
        # the hot path of meter readings (``_reading``): headers of the current schemas, memos of derived bytes
        self._reading_header = codec.header("MeterReading")
        self._event_header = codec.header("UsageEvent")
        self._heads: dict[bytes, Any] = {}  # raw nmi+suffix+uom → _head(…)
        self._tails: dict[bytes, Any] = {}  # raw quality … source_file → _tail(…)
        self._stamps: dict[int, bytes] = {}  # interval start ms → its minute in the event id
        self._longs: dict[int, bytes] = {}  # epoch ms → Avro long
        self._decimals: dict[int, bytes] = {}  # micro-units → Avro decimal
        self._tally: dict[tuple[str, str, str], int] | None = None  # outcomes of the batch being processed
        self._arrived: int | None = None  # the arrival time of the last reading forwarded, and its header list
        self._arrived_header: list[tuple[str, bytes]] = []

    # --- ownership ----------------------------------------------------------------------------------
    def on_assign(self, partition: int, ctx: Context) -> None:
        # once per input topic: the store was (re)built from the changelog, read it again
        self._parts.pop(partition, None)
        self._partition(partition, ctx)

    def on_revoke(self, partition: int) -> None:
        # the store may stay open for the other input topic: its state is reloaded with the next record, and
        # only the kinds read from then on are advanced or purged here (the other may be a peer's now)
        self._parts.pop(partition, None)

    def _partition(self, partition: int, ctx: Context) -> _Partition:
        part = self._parts.get(partition)
        if part is None:  # rebuild the in-memory view of the store (after a restore)
            store = ctx.store(partition)
            clocks = {kind: store.get(CLOCK_PREFIX + kind.encode()) or NO_CLOCK for kind in (METER, TELEMETRY)}
            expiry: dict[str, list[tuple[int, bytes]]] = {}
            for kind, prefix in ((METER, METER_PREFIX), (TELEMETRY, TELEMETRY_PREFIX)):
                heap = [(seen.time_ms + self._horizon[kind], key) for key, seen in store.scan(prefix)]
                heapq.heapify(heap)
                expiry[kind] = heap
            held = {key for heap in expiry.values() for _, key in heap}
            part = self._parts[partition] = _Partition(clocks, expiry, held=held)
        return part

    # --- records ------------------------------------------------------------------------------------------
    def process(self, record: Incoming, ctx: Context) -> None:
        """Handle one input record (``process_batch`` of one)."""
        self.process_batch((record,), ctx)

    def process_batch(self, records: Sequence[Incoming], ctx: Context) -> None:
        """Handle ``records`` in order, each as described in the module doc. Per batch: one wall-clock
        reading (``clock_ms``, for ``FUTURE_EVENT``), one reference snapshot (taken again after a record
        that needed the general path, which may refresh it), and the outcome counters incremented once.

        A meter reading in the current ``MeterReading`` schema that is accepted, superseded or a
        duplicate goes the hot path (``_reading``: plain Avro, integer milliseconds and micro-units,
        memoized lookups, no dataclass); every other record, and any reading the hot path does not
        accept at once, goes the general path (``_meter``), which decides it as it always did."""
        tally: dict[tuple[str, str, str], int] = {}
        self._tally = tally
        now = self.clock_ms()
        telemetry = self.topics.telemetry_events
        ref: ReferenceData | None = None
        accounts: dict[Any, Any] = {}
        parts = self._parts
        stores: dict[int, Any] = {}  # the batch's stores (a store is replaced only in a rebalance, between batches)
        reading = self._reading
        try:
            for record in records:
                p = record.partition
                part = parts.get(p) or self._partition(p, ctx)
                if record.topic == telemetry:
                    self._telemetry(record, part, ctx, now)
                    ref = None
                    continue
                if ref is None:
                    ref = self.reference()
                    accounts = ref.memo.get(_ACCOUNT_MEMO)  # type: ignore[assignment]
                    if accounts is None or len(accounts) > _MEMO_MAX:
                        accounts = ref.memo[_ACCOUNT_MEMO] = {}
                store = stores.get(p)
                if store is None:
                    store = stores[p] = ctx.store(p)
                if not reading(record, part, store, ctx, now, ref, accounts):
                    self._meter(record, part, ctx, now)
                    ref = None  # the general path may have refreshed the reference data
        finally:
            self._tally = None
            self._publish(tally)

    def _reading(self, record: Incoming, part: _Partition, store: Any, ctx: Context, now: int, ref: ReferenceData,
                 accounts: dict[Any, Any]) -> bool:
        """The hot path of one meter reading: ``True`` when it was accepted, superseded or a duplicate
        (forwarded, state and counts as ``_meter`` would), ``False`` (nothing done) when the general path
        must decide it. Same checks as ``check_reading`` and ``to_usage_event`` in integer milliseconds and
        micro-units; the ``UsageEvent`` written by ``wire`` (byte-identical to ``Codec.encode``). ``store``:
        ``ctx.store(record.partition)``; the store is read only for an identity ``part.held`` says it holds."""
        value = record.value
        if value is None:
            return False
        parts = split_reading(value, self._reading_header)
        if parts is None:
            return False
        head, start, end, unscaled, tail, source_record, _ = parts
        channel = self._heads.get(head, _MISSING)  # what the NMI, suffix and uom give
        if channel is _MISSING:
            if len(self._heads) > _MEMO_MAX:
                self._heads.clear()
            channel = self._heads[head] = _head(head)
        if channel is None:
            return False  # invalid UTF-8, a channel or unit not billed: the general path
        rest = self._tails.get(tail, _MISSING)  # what quality, version and source file give
        if rest is _MISSING:
            if len(self._tails) > _MEMO_MAX:
                self._tails.clear()
            rest = self._tails[tail] = _tail(tail)
        if rest is None:
            return False  # invalid UTF-8, a version out of range or an unknown quality flag: the general path
        rules = self.rules
        length = end - start
        if length <= 0 or not 0 <= unscaled < MAX_ABS_UNSCALED \
                or DAY_MS % length or (start + NEM_OFFSET_MS) % length or start > now + rules.future_bound_ms:
            return False  # invalid, misaligned, future, negative (a correction?) or out of range: the general path
        nmi, series_metric_unit, num, den, key_prefix, id_prefix = channel  # type: ignore[misc]
        version, version_quality, source_prefix = rest  # type: ignore[misc]
        day = (start + NEM_OFFSET_MS) // DAY_MS  # NEM (AEST) day number
        account = accounts.get((nmi, day), _MISSING)
        if account is _MISSING:
            name = ref.account_of(nmi, date.fromordinal(EPOCH_ORDINAL + day))
            account = accounts[(nmi, day)] = None if name is None else (name, avro_string(name))
        if account is None:
            return False  # unknown NMI or outside its service dates (refused, refreshed): the general path
        part.live.add(METER)
        key = b"%s%d" % (key_prefix, start)
        # _observe, unrolled
        horizon_end = end + rules.meter_horizon_ms
        clock = part.clocks[METER]
        outcome = "accepted"
        if horizon_end > clock.watermark_ms:  # else forgotten or never held: downstream decides
            if key not in part.held:  # most readings: a new identity, nothing to read
                store.put(key, _new(Seen, (end, version)))
                heapq.heappush(part.expiry[METER], (horizon_end, key))
                part.held.add(key)
            else:
                held: Seen | None = store.get(key)
                if held is None:  # (never: part.held is exact) decided as a new identity
                    store.put(key, _new(Seen, (end, version)))
                    heapq.heappush(part.expiry[METER], (horizon_end, key))
                elif version > held.version_ms:
                    store.put(key, _new(Seen, (held.time_ms, version)))
                    outcome = "superseded"
                else:
                    outcome = "duplicate"
        if outcome != "duplicate":
            stamp = self._stamps.get(start)
            if stamp is None:
                if len(self._stamps) > _MEMO_MAX:
                    self._stamps.clear()
                stamp = self._stamps[start] = f"{EPOCH + start * MS:%Y-%m-%dT%H:%MZ}".encode()
            micro = unscaled if num == den else (2 * unscaled * num + den) // (2 * den)  # half-up (SPEC §4)
            decimal = self._decimals.get(micro)
            if decimal is None:
                if len(self._decimals) > _MEMO_MAX:
                    self._decimals.clear()
                decimal = self._decimals[micro] = avro_decimal(micro)
            longs = self._longs
            event_id = id_prefix + stamp
            source = b"%s%d" % (source_prefix, source_record)
            n, m = len(event_id), len(source)
            event = b"".join((
                self._event_header, SMALL_LONGS[n] if n < 64 else avro_long(n), event_id, account[1],  # type: ignore[index]
                series_metric_unit, longs.get(start) or self._long(start), longs.get(end) or self._long(end),
                decimal, version_quality, SMALL_LONGS[m] if m < 64 else avro_long(m), source,
            ))
            # the arrival header (runtime.timing.arrival_ms): one list for the records of the same arrival
            arrived = timing.arrival_ms(record) if record.headers else record.timestamp_ms
            if arrived != self._arrived:
                self._arrived = arrived
                self._arrived_header = [(timing.ARRIVED, b"%d" % arrived)]
            ctx.forward(self.topics.usage_events, account[0], event, self._arrived_header)  # type: ignore[index]
        if start > clock.max_event_ms:  # _advance
            self._advance(part, METER, start)
        tally = self._tally
        labels = _LABELS[outcome]
        tally[labels] = tally.get(labels, 0) + 1  # type: ignore[index]
        return True

    def _long(self, ms: int) -> bytes:
        raw = self._longs.get(ms)
        if raw is None:
            if len(self._longs) > _MEMO_MAX:
                self._longs.clear()
            raw = self._longs[ms] = avro_long(ms)
        return raw

    def _meter(self, record: Incoming, part: _Partition, ctx: Context, now: int) -> None:
        part.live.add(METER)
        try:
            datum = self.codec.decode_dict(record.value or b"", "MeterReading")
        except DecodeError as exc:
            if self.codec.record_name(record.value or b"") == "SeriesComplete":
                self._completion(record, ctx)
            else:
                self._reject(record, METER, "UNDECODABLE", str(exc), ctx)
            return
        try:
            reading = MeterReading(**datum)
        except (TypeError, ValueError) as exc:
            self._reject(record, METER, "SCHEMA_VIOLATION", f"invalid MeterReading: {exc}", ctx)
            return
        try:
            check_reading(reading, now, self.rules.future_bound_ms)
            try:
                event = to_usage_event(reading, self.reference())
            except RejectedInput as exc:
                if exc.reason not in ("UNKNOWN_NMI", "OUTSIDE_SERVICE_DATES") or not self.refresh():
                    raise
                event = to_usage_event(reading, self.reference())  # the registry may have just changed
        except OutsideServiceDates as exc:
            self._refuse(record, METER, exc, _ms(reading.interval_end), ctx)
            return
        except RejectedInput as exc:
            self._reject(record, METER, exc.reason, str(exc), ctx)
            return
        start_ms, end_ms, version_ms = _ms(reading.interval_start), _ms(reading.interval_end), _ms(reading.version)
        key = b"%s%s\x00%s\x00%d" % (METER_PREFIX, reading.nmi.encode(), reading.suffix.encode(), start_ms)
        outcome = self._observe(ctx.store(record.partition), part, METER, key, end_ms, version_ms)
        if outcome != "duplicate":
            self._forward(event, record, ctx)
        self._advance(part, METER, start_ms)
        self._count(METER, outcome, "")

    def _completion(self, record: Incoming, ctx: Context) -> None:
        """A gateway's completion marker: forwarded as a ``SeriesMarker`` of the channel's account on the
        last day it covers (SPEC §3); a marker of a meter with no service point that day closes nothing
        (the windows of the channel close on their own) and is counted as a marker too."""
        try:
            done = self.codec.decode(record.value or b"", SeriesComplete)
        except DecodeError as exc:
            self._reject(record, METER, "UNDECODABLE", str(exc), ctx)
            return
        last_day = (done.complete_through - MS).astimezone(NEM_TIME).date()
        account = self.reference().account_of(done.nmi, last_day)
        if account is not None:
            marker = SeriesMarker(account, f"{done.nmi}/{done.suffix}", done.complete_through, done.source_file)
            ctx.forward(self.topics.usage_events, account, self.codec.encode(marker))
        self._count(METER, "marker", "")

    def _telemetry(self, record: Incoming, part: _Partition, ctx: Context, now: int) -> None:
        part.live.add(TELEMETRY)
        try:
            ce = read_cloudevent(record.headers, record.value)
            try:
                event = telemetry_usage_event(ce, self.reference(), now, self.rules.future_bound_ms)
            except RejectedInput as exc:
                if exc.reason not in ("UNKNOWN_SUBJECT", "UNKNOWN_EVENT_TYPE", "OUTSIDE_SERVICE_DATES") \
                        or not self.refresh():
                    raise
                event = telemetry_usage_event(ce, self.reference(), now, self.rules.future_bound_ms)
        except OutsideServiceDates as exc:
            self._refuse(record, TELEMETRY, exc, ce.time_ms, ctx)
            return
        except RejectedInput as exc:
            self._reject(record, TELEMETRY, exc.reason, str(exc), ctx)
            return
        key = TELEMETRY_PREFIX + identity_bytes(ce.source, ce.id)
        event_ms = ce.time_ms
        outcome = self._observe(ctx.store(record.partition), part, TELEMETRY, key, event_ms, event_ms)
        if outcome != "duplicate":
            self._forward(event, record, ctx)
        self._advance(part, TELEMETRY, event_ms)
        self._count(TELEMETRY, outcome, "")

    def _forward(self, event: UsageEvent, record: Incoming, ctx: Context) -> None:
        datum = {name: getattr(event, name) for name in _USAGE_FIELDS}  # the codec's generic path, unrolled
        # the reading's arrival at the gateway travels on to the ledger (runtime.timing)
        ctx.forward(self.topics.usage_events, event.account, self.codec.encode(datum, "UsageEvent"),
                    [(timing.ARRIVED, b"%d" % timing.arrival_ms(record))])

    def _observe(self, store: Any, part: _Partition, kind: str, key: bytes, time_ms: int, version_ms: int) -> str:
        """The outcome of an identity (SPEC §2), recording it when forwarded: ``accepted`` (new, or older
        than the horizon), ``superseded`` (meter: higher version) or ``duplicate``."""
        horizon_end = time_ms + self._horizon[kind]
        if horizon_end <= part.clocks[kind].watermark_ms:
            return "accepted"  # forgotten or never held: downstream decides
        held: Seen | None = store.get(key) if key in part.held else None
        if held is None:
            store.put(key, Seen(time_ms, version_ms))
            heapq.heappush(part.expiry[kind], (horizon_end, key))
            part.held.add(key)
            return "accepted"
        if kind == METER and version_ms > held.version_ms:
            store.put(key, Seen(held.time_ms, version_ms))
            return "superseded"
        return "duplicate"

    def _advance(self, part: _Partition, kind: str, event_ms: int) -> None:
        clock = part.clocks[kind]
        if event_ms > clock.max_event_ms:
            watermark = max(clock.watermark_ms, event_ms - self.rules.out_of_orderness_ms)
            part.clocks[kind] = Clock(event_ms, watermark)
            part.dirty.add(kind)

    # --- time ------------------------------------------------------------------------------------------------
    def punctuate(self, wallclock_ms: int, ctx: Context) -> None:
        """Identities past their horizon are forgotten; clocks moved by records are saved (in the same
        transaction as the batch). Processing time moves nothing here."""
        for p, part in self._parts.items():
            store = ctx.store(p)
            for kind in part.live:
                clock = part.clocks[kind]
                heap = part.expiry[kind]
                while heap and heap[0][0] <= clock.watermark_ms:
                    key = heapq.heappop(heap)[1]
                    store.delete(key)
                    part.held.discard(key)
            for kind in part.dirty:
                store.put(CLOCK_PREFIX + kind.encode(), part.clocks[kind])
            part.dirty.clear()

    # --- outcomes -------------------------------------------------------------------------------------------
    def _refuse(self, record: Incoming, kind: str, exc: OutsideServiceDates, window_end_ms: int, ctx: Context) -> None:
        """Route a reading refused by a billing rule to ``usage.late`` with the original record (SPEC §3)."""
        event = exc.event
        late = LateEvent(event, exc.reason, datetime.fromtimestamp(window_end_ms / 1000, UTC), event.event_time, 0,
                         stage="ingest", message=str(exc)[:1000], input_topic=record.topic,
                         input_partition=record.partition, input_offset=record.offset, original_key=record.key,
                         original=record.value or b"", headers=record.headers)
        ctx.forward(self.topics.usage_late, event.account, self.codec.encode(late))
        ctx.count("refused", exc.reason)
        self.reasons[exc.reason] = self.reasons.get(exc.reason, 0) + 1
        self._count(kind, "refused", exc.reason)

    def _reject(self, record: Incoming, kind: str, reason: str, message: str, ctx: Context) -> None:
        text = message.encode("utf-8", "backslashreplace").decode("utf-8")[:1000]
        dead_letter(ctx, self.codec, self.topics.dlq_ingest, "ingest", record, reason, text)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self._count(kind, "dead_lettered", reason)

    def _count(self, kind: str, outcome: str, reason: str) -> None:
        tally = self._tally
        if tally is None:  # outside a batch
            self._publish({(kind, outcome, reason): 1})
        else:
            labels = (kind, outcome, reason)
            tally[labels] = tally.get(labels, 0) + 1

    def _publish(self, tally: dict[tuple[str, str, str], int]) -> None:
        """Add (kind, outcome, reason) → records to ``counts`` and the Prometheus counter."""
        for (kind, outcome, reason), n in tally.items():
            self.counts[outcome] = self.counts.get(outcome, 0) + n
            labels = ("telemetry" if kind == TELEMETRY else "meter", outcome, reason)
            child = _OUTCOME_COUNTERS.get(labels)
            if child is None:
                child = _OUTCOME_COUNTERS[labels] = OUTCOMES.labels(*labels)
            child.inc(n)


def _head(head: bytes) -> tuple[str, bytes, int, int, bytes, bytes] | None:
    """What a reading's NMI, suffix and uom (``wire.split_reading``'s ``head``) give its usage event:
    ``(nmi, series, metric and unit as Avro strings (the event's fields in that order), num, den, state key
    prefix, event id prefix)``, the unit factor being ``num / den`` (``CHANNEL_METRICS``, ``UNITS``); ``None``
    on invalid UTF-8 or when the channel or unit is not billed."""
    names = read_head(head)
    if names is None:
        return None
    nmi, suffix, uom = names
    metric = CHANNEL_METRICS.get(suffix[:1].upper())
    unit = UNITS.get(uom.lower())
    if metric is None or unit is None:
        return None
    num, den = unit[1].as_integer_ratio()
    return (nmi, avro_string(f"{nmi}/{suffix}") + avro_string(metric) + avro_string(unit[0]), num, den,
            b"%s%s\x00%s\x00" % (METER_PREFIX, nmi.encode(), suffix.encode()),  # + start ms: the key of _meter
            f"nem12:{nmi}:{suffix}:".encode())  # + start minute: MeterReading.identity


def _tail(tail: bytes) -> tuple[int, bytes, bytes] | None:
    """What a reading's quality … source_file (``wire.split_reading``'s ``tail``) give its usage event:
    ``(version ms, version as an Avro long then quality as an Avro string (the event's fields in that order),
    source prefix "<file>#")``; ``None`` on invalid UTF-8, a version out of the fast range or a quality flag
    that is not one."""
    rest = read_tail(tail)
    if rest is None or rest[0] not in QUALITY_FLAGS:
        return None
    quality, _, version, _, source_file = rest
    return version, avro_long(version) + avro_string(quality), f"{source_file}#".encode()


# --- state serialization (changelog values are Avro: schemas/ingest_seen.avsc, ingest_clock.avsc) --------------
def state_codec(codec: Codec) -> tuple[Callable[[bytes, Any], bytes], Callable[[bytes, bytes], Any]]:
    """``(encode, decode)`` for the ingest store: clocks (``c|…``) and identities seen (``m|…``, ``t|…``)."""

    seen_header = codec.header("IngestSeen")
    memo: dict[Seen, bytes] = {}  # (time_ms, version_ms) → bytes: a day's file shares both

    def encode(key: bytes, value: Any) -> bytes:
        if key[:2] == CLOCK_PREFIX:
            return codec.encode({"max_event_ms": value.max_event_ms, "watermark_ms": value.watermark_ms},
                                "IngestClock")
        raw = memo.get(value)  # a Seen is its (time_ms, version_ms)
        if raw is None:
            if len(memo) > 100_000:
                memo.clear()
            raw = memo[value] = seen_bytes(seen_header, *value)  # = codec.encode(…, "IngestSeen")
        return raw

    def decode(key: bytes, raw: bytes) -> Any:
        if key.startswith(CLOCK_PREFIX):
            d = codec.decode_dict(raw, "IngestClock")
            return Clock(d["max_event_ms"], d["watermark_ms"])
        seen = read_seen(raw, seen_header)
        if seen is not None:
            return Seen(*seen)
        d = codec.decode_dict(raw, "IngestSeen")  # another writer version, or bytes to refuse with DecodeError
        return Seen(d["time_ms"], d["version_ms"])

    return encode, decode
