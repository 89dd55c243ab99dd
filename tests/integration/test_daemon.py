"""The Backup Daemon against real SecantusDB and PyKMIP servers: provisioning, capture,
restart without resync, requests, snapshots, KMIP and source outages, encryption toggled,
stop and removal, and no plaintext canary anywhere under the daemon's folders, its output or its TMPDIR."""
import json
import os
import stat
import subprocess
import uuid

import pymongo
import pytest
import zstandard
from bson import ObjectId

import kmipbackup_lab as lab

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    config, datadir, files, head, job_config, job_requests, job_status, master_keys, source, timeutil)
from daemon_helper import DaemonProcess, write_kmip_setup
from snapshot_helpers import plaintext_views


def _declare(config_dir, data_dir, job, source_uri, encryption=True, store=None, existing=None, **extra):
    params = {"job": job, "group": "group1", "source": {"uri": source_uri, "connect_timeout": 3},
              "encryption": "enabled" if encryption else "disabled", "config_dir": config_dir, "data_dir": data_dir,
              "store": store, "master_key": {"create": True}, "state": extra.pop("state", "present")}
    params.update(extra)
    cfg, info = job_config.plan_job(params, existing, source.check_source)
    job_config.write_job(config_dir, cfg)
    return cfg, info


def _head_docs(config_dir, data_dir, cfg, ns):
    """{_id-key: raw} of ns in the job's current head, opened read-only with the unwrapped key."""
    folder = datadir.head_dir(data_dir, cfg["job"], cfg["generation"])
    key = None
    if cfg["encryption"]:
        record = files.read_json(os.path.join(folder, "headkey.json"))
        with master_keys.kmip_client(config_dir, cfg["group"]) as client:
            key = client.unwrap(record["wrapped"])
    h = head.Head(os.path.join(folder, "head.db"), key)
    try:
        with h.read() as r:
            return {k: bytes(v) for k, v in r.scan(ns)}
    finally:
        h.close()


def _wait_doc(d, config_dir, data_dir, cfg, ns, raw, timeout=30):
    def present():
        return raw in _head_docs(config_dir, data_dir, cfg, ns).values()
    assert timeutil.wait_for(present, timeout, 0.3), "document not applied to the head; log:\n" + d.log_tail()


def _started(generation=1):
    return lambda st: st["state"] == "STARTED" and st["consistent"] and st["generation"] == generation


def _grep_file(path, needles):
    """needles in the file's name, raw bytes or any zstd frame decompressed (store chunks and manifests are compressed)."""
    try:
        views = plaintext_views(files.read_bytes(path))
    except OSError:  # removed meanwhile
        return []
    return ["%s in %s" % (n, path) for n in needles if n in os.path.basename(path) or any(n.encode() in v for v in views)]


def _grep_tree(folder, needles):
    hits = []
    for root, dnames, names in os.walk(folder):
        hits += ["%s in folder name %s" % (n, os.path.join(root, d)) for d in dnames for n in needles if n in d]
        hits += [hit for name in names for hit in _grep_file(os.path.join(root, name), needles)]
    return hits


def _grep_files(paths, needles):
    return [hit for p in paths for hit in _grep_file(p, needles)]


@pytest.fixture
def dirs(tmp_path):
    c, d = str(tmp_path / "etc"), str(tmp_path / "data")
    files.ensure_private_dir(c)
    files.ensure_private_dir(d)
    return c, d


