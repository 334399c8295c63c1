"""The windowing stage: usage events → window revisions (``usage.windows``), too-late → ``usage.late``.

Domain code only: state through ``ctx.store``, output through ``ctx.forward``; the runtime makes
each batch's outputs, state changes and input offsets one Kafka transaction. The rules are the
pure functions of ``pipeline.windowing.windows`` (SPEC §3).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from prometheus_client import Counter, Gauge

from pipeline.codec import Codec, DecodeError
from pipeline.config import Settings
from pipeline.records import LateEvent, UsageEvent
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import Context, dead_letter
from pipeline.topology import Topics
from pipeline.windowing import windows as w

log = logging.getLogger(__name__)

EVENTS = Counter("pipeline_windowing_events_total", "usage events by outcome", ["outcome"])
EMITTED = Counter("pipeline_windowing_windows_emitted_total", "window revisions emitted", ["timing"])
WATERMARK_LAG = Gauge("pipeline_windowing_watermark_lag_seconds", "wall clock − watermark", ["partition"])
OPEN_WINDOWS = Gauge("pipeline_windowing_open_windows", "windows held in state", ["partition"])

_EVENT_COUNTERS: dict[str, Any] = {}
WM_KEY = b"wm"
WIN_PREFIX = b"w|"


def policies_from_settings(settings: Settings) -> Callable[[str], w.WindowPolicy]:
    """Window policy per metric (SPEC §3): energy/reactive channels sum over
    ``window_minutes_energy``; other metrics use ``window_minutes_telemetry``; entries of
    ``PIPELINE_METRIC_POLICIES`` override size, allowed lateness and aggregation per metric."""
    cache: dict[str, w.WindowPolicy] = {}

    def policy(metric: str) -> w.WindowPolicy:
        found = cache.get(metric)
        if found is None:
            energy = metric.startswith(("energy", "reactive"))
            override = settings.metric_policies.get(metric)
            minutes = settings.window_minutes_energy if energy else settings.window_minutes_telemetry
            lateness_days = settings.allowed_lateness_days
            aggregation = "sum"
            if override is not None:
                minutes = override.window_minutes or minutes
                lateness_days = override.allowed_lateness_days if override.allowed_lateness_days is not None \
                    else lateness_days
                aggregation = override.aggregation
            found = cache[metric] = w.WindowPolicy(
                size_ms=minutes * 60_000,
                out_of_orderness_ms=settings.out_of_orderness_s * 1000,
                allowed_lateness_ms=int(lateness_days * 86_400_000),
                idle_timeout_ms=int(settings.idle_timeout_s * 1000),
                aggregation=aggregation,
            )
        return found

    return policy


class WindowingProcessor:
    """Accumulates usage events into tumbling windows per input partition; emits revisions.

    State per partition: ``wm`` → the watermark; ``w|<window id>`` → ``WindowState``.
    """

    def __init__(
        self,
        topics: Topics,
        codec: Codec,
        policy: Callable[[str], w.WindowPolicy],
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.topics = topics
        self.codec = codec
        self.policy = policy
        self.clock_ms = clock_ms
        self._wm: dict[int, w.Watermark] = {}
        self._wm_dirty: set[int] = set()
        self._last_activity: dict[int, int] = {}
        self._due: dict[int, dict[bytes, int]] = {}  # dirty windows: key → end_ms
        self._expiry: dict[int, list[tuple[int, bytes]]] = {}  # heap of (end + lateness, key)
        self.outcomes: dict[str, int] = {o.value: 0 for o in w.Outcome}

    # --- ownership ---------------------------------------------------------------------------
    def on_assign(self, partition: int, ctx: Context) -> None:
        store = ctx.store(partition)
        self._wm[partition] = store.get(WM_KEY) or w.NO_WATERMARK
        self._last_activity[partition] = self.clock_ms()
        due: dict[bytes, int] = {}
        expiry: list[tuple[int, bytes]] = []
        for key, state in store.scan(WIN_PREFIX):
            if state.dirty:
                due[key] = state.end_ms
            expiry.append((state.end_ms + self.policy(state.metric).allowed_lateness_ms, key))
        heapq.heapify(expiry)
        self._due[partition] = due
        self._expiry[partition] = expiry
        OPEN_WINDOWS.labels(str(partition)).set(len(expiry))

    def on_revoke(self, partition: int) -> None:
        for table in (self._wm, self._last_activity, self._due, self._expiry):
            table.pop(partition, None)
        self._wm_dirty.discard(partition)

    # --- records --------------------------------------------------------------------------------
    def process(self, record: Incoming, ctx: Context) -> None:
        p = record.partition
        self._last_activity[p] = self.clock_ms()
        try:
            event = self.codec.decode(record.value or b"", UsageEvent)
        except DecodeError as exc:
            dead_letter(ctx, self.codec, self.topics.dlq_ingest, "windowing", record, "UNDECODABLE", str(exc))
            self._count("dead_lettered")
            return
        policy = self.policy(event.metric)
        wm = self._wm[p]
        start, end = w.window_bounds(w._ms(event.event_time), policy.size_ms)
        if w.is_too_late(end, wm, policy):
            late = LateEvent(event, "TOO_LATE", w._dt(end), w._dt(wm.watermark_ms),
                             wm.watermark_ms - (end + policy.allowed_lateness_ms))
            ctx.forward(self.topics.usage_late, event.account, self.codec.encode(late))
            self._count(w.Outcome.TOO_LATE.value)
            return
        store = ctx.store(p)
        key = WIN_PREFIX + w.window_id(event.account, event.series, start).encode()
        state = store.get(key)
        is_new = state is None
        if is_new:
            state = w.new_window(event, policy)
        new_state, outcome = w.apply_event(state, event, wm, policy)
        if new_state is not state:
            store.put(key, new_state)
            if new_state.dirty:
                self._due[p][key] = end
            if is_new:
                heapq.heappush(self._expiry[p], (end + policy.allowed_lateness_ms, key))
        self._count(outcome.value)
        advanced = w.advance(wm, w._ms(event.event_time), policy)
        if advanced != wm:
            self._wm[p] = advanced
            self._wm_dirty.add(p)

    def punctuate(self, wallclock_ms: int, ctx: Context) -> None:
        for p in list(self._wm):
            wm = self._wm[p]
            # idle timeout is the same for every metric (Settings.idle_timeout_s)
            idle = w.idle_advance(wm, wallclock_ms, self._last_activity[p], self.policy("energy"))
            if idle != wm:
                self._wm[p] = wm = idle
                self._wm_dirty.add(p)
            store = ctx.store(p)
            self._emit_due(p, wm, store, ctx)
            self._purge(p, wm, store)
            if p in self._wm_dirty:
                store.put(WM_KEY, wm)
                self._wm_dirty.discard(p)
            WATERMARK_LAG.labels(str(p)).set(max(0, wallclock_ms - wm.watermark_ms) / 1000)
            OPEN_WINDOWS.labels(str(p)).set(len(self._expiry[p]))

    def _emit_due(self, p: int, wm: w.Watermark, store: Any, ctx: Context) -> None:
        due = self._due[p]
        ready = sorted((end, key) for key, end in due.items() if end <= wm.watermark_ms)
        for _end, key in ready:
            del due[key]
            state = store.get(key)
            if state is None or not w.is_due(state, wm):
                continue
            out, new_state = w.emit(state, wm)
            store.put(key, new_state)
            ctx.forward(self.topics.usage_windows, out.account, self.codec.encode(out))
            EMITTED.labels(out.timing).inc()

    def _purge(self, p: int, wm: w.Watermark, store: Any) -> None:
        heap = self._expiry[p]
        while heap and heap[0][0] <= wm.watermark_ms:
            _exp, key = heapq.heappop(heap)
            state = store.get(key)
            if state is not None and w.is_expired(state, wm, self.policy(state.metric)):
                store.delete(key)
            elif state is not None:  # still pending emission: look again later
                heapq.heappush(heap, (wm.watermark_ms + 1, key))
                break

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        child = _EVENT_COUNTERS.get(outcome)
        if child is None:
            child = _EVENT_COUNTERS[outcome] = EVENTS.labels(outcome)
        child.inc()


# --- state serialization (changelog values are Avro, schemas/window_state.avsc) -------------------
def state_codec(codec: Codec) -> tuple[Callable[[bytes, Any], bytes], Callable[[bytes, bytes], Any]]:
    """``(encode, decode)`` for the windowing store: watermark and window states."""

    def encode(key: bytes, value: Any) -> bytes:
        if key == WM_KEY:
            return codec.encode({"max_event_ms": value.max_event_ms, "watermark_ms": value.watermark_ms},
                                "WatermarkState")
        s: w.WindowState = value
        return codec.encode(
            {
                "window_id": s.window_id, "account": s.account, "series": s.series, "metric": s.metric,
                "unit": s.unit, "start_ms": s.start_ms, "end_ms": s.end_ms,
                "intervals": {
                    k: {"version_ms": iv.version_ms, "value": str(iv.value), "quality": iv.quality, "source": iv.source,
                        "event_ms": iv.event_ms}
                    for k, iv in s.intervals.items()
                },
                "revision": s.revision, "emitted_value": str(s.emitted_value), "dirty": s.dirty, "late": s.late,
                "aggregation": s.aggregation,
            },
            "WindowState",
        )

    def decode(key: bytes, raw: bytes) -> Any:
        if key == WM_KEY:
            d = codec.decode_dict(raw, "WatermarkState")
            return w.Watermark(d["max_event_ms"], d["watermark_ms"])
        d = codec.decode_dict(raw, "WindowState")
        intervals = {
            k: w.IntervalValue(iv["version_ms"], Decimal(iv["value"]), iv["quality"], iv["source"], iv["event_ms"])
            for k, iv in d["intervals"].items()
        }
        return w.WindowState(
            d["window_id"], d["account"], d["series"], d["metric"], d["unit"], d["start_ms"], d["end_ms"],
            intervals, d["revision"], Decimal(d["emitted_value"]), d["dirty"], d["late"], d["aggregation"],
        )

    return encode, decode
