"""The windowing stage: usage events → window revisions (``usage.windows``); refusals → ``usage.late``.

Domain code only: state through ``ctx.store``, output through ``ctx.forward``; the runtime makes
each batch's outputs, state changes and input offsets one Kafka transaction. The rules are the
pure functions of ``pipeline.windowing.windows`` (SPEC §3); the records (fastavro through
``pipeline.codec``, plain datums) are ``pipeline.windowing.wire``.

Event-time progress is per series (account + meter channel or metric): a window closes when its
own series' clock passes its end, when a completion marker covers it, or when its series has been
quiet for the idle timeout (processing time). Nothing is ever too late: a window whose state was
archived is brought back and re-emitted as a LATE revision. The one refusal is the back-billing
rule (``Settings.back_billing_limit_days``, off by default).

Hot path (``process_batch``, per event): decode to a plain datum, find the window (hot, or brought
back from its archive), fold the interval into the window state in place, advance the series
clock. What a batch changed is staged for the changelog: per window, one entry holding the events
it accepted, as consumed, and the window's head only when it changed. ``punctuate`` emits what is
due, archives what is old enough and saves the series clocks that moved.

The tables kept in memory are bounded by the *pending* windows (changed, not yet emitted): every
other window lives only in the store.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge

from pipeline.codec import Codec, DecodeError
from pipeline.config import Settings
from pipeline.records import LateEvent, SeriesMarker, UsageEvent
from pipeline.runtime import timing
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import Context, dead_letter
from pipeline.topology import Topics
from pipeline.windowing import windows as w
from pipeline.windowing.wire import (
    CLOCK_PREFIX,
    EVENTS_PREFIX,
    OLD_WM_KEY,
    WIN_PREFIX,
    EventReader,
    WindowWire,
    archive_key,
    clock_key,
    events_key,
    events_prefix,
    key_prefix,
    state_codec,
)

log = logging.getLogger(__name__)

EVENTS = Counter("pipeline_windowing_events_total", "usage events by outcome", ["outcome"])
EMITTED = Counter("pipeline_windowing_windows_emitted_total", "window revisions emitted", ["timing", "trigger"])
ARCHIVED = Counter("pipeline_windowing_windows_archived_total", "windows whose hot state was archived")
REVIVED = Counter("pipeline_windowing_windows_revived_total", "archived windows brought back by late data")
PENDING = Gauge("pipeline_windowing_pending_windows", "windows changed and not yet emitted", ["partition"])

__all__ = ["WIN_PREFIX", "WindowingProcessor", "policies_from_settings", "state_codec"]
_DUPLICATE = w.Outcome.DUPLICATE
_new = tuple.__new__
_MISSING = object()
_REFUSED = w.Outcome.REFUSED
CLOCKS_HELD = 200_000  # series clocks kept between batches, per partition (beyond: read from the store again)


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


@dataclass
class _Tables:
    """What one partition's processor keeps in memory, rebuilt from the store on assignment.

    Attributes:
        pending: series key (its windows' key prefix ``w|account|series|``) → {window key: window end
            (ms)} of its windows changed and not yet emitted.
        active: series key → processing time (ms) of its last event, for series with pending windows.
        idle: heap of (deadline ms, series key): when to look whether a series went quiet.
        check: series whose clock moved or that got events since the last punctuation.
        clocks: series clocks read or changed lately, as saved: each moves only when it reaches another
            window boundary (every decision reads a clock at its boundary, ``windows.SeriesClock``).
        moved: series keys whose clock must be saved by the next punctuation (it reached another window
            boundary, got its metric or a completion marker; with a back-billing limit, any move).
        oldest: series key → when (ms, on the series' clock) its oldest hot window that was emitted and
            not archived may be archived (its end + allowed lateness): the series is swept (``_sweep``)
            then, and only then.
        fresh: window key → the live state of a window created on time and never emitted: its head is
            not written (its events entries say it exists; ``on_assign`` rebuilds it from them).
        accounts: account → its billing clock (highest event time of its series), back-billing only.
        arrived: window key → the earliest arrival (epoch ms, ``runtime.timing``) of the events folded
            into it since its last revision; monitoring only, in memory (lost on a restart).
        gauge: the partition's series of ``pipeline_windowing_pending_windows``.
    """

    pending: dict[bytes, dict[bytes, int]] = field(default_factory=dict)
    active: dict[bytes, int] = field(default_factory=dict)
    idle: list[tuple[int, bytes]] = field(default_factory=list)
    check: set[bytes] = field(default_factory=set)
    clocks: dict[bytes, w.SeriesClock] = field(default_factory=dict)
    moved: set[bytes] = field(default_factory=set)
    oldest: dict[bytes, int] = field(default_factory=dict)
    fresh: dict[bytes, w.WindowState] = field(default_factory=dict)
    accounts: dict[str, int] = field(default_factory=dict)
    arrived: dict[bytes, int] = field(default_factory=dict)
    gauge: Any = None


class WindowingProcessor:
    """Accumulates usage events into tumbling windows per (account, series); emits revisions.

    State per partition (format 4, ``pipeline.windowing.wire``): ``s|<account>|<series>|`` → the
    series clock; ``w|<window id>`` → a hot window's head (``WindowState`` without intervals: changed
    in place, then put back: the store's transaction cache holds the live object);
    ``i|<window id>|<first offset>`` → the events a batch added to the window, as consumed;
    ``x|<window id>`` → the archive of a window (what it last emitted and its intervals).

    Args:
        topics, codec: where and how records go.
        policy: metric → ``WindowPolicy`` (size, out-of-orderness, allowed lateness, idle timeout,
            aggregation).
        clock_ms: processing time in epoch ms (tests pass a fake one).
        back_billing_limit_ms: refuse undercharges to windows that ended more than this before the
            account's billing clock (SPEC §3); ``None``: refuse nothing.
    """

    def __init__(
        self,
        topics: Topics,
        codec: Codec,
        policy: Callable[[str], w.WindowPolicy],
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        back_billing_limit_ms: int | None = None,
    ) -> None:
        self.topics = topics
        self.codec = codec
        self.policy = policy
        self.clock_ms = clock_ms
        self.back_billing_limit_ms = back_billing_limit_ms
        self._read = EventReader(codec)
        self._wire = WindowWire(codec)
        self._policies: dict[str, w.WindowPolicy] = {}  # policy(metric), asked once per metric
        self._t: dict[int, _Tables] = {}
        self.outcomes: dict[str, int] = {o.value: 0 for o in w.Outcome}
        self._published: dict[str, int] = {}  # outcome → count already added to Prometheus
        self._emitted: dict[tuple[str, str], int] = {}  # (timing, trigger) → revisions since the last publication

    # --- ownership ---------------------------------------------------------------------------
    def on_assign(self, partition: int, ctx: Context) -> None:
        store = ctx.store(partition)
        if store.get(OLD_WM_KEY, _MISSING) is not _MISSING:  # format 3: series clocks replace it
            store.delete(OLD_WM_KEY)
            log.info("windowing: partition %d upgraded from state format 3 (partition watermark dropped)", partition)
        t = self._t[partition] = _Tables()
        now = self.clock_ms()
        heads = set()
        for key, state in store.scan(WIN_PREFIX):
            heads.add(key)
            ck = key_prefix(state.account, state.series)
            if state.dirty:
                self._pending(t, ck, key, state.end_ms, now, self._policy_of(state.metric))
            elif state.revision >= 0:
                self._await_archive(t, ck, state)
            t.check.add(ck)
        # windows created on time and never emitted have events entries and no head: rebuild them
        entries: dict[bytes, list[bytes]] = {}
        for entry_key, raw in store.scan(EVENTS_PREFIX):
            window_key = WIN_PREFIX + entry_key[len(EVENTS_PREFIX):entry_key.rindex(b"|")]
            if window_key not in heads:
                entries.setdefault(window_key, []).append(raw)
        for key, raws in entries.items():
            state = self._wire.fresh_window(raws, self._policy_of)
            t.fresh[key] = state
            ck = key_prefix(state.account, state.series)
            self._pending(t, ck, key, state.end_ms, now, self._policy_of(state.metric))
            t.check.add(ck)
        t.gauge = PENDING.labels(str(partition))
        t.gauge.set(sum(map(len, t.pending.values())))

    @staticmethod
    def _pending(t: _Tables, ck: bytes, key: bytes, end: int, now: int, policy: w.WindowPolicy) -> None:
        """Record that the window at ``key`` (ending at ``end``) of series ``ck`` has a change to emit."""
        pending = t.pending.get(ck)
        if pending is None:
            pending = t.pending[ck] = {}
            t.active[ck] = now
            heapq.heappush(t.idle, (now + policy.idle_timeout_ms, ck))
        pending[key] = end

    def _await_archive(self, t: _Tables, ck: bytes, state: w.WindowState) -> None:
        """Record a hot window that was emitted and is not archived: it is due for the archive at its end
        + allowed lateness on its series' clock (``t.oldest``)."""
        due = state.end_ms + self._policy_of(state.metric).allowed_lateness_ms
        if due < t.oldest.get(ck, due + 1):
            t.oldest[ck] = due

    def on_revoke(self, partition: int) -> None:
        self._t.pop(partition, None)

    # --- records --------------------------------------------------------------------------------
    def process(self, record: Incoming, ctx: Context) -> None:
        """Fold one usage event into its window (see ``process_batch``)."""
        self.process_batch((record,), ctx)

    def process_batch(self, records: Sequence[Incoming], ctx: Context) -> None:
        """Fold each usage event, in order, into its window (SPEC §3): decode (a completion marker
        closes its series; anything else undecodable → ``dlq.ingest``, UNDECODABLE), bring an
        archived window back, apply the back-billing rule if one is set (refused → ``usage.late``),
        apply the interval (accepted, superseded or duplicate), stage what changed for the changelog
        and advance the series clock. Windows are emitted by ``punctuate``."""
        if not records:
            return
        now = self.clock_ms()
        read, policies, outcomes, apply = self._read, self._policies, self.outcomes, w.apply_interval
        limit = self.back_billing_limit_ms
        chunks: dict[bytes, tuple[Any, int, list[bytes]]] = {}  # window key → (store, first offset, events)
        touched: dict[int, set[bytes]] = {}  # partition → its series that had an event
        counts = dict.fromkeys(outcomes, 0)  # outcome → events of this batch
        last_p = None
        for record in records:
            _topic, p, offset, _key, raw, headers, arrived = record
            if p != last_p:  # the records of a partition come in runs: its tables are looked up once per run
                last_p = p
                store = ctx.store(p)
                t = self._t[p]
                fresh, clocks, arrivals = t.fresh, t.clocks, t.arrived
                mine = touched.get(p)
                if mine is None:
                    mine = touched[p] = set()
            try:
                (event_id, account, series, metric, unit, event_ms, value, version, quality, source,
                 prefix) = read(raw or b"")
            except DecodeError as exc:
                raw = raw or b""
                if self.codec.record_name(raw) == "SeriesMarker":
                    self._marker(record, raw, t, store, ctx)
                else:
                    dead_letter(ctx, self.codec, self.topics.dlq_ingest, "windowing", record, "UNDECODABLE", str(exc))
                    self._count("dead_lettered")
                continue
            policy = policies.get(metric) or self._policy_of(metric)
            ck = prefix  # the series: its windows' key prefix (its clock's store key is clock_key(prefix))
            clock = clocks.get(ck) or self._load_clock(t, store, ck)
            size = policy.size_ms
            start = event_ms - event_ms % size  # w.window_bounds
            end = start + size
            key = prefix + b"%d" % start  # WIN_PREFIX + w.window_id(account, series, start)
            state = fresh.get(key)
            if state is not None:  # created on time in an earlier batch, not emitted yet
                flags = True, False
            elif (state := store.get(key)) is None:
                # a window is archived only once its series closed allowed lateness past its end: one that
                # could not have been is new, without looking for its archive
                closed = clock.watermark_ms if clock.watermark_ms >= clock.closed_through_ms \
                    else clock.closed_through_ms  # w.closes_at(clock)
                if end + policy.allowed_lateness_ms <= closed:
                    state = self._revive(store, key)
                if state is None:
                    state = w.new_window(account, series, metric, unit, event_ms, policy)
                flags = None
            else:
                if state.intervals is None:
                    self._load_intervals(store, key, state)
                flags = state.dirty, state.late
            # _new(w.Interval, (...)): w.Interval(...) without the cost of its Python-level constructor
            iv = _new(w.Interval, (version, value, quality, source, event_ms))
            if limit is not None and self._refuses(t, store, state, event_id, iv, account, metric, end, limit,
                                                   record, raw, ctx):
                outcome = _REFUSED
            else:
                outcome = apply(state, event_id, iv, clock)
            if outcome is not _DUPLICATE and outcome is not _REFUSED:
                if headers:  # timing.arrival_ms(record): its arrival header, else its Kafka timestamp
                    arrived = timing.arrival_ms(record)
                if arrived < arrivals.get(key, arrived + 1):
                    arrivals[key] = arrived
                added = chunks.get(key)
                if added is None:
                    chunks[key] = (store, offset, [raw])
                else:
                    added[2].append(raw)
                if flags != (state.dirty, state.late):  # the head changed (or was created, or brought back)
                    if state.revision < 0 and not state.late:
                        fresh[key] = state  # a new window, on time: its events entries say it exists
                    else:
                        fresh.pop(key, None)
                        store.put(key, state)
                    if state.dirty:  # pending until its series closes past its end or goes quiet
                        self._pending(t, ck, key, end, now, policy)
            counts[outcome] += 1
            if event_ms > clock.max_event_ms:  # w.advance, inline; the clock is kept at the window boundary it
                watermark = event_ms - policy.out_of_orderness_ms  # reached (windows.SeriesClock), exactly
                if watermark < clock.watermark_ms:  # when a back-billing limit needs its highest event time
                    watermark = clock.watermark_ms
                closed = clock.closed_through_ms
                before = clock.watermark_ms if clock.watermark_ms >= closed else closed
                after = watermark if watermark >= closed else closed
                if limit is not None or clock.metric != metric or before // size != after // size:
                    clocks[ck] = clock = _new(w.SeriesClock, (event_ms, watermark, closed, metric))
                    t.moved.add(ck)
                if limit is not None and event_ms > t.accounts.get(account, event_ms):
                    t.accounts[account] = event_ms  # a billing clock already known moves with its series
            elif clock.metric != metric:
                clocks[ck] = clock = clock._replace(metric=metric)
                t.moved.add(ck)
            mine.add(ck)
        for outcome, n in counts.items():
            outcomes[outcome] += n
        for p, mine in touched.items():  # every series that had an event is active now, and checked at punctuation
            t = self._t[p]
            t.check |= mine
            t.active.update(dict.fromkeys(mine, now))
        events = self._wire.events
        for key, (store, first_offset, raws) in chunks.items():  # what this batch added, as consumed
            store.put_raw(events_key(key, first_offset), events(raws))

    def _load_clock(self, t: _Tables, store: Any, ck: bytes) -> w.SeriesClock:
        clock = t.clocks[ck] = store.get(clock_key(ck)) or w.NO_CLOCK
        return clock

    def _marker(self, record: Incoming, raw: bytes, t: _Tables, store: Any, ctx: Context) -> None:
        """A completion marker: its series is complete through its time; windows ending by then close
        at the next punctuation (SPEC §3). Later data for them is still billed."""
        try:
            marker = self.codec.decode(raw, SeriesMarker)
        except DecodeError as exc:
            dead_letter(ctx, self.codec, self.topics.dlq_ingest, "windowing", record, "UNDECODABLE", str(exc))
            self._count("dead_lettered")
            return
        ck = key_prefix(marker.account, marker.series)
        clock = t.clocks.get(ck) or self._load_clock(t, store, ck)
        moved = w.close_through(clock, w._ms(marker.complete_through))
        if moved is not clock:
            t.clocks[ck] = moved
            t.moved.add(ck)
        t.check.add(ck)
        self._count("marker")

    def _refuses(self, t: _Tables, store: Any, state: w.WindowState, event_id: str, iv: w.Interval, account: str,
                 metric: str, end: int, limit: int, record: Incoming, raw: bytes, ctx: Context) -> bool:
        """The back-billing rule (``windows.refuses_back_billing``); a refused event goes to
        ``usage.late`` (BACK_BILLING_LIMIT) with its original bytes."""
        account_clock = t.accounts.get(account)
        if account_clock is None:  # the highest event time of the account's series, saved or moved in this batch
            prefix = f"{account}|".encode()
            clocks = [c.max_event_ms for _k, c in store.scan(CLOCK_PREFIX + prefix)]
            clocks += [c.max_event_ms for k, c in t.clocks.items() if k.startswith(WIN_PREFIX + prefix)]
            account_clock = t.accounts[account] = max(clocks, default=w.NEVER)
        if account_clock - end <= limit or not w.supersedes(state.intervals.get(event_id), iv):
            return False
        before = w.aggregate(state.aggregation, state.intervals)
        after = w.aggregate(state.aggregation, {**state.intervals, event_id: iv})
        if not w.refuses_back_billing(limit, account_clock, end, metric, before, after):
            return False
        event = self.codec.decode(raw, UsageEvent)
        late = LateEvent(event, "BACK_BILLING_LIMIT", w._dt(end), w._dt(account_clock), account_clock - end - limit,
                         stage="windowing",
                         message=f"raises the bill of a window that ended {(account_clock - end) / 86_400_000:.1f} "
                                 f"days before the account's billing clock (limit {limit / 86_400_000:g} days)",
                         input_topic=record.topic, input_partition=record.partition, input_offset=record.offset,
                         original_key=record.key, original=raw, headers=record.headers)
        ctx.forward(self.topics.usage_late, account, self.codec.encode(late))
        ctx.count("refused", "BACK_BILLING_LIMIT")
        return True

    def _revive(self, store: Any, key: bytes) -> w.WindowState | None:
        """The archived window of ``key`` brought back (intervals loaded, clean), or ``None``."""
        raw = store.get(archive_key(key))
        if raw is None:
            return None
        REVIVED.inc()
        return self._wire.read_archive(raw)

    def _window(self, store: Any, key: bytes, t: _Tables | None = None) -> w.WindowState | None:
        """The hot window at ``key`` (among ``t``'s fresh windows, or stored) with its intervals loaded, or
        ``None``."""
        state = t.fresh.get(key) if t is not None else None
        if state is not None:
            return state
        state = store.get(key)
        if state is not None and state.intervals is None:
            self._load_intervals(store, key, state)
        return state

    def _load_intervals(self, store: Any, key: bytes, state: w.WindowState) -> None:
        """Fill in the intervals of a window head read back from the store (in place: the store's
        cache keeps the loaded window): its archive's, if it was brought back from one, then its
        events entries folded on top. ``DecodeError`` on an entry that is not a ``UsageEvent``."""
        archived = store.get(archive_key(key))
        base = self._wire.read_archive(archived).intervals if archived is not None else {}
        state.intervals = self._wire.intervals((raw for _k, raw in store.scan(events_prefix(key))), base)

    def _policy_of(self, metric: str) -> w.WindowPolicy:
        """``policy(metric)``, asked once per metric: a window's size must not change under it."""
        found = self._policies.get(metric)
        if found is None:
            found = self._policies[metric] = self.policy(metric)
        return found

    # --- time ---------------------------------------------------------------------------------
    def punctuate(self, wallclock_ms: int, ctx: Context) -> None:
        """After every batch (and when idle): emit every pending window whose series has closed past
        its end (watermark or completion marker) or has been quiet for the idle timeout, archive
        windows old enough, and save the series clocks that moved, in the batch's transaction."""
        for p, t in self._t.items():
            store = ctx.store(p)
            due: list[tuple[int, bytes, bytes, str]] = []  # (end, window key, series key, trigger)
            sweep: list[bytes] = []
            clocks, oldest = t.clocks, t.oldest
            for ck in t.check:
                clock = clocks.get(ck) or self._load_clock(t, store, ck)
                closed = clock.watermark_ms if clock.watermark_ms >= clock.closed_through_ms \
                    else clock.closed_through_ms  # w.closes_at(clock): a window with end ≤ it has closed
                pending = t.pending.get(ck)
                if pending:
                    due += [(end, key, ck, "closed") for key, end in pending.items() if end <= closed]
                archivable = oldest.get(ck)
                if archivable is not None and archivable <= closed:
                    sweep.append(ck)
            idle = t.idle
            while idle and idle[0][0] <= wallclock_ms:
                _deadline, ck = heapq.heappop(idle)
                pending = t.pending.get(ck)
                if not pending:
                    continue
                quiet_until = t.active.get(ck, wallclock_ms) + self._idle_ms(store, t, ck)
                if quiet_until <= wallclock_ms:
                    due += [(end, key, ck, "idle") for key, end in pending.items()]
                else:
                    heapq.heappush(idle, (quiet_until, ck))
            for _end, key, ck, trigger in sorted(set(due)):
                pending = t.pending.get(ck)
                if pending is None or pending.pop(key, None) is None:
                    continue  # already emitted (both triggers)
                if not pending:
                    del t.pending[ck]
                    t.active.pop(ck, None)
                self._emit(store, t, key, ck, trigger, ctx)
            for ck in sorted(sweep):
                self._sweep(store, t, ck)
            for ck in t.moved:
                store.put(clock_key(ck), t.clocks[ck])
            if t.check or due:  # windows may have become pending or been emitted
                t.gauge.set(sum(map(len, t.pending.values())))
            t.moved.clear()
            t.check.clear()
            if len(t.clocks) > CLOCKS_HELD:
                t.clocks.clear()  # the store keeps them; every decision reads a clock at its window boundary
        self._publish()

    def _idle_ms(self, store: Any, t: _Tables, ck: bytes) -> int:
        clock = t.clocks.get(ck) or self._load_clock(t, store, ck)
        return self._policy_of(clock.metric).idle_timeout_ms if clock.metric else 0

    def _emit(self, store: Any, t: _Tables, key: bytes, ck: bytes, trigger: str, ctx: Context) -> None:
        state = self._window(store, key, t)
        t.fresh.pop(key, None)  # its head is written now
        if state is None or not state.dirty:
            return
        clock = t.clocks.get(ck) or self._load_clock(t, store, ck)
        rev = w.emit(state, clock)
        ctx.forward(self.topics.usage_windows, rev.account, self._wire.revision(rev),
                    timing.headers(t.arrived.pop(key, None), self.clock_ms()))
        self._emitted[(rev.timing, trigger)] = self._emitted.get((rev.timing, trigger), 0) + 1
        if w.is_archivable(state, clock, self._policy_of(state.metric)):
            self._archive(store, key, state)
        else:
            store.put(key, state)
            self._await_archive(t, ck, state)

    def _archive(self, store: Any, key: bytes, state: w.WindowState) -> None:
        """Replace a clean window's hot state (head and events entries) by its archive."""
        store.put_raw(archive_key(key), self._wire.archive(state))
        store.delete(key)
        for entry, _raw in list(store.scan(events_prefix(key))):
            store.delete(entry)
        ARCHIVED.inc()

    def _sweep(self, store: Any, t: _Tables, ck: bytes) -> None:
        """Archive the series' hot windows that became eligible (``windows.is_archivable``) as its clock
        moved: bounded state (SPEC §3). Runs only once the oldest emitted hot window may be archived."""
        clock = t.clocks.get(ck) or self._load_clock(t, store, ck)
        policy = self._policy_of(clock.metric) if clock.metric else None
        if policy is None or t.oldest[ck] > w.closed_window(clock, policy.size_ms):
            return
        del t.oldest[ck]
        for key, head in list(store.scan(ck)):
            if w.is_archivable(head, clock, policy):
                if head.intervals is None:
                    self._load_intervals(store, key, head)
                self._archive(store, key, head)
            elif not head.dirty and head.revision >= 0:
                self._await_archive(t, ck, head)

    # --- metrics ------------------------------------------------------------------------------
    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _publish(self) -> None:
        """Add the outcomes and emissions counted since the last call to the Prometheus counters."""
        published = self._published
        for outcome, n in self.outcomes.items():
            if n != published.get(outcome, 0):
                EVENTS.labels(outcome).inc(n - published.get(outcome, 0))
                published[outcome] = n
        for (revision_timing, trigger), n in self._emitted.items():
            EMITTED.labels(revision_timing, trigger).inc(n)
        self._emitted.clear()
