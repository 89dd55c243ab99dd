"""Point in time with the store in an S3 bucket, written by the real Backup Daemon (SeaweedFS, PyKMIP over mutual TLS,
SecantusDB): writes under load with updates and DDL, a snapshot in the middle, segments sealed into the bucket; a
restore to a point before and after that snapshot (restore_request, what snapshot_restore runs) is byte-equal to the
source's image at that point. No plaintext name, _id or value in any object of the bucket.

One job and one daemon serve every test of the module (the suite runs on 2-core machines); the daemon is stopped
before the tests look at the bucket, so nothing moves under them."""
import os
import threading
import time
import uuid

import pymongo
import pytest

import workload
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    ansible_module, files, job_config, job_requests, master_keys, restore_request, segments, source, storage, store,
    store_copy, timeutil)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, PointNotRestorable
from ansible_collections.kmipbackup.mongodb.plugins.modules import snapshot_restore
from daemon_helper import DaemonProcess, write_kmip_setup
from test_objectstore_jobs import bucket_objects, s3
from snapshot_helpers import drop_standin_phantoms, plaintext_views, restored_image, source_image

PREFIX = "kb/pitr"


def _point(mc, db):
    """A cluster time at or after every write acknowledged so far (the marker's own write)."""
    with mc.start_session() as s:
        db["marker"].update_one({"_id": "m"}, {"$inc": {"n": 1}}, upsert=True, session=s)
        return s.operation_time.time, s.operation_time.inc


def _load(db, wl, seconds, ddl):
    stop = threading.Event()
    thread = wl.run_in_thread(stop)
    ddl()
    time.sleep(seconds)
    stop.set()
    thread.join(30)


