"""Checks before an invoice is finalized (issue 17; seed 001 "Validation — check for anomalies before
finalizing", "don't ignore estimated read flags"), pure.

When an invoice's close time has passed, the invoicing stage gathers ``InvoiceFacts`` from the ledger and
asks ``review_flags``; an invoice with any flag is not finalized but waits in ``REVIEW`` until an operator
approves it (`pipeline invoices approve`, the operator API) or its hold expires (``ReviewPolicy.hold``), and is
then finalized as any other (its number is taken only then, so the series stays gap-free). The rules:

- ``ESTIMATED_SHARE``: more than ``max_estimated_share`` (default 50 %) of the windows billed on the invoice
  carry an estimated or substituted read (MDFF quality E, S or F; NEM12 300 record quality method).
- ``USAGE_FAR_FROM_HISTORY``: the invoice's usage (kWh) is more than ``usage_ratio`` (default 3) times the mean
  of the account's last ``history_invoices`` (default 6) finalized invoices in the currency, or less than that
  mean divided by ``usage_ratio``; only with at least ``min_history`` (default 2) of them and a mean above 0.
- ``NEGATIVE_TOTAL``: the invoice's charges (its lines, prior-period adjustments included) sum below zero.
- ``MISSING_SERVICE_DAYS``: a day of the billing period on which the account had a service point has no
  metered usage at all (no window of any channel), as the rating stage last saw the period.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

CHECKS = ("ESTIMATED_SHARE", "USAGE_FAR_FROM_HISTORY", "NEGATIVE_TOTAL", "MISSING_SERVICE_DAYS")


@dataclass(frozen=True)
class ReviewPolicy:
    """Thresholds of the checks (see the module doc). ``checks``: the codes in force (an empty tuple turns
    review off). ``hold``: how long a flagged invoice waits for an operator before it is finalized anyway
    (``None``: until approved)."""

    checks: tuple[str, ...] = CHECKS
    max_estimated_share: Decimal = Decimal("0.5")
    usage_ratio: Decimal = Decimal(3)
    history_invoices: int = 6
    min_history: int = 2
    hold: timedelta | None = timedelta(hours=72)

    def __post_init__(self) -> None:
        unknown = set(self.checks) - set(CHECKS)
        if unknown:
            raise ValueError(f"unknown review checks {sorted(unknown)}; known: {', '.join(CHECKS)}")
        if not Decimal(0) <= self.max_estimated_share <= Decimal(1):
            raise ValueError(f"max_estimated_share must be within 0..1, got {self.max_estimated_share}")
        if self.usage_ratio <= 1:
            raise ValueError(f"usage_ratio must be above 1, got {self.usage_ratio}")


@dataclass(frozen=True)
class InvoiceFacts:
    """What the checks look at, for one invoice (amounts in its currency's major units, usage in kWh).

    ``windows`` / ``estimated_windows``: windows billed on it and those carrying an E, S or F read;
    ``usage_kwh``: its metered usage; ``history_kwh``: usage of the account's previous finalized invoices,
    newest first; ``service_days`` / ``missing_days``: days with a service point, and those without usage
    (``None`` when the ledger does not say, e.g. telemetry-only accounts)."""

    total: Decimal
    windows: int = 0
    estimated_windows: int = 0
    usage_kwh: Decimal = Decimal(0)
    history_kwh: tuple[Decimal, ...] = ()
    service_days: int | None = None
    missing_days: tuple[str, ...] = ()
    missing_count: int = 0


@dataclass(frozen=True)
class Flag:
    """One reason to hold an invoice: ``code`` (one of ``CHECKS``), a sentence, and the figures behind it."""

    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """``{"code", "message", "details"}`` (the shape of the operator API's errors and the audit rows)."""
        return {"code": self.code, "message": self.message, "details": self.details}


def _pct(x: Decimal) -> str:
    return f"{(x * 100).quantize(Decimal('0.1'), ROUND_HALF_EVEN)} %"


def review_flags(facts: InvoiceFacts, policy: ReviewPolicy) -> list[Flag]:
    """The flags ``facts`` raise under ``policy``, in ``CHECKS`` order; empty: finalize as usual."""
    out: list[Flag] = []
    on = set(policy.checks)
    if "ESTIMATED_SHARE" in on and facts.windows > 0:
        share = Decimal(facts.estimated_windows) / Decimal(facts.windows)
        if share > policy.max_estimated_share:
            out.append(Flag("ESTIMATED_SHARE",
                            f"{_pct(share)} of the usage windows carry estimated or substituted reads "
                            f"(more than {_pct(policy.max_estimated_share)})",
                            {"estimated_windows": facts.estimated_windows, "windows": facts.windows,
                             "share": str(share.quantize(Decimal('0.0001'), ROUND_HALF_EVEN)),
                             "limit": str(policy.max_estimated_share)}))
    history = facts.history_kwh[: policy.history_invoices]
    if "USAGE_FAR_FROM_HISTORY" in on and len(history) >= policy.min_history:
        mean = sum(history, Decimal(0)) / len(history)
        if mean > 0 and (facts.usage_kwh > mean * policy.usage_ratio or facts.usage_kwh < mean / policy.usage_ratio):
            ratio = facts.usage_kwh / mean
            out.append(Flag("USAGE_FAR_FROM_HISTORY",
                            f"usage {facts.usage_kwh.normalize():f} kWh is {ratio.quantize(Decimal('0.01'))}× the mean "
                            f"of the last {len(history)} invoices ({mean.quantize(Decimal('0.001'))} kWh); "
                            f"allowed 1/{policy.usage_ratio}× to {policy.usage_ratio}×",
                            {"usage_kwh": str(facts.usage_kwh),
                             "history_mean_kwh": str(mean.quantize(Decimal("0.001"))),
                             "history_invoices": len(history), "ratio": str(ratio.quantize(Decimal("0.01")))}))
    if "NEGATIVE_TOTAL" in on and facts.total < 0:
        out.append(Flag("NEGATIVE_TOTAL", f"the invoice's charges total {facts.total} (a credit)",
                        {"total": str(facts.total)}))
    if "MISSING_SERVICE_DAYS" in on and facts.service_days is not None and facts.missing_count > 0:
        out.append(Flag("MISSING_SERVICE_DAYS",
                        f"{facts.missing_count} of {facts.service_days} service days have no metered usage "
                        f"(first: {', '.join(facts.missing_days)})",
                        {"missing_days": facts.missing_count, "service_days": facts.service_days,
                         "first_missing": list(facts.missing_days)}))
    return out


def facts_from_lines(total: Decimal, lines: list[tuple[str, str, str, str, Decimal, dict[str, Any]]],
                     history_kwh: tuple[Decimal, ...]) -> InvoiceFacts:
    """``InvoiceFacts`` of an invoice from its own CHARGE lines in append order, each ``(component_id, band,
    kind, unit, quantity, explanation)`` (the rating stage's explanation, SPEC §4).

    The latest line of each (component, band) holds that line's current figures; usage is the largest kWh
    total of one energy component (kinds ``tou`` and ``per_unit``: an energy and a network charge on the same
    kWh count once); windows and estimated windows are summed over the latest lines of that component; the
    days come from the most recent line in kWh that carries them (the latest view of the period)."""
    latest: dict[tuple[str, str], tuple[str, str, Decimal, dict[str, Any]]] = {}
    days: dict[str, Any] | None = None
    for component, band, kind, unit, quantity, exp in lines:
        latest[(component, band)] = (kind, unit, quantity, exp)
        if unit == "kWh" and "service_days" in exp:
            days = exp
    per_component: dict[str, Decimal] = {}
    for (component, _band), (kind, unit, quantity, _exp) in latest.items():
        if kind in ("tou", "per_unit") and unit == "kWh":
            per_component[component] = per_component.get(component, Decimal(0)) + Decimal(quantity)
    main = max(sorted(per_component), key=lambda c: per_component[c], default=None)
    windows = estimated = 0
    for (component, _band), (_kind, _unit, _q, exp) in latest.items():
        if component == main:
            windows += int(exp.get("window_count", 0))
            estimated += int(exp.get("estimated_windows", 0))
    missing: tuple[str, ...] = ()
    service_days = None
    missing_count = 0
    if days is not None:
        service_days = int(days["service_days"])
        missing_count = service_days - int(days["usage_days"])
        missing = tuple(days.get("missing_days", ()))
    return InvoiceFacts(total=total, windows=windows, estimated_windows=estimated,
                        usage_kwh=per_component.get(main, Decimal(0)) if main else Decimal(0),
                        history_kwh=history_kwh, service_days=service_days, missing_days=missing,
                        missing_count=missing_count)