def test_encrypted_job_lifecycle(dirs, tmp_path, pki, kmip_server, mongo_server):
    config_dir, data_dir = dirs
    write_kmip_setup(config_dir, pki, kmip_server["port"])
    tag = uuid.uuid4().hex[:10]
    canary_db, canary_coll, canary_value = "kbcanarydb%s" % tag, "kbcanarycoll%s" % tag, "kbcanaryvalue%s" % tag
    mc = pymongo.MongoClient(mongo_server["uri"])
    coll = mc[canary_db][canary_coll]
    coll.insert_many([{"_id": "kbcanaryid%s-%d" % (tag, i), "v": canary_value, "i": i} for i in range(200)])
    job = "enc-%s" % tag
    cfg, info = _declare(config_dir, data_dir, job, mongo_server["uri"])
    assert info["key_created"] and cfg["master_key_uid"]
    ns = "%s.%s" % (canary_db, canary_coll)

    d = DaemonProcess(config_dir, data_dir).start()
    try:
        st = d.wait_status(job, _started(), timeout=90)
        assert st["initial_syncs"] == 1 and st["encryption"] is True and st["master_key_uid"] == cfg["master_key_uid"]
        assert st["head_bytes"] > 0 and st["last_error"] is None
        assert len(_head_docs(config_dir, data_dir, cfg, ns)) == 200
        # capture: a new document reaches the head
        coll.insert_one({"_id": ObjectId(), "v": canary_value, "after": "start"})
        _wait_doc(d, config_dir, data_dir, cfg, ns, bytes(mc.get_database(canary_db, codec_options=_raw_opts())[canary_coll]
                                                            .find_one({"after": "start"}).raw))
        # a scheduled snapshot is due at once (none yet), then an on-demand one through a request
        d.wait_status(job, lambda s: s.get("last_snapshot"), timeout=60)
        rid = job_requests.submit_request(data_dir, job, "snapshot")
        snap = job_requests.wait_answer(data_dir, job, rid, timeout=60)
        assert snap["type"] == "on-demand" and snap["master_key_uids"] == [cfg["master_key_uid"]]
        rid = job_requests.submit_request(data_dir, job, "verify")
        counts = job_requests.wait_answer(data_dir, job, rid, timeout=60)
        assert counts["checked"] >= 200 and counts["mismatched"] == 0
    finally:
        d.stop()

    # restart: resumes from the stored token, no new initial sync
    coll.insert_one({"_id": ObjectId(), "v": canary_value, "after": "restart"})
    d = DaemonProcess(config_dir, data_dir).start()
    try:
        st = d.wait_status(job, _started(), timeout=60)
        _wait_doc(d, config_dir, data_dir, cfg, ns, bytes(mc.get_database(canary_db, codec_options=_raw_opts())[canary_coll]
                                                            .find_one({"after": "restart"}).raw))
        st = d.status(job)
        assert st["initial_syncs"] == 1, st

        # state: stopped -> STOPPED; then present again
        cfg_stopped = dict(cfg, state="stopped")
        job_config.write_job(config_dir, cfg_stopped)
        d.wait_status(job, lambda s: s["state"] == "STOPPED", timeout=20)
        job_config.write_job(config_dir, cfg)
        d.wait_status(job, _started(), timeout=30)
        assert d.status(job)["initial_syncs"] == 1
    finally:
        d.stop()

    needles = [canary_db, canary_coll, canary_value, "kbcanaryid" + tag]
    hits = (_grep_tree(data_dir, needles) + _grep_tree(config_dir, needles) + _grep_tree(d.tmp_dir, needles)
            + _grep_files(d.out_files, needles))
    assert hits == [], hits
    for root, dnames, fnames in os.walk(data_dir):
        for n in dnames:
            assert stat.S_IMODE(os.stat(os.path.join(root, n)).st_mode) == 0o700, os.path.join(root, n)
        for n in fnames:
            assert stat.S_IMODE(os.stat(os.path.join(root, n)).st_mode) == 0o600, os.path.join(root, n)
    assert job in open(d.log_file).read()


def _raw_opts():
    from bson.codec_options import CodecOptions
    from bson.raw_bson import RawBSONDocument
    return CodecOptions(document_class=RawBSONDocument)


def test_encryption_toggled_resyncs_and_removes_old_head(dirs, tmp_path, pki, kmip_server, mongo_server):
    config_dir, data_dir = dirs
    write_kmip_setup(config_dir, pki, kmip_server["port"])
    tag = uuid.uuid4().hex[:10]
    dbname, value = "kbtoggle%s" % tag, "kbtogglevalue%s" % tag
    mc = pymongo.MongoClient(mongo_server["uri"])
    mc[dbname]["c"].insert_many([{"_id": i, "v": value} for i in range(50)])
    job = "toggle-%s" % tag
    store = str(tmp_path / "plain-store")  # snapshots of the unencrypted generation are plaintext: keep them elsewhere
    cfg, info = _declare(config_dir, data_dir, job, mongo_server["uri"], encryption=False, store=store)
    assert cfg["master_key_uid"] is None and cfg["generation"] == 1
    d = DaemonProcess(config_dir, data_dir).start()
    try:
        d.wait_status(job, _started(1), timeout=60)
        assert os.path.exists(datadir.head_dir(data_dir, job, 1))
        assert _grep_tree(datadir.heads_dir(data_dir, job), [value]), "an unencrypted head holds plaintext"
        cfg2, info2 = _declare(config_dir, data_dir, job, mongo_server["uri"], encryption=True, store=store, existing=cfg)
        assert info2["resync_required"] and cfg2["generation"] == 2 and cfg2["master_key_uid"]
        st = d.wait_status(job, _started(2), timeout=90)
        assert st["initial_syncs"] == 1 and st["encryption"] is True
        assert timeutil.wait_for(lambda: not os.path.exists(datadir.head_dir(data_dir, job, 1)), 10), "old head kept"
        assert len(_head_docs(config_dir, data_dir, cfg2, "%s.c" % dbname)) == 50
        assert _grep_tree(data_dir, [value, dbname]) == []

        # job removed: TERMINATING, then the head folder and status are gone; the store is kept
        job_config.remove_job(config_dir, job)
        job_status.wait_removed(data_dir, job, 30)
        assert os.path.isdir(os.path.join(store, job))
    finally:
        d.stop()


