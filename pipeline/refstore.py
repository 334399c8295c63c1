"""Reference data in Postgres and on the compacted ``pricebooks`` topic.

``load_reference_file`` writes accounts, service points and plan assignments (master data,
upserted) and price book versions (immutable: a different body under an existing (id, version)
is refused with ``PriceBookConflict``). ``read_reference`` reads a consistent snapshot for the
stages; ``ReferenceCache`` refreshes it every ``Settings.reference_refresh_s``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from pipeline.codec import Codec
from pipeline.metrics_catalog import MetricDefinition
from pipeline.rating.pricebook import PriceBook
from pipeline.reference import (
    Account,
    GasConversion,
    PlanAssignment,
    ReferenceData,
    ReferenceFile,
    ServicePoint,
    TelemetrySubject,
)
from pipeline.runtime import postgres


class PriceBookConflict(ValueError):
    """A price book (id, version) already exists with a different body (versions are immutable)."""


def store_price_book(conn: Any, book: PriceBook) -> bool:
    """Insert one price book version; returns ``True`` if new, ``False`` if identical and present.

    Raises ``PriceBookConflict`` if (id, version) exists with another body, or if another version
    of the same id has a different currency.
    """
    sha = book.content_sha256()
    row = conn.execute(
        "SELECT content_sha256 FROM price_books WHERE id = %s AND version = %s", (book.id, book.version)
    ).fetchone()
    if row is not None:
        if row[0] != sha:
            raise PriceBookConflict(
                f"price book {book.id} version {book.version} is already published with different content "
                f"(sha256 {row[0][:12]}… vs {sha[:12]}…); publish it as version {book.version + 1} instead"
            )
        return False
    other = conn.execute(
        "SELECT version, body->>'currency' FROM price_books WHERE id = %s AND body->>'currency' <> %s LIMIT 1",
        (book.id, book.currency),
    ).fetchone()
    if other is not None:
        raise PriceBookConflict(
            f"price book {book.id} version {other[0]} is in {other[1]}; version {book.version} cannot change the "
            f"currency to {book.currency} (an invoice never mixes currencies): publish it under a new id"
        )
    conn.execute(
        "INSERT INTO price_books (id, version, content_sha256, body) VALUES (%s, %s, %s, %s)",
        (book.id, book.version, sha, postgres.jsonb(json.loads(book.canonical_json()))),
    )
    return True


AUDIT = """
INSERT INTO reference_changes (changed_by, source, operation, entity, entity_key, account, effective, before, after)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"""
_CURRENT = {
    "account": "SELECT account, name, timezone, holiday_region, billing_cycle, billing_anchor, net_days, currency "
               "FROM accounts WHERE account = %s",
    "service_point": "SELECT nmi, account, effective_from, effective_to FROM service_points "
                     "WHERE nmi = %s AND effective_from = %s",
    "plan_assignment": "SELECT account, price_book_id, effective_from, effective_to, service FROM plan_assignments "
                       "WHERE account = %s AND effective_from = %s AND service = %s "
                       "AND (service <> 'contribution' OR price_book_id = %s)",
    "gas_conversion": "SELECT account, effective_from, effective_to, heating_value, pressure_correction "
                      "FROM gas_conversions WHERE account = %s AND effective_from = %s",
    "telemetry_subject": "SELECT subject, account, effective_from, effective_to FROM telemetry_subjects "
                         "WHERE subject = %s AND effective_from = %s",
}


def _audit_upsert(conn: Any, entity: str, row: Any, by: str, source: str) -> None:
    """Record in ``reference_changes`` (migration 0006) what upserting ``row`` changes: nothing when the same
    row is there, else the row before (or none) and after. ``load reference`` is a snapshot import (it
    upserts); this keeps what it replaced."""
    if isinstance(row, Account):
        key, params, effective = row.account, (row.account,), row.billing_anchor
    elif isinstance(row, PlanAssignment):
        from pipeline.accounts.rules import Change

        key = Change("", entity, row, None, None).entity_key
        params, effective = (row.account, row.effective_from, row.service, row.price_book_id), row.effective_from
    elif isinstance(row, GasConversion):
        key, params, effective = f"{row.account}@{row.effective_from}", (row.account, row.effective_from), \
            row.effective_from
    else:
        ident = getattr(row, "nmi", None) or getattr(row, "subject", None) or row.account
        key, params, effective = f"{ident}@{row.effective_from}", (ident, row.effective_from), row.effective_from
    current = conn.execute(_CURRENT[entity], params).fetchone()
    before = None
    if current is not None:
        if entity == "account":
            before = Account(account=current[0], name=current[1], timezone=current[2], holiday_region=current[3],
                             billing_cycle=current[4], billing_anchor=current[5], net_days=current[6],
                             currency=current[7].strip() if current[7] else None)
        else:
            before = type(row).model_validate(dict(zip(
                {"service_point": ("nmi", "account", "effective_from", "effective_to"),
                 "plan_assignment": ("account", "price_book_id", "effective_from", "effective_to", "service"),
                 "gas_conversion": ("account", "effective_from", "effective_to", "heating_value",
                                    "pressure_correction"),
                 "telemetry_subject": ("subject", "account", "effective_from", "effective_to")}[entity],
                current, strict=True)))
        if before == row:
            return
    conn.execute(AUDIT, (by, source, f"load.{entity}", entity, key, row.account, effective,
                         postgres.jsonb(before.model_dump(mode="json")) if before is not None else None,
                         postgres.jsonb(row.model_dump(mode="json"))))


def load_reference_file(conn: Any, ref: ReferenceFile, by: str = "load reference",
                        source: str = "json") -> dict[str, int]:
    """Write a validated reference file in the caller's transaction (a snapshot: rows upserted); returns counts
    per kind. Every account, service point, plan assignment and telemetry subject it adds or changes is recorded
    in ``reference_changes`` (before/after, ``changed_by`` = ``by``, ``source``); nothing is deleted. The checked,
    effective-dated path is ``pipeline accounts import`` (``pipeline.accounts.store.run_operations``)."""
    for entity, rows in (("account", ref.accounts), ("service_point", ref.service_points),
                         ("plan_assignment", ref.plan_assignments), ("telemetry_subject", ref.telemetry_subjects),
                         ("gas_conversion", ref.gas_conversions)):
        for row in rows:
            _audit_upsert(conn, entity, row, by, source)
    for a in ref.accounts:
        conn.execute(
            """INSERT INTO accounts (account, name, timezone, holiday_region, billing_cycle, billing_anchor, net_days,
                 currency)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (account) DO UPDATE SET name = EXCLUDED.name, timezone = EXCLUDED.timezone,
                 holiday_region = EXCLUDED.holiday_region, billing_cycle = EXCLUDED.billing_cycle,
                 billing_anchor = EXCLUDED.billing_anchor, net_days = EXCLUDED.net_days,
                 currency = EXCLUDED.currency""",
            (a.account, a.name, a.timezone, a.holiday_region, a.billing_cycle, a.billing_anchor, a.net_days,
             a.currency),
        )
    for sp in ref.service_points:
        conn.execute(
            """INSERT INTO service_points (nmi, account, effective_from, effective_to) VALUES (%s, %s, %s, %s)
               ON CONFLICT (nmi, effective_from) DO UPDATE SET account = EXCLUDED.account,
                 effective_to = EXCLUDED.effective_to""",
            (sp.nmi, sp.account, sp.effective_from, sp.effective_to),
        )
    for pa in ref.plan_assignments:  # one plan of a service starts on a day; contributions: one per book (0010)
        conflict = ("(account, service, price_book_id, effective_from)" if pa.service == "contribution" else
                    "(account, service, effective_from) WHERE service <> 'contribution'")
        conn.execute(
            f"""INSERT INTO plan_assignments (account, price_book_id, effective_from, effective_to, service)
               VALUES (%s, %s, %s, %s, %s)
               ON CONFLICT {conflict} DO UPDATE SET price_book_id = EXCLUDED.price_book_id,
                 effective_to = EXCLUDED.effective_to""",
            (pa.account, pa.price_book_id, pa.effective_from, pa.effective_to, pa.service),
        )
    for gc in ref.gas_conversions:
        conn.execute(
            """INSERT INTO gas_conversions (account, effective_from, effective_to, heating_value, pressure_correction)
               VALUES (%s, %s, %s, %s, %s)
               ON CONFLICT (account, effective_from) DO UPDATE SET effective_to = EXCLUDED.effective_to,
                 heating_value = EXCLUDED.heating_value, pressure_correction = EXCLUDED.pressure_correction""",
            (gc.account, gc.effective_from, gc.effective_to, gc.heating_value, gc.pressure_correction),
        )
    new_books = sum(store_price_book(conn, b) for b in ref.price_books)
    for m in ref.metric_definitions:
        conn.execute(
            """INSERT INTO metric_definitions (metric, event_type, value_path, aggregation, unit, window_minutes,
                 allowed_lateness_days, allow_negative, description) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (metric) DO UPDATE SET event_type = EXCLUDED.event_type, value_path = EXCLUDED.value_path,
                 aggregation = EXCLUDED.aggregation, unit = EXCLUDED.unit, window_minutes = EXCLUDED.window_minutes,
                 allowed_lateness_days = EXCLUDED.allowed_lateness_days, allow_negative = EXCLUDED.allow_negative,
                 description = EXCLUDED.description""",
            (m.metric, m.event_type, m.value_path, m.aggregation, m.unit, m.window_minutes, m.allowed_lateness_days,
             m.allow_negative, m.description),
        )
    for ts in ref.telemetry_subjects:
        conn.execute(
            """INSERT INTO telemetry_subjects (subject, account, effective_from, effective_to) VALUES (%s, %s, %s, %s)
               ON CONFLICT (subject, effective_from) DO UPDATE SET account = EXCLUDED.account,
                 effective_to = EXCLUDED.effective_to""",
            (ts.subject, ts.account, ts.effective_from, ts.effective_to),
        )
    return {
        "accounts": len(ref.accounts),
        "service_points": len(ref.service_points),
        "plan_assignments": len(ref.plan_assignments),
        "price_books_new": new_books,
        "price_books": len(ref.price_books),
        "metric_definitions": len(ref.metric_definitions),
        "telemetry_subjects": len(ref.telemetry_subjects),
        "gas_conversions": len(ref.gas_conversions),
    }


def read_reference(conn: Any) -> ReferenceData:
    """A snapshot of all reference data."""
    accounts = [
        Account(account=r[0], name=r[1], timezone=r[2], holiday_region=r[3], billing_cycle=r[4],
                billing_anchor=r[5], net_days=r[6], currency=r[7].strip() if r[7] else None)
        for r in conn.execute(
            "SELECT account, name, timezone, holiday_region, billing_cycle, billing_anchor, net_days, currency "
            "FROM accounts"
        )
    ]
    sps = [
        ServicePoint(nmi=r[0], account=r[1], effective_from=r[2], effective_to=r[3])
        for r in conn.execute("SELECT nmi, account, effective_from, effective_to FROM service_points")
    ]
    pas = [
        PlanAssignment(account=r[0], price_book_id=r[1], effective_from=r[2], effective_to=r[3], service=r[4])
        for r in conn.execute("SELECT account, price_book_id, effective_from, effective_to, service "
                              "FROM plan_assignments ORDER BY account, effective_from, service, price_book_id")
    ]
    gas = [
        GasConversion(account=r[0], effective_from=r[1], effective_to=r[2], heating_value=r[3],
                      pressure_correction=r[4])
        for r in conn.execute("SELECT account, effective_from, effective_to, heating_value, pressure_correction "
                              "FROM gas_conversions")
    ]
    books = [PriceBook.model_validate(r[0]) for r in conn.execute("SELECT body FROM price_books")]
    metrics = [
        MetricDefinition(metric=r[0], event_type=r[1], value_path=r[2], aggregation=r[3], unit=r[4],
                         window_minutes=r[5], allowed_lateness_days=r[6], allow_negative=r[7], description=r[8])
        for r in conn.execute(
            "SELECT metric, event_type, value_path, aggregation, unit, window_minutes, allowed_lateness_days, "
            "allow_negative, description FROM metric_definitions"
        )
    ]
    subjects = [
        TelemetrySubject(subject=r[0], account=r[1], effective_from=r[2], effective_to=r[3])
        for r in conn.execute("SELECT subject, account, effective_from, effective_to FROM telemetry_subjects")
    ]
    return ReferenceData.build(accounts, sps, pas, books, metrics, subjects, gas)


def price_book_record(codec: Codec, book: PriceBook) -> tuple[str, bytes]:
    """The (key, value) of ``book`` on the compacted ``pricebooks`` topic."""
    value = codec.encode(
        {"id": book.id, "version": book.version, "content_sha256": book.content_sha256(),
         "body": book.canonical_json()},
        "PriceBookVersion",
    )
    return f"{book.id}:{book.version}", value


class ReferenceCache:
    """A reference snapshot re-read from Postgres at most every ``ttl_s`` seconds.

    ``get()`` returns the snapshot; ``refresh()`` forces a re-read (e.g. on an unknown NMI,
    rate-limited to once per ``min_refresh_s``).
    """

    def __init__(self, loader: Callable[[], ReferenceData], ttl_s: float, min_refresh_s: float = 2.0) -> None:
        self._loader = loader
        self._ttl = ttl_s
        self._min = min_refresh_s
        self._data = loader()
        self._at = time.monotonic()

    def get(self) -> ReferenceData:
        if time.monotonic() - self._at > self._ttl:
            self.refresh()
        return self._data

    def refresh(self) -> bool:
        """Re-read now unless the last read is younger than ``min_refresh_s``; returns whether it did."""
        if time.monotonic() - self._at < self._min:
            return False
        self._data = self._loader()
        self._at = time.monotonic()
        return True


def postgres_loader(url: str) -> Callable[[], ReferenceData]:
    """A loader for ``ReferenceCache`` reading from the database at ``url``."""

    def load() -> ReferenceData:
        return postgres.with_reconnect(url, read_reference)

    return load
