"""When rating posts a period's delta lines to the ledger: the posting policy (issue 13), pure.

SPEC §4 rates a period on every change; posting every change to the ledger makes the ledger grow with the
number of batches that touch a period (≈ 90 lines per account-day of live 5-minute data), not with the bill.
Billing systems accrue rated usage and post invoice lines at a cadence; so does rating here. The period's
aggregates, totals and explanation inputs are updated on every revision, as before; what waits is only the
emission of ``new total − emitted total``: a period with unposted changes (a *pending* period) is posted when

- ``every_batch``: the policy is off (``interval_days`` 0): after every batch, SPEC §4 as first written;
- ``boundary``: the partition's event clock (the highest window watermark or window end rating has read on the
  partition: a window its series' completion marker closed reaches past the watermark) crossed one of the
  period's posting boundaries since the period became pending: local midnight of the period start + k ×
  ``interval_days`` (k ≥ 1), in the account's time zone;
- ``period_end``: the clock is at or past the period's end (the period is complete in event time; every later
  change — a late reading, a correction — is posted with the batch that brings it);
- ``idle``: no window revision has reached the partition for ``idle_ms`` of processing time (the feed stopped:
  what is pending reaches the ledger anyway; input that keeps coming while the clock stands still, lagging
  series catching up, is not a stopped feed);
- ``rerate``: a price book version or reference change re-rated the period (an operator's action, posted at
  once; the pending window changes are posted first, with their own cause).

Freshness it costs: while a feed flows, a period's ledger lines lag its rated usage by at most
``interval_days`` of event time (7 by default); once a feed stops, by ``idle_ms`` of processing time. The usage
read model (``pipeline.usage``) still shows kWh as windows close. Lines per account-month ≈ (postings) ×
(charge lines a posting changes): with 7-day boundaries ≈ 5 postings of a TOU plan's 3 bands and its tax, plus
its fixed charges once, ≈ 21–26 lines.

Nothing is lost or double-posted: the pending set, its causes and the event clock live in the stage's
transactional state (``rq|<period key>``, ``posting|clock``), committed with the batch's offsets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import Decimal

EVERY_BATCH, BOUNDARY, PERIOD_END, IDLE, RERATE = "every_batch", "boundary", "period_end", "idle", "rerate"


@dataclass(frozen=True, slots=True)
class PostingPolicy:
    """``interval_days``: days between a period's interim postings (0 = post every batch); ``idle_ms``: processing
    time without input on a partition after which its pending periods are posted; ``max_listed_windows``: window
    revisions listed one by one in a posting's explanation (the rest are summarised per local day)."""

    interval_days: int = 0
    idle_ms: int = 3_600_000
    max_listed_windows: int = 48

    @property
    def every_batch(self) -> bool:
        return self.interval_days <= 0


def posting_boundaries_ms(period_start: date, period_end: date, tz: tzinfo, interval_days: int) -> tuple[int, ...]:
    """The period's posting boundaries, epoch ms UTC, ascending: local midnight (``tz``) of ``period_start`` +
    k × ``interval_days`` for k ≥ 1 while before ``period_end``, then local midnight of ``period_end`` itself.
    ``interval_days`` ≤ 0: only the period end."""
    out: list[int] = []
    if interval_days > 0:
        day = period_start + timedelta(days=interval_days)
        while day < period_end:
            out.append(_local_midnight_ms(day, tz))
            day += timedelta(days=interval_days)
    out.append(_local_midnight_ms(period_end, tz))
    return tuple(out)


def _local_midnight_ms(day: date, tz: tzinfo) -> int:
    return int(datetime.combine(day, time(), tzinfo=tz).astimezone(UTC).timestamp() * 1000)


def posting_reason(policy: PostingPolicy, boundaries_ms: tuple[int, ...], since_clock_ms: int, clock_ms: int,
                   idle_for_ms: int) -> str | None:
    """Why a pending period is posted now, or ``None`` to keep it pending (see the module docstring).

    ``boundaries_ms``: ``posting_boundaries_ms`` of the period (its last one is the period end);
    ``since_clock_ms``: the partition's event clock when the period became pending; ``clock_ms``: the clock now;
    ``idle_for_ms``: processing time since the partition's last input."""
    if policy.every_batch:
        return EVERY_BATCH
    if clock_ms >= boundaries_ms[-1]:
        return PERIOD_END
    if any(since_clock_ms < b <= clock_ms for b in boundaries_ms):
        return BOUNDARY
    if idle_for_ms >= policy.idle_ms:
        return IDLE
    return None


@dataclass
class DaySummary:
    """Window revisions of one local day in a posting whose causes are not all listed: how many, and the sum of
    their deltas (the metric's unit)."""

    windows: int = 0
    delta: Decimal = Decimal(0)


_sha256 = hashlib.sha256


@dataclass
class CauseDigest:
    """What caused a pending period's changes, kept small however long the period stays pending.

    ``ids``: ``window_id@revision`` of every cause while there are at most ``max_listed`` (then ``None``: only
    ``chain`` and ``count`` identify them), only ever appended to (its stored bytes are extended, not rewritten:
    ``wire.PendingWriter``); ``chain``: sha256 hex chained over the ids in arrival order;
    ``count``: causes so far; ``days``: per local date (ISO), a ``DaySummary`` of every cause."""

    ids: list[str] | None = field(default_factory=list)
    chain: str = ""
    count: int = 0
    days: dict[str, DaySummary] = field(default_factory=dict)

    def add(self, cause_id: str, local_day: str, delta: Decimal, max_listed: int) -> bool:
        """Record one cause; ``True`` while it is still listed one by one (the caller keeps the revision)."""
        self.count += 1
        self.chain = _sha256(f"{self.chain}\n{cause_id}".encode()).hexdigest()
        day = self.days.get(local_day)
        if day is None:
            day = self.days[local_day] = DaySummary()
        day.windows += 1
        day.delta += delta
        if self.ids is not None and len(self.ids) < max_listed:
            self.ids.append(cause_id)
            return True
        self.ids = None
        return False

    def cause(self) -> str:
        """The cause a posting's line ids hash: with every id known, ``windows:`` + sha256 of the sorted ids
        (the same as a posting of one batch, SPEC §4); beyond that, ``windows:`` + the chain."""
        if self.ids is not None:
            return "windows:" + hashlib.sha256("\n".join(sorted(self.ids)).encode()).hexdigest()[:24]
        return "windows:" + hashlib.sha256(f"{self.chain}|{self.count}".encode()).hexdigest()[:24]
