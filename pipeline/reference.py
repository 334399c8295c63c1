"""Reference data: accounts, service points (NMI → account, effective-dated), plan assignments and
price books. Pure models and lookups; loading from/to Postgres lives in ``pipeline.refstore``.

Effective ranges are local dates ``[effective_from, effective_to)``; ``effective_to`` ``None`` is open.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from pipeline.metrics_catalog import MetricDefinition
from pipeline.rating.pricebook import PriceBook, book_in_effect

BUNDLED_REFERENCE = Path(__file__).resolve().parent / "data" / "reference.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Effective(_Frozen):
    effective_from: date
    effective_to: date | None = None

    def covers(self, day: date) -> bool:
        """Whether ``day`` lies in ``[effective_from, effective_to)``."""
        return self.effective_from <= day and (self.effective_to is None or day < self.effective_to)


class Account(_Frozen):
    """A billing account: its calendar (timezone, holidays) and billing cycle."""

    account: str
    name: str = ""
    timezone: str
    holiday_region: str
    billing_cycle: Literal["MONTHLY", "BIMONTHLY", "QUARTERLY", "ANNUAL"] = "MONTHLY"
    billing_anchor: date
    net_days: int = Field(14, ge=0)
    currency: str | None = None  # ISO 4217; None: whatever its price books bill in (accounts loaded before issue 15)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class ServicePoint(_Effective):
    """NMI → account from ``effective_from`` (move-in) to ``effective_to`` (move-out, exclusive)."""

    nmi: str
    account: str


class TelemetrySubject(_Effective):
    """CloudEvents ``subject`` → account from ``effective_from`` to ``effective_to`` (exclusive), UTC dates:
    the telemetry counterpart of a service point (issue 6). Its days count as service days (SPEC §4)."""

    subject: str
    account: str


class PlanAssignment(_Effective):
    """Account → price book over an effective range (SPEC §4). ``service``: the service the book prices
    (``PriceBook.service``; multi-service accounts, seed 001): an account has one plan per service at a time
    (electricity, gas, water, a flat service), and any number of ``contribution`` plans (voluntary add-ons)."""

    account: str
    price_book_id: str
    service: str = "electricity"

    @model_serializer(mode="wrap")
    def _omit_default_service(self, handler: SerializerFunctionWrapHandler) -> Any:
        """``service`` is left out while it is ``electricity``: an electricity plan serializes (audit rows, the
        operator API) exactly as before multi-service accounts."""
        data = handler(self)
        if isinstance(data, dict) and data.get("service") == "electricity":
            data.pop("service")
        return data


class GasConversion(_Effective):
    """The gas conversion factor of an account's gas meter from ``effective_from`` (local dates, seed 001):
    gas is metered as a volume (m³) and billed as energy (MJ).

    ``heating_value``: MJ per standard m³ (the gas's higher heating value, published by the distributor or
    AEMO for the heating value zone, typically 37–40); ``pressure_correction``: the dimensionless pressure
    (and temperature/altitude) correction factor of the meter's delivery pressure (about 0.98–1.02). The
    energy is ``m³ × heating_value × pressure_correction`` (``pipeline.rating.services.gas_energy_mj``)."""

    account: str
    heating_value: Decimal = Field(gt=0, max_digits=12, decimal_places=6)
    pressure_correction: Decimal = Field(gt=0, max_digits=12, decimal_places=6)

    @property
    def factor(self) -> Decimal:
        """MJ per m³ of metered volume: ``heating_value × pressure_correction`` (exact)."""
        return self.heating_value * self.pressure_correction


class ReferenceFile(_Frozen):
    """The reference-data file loaded by ``pipeline load reference`` (see ``pipeline/data/reference.json``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    accounts: tuple[Account, ...]
    service_points: tuple[ServicePoint, ...]
    price_books: tuple[PriceBook, ...] = ()
    plan_assignments: tuple[PlanAssignment, ...]
    metric_definitions: tuple[MetricDefinition, ...] = ()
    telemetry_subjects: tuple[TelemetrySubject, ...] = ()
    gas_conversions: tuple[GasConversion, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _plan_services(cls, data: Any) -> Any:
        """A plan assignment that does not name its service takes the service of its book when the book is in the
        file (seed 001: a gas book's plan is a gas plan)."""
        if not isinstance(data, dict) or not isinstance(data.get("plan_assignments"), list | tuple):
            return data
        services = {b.get("id"): b.get("service", "electricity") for b in data.get("price_books", ())
                    if isinstance(b, dict)}
        plans = [{**pa, "service": services[pa.get("price_book_id")]}
                 if isinstance(pa, dict) and "service" not in pa and pa.get("price_book_id") in services else pa
                 for pa in data["plan_assignments"]]
        return {**data, "plan_assignments": plans}

    @model_validator(mode="after")
    def _check(self) -> ReferenceFile:
        names = {a.account for a in self.accounts}
        for gc in self.gas_conversions:
            if gc.account not in names:
                raise ValueError(f"gas conversion names unknown account {gc.account}")
        for sp in self.service_points:
            if sp.account not in names:
                raise ValueError(f"service point {sp.nmi} names unknown account {sp.account}")
        for ts in self.telemetry_subjects:
            if ts.account not in names:
                raise ValueError(f"telemetry subject {ts.subject} names unknown account {ts.account}")
        for attr in ("metric", "event_type"):
            values = [getattr(m, attr) for m in self.metric_definitions]
            if len(set(values)) != len(values):
                raise ValueError(f"metric definitions repeat a {attr}: {sorted(values)}")
        services = {b.id: b.service for b in self.price_books}
        for pa in self.plan_assignments:
            if pa.account not in names:
                raise ValueError(f"plan assignment names unknown account {pa.account}")
            if services.get(pa.price_book_id, pa.service) != pa.service:
                raise ValueError(f"plan assignment of {pa.account} to {pa.price_book_id} names service {pa.service!r}, "
                                 f"but the book prices {services[pa.price_book_id]!r}")
        return self

    @classmethod
    def read(cls, path: Path) -> ReferenceFile:
        """Parse and validate a reference file; raises ``pydantic.ValidationError``."""
        return cls.model_validate(json.loads(path.read_text()))


@dataclass(frozen=True)
class ReferenceData:
    """An immutable snapshot of the reference data with the lookups the stages need."""

    accounts: dict[str, Account]
    service_points: dict[str, tuple[ServicePoint, ...]]  # nmi → sorted by effective_from
    plans: dict[str, tuple[PlanAssignment, ...]]  # account → sorted by effective_from
    price_books: tuple[PriceBook, ...]
    by_account: dict[str, tuple[ServicePoint, ...]] = field(default_factory=dict)  # account → its service points
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # derived values of this snapshot
    metrics: dict[str, MetricDefinition] = field(default_factory=dict)  # metric → definition (telemetry)
    event_types: dict[str, MetricDefinition] = field(default_factory=dict)  # CloudEvents type → definition
    subjects: dict[str, tuple[TelemetrySubject, ...]] = field(default_factory=dict)  # subject → by effective_from
    subjects_by_account: dict[str, tuple[TelemetrySubject, ...]] = field(default_factory=dict)
    gas: dict[str, tuple[GasConversion, ...]] = field(default_factory=dict)  # account → by effective_from

    def books_by_version(self) -> dict[tuple[str, int], PriceBook]:
        """(id, version) → price book, computed once per snapshot."""
        if "books" not in self.memo:
            self.memo["books"] = {(b.id, b.version): b for b in self.price_books}
        return self.memo["books"]

    @classmethod
    def build(
        cls,
        accounts: list[Account] | tuple[Account, ...],
        service_points: list[ServicePoint] | tuple[ServicePoint, ...],
        plans: list[PlanAssignment] | tuple[PlanAssignment, ...],
        price_books: list[PriceBook] | tuple[PriceBook, ...],
        metric_definitions: list[MetricDefinition] | tuple[MetricDefinition, ...] = (),
        telemetry_subjects: list[TelemetrySubject] | tuple[TelemetrySubject, ...] = (),
        gas_conversions: list[GasConversion] | tuple[GasConversion, ...] = (),
    ) -> ReferenceData:
        sps: dict[str, list[ServicePoint]] = {}
        for sp in service_points:
            sps.setdefault(sp.nmi, []).append(sp)
        pas: dict[str, list[PlanAssignment]] = {}
        for pa in plans:
            pas.setdefault(pa.account, []).append(pa)
        by_account: dict[str, list[ServicePoint]] = {}
        for sp in service_points:
            by_account.setdefault(sp.account, []).append(sp)
        return cls(
            {a.account: a for a in accounts},
            {k: tuple(sorted(v, key=lambda s: s.effective_from)) for k, v in sps.items()},
            {k: tuple(sorted(v, key=lambda s: s.effective_from)) for k, v in pas.items()},
            tuple(price_books),
            {k: tuple(v) for k, v in by_account.items()},
            metrics={m.metric: m for m in metric_definitions},
            event_types={m.event_type: m for m in metric_definitions},
            subjects=_grouped(telemetry_subjects, lambda s: s.subject),
            subjects_by_account=_grouped(telemetry_subjects, lambda s: s.account),
            gas=_grouped(gas_conversions, lambda g: g.account),
        )

    @classmethod
    def from_file(cls, ref: ReferenceFile) -> ReferenceData:
        return cls.build(ref.accounts, ref.service_points, ref.plan_assignments, ref.price_books,
                         ref.metric_definitions, ref.telemetry_subjects, ref.gas_conversions)

    def account_of(self, nmi: str, day: date) -> str | None:
        """The account served by ``nmi`` on local ``day`` (SPEC §1), or ``None``."""
        points = self.service_points.get(nmi, ())
        i = bisect_right([p.effective_from for p in points], day) - 1
        if i >= 0 and points[i].covers(day):
            return points[i].account
        return None

    def nearest_account(self, nmi: str, day: date) -> str | None:
        """The account of the service point of ``nmi`` nearest to ``day`` (by days to its range), or
        ``None`` when the NMI has no service point at all. Names whose data a reading outside every
        service period would have been, for the record that refuses it (SPEC §3)."""
        return _nearest(self.service_points.get(nmi, ()), day)

    def nearest_subject_account(self, subject: str, day: date) -> str | None:
        """As ``nearest_account``, for a telemetry ``subject`` (UTC ``day``)."""
        return _nearest(self.subjects.get(subject, ()), day)

    def account_of_subject(self, subject: str, day: date) -> str | None:
        """The account a telemetry ``subject`` belongs to on UTC ``day`` (issue 6), or ``None``."""
        for ts in self.subjects.get(subject, ()):
            if ts.covers(day):
                return ts.account
        return None

    def service_ranges(self, account: str) -> list[ServicePoint | TelemetrySubject]:
        """Every service point and telemetry subject (over time) of ``account``: the days it was in
        service (fixed daily charges, proration; SPEC §4)."""
        return [*self.by_account.get(account, ()), *self.subjects_by_account.get(account, ())]

    def plan_on(self, account: str, day: date, service: str = "electricity") -> PlanAssignment | None:
        """The plan assignment of ``account`` for ``service`` in force on ``day``."""
        for pa in self.plans.get(account, ()):
            if pa.covers(day) and pa.service == service:
                return pa
        return None

    def book_on(self, account: str, day: date, service: str = "electricity") -> PriceBook | None:
        """The price book version billing ``account``'s ``service`` on ``day`` (plan, then the latest version)."""
        plan = self.plan_on(account, day, service)
        if plan is None:
            return None
        return book_in_effect(list(self.price_books), plan.price_book_id, day)

    def books_on(self, account: str, day: date) -> list[PriceBook]:
        """Every price book version billing ``account`` on ``day``: one per service plan in force (electricity,
        gas, water, flat services) and one per voluntary contribution opted into (seed 001), in plan order."""
        books = list(self.price_books)
        found = (book_in_effect(books, pa.price_book_id, day) for pa in self.plans.get(account, ()) if pa.covers(day))
        return [b for b in found if b is not None]

    def book_for(self, account: str, day: date, metric: str) -> PriceBook | None:
        """The book that prices ``metric`` for ``account`` on ``day``: among ``books_on``, the first with a usage
        component of the metric; else the electricity plan's book (a metric no plan prices still opens the
        period there, as before multi-service accounts); ``None`` without either."""
        books = self.books_on(account, day)
        for b in books:
            if b.usage_components(metric):
                return b
        return self.book_on(account, day)

    def gas_conversion_on(self, account: str, day: date) -> GasConversion | None:
        """The gas conversion factor of ``account`` in force on local ``day`` (seed 001), or ``None``."""
        for gc in self.gas.get(account, ()):
            if gc.covers(day):
                return gc
        return None


def _nearest(ranges: tuple[ServicePoint | TelemetrySubject, ...], day: date) -> str | None:
    """The account of the range of ``ranges`` nearest to ``day`` (0 days when it covers it; ties: the
    earlier range), or ``None`` when there is none."""
    def distance(r: ServicePoint | TelemetrySubject) -> int:
        if day < r.effective_from:
            return (r.effective_from - day).days
        if r.effective_to is not None and day >= r.effective_to:
            return (day - r.effective_to).days + 1
        return 0

    return min(ranges, key=distance).account if ranges else None


def _grouped(items: Iterable[Any], key: Callable[[Any], str]) -> dict[str, tuple]:
    out: dict[str, list[Any]] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return {k: tuple(sorted(v, key=lambda s: s.effective_from)) for k, v in out.items()}
