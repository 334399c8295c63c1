"""The Bill API (issue 17 part B) in process (FastAPI TestClient) over the REAL broker and Postgres, with the
invoicing stage running as its own process: manual lines reach the append-only ledger exactly once through
invoice.adjustments (a repeated request and a repeated produce still append ONE line), keys reach only their
account, bills close with the next gap-free invoice number, cross-currency totals use the loaded ECB rates."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from pipeline.api.customer import create_app
from pipeline.codec import default_codec
from pipeline.config import OperatorKey
from pipeline.invoicing import lifecycle as lc
from pipeline.invoicing.bills import manual_line_id
from pipeline.records import InvoiceAdjustment
from pipeline.runtime.kafka import IdempotentProducer, KafkaIOError, read_all
from tests.integration.conftest import Env

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

OP = {"X-API-Key": "op-key-1"}
VIEWER = {"X-API-Key": "viewer-key-1"}
ECB = Path(__file__).resolve().parent.parent / "data" / "ecb" / "eurofxref-hist-sample.csv"
DEC_2025 = {"period_start": "2025-12-01", "period_end": "2026-01-01"}


class LostAckProducer:
    """The real idempotent producer, except that the first ``lose`` acknowledgements are reported lost after
    the broker took the record: the API must retry, so the record lands on the topic twice."""

    def __init__(self, inner: IdempotentProducer, lose: int = 0) -> None:
        self.inner, self.lose, self.sent = inner, lose, 0

    def send_and_wait(self, records: Any, timeout_s: float = 30.0) -> None:
        self.inner.send_and_wait(records, timeout_s)
        self.sent += len(records)
        if self.lose > 0:
            self.lose -= 1
            raise KafkaIOError("acknowledgement lost (test)")


def make_client(env: Env, producer: Any) -> TestClient:
    settings = env.settings.model_copy(update={
        "operator_api_keys": [OperatorKey(name="alice", key=SecretStr("op-key-1"), role="operator"),
                              OperatorKey(name="dashboard", key=SecretStr("viewer-key-1"), role="viewer")],
        "customer_ledger_wait_s": 120.0})
    return TestClient(create_app(settings, producer, default_codec()))


def cli(env: Env, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env.env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def error(r: Any) -> tuple[int, str]:
    body = r.json()
    assert set(body) == {"code", "message", "details"}, body
    return r.status_code, body["code"]


@pytest.fixture
def client(pipeline_env: Env) -> TestClient:
    return make_client(pipeline_env, IdempotentProducer(pipeline_env.settings.kafka_bootstrap))


def test_keys_reach_only_their_account_and_errors_are_structured(client: TestClient, pipeline_env: Env) -> None:
    env = pipeline_env
    assert error(client.get("/v1/accounts/ACC-1001/bills")) == (401, "unauthenticated")
    assert error(client.get("/v1/accounts/ACC-1001/bills", headers={"X-API-Key": "nope"})) == (401, "unauthenticated")
    r = client.post("/v1/accounts/ACC-1001/api-keys", json={"name": "portal"}, headers=OP)
    assert r.status_code == 201 and r.json()["account"] == "ACC-1001"
    k1 = {"X-API-Key": r.json()["key"]}
    out = cli(env, "keys", "create", "ACC-1002")  # printed once; only the hash is stored
    k2 = {"X-API-Key": out.strip().splitlines()[-1]}
    assert env.sql("SELECT count(*) FROM customer_api_keys")[0][0] == 2
    assert env.sql("SELECT count(*) FROM customer_api_keys WHERE key_sha256 = %s OR key_sha256 = %s",
                   (k1["X-API-Key"], k2["X-API-Key"]))[0][0] == 0  # never stored in clear
    assert error(client.post("/v1/accounts/ACC-1002/api-keys", headers=k1)) == (403, "permission_denied")
    assert error(client.post("/v1/accounts/ACC-9999/api-keys", headers=OP)) == (404, "not_found")

    r = client.post("/v1/bills", json={"account": "ACC-1001", "currency": "AUD", **DEC_2025}, headers=k1)
    assert r.status_code == 201 and r.json()["status"] == "OPEN" and r.json()["lines"] == []
    bill = r.json()["bill_id"]
    assert client.get(f"/v1/bills/{bill}", headers=k1).status_code == 200
    assert client.get(f"/v1/bills/{bill}", headers=VIEWER).status_code == 200  # operator viewers see all
    assert error(client.get(f"/v1/bills/{bill}", headers=k2)) == (403, "permission_denied")
    assert error(client.get("/v1/accounts/ACC-1001/bills", headers=k2)) == (403, "permission_denied")
    assert error(client.get("/v1/accounts/ACC-1001/balance", headers=k2)) == (403, "permission_denied")
    assert error(client.post("/v1/bills", json={"account": "ACC-1001", "currency": "AUD", **DEC_2025},
                             headers=k2)) == (403, "permission_denied")
    assert error(client.post(f"/v1/bills/{bill}/line-items", json={"type": "charge", "amount": "1.00", "reason": "x"},
                             headers=k2)) == (403, "permission_denied")
    assert error(client.post(f"/v1/bills/{bill}/line-items", json={"type": "credit", "amount": "1.00", "reason": "x"},
                             headers=k1)) == (403, "permission_denied")  # no customer grants itself a credit
    assert error(client.post(f"/v1/bills/{bill}/line-items", json={"type": "charge", "amount": "1.00", "reason": "x"},
                             headers=VIEWER)) == (403, "permission_denied")
    csv_headers = {**k1, "Content-Type": "text/csv"}
    assert error(client.post("/v1/exchange-rates", content=ECB.read_bytes(), headers=csv_headers)) == (
        403, "permission_denied")
    assert error(client.get("/v1/bills/B-nope", headers=OP)) == (404, "not_found")
    assert error(client.get("/v1/nowhere", headers=OP)) == (404, "not_found")

    r = client.post(f"/v1/bills/{bill}/line-items", json={"type": "charge", "amount": "1.001", "reason": "x"},
                    headers=k1)
    assert error(r) == (422, "invalid_argument") and r.json()["details"]["minor_unit_digits"] == 2
    r = client.post(f"/v1/bills/{bill}/line-items", json={"type": "fee", "amount": "-1", "reason": ""}, headers=k1)
    assert error(r) == (422, "invalid_argument")
    assert [e["field"] for e in r.json()["details"]["errors"]] == ["body.type", "body.amount", "body.reason"]
    r = client.post("/v1/bills", json={"account": "ACC-1001", "currency": "XXX", **DEC_2025}, headers=OP)
    assert error(r) == (422, "invalid_argument") and r.json()["details"]["field"] == "currency"
    assert error(client.post("/v1/bills", json={"account": "ACC-1001", "currency": "AUD", "period_start":
                                                "2025-12-01", "period_end": "2025-12-01"}, headers=OP)) == (
        422, "invalid_argument")
    assert env.sql("SELECT count(*) FROM invoice_lines")[0][0] == 0  # nothing refused reached the ledger

    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/bills", "/v1/bills/{bill_id}", "/v1/bills/{bill_id}/line-items", "/v1/bills/{bill_id}/close",
            "/v1/accounts/{account}/balance", "/v1/accounts/{account}/api-keys", "/v1/exchange-rates"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_manual_lines_exactly_once_bill_round_trip_and_cross_currency(pipeline_env: Env) -> None:
    env = pipeline_env
    stage = env.start("invoicing")
    env.start("relay")
    env.wait_started(stage, "invoicing")
    producer = LostAckProducer(IdempotentProducer(env.settings.kafka_bootstrap))
    client = make_client(env, producer)

    # create: the same key and body names the same bill; the same key with another body is refused
    body = {"account": "ACC-1001", "currency": "AUD", **DEC_2025}
    r1 = client.post("/v1/bills", json=body, headers={**OP, "Idempotency-Key": "bill-1"})
    r2 = client.post("/v1/bills", json=body, headers={**OP, "Idempotency-Key": "bill-1"})
    assert r1.status_code == r2.status_code == 201 and r1.json() == r2.json()
    assert r2.headers["Idempotent-Replayed"] == "true"
    assert error(client.post("/v1/bills", json={**body, "currency": "USD"},
                             headers={**OP, "Idempotency-Key": "bill-1"})) == (409, "idempotency_conflict")
    bill = r1.json()["bill_id"]
    assert env.sql("SELECT count(*) FROM invoices WHERE bill_id IS NOT NULL")[0][0] == 1

    # a charge posted 3 times with one key, the first produce's ack lost (so produced twice): ONE ledger line
    producer.lose = 1
    charge = {"type": "charge", "amount": "12.50", "reason": "meter test visit"}
    answers = [client.post(f"/v1/bills/{bill}/line-items", json=charge, headers={**OP, "Idempotency-Key": "line-1"})
               for _ in range(3)]
    assert [a.status_code for a in answers] == [201, 201, 201]
    assert answers[0].json() == answers[1].json() == answers[2].json()
    line_id = manual_line_id("alice", "line-1")
    assert answers[0].json()["line_id"] == line_id and answers[0].json()["amount"] == "12.50"
    assert producer.sent == 2  # the lost ack made the API send again; the replays sent nothing
    codec = default_codec()
    on_topic = [codec.decode(m.value, InvoiceAdjustment) for m in read_all(
        env.settings.kafka_bootstrap, env.topics.invoice_adjustments, timeout_s=60)]
    assert [a.adjustment_id for a in on_topic] == [line_id, line_id]
    assert env.sql("SELECT amount, line_kind, explanation->>'requested_by', explanation->>'reason', "
                   "explanation->>'idempotency_key' FROM invoice_lines WHERE invoice_id = %s", (f"bill:{bill}",)) == [
        (Decimal("12.500000"), "MANUAL", "alice", "meter test visit", "line-1")]
    assert error(client.post(f"/v1/bills/{bill}/line-items", json={**charge, "amount": "12.51"},
                             headers={**OP, "Idempotency-Key": "line-1"})) == (409, "idempotency_conflict")

    # a credit and a second charge, then the bill with its lines and statement
    r = client.post(f"/v1/bills/{bill}/line-items", json={"type": "credit", "amount": "2.25", "reason": "goodwill"},
                    headers={**OP, "Idempotency-Key": "line-2"})
    assert r.status_code == 201 and r.json()["amount"] == "-2.25"
    key = client.post("/v1/accounts/ACC-1001/api-keys", headers=OP).json()["key"]
    r = client.post(f"/v1/bills/{bill}/line-items", json={"type": "charge", "amount": "0.10", "reason": "postage"},
                    headers={"X-API-Key": key, "Idempotency-Key": "line-1"})  # another caller: its own key space
    assert r.status_code == 201 and r.json()["line_id"] != line_id
    got = client.get(f"/v1/bills/{bill}", headers=OP).json()
    assert [(ln["amount"], ln["reason"]) for ln in got["lines"]] == [
        ("12.50", "meter test visit"), ("-2.25", "goodwill"), ("0.10", "postage")]
    assert got["total"] == "10.35"
    assert got["statement"] == {"previous_balance": "0.00", "charges_total": "10.35", "payments_total": "0.00",
                                "amount_due": "10.35"}

    # close: finalized by the invoicing stage with the next number of the series; a second bill gets the next
    r = client.post(f"/v1/bills/{bill}/close", headers={**OP, "Idempotency-Key": "close-1"})
    assert r.status_code == 200, r.json()
    closed = r.json()
    assert (closed["status"], closed["invoice_number"], closed["bill_date"], closed["due_date"]) == (
        "FINALIZED", "INV-2026-000001", "2026-01-01", "2026-01-15")
    assert closed["statement"] == got["statement"] and closed["lines"] == got["lines"]
    assert "Invoice INV-2026-000001  [FINALIZED]" in closed["text"]
    assert "manual charges and credits (3 lines)" in closed["text"] and "AMOUNT DUE" in closed["text"]
    assert closed["text"].count("10.35 AUD") == 3  # the manual lines' net, charges this period, amount due
    assert client.post(f"/v1/bills/{bill}/close", headers={**OP, "Idempotency-Key": "close-1"}).json() == closed
    assert error(client.post(f"/v1/bills/{bill}/close", headers=OP)) == (409, "failed_precondition")
    assert error(client.post(f"/v1/bills/{bill}/line-items", json=charge, headers=OP)) == (409, "failed_precondition")

    bill2 = client.post("/v1/bills", json=body, headers=OP).json()["bill_id"]
    assert client.post(f"/v1/bills/{bill2}/line-items", json={"type": "charge", "amount": "5.00", "reason": "r"},
                       headers=OP).status_code == 201
    closed2 = client.post(f"/v1/bills/{bill2}/close", headers=OP).json()
    assert closed2["invoice_number"] == "INV-2026-000002"  # gap-free in the one series
    assert closed2["statement"] == {"previous_balance": "10.35", "charges_total": "5.00", "payments_total": "0.00",
                                    "amount_due": "15.35"}  # the account's balance chain runs through bills

    # a line for a closed bill that still reaches the topic (a stale client) is dead-lettered, not appended
    late = InvoiceAdjustment(manual_line_id("alice", "late"), "LINE", bill, "ACC-1001", "AUD", Decimal("1.00"),
                             "late", "alice", "late", on_topic[0].requested_at)
    env.producer().send_and_wait([_out(env, late)])
    # a close racing a line: whether the API sees the bill closed or the stage refuses the line, the answer is 409
    bill3 = client.post("/v1/bills", json=body, headers=OP).json()["bill_id"]
    env.producer().send_and_wait([_out(env, InvoiceAdjustment(
        f"close:{bill3}", "CLOSE", bill3, "ACC-1001", "AUD", Decimal(0), "", "alice", "c3", late.requested_at))])
    r = client.post(f"/v1/bills/{bill3}/line-items", json={"type": "charge", "amount": "3.00", "reason": "r"},
                    headers=OP)
    assert error(r) == (409, "failed_precondition")
    assert client.get(f"/v1/bills/{bill3}", headers=OP).json()["invoice_number"] == "INV-2026-000003"

    # a USD bill too, then the balance in EUR at the loaded ECB rates of 2025-12-05
    usd = client.post("/v1/bills", json={**body, "currency": "USD"}, headers=OP).json()["bill_id"]
    assert client.post(f"/v1/bills/{usd}/line-items", json={"type": "charge", "amount": "20.00", "reason": "r"},
                       headers=OP).status_code == 201
    r = client.get("/v1/accounts/ACC-1001/balance?currency=EUR", headers=OP)
    assert error(r) == (422, "rate_unavailable")
    r = client.post("/v1/exchange-rates", content=ECB.read_bytes(), headers={**OP, "Content-Type": "text/csv"})
    assert r.status_code == 201 and (r.json()["rates"], r.json()["inserted"]) == (58, 58)
    assert "0 new" in cli(env, "rates", "load", str(ECB))  # the same file again: every rate kept as it was
    assert env.sql("SELECT count(*), min(loaded_by) FROM exchange_rates") == [(58, "alice")]
    r = client.get("/v1/accounts/ACC-1001/balance?currency=EUR&on=2025-12-05", headers={"X-API-Key": key})
    assert r.status_code == 200, r.json()
    out = r.json()
    assert out["balances"] == [{"currency": "AUD", "amount": "15.35"}, {"currency": "USD", "amount": "20.00"}]
    # by hand: 15.35 AUD / 1.7610 = 8.71664… → 8.72 EUR; 20.00 USD / 1.1650 = 17.16738… → 17.17 EUR
    assert (Decimal("15.35") / Decimal("1.7610")).quantize(Decimal("0.01")) == Decimal("8.72")
    assert (Decimal("20.00") / Decimal("1.1650")).quantize(Decimal("0.01")) == Decimal("17.17")
    total = out["total"]
    assert (total["currency"], total["amount"], total["rate_date"], total["rate_source"]) == (
        "EUR", "25.89", "2025-12-05", "ECB")
    assert [(p["currency"], p["converted"]) for p in total["parts"]] == [("AUD", "8.72"), ("USD", "17.17")]
    assert Decimal(total["parts"][0]["rate"]) == Decimal(1) / Decimal("1.7610")
    r = client.get("/v1/accounts/ACC-1001/balance?currency=EUR&on=2025-12-06", headers=OP)
    assert error(r) == (422, "rate_unavailable")
    r = client.get("/v1/accounts/ACC-1001/balance?currency=USD&on=2025-12-04", headers=OP)
    # 15.35 AUD × 1.1642 / 1.7585 = 10.1624… → 10.16 USD; + 20.00 USD
    assert r.json()["total"]["amount"] == "30.16"

    # the ledger: exactly the lines asked for, the late one dead-lettered; every change announced in the outbox
    ends = {m.partition: m.offset + 1 for m in read_all(env.settings.kafka_bootstrap, env.topics.invoice_adjustments,
                                                        timeout_s=60)}
    deadline = time.monotonic() + 120
    while dict(env.sql("SELECT partition, next_offset FROM consumer_offsets WHERE topic = %s",
                       (env.topics.invoice_adjustments,))) != ends:  # invoicing keeps its offsets in Postgres
        env.check_alive()
        assert time.monotonic() < deadline, env.log_tail("invoicing")
        time.sleep(0.3)
    dead = env.sql("SELECT reason FROM dead_letters")
    assert dead in ([("BILL_CLOSED",)], [("BILL_CLOSED",)] * 2)  # the late line (+ the raced one if it was sent)
    assert env.sql("SELECT invoice_id, sum(amount), count(*) FROM invoice_lines GROUP BY 1 ORDER BY 1") == sorted([
        (f"bill:{bill}", Decimal("10.35"), 3), (f"bill:{bill2}", Decimal("5.00"), 1),
        (f"bill:{usd}", Decimal("20.00"), 1)])
    assert env.sql("SELECT event_type, count(*) FROM outbox GROUP BY 1 ORDER BY 1") == [
        ("INVOICE_FINALIZED", 3), ("LINE_APPENDED", 5)]
    line_events = [lc.event_from_json(p, 0) for (p,) in env.sql(
        "SELECT payload FROM outbox WHERE event_type = 'LINE_APPENDED' ORDER BY seq")]
    assert [(e.line_id, e.line_kind, e.amount) for e in line_events[:2]] == [
        (line_id, "MANUAL", Decimal("12.50")), (manual_line_id("alice", "line-2"), "MANUAL", Decimal("-2.25"))]
    env.assert_invoice_structure()  # gap-free numbers, frozen statements = lines and payments, balance chain
    events = env.assert_invoice_events()  # the relay published every change once, MANUAL lines included
    assert sum(1 for e in events if e.line_kind == "MANUAL") == 5
    assert stage.poll() is None


def test_invoicing_killed_mid_stream_appends_every_manual_line_once(pipeline_env: Env) -> None:
    """SPEC §6.2 for the new input: records on invoice.adjustments (each sent twice) with the invoicing stage
    SIGKILLed while applying them and restarted: every line is in the ledger once, with its exact amount."""
    env = pipeline_env
    client = make_client(env, IdempotentProducer(env.settings.kafka_bootstrap))
    bills = [client.post("/v1/bills", json={"account": f"ACC-100{i}", "currency": "AUD", **DEC_2025},
                         headers=OP).json()["bill_id"] for i in (1, 2, 3)]
    at = datetime(2025, 12, 5, tzinfo=UTC)
    adjs = [InvoiceAdjustment(manual_line_id("alice", f"k{n}"), "LINE", bills[n % 3], f"ACC-100{n % 3 + 1}", "AUD",
                              Decimal(n + 1) / 100, f"r{n}", "alice", f"k{n}", at) for n in range(300)]
    producer = env.producer()
    producer.send_and_wait([_out(env, a) for a in adjs[:150]])
    stage = env.start("invoicing")
    deadline = time.monotonic() + 120
    while env.line_count() == 0:  # kill it once it has applied some
        env.check_alive()
        assert time.monotonic() < deadline, env.log_tail("invoicing")
        time.sleep(0.05)
    env.stop(stage, sig=9)
    producer.send_and_wait([_out(env, a) for a in adjs + adjs[:150]])  # every record again, and the rest
    env.start("invoicing", instance="1")
    deadline = time.monotonic() + 180
    while env.line_count() < 300:
        env.check_alive()
        assert time.monotonic() < deadline, env.log_tail("invoicing")
        time.sleep(0.3)
    assert env.wait_quiet(min_wait_s=2, quiet_s=3) == 300
    assert env.sql("SELECT count(*), sum(amount), count(DISTINCT line_id) FROM invoice_lines") == [
        (300, sum(Decimal(n + 1) / 100 for n in range(300)), 300)]  # 451.50
    assert env.sql("SELECT count(*) FROM outbox") == [(300,)]
    assert env.sql("SELECT count(*) FROM dead_letters") == [(0,)]


def _out(env: Env, adj: InvoiceAdjustment) -> Any:
    from pipeline.runtime.kafka import OutRecord

    return OutRecord(env.topics.invoice_adjustments, adj.account.encode(), default_codec().encode(adj))
