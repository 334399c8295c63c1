"""``pipeline.runtime.state.PartitionStore``: the write cache over RocksDB and the changelog records
it hands to the runtime, with real RocksDB (rocksdict) in a temporary directory."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.runtime.state import PartitionStore, open_fresh_store

DECODED: list[bytes] = []  # keys decode was called for


def encode(key: bytes, value: object) -> bytes:
    return json.dumps(value).encode()


def decode(key: bytes, raw: bytes) -> object:
    DECODED.append(key)
    return raw if key.startswith(b"r|") else json.loads(raw)


def test_values_are_encoded_at_commit_raw_values_go_as_they_are_and_are_not_cached(tmp_path: Path) -> None:
    store = open_fresh_store(tmp_path / "s", encode, decode)
    store.put(b"v|1", {"n": 1})
    store.put_raw(b"r|1", b"\x00raw")
    store.put(b"v|2", [2])
    store.delete(b"v|2")
    assert store.get(b"r|1") == b"\x00raw" and store.get(b"v|1") == {"n": 1} and store.get(b"v|2") is None
    changes = dict(store.pending_changes())
    assert changes == {b"v|1": b'{"n": 1}', b"r|1": b"\x00raw", b"v|2": None}
    store.flush(changes)
    assert not store.has_pending()
    DECODED.clear()
    assert store.get(b"v|1") == {"n": 1}  # from the cache: not decoded again
    assert store.get(b"r|1") == b"\x00raw"  # raw entries are read back from RocksDB
    assert store.get(b"v|2") is None
    assert DECODED == [b"r|1"]
    assert list(store.scan(b"r|")) == [(b"r|1", b"\x00raw")]
    store.close()


def test_a_value_put_uncached_is_durable_and_read_back_decoded_after_the_commit(tmp_path: Path) -> None:
    store = open_fresh_store(tmp_path / "s", encode, decode)
    value = {"revision": 3}
    store.put(b"w|1", value, cache=False)
    store.put(b"v|1", {"n": 1})
    assert store.get(b"w|1") is value  # the live object until the commit
    store.flush(store.encoded_changes())
    DECODED.clear()
    again = store.get(b"w|1")
    assert again == {"revision": 3} and again is not value  # decoded from RocksDB, not kept in the cache
    assert store.get(b"v|1") == {"n": 1}
    assert DECODED == [b"w|1"]
    store.put(b"w|1", {"revision": 4})  # cached again once put without cache=False
    store.flush(store.encoded_changes())
    DECODED.clear()
    assert store.get(b"w|1") == {"revision": 4} and DECODED == []
    store.close()


def test_discard_drops_pending_writes_and_the_cache_of_values_changed_in_place(tmp_path: Path) -> None:
    store = open_fresh_store(tmp_path / "s", encode, decode)
    store.put(b"v|1", {"n": 1})
    store.flush()
    live = store.get(b"v|1")
    live["n"] = 99  # changed in place by work that is then aborted
    store.put_raw(b"r|1", b"x")
    store.discard()
    assert store.get(b"v|1") == {"n": 1} and store.get(b"r|1") is None
    store.close()


def test_a_changelog_restore_gives_the_committed_state(tmp_path: Path) -> None:
    store = open_fresh_store(tmp_path / "a", encode, decode)
    records = [(b"v|1", b'{"n": 1}'), (b"r|1", b"raw"), (b"v|2", b"[2]"), (b"v|2", None)]
    assert store.apply_changelog(iter(records)) == 4
    assert dict(store.scan(b"")) == {b"r|1": b"raw", b"v|1": {"n": 1}}
    store.close()


def test_a_value_read_during_a_transaction_stays_the_live_object_until_the_commit(tmp_path: Path) -> None:
    store = open_fresh_store(tmp_path / "s", encode, decode)
    for i in range(10):
        store.put(b"v|%d" % i, {"n": i})
    store.flush()
    store.close()
    store = PartitionStore(tmp_path / "s", encode, decode, cache_max=3)  # reopened: nothing cached
    live = store.get(b"v|0")
    live["n"] = 100  # changed in place, not put (e.g. kept apart through put_raw)
    store.put_raw(b"r|0", b"the change")
    assert [store.get(b"v|%d" % i)["n"] for i in range(1, 10)] == list(range(1, 10))  # more reads than cache_max
    assert store.get(b"v|0") is live and live["n"] == 100
    store.flush()
    assert len(store._cache) <= 3  # trimmed after the commit
    store.close()


_KEYS = st.sampled_from([b"v|%d" % i for i in range(12)] + [b"v|1%d" % i for i in range(6)])
_BATCH = st.lists(st.tuples(_KEYS, st.one_of(st.none(), st.integers(0, 99))), max_size=20)  # None: a delete


@given(st.lists(_BATCH, min_size=1, max_size=6))
@settings(max_examples=60, deadline=None)
def test_what_rocksdb_holds_after_each_flush_is_the_last_write_of_every_key(batches: list) -> None:
    """Whatever order puts and deletes are staged in (``flush`` writes a batch's keys in key order), RocksDB
    holds, after each commit, the last value staged for every key and nothing for a deleted one: ``scan`` reads
    RocksDB itself, not the cache."""
    with tempfile.TemporaryDirectory() as tmp:
        store = open_fresh_store(Path(tmp) / "s", encode, decode)
        model: dict[bytes, int] = {}
        for batch in batches:
            for key, value in batch:
                if value is None:
                    store.delete(key)
                    model.pop(key, None)
                else:
                    store.put(key, value, cache=value % 2 == 0)
                    model[key] = value
            store.flush(store.encoded_changes())
            assert list(store.scan(b"v|")) == sorted(model.items())
            assert {k: store.get(k) for k in model} == model
        store.close()
