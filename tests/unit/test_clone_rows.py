"""The initial sync's clone path into a real (SQLCipher) head, no server: a raw batch split into bytearray rows and
streamed into Writer.upsert_many stores exactly what the bytes path stores (documents, keys, chunk-boundary flags)."""
import os

import bson
from bson import ObjectId

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, rawbson, source


def _batch():
    docs = [bson.encode({"_id": ObjectId(), "v": i, "pad": "x" * (i * 37 % 8000)}) for i in range(3000)]  # ~12 MB: about 12 chunk ends
    docs += [bson.encode({"_id": i, "v": i}) for i in range(-5, 5)]            # not ObjectIds
    docs += [bson.encode({"v": 1, "_id": "later"}), bson.encode({"_id": {"a": [1, 2]}})]  # _id not first, a document
    return docs, b"".join(docs)


def _stored(h, ns):
    with h.read() as r:
        return list(r.scan(ns)), r.boundaries(ns), r.count(ns)


def test_bytearray_rows_store_what_the_bytes_rows_store(tmp_path):
    docs, batch = _batch()
    pairs = source._split_batch(batch)
    blobs = list(source._iter_batch(batch, blobs=True))
    assert [type(k) for k, _d in pairs] == [bytes] * len(docs) and {type(k) for k, _d in blobs} == {bytearray}
    assert [(bytes(k), bytes(d)) for k, d in blobs] == pairs == [(rawbson.id_key_from_document(d), d) for d in docs]

    key = os.urandom(32)
    a, b = head.Head(str(tmp_path / "a" / "head.db"), key), head.Head(str(tmp_path / "b" / "head.db"), key)
    try:
        with a.write() as w:
            assert w.upsert_many("db.c", pairs, track=False) == len(docs)
        with b.write() as w:
            assert w.upsert_many("db.c", source._iter_batch(batch, blobs=True), track=False) == len(docs)
        got_a, got_b = _stored(a, "db.c"), _stored(b, "db.c")
        assert got_a == got_b and got_b[2] == len(docs) and got_b[1]  # some boundary flags set, the same ones
        assert sorted(d for _k, d in got_b[0]) == sorted(docs) and all(type(d) is bytes for _k, d in got_b[0])
    finally:
        a.close()
        b.close()
