"""Price books: immutable, versioned, effective-dated tariffs, validated on load (SPEC §4).

A price book version is a pydantic model; its canonical JSON and SHA-256 identify its content,
so publishing a different body under an existing (id, version) can be refused. Rates are
``Decimal`` in the book's currency per unit, GST-exclusive; floats are rejected.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from functools import cached_property, lru_cache
from itertools import pairwise
from typing import Annotated, Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from pipeline.money import MINOR_UNITS

DayType = Literal["weekday", "weekend", "holiday"]


def _no_float(value: Any) -> Any:
    if isinstance(value, float):
        raise ValueError(f"rates must be decimal strings, not float ({value!r})")
    return value


Rate = Annotated[Decimal, BeforeValidator(_no_float), Field(ge=0)]


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    total = int(hours) * 60 + int(minutes)
    if not (0 <= total <= 1440) or int(minutes) >= 60:
        raise ValueError(f"time {hhmm!r} is not HH:MM between 00:00 and 24:00")
    return total


class _Frozen(BaseModel):
    """Immutable, no unknown fields. ``_LATER_FIELDS``: fields added after books were first published; left
    out of the serialized body while they hold their default, so a book written before they existed keeps
    its canonical JSON and content hash (``PriceBook.content_sha256``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    _LATER_FIELDS: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_later_defaults(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for name in self._LATER_FIELDS:
            if isinstance(data, dict) and getattr(self, name) == type(self).model_fields[name].default:
                data.pop(name, None)
        return data


class TimeRange(_Frozen):
    """Local wall-clock times ``[start, end)`` (``HH:MM``, ``24:00`` allowed as end) on the given day
    types, in the given season: ``months`` (1–12; empty = all year), e.g. summer = (11, 12, 1, 2, 3)."""

    day_types: tuple[DayType, ...]
    start: str
    end: str
    months: tuple[int, ...] = ()
    season: str = ""  # a label for explanations, e.g. "summer"

    @field_validator("months")
    @classmethod
    def _months(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 1 <= m <= 12 for m in v):
            raise ValueError(f"months must be 1..12, got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> TimeRange:
        if _minutes(self.start) >= _minutes(self.end):
            raise ValueError(f"time range {self.start}-{self.end} is empty or wraps midnight: split it in two")
        return self

    @cached_property
    def _bounds(self) -> tuple[int, int]:
        return _minutes(self.start), _minutes(self.end)

    def contains(self, day_type: str, minute_of_day: int, month: int | None = None) -> bool:
        """Whether a moment of that day type, local minute and month lies in this range."""
        lo, hi = self._bounds
        in_season = not self.months or month is None or month in self.months
        return in_season and day_type in self.day_types and lo <= minute_of_day < hi


class Band(_Frozen):
    """A TOU band: a rate per unit and the times it applies (empty for the default band). In a tiered TOU
    component the band has no ``rate`` of its own: each tier gives one per band."""

    band: str
    rate: Rate | None = None
    times: tuple[TimeRange, ...] = ()


class TouTier(_Frozen):
    """One usage tier of a tiered TOU component: ``up_to`` units of the period's total quantity over all
    bands (``None`` = no limit), and the rate of each band inside the tier (band name → rate)."""

    up_to: Rate | None
    rates: dict[str, Rate]


class TouComponent(_Frozen):
    """Time-of-use energy charge: quantity per band × the band's rate.

    With ``tiers`` the rates also depend on the period's cumulative usage (an inclining or declining block
    tariff priced by time of use): the tier limits apply to the period's total quantity over all bands
    (prorated, like ``tiered``, by the fraction of the period billed on this version), each tier gives one
    rate per band, and each tier's quantity is allocated to the bands in proportion to each band's share
    of the period's total (``rate.tou_tier_allocation``). ``tier_mode`` as for ``tiered``: ``graduated``
    (each slice at its tier's rates) or ``volume`` (all of it at the rates of the tier the total falls in).
    One charge line per band and tier: band ``"<band>, tier <n>"``.
    """

    _LATER_FIELDS: ClassVar[tuple[str, ...]] = ("tiers", "tier_mode")

    id: str
    kind: Literal["tou"]
    metric: str
    unit: str = "kWh"
    default_band: str
    bands: tuple[Band, ...]
    tiers: tuple[TouTier, ...] = ()
    tier_mode: Literal["graduated", "volume"] = "graduated"

    @model_validator(mode="after")
    def _check(self) -> TouComponent:
        names = [b.band for b in self.bands]
        if self.default_band not in names:
            raise ValueError(f"default band {self.default_band!r} is not among the bands {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate band names in {names}")
        if any("|" in n or ", tier " in n for n in names):
            raise ValueError(f"band names may not contain '|' or ', tier ': {names}")
        if not self.tiers:
            missing = [b.band for b in self.bands if b.rate is None]
            if missing:
                raise ValueError(f"TOU component {self.id!r}: bands {missing} have no rate (a rate per band, or tiers "
                                 "with a rate per band in each tier)")
            return self
        with_rate = [b.band for b in self.bands if b.rate is not None]
        if with_rate:
            raise ValueError(f"TOU component {self.id!r} is tiered: bands {with_rate} must not have a rate of their "
                             "own (give it in each tier's rates)")
        _check_limits([t.up_to for t in self.tiers], "tiers")
        for i, tier in enumerate(self.tiers, start=1):
            if set(tier.rates) != set(names):
                raise ValueError(f"TOU component {self.id!r} tier {i} gives rates for {sorted(tier.rates)}, expected "
                                 f"one for each band {sorted(names)}")
        return self

    def rate_of(self, band: str, tier: int | None = None) -> Decimal:
        """The rate of ``band`` (in ``tier``, 1-based, for a tiered component); ``KeyError`` for an unknown
        band, tier, or a tier missing / given where there is none."""
        if tier is not None:
            if not 1 <= tier <= len(self.tiers):
                raise KeyError(f"{self.id} has no tier {tier}")
            return self.tiers[tier - 1].rates[band]
        for b in self.bands:
            if b.band == band:
                if b.rate is None:
                    raise KeyError(f"{self.id} is tiered: the rate of band {band!r} depends on the tier")
                return b.rate
        raise KeyError(band)


class PerUnitComponent(_Frozen):
    """Flat price per unit of a metric."""

    id: str
    kind: Literal["per_unit"]
    metric: str
    unit: str = "kWh"
    rate: Rate


class FixedDailyComponent(_Frozen):
    """A fixed charge per service day (prorated by service days, SPEC §4)."""

    id: str
    kind: Literal["fixed_daily"]
    unit: str = "day"
    rate: Rate


class FeedInComponent(_Frozen):
    """A credit per unit exported (export channels); billed as a negative amount."""

    id: str
    kind: Literal["feed_in"]
    metric: str
    unit: str = "kWh"
    rate: Rate


class Tier(_Frozen):
    """One tier: ``rate`` applies up to ``up_to`` units of period-cumulative quantity (``None`` = no limit)."""

    up_to: Rate | None
    rate: Rate


class TieredComponent(_Frozen):
    """Tiered price on the period's cumulative quantity of a metric (SPEC §4).

    ``graduated``: each tier's slice at its own rate (one line per tier). ``volume``: all of the
    quantity at the rate of the tier the total falls in. Thresholds are prorated by the fraction of
    the period billed on this price book version (plan switches, move-in).
    """

    id: str
    kind: Literal["tiered"]
    mode: Literal["graduated", "volume"]
    metric: str
    unit: str = "kWh"
    tiers: tuple[Tier, ...]

    @model_validator(mode="after")
    def _check(self) -> TieredComponent:
        _check_limits([t.up_to for t in self.tiers], "tiers")
        return self


def _check_limits(limits: list[Decimal | None], what: str) -> None:
    """Tier or block limits: increasing, positive, the last one unlimited (``None``); ``ValueError`` otherwise."""
    if not limits or limits[-1] is not None or any(x is None for x in limits[:-1]):
        raise ValueError(f"{what} need increasing limits and an unlimited last tier (up_to null)")
    finite = limits[:-1]
    if any(a >= b for a, b in pairwise(finite)) or any(x <= 0 for x in finite):  # type: ignore[operator]
        raise ValueError(f"{'tier' if what == 'tiers' else 'block'} limits must increase from above 0: {limits}")


class PackageComponent(_Frozen):
    """Block pricing: every started package of ``package_size`` units costs ``package_price``."""

    id: str
    kind: Literal["package"]
    metric: str
    unit: str = "kWh"
    package_size: Rate
    package_price: Rate

    @field_validator("package_size")
    @classmethod
    def _positive(cls, v: Decimal) -> Decimal:
        if v <= 0:
            raise ValueError("package_size must be positive")
        return v


class FixedPeriodComponent(_Frozen):
    """A fixed charge per billing period, prorated by service days / period days (SPEC §4)."""

    id: str
    kind: Literal["fixed_period"]
    unit: str = "period"
    rate: Rate


class SurchargeComponent(_Frozen):
    """A surcharge: ``rate`` per unit of ``metric``, or ``rate_percent`` of the named components."""

    id: str
    kind: Literal["surcharge"]
    metric: str | None = None
    unit: str = "kWh"
    rate: Rate | None = None
    rate_percent: Rate | None = None
    applies_to: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> SurchargeComponent:
        per_unit = self.metric is not None and self.rate is not None
        percent = self.rate_percent is not None and bool(self.applies_to)
        if per_unit == percent:
            raise ValueError(
                "a surcharge is either per unit (metric + rate) or a percentage (rate_percent + applies_to)"
            )
        return self


class MinimumComponent(_Frozen):
    """A minimum charge: tops the named components up to ``amount`` per period (prorated)."""

    id: str
    kind: Literal["minimum"]
    amount: Rate
    applies_to: tuple[str, ...]


DEMAND_INTERVALS = (5, 10, 15, 30)
"""Demand intervals a price book may state, in minutes: divisors of 30, so that intervals aligned to the
epoch are aligned to every whole- or half-hour time zone's local time and to NEM time."""


class DemandBlock(_Frozen):
    """One block of a block demand rate: ``rate`` per kW for the demand up to ``up_to`` kW (``None`` = the rest)."""

    up_to: Rate | None
    rate: Rate


class DemandComponent(_Frozen):
    """A demand charge on the period's peak demand (SPEC §4), optionally counting only intervals in ``band``
    of the TOU component ``tou_component``.

    Demand is measured per meter (NMI) on its **total** import: the kWh of every channel of the metric (E1,
    E2 ...) in one demand interval of ``interval_minutes`` are added, and kW = that total ÷ the interval's
    hours; the period's demand is the highest such value. ``interval_minutes`` (5, 10, 15 or 30; default 30,
    the NEM's half hour) is the tariff's demand interval: finer windows are added up to it (block average);
    windows longer than it (or not dividing it) cannot measure it and are refused by the rating stage
    (``DEMAND_INTERVAL_FINER_THAN_DATA``).

    Charged either at one ``rate`` per kW, or in ``blocks`` (e.g. the first 10 kW at one rate, the rest at
    another: one line per block, band ``"block <n>"``). A meter's demand goes through the blocks on its own;
    an account with several meters pays the sum.
    """

    _LATER_FIELDS: ClassVar[tuple[str, ...]] = ("interval_minutes", "blocks")

    id: str
    kind: Literal["demand"]
    metric: str
    unit: str = "kW"
    rate: Rate | None = None
    blocks: tuple[DemandBlock, ...] = ()
    interval_minutes: int = 30
    tou_component: str | None = None
    band: str | None = None

    @model_validator(mode="after")
    def _check(self) -> DemandComponent:
        if (self.tou_component is None) != (self.band is None):
            raise ValueError("a demand charge limited to a TOU band needs both tou_component and band")
        if (self.rate is None) == (not self.blocks):
            raise ValueError(f"demand {self.id!r} needs either a rate (per kW) or blocks (kW limits with a rate each), "
                             "not both")
        if self.blocks:
            _check_limits([b.up_to for b in self.blocks], "blocks")
        if self.interval_minutes not in DEMAND_INTERVALS:
            raise ValueError(f"demand {self.id!r} has interval_minutes {self.interval_minutes}; the demand interval "
                             f"must be one of {', '.join(map(str, DEMAND_INTERVALS))} minutes")
        return self

    @property
    def interval_ms(self) -> int:
        return self.interval_minutes * 60_000


class ContributionComponent(_Frozen):
    """A voluntary contribution (seed 001: "voluntary contributions" on the periodic bill): an opt-in fixed
    add-on such as green power or a community donation, ``amount`` per bill (``per: "bill"``, prorated by
    service days / period days like ``fixed_period``, SPEC §4) or per service day (``per: "day"``, like
    ``fixed_daily``). Only in a book of service ``contribution``; the customer opts in and out with a plan
    assignment of that book (``pipeline plans assign`` / ``plans end``), audited like every plan change."""

    id: str
    kind: Literal["contribution"]
    per: Literal["bill", "day"]
    amount: Rate
    description: str = ""

    @property
    def unit(self) -> str:
        return "period" if self.per == "bill" else "day"


class TaxComponent(_Frozen):
    """A tax as a percentage of the rounded totals of named components (e.g. GST 10%)."""

    id: str
    kind: Literal["tax"]
    rate_percent: Rate
    applies_to: tuple[str, ...]


Component = Annotated[
    TouComponent | PerUnitComponent | FixedDailyComponent | FeedInComponent | TaxComponent | TieredComponent
    | PackageComponent | FixedPeriodComponent | SurchargeComponent | MinimumComponent | DemandComponent
    | ContributionComponent,
    Field(discriminator="kind"),
]
USAGE_KINDS = ("tou", "per_unit", "feed_in", "tiered", "package", "surcharge", "demand")
SERVICE_UNITS: dict[str, tuple[str, ...]] = {"electricity": ("kWh", "kW", "kVArh"), "gas": ("MJ",), "water": ("kL",)}
"""Units a metered service's usage components price in (multi-service accounts, seed 001): gas is billed in
MJ (a volume in m³ is converted with the account's gas conversion factor, ``pipeline.rating.services``),
water in kL. Other services (``contribution``, or a flat service such as ``sewerage``) have no usage."""
SERVICE_NAME = r"^[a-z][a-z0-9_]{0,31}$"


class PriceBook(_Frozen):
    """One immutable price book version.

    Attributes:
        id / version: identity; (id, version) never changes once published.
        currency: ISO 4217 code of every rate and amount.
        timezone: IANA zone in which TOU times are read (e.g. ``Etc/GMT-10`` for AEST all year).
        holiday_region: ``CC`` or ``CC-SUBDIV`` for the ``holidays`` package (e.g. ``AU-ACT``), or ``None``
            (JSON ``null``): no public holidays, every day is a weekday or a weekend day (a TOU band may then
            not name the ``holiday`` day type). Must be given (``null`` included).
        effective_from / effective_to: local dates, ``effective_to`` exclusive (``None`` = open).
        service: what the book prices on a multi-service account (seed 001): ``electricity`` (the default,
            left out of the canonical JSON so older books keep their hash), ``gas`` (usage in MJ), ``water``
            (kL), ``contribution`` (only ``contribution`` components: a voluntary add-on), or any other
            lower-case name for a flat service (fixed components only, no usage). An account has at most one
            plan per service at a time (several contributions at once); its invoice shows one section per
            service.
        components: the charge components, ids unique.
    Raises ``pydantic.ValidationError`` on any inconsistency.
    """

    _LATER_FIELDS: ClassVar[tuple[str, ...]] = ("service",)

    id: str
    version: int = Field(ge=1)
    name: str = ""
    service: str = Field("electricity", pattern=SERVICE_NAME)
    currency: str
    timezone: str
    holiday_region: str | None
    effective_from: date
    effective_to: date | None = None
    source: str = ""
    components: tuple[Component, ...]

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str) -> str:
        if v not in MINOR_UNITS:
            raise ValueError(f"unknown currency {v!r}")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {v!r}") from exc
        return v

    @model_validator(mode="after")
    def _check(self) -> PriceBook:
        ids = [c.id for c in self.components]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate component ids in {ids}")
        for c in self.components:
            if isinstance(c, DemandComponent) and c.tou_component is not None:
                tou = next((t for t in self.components if t.id == c.tou_component), None)
                if not isinstance(tou, TouComponent) or c.band not in [b.band for b in tou.bands]:
                    raise ValueError(f"demand {c.id!r}: {c.tou_component!r} has no TOU band {c.band!r}")
                # every band boundary on a demand interval boundary: an interval is then wholly in or out
                edges = sorted({_minutes(x) for b in tou.bands for t in b.times for x in (t.start, t.end)})
                off = [m for m in edges if m % c.interval_minutes]
                if off:
                    raise ValueError(f"demand {c.id!r} ({c.interval_minutes}-minute intervals) is limited to band "
                                     f"{c.band!r}, but {c.tou_component!r} changes band at "
                                     f"{', '.join(f'{m // 60:02d}:{m % 60:02d}' for m in off)}, inside an interval")
            if isinstance(c, TouComponent) and self.holiday_region is None:
                named = sorted({b.band for b in c.bands for t in b.times if "holiday" in t.day_types})
                if named:
                    raise ValueError(f"TOU component {c.id!r}: bands {named} name the day type 'holiday', but the book "
                                     "has no public holidays (holiday_region null): use weekday and weekend only")
            if isinstance(c, TaxComponent | SurchargeComponent | MinimumComponent):
                missing = set(c.applies_to) - set(ids)
                if missing:
                    raise ValueError(f"tax {c.id!r} applies to unknown components {sorted(missing)}")
        if self.effective_to is not None and self.effective_to <= self.effective_from:
            raise ValueError("effective_to must be after effective_from")
        self._check_service()
        if self.holiday_region is not None:
            _holiday_calendar(self.holiday_region)  # raises for an unknown region
        return self

    def _check_service(self) -> None:
        """A book's components fit its service (seed 001): contributions only in a ``contribution`` book and
        nothing else there; usage of a metered service in its units (gas in MJ, water in kL); a flat service
        (any other name) has no usage components."""
        contributions = [c.id for c in self.components if isinstance(c, ContributionComponent)]
        if self.service == "contribution":
            others = [c.id for c in self.components if not isinstance(c, ContributionComponent)]
            if others or not contributions:
                raise ValueError(f"a contribution book has contribution components only: {others or 'none given'}")
            return
        if contributions:
            raise ValueError(f"contribution components {contributions} belong in a book of service 'contribution', "
                             f"not {self.service!r}")
        usage = [c for c in self.components if c.kind in USAGE_KINDS and getattr(c, "metric", None)]
        units = SERVICE_UNITS.get(self.service)
        if units is None and usage:
            raise ValueError(f"{self.service!r} is a flat service (not one of {sorted(SERVICE_UNITS)}): it has fixed "
                             f"charges only, not usage components {[c.id for c in usage]}")
        wrong = [f"{c.id} ({c.unit})" for c in usage if units is not None and c.unit not in units]
        if wrong and self.service != "electricity":  # electricity books predate the check: any unit stays valid
            raise ValueError(f"{self.service} usage is priced in {' or '.join(units or ())}: {', '.join(wrong)}")

    def canonical_json(self) -> str:
        """Deterministic JSON of the whole version (sorted keys, decimals as strings)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def content_sha256(self) -> str:
        """SHA-256 of ``canonical_json()``: equal bodies ⇔ equal hashes."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def covers(self, day: date) -> bool:
        """Whether ``day`` (local) lies in ``[effective_from, effective_to)``."""
        return self.effective_from <= day and (self.effective_to is None or day < self.effective_to)

    def usage_components(self, metric: str) -> list[TouComponent | PerUnitComponent | FeedInComponent]:
        """The components that price ``metric``."""
        return [
            c for c in self.components
            if c.kind in USAGE_KINDS and getattr(c, "metric", None) == metric  # percentage surcharges have none
        ]

    def day_type(self, day: date) -> str:
        """``holiday`` (public holiday in the book's region; never without one), ``weekend`` or ``weekday``."""
        if self.holiday_region is not None and day in _holiday_calendar(self.holiday_region):
            return "holiday"
        return "weekend" if day.weekday() >= 5 else "weekday"

    def band_of(self, component: TouComponent, at_utc: datetime) -> str:
        """The TOU band of the moment ``at_utc``: season (month) × day type (weekday, weekend, public
        holiday) × local time, all read in the book's timezone (DST-safe); the default band otherwise."""
        local = at_utc.astimezone(ZoneInfo(self.timezone))
        minute = local.hour * 60 + local.minute
        day_type = self.day_type(local.date())
        for band in component.bands:
            if any(t.contains(day_type, minute, local.month) for t in band.times):
                return band.band
        return component.default_band


@lru_cache(maxsize=64)
def _holiday_calendar(region: str) -> holidays.HolidayBase:
    country, _, subdiv = region.partition("-")
    try:
        return holidays.country_holidays(country, subdiv=subdiv or None)
    except NotImplementedError as exc:
        raise ValueError(f"unknown holiday region {region!r} ({exc}); use CC or CC-SUBDIV of the holidays package "
                         "(e.g. AU-ACT), or null for a book without public holidays") from exc


def unmeasurable_demand(book: PriceBook, window_minutes: Callable[[str], int]) -> list[str]:
    """Why ``book``'s demand components cannot be measured from the windows the deployment makes: one
    sentence per component whose ``interval_minutes`` is not a whole number of windows of its metric
    (``window_minutes(metric)``, e.g. ``PIPELINE_WINDOW_MINUTES_ENERGY``): a demand interval finer than the
    data. Empty when every demand can be measured. Pure; the CLI refuses to publish such a book."""
    out = []
    for c in book.components:
        if isinstance(c, DemandComponent):
            w = window_minutes(c.metric)
            if c.interval_minutes % w:
                out.append(f"{book.id} v{book.version} demand {c.id!r} is measured over {c.interval_minutes}-minute "
                           f"intervals, but {c.metric} is windowed in {w}-minute windows: a demand interval must be a "
                           f"whole number of windows (windows of {c.interval_minutes} minutes or a divisor of it)")
    return out


def book_in_effect(books: list[PriceBook], book_id: str, day: date) -> PriceBook | None:
    """The highest version of ``book_id`` whose effective range covers ``day`` (SPEC §4: a later
    version covering the same dates supersedes the earlier one)."""
    candidates = [b for b in books if b.id == book_id and b.covers(day)]
    return max(candidates, key=lambda b: b.version) if candidates else None
