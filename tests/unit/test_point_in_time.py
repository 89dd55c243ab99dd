"""The rebuild side of point-in-time restore, without segments: a base snapshot loaded lazily into a temporary
head, change events applied to it by the real applier (standing in for segments.replay, which pitrw tests), and
the image restored by restore.py to a directory and an archive. The image must equal, byte for byte, a head that
held every document and applied the same events; only the chunks the events touch are loaded. Real SQLCipher
heads, a folder store, a local key provider."""
import os
import random

import bson
import pytest
from bson import Timestamp
from bson.raw_bson import RawBSONDocument

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    events, mongodump, point_in_time, rawbson, restore, snapshot, store)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import RestoreError
from snapshot_helpers import LocalKeyProvider, all_types_docs, image_of, make_head, read_archive, restored_dir, split_docs

POINT = (1760000100, 7)


def raw(d):
    return RawBSONDocument(bson.encode(d))


def ev(op, db, coll, **fields):
    return raw(dict({"_id": {"_data": "x"}, "operationType": op, "clusterTime": Timestamp(*POINT),
                     "ns": {"db": db, "coll": coll}}, **fields))


def ins(db, coll, d, op="insert"):
    return ev(op, db, coll, documentKey={"_id": d["_id"]}, fullDocument=d)


def base_namespaces():
    rnd = random.Random(3)
    return {"d.big": [{"_id": i, "pad": rnd.randbytes(700)} for i in range(3000)],
            "d.types": all_types_docs(),
            "d.gone": [{"_id": i} for i in range(5)],
            "d.old": [{"_id": i, "v": "old"} for i in range(300)],
            "d.over": [{"_id": i, "v": "overwritten"} for i in range(3)],
            "e.x": [{"_id": 1}]}


def the_events():
    id_index = {"v": 2, "key": {"_id": 1}, "name": "_id_"}
    return [
        ins("d", "big", {"_id": 1500.5, "new": "in the middle"}),
        ins("d", "big", {"_id": 99999, "new": "past the end"}),
        ins("d", "big", {"_id": 2000, "replaced": True}, op="replace"),
        ev("update", "d", "big", documentKey={"_id": 10}, updateDescription={
            "updatedFields": {"pad": "short", "x.y": 1}, "removedFields": [], "truncatedArrays": []}),
        ev("delete", "d", "big", documentKey={"_id": 2999}),
        ev("delete", "d", "big", documentKey={"_id": 0}),
        ev("createIndexes", "d", "big", operationDescription={"indexes": [{"v": 2, "key": {"pad": 1}, "name": "pad_1"}]}),
        ev("update", "d", "types", documentKey={"_id": 7}, updateDescription={
            "updatedFields": {"int32": 5}, "removedFields": ["code"], "truncatedArrays": []}),
        ev("drop", "d", "gone"),
        ev("rename", "d", "old", to={"db": "d", "coll": "over"}),
        ev("update", "d", "over", documentKey={"_id": 299}, updateDescription={
            "updatedFields": {"v": "renamed"}, "removedFields": [], "truncatedArrays": []}),
        ev("create", "d", "fresh", operationDescription={"idIndex": id_index}),
        *[ins("d", "fresh", {"_id": i, "pad": "f" * 3000}) for i in range(600)],
        ev("dropDatabase", "e", ""),
    ]


@pytest.fixture
def setup(tmp_path):
    provider = LocalKeyProvider()
    provider.create("mk")
    js = store.JobStore(str(tmp_path / "store"), "job")
    keys = store.Keys(js, provider)
    full = make_head(str(tmp_path / "full" / "head.db"), base_namespaces(), key=os.urandom(32))
    entry = snapshot.take_snapshot(full, js, keys, "job", "mk", True, max_bytes=64 << 10)
    with full.write() as w:  # what a head that holds every document makes of the same events
        a = events.Applier()
        for e in the_events():
            a.apply(w, e)
    yield js, keys, full, entry
    full.close()


def apply_events(h, js, keys, plan, progress=None):
    a = events.Applier()
    evs = the_events()
    with h.write() as w:
        for e in evs:
            a.apply(w, e)
    return {"events": len(evs), "segments": 0}