def test_kmip_down_at_start_then_up(dirs, pki, kmip_server, mongo_server, dead_port):
    config_dir, data_dir = dirs
    write_kmip_setup(config_dir, pki, kmip_server["port"])
    job = "kmipdown-%s" % uuid.uuid4().hex[:8]
    cfg, _ = _declare(config_dir, data_dir, job, mongo_server["uri"])
    write_kmip_setup(config_dir, pki, dead_port)  # KMIP unreachable when the daemon starts
    d = DaemonProcess(config_dir, data_dir).start()
    try:
        st = d.wait_status(job, lambda s: "waiting for KMIP" in (s.get("last_error") or ""), timeout=30)
        assert st["state"] == "INACTIVE" and "reachable" in st["last_error"], st
        folder = datadir.head_dir(data_dir, job, 1)
        assert not os.path.exists(os.path.join(folder, "head.db")) and not os.path.exists(os.path.join(folder, "headkey.json"))
        write_kmip_setup(config_dir, pki, kmip_server["port"])
        st = d.wait_status(job, _started(), timeout=90)
        assert st["last_error"] is None
    finally:
        d.stop()


def test_source_down_is_reported_and_retried(dirs, pki, kmip_server, dead_port):
    config_dir, data_dir = dirs
    write_kmip_setup(config_dir, pki, kmip_server["port"])
    job = "srcdown-%s" % uuid.uuid4().hex[:8]
    cfg = {"job": job, "group": "group1", "encryption": False, "master_key_uid": None, "previous_master_key_uids": [],
           "source": dict(job_config.SOURCE_DEFAULTS, uri="mongodb://127.0.0.1:%d/?replicaSet=rs0" % dead_port, connect_timeout=1),
           "store": os.path.join(data_dir, "store"), "state": "present", "generation": 1, "schedule": dict(job_config.SCHEDULE_DEFAULTS)}
    job_config.write_job(config_dir, cfg)
    d = DaemonProcess(config_dir, data_dir).start()
    try:
        st = d.wait_status(job, lambda s: "source unavailable" in (s.get("last_error") or ""), timeout=30)
        assert st["state"] == "INACTIVE" and str(dead_port) in st["last_error"]
        assert d.alive()
    finally:
        d.stop()


def test_bad_requests_are_answered_with_errors(dirs, pki, kmip_server, mongo_server):
    config_dir, data_dir = dirs
    write_kmip_setup(config_dir, pki, kmip_server["port"])
    assert config.load_kmip_config(config_dir).port
    with pytest.raises(Exception) as e:
        job_requests.submit_request(data_dir, "x", "explode")
    assert "Unknown request" in str(e.value)


def _start_source(folder, port=None, auth=False):
    """A private SecantusDB (this test stops and restarts it): {pid, port, uri}."""
    if not auth:
        return lab.start_mongo_server(folder, port=port)
    log = os.path.join(folder, "server.log")
    with open(os.devnull, "rb") as null, open(log, "ab") as out:
        proc = subprocess.Popen([lab._bin("secantusd-py"), "--config", os.path.join(folder, "secantusd.toml"), "--host", "127.0.0.1",
                                 "--port", str(port), "--storage-path", os.path.join(folder, "data"), "--log-level", "WARNING",
                                 "--noop-heartbeat-seconds", "1", "--auth"],
                                cwd=folder, stdin=null, stdout=out, stderr=out, start_new_session=True)
    lab._wait_port(port, proc, 30, log)
    return {"pid": proc.pid, "port": port, "uri": "mongodb://127.0.0.1:%d/?replicaSet=secantus" % port}


