"""Telemetry metric definitions: which CloudEvents type measures what, and how it is windowed (issue 6).

A ``MetricDefinition`` lives with the reference data (``pipeline/data/reference.json``, Postgres table
``metric_definitions``, migration 0004). It tells

- ingest how to read a CloudEvent of ``event_type`` (CloudEvents spec v1.0 ``type`` attribute): the
  value is at the JSONPath ``value_path`` inside ``data`` (``count`` needs none: every event counts 1;
  ``unique_count`` takes the distinct thing there, e.g. a user id);
- windowing the window size and aggregation of the metric (``policies_from_catalog``);
- rating nothing special: a price book component names the metric like any other (``per_unit``,
  ``tiered``, ...).

Meter channel metrics (``energy_*``, ``reactive_*``: NEM12 channel suffixes mapped by ingest) are not
defined here; their windows come from ``Settings`` (``pipeline.windowing.processor.policies_from_settings``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from jsonpath_ng import parse as jsonpath_parse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config import Settings

if TYPE_CHECKING:  # windowing is imported where it is used: reference data and ingest do not need it
    from pipeline.windowing.windows import WindowPolicy

Aggregation = Literal["sum", "count", "min", "max", "latest", "unique_count"]
METER_METRIC_PREFIXES = ("energy", "reactive")  # metrics of NEM12 channels, windowed by Settings


@lru_cache(maxsize=256)
def compiled_path(path: str) -> Any:
    """The parsed JSONPath expression (``jsonpath-ng``) of ``path``, cached.

    Raises ``ValueError`` when ``path`` is not a JSONPath expression.
    """
    try:
        return jsonpath_parse(path)
    except Exception as exc:  # the lexer and parser raise several kinds
        raise ValueError(f"value_path {path!r} is not a JSONPath expression: {exc}") from exc


class MetricDefinition(BaseModel):
    """One telemetry metric (issue 6), validated on load.

    Attributes:
        metric: the metric name on usage events and in price book components, e.g. ``api_requests``.
        event_type: the CloudEvents ``type`` that measures it (unique across definitions).
        value_path: JSONPath into the event's ``data`` of the value (``$.gb_hours``); ``None`` only
            for ``count``. For ``unique_count`` it names the distinct thing (``$.user.id``).
        aggregation: how a window aggregates events (SPEC §3): sum, count, min, max, latest, unique_count.
        unit: unit of the value, e.g. ``request``, ``GB-h``, ``user-day``; rated per this unit.
        window_minutes: tumbling window size (SPEC §3: default 60 for telemetry).
        allowed_lateness_days: windowing lateness for this metric; ``None`` = ``Settings.allowed_lateness_days``.
        allow_negative: whether a negative value is possible; otherwise ingest dead-letters it
            (``NEGATIVE_VALUE``).
        description: free text for people.
    Raises ``pydantic.ValidationError`` on an invalid definition.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str = Field(min_length=1)
    event_type: str = Field(min_length=1)
    value_path: str | None = None
    aggregation: Aggregation
    unit: str = Field(min_length=1)
    window_minutes: int = Field(60, gt=0)
    allowed_lateness_days: float | None = Field(None, ge=0)
    allow_negative: bool = False
    description: str = ""

    @field_validator("metric")
    @classmethod
    def _not_a_meter_channel(cls, v: str) -> str:
        if v.startswith(METER_METRIC_PREFIXES):
            raise ValueError(f"metric names starting with {METER_METRIC_PREFIXES} are NEM12 channel metrics: {v!r}")
        return v

    @field_validator("value_path")
    @classmethod
    def _path_parses(cls, v: str | None) -> str | None:
        if v is not None:
            compiled_path(v)
        return v

    @model_validator(mode="after")
    def _value_needed(self) -> MetricDefinition:
        if self.aggregation != "count" and self.value_path is None:
            raise ValueError(f"metric {self.metric!r}: aggregation {self.aggregation} needs a value_path")
        return self


def window_policy(definition: MetricDefinition, settings: Settings) -> WindowPolicy:
    """The windowing policy of a defined metric: its own size, aggregation and (optional) lateness;
    out-of-orderness and idle timeout from ``settings`` (they are per partition, not per metric)."""
    from pipeline.windowing.windows import WindowPolicy

    lateness_days = definition.allowed_lateness_days
    if lateness_days is None:
        lateness_days = settings.allowed_lateness_days
    return WindowPolicy(
        size_ms=definition.window_minutes * 60_000,
        out_of_orderness_ms=settings.out_of_orderness_s * 1000,
        allowed_lateness_ms=int(lateness_days * 86_400_000),
        idle_timeout_ms=int(settings.idle_timeout_s * 1000),
        aggregation=definition.aggregation,
    )


def policies_from_catalog(
    settings: Settings,
    definitions: Callable[[], Mapping[str, MetricDefinition]],
    refresh: Callable[[], bool] = lambda: False,
) -> Callable[[str], WindowPolicy]:
    """Window policy per metric for the windowing stage: a defined metric uses its definition
    (``window_policy``); every other metric falls back to ``policies_from_settings`` (meter channels,
    ``PIPELINE_METRIC_POLICIES``).

    ``definitions()`` (metric → definition) is called lazily, only for metrics that are not meter
    channels, so a stage that only ever sees energy never reads the catalog. An undefined metric
    triggers one ``refresh()`` (the catalog may just have changed) before falling back. The policy
    of a metric is fixed for the life of the process once seen: a window's size must not change
    under it.
    """
    from pipeline.windowing.processor import policies_from_settings

    fallback = policies_from_settings(settings)
    cache: dict[str, WindowPolicy] = {}

    def policy(metric: str) -> WindowPolicy:
        found = cache.get(metric)
        if found is None:
            definition = None
            if not metric.startswith(METER_METRIC_PREFIXES):
                definition = definitions().get(metric)
                if definition is None and refresh():
                    definition = definitions().get(metric)
            found = fallback(metric) if definition is None else window_policy(definition, settings)
            cache[metric] = found
        return found

    return policy