def expected(full):
    with full.read() as r:
        return {n["ns"]: ([doc for _k, doc in r.scan(n["ns"])], n) for n in r.namespaces()}


def test_rebuilt_image_equals_a_full_head_and_loads_only_touched_chunks(setup, tmp_path):
    js, keys, full, entry = setup
    plan = {"snapshot": entry, "segments": [], "point": POINT}
    want = expected(full)
    with point_in_time.rebuild(js, keys, plan, replay=apply_events, work_dir=str(tmp_path)) as image:
        folder = [p for p in tmp_path.iterdir() if p.name.startswith("kmipbackup-pitr-")][0]
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        big = js.read_manifest(entry["snapshot_id"], keys)["namespaces"][0]
        assert big["ns"] == "d.big" and len(big["chunks"]) > 20
        # big: the chunks of 1500.5, 2000, 10, 2999, 0 (99999 is past the end); types: one; old->over: one
        assert image.loaded_chunks <= 5 + 1 + 1
        assert [n["ns"] for n in image.manifest["namespaces"]] == sorted(want)
        assert image.entry["snapshot_id"] == "%s@%d.%d" % (entry["snapshot_id"], *POINT)
        assert image.entry["cluster_time"] == list(POINT)
        selected = restore.select_namespaces(image.manifest)
        out = tmp_path / "out"
        summary = restore.execute(image.store, keys, image.entry, selected, restore.DirectoryTarget(str(out)))
        arch = tmp_path / "out.archive"
        restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest, include=["d.*"],
                                                                                  rename={"d": "r"}),
                        restore.ArchiveTarget(str(arch)))
        assert restore.already_restored(image.store, image.entry["snapshot_id"], restore.DirectoryTarget(str(out)), selected)
    assert not folder.exists()
    assert summary["documents"] == sum(len(docs) for docs, _n in want.values())
    for ns, (docs, n) in want.items():
        db, coll = ns.split(".", 1)
        assert split_docs((out / db / (coll + ".bson")).read_bytes()) == docs, ns
        assert (out / db / (coll + ".metadata.json")).read_text() == mongodump.metadata_json(
            n["options"], n["indexes"], n["uuid"], coll)
    assert not (out / "e").exists() and not (out / "d" / "gone.bson").exists()
    info = (out / restore.RESTORE_INFO).read_text()
    assert "Point In Time: 2025-10-09T08:55:00Z (Timestamp(1760000100, 7))" in info
    assert "Base Snapshot ID: %s\n" % entry["snapshot_id"] in info
    _header, _metas, archived, _crcs = read_archive(str(arch))
    assert archived == {"r." + ns.split(".", 1)[1]: docs for ns, (docs, _n) in want.items() if ns.startswith("d.") and docs}


