"""The Bill API (issue 17 part B, seed 003): ad-hoc bills, manual line items, balances across currencies.

Run it with ``pipeline serve customer`` (port ``PIPELINE_CUSTOMER_HTTP_PORT``, default 8082). OpenAPI at
``/openapi.json``, Swagger UI at ``/docs``.

Endpoints (amounts are decimal strings in the bill's currency, major units; dates ``YYYY-MM-DD``):

* ``POST /v1/bills`` — create an ad-hoc bill for an account, currency and service period → 201 (an OPEN
  invoice of the existing lifecycle, with no close time).
* ``GET /v1/bills/{bill_id}`` — the bill with its ledger lines and statement.
* ``POST /v1/bills/{bill_id}/line-items`` — a manual ``charge`` or ``credit`` with a reason → 201 once the
  line is in the ledger. It travels as an ``InvoiceAdjustment`` on ``invoice.adjustments`` and the invoicing
  stage appends it exactly once: the line id derives from the caller and the Idempotency-Key.
* ``POST /v1/bills/{bill_id}/close`` — a CLOSE record on the same topic (after every line sent before it);
  the invoicing stage finalizes the bill: next gap-free invoice number, frozen statement → 200.
* ``GET /v1/accounts/{account}/bills``; ``GET /v1/accounts/{account}/balance?currency=EUR&on=YYYY-MM-DD`` —
  the balance per currency and its total in ``currency`` at that day's loaded reference rates.
* ``GET /v1/accounts/{account}/usage`` (usage so far, daily series, TOU bands, projected bill per method with
  its confidence) and ``GET /v1/accounts/{account}/invoices`` (regular invoices with lines, statement and
  estimated-read markers); ``GET /portal/{account}``: the same as an HTML page (``pipeline.api.portal``).
* Operators only: ``POST /v1/accounts/{account}/api-keys`` (a customer key, shown once), ``POST
  /v1/exchange-rates`` (an ECB reference-rate CSV, ``text/csv``).

Authentication (header ``X-API-Key``): an operator key of ``PIPELINE_OPERATOR_API_KEYS`` (``operator``: all;
``viewer``: reads) or a customer key (``pipeline keys create ACCOUNT``; stored hashed), which reaches its own
account only and cannot grant credits. No or unknown key → 401; another account's data → 403.

Idempotency: a POST with ``Idempotency-Key`` is recorded in Postgres per caller; the same key and body gets
the first answer again (``Idempotent-Replayed: true``), the same key with another body gets 409.

Errors (every one, validation included): ``{"code", "message", "details"}`` (``pipeline.api.errors``).
"""

# No ``from __future__ import annotations``: FastAPI must see the real annotations of the route closures.
import hmac
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Header, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline import fx
from pipeline.api import billstore as store
from pipeline.api import idempotency, portal
from pipeline.api.errors import BillApiError, ErrorBody, from_http, from_validation
from pipeline.codec import Codec
from pipeline.config import Settings
from pipeline.invoicing.bills import bill_id_of, bill_invoice_id, manual_line_id
from pipeline.invoicing.report import format_invoice, invoice_summaries
from pipeline.money import MINOR_UNITS, round_money
from pipeline.records import InvoiceAdjustment

log = logging.getLogger(__name__)
MAX_CSV_BYTES = 4 * 1024 * 1024


class Producer(Protocol):
    """What the API needs of a Kafka producer (``runtime.kafka.IdempotentProducer``)."""

    def send_and_wait(self, records: Any, timeout_s: float = 30.0) -> None: ...


@dataclass(frozen=True, slots=True)
class Principal:
    """Who calls: ``name`` (operator key name, or ``customer:<key id>``), ``role`` (operator | viewer |
    customer) and, for a customer key, its ``account``."""

    name: str
    role: str
    account: str | None = None

    def may_read(self, account: str) -> bool:
        """Operator and viewer keys read every account; a customer key its own."""
        return self.role != "customer" or self.account == account

    def may_write(self, account: str) -> bool:
        """Operator keys write everywhere, customer keys on their own account, viewer keys nowhere."""
        return self.role == "operator" or (self.role == "customer" and self.account == account)


