"""Accounting for every reading (issue 11, SPEC §6 invariant 1): in = billed + dead-lettered + refused.

``reconcile`` is pure: given what is on the topics and in the ledger (a ``Snapshot``), it gives each
input record (a meter reading or a telemetry CloudEvent) exactly one fate:

- **dead-lettered**: ingest sent it to ``dlq.ingest`` (bad input, with a reason);
- **refused**: an explicit billing rule sent it to ``usage.late``: ingest (outside service dates; the
  record named by where it was consumed) or windowing (back-billing limit; the usage event named by
  where it was consumed, the readings of that identity and version refused with it unless that
  version was billed after all, e.g. re-submitted by ``pipeline late replay``);
- **billed**: its interval is held, at its highest version, in a window whose latest revision on
  ``usage.windows`` carries exactly what the window's events add up to (count and value), rating has
  consumed every window revision and invoicing has put every rated line on the ledger;
- **pending**, with the stage it waits on: nothing else. A finished pipeline has none.

A repeated reading (a duplicate, or a lower version) is billed when its interval is: it changed
nothing, and what it stands for is on the bill. ``take_snapshot`` reads the topics and the ledger
(``read_committed``), for ``pipeline reconcile``, the demo and the tests.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.codec import Codec, DecodeError
from pipeline.records import DeadLetter, LateEvent, MeterReading, UsageWindow
from pipeline.windowing import windows as w
from pipeline.windowing.wire import EventReader

STAGES = ("ingest", "windowing", "rating", "invoicing")


@dataclass(frozen=True, slots=True)
class Input:
    """One input record: where it is, and the identity and version of the reading it carries
    (``identity`` ``None`` when it cannot be read: it must be dead-lettered)."""

    topic: str
    partition: int
    offset: int
    identity: str | None
    version_ms: int


@dataclass(frozen=True, slots=True)
class Forwarded:
    """A usage event on ``usage.events`` as windowing folds it (times epoch ms, value micro-units), and
    where it is (``partition``, ``offset``)."""

    partition: int
    offset: int
    event_id: str
    account: str
    series: str
    metric: str
    event_ms: int
    version_ms: int
    value: int
    quality: str


@dataclass
class Snapshot:
    """What is on the topics and in the ledger at one moment.

    Attributes:
        inputs: every record of the input topics except completion markers.
        dead: (topic, partition, offset) of every input ingest dead-lettered.
        refused: every record on ``usage.late``.
        forwarded: every usage event on ``usage.events`` (markers left out).
        latest: window id → its latest revision on ``usage.windows``.
        caught_up: stage → whether its committed offsets reached the last record of each input partition.
        rated_lines / ledger_lines: line ids on ``charges.rated`` and in the ledger.
        lag: stage → records of its input topics not consumed yet (end offsets − committed: may count
            a transaction marker per partition).
    """

    inputs: list[Input] = field(default_factory=list)
    dead: set[tuple[str, int, int]] = field(default_factory=set)
    refused: list[LateEvent] = field(default_factory=list)
    forwarded: list[Forwarded] = field(default_factory=list)
    latest: dict[str, UsageWindow] = field(default_factory=dict)
    caught_up: dict[str, bool] = field(default_factory=dict)
    rated_lines: set[str] = field(default_factory=set)
    ledger_lines: set[str] = field(default_factory=set)
    lag: dict[str, int] = field(default_factory=dict)


@dataclass
class Report:
    """Every input's fate (``reconcile``). ``billed + dead_lettered + sum(refused) + sum(pending) = inputs``.

    Attributes:
        inputs: input records (readings and telemetry events).
        billed / dead_lettered: counts.
        refused: reason → count.
        pending: stage → inputs waiting on it.
        windows / windows_reconciled: windows holding forwarded events; those whose latest revision
            carries exactly their events.
        mismatched: a few window ids whose latest revision does not (yet) match, for the message.
        lag: as ``Snapshot.lag``.
    """

    inputs: int = 0
    billed: int = 0
    dead_lettered: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    windows: int = 0
    windows_reconciled: int = 0
    mismatched: list[str] = field(default_factory=list)
    lag: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every input is billed, dead-lettered or refused."""
        return not any(self.pending.values())

    def lines(self) -> list[str]:
        """The report for a person: the accounting identity, then what is pending and where."""
        refused = sum(self.refused.values())
        out = [f"readings in {self.inputs:,} = billed {self.billed:,} + dead-lettered {self.dead_lettered:,} "
               f"+ refused {refused:,}" + (f" + pending {sum(self.pending.values()):,}" if not self.complete else "")]
        for reason, n in sorted(self.refused.items()):
            out.append(f"  refused {reason}: {n:,} (usage.late; `pipeline late replay` re-submits them)")
        out.append(f"  windows: {self.windows_reconciled:,} of {self.windows:,} carry exactly their readings")
        for stage in STAGES:
            if self.pending.get(stage):
                out.append(f"  pending at {stage}: {self.pending[stage]:,} readings "
                           f"({self.lag.get(stage, 0):,} records not consumed yet)")
        if self.mismatched:
            out.append(f"  windows not (yet) matching their readings: {', '.join(self.mismatched)}")
        return out


