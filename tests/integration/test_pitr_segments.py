"""Change segments written by the capture and the Backup Daemon, against the session's real SecantusDB, PyKMIP and
SeaweedFS servers: under load (every BSON type, DDL), each noted point replays byte for byte; tampered, removed,
reordered segments are named; a kill -9 with a segment open leaves no gap; a resync starts a new timeline; no plaintext
canary in the store, the head folder, the logs or the daemon's output."""
import os
import threading
import time
import uuid

import bson
import pymongo
import pytest
from bson.raw_bson import RawBSONDocument

import workload
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    ansible_module, point_in_time, restore, restore_request,
    files, head, job_config, job_requests, master_keys, objectstore, rawbson, segments, snapshot, source, store, timeutil)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError
from ansible_collections.kmipbackup.mongodb.plugins.modules import snapshot_info
from daemon_helper import DaemonProcess, write_kmip_setup
from snapshot_helpers import drop_standin_phantoms, plaintext_views, restored_dir
from test_source_sync import source_image


def _name(spec):
    return RawBSONDocument(spec)["name"]


def head_image(h, dbname):
    out = {}
    with h.read() as r:
        for n in r.namespaces():
            if n["ns"].startswith(dbname + "."):
                out[n["ns"]] = ([(bytes(k), bytes(v)) for k, v in r.scan(n["ns"])], {_name(s): bytes(s) for s in n["indexes"]},
                                bytes(n["options"]))
    return out


def rebuild(tmp_path, js, keys, plan, name):
    """What a restore to plan["point"] rebuilds: the snapshot loaded into a fresh encrypted head, the segments replayed."""
    entry = plan["snapshot"]
    h = head.Head(str(tmp_path / name / "head.db"), os.urandom(32))
    manifest = js.read_manifest(entry["snapshot_id"], keys, entry["manifest_sha256"])
    with h.write() as w:
        for n in manifest["namespaces"]:
            w.create_namespace(n["ns"], bytes(n["options"]), uuid=bytes(n["uuid"]) if n.get("uuid") is not None else None,
                               indexes=[bytes(s) for s in n["indexes"]])
            for c in n["chunks"]:
                docs = rawbson.split_bson_docs(js.read_chunk(c, keys))
                w.upsert_many(n["ns"], [(rawbson.id_key_from_document(d), d) for d in docs])
        w.set_position(None, list(entry["cluster_time"]), True)
    result = segments.replay(h, js, keys, plan)
    return h, result


@pytest.fixture(scope="module")
def kmip_setup(tmp_path_factory, pki, kmip_server):
    config_dir = str(tmp_path_factory.mktemp("pitr-etc"))
    os.chmod(config_dir, 0o700)
    write_kmip_setup(config_dir, pki, kmip_server["port"])
    client = master_keys.kmip_client(config_dir, "group1")
    uid = client.create_master_key("pitr-%s" % uuid.uuid4().hex[:8])
    yield config_dir, client, uid
    client.close()


def _storage(kind, tmp_path, s3_server):
    if kind == "folder":
        return store.FileStorage(str(tmp_path / "store"))
    import boto3
    from botocore.config import Config
    bucket = "kb-pitr-%s" % uuid.uuid4().hex[:8]
    boto3.client("s3", endpoint_url=s3_server["endpoint"], aws_access_key_id=s3_server["access_key"],
                 aws_secret_access_key=s3_server["secret_key"], region_name="us-east-1",
                 config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket=bucket)
    return objectstore.S3Storage(bucket, "pitr", endpoint_url=s3_server["endpoint"], access_key=s3_server["access_key"],
                                 secret_key=s3_server["secret_key"])


def _capture_until_idle(cap, h, timeout=60):
    deadline = time.monotonic() + timeout
    idle = 0
    while idle < 2:
        assert time.monotonic() < deadline, "capture did not catch up"
        n = cap.run_once(max_time=0.5)
        idle = idle + 1 if n == 0 and h.position()["consistent"] else 0


