"""State size per meter-month (issue 11: "state stays bounded"): what the windowing and rating stages keep
so that every window can be brought back and re-rated, whenever its data arrives.

    .venv/bin/python benchmarks/state_size.py [--meters 10] [--days 31]

Runs the real windowing and rating processors in-process over ``--meters`` meters of 5-minute import data
(288 readings a day, the SPEC's scale case), delivered a day's file at a time with its completion markers,
then ten more days so that the first month is archived (allowed lateness 7 days, the default). The
state is measured as the bytes of its live changelog entries (key + value: what a compacted changelog
topic and the uncompressed store hold), through the stages' own state codecs. Prints the figures per
meter-month, split by kind of entry, and the extrapolation to the SPEC's target: 1M meters, 13 months.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.rating.pricebook import PriceBook
from pipeline.rating.processor import RatingProcessor
from pipeline.rating.processor import state_codec as rating_codec
from pipeline.records import SeriesMarker, UsageEvent
from pipeline.reference import BUNDLED_REFERENCE, Account, PlanAssignment, ReferenceData, ServicePoint
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import ChangelogStore
from pipeline.topology import Topics
from pipeline.windowing.processor import WindowingProcessor, policies_from_settings
from pipeline.windowing.processor import state_codec as windowing_codec

CODEC = default_codec()
TOPICS = Topics(Settings())


class Ctx:
    def __init__(self, store: ChangelogStore) -> None:
        self.the_store = store
        self.out: list[bytes] = []

    def count(self, kind: str, reason: str) -> None:
        pass

    def forward(self, topic: str, key: object, value: bytes, headers: object = None) -> None:
        self.out.append(value)

    def store(self, partition: int) -> ChangelogStore:
        return self.the_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=10)
    parser.add_argument("--days", type=int, default=31)
    args = parser.parse_args()
    import json

    book = PriceBook.model_validate(json.loads(BUNDLED_REFERENCE.read_text())["price_books"][0])
    accounts = [Account(account=f"ACC-{i:07d}", timezone="Australia/Sydney", holiday_region="AU-ACT",
                        billing_anchor="2025-01-01") for i in range(args.meters)]
    ref = ReferenceData.build(
        accounts, [ServicePoint(nmi=f"NMI{i:07d}", account=a.account, effective_from="2025-01-01")
                   for i, a in enumerate(accounts)],
        [PlanAssignment(account=a.account, price_book_id=book.id, effective_from="2025-01-01") for a in accounts],
        [book])
    settings = Settings()  # 30-minute energy windows, allowed lateness 7 days
    wstore, rstore = ChangelogStore(*windowing_codec(CODEC)), ChangelogStore(*rating_codec(CODEC))
    wctx, rctx = Ctx(wstore), Ctx(rstore)
    windowing = WindowingProcessor(TOPICS, CODEC, policies_from_settings(settings), clock_ms=lambda: 0)
    rating = RatingProcessor(TOPICS, CODEC, lambda: ref)
    windowing.on_assign(0, wctx)
    rating.on_assign(0, rctx)
    start = datetime(2025, 1, 31, 13, 0, tzinfo=UTC)  # 1 February 00:00 in Sydney
    offset = 0
    t0 = time.monotonic()
    total_days = args.days + 10
    for day in range(total_days):
        batch = []
        for m in range(args.meters):
            nmi, account = f"NMI{m:07d}", accounts[m].account
            for slot in range(288):  # a day's file of one meter: 288 five-minute intervals
                at = start + timedelta(days=day, minutes=5 * slot)
                ev = UsageEvent(f"nem12:{nmi}:E1:{at:%Y-%m-%dT%H:%MZ}", account, f"{nmi}/E1", "energy_import", "kWh",
                                at, at + timedelta(minutes=5), Decimal(slot % 17) / 1000, at + timedelta(days=1), "A",
                                f"NEM12#{nmi}-{day:03d}#MDP#RETAILER.zip!day.csv#{m + 2}")
                batch.append(CODEC.encode(ev))
            batch.append(CODEC.encode(SeriesMarker(account, f"{nmi}/E1", start + timedelta(days=day + 1), "day.csv")))
        for i in range(0, len(batch), 2000):
            records = [Incoming(TOPICS.usage_events, 0, offset + j, b"k", raw, (), 0)
                       for j, raw in enumerate(batch[i:i + 2000])]
            offset += len(records)
            windowing.process_batch(records, wctx)
            windowing.punctuate(0, wctx)
            wstore.commit()
            revisions = wctx.out
            wctx.out = []
            for j, raw in enumerate(revisions):
                rating.process(Incoming(TOPICS.usage_windows, 0, j, b"k", raw, (), 0), rctx)
            rating.punctuate(0, rctx)
            rstore.commit()
            rctx.out.clear()
    took = time.monotonic() - t0
    meter_months = args.meters * total_days / (365.25 / 12)
    archived_months = args.meters * (total_days - 8) / (365.25 / 12)  # the days older than lateness + a sweep step
    w_sizes, r_sizes = wstore.sizes(), rstore.sizes()
    print(f"{args.meters} meters × {total_days} days of 5-minute data ({args.meters * total_days * 288:,} readings, "
          f"{args.meters * total_days * 48:,} windows) in {took:.0f} s")
    print("windowing state by kind of entry (bytes): " + ", ".join(f"{k} {v:,}" for k, v in sorted(w_sizes.items())))
    print("rating state by kind of entry (bytes):    " + ", ".join(f"{k} {v:,}" for k, v in sorted(r_sizes.items())))
    archive_per = w_sizes.get("x|", 0) / archived_months
    hot_per_day = (w_sizes.get("w|", 0) + w_sizes.get("i|", 0)) / (args.meters * 8)
    rating_per = sum(r_sizes.values()) / meter_months
    print(f"windowing, archived: {archive_per / 1024:,.0f} KiB per meter-month "
          f"({w_sizes.get('x|', 0) / (archived_months * 1461):,.0f} B per 30-minute window)")
    print(f"windowing, hot (the last allowed-lateness days): {hot_per_day / 1024:,.0f} KiB per meter-day")
    print(f"rating (every window's latest revision + period aggregates): {rating_per / 1024:,.0f} KiB per meter-month")
    target = 1_000_000 * 13
    print(f"extrapolated to 1M meters × 13 months: windowing {archive_per * target / 2**40:,.2f} TiB archived "
          f"+ {hot_per_day * 1_000_000 * 8 / 2**30:,.0f} GiB hot, rating {rating_per * target / 2**40:,.2f} TiB "
          "(uncompressed, spread over the stages' partitions)")


if __name__ == "__main__":
    main()
