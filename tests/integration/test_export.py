"""`pipeline export` over the real broker and Postgres, to a real S3 API server (moto in server mode, a separate
process on 127.0.0.1) and to a folder (issue 15, seed 004): real NEM12 data billed, exported as CSV and Parquet
in files of at most `--max-rows` rows, read back through boto3 and checked against the manifest's checksums and
the ledger; an unresolved refused reading and a reconciliation break each export nothing and exit 1."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from botocore.config import Config

from pipeline.codec import default_codec
from pipeline.ingest.nem12 import read_nem12
from pipeline.records import UsageWindow
from pipeline.runtime.kafka import read_all
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

# NEM1201002 (ACC-1002) readings from 15 to 18 March 2005 (NEM dates); another meter beside it
FILES = [DATA / "nem12" / "NEM12#000000000000001#CNRGYMDP#NEMMCO.zip",
         DATA / "nem12" / "NEM12#000000000000005#CNRGYMDP#NEMMCO.zip"]
MORE = DATA / "nem12" / "NEM12#000000000000002#CNRGYMDP#NEMMCO.zip"
NMI, ACCOUNT = "NEM1201002", "ACC-1002"
USAGE_DAY = "2005-03-15"
BUCKET, PREFIX = "billing-exports", "daily"
MAX_ROWS = {"ledger_lines": 4, "invoices": 4, "usage_windows": 40}  # small: several files each


@pytest.fixture
def s3_endpoint(tmp_path: Path) -> Iterator[str]:
    """A real S3 API server (moto, server mode) in its own process on 127.0.0.1, stopped afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "moto.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, (tmp_path / "moto.log").read_text()
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                assert time.monotonic() < deadline, "moto server did not answer within 60 s"
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def s3_client(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing",
                        config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3}))


def keys(s3, prefix: str = "") -> list[str]:  # type: ignore[no-untyped-def]
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def export(env: Env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "export", "--no-progress", *args], env=env.env,
                          capture_output=True, text=True, timeout=240)


def read_back(s3, folder: str) -> tuple[dict, dict[str, list[dict]]]:  # type: ignore[no-untyped-def]
    """The manifest of an export and its rows per format, every file checked against the manifest (SHA-256,
    bytes, rows, at most max rows) and nothing else in the folder."""
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{folder}/manifest.json")["Body"].read())
    assert keys(s3, folder + "/") == sorted([f"{folder}/manifest.json"]
                                            + [f"{folder}/{f['name']}" for f in manifest["files"]])
    rows: dict[str, list[dict]] = {"csv": [], "parquet": []}
    for f in manifest["files"]:
        data = s3.get_object(Bucket=BUCKET, Key=f"{folder}/{f['name']}")["Body"].read()
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"], f["name"]
        if f["format"] == "csv":
            part = list(csv.DictReader(io.StringIO(data.decode())))
        else:
            part = pq.read_table(io.BytesIO(data)).to_pylist()
        assert len(part) == f["rows"] <= manifest["max_rows_per_file"]
        assert f["first_row"] == len(rows[f["format"]])
        rows[f["format"]].extend(part)
    for fmt in rows:
        assert len(rows[fmt]) == manifest["row_count"]
    return manifest, rows


