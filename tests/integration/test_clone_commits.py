"""The initial sync's clone commits while it waits for the source (real SecantusDB server of the session): what a
slow source has delivered is in the head, committed, before its next batch arrives, so the clone never ends with a
large commit; a fast source still gets CLONE_COMMIT_BYTES transactions. Both end with the source's documents, byte
for byte. A head that fails stops the clone's reader, and a failed preparation leaves the previous head."""
import os
import threading
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

    def slow(client, name, query=None, batch_size=None, read_concern=None):
        delivered = 0
        for batch in real(client, name, query, batch_size=batch_size, read_concern=read_concern):
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


def test_a_failing_head_write_stops_the_clone_reader(mongo_server, tmp_path, monkeypatch, coll):
    """The head fails on its second batch while the source has many more than the reader's queue holds: the sync
    fails at once with the head's error (a reader left blocked on the full queue would hang it), its thread gone."""
    monkeypatch.setattr(source, "CLONE_BATCH_DOCS", 20)  # 60 batches of coll alone: more than the queue's 8
    real, calls = head.Writer.upsert_many, []

    def failing(self, ns, pairs, track=True):
        calls.append(ns)
        if len(calls) == 2:
            raise OSError("disk full (test)")
        return real(self, ns, pairs, track)
    monkeypatch.setattr(head.Writer, "upsert_many", failing)
    h = head.Head(str(tmp_path / "head" / "head.db"), os.urandom(32))
    client = source.connect({"uri": mongo_server["uri"], "connect_timeout": 10})
    errors = []

    def run():
        try:
            source.initial_sync(h, client)
        except OSError as e:
            errors.append(e)
    t = threading.Thread(target=run, daemon=True)
    try:
        t.start()
        t.join(60)
        assert not t.is_alive(), "the initial sync hung after the head failed"
        assert [str(e) for e in errors] == ["disk full (test)"]
        assert not [th for th in threading.enumerate() if th.name == "kmipbackup-clone"]
        assert source.needs_initial_sync(h)
    finally:
        client.close()
        h.close()


def test_a_failing_head_preparation_keeps_the_old_head(mongo_server, tmp_path, monkeypatch, coll):
    """The head is cleared and made ready for the clone in one transaction: when that fails (here creating a
    namespace), the previous head is still there, consistent, with its documents; the clone's reader is stopped."""
    path, key = str(tmp_path / "head" / "head.db"), os.urandom(32)
    h = head.Head(path, key)
    client = source.connect({"uri": mongo_server["uri"], "connect_timeout": 10})
    try:
        source.initial_sync(h, client)
        before = (h.position(), _count(path, key, coll.full_name))
        assert before[0]["consistent"] and before[1] == DOCS

        def refuse(self, *a, **kw):
            raise OSError("no space for a namespace (test)")
        monkeypatch.setattr(head.Writer, "create_namespace", refuse)
        with pytest.raises(OSError, match="no space"):
            source.initial_sync(h, client)
        assert (h.position(), _count(path, key, coll.full_name)) == before
        assert not source.needs_initial_sync(h)
        assert not [th for th in threading.enumerate() if th.name == "kmipbackup-clone"]
    finally:
        client.close()
        h.close()