def _snapshot(data_dir, job):
    rid = job_requests.submit_request(data_dir, job, "snapshot", timeout=60)
    return job_requests.wait_answer(data_dir, job, rid, timeout=60)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, pki, kmip_server, mongo_server, s3_server):
    base = tmp_path_factory.mktemp("pitr-bucket")
    config_dir, data_dir = str(base / "etc"), str(base / "data")
    files.ensure_private_dir(config_dir)
    files.ensure_private_dir(data_dir)
    write_kmip_setup(config_dir, pki, kmip_server["port"])
    tag = uuid.uuid4().hex[:8]
    bucket = "kb-pitrb-%s" % tag
    s3(s3_server).create_bucket(Bucket=bucket)
    obj = {"bucket": bucket, "prefix": PREFIX, "endpoint_url": s3_server["endpoint"],
           "access_key": s3_server["access_key"], "secret_key": s3_server["secret_key"]}
    dbname, collname, value = "kbsegdb%s" % tag, "kbsegcoll%s" % tag, "kbsegvalue%s" % tag
    needles = [dbname, collname, value, "kbsegid%s" % tag]
    mc = pymongo.MongoClient(mongo_server["uri"])
    db = mc[dbname]
    db[collname].insert_many([{"_id": "kbsegid%s-%d" % (tag, i), "v": value, "n": i} for i in range(40)])
    workload.seed(db, n=30)
    job = "pitrb-%s" % tag
    params = {"job": job, "group": "group1", "source": {"uri": mongo_server["uri"], "connect_timeout": 3},
              "encryption": "enabled", "config_dir": config_dir, "data_dir": data_dir, "master_key": {"create": True},
              "object_store": obj, "point_in_time_segment_seconds": 1}
    cfg, _info = job_config.plan_job(params, None, source.check_source)
    job_config.write_job(config_dir, cfg)
    kmip = master_keys.kmip_client(config_dir, "group1")
    js = storage.job_store(job_config.load_job(config_dir, job))
    keys = store.Keys(js, provider=kmip, encryption=True)
    wl = workload.Workload(db, seed=31)
    points = []
    d = DaemonProcess(config_dir, data_dir).start()
    try:
        d.wait_status(job, lambda st: st["state"] == "STARTED" and st.get("last_snapshot"), timeout=90)
        first = d.status(job)["last_snapshot"]["id"]

        def ddl_a():  # a create with an index, and updates of the canary collection
            db.create_collection("made0")
            db["made0"].insert_many([{"_id": k, "v": k} for k in range(10)])
            db["made0"].create_index("v", name="v_1", unique=True)
            db[collname].update_many({"n": {"$lt": 10}}, {"$set": {"u": value + "-a"}})

        def ddl_b():  # a rename over nothing, an index dropped, a delete and an update
            db["made0"].rename("made1")
            db["made1"].drop_index("v_1")
            db[collname].delete_one({"n": 11})
            db[collname].update_one({"n": 12}, {"$set": {"u": value + "-b"}})

        for ddl in (ddl_a, ddl_b):
            _load(db, wl, 1.2, ddl)
            drop_standin_phantoms(mc, dbname)
            pt = _point(mc, db)
            points.append({"point": pt, "image": source_image(mc, dbname)})
            if ddl is ddl_a:  # a write after the point, so the snapshot's cluster time is after it
                # a segment through the point sealed first: the snapshot's cut closes a later one (the timeline holds
                # two or more before it, whatever the load on the machine)
                d.wait_status(job, lambda st, pt=pt: tuple((st.get("segments") or {}).get("sealed_cluster_time")
                                                           or (0, 0)) >= pt, timeout=30)
                db[collname].insert_one({"_id": "kbsegid%s-mid" % tag, "v": value})
                second = _snapshot(data_dir, job)["id"]  # a segment boundary between the two points
        db[collname].insert_one({"_id": "kbsegid%s-after" % tag, "v": value})  # coverage past the last point
        last = points[-1]["point"]

        def covered():
            try:
                r = segments.restorable_ranges(js, keys)
            except Exception:  # noqa: BLE001  (a catalog being written: look again)
                return None
            return r if r["ranges"] and (r["ranges"][-1]["to"]["t"], r["ranges"][-1]["to"]["i"]) >= last else None
        assert timeutil.wait_for(covered, 60, 0.3), d.log_tail()
        status = d.wait_status(job, lambda st: (st.get("segments") or {}).get("sealed_cluster_time") and tuple(
            st["segments"]["sealed_cluster_time"]) >= last, timeout=30)
        # segments removed after the newest snapshot: the store cannot tell, the daemon's head can (its status says)
        entries, _head = js.live_catalog(keys)
        cut = entries[-1]["segment"]
        after = [s for s in segments.list_segments(js) if s["timeline"] == cut["timeline"] and s["seq"] > cut["seq"]]
        saved = {segments.segment_path(js, s): bytes(js.storage.get(segments.segment_path(js, s))) for s in after}
        for path in saved:
            js.storage.delete(path)
        try:
            removed = d.wait_status(job, lambda st: (st.get("segments") or {}).get("problem"), timeout=30)
        finally:
            for path, blob in saved.items():
                js.storage.put_atomic(path, blob)
    finally:
        d.stop()
    yield {"js": js, "keys": keys, "kmip": kmip, "obj": obj, "bucket": bucket, "s3": s3_server, "db": dbname, "mc": mc,
           "points": points, "snapshots": [first, second], "needles": needles, "job": job, "pki": pki, "status": status,
           "removed_status": removed, "cut": cut,
           "kmip_port": kmip_server["port"], "tmp": base, "daemon_files": [d.log_file] + d.out_files, "data_dir": data_dir}
    kmip.close()
    mc.drop_database(dbname)
    mc.close()


def params(lab, **kw):
    """snapshot_restore's parameters on a fresh host: the bucket, the KMIP server and a certificate."""
    spec = ansible_module.full_spec(snapshot_restore.argument_spec, snapshot_restore.SHARED)
    p = {name: opt.get("default") for name, opt in spec.items()}
    p.update(job=lab["job"], object_store=lab["obj"], config_dir=str(lab["tmp"] / "no-config"),
             data_dir=str(lab["tmp"] / "no-data"), kmip_servers=["127.0.0.1:%d" % lab["kmip_port"]],
             kmip_ca_file=lab["pki"]["ca"], client_cert_file=lab["pki"]["clients"]["group1"]["pem"],
             include=[lab["db"] + ".*"])
    p.update(kw)
    return p


def test_restore_from_the_bucket_to_each_point_is_byte_equal(lab):
    ranges = segments.restorable_ranges(lab["js"], lab["keys"])
    assert len(ranges["ranges"]) == 1 and ranges["gaps"] == [], ranges
    assert ranges["ranges"][0]["base_snapshots"][-2:] == lab["snapshots"]
    assert len(segments.list_segments(lab["js"])) >= 3
    for k, pt in enumerate(lab["points"]):
        out = str(lab["tmp"] / ("out%d" % k))
        r = restore_request.run_restore(params(lab, target_dir=out, point_in_time={"t": pt["point"][0], "i": pt["point"][1]}))
        assert r["changed"] and r["base_snapshot_id"] == lab["snapshots"][k] and r["segments"] >= 1, r
        assert restored_image(out, lab["db"]) == pt["image"], k
        assert lab["db"] not in str(r)  # encrypted: namespaces are not named in the result


