"""A snapshot reads the head on several connections at once (Head.reads): every one of them must see the
same image while capture keeps committing, or a snapshot would mix two cluster times. Real SQLCipher
heads, a writer thread committing as fast as it can, local key provider."""
import os
import threading
import time

import bson

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import rawbson, restore, snapshot, store
from snapshot_helpers import LocalKeyProvider, make_head, split_docs

NAMESPACES = ("d.a", "d.b", "d.c")


def _raw(i, size):
    return bson.encode({"_id": i, "pad": bytes([i % 251]) * size})


class _Committer(threading.Thread):
    """Commits transactions until stopped; transaction n writes document n into every namespace and sets
    the counter document to n, so a consistent image has equal counts everywhere."""

    def __init__(self, h, start, size):
        super().__init__(daemon=True)
        self.h, self.n, self.size = h, start, size
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            with self.h.write() as w:
                for ns in NAMESPACES:
                    raw = _raw(self.n, self.size)
                    w.upsert(ns, rawbson.id_key_from_document(raw), raw)
                counter = bson.encode({"_id": "counter", "n": self.n})
                w.upsert("d.meta", rawbson.id_key_from_document(counter), counter)
                w.set_position(b"token", [1760000000, self.n], True)
            self.n += 1


def _counter(reader):
    raw = reader.get("d.meta", rawbson.id_key_from_document(bson.encode({"_id": "counter"})))
    return bson.decode(raw)["n"] if raw else None


def test_parallel_readers_share_one_image_under_concurrent_commits(tmp_path):
    h = make_head(str(tmp_path / "h" / "head.db"), {ns: [] for ns in NAMESPACES}, key=os.urandom(32))
    committer = _Committer(h, 0, 10)
    committer.start()
    try:
        seen = set()
        for _ in range(40):
            with h.reads(4) as readers:
                values = [_counter(r) for r in readers]
                changes = {r.change_seq for r in readers}
                positions = {tuple(r.position()["cluster_time"] or ()) for r in readers}
            assert len(set(values)) == 1 and len(changes) == 1 and len(positions) == 1, (values, changes, positions)
            seen.add(values[0])
            time.sleep(0.01)  # let commits land between two images, also on a loaded machine
    finally:
        committer.stop.set()
        committer.join()
    assert len(seen) > 5  # the commits really ran between the images


def test_snapshot_while_committing_is_one_image_and_restores_byte_equal(tmp_path):
    """Documents of 40 KB: each namespace is several chunks, read by different readers while the writer commits."""
    docs = {ns: [bson.decode(_raw(i, 40 << 10)) for i in range(100)] for ns in NAMESPACES}
    h = make_head(str(tmp_path / "h" / "head.db"), docs, key=os.urandom(32))
    provider = LocalKeyProvider()
    provider.create("mk")
    js = store.JobStore(str(tmp_path / "store"), "job")
    committer = _Committer(h, 100, 40 << 10)
    committer.start()
    try:
        entries = [snapshot.take_snapshot(h, js, store.Keys(js, provider), "job", "mk", True) for _ in range(3)]
    finally:
        committer.stop.set()
        committer.join()
    assert len({e["cluster_time"][1] for e in entries}) > 1  # commits landed between the snapshots
    for e in entries:
        out = tmp_path / ("out-" + e["snapshot_id"])
        restore.restore(js, e["snapshot_id"], store.Keys(js, provider), restore.DirectoryTarget(str(out)))
        restored = {ns: split_docs((out / "d" / (ns[2:] + ".bson")).read_bytes()) for ns in NAMESPACES}
        n = e["cluster_time"][1] + 1 if e["cluster_time"][1] >= 100 else 100  # documents 0..n-1 at that cluster time
        for ns in NAMESPACES:
            assert restored[ns] == [_raw(i, 40 << 10) for i in range(n)], ns