def reconcile(snap: Snapshot, policy: Callable[[str], w.WindowPolicy]) -> Report:
    """The fate of every input of ``snap`` (see the module doc). ``policy``: metric → window policy (its
    size and aggregation), as the windowing stage uses it. Pure."""
    report = Report(inputs=len(snap.inputs), lag=dict(snap.lag))
    refused_inputs = {(late.input_topic, late.input_partition, late.input_offset): late.reason
                      for late in snap.refused if late.stage == "ingest"}
    refused_events = {(late.input_partition, late.input_offset) for late in snap.refused if late.stage == "windowing"}
    refused_versions = {(late.event.event_id, w._ms(late.event.version)): late.reason
                        for late in snap.refused if late.stage == "windowing"}
    # what each window must carry: the highest version of each identity forwarded and accepted (SPEC §2)
    held: dict[str, dict[str, w.Interval]] = defaultdict(dict)
    window_of: dict[str, str] = {}
    meta: dict[str, str] = {}
    for ev in snap.forwarded:
        if (ev.partition, ev.offset) in refused_events:
            continue
        size = policy(ev.metric).size_ms
        wid = w.window_id(ev.account, ev.series, ev.event_ms - ev.event_ms % size)
        iv = w.Interval(ev.version_ms, ev.value, ev.quality, "", ev.event_ms)
        if w.supersedes(held[wid].get(ev.event_id), iv):
            held[wid][ev.event_id] = iv
        window_of[ev.event_id] = wid
        meta[wid] = ev.metric
    reconciled: set[str] = set()
    for wid, ivs in held.items():
        rev = snap.latest.get(wid)
        expected = w.aggregate(policy(meta[wid]).aggregation, ivs)
        if rev is not None and rev.count == len(ivs) and w.to_micro(rev.value) == expected:
            reconciled.add(wid)
        elif len(report.mismatched) < 5:
            report.mismatched.append(wid)
    report.windows, report.windows_reconciled = len(held), len(reconciled)
    on_ledger = snap.caught_up.get("rating", False) and snap.caught_up.get("invoicing", False) \
        and snap.rated_lines <= snap.ledger_lines
    pending: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    for inp in snap.inputs:
        where = (inp.topic, inp.partition, inp.offset)
        wid = window_of.get(inp.identity) if inp.identity is not None else None
        if where in snap.dead:
            report.dead_lettered += 1
        elif where in refused_inputs:
            refused[refused_inputs[where]] += 1
        elif (inp.identity, inp.version_ms) in refused_versions and (
                wid is None or held[wid][inp.identity].version_ms != inp.version_ms):
            refused[refused_versions[(inp.identity, inp.version_ms)]] += 1
        elif wid is None:
            pending["ingest"] += 1
        elif wid not in reconciled:
            pending["windowing"] += 1
        elif not on_ledger:
            pending["rating" if not snap.caught_up.get("rating", False) else "invoicing"] += 1
        else:
            report.billed += 1
    report.refused, report.pending = dict(refused), dict(pending)
    return report


# --- reading the topics and the ledger ----------------------------------------------------------------------
def read_input(codec: Codec, record: Any, telemetry_topic: str) -> Input | None:
    """The ``Input`` of one consumed input record (``pipeline.runtime.kafka.Incoming``), ``None`` for a
    completion marker (not a reading)."""
    from pipeline.ingest.telemetry import RejectedInput, read_cloudevent, telemetry_event_id

    where = (record.topic, record.partition, record.offset)
    if record.topic == telemetry_topic:
        try:
            ce = read_cloudevent(record.headers, record.value)
        except RejectedInput:
            return Input(*where, None, 0)
        return Input(*where, telemetry_event_id(ce.source, ce.id), ce.time_ms)
    raw = record.value or b""
    if codec.record_name(raw) == "SeriesComplete":
        return None
    try:
        reading = codec.decode(raw, MeterReading)
    except DecodeError:
        return Input(*where, None, 0)
    return Input(*where, reading.identity, w._ms(reading.version))