def test_status_shows_point_in_time_health(lab):
    seg = lab["status"]["segments"]
    ranges = segments.restorable_ranges(lab["js"], lab["keys"])["ranges"]
    # one-second segments keep closing (an idle stream's resume token moves on) while the tick's seal pass runs on its
    # own thread and puts each into the bucket: a few wait for the next pass at any moment
    assert seg["enabled"] is True and seg["timeline"] == ranges[-1]["timeline"] and seg["awaiting_seal"] >= 0, seg
    assert tuple(seg["sealed_cluster_time"]) >= lab["points"][-1]["point"] and seg["sealed_to"].endswith("Z")
    assert isinstance(seg["open_events"], int) and seg["open_events"] >= 0
    # the store's range as the daemon last checked it (after the on-demand snapshot at least): no problem found
    assert seg["restorable_cluster_time"] and seg["store_checked"] and seg["problem"] is None, seg
    assert seg["restorable_cluster_time"] <= [ranges[-1]["to"]["t"], ranges[-1]["to"]["i"]]
    text = str(lab["status"]) + str(lab["removed_status"])
    assert [n for n in lab["needles"] if n in text] == []


def test_daemon_status_names_segments_removed_after_the_newest_snapshot(lab):
    """The fixture removed every segment sealed after the newest snapshot's cut (then put them back): the store's range
    ends at that cut, before the last segment the daemon sealed, and its status says so."""
    seg, cut = lab["removed_status"]["segments"], lab["cut"]
    assert "change segments were removed from the store" in seg["problem"], seg
    assert "ends at cluster time %d.%d" % tuple(cut["to"]) in seg["problem"] and cut["timeline"] in seg["problem"]
    assert seg["restorable_cluster_time"] == cut["to"]


def test_the_bucket_holds_no_plaintext(lab):
    objects = bucket_objects(lab["s3"], lab["bucket"])
    assert any("/segments/" in k for k in objects)
    hits = ["%s in %s" % (n, k) for k, v in objects.items() for n in lab["needles"]
            if n in k or any(n.encode() in view for view in plaintext_views(v))]
    assert hits == []
    daemon = [open(f, "rb").read() for f in lab["daemon_files"] if os.path.exists(f)]
    assert not [n for n in lab["needles"] for text in daemon if n.encode() in text]


def _cut(lab):
    """The second (newest) snapshot's record of the segment closing at its cut, and its timeline's segments."""
    entries, _head = lab["js"].live_catalog(lab["keys"])
    cut = {e["snapshot_id"]: e.get("segment") for e in entries}[lab["snapshots"][1]]
    assert cut and cut["seq"] >= 2 and len(cut["sha256"]) == 64, cut
    return cut, [s for s in segments.list_segments(lab["js"]) if s["timeline"] == cut["timeline"]]


def _removed(lab, segs):
    """Delete segs from the bucket; returns what puts them back."""
    st = lab["js"].storage
    saved = {segments.segment_path(lab["js"], s): bytes(st.get(segments.segment_path(lab["js"], s))) for s in segs}
    for path in saved:
        st.delete(path)

    def restore():
        for path, blob in saved.items():
            st.put_atomic(path, blob)
    return restore


def test_newest_segments_removed_before_a_snapshot_are_named_and_nothing_is_written(lab):
    cut, held = _cut(lab)
    recorded = [s for s in held if s["seq"] == cut["seq"]][0]
    assert recorded["to"] == tuple(cut["to"])
    first = cut["seq"] - 1 if cut["seq"] >= 3 else cut["seq"]  # the newest segments back to before the snapshot's cut
    put_back = _removed(lab, [s for s in held if s["seq"] >= first])
    out = str(lab["tmp"] / "removed")
    named = "segment %s/%010d is missing" % (cut["timeline"], first)
    try:
        pt = lab["points"][0]["point"]
        with pytest.raises(IntegrityError, match=named):
            restore_request.run_restore(params(lab, target_dir=out, point_in_time={"t": pt[0], "i": pt[1]}))
        assert not os.path.exists(out)
        with pytest.raises(IntegrityError, match=named):
            segments.restorable_ranges(lab["js"], lab["keys"])
    finally:
        put_back()
    assert segments.restorable_ranges(lab["js"], lab["keys"])["gaps"] == []


