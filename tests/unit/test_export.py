"""The pure rules of `pipeline export` (operations/export.py): files, CSV cells, manifest, prechecks, versions;
and the two adapters on local bytes (Parquet round trip, the file:// store)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from pipeline.operations import export as ex
from pipeline.operations.reconcile import Forwarded, Report
from pipeline.records import LateEvent, UsageEvent, UsageWindow
from pipeline.runtime.objectstore import FileStore
from pipeline.runtime.parquet import parquet_bytes, read_parquet
from pipeline.windowing.windows import _ms

DAY = ex.Period(date(2005, 3, 15))


def at(h: int, d: int = 15, m: int = 3) -> datetime:
    return datetime(2005, m, d, h, tzinfo=UTC)


def late(event_id: str = "NMI1/E1/1", account: str = "ACC-1", when: datetime | None = None, version: int = 5,
         stage: str = "ingest", partition: int = -1, offset: int = -1) -> LateEvent:
    when = when or at(3)
    ev = UsageEvent(event_id, account, "NMI1/E1", "energy_import", "kWh", when, when, Decimal("1.5"),
                    datetime(2005, 4, 1, 0, 0, version, tzinfo=UTC), "A", "f#1")
    return LateEvent(ev, "OUTSIDE_SERVICE_DATES", when, when, 0, stage=stage, input_partition=partition,
                     input_offset=offset)


def fwd(event_id: str, version_ms: int, partition: int = 0, offset: int = 0) -> Forwarded:
    return Forwarded(partition, offset, event_id, "ACC-1", "NMI1/E1", "energy_import", 0, version_ms, 1, "A")


def window(start: datetime, wid: str = "w", revision: int = 0) -> UsageWindow:
    return UsageWindow(wid, "ACC-1", "NMI1/E1", "energy_import", "kWh", start, start, revision, "ON_TIME",
                       Decimal("2.500000"), Decimal("0.5"), 3, ("A", "E"), ("f#1", "f#2"), start)


# --- files -------------------------------------------------------------------------------------------------
def test_rows_are_cut_into_files_of_at_most_max_rows_in_order() -> None:
    assert ex.partition_rows(250, 100) == [range(0, 100), range(100, 200), range(200, 250)]
    assert ex.partition_rows(200, 100) == [range(0, 100), range(100, 200)]
    assert ex.partition_rows(1, 100) == [range(0, 1)]
    assert ex.partition_rows(0, 100) == [range(0, 0)]  # a day without rows still has one (empty) file
    assert ex.partition_rows(3, 1) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError, match="max_rows >= 1"):
        ex.partition_rows(3, 0)


def test_csv_cells_are_exact_and_unambiguous() -> None:
    assert ex.csv_value("decimal", Decimal("1E-6")) == "0.000001"  # never exponent notation
    assert ex.csv_value("decimal", Decimal("120.500000")) == "120.500000"
    assert ex.csv_value("timestamp", datetime(2005, 3, 15, 1, 2, 3, 4, tzinfo=UTC)) == "2005-03-15T01:02:03.000004Z"
    assert ex.csv_value("date", date(2005, 3, 1)) == "2005-03-01"
    assert ex.csv_value("json", {"b": [1], "a": "x"}) == '{"a":"x","b":[1]}'
    assert ex.csv_value("text", None) == ""
    assert ex.csv_value("int", 7) == "7"
    with pytest.raises(ValueError, match="no time zone"):
        ex.csv_value("timestamp", datetime(2005, 3, 15))
    cols = (("a", "text"), ("b", "decimal"))
    data = ex.csv_bytes(cols, [("x, \"y\"", Decimal("1.5")), ("z", None)])
    assert data == b'a,b\n"x, ""y""",1.5\nz,\n'
    assert list(csv.reader(io.StringIO(data.decode()))) == [["a", "b"], ['x, "y"', "1.5"], ["z", ""]]


def test_content_hash_does_not_depend_on_file_sizes_but_on_every_row() -> None:
    cols = (("a", "int"),)
    rows = [(i,) for i in range(10)]
    assert ex.content_sha256(cols, rows) == hashlib.sha256(ex.csv_bytes(cols, rows)).hexdigest()
    assert ex.content_sha256(cols, rows) != ex.content_sha256(cols, [*rows[:9], (99,)])


