"""Assembles each stage (processor + topics + state codec) for the one runtime loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.ingest import processor as ingest
from pipeline.invoicing.ledger import LedgerStore
from pipeline.invoicing.processor import InvoicingProcessor
from pipeline.invoicing.validation import ReviewPolicy
from pipeline.metrics_catalog import policies_from_catalog
from pipeline.rating import processor as rating
from pipeline.rating.posting import PostingPolicy
from pipeline.refstore import ReferenceCache, postgres_loader
from pipeline.runtime.loop import StageSpec
from pipeline.topology import Topics
from pipeline.windowing import processor as windowing
from pipeline.windowing.windows import WindowPolicy

STAGES = ("ingest", "windowing", "rating", "invoicing")
# read models: stages on the same runtime, off the money path, started on their own (`pipeline run usage`)
READ_MODELS = ("usage",)
# every long-running process of a deployment: the four stages and the outbox relay
PROCESSES = (*STAGES, "relay")


def window_policies(settings: Settings) -> Callable[[str], WindowPolicy]:
    """metric → window policy, as the windowing stage uses it: window size and aggregation of telemetry
    metrics come from their definitions in the reference data, read only once a metric that is not a
    meter channel shows up (``metrics_catalog.policies_from_catalog``)."""
    lazy: list[ReferenceCache] = []

    def reference() -> ReferenceCache:
        if not lazy:
            lazy.append(ReferenceCache(postgres_loader(settings.database_url), settings.reference_refresh_s))
        return lazy[0]

    return policies_from_catalog(settings, lambda: reference().get().metrics, lambda: reference().refresh())


def build_stage(name: str, settings: Settings) -> StageSpec:
    """The ``StageSpec`` of stage ``name``; raises ``ValueError`` for an unknown name."""
    topics = Topics(settings)
    codec = default_codec()
    if name == "ingest":
        cache = ReferenceCache(postgres_loader(settings.database_url), settings.reference_refresh_s)
        enc, dec = ingest.state_codec(codec)
        rules = ingest.IngestRules.from_settings(settings)
        proc = ingest.IngestProcessor(topics, codec, cache.get, cache.refresh, rules)
        return StageSpec("ingest", [topics.meter_readings, topics.telemetry_events], proc, enc, dec)
    if name == "windowing":
        enc, dec = windowing.state_codec(codec)
        policy = window_policies(settings)
        limit = settings.back_billing_limit_days
        proc = windowing.WindowingProcessor(topics, codec, policy,
                                            back_billing_limit_ms=None if limit is None else int(limit * 86_400_000))
        return StageSpec("windowing", [topics.usage_events], proc, enc, dec)
    if name == "rating":
        cache = ReferenceCache(postgres_loader(settings.database_url), settings.reference_refresh_s)
        enc, dec = rating.state_codec(codec)
        posting = PostingPolicy(settings.posting_interval_days, int(settings.posting_idle_s * 1000),
                                settings.posting_max_listed_windows)
        return StageSpec("rating", [topics.usage_windows], rating.RatingProcessor(topics, codec, cache.get, posting),
                         enc, dec)
    if name == "invoicing":
        store = LedgerStore(settings.database_url, topics.group("invoicing"), codec,
                            timedelta(hours=settings.invoice_close_delay_hours), settings.invoice_clock,
                            settings.invoice_series, idle_close_s=settings.invoice_idle_close_s,
                            review=review_policy(settings))
        proc = InvoicingProcessor(codec, store, topics.payments, settings.invoice_close_check_s,
                                  topics.invoice_adjustments)
        return StageSpec("invoicing", [topics.charges_rated, topics.payments, topics.invoice_adjustments], proc,
                         external_sink=True)
    if name == "usage":
        from pipeline.usage import processor as usage
        from pipeline.usage.store import budget_loader, snapshot_writer

        cache = ReferenceCache(postgres_loader(settings.database_url), settings.reference_refresh_s)
        budgets = ReferenceCache(budget_loader(settings.database_url), settings.reference_refresh_s)  # type: ignore[arg-type]
        enc, dec = usage.state_codec(codec)
        proc = usage.UsageProcessor(topics, codec, cache.get, budgets.get, snapshot_writer(settings.database_url))
        return StageSpec("usage", [topics.usage_windows, topics.charges_rated], proc, enc, dec)
    raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES + READ_MODELS)}")


def review_policy(settings: Settings) -> ReviewPolicy:
    """The checks before finalizing (``pipeline.invoicing.validation``) from ``PIPELINE_REVIEW_*``."""
    hold = None if math.isinf(settings.review_hold_hours) else timedelta(hours=settings.review_hold_hours)
    return ReviewPolicy(checks=tuple(settings.review_checks), max_estimated_share=settings.review_max_estimated_share,
                        usage_ratio=settings.review_usage_ratio, history_invoices=settings.review_history_invoices,
                        min_history=settings.review_min_history, hold=hold)