def test_segments_removed_after_the_newest_snapshot_only_shorten_the_range(lab):
    """Documented limit: nothing in the store vouches for segments after the newest snapshot's cut."""
    cut, held = _cut(lab)
    put_back = _removed(lab, [s for s in held if s["seq"] > cut["seq"]])
    try:
        ranges = segments.restorable_ranges(lab["js"], lab["keys"])
        assert (ranges["ranges"][-1]["to"]["t"], ranges["ranges"][-1]["to"]["i"]) == tuple(cut["to"])
        pt = lab["points"][1]["point"]
        with pytest.raises(PointNotRestorable, match="latest restorable time before it"):
            restore_request.run_restore(params(lab, target_dir=str(lab["tmp"] / "short"), point_in_time={"t": pt[0], "i": pt[1]}))
    finally:
        put_back()



def test_copies_carry_the_segments_and_restore_to_a_point_at_the_destination(lab):
    """snapshot_copy's core: a mirror without keys (bucket to folder), then an authenticated copy of the latest snapshot
    only; each destination restores to a point byte for byte."""
    src = lab["js"].storage
    mirror = str(lab["tmp"] / "mirror")
    held = segments.list_segments(lab["js"])
    plan = store_copy.copy_snapshots(src, store.FileStorage(mirror), lab["job"], check=True)
    assert plan["objects"]["segments"] == len(held) and not os.path.exists(mirror)
    r = store_copy.copy_snapshots(src, store.FileStorage(mirror), lab["job"])
    assert r["objects"]["segments"] == len(held) and r["head"] == "copied"
    again = store_copy.copy_snapshots(src, store.FileStorage(mirror), lab["job"])
    assert not again["changed"] and again["objects"]["segments"] == 0
    for k, pt in enumerate(lab["points"]):
        out = str(lab["tmp"] / ("mirror-out%d" % k))
        got = restore_request.run_restore(params(lab, object_store=None, store=mirror, target_dir=out,
                                                 point_in_time={"t": pt["point"][0], "i": pt["point"][1]}))
        assert got["base_snapshot_id"] == lab["snapshots"][k] and restored_image(out, lab["db"]) == pt["image"], k

    # with keys, the latest snapshot only: the segments from its cut on (each opened and chain-checked on the way)
    own = str(lab["tmp"] / "own")
    r = store_copy.copy_snapshots(src, store.FileStorage(own), lab["job"], "latest", provider=lab["kmip"], encryption=True,
                                  window_hours=24)
    cut = lab["cut"]
    want = [s["name"] for s in held if s["to"] >= tuple(lab["js"].catalog_entry(lab["snapshots"][1])["cluster_time"])]
    assert [s["name"] for s in segments.list_segments(store.JobStore(store.FileStorage(own), lab["job"]))] == want
    assert r["objects"]["segments"] == len(want) and "%s/%010d-" % (cut["timeline"], cut["seq"]) in " ".join(want)
    pt = lab["points"][1]
    out = str(lab["tmp"] / "own-out")
    got = restore_request.run_restore(params(lab, object_store=None, store=own, target_dir=out,
                                             point_in_time={"t": pt["point"][0], "i": pt["point"][1]}))
    assert got["base_snapshot_id"] == lab["snapshots"][1] and restored_image(out, lab["db"]) == pt["image"]


def test_a_copy_refuses_a_broken_segment_chain_and_names_it(lab):
    held = segments.list_segments(lab["js"])
    a, b = held[-3], held[-2]
    st = lab["js"].storage
    pa = segments.segment_path(lab["js"], a)
    blob_a = bytes(st.get(pa))
    st.put_atomic(pa, blob_a[:-1] + bytes([blob_a[-1] ^ 1]))  # its digest changes: the next one no longer chains to it
    dest = str(lab["tmp"] / "broken")
    try:
        with pytest.raises(IntegrityError, match="segment %s does not chain" % b["name"]):
            store_copy.copy_snapshots(st, store.FileStorage(dest), lab["job"])
    finally:
        st.put_atomic(pa, blob_a)
    assert not os.path.exists(os.path.join(dest, lab["job"], "catalog"))  # nothing visible at the destination