def take_snapshot(settings: Any) -> Snapshot:
    """Read everything ``reconcile`` needs from the topics of ``settings`` (``read_committed``) and its
    ledger. Raises ``KafkaIOError`` / a database error when the stack does not answer."""
    from pipeline.codec import default_codec
    from pipeline.runtime import postgres
    from pipeline.runtime.kafka import committed_offsets, end_offsets, read_all
    from pipeline.topology import Topics

    codec = default_codec()
    topics = Topics(settings)
    boot = settings.kafka_bootstrap
    snap = Snapshot()
    records = {t: read_all(boot, t, timeout_s=120) for t in (
        topics.meter_readings, topics.telemetry_events, topics.usage_events, topics.usage_windows,
        topics.charges_rated, topics.usage_late, topics.dlq_ingest)}
    for t in (topics.meter_readings, topics.telemetry_events):
        for m in records[t]:
            inp = read_input(codec, m, topics.telemetry_events)
            if inp is not None:
                snap.inputs.append(inp)
    for m in records[topics.dlq_ingest]:
        dead = codec.decode(m.value, DeadLetter)
        if dead.stage == "ingest":
            snap.dead.add((dead.topic, dead.partition, dead.offset))
    snap.refused = [codec.decode(m.value, LateEvent) for m in records[topics.usage_late]]
    reader = EventReader(codec)
    for m in records[topics.usage_events]:
        try:
            ev = reader(m.value or b"")
        except DecodeError:
            continue  # a completion marker (or what windowing dead-letters)
        snap.forwarded.append(Forwarded(m.partition, m.offset, ev.event_id, ev.account, ev.series, ev.metric,
                                        ev.event_time, ev.version, ev.value, ev.quality))
    for m in records[topics.usage_windows]:
        win = codec.decode(m.value, UsageWindow)
        held = snap.latest.get(win.window_id)
        if held is None or win.revision > held.revision:
            snap.latest[win.window_id] = win
    snap.rated_lines = {codec.decode_dict(m.value, "RatedCharge")["line_id"] for m in records[topics.charges_rated]}
    with postgres.connect(settings.database_url) as conn:
        snap.ledger_lines = {r[0] for r in conn.execute("SELECT line_id FROM invoice_lines")}
        ledger_offsets = {(t, p): o for t, p, o in conn.execute(
            "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = %s",
            (topics.group("invoicing"),))}
    inputs = {"ingest": [topics.meter_readings, topics.telemetry_events], "windowing": [topics.usage_events],
              "rating": [topics.usage_windows], "invoicing": [topics.charges_rated]}
    for stage, stage_topics in inputs.items():
        tps = [(t, p) for t in stage_topics for p in range(settings.partitions)]
        done = ledger_offsets if stage == "invoicing" else committed_offsets(boot, topics.group(stage), tps)
        last: dict[tuple[str, int], int] = dict.fromkeys(tps, 0)
        for t in stage_topics:
            for m in records[t]:
                last[(t, m.partition)] = max(last[(t, m.partition)], m.offset + 1)
        snap.caught_up[stage] = all(max(done.get(tp, 0), 0) >= last[tp] for tp in tps)
        ends = end_offsets(boot, tps)
        snap.lag[stage] = sum(max(ends[tp] - max(done.get(tp, 0), 0), 0) for tp in tps)
    return snap


def progress(settings: Any) -> dict[str, tuple[int, int]]:
    """Per stage, (records of its input topics committed, records on them): cheap (offsets only), for a
    progress display. The record counts include transaction markers, so a stage that has consumed
    everything may show up to one record per partition and transaction-written topic behind."""
    from pipeline.runtime import postgres
    from pipeline.runtime.kafka import committed_offsets, end_offsets
    from pipeline.topology import Topics

    topics = Topics(settings)
    boot = settings.kafka_bootstrap
    inputs = {"ingest": [topics.meter_readings, topics.telemetry_events], "windowing": [topics.usage_events],
              "rating": [topics.usage_windows], "invoicing": [topics.charges_rated]}
    with postgres.connect(settings.database_url) as conn:
        ledger_offsets = {(t, p): o for t, p, o in conn.execute(
            "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = %s",
            (topics.group("invoicing"),))}
    out = {}
    for stage, stage_topics in inputs.items():
        tps = [(t, p) for t in stage_topics for p in range(settings.partitions)]
        done = ledger_offsets if stage == "invoicing" else committed_offsets(boot, topics.group(stage), tps)
        ends = end_offsets(boot, tps)
        out[stage] = (sum(min(max(done.get(tp, 0), 0), ends[tp]) for tp in tps), sum(ends.values()))
    return out