class BillIn(BaseModel):
    """A new ad-hoc bill: account, currency (ISO 4217, one the ledger knows) and service period (end exclusive)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "account": "ACC-1001", "currency": "AUD", "period_start": "2025-12-01", "period_end": "2026-01-01"}]})

    account: str = Field(min_length=1, max_length=64)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    period_start: date
    period_end: date


class LineItemIn(BaseModel):
    """A manual line: a ``charge`` (adds) or a ``credit`` (subtracts) of ``amount`` (a positive decimal string,
    at most the currency's minor-unit decimals) with a ``reason``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "type": "charge", "amount": "12.50", "reason": "meter test visit"}]})

    type: Literal["charge", "credit"]
    amount: str = Field(pattern=r"^[0-9]+(\.[0-9]+)?$", max_length=24, description="major units, > 0")
    reason: str = Field(min_length=1, max_length=500)


class KeyIn(BaseModel):
    """A name for the new customer key (shown in listings, never secret)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=100)


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in (
        (401, "no or unknown API key"), (403, "another account, or an operator-only action"),
        (404, "no such bill or account"), (409, "Idempotency-Key reused with another body, or the bill is closed"),
        (422, "invalid request"), (503, "Kafka unavailable"), (504, "not in the ledger yet; retry with the same key"))
}


def create_app(settings: Settings, producer: Producer, codec: Codec, database_url: str | None = None,
               run: Callable[[Callable[[Any], Any]], Any] | None = None, produce_attempts: int = 3,
               ledger_wait_s: float | None = None) -> FastAPI:
    """The Bill API (module docstring). ``producer`` sends to ``invoice.adjustments`` (a failed or unknown
    delivery is retried up to ``produce_attempts`` times: the record's id makes a repeat harmless);
    ``run(work)`` runs ``work(conn)`` in one transaction (default ``postgres.with_reconnect``);
    ``ledger_wait_s``: how long a write waits for the invoicing stage to apply it (default
    ``settings.customer_ledger_wait_s``)."""
    if run is None:
        from pipeline.runtime import postgres

        url = database_url or settings.database_url

        def run(work: Callable[[Any], Any]) -> Any:
            return postgres.with_reconnect(url, work, give_up_s=30.0)

    from pipeline.runtime.kafka import KafkaIOError, OutRecord
    from pipeline.topology import Topics

    topic = Topics(settings).invoice_adjustments
    wait_s = settings.customer_ledger_wait_s if ledger_wait_s is None else ledger_wait_s
    operator_keys = [(k.key.get_secret_value().encode(), k.name, k.role) for k in settings.operator_api_keys]
    app = FastAPI(title="Metering pipeline: Bill API", version="1",
                  description="Ad-hoc bills with manual charges and credits, written exactly once to the append-only "
                  "ledger through Kafka; balances across currencies at ECB reference rates. Send an Idempotency-Key "
                  "on every POST to retry safely. Errors: {code, message, details}.")
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                                  description="a customer key (`pipeline keys create ACCOUNT`) or an operator key")

    def _auth_error(code_msg: str) -> BillApiError:
        return BillApiError(401, "unauthenticated", code_msg, {"header": "X-API-Key"},
                            {"WWW-Authenticate": 'ApiKey header="X-API-Key"'})

    async def caller(key: Annotated[str | None, Security(api_key_header)]) -> Principal:
        if not key:
            raise _auth_error("send an API key in the X-API-Key header")
        for known, name, role in operator_keys:
            if hmac.compare_digest(known, key.encode()):
                return Principal(name, role)
        found = await run_in_threadpool(run, lambda c: store.customer_of_key(c, key))
        if found is None:
            raise _auth_error("the API key is not known (or was revoked)")
        return Principal(f"customer:{found[0]}", "customer", found[1])

    async def operator(who: Annotated[Principal, Depends(caller)]) -> Principal:
        if who.role != "operator":
            raise BillApiError(403, "permission_denied", f"{who.name} ({who.role}) may not do this: operator keys only",
                               {"role": who.role})
        return who

    Caller = Annotated[Principal, Depends(caller)]
    Operator = Annotated[Principal, Depends(operator)]
    IdemKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                           description="the same key and body returns the first answer; the same "
                                           "key with another body is refused (409)")]

    def _denied(who: Principal, account: str) -> BillApiError:
        return BillApiError(403, "permission_denied", f"this key may not reach account {account}",
                            {"account": account})

    @app.exception_handler(BillApiError)
    async def _bill_error(_request: Request, exc: BillApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        err = from_validation(list(exc.errors()))
        return JSONResponse(jsonable_encoder(err.body()), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = from_http(exc.status_code, exc.detail)
        return JSONResponse(err.body(), status_code=err.status, headers=dict(exc.headers or {}))

    async def idempotent(request: Request, who: Principal, key: str | None, body: Any,
                         work: Callable[[str], tuple[int, Any]]) -> JSONResponse:
        """Run ``work(key)`` (key: the Idempotency-Key, or a fresh one) once per (caller, key, request)."""
        if key is None:
            status, out = await run_in_threadpool(work, uuid.uuid4().hex)
            return JSONResponse(jsonable_encoder(out), status_code=status)
        sha = idempotency.fingerprint(request.method, request.url.path, body)
        stored = await run_in_threadpool(run, lambda c: store.idempotency_begin(
            c, who.name, key, request.method, request.url.path, sha))
        decision = idempotency.decide(stored, sha)
        if decision == "conflict":
            raise BillApiError(409, "idempotency_conflict", "this Idempotency-Key was used for another request",
                               {"idempotency_key": key})
        if decision == "replay":
            assert stored is not None
            return JSONResponse(stored.response, status_code=stored.status or 200,
                                headers={"Idempotent-Replayed": "true"})
        status, out = await run_in_threadpool(work, key)
        payload = jsonable_encoder(out)
        await run_in_threadpool(run, lambda c: store.idempotency_finish(c, who.name, key, status, payload))
        return JSONResponse(payload, status_code=status)

    def produce(adj: InvoiceAdjustment) -> None:
        """Send ``adj`` and wait for the broker's ack; retried: a record sent twice is applied once."""
        rec = OutRecord(topic, adj.account.encode(), codec.encode(adj))
        last: Exception | None = None
        for attempt in range(1, produce_attempts + 1):
            try:
                producer.send_and_wait([rec], timeout_s=15.0)
                return
            except KafkaIOError as exc:
                last = exc
                log.warning("invoice.adjustments produce attempt %d failed: %s", attempt, exc)
        raise BillApiError(503, "unavailable", f"Kafka did not take the request: {last}",
                           {"adjustment_id": adj.adjustment_id})

    def wait_until(check: Callable[[Any], Any], what: dict[str, Any]) -> None:
        deadline = time.monotonic() + wait_s
        while not run(check):
            if time.monotonic() >= deadline:
                raise BillApiError(504, "deadline_exceeded", "accepted, not in the ledger yet: retry with the same "
                                   "Idempotency-Key", what)
            time.sleep(0.1)

    def bill_view(conn: Any, bill_id: str) -> dict[str, Any]:
        head = store.bill_head(conn, bill_id)
        if head is None:
            raise BillApiError(404, "not_found", f"bill {bill_id} does not exist", {"bill_id": bill_id})
        st = store.bill_statement(conn, head)
        summary = [s for s in invoice_summaries(conn, head.account, head.period_start)
                   if s.invoice_id == bill_invoice_id(bill_id)]
        cur = head.currency.strip()
        lines = store.bill_lines(conn, bill_id)
        return {
            "bill_id": head.bill_id, "account": head.account, "currency": cur, "status": head.status,
            "period_start": head.period_start, "period_end": head.period_end, "invoice_number": head.invoice_number,
            "bill_date": head.bill_date, "due_date": head.due_date, "created_by": head.created_by,
            "lines": [{**ln, "amount": str(round_money(ln["amount"], cur))} for ln in lines],
            "total": str(round_money(sum((ln["amount"] for ln in lines), Decimal(0)), cur)),
            "statement": {"previous_balance": str(round_money(st.previous_balance, cur)),
                          "charges_total": str(round_money(st.charges_total, cur)),
                          "payments_total": str(round_money(st.payments_total, cur)),
                          "amount_due": str(round_money(st.amount_due, cur))},
            "text": format_invoice(summary[0]) if summary else None,  # as `pipeline invoice show` prints it
        }

    def readable_bill(who: Principal, bill_id: str, write: bool = False) -> store.BillHead:
        head = run(lambda c: store.bill_head(c, bill_id))
        if head is None:
            raise BillApiError(404, "not_found", f"bill {bill_id} does not exist", {"bill_id": bill_id})
        if not (who.may_write(head.account) if write else who.may_read(head.account)):
            raise _denied(who, head.account)
        return head

    # --- bills ------------------------------------------------------------------------------------------
    @app.post("/v1/bills", status_code=201, responses=_ERRORS, summary="Create an ad-hoc bill")
    async def create_bill(body: BillIn, request: Request, who: Caller,
                          idempotency_key: IdemKey = None) -> JSONResponse:
        if not who.may_write(body.account):
            raise _denied(who, body.account)
        if body.currency not in MINOR_UNITS:
            raise BillApiError(422, "invalid_argument", f"currency {body.currency} is not billed here",
                               {"field": "currency", "known": sorted(MINOR_UNITS)})
        if body.period_end <= body.period_start:
            raise BillApiError(422, "invalid_argument", "period_end must be after period_start",
                               {"field": "period_end"})

        def work(key: str) -> tuple[int, Any]:
            bill_id = bill_id_of(who.name, key)

            def tx(conn: Any) -> dict[str, Any]:
                if not store.account_exists(conn, body.account):
                    raise BillApiError(404, "not_found", f"account {body.account} does not exist",
                                       {"account": body.account})
                store.create_bill(conn, bill_id, body.account, body.currency, (body.period_start, body.period_end),
                                  who.name)
                return bill_view(conn, bill_id)

            return 201, run(tx)

        return await idempotent(request, who, idempotency_key, body.model_dump(mode="json"), work)

    @app.get("/v1/bills/{bill_id}", responses=_ERRORS, summary="A bill with its lines and statement")
    async def get_bill(bill_id: str, who: Caller) -> JSONResponse:
        await run_in_threadpool(readable_bill, who, bill_id)
        return JSONResponse(jsonable_encoder(await run_in_threadpool(run, lambda c: bill_view(c, bill_id))))

    @app.post("/v1/bills/{bill_id}/line-items", status_code=201, responses=_ERRORS,
              summary="Add a manual charge or credit (exactly once in the ledger, through invoice.adjustments)")
    async def add_line(bill_id: str, body: LineItemIn, request: Request, who: Caller,
                       idempotency_key: IdemKey = None) -> JSONResponse:
        head = await run_in_threadpool(readable_bill, who, bill_id, True)
        if body.type == "credit" and who.role != "operator":
            raise BillApiError(403, "permission_denied", "only an operator key may grant a credit", {"type": "credit"})
        cur = head.currency.strip()
        try:
            magnitude = Decimal(body.amount)
        except InvalidOperation:  # the pattern admits only digits: cannot happen, kept for a clear error
            raise BillApiError(422, "invalid_argument", "amount is not a number", {"field": "amount"}) from None
        if magnitude == 0:
            raise BillApiError(422, "invalid_argument", "amount must be greater than zero", {"field": "amount"})
        if round_money(magnitude, cur) != magnitude:
            raise BillApiError(422, "invalid_argument", f"amount has more decimals than {cur} allows",
                               {"field": "amount", "minor_unit_digits": MINOR_UNITS[cur]})
        amount = magnitude if body.type == "charge" else -magnitude

        def work(key: str) -> tuple[int, Any]:
            if head.status != "OPEN":
                raise BillApiError(409, "failed_precondition", f"bill {bill_id} is closed", {"bill_id": bill_id})
            line_id = manual_line_id(who.name, key)
            adj = InvoiceAdjustment(line_id, "LINE", bill_id, head.account, cur, amount, body.reason, who.name, key,
                                    datetime.now(UTC).replace(microsecond=0))
            produce(adj)

            def landed(c: Any) -> bool | str:  # the line, or the bill closed before the line's record
                if store.line_present(c, line_id):
                    return True
                return (store.bill_head(c, bill_id) or head).status != "OPEN" and "closed"

            wait_until(landed, {"line_id": line_id, "bill_id": bill_id})
            if not run(lambda c: store.line_present(c, line_id)):  # dead-lettered (BILL_CLOSED) by invoicing
                raise BillApiError(409, "failed_precondition", f"bill {bill_id} was closed before this line",
                                   {"bill_id": bill_id, "line_id": line_id})
            return 201, {"line_id": line_id, "bill_id": bill_id, "type": body.type, "amount": str(amount),
                         "currency": cur, "reason": body.reason, "requested_by": who.name, "idempotency_key": key}

        return await idempotent(request, who, idempotency_key, {"bill_id": bill_id, **body.model_dump()}, work)

    @app.post("/v1/bills/{bill_id}/close", responses=_ERRORS,
              summary="Close the bill: finalized after every line sent before, with the next invoice number")
    async def close_bill(bill_id: str, request: Request, who: Caller, idempotency_key: IdemKey = None) -> JSONResponse:
        head = await run_in_threadpool(readable_bill, who, bill_id, True)

        def work(key: str) -> tuple[int, Any]:
            if head.status != "OPEN":
                raise BillApiError(409, "failed_precondition", f"bill {bill_id} is already closed",
                                   {"bill_id": bill_id, "invoice_number": head.invoice_number})
            adj = InvoiceAdjustment(f"close:{bill_id}", "CLOSE", bill_id, head.account, head.currency.strip(),
                                    Decimal(0), "", who.name, key, datetime.now(UTC).replace(microsecond=0))
            produce(adj)
            wait_until(lambda c: (store.bill_head(c, bill_id) or head).status != "OPEN", {"bill_id": bill_id})
            return 200, run(lambda c: bill_view(c, bill_id))

        return await idempotent(request, who, idempotency_key, {"bill_id": bill_id}, work)

    # --- accounts ---------------------------------------------------------------------------------------
    @app.get("/v1/accounts/{account}/bills", responses=_ERRORS, summary="The account's bills")
    async def account_bills(account: str, who: Caller) -> JSONResponse:
        if not who.may_read(account):
            raise _denied(who, account)
        out = await run_in_threadpool(run, lambda c: [bill_view(c, b) for b in store.bill_ids_of(c, account)])
        return JSONResponse(jsonable_encoder(out))

    @app.get("/v1/accounts/{account}/balance", responses=_ERRORS,
             summary="Balance per currency, and its total in one currency at a day's reference rates")
    async def balance(account: str, who: Caller,
                      currency: Annotated[str | None, Query(pattern=r"^[A-Z]{3}$",
                                                            description="total in this currency")] = None,
                      on: Annotated[date | None, Query(description="rate date; default the latest loaded")] = None
                      ) -> JSONResponse:
        if not who.may_read(account):
            raise _denied(who, account)

        def tx(conn: Any) -> dict[str, Any]:
            if not store.account_exists(conn, account):
                raise BillApiError(404, "not_found", f"account {account} does not exist", {"account": account})
            return {"by_currency": store.balances(conn, account),
                    "rates": store.rates_on(conn, on) if currency else None}

        got = await run_in_threadpool(run, tx)
        by_cur: dict[str, Decimal] = got["by_currency"]
        out: dict[str, Any] = {"account": account, "balances": [
            {"currency": c, "amount": str(round_money(a, c))} for c, a in by_cur.items()]}
        if currency is None:
            return JSONResponse(out)
        if currency not in MINOR_UNITS:
            raise BillApiError(422, "invalid_argument", f"currency {currency} is not known",
                               {"field": "currency", "known": sorted(MINOR_UNITS)})
        rates = got["rates"]
        if rates is None:
            raise BillApiError(422, "rate_unavailable", "no exchange rates loaded" + (f" for {on}" if on else ""),
                               {"date": on.isoformat() if on else None, "currency": currency})
        day, source, table = rates
        parts = []
        try:
            for c, a in by_cur.items():
                parts.append({"currency": c, "amount": str(round_money(a, c)),
                              "rate": str(fx.cross_rate(table, c, currency, day)),
                              "converted": str(fx.convert(a, c, currency, table, day))})
        except fx.RateError as exc:
            raise BillApiError(422, "rate_unavailable", str(exc), {"date": day.isoformat(), "source": source,
                                                                   "currency": currency}) from exc
        out["total"] = {"currency": currency, "amount": str(sum((Decimal(p["converted"]) for p in parts), Decimal(0))),
                        "rate_date": day.isoformat(), "rate_source": source,
                        "rounding": "each currency converted then rounded half-up to the minor unit, then summed",
                        "parts": parts}
        return JSONResponse(out)

    # --- operators --------------------------------------------------------------------------------------
    @app.post("/v1/accounts/{account}/api-keys", status_code=201, responses=_ERRORS,
              summary="Create a customer API key for the account (the key is shown once)")
    async def create_key(account: str, who: Operator, body: KeyIn | None = None) -> JSONResponse:
        def tx(conn: Any) -> tuple[str, str]:
            try:
                return store.create_customer_key(conn, account, body.name if body else "", who.name)
            except LookupError as exc:
                raise BillApiError(404, "not_found", str(exc), {"account": account}) from exc

        key_id, key = await run_in_threadpool(run, tx)
        return JSONResponse({"key_id": key_id, "account": account, "key": key}, status_code=201)

    @app.post("/v1/exchange-rates", status_code=201, responses=_ERRORS,
              summary="Load an ECB reference-rate CSV (eurofxref.csv or eurofxref-hist.csv)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"text/csv": {"schema": {"type": "string"}}}}})
    async def load_rates(request: Request, who: Operator,
                         source: Annotated[str, Query(max_length=100, description="recorded with each rate")] = "ECB"
                         ) -> JSONResponse:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "text/csv":
            raise BillApiError(415, "invalid_argument", "send the file as text/csv", {"header": "Content-Type"})
        raw = await request.body()
        if len(raw) > MAX_CSV_BYTES:
            raise BillApiError(413, "invalid_argument", f"the body is {len(raw)} bytes; at most {MAX_CSV_BYTES}")
        try:
            rates = fx.parse_ecb_csv(raw.decode("utf-8"), source)
        except (UnicodeDecodeError, fx.RateError) as exc:
            raise BillApiError(422, "invalid_argument", f"not a readable ECB CSV: {exc}") from exc
        n = await run_in_threadpool(run, lambda c: store.load_rates(c, rates, who.name))
        days = sorted({r.rate_date for r in rates})
        return JSONResponse({"source": source, "rates": len(rates), "inserted": n,
                             "dates": [days[0].isoformat(), days[-1].isoformat()] if days else []}, status_code=201)

    # --- usage, invoices and the portal page (issue 17: pipeline.api.portal) ----------------------------
    portal.install(app, run, caller, Caller, _ERRORS)

    @app.get("/v1/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
