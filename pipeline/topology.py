"""The one place that names topics: partitions, retention, compaction, and which stage reads what.

SPEC §1 flow::

    meter.readings ─┐                      ┌─► usage.late
    telemetry.events┴► ingest ─► usage.events ─► windowing ─► usage.windows ─► rating ─► charges.rated ─► invoicing
                         └─► dlq.ingest                                        ▲ pricebooks
                                        usage.windows + charges.rated ─► usage (read model) ─► usage.alerts
    payments, invoice.adjustments (Bill API: manual lines, bill closes) ─► invoicing ─► outbox ─► invoice.events
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Settings

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic as created by ``pipeline topics create``.

    Attributes:
        name: full topic name (with the configured prefix).
        partitions: partition count; every keyed data topic uses ``Settings.partitions``.
        config: topic-level configs (``cleanup.policy``, ``retention.ms``, ...).
    """

    name: str
    partitions: int
    config: dict[str, str]


class Topics:
    """Topic names in force for a given ``Settings`` (the prefix isolates parallel test runs)."""

    def __init__(self, settings: Settings) -> None:
        p = settings.topic_prefix
        self.meter_readings = f"{p}meter.readings"
        self.telemetry_events = f"{p}telemetry.events"
        self.usage_events = f"{p}usage.events"
        self.usage_windows = f"{p}usage.windows"
        self.usage_late = f"{p}usage.late"
        self.charges_rated = f"{p}charges.rated"
        self.dlq_ingest = f"{p}dlq.ingest"
        self.pricebooks = f"{p}pricebooks"
        self.invoice_events = f"{p}invoice.events"
        self.payments = f"{p}payments"
        self.usage_alerts = f"{p}usage.alerts"  # budget crossings of the usage read model (issue 17)
        self.invoice_adjustments = f"{p}invoice.adjustments"  # Bill API commands (issue 17 part B)
        self._prefix = p
        self._partitions = settings.partitions

    def changelog(self, stage: str) -> str:
        """The compacted state changelog of ``stage`` (one partition per input partition)."""
        return f"{self._prefix}{stage}.state.changelog"

    def group(self, stage: str) -> str:
        """The consumer group id of ``stage``."""
        return f"{self._prefix}pipeline.{stage}"

    def specs(self) -> list[TopicSpec]:
        """Every topic the pipeline needs, with explicit partitions, retention and compaction."""
        n = self._partitions
        keep_30d = {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)}
        keep_forever = {"cleanup.policy": "delete", "retention.ms": "-1"}
        compacted = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000", "segment.ms": str(DAY_MS)}
        return [
            # raw input: kept 30 days for replay by operators
            TopicSpec(self.meter_readings, n, keep_30d),
            TopicSpec(self.telemetry_events, n, keep_30d),
            # derived streams: replayable for re-rating; kept 30 days
            TopicSpec(self.usage_events, n, keep_30d),
            TopicSpec(self.usage_windows, n, keep_30d),
            TopicSpec(self.charges_rated, n, keep_30d),
            # never silently lose anything: late and dead-lettered records are kept forever
            TopicSpec(self.usage_late, n, keep_forever),
            TopicSpec(self.dlq_ingest, n, keep_forever),
            TopicSpec(self.invoice_events, n, keep_forever),
            TopicSpec(self.payments, n, keep_forever),
            TopicSpec(self.usage_alerts, n, keep_forever),
            TopicSpec(self.invoice_adjustments, n, keep_forever),
            # compacted: latest value per key is the truth
            TopicSpec(self.pricebooks, 1, compacted),
            TopicSpec(self.changelog("ingest"), n, compacted),  # duplicate detection (SPEC §2)
            TopicSpec(self.changelog("windowing"), n, compacted),
            TopicSpec(self.changelog("rating"), n, compacted),
            TopicSpec(self.changelog("usage"), n, compacted),  # usage read model, budget crossing state
        ]
