"""The windowing stage: usage events → window revisions (``usage.windows``), too-late → ``usage.late``.

Domain code only: state through ``ctx.store``, output through ``ctx.forward``; the runtime makes
each batch's outputs, state changes and input offsets one Kafka transaction. The rules are the
pure functions of ``pipeline.windowing.windows`` (SPEC §3); the records (fastavro through
``pipeline.codec``, plain datums) are ``pipeline.windowing.wire``.

Hot path (``process_batch``, per event): decode to a plain datum, find the window, fold the interval into
the window state in place. What a batch changed is staged for the changelog: per window, one
entry holding the events it accepted, as consumed, and the window's head only when it changed
(encoded at commit).
Metrics are counted locally and published once per batch (``punctuate``).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import Counter, Gauge

from pipeline.codec import Codec, DecodeError
from pipeline.config import Settings
from pipeline.records import LateEvent, UsageEvent
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import Context, dead_letter
from pipeline.topology import Topics
from pipeline.windowing import windows as w
from pipeline.windowing.wire import (
    WIN_PREFIX,
    WM_KEY,
    EventReader,
    WindowWire,
    events_key,
    events_prefix,
    state_codec,
)

log = logging.getLogger(__name__)

EVENTS = Counter("pipeline_windowing_events_total", "usage events by outcome", ["outcome"])
EMITTED = Counter("pipeline_windowing_windows_emitted_total", "window revisions emitted", ["timing"])
WATERMARK_LAG = Gauge("pipeline_windowing_watermark_lag_seconds", "wall clock − watermark", ["partition"])
OPEN_WINDOWS = Gauge("pipeline_windowing_open_windows", "windows held in state", ["partition"])

__all__ = ["WIN_PREFIX", "WM_KEY", "WindowingProcessor", "policies_from_settings", "state_codec"]
_DUPLICATE = w.Outcome.DUPLICATE
_new = tuple.__new__


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

    State per partition: ``wm`` → the watermark; ``w|<window id>`` → ``WindowState`` (its head:
    changed in place, then put back: the store's transaction cache holds the live object);
    ``i|<window id>|<first offset>`` → the events a batch added to the window, as consumed
    (``pipeline.windowing.wire``).
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
        self._read = EventReader(codec)
        self._wire = WindowWire(codec)
        self._policies: dict[str, w.WindowPolicy] = {}  # policy(metric), asked once per metric
        self._wm: dict[int, w.Watermark] = {}
        self._wm_dirty: set[int] = set()
        self._last_activity: dict[int, int] = {}
        self._due: dict[int, dict[bytes, int]] = {}  # dirty windows: key → end_ms
        self._expiry: dict[int, list[tuple[int, bytes]]] = {}  # heap of (end + lateness, key)
        self.outcomes: dict[str, int] = {o.value: 0 for o in w.Outcome}
        self._published: dict[str, int] = {}  # outcome → count already added to Prometheus
        self._emitted: dict[str, int] = {}  # timing → revisions emitted since the last publication

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
            expiry.append((state.end_ms + self._policy_of(state.metric).allowed_lateness_ms, key))
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
        """Fold one usage event into its window (see ``process_batch``)."""
        self.process_batch((record,), ctx)

    def process_batch(self, records: Sequence[Incoming], ctx: Context) -> None:
        """Fold each usage event, in order, into its window (SPEC §3): decode (undecodable →
        ``dlq.ingest``, UNDECODABLE), route too-late events to ``usage.late``, apply the interval
        (accepted, superseded or duplicate), stage what changed for the changelog and advance the
        partition's watermark. Windows are emitted by ``punctuate``."""
        if not records:
            return
        now = self.clock_ms()
        read, policies, wms, outcomes, apply = self._read, self._policies, self._wm, self.outcomes, w.apply_interval
        stores: dict[int, Any] = {}
        chunks: dict[bytes, tuple[Any, int, list[bytes]]] = {}  # window key → (store, first offset, events)
        for record in records:
            p = record.partition
            raw = record.value or b""
            try:
                (event_id, account, series, metric, unit, event_ms, value, version, quality, source,
                 key_prefix) = read(raw)
            except DecodeError as exc:
                dead_letter(ctx, self.codec, self.topics.dlq_ingest, "windowing", record, "UNDECODABLE", str(exc))
                self._count("dead_lettered")
                continue
            policy = policies.get(metric) or self._policy_of(metric)
            wm = wms[p]
            size = policy.size_ms
            start = event_ms - event_ms % size  # w.window_bounds
            end = start + size
            if wm.watermark_ms >= end + policy.allowed_lateness_ms:  # w.is_too_late
                self._too_late(raw, end, wm, policy, ctx)
            else:
                key = key_prefix + b"%d" % start  # WIN_PREFIX + w.window_id(account, series, start)
                store = stores.get(p)
                if store is None:
                    store = stores[p] = ctx.store(p)
                state = store.get(key)
                if state is None:
                    state = w.new_window(account, series, metric, unit, event_ms, policy)
                    heapq.heappush(self._expiry[p], (end + policy.allowed_lateness_ms, key))
                    flags = None
                else:
                    if state.intervals is None:
                        self._load_intervals(store, key, state)
                    flags = state.dirty, state.late
                # _new(w.Interval, (...)): w.Interval(...) without the cost of its Python-level constructor
                outcome = apply(state, event_id, _new(w.Interval, (version, value, quality, source, event_ms)), wm,
                                policy)
                if outcome is not _DUPLICATE:
                    added = chunks.get(key)
                    if added is None:
                        chunks[key] = (store, record.offset, [raw])
                    else:
                        added[2].append(raw)
                    if flags != (state.dirty, state.late):
                        store.put(key, state)  # the head changed
                        if state.dirty:  # it became dirty: due once the watermark passes its end
                            self._due[p][key] = end
                outcomes[outcome] += 1
            if event_ms > wm.max_event_ms or wm.watermark_ms < wm.max_event_ms - policy.out_of_orderness_ms:
                wms[p] = w.advance(wm, event_ms, policy)
                self._wm_dirty.add(p)
        for p in {r.partition for r in records}:
            self._last_activity[p] = now
        events = self._wire.events
        for key, (store, first_offset, raws) in chunks.items():  # what this batch added, as consumed
            store.put_raw(events_key(key, first_offset), events(raws))

    def _window(self, store: Any, key: bytes) -> w.WindowState | None:
        """The window stored at ``key`` with its intervals loaded, or ``None``."""
        state = store.get(key)
        if state is not None and state.intervals is None:
            self._load_intervals(store, key, state)
        return state

    def _load_intervals(self, store: Any, key: bytes, state: w.WindowState) -> None:
        """Fill in the intervals of a window head read back from the store (in place: the store's
        cache keeps the loaded window). ``DecodeError`` on an entry that is not a ``UsageEvent``."""
        state.intervals = self._wire.intervals(raw for _k, raw in store.scan(events_prefix(key)))

    def _policy_of(self, metric: str) -> w.WindowPolicy:
        """``policy(metric)``, asked once per metric: a window's size must not change under it."""
        found = self._policies.get(metric)
        if found is None:
            found = self._policies[metric] = self.policy(metric)
        return found

    def _too_late(self, raw: bytes, end: int, wm: w.Watermark, policy: w.WindowPolicy, ctx: Context) -> None:
        event = self.codec.decode(raw, UsageEvent)
        late = LateEvent(event, "TOO_LATE", w._dt(end), w._dt(wm.watermark_ms),
                         wm.watermark_ms - (end + policy.allowed_lateness_ms))
        ctx.forward(self.topics.usage_late, event.account, self.codec.encode(late))
        self._count(w.Outcome.TOO_LATE)

    def punctuate(self, wallclock_ms: int, ctx: Context) -> None:
        for p in list(self._wm):
            wm = self._wm[p]
            # idle timeout is the same for every metric (Settings.idle_timeout_s)
            idle = w.idle_advance(wm, wallclock_ms, self._last_activity[p], self._policy_of("energy"))
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
        self._publish()

    def _emit_due(self, p: int, wm: w.Watermark, store: Any, ctx: Context) -> None:
        due = self._due[p]
        ready = sorted((end, key) for key, end in due.items() if end <= wm.watermark_ms)
        topic = self.topics.usage_windows
        for _end, key in ready:
            del due[key]
            state = self._window(store, key)
            if state is None or not w.is_due(state, wm):
                continue
            rev = w.emit(state, wm)
            store.put(key, state)
            ctx.forward(topic, rev.account, self._wire.revision(rev))
            self._emitted[rev.timing] = self._emitted.get(rev.timing, 0) + 1

    def _purge(self, p: int, wm: w.Watermark, store: Any) -> None:
        heap = self._expiry[p]
        while heap and heap[0][0] <= wm.watermark_ms:
            _exp, key = heapq.heappop(heap)
            state = self._window(store, key)
            if state is not None and w.is_expired(state, wm, self._policy_of(state.metric)):
                store.delete(key)
                for events_entry, _raw in list(store.scan(events_prefix(key))):
                    store.delete(events_entry)
            elif state is not None:  # still pending emission: look again later
                heapq.heappush(heap, (wm.watermark_ms + 1, key))
                break

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _publish(self) -> None:
        """Add the outcomes and emissions counted since the last call to the Prometheus counters."""
        published = self._published
        for outcome, n in self.outcomes.items():
            if n != published.get(outcome, 0):
                EVENTS.labels(outcome).inc(n - published.get(outcome, 0))
                published[outcome] = n
        for timing, n in self._emitted.items():
            EMITTED.labels(timing).inc(n)
        self._emitted.clear()
