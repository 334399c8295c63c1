"""Re-rating over the real broker and Postgres (SPEC §4, invariant 3): publishing a superseding price
book version for past periods appends exactly the difference lines, each naming both versions;
publishing it again adds nothing; a different body under the same version is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.reference import BUNDLED_REFERENCE
from tests.batchbill import expected_bills
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

FILES = sorted((DATA / "nem12").glob("*.zip"))[10:20]


def _expected(book: dict | None = None) -> dict[tuple[str, str], dict[str, object]]:
    return {(a, p.isoformat()): {k: v for k, v in lines.items() if v}
            for (a, p), lines in expected_bills(FILES, BUNDLED_REFERENCE, book).items()}


def _publish_book(env: Env, book: dict, path: Path) -> subprocess.CompletedProcess:
    path.write_text(json.dumps(book))
    return subprocess.run([sys.executable, "-m", "pipeline", "pricebook", "publish", str(path)], env=env.env,
                          capture_output=True, text=True, timeout=120)


def test_superseding_price_book_re_rates_with_exact_difference_lines(pipeline_env: Env, tmp_path: Path) -> None:
    env = pipeline_env
    env.env["PIPELINE_REFERENCE_REFRESH_S"] = "1"
    env.start_all()
    env.wait_accounted(published=publish_files(env, FILES))
    before_count = env.line_count()
    assert env.ledger_totals() == _expected()
    before_ids = {r[0] for r in env.sql("SELECT line_id FROM invoice_lines")}

    v1 = json.loads(BUNDLED_REFERENCE.read_text())["price_books"][0]
    v2 = json.loads(json.dumps(v1))
    v2["version"] = 2
    v2["components"][0]["bands"][0]["rate"] = "0.3750"  # peak
    v2["components"][1]["rate"] = "1.0000"  # daily supply
    res = _publish_book(env, v2, tmp_path / "v2.json")
    assert res.returncode == 0 and "v2" in res.stdout and "published" in res.stdout, res.stderr

    time.sleep(3)  # the stage notices the version within PIPELINE_REFERENCE_REFRESH_S
    after_count = env.wait_quiet(min_wait_s=5)
    assert env.ledger_totals() == _expected(v2)
    new_lines = env.sql("SELECT component_id, amount, cause, explanation FROM invoice_lines "
                        "WHERE line_id <> ALL(%s)", (list(before_ids),))
    assert len(new_lines) == after_count - before_count > 0
    for component, amount, cause, explanation in new_lines:
        assert amount != 0
        assert cause == "pricebook:ACTEWAGL-HOME-TOU:v2"
        assert explanation["price_book"]["versions"] == [2]
        assert explanation["price_book"]["previous_versions"] == [1]
        assert component in ("energy", "supply", "gst")  # off-peak, shoulder and feed-in are unchanged

    # the same version again: identical body, nothing changes
    again = _publish_book(env, v2, tmp_path / "v2-again.json")
    assert again.returncode == 0 and "already published (identical)" in again.stdout
    time.sleep(3)
    assert env.wait_quiet(min_wait_s=3) == after_count

    # a different body under an existing version is refused
    v2_changed = json.loads(json.dumps(v2))
    v2_changed["components"][0]["bands"][1]["rate"] = "0.3000"
    refused = _publish_book(env, v2_changed, tmp_path / "v2-changed.json")
    assert refused.returncode == 2
    assert "already published with different content" in refused.stderr
    # and a later version may not change the currency (an invoice never mixes currencies)
    v3 = json.loads(json.dumps(v2))
    v3["version"], v3["currency"] = 3, "NZD"
    refused = _publish_book(env, v3, tmp_path / "v3.json")
    assert refused.returncode == 2 and "cannot change the currency" in refused.stderr
    assert env.line_count() == after_count
