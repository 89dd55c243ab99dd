"""The temporary head's in-memory overlay (point_in_time.RebuildHead): a base snapshot rebuilt with every event kind
(writes, DDL, renames onto existing and fresh names, drops and re-creation under the same name, collMod, indexes,
a transaction's events) applied by the replay's fast path in several transactions must restore byte for byte what a
head holding every document makes of the same events with the capture's applier, whether the documents stay in
memory, spill into SQLCipher at once, or spill part way; the manifests agree chunk for chunk. A rolled-back
transaction undoes its overlay changes; one that spilled on the way leaves the head refusing further use. Real
SQLCipher heads, a folder store, a local key provider."""
import os
import random

import bson
import pytest
from bson import Int64, Timestamp
from bson.raw_bson import RawBSONDocument

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import events, mongodump, point_in_time, rawbson, restore, snapshot, store
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import RestoreError
from snapshot_helpers import LocalKeyProvider, all_types_docs, make_head, split_docs

POINT = (1760000100, 7)
ID_INDEX = {"v": 2, "key": {"_id": 1}, "name": "_id_"}
CANARY = "pitr-overlay-canary-5d1e"


def ev(op, db, coll, **fields):
    return bson.encode(dict({"_id": {"_data": "x"}, "operationType": op, "clusterTime": Timestamp(*POINT),
                             "ns": {"db": db, "coll": coll}}, **fields))


def ins(coll, d, op="insert", db="d", **kw):
    return ev(op, db, coll, documentKey={"_id": d["_id"]}, fullDocument=d, **kw)


def upd(coll, _id, fields, removed=()):
    return ev("update", "d", coll, documentKey={"_id": _id},
              updateDescription={"updatedFields": fields, "removedFields": list(removed), "truncatedArrays": []})


def dele(coll, _id):
    return ev("delete", "d", coll, documentKey={"_id": _id})


def base_namespaces():
    rnd = random.Random(5)
    return {"d.big": [{"_id": i, "pad": rnd.randbytes(700), "n": {"x": i}} for i in range(3000)],
            "d.types": all_types_docs(),
            "d.gone": [{"_id": i} for i in range(5)],
            "d.old": [{"_id": i, "v": "old"} for i in range(300)],
            "d.over": [{"_id": i, "v": "overwritten"} for i in range(3)],
            "e.x": [{"_id": 1}]}


def transactions():
    """Groups of raw events, each one replay transaction."""
    txn = {"lsid": {"id": bson.Binary(b"s" * 16, 4)}, "txnNumber": Int64(3)}
    return [
        [ins("big", {"_id": 1500.5, "new": "in the middle"}), ins("big", {"_id": 99999, "new": "past the end"}),
         ins("big", {"_id": 2000, "replaced": True}, op="replace"), upd("big", 10, {"pad": "short", "n.y": 1}),
         dele("big", 2999), dele("big", 0), upd("types", 7, {"int32": 5}, removed=["code"]),
         ev("createIndexes", "d", "big", operationDescription={"indexes": [{"v": 2, "key": {"pad": 1}, "name": "pad_1"}]})],
        [ev("drop", "d", "gone"), ev("create", "d", "gone", operationDescription={"idIndex": ID_INDEX}),
         ins("gone", {"_id": 3, "again": True}), ev("rename", "d", "old", to={"db": "d", "coll": "over"}),
         upd("over", 299, {"v": "renamed"}), dele("over", 0), upd("big", 1200, {"late": 1}),
         ev("modify", "d", "big", operationDescription={"validator": {"pad": {"$exists": True}}})],
        [ev("create", "d", "fresh", operationDescription={"idIndex": ID_INDEX}),
         *[ins("fresh", {"_id": i, "pad": "f" * 3000}, **txn) for i in range(300)], ins("fresh", {"_id": 1000, "c": CANARY}),
         dele("fresh", 5), upd("fresh", 5, {"a": 1}), ins("fresh", {"_id": 5, "back": True}, **txn),
         ev("rename", "d", "fresh", to={"db": "d", "coll": "fresh2"}), upd("fresh2", 7, {"pad": "renamed"}),
         ev("dropIndexes", "d", "big", operationDescription={"indexes": [{"v": 2, "key": {"pad": 1}, "name": "pad_1"}]}),
         dele("big", 404), upd("big", 2400, {"n.x": "last"}), ins("implicit", {"_id": 1}), ev("dropDatabase", "e", "")],
        [upd("big", 1, {"first": "chunk"}), dele("big", 1499), ins("big", {"_id": 1499, "re": "inserted"}),
         ev("rename", "d", "big", to={"db": "d", "coll": "big2"}), upd("big2", 1501, {"after": "rename"}),
         ins("big2", {"_id": 100000, "end": True})],
    ]


@pytest.fixture
def setup(tmp_path):
    provider = LocalKeyProvider()
    provider.create("mk")
    js = store.JobStore(str(tmp_path / "store"), "job")
    keys = store.Keys(js, provider)
    full = make_head(str(tmp_path / "full" / "head.db"), base_namespaces(), key=os.urandom(32))
    entry = snapshot.take_snapshot(full, js, keys, "job", "mk", True, max_bytes=64 << 10)
    with full.write() as w:  # the capture's path: RawBSONDocument events, Applier.apply
        a = events.Applier()
        for group in transactions():
            for e in group:
                a.apply(w, RawBSONDocument(e))
    with full.read() as r:
        want = {n["ns"]: ([doc for _k, doc in r.scan(n["ns"])], n) for n in r.namespaces()}
    full.close()
    return js, keys, entry, want


