"""Reference data as operations (issue 15), on the real broker and real Postgres: the bundled real meters
onboarded through the CLI (a CSV derived from the bundled reference JSON in the test, no JSON loaded) bill
to the same ledger as the JSON path; a move-out mid-month stops daily charges and finalizes the last bill;
a CSV with one bad line changes nothing and names the line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from datetime import date, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.ingest.nem12 import read_nem12
from pipeline.reference import BUNDLED_REFERENCE
from tests.batchbill import expected_bills
from tests.integration.conftest import DATA, Env, isolated_env, publish_files

pytestmark = pytest.mark.integration

NEM12 = DATA / "nem12"
# three real files: three real NMIs on three accounts, import and export channels, two months
FILES = [NEM12 / "NEM12#000000000000001#CNRGYMDP#NEMMCO.zip", NEM12 / "NEM12#000000000000006#CNRGYMDP#NEMMCO.zip",
         NEM12 / "NEM12#SCENARIO1005032705#ENERGEXM#NEMMCO.zip"]
NEM_TIME = timezone(timedelta(hours=10))  # service dates are judged on the NEM day (UTC+10), as ingest does


def cli(env: Env, *args: str, ok: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "pipeline", *args], env={**env.env, "PIPELINE_OPERATOR": "test-op"},
                         capture_output=True, text=True, timeout=timeout)
    if ok:
        assert res.returncode == 0, (args, res.stdout, res.stderr)
    return res


def onboarding_csv(path: Path) -> int:
    """The bundled reference data as one onboarding CSV (accounts, meters, subjects, plans): returns its lines."""
    ref = json.loads(BUNDLED_REFERENCE.read_text())
    currency = {b["id"]: b["currency"] for b in ref["price_books"]}
    plans: dict[str, list[dict]] = {}
    for pa in ref["plan_assignments"]:
        plans.setdefault(pa["account"], []).append(pa)
    rows = []
    for a in ref["accounts"]:
        first_plan = plans[a["account"]][0]
        rows.append({"account": a["account"], "name": a["name"], "timezone": a["timezone"],
                     "holiday_region": a["holiday_region"], "billing_cycle": a["billing_cycle"],
                     "billing_anchor": a["billing_anchor"], "currency": currency[first_plan["price_book_id"]],
                     "net_days": a["net_days"], "price_book_id": first_plan["price_book_id"],
                     "plan_from": first_plan["effective_from"], "plan_to": first_plan["effective_to"] or ""})
        rows.extend({"account": a["account"], "price_book_id": pa["price_book_id"], "plan_from": pa["effective_from"],
                     "plan_to": pa["effective_to"] or ""} for pa in plans[a["account"]][1:])
    rows.extend({"account": sp["account"], "nmi": sp["nmi"], "service_from": sp["effective_from"],
                 "service_to": sp["effective_to"] or ""} for sp in ref["service_points"])
    rows.extend({"account": ts["account"], "subject": ts["subject"], "service_from": ts["effective_from"],
                 "service_to": ts["effective_to"] or ""} for ts in ref["telemetry_subjects"])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["account", "name", "timezone", "holiday_region", "billing_cycle", "billing_anchor",
                               "currency", "net_days", "nmi", "subject", "service_from", "service_to",
                               "price_book_id", "plan_from", "plan_to"])
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def bill(env: Env, files: list[Path]) -> dict[tuple[str, str], dict[str, object]]:
    env.env["PIPELINE_INVOICE_IDLE_CLOSE_S"] = "5"
    env.start_all()
    published = publish_files(env, files)
    report = env.wait_accounted(published=published)
    assert (report.billed, report.dead_lettered, report.refused) == (published, 0, {})
    env.wait_all_finalized()
    env.assert_invoice_structure()
    assert env.stop_all() == {s: [0] for s in ("ingest", "windowing", "rating", "invoicing")}
    return env.ledger_totals()


def test_meters_onboarded_through_the_cli_bill_like_the_json_path(base_settings: Settings, tmp_path: Path) -> None:
    with isolated_env(base_settings, tmp_path / "cli", reference=False) as env:
        assert env.sql("SELECT count(*) FROM accounts")[0][0] == 0
        books = tmp_path / "books.json"
        books.write_text(json.dumps(json.loads(BUNDLED_REFERENCE.read_text())["price_books"]))
        cli(env, "pricebook", "publish", str(books))
        lines = onboarding_csv(tmp_path / "onboard.csv")
        dry = cli(env, "accounts", "import", str(tmp_path / "onboard.csv"), "--dry-run", "--no-progress")
        assert "dry run: 166 change(s) would be applied" in dry.stdout, dry.stdout
        assert env.sql("SELECT count(*) FROM accounts")[0][0] == 0
        # a service that starts after its NMI's first reading in the files is refused, naming the line
        text = (tmp_path / "onboard.csv").read_text()
        line = next(n for n, row in enumerate(text.splitlines(), 1) if ",NEM1201002,,2005-03-15," in row)
        (tmp_path / "late.csv").write_text(text.replace(",NEM1201002,,2005-03-15,", ",NEM1201002,,2005-03-16,"))
        late = cli(env, "accounts", "import", str(tmp_path / "late.csv"), "--no-progress", "--nem12", str(FILES[0]),
                   ok=False)
        assert late.returncode == 1 and late.stderr.splitlines()[0] == (
            f"line {line}: SERVICE_STARTS_AFTER_FIRST_READING: service of NEM1201002 starts 2005-03-16, after "
            "its first reading on 2005-03-15: those readings would be refused (OUTSIDE_SERVICE_DATES)"), late.stderr
        assert env.sql("SELECT count(*) FROM accounts")[0][0] == 0
        out = cli(env, "accounts", "import", str(tmp_path / "onboard.csv"), "--no-progress",
                  *(a for f in FILES for a in ("--nem12", str(f))))
        assert "applied 166 change(s)" in out.stdout
        assert lines == 55 + 52 + 4
        assert env.sql("SELECT count(*), count(DISTINCT source), min(changed_by), max(changed_by) "
                       "FROM reference_changes") == [(166, lines, "test-op", "test-op")]
        assert env.sql("SELECT operation, count(*) FROM reference_changes GROUP BY 1 ORDER BY 1") == [
            ("account.create", 55), ("meter.attach", 52), ("plan.assign", 55), ("subject.attach", 4)]
        # importing the same file again changes nothing
        assert "applied 0 change(s) (nothing to do)" in cli(env, "accounts", "import", str(tmp_path / "onboard.csv"),
                                                           "--no-progress").stdout
        via_cli = bill(env, FILES)
    with isolated_env(base_settings, tmp_path / "json") as env:
        via_json = bill(env, FILES)
    assert len(via_cli) == 3 and via_cli == via_json
    want = {(a, p.isoformat()): {k: v for k, v in lines.items() if v}
            for (a, p), lines in expected_bills(FILES, BUNDLED_REFERENCE).items()}
    assert via_cli == want


NMI, ACCOUNT, MOVE_OUT = "NEM1209162", "ACC-1036", date(2005, 3, 14)
FILE = NEM12 / "NEM12#000000000000009#CNRGYMDP#NEMMCO.zip"


def test_a_move_out_mid_month_stops_daily_charges_and_finalizes_the_last_bill(pipeline_env: Env) -> None:
    env = pipeline_env
    # 2005 data: the account's clock (its data ends at the move-out) never reaches the last bill's close time;
    # quiet for 5 s past it, the account has it finalized (test_the_final_invoice_closes_at_the_move_out... shows
    # that close time is the move-out + the close delay)
    env.env["PIPELINE_INVOICE_IDLE_CLOSE_S"] = "5"
    out = cli(env, "meters", "move-out", NMI, "--on", MOVE_OUT.isoformat())
    assert f"done: meter.move_out {NMI}@2005-03-10 (effective 2005-03-14)" in out.stdout
    assert env.sql("SELECT effective_from, effective_to FROM service_points WHERE nmi = %s", (NMI,)) == [
        (date(2005, 3, 10), MOVE_OUT)]
    (before, after), = env.sql("SELECT before, after FROM reference_changes WHERE operation = 'meter.move_out'")
    assert before["effective_to"] is None and after["effective_to"] == "2005-03-14"
    again = cli(env, "meters", "move-out", NMI, "--on", "2005-03-15", ok=False)
    assert again.returncode == 1 and "ALREADY_ENDED" in again.stderr

    readings = read_nem12(FILE).readings
    after_move_out = [r for r in readings if r.interval_start.astimezone(NEM_TIME).date() >= MOVE_OUT]
    assert 0 < len(after_move_out) < len(readings)
    env.start_all()
    published = publish_files(env, [FILE])
    report = env.wait_accounted(published=published)
    assert (report.billed, report.dead_lettered, report.refused) == (
        published - len(after_move_out), 0, {"OUTSIDE_SERVICE_DATES": len(after_move_out)})
    env.wait_all_finalized()
    got = env.ledger_totals()
    assert list(got) == [(ACCOUNT, "2005-03-01")]
    lines = got[(ACCOUNT, "2005-03-01")]
    # daily supply for 10, 11, 12 and 13 March only: 4 days x $0.9375 = $3.75 (the whole month would be 22 days)
    assert lines["ACTEWAGL-HOME-TOU|supply|"] == Decimal("4") * Decimal("0.9375") == Decimal("3.75")
    kept = {k: v for k, v in expected_bills(
        [FILE], BUNDLED_REFERENCE, keep=lambda r: r.interval_start.astimezone(NEM_TIME).date() < MOVE_OUT)[
        (ACCOUNT, date(2005, 3, 1))].items() if v}
    energy = {k: v for k, v in kept.items() if "|energy|" in k}
    assert {k: v for k, v in lines.items() if "|energy|" in k} == energy
    gst = ((sum(energy.values()) + Decimal("3.75")) * Decimal("0.1")).quantize(Decimal("0.01"), ROUND_HALF_UP)
    assert lines["ACTEWAGL-HOME-TOU|gst|"] == gst
    # the last bill is finalized, and it is the last: nothing after the move-out opened another one
    assert env.sql("SELECT invoice_id, status FROM invoices WHERE account = %s", (ACCOUNT,)) == [
        (f"{ACCOUNT}|2005-03-01|AUD", "FINALIZED")]
    env.assert_invoice_structure()
    assert env.stop_all() == {s: [0] for s in ("ingest", "windowing", "rating", "invoicing")}


def test_a_move_out_recorded_after_the_bill_credits_the_later_daily_charges(pipeline_env: Env) -> None:
    env = pipeline_env
    env.env["PIPELINE_INVOICE_IDLE_CLOSE_S"] = "5"
    env.env["PIPELINE_REFERENCE_REFRESH_S"] = "1"  # the running stages see the operator's change within a second
    env.start_all()
    published = publish_files(env, [FILE])
    report = env.wait_accounted(published=published)
    assert (report.billed, report.refused) == (published, {})
    env.wait_all_finalized()
    supply = "ACTEWAGL-HOME-TOU|supply|"
    assert env.ledger_totals()[(ACCOUNT, "2005-03-01")][supply] == Decimal("20.63")  # 22 days x 0.9375, rounded
    # the operator records the move-out after the March bill was finalized: the rating stage re-rates March
    cli(env, "meters", "move-out", NMI, "--on", MOVE_OUT.isoformat())
    deadline = time.monotonic() + 120
    while env.ledger_totals()[(ACCOUNT, "2005-03-01")][supply] != Decimal("3.75"):
        env.check_alive()
        assert time.monotonic() < deadline, env.ledger_totals()
        time.sleep(0.5)
    # the credit is a prior-period adjustment on the next invoice, naming the finalized March invoice
    (kind, invoice_id, adjusts, amount, cause), = env.sql(
        "SELECT line_kind, invoice_id, adjusts_invoice_id, amount, cause FROM invoice_lines "
        "WHERE component_id = 'supply' AND cause LIKE 'reference:%%'")
    assert (kind, invoice_id, adjusts, amount) == (
        "ADJUSTMENT", f"{ACCOUNT}|2005-04-01|AUD", f"{ACCOUNT}|2005-03-01|AUD", Decimal("-16.88"))
    assert cause.startswith("reference:1:")
    env.wait_all_finalized()
    env.assert_invoice_structure()
    assert env.stop_all() == {s: [0] for s in ("ingest", "windowing", "rating", "invoicing")}

def test_a_csv_with_one_bad_line_changes_nothing_and_names_the_line(pipeline_env: Env, tmp_path: Path) -> None:
    env = pipeline_env
    header = "account,timezone,billing_cycle,billing_anchor,currency,nmi,service_from,price_book_id\n"
    good = [
        "ACC-2001,Australia/Sydney,MONTHLY,2025-01-01,AUD,NEW0000001,2025-07-01,ACTEWAGL-HOME-TOU\n",
        "ACC-2002,Australia/Melbourne,QUARTERLY,2025-01-01,AUD,NEW0000002,2025-07-01,ACTEWAGL-HOME\n",
        "ACC-2003,Australia/Brisbane,MONTHLY,2025-01-01,AUD,NEW0000003,2025-07-01,ACTEWAGL-HOME-TOU\n",
    ]
    bad = "ACC-2004,Australia/Sydney,MONTHLY,2025-01-01,AUD,NEM1201002,2025-07-01,ACTEWAGL-HOME-TOU\n"
    (tmp_path / "bad.csv").write_text(header + good[0] + good[1] + bad + good[2])
    tables = ("accounts", "service_points", "plan_assignments", "telemetry_subjects", "reference_changes")

    def counts() -> list[int]:
        return [env.sql(f"SELECT count(*) FROM {t}")[0][0] for t in tables]

    before = counts()
    for dry in ((), ("--dry-run",)):
        res = cli(env, "accounts", "import", str(tmp_path / "bad.csv"), "--no-progress", *dry, ok=False)
        assert res.returncode == 1, res.stdout
        assert res.stderr.splitlines()[0] == (
            "line 4: NMI_ATTACHED_ELSEWHERE: NMI NEM1201002 is attached to account ACC-1002 over 2005-03-15..open, "
            "which overlaps 2025-07-01..open: move it out first")
        assert "refused: 1 problem(s) on 1 line(s); nothing was changed" in res.stderr
        assert counts() == before

    # every problem is reported, each with its line
    (tmp_path / "worse.csv").write_text(
        header + good[0]
        + "ACC-2005,Mars/Olympus,MONTHLY,2025-01-01,AUD,NEW0000005,2025-07-01,ACTEWAGL-HOME-TOU\n"
        + "ACC-2001,Australia/Sydney,MONTHLY,2025-01-01,AUD,NEW0000006,2025-07-01,NO-SUCH-BOOK\n"
        + "ACC-2001,Australia/Sydney,MONTHLY,2025-01-01,AUD,NEW0000001,2025-08-01,\n"
        + "ACC-2006,Australia/Sydney,MONTHLY,2025-13-01,AUD,NEW0000007,2025-07-01,ACTEWAGL-HOME-TOU\n")
    res = cli(env, "accounts", "import", str(tmp_path / "worse.csv"), "--dry-run", "--no-progress", ok=False)
    assert res.returncode == 1
    assert [ln.split(":")[0] + ":" + ln.split(":")[1] for ln in res.stderr.splitlines()[:-1]] == [
        "line 3: BAD_TIMEZONE", "line 3: UNKNOWN_ACCOUNT", "line 3: UNKNOWN_ACCOUNT", "line 4: UNKNOWN_PRICE_BOOK",
        "line 5: OVERLAPPING_DATES", "line 6: INVALID_FIELD"], res.stderr
    assert counts() == before

    # the good lines alone: a dry run changes nothing, then the import applies them, once
    (tmp_path / "good.csv").write_text(header + "".join(good))
    assert "dry run: 9 change(s) would be applied" in cli(env, "accounts", "import", str(tmp_path / "good.csv"),
                                                          "--dry-run", "--no-progress").stdout
    assert counts() == before
    assert "applied 9 change(s)" in cli(env, "accounts", "import", str(tmp_path / "good.csv"), "--no-progress").stdout
    assert counts() == [before[0] + 3, before[1] + 3, before[2] + 3, before[3], before[4] + 9]
    assert env.sql("SELECT source FROM reference_changes WHERE entity_key = 'NEW0000002@2025-07-01'") == [
        ("good.csv line 3",)]


def test_the_final_invoice_closes_at_the_move_out_plus_the_close_delay(pipeline_env: Env) -> None:
    from pipeline.codec import default_codec
    from pipeline.invoicing.ledger import LedgerStore

    env = pipeline_env
    group = env.topics.group("invoicing")
    # two accounts' March 2005 invoices, each closing at 1 April (Sydney) + 72 h, and each account's clock at
    # 20 March: neither is due by its period end
    for account in (ACCOUNT, "ACC-1002"):
        env.execute("INSERT INTO invoices (invoice_id, account, period_start, period_end, currency, close_at) "
                    "VALUES (%s, %s, '2005-03-01', '2005-04-01', 'AUD', '2005-04-03T13:00:00Z')",
                    (f"{account}|2005-03-01|AUD", account))
        env.execute("INSERT INTO account_clock (consumer_group, account, clock, last_line_at) "
                    "VALUES (%s, %s, '2005-03-20T00:00:00Z', now())", (group, account))
    store = LedgerStore(env.settings.database_url, group, default_codec(), close_delay=timedelta(hours=72))
    try:
        assert store.finalize_due() == []
        # ACC-1036 moves out on 14 March: its last bill closes at 14 March 00:00 AEDT (13 March 13:00 UTC) + 72 h
        # = 16 March 13:00 UTC, which its clock (20 March) has passed; ACC-1002 stays in service
        cli(env, "meters", "move-out", NMI, "--on", MOVE_OUT.isoformat())
        assert env.sql("SELECT account, service_end FROM account_service_end") == [(ACCOUNT, MOVE_OUT)]
        assert len(store.finalize_due()) == 1
        assert env.sql("SELECT account, status FROM invoices ORDER BY account") == [
            ("ACC-1002", "OPEN"), (ACCOUNT, "FINALIZED")]
        # a clock one second short of the final close time does not close it
        env.execute("INSERT INTO invoices (invoice_id, account, period_start, period_end, currency, close_at) "
                    "VALUES ('ACC-1020|2005-03-01|AUD', 'ACC-1020', '2005-03-01', '2005-04-01', 'AUD', "
                    "'2005-04-03T13:00:00Z')")
        env.execute("INSERT INTO account_clock (consumer_group, account, clock, last_line_at) "
                    "VALUES (%s, 'ACC-1020', '2005-03-23T12:59:59Z', now())", (group,))
        cli(env, "meters", "move-out", "NEM1205082", "--on", "2005-03-21")  # 21 Mar 00:00 AEDT + 72 h = 23 Mar 13:00 Z
        assert store.finalize_due() == []
        env.execute("UPDATE account_clock SET clock = '2005-03-23T13:00:00Z' WHERE account = 'ACC-1020'")
        assert len(store.finalize_due()) == 1
    finally:
        store.close()


def test_load_reference_keeps_what_it_replaces(pipeline_env: Env) -> None:
    from pipeline.reference import ReferenceFile
    from pipeline.refstore import load_reference_file
    from pipeline.runtime import postgres

    env = pipeline_env
    before = env.sql("SELECT count(*) FROM reference_changes")[0][0]
    ref = ReferenceFile.read(BUNDLED_REFERENCE)
    postgres.with_reconnect(env.settings.database_url, lambda c: load_reference_file(c, ref, "bob", "json again"))
    assert env.sql("SELECT count(*) FROM reference_changes")[0][0] == before  # the same file: nothing changed
    switched = ref.model_copy(update={"plan_assignments": tuple(
        pa.model_copy(update={"price_book_id": "ACTEWAGL-HOME"}) if pa.account == "ACC-1002" else pa
        for pa in ref.plan_assignments)})
    postgres.with_reconnect(env.settings.database_url, lambda c: load_reference_file(c, switched, "bob", "json v2"))
    assert env.sql("SELECT changed_by, source, operation, entity_key, before->>'price_book_id', "
                   "after->>'price_book_id' FROM reference_changes WHERE change_id > %s", (before,)) == [
        ("bob", "json v2", "load.plan_assignment", "ACC-1002@2004-01-01", "ACTEWAGL-HOME-TOU", "ACTEWAGL-HOME")]