@pytest.mark.parametrize("kind", ["folder", "bucket"])
def test_capture_under_load_replays_each_point_byte_for_byte(kind, tmp_path, mongo_server, kmip_setup, request, monkeypatch):
    s3_server = request.getfixturevalue("s3_server") if kind == "bucket" else None
    monkeypatch.setattr(source, "LOG_CHUNK_BYTES", 4000)  # several zstd frames per transaction, compressed on the side thread
    _config_dir, client, uid = kmip_setup
    dbname = "pitr_%s" % uuid.uuid4().hex[:8]
    plain = pymongo.MongoClient(mongo_server["uri"])
    src = source.connect({"uri": mongo_server["uri"], "connect_timeout": 10})
    workload.seed(plain[dbname], n=60)
    h = head.Head(str(tmp_path / "head" / "head.db"), os.urandom(32))
    h.record_segments = True
    js = store.JobStore(_storage(kind, tmp_path, s3_server), "pitr-%s" % kind)
    keys = store.Keys(js, client)
    try:
        source.initial_sync(h, src)
        cap = source.Capture(h, src)
        _capture_until_idle(cap, h)
        snaps = [snapshot.take_snapshot(h, js, keys, js.job, uid, True)]
        load = workload.Workload(plain[dbname], seed=7)
        points, ends = [], []
        for round_ in range(3):
            stop = threading.Event()
            thread = load.run_in_thread(stop)
            t_end = time.monotonic() + 2.0
            while time.monotonic() < t_end:
                cap.run_once(max_time=0.3)
                if segments.due(h, 0.5):
                    if segments.close(h) is not None:  # what the head holds at the segment's end
                        ends.append((tuple(h.closed_segments()[-1]["to"]), head_image(h, dbname)))
                    segments.seal_closed(h, js, keys, uid)
            stop.set()
            thread.join()
            if round_ == 0:
                # a head that drifted from its source (in the snapshot cut next) that verification heals, and updates
                # whose events the capture cannot replay byte-exactly (re-copied from the source): segments carry both.
                # The capture first takes in the load's last events, or one of them could heal the drift before
                # verification sees it.
                _capture_until_idle(cap, h)
                alpha = plain[dbname]["alpha"]
                ids = [d["_id"] for d in alpha.find({}, {"_id": 1}).limit(6)]
                drifted = bson.encode({"_id": ids[5], "drift": True})
                with h.write() as w:
                    w.upsert(dbname + ".alpha", rawbson.id_key_from_document(drifted), drifted)
                segments.close(h)
                snaps.append(snapshot.take_snapshot(h, js, keys, js.job, uid, True))
                for _id in ids[:5]:
                    alpha.update_one({"_id": _id}, {"$set": {"o.zz": 1, "o.aa": 2, "top": 1}})
                _capture_until_idle(cap, h)
                assert cap.stats["recopied"] >= 5
                assert source.verify(h, src, full=True)["recopied"] >= 1
            # a phantom the stand-in minted during the load is dropped before the head catches up: verification
            # (round 0) may have healed it into the head, and the drop's event takes it out again
            drop_standin_phantoms(src, dbname)
            _capture_until_idle(cap, h)
            fingerprint = source_image(src, dbname)
            assert head_image(h, dbname) == fingerprint
            point = source.current_cluster_time(src, {"uri": mongo_server["uri"]})
            points.append((point, fingerprint))
            if round_ == 1:  # a snapshot inside the window: later points replay from it
                segments.close(h)
                snaps.append(snapshot.take_snapshot(h, js, keys, js.job, uid, True))
        load.run(20)  # more after the last point, so the coverage passes it
        # then a snapshot and a load without DDL: every segment after it ends with post-images
        _capture_until_idle(cap, h)
        segments.close(h)
        snaps.append(snapshot.take_snapshot(h, js, keys, js.job, uid, True))
        crud_from = len(ends)
        stop = threading.Event()
        crud = workload.Workload(plain[dbname], seed=11, ddl=False)
        crud.next_i = load.next_i + 10 ** 5  # new documents' unique "i" past the first load's
        thread = crud.run_in_thread(stop)
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end or len(ends) < crud_from + 2:
            cap.run_once(max_time=0.3)
            if segments.due(h, 0.5):
                if segments.close(h) is not None:
                    ends.append((tuple(h.closed_segments()[-1]["to"]), head_image(h, dbname)))
                segments.seal_closed(h, js, keys, uid)
        stop.set()
        thread.join()
        assert crud.ops > 10, crud.ops
        _capture_until_idle(cap, h)
        segments.close(h)
        sealed = segments.seal_closed(h, js, keys, uid)
        cap.close()
        assert load.ops > 30 and sealed
        ranges = segments.restorable_ranges(js, keys)
        assert ranges["gaps"] == [] and len(ranges["ranges"]) == 1, ranges
        assert ranges["ranges"][0]["base_snapshots"] == [e["snapshot_id"] for e in snaps]
        for n, (point, fingerprint) in enumerate(points):
            plan = segments.plan_point(js, keys, {"t": point[0], "i": point[1]})
            assert plan["snapshot"]["snapshot_id"] == snaps[1 if n == 0 else 2]["snapshot_id"]
            rebuilt, result = rebuild(tmp_path, js, keys, plan, "r%d" % n)
            try:
                assert head_image(rebuilt, dbname) == fingerprint, "point %d" % n
            finally:
                rebuilt.close()
            assert result["segments"] == len(plan["segments"])
        # a restore to a segment's end (the fast path applies its post-images, or replays its events when DDL kept the
        # head from writing them) gives what the head held then, document for document
        for n, (end, held) in enumerate(ends):
            out = str(tmp_path / ("end%d" % n))
            plan = segments.plan_point(js, keys, {"t": end[0], "i": end[1]})
            with point_in_time.rebuild(js, keys, plan, work_dir=str(tmp_path)) as image:
                restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest, include=[dbname + ".*"]),
                                restore.DirectoryTarget(out))
                if n >= crud_from:  # after the last DDL: the fast path, each segment of the window by its post-images (the
                    # plan's first may end past the base's cut, an idle stream's end; a segment with no change has none)
                    parts = list(segments.window_parts(plan, segments.read_segments(js, keys, plan["segments"])))
                    posted = sum(1 for _s, recs in parts if recs and segments.is_post(bytes(recs[-1][2])))
                    assert (image.path, image.replayed["post_images"]) == ("overlap", posted), (image.why, end)
                    assert posted >= sum(1 for _s, recs in parts if recs) - 1 and posted, (end, posted, len(parts))
            assert restored_dir(out) == {ns: [doc for _k, doc in docs] for ns, (docs, _i, _o) in held.items()}, end
        assert crud_from >= 3 and len(ends) >= crud_from + 2, (crud_from, len(ends))
    finally:
        h.close()
        src.close()
        plain.drop_database(dbname)
        plain.close()


