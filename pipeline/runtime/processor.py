"""The contract between the runtime and a stage's domain code (after Kafka Streams' Processor API).

A processor sees records and a ``Context``; it never sees a consumer, a producer or a database
driver. The runtime owns the transaction: everything forwarded and every state write made while
handling a batch becomes visible atomically with that batch's input offsets, or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.records import DeadLetter
from pipeline.runtime.kafka import Incoming


class Store(Protocol):
    """Key-value state of one input partition (see ``runtime.state.PartitionStore``)."""

    def get(self, key: bytes, default: Any = None) -> Any: ...
    def put(self, key: bytes, value: Any, cache: bool = True) -> None: ...
    def put_raw(self, key: bytes, raw: bytes) -> None: ...
    def delete(self, key: bytes) -> None: ...
    def scan(self, prefix: bytes) -> Any: ...


class Context(Protocol):
    """What a processor may do while handling a record or a punctuation."""

    def forward(self, topic: str, key: bytes | str | None, value: bytes,
                headers: list[tuple[str, bytes]] | None = None) -> None:
        """Produce ``value`` (with ``headers``, e.g. ``runtime.timing``'s) to ``topic`` within the current
        transaction."""
        ...

    def count(self, kind: str, reason: str) -> None:
        """Count one outcome of the current batch for monitoring: ``kind`` ``dead_letter`` or ``refused``
        with its reason code; it reaches ``pipeline_dead_letters_total`` / ``pipeline_refused_total`` only
        once the batch is committed (a batch redone after an abort is counted once)."""
        ...

    def store(self, partition: int) -> Store:
        """The state store of input ``partition`` (stateful stages only)."""
        ...


class Processor(Protocol):
    """A stage's domain logic.

    ``process`` handles one record; a processor may also define ``process_batch(records, ctx)``,
    which the runtime then calls with each consumed batch instead (it must have the effect of
    ``process`` on each record in order: it exists to hoist per-record work out of the loop);
    ``punctuate`` runs after every batch (and when idle) with
    the wall-clock time in epoch milliseconds, for time-driven work such as closing windows;
    ``on_assign``/``on_revoke`` bracket ownership of an input partition (after its state has
    been restored / before it is handed over). With several input topics one store serves a
    partition number: it is restored again (then ``on_assign``) for each topic's partition that
    joins, and closed when the last one goes; ``on_revoke`` comes for each one that goes, also while
    another topic's partition keeps the store open.
    """

    def on_assign(self, partition: int, ctx: Context) -> None: ...
    def on_revoke(self, partition: int) -> None: ...
    def process(self, record: Incoming, ctx: Context) -> None: ...
    def punctuate(self, wallclock_ms: int, ctx: Context) -> None: ...


class ProcessorBase:
    """No-op defaults for the ``Processor`` hooks a stage does not need."""

    def on_assign(self, partition: int, ctx: Context) -> None:
        """Called after partition ``partition`` is assigned (and its state restored)."""

    def on_revoke(self, partition: int) -> None:
        """Called before partition ``partition`` is handed over."""

    def punctuate(self, wallclock_ms: int, ctx: Context) -> None:
        """Called after every batch and when idle, with the wall clock in epoch ms."""


def dead_letter(ctx: Context, codec: Any, topic: str, stage: str, record: Incoming, reason: str, message: str) -> None:
    """Forward ``record`` with its original bytes and headers to the dead-letter ``topic``.

    ``reason`` is a machine-readable code (``UNDECODABLE``, ``UNKNOWN_NMI`` ...), ``message`` names
    the problem for a person. Keyed like the original record.
    """
    dead = DeadLetter(stage, reason, message, record.topic, record.partition, record.offset,
                      record.key, record.value, record.headers)
    ctx.forward(topic, record.key, codec.encode(dead))
    ctx.count("dead_letter", reason)


class ExternalSink(Protocol):
    """A processor that writes its output and the consumed offsets to an outside store itself
    (the invoicing stage: Postgres), instead of to Kafka inside a transaction."""

    def stored_offsets(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Next offsets to consume, as kept in the external store (absent: start from the beginning)."""
        ...

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Write pending output and ``offsets`` in one external transaction."""
        ...

    def discard(self) -> None:
        """Forget pending output (the batch will be re-read)."""
        ...


@dataclass
class FakeContext:
    """A context for unit tests: captures forwards, keeps state in dicts (no Kafka, no RocksDB)."""

    forwarded: list[tuple[str, Any, bytes]] = field(default_factory=list)
    stores: dict[int, DictStore] = field(default_factory=dict)
    headers: list[list[tuple[str, bytes]] | None] = field(default_factory=list)  # per forward, in order
    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def forward(self, topic: str, key: bytes | str | None, value: bytes,
                headers: list[tuple[str, bytes]] | None = None) -> None:
        self.forwarded.append((topic, key, value))
        self.headers.append(headers)

    def count(self, kind: str, reason: str) -> None:
        self.counts[(kind, reason)] = self.counts.get((kind, reason), 0) + 1

    def store(self, partition: int) -> DictStore:
        return self.stores.setdefault(partition, DictStore())


class DictStore:
    """An in-memory ``Store`` for unit tests."""

    def __init__(self) -> None:
        self.data: dict[bytes, Any] = {}

    def get(self, key: bytes, default: Any = None) -> Any:
        return self.data.get(key, default)

    def put(self, key: bytes, value: Any, cache: bool = True) -> None:
        self.data[key] = value

    def put_raw(self, key: bytes, raw: bytes) -> None:
        self.data[key] = raw

    def delete(self, key: bytes) -> None:
        self.data.pop(key, None)

    def scan(self, prefix: bytes) -> Any:
        return iter(sorted((k, v) for k, v in self.data.items() if k.startswith(prefix)))


class ChangelogStore:
    """A ``Store`` for tests and benchmarks, kept as its compacted changelog partition would be: committed
    values exist only as the bytes the stage's state codec (``encode``/``decode``) made of them, in
    ``changelog`` (key → bytes); values read are decoded and may then be changed in place by a processor;
    writes stay pending until ``commit`` (an aborted batch is simply not committed). ``sizes`` gives the
    committed bytes (key + value) per two-byte key prefix."""

    def __init__(self, encode: Callable[[bytes, Any], bytes], decode: Callable[[bytes, bytes], Any],
                 changelog: dict[bytes, bytes] | None = None) -> None:
        self.encode, self.decode = encode, decode
        self.changelog: dict[bytes, bytes] = {} if changelog is None else changelog
        self.live: dict[bytes, Any] = {}
        self.pending: dict[bytes, Any] = {}
        self.uncached: set[bytes] = set()  # put with cache=False: decoded again from the changelog after the commit

    def get(self, key: bytes, default: Any = None) -> Any:
        if key in self.pending:
            value = self.pending[key]
            return default if value is None else value
        if key not in self.live:
            if key not in self.changelog:
                return default
            self.live[key] = self.decode(key, self.changelog[key])
        return self.live[key]

    def put(self, key: bytes, value: Any, cache: bool = True) -> None:
        self.pending[key] = value
        if not cache:
            self.uncached.add(key)

    def put_raw(self, key: bytes, raw: bytes) -> None:
        self.pending[key] = raw  # the state codecs write such entries as they are

    def delete(self, key: bytes) -> None:
        self.pending[key] = None

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, Any]]:
        keys = {k for k in self.changelog if k.startswith(prefix)} | {k for k in self.pending if k.startswith(prefix)}
        for key in sorted(keys):
            value = self.get(key)
            if value is not None:
                yield key, value

    def commit(self) -> None:
        """Make the pending writes committed (encoded into ``changelog``)."""
        for key, value in self.pending.items():
            if value is None:
                self.changelog.pop(key, None)
                self.live.pop(key, None)
            else:
                self.changelog[key] = self.encode(key, value)
                if key in self.uncached:
                    self.live.pop(key, None)
                else:
                    self.live[key] = value
        self.pending.clear()
        self.uncached.clear()

    def sizes(self) -> dict[str, int]:
        """Committed bytes (key + value) per key prefix (the two bytes before the first ``|``, e.g. ``w|``)."""
        out: dict[str, int] = {}
        for key, raw in self.changelog.items():
            out[key[:2].decode()] = out.get(key[:2].decode(), 0) + len(key) + len(raw)
        return out
