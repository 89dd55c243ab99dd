"""The fast path of a point-in-time restore (point_in_time: the replay in a forked process while restore.execute
restores the base's untouched chunks): through real sealed segments, it must restore byte for byte what the
sequential path (a temporary head) restores and what the capture's own head held at the point, to a directory and an
archive, with include/exclude; a DDL event in the window takes the sequential path (and says why); a replay process
killed mid-way, or one whose totals do not add up, fails the restore with the target untouched; a tampered segment
is named before anything is forked or written; no plaintext in the restore's temporary files. Real SQLCipher heads,
a folder store, a local key provider."""
import os
import random
import signal

import bson
import pytest
from bson import Timestamp
from bson.raw_bson import RawBSONDocument

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import events, point_in_time, restore, segments, snapshot, store
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, RestoreError
from snapshot_helpers import LocalKeyProvider, all_types_docs, canary_hits, make_head, read_archive, split_docs

T0 = 1760000000
CANARY = "pitr-overlap-canary-9c41"


def raw(d):
    return RawBSONDocument(bson.encode(d))


def ev(op, coll, ct, db="d", **fields):
    return raw(dict({"_id": {"_data": "%d.%d" % ct}, "operationType": op, "clusterTime": Timestamp(*ct),
                     "ns": {"db": db, "coll": coll}}, **fields))


def upd(coll, ct, _id, fields, removed=(), db="d"):
    return ev("update", coll, ct, db=db, documentKey={"_id": _id},
              updateDescription={"updatedFields": fields, "removedFields": list(removed), "truncatedArrays": []})


def base_namespaces():
    rnd = random.Random(5)
    return {"d.big": [{"_id": i, "pad": rnd.randbytes(700), "tag": CANARY} for i in range(2000)],
            "d.types": all_types_docs(CANARY),
            "d.quiet": [{"_id": i} for i in range(50)],
            "e.other": [{"_id": i, "v": CANARY} for i in range(300)]}


def window_events(t):
    """Inserts (in the middle, past the end, 1.2 MB of them), replaces, updates (every BSON type kept), deletes,
    and an event on a namespace the backup does not keep; one cluster time each group, from T0 + t."""
    types = all_types_docs(CANARY)
    groups = [
        [ev("insert", "big", (t, 1), documentKey={"_id": 1000.5}, fullDocument={"_id": 1000.5, "new": CANARY}),
         upd("big", (t, 1), 10, {"pad": "short", "x.y": 1}), ev("delete", "big", (t, 1), documentKey={"_id": 1999})],
        [ev("replace", "big", (t + 1, 1), documentKey={"_id": 500}, fullDocument={"_id": 500, "replaced": True}),
         upd("types", (t + 1, 1), 7, {"int32": 5}, removed=["code"]),
         upd("types", (t + 1, 1), types[3]["_id"], {"nested.deep.0.x.1.y": "changed"}),
         ev("delete", "big", (t + 1, 1), documentKey={"_id": 0}),
         ev("insert", "x", (t + 1, 1), db="config", documentKey={"_id": 1}, fullDocument={"_id": 1})],
        [ev("insert", "big", (t + 2, 1), documentKey={"_id": 10 ** 6 + k}, fullDocument={"_id": 10 ** 6 + k, "pad": "p" * 3000})
         for k in range(400)],
        [upd("other", (t + 3, 1), 3, {"v": "updated"}, db="e"), ev("delete", "other", (t + 3, 1), db="e", documentKey={"_id": 4}),
         upd("big", (t + 3, 1), 10 ** 6 + 7, {"pad": "q"})],
    ]
    return groups


def captured(h, evs, ct):
    """What source.Capture does with segments on: apply the events and log them in the same transaction."""
    a = events.Applier(keep=events.keeps)
    with h.write() as w:
        for e in evs:
            a.apply(w, e)
        a.flush()
        w.log_records([(ct[0], ct[1], e.raw) for e in evs])
        w.set_position(b"token", list(ct), True)


def image_of(h):
    with h.read() as r:
        return {n["ns"]: [doc for _k, doc in r.scan(n["ns"])] for n in r.namespaces()}