def test_manifest_names_every_file_with_rows_and_checksum() -> None:
    entries = [ex.FileEntry("part-00000.csv", "csv", 2, 0, 10, "aa"), ex.FileEntry("part-00001.csv", "csv", 1, 2, 8,
                                                                                   "bb"),
               ex.FileEntry("part-00000.parquet", "parquet", 2, 0, 99, "cc"),
               ex.FileEntry("part-00001.parquet", "parquet", 1, 2, 98, "dd")]
    checks = [ex.Precheck("reconciliation", True, ("readings in 3",)), ex.Precheck("late", True, ())]
    m = ex.build_manifest(dataset="invoices", period=DAY, generation="live", version=2, destination="s3://b/p",
                          folder="live/invoices/2005-03-15/v2", created_at=datetime(2026, 12, 5, 20, tzinfo=UTC),
                          max_rows=2, row_count=3, content="c0", files=entries, prechecks=checks)
    assert m["period"] == {"day": "2005-03-15", "start": "2005-03-15T00:00:00Z", "end": "2005-03-16T00:00:00Z"}
    assert (m["dataset"], m["generation"], m["version"], m["row_count"], m["max_rows_per_file"]) == (
        "invoices", "live", 2, 3, 2)
    assert m["files"][1] == {"name": "part-00001.csv", "format": "csv", "rows": 1, "first_row": 2, "bytes": 8,
                             "sha256": "bb"}
    assert [c["name"] for c in m["columns"]] == [n for n, _ in ex.INVOICE_COLUMNS]
    assert m["prechecks"][0] == {"name": "reconciliation", "passed": True, "detail": ["readings in 3"]}
    assert json.loads(ex.manifest_bytes(m)) == m
    with pytest.raises(ValueError, match="rows for 4"):  # files that do not add up are refused
        ex.build_manifest(dataset="invoices", period=DAY, generation="live", version=1, destination="d", folder="f",
                          created_at=datetime(2026, 1, 1, tzinfo=UTC), max_rows=2, row_count=4, content="c",
                          files=entries, prechecks=[])
    with pytest.raises(ValueError, match="max 1"):  # a file over the limit is refused
        ex.build_manifest(dataset="invoices", period=DAY, generation="live", version=1, destination="d", folder="f",
                          created_at=datetime(2026, 1, 1, tzinfo=UTC), max_rows=1, row_count=3, content="c",
                          files=entries, prechecks=[])


def test_usage_window_rows_are_the_windows_starting_in_the_day() -> None:
    inside = [window(at(0), "b"), window(at(23), "a", revision=2)]
    outside = [window(at(0, d=16), "c"), window(at(23, d=14), "d")]
    rows = ex.usage_window_rows(inside + outside, DAY)
    assert [r[0] for r in rows] == ["a", "b"]
    assert rows[0][7:] == (2, "ON_TIME", Decimal("2.500000"), Decimal("0.5"), 3, "A;E", "f#1;f#2", at(23))
    assert len(rows[0]) == len(ex.USAGE_WINDOW_COLUMNS)


def test_requests_are_checked() -> None:
    assert ex.parse_period("2005-03-15") == DAY
    assert (DAY.start, DAY.end) == (at(0), at(0, d=16))
    with pytest.raises(ex.ExportError, match="YYYY-MM-DD"):
        ex.parse_period("15/03/2005")
    assert ex.check_datasets(["usage_windows", "ledger_lines", "usage_windows"]) == ["ledger_lines", "usage_windows"]
    with pytest.raises(ex.ExportError, match="unknown dataset bills"):
        ex.check_datasets(["bills"])
    with pytest.raises(ex.ExportError, match="generation"):
        ex.check_generation("../x")
    assert ex.parse_destination("file:///tmp/out/") == ex.Destination("file:///tmp/out/", "file", "/tmp/out", "")
    assert ex.parse_destination("s3://bucket/a/b/") == ex.Destination("s3://bucket/a/b/", "s3", "bucket", "a/b")
    assert ex.parse_destination("s3://bucket").prefix == ""
    for bad in ("file://relative/x", "s3:///nobucket", "https://x/y", "/tmp/x"):
        with pytest.raises(ex.ExportError):
            ex.parse_destination(bad)
    assert ex.export_folder("live", "invoices", DAY, 3) == "live/invoices/2005-03-15/v3"
    assert ex.file_name(12, "parquet") == "part-00012.parquet"


# --- prechecks ---------------------------------------------------------------------------------------------
def test_reconciliation_precheck_passes_only_when_nothing_is_pending() -> None:
    assert ex.precheck_reconciliation(Report(inputs=3, billed=3)).passed
    failed = ex.precheck_reconciliation(Report(inputs=3, billed=2, pending={"ingest": 1}, lag={"ingest": 1}))
    assert not failed.passed
    assert failed.detail[0] == "readings in 3 = billed 2 + dead-lettered 0 + refused 0 + pending 1"
    assert "  pending at ingest: 1 readings (1 records not consumed yet)" in failed.detail


def test_a_refusal_is_open_until_the_same_reading_is_accepted_at_its_version_or_higher() -> None:
    refused = late("id1", version=5)
    v5 = _ms(refused.event.version)
    assert ex.open_refusals([refused], []) == [refused]
    assert ex.open_refusals([refused], [fwd("other", v5)]) == [refused]
    assert ex.open_refusals([refused], [fwd("id1", v5 - 1000)]) == [refused]  # an older version does not resolve it
    assert ex.open_refusals([refused], [fwd("id1", v5)]) == []  # late replay re-submitted it and it was accepted
    assert ex.open_refusals([refused], [fwd("id1", v5 + 1000)]) == []
    # a windowing refusal: the usage event it refused is on usage.events but does not resolve it; a later copy does
    by_windowing = late("id2", stage="windowing", partition=1, offset=7)
    v = _ms(by_windowing.event.version)
    assert ex.open_refusals([by_windowing], [fwd("id2", v, 1, 7)]) == [by_windowing]
    assert ex.open_refusals([by_windowing], [fwd("id2", v, 1, 7), fwd("id2", v, 1, 9)]) == []