def test_a_head_changed_under_the_restore_is_refused(setup, tmp_path):
    js, keys, _full, entry = setup
    plan = {"snapshot": entry, "segments": [], "point": POINT}
    with point_in_time.rebuild(js, keys, plan, replay=apply_events, work_dir=str(tmp_path)) as image:
        h = image.store._h  # pylint: disable=protected-access
        with h.read() as r:
            first = next(iter(r.scan("d.fresh")))[0]
        with h.write() as w:
            w.delete("d.fresh", first)
        with pytest.raises(RestoreError, match="changed under it"):
            restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest, include=["d.fresh"]),
                            restore.DirectoryTarget(str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


# ---- through real segments: written as the capture writes them (Writer.log_records), sealed, replayed ----------

T0 = 1760000000


def captured(h, evs):
    """What source.Capture does with segments on: apply the events and log them in the same transaction."""
    a = events.Applier()
    with h.write() as w:
        for e in evs:
            a.apply(w, e)
        a.flush()
        w.log_records([(e["clusterTime"].time, e["clusterTime"].inc, e.raw) for e in evs])
        last = evs[-1]["clusterTime"]
        w.set_position(b"token", [last.time, last.inc], True)


def at(e, t, i):
    return raw(dict(bson.decode(e.raw), clusterTime=Timestamp(t, i)))


def test_restore_to_every_point_through_sealed_segments_with_a_rotation(tmp_path):
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import segments
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, PointNotRestorable
    provider = LocalKeyProvider()
    provider.create("mk1")
    provider.create("mk2")
    js = store.JobStore(str(tmp_path / "store"), "job")
    keys = store.Keys(js, provider)
    h = make_head(str(tmp_path / "h" / "head.db"), base_namespaces(), key=os.urandom(32), cluster_time=(T0, 1))
    h.record_segments = True
    base = snapshot.take_snapshot(h, js, keys, "job", "mk1", True, max_bytes=64 << 10)
    h.mark_snapshotted(base["change_seq"])
    images = {}
    evs = the_events()
    groups = [[e] for e in evs[:12]] + [evs[12:-1], evs[-1:]]  # the 600 inserts: one transaction (one cluster time)
    for n, group in enumerate(groups):  # a segment every 3 cluster times; the master key rotates after the 7th
        ct = (T0 + 1 + n // 2, 1 + n % 2)
        captured(h, [at(e, *ct) for e in group])
        images[ct] = image_of(h)
        if n % 3 == 2:
            segments.close(h)
            segments.seal_closed(h, js, keys, "mk2" if n >= 7 else "mk1")
    segments.close(h)
    segments.seal_closed(h, js, keys, "mk2")
    assert len(segments.list_segments(js)) == 5
    assert {bytes(open(os.path.join(str(tmp_path / "store"), "job", "segments", s["name"]), "rb").read()[5:15])
            for s in segments.list_segments(js)} == {b"snapshot-1", b"snapshot-2"}
    points = sorted(images)[::3] + [sorted(images)[-2], sorted(images)[-1]]
    for k, point in enumerate(points):
        plan = segments.plan_point(js, keys, point)
        assert plan["snapshot"]["snapshot_id"] == base["snapshot_id"]
        with point_in_time.rebuild(js, keys, plan) as image:
            out = str(tmp_path / ("out%d" % k))
            restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest),
                            restore.DirectoryTarget(out))
        want = {ns: docs for ns, docs in images[point].items() if docs}
        assert restored_dir(out) == want, point
        assert "Segments: %d\n" % len(plan["segments"]) in open(os.path.join(out, restore.RESTORE_INFO)).read()
    with pytest.raises(PointNotRestorable, match="latest restorable time before it"):
        segments.plan_point(js, keys, (T0 + 500, 1))
    # a segment modified in the store: named, nothing written
    segs = segments.list_segments(js)
    path = os.path.join(str(tmp_path / "store"), "job", "segments", segs[1]["name"])
    blob = bytearray(open(path, "rb").read())
    blob[-20] ^= 1
    open(path, "wb").write(bytes(blob))
    plan = segments.plan_point(js, keys, points[-1])
    with pytest.raises(IntegrityError, match=segs[1]["name"]):
        with point_in_time.rebuild(js, keys, plan) as image:
            restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest),
                            restore.DirectoryTarget(str(tmp_path / "tampered")))
    assert not (tmp_path / "tampered").exists()
    h.close()


def test_a_rolled_back_transaction_forgets_the_chunks_it_loaded(setup, tmp_path):
    js, keys, _full, entry = setup
    manifest = js.read_manifest(entry["snapshot_id"], keys)
    h = point_in_time.RebuildHead(str(tmp_path / "rb" / "head.db"), os.urandom(32), js, keys, manifest)
    key = rawbson.id_key_from_document(bson.encode({"_id": 10}))
    with pytest.raises(RuntimeError):
        with h.write() as w:
            assert w.get("d.big", key) is not None
            assert h.loaded_chunks == 1
            raise RuntimeError("the replay failed")
    assert h.loaded_chunks == 0 and not h.bases["d.big"].loaded
    with h.write() as w:
        assert w.get("d.big", key) is not None  # loaded again, for real this time
    assert h.loaded_chunks == 1
    h.close()
