"""The customer portal in a real headless Chromium (issue 17): a real NEM12 account streamed through ingest →
windowing → rating → invoicing + usage on the real broker and Postgres, the customer app served by
``pipeline serve customer`` on a real port, a customer key from ``pipeline keys create``; the page (signed in
through the login form's cookie, and with the X-API-Key header) shows exactly the figures of
``/v1/accounts/{account}/usage`` and ``/invoices``, which equal the independent batch bill of the file; another
account's page and endpoints answer 403, no key 401. Chromium: Debian's package, driven by Playwright."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from playwright.sync_api import Page, sync_playwright

from pipeline.browser import HEADLESS_ARGS, ensure_chromium
from pipeline.ingest.nem12 import read_nem12
from pipeline.reference import BUNDLED_REFERENCE
from tests.batchbill import expected_bills, latest_readings
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

FILE = DATA / "nem12" / "NEM12#000000000000009#CNRGYMDP#NEMMCO.zip"  # NMI NEM1209162, E1, A and E reads
ACCOUNT, OTHER = "ACC-1036", "ACC-1001"
SYDNEY = ZoneInfo("Australia/Sydney")  # the account's timezone (bundled reference data)


def settle(env: Env, published: int) -> None:
    env.wait_accounted(published=published)
    for topic in (env.topics.usage_windows, env.topics.charges_rated):
        env.wait_consumed("usage", topic)


@pytest.fixture
def served(pipeline_env: Env) -> Iterator[str]:
    """``pipeline serve customer`` of this pipeline on its port; yields the base URL once it answers."""
    env = pipeline_env
    port = env.settings.customer_http_port
    log = open(env.log_dir / "customer-api.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "customer", "--port", str(port)],
                            env=env.env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/v1/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (env.log_dir / "customer-api.log").read_text()
        time.sleep(0.5)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def shown(page: Page, testid: str) -> str:
    return page.get_by_test_id(testid).inner_text().strip()


def assert_page_equals_api(page: Page, usage: dict[str, Any], invoices: list[dict[str, Any]]) -> int:
    """Every figure on the page equals the API's; returns how many were compared."""
    n = 0

    def eq(testid: str, want: Any) -> None:
        nonlocal n
        assert shown(page, testid) == str(want), testid
        n += 1

    ptd = usage["period_to_date"]
    eq("cost-so-far", ptd["cost"])
    eq("fixed-cost", ptd["fixed_cost"])
    eq("days-elapsed", ptd["days_elapsed"])
    eq("days-remaining", ptd["days_remaining"])
    eq("as-of-day", ptd["as_of_day"])
    eq("projected-amount", usage["projected_bill"]["amount"])
    eq("projected-confidence", usage["projected_bill"]["confidence"])
    for p in usage["projected_bill"]["by_method"]:
        eq(f"projection-{p['method']}-amount", p["amount"])
        eq(f"projection-{p['method']}-confidence", p["confidence"])
    for m in usage["metrics"]:
        if not m["daily"]:
            continue
        eq(f"usage-{m['metric']}", m["usage_kwh"])
        eq(f"cost-{m['metric']}", m["cost"])
        for band, kwh in m["bands"].items():
            eq(f"band-{m['metric']}-{band}", kwh)
        for d in m["daily"]:
            eq(f"day-kwh-{m['metric']}-{d['date']}", d["usage_kwh"])
            eq(f"day-cost-{m['metric']}-{d['date']}", d["variable_cost"])
            assert page.get_by_test_id(f"bar-{m['metric']}-{d['date']}").get_attribute("data-kwh") == d["usage_kwh"]
    for i, inv in enumerate(invoices):
        eq(f"invoice-status-{i}", inv["status"])
        eq(f"invoice-total-{i}", inv["total"])
        for j, ln in enumerate(inv["lines"]):
            eq(f"line-amount-{i}-{j}", ln["amount"])
            eq(f"line-mark-{i}-{j}", ln["mark"])
        if inv["statement"]:
            eq(f"amount-due-{i}", inv["statement"]["amount_due"])
        if inv["estimated_note"]:
            eq(f"estimated-note-{i}", inv["estimated_note"])
    return n


