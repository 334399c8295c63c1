"""The operator API (issue 15) in process (FastAPI TestClient) against the real Postgres: operator keys write,
viewer keys read, other keys get 401/403; every change is audited with the key's name and before/after;
refusals name every problem; dry runs and Idempotency-Key replays change nothing; OpenAPI is served."""

from __future__ import annotations

import warnings
from datetime import date

import pytest
from pydantic import SecretStr

from pipeline.api.operator import create_app
from pipeline.config import OperatorKey
from pipeline.runtime import postgres
from tests.integration.conftest import Env

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

OP = {"X-API-Key": "op-key-1"}
VIEWER = {"X-API-Key": "viewer-key-1"}
ACCOUNT = {"account": "ACC-2001", "timezone": "Australia/Sydney", "billing_cycle": "MONTHLY",
           "billing_anchor": "2025-07-01", "currency": "AUD", "net_days": 10, "holiday_region": "AU-NSW"}


@pytest.fixture
def client(pipeline_env: Env) -> TestClient:
    settings = pipeline_env.settings.model_copy(update={
        "api_keys": [SecretStr("ingest-key")],
        "operator_api_keys": [OperatorKey(name="alice", key=SecretStr("op-key-1"), role="operator"),
                              OperatorKey(name="dashboard", key=SecretStr("viewer-key-1"), role="viewer")]})
    return TestClient(create_app(settings))


def changes(env: Env) -> int:
    return env.sql("SELECT count(*) FROM reference_changes")[0][0]


def test_keys_and_roles(client: TestClient, pipeline_env: Env) -> None:
    assert client.get("/v1/health").json() == {"status": "ok"}
    r = client.get("/v1/accounts")
    assert (r.status_code, r.json()["error"]["code"]) == (401, "MISSING_API_KEY")
    for wrong in ("nope", "ingest-key"):  # an ingestion key is not an operator key
        r = client.post("/v1/accounts", json=ACCOUNT, headers={"X-API-Key": wrong})
        assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["field"]) == (
            401, "INVALID_API_KEY", "X-API-Key")
    before = changes(pipeline_env)
    r = client.post("/v1/accounts", json=ACCOUNT, headers=VIEWER)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "FORBIDDEN")
    assert changes(pipeline_env) == before
    r = client.get("/v1/accounts", headers=VIEWER)
    assert r.status_code == 200 and len(r.json()) == 55  # the bundled accounts
    assert client.get("/v1/accounts/ACC-9999", headers=VIEWER).status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/accounts", "/v1/accounts/{account}", "/v1/accounts/{account}/meters", "/v1/meters/{nmi}/move-out",
            "/v1/accounts/{account}/plans", "/v1/imports", "/v1/subjects/{subject}/detach"} <= set(paths)