# ---- the daemon --------------------------------------------------------------------------------------------

def _grep(paths, needles):
    hits = []
    for p in paths:
        try:
            views = plaintext_views(files.read_bytes(p))
        except OSError:
            continue
        hits += ["%s in %s" % (n, p) for n in needles if n in p or any(n.encode() in v for v in views)]
    return hits


def _tree(folder):
    return [os.path.join(root, n) for root, _d, names in os.walk(folder) for n in names]


def _wait_ranges(js, keys, pred, d, timeout=60):
    def check():
        try:
            r = segments.restorable_ranges(js, keys)
        except Exception:  # noqa: BLE001  (a catalog being written: look again)
            return None
        return r if pred(r) else None
    got = timeutil.wait_for(check, timeout, 0.3)
    assert got, "ranges not as expected: %r; log:\n%s" % (segments.restorable_ranges(js, keys), d.log_tail())
    return got


def _snapshot(data_dir, job):
    rid = job_requests.submit_request(data_dir, job, "snapshot", timeout=60)
    return job_requests.wait_answer(data_dir, job, rid, timeout=60)


def test_daemon_segments_kill_resync_tamper_and_canary(tmp_path, pki, kmip_server, mongo_server, kmip_setup):
    config_dir, data_dir = str(tmp_path / "etc"), str(tmp_path / "data")
    files.ensure_private_dir(config_dir)
    files.ensure_private_dir(data_dir)
    write_kmip_setup(config_dir, pki, kmip_server["port"])
    tag = uuid.uuid4().hex[:8]
    dbname, collname, value = "kbpitrdb%s" % tag, "kbpitrcoll%s" % tag, "kbpitrvalue%s" % tag
    needles = [dbname, collname, value, "kbpitrid%s" % tag]
    plain = pymongo.MongoClient(mongo_server["uri"])
    coll = plain[dbname][collname]
    coll.insert_many([{"_id": "kbpitrid%s-%d" % (tag, i), "v": value} for i in range(50)])
    job = "pitr-%s" % tag
    params = {"job": job, "group": "group1", "source": {"uri": mongo_server["uri"], "connect_timeout": 3},
              "encryption": "enabled", "config_dir": config_dir, "data_dir": data_dir, "master_key": {"create": True},
              "point_in_time_segment_seconds": 1}
    cfg, _info = job_config.plan_job(params, None, source.check_source)
    assert cfg["point_in_time_segment_seconds"] == 1 and "point_in_time_window_hours" not in cfg
    job_config.write_job(config_dir, cfg)
    kmip = master_keys.kmip_client(config_dir, "group1")
    src = source.connect({"uri": mongo_server["uri"], "connect_timeout": 10})
    n = [50]

    def write(count):
        for _ in range(count):
            coll.insert_one({"_id": "kbpitrid%s-%d" % (tag, n[0]), "v": value, "i": n[0]})
            coll.update_one({"_id": "kbpitrid%s-%d" % (tag, n[0] - 7)}, {"$set": {"u": value + "u", "n": n[0]}})
            n[0] += 1

    d = DaemonProcess(config_dir, data_dir).start()
    outputs = d.out_files
    try:
        d.wait_status(job, lambda st: st["state"] == "STARTED" and st.get("last_snapshot"), timeout=90)
        js = store.JobStore(store.FileStorage(cfg["store"]), job)
        keys = store.Keys(js, kmip)
        write(20)
        first = _wait_ranges(js, keys, lambda r: r["ranges"] and r["ranges"][0]["to"]["t"] > 0 and
                             len(segments.list_segments(js)) >= 1, d)
        # kill -9 with a segment open (records only in the head), more writes while it is down
        write(10)
        time.sleep(0.3)
        d.kill()
        write(10)
        d = DaemonProcess(config_dir, data_dir).start()
        outputs += d.out_files
        d.wait_status(job, lambda st: st["state"] == "STARTED" and st["consistent"], timeout=60)
        write(10)
        time.sleep(1.5)
        _snapshot(data_dir, job)  # closes the open segment at the snapshot's cluster time
        point = source.current_cluster_time(src, {"uri": mongo_server["uri"]})
        drop_standin_phantoms(src, dbname)
        fingerprint = source_image(src, dbname)
        write(3)
        ranges = _wait_ranges(js, keys, lambda r: r["ranges"] and (r["ranges"][-1]["to"]["t"], r["ranges"][-1]["to"]["i"])
                              >= point, d)
        assert len(ranges["ranges"]) == 1 and ranges["gaps"] == [], ranges  # the kill left no gap
        assert ranges["ranges"][0]["timeline"] == first["ranges"][0]["timeline"]
        # the newest snapshot's plan, and one from the first snapshot across the kill: byte for byte
        plan = segments.plan_point(js, keys, {"t": point[0], "i": point[1]})
        rebuilt, _r = rebuild(tmp_path, js, keys, plan, "rebuilt")
        try:
            assert head_image(rebuilt, dbname) == fingerprint
        finally:
            rebuilt.close()
        entries, _h = js.live_catalog(keys)
        plan0 = dict(plan, snapshot=entries[0], segments=[s for s in segments.list_segments(js)
                                                          if s["to"] > tuple(entries[0]["cluster_time"]) and s["from"] < point])
        rebuilt, r0 = rebuild(tmp_path, js, keys, plan0, "rebuilt0")
        try:
            assert head_image(rebuilt, dbname) == fingerprint and r0["events"] >= 60
        finally:
            rebuilt.close()

        # tampered, removed and reordered segments: named, nothing of them applied
        segs = plan0["segments"]
        assert len(segs) >= 3
        paths = [os.path.join(cfg["store"], job, "segments", s["name"]) for s in segs]
        blobs = [open(p, "rb").read() for p in paths]
        bad = bytearray(blobs[1])
        bad[len(bad) // 2] ^= 0x40
        open(paths[1], "wb").write(bytes(bad))
        with pytest.raises(IntegrityError, match="segment %s failed authentication" % segs[1]["name"]):
            rebuild(tmp_path, js, keys, plan0, "bad1")
        open(paths[1], "wb").write(blobs[2])
        open(paths[2], "wb").write(blobs[1])
        with pytest.raises(IntegrityError, match="segment %s" % segs[1]["name"]):
            rebuild(tmp_path, js, keys, plan0, "bad2")
        open(paths[2], "wb").write(blobs[2])
        os.unlink(paths[1])
        with pytest.raises(IntegrityError, match="segment %s is missing" % segs[1]["name"]):
            rebuild(tmp_path, js, keys, plan0, "bad3")
        gap = segments.restorable_ranges(js, keys)["gaps"]
        assert any("%s/%010d is missing" % (segs[1]["timeline"], segs[1]["seq"]) in g["reason"] for g in gap), gap
        open(paths[1], "wb").write(blobs[1])
        os.chmod(paths[1], 0o600)

        # a resync: the timeline ends, a new one starts with the next snapshot
        rid = job_requests.submit_request(data_dir, job, "resync")
        job_requests.wait_answer(data_dir, job, rid, timeout=30)
        time.sleep(0.5)
        d.wait_status(job, lambda st: st["state"] == "STARTED" and st["consistent"] and st["initial_syncs"] >= 2, timeout=60)
        write(5)
        time.sleep(1.5)
        _snapshot(data_dir, job)
        write(5)
        ranges = _wait_ranges(js, keys, lambda r: len(r["ranges"]) == 2, d)
        assert ranges["ranges"][0]["timeline"] != ranges["ranges"][1]["timeline"]
        assert "new timeline" in ranges["gaps"][0]["reason"]
        # snapshot_info shows them
        spec = ansible_module.full_spec(snapshot_info.argument_spec, snapshot_info.SHARED)
        info = restore_request.list_snapshots(dict({k: o.get("default") for k, o in spec.items()}, job=job,
                                                   config_dir=config_dir, data_dir=data_dir))
        def starts(rs):  # a range's end moves on as segments are sealed
            return [(r["timeline"], r["from"], r["from_time"], r["base_snapshots"]) for r in rs]
        assert starts(info["point_in_time"]["ranges"]) == starts(ranges["ranges"])
        assert info["point_in_time"]["gaps"] == ranges["gaps"]
    finally:
        d.stop()
        kmip.close()
        src.close()
        plain.drop_database(dbname)
        plain.close()
    # no plaintext anywhere the daemon writes: store (segments included), heads, status, requests, log, output, TMPDIR
    written = _tree(data_dir) + outputs + _tree(d.tmp_dir)
    assert any("/segments/" in p for p in written)
    assert _grep(written, needles) == []
