"""The ingest processor's view of the identities its store holds (``_Partition.held``, issue 13): a reading whose
identity is not in it is decided without reading the store. Proved by comparison with a processor that reads the
store for every identity (what it did before): the same forwards, headers, state and counts, over batches of
readings with duplicates and supersessions, horizons passing (identities forgotten) and restarts (the view
rebuilt from the store), on the hot path and on the general path."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.ingest.processor import IngestProcessor, _Partition
from pipeline.records import DeadLetter, MeterReading
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import Context, FakeContext
from tests.unit.test_ingest_wire import CODEC, NOW_MS, REF, RULES, TOPICS, General, encoded, readings

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Everything(set):  # type: ignore[type-arg]
    """A ``held`` view that holds every key: every identity is read from the store."""

    def __contains__(self, key: object) -> bool:
        return True


class ReadsAll(IngestProcessor):
    """The processor reading the store for every identity, as before ``held`` existed."""

    def _partition(self, partition: int, ctx: Context) -> _Partition:
        part = super()._partition(partition, ctx)
        if not isinstance(part.held, Everything):
            part.held = Everything(part.held)
        return part


class GeneralReadsAll(ReadsAll, General):
    """``ReadsAll`` with the hot path turned off."""


def run(make: type[IngestProcessor], records: list[Incoming], batch: int, restarts: list[int]) -> tuple[object, ...]:
    ctx = FakeContext()
    proc = make(TOPICS, CODEC, lambda: REF, rules=RULES, clock_ms=lambda: NOW_MS)
    for n, i in enumerate(range(0, len(records), batch)):
        if n in restarts:  # a new process over the same store: the view is rebuilt from it
            proc = make(TOPICS, CODEC, lambda: REF, rules=RULES, clock_ms=lambda: NOW_MS)
        proc.process_batch(records[i:i + batch], ctx)
        proc.punctuate(NOW_MS, ctx)
    state = {p: dict(s.data) for p, s in ctx.stores.items()}
    forwarded = [(t, k, replace(CODEC.decode(v, DeadLetter), failed_at=EPOCH) if t == TOPICS.dlq_ingest else v)
                 for t, k, v in ctx.forwarded]  # a dead letter says when it was written: not compared
    return forwarded, ctx.headers, ctx.counts, state


def later(reading: MeterReading, hours: int) -> MeterReading:
    """The same interval in a later version (a supersession, or a duplicate when ``hours`` is 0)."""
    return replace(reading, version=reading.version + timedelta(hours=hours))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(readings(), min_size=1, max_size=14), st.lists(st.tuples(st.integers(0, 13), st.integers(-2, 3)),
       max_size=8), st.integers(1, 5), st.lists(st.integers(0, 10), max_size=3), st.booleans())
def test_the_held_view_decides_as_reading_the_store_would(
        batch_readings: list[MeterReading], again: list[tuple[int, int]], batch: int, restarts: list[int],
        ordered: bool) -> None:
    if ordered:  # time-ordered: the clock passes the horizons of the first readings (they are forgotten)
        batch_readings.sort(key=lambda r: r.interval_start)
    batch_readings += [later(batch_readings[i % len(batch_readings)], h) for i, h in again]
    values = [v for v in map(encoded, batch_readings) if v is not None]
    records = [Incoming(TOPICS.meter_readings, len(v) % 2, offset, b"k", v, (), 1_700_000_000_000 + offset)
               for offset, v in enumerate(values)]
    assert run(IngestProcessor, records, batch, restarts) == run(ReadsAll, records, batch, restarts)
    assert run(General, records, batch, restarts) == run(GeneralReadsAll, records, batch, restarts)
