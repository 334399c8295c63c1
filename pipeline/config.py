"""Configuration from environment variables (pydantic-settings).

Every variable is prefixed ``PIPELINE_`` (``PIPELINE_KAFKA_BOOTSTRAP``, ...). The README lists
them all; ``pipeline config`` prints the values in force. Durations are in the unit their name
says (``_ms``, ``_s``, ``_minutes``, ``_days``).
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class MetricPolicy(BaseModel):
    """Per-metric windowing overrides (``PIPELINE_METRIC_POLICIES`` is a JSON object metric → this)."""

    window_minutes: int | None = Field(None, gt=0)
    allowed_lateness_days: float | None = Field(None, ge=0)
    aggregation: Literal["sum", "count", "min", "max", "latest", "unique_count"] = "sum"


class OperatorKey(BaseModel):
    """One key of the operator API (``PIPELINE_OPERATOR_API_KEYS`` is a JSON list of these): ``name`` is
    recorded as who made each change; ``operator`` may change reference data, ``viewer`` may only read."""

    name: str = Field(min_length=1)
    key: SecretStr
    role: Literal["operator", "viewer"] = "operator"


class Settings(BaseSettings):
    """All runtime configuration of the pipeline.

    Attributes are read from ``PIPELINE_<NAME>`` environment variables (case-insensitive).
    Raises ``pydantic.ValidationError`` at start-up when a value does not parse.
    """

    model_config = SettingsConfigDict(env_prefix="PIPELINE_", extra="ignore")

    # --- where things are -------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:19092", description="Kafka bootstrap servers")
    database_url: str = Field(
        "postgresql://pipeline@127.0.0.1:15432/pipeline",
        description="PostgreSQL URL of the ledger and reference data (application role)",
    )
    database_owner_url: str = Field(
        "postgresql://pipeline_owner@127.0.0.1:15432/pipeline",
        description="PostgreSQL URL of the schema owner: `pipeline db migrate` runs as it",
    )
    stack_dir: Path = Field(Path(".stack"), description="where `pipeline stack` keeps jars, data, logs")
    state_dir: Path = Field(Path(".stack/state"), description="local RocksDB state stores of the stages")

    # --- local stack (pipeline stack up) --------------------------------------------------
    kafka_port: int = Field(19092, description="local broker client port (127.0.0.1)")
    kafka_controller_port: int = Field(19093, description="local KRaft controller port (127.0.0.1)")
    kafka_heap: str = Field("-Xms256m -Xmx768m", description="JVM heap flags of the local broker")
    postgres_port: int = Field(15432, description="local PostgreSQL port (127.0.0.1)")
    postgres_bin: Path = Field(Path("/usr/lib/postgresql/15/bin"), description="PostgreSQL server binaries")

    # --- topics ---------------------------------------------------------------------------
    partitions: int = Field(4, ge=1, description="partitions of every data topic (unit of parallelism)")
    topic_prefix: str = Field("", description="prefix for every topic name (isolates test runs)")

    # --- stage runtime ----------------------------------------------------------------------
    instance_id: str = Field(
        "0",
        description="stable id of this process among the processes of one stage (transactional.id suffix): "
        "give each process its own; a restarted process reusing its id fences its dead predecessor at once",
    )
    transaction_timeout_ms: int = Field(60_000, ge=1000, description="Kafka transaction.timeout.ms of stages")
    commit_interval_ms: int = Field(250, ge=10, description="max time between two transaction commits")
    batch_max_records: int = Field(2000, ge=1, description="max records consumed per transaction")
    metrics_port: int = Field(
        0, ge=0, description="port of a stage's or the relay's /metrics, /healthz and /readyz; 0 = off (`pipeline "
        "demo` gives each process metrics_base_port + n)",
    )
    metrics_addr: str = Field("127.0.0.1", description="address the /metrics, /healthz and /readyz server binds")
    reference_refresh_s: float = Field(30.0, description="how often stages re-read reference data")

    # --- monitoring (issue 16) ------------------------------------------------------------------
    metrics_base_port: int = Field(
        9400, ge=1, le=65000, description="the stages and relay `pipeline demo` starts get their /metrics ports from "
        "here: ingest +0, windowing +1, rating +2, invoicing +3, relay +4 (the HTTP gateway serves /metrics on its "
        "own port)",
    )
    monitor_interval_s: float = Field(
        2.0, gt=0, description="how often a stage updates its consumer lag and state store size gauges"
    )
    prometheus_port: int = Field(
        19090, ge=1, le=65535,
        description="port of the local Prometheus (127.0.0.1; not 9090, where Debian's prometheus service listens)",
    )
    prometheus_bin: Path = Field(Path("/usr/bin/prometheus"), description="the Prometheus server binary")
    prometheus_scrape_interval_s: float = Field(
        5.0, gt=0, description="scrape and rule evaluation interval of the local Prometheus"
    )

    # --- windowing (SPEC §3) ----------------------------------------------------------------
    window_minutes_energy: int = Field(30, description="tumbling window size for energy channels")
    window_minutes_telemetry: int = Field(60, description="tumbling window size for telemetry metrics")
    out_of_orderness_s: int = Field(3600, ge=0, description="watermark = max event time − this")
    allowed_lateness_days: float = Field(
        7.0, ge=0, description="a window keeps its full state hot until its series' clock passes its end + this; "
        "then it is archived (compact) and brought back if data for it arrives: nothing is ever too late to bill",
    )
    metric_policies: dict[str, MetricPolicy] = Field(
        default_factory=dict,
        description='per-metric overrides, JSON: {"api_requests": {"window_minutes": 60, "aggregation": "count", '
        '"allowed_lateness_days": 2}}',
    )
    idle_timeout_s: float = Field(
        30.0, gt=0, description="a series with pending windows and no event for this long (processing time) has "
        "them emitted; never refuses later data (it re-emits a LATE revision). The first of three 'the feed stopped' "
        "timers, each after the one before: windowing idle_timeout_s < rating posting_idle_s < invoicing "
        "invoice_idle_close_s",
    )
    back_billing_limit_days: float | None = Field(
        None, ge=0, description="refuse (usage.late, BACK_BILLING_LIMIT) a reading that would raise the bill of a "
        "window ended more than this many days before the account's billing clock; unset = never (NERR rule 30 "
        "caps undercharge recovery at 9 months, about 274 days); a correction that lowers a bill is always credited",
    )

    # --- ingest: duplicates and bad input (SPEC §1, §2; issue 6) ---------------------------------
    telemetry_dedupe_horizon_s: int = Field(
        7 * 86_400, ge=0,
        description="ingest drops a repeated telemetry (source, id) seen within this many seconds of event time",
    )
    meter_dedupe_horizon_days: float = Field(
        450.0, ge=0, description="ingest remembers a meter interval's highest version until its partition's meter "
        "clock (highest interval start seen) passes the interval end + this; older repeats go on to windowing, "
        "which deduplicates them against its windows",
    )
    future_bound_s: int = Field(
        86_400, ge=0, description="ingest dead-letters (FUTURE_EVENT) a reading or event later than now + this"
    )

    # --- HTTP ingestion: `pipeline serve http` (issue 6) ---------------------------------------
    http_host: str = Field("127.0.0.1", description="address the HTTP ingestion server binds")
    http_port: int = Field(8080, ge=0, le=65535, description="port of the HTTP ingestion server")
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description='keys the HTTP endpoints accept (header X-API-Key), JSON: ["key-1", "key-2"]; none = refuse all',
    )
    http_max_batch: int = Field(10_000, ge=1, description="max readings or events in one HTTP request (more: 413)")
    http_idempotency_ttl_s: float = Field(
        86_400.0, gt=0, description="a request repeated with the same Idempotency-Key within this many seconds gets "
        "the first response and produces nothing (in-memory, per server process)",
    )

    # --- operator API: `pipeline serve operator` (issue 15) ------------------------------------
    operator_http_host: str = Field("127.0.0.1", description="address the operator API binds")
    operator_http_port: int = Field(8081, ge=0, le=65535, description="port of the operator API")
    operator_api_keys: list[OperatorKey] = Field(
        default_factory=list,
        description='keys of the operator API (header X-API-Key), JSON: [{"name": "alice", "key": "…", "role": '
        '"operator"}, {"name": "dash", "key": "…", "role": "viewer"}]; separate from PIPELINE_API_KEYS',
    )

    # --- Bill API: `pipeline serve customer` (issue 17 part B) --------------------------------
    customer_http_host: str = Field("127.0.0.1", description="address the Bill API binds")
    customer_http_port: int = Field(8082, ge=0, le=65535, description="port of the Bill API")
    customer_ledger_wait_s: float = Field(
        30.0, gt=0, description="how long a Bill API write waits for the invoicing stage to apply it before "
        "answering 504 (the request stays safe to retry with the same Idempotency-Key)")

    # --- rating: when rated changes are posted to the ledger (issue 13, pipeline/rating/posting.py) ------------
    posting_interval_days: int = Field(
        7, ge=0, description="a period's rated changes are posted to the ledger when the event clock crosses its "
        "start + k × this many days or its end (and at once after its end); 0 = after every batch (a ledger line per "
        "changed charge per batch: ≈ 90 lines per account-day of live 5-minute data)",
    )
    posting_idle_s: float = Field(
        3600.0, gt=0, description="pending rated changes are posted anyway once their partition has had no window "
        "revision for this long (processing time: the feed stopped); the second 'the feed stopped' timer: above "
        "idle_timeout_s and the gap between two windows of a live feed, below invoice_idle_close_s (checked at "
        "start-up: those changes must land before the invoice closes; raise both above a day for daily-file feeds)",
    )
    posting_max_listed_windows: int = Field(
        48, ge=1, description="window revisions listed one by one in a posted line's explanation; beyond, they are "
        "summarised per local day (count and kWh) and identified by a digest",
    )

    # --- invoicing (SPEC §5) ----------------------------------------------------------------
    invoice_close_delay_hours: float = Field(
        72.0, ge=0, description="an invoice closes at its period end (account time zone) + this, then is finalized"
    )
    invoice_clock: Literal["event", "wall"] = Field(
        "event",
        description="what closes invoices: `event` = the account's own billing clock, the highest usage watermark "
        "carried by its charges (replays of old data bill as they did then; see also invoice_idle_close_s), "
        "`wall` = the wall clock",
    )
    invoice_series: str = Field(
        "INV-{year}", description="invoice number series; {year} = bill date year, {currency} = ISO 4217 code"
    )
    invoice_idle_close_s: float | None = Field(
        7200.0, gt=0, description="with the event clock, an invoice whose close time the wall clock has passed is also "
        "finalized once no new line reached its account for this long (its own data stopped short of the close "
        "time); unset = only the account's own event clock closes it. The third 'the feed stopped' timer: above "
        "posting_idle_s, so that rating has posted what it held first",
    )
    invoice_close_check_s: float = Field(5.0, gt=0, description="how often invoicing looks for invoices to close")
    # --- checks before finalizing (issue 17, pipeline/invoicing/validation.py) -------------------------------
    review_checks: list[str] = Field(
        ["ESTIMATED_SHARE", "USAGE_FAR_FROM_HISTORY", "NEGATIVE_TOTAL", "MISSING_SERVICE_DAYS"],
        description="checks that hold an invoice in REVIEW instead of finalizing it (JSON list; [] = none)",
    )
    review_max_estimated_share: Decimal = Field(
        Decimal("0.5"), ge=0, le=1, description="ESTIMATED_SHARE: hold when more than this share of the windows "
        "billed carry estimated or substituted reads (quality E, S, F)")
    review_usage_ratio: Decimal = Field(
        Decimal(3), gt=1, description="USAGE_FAR_FROM_HISTORY: hold when usage is above this many times, or below "
        "1/this of, the mean of the account's recent invoices")
    review_history_invoices: int = Field(6, ge=1, description="USAGE_FAR_FROM_HISTORY: recent invoices averaged")
    review_min_history: int = Field(2, ge=1, description="USAGE_FAR_FROM_HISTORY: fewer invoices = no check")
    review_hold_hours: float = Field(
        72.0, gt=0, description="a held invoice is finalized anyway after this long without a decision; inf = never")
    relay_batch: int = Field(500, ge=1, description="outbox rows published per relay round")
    relay_poll_s: float = Field(0.5, gt=0, description="relay wait when the outbox is empty")

    # --- fault tolerance (issue 12) --------------------------------------------------------------
    kafka_call_timeout_s: float = Field(
        30.0, gt=0,
        description="deadline of one transaction commit (send offsets + commit, resumed calls included), of one "
        "abort, of a committed-offsets lookup and of a relay round's acknowledgements; a commit not done by then "
        "is given up with its producer, which is replaced in-process",
    )
    recovery_timeout_s: float = Field(
        300.0, gt=0,
        description="longest a stage waits for Kafka to recover (a new transactional producer ready, committed "
        "offsets read, a changelog partition restored) or the relay for a round to succeed, before it exits "
        "non-zero for a supervisor to restart it",
    )
    watchdog_s: float = Field(
        180.0, gt=0,
        description="a stage or relay whose loop makes no progress for this long (a call that never returns) "
        "logs where it is stuck and exits at once (code 70); keep it above kafka_call_timeout_s and "
        "postgres_statement_timeout_s",
    )
    postgres_statement_timeout_s: float = Field(
        60.0, gt=0,
        description="server-side statement_timeout of the stages' and relay's Postgres sessions; a cancelled "
        "statement is retried on a new connection like a lost one",
    )

    # --- exports (issue 15, `pipeline export`) ---------------------------------------------------
    export_destination: str | None = Field(
        None, description="where `pipeline export` writes: file:///absolute/folder or s3://bucket/prefix "
        "(--dest overrides)",
    )
    export_max_rows: int = Field(1_000_000, ge=1, description="most rows in one exported file (CSV and Parquet)")
    export_generation: str = Field(
        "live", description="the generation an export is labelled with (manifest, path, history); `live` is the "
        "running pipeline",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 API endpoint, e.g. http://127.0.0.1:9000 for an S3-compatible server; unset = AWS"
    )
    s3_region: str = Field("us-east-1", description="S3 region")
    s3_connect_timeout_s: float = Field(10.0, gt=0, description="deadline to connect to the S3 endpoint")
    s3_read_timeout_s: float = Field(60.0, gt=0, description="deadline for an answer from the S3 endpoint")
    s3_max_attempts: int = Field(3, ge=1, description="attempts per S3 call (botocore standard retries)")


    @model_validator(mode="after")
    def _posting_before_idle_close(self) -> Settings:
        """Rating must post a stopped feed's pending changes before invoicing finalizes its invoice for want of
        lines (``posting_idle_s`` < ``invoice_idle_close_s``), or those changes would land on the next invoice."""
        if (self.posting_interval_days > 0 and self.invoice_idle_close_s is not None
                and self.posting_idle_s >= self.invoice_idle_close_s):
            raise ValueError(f"PIPELINE_POSTING_IDLE_S ({self.posting_idle_s:g}) must be below "
                             f"PIPELINE_INVOICE_IDLE_CLOSE_S ({self.invoice_idle_close_s:g}) while rating holds "
                             "changes for posting (PIPELINE_POSTING_INTERVAL_DAYS > 0; 0 posts every batch)")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
