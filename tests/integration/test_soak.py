"""The short crash soak in `make test` (issue 12): `tests/soak.py` with at least ten SIGKILLs of random
stage processes, one broker restart and one PostgreSQL restart, over a real stream of NEM12 files and
telemetry; the ledger must equal an uninterrupted run and the batch bill, with no duplicate anywhere.
`make soak` runs the long version (100 kills, every bundled file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Settings
from tests.soak import run_reference, run_soak, soak_input

pytestmark = pytest.mark.integration


def test_short_soak_loses_and_duplicates_nothing(base_settings: Settings, tmp_path: Path) -> None:
    inp = soak_input(files=12, telemetry_days=1, seed=5)
    reference = run_reference(base_settings, inp, tmp_path / "reference")
    verdict = run_soak(base_settings, inp, tmp_path / "soak", kills=12, seed=5, duration_s=60, reference=reference,
                       accounted_timeout_s=420)  # a failure reports what is pending, well inside pytest's 900 s
    print(verdict.line())
    assert verdict.passed, verdict.problems
    assert sum(verdict.kills.values()) == 12
    assert (verdict.broker_restarts, verdict.postgres_restarts) == (1, 1)
    assert verdict.mismatches_reference == verdict.mismatches_batch == 0
    assert sum(verdict.duplicates.values()) == 0 and verdict.records > 0
