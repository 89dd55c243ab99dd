"""The snapshot's fast path (boundary flags written by the head, one query per chunk, worker threads)
cuts exactly the chunks the document-by-document path cuts, including the hard maximum; a head
written before the flags existed gets them when opened. Real SQLCipher heads, local key provider."""
import os
import types

import bson
import pytest
import sqlcipher3

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head as headmod, rawbson
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import restore, snapshot, store
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import SnapshotError
from snapshot_helpers import LocalKeyProvider, make_head, split_docs


def docs(n, seed=7):
    rnd = __import__("random").Random(seed)
    return [{"_id": i, "pad": rnd.randbytes(rnd.choice([100, 900, 5000, 20000]))} for i in range(n)]


def cuts(h, tmp, name, flagged, max_bytes=snapshot.MAX_BYTES, target_bytes=snapshot.TARGET_BYTES):
    provider = LocalKeyProvider()
    provider.create("mk")
    js = store.JobStore(str(tmp / name), "job")
    if not flagged:
        h.boundary_target = None  # the document-by-document path, same boundary function
    try:
        e = snapshot.take_snapshot(h, js, store.Keys(js, provider), "job", "mk", True, max_bytes=max_bytes,
                                   target_bytes=target_bytes)
    finally:
        h.boundary_target = headmod.BOUNDARY_TARGET
    m = js.read_manifest(e["snapshot_id"], store.Keys(js, provider))
    return [(bytes(c["sha256"]), bytes(c["first"]), bytes(c["last"]), c["count"], c["bytes"]) for n in m["namespaces"] for c in n["chunks"]], js, provider


def test_fast_path_cuts_like_the_row_path_and_restores(tmp_path):
    """For the head's own target (every flag), a larger one (the flags it keeps) and ranges over
    max_bytes (cut in the joined bytes; 8 KiB: single documents over it)."""
    h = make_head(str(tmp_path / "h" / "head.db"), {"d.c": docs(2500)}, key=bytes(range(32)))  # fixed: fixed boundaries
    larger = 2 * headmod.BOUNDARY_TARGET
    for target, max_bytes in ((headmod.BOUNDARY_TARGET, 4 * headmod.BOUNDARY_TARGET), (larger, 4 * larger),
                              (larger, 200 << 10), (headmod.BOUNDARY_TARGET, 8 << 10)):
        fast, js, provider = cuts(h, tmp_path, "fast%d-%d" % (target, max_bytes), True, max_bytes, target)
        slow, _, _ = cuts(h, tmp_path, "slow%d-%d" % (target, max_bytes), False, max_bytes, target)
        assert fast == slow
        assert len(fast) > 1 and all(b <= max_bytes or n == 1 for *_x, n, b in fast)
        assert sum(n for *_x, n, _b in fast) == 2500
    restore.restore(js, "latest", store.Keys(js, provider), restore.DirectoryTarget(str(tmp_path / "out")))
    with h.read() as r:
        expect = [raw for _k, raw in r.scan("d.c")]
    assert split_docs((tmp_path / "out" / "d" / "c.bson").read_bytes()) == expect


def test_head_from_before_flags_and_cipher_settings_opens_with_flags(tmp_path):
    """A head written with SQLCipher 4's default settings and no boundary column opens, gets its flags
    (equal to the boundary function's verdicts) and takes writes."""
    path = str(tmp_path / "old" / "head.db")
    key = os.urandom(32)
    os.makedirs(os.path.dirname(path), mode=0o700)
    old_schema = headmod._SCHEMA.replace("    bnd INTEGER NOT NULL DEFAULT 0, PRIMARY KEY", "    PRIMARY KEY")
    assert old_schema != headmod._SCHEMA
    conn = sqlcipher3.connect(path, isolation_level=None)
    conn.execute("PRAGMA key = \"x'%s'\"" % key.hex())
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(old_schema)
    conn.execute("INSERT INTO namespaces VALUES (1, 'd.c', NULL, ?, ?, 1)", (bson.encode({}), b""))
    raws = [bson.encode(d) for d in docs(1200)]
    conn.executemany("INSERT INTO docs VALUES (1, ?, ?)", [(rawbson.id_key_from_document(r), r) for r in raws])
    conn.execute("UPDATE position SET resume_token=?, ct_t=1, ct_i=1, consistent=1", (b"t",))
    conn.close()
    h = headmod.Head(path, key)
    is_b = h.boundary_fn(headmod.BOUNDARY_TARGET)
    with h.read() as r:
        assert r.boundaries("d.c") == [k for k, raw in r.scan("d.c") if is_b(k, len(raw))]
        assert r.boundaries("d.c") and r.count("d.c") == 1200
    with h.write() as w:
        raw = bson.encode({"_id": 10 ** 6, "pad": b"x" * 10})
        w.upsert("d.c", rawbson.id_key_from_document(raw), raw)
    h.close()
    with headmod.Head(path, key).read() as r:
        assert r.count("d.c") == 1201


