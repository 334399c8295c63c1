"""The customer portal and the usage endpoints of the customer API (issue 17, seed 001 "Real-Time Usage
Reporting": period to date, projected bill with its method and confidence, daily trend).

Pure views (no I/O) turn the usage read model (``pipeline.usage.query.UsageSnapshot``) and the ledger's invoice
summaries (``pipeline.invoicing.report.InvoiceSummary``) into JSON-able dicts; ``install(app, ...)`` adds the
routes to the customer app (``pipeline.api.customer.create_app``):

* ``GET /v1/accounts/{account}/usage`` — ``usage_json``; ``GET /v1/accounts/{account}/invoices`` —
  ``invoices_json`` (regular invoices; the Bill API's ad-hoc bills are under ``/bills``).
* ``GET /portal/{account}`` — a server-rendered page (Jinja2, autoescaped; no JavaScript) of the same two
  answers: a daily usage chart (inline SVG), usage and cost so far, the projected bill per method with its
  confidence, past invoices with lines and estimated-read markers (``*`` and the footnote of
  ``report.format_invoice``). Every figure carries a ``data-testid``; the page shows the JSON's strings as they
  are, so page and API agree exactly.
* ``GET /portal/login`` / ``POST /portal/login`` — a form that checks a key and sets it in the ``portal_key``
  cookie (HttpOnly, SameSite=Strict, Path=/portal) for the portal page, which also takes the ``X-API-Key``
  header.

Money: decimal strings in the currency's major units rounded half-up to its minor unit (``money.round_money``;
two decimals before any charge was rated). kWh: the read model's 6-decimal strings. Dates: local ISO dates,
period end exclusive.
"""

# No ``from __future__ import annotations``: FastAPI must see the real annotations of the route closures.
from collections.abc import Awaitable, Callable, Sequence
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from pipeline.api.billstore import account_exists
from pipeline.api.errors import BillApiError
from pipeline.invoicing.report import ESTIMATED_MARK, ESTIMATED_NOTE, InvoiceSummary, invoice_summaries
from pipeline.money import ZERO, round_money
from pipeline.usage import projection as pj
from pipeline.usage.query import UsageSnapshot, snapshot

COOKIE = "portal_key"
TEMPLATES = Path(__file__).resolve().parent / "templates"
_jinja = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))


