"""``PartitionStore.encoded_changes`` (what the runtime produces to the changelog at each commit) is
``pending_changes`` made in one pass: the same records for any mix of puts, raw puts and deletes, with
real RocksDB (rocksdict) in a temporary directory."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.runtime.state import open_fresh_store


def encode(key: bytes, value: object) -> bytes:
    return json.dumps(value).encode()


def decode(key: bytes, raw: bytes) -> object:
    return raw if key.startswith(b"r|") else json.loads(raw)


writes = st.lists(st.tuples(st.sampled_from(["put", "raw", "delete"]), st.integers(0, 6), st.integers(-3, 3)),
                  max_size=30)


@settings(max_examples=60, deadline=None)
@given(st.lists(writes, min_size=1, max_size=3))
def test_encoded_changes_are_the_pending_changes(batches: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = open_fresh_store(Path(tmp) / "s", encode, decode)
        try:
            for batch in batches:
                for kind, k, v in batch:
                    if kind == "put":
                        store.put(b"v|%d" % k, {"n": v})
                    elif kind == "raw":
                        store.put_raw(b"r|%d" % k, b"\x00%d" % v)
                    else:
                        store.delete((b"v|%d", b"r|%d")[v % 2] % k)
                changes = store.encoded_changes()
                assert changes == dict(store.pending_changes())
                assert list(changes) == [key for key, _ in store.pending_changes()]  # the order they were staged in
                store.flush(changes)
                assert not store.has_pending() and store.encoded_changes() == {}
        finally:
            store.close()
