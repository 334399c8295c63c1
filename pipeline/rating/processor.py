"""The rating stage: window revisions → delta charge lines (``charges.rated``), SPEC §4.

State per input partition:
- ``rw|<window id>`` → the latest revision of a window seen, its value and the quantity keys it feeds;
- ``rp|<account>|<period start>`` → the period's aggregates and the rounded totals already emitted per
  charge line: quantity per (price book version, component, band), windows and quality flags per quantity
  key (counted, so a superseded estimate stops marking the line), and per demand component the kWh of each
  (meter, demand interval): the total of the meter's channels of the metric (E1 + E2 ...).

- ``rk|<period key>`` → ``["<book id>|<version>><book id>|<version>", ...]`` (issue 13; written only by the re-rating
  fast path below): the versions whose keys the period's aggregates were moved to without touching its windows, so a
  stored window's keys (``rw|``, still naming the old version) resolve to the period's current keys
  (``resolve_key``). Absent: every stored key is current (all state written before issue 13).

Re-rating after a superseding price book version (SPEC §4): when one version is in effect on every day of a period
and differs from the versions the period's keys name only in rates (``key_structure``), the period's aggregates are
re-keyed in place (``_rekey_period``: the same state as rebuilding it from its windows); otherwise (band or
interval changes, a version starting mid-period, an older state format) the period is rebuilt from its windows.

A window revision updates the aggregates by (new − old) value; all revisions of one (account,
period) in a batch are coalesced into one recompute with ``rate_period`` at the end of the batch,
which emits ``new total − emitted total`` per line, only where non-zero.

Hot path (issue 13): ``process_batch`` looks up per batch what a batch shares (reference snapshot, posting policy,
processing time, stores) and per revision only memo entries; a window's stored keys and flags are the memos' tuples
(never changed in place). A posted line's explanation serializes each listed revision once per posting
(``_explanation_json``), however many lines it explains.

Demand (issue 14): a window adds its kWh to the demand interval of its meter that contains it; the
meter's peak is its highest interval total ÷ the interval's hours. A window that is longer than a
demand component's interval, or does not divide it, cannot measure it: the revision is dead-lettered
(``DEMAND_INTERVAL_FINER_THAN_DATA``) before it changes anything. So is a window of NEM13 register reads
(spread evenly over days, ``nem13.SPREAD_MARK`` in its sources) that a TOU or demand component would price
(``ACCUMULATION_ON_INTERVAL_TARIFF``): it has no time of day.

State format 2 (this version) replaced the demand of format 1 (kW per window start, where two channels
with one start overwrote each other) and the quality flags kept as an ever-growing union: a format-1
period is rebuilt from its windows' stored revisions the first time a revision reaches it, and its
next recompute emits any difference (the corrected demand) as an ordinary delta. Format 3 (issue 17) adds the
windows per local day; a format-2 period is rebuilt the same way.

Each energy line's explanation also carries what the invoicing stage checks before it finalizes an invoice
(``pipeline.invoicing.validation``): ``window_count`` and ``estimated_windows`` (windows feeding the line and
those carrying an estimated or substituted read) and, for lines in kWh, ``service_days``, ``usage_days`` and the
first ``missing_days`` (days of service in the period, as of this line, without any window).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any

from prometheus_client import Counter

from pipeline.avrowire import remember
from pipeline.codec import Codec, DecodeError
from pipeline.ingest.nem13 import SPREAD_MARK
from pipeline.money import ZERO
from pipeline.rating import rate as r
from pipeline.rating.posting import (
    IDLE,
    RERATE,
    CauseDigest,
    DaySummary,
    PostingPolicy,
    posting_boundaries_ms,
    posting_reason,
)
from pipeline.rating.pricebook import ContributionComponent, DemandComponent, PriceBook, TouComponent
from pipeline.rating.services import VOLUME_UNITS, gas_energy_mj
from pipeline.rating.wire import (
    PendingWriter,
    PeriodStateWriter,
    WindowStateWriter,
    decode_window,
    encode_charge,
    window_reader,
)
from pipeline.records import ESTIMATED_QUALITY_FLAGS, RatedCharge, UsageWindow
from pipeline.reference import ReferenceData
from pipeline.runtime import timing
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import Context, dead_letter
from pipeline.topology import Topics

log = logging.getLogger(__name__)

REVISIONS = Counter("pipeline_rating_window_revisions_total", "window revisions by outcome", ["outcome"])
LINES = Counter("pipeline_rating_lines_total", "delta lines emitted", ["component_kind"])
POSTINGS = Counter("pipeline_rating_postings_total",
                   "periods posted to the ledger, by reason (pipeline.rating.posting)", ["reason"])
_REV_ACCEPTED = REVISIONS.labels("accepted")  # children cached: a labels() lookup per record costs
_REV_DUPLICATE = REVISIONS.labels("duplicate")
_REV_DEAD_LETTERED = REVISIONS.labels("dead_lettered")
_LINES_BY_KIND: dict[str, Any] = {}
UNMEASURED = Counter("pipeline_rating_unmeasured_demand_total",
                     "windows left out of a demand they cannot measure while re-rating (logged)")

FORMAT = 3  # the period state format this code writes (see the module docstring)
LEGACY_WINDOW_MS = 1_800_000  # a format-1 window state without its end: the 30-minute windows of that time


@dataclass(slots=True)
class RatedWindowState:
    """The latest revision of one window as seen by rating: its value (in the metric's unit), the period
    it belongs to, the quantity keys and demand keys it feeds, its bounds (epoch ms) and quality flags. The
    sequences are lists or tuples shared with memos and other windows: never changed in place, only replaced."""

    revision: int
    value: Decimal
    period_key: str
    keys: Sequence[str]
    demand_keys: Sequence[str] = field(default_factory=list)
    window_start_ms: int = 0
    kw: Decimal = ZERO  # format 1 only (the window's own kW); unused
    metric: str = ""
    window_end_ms: int = 0
    qualities: Sequence[str] = field(default_factory=list)
    series: str = ""  # not stored: named by the window id (the store key); set before folding

    @property
    def window_ms(self) -> int:
        end, start = self.window_end_ms, self.window_start_ms
        return end - start if end > start else LEGACY_WINDOW_MS


@dataclass
class PeriodState:
    """Aggregates and emitted totals of one (account, billing period).

    ``quality_counts``: quantity key → quality flag → windows (latest revisions) carrying it.
    ``demand_kwh``: demand key → ``<meter>|<interval start ms>`` → kWh of every window of the meter in that
    demand interval (all its channels); keys stay (possibly empty) once seen, so their lines stay rated.
    ``qualities`` and ``demand``: format 1 (a union of flags; kW per window start), emptied by the upgrade.
    ``days``: local date (ISO, the account's time zone) → windows (latest revisions, any metric) starting on it
    (format 3): the days with usage, for the missing-service-day check before an invoice is finalized.
    """

    account: str
    period_start: date
    period_end: date
    quantities: dict[str, Decimal] = field(default_factory=dict)
    qualities: dict[str, list[str]] = field(default_factory=dict)
    windows: dict[str, int] = field(default_factory=dict)
    emitted: dict[str, Decimal] = field(default_factory=dict)
    demand: dict[str, dict[str, Decimal]] = field(default_factory=dict)
    quality_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    demand_kwh: dict[str, dict[str, Decimal]] = field(default_factory=dict)
    format: int = FORMAT
    days: dict[str, int] = field(default_factory=dict)

    def peaks(self, interval_ms: Callable[[str], int]) -> dict[str, tuple[Decimal, ...]]:
        """Per demand key, each meter's peak kW (meters in name order): the highest kWh of one demand
        interval × (60 / interval minutes), 6 dp (exact: intervals are 5, 10, 15 or 30 minutes).
        ``interval_ms(demand key)``: the demand component's interval."""
        out: dict[str, tuple[Decimal, ...]] = {}
        for key, slots in self.demand_kwh.items():
            per_hour = Decimal(3_600_000 // interval_ms(key))
            best: dict[str, Decimal] = {}
            for slot, kwh in slots.items():
                meter = slot.rpartition("|")[0]
                if meter not in best or kwh > best[meter]:
                    best[meter] = kwh
            out[key] = tuple((best[m] * per_hour).quantize(QUANTUM) for m in sorted(best))
        return out

    def flags(self, line_inputs: set[str]) -> list[str]:
        """The quality flags of the windows feeding a line (its inputs: ``book|component|band``)."""
        out: set[str] = set()
        for k, counts in self.quality_counts.items():
            if r.line_key_of(k) in line_inputs:
                out.update(q for q, n in counts.items() if n > 0)
        for k, qs in self.qualities.items():  # format 1, until the period is upgraded
            if r.line_key_of(k) in line_inputs:
                out.update(qs)
        return sorted(out)


QUANTUM = Decimal("0.000001")


def meter_of(series: str) -> str:
    """The meter a series belongs to: the NMI of ``NMI/suffix`` (the part before the first ``/``). Demand
    is measured per meter on the total of its channels."""
    return series.partition("/")[0]


def series_of(window_id: str, account: str) -> str:
    """The series inside a window id ``account|series|start``."""
    return window_id[len(account) + 1: window_id.rindex("|")]


def fold(ps: PeriodState, rw: RatedWindowState, sign: int, interval_ms: Callable[[str], int],
         tz: tzinfo | None = None, day: str | None = None) -> None:
    """Add (``sign`` 1) or remove (−1) one window revision's contribution to a period's aggregates:
    its value on each quantity key, its windows and quality flags, its kWh on the demand interval of its
    meter for each demand key (``interval_ms(demand key)``) and, given the account's time zone ``tz``, one
    window on the local day it starts (``day``: that day's ISO date when the caller has it). Exact (Decimal),
    so any order of adds and removes of the same revisions gives the same state."""
    value = rw.value if sign > 0 else -rw.value
    if tz is not None:
        if day is None:
            day = local_day_iso(tz, rw.window_start_ms)
        n = ps.days.get(day, 0) + sign
        if n:
            ps.days[day] = n
        else:
            ps.days.pop(day, None)
    quantities, windows, counts_by_key, qualities = ps.quantities, ps.windows, ps.quality_counts, rw.qualities
    for k in rw.keys:
        quantities[k] = quantities.get(k, ZERO) + value
        windows[k] = windows.get(k, 0) + sign
        if qualities:
            counts = counts_by_key.get(k)
            if counts is None:
                counts = counts_by_key[k] = {}
            for q in qualities:
                n = counts.get(q, 0) + sign
                if n:
                    counts[q] = n
                else:
                    del counts[q]
        else:
            counts_by_key.setdefault(k, {})
    if rw.demand_keys:
        meter = meter_of(rw.series)
        for k in rw.demand_keys:
            step = interval_ms(k)
            slot = f"{meter}|{rw.window_start_ms - rw.window_start_ms % step}"
            slots = ps.demand_kwh.setdefault(k, {})
            kwh = slots.get(slot, ZERO) + value
            if kwh:
                slots[slot] = kwh
            else:
                slots.pop(slot, None)
            _count_flags(ps, k, rw.qualities, sign)
    if not rw.keys and not rw.demand_keys:  # a metric this plan does not price still activates the period
        k = "unpriced|" + rw.metric
        ps.windows[k] = ps.windows.get(k, 0) + sign


_DAY_MEMO: dict[tuple[tzinfo, int], tuple[date, str]] = {}
_DAY_MEMO_MAX = 500_000


def _local_day(tz: tzinfo, start_ms: int) -> tuple[date, str]:
    key = (tz, start_ms)
    found = _DAY_MEMO.get(key)
    if found is None:
        if len(_DAY_MEMO) >= _DAY_MEMO_MAX:
            _DAY_MEMO.clear()
        day = datetime.fromtimestamp(start_ms / 1000, tz=UTC).astimezone(tz).date()
        found = _DAY_MEMO[key] = (day, day.isoformat())
    return found


def local_date(tz: tzinfo, start_ms: int) -> date:
    """The local date (in ``tz``) of the instant ``start_ms`` (epoch ms, UTC); memoized (pure)."""
    return _local_day(tz, start_ms)[0]


def local_day_iso(tz: tzinfo, start_ms: int) -> str:
    """``local_date(tz, start_ms).isoformat()``, memoized."""
    return _local_day(tz, start_ms)[1]


def _period_of(ref: ReferenceData, account: Any, local_day: date) -> tuple[r.BillingPeriod, str]:
    """The account's billing period containing ``local_day`` and its start as ISO text (memoized per snapshot)."""
    memo = ref.memo.setdefault("rating_period", {})
    key = (account.billing_cycle, account.billing_anchor, local_day)
    found = memo.get(key)
    if found is None:
        period = r.period_containing(account.billing_cycle, account.billing_anchor, local_day)
        found = memo[key] = (period, period.start.isoformat())
    return found


def _tz_of(ref: ReferenceData, account: Any) -> tzinfo:
    """The account's time zone, memoized per snapshot."""
    memo = ref.memo.setdefault("rating_tz", {})
    tz = memo.get(account.account)
    if tz is None:
        tz = memo[account.account] = account.tz
    return tz  # type: ignore[no-any-return]


def _account_day(ref: ReferenceData, account: Any, metric: str, local_day: date,
                 ) -> tuple[r.BillingPeriod, str, bytes, PriceBook | None, bool]:
    """What rating needs of (account, metric, local day) in one memo per snapshot: the billing period, its state
    key (``rp|<account>|<period start>``, as text and bytes), the price book in force (``None``: none) and whether
    the metric is a gas volume that book bills as energy (``_is_gas_volume``)."""
    memo = ref.memo.setdefault("rating_account_day", {})
    key = (account.account, metric, local_day)
    found = memo.get(key)
    if found is None:
        if len(memo) >= _DAY_MEMO_MAX:
            memo.clear()
        period, pstart_iso = _period_of(ref, account, local_day)
        book = _book_for(ref, account.account, local_day, metric)
        pkey = f"rp|{account.account}|{pstart_iso}"
        found = memo[key] = (period, pkey, pkey.encode(), book,
                             book is not None and _is_gas_volume(ref, book, metric))
    return found  # type: ignore[no-any-return]


def _book_for(ref: ReferenceData, account: str, local_day: date, metric: str) -> PriceBook | None:
    """``ref.book_for`` memoized per snapshot."""
    memo = ref.memo.setdefault("rating_book_for", {})
    key = (account, local_day, metric)
    try:
        return memo[key]  # type: ignore[no-any-return]
    except KeyError:
        found = memo[key] = ref.book_for(account, local_day, metric)
        return found


def _window_keys_memo(ref: ReferenceData, book: PriceBook, metric: str, start_ms: int, window_ms: int,
                      ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[DemandComponent, ...]]:
    """``window_keys`` memoized per snapshot by (book version, metric, start, length): the keys depend on the
    book's bands and the instant only, so every account on one book shares them."""
    memo = ref.memo.setdefault("rating_window_keys", {})
    key = (book.id, book.version, metric, start_ms, window_ms)
    found = memo.get(key)
    if found is None:
        if len(memo) >= _DAY_MEMO_MAX:
            memo.clear()
        start = datetime.fromtimestamp(start_ms / 1000, tz=UTC)
        keys, demand_keys, unfit = window_keys(book, metric, start, window_ms)
        found = memo[key] = (tuple(keys), tuple(demand_keys), tuple(unfit))
    return found


def _count_flags(ps: PeriodState, key: str, qualities: list[str], sign: int) -> None:
    counts = ps.quality_counts.setdefault(key, {})
    for q in qualities:
        n = counts.get(q, 0) + sign
        if n:
            counts[q] = n
        else:
            counts.pop(q, None)


@dataclass
class _Touched:
    partition: int
    causes: list[tuple[UsageWindow, list[str]]] = field(default_factory=list)
    cause: str | None = None  # set when a price book version (not a window) caused the recompute
    previous_versions: dict[str, list[int]] = field(default_factory=dict)  # book id → versions superseded
    arrived_ms: int | None = None  # earliest reading arrival / window close among the causes (runtime.timing)
    closed_ms: int | None = None
    # posting policy (issue 13): with periods held across batches, ``causes`` lists at most the policy's
    # max_listed_windows revisions and ``digest`` identifies all of them
    digest: CauseDigest | None = None
    since_clock_ms: int = 0  # the partition's event clock when the period became pending
    watermark_ms: int | None = None  # highest window watermark among all causes
    stored: bool = False  # an rq| entry holds it in the store
    dirty: bool = False  # changed since it was last stored
    listed_stored: int = 0  # listed causes already stored under rqc| keys (``cause_keys``)
    cause_keys: list[bytes] = field(default_factory=list)  # rqc|<period key>|<index of the first cause it holds>
    raw: list[bytes] = field(default_factory=list)  # the listed causes' record bytes (stored as they came)


BOOKS_KEY = b"books"
PENDING_PREFIX = b"rq|"  # rq|<period key> → a period held by the posting policy (RatingPending)
PENDING_CAUSE_PREFIX = b"rqc|"  # rqc|<period key>|<index> → the causes it listed from that index in one batch
# (RatingPendingCauses; state written by earlier versions holds one RatingPendingCause per index)
POSTING_CLOCK_KEY = b"posting|clock"  # the partition's event clock: highest window watermark or end (WatermarkState)
REF_PREFIX = b"ref|"  # ref|<account> → [fingerprint of its service ranges and plans, change count] (issue 15)
REKEY_PREFIX = b"rk|"  # rk|<period key> → ["<book id>|<version>><version>", ...]: versions re-keyed in place


def key_structure(book: PriceBook) -> tuple[Any, ...]:
    """What the quantity and demand keys a window feeds under ``book`` depend on (``window_keys``, ``fold``): the
    book's time zone and holiday region and, per usage component in order, its id, kind, metric, TOU bands
    (names, times, default) and demand interval and band limit; not rates, tiers or blocks. Two versions of a
    book with equal structures key every window alike, up to the version."""
    comps = []
    for c in book.components:
        if c.kind not in ("tou", "per_unit", "feed_in", "tiered", "package", "surcharge", "demand"):
            continue
        entry: tuple[Any, ...] = (c.id, c.kind, getattr(c, "metric", None))
        if isinstance(c, TouComponent):
            entry += (c.default_band, tuple((b.band, tuple(t.model_dump_json() for t in b.times)) for b in c.bands))
        elif isinstance(c, DemandComponent):
            entry += (c.interval_minutes, c.tou_component, c.band)
        comps.append(entry)
    return (book.timezone, book.holiday_region, tuple(comps))


def _structure(ref: ReferenceData, book: PriceBook) -> tuple[Any, ...]:
    memo = ref.memo.setdefault("rating_key_structure", {})
    key = (book.id, book.version)
    if key not in memo:
        memo[key] = key_structure(book)
    return memo[key]  # type: ignore[no-any-return]


def _aliases(store: Any, pkey: str) -> dict[str, str]:
    """``<book id>|<version>`` → ``<book id>|<version>`` a period's keys were moved to (``_rekey_period``)."""
    held = store.get(REKEY_PREFIX + pkey.encode())
    return dict(a.split(">", 1) for a in held) if held else {}


def resolve_key(key: str, aliases: dict[str, str]) -> str:
    """A window's stored quantity or demand key (``book|version|component|band``) as its period holds it now."""
    book_id, version, rest = key.split("|", 2)
    moved = aliases.get(f"{book_id}|{version}")
    return key if moved is None else f"{moved}|{rest}"


def _resolve_held(store: Any, held: RatedWindowState) -> None:
    """Point a stored revision's keys at the version its period now holds them under (re-keyed in place)."""
    aliases = _aliases(store, held.period_key)
    if aliases:
        held.keys = [resolve_key(k, aliases) for k in held.keys]
        held.demand_keys = [resolve_key(k, aliases) for k in held.demand_keys]


def _in_effect(ref: ReferenceData, book_id: str, start: date, end: date) -> set[int]:
    """The versions of ``book_id`` in effect (``book_in_effect``) on the days ``[start, end)``."""
    memo = ref.memo.setdefault("rating_in_effect", {})
    key = (book_id, start, end)
    if key not in memo:
        versions = [b for b in ref.price_books if b.id == book_id]
        found, day = set(), start
        while day < end:
            covering = [b.version for b in versions if b.covers(day)]
            if covering:
                found.add(max(covering))
            day += timedelta(days=1)
        memo[key] = found
    return memo[key]  # type: ignore[no-any-return]


def _rekey_period(store: Any, pkey: str, ps: PeriodState, new: list[PriceBook], ref: ReferenceData) -> bool:
    """Apply newly published versions to a period without its windows, when that gives what rebuilding it from
    its windows would (``RatingProcessor._refold``): for each new book id, one version N is in effect on every
    day of the period and every version the period's keys name has N's key structure (``key_structure``: only
    rates differ). Then each key ``book|v|component|band`` moves to ``book|N|component|band`` (quantities and
    windows summed, quality counts and demand kWh per slot merged; the old quantity keys stay at zero and the
    old demand keys empty, as a rebuild leaves them) and ``rk|<period>`` records ``book|v → book|N`` so that a
    later revision of a window stored under v is removed from N. False (nothing changed) otherwise."""
    books = ref.books_by_version()
    targets: dict[str, str] = {}
    for book_id in sorted({b.id for b in new}):
        versions = _in_effect(ref, book_id, ps.period_start, ps.period_end)
        if len(versions) > 1:
            return False
        if not versions:
            continue
        (n,) = versions
        targets[book_id] = f"{book_id}|{n}"
    if not targets:
        return True
    moves: dict[str, str] = {}
    for key in (*ps.quantities, *ps.windows, *ps.quality_counts, *ps.demand_kwh, *ps.qualities, *ps.demand):
        book_id, sep, rest = key.partition("|")
        target = targets.get(book_id) if sep else None
        if target is None:
            continue
        version = rest.partition("|")[0]
        source = f"{book_id}|{version}"
        if source == target or source in moves:
            continue
        old = books.get((book_id, int(version)))
        if old is None or _structure(ref, old) != _structure(ref, books[(book_id, int(target.split("|")[1]))]):
            return False
        moves[source] = target
    if ps.qualities or ps.demand:
        return False  # format 1 leftovers: rebuild from the windows
    if not moves:
        return True

    def moved(key: str) -> str:
        return resolve_key(key, moves) if not key.startswith("unpriced|") else key

    quantities: dict[str, Decimal] = {}
    for k, q in ps.quantities.items():
        k2 = moved(k)
        if k2 != k:
            quantities.setdefault(k, ZERO)
        quantities[k2] = quantities.get(k2, ZERO) + q
    windows: dict[str, int] = {}
    for k, n in ps.windows.items():
        k2 = moved(k)
        windows[k2] = windows.get(k2, 0) + n
    counts: dict[str, dict[str, int]] = {}
    for k, qc in ps.quality_counts.items():
        merged = counts.setdefault(moved(k), {})
        for flag, n in qc.items():
            total = merged.get(flag, 0) + n
            if total:
                merged[flag] = total
            else:
                merged.pop(flag, None)
    demand: dict[str, dict[str, Decimal]] = {}
    for k, slots in ps.demand_kwh.items():
        k2 = moved(k)
        if k2 != k:
            demand.setdefault(k, {})
        merged_slots = demand.setdefault(k2, {})
        for slot, kwh in slots.items():
            total = merged_slots.get(slot, ZERO) + kwh
            if total:
                merged_slots[slot] = total
            else:
                merged_slots.pop(slot, None)
    ps.quantities, ps.windows, ps.quality_counts, ps.demand_kwh = quantities, windows, counts, demand
    aliases = {src: moves.get(dst, dst) for src, dst in _aliases(store, pkey).items()}
    aliases.update(moves)
    store.put(REKEY_PREFIX + pkey.encode(), sorted(f"{src}>{dst}" for src, dst in aliases.items() if src != dst))
    return True


def reference_fingerprint(ref: ReferenceData, account: str) -> str:
    """A short hash of what an account's periods are rated against besides usage and price books: its
    service points and telemetry subjects (service days) and its plan assignments, over time."""
    ranges = sorted(f"{getattr(r, 'nmi', None) or getattr(r, 'subject', '')}|{r.effective_from}|{r.effective_to}"
                    for r in ref.service_ranges(account))
    plans = [f"{p.price_book_id}|{p.effective_from}|{p.effective_to}" for p in ref.plans.get(account, ())]
    return hashlib.sha256("\n".join([*ranges, "--", *plans]).encode()).hexdigest()[:16]


def window_keys(book: PriceBook, metric: str, start: datetime, window_ms: int = LEGACY_WINDOW_MS,
                ) -> tuple[list[str], list[str], list[DemandComponent]]:
    """What a window of ``metric`` starting at ``start`` (UTC), ``window_ms`` long, feeds under ``book``:
    the quantity keys (summed; one per usage component pricing the metric, with its TOU band), the demand
    keys (band ``""``; for a band-limited demand only when the window is in the band), and the demand
    components the window cannot measure: its length does not divide their interval (a demand interval
    finer than the data). The caller refuses such a window."""
    keys, demand_keys, unfit = [], [], []
    for comp in book.usage_components(metric):
        if isinstance(comp, DemandComponent):
            if comp.tou_component is None or book.band_of(book_component(book, comp.tou_component), start) == comp.band:
                if comp.interval_ms % window_ms:
                    unfit.append(comp)
                else:
                    demand_keys.append(r.quantity_key(book, comp.id, ""))
            continue
        band = book.band_of(comp, start) if isinstance(comp, TouComponent) else ""
        keys.append(r.quantity_key(book, comp.id, band))
    return keys, demand_keys, unfit


def demand_interval_ms(ref: ReferenceData) -> Callable[[str], int]:
    """Demand key (``book|version|component|``) → the component's interval in ms, memoized per snapshot."""
    memo: dict[str, int] = ref.memo.setdefault("demand_interval_ms", {})
    books = ref.books_by_version()

    def lookup(key: str) -> int:
        found = memo.get(key)
        if found is None:
            book_id, version, component_id, _band = key.split("|")
            comp = next(c for c in books[(book_id, int(version))].components if c.id == component_id)
            assert isinstance(comp, DemandComponent)
            found = memo[key] = comp.interval_ms
        return found

    return lookup


def unfit_message(book: PriceBook, comp: DemandComponent, window_ms: int) -> str:
    return (f"a {window_ms / 60_000:g}-minute window cannot measure demand {comp.id!r} of {book.id} v{book.version}, "
            f"stated over {comp.interval_minutes}-minute intervals: windows must divide the demand interval "
            "(set PIPELINE_WINDOW_MINUTES_ENERGY to a divisor of it; a demand interval finer than the data cannot "
            "be billed)")


def _overlaps(book: PriceBook, start: date, end: date) -> bool:
    return book.effective_from < end and (book.effective_to is None or book.effective_to > start)



def _reset(ps: PeriodState) -> None:
    """Empty a period's aggregates before folding its windows again (re-rating, upgrade). Keys stay, at zero
    (quantities) or empty (demand), so every line emitted so far is still rated."""
    ps.quantities = {k: ZERO for k in ps.quantities}
    ps.demand_kwh = {k: {} for k in (*ps.demand_kwh, *ps.demand)}  # format 1 kept its demand keys in ``demand``
    ps.windows, ps.quality_counts, ps.qualities, ps.demand, ps.days = {}, {}, {}, {}, {}
    ps.format = FORMAT


def _upgrade(store: Any, pkey: str, ps: PeriodState, intervals: Callable[[str], int], tz: tzinfo) -> None:
    """A period of an older format rebuilt from the stored revisions of its windows (its account's ``rw|``
    entries): format 1 → demand per (meter, interval) over all channels instead of per window start,
    quality flags counted; format 2 → windows per local day (``tz``: the account's time zone). Nothing for
    a period already in this format."""
    if ps.format >= FORMAT:
        return
    _reset(ps)
    for key, rw in store.scan(f"rw|{ps.account}|".encode()):
        if rw.period_key == pkey:
            rw.series = series_of(key[3:].decode(), ps.account)
            fold(ps, rw, 1, intervals, tz)


class RatingProcessor:
    """Rates window revisions per (account, billing period) and emits delta lines.

    ``posting``: when the delta lines of a period with rated changes are emitted (``pipeline.rating.posting``;
    default: after every batch); ``wall_ms``: processing time in ms (the posting policy's idle rule)."""

    def __init__(self, topics: Topics, codec: Codec, reference: Callable[[], ReferenceData],
                 posting: PostingPolicy | None = None,
                 wall_ms: Callable[[], int] = lambda: int(time.monotonic() * 1000)) -> None:
        self.topics = topics
        self.codec = codec
        self.reference = reference
        self.posting = posting or PostingPolicy()
        self.wall_ms = wall_ms
        self._touched: dict[bytes, _Touched] = {}
        self._partitions: set[int] = set()
        self._ref_checked: dict[int, ReferenceData] = {}  # partition → the snapshot its accounts were checked on
        self._clock: dict[int, int] = {}  # partition → event clock (ms): the highest window watermark read
        self._clock_saved: dict[int, int] = {}
        self._last_input: dict[int, int] = {}  # partition → wall ms of its last window revision (or assignment)
        self._accepted = 0  # revisions accepted since the last punctuation (counted there: one metric update per batch)

    def on_assign(self, partition: int, ctx: Context) -> None:
        self._partitions.add(partition)
        if self.posting.every_batch:
            return
        store = ctx.store(partition)
        held = store.get(POSTING_CLOCK_KEY)
        self._clock[partition] = self._clock_saved[partition] = held if held is not None else -(2**62)
        self._last_input[partition] = self.wall_ms()
        for key, pending in list(store.scan(PENDING_PREFIX)):  # periods held when the state was last committed
            pkey = key[len(PENDING_PREFIX):]
            pending.partition = partition
            stored: list[tuple[UsageWindow, list[str], bytes]] = []
            for cause_key, listed in store.scan(_cause_key(pkey, None)):  # (in index order: zero-padded)
                pending.cause_keys.append(cause_key)
                stored.extend(listed)
            del stored[pending.listed_stored:]  # (never more: written with the header that counts them)
            pending.causes = [(win, keys) for win, keys, _raw in stored]
            pending.raw = [raw for _win, _keys, raw in stored]
            self._touched[pkey] = pending

    def on_revoke(self, partition: int) -> None:
        self._partitions.discard(partition)
        self._ref_checked.pop(partition, None)
        for d in (self._clock, self._clock_saved, self._last_input):
            d.pop(partition, None)
        self._touched = {k: v for k, v in self._touched.items() if v.partition != partition}

    def _apply_new_price_books(self, partition: int, ref: ReferenceData, ctx: Context) -> None:
        """Re-rate the periods a newly published price book version covers (SPEC §4: a later version
        covering the same dates supersedes the earlier one). The state remembers which versions its
        periods already reflect, so a version published while the stage was down is applied on start."""
        store = ctx.store(partition)
        current = sorted(f"{b.id}:{b.version}" for b in ref.price_books)
        applied = store.get(BOOKS_KEY)
        if applied == current:
            return
        store.put(BOOKS_KEY, current)
        new = [b for b in ref.price_books if f"{b.id}:{b.version}" not in set(applied or [])]
        if applied is None or not new:
            return
        cause = "pricebook:" + ",".join(sorted(f"{b.id}:v{b.version}" for b in new))
        previous = {
            b.id: sorted(int(v.split(":")[1]) for v in applied if v.split(":")[0] == b.id) for b in new
        }
        slow: dict[str, list[tuple[str, PeriodState]]] = {}  # account → periods to rebuild from their windows
        for bpkey, ps in list(store.scan(b"rp|")):
            if not any(_overlaps(b, ps.period_start, ps.period_end) for b in new):
                continue
            pkey = bpkey.decode()
            if not self.posting.every_batch:  # pending window changes are posted first, with their own cause
                self._flush_pending(bpkey, ref, ctx)
                ps = store.get(bpkey)
            if ps.format >= FORMAT and not ps.days:
                continue  # no window folded into it (the general path below re-rates periods with windows)
            if ps.format >= FORMAT and _rekey_period(store, pkey, ps, new, ref):
                store.put(bpkey, ps)
                self._touched[bpkey] = _Touched(partition, [], cause, previous)
            else:
                slow.setdefault(ps.account, []).append((pkey, ps))
        for account, periods in sorted(slow.items()):
            windows: dict[str, list[tuple[bytes, RatedWindowState]]] = {}
            for key, rw in store.scan(f"rw|{account}|".encode()):
                windows.setdefault(rw.period_key, []).append((key, rw))
            for pkey, ps in periods:
                rws = windows.get(pkey)
                if not rws:
                    continue
                self._refold(store, pkey, ps, rws, ref)
                self._touched[pkey.encode()] = _Touched(partition, [], cause, previous)

    def _apply_reference_changes(self, partition: int, ref: ReferenceData, ctx: Context) -> None:
        """Re-rate the periods of the accounts whose service ranges or plans changed since their periods were
        last rated (issue 15: a move-out recorded after the usage was rated stops the daily charges; a plan
        switch from a past date re-prices its windows). Each account's fingerprint (``reference_fingerprint``)
        is kept in the state with the periods, so a change made while the stage was down is applied on start;
        the deltas are caused by ``reference:<account's change count>:<fingerprint>``."""
        if self._ref_checked.get(partition) is ref:
            return
        self._ref_checked[partition] = ref
        store = ctx.store(partition)
        for key, held in list(store.scan(REF_PREFIX)):
            account = key[len(REF_PREFIX):].decode()
            fingerprint = reference_fingerprint(ref, account)
            if held[0] == fingerprint or account not in ref.accounts:
                continue
            count = int(held[1]) + 1
            store.put(key, [fingerprint, str(count)])
            windows: dict[str, list[tuple[bytes, RatedWindowState]]] = {}
            for wkey, rw in store.scan(f"rw|{account}|".encode()):
                windows.setdefault(rw.period_key, []).append((wkey, rw))
            for pkey, _ps in list(store.scan(f"rp|{account}|".encode())):
                if not self.posting.every_batch:
                    self._flush_pending(pkey, ref, ctx)
                ps: PeriodState = store.get(pkey)
                self._refold(store, pkey.decode(), ps, windows.get(pkey.decode(), []), ref)
                self._touched[pkey] = _Touched(partition, [], f"reference:{count}:{fingerprint}")

    @staticmethod
    def _refold(store: Any, pkey: str, ps: PeriodState, rws: list[tuple[bytes, RatedWindowState]],
                ref: ReferenceData) -> None:
        """Rebuild a period's aggregates from its stored windows under ``ref`` (each window keyed by the price
        book in force on its day; a day without a plan now adds nothing)."""
        _reset(ps)
        intervals = demand_interval_ms(ref)
        account = ref.accounts[ps.account]
        tz = account.tz
        for key, rw in rws:
            book = _book_for(ref, ps.account, local_date(tz, rw.window_start_ms), rw.metric)
            if book is None:
                continue
            keys, demand_keys, unfit = _window_keys_memo(ref, book, rw.metric, rw.window_start_ms, rw.window_ms)
            rw.keys, rw.demand_keys = list(keys), list(demand_keys)
            for comp in unfit:  # cannot refuse a stored revision: left out of that demand, loudly
                UNMEASURED.inc()
                log.error("re-rating %s: %s", key.decode(), unfit_message(book, comp, rw.window_ms))
            rw.series = series_of(key[3:].decode(), ps.account)
            fold(ps, rw, 1, intervals, tz)
            store.put(key, rw)
        store.put(pkey.encode(), ps)
        alias_key = REKEY_PREFIX + pkey.encode()
        if store.get(alias_key) is not None:  # every window's keys are current again
            store.delete(alias_key)

    def _dead_letter(self, record: Incoming, reason: str, message: str, ctx: Context) -> None:
        dead_letter(ctx, self.codec, self.topics.dlq_ingest, "rating", record, reason, message)
        _REV_DEAD_LETTERED.inc()

    def process(self, record: Incoming, ctx: Context) -> None:
        """Rate one window revision (``process_batch`` of one)."""
        self.process_batch((record,), ctx)

    def process_batch(self, records: Sequence[Incoming], ctx: Context) -> None:
        """Rate a batch of window revisions (``UsageWindow`` records, in offset order per partition): each one
        supersedes the held revision of its window (a lower or equal revision is a duplicate and ignored), is folded
        into its (account, billing period) and marks the period touched (posted by ``punctuate``). Dead-letters
        what cannot be rated (undecodable, unknown account, no price book, no gas factor, register reads on a timed
        tariff, demand finer than the data). What is the same for the whole batch is looked up once: the
        reference snapshot, the processing time, the posting policy, the stores."""
        every_batch = self.posting.every_batch
        max_listed = self.posting.max_listed_windows
        now = None if every_batch else self.wall_ms()
        ref = self.reference()
        accounts = ref.accounts
        tz_memo = ref.memo.setdefault("rating_tz", {})
        day_memo = ref.memo.setdefault("rating_account_day", {})
        keys_memo = ref.memo.setdefault("rating_window_keys", {})
        intervals = demand_interval_ms(ref)
        codec, touched_by_key, clock, last_input = self.codec, self._touched, self._clock, self._last_input
        read_window = window_reader(codec)
        stores: dict[int, Any] = {}
        # per partition, period key → its state, put once in this batch (the store keeps the object until the commit)
        staged_by_partition: dict[int, dict[bytes, PeriodState]] = {}
        accepted = 0
        for record in records:
            partition = record.partition
            if now is not None:  # the partition's input is alive (the posting policy's idle rule)
                last_input[partition] = now
            try:
                win = read_window(record.value or b"")
            except DecodeError as exc:
                self._dead_letter(record, "UNDECODABLE", str(exc), ctx)
                continue
            account = accounts.get(win.account)
            if account is None:
                self._dead_letter(record, "UNKNOWN_ACCOUNT", f"account {win.account!r} has no reference data", ctx)
                continue
            start_ms, end_ms = win.window_start_ms, win.window_end_ms
            tz = tz_memo.get(win.account)
            if tz is None:
                tz = _tz_of(ref, account)
            local_day, day_iso = _local_day(tz, start_ms)
            found = day_memo.get((win.account, win.metric, local_day))
            period, pkey, bpkey, book, gas = found or _account_day(ref, account, win.metric, local_day)
            if book is None:
                self._dead_letter(
                    record, "NO_PRICE_BOOK", f"no plan/price book for account {win.account} on {local_day}", ctx
                )
                continue
            value = win.value
            if gas:
                gc = ref.gas_conversion_on(win.account, local_day)
                if gc is None:
                    self._dead_letter(record, "NO_GAS_CONVERSION_FACTOR",
                                      f"{win.window_id}: {win.metric} is metered in m³ and {book.id} bills gas in MJ, "
                                      f"but account {win.account} has no gas conversion factor on {local_day} "
                                      "(pipeline meters gas-factor)", ctx)
                    continue
                value = gas_energy_mj(win.value, gc.heating_value, gc.pressure_correction)
            store = stores.get(partition)
            if store is None:
                store = stores[partition] = ctx.store(partition)
                staged_by_partition[partition] = {}
            staged = staged_by_partition[partition]
            wkey = b"rw|" + win.window_id.encode()
            held: RatedWindowState | None = store.get(wkey)
            if held is not None and held.revision >= win.revision:
                _REV_DUPLICATE.inc()
                continue
            sources = win.sources
            if sources and sources[0].startswith(SPREAD_MARK) and all(src.startswith(SPREAD_MARK) for src in sources):
                timed = [c.id for c in book.usage_components(win.metric)
                         if isinstance(c, TouComponent | DemandComponent)]
                if timed:
                    self._dead_letter(record, "ACCUMULATION_ON_INTERVAL_TARIFF",
                                      f"{win.window_id} holds NEM13 register reads spread evenly over days: they have "
                                      f"no time of day, and {book.id} v{book.version} prices {win.metric} by time of "
                                      f"use or demand ({', '.join(timed)}); bill this meter on a flat or tiered plan",
                                      ctx)
                    continue
            window_keys_found = keys_memo.get((book.id, book.version, win.metric, start_ms, end_ms - start_ms))
            keys, demand_keys, unfit = window_keys_found or _window_keys_memo(ref, book, win.metric, start_ms,
                                                                             end_ms - start_ms)
            if unfit:
                self._dead_letter(record, "DEMAND_INTERVAL_FINER_THAN_DATA",
                                  unfit_message(book, unfit[0], end_ms - start_ms), ctx)
                continue
            ps = staged.get(bpkey)  # (the same object until the commit: staged once per batch)
            if ps is None:
                ps = store.get(bpkey) or PeriodState(win.account, period.start, period.end)
                if ps.format < FORMAT:
                    _upgrade(store, pkey, ps, intervals, tz)
            if held is not None:
                held.series = win.series
                old_ps = ps if held.period_key == pkey else store.get(held.period_key.encode())
                _upgrade(store, held.period_key, old_ps, intervals, tz)
                _resolve_held(store, held)
                fold(old_ps, held, -1, intervals, tz)
                if old_ps is not ps:
                    store.put(held.period_key.encode(), old_ps)
            rw = RatedWindowState(win.revision, value, pkey, keys, demand_keys, start_ms, ZERO,  # (shared tuples)
                                  win.metric, end_ms, win.qualities, win.series)
            fold(ps, rw, 1, intervals, tz, day_iso)
            if bpkey not in staged:
                store.put(bpkey, ps)
                staged[bpkey] = ps
            store.put(wkey, rw, cache=False)  # read back only when a later revision of the window comes
            touched = touched_by_key.get(bpkey)
            if touched is None:
                touched = touched_by_key[bpkey] = _Touched(partition)
                if not every_batch:
                    touched.digest = CauseDigest()
                    touched.since_clock_ms = clock.get(partition, -(2**62))
            if touched.digest is None:
                touched.causes.append((win, [*keys, *demand_keys]))  # type: ignore[arg-type]
            else:
                touched.dirty = True
                if touched.digest.add(f"{win.window_id}@{win.revision}", day_iso, win.delta, max_listed):
                    touched.causes.append((win, [*keys, *demand_keys]))  # type: ignore[arg-type]
                    touched.raw.append(record.value or b"")
                wm = win.watermark_ms
                if touched.watermark_ms is None or wm > touched.watermark_ms:
                    touched.watermark_ms = wm
                # the posting clock: how far the windows read here reach in event time (a window closed by its
                # series' completion marker or idle time reaches past the watermark: its series is done up to its end)
                reach = wm if wm > end_ms else end_ms
                if reach > clock.get(partition, -(2**62)):
                    clock[partition] = reach
            if record.headers:
                touched.arrived_ms = timing.earliest(touched.arrived_ms,
                                                     timing.read_ms(record.headers, timing.ARRIVED))
                touched.closed_ms = timing.earliest(touched.closed_ms, timing.read_ms(record.headers, timing.CLOSED))
            accepted += 1
        self._accepted += accepted

    def punctuate(self, wallclock_ms: int, ctx: Context) -> None:
        if self._accepted:
            _REV_ACCEPTED.inc(self._accepted)
            self._accepted = 0
        ref = self.reference()
        for p in sorted(self._partitions):
            self._apply_new_price_books(p, ref, ctx)
            self._apply_reference_changes(p, ref, ctx)
        if not self.posting.every_batch:
            for p, clock in self._clock.items():
                if clock != self._clock_saved.get(p):
                    ctx.store(p).put(POSTING_CLOCK_KEY, clock)
                    self._clock_saved[p] = clock
        if not self._touched:
            return
        now = self.wall_ms()
        held: dict[bytes, _Touched] = {}
        idle_logged: set[int] = set()
        for pkey, touched in sorted(self._touched.items()):
            store = ctx.store(touched.partition)
            reason = self._posting_reason(pkey, touched, ref, now, store)
            if reason == IDLE and touched.partition not in idle_logged:  # once per partition and punctuation
                p = touched.partition
                idle_logged.add(p)
                log.info("partition %d: no window revision for %.1f s (event clock %d): posting what it holds", p,
                         (now - self._last_input.get(p, now)) / 1000, self._clock.get(p, 0))
            if reason is None:
                if touched.dirty:
                    first, causes = touched.listed_stored, touched.causes
                    if first < len(causes):  # the causes listed since the last commit, once, in one entry
                        cause_key = _cause_key(pkey, first)
                        raw = touched.raw
                        store.put(cause_key, [(*causes[i], raw[i]) for i in range(first, len(causes))], cache=False)
                        touched.cause_keys.append(cause_key)
                    touched.listed_stored = len(causes)
                    store.put(PENDING_PREFIX + pkey, touched)
                    touched.stored, touched.dirty = True, False
                held[pkey] = touched
                continue
            self._post(pkey, touched, reason, ref, ctx)
        self._touched = held

    def _posting_reason(self, pkey: bytes, touched: _Touched, ref: ReferenceData, now_ms: int,
                        store: Any) -> str | None:
        """Why ``touched`` (period ``pkey``) is posted now (``pipeline.rating.posting``), or ``None`` to keep it
        pending. The period's posting boundaries depend only on the reference data: remembered per snapshot by
        period key."""
        if touched.cause is not None:
            return RERATE
        if touched.digest is None:
            return posting_reason(self.posting, (), 0, 0, 0)
        by_period = ref.memo.setdefault("posting_boundaries_by_period", {})
        bounds = by_period.get(pkey)
        if bounds is None:
            ps: PeriodState = store.get(pkey)
            account = ref.accounts.get(ps.account)
            tz = account.tz if account is not None else UTC
            bounds = remember(by_period, pkey, posting_boundaries_ms(ps.period_start, ps.period_end, tz,
                                                                     self.posting.interval_days), _DAY_MEMO_MAX)
        p = touched.partition
        return posting_reason(self.posting, bounds, touched.since_clock_ms, self._clock.get(p, -(2**62)),
                              now_ms - self._last_input.get(p, now_ms))

    def _post(self, pkey: bytes, touched: _Touched, reason: str, ref: ReferenceData, ctx: Context) -> None:
        """Emit the period's delta lines against what it already emitted, and forget it as pending."""
        store = ctx.store(touched.partition)
        ps: PeriodState = store.get(pkey)
        fkey = REF_PREFIX + ps.account.encode()
        held = store.get(fkey)
        fingerprint = reference_fingerprint(ref, ps.account)
        if held is None or held[0] != fingerprint:  # rated on this reference data from now on
            store.put(fkey, [fingerprint, held[1] if held is not None else "0"])
        cause, posting, watermark = touched.cause, None, None
        digest = touched.digest
        if digest is not None and touched.cause is None:
            cause = digest.cause() if digest.ids is None else None
            watermark = (datetime.fromtimestamp(touched.watermark_ms / 1000, UTC)
                         if touched.watermark_ms is not None else None)
            posting = {"reason": reason, "windows_total": digest.count, "windows_listed": len(touched.causes)}
            if digest.ids is None:
                posting["days"] = [{"date": d, "windows": s.windows, "delta": str(s.delta)}
                                   for d, s in sorted(digest.days.items())]
        charges = recompute(ps, touched.causes, ref, cause, touched.previous_versions,
                            posting=posting, watermark=watermark)
        headers = timing.headers(touched.arrived_ms, touched.closed_ms)
        for charge in charges:
            ps.emitted[charge.component_key] = charge.record.period_total
            ctx.forward(self.topics.charges_rated, ps.account, encode_charge(self.codec, charge.record), headers)
            kind = charge.record.component_kind
            counter = _LINES_BY_KIND.get(kind)
            if counter is None:
                counter = _LINES_BY_KIND[kind] = LINES.labels(kind)
            counter.inc()
        if charges:
            store.put(pkey, ps)
        _forget_pending(store, pkey, touched)
        POSTINGS.labels(reason).inc()

    def _flush_pending(self, pkey: bytes, ref: ReferenceData, ctx: Context) -> None:
        """Post a period's pending window changes before a re-rate changes its aggregates, so that they keep
        their own cause (posting policy on)."""
        touched = self._touched.pop(pkey, None)
        if touched is not None and touched.cause is None and touched.digest is not None and touched.digest.count:
            self._post(pkey, touched, RERATE, ref, ctx)
        elif touched is not None:
            _forget_pending(ctx.store(touched.partition), pkey, touched)


@dataclass(frozen=True)
class _Charge:
    component_key: str
    record: RatedCharge


def book_component(book: PriceBook, component_id: str) -> TouComponent:
    """The TOU component ``component_id`` of ``book`` (validated to exist when the book loaded)."""
    comp = next(c for c in book.components if c.id == component_id)
    assert isinstance(comp, TouComponent)
    return comp


def service_days(ps: PeriodState, ref: ReferenceData) -> dict[tuple[str, int], int]:
    """Days of the period on which the account had a service point, per price book version billing them: on a
    multi-service account each service's book (and each contribution opted into) counts the day (seed 001)."""
    ranges = ref.service_ranges(ps.account)
    out: dict[tuple[str, int], int] = {}
    day = ps.period_start
    while day < ps.period_end:
        if any(sp.covers(day) for sp in ranges):
            for book in ref.books_on(ps.account, day):  # every service's book and each contribution (seed 001)
                out[(book.id, book.version)] = out.get((book.id, book.version), 0) + 1
        day += timedelta(days=1)
    return out


MISSING_DAYS_SHOWN = 5  # the first missing days named in an explanation (the count is always given)


def service_dates(ps: PeriodState, ref: ReferenceData) -> list[str]:
    """The days of the period (ISO dates, ascending) on which the account had a service point (memoised per
    reference snapshot)."""
    memo_key = ("service_dates", ps.account, ps.period_start, ps.period_end)
    if memo_key not in ref.memo:
        ranges = ref.service_ranges(ps.account)
        days, day = [], ps.period_start
        while day < ps.period_end:
            if any(sp.covers(day) for sp in ranges):
                days.append(day.isoformat())
            day += timedelta(days=1)
        ref.memo[memo_key] = days
    return ref.memo[memo_key]


def review_facts(ps: PeriodState, inputs: set[str], unit: str, ref: ReferenceData) -> dict[str, Any]:
    """What a line tells the checks before finalizing (``pipeline.invoicing.validation``), as of this line:
    ``window_count`` (windows feeding it) and ``estimated_windows`` (of those, carrying an E, S or F read: the
    sum over those flags, at most ``window_count``); for a line in kWh also ``service_days`` (days of the period
    with a service point), ``usage_days`` (of those, days with at least one window of any metric) and
    ``missing_days`` (the first ``MISSING_DAYS_SHOWN`` days of service without a window)."""
    windows = estimated = 0
    for k, n in ps.windows.items():
        if not k.startswith("unpriced|") and r.line_key_of(k) in inputs:  # unpriced|<metric>: no line
            windows += n
            counts = ps.quality_counts.get(k, {})
            estimated += sum(counts.get(q, 0) for q in ESTIMATED_QUALITY_FLAGS)
    out: dict[str, Any] = {"window_count": windows, "estimated_windows": min(estimated, windows)}
    if unit == "kWh" and ps.format >= 3:
        dates = service_dates(ps, ref)
        missing = [d for d in dates if not ps.days.get(d)]
        out.update(service_days=len(dates), usage_days=len(dates) - len(missing),
                   missing_days=missing[:MISSING_DAYS_SHOWN])
    return out


def recompute(
    ps: PeriodState,
    causes: list[tuple[UsageWindow, list[str]]],
    ref: ReferenceData,
    cause_override: str | None = None,
    previous_versions: dict[str, list[int]] | None = None,
    *,
    posting: dict[str, Any] | None = None,
    watermark: datetime | None = None,
) -> list[_Charge]:
    """Rate the period and return the delta lines against ``ps.emitted`` (pure given ``ref``).

    ``causes`` are the window revisions of this batch with the quantity keys each one feeds;
    the line ids hash them, so the same input gives the same ids. With the posting policy on
    (``pipeline.rating.posting``) they are the revisions listed since the period was last posted, ``posting``
    (reason, windows in all, listed, and beyond the list a per-day summary) goes into each explanation, and
    ``watermark`` is the highest watermark among all of them (``None``: the causes' own).
    """
    memo_key = ("service_days", ps.account, ps.period_start, ps.period_end)
    if memo_key not in ref.memo:  # depends on reference data only: once per snapshot
        ref.memo[memo_key] = service_days(ps, ref)
    days = ref.memo[memo_key]
    books = ref.books_by_version()
    totals = r.rate_period(ps.quantities, days, books, (ps.period_end - ps.period_start).days,
                           ps.peaks(demand_interval_ms(ref)))
    cause_ids = sorted(f"{c.window_id}@{c.revision}" for c, _ in causes)
    if watermark is None:
        watermark = max((c.watermark for c, _ in causes), default=None)  # the invoicing stage's event clock
    cause = cause_override or "windows:" + hashlib.sha256("\n".join(cause_ids).encode()).hexdigest()[:24]
    out = []
    cause_lines = [(c, {r.line_key_of(k) for k in keys}) for c, keys in causes]  # the lines each cause feeds
    window_text: dict[tuple[int, str, int], str] = {}  # a cause's explanation entry (JSON) per price book version
    for key in sorted(set(totals) | set(ps.emitted)):
        line = totals.get(key)
        before = ps.emitted.get(key, ZERO)
        if line is None:  # cannot happen: quantities keep their keys (at zero) once seen
            raise AssertionError(f"line {key} was emitted but is no longer rated")
        if before.as_tuple().exponent < line.total.as_tuple().exponent:  # type: ignore[operator]
            # read back from the state (6 places): the line total it was, in the currency's minor unit, so that
            # explanations read the same after a restart (only when exact: an emitted total is a line total)
            exact = before.quantize(line.total)
            if exact == before:
                before = exact
        delta = line.total - before
        if delta == 0:
            continue
        line_id = hashlib.sha256(
            f"{ps.account}|{ps.period_start}|{key}|{cause}".encode()
        ).hexdigest()[:32]
        inputs = set(line.inputs)
        related = [c for c, lines in cause_lines if not lines.isdisjoint(inputs)]
        qualities = ps.flags(inputs)
        checks = review_facts(ps, inputs, line.unit, ref)
        explanation = {
            "account": ps.account,
            "period": [ps.period_start.isoformat(), ps.period_end.isoformat()],
            "component": line.component_id,
            "kind": line.component_kind,
            "band": line.band,
            "price_book": {"id": line.book_id,
                           "versions": sorted({p.version for p in line.parts if p.quantity}
                                              or {p.version for p in line.parts}),
                           "previous_versions": (previous_versions or {}).get(line.book_id, [])},
            "parts": [{"version": p.version, "quantity": str(p.quantity), "rate": str(p.rate),
                       "amount": str(p.amount)} for p in line.parts if p.quantity or len(line.parts) == 1],
            "formula": line.formula,
            "quantity": str(line.quantity),
            "unit": line.unit,
            "previous_total": str(before),
            "new_total": str(line.total),
            "delta": str(delta),
            "quality_flags": qualities,
            "cause": cause,
            "windows": _WINDOWS_SLOT,  # spliced in below: each cause's entry is serialized once per posting
            **checks,
            **({"posting": posting} if posting is not None else {}),
            **_service_explanation(books[(line.book_id, line.book_version)], line.component_id),
        }
        out.append(_Charge(key, RatedCharge(
            line_id=line_id, account=ps.account, period_start=ps.period_start, period_end=ps.period_end,
            currency=line.currency, component_id=line.component_id, component_kind=line.component_kind,
            band=line.band, quantity=line.quantity.quantize(Decimal("0.000001")), unit=line.unit,
            rate=line.rate, amount=delta, period_total=line.total, price_book_id=line.book_id,
            price_book_version=line.book_version, cause=cause,
            explanation=_explanation_json(explanation, related, books[(line.book_id, line.book_version)], ref,
                                          window_text),
            watermark=watermark,
        )))
    return out


_WINDOWS_SLOT = "\x00windows\x00"
_WINDOWS_SLOT_JSON = json.dumps(_WINDOWS_SLOT)


def _explanation_json(explanation: dict[str, Any], related: list[UsageWindow], book: PriceBook, ref: ReferenceData,
                      window_text: dict[tuple[int, str, int], str]) -> str:
    """``json.dumps(explanation, sort_keys=True)`` with ``explanation["windows"]`` (``_WINDOWS_SLOT``) the list of the
    ``related`` window revisions (id, revision, timing, value, delta, flags, sources and, for gas volumes, the
    conversion under ``book``): the same text, with each revision's entry serialized once per posting
    (``window_text``, by revision and book version) however many lines it explains."""
    parts = []
    for c in related:
        memo_key = (id(c), book.id, book.version)
        text = window_text.get(memo_key)
        if text is None:
            text = window_text[memo_key] = _window_entry_json(c, book, ref)
        parts.append(text)
    whole = json.dumps(explanation, sort_keys=True)
    if whole.count(_WINDOWS_SLOT_JSON) != 1:  # a string of the explanation holds the slot's text: no splicing
        explanation["windows"] = [json.loads(t) for t in parts]
        return json.dumps(explanation, sort_keys=True)
    return whole.replace(_WINDOWS_SLOT_JSON, "[" + ", ".join(parts) + "]")


_json_str = json.encoder.encode_basestring_ascii  # what json.dumps writes a str with (ensure_ascii)


def _window_entry_json(c: UsageWindow, book: PriceBook, ref: ReferenceData) -> str:
    """One window revision of an explanation's ``windows`` as ``json.dumps(entry, sort_keys=True)`` writes it: written
    field by field (keys in sorted order) when it has no gas conversion and its fields are strings and an int."""
    entry = {"window_id": c.window_id, "revision": c.revision, "timing": c.timing, "value": str(c.value),
             "delta": str(c.delta), "qualities": list(c.qualities), "sources": list(c.sources),
             **_conversion(ref, book, c)}
    if len(entry) == 7 and type(c.revision) is int:
        try:
            return (f'{{"delta": {_json_str(entry["delta"])}, "qualities": {_json_strs(entry["qualities"])}, '
                    f'"revision": {int.__repr__(c.revision)}, "sources": {_json_strs(entry["sources"])}, '
                    f'"timing": {_json_str(c.timing)}, "value": {_json_str(entry["value"])}, '
                    f'"window_id": {_json_str(c.window_id)}}}')
        except TypeError:  # a field of another type: json decides
            pass
    return json.dumps(entry, sort_keys=True)


def _json_strs(items: list[str]) -> str:
    return "[" + ", ".join(map(_json_str, items)) + "]"


def _is_gas_volume(ref: ReferenceData, book: PriceBook, metric: str) -> bool:
    """Whether windows of ``metric`` are gas volumes (m³) that ``book`` (a gas book, priced in MJ) bills as
    energy: the metric's definition says m³ (seed 001)."""
    definition = ref.metrics.get(metric)
    return book.service == "gas" and definition is not None and definition.unit in VOLUME_UNITS


def _conversion(ref: ReferenceData, book: PriceBook, win: UsageWindow) -> dict[str, Any]:
    """For a gas volume window, how its m³ became MJ (``gas_energy_mj``): the factors in force on its day."""
    if not _is_gas_volume(ref, book, win.metric):
        return {}
    account = ref.accounts[win.account]
    gc = ref.gas_conversion_on(win.account, win.window_start.astimezone(account.tz).date())
    if gc is None:
        return {}
    return {"gas_conversion": {"volume_m3": str(win.value),
                               "heating_value_mj_per_m3": f"{gc.heating_value.normalize():f}",
                               "pressure_correction": f"{gc.pressure_correction.normalize():f}",
                               "energy_mj": str(gas_energy_mj(win.value, gc.heating_value, gc.pressure_correction)),
                               "formula": "MJ = m³ × heating value × pressure correction"}}


def _service_explanation(book: PriceBook, component_id: str) -> dict[str, Any]:
    """The service a line bills (its invoice section) and, for a voluntary contribution, what it is."""
    out: dict[str, Any] = {"service": book.service}
    comp = next((c for c in book.components if c.id == component_id), None)
    if isinstance(comp, ContributionComponent):
        out["contribution"] = {"per": comp.per, "amount": str(comp.amount), "description": comp.description,
                               "opted_in": "a voluntary contribution the account opted into (plan "
                                           f"{book.id}); it ends when the account opts out"}
    return out


# --- state serialization (Avro, schemas/rated_window_state.avsc and rating_period_state.avsc) -------
def state_codec(codec: Codec) -> tuple[Callable[[bytes, Any], bytes], Callable[[bytes, bytes], Any]]:
    """``(encode, decode)`` for the rating store."""
    write_window = WindowStateWriter(codec)
    write_period = PeriodStateWriter(codec)
    write_pending = PendingWriter(codec)

    def encode(key: bytes, value: Any) -> bytes:
        if key[:3] == b"rw|":  # the most frequent: one per window revision
            return write_window(value.revision, value.value, value.period_key, value.keys, value.demand_keys,
                                value.window_start_ms, "0" if value.kw is ZERO else str(value.kw), value.metric,
                                value.window_end_ms, value.qualities)
        if key == BOOKS_KEY or key.startswith(REF_PREFIX) or key.startswith(REKEY_PREFIX):  # ref|, rk|: strings
            return codec.encode({"versions": list(value)}, "AppliedPriceBooks")
        if key == POSTING_CLOCK_KEY:
            return codec.encode({"max_event_ms": value, "watermark_ms": value}, "WatermarkState")
        if key.startswith(PENDING_PREFIX):
            fast = write_pending.of(value) if value.digest is not None else None
            return fast or codec.encode(_pending_datum(value), "RatingPending")
        if key.startswith(PENDING_CAUSE_PREFIX):  # [(window, keys, its record bytes), ...]
            listed = [(raw, keys) for _win, keys, raw in value]
            return write_pending.causes(listed) or codec.encode(
                {"causes": [{"window": raw, "keys": list(keys)} for raw, keys in listed]}, "RatingPendingCauses")
        fast = write_period(value)
        if fast is not None:
            return fast
        return codec.encode(
            {"account": value.account, "period_start": value.period_start, "period_end": value.period_end,
             "quantities": {k: v.quantize(QUANTUM) for k, v in value.quantities.items()},
             "qualities": value.qualities, "windows": value.windows,
             "emitted": value.emitted,
             "demand": {k: {w: str(kw) for w, kw in v.items()} for k, v in value.demand.items()},
             "quality_counts": value.quality_counts,
             "demand_kwh": {k: {slot: kwh.quantize(QUANTUM) for slot, kwh in v.items()}
                            for k, v in value.demand_kwh.items()},
             "format": value.format, "days": value.days},
            "RatingPeriodState",
        )

    def decode(key: bytes, raw: bytes) -> Any:
        if key == BOOKS_KEY or key.startswith(REF_PREFIX) or key.startswith(REKEY_PREFIX):
            return list(codec.decode_dict(raw, "AppliedPriceBooks")["versions"])
        if key == POSTING_CLOCK_KEY:
            return codec.decode_dict(raw, "WatermarkState")["watermark_ms"]
        if key.startswith(PENDING_PREFIX):
            return _decode_pending(codec, raw)
        if key.startswith(PENDING_CAUSE_PREFIX):
            if codec.record_name(raw) == "RatingPendingCause":  # one cause per key (state written before)
                d = codec.decode_dict(raw, "RatingPendingCause")
                return [(decode_window(codec, d["window"]), list(d["keys"]), d["window"])]
            causes = codec.decode_dict(raw, "RatingPendingCauses")["causes"]
            return [(decode_window(codec, c["window"]), list(c["keys"]), c["window"]) for c in causes]
        if key.startswith(b"rw|"):
            d = codec.decode_dict(raw, "RatedWindowState")
            return RatedWindowState(d["revision"], d["value"], d["period_key"], list(d["keys"]),
                                    list(d["demand_keys"]), d["window_start_ms"], Decimal(d["kw"]), d["metric"],
                                    d["window_end_ms"], list(d["qualities"]))
        d = codec.decode_dict(raw, "RatingPeriodState")
        return PeriodState(d["account"], d["period_start"], d["period_end"], dict(d["quantities"]),
                           {k: list(v) for k, v in d["qualities"].items()}, dict(d["windows"]), dict(d["emitted"]),
                           {k: {w: Decimal(kw) for w, kw in v.items()} for k, v in d["demand"].items()},
                           {k: dict(v) for k, v in d["quality_counts"].items()},
                           {k: dict(v) for k, v in d["demand_kwh"].items()}, d["format"], dict(d["days"]))

    return encode, decode


def _cause_key(pkey: bytes, index: int | None) -> bytes:
    """``rqc|<period key>|<index, 5 digits>``: the listed causes of a pending period from ``index`` on (``None``: the
    prefix of them all)."""
    prefix = b"%s%s|" % (PENDING_CAUSE_PREFIX, pkey)
    return prefix if index is None else b"%s%05d" % (prefix, index)


def _forget_pending(store: Any, pkey: bytes, touched: _Touched) -> None:
    """Delete a posted period's pending entries (its header and listed causes), if it had any stored."""
    if touched.stored:
        store.delete(PENDING_PREFIX + pkey)
    for cause_key in touched.cause_keys:
        store.delete(cause_key)


def _pending_datum(t: _Touched) -> dict[str, Any]:
    """A period held by the posting policy as a ``RatingPending`` datum (its partition is the store's; its
    listed causes are stored apart, one entry per batch that listed some: ``_cause_key``)."""
    digest = t.digest or CauseDigest()
    return {
        "since_clock_ms": t.since_clock_ms, "watermark_ms": t.watermark_ms, "arrived_ms": t.arrived_ms,
        "closed_ms": t.closed_ms, "cause_ids": digest.ids, "chain": digest.chain, "count": digest.count,
        "days": {d: {"windows": s.windows, "delta": str(s.delta)} for d, s in digest.days.items()},
        "listed_stored": t.listed_stored,
    }


def _decode_pending(codec: Codec, raw: bytes) -> _Touched:
    d = codec.decode_dict(raw, "RatingPending")
    digest = CauseDigest(None if d["cause_ids"] is None else list(d["cause_ids"]), d["chain"], d["count"],
                         {day: DaySummary(v["windows"], Decimal(v["delta"])) for day, v in d["days"].items()})
    return _Touched(-1, [], None, {}, d["arrived_ms"], d["closed_ms"], digest, d["since_clock_ms"],
                    d["watermark_ms"], stored=True, listed_stored=d["listed_stored"])
