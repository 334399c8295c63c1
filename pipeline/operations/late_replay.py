"""Re-submitting refused readings (``pipeline late replay``, SPEC §3).

A reading refused by a billing rule sits on ``usage.late`` with its reason and its original record.
Once an operator has fixed the cause (extended a service point, raised the back-billing limit), the
replay re-publishes the original records where they were first consumed: ingest refusals to
``meter.readings`` / ``telemetry.events`` (ingest checks them again against the reference data in
force), windowing refusals to ``usage.events``. Nothing is billed twice: a replayed reading that was
billed meanwhile is a duplicate (same identity and version) to ingest or windowing, so running the
same replay again adds nothing. Records of the first ``LateEvent`` version (``TOO_LATE``, no original
bytes) re-submit their usage event to ``usage.events``.

``select`` and ``resubmission`` are pure; ``replay`` reads the topic and produces.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline.codec import Codec
from pipeline.records import LateEvent


@dataclass(frozen=True, slots=True)
class Filter:
    """Which refusals to re-submit; ``None`` matches everything.

    Attributes:
        account: the refused reading's account (for OUTSIDE_SERVICE_DATES: the nearest service
            point's, as on the record).
        reason: e.g. ``OUTSIDE_SERVICE_DATES``, ``BACK_BILLING_LIMIT``.
        since / until: the reading's event time (interval start, UTC), ``[since, until)``.
    """

    account: str | None = None
    reason: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, late: LateEvent) -> bool:
        """Whether ``late`` is selected."""
        at = late.event.event_time
        return ((self.account is None or late.event.account == self.account)
                and (self.reason is None or late.reason == self.reason)
                and (self.since is None or at >= self.since)
                and (self.until is None or at < self.until))


def select(refusals: Iterable[LateEvent], which: Filter) -> list[LateEvent]:
    """The refusals ``which`` matches, in the order given."""
    return [late for late in refusals if which.matches(late)]


@dataclass(frozen=True, slots=True)
class Resubmission:
    """One record to produce again: topic, key, value, headers."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def resubmission(late: LateEvent, codec: Codec, usage_events_topic: str) -> Resubmission:
    """The record that re-submits ``late``: its original where it was consumed, or (a first-version
    record, without original bytes) its usage event to ``usage_events_topic``, keyed by account."""
    if late.original and late.input_topic:
        return Resubmission(late.input_topic, late.original_key, late.original, list(late.headers))
    return Resubmission(usage_events_topic, late.event.account.encode(), codec.encode(late.event), [])


@dataclass
class ReplayReport:
    """What a replay selected and re-submitted, per (reason, topic)."""

    selected: int = 0
    resubmitted: Counter[tuple[str, str]] | None = None


def replay(settings: Any, which: Filter, dry_run: bool = False) -> ReplayReport:
    """Re-submit the refusals on ``usage.late`` that ``which`` selects (idempotent producer; every
    record acknowledged before returning). Raises ``KafkaIOError`` when the broker does not acknowledge
    them."""
    from pipeline.codec import default_codec
    from pipeline.runtime.kafka import IdempotentProducer, OutRecord, read_all
    from pipeline.topology import Topics

    codec = default_codec()
    topics = Topics(settings)
    refusals = [codec.decode(m.value, LateEvent) for m in read_all(settings.kafka_bootstrap, topics.usage_late,
                                                                     timeout_s=120)]
    chosen = select(refusals, which)
    report = ReplayReport(len(chosen), Counter())
    records = []
    for late in chosen:
        again = resubmission(late, codec, topics.usage_events)
        report.resubmitted[(late.reason, again.topic)] += 1
        records.append(OutRecord(again.topic, again.key, again.value, again.headers or None))
    if records and not dry_run:
        producer = IdempotentProducer(settings.kafka_bootstrap)
        for start in range(0, len(records), 10_000):
            producer.send_and_wait(records[start:start + 10_000], timeout_s=120)
    return report
