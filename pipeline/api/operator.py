"""The operator HTTP API (issue 15): accounts, meters, telemetry subjects and plans as operations.

A thin skin over ``pipeline.accounts``: every write builds the same ``rules`` operations as the
``pipeline accounts|meters|plans`` commands and runs them through ``store.run_operations`` (checked,
all-or-nothing, one audit row per change, ``changed_by`` = the API key's name, ``source`` = ``api``).
OpenAPI at ``/openapi.json``, Swagger UI at ``/docs``. Run it with ``pipeline serve operator``.

Endpoints (dates ``YYYY-MM-DD``; every write takes ``?dry_run=true`` to check without changing anything):

* ``GET /v1/accounts`` — every account; ``GET /v1/accounts/{account}`` — one, with its meters, subjects and
  plans over time, its move-out (``service_end``) and its change history (who, when, what, before/after).
* ``POST /v1/accounts`` — create (``AccountIn``) → 201.
* ``POST /v1/accounts/{account}/meters`` — attach an NMI or telemetry subject from a date (move-in) → 201.
* ``POST /v1/meters/{nmi}/move-out``, ``POST /v1/subjects/{subject}/detach`` — end the service on ``on``
  (the first day without service) → 200.
* ``POST /v1/accounts/{account}/plans`` — assign or switch the plan from a date → 201.
* ``POST /v1/imports`` — a CSV file (``text/csv``, the ``pipeline accounts import`` format), all or nothing.

Authentication: header ``X-API-Key`` must be one of ``Settings.operator_api_keys`` (not the ingestion keys):
missing or unknown → 401; a ``viewer`` key on a write → 403. Idempotency as the ingestion API: a write with
an ``Idempotency-Key`` header is answered once and replayed (``Idempotent-Replayed: true``); an operation
that is already in place (the same account, the same range) changes nothing anyway.

Errors: ``{"error": {"code", "field", "message"}}`` (the shape of ``pipeline.ingest.http``); a refused
operation is 422 with the first problem in ``error`` and every problem in ``problems`` (``line``, ``code``,
``field``, ``message``); 404 for an unknown account on a read.
"""

# No ``from __future__ import annotations``: FastAPI must see the real annotations of the route closures.
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from datetime import date
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.accounts import imports, rules
from pipeline.config import Settings
from pipeline.ingest.http import ApiError, ErrorBody, IdempotencyCache

MAX_CSV_BYTES = 16 * 1024 * 1024


class AccountIn(BaseModel):
    """A new billing account (``CreateAccount``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "account": "ACC-2001", "timezone": "Australia/Sydney", "billing_cycle": "MONTHLY",
        "billing_anchor": "2025-07-01", "currency": "AUD", "net_days": 14, "holiday_region": "AU-NSW"}]})

    account: str = Field(min_length=1, max_length=64)
    timezone: str = Field(description="IANA time zone of its billing periods")
    billing_cycle: Literal["MONTHLY", "BIMONTHLY", "QUARTERLY", "ANNUAL"] = "MONTHLY"
    billing_anchor: date = Field(description="billing periods count from this date")
    currency: str = Field("AUD", description="ISO 4217; its plans' price books must bill in it")
    net_days: int = Field(14, ge=0, description="days from bill date to due date")
    holiday_region: str = Field("AU-NSW", description="CC or CC-SUBDIV for the holidays package")
    name: str = ""


class AttachIn(BaseModel):
    """Move-in: an NMI or a telemetry subject (exactly one) from ``effective_from`` to ``effective_to``
    (exclusive) or open."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "nmi": "NEM1201002", "effective_from": "2025-07-01"}]})

    nmi: str | None = None
    subject: str | None = None
    effective_from: date
    effective_to: date | None = None


class EndIn(BaseModel):
    """The first day without service (move-out / detach): no daily charge from this day on."""

    model_config = ConfigDict(extra="forbid")

    on: date


class PlanIn(BaseModel):
    """Assign or switch the plan: price book ``price_book_id`` from ``effective_from`` (an open plan before
    it ends there)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "price_book_id": "ACTEWAGL-HOME", "effective_from": "2025-08-15"}]})

    price_book_id: str
    effective_from: date
    effective_to: date | None = None


class GasFactorIn(BaseModel):
    """The account's gas conversion factor from ``effective_from`` (seed 001): MJ = m³ × ``heating_value``
    (MJ/m³) × ``pressure_correction``; decimal strings."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "effective_from": "2025-08-01", "heating_value": "38.5", "pressure_correction": "0.987"}]})

    effective_from: date
    heating_value: Decimal
    pressure_correction: Decimal
    effective_to: date | None = None


