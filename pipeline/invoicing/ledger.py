"""The invoice ledger in Postgres (SPEC §5): the exactly-once sink, invoice lifecycle, payments,
and the transactional outbox.

Pure rules live in ``pipeline.invoicing.lifecycle``; this module runs them inside transactions:

- ``LedgerStore.commit``: ONE transaction per batch appends the new lines (each placed on its own
  OPEN invoice, or as a prior-period adjustment on the account's next open invoice when its own
  is FINALIZED), records new payments, dead letters, the consumed offsets, each account's billing
  clock, and an outbox event for every line appended and payment applied. Line and payment ids are unique,
  so a re-delivered record inserts nothing and announces nothing. The Bill API's records
  (``invoice.adjustments``: manual lines on ad-hoc bills, bill closes) are applied in the same
  transaction (``pipeline.invoicing.bills``); ad-hoc bills are never closed by the billing clock.
- ``LedgerStore.finalize_due``: ONE transaction finalizes every OPEN invoice whose close time has
  passed the billing clock, in close order: gap-free number from its series, bill and due dates,
  frozen statement (previous balance + charges − payments = amount due), outbox event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from pipeline.codec import Codec
from pipeline.invoicing import bills
from pipeline.invoicing import lifecycle as lc
from pipeline.invoicing import validation as val
from pipeline.records import InvoiceEvent, Payment, RatedCharge
from pipeline.runtime import postgres

log = logging.getLogger(__name__)

# a transaction-level advisory lock: one finalizer at a time keeps each account's balance chain in order
FINALIZE_LOCK = 0x1E5D6E6


def invoice_id_of(account: str, period_start: Any, currency: str) -> str:
    """One invoice per (account, billing period, currency): ``account|period start|currency``."""
    return f"{account}|{period_start}|{currency}"


@dataclass(frozen=True, slots=True)
class PendingLine:
    """A rated charge with where it was read (for the ledger's source columns)."""

    charge: RatedCharge
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class PendingPayment:
    """A payment with where it was read."""

    payment: Payment
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class CommitResult:
    """What one ``commit`` changed: lines appended (of which adjustments) and payments recorded."""

    lines: int
    adjustments: int
    payments: int
    clock_advanced: bool
    appended: frozenset[str] = frozenset()  # ids of the lines appended
    manual: int = 0  # manual lines appended to ad-hoc bills (issue 17 part B)
    bills_closed: tuple[str, ...] = ()  # numbers of the ad-hoc bills finalized


INSERT_INVOICE = """
INSERT INTO invoices (invoice_id, account, period_start, period_end, currency, close_at, clock_partition)
VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (invoice_id) DO NOTHING"""
COPY_LINES = """
COPY invoice_lines (line_id, invoice_id, account, period_start, period_end, currency, component_id, component_kind,
  band, quantity, unit, rate, amount, period_total, price_book_id, price_book_version, cause, explanation,
  source_topic, source_partition, source_offset, line_kind, adjusts_invoice_id, adjusts_invoice_number) FROM STDIN"""
COPY_OUTBOX = "COPY outbox (event_id, event_type, account, payload) FROM STDIN"
INSERT_PAYMENT = """
INSERT INTO payments (payment_id, account, currency, amount, received_at, reference, source_topic,
  source_partition, source_offset)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (payment_id) DO NOTHING RETURNING payment_id"""
INSERT_OUTBOX = """
INSERT INTO outbox (event_id, event_type, account, payload) VALUES (%s, %s, %s, %s::jsonb)
ON CONFLICT (event_id) DO NOTHING"""
UPSERT_OFFSET = """
INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset) VALUES (%s, %s, %s, %s)
ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset"""
CLOCKS = "SELECT account, clock FROM account_clock WHERE consumer_group = %s AND account = ANY(%s)"
UPSERT_CLOCK = """
INSERT INTO account_clock (consumer_group, account, clock, last_line_at) VALUES (%s, %s, %s, now())
ON CONFLICT (consumer_group, account) DO UPDATE SET clock = GREATEST(account_clock.clock, EXCLUDED.clock),
  last_line_at = CASE WHEN %s THEN now() ELSE account_clock.last_line_at END"""
INSERT_DEAD = """
INSERT INTO dead_letters (stage, reason, message, topic, partition, "offset", key, value)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (topic, partition, "offset") DO NOTHING"""
# an invoice's close time: its close_at (period end + the close delay), except for the final invoice of an
# account whose service has ended (every service point and telemetry subject closed, as the view
# account_service_end of migration 0006 says, looked up per invoice here; issue 15): the invoice whose period
# starts before the move-out closes at the move-out (local midnight, account time zone) + the close delay
# (parameter: seconds), if that is earlier
FINAL_CLOSE_JOIN = (
    "LEFT JOIN LATERAL (SELECT max(r.effective_to) AS service_end FROM (SELECT effective_to FROM service_points "
    "WHERE account = i.account UNION ALL SELECT effective_to FROM telemetry_subjects WHERE account = i.account) r "
    "HAVING bool_and(r.effective_to IS NOT NULL)) s ON i.period_start < s.service_end "
    "LEFT JOIN accounts a ON a.account = i.account")
CLOSE_AT = ("LEAST(i.close_at, (s.service_end::timestamp AT TIME ZONE a.timezone) "
            "+ make_interval(secs => %s::float8))")
NEXT_OPEN = """
SELECT invoice_id FROM invoices
WHERE account = %s AND currency = %s AND status IN ('OPEN', 'REVIEW') AND period_start > %s AND bill_id IS NULL
ORDER BY period_start LIMIT 1 FOR UPDATE"""
# the own CHARGE lines of an invoice in rating's emission order (an account's charges come through one partition)
REVIEW_LINES = """
SELECT component_id, band, component_kind, unit, quantity, explanation FROM invoice_lines
WHERE invoice_id = %s AND line_kind = 'CHARGE' ORDER BY source_topic, source_partition, source_offset"""
USAGE_HISTORY = """
SELECT usage_kwh FROM invoices WHERE account = %s AND currency = %s AND status = 'FINALIZED'
AND usage_kwh IS NOT NULL ORDER BY finalized_order DESC LIMIT %s"""
INSERT_REVIEW = """
INSERT INTO invoice_reviews (invoice_id, decided_by, source, decision, flags, note) VALUES (%s, %s, %s, %s, %s, %s)"""


def line_row(p: PendingLine, placement: lc.Placement) -> tuple[Any, ...]:
    """The ``invoice_lines`` row of a pending line placed by ``lifecycle.place`` (columns of ``COPY_LINES``)."""
    c = p.charge
    return (
        c.line_id, placement.invoice_id, c.account, c.period_start, c.period_end, c.currency, c.component_id,
        c.component_kind, c.band, c.quantity, c.unit, c.rate, c.amount, c.period_total, c.price_book_id,
        c.price_book_version, c.cause, c.explanation, p.topic, p.partition, p.offset, placement.line_kind,
        placement.adjusts_invoice_id, placement.adjusts_invoice_number,
    )


class LedgerStore:
    """Postgres side of the invoicing stage, on one long-lived connection that is re-opened
    (after waiting) whenever the server goes away.

    Args:
        url: application-role database URL.
        group: the invoicing consumer group (key of stored offsets and of the billing clock).
        codec: kept for callers that encode records; outbox payloads are JSON (the relay encodes Avro).
        close_delay: period end + this = an invoice's close time (SPEC §5).
        clock: ``event``: an invoice closes when its account's own billing clock, the highest usage
            watermark carried by the account's charges (its series' event-time progress, SPEC §3),
            passes its close time; or, with ``idle_close_s``, once the wall clock has passed its close
            time and no new line reached the account for ``idle_close_s`` seconds. ``wall``: by the
            wall clock alone.
        series: invoice number series template (``lifecycle.series_of``).
        idle_close_s: see ``clock``; ``None``: only the account's event clock closes its invoices.
        review: the checks before finalizing (``validation.ReviewPolicy``; default: none): a flagged invoice
            waits in REVIEW until approved (``approve``) or its hold expires.
    """

    def __init__(self, url: str, group: str, codec: Codec, close_delay: timedelta = timedelta(days=3),
                 clock: str = "event", series: str = "INV-{year}", give_up_s: float = 600.0,
                 idle_close_s: float | None = None, review: val.ReviewPolicy | None = None) -> None:
        if clock not in ("event", "wall"):
            raise ValueError(f"clock must be 'event' or 'wall', got {clock!r}")
        self.group = group
        self.codec = codec
        self.close_delay = close_delay
        self.clock_mode = clock
        self.series = series
        self.idle_close_s = idle_close_s
        self.review = review if review is not None else val.ReviewPolicy(checks=())
        self._db = postgres.Reconnecting(url, give_up_s)
        self._run = self._db.run

    def stored_offsets(self, tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Next offsets to read per (topic, partition) as committed with the lines."""

        def work(conn: Any) -> dict[tuple[str, int], int]:
            rows = conn.execute(
                "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = %s",
                (self.group,),
            ).fetchall()
            wanted = set(tps)
            return {(t, p): o for t, p, o in rows if (t, p) in wanted}

        return self._run(work)

    # --- the batch transaction ---------------------------------------------------------------
    def commit(self, lines: list[PendingLine], dead: list[tuple[Any, ...]], offsets: dict[tuple[str, int], int],
               payments: list[PendingPayment] | None = None,
               adjustments: list[bills.PendingAdjustment] | None = None) -> CommitResult:
        """Append ``lines``, record ``payments`` and ``dead`` letters, apply the Bill API's ``adjustments``
        (manual lines, bill closes: ``_apply_adjustments``), store ``offsets`` and advance the billing clock,
        all in one transaction, with an outbox event per line appended and payment recorded. Replayed lines,
        payments and adjustments (known ids) change nothing."""
        payments = payments or []
        commands = adjustments or []

        def work(conn: Any) -> CommitResult:
            now = datetime.now(UTC)
            with conn.cursor() as cur:
                new_lines = self._new_lines(cur, lines)
                placements = self._place(cur, new_lines)
                if new_lines:  # ids checked new above: COPY, the fastest way in (a race still hits the keys)
                    with cur.copy(COPY_LINES) as copy:
                        for p in new_lines:
                            copy.write_row(line_row(p, placements[p.charge.line_id]))
                    with cur.copy(COPY_OUTBOX) as copy:
                        for p in new_lines:
                            copy.write_row(self._outbox(lc.line_event(p.charge, placements[p.charge.line_id], now)))
                recorded = self._record_payments(cur, payments, now)
                manual, closed, refused = self._apply_adjustments(cur, commands, now)
                if dead or refused:
                    cur.executemany(INSERT_DEAD, [*dead, *refused])
                cur.executemany(UPSERT_OFFSET, [(self.group, t, p, o) for (t, p), o in sorted(offsets.items())])
                advanced = self._advance_clocks(cur, lines, {p.charge.account for p in new_lines})
            adjustments = sum(1 for p in placements.values() if p.line_kind == "ADJUSTMENT")
            return CommitResult(len(new_lines), adjustments, recorded, advanced,
                                frozenset(p.charge.line_id for p in new_lines), manual, tuple(closed))

        return self._run(work)

    def _apply_adjustments(self, cur: Any, pending: list[bills.PendingAdjustment], now: datetime
                           ) -> tuple[int, list[str], list[tuple[Any, ...]]]:
        """Apply the Bill API's records in offset order (``pipeline.invoicing.bills``): append each new
        manual line (known ids change nothing) with its outbox event, finalize each bill closed. Returns
        (lines appended, numbers of the bills finalized, dead letters of the records refused)."""
        if not pending:
            return 0, [], []
        if any(p.adjustment.kind == "CLOSE" for p in pending):  # keep each balance chain in finalization order
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (FINALIZE_LOCK,))
        ids = sorted({p.adjustment.bill_id for p in pending})
        rows = {r[0]: bills.BillRow(*r[1:]) for r in cur.execute(
            "SELECT bill_id, invoice_id, account, currency, status, period_start, period_end FROM invoices "
            "WHERE bill_id = ANY(%s) ORDER BY invoice_id FOR UPDATE", (ids,))}
        known = {r[0] for r in cur.execute("SELECT line_id FROM invoice_lines WHERE line_id = ANY(%s)",
                                           ([p.adjustment.adjustment_id for p in pending],))}
        appended, numbers, refused = 0, [], []
        closing: set[str] = set()
        for p in pending:
            a, bill = p.adjustment, rows.get(p.adjustment.bill_id)
            if a.kind == "LINE" and a.adjustment_id in known:
                continue  # a repeat: the line is in the ledger already
            problem = bills.check(a, bill, a.bill_id in closing)
            if problem is not None:
                refused.append(("invoicing", problem[0], problem[1], p.topic, p.partition, p.offset,
                                a.account.encode(), self.codec.encode(a)))
                continue
            assert bill is not None
            if a.kind == "LINE":
                with cur.copy(COPY_LINES) as copy:
                    copy.write_row(bills.line_row(p, bill))
                cur.execute(INSERT_OUTBOX, self._outbox(bills.line_event(p, bill, now)))
                known.add(a.adjustment_id)
                appended += 1
            elif bill.status == "OPEN" and a.bill_id not in closing:
                accounts = self._accounts(cur, {bill.account})
                numbers.append(self._finalize(cur, bill.invoice_id, bill.account, bill.currency,
                                              (bill.period_start, bill.period_end), accounts.get(bill.account)))
                closing.add(a.bill_id)
        return appended, numbers, refused

    def _advance_clocks(self, cur: Any, lines: list[PendingLine], fresh: set[str]) -> bool:
        """Move each account's billing clock to the highest watermark of its charges in ``lines`` and
        mark the accounts in ``fresh`` (new lines appended) as just active; returns whether a clock
        moved. One account's charges never move another's clock (SPEC §5)."""
        watermarks: dict[str, datetime | None] = {}
        for p in lines:
            wm, held = p.charge.watermark, watermarks.get(p.charge.account)
            if p.charge.account not in watermarks or (wm is not None and (held is None or wm > held)):
                watermarks[p.charge.account] = wm
        if not watermarks:
            return False
        before = dict(cur.execute(CLOCKS, (self.group, sorted(watermarks))).fetchall())
        cur.executemany(UPSERT_CLOCK, [(self.group, a, wm, a in fresh) for a, wm in sorted(watermarks.items())])
        return any(wm is not None and (before.get(a) is None or wm > before[a]) for a, wm in watermarks.items())

    def _outbox(self, event: InvoiceEvent) -> tuple[Any, ...]:
        return (event.event_id, event.event_type, event.account, lc.event_to_json(event))

    @staticmethod
    def _new_lines(cur: Any, lines: list[PendingLine]) -> list[PendingLine]:
        """The lines whose ids are not in the ledger yet (first occurrence within the batch)."""
        if not lines:
            return []
        known = {row[0] for row in cur.execute(
            "SELECT line_id FROM invoice_lines WHERE line_id = ANY(%s)", ([p.charge.line_id for p in lines],))}
        out = []
        for p in lines:
            if p.charge.line_id not in known:
                known.add(p.charge.line_id)
                out.append(p)
        return out

    def _accounts(self, cur: Any, accounts: set[str]) -> dict[str, tuple[str, str, date, int]]:
        """account → (time zone, billing cycle, billing anchor, net days) from the reference data."""
        rows = cur.execute(
            "SELECT account, timezone, billing_cycle, billing_anchor, net_days FROM accounts WHERE account = ANY(%s)",
            (sorted(accounts),),
        ).fetchall()
        return {a: (tz, cycle, anchor, net) for a, tz, cycle, anchor, net in rows}

    def _ensure_invoices(self, cur: Any, keys: dict[tuple[str, date, date, str], int],
                         accounts: dict[str, tuple[str, str, date, int]]) -> None:
        """Create the missing invoices of ``keys`` ((account, period start, period end, currency) → the
        charges.rated partition whose clock closes them)."""
        rows = []
        for (account, start, end, currency), partition in sorted(keys.items()):
            tz = accounts.get(account, ("UTC",))[0]
            rows.append((invoice_id_of(account, start, currency), account, start, end, currency,
                         lc.close_time(end, tz, self.close_delay), partition))
        if rows:
            cur.executemany(INSERT_INVOICE, rows)

    def _place(self, cur: Any, lines: list[PendingLine]) -> dict[str, lc.Placement]:
        """line id → placement, creating invoices as needed; locks every invoice it appends to."""
        if not lines:
            return {}
        keys: dict[tuple[str, date, date, str], int] = {}
        for p in lines:
            keys.setdefault((p.charge.account, p.charge.period_start, p.charge.period_end, p.charge.currency),
                            p.partition)
        accounts = self._accounts(cur, {k[0] for k in keys})
        self._ensure_invoices(cur, keys, accounts)
        own = {
            row[0]: lc.InvoiceRef(*row)
            for row in cur.execute(
                "SELECT invoice_id, status, invoice_number FROM invoices WHERE invoice_id = ANY(%s) "
                "ORDER BY invoice_id FOR UPDATE",
                (sorted(invoice_id_of(a, s, c) for a, s, _e, c in keys),),
            )
        }
        next_open: dict[str, str] = {}  # finalized invoice id → the open invoice its adjustments go to
        for account, start, end, currency in sorted(keys):
            ref = own[invoice_id_of(account, start, currency)]
            if ref.status in ("OPEN", "REVIEW") or ref.invoice_id in next_open:
                continue
            row = cur.execute(NEXT_OPEN, (account, currency, start)).fetchone()
            if row is None:
                latest = cur.execute(
                    "SELECT max(period_end) FROM invoices WHERE account = %s AND currency = %s AND bill_id IS NULL",
                    (account, currency)
                ).fetchone()[0]
                if account in accounts:
                    _tz, cycle, anchor, _net = accounts[account]
                    p0, p1 = lc.next_period(cycle, anchor, latest)
                else:  # no reference row (cannot come from rating): a period as long as the corrected one
                    p0, p1 = latest, latest + (end - start)
                self._ensure_invoices(cur, {(account, p0, p1, currency): keys[(account, start, end, currency)]},
                                      accounts)
                row = cur.execute(NEXT_OPEN, (account, currency, start)).fetchone()
            next_open[ref.invoice_id] = row[0]
        out = {}
        for p in lines:
            ref = own[invoice_id_of(p.charge.account, p.charge.period_start, p.charge.currency)]
            out[p.charge.line_id] = lc.place(ref, next_open.get(ref.invoice_id))
        return out

    def _record_payments(self, cur: Any, payments: list[PendingPayment], now: datetime) -> int:
        recorded = 0
        for pp in payments:
            p = pp.payment
            row = cur.execute(INSERT_PAYMENT, (p.payment_id, p.account, p.currency, p.amount, p.received_at,
                                               p.reference, pp.topic, pp.partition, pp.offset)).fetchone()
            if row is None:
                continue  # a replayed payment
            recorded += 1
            balance = self._balance(cur, p.account, p.currency)
            cur.execute(INSERT_OUTBOX, self._outbox(lc.payment_event(p, balance, now)))
        return recorded

    @staticmethod
    def _balance(cur: Any, account: str, currency: str) -> Decimal:
        """Everything charged minus everything paid, for one account and currency."""
        return cur.execute(
            "SELECT (SELECT coalesce(sum(amount), 0) FROM invoice_lines WHERE account = %(a)s AND currency = %(c)s)"
            " - (SELECT coalesce(sum(amount), 0) FROM payments WHERE account = %(a)s AND currency = %(c)s)",
            {"a": account, "c": currency},
        ).fetchone()[0]

    # --- closing ----------------------------------------------------------------------------------
    def invoice_counts(self, overdue_after_s: float = 3600.0) -> dict[str, int]:
        """Invoices per status (``OPEN``, ``REVIEW``, ``FINALIZED``) and ``OVERDUE``: OPEN ones whose close time passed
        more than ``overdue_after_s`` seconds ago by the wall clock (monitoring: finalization stuck)."""

        def work(conn: Any) -> dict[str, int]:
            counts = dict(conn.execute("SELECT status, count(*) FROM invoices GROUP BY status").fetchall())
            counts["OVERDUE"] = conn.execute(
                "SELECT count(*) FROM invoices WHERE status = 'OPEN' AND close_at < now() - make_interval(secs => %s)",
                (overdue_after_s,)).fetchone()[0]
            return counts

        return self._run(work)

    def finalize_due(self, limit: int = 1000) -> list[str]:
        """Finalize the OPEN invoices whose close time their account's billing clock has passed (see
        the class: its event clock, or quiet past the close time by the wall clock), and the invoices in
        REVIEW that an operator approved or whose hold expired, in close order; returns their invoice numbers.
        Before finalizing an OPEN invoice the review checks run (``validation.review_flags``): a flagged one is
        put in REVIEW instead (audited, ``INVOICE_HELD`` announced). Invoices being appended to right now are
        skipped (and so are later invoices of the same account and currency) and closed on the next call; an
        invoice waits while an earlier one of its account and currency is OPEN or in REVIEW; when another
        process is finalizing, this call does nothing."""

        def work(conn: Any) -> list[str]:
            if not conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (FINALIZE_LOCK,)).fetchone()[0]:
                return []
            delay_s = self.close_delay.total_seconds()
            cols = "SELECT i.invoice_id, i.account, i.currency, i.period_start, i.period_end, i.close_at, i.status"
            if self.clock_mode == "wall":
                due = conn.execute(
                    f"{cols} FROM invoices i "
                    f"{FINAL_CLOSE_JOIN} WHERE i.status = 'OPEN' AND i.bill_id IS NULL AND {CLOSE_AT} <= now() "
                    "ORDER BY i.close_at, i.account, i.period_start, i.currency "
                    "LIMIT %s FOR UPDATE OF i SKIP LOCKED", (delay_s, limit)).fetchall()
            else:  # the account's own clock; or, quiet past the close time by the wall clock
                due = conn.execute(
                    f"{cols} FROM invoices i "
                    f"JOIN account_clock c ON c.consumer_group = %s AND c.account = i.account {FINAL_CLOSE_JOIN} "
                    f"CROSS JOIN LATERAL (SELECT {CLOSE_AT} AS close_at) e "
                    "WHERE i.status = 'OPEN' AND i.bill_id IS NULL "
                    "AND (e.close_at <= c.clock OR (%s::float8 IS NOT NULL "
                    "AND e.close_at <= now() AND c.last_line_at <= now() - make_interval(secs => %s::float8))) "
                    "ORDER BY i.close_at, i.account, i.period_start, i.currency "
                    "LIMIT %s FOR UPDATE OF i SKIP LOCKED",
                    (self.group, delay_s, self.idle_close_s, self.idle_close_s, limit)).fetchall()
            released = conn.execute(
                f"{cols}, i.approved_by FROM invoices i WHERE i.status = 'REVIEW' "
                "AND (i.approved_by IS NOT NULL OR i.review_until <= now()) "
                "ORDER BY i.close_at, i.account, i.period_start, i.currency LIMIT %s FOR UPDATE OF i SKIP LOCKED",
                (limit,)).fetchall()
            approved = {row[0]: row[7] for row in released}
            rows = sorted([r[:7] for r in due] + [r[:7] for r in released], key=lambda r: (r[5], r[1], r[3], r[2]))
            numbers: list[str] = []
            held_back: set[tuple[str, str]] = set()
            with conn.cursor() as cur:
                accounts = self._accounts(cur, {d[1] for d in rows})
                for invoice_id, account, currency, p0, p1, _close_at, status in rows:
                    if (account, currency) in held_back or cur.execute(
                        "SELECT 1 FROM invoices WHERE account = %s AND currency = %s AND status IN ('OPEN', 'REVIEW') "
                        "AND bill_id IS NULL AND period_start < %s LIMIT 1", (account, currency, p0)).fetchone():
                        held_back.add((account, currency))  # an earlier invoice is still open: keep the order
                        continue
                    facts = self._facts(cur, invoice_id, account, currency)
                    if status == "OPEN":
                        flags = val.review_flags(facts, self.review)
                        if flags:
                            self._hold(cur, invoice_id, account, currency, (p0, p1), facts, flags)
                            held_back.add((account, currency))
                            continue
                    elif approved.get(invoice_id) is None:  # the hold expired without a decision
                        cur.execute(
                            "INSERT INTO invoice_reviews (invoice_id, decided_by, source, decision, flags, note) "
                            "SELECT invoice_id, 'invoicing', 'stage', 'HOLD_EXPIRED', review_flags, "
                            "'finalized when the hold expired' FROM invoices WHERE invoice_id = %s", (invoice_id,))
                    numbers.append(self._finalize(cur, invoice_id, account, currency, (p0, p1),
                                                  accounts.get(account), facts.usage_kwh))
            return numbers

        numbers = self._run(work)
        if numbers:
            log.info("finalized %d invoices: %s … %s", len(numbers), numbers[0], numbers[-1])
        return numbers

    def _facts(self, cur: Any, invoice_id: str, account: str, currency: str) -> val.InvoiceFacts:
        """What the review checks look at for one invoice (its lines and its account's usage history)."""
        total = cur.execute("SELECT coalesce(sum(amount), 0) FROM invoice_lines WHERE invoice_id = %s",
                            (invoice_id,)).fetchone()[0]
        lines = cur.execute(REVIEW_LINES, (invoice_id,)).fetchall()
        history = tuple(r[0] for r in cur.execute(USAGE_HISTORY, (account, currency, self.review.history_invoices)))
        return val.facts_from_lines(total, lines, history)

    def _hold(self, cur: Any, invoice_id: str, account: str, currency: str, period: tuple[date, date],
              facts: val.InvoiceFacts, flags: list[val.Flag]) -> None:
        """Put an invoice in REVIEW (its flags, since, until), audit it and announce ``INVOICE_HELD``."""
        body = postgres.jsonb([f.as_json() for f in flags])
        hold_s = self.review.hold.total_seconds() if self.review.hold is not None else None
        cur.execute("UPDATE invoices SET status = 'REVIEW', review_flags = %s, review_since = now(), "
                    "review_until = now() + make_interval(secs => %s::float8) WHERE invoice_id = %s",
                    (body, hold_s, invoice_id))
        cur.execute(INSERT_REVIEW, (invoice_id, "invoicing", "stage", "HELD", body, ""))
        cur.execute(INSERT_OUTBOX, self._outbox(lc.held_event(invoice_id, account, currency, period, facts.total,
                                                              datetime.now(UTC))))
        log.warning("invoice %s held for review: %s", invoice_id, "; ".join(f.message for f in flags))

    def _finalize(self, cur: Any, invoice_id: str, account: str, currency: str, period: tuple[date, date],
                  account_ref: tuple[str, str, date, int] | None, usage_kwh: Decimal | None = None) -> str:
        net_days = account_ref[3] if account_ref else 0
        bill_date = period[1]
        due_date = bill_date + timedelta(days=net_days)
        series = lc.series_of(self.series, currency, bill_date)
        cur.execute("INSERT INTO invoice_series (series, next_number) VALUES (%s, 1) ON CONFLICT DO NOTHING",
                    (series,))
        n = cur.execute("UPDATE invoice_series SET next_number = next_number + 1 WHERE series = %s "
                        "RETURNING next_number - 1", (series,)).fetchone()[0]
        number = lc.invoice_number(series, n)
        prev = cur.execute(
            "SELECT amount_due FROM invoices WHERE account = %s AND currency = %s AND status = 'FINALIZED' "
            "ORDER BY finalized_order DESC LIMIT 1", (account, currency)).fetchone()
        amounts = [r[0] for r in cur.execute("SELECT amount FROM invoice_lines WHERE invoice_id = %s",
                                             (invoice_id,))]
        pays = cur.execute(
            "SELECT payment_id, amount FROM payments p WHERE account = %s AND currency = %s AND NOT EXISTS "
            "(SELECT 1 FROM invoice_payments ip WHERE ip.payment_id = p.payment_id) ORDER BY payment_id",
            (account, currency)).fetchall()
        st = lc.statement(prev[0] if prev else None, amounts, [a for _, a in pays])
        if pays:
            cur.executemany("INSERT INTO invoice_payments (payment_id, invoice_id) VALUES (%s, %s)",
                            [(pid, invoice_id) for pid, _ in pays])
        cur.execute(
            "UPDATE invoices SET status = 'FINALIZED', series = %s, sequence_number = %s, invoice_number = %s, "
            "bill_date = %s, due_date = %s, previous_balance = %s, charges_total = %s, payments_total = %s, "
            "amount_due = %s, finalized_at = now(), finalized_order = nextval('invoices_finalized_order'), "
            "usage_kwh = %s WHERE invoice_id = %s",
            (series, n, number, bill_date, due_date, st.previous_balance, st.charges_total, st.payments_total,
             st.amount_due, usage_kwh, invoice_id))
        cur.execute(INSERT_OUTBOX, self._outbox(lc.finalized_event(
            invoice_id, account, currency, number, period, bill_date, due_date, st, datetime.now(UTC))))
        return number

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