def test_error_paths_name_no_namespace_or_id(dirs, tmp_path, pki, kmip_server, ansible):
    """Canary names in a database, a collection, _ids and values of an encrypted job, driven through error paths: a
    source user not allowed to read the canary database (the server's error text names it), then the source killed
    during capture and a verify request while it is down. Neither the status file, the requests' answers, the log,
    the daemon's stdout/stderr, config_dir nor backup_job_info's output (at -vvv) names any of them."""
    config_dir, data_dir = dirs
    write_kmip_setup(config_dir, pki, kmip_server["port"])
    tag = uuid.uuid4().hex[:10]
    cdb, ccoll, cval, cid = ("kbcanary%s%s" % (part, tag) for part in ("db", "coll", "value", "id"))
    needles = [cdb, ccoll, cval, cid]
    folder = str(tmp_path / "source")
    src = _start_source(folder)
    try:
        mc = pymongo.MongoClient(src["uri"], serverSelectionTimeoutMS=10000)
        mc.admin.command("createUser", "kbroot", pwd="root-pw-%s" % tag, roles=["root"])
        mc.admin.command("createUser", "kblimited", pwd="limited-pw", roles=[
            {"role": "read", "db": "admin"}, {"role": "read", "db": "local"}, {"role": "read", "db": "kbother"},
            {"role": "clusterMonitor", "db": "admin"}])
        mc[cdb][ccoll].insert_many([{"_id": "%s-%d" % (cid, i), "v": cval, "i": i} for i in range(100)])
        mc["kbother"]["x"].insert_one({"_id": 1})
        mc.close()
        lab.stop(src["pid"])
        src = _start_source(folder, port=src["port"], auth=True)
        # control: this user's clone fails with a server error text that names the canary database
        with pymongo.MongoClient(src["uri"], username="kblimited", password="limited-pw", serverSelectionTimeoutMS=10000) as limited:
            with pytest.raises(pymongo.errors.OperationFailure) as e:
                limited[cdb].list_collection_names()
            assert cdb in str(e.value)

        job = "errpath-%s" % tag
        cfg, _ = _declare(config_dir, data_dir, job, src["uri"], source={"uri": src["uri"], "connect_timeout": 3, "username": "kblimited",
                                                                          "password": "limited-pw"})
        d = DaemonProcess(config_dir, data_dir).start()
        statuses, errors = [], []
        try:
            statuses.append(d.wait_status(job, lambda st: st.get("last_error"), timeout=60))
            # the server's refusal (its text names the database), not a connection problem
            assert statuses[-1]["state"] in ("INACTIVE", "PROVISIONING"), statuses[-1]
            assert any(w in statuses[-1]["last_error"] for w in ("OperationFailure", "Unauthorized")), statuses[-1]
            job_config.write_job(config_dir, dict(cfg, source=dict(cfg["source"], username="kbroot", password="root-pw-%s" % tag)))
            statuses.append(d.wait_status(job, _started(), timeout=90))
            lab.stop(src["pid"])  # the source goes away during capture
            statuses.append(d.wait_status(job, lambda st: st.get("last_error"), timeout=60))
            rid = job_requests.submit_request(data_dir, job, "verify")
            try:
                errors.append(repr(job_requests.wait_answer(data_dir, job, rid, timeout=3)))
            except Exception as exc:  # an error answer is the expected outcome; its text is scanned below
                errors.append(str(exc))
            r = ansible.run([{"kmipbackup.mongodb.backup_job_info": dict(job=[job], config_dir=config_dir, data_dir=data_dir)}], verbosity=3)
            assert '"last_error"' in r.output and not r[0].get("failed"), r.output[-3000:]
            statuses.append(d.status(job))
        finally:
            d.stop()
    finally:
        lab.stop(src["pid"], timeout=5)

    assert all(st["last_error"] for st in statuses[:1] + statuses[2:3]), statuses
    text = json.dumps(statuses) + "\n".join(errors) + r.everything(invocation=True)
    assert [n for n in needles if n in text] == [], text[-3000:]
    hits = (_grep_tree(data_dir, needles) + _grep_tree(config_dir, needles) + _grep_tree(d.tmp_dir, needles)
            + _grep_files(d.out_files, needles))
    assert hits == [], hits
    assert os.path.getsize(d.log_file) > 0 and all(os.path.exists(p) for p in d.out_files)
    # control: the same scan finds a canary planted in the log folder, plain and inside a zstd frame
    planted = os.path.join(os.path.dirname(d.log_file), "planted.zst")
    files.atomic_write(planted, b"header" + zstandard.ZstdCompressor().compress(("x" * 500 + cdb).encode()))
    assert _grep_tree(data_dir, needles) == ["%s in %s" % (cdb, planted)]
