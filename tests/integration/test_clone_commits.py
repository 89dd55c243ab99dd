"""The initial sync's clone commits while it waits for the source (real SecantusDB server of the session): what a
slow source has delivered is in the head, committed, before its next batch arrives, so the clone never ends with a
large commit; a fast source still gets CLONE_COMMIT_BYTES transactions. Both end with the source's documents, byte
for byte."""
import os
import time
import uuid

import pymongo
import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, rawbson, source

DOCS, BATCH = 1200, 200


@pytest.fixture(scope="module")
def coll(mongo_server):
    c = pymongo.MongoClient(mongo_server["uri"])
    db = c["clonecommit_%s" % uuid.uuid4().hex[:8]]
    db.c.insert_many([{"_id": i, "pad": "x" * 1000, "n": i} for i in range(DOCS)], ordered=False)
    yield db.c
    c.drop_database(db.name)
    c.close()


def _count(path, key, ns):
    """Documents of ns committed in the head at path, read through a connection of its own."""
    other = head.Head(path, key)
    try:
        with other.read() as r:
            return r.count(ns) if r.namespace(ns) else 0
    finally:
        other.close()


def _sync_watching_commits(mongo_server, tmp_path, monkeypatch, coll, idle_commit_bytes, wait):
    """An initial sync whose source pauses before each batch of coll until the head shows the documents delivered so
    far committed (up to wait seconds); returns [the committed count seen before each batch after the first]."""
    path, key = str(tmp_path / "head" / "head.db"), os.urandom(32)
    ns = coll.full_name
    monkeypatch.setattr(source, "CLONE_BATCH_DOCS", BATCH)
    monkeypatch.setattr(source, "CLONE_IDLE_COMMIT_BYTES", idle_commit_bytes)
    real, seen = source.find_raw_batches, []

    def slow(client, name, query=None, batch_size=None):
        delivered = 0
        for batch in real(client, name, query, batch_size=batch_size):
            if name == ns and delivered:
                deadline = time.monotonic() + wait
                while _count(path, key, ns) < delivered and time.monotonic() < deadline:
                    time.sleep(0.02)
                seen.append(_count(path, key, ns))
            delivered += len(source._split_batch(batch))
            yield batch
    monkeypatch.setattr(source, "find_raw_batches", slow)
    h = head.Head(path, key)
    client = source.connect({"uri": mongo_server["uri"], "connect_timeout": 10})
    try:
        stats = source.initial_sync(h, client)
        assert h.position()["consistent"] and stats["docs"] >= DOCS
        with h.read() as r:
            got = dict(r.scan(ns))
    finally:
        client.close()
        h.close()
    want = {rawbson.id_key_from_document(raw): raw for raw in
            (bytes(d.raw) for d in coll.with_options(codec_options=source.RAW).find())}
    assert got == want  # byte for byte
    return seen


def test_a_clone_commits_what_a_slow_source_delivered_before_its_next_batch(mongo_server, tmp_path, monkeypatch, coll):
    seen = _sync_watching_commits(mongo_server, tmp_path, monkeypatch, coll, 1, wait=3)
    assert seen == [BATCH * i for i in range(1, DOCS // BATCH)]


def test_without_idle_commits_the_clone_holds_its_transaction_open(mongo_server, tmp_path, monkeypatch, coll):
    # the control: above the clone's size no idle commit happens, so nothing is committed before the clone's end
    seen = _sync_watching_commits(mongo_server, tmp_path, monkeypatch, coll, source.CLONE_COMMIT_BYTES, wait=0.2)
    assert seen == [0] * (DOCS // BATCH - 1)