def restored_dir(out):
    got = {}
    for db in sorted(os.listdir(out)):
        if os.path.isdir(os.path.join(out, db)):
            for f in sorted(os.listdir(os.path.join(out, db))):
                if f.endswith(".bson"):
                    got["%s.%s" % (db, f[:-5])] = split_docs(open(os.path.join(out, db, f), "rb").read())
    return got


def files(out):
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _s, fs in os.walk(out) for f in fs if f != restore.RESTORE_INFO}


def info(path):
    return [line for line in open(path).read().splitlines() if not line.startswith("Restored:")]


@pytest.fixture
def lab(tmp_path):
    provider = LocalKeyProvider()
    provider.create("mk")
    js = store.JobStore(str(tmp_path / "store"), "job")
    keys = store.Keys(js, provider)
    h = make_head(str(tmp_path / "h" / "head.db"), base_namespaces(), key=os.urandom(32), cluster_time=(T0, 1))
    h.record_segments = True
    base = snapshot.take_snapshot(h, js, keys, "job", "mk", True, max_bytes=64 << 10)
    h.mark_snapshotted(base["change_seq"])
    images = {}
    for n, group in enumerate(window_events(T0 + 1)):
        ct = (T0 + 1 + n, 1)
        captured(h, group, ct)
        images[ct] = image_of(h)
        if n % 2 == 1:
            segments.close(h)
            segments.seal_closed(h, js, keys, "mk")
    ddl_ct = (T0 + 10, 1)
    captured(h, [ev("createIndexes", "big", ddl_ct, operationDescription={"indexes": [{"v": 2, "key": {"tag": 1},
                                                                                      "name": "tag_1"}]}),
                 upd("big", ddl_ct, 20, {"pad": "after the index"})], ddl_ct)
    images[ddl_ct] = image_of(h)
    segments.close(h)
    segments.seal_closed(h, js, keys, "mk")
    yield {"js": js, "keys": keys, "images": images, "tmp": tmp_path, "base": base, "ddl": ddl_ct}
    h.close()


def restore_point(lab, point, out, overlap=True, target="directory", **select):
    js, keys = lab["js"], lab["keys"]
    plan = segments.plan_point(js, keys, point)
    with point_in_time.rebuild(js, keys, plan, work_dir=str(lab["tmp"]), overlap=overlap) as image:
        selected = restore.select_namespaces(image.manifest, **select)
        t = restore.DirectoryTarget(out) if target == "directory" else restore.ArchiveTarget(out)
        summary = restore.execute(image.store, keys, image.entry, selected, t)
        return image, summary


def test_fast_path_restores_what_the_head_held_and_what_the_sequential_path_restores(lab):
    images, tmp = lab["images"], lab["tmp"]
    for k, point in enumerate(sorted(p for p in images if p < lab["ddl"])):
        fast, summary = restore_point(lab, point, str(tmp / ("fast%d" % k)))
        slow, summary_slow = restore_point(lab, point, str(tmp / ("slow%d" % k)), overlap=False)
        assert (fast.path, fast.why, slow.path, slow.why) == ("overlap", None, "sequential", "overlap is off"), fast.why
        assert restored_dir(str(tmp / ("fast%d" % k))) == {ns: docs for ns, docs in images[point].items() if docs}, point
        assert files(str(tmp / ("fast%d" % k))) == files(str(tmp / ("slow%d" % k)))  # metadata too, byte for byte
        # restoreInfo (documents, bytes of the whole image) and the summary: as the sequential path's
        assert info(str(tmp / ("fast%d" % k) / restore.RESTORE_INFO)) == info(str(tmp / ("slow%d" % k) / restore.RESTORE_INFO))
        assert {x: summary[x] for x in ("documents", "bytes", "snapshot_id")} == {
            x: summary_slow[x] for x in ("documents", "bytes", "snapshot_id")}
        assert fast.replayed == slow.replayed and fast.loaded_chunks <= slow.loaded_chunks + 1
        assert [(n["count"], n["hash"]) for n in fast.manifest["namespaces"]] == [
            (n["count"], n["hash"]) for n in slow.manifest["namespaces"]]
    point = max(p for p in images if p < lab["ddl"])
    # an archive, byte for byte (its prelude's sizes are known only at the end); include/exclude
    restore_point(lab, point, str(tmp / "fast.archive"), target="archive")
    restore_point(lab, point, str(tmp / "slow.archive"), overlap=False, target="archive")
    assert open(str(tmp / "fast.archive"), "rb").read() == open(str(tmp / "slow.archive"), "rb").read()
    _h, _c, docs, _crc = read_archive(str(tmp / "fast.archive"))
    assert docs["d.big"] == images[point]["d.big"]
    out = str(tmp / "some")
    image, summary = restore_point(lab, point, out, include=["d.*"], exclude=["d.quiet"])
    assert image.path == "overlap" and summary["namespaces"] == 2
    assert restored_dir(out) == {ns: images[point][ns] for ns in ("d.big", "d.types")}
    slow_out = str(tmp / "some-slow")
    restore_point(lab, point, slow_out, overlap=False, include=["d.*"], exclude=["d.quiet"])
    assert info(os.path.join(out, restore.RESTORE_INFO)) == info(os.path.join(slow_out, restore.RESTORE_INFO))
    assert canary_hits(str(tmp / "store"), CANARY) == []
    assert not [p for p in tmp.iterdir() if p.name.startswith("kmipbackup-pitr-")]  # the fast path writes no temporary head