def test_export_to_a_real_s3_server_is_checked_back_and_failed_prechecks_export_nothing(
        pipeline_env: Env, s3_endpoint: str, tmp_path: Path) -> None:
    env = pipeline_env
    env.env.update({"PIPELINE_REFERENCE_REFRESH_S": "1", "PIPELINE_INVOICE_IDLE_CLOSE_S": "5",
                    "PIPELINE_S3_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "PIPELINE_S3_CONNECT_TIMEOUT_S": "5",
                    "PIPELINE_S3_READ_TIMEOUT_S": "30"})
    env.env.pop("AWS_PROFILE", None)
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    dest = f"s3://{BUCKET}/{PREFIX}"
    # the meter's service point starts two days after its data: those readings are refused (usage.late)
    assert env.execute("UPDATE service_points SET effective_from = %s WHERE nmi = %s", (date(2005, 3, 17), NMI)) == 1
    env.start_all()
    published = publish_files(env, FILES)
    report = env.wait_accounted(published=published)
    refused = report.refused["OUTSIDE_SERVICE_DATES"]
    assert refused > 0 and report.billed == published - refused
    today = datetime.now(UTC).date().isoformat()

    # 1. reconciliation passes (every reading billed or refused) but refused readings are still open in the
    # exported periods: nothing is exported, exit 1, naming them
    res = export(env, "--date", today, "--dest", dest, "--max-rows", "4")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "nothing exported: precheck late failed for ledger_lines:" in res.stderr
    assert f"{refused:,} refused readings still open: OUTSIDE_SERVICE_DATES for {ACCOUNT}" in res.stderr
    assert "precheck reconciliation failed" not in res.stderr
    assert keys(s3) == []
    assert env.sql("SELECT count(*) FROM export_history")[0][0] == 0

    # the operator fixes the cause and replays the refused readings: they are billed, the refusals resolved
    assert env.execute("UPDATE service_points SET effective_from = %s WHERE nmi = %s", (date(2005, 3, 15), NMI)) == 1
    replay = subprocess.run([sys.executable, "-m", "pipeline", "late", "replay", "--reason", "OUTSIDE_SERVICE_DATES"],
                            env=env.env, capture_output=True, text=True, timeout=180)
    assert replay.returncode == 0, replay.stderr
    report = env.wait_accounted(published=published + refused)
    assert report.billed == published
    env.wait_all_finalized()

    # 2. the export: every file read back through boto3 matches the manifest and the ledger
    res = export(env, "ledger_lines", "invoices", "--date", today, "--dest", dest, "--max-rows", "4")
    assert res.returncode == 0, (res.stdout, res.stderr)
    res = export(env, "usage_windows", "--date", USAGE_DAY, "--dest", dest, "--max-rows", "40")
    assert res.returncode == 0, (res.stdout, res.stderr)
    day0 = datetime.fromisoformat(today).replace(tzinfo=UTC)
    day = (day0, day0 + timedelta(days=1))
    lines = env.sql("SELECT line_id, amount FROM invoice_lines WHERE appended_at >= %s AND appended_at < %s", day)
    assert len(lines) == env.line_count() > 2 * MAX_ROWS["ledger_lines"]  # several files
    invoices = env.sql("SELECT invoice_id, amount_due FROM invoices WHERE finalized_at >= %s AND finalized_at < %s",
                       day)
    assert len(invoices) == env.sql("SELECT count(*) FROM invoices")[0][0] > 0
    codec = default_codec()
    latest: dict[str, UsageWindow] = {}
    for m in read_all(env.settings.kafka_bootstrap, env.topics.usage_windows):
        w = codec.decode(m.value, UsageWindow)
        if w.window_start.date().isoformat() == USAGE_DAY and (
                w.window_id not in latest or w.revision > latest[w.window_id].revision):
            latest[w.window_id] = w
    assert len(latest) > MAX_ROWS["usage_windows"]

    expected = {"ledger_lines": (today, "line_id", {r[0]: r[1] for r in lines}, "amount"),
                "invoices": (today, "invoice_id", {r[0]: r[1] for r in invoices}, "amount_due"),
                "usage_windows": (USAGE_DAY, "window_id", {k: w.value for k, w in latest.items()}, "value")}
    manifests = {}
    for dataset, (period, key, want, amount) in expected.items():
        folder = f"{PREFIX}/live/{dataset}/{period}/v1"
        manifest, rows = read_back(s3, folder)
        manifests[dataset] = manifest
        assert (manifest["dataset"], manifest["generation"], manifest["version"]) == (dataset, "live", 1)
        assert manifest["period"]["day"] == period and manifest["max_rows_per_file"] == MAX_ROWS[dataset]
        assert manifest["row_count"] == len(want)
        n_files = -(-len(want) // MAX_ROWS[dataset])
        assert [len([f for f in manifest["files"] if f["format"] == fmt]) for fmt in ("csv", "parquet")] == [
            n_files, n_files]
        assert [p["passed"] for p in manifest["prechecks"]] == [True, True]
        assert {r[key]: Decimal(r[amount]) for r in rows["csv"]} == want  # CSV: exact decimals as text
        assert {r[key]: r[amount] for r in rows["parquet"]} == want  # Parquet: decimal128(28, 6)
        assert [r[key] for r in rows["csv"]] == sorted(want)
    assert sum(Decimal(x) for x in [r[1] for r in lines]) == env.sql("SELECT sum(amount) FROM invoice_lines")[0][0]
    history = env.sql("SELECT dataset, version, status, row_count, file_count, manifest->>'content_sha256' "
                      "FROM export_history ORDER BY dataset")
    assert history == [(d, 1, "COMPLETE", manifests[d]["row_count"], -(-manifests[d]["row_count"] // MAX_ROWS[d]),
                        manifests[d]["content_sha256"]) for d in sorted(expected)]
    listed = subprocess.run([sys.executable, "-m", "pipeline", "exports"], env=env.env, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0 and "3 export(s)" in listed.stdout, listed.stderr

    # 3. exporting the same days again writes nothing (the content is unchanged)
    before = keys(s3)
    res = export(env, "ledger_lines", "invoices", "--date", today, "--dest", dest, "--max-rows", "4")
    assert res.returncode == 0 and "0 export(s) written, 2 unchanged" in res.stdout, (res.stdout, res.stderr)
    assert keys(s3) == before
    assert env.sql("SELECT count(*) FROM export_history")[0][0] == 3

    # 4. file:// gives byte-identical data files
    res = export(env, "ledger_lines", "--date", today, "--dest", (tmp_path / "out").as_uri(), "--max-rows", "4")
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "out" / "live" / "ledger_lines" / today / "v1"
    local = json.loads((folder / "manifest.json").read_text())
    assert [(f["name"], f["sha256"]) for f in local["files"]] == [
        (f["name"], f["sha256"]) for f in manifests["ledger_lines"]["files"]]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", *(f["name"] for f in local["files"])])
    for f in local["files"]:
        assert hashlib.sha256((folder / f["name"]).read_bytes()).hexdigest() == f["sha256"]

    # 5. a reconciliation break (readings published while ingest is down: pending at ingest): nothing is exported
    assert env.stop(env.procs["ingest"][-1]) == 0
    pending = publish_files(env, [MORE])
    assert pending > 0 and len(read_nem12(MORE).readings) == pending
    history_before = env.sql("SELECT export_id, status FROM export_history ORDER BY export_id")
    res = export(env, "ledger_lines", "--date", today, "--dest", dest, "--max-rows", "7")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "nothing exported: precheck reconciliation failed for ledger_lines:" in res.stderr
    assert f"pending at ingest: {pending:,} readings" in res.stderr
    assert keys(s3) == before
    assert env.sql("SELECT export_id, status FROM export_history ORDER BY export_id") == history_before


def test_a_destination_that_fails_is_recorded_and_its_version_never_reused(pipeline_env: Env,
                                                                           s3_endpoint: str) -> None:
    env = pipeline_env  # nothing published: reconciliation passes with no readings, the day has no rows
    env.env.update({"PIPELINE_S3_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "PIPELINE_S3_MAX_ATTEMPTS": "2"})
    env.env.pop("AWS_PROFILE", None)
    dest = f"s3://{BUCKET}/{PREFIX}"
    res = export(env, "invoices", "--date", "2026-01-31", "--dest", dest)  # the bucket does not exist yet
    assert res.returncode == 3, (res.stdout, res.stderr)
    assert "export failed (recorded as FAILED in export_history)" in res.stderr and "NoSuchBucket" in res.stderr
    assert env.sql("SELECT version, status, position('NoSuchBucket' in error) > 0 FROM export_history") == [
        (1, "FAILED", True)]
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    res = export(env, "invoices", "--date", "2026-01-31", "--dest", dest)
    assert res.returncode == 0, (res.stdout, res.stderr)
    manifest, rows = read_back(s3, f"{PREFIX}/live/invoices/2026-01-31/v2")
    assert (manifest["version"], manifest["row_count"], rows) == (2, 0, {"csv": [], "parquet": []})
    assert [(f["name"], f["rows"]) for f in manifest["files"]] == [("part-00000.csv", 0), ("part-00000.parquet", 0)]
    assert env.sql("SELECT version, status FROM export_history ORDER BY version") == [(1, "FAILED"), (2, "COMPLETE")]
    res = export(env, "invoices", "--date", "2026-01-31", "--dest", dest)
    assert res.returncode == 0 and "unchanged since v2" in res.stdout, res.stdout
