"""The records that travel on topics: immutable values, validated on construction.

Each class mirrors one Avro schema in ``schemas/`` (field for field); ``pipeline.codec``
turns them into bytes and back. Times are timezone-aware UTC ``datetime``; quantities and
amounts are ``Decimal`` (never float), quantities to 6 decimal places (SPEC §4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal

QUALITY_FLAGS = frozenset("AESFNV")  # MDFF quality methods (NEM12 spec §4.5 / Appendix C)
ESTIMATED_QUALITY_FLAGS = frozenset("ESF")  # reads that are not actual: E forward estimate, S substituted, F final


def _require_utc(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() != UTC.utcoffset(None):
        raise ValueError(f"{name} must be a UTC datetime, got {value!r}")


def _require_decimal(name: str, value: Decimal) -> None:
    if not isinstance(value, Decimal):
        raise TypeError(f"{name} must be Decimal, got {type(value).__name__}")
    if not value.is_finite():
        raise ValueError(f"{name} must be finite, got {value}")


@dataclass(frozen=True, slots=True)
class MeterReading:
    """One interval of one NEM12 channel, as published by the meter gateway (topic ``meter.readings``).

    Attributes:
        nmi: National Metering Identifier (10 characters, MDFF 200 record field 2).
        suffix: NMI channel suffix, e.g. ``E1`` import, ``B1`` export, ``Q1`` reactive (200 field 5).
        uom: unit of measure as given in the 200 record, e.g. ``kWh``, ``kVArh``.
        interval_start / interval_end: the interval in UTC (NEM12 times are AEST, UTC+10).
        value: the interval value in ``uom``.
        quality: quality method A/E/S/F/N/V after 400-record overrides.
        reason_code: MDFF reason code, or ``None``.
        version: supersession version in UTC: UpdateDateTime, else MSATSLoadDateTime, else the
            file's creation time (SPEC §2).
        version_source: which of those three the version came from.
        source_file: file name the reading came from.
        source_record: 1-based line number of the 300 record in that file.
        correction: a NEM13 register correction (the register went down and the record's Quantity says
            so): ``value`` is negative, a credit within the read period, not bad input. Only the NEM13
            gateway sets it, on day-long readings (``nem13.is_register_correction``).
    """

    nmi: str
    suffix: str
    uom: str
    interval_start: datetime
    interval_end: datetime
    value: Decimal
    quality: str
    reason_code: str | None
    version: datetime
    version_source: str
    source_file: str
    source_record: int
    correction: bool = False

    def __post_init__(self) -> None:
        _require_utc("interval_start", self.interval_start)
        _require_utc("interval_end", self.interval_end)
        _require_utc("version", self.version)
        _require_decimal("value", self.value)
        if self.interval_end <= self.interval_start:
            raise ValueError("interval_end must be after interval_start")
        if self.quality not in QUALITY_FLAGS:
            raise ValueError(f"quality must be one of {sorted(QUALITY_FLAGS)}, got {self.quality!r}")

    @property
    def identity(self) -> str:
        """(NMI, suffix, interval start) as one string: the interval's identity (SPEC §2)."""
        return f"nem12:{self.nmi}:{self.suffix}:{self.interval_start:%Y-%m-%dT%H:%MZ}"


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """A validated usage event keyed by account (topic ``usage.events``).

    Attributes:
        event_id: identity of the underlying interval or telemetry event (SPEC §2).
        account: billing account resolved from the service-point registry.
        series: the window series: ``NMI/suffix`` for meters, ``metric/subject`` for telemetry.
        metric: what is measured, e.g. ``energy_import`` (kWh), ``energy_export`` (kWh).
        unit: unit of ``value`` (``kWh``, ``kVArh``, ...).
        event_time / event_end: UTC start and end of the measured interval.
        value: the quantity in ``unit``.
        version: supersession version (UTC); higher replaces lower for the same ``event_id``.
        quality: quality flag carried to the explanation of every charge.
        source: where it came from, ``<file name>#<record line>``.
    """

    event_id: str
    account: str
    series: str
    metric: str
    unit: str
    event_time: datetime
    event_end: datetime
    value: Decimal
    version: datetime
    quality: str
    source: str

    def __post_init__(self) -> None:
        _require_utc("event_time", self.event_time)
        _require_utc("event_end", self.event_end)
        _require_utc("version", self.version)
        _require_decimal("value", self.value)