def test_late_scope_is_the_day_for_windows_and_the_billing_periods_for_ledger_rows() -> None:
    march = late("a", "ACC-1", at(3))
    april_other = late("b", "ACC-2", at(3, d=2, m=4))
    assert ex.late_blocking([march, april_other], ex.day_scope(DAY)) == [march]
    assert ex.late_blocking([march], ex.day_scope(ex.Period(date(2005, 3, 16)))) == []
    scopes = ex.billing_scopes([("ACC-2", date(2005, 4, 1), date(2005, 5, 1)), ("ACC-2", date(2005, 4, 1),
                                                                                date(2005, 5, 1))])
    assert scopes == [ex.Scope("ACC-2", at(0, d=31), at(0, d=2, m=5))]  # deduplicated, a day wider each side
    assert ex.late_blocking([march, april_other], scopes) == [april_other]  # only that account's period
    assert ex.late_blocking([late("c", "ACC-2", at(12, d=31))], scopes) != []  # local 1 April may be 31 March UTC
    assert ex.late_blocking([late("c", "ACC-2", at(0, d=30))], scopes) == []


def test_late_precheck_names_what_is_open_and_what_to_do() -> None:
    assert ex.precheck_late([]).passed
    check = ex.precheck_late([late("a", "ACC-1", at(5)), late("b", "ACC-1", at(4)), late("c", "ACC-2", at(6))])
    assert not check.passed
    assert check.detail == (
        "2 refused readings still open: OUTSIDE_SERVICE_DATES for ACC-1",
        "1 refused readings still open: OUTSIDE_SERVICE_DATES for ACC-2",
        "earliest reading 2005-03-15T04:00:00Z; fix the cause, then `pipeline late replay` (see `pipeline late list`)")


# --- versions ----------------------------------------------------------------------------------------------
def test_same_content_is_not_written_again_changed_content_gets_the_next_version() -> None:
    assert ex.plan_version([], "c1", 100) == ex.VersionPlan(1)
    done = [ex.PastExport(1, "COMPLETE", "c1", 100)]
    assert ex.plan_version(done, "c1", 100) == ex.VersionPlan(None, unchanged=1)
    assert ex.plan_version(done, "c2", 100) == ex.VersionPlan(2)  # late data billed since: a new version
    assert ex.plan_version(done, "c1", 50) == ex.VersionPlan(2)  # other file sizes: a new version
    # a failed or unfinished export's number is never reused, and does not count as holding the content
    history = [*done, ex.PastExport(2, "FAILED", "c2", 100), ex.PastExport(3, "WRITING", "c2", 100)]
    assert ex.plan_version(history, "c2", 100) == ex.VersionPlan(4)
    assert ex.plan_version([*history, ex.PastExport(4, "COMPLETE", "c2", 100)], "c1", 100) == ex.VersionPlan(5)


# --- adapters on local bytes -------------------------------------------------------------------------------
def test_parquet_keeps_exact_types_and_nulls() -> None:
    cols = (("s", "text"), ("n", "int"), ("d", "decimal"), ("day", "date"), ("t", "timestamp"), ("j", "json"))
    rows = [("x", 1, Decimal("0.000001"), date(2005, 3, 1), datetime(2005, 3, 1, 1, 2, 3, 4, tzinfo=UTC), {"k": 1}),
            (None, None, None, None, None, None)]
    names, back = read_parquet(parquet_bytes(cols, rows))
    assert names == ["s", "n", "d", "day", "t", "j"]
    assert back[0] == ("x", 1, Decimal("0.000001"), date(2005, 3, 1), datetime(2005, 3, 1, 1, 2, 3, 4, tzinfo=UTC),
                       '{"k":1}')
    assert back[1] == (None,) * 6
    assert read_parquet(parquet_bytes(cols, []))[1] == []
    assert parquet_bytes(cols, rows) == parquet_bytes(cols, rows)  # deterministic bytes


def test_file_store_writes_whole_files_and_lists_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = FileStore(str(tmp_path / "out"))
    store.put("live/x/v1/part-00000.csv", b"a\n", "text/csv")
    store.put("live/x/v1/manifest.json", b"{}", "application/json")
    assert store.list() == ["live/x/v1/manifest.json", "live/x/v1/part-00000.csv"]
    assert store.list("live/y") == []
    assert store.get("live/x/v1/part-00000.csv") == b"a\n"
    assert store.url("live/x/v1/manifest.json") == (tmp_path / "out/live/x/v1/manifest.json").as_uri()


def test_pyarrow_and_boto3_are_each_imported_in_one_adapter() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "pipeline"
    where: dict[str, set[str]] = {"pyarrow": set(), "boto": set()}
    for path in root.rglob("*.py"):
        for lib in where:
            if re.search(rf"^\s*(import|from) {lib}", path.read_text(), re.MULTILINE):
                where[lib].add(str(path.relative_to(root)))
    assert where == {"pyarrow": {"runtime/parquet.py"}, "boto": {"runtime/objectstore.py"}}