def test_portal_page_in_headless_chromium_shows_the_api_figures(pipeline_env: Env, served: str,
                                                                tmp_path: Path) -> None:
    env, base = pipeline_env, served
    chromium = ensure_chromium()
    env.start_all()
    env.start("usage")
    settle(env, publish_files(env, [FILE]))
    out = subprocess.run([sys.executable, "-m", "pipeline", "keys", "create", ACCOUNT, "--name", "portal test"],
                         env=env.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    auth = {"X-API-Key": key}

    usage = httpx.get(f"{base}/v1/accounts/{ACCOUNT}/usage", headers=auth, timeout=60).json()
    invoices = httpx.get(f"{base}/v1/accounts/{ACCOUNT}/invoices", headers=auth, timeout=60).json()
    # the API's figures equal the independent batch bill of the file
    period = usage["period_start"]
    bill = expected_bills([FILE], BUNDLED_REFERENCE)[(ACCOUNT, date.fromisoformat(period))]
    cost = str(sum(bill.values(), Decimal(0)).quantize(Decimal("0.01")))
    assert (usage["account"], usage["currency"], usage["period_to_date"]["cost"]) == (ACCOUNT, "AUD", cost)
    [inv] = [i for i in invoices if i["period_start"] == period]
    assert inv["total"] == cost and inv["status"] == "OPEN" and inv["statement"] is None
    assert "*" in [ln["mark"] for ln in inv["lines"]] and inv["estimated_note"].startswith("* includes estimated")
    assert {p["method"] for p in usage["projected_bill"]["by_method"]} >= {"DAILY_AVERAGE", "WEIGHTED_AVERAGE"}
    energy = next(m for m in usage["metrics"] if m["metric"] == "energy_import")
    by_day: dict[date, Decimal] = defaultdict(Decimal)  # the file's latest readings by local day
    for r in latest_readings(read_nem12(FILE).readings):
        by_day[r.interval_start.astimezone(SYDNEY).date()] += r.value
    first, last = min(by_day), max(by_day)
    assert [(date.fromisoformat(d["date"]), Decimal(d["usage_kwh"])) for d in energy["daily"]] == \
        [(first + timedelta(i), by_day.get(first + timedelta(i), Decimal(0))) for i in range((last - first).days + 1)]
    assert sum(Decimal(b) for b in energy["bands"].values()) == Decimal(energy["usage_kwh"])
    assert sum(Decimal(d["variable_cost"]) for d in energy["daily"]) == \
        Decimal(energy["cost"]) - Decimal(energy["fixed_cost"])

    # the JSON endpoints' auth and errors
    for path in ("usage", "invoices"):
        r = httpx.get(f"{base}/v1/accounts/{OTHER}/{path}", headers=auth, timeout=60)
        assert (r.status_code, r.json()["code"]) == (403, "permission_denied")
        r = httpx.get(f"{base}/v1/accounts/{ACCOUNT}/{path}", timeout=60)
        assert (r.status_code, r.json()["code"]) == (401, "unauthenticated")
    paths = httpx.get(f"{base}/openapi.json", timeout=60).json()["paths"]
    assert {"/v1/accounts/{account}/usage", "/v1/accounts/{account}/invoices", "/portal/{account}"} <= set(paths)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=list(HEADLESS_ARGS), timeout=120_000)
        try:
            # signed in through the login form: the key travels in an HttpOnly, SameSite=Strict cookie
            ctx = browser.new_context(viewport={"width": 1280, "height": 900})
            page = ctx.new_page()
            page.set_default_timeout(60_000)
            assert page.goto(f"{base}/portal/{ACCOUNT}").status == 401
            page.goto(f"{base}/portal/login?account={ACCOUNT}")
            page.get_by_test_id("login-key").fill(key)
            with page.expect_navigation():
                page.get_by_test_id("login-submit").click()
            assert page.url == f"{base}/portal/{ACCOUNT}"
            [cookie] = ctx.cookies()
            assert (cookie["name"], cookie["value"], cookie["httpOnly"], cookie["sameSite"]) == \
                ("portal_key", key, True, "Strict")
            shot = tmp_path / "portal.png"
            page.screenshot(path=str(shot), full_page=True)
            width, height = png_size(shot)
            assert width >= 1280 and height >= 900 and shot.stat().st_size > 20_000
            compared = assert_page_equals_api(page, usage, invoices)
            assert compared >= 2 * len(by_day) + 10
            assert shown(page, "account") == ACCOUNT
            assert page.goto(f"{base}/portal/{OTHER}").status == 403
            ctx.close()

            # the X-API-Key header alone, no cookie
            ctx = browser.new_context(extra_http_headers=auth)
            page = ctx.new_page()
            page.set_default_timeout(60_000)
            assert page.goto(f"{base}/portal/{ACCOUNT}").status == 200
            assert assert_page_equals_api(page, usage, invoices) == compared
            assert page.goto(f"{base}/portal/{OTHER}").status == 403
            ctx.close()
        finally:
            browser.close()