def test_a_ddl_event_in_the_window_takes_the_sequential_path(lab):
    out = str(lab["tmp"] / "ddl")
    image, _s = restore_point(lab, lab["ddl"], out)
    assert image.path == "sequential" and "other than insert" in image.why
    assert restored_dir(out) == {ns: docs for ns, docs in lab["images"][lab["ddl"]].items() if docs}


def test_a_killed_replay_process_fails_the_restore_and_writes_nothing(lab):
    js, keys, tmp = lab["js"], lab["keys"], lab["tmp"]
    point = max(p for p in lab["images"] if p < lab["ddl"])
    plan = segments.plan_point(js, keys, point)
    out = str(tmp / "killed")
    with point_in_time.rebuild(js, keys, plan, work_dir=str(tmp)) as image:
        assert image.path == "overlap"
        os.kill(image.child_pid, signal.SIGKILL)  # blocked on its pipe: 1.2 MB of inserts past the end are not read yet
        with pytest.raises(RestoreError, match="killed by signal 9"):
            restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest), restore.DirectoryTarget(out))
    assert not os.path.exists(out) and [p.name for p in tmp.iterdir() if p.name.startswith(".killed")] == []
    archive = str(tmp / "killed.archive")
    with point_in_time.rebuild(js, keys, plan, work_dir=str(tmp)) as image:
        os.kill(image.child_pid, signal.SIGKILL)
        with pytest.raises(RestoreError, match="killed by signal 9"):
            restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest), restore.ArchiveTarget(archive))
    assert not os.path.exists(archive) and not os.path.exists(archive + "." + restore.RESTORE_INFO)


def test_a_replay_process_whose_totals_do_not_add_up_is_refused(lab, monkeypatch):
    parent, real = os.getpid(), point_in_time.namespace_hash
    monkeypatch.setattr(point_in_time, "namespace_hash", lambda chunks: "00" * 32 if os.getpid() != parent else real(chunks))
    out = str(lab["tmp"] / "lies")
    with pytest.raises(IntegrityError, match="does not add up"):
        restore_point(lab, max(p for p in lab["images"] if p < lab["ddl"]), out)
    assert not os.path.exists(out)


def test_a_tampered_segment_is_named_before_anything_is_forked_or_written(lab):
    segs = segments.list_segments(lab["js"])
    path = os.path.join(str(lab["tmp"] / "store"), "job", "segments", segs[0]["name"])
    blob = bytearray(open(path, "rb").read())
    blob[-30] ^= 1
    open(path, "wb").write(bytes(blob))
    out = str(lab["tmp"] / "tampered")
    with pytest.raises(IntegrityError, match=segs[0]["name"]):
        restore_point(lab, max(p for p in lab["images"] if p < lab["ddl"]), out)
    assert not os.path.exists(out)
