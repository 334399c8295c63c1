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

**Tie-out** (``tie_out``, issue 15), per (account, billing period, metric, price book component): the usage
the accepted readings add up to (each window's aggregate of the highest versions it holds) = the usage in the
windows' latest revisions = the quantity on the ledger (the latest line of each band / tier of the
component, summed). The ledger's quantity may trail the usage by less than a cent's worth per line: rating
appends a line only when a line's total changes (SPEC §4: never a zero delta), so a change too small to move
a total by a cent leaves the line's quantity where it was; the tolerance is less than ``0.01 / |rate|`` per
line, plus a micro-unit per further line of the component (allocation rounding); a zero-rate line is not
tied. Tied components: ``tou``, ``per_unit``, ``feed_in`` and
``tiered`` (their lines' quantities add up to the metric's usage); demand (kW), packages and surcharges are
not. Also checked: every ledger key's amounts add up to its latest period total, and the ledger's lines
equal the ``LINE_APPENDED`` rows of the outbox. A window whose latest revision rating dead-lettered (e.g.
``ACCUMULATION_ON_INTERVAL_TARIFF``) is counted, not tied. Any difference is a **break**.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from pipeline.codec import Codec, DecodeError
from pipeline.records import DeadLetter, LateEvent, MeterReading, UsageWindow
from pipeline.windowing import windows as w
from pipeline.windowing.wire import EventReader

STAGES = ("ingest", "windowing", "rating", "invoicing")
TIED_KINDS = ("tou", "per_unit", "feed_in", "tiered")  # components whose lines' quantities add up to the usage
CENT = Decimal("0.01")


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


@dataclass(frozen=True, slots=True)
class LedgerLine:
    """What the tie-out needs of one ledger line (``invoice_lines``): quantities in the line's unit (kWh for
    energy), amounts in its currency (major units), ``order`` = (source partition, source offset): the latest
    line of a key has the highest."""

    line_id: str
    account: str
    period_start: date
    component_id: str
    component_kind: str
    band: str
    quantity: Decimal
    rate: Decimal
    amount: Decimal
    period_total: Decimal
    price_book_id: str
    price_book_version: int
    order: tuple[int, int]


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
        windows_at: (partition, offset) on ``usage.windows`` → (window id, revision) of the record there.
        rating_dead: (partition, offset) on ``usage.windows`` of every revision rating dead-lettered.
        ledger: every ledger line (``tie_out``); outbox_lines / outbox_unsent: ``LINE_APPENDED`` rows in
            the outbox, and those the relay has not published yet.
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
    windows_at: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)
    rating_dead: set[tuple[int, int]] = field(default_factory=set)
    ledger: list[LedgerLine] = field(default_factory=list)
    outbox_lines: int = 0
    outbox_unsent: int = 0


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
        duplicates: inputs repeating an earlier input's identity and version; superseded: inputs whose
            version is below their identity's highest (both billed when their interval is: SPEC §2).
        tie: the tie-out (``tie_out``), when reference data was given.
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
    duplicates: int = 0
    superseded: int = 0
    tie: TieOut | None = None

    @property
    def complete(self) -> bool:
        """Every input is billed, dead-lettered or refused."""
        return not any(self.pending.values())

    @property
    def clean(self) -> bool:
        """Complete, and the tie-out (if made) found no break."""
        return self.complete and (self.tie is None or not self.tie.breaks)

    def as_json(self) -> dict[str, Any]:
        """The report as JSON-able data (``pipeline reconcile --json``): counts, pending, rows, breaks."""
        out: dict[str, Any] = {
            "inputs": self.inputs, "billed": self.billed, "dead_lettered": self.dead_lettered,
            "refused": self.refused, "pending": self.pending, "duplicates": self.duplicates,
            "superseded": self.superseded, "windows": self.windows, "windows_reconciled": self.windows_reconciled,
            "complete": self.complete, "clean": self.clean}
        if self.tie is not None:
            out["tie_out"] = self.tie.as_json()
        return out

    def lines(self) -> list[str]:
        """The report for a person: the accounting identity, then what is pending and where."""
        refused = sum(self.refused.values())
        out = [f"readings in {self.inputs:,} = billed {self.billed:,} + dead-lettered {self.dead_lettered:,} "
               f"+ refused {refused:,}" + (f" + pending {sum(self.pending.values()):,}" if not self.complete else "")]
        for reason, n in sorted(self.refused.items()):
            out.append(f"  refused {reason}: {n:,} (usage.late; `pipeline late replay` re-submits them)")
        out.append(f"  repeated readings (billed with their interval): {self.duplicates:,} duplicates, "
                   f"{self.superseded:,} superseded")
        out.append(f"  windows: {self.windows_reconciled:,} of {self.windows:,} carry exactly their readings")
        for stage in STAGES:
            if self.pending.get(stage):
                out.append(f"  pending at {stage}: {self.pending[stage]:,} readings "
                           f"({self.lag.get(stage, 0):,} records not consumed yet)")
        if self.mismatched:
            out.append(f"  windows not (yet) matching their readings: {', '.join(self.mismatched)}")
        if self.tie is not None:
            out.extend(self.tie.lines())
        return out