@dataclass(frozen=True, slots=True)
class UsageWindow:
    """One revision of one event-time window (topic ``usage.windows``), SPEC §3.

    Attributes:
        window_id: ``account|series|window start`` — deterministic; with ``revision`` unique.
        revision: 0 for the first emission, n+1 for each re-emission.
        timing: ``ON_TIME`` or ``LATE``.
        value: the cumulative aggregate (sum, in ``unit``) after this revision.
        delta: ``value`` minus the value of revision n−1 (equals ``value`` at revision 0).
        count: intervals contributing.
        qualities: sorted distinct quality flags of the contributing intervals.
        sources: sorted ``file#record`` of the contributing intervals.
        watermark: the partition watermark (UTC) when the revision was emitted.
    """

    window_id: str
    account: str
    series: str
    metric: str
    unit: str
    window_start: datetime
    window_end: datetime
    revision: int
    timing: str
    value: Decimal
    delta: Decimal
    count: int
    qualities: tuple[str, ...]
    sources: tuple[str, ...]
    watermark: datetime

    def __post_init__(self) -> None:
        _require_utc("window_start", self.window_start)
        _require_utc("window_end", self.window_end)
        _require_decimal("value", self.value)
        _require_decimal("delta", self.delta)
        if self.timing not in ("ON_TIME", "LATE"):
            raise ValueError(f"timing must be ON_TIME or LATE, got {self.timing!r}")
        if self.revision < 0:
            raise ValueError("revision must be >= 0")


@dataclass(frozen=True, slots=True)
class LateEvent:
    """A reading an explicit billing rule refused (topic ``usage.late``, key = account), SPEC §3.

    Nothing is refused for arriving late; the only reasons are billing rules:
    ``OUTSIDE_SERVICE_DATES`` (ingest: no service point covered the reading's date) and
    ``BACK_BILLING_LIMIT`` (windowing: an undercharge older than the back-billing limit). Records of
    the first version carry ``TOO_LATE`` and no original bytes.

    Attributes:
        event: the reading as a usage event (for ``OUTSIDE_SERVICE_DATES`` its account is that of the
            nearest service point of the meter, or subject).
        reason: machine-readable reason code.
        window_end: end of the window the reading belongs to (UTC).
        watermark: the clock the rule was judged against (UTC): the account's billing clock for
            ``BACK_BILLING_LIMIT``, the reading's start for ``OUTSIDE_SERVICE_DATES``.
        lateness_ms: how far past the rule's bound, in milliseconds (0 when the rule has none).
        stage: the stage that refused it (``ingest`` or ``windowing``).
        message: the reason for a person.
        input_topic / input_partition / input_offset: where the original record was consumed
            (``pipeline late replay`` re-submits ``original`` to ``input_topic``); −1: unknown.
        original_key / original / headers: the original record (``original`` empty in records of the
            first version: replay then re-submits ``event`` to ``usage.events``).
    """

    event: UsageEvent
    reason: str
    window_end: datetime
    watermark: datetime
    lateness_ms: int
    stage: str = "windowing"
    message: str = ""
    input_topic: str = ""
    input_partition: int = -1
    input_offset: int = -1
    original_key: bytes | None = None
    original: bytes = b""
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class SeriesComplete:
    """A gateway's completion marker (topic ``meter.readings``, key = NMI), SPEC §3: the delivery
    ``source_file`` carried every interval of channel (``nmi``, ``suffix``) up to ``complete_through``
    (UTC, exclusive). Windows of the channel ending by then close at once; later data for them is
    still billed."""

    nmi: str
    suffix: str
    complete_through: datetime
    source_file: str

    def __post_init__(self) -> None:
        _require_utc("complete_through", self.complete_through)


@dataclass(frozen=True, slots=True)
class SeriesMarker:
    """A completion marker resolved to its account (topic ``usage.events``, key = account), SPEC §3:
    ``series`` (``NMI/suffix`` or ``metric/subject``) of ``account`` is complete through
    ``complete_through`` (UTC, exclusive); ``source`` names the delivery."""

    account: str
    series: str
    complete_through: datetime
    source: str

    def __post_init__(self) -> None:
        _require_utc("complete_through", self.complete_through)