def money(x: Decimal, currency: str | None) -> str:
    """``x`` (major units) rounded half-up to ``currency``'s minor unit as a string; 2 decimals when the
    currency is not known yet. Raises ``KeyError`` for a currency ``money.MINOR_UNITS`` lacks."""
    if currency is None:
        return str(x.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
    return str(round_money(x, currency.strip()))


def _num(x: Decimal) -> str:
    """A quantity or rate without trailing zeros (as ``report.format_invoice`` prints it)."""
    return f"{x.normalize():f}"


def usage_json(s: UsageSnapshot) -> dict[str, Any]:
    """The usage snapshot as the API answers it (seed 001's real-time usage endpoint, in this API's snake case).

    Shape: ``{account, period_start, period_end, currency, snapshot_seq, period_to_date: {as_of_day,
    days_elapsed, days_remaining, period_days, cost, fixed_cost}, projected_bill: {amount, method, confidence,
    by_method: [{method, amount, confidence}]}, metrics: [{metric, unit, usage_kwh, cost, fixed_cost,
    estimated_share, as_of_day, days_elapsed, bands: {band: kWh}, daily: [{date, usage_kwh, variable_cost}],
    projections: [{method, usage_kwh, confidence, cost}]}]}``.

    ``projected_bill.amount`` is the read model's projected cost (each metric by its most confident method);
    ``by_method`` prices each method alike (``projection.projected_cost``: fixed charges as rated, variable
    cost scaled by projected ÷ actual usage, rounded half-up per metric, a metric without that method at its
    own projected cost) with the lowest confidence of that method over the metrics that have it.
    """
    cur = s.currency
    latest = max((m for m in s.metrics if m.as_of_day), key=lambda m: m.as_of_day or date.min, default=None)
    elapsed = latest.days_elapsed if latest else 0
    period_days = (s.period_end - s.period_start).days
    methods: list[str] = []
    for m in s.metrics:
        methods += [p.method for p in m.projections if p.method not in methods]
    by_method = []
    for method in methods:
        amount, confidence = ZERO, None
        for m in s.metrics:
            p = next((p for p in m.projections if p.method == method), None)
            if p is None:
                amount += m.projected_cost
                continue
            amount += Decimal(money(pj.projected_cost(m.fixed_cost, m.cost - m.fixed_cost, m.usage_kwh, p.usage),
                                    cur))
            confidence = p.confidence if confidence is None else min(confidence, p.confidence)
        by_method.append({"method": method, "amount": money(amount, cur), "confidence": str(confidence)})
    chosen = max(by_method, key=lambda b: Decimal(b["confidence"]), default=None)
    metrics = []
    for m in s.metrics:
        metrics.append({
            "metric": m.metric, "unit": "kWh", "usage_kwh": str(m.usage_kwh), "cost": money(m.cost, cur),
            "fixed_cost": money(m.fixed_cost, cur),
            "estimated_share": None if m.estimated_share is None else str(m.estimated_share),
            "as_of_day": m.as_of_day.isoformat() if m.as_of_day else None, "days_elapsed": m.days_elapsed,
            "bands": {b: str(v) for b, v in sorted(m.bands.items())},
            "daily": [{"date": d.isoformat(), "usage_kwh": str(k), "variable_cost": money(c, cur)}
                      for d, k, c in m.daily],
            "projections": [{"method": p.method, "usage_kwh": str(p.usage), "confidence": str(p.confidence),
                             "cost": money(pj.projected_cost(m.fixed_cost, m.cost - m.fixed_cost, m.usage_kwh,
                                                             p.usage), cur)} for p in m.projections],
        })
    return {
        "account": s.account, "period_start": s.period_start.isoformat(), "period_end": s.period_end.isoformat(),
        "currency": cur, "snapshot_seq": s.seq,
        "period_to_date": {"as_of_day": latest.as_of_day.isoformat() if latest and latest.as_of_day else None,
                           "days_elapsed": elapsed, "days_remaining": period_days - elapsed,
                           "period_days": period_days, "cost": money(s.cost, cur),
                           "fixed_cost": money(sum((m.fixed_cost for m in s.metrics), ZERO), cur)},
        "projected_bill": {"amount": money(s.projected_cost, cur), "estimate": True,
                           "method": chosen["method"] if chosen else None,
                           "confidence": chosen["confidence"] if chosen else None, "by_method": by_method},
        "metrics": metrics,
    }


def invoices_json(invoices: Sequence[InvoiceSummary]) -> list[dict[str, Any]]:
    """Regular invoices (ad-hoc bills, ``bill:...``, left out) as the API answers them: ``[{invoice_id,
    invoice_number, status, period_start, period_end, currency, bill_date, due_date, lines: [{line_kind,
    component_id, component_kind, band, quantity, unit, rate, amount, estimated, mark, service_period_start,
    adjusts_invoice_number}], total, statement: {previous_balance, charges_total, payments_total, amount_due}
    (``None`` until FINALIZED), estimated_note}]`` (``mark``/``estimated_note``: ``report.ESTIMATED_MARK`` /
    ``ESTIMATED_NOTE`` when a line includes estimated or substituted reads, else ``""`` / ``None``)."""
    out = []
    for inv in invoices:
        if inv.invoice_id.startswith("bill:"):
            continue
        cur = inv.currency.strip()
        lines = [{
            "line_kind": ln.line_kind, "component_id": ln.component_id, "component_kind": ln.component_kind,
            "band": ln.band, "quantity": _num(ln.quantity), "unit": ln.unit, "rate": _num(ln.rate),
            "amount": money(ln.amount, cur), "estimated": ln.estimated, "mark": ESTIMATED_MARK if ln.estimated else "",
            "service_period_start": str(ln.service_period_start) if ln.service_period_start else None,
            "adjusts_invoice_number": ln.adjusts_invoice_number} for ln in inv.lines]
        statement = None if inv.amount_due is None else {
            "previous_balance": money(inv.previous_balance or ZERO, cur), "charges_total": money(inv.total, cur),
            "payments_total": money(inv.payments_total or ZERO, cur), "amount_due": money(inv.amount_due, cur)}
        out.append({
            "invoice_id": inv.invoice_id, "invoice_number": inv.invoice_number, "status": inv.status,
            "period_start": str(inv.period_start), "period_end": str(inv.period_end), "currency": cur,
            "bill_date": str(inv.bill_date) if inv.bill_date else None,
            "due_date": str(inv.due_date) if inv.due_date else None,
            "lines": lines, "total": money(inv.total, cur), "statement": statement,
            "estimated_note": ESTIMATED_NOTE if any(ln.estimated for ln in inv.lines) else None})
    return out


BAND_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def chart(metric: dict[str, Any], height: int = 160, bar: int = 14, gap: int = 4) -> dict[str, Any]:
    """Geometry of a metric's SVG charts (pixels): one bar per day scaled to the largest day
    (``bars: [{date, usage_kwh, x, y, w, h}]``), and one horizontal bar split by TOU band
    (``bands: [{band, usage_kwh, x, w, colour}]``, total width ``width``). Negative days draw as 0 high."""
    daily = metric["daily"]
    top = max((Decimal(d["usage_kwh"]) for d in daily), default=ZERO)
    bars = []
    for i, d in enumerate(daily):
        kwh = max(Decimal(d["usage_kwh"]), ZERO)
        h = int((kwh / top * (height - 20)).to_integral_value()) if top > 0 else 0
        bars.append({**d, "x": i * (bar + gap), "y": height - h, "w": bar, "h": h})
    width = max(len(daily) * (bar + gap), 200)
    total = sum((max(Decimal(v), ZERO) for v in metric["bands"].values()), ZERO)
    bands, x = [], 0
    items = list(metric["bands"].items())
    for i, (band, kwh) in enumerate(items):
        w = int((max(Decimal(kwh), ZERO) / total * width).to_integral_value()) if total > 0 else 0
        w = width - x if total > 0 and i == len(items) - 1 else w  # the last band takes the rounding rest
        bands.append({"band": band, "usage_kwh": kwh, "x": x, "w": w, "colour": BAND_COLOURS[i % len(BAND_COLOURS)]})
        x += w
    return {"width": width, "height": height, "bars": bars, "bands": bands}


def render_portal(account: str, usage: dict[str, Any] | None, invoices: list[dict[str, Any]]) -> str:
    """The portal page (``templates/portal.html``) for ``usage`` (``usage_json`` or ``None`` without a
    snapshot) and ``invoices`` (``invoices_json``)."""
    charts = {m["metric"]: chart(m) for m in usage["metrics"]} if usage else {}
    return _jinja.get_template("portal.html").render(account=account, usage=usage, invoices=invoices,
                                                      charts=charts, note=ESTIMATED_NOTE)


def render_message(title: str, message: str, login: bool = False, account: str = "") -> str:
    """An error or login page (``templates/message.html``)."""
    return _jinja.get_template("message.html").render(title=title, message=message, login=login, account=account)


def install(app: FastAPI, run: Callable[[Callable[[Any], Any]], Any],
            authenticate: Callable[[str | None], Awaitable[Any]], caller: Any, errors: dict[int | str, Any]) -> None:
    """Add the usage, invoices and portal routes to the customer ``app``. ``run(work)`` runs ``work(conn)`` in
    one transaction; ``authenticate(key)`` returns the principal of an API key (``may_read(account)``) or
    raises ``BillApiError`` 401; ``caller`` the app's FastAPI dependency for the ``X-API-Key`` header;
    ``errors``: the app's documented error responses."""

    def denied(account: str) -> BillApiError:
        return BillApiError(403, "permission_denied", f"this key may not reach account {account}",
                            {"account": account})

    def load_usage(conn: Any, account: str, as_of: date | None) -> dict[str, Any] | None:
        s = snapshot(conn, account, as_of)
        return usage_json(s) if s is not None else None

    def not_found(account: str) -> BillApiError:
        return BillApiError(404, "not_found", f"account {account} does not exist", {"account": account})

    @app.get("/v1/accounts/{account}/usage", responses=errors,
             summary="Usage so far this billing period, daily series, TOU bands and the projected bill (estimate)")
    async def account_usage(account: str, who: caller,  # type: ignore[valid-type]
                            as_of: Annotated[date | None, Query(description="a local date in the billing period; "
                                                                "default the latest period with usage")] = None
                            ) -> JSONResponse:
        if not who.may_read(account):
            raise denied(account)

        def tx(conn: Any) -> dict[str, Any]:
            if not account_exists(conn, account):
                raise not_found(account)
            got = load_usage(conn, account, as_of)
            if got is None:
                raise BillApiError(404, "not_found", f"no usage of account {account} yet"
                                   + (f" in the period of {as_of}" if as_of else ""), {"account": account})
            return got

        return JSONResponse(await run_in_threadpool(run, tx))

    @app.get("/v1/accounts/{account}/invoices", responses=errors,
             summary="Regular invoices with their lines, statement and estimated-read markers")
    async def account_invoices(account: str, who: caller) -> JSONResponse:  # type: ignore[valid-type]
        if not who.may_read(account):
            raise denied(account)

        def tx(conn: Any) -> list[dict[str, Any]]:
            if not account_exists(conn, account):
                raise not_found(account)
            return invoices_json(invoice_summaries(conn, account))

        return JSONResponse(await run_in_threadpool(run, tx))

    def html(text: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(text, status_code=status, headers={
            "Cache-Control": "no-store", "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
            "form-action 'self'; frame-ancestors 'none'", "X-Content-Type-Options": "nosniff"})

    @app.get("/portal/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_form(account: str = "") -> HTMLResponse:
        return html(render_message("Sign in", "Your account and API key:", login=True, account=account))

    @app.post("/portal/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=10)
        account, key = (form.get("account") or [""])[0].strip(), (form.get("key") or [""])[0].strip()
        try:
            who = await authenticate(key or None)
        except BillApiError as exc:
            return html(render_message("Sign in", exc.message, login=True, account=account), exc.status)
        if not account or not who.may_read(account):
            return html(render_message("Sign in", f"this key may not reach account {account}", login=True,
                                       account=account), 403)
        out = RedirectResponse(f"/portal/{quote(account, safe='')}", status_code=303)
        out.set_cookie(COOKIE, key, httponly=True, samesite="strict", path="/portal",
                       secure=request.url.scheme == "https")
        return out

    @app.get("/portal/{account}", response_class=HTMLResponse, summary="The customer portal page (HTML)",
             description="Authenticated by the X-API-Key header or the portal_key cookie of /portal/login.")
    async def portal(account: str, request: Request) -> HTMLResponse:
        key = request.headers.get("x-api-key") or request.cookies.get(COOKIE)
        try:
            who = await authenticate(key)
            if not who.may_read(account):
                raise denied(account)

            def tx(conn: Any) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
                if not account_exists(conn, account):
                    raise not_found(account)
                return load_usage(conn, account, None), invoices_json(invoice_summaries(conn, account))

            usage, invoices = await run_in_threadpool(run, tx)
        except BillApiError as exc:
            return html(render_message({401: "Sign in", 403: "Not allowed", 404: "Not found"}.get(exc.status, "Error"),
                                       exc.message, login=exc.status == 401, account=account), exc.status)
        return html(render_portal(account, usage, invoices))
