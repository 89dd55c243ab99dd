"""Shared by the point-in-time fast-path tests (unit: tests/unit/test_pitr_overlap.py; MongoDB target:
tests/integration/test_pitr_overlap_mongo.py): a head with a base snapshot and sealed segments of insert, replace,
update and delete events (then one DDL event), the image the head held at each point, and a restore into MongoDB."""
import os
import random
import time

import bson
from bson import Timestamp
from bson.raw_bson import RawBSONDocument

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import events, point_in_time, restore, segments, snapshot, store
from snapshot_helpers import LocalKeyProvider, all_types_docs, image_of, make_head

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


def segment_job(tmp_path, provider=None, uid="mk"):
    """{"js", "keys", "provider", "head", "base", "tmp"}: a head of base_namespaces() at T0 recording segments, its
    snapshot (64 KiB chunks) in a folder store, the snapshot's changes forgotten; keys from provider (a KmipClient)
    under master key uid, or from a local key provider."""
    if provider is None:
        provider = LocalKeyProvider()
        provider.create(uid)
    js = store.JobStore(str(tmp_path / "store"), "job")
    keys = store.Keys(js, provider)
    h = make_head(str(tmp_path / "h" / "head.db"), base_namespaces(), key=os.urandom(32), cluster_time=(T0, 1))
    h.record_segments = True
    base = snapshot.take_snapshot(h, js, keys, "job", uid, True, max_bytes=64 << 10)
    h.mark_snapshotted(base["change_seq"])
    return {"js": js, "keys": keys, "provider": provider, "head": h, "base": base, "tmp": tmp_path}


def build_lab(tmp_path, provider=None, uid="mk"):
    """segment_job's, plus "images": {point: image} and "ddl": the DDL event's point."""
    lab = segment_job(tmp_path, provider, uid)
    js, keys, h = lab["js"], lab["keys"], lab["head"]
    images = {}
    for n, group in enumerate(window_events(T0 + 1)):
        ct = (T0 + 1 + n, 1)
        captured(h, group, ct)
        images[ct] = image_of(h)
        if n % 2 == 1:
            segments.close(h)
            segments.seal_closed(h, js, keys, uid)
    ddl_ct = (T0 + 10, 1)
    captured(h, [ev("createIndexes", "big", ddl_ct, operationDescription={"indexes": [{"v": 2, "key": {"tag": 1},
                                                                                      "name": "tag_1"}]}),
                 upd("big", ddl_ct, 20, {"pad": "after the index"})], ddl_ct)
    images[ddl_ct] = image_of(h)
    segments.close(h)
    segments.seal_closed(h, js, keys, uid)
    lab.update(images=images, ddl=ddl_ct)
    return lab


def restore_to_mongodb(store_root, provider, point, uri, rename, kill=False):
    """Restore point into MongoDB at uri, databases renamed; kill: SIGKILL the replay process first. Returns (image path,
    "error class: message" or None)."""
    import signal  # pylint: disable=import-outside-toplevel
    js = store.JobStore(store_root, "job")
    keys = store.Keys(js, provider)
    plan = segments.plan_point(js, keys, point)
    target = restore.MongoTarget(uri)
    try:
        with point_in_time.rebuild(js, keys, plan) as image:
            if kill:
                os.kill(image.child_pid, signal.SIGKILL)
            try:
                restore.execute(image.store, keys, image.entry,
                                restore.select_namespaces(image.manifest, rename=rename), target)
            except Exception as e:  # pylint: disable=broad-except  # the test checks which
                return image.path, "%s: %s" % (type(e).__name__, e)
            return image.path, None
    finally:
        target.close()


def wait_post_images_built(h, timeout=60.0):
    """Wait until no closed segment of head h has post-images still being built (a seal pass, wait=False as the
    daemon's tick, seals only built ones)."""
    deadline = time.monotonic() + timeout
    while any(h.post_images_pending(c["seg"]) for c in h.closed_segments()) and time.monotonic() < deadline:
        time.sleep(0.01)