def test_an_operator_onboards_switches_and_moves_out_with_history(client: TestClient, pipeline_env: Env) -> None:
    env = pipeline_env
    # the bundled reference file loaded by the fixture (load reference) is in the history too: one row per row
    assert env.sql("SELECT operation, count(*) FROM reference_changes GROUP BY 1 ORDER BY 1") == [
        ("load.account", 55), ("load.plan_assignment", 55), ("load.service_point", 52), ("load.telemetry_subject", 4)]
    before = changes(env)
    r = client.post("/v1/accounts?dry_run=true", json=ACCOUNT, headers=OP)
    assert (r.status_code, r.json()["applied"], len(r.json()["changes"])) == (200, False, 1)
    assert changes(env) == before
    r = client.post("/v1/accounts", json=ACCOUNT, headers=OP)
    assert r.status_code == 201 and r.json()["changes"][0]["operation"] == "account.create"
    r = client.post("/v1/accounts", json=ACCOUNT, headers=OP)  # the same again: nothing to do
    assert (r.status_code, r.json()) == (200, {"applied": False, "dry_run": False, "changes": []})
    r = client.post("/v1/accounts", json={**ACCOUNT, "timezone": "Mars/Olympus", "currency": "XXX"}, headers=OP)
    assert r.status_code == 422
    assert [p["code"] for p in r.json()["problems"]] == ["BAD_TIMEZONE", "UNKNOWN_CURRENCY"]
    assert r.json()["error"]["code"] == "BAD_TIMEZONE" and r.json()["error"]["field"] == "timezone"

    r = client.post("/v1/accounts/ACC-2001/meters", json={"nmi": "NEM1201002", "effective_from": "2025-07-01"},
                    headers=OP)
    assert r.status_code == 422 and r.json()["error"]["code"] == "NMI_ATTACHED_ELSEWHERE"
    assert "attached to account ACC-1002 over 2005-03-15..open" in r.json()["error"]["message"]
    r = client.post("/v1/accounts/ACC-2001/meters", json={"nmi": "NEW0000001", "effective_from": "2025-07-01"},
                    headers={**OP, "Idempotency-Key": "attach-1"})
    assert r.status_code == 201
    again = client.post("/v1/accounts/ACC-2001/meters", json={"nmi": "NEW0000001", "effective_from": "2025-07-01"},
                        headers={**OP, "Idempotency-Key": "attach-1"})
    assert (again.status_code, again.headers["Idempotent-Replayed"], again.json()) == (201, "true", r.json())
    r = client.post("/v1/accounts/ACC-2001/plans", json={"price_book_id": "NO-SUCH", "effective_from": "2025-07-01"},
                    headers=OP)
    assert r.status_code == 422 and r.json()["error"]["code"] == "UNKNOWN_PRICE_BOOK"
    r = client.post("/v1/accounts/ACC-2001/plans", json={"price_book_id": "ACTEWAGL-HOME-TOU",
                                                         "effective_from": "2025-07-01"}, headers=OP)
    assert r.status_code == 201
    # a switch mid-month closes the open plan and adds the new one: two changes, nothing edited in place
    r = client.post("/v1/accounts/ACC-2001/plans", json={"price_book_id": "ACTEWAGL-HOME",
                                                         "effective_from": "2025-08-15"}, headers=OP)
    assert r.status_code == 201
    assert [(c["operation"], c["before"], c["after"]["effective_to"]) for c in r.json()["changes"]] == [
        ("plan.switch", {"account": "ACC-2001", "price_book_id": "ACTEWAGL-HOME-TOU", "effective_from": "2025-07-01",
                         "effective_to": None}, "2025-08-15"),
        ("plan.assign", None, None)]
    r = client.post("/v1/meters/NEW0000001/move-out", json={"on": "2025-09-20"}, headers=OP)
    assert r.status_code == 200 and r.json()["changes"][0]["after"]["effective_to"] == "2025-09-20"

    shown = client.get("/v1/accounts/ACC-2001", headers=VIEWER).json()
    assert shown["service_end"] == "2025-09-20"
    assert shown["service_points"] == [{"nmi": "NEW0000001", "account": "ACC-2001", "effective_from": "2025-07-01",
                                        "effective_to": "2025-09-20"}]
    assert [(p["price_book_id"], p["effective_from"], p["effective_to"]) for p in shown["plan_assignments"]] == [
        ("ACTEWAGL-HOME-TOU", "2025-07-01", "2025-08-15"), ("ACTEWAGL-HOME", "2025-08-15", None)]
    assert [(h["operation"], h["changed_by"], h["source"]) for h in shown["history"]] == [
        ("account.create", "alice", "api"), ("meter.attach", "alice", "api"), ("plan.assign", "alice", "api"),
        ("plan.switch", "alice", "api"), ("plan.assign", "alice", "api"), ("meter.move_out", "alice", "api")]
    assert env.sql("SELECT effective_to FROM plan_assignments WHERE account = 'ACC-2001' ORDER BY effective_from") \
        == [(date(2025, 8, 15),), (None,)]
    # the audit trail is append-only and reference rows are never removed: the application role may not, and
    # the database refuses it even to the schema owner
    with pytest.raises(Exception, match="permission denied for table reference_changes"):
        env.execute("UPDATE reference_changes SET changed_by = 'mallory'")
    for statement, refusal in (("UPDATE reference_changes SET changed_by = 'mallory'", "reference_changes is history"),
                               ("DELETE FROM reference_changes", "reference_changes is history"),
                               ("DELETE FROM service_points WHERE nmi = 'NEW0000001'", "service_points is history"),
                               ("DELETE FROM plan_assignments WHERE account = 'ACC-2001'", "plan_assignments is")):
        with pytest.raises(Exception, match=refusal), postgres.connect(env.settings.database_owner_url) as conn:
            conn.execute(statement)


def test_a_csv_import_with_a_bad_line_is_refused_whole(client: TestClient, pipeline_env: Env) -> None:
    csv = ("account,timezone,billing_cycle,billing_anchor,currency,nmi,service_from,price_book_id\n"
           "ACC-2001,Australia/Sydney,MONTHLY,2025-01-01,AUD,NEW0000001,2025-07-01,ACTEWAGL-HOME-TOU\n"
           "ACC-2002,Australia/Sydney,MONTHLY,2025-01-01,AUD,NEW0000002,2025-07-01,NO-SUCH-BOOK\n")
    before = changes(pipeline_env)
    r = client.post("/v1/imports", content=csv, headers={**OP, "Content-Type": "text/csv"})
    assert r.status_code == 422
    assert r.json()["error"] == {"code": "UNKNOWN_PRICE_BOOK", "field": "price_book_id",
                                 "message": "line 3: price book NO-SUCH-BOOK is not published "
                                            "(pipeline pricebook publish FILE)"}
    assert [(p["line"], p["code"]) for p in r.json()["problems"]] == [(3, "UNKNOWN_PRICE_BOOK")]
    assert changes(pipeline_env) == before
    r = client.post("/v1/imports", content=csv.replace("NO-SUCH-BOOK", "ACTEWAGL-HOME"),
                    headers={**OP, "Content-Type": "text/csv"})
    assert r.status_code == 201 and len(r.json()["changes"]) == 6
    assert changes(pipeline_env) == before + 6
