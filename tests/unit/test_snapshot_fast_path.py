"""The snapshot's fast path (boundary flags written by the head, one query per chunk, worker threads)
cuts exactly the chunks the document-by-document path cuts, including the hard maximum; a head
written before the flags existed gets them when opened. Real SQLCipher heads, local key provider."""
import os

import bson
import sqlcipher3

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head as headmod
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import restore, snapshot, store
from snapshot_helpers import LocalKeyProvider, make_head, split_docs


def docs(n, seed=7):
    rnd = __import__("random").Random(seed)
    return [{"_id": i, "pad": rnd.randbytes(rnd.choice([100, 900, 5000, 20000]))} for i in range(n)]


def cuts(h, tmp, name, flagged, max_bytes=snapshot.MAX_BYTES):
    provider = LocalKeyProvider()
    provider.create("mk")
    js = store.JobStore(str(tmp / name), "job")
    if not flagged:
        h.boundary_target = None  # the document-by-document path, same boundary function
    try:
        e = snapshot.take_snapshot(h, js, store.Keys(js, provider), "job", "mk", True, max_bytes=max_bytes)
    finally:
        h.boundary_target = headmod.BOUNDARY_TARGET
    m = js.read_manifest(e["snapshot_id"], store.Keys(js, provider))
    return [(bytes(c["sha256"]), bytes(c["first"]), bytes(c["last"]), c["count"], c["bytes"]) for n in m["namespaces"] for c in n["chunks"]], js, provider


def test_fast_path_cuts_like_the_row_path_and_restores(tmp_path):
    h = make_head(str(tmp_path / "h" / "head.db"), {"d.c": docs(1000)}, key=os.urandom(32))
    for max_bytes in (snapshot.MAX_BYTES, 200 << 10):
        fast, js, provider = cuts(h, tmp_path, "fast%d" % max_bytes, True, max_bytes)
        slow, _, _ = cuts(h, tmp_path, "slow%d" % max_bytes, False, max_bytes)
        assert fast == slow
        assert len(fast) > 5 and all(b <= max_bytes for *_x, b in fast)
    restore.restore(js, "latest", store.Keys(js, provider), restore.DirectoryTarget(str(tmp_path / "out")))
    with h.read() as r:
        expect = [raw for _k, raw in r.scan("d.c")]
    assert split_docs((tmp_path / "out" / "d" / "c.bson").read_bytes()) == expect


def test_head_without_flags_gets_them_when_opened(tmp_path):
    path = str(tmp_path / "old" / "head.db")
    key = os.urandom(32)
    h = make_head(path, {"d.c": docs(400)}, key=key)
    with h.read() as r:
        flagged = r.boundaries("d.c")
    is_b = h.boundary_fn(headmod.BOUNDARY_TARGET)
    with h.read() as r:
        assert flagged == [k for k, raw in r.scan("d.c") if is_b(k, len(raw))] and flagged
    h.close()
    conn = sqlcipher3.connect(path, isolation_level=None)  # rewrite docs as a head from before the flags
    conn.execute("PRAGMA key = \"x'%s'\"" % key.hex())
    conn.executescript("""BEGIN; DROP INDEX docs_boundaries;
        CREATE TABLE old_docs (ns_id INTEGER NOT NULL, id_key BLOB NOT NULL, doc BLOB NOT NULL, PRIMARY KEY (ns_id, id_key)) WITHOUT ROWID;
        INSERT INTO old_docs SELECT ns_id, id_key, doc FROM docs; DROP TABLE docs; ALTER TABLE old_docs RENAME TO docs; COMMIT;""")
    conn.close()
    h = headmod.Head(path, key)
    with h.read() as r:
        assert r.boundaries("d.c") == flagged
    with h.write() as w:
        raw = bson.encode({"_id": 10 ** 6, "pad": b"x" * 10})
        w.upsert("d.c", headmod.id_key_from_document(raw), raw)
    h.close()
