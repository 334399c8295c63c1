"""A schema directory one step in the future, for schema-evolution tests (Avro resolution)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.codec import SCHEMA_DIR


def evolved_schema_dir(tmp_path: Path) -> Path:
    """A copy of ``schemas/`` whose current UsageEvent has two more fields with defaults
    (``tariff_hint``: string "none", ``weight``: null or int, null); today's UsageEvent is in history."""
    out = tmp_path / "schemas"
    (out / "history").mkdir(parents=True)
    for p in SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(p, out / p.name)
    shutil.copy(SCHEMA_DIR / "usage_event.avsc", out / "history" / "UsageEvent.v1.avsc")
    raw = json.loads((SCHEMA_DIR / "usage_event.avsc").read_text())
    raw["fields"].append({"name": "tariff_hint", "type": "string", "default": "none"})
    raw["fields"].append({"name": "weight", "type": ["null", "int"], "default": None})
    (out / "usage_event.avsc").write_text(json.dumps(raw))
    return out