class ChangeOut(BaseModel):
    """One change made (or, on a dry run, that would be made)."""

    operation: str
    entity: str
    entity_key: str
    effective: date | None
    before: dict[str, Any] | None
    after: dict[str, Any]


class ApproveIn(BaseModel):
    """Body of an approval (optional): why, kept in the audit."""

    note: str = Field("", max_length=2000)


class OperationResult(BaseModel):
    """What a write did: ``applied`` false on a dry run or when nothing needed doing."""

    applied: bool
    dry_run: bool
    changes: list[ChangeOut]


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in (
        (401, "missing or unknown operator API key"), (403, "a viewer key cannot change reference data"),
        (409, "a request with this Idempotency-Key is still in flight"),
        (422, "refused: every problem in `problems`, the first in `error`"))
}


def create_app(settings: Settings, database_url: str | None = None,
               run: Callable[[Callable[[Any], Any]], Any] | None = None) -> FastAPI:
    """The operator API (see the module docstring). ``run(work)`` runs ``work(conn)`` in one transaction
    (default: ``postgres.with_reconnect`` on ``database_url`` or ``settings.database_url``)."""
    if run is None:
        from pipeline.runtime import postgres

        url = database_url or settings.database_url

        def run(work: Callable[[Any], Any]) -> Any:
            return postgres.with_reconnect(url, work, give_up_s=30.0)

    keys = [(k.key.get_secret_value().encode(), k.name, k.role) for k in settings.operator_api_keys]
    cache = IdempotencyCache(settings.http_idempotency_ttl_s, clock=time.monotonic)
    app = FastAPI(title="Metering pipeline: operator API", version="1",
                  description="Accounts, meters and plans as effective-dated operations; every change is audited. "
                  "Send ?dry_run=true to check without changing anything, and an Idempotency-Key to retry safely.")
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                                  description="one of PIPELINE_OPERATOR_API_KEYS")

    async def caller(key: Annotated[str | None, Security(api_key_header)]) -> tuple[str, str]:
        if not key:
            raise ApiError(401, "MISSING_API_KEY", "X-API-Key", "send an operator API key in the X-API-Key header",
                           {"WWW-Authenticate": 'ApiKey header="X-API-Key"'})
        for known, name, role in keys:
            if hmac.compare_digest(known, key.encode()):
                return name, role
        raise ApiError(401, "INVALID_API_KEY", "X-API-Key", "the API key is not an operator API key",
                       {"WWW-Authenticate": 'ApiKey header="X-API-Key"'})

    async def operator(who: Annotated[tuple[str, str], Depends(caller)]) -> str:
        if who[1] != "operator":
            raise ApiError(403, "FORBIDDEN", "X-API-Key", f"key {who[0]!r} has role {who[1]}: only an operator key "
                                                          "may change reference data")
        return who[0]

    Operator = Annotated[str, Depends(operator)]
    Reader = Annotated[tuple[str, str], Depends(caller)]
    DryRun = Annotated[bool, Query(description="check and report, change nothing")]
    IdemKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                           description="the same key and body within the horizon returns the first "
                                           "answer and changes nothing")]

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        response = exc.response()
        problems = getattr(exc, "problems", None)
        if problems is not None:
            body = json.loads(response.body)
            body["problems"] = problems
            return JSONResponse(body, status_code=exc.status, headers=exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p not in ("header", "body", "query", "path")]
        return ApiError(422, "INVALID_FIELD", ".".join(loc) or None, err.get("msg", "invalid request")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
        return ApiError(exc.status_code, code, None, str(exc.detail), dict(exc.headers or {})).response()

    async def execute(request: Request, who: str, idem: str | None, ops: list[tuple[int, rules.Operation]],
                      dry_run: bool, status: int, labels: dict[int, str] | None = None,
                      parse_problems: list[tuple[int, rules.Problem]] | None = None) -> Response:
        from pipeline.accounts.store import run_operations

        key = idem.strip('"') if idem else None
        cache_key = (who, request.url.path, key or "")
        if key is not None:
            body = await request.body()
            fingerprint = hashlib.sha256(str(request.url.query).encode() + b"\0" + body).hexdigest()
            stored = cache.begin(cache_key, fingerprint)
            if stored is not None:
                return Response(stored.body, stored.status, media_type="application/json",
                                headers={"Idempotent-Replayed": "true"})
        try:
            outcome = await run_in_threadpool(run, lambda c: run_operations(
                c, ops, who, "api", dry_run or bool(parse_problems)))
            problems = sorted([*(parse_problems or []), *outcome.problems], key=lambda lp: lp[0])
            if problems:
                raise _refused(problems, labels)
        except BaseException:
            if key is not None:
                cache.abandon(cache_key)
            raise
        out = OperationResult(applied=outcome.applied, dry_run=dry_run, changes=[
            ChangeOut(operation=c.operation, entity=c.entity, entity_key=c.entity_key, effective=c.effective,
                      before=c.audit()[5], after=c.audit()[6]) for _, c in outcome.changes]).model_dump_json().encode()
        code = status if outcome.applied else 200
        if key is not None:
            cache.finish(cache_key, code, out)
        return Response(out, code, media_type="application/json")

    @app.get("/v1/accounts", summary="Every account", responses=_ERRORS)
    async def list_accounts(_who: Reader) -> list[dict[str, Any]]:
        from pipeline.refstore import read_reference

        ref = await run_in_threadpool(run, read_reference)
        return [a.model_dump(mode="json") for a in sorted(ref.accounts.values(), key=lambda a: a.account)]

    @app.get("/v1/accounts/{account}", summary="One account with its meters, plans and change history",
             responses={**_ERRORS, 404: {"model": ErrorBody, "description": "no such account"}})
    async def show_account(account: str, _who: Reader) -> dict[str, Any]:
        from pipeline.accounts.store import history, service_end
        from pipeline.refstore import read_reference

        ref, rows, end = await run_in_threadpool(run, lambda c: (read_reference(c), history(c, account=account),
                                                                 service_end(c, account)))
        a = ref.accounts.get(account)
        if a is None:
            raise ApiError(404, "UNKNOWN_ACCOUNT", "account", f"account {account} does not exist")
        return {
            "account": a.model_dump(mode="json"), "service_end": end.isoformat() if end else None,
            "service_points": [sp.model_dump(mode="json") for sp in ref.by_account.get(account, ())],
            "telemetry_subjects": [t.model_dump(mode="json") for t in ref.subjects_by_account.get(account, ())],
            "plan_assignments": [p.model_dump(mode="json") for p in ref.plans.get(account, ())],
            "gas_conversions": [g.model_dump(mode="json") for g in ref.gas.get(account, ())],
            "history": [r.as_json() for r in rows],
        }

    @app.post("/v1/accounts", status_code=201, response_model=OperationResult, responses=_ERRORS,
              summary="Create an account")
    async def create_account(body: AccountIn, request: Request, who: Operator, dry_run: DryRun = False,
                             idempotency_key: IdemKey = None) -> Response:
        op = rules.CreateAccount(body.account, body.timezone, body.billing_cycle, body.billing_anchor,
                                 body.currency.upper(), body.net_days, body.holiday_region, body.name)
        return await execute(request, who, idempotency_key, [(1, op)], dry_run, 201)

    @app.post("/v1/accounts/{account}/meters", status_code=201, response_model=OperationResult, responses=_ERRORS,
              summary="Move-in: attach an NMI or a telemetry subject from a date")
    async def attach(account: str, body: AttachIn, request: Request, who: Operator, dry_run: DryRun = False,
                     idempotency_key: IdemKey = None) -> Response:
        if (body.nmi is None) == (body.subject is None):
            raise ApiError(422, "INVALID_FIELD", "nmi", "give exactly one of nmi and subject")
        op: rules.Operation = (
            rules.AttachMeter(account, body.nmi, body.effective_from, body.effective_to) if body.nmi is not None
            else rules.AttachSubject(account, body.subject or "", body.effective_from, body.effective_to))
        return await execute(request, who, idempotency_key, [(1, op)], dry_run, 201)

    @app.post("/v1/meters/{nmi}/move-out", response_model=OperationResult, responses=_ERRORS,
              summary="Move-out: the NMI's service ends (daily charges stop; the last bill closes at move-out "
                      "+ the close delay once the account has no service left)")
    async def move_out(nmi: str, body: EndIn, request: Request, who: Operator, dry_run: DryRun = False,
                       idempotency_key: IdemKey = None) -> Response:
        return await execute(request, who, idempotency_key, [(1, rules.MoveOut(nmi, body.on))], dry_run, 200)

    @app.post("/v1/subjects/{subject}/detach", response_model=OperationResult, responses=_ERRORS,
              summary="A telemetry subject stops billing its account")
    async def detach(subject: str, body: EndIn, request: Request, who: Operator, dry_run: DryRun = False,
                     idempotency_key: IdemKey = None) -> Response:
        return await execute(request, who, idempotency_key, [(1, rules.DetachSubject(subject, body.on))], dry_run,
                             200)

    @app.post("/v1/accounts/{account}/plans", status_code=201, response_model=OperationResult, responses=_ERRORS,
              summary="Assign or switch the plan from a date")
    async def assign_plan(account: str, body: PlanIn, request: Request, who: Operator, dry_run: DryRun = False,
                          idempotency_key: IdemKey = None) -> Response:
        op = rules.AssignPlan(account, body.price_book_id, body.effective_from, body.effective_to)
        return await execute(request, who, idempotency_key, [(1, op)], dry_run, 201)

    @app.post("/v1/accounts/{account}/plans/{price_book_id}/end", response_model=OperationResult,
              responses=_ERRORS, summary="End a plan from a date (a voluntary contribution's opt-out)")
    async def end_plan(account: str, price_book_id: str, body: EndIn, request: Request, who: Operator,
                       dry_run: DryRun = False, idempotency_key: IdemKey = None) -> Response:
        op = rules.EndPlan(account, price_book_id, body.on)
        return await execute(request, who, idempotency_key, [(1, op)], dry_run, 200)

    @app.post("/v1/accounts/{account}/gas-conversion", status_code=201, response_model=OperationResult,
              responses=_ERRORS, summary="Set the gas conversion factor (heating value, pressure correction) from "
                                         "a date")
    async def gas_conversion(account: str, body: GasFactorIn, request: Request, who: Operator,
                             dry_run: DryRun = False, idempotency_key: IdemKey = None) -> Response:
        op = rules.SetGasConversion(account, body.effective_from, body.heating_value, body.pressure_correction,
                                    body.effective_to)
        return await execute(request, who, idempotency_key, [(1, op)], dry_run, 201)

    @app.post("/v1/imports", status_code=201, response_model=OperationResult, responses=_ERRORS,
              summary="Bulk import a CSV (the `pipeline accounts import` format), all or nothing",
              openapi_extra={"requestBody": {"required": True, "content": {"text/csv": {"schema": {
                  "type": "string"}}}}})
    async def import_csv(request: Request, who: Operator, dry_run: DryRun = False,
                         idempotency_key: IdemKey = None) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "text/csv":
            raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type", "send the file as text/csv")
        body = await request.body()
        if len(body) > MAX_CSV_BYTES:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", None, f"the body is {len(body)} bytes; at most {MAX_CSV_BYTES}")
        try:
            parsed = imports.parse_csv(body.decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise ApiError(400, "NOT_UTF8", None, f"the CSV is not UTF-8: {exc}") from exc
        return await execute(request, who, idempotency_key, parsed.ops, dry_run, 201, parsed.labels, parsed.problems)

    @app.get("/v1/invoices/review", summary="Invoices held in REVIEW by the checks before finalizing",
             responses=_ERRORS)
    async def invoices_in_review(_who: Reader, account: str | None = None) -> list[dict[str, Any]]:
        from pipeline.invoicing.review import held

        return [h.as_json() for h in await run_in_threadpool(run, lambda c: held(c, account))]

    @app.post("/v1/invoices/{invoice_id}/approve", summary="Approve an invoice held in REVIEW (finalized within "
              "seconds by the invoicing stage)",
              responses={**_ERRORS, 404: {"model": ErrorBody, "description": "no such invoice"},
                         409: {"model": ErrorBody, "description": "the invoice is not in REVIEW"}})
    async def approve_invoice(invoice_id: str, who: Operator, body: ApproveIn | None = None) -> dict[str, Any]:
        from pipeline.invoicing.review import ReviewError, approve, decisions

        note = body.note if body else ""
        try:
            h, audit = await run_in_threadpool(
                run, lambda c: (approve(c, invoice_id, who, "api", note), decisions(c, invoice_id)))
        except ReviewError as exc:
            raise ApiError(404 if exc.code == "UNKNOWN_INVOICE" else 409, exc.code, "invoice_id", exc.message) from exc
        return {**h.as_json(), "decisions": audit}

    @app.get("/v1/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _refused(problems: list[tuple[int, rules.Problem]], labels: dict[int, str] | None) -> ApiError:
    """422 naming the first problem, with every problem (and its CSV line when there is one)."""
    first = problems[0][1]
    where = f"{labels[problems[0][0]]}: " if labels and problems[0][0] in labels else ""
    err = ApiError(422, first.code, first.field, where + first.message)
    err.problems = [{"line": line if labels else None, "code": p.code, "field": p.field, "message": p.message}
                    for line, p in problems]  # type: ignore[attr-defined]
    return err