def test_read_joined_is_the_key_ordered_join_of_the_range(tmp_path):
    """Reader.read_joined (one group_concat query per chunk) returns the documents of [start, end) in id_key
    order, NUL bytes and all, whatever order they were written in and over several B-tree pages: the same bytes,
    count and ends as the row by row scan."""
    rnd = __import__("random").Random(3)
    mixed = [{"_id": i, "pad": rnd.randbytes(rnd.choice([10, 300, 3000]))} for i in range(1500)]
    mixed += [{"_id": "s%04d" % i, "pad": b"\x00" * 50} for i in range(300)] + [{"_id": 2.5 + i} for i in range(200)]
    rnd.shuffle(mixed)
    h = make_head(str(tmp_path / "h" / "head.db"), {"d.c": mixed}, key=os.urandom(32))
    with h.read() as r:
        rows = list(r.scan("d.c"))
        keys = [k for k, _raw in rows]
        assert keys == sorted(keys) and len(rows) == 2000
        assert r.read_joined("d.c") == (keys[0], keys[-1], 2000, b"".join(raw for _k, raw in rows))
        for _ in range(20):
            i, j = sorted(rnd.sample(range(len(rows) + 1), 2))
            start, end = keys[i], keys[j] if j < len(keys) else None
            got = r.read_joined("d.c", start, end)
            assert got == (keys[i], keys[j - 1], j - i, b"".join(raw for _k, raw in rows[i:j]))
        assert r.read_joined("d.c", keys[5], keys[5]) == (None, None, 0, b"")
        assert r.read_joined("d.none") == (None, None, 0, b"")


def test_larger_target_on_a_store_of_smaller_chunks_reuses_them_and_restores(tmp_path):
    """A store whose last snapshot has the head's 1 MiB chunks (an earlier version's target): the next snapshot (a
    larger target) reuses every chunk whose range holds no change, re-cuts only the changed ones, and
    restores byte for byte."""
    h = make_head(str(tmp_path / "h" / "head.db"), {"d.c": docs(1000)}, key=bytes(range(32)))
    provider = LocalKeyProvider()
    provider.create("mk")
    js = store.JobStore(str(tmp_path / "store"), "job")
    e1 = snapshot.take_snapshot(h, js, store.Keys(js, provider), "job", "mk", True, target_bytes=headmod.BOUNDARY_TARGET,
                                max_bytes=4 * headmod.BOUNDARY_TARGET)
    h.mark_snapshotted(e1["change_seq"])
    assert e1["written_chunks"] >= 4
    with h.write() as w:
        raw = bson.encode({"_id": 998, "pad": b"changed"})
        w.upsert("d.c", rawbson.id_key_from_document(raw), raw)
    e2 = snapshot.take_snapshot(h, js, store.Keys(js, provider), "job", "mk", True, target_bytes=2 * headmod.BOUNDARY_TARGET,
                                max_bytes=8 * headmod.BOUNDARY_TARGET)
    assert e2["reused_chunks"] == e1["written_chunks"] - 1 and e2["written_chunks"] >= 1
    restore.restore(js, "latest", store.Keys(js, provider), restore.DirectoryTarget(str(tmp_path / "out")))
    with h.read() as r:
        expect = [raw for _k, raw in r.scan("d.c")]
    assert split_docs((tmp_path / "out" / "d" / "c.bson").read_bytes()) == expect
    assert bson.decode(expect[-2])["pad"] == b"changed"


def test_split_cuts_joined_documents_at_max_bytes_and_refuses_damaged_lengths():
    """Writer.split: the pieces of a range over max_bytes, each ending before the document that would take it over
    (one document over max_bytes alone), with each piece's first and last id_key; a length prefix that does not
    fit refuses the snapshot instead of cutting garbage."""
    raws = [bson.encode({"_id": i, "pad": b"x" * n}) for i, n in enumerate([10, 10, 3000, 10, 10, 10])]
    ids = [rawbson.id_key_from_document(r) for r in raws]
    w = types.SimpleNamespace(max_bytes=len(raws[0]) * 2 + 5, js=types.SimpleNamespace(job="j"))
    pieces = list(snapshot._Writer.split(w, b"".join(raws), ids[0], ids[-1]))
    assert pieces == [(raws[0] + raws[1], 2, ids[0], ids[1]), (raws[2], 1, ids[2], ids[2]),
                      (raws[3] + raws[4], 2, ids[3], ids[4]), (raws[5], 1, ids[5], ids[5])]
    damaged = b"".join(raws)[:-3]
    with pytest.raises(SnapshotError, match="damaged document"):
        list(snapshot._Writer.split(w, damaged, ids[0], ids[-1]))