def replay_fast(h, js, keys, plan, progress=None):
    """The replay's path: raw events, Applier.apply_raw, one transaction per group; a count (a scan) on the way."""
    a = events.Applier()
    for n, group in enumerate(transactions()):
        with h.write() as w:
            for e in group:
                a.apply_raw(w, e)
            if n == 1:
                assert w.count("d.over") == 299  # the whole namespace: loaded, spilled, counted in the head
    return {"events": sum(len(g) for g in transactions()), "segments": 0}


def rebuilt(js, keys, entry, tmp_path, name):
    plan = {"snapshot": entry, "segments": [], "point": POINT}
    out = tmp_path / name
    with point_in_time.rebuild(js, keys, plan, replay=replay_fast, work_dir=str(tmp_path)) as image:
        h = image.store._h  # pylint: disable=protected-access
        spilled = {ns_id: bool(h.overlay.get(ns_id)) for ns_id in h.spilled}  # True: merged with the overlay
        folder = os.path.dirname(h.path)
        for f in os.listdir(folder):  # what spilled is encrypted: no document, _id or namespace name in plaintext
            data = open(os.path.join(folder, f), "rb").read()
            assert CANARY.encode() not in data and b"fresh2" not in data, f
        restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest),
                        restore.DirectoryTarget(str(out)))
        chunks = {n["ns"]: [(c["first"], c["last"], c["count"], c["bytes"], bytes(c["sha256"])) for c in n["chunks"]]
                  for n in image.manifest["namespaces"]}
    return out, chunks, spilled


@pytest.mark.parametrize("budget", [None, 0, 200_000])
def test_overlay_or_spilled_restores_what_a_full_head_holds(setup, tmp_path, monkeypatch, budget):
    js, keys, entry, want = setup
    if budget is not None:
        monkeypatch.setattr(point_in_time, "OVERLAY_BYTES", budget)
    out, chunks, spilled = rebuilt(js, keys, entry, tmp_path, "out")
    assert (len(spilled) >= 5) if budget == 0 else (len(spilled) >= 1)  # d.over always (the count), all at 0
    assert any(spilled.values()) == (budget == 200_000)  # part spilled: head rows and overlay merged
    assert sorted(chunks) == sorted(want)
    for ns, (docs, n) in want.items():
        db, coll = ns.split(".", 1)
        path = out / db / (coll + ".bson")
        assert (split_docs(path.read_bytes()) if path.exists() else []) == docs, ns
        assert (out / db / (coll + ".metadata.json")).read_text() == mongodump.metadata_json(
            n["options"], n["indexes"], n["uuid"], coll), ns
    assert not (out / "e").exists() and not (out / "d" / "big.bson").exists() and not (out / "d" / "old.bson").exists()
    assert split_docs((out / "d" / "gone.bson").read_bytes()) == [bson.encode({"_id": 3, "again": True})]
    if budget is None:  # the same chunk cuts, counts and digests from the overlay, the head, or both merged
        for other in (0, 200_000):
            monkeypatch.setattr(point_in_time, "OVERLAY_BYTES", other)
            assert rebuilt(js, keys, entry, tmp_path, "out%d" % other)[1] == chunks


def test_a_rolled_back_transaction_undoes_its_overlay_changes(setup, tmp_path):
    js, keys, entry, _want = setup
    manifest = js.read_manifest(entry["snapshot_id"], keys)
    h = point_in_time.RebuildHead(str(tmp_path / "rb" / "head.db"), os.urandom(32), js, keys, manifest)
    k = [rawbson.id_key_from_document(bson.encode({"_id": i})) for i in (10, 11, 12, 5000)]
    with h.write() as w:
        w.upsert("d.big", k[0], bson.encode({"_id": 10, "v": "committed"}))
        w.delete("d.big", k[1])
        w.upsert("d.fresh", k[3], bson.encode({"_id": 5000}))
    state = (h.loaded_chunks, {n: dict(d) for n, d in h.overlay.items()}, h.overlay_size)
    with pytest.raises(RuntimeError):
        with h.write() as w:
            w.upsert("d.big", k[0], bson.encode({"_id": 10, "v": "rolled back"}))
            w.upsert("d.big", k[1], bson.encode({"_id": 11, "v": "back"}))
            w.delete("d.big", k[2])
            assert w.get("d.types", rawbson.id_key_from_document(bson.encode({"_id": 7}))) is not None  # a chunk loaded
            w.rename("d.fresh", "d.big")  # drops d.big's overlay on the way
            w.drop_namespace("d.old")
            w.upsert("d.new", k[3], bson.encode({"_id": 5000, "new": 1}))
            raise RuntimeError("the replay failed")
    assert (h.loaded_chunks, h.overlay, h.overlay_size) == state
    with h.write() as w:
        assert w.get("d.big", k[0]) == bson.encode({"_id": 10, "v": "committed"})
        assert w.get("d.big", k[1]) is None and w.get("d.big", k[2]) is not None
        assert w.get("d.fresh", k[3]) == bson.encode({"_id": 5000}) and not w.has_namespace("d.new")
        assert w.count("d.old") == 300
    h.close()


def test_a_transaction_that_spilled_then_failed_leaves_the_head_refusing(setup, tmp_path):
    js, keys, entry, _want = setup
    manifest = js.read_manifest(entry["snapshot_id"], keys)
    h = point_in_time.RebuildHead(str(tmp_path / "sp" / "head.db"), os.urandom(32), js, keys, manifest, overlay_bytes=100_000)
    with pytest.raises(RuntimeError):
        with h.write() as w:
            w.upsert("d.fresh", b"\x10k", b"x" * 200_000)  # past the budget: into the head, in this transaction
            raise RuntimeError("the replay failed")
    with pytest.raises(RestoreError, match="unusable after a failed transaction"):
        h.write()
    h.close()