@dataclass(frozen=True, slots=True)
class RatedCharge:
    """One delta line for one (account, billing period, component) (topic ``charges.rated``), SPEC §4.

    Attributes:
        line_id: deterministic hash of what caused the line (account, period, component, cause).
        period_start / period_end: the billing period, local dates, end exclusive.
        currency: ISO 4217 code; ``amount`` and ``period_total`` are in it.
        component_id / component_kind / band: the price-book component (and TOU band) charged.
        quantity: the component's period quantity after this change (kWh, days, or base amount).
        unit: unit of ``quantity``.
        rate: price per unit of ``quantity`` (or percentage for tax), in ``currency``.
        amount: the delta = ``period_total`` − total emitted before; never zero.
        period_total: the component's new period total, rounded half-up to the minor unit.
        price_book_id / price_book_version: the price book version used.
        cause: what triggered the recompute (window ids and revisions, or price book version).
        explanation: JSON text: windows and revisions, quality flags, formula.
        watermark: the highest usage watermark (UTC) among the window revisions behind the line, or
            ``None`` (a re-rating line); the invoicing stage's event clock (SPEC §5).
    """

    line_id: str
    account: str
    period_start: date
    period_end: date
    currency: str
    component_id: str
    component_kind: str
    band: str
    quantity: Decimal
    unit: str
    rate: Decimal
    amount: Decimal
    period_total: Decimal
    price_book_id: str
    price_book_version: int
    cause: str
    explanation: str
    watermark: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("quantity", "rate", "amount", "period_total"):
            _require_decimal(name, getattr(self, name))
        if self.watermark is not None:
            _require_utc("watermark", self.watermark)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record a stage could not accept (topic ``dlq.ingest``): original bytes plus the reason.

    Attributes:
        stage: the stage that rejected it (``ingest``, ``windowing``, ...).
        reason: machine-readable reason code, e.g. ``UNKNOWN_NMI``, ``UNDECODABLE``.
        message: human-readable explanation naming the problem.
        topic / partition / offset: where the original record was read.
        key / value: the original bytes (``None`` when absent).
        headers: the original headers as (name, bytes) pairs.
        failed_at: when it was dead-lettered (UTC).
    """

    stage: str
    reason: str
    message: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = field(default=())
    failed_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class Payment:
    """A payment received for an account (topic ``payments``, key = account), SPEC §5 balance.

    Attributes:
        payment_id: unique id from the payment system; a repeat is a duplicate and changes nothing.
        account: the paying account.
        currency: ISO 4217 code of ``amount``.
        amount: money received, in ``currency`` major units (e.g. 120.50 AUD), > 0.
        received_at: when the money was received (UTC).
        reference: free text from the payment system (bank reference, card auth ...).
    """

    payment_id: str
    account: str
    currency: str
    amount: Decimal
    received_at: datetime
    reference: str = ""

    def __post_init__(self) -> None:
        _require_decimal("amount", self.amount)
        _require_utc("received_at", self.received_at)
        if self.amount <= 0:
            raise ValueError(f"amount must be > 0, got {self.amount}")
        if len(self.currency) != 3 or not self.currency.isalpha() or not self.currency.isupper():
            raise ValueError(f"currency must be an ISO 4217 code, got {self.currency!r}")
        if not self.payment_id or not self.account:
            raise ValueError("payment_id and account must not be empty")


@dataclass(frozen=True, slots=True)
class InvoiceEvent:
    """One ledger change announced on ``invoice.events`` (key = account), published from the outbox.

    ``event_type`` says which optional fields are set:

    - ``LINE_APPENDED``: invoice_id, line_id, line_kind (CHARGE / ADJUSTMENT), service period
      (period_start, period_end exclusive), component_id, band, quantity, unit, amount; for an
      adjustment also adjusts_invoice_id and adjusts_invoice_number.
    - ``INVOICE_FINALIZED``: invoice_id, invoice_number, period_start, period_end, bill_date,
      due_date, previous_balance, charges_total, payments_total, amount_due.
    - ``PAYMENT_APPLIED``: payment_id, amount, balance (account balance after it, this currency).
    - ``INVOICE_HELD``: invoice_id, period_start, period_end, charges_total: a check before finalizing flagged
      it; it waits in REVIEW (issue 17), then an ``INVOICE_FINALIZED`` follows.

    Attributes:
        event_id: unique and deterministic (``line:<line id>``, ``finalized:<invoice id>``,
            ``payment:<payment id>``): consumers deduplicate on it.
        sequence: the outbox sequence number: increasing in commit order per account.
        occurred_at: when the change was committed to the ledger (UTC).
        Amounts are in ``currency`` major units, 6 decimal places; dates are local (account) dates.
    """

    event_id: str
    event_type: str
    sequence: int
    account: str
    currency: str
    occurred_at: datetime
    invoice_id: str | None = None
    invoice_number: str | None = None
    line_id: str | None = None
    line_kind: str | None = None
    period_start: date | None = None
    period_end: date | None = None
    component_id: str | None = None
    band: str | None = None
    quantity: Decimal | None = None
    unit: str | None = None
    amount: Decimal | None = None
    adjusts_invoice_id: str | None = None
    adjusts_invoice_number: str | None = None
    bill_date: date | None = None
    due_date: date | None = None
    previous_balance: Decimal | None = None
    charges_total: Decimal | None = None
    payments_total: Decimal | None = None
    amount_due: Decimal | None = None
    payment_id: str | None = None
    balance: Decimal | None = None

    def __post_init__(self) -> None:
        if self.event_type not in ("LINE_APPENDED", "INVOICE_FINALIZED", "PAYMENT_APPLIED", "INVOICE_HELD"):
            raise ValueError(f"unknown event_type {self.event_type!r}")
        _require_utc("occurred_at", self.occurred_at)


@dataclass(frozen=True, slots=True)
class UsageAlert:
    """A budget crossing of one (account, billing period) (topic ``usage.alerts``, key = account), issue 17 /
    seed 001 "Enable usage alerts and budget tracking". One record per crossing (``pipeline.usage.model.cross``).

    Attributes:
        alert_id: deterministic: sha256 of ``account|period start|kind|crossing`` (consumers dedupe on it).
        period_start / period_end: the billing period, local dates, end exclusive.
        kind: ``ACTUAL`` (cost so far reached the budget) or ``PROJECTED`` (the period's projected cost did).
        crossing: 1 for the first crossing of this period and kind, n for the n-th (after n − 1 drops below).
        currency / budget / amount: the budget and the cost that reached it, currency units (6 dp).
        as_of_day: the last local day with usage data, or ``None``.
        seq: the snapshot sequence (``usage_snapshots.seq``) of the change that crossed.
    """

    alert_id: str
    account: str
    period_start: date
    period_end: date
    kind: str
    crossing: int
    currency: str
    budget: Decimal
    amount: Decimal
    as_of_day: date | None
    seq: int

    def __post_init__(self) -> None:
        _require_decimal("budget", self.budget)
        _require_decimal("amount", self.amount)
        if self.kind not in ("ACTUAL", "PROJECTED"):
            raise ValueError(f"kind must be ACTUAL or PROJECTED, got {self.kind!r}")
        if self.crossing < 1:
            raise ValueError("crossing must be >= 1")


@dataclass(frozen=True, slots=True)
class InvoiceAdjustment:
    """A Bill API command for the invoicing stage (topic ``invoice.adjustments``, key = account), issue 17
    part B: ``LINE`` appends one manual line (a charge, ``amount`` > 0, or a credit, < 0) to an ad-hoc bill;
    ``CLOSE`` finalizes the bill after every line produced before it (one partition per account keeps the
    order).

    Attributes:
        adjustment_id: the ledger line id (``LINE``) or ``close:<bill id>`` (``CLOSE``), derived from the
            caller and its Idempotency-Key: a repeated record changes nothing.
        kind: ``LINE`` | ``CLOSE``.
        bill_id / account / currency: the bill, its account and its currency (ISO 4217).
        amount: major units of ``currency`` with no more decimals than its minor unit; 0 for ``CLOSE``.
        reason: why the line was added (free text, shown on the bill).
        requested_by: who asked: an operator key's name or ``customer:<key id>``.
        idempotency_key: the caller's Idempotency-Key header.
        requested_at: when the API accepted the request (UTC).
    """

    adjustment_id: str
    kind: str
    bill_id: str
    account: str
    currency: str
    amount: Decimal
    reason: str
    requested_by: str
    idempotency_key: str
    requested_at: datetime

    def __post_init__(self) -> None:
        _require_decimal("amount", self.amount)
        _require_utc("requested_at", self.requested_at)
        if self.kind not in ("LINE", "CLOSE"):
            raise ValueError(f"kind must be LINE or CLOSE, got {self.kind!r}")
        if self.kind == "LINE" and self.amount == 0:
            raise ValueError("a manual line must have a non-zero amount")
        if not self.adjustment_id or not self.bill_id or not self.account:
            raise ValueError("adjustment_id, bill_id and account must not be empty")
