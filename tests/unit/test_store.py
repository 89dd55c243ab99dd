import datetime
import hashlib
import json
import os

import bson
import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    crypto, rawbson, restore, snapshot, store, timeutil)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, StoreError
from snapshot_helpers import LocalKeyProvider, all_types_docs, canary_hits, make_head, read_archive, split_docs, upsert_docs

CANARY = "ZebraCanary42"


@pytest.fixture
def env(tmp_path):
    provider = LocalKeyProvider()
    provider.create("mk1")
    js = store.JobStore(str(tmp_path / "store"), "job1")
    return tmp_path, provider, js


def source_docs(n, size=300, random_pad=False):
    return [{"_id": i, "pad": os.urandom(size // 2).hex() if random_pad else "p" * size, "v": i} for i in range(n)]


def snap(h, js, provider, mk="mk1", encryption=True, **kw):
    keys = store.Keys(js, provider if encryption else None, encryption=encryption)
    e = snapshot.take_snapshot(h, js, keys, "job1", mk if encryption else None, encryption, **kw)
    h.mark_snapshotted(e["change_seq"])
    return e


def restored_docs(tmp_path, js, provider, sid="latest", name="out", encryption=True):
    out = tmp_path / name
    restore.restore(js, sid, store.Keys(js, provider if encryption else None, encryption), restore.DirectoryTarget(str(out)))
    return {p.parent.name + "." + p.name[:-5]: split_docs(p.read_bytes()) for p in out.glob("*/*.bson")}


def test_round_trip_every_bson_type_and_canary(env):
    tmp, provider, js = env
    docs = all_types_docs(CANARY)
    ns = "db_%s.coll_%s" % (CANARY, CANARY)
    h = make_head(str(tmp / "h" / "head.db"), {ns: docs, "other.c": source_docs(3000)}, key=os.urandom(32),
                  indexes={ns: [{"v": 2, "key": {"str": 1}, "name": "str_1", "unique": False}]})
    snap(h, js, provider)
    got = restored_docs(tmp, js, provider)
    with h.read() as r:
        assert got[ns] == [raw for _k, raw in r.scan(ns)]
        assert got["other.c"] == [raw for _k, raw in r.scan("other.c")]
    assert sorted(bson.encode(d) for d in docs) == sorted(got[ns])
    meta = json.loads((tmp / "out" / ("db_" + CANARY) / ("coll_%s.metadata.json" % CANARY)).read_text())
    assert [i["name"] for i in meta["indexes"]] == ["_id_", "str_1"]
    assert "Encryption: enabled" in (tmp / "out" / "restoreInfo.txt").read_text()
    assert canary_hits(str(tmp / "store"), CANARY) == []
    assert all(os.stat(p).st_mode & 0o777 == 0o600 for p in (tmp / "store").rglob("*") if p.is_file())
    assert all(os.stat(p).st_mode & 0o777 == 0o700 for p in (tmp / "store").rglob("*") if p.is_dir())


def test_directory_restore_syncing_as_it_writes(env, monkeypatch):
    """The directory restore hands the disk a flush every SYNC_EVERY bytes (64 MB in use; 8 kB here, so a small
    namespace takes many): every flush is waited for before its file closes, and the files are byte-equal."""
    tmp, provider, js = env
    h = make_head(str(tmp / "h" / "head.db"), {"d.a": source_docs(3000), "d.b": source_docs(500)}, key=os.urandom(32))
    e = snap(h, js, provider, target_bytes=16 << 10)
    synced = []
    fdatasync = os.fdatasync

    def counting_fdatasync(fd):
        synced.append(fd)
        fdatasync(fd)

    monkeypatch.setattr(restore, "SYNC_EVERY", 8 << 10)
    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    got = restored_docs(tmp, js, provider)
    monkeypatch.undo()
    with h.read() as r:
        assert got == {ns: [raw for _k, raw in r.scan(ns)] for ns in ("d.a", "d.b")}
    # one flush each time 8 kB or more were written since the last (chunk sizes follow the random head key)
    expected = 0
    for n in js.read_manifest(e["snapshot_id"], store.Keys(js, provider))["namespaces"]:
        unsynced = 0
        for c in n["chunks"]:
            unsynced += c["bytes"]
            if unsynced >= 8 << 10:
                expected, unsynced = expected + 1, 0
    assert len(synced) == expected and expected > 20, (len(synced), expected)


def test_unencrypted_job_null_cipher(env):
    tmp, provider, js = env
    h = make_head(str(tmp / "h" / "head.db"), {"d.c": source_docs(100)})
    e = snap(h, js, None, encryption=False)
    assert e["encryption"] is False and e["master_key_uids"] == [] and e["mac"].startswith("sha256:")
    assert len(restored_docs(tmp, js, None, encryption=False)["d.c"]) == 100
    with pytest.raises(IntegrityError, match="unencrypted"):
        restore.restore(js, "latest", store.Keys(js, None, False), restore.DirectoryTarget(str(tmp / "o2")), expect_encryption=True)


def test_crash_before_catalog_leaves_snapshot_invisible(env, monkeypatch):
    tmp, provider, js = env
    h = make_head(str(tmp / "h" / "head.db"), {"d.c": source_docs(2000)}, key=os.urandom(32))
    first = snap(h, js, provider)
    with h.write() as w:
        upsert_docs(w, "d.c", [{"_id": 5, "changed": True}])

    def boom(*a, **k):
        raise OSError("disk full (simulated crash before the catalog entry)")
    monkeypatch.setattr(js, "put_catalog", boom)
    with pytest.raises(OSError):
        snapshot.take_snapshot(h, js, store.Keys(js, provider), "job1", "mk1", True)
    monkeypatch.undo()
    assert [e["snapshot_id"] for e in js.catalog()] == [first["snapshot_id"]]
    assert len(js.manifest_ids()) == 2  # the orphan manifest is there, unlisted
    assert restored_docs(tmp, js, provider)["d.c"][5] == bson.encode(source_docs(6)[5])
    gc = js.gc(store.Keys(js, provider), now=timeutil.utcnow() + datetime.timedelta(days=2), stale_seconds=3600)
    assert gc["manifests_deleted"] == 1
    assert len(restored_docs(tmp, js, provider, name="o3")["d.c"]) == 2000


def test_chunking_stability_and_incremental(env):
    tmp, provider, js = env
    h = make_head(str(tmp / "h" / "head.db"), {"d.c": source_docs(40000, 200, random_pad=True)}, key=os.urandom(32))
    full = snap(h, js, provider, target_bytes=64 << 10, max_bytes=256 << 10)
    assert full["written_chunks"] > 60
    with h.write() as w:  # an insert in the middle (id between 20000 and 20001)
        upsert_docs(w, "d.c", [{"_id": 20000.5, "pad": "n" * 200}])
    inc = snap(h, js, provider, target_bytes=64 << 10, max_bytes=256 << 10)
    assert inc["written_chunks"] <= 2 and inc["reused_chunks"] >= full["written_chunks"] - 2
    with h.write() as w:  # 1% of documents changed, spread across the key space
        upsert_docs(w, "d.c", [{"_id": i, "pad": "u" * 200, "v": -i} for i in range(0, 40000, 100)])
    one = snap(h, js, provider, target_bytes=64 << 10, max_bytes=256 << 10)
    assert one["reused_chunks"] + one["written_chunks"] > 0  # a uniform spread touches nearly every 64 KiB chunk
    with h.write() as w:  # 1% changed on recent ids (updates and inserts), as time-ordered ids do
        upsert_docs(w, "d.c", [{"_id": i, "pad": os.urandom(100).hex()} for i in range(39800, 40200)])
    rec = snap(h, js, provider, target_bytes=64 << 10, max_bytes=256 << 10)
    assert rec["written_bytes"] <= 0.05 * full["written_bytes"], (rec, full)
    with h.read() as r:
        expect = [raw for _k, raw in r.scan("d.c")]
    assert restored_docs(tmp, js, provider)["d.c"] == expect
    assert len(expect) == 40201


def test_namespace_incarnation_change_rewrites_whole(env):
    tmp, provider, js = env
    h = make_head(str(tmp / "h" / "head.db"), {"d.c": source_docs(500)}, key=os.urandom(32))
    snap(h, js, provider)
    with h.write() as w:
        w.drop_namespace("d.c")
        w.create_namespace("d.c", bson.encode({}), indexes=[])
        upsert_docs(w, "d.c", [{"_id": 1, "new": True}])
    snap(h, js, provider)
    assert restored_docs(tmp, js, provider)["d.c"] == [bson.encode({"_id": 1, "new": True})]


def test_not_consistent_refused(env):
    tmp, provider, js = env
    h = make_head(str(tmp / "h" / "head.db"), {"d.c": source_docs(5)}, key=os.urandom(32))
    with h.write() as w:
        w.set_position(b"t", [1760000001, 1], False)
    with pytest.raises(snapshot.SnapshotError, match="not consistent"):
        snap(h, js, provider)
    assert js.catalog() == []


def _tamper(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("kind", ["chunk", "manifest", "keyring entry", "catalog entry"])
def test_tamper_each_object_kind(env, kind):
    tmp, provider, js = env
    h = make_head(str(tmp / "h" / "head.db"), {"d.c": source_docs(3000)}, key=os.urandom(32))
    e = snap(h, js, provider)
    root = tmp / "store" / "job1"
    if kind == "chunk":
        path = sorted((root / "chunks").rglob("*"))[-1]
        obj = path.name
        _tamper(path)
    elif kind == "manifest":
        path, obj = root / "manifests" / e["snapshot_id"], e["snapshot_id"]
        _tamper(path)
    elif kind == "keyring entry":
        path, obj = root / "keyring" / "snapshot-1.json", "snapshot-1"
        rec = json.loads(path.read_text())
        rec["master_key_uid"] = "mk1"
        rec["created"] = "2020-01-01T00:00:00Z"
        path.write_text(json.dumps(rec))
    else:
        path, obj = root / "catalog" / (e["snapshot_id"] + ".json"), e["snapshot_id"]
        entry = json.loads(path.read_text())
        entry["doc_count"] = 1
        path.write_text(json.dumps(entry))
    out = tmp / "out"
    with pytest.raises(IntegrityError) as err:
        restore.restore(js, "latest", store.Keys(js, provider), restore.DirectoryTarget(str(out)))
    assert err.value.kind == kind and err.value.object_id == obj and obj in str(err.value)
    assert not out.exists() and not list(tmp.glob(".out*"))


def test_swapped_keyring_records_detected(env):
    tmp, provider, js = env
    h = make_head(str(tmp / "h" / "head.db"), {"d.c": source_docs(10)}, key=os.urandom(32))
    snap(h, js, provider)
    ring = tmp / "store" / "job1" / "keyring"
    a, b = json.loads((ring / "snapshot-1.json").read_text()), json.loads((ring / "chunk_id-1.json").read_text())
    a["wrapped"], b["wrapped"] = b["wrapped"], a["wrapped"]
    (ring / "snapshot-1.json").write_text(json.dumps(a))
    with pytest.raises(IntegrityError) as err:
        restore.restore(js, "latest", store.Keys(js, provider), restore.DirectoryTarget(str(tmp / "o")))
    assert err.value.kind == "keyring entry"


def test_rotation_new_epoch_both_restore_and_o1_calls(env):
    tmp, provider, js = env
    h = make_head(str(tmp / "h" / "head.db"), {"d.c": source_docs(3000)}, key=os.urandom(32))
    keys = store.Keys(js, provider)
    e1 = snapshot.take_snapshot(h, js, keys, "job1", "mk1", True, target_bytes=16 << 10)
    h.mark_snapshotted(e1["change_seq"])
    calls = provider.calls
    for i in range(3):
        with h.write() as w:
            upsert_docs(w, "d.c", [{"_id": 10 ** 6 + i}])
        h.mark_snapshotted(snapshot.take_snapshot(h, js, keys, "job1", "mk1", True, target_bytes=16 << 10)["change_seq"])
    assert provider.calls == calls  # cached keys: no wrap/unwrap per snapshot
    fresh = store.Keys(js, provider)
    before = provider.calls
    snapshot.take_snapshot(h, js, fresh, "job1", "mk1", True, target_bytes=16 << 10)
    assert provider.calls - before <= 3
    provider.create("mk2")
    with h.write() as w:
        upsert_docs(w, "d.c", [{"_id": 2 * 10 ** 6}])
    e2 = snapshot.take_snapshot(h, js, store.Keys(js, provider), "job1", "mk2", True, target_bytes=16 << 10)
    h.mark_snapshotted(e2["change_seq"])
    # the first snapshot of a new epoch rewrites every chunk under the new key: it needs only the new master key
    assert e2["key_id"] == "snapshot-2" and e2["master_key_uids"] == ["mk2"] and e2["reused_chunks"] == 0
    old_chunks = {c["id"] for n in js.read_manifest(e1["snapshot_id"], store.Keys(js, provider))["namespaces"] for c in n["chunks"]}
    new_manifest = js.read_manifest(e2["snapshot_id"], store.Keys(js, provider))
    assert not old_chunks & {c["id"] for n in new_manifest["namespaces"] for c in n["chunks"]}
    assert {c["key"] for n in new_manifest["namespaces"] for c in n["chunks"]} == {"snapshot-2"}
    # a new chunk-id key with the epoch: the old master key's chunk-id key cannot confirm guessed content in epoch 2
    k = store.Keys(js, provider)
    id1, id2 = k.key("chunk_id-1"), k.key("chunk_id-2")
    assert not crypto.hmac.compare_digest(id1, id2) and len(id2) == 32  # (no key bytes in a failure message)
    chunk = new_manifest["namespaces"][0]["chunks"][0]
    plain = js.read_chunk(chunk, k)
    digest = hashlib.sha256(plain).digest()
    assert crypto.chunk_id(id2, plain, digest, "snapshot-2") == chunk["id"]
    assert crypto.chunk_id(id1, plain, digest, "snapshot-2") != chunk["id"]
    assert len(restored_docs(tmp, js, provider, e1["snapshot_id"], "o1")["d.c"]) == 3000
    before = provider.calls
    assert len(restored_docs(tmp, js, provider, e2["snapshot_id"], "o2")["d.c"]) == 3004
    assert provider.calls - before == 1  # one epoch: one unwrap
    assert js.master_keys_needed() == ["mk1", "mk2"]
    # within the new epoch, snapshots are incremental again
    with h.write() as w:
        upsert_docs(w, "d.c", [{"_id": 2 * 10 ** 6 + 1}])
    e3 = snapshot.take_snapshot(h, js, store.Keys(js, provider), "job1", "mk2", True, target_bytes=16 << 10)
    assert e3["master_key_uids"] == ["mk2"] and e3["written_chunks"] <= 2 and e3["reused_chunks"] > 0
    # the pre-rotation snapshots deleted and collected: the old master key is no longer needed at all
    for e in js.catalog():
        if "mk1" in e["master_key_uids"]:
            js.delete_snapshot(e["snapshot_id"])
    assert js.master_keys_needed() == ["mk2"]
    js.gc(store.Keys(js, provider), now=timeutil.utcnow() + datetime.timedelta(hours=2))
    del provider.masters["mk1"]  # retired: any use of it would fail
    assert len(restored_docs(tmp, js, provider, e3["snapshot_id"], "o3")["d.c"]) == 3005


def test_gc_and_retention_keep_last(env):
    tmp, provider, js = env
    h = make_head(str(tmp / "h" / "head.db"), {"d.c": source_docs(3000)}, key=os.urandom(32))
    e1 = snap(h, js, provider, target_bytes=32 << 10)
    with h.write() as w:
        for i in range(0, 3000, 7):
            w.delete("d.c", store_key(i))
    e2 = snap(h, js, provider, target_bytes=32 << 10)
    js.delete_snapshot(e1["snapshot_id"])
    with pytest.raises(StoreError, match="last restorable"):
        js.delete_snapshot(e2["snapshot_id"])
    keys = store.Keys(js, provider)
    assert js.gc(keys)["chunks_deleted"] == 0  # within the grace period
    gc = js.gc(keys, now=timeutil.utcnow() + datetime.timedelta(hours=2))
    assert gc["chunks_deleted"] > 0 and gc["manifests_deleted"] == 1
    assert set(js.chunk_ids()) == {c["id"] for n in js.read_manifest(e2["snapshot_id"], keys)["namespaces"] for c in n["chunks"]}
    assert len(restored_docs(tmp, js, provider)["d.c"]) == 3000 - len(range(0, 3000, 7))


@pytest.mark.parametrize("marker", [True, False], ids=["pending-marker", "control-without-marker"])
def test_gc_running_during_a_snapshot(env, monkeypatch, marker):
    """GC runs (grace 0, the previous snapshot expired meanwhile) after a snapshot wrote its chunks and before its
    manifest and catalog entry exist. Its pending marker must keep both what it wrote and what it reuses from its
    base; the control drops the marker first and must lose chunks, which proves the GC really ran in the window."""
    tmp, provider, js = env
    docs = source_docs(3000)
    h = make_head(str(tmp / "h" / "head.db"), {"d.c": docs}, key=os.urandom(32))
    e0 = snap(h, js, provider, target_bytes=32 << 10)
    with h.write() as w:
        upsert_docs(w, "d.c", [dict(d, v=-1) for d in docs[:100]])
    e1 = snap(h, js, provider, target_bytes=32 << 10)
    with h.write() as w:
        upsert_docs(w, "d.c", [dict(d, v=-2) for d in docs[1500:1600]])
    keys = store.Keys(js, provider)
    runs = []
    put_manifest = js.put_manifest

    def racing_put_manifest(snapshot_id, *args, **kwargs):
        js.delete_snapshot(e1["snapshot_id"])  # retention, from another process
        if not marker:
            js.end(snapshot_id)
        runs.append(js.gc(keys, now=timeutil.utcnow() + datetime.timedelta(hours=2), grace_seconds=0))
        return put_manifest(snapshot_id, *args, **kwargs)

    monkeypatch.setattr(js, "put_manifest", racing_put_manifest)
    e2 = snap(h, js, provider, target_bytes=32 << 10)
    monkeypatch.undo()
    assert e2["reused_chunks"] > 0 and e2["written_chunks"] > 0, e2
    assert len(runs) == 1 and runs[0]["catalog_entries"] == 1, runs
    expected = sorted(bson.encode(dict(d, v=-1 if i < 100 else -2 if 1500 <= i < 1600 else d["v"])) for i, d in enumerate(docs))
    if marker:
        assert runs[0]["chunks_deleted"] == 0, runs
        assert sorted(restored_docs(tmp, js, provider, e2["snapshot_id"], "r2")["d.c"]) == expected
        assert len(restored_docs(tmp, js, provider, e0["snapshot_id"], "r0")["d.c"]) == 3000
    else:
        assert runs[0]["chunks_deleted"] > 0, runs
        with pytest.raises(StoreError, match="is missing"):
            restored_docs(tmp, js, provider, e2["snapshot_id"], "r2")


def test_a_reused_chunk_collected_during_a_snapshot_fails_it_and_only_reused_chunks_are_checked(env, monkeypatch):
    """A chunk the snapshot reuses that disappears before its commit (GC of a stale store, an operator) fails the
    snapshot, nothing committed; the end check asks the store about reused chunks only (what it wrote is new)."""
    tmp, provider, js = env
    docs = source_docs(3000)
    h = make_head(str(tmp / "h" / "head.db"), {"d.c": docs}, key=os.urandom(32))
    e0 = snap(h, js, provider, target_bytes=32 << 10)
    keys = store.Keys(js, provider)
    old = {c["id"] for n in js.read_manifest(e0["snapshot_id"], keys)["namespaces"] for c in n["chunks"]}
    with h.write() as w:
        upsert_docs(w, "d.c", [dict(d, v=-1) for d in docs[:100]])
    asked = []
    has_chunk = js.has_chunk
    monkeypatch.setattr(js, "has_chunk", lambda cid: asked.append(cid) or has_chunk(cid))
    e1 = snap(h, js, provider, target_bytes=32 << 10)
    assert e1["reused_chunks"] > 0 and e1["written_chunks"] > 0, e1
    written = {c["id"] for n in js.read_manifest(e1["snapshot_id"], keys)["namespaces"] for c in n["chunks"]} - old
    assert written and not written & set(asked) and set(asked) <= old, (len(asked), len(written))
    with h.write() as w:
        upsert_docs(w, "d.c", [dict(d, v=-2) for d in docs[:100]])
    sync = js.storage.sync

    def collecting_sync(paths):
        sync(paths)
        for cid in old:  # the chunks e2 reuses from e0 and e1 vanish after its own writes
            js.storage.delete(js.chunk_path(cid))

    monkeypatch.setattr(js.storage, "sync", collecting_sync)
    before = [e["snapshot_id"] for e in js.catalog()]
    with pytest.raises(snapshot.SnapshotError, match="removed meanwhile"):
        snap(h, js, provider, target_bytes=32 << 10)
    assert [e["snapshot_id"] for e in js.catalog()] == before


def store_key(i):
    return rawbson.id_key_from_document(bson.encode({"_id": i}))


def test_archive_restore_and_idempotence(env):
    tmp, provider, js = env
    h = make_head(str(tmp / "h" / "head.db"), {"a.x": all_types_docs(CANARY), "b.y": source_docs(5000)}, key=os.urandom(32))
    e = snap(h, js, provider)
    arch = tmp / "r" / "dump.archive"
    target = restore.ArchiveTarget(str(arch))
    assert not restore.already_restored(js, "latest", target)
    restore.restore(js, "latest", store.Keys(js, provider), target, rename={"b": "b2"}, exclude=["a.*"])
    assert restore.already_restored(js, e["snapshot_id"], target)
    _h, metas, docs, _crcs = read_archive(str(arch))
    assert [(m["db"], m["collection"]) for m in metas] == [("b2", "y")] and len(docs["b2.y"]) == 5000
    with pytest.raises(Exception, match="not empty"):
        restore.restore(js, "latest", store.Keys(js, provider), target)
    restore.restore(js, "latest", store.Keys(js, provider), target, drop=True)
    assert len(read_archive(str(arch))[1]) == 2


def test_threads_asking_for_one_key_at_once_unwrap_it_once(env):
    """Keys.key from several threads at once (segments and chunks are read on side threads) makes one provider call
    per key: a KMIP session is not shared between threads, and every thread gets the same key."""
    import threading
    import time
    _tmp, provider, js = env
    sid, _cid = store.Keys(js, provider).epoch_for("mk1")
    inside, overlap = [0], [False]
    lock = threading.Lock()
    unwrap = provider.unwrap

    def slow_unwrap(wrapped):
        with lock:
            inside[0] += 1
            overlap[0] |= inside[0] > 1
        time.sleep(0.05)  # long enough for the other threads to ask meanwhile
        try:
            return unwrap(wrapped)
        finally:
            with lock:
                inside[0] -= 1
    provider.unwrap = slow_unwrap
    keys, got = store.Keys(js, provider), []
    calls = provider.calls
    threads = [threading.Thread(target=lambda: got.append(keys.key(sid))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert provider.calls - calls == 1 and not overlap[0]
    assert len(got) == 6 and len(set(got)) == 1 and len(got[0]) == crypto.KEY_BYTES