def reconcile(snap: Snapshot, policy: Callable[[str], w.WindowPolicy], ref: Any = None,
              account: str | None = None, period: date | None = None) -> Report:
    """The fate of every input of ``snap`` (see the module doc). ``policy``: metric → window policy (its
    size and aggregation), as the windowing stage uses it. With ``ref`` (reference data) also the tie-out
    (``tie_out``), limited to ``account`` / the period starting ``period`` when given (the fates of the
    inputs are always counted over everything). Pure."""
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
    highest: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    for inp in snap.inputs:
        if inp.identity is not None:
            highest[inp.identity] = max(highest.get(inp.identity, inp.version_ms), inp.version_ms)
    for inp in snap.inputs:
        if inp.identity is None:
            continue
        if (inp.identity, inp.version_ms) in seen:
            report.duplicates += 1
        elif inp.version_ms < highest[inp.identity]:
            report.superseded += 1
        seen.add((inp.identity, inp.version_ms))
    if ref is not None:
        report.tie = tie_out(snap, policy, ref, held, meta, account=account, period=period)
    return report


@dataclass(frozen=True, slots=True)
class TieRow:
    """One (account, period, metric, price book, component): usage in micro-units of the metric's unit.

    ``accepted``: what the accepted readings add up to; ``windowed``: the windows' latest revisions;
    ``ledger``: the ledger's quantity (``None``: no line yet); ``tolerance``: how far the ledger may trail
    (see the module doc; ``None``: not bounded, a zero-rate line)."""

    account: str
    period_start: date
    metric: str
    price_book_id: str
    component_id: str
    accepted: int
    windowed: int
    ledger: int | None
    tolerance: int | None

    @property
    def broken(self) -> bool:
        """The readings, the windows and the ledger disagree (beyond the ledger's tolerance)."""
        if self.accepted != self.windowed:
            return True
        if self.tolerance is None:
            return False
        return abs((self.ledger or 0) - self.windowed) > self.tolerance


