"""The ``usage`` stage: ``usage.windows`` + ``charges.rated`` → the usage read model (Postgres) and budget
alerts (``usage.alerts``), issue 17 part A / seed 001.

Both inputs are keyed by account with the same partition count, so one partition's store holds all of an
account. Usage comes from window revisions (per-day kWh needs the window's time), cost from rated charge lines
(so cost is exactly what rating computed, SPEC §4). State per input partition (``UsageState`` records):

- ``uw|<window id>`` → ``[revision, kWh, metric, local day, period start, estimated]`` of the latest revision
  folded: a revision ≤ that is a duplicate (a re-emitted or replayed window) and changes nothing; a higher one
  removes its predecessor's contribution and adds its own (SPEC §3: (window id, revision) is unique);
- ``up|<account>|<period start>`` → the period state of ``pipeline.usage.model``, including the crossing state
  of each alert kind, so a restart or replay never alerts twice for one crossing.

At the end of each batch (``punctuate``) every period touched gets ``seq + 1``, its snapshots are upserted into
Postgres (``store.upsert_snapshots``, guarded by ``seq``) and its budget crossings judged (``model.cross``):
ACTUAL on the cost so far, PROJECTED on the projected cost, both the sum over the period's metrics. The
Postgres write precedes the Kafka commit; a batch redone after an abort recomputes the same ``seq`` from the
same state and rewrites it. A budget changed later is applied at the period's next change.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from pipeline.codec import Codec, DecodeError
from pipeline.money import ZERO
from pipeline.rating import rate as r
from pipeline.records import RatedCharge, UsageAlert, UsageWindow
from pipeline.reference import ReferenceData
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import Context, ProcessorBase, dead_letter
from pipeline.topology import Topics
from pipeline.usage import model

log = logging.getLogger(__name__)

FORMAT = 1
Budgets = dict[str, tuple[Decimal, str]]
Writer = Callable[[list[tuple[int, model.MetricSnapshot]]], None]


@dataclass
class _Touched:
    partition: int


def metric_of_line(ref: ReferenceData, charge: RatedCharge) -> str:
    """The metric a charge line is attributed to: its component's metric, else the first metric its price book
    prices (fixed charges, taxes, surcharges, minimums belong to the book's main service); ``""`` when the book
    version is unknown to this reference snapshot."""
    book = ref.books_by_version().get((charge.price_book_id, charge.price_book_version))
    if book is None:
        return ""
    metrics = [m for m in (getattr(c, "metric", None) for c in book.components) if m]
    own = next((getattr(c, "metric", None) for c in book.components if c.id == charge.component_id), None)
    return own or (metrics[0] if metrics else "")


class UsageProcessor(ProcessorBase):
    """Folds window revisions and charge lines per (account, period); snapshots to Postgres; alerts to Kafka."""

    def __init__(self, topics: Topics, codec: Codec, reference: Callable[[], ReferenceData],
                 budgets: Callable[[], Budgets], write: Writer) -> None:
        self.topics, self.codec, self.reference, self.budgets, self.write = topics, codec, reference, budgets, write
        self._touched: dict[bytes, _Touched] = {}

    def on_revoke(self, partition: int) -> None:
        self._touched = {k: v for k, v in self._touched.items() if v.partition != partition}

    def _dead_letter(self, record: Incoming, reason: str, message: str, ctx: Context) -> None:
        dead_letter(ctx, self.codec, self.topics.dlq_ingest, "usage", record, reason, message)

    def process(self, record: Incoming, ctx: Context) -> None:
        try:
            if record.topic == self.topics.charges_rated:
                self._charge(record, self.codec.decode(record.value or b"", RatedCharge), ctx)
            else:
                self._window(record, self.codec.decode(record.value or b"", UsageWindow), ctx)
        except DecodeError as exc:
            self._dead_letter(record, "UNDECODABLE", str(exc), ctx)

    def _period(self, store: Any, account: str, start: date, end: date, partition: int) -> tuple[bytes, dict]:
        pkey = f"up|{account}|{start.isoformat()}".encode()
        ps = store.get(pkey) or model.new_period(account, start, end)
        self._touched[pkey] = _Touched(partition)
        return pkey, ps

    def _window(self, record: Incoming, win: UsageWindow, ctx: Context) -> None:
        ref = self.reference()
        account = ref.accounts.get(win.account)
        if account is None:  # rating dead-letters it (UNKNOWN_ACCOUNT); nothing to show
            log.warning("window %s: account %r has no reference data; left out", win.window_id, win.account)
            return
        store = ctx.store(record.partition)
        wkey = b"uw|" + win.window_id.encode()
        held = store.get(wkey)
        if held is not None and held[0] >= win.revision:
            return  # duplicate or older revision
        if held is not None:
            old_start = date.fromisoformat(held[4])
            pkey, ps = self._period(store, win.account, old_start,
                                    r.period_containing(account.billing_cycle, account.billing_anchor, old_start).end,
                                    record.partition)
            model.add_window(ps, held[2], date.fromisoformat(held[3]), Decimal(held[1]), bool(held[5]), -1)
            store.put(pkey, ps)
        day = win.window_start.astimezone(account.tz).date()
        period = r.period_containing(account.billing_cycle, account.billing_anchor, day)
        estimated = bool(set(win.qualities) & model.ESTIMATED_FLAGS)
        pkey, ps = self._period(store, win.account, period.start, period.end, record.partition)
        model.add_window(ps, win.metric, day, win.value, estimated, 1)
        store.put(pkey, ps)
        store.put(wkey, [win.revision, str(win.value), win.metric, day.isoformat(), period.start.isoformat(),
                         int(estimated)])

    def _charge(self, record: Incoming, charge: RatedCharge, ctx: Context) -> None:
        store = ctx.store(record.partition)
        pkey, ps = self._period(store, charge.account, charge.period_start, charge.period_end, record.partition)
        model.set_line(ps, f"{charge.price_book_id}|{charge.component_id}|{charge.band}", charge.period_total,
                       charge.quantity, charge.component_kind, charge.band, charge.unit, charge.currency,
                       metric_of_line(self.reference(), charge))
        store.put(pkey, ps)

    def _last_year(self, store: Any, ps: dict[str, Any]) -> dict[str, Any] | None:
        account = self.reference().accounts.get(ps["account"])
        start = date.fromisoformat(ps["period_start"])
        if account is None:
            return None
        try:
            before = start.replace(year=start.year - 1)
        except ValueError:  # 29 February
            before = start.replace(year=start.year - 1, day=28)
        prior = r.period_containing(account.billing_cycle, account.billing_anchor, before)
        return store.get(f"up|{ps['account']}|{prior.start.isoformat()}".encode())

    def punctuate(self, wallclock_ms: int, ctx: Context) -> None:
        if not self._touched:
            return
        budgets = self.budgets()
        rows: list[tuple[int, model.MetricSnapshot]] = []
        for pkey, touched in sorted(self._touched.items()):
            store = ctx.store(touched.partition)
            ps = store.get(pkey)
            ps["seq"] += 1
            snaps = model.snapshots(ps, self._last_year(store, ps))
            rows.extend((ps["seq"], s) for s in snaps)
            self._judge(ps, snaps, budgets.get(ps["account"]), ctx)
            store.put(pkey, ps)
        self.write(rows)
        self._touched.clear()

    def _judge(self, ps: dict[str, Any], snaps: list[model.MetricSnapshot], budget: tuple[Decimal, str] | None,
               ctx: Context) -> None:
        currencies = {s.currency for s in snaps if s.currency}
        if budget is None or not currencies:
            return
        amount, currency = budget
        if currencies != {currency}:
            log.warning("budget of %s is in %s, its bill in %s: not judged", ps["account"], currency, currencies)
            return
        figures = {"ACTUAL": sum((s.cost for s in snaps), ZERO),
                   "PROJECTED": sum((s.projected_cost for s in snaps), ZERO)}
        as_of = max((s.as_of_day for s in snaps if s.as_of_day), default=None)
        start, end = date.fromisoformat(ps["period_start"]), date.fromisoformat(ps["period_end"])
        for kind in model.ALERT_KINDS:
            above, fire = model.cross(ps["above"].get(kind, False), figures[kind], amount)
            ps["above"][kind] = above
            if not fire:
                continue
            n = ps["crossings"].get(kind, 0) + 1
            ps["crossings"][kind] = n
            alert = UsageAlert(model.alert_id(ps["account"], start, kind, n), ps["account"], start, end, kind, n,
                               currency, amount.quantize(Decimal("0.000001")),
                               figures[kind].quantize(Decimal("0.000001")), as_of, ps["seq"])
            ctx.forward(self.topics.usage_alerts, ps["account"], self.codec.encode(alert))


def state_codec(codec: Codec) -> tuple[Callable[[bytes, Any], bytes], Callable[[bytes, bytes], Any]]:
    """``(encode, decode)`` for the usage store: every value a ``UsageState`` record holding its JSON."""

    def encode(key: bytes, value: Any) -> bytes:
        return codec.encode({"format": FORMAT, "body": json.dumps(value, sort_keys=True, separators=(",", ":"))},
                            "UsageState")

    def decode(key: bytes, raw: bytes) -> Any:
        return json.loads(codec.decode_dict(raw, "UsageState")["body"])

    return encode, decode
