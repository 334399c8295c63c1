"""The ingest stage: meter readings → usage events keyed by account (``usage.events``).

Resolves NMI → account from the effective-dated service-point registry (SPEC §1) and turns the
NEM12 channel into a metric. Anything it cannot accept goes to ``dlq.ingest`` with the original
bytes and a reason code; nothing stops the stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta, timezone
from decimal import Decimal

from prometheus_client import Counter

from pipeline.codec import Codec, DecodeError
from pipeline.money import quantity
from pipeline.records import MeterReading, UsageEvent
from pipeline.reference import ReferenceData
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import Context, ProcessorBase, dead_letter
from pipeline.topology import Topics

log = logging.getLogger(__name__)

NEM_TIME = timezone(timedelta(hours=10))  # MDFF times are AEST all year
OUTCOMES = Counter("pipeline_ingest_records_total", "ingest records by outcome", ["outcome", "reason"])

# NMI suffix first letter → metric (MDFF / NEM12: E import, B export active energy; Q, K reactive)
CHANNEL_METRICS = {"E": "energy_import", "B": "energy_export", "Q": "reactive_import", "K": "reactive_export"}
# unit of measure → (canonical unit, factor)
UNITS = {
    "kwh": ("kWh", Decimal(1)), "wh": ("kWh", Decimal("0.001")), "mwh": ("kWh", Decimal(1000)),
    "kvarh": ("kVArh", Decimal(1)), "varh": ("kVArh", Decimal("0.001")), "mvarh": ("kVArh", Decimal(1000)),
}


class RejectedReading(ValueError):
    """A reading ingest cannot accept; ``reason`` is the dead-letter reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def to_usage_event(reading: MeterReading, ref: ReferenceData) -> UsageEvent:
    """Map one reading to a usage event (pure).

    Raises ``RejectedReading`` with reason ``UNKNOWN_NMI`` (no service point on the interval's
    NEM date), ``UNSUPPORTED_CHANNEL``, ``UNSUPPORTED_UNIT`` or ``NEGATIVE_VALUE``.
    """
    nem_day = reading.interval_start.astimezone(NEM_TIME).date()
    account = ref.account_of(reading.nmi, nem_day)
    if account is None:
        raise RejectedReading("UNKNOWN_NMI", f"NMI {reading.nmi} has no service point on {nem_day}")
    metric = CHANNEL_METRICS.get(reading.suffix[:1].upper())
    if metric is None:
        raise RejectedReading("UNSUPPORTED_CHANNEL", f"channel suffix {reading.suffix!r} is not billed")
    unit = UNITS.get(reading.uom.lower())
    if unit is None:
        raise RejectedReading("UNSUPPORTED_UNIT", f"unit of measure {reading.uom!r} is not supported")
    if reading.value < 0:
        raise RejectedReading("NEGATIVE_VALUE", f"interval value {reading.value} is negative")
    return UsageEvent(
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


class IngestProcessor(ProcessorBase):
    """Validates meter readings and forwards them as usage events keyed by account."""

    def __init__(self, topics: Topics, codec: Codec, reference: Callable[[], ReferenceData],
                 refresh: Callable[[], bool] = lambda: False) -> None:
        self.topics = topics
        self.codec = codec
        self.reference = reference
        self.refresh = refresh
        self.counts: dict[str, int] = {}

    def process(self, record: Incoming, ctx: Context) -> None:
        try:
            reading = self.codec.decode(record.value or b"", MeterReading)
        except DecodeError as exc:
            self._reject(record, "UNDECODABLE", str(exc), ctx)
            return
        try:
            try:
                event = to_usage_event(reading, self.reference())
            except RejectedReading as exc:
                if exc.reason != "UNKNOWN_NMI" or not self.refresh():
                    raise
                event = to_usage_event(reading, self.reference())  # the registry may have just changed
        except RejectedReading as exc:
            self._reject(record, exc.reason, str(exc), ctx)
            return
        ctx.forward(self.topics.usage_events, event.account, self.codec.encode(event))
        self._count("accepted", "")

    def _reject(self, record: Incoming, reason: str, message: str, ctx: Context) -> None:
        dead_letter(ctx, self.codec, self.topics.dlq_ingest, "ingest", record, reason, message)
        self._count("dead_lettered", reason)

    def _count(self, outcome: str, reason: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        OUTCOMES.labels(outcome, reason).inc()
