"""Idempotency-Key decisions of the Bill API, pure (the records live in Postgres, table ``api_idempotency``).

A POST with an ``Idempotency-Key`` is keyed by (caller, key). The first request stores its fingerprint
(method, path, body as parsed JSON with sorted keys, so whitespace and key order do not matter); once
answered, its response (status, body). A repeat with the same fingerprint gets the stored response; a
repeat with another fingerprint is refused (409). A repeat of a request never answered (in flight, or its
process died) is run again: every Bill API write is idempotent by ids derived from the key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


def fingerprint(method: str, path: str, body: Any) -> str:
    """SHA-256 (hex) of ``method``, ``path`` and the canonical JSON of ``body`` (sorted keys, no spaces)."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{method.upper()} {path}\n{canon}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Stored:
    """The record of an earlier request with the same key: its fingerprint and, once answered, response."""

    request_sha256: str
    status: int | None
    response: Any


def decide(stored: Stored | None, request_sha256: str) -> str:
    """``run`` (new key, or never answered), ``replay`` (same request, answered) or ``conflict`` (the key was
    used for another request)."""
    if stored is None:
        return "run"
    if stored.request_sha256 != request_sha256:
        return "conflict"
    return "run" if stored.status is None else "replay"
