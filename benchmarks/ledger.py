"""Ledger lines appended per second through the invoicing stage, exactly-once on (lines and offsets
in one Postgres transaction per batch), on the local stack.

    .venv/bin/pipeline stack up && .venv/bin/python benchmarks/ledger.py [--lines 100000]

Pre-produces RatedCharge records to a fresh `charges.rated` topic, runs the invoicing stage
in-process against a fresh database, and times from the first record consumed until the offsets
stored in Postgres cover every record.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from datetime import date
from decimal import Decimal

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.records import RatedCharge
from pipeline.runtime import postgres
from pipeline.runtime.kafka import IdempotentProducer, create_topics
from pipeline.runtime.loop import StageRunner
from pipeline.stages import build_stage
from pipeline.topology import Topics

PARTITIONS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    base = Settings()
    tag = f"bench{uuid.uuid4().hex[:6]}"
    with postgres.connect(f"postgresql://postgres@127.0.0.1:{base.postgres_port}/postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{tag}" OWNER pipeline_owner')
    settings = Settings(
        topic_prefix=f"{tag}.", partitions=PARTITIONS,
        database_url=f"postgresql://pipeline@127.0.0.1:{base.postgres_port}/{tag}",
        database_owner_url=f"postgresql://pipeline_owner@127.0.0.1:{base.postgres_port}/{tag}",
    )
    postgres.migrate(settings.database_owner_url)
    topics = Topics(settings)
    create_topics(settings.kafka_bootstrap, topics.specs())
    codec = default_codec()
    producer = IdempotentProducer(settings.kafka_bootstrap)
    for i in range(args.lines):
        account = f"ACC-{i % 1000:04d}"
        charge = RatedCharge(
            f"{tag}-{i}", account, date(2025, 3, 1), date(2025, 4, 1), "AUD", "energy", "tou", "peak",
            Decimal(i % 500), "kWh", Decimal("0.3403"), Decimal("1.23"), Decimal("1.23"), "BOOK", 1,
            "bench", '{"formula": "bench"}',
        )
        producer.send(topics.charges_rated, account.encode(), codec.encode(charge))
    producer.flush()

    runner = StageRunner(settings, build_stage("invoicing", settings))
    t0 = time.monotonic()
    done: list[float] = []

    def watch() -> None:
        while True:
            with postgres.connect(settings.database_url) as conn:
                n = conn.execute("SELECT count(*) FROM invoice_lines").fetchone()[0]
            if n >= args.lines:
                done.append(time.monotonic())
                runner.stop()
                return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    runner.run()
    took = done[0] - t0
    print(f"{args.lines:,} ledger lines appended through the invoicing stage (exactly-once, lines + offsets "
          f"per Postgres transaction) in {took:.1f}s: {args.lines / took:,.0f} lines/s")
    with postgres.connect(f"postgresql://postgres@127.0.0.1:{base.postgres_port}/postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE "{tag}" WITH (FORCE)')


if __name__ == "__main__":
    main()