@dataclass
class TieOut:
    """The tie-out (``tie_out``): rows, and every break as a sentence naming what differs and by how much."""

    rows: list[TieRow] = field(default_factory=list)
    breaks: list[str] = field(default_factory=list)
    ledger_lines: int = 0
    outbox_lines: int = 0
    outbox_unsent: int = 0
    rating_dead_windows: int = 0

    def as_json(self) -> dict[str, Any]:
        """Rows (quantities as decimal strings), breaks and the outbox counts."""
        def q(micro: int | None) -> str | None:
            return None if micro is None else str(Decimal(micro) / w.MICRO)

        return {"rows": [{"account": r.account, "period_start": r.period_start.isoformat(), "metric": r.metric,
                          "price_book_id": r.price_book_id, "component_id": r.component_id,
                          "accepted": q(r.accepted), "windowed": q(r.windowed), "ledger": q(r.ledger),
                          "tolerance": q(r.tolerance), "broken": r.broken} for r in self.rows],
                "breaks": self.breaks, "ledger_lines": self.ledger_lines, "outbox_lines": self.outbox_lines,
                "outbox_unsent": self.outbox_unsent, "rating_dead_windows": self.rating_dead_windows}

    def lines(self) -> list[str]:
        """A table per (account, period, metric, component), then the breaks."""
        def q(micro: int | None) -> str:
            return "-" if micro is None else f"{Decimal(micro) / w.MICRO:,.6f}"

        out = [f"  tie-out: {len(self.rows):,} rows, {len(self.breaks):,} breaks; ledger lines {self.ledger_lines:,} "
               f"= outbox LINE_APPENDED {self.outbox_lines:,} ({self.outbox_unsent:,} not published yet)"
               + (f"; {self.rating_dead_windows:,} windows dead-lettered by rating" if self.rating_dead_windows
                  else "")]
        head = ("account", "period", "metric", "component", "readings", "windows", "ledger", "")
        table = [head] + [(r.account, r.period_start.isoformat(), r.metric, f"{r.price_book_id}|{r.component_id}",
                           q(r.accepted), q(r.windowed), q(r.ledger), "BREAK" if r.broken else "ok")
                          for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        for row in table:
            out.append("  " + "  ".join(c.rjust(n) if 3 < i < 7 else c.ljust(n)
                                        for i, (c, n) in enumerate(zip(row, widths, strict=True))).rstrip())
        out.extend(f"  BREAK: {b}" for b in self.breaks)
        return out


def tie_out(snap: Snapshot, policy: Callable[[str], w.WindowPolicy], ref: Any,
            held: dict[str, dict[str, w.Interval]], meta: dict[str, str],
            account: str | None = None, period: date | None = None) -> TieOut:
    """The tie-out of ``snap`` (module doc), for every (account, period) or the one ``account`` / the
    period starting ``period`` given. ``ref``: the reference data (``pipeline.reference.ReferenceData``:
    billing periods, plans, price books); ``held`` / ``meta``: window id → the highest versions it must
    carry / its metric (from ``reconcile``). Pure."""
    from pipeline.rating.rate import period_containing

    books = ref.books_by_version()
    dead_latest = {wid for wid, rev in (snap.windows_at[pos] for pos in snap.rating_dead if pos in snap.windows_at)
                   if wid in snap.latest and snap.latest[wid].revision == rev}
    out = TieOut(ledger_lines=len(snap.ledger), outbox_lines=snap.outbox_lines, outbox_unsent=snap.outbox_unsent)
    Key = tuple[str, date, str, str, str]  # account, period start, metric, book id, component id
    accepted: dict[Key, int] = defaultdict(int)
    windowed: dict[Key, int] = defaultdict(int)

    def keys_of(acct: str, metric: str, start: datetime) -> list[Key]:
        info = ref.accounts.get(acct)
        if info is None:
            return []
        day = start.astimezone(info.tz).date()
        p = period_containing(info.billing_cycle, info.billing_anchor, day)
        book = ref.book_for(acct, day, metric)  # the book of the metric's service (multi-service accounts)
        if book is None:
            return []
        return [(acct, p.start, metric, book.id, c.id) for c in book.usage_components(metric)
                if c.kind in TIED_KINDS]

    for wid in set(held) | set(snap.latest):
        if wid in dead_latest:
            out.rating_dead_windows += 1
            continue
        rev = snap.latest.get(wid)
        ivs = held.get(wid, {})
        if rev is not None:
            acct, metric, start = rev.account, rev.metric, rev.window_start
        else:  # events held but no revision emitted yet: ``account|series|start ms``
            acct, _series, start_ms = wid.rsplit("|", 2)
            metric, start = meta[wid], datetime.fromtimestamp(int(start_ms) / 1000, UTC)
        for k in keys_of(acct, metric, start):
            if ivs:
                accepted[k] += w.aggregate(policy(metric).aggregation, ivs)
            if rev is not None:
                windowed[k] += w.to_micro(rev.value)

    # the ledger: latest line per (account, period, book, component, band), summed over bands and tiers
    latest: dict[tuple[str, date, str, str, str], LedgerLine] = {}
    amounts: dict[tuple[str, date, str, str, str], Decimal] = defaultdict(Decimal)
    for line in snap.ledger:
        lk = (line.account, line.period_start, line.price_book_id, line.component_id, line.band)
        amounts[lk] += line.amount
        if lk not in latest or line.order > latest[lk].order:
            latest[lk] = line
    for lk, line in sorted(latest.items()):
        if (account is None or lk[0] == account) and (period is None or lk[1] == period) \
                and amounts[lk] != line.period_total:
            out.breaks.append(f"{lk[0]} {lk[1]} {lk[2]}|{lk[3]}|{lk[4]}: the lines' amounts add up to "
                              f"{amounts[lk]:f}, the latest line's period total is {line.period_total:f}")
    ledger: dict[Key, int] = defaultdict(int)
    tolerance: dict[Key, int | None] = defaultdict(int)
    for (acct, pstart, book_id, comp_id, _band), line in latest.items():
        if line.component_kind not in TIED_KINDS:
            continue
        book = books.get((book_id, line.price_book_version))
        comp = next((c for c in book.components if c.id == comp_id), None) if book is not None else None
        metric = getattr(comp, "metric", None)
        if metric is None:
            continue
        k = (acct, pstart, metric, book_id, comp_id)
        ledger[k] += w.to_micro(line.quantity)
        if line.rate == 0 or tolerance[k] is None:
            tolerance[k] = None
        else:
            # less than a cent's worth at the line's rate; a micro-unit per further line (allocation rounding)
            worth = -(-CENT * w.MICRO // abs(line.rate))  # ceil, micro-units
            tolerance[k] = (tolerance[k] + 1 if tolerance[k] else 0) + int(worth) - 1
    for k in sorted(set(accepted) | set(windowed) | set(ledger)):
        if (account is not None and k[0] != account) or (period is not None and k[1] != period):
            continue
        has_ledger = k in ledger
        row = TieRow(*k, accepted=accepted.get(k, 0), windowed=windowed.get(k, 0),
                     ledger=ledger[k] if has_ledger else None,
                     tolerance=tolerance[k] if has_ledger else 0)
        out.rows.append(row)
        if row.broken:
            out.breaks.append(
                f"{k[0]} {k[1]} {k[2]} ({k[3]}|{k[4]}): readings {Decimal(row.accepted) / w.MICRO:f}, windows "
                f"{Decimal(row.windowed) / w.MICRO:f}, ledger "
                f"{'none' if row.ledger is None else Decimal(row.ledger) / w.MICRO}"
                + ("" if row.tolerance is None else f" (tolerance {Decimal(row.tolerance) / w.MICRO:f})"))
    if account is None and period is None and out.ledger_lines != out.outbox_lines:
        out.breaks.append(f"the ledger holds {out.ledger_lines:,} lines but the outbox announces "
                          f"{out.outbox_lines:,} (LINE_APPENDED)")
    return out


def write_metrics(report: Report, path: Any) -> None:
    """Write ``report``'s figures to ``path`` in the Prometheus text format (node_exporter's textfile
    collector; written atomically by ``prometheus_client.write_to_textfile``): ``pipeline_reconcile_inputs``,
    ``pipeline_reconcile_readings{fate}``, ``pipeline_reconcile_pending{stage}``,
    ``pipeline_reconcile_breaks``, ``pipeline_reconcile_timestamp_seconds``."""
    import time

    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    Gauge("pipeline_reconcile_inputs", "input readings counted", registry=registry).set(report.inputs)
    fates = Gauge("pipeline_reconcile_readings", "input readings by fate", ["fate"], registry=registry)
    fates.labels("billed").set(report.billed)
    fates.labels("dead_lettered").set(report.dead_lettered)
    fates.labels("refused").set(sum(report.refused.values()))
    fates.labels("duplicate").set(report.duplicates)
    fates.labels("superseded").set(report.superseded)
    pending = Gauge("pipeline_reconcile_pending", "input readings pending, by stage", ["stage"], registry=registry)
    for stage in STAGES:
        pending.labels(stage).set(report.pending.get(stage, 0))
    Gauge("pipeline_reconcile_breaks", "tie-out breaks (0 when clean)", registry=registry).set(
        len(report.tie.breaks) if report.tie is not None else 0)
    Gauge("pipeline_reconcile_timestamp_seconds", "when the reconciliation ran (Unix time)",
          registry=registry).set(time.time())
    write_to_textfile(str(path), registry)


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
        elif dead.stage == "rating" and dead.topic == topics.usage_windows:
            snap.rating_dead.add((dead.partition, dead.offset))
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
        snap.windows_at[(m.partition, m.offset)] = (win.window_id, win.revision)
        held = snap.latest.get(win.window_id)
        if held is None or win.revision > held.revision:
            snap.latest[win.window_id] = win
    snap.rated_lines = {codec.decode_dict(m.value, "RatedCharge")["line_id"] for m in records[topics.charges_rated]}
    with postgres.connect(settings.database_url) as conn:
        snap.ledger = [LedgerLine(*row[:12], order=(row[12], row[13])) for row in conn.execute(
            "SELECT line_id, account, period_start, component_id, component_kind, band, quantity, rate, amount, "
            "period_total, price_book_id, price_book_version, source_partition, source_offset FROM invoice_lines "
            "WHERE line_kind <> 'MANUAL'")]  # manual lines (Bill API) come from no reading
        snap.ledger_lines = {line.line_id for line in snap.ledger}
        snap.outbox_lines, snap.outbox_unsent = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE sent_at IS NULL) FROM outbox "
            "WHERE event_type = 'LINE_APPENDED' AND payload->>'line_kind' IS DISTINCT FROM 'MANUAL'").fetchone()
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
