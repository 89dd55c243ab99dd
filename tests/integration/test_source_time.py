"""On-demand snapshots hold every write the source acknowledged before they were asked for; a source outage shows in
the daemon's status within 2 s with a growing lag (issue 8, items 3 and 5). Real PyKMIP and SecantusDB servers, real
daemon processes, snapshots read back through a restore."""
import contextlib
import os
import signal
import threading
import time
import uuid

import pymongo
import pytest
from bson import decode_all
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

import kmipbackup_lab as lab

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    daemon, datadir, files, head, job_config, job_requests, master_keys, restore, source, store, timeutil)
from daemon_helper import DaemonProcess, write_kmip_setup

RAW = CodecOptions(document_class=RawBSONDocument)


def _declare(config_dir, data_dir, job, uri, connect_timeout=3):
    cfg, _info = job_config.plan_job({"job": job, "group": "group1", "source": {"uri": uri, "connect_timeout": connect_timeout},
                                      "encryption": "enabled", "config_dir": config_dir, "data_dir": data_dir, "store": None,
                                      "master_key": {"create": True}, "state": "present"}, None, source.check_source)
    job_config.write_job(config_dir, cfg)
    return cfg


def _started(st):
    return st["state"] == "STARTED" and st["consistent"]


@pytest.fixture
def dirs(tmp_path):
    c, d = str(tmp_path / "etc"), str(tmp_path / "data")
    files.ensure_private_dir(c)
    files.ensure_private_dir(d)
    return c, d


@pytest.fixture
def scratch_db(mongo_server):
    """A new database on the session's source, dropped afterwards: the loads write 100k+ documents, which every later
    job on that source would otherwise sync and verify."""
    mc = pymongo.MongoClient(mongo_server["uri"])
    db = mc["kbsrctime%s" % uuid.uuid4().hex[:10]]
    yield db
    mc.drop_database(db.name)
    mc.close()


class Load(threading.Thread):
    """Inserts batches of documents numbered 0, 1, 2 ... (their _id) as fast as the source takes them.
    acked: [(highest _id, time.time())] after each acknowledged batch."""

    def __init__(self, coll, batch=500):
        super().__init__(daemon=True)
        self.coll, self.batch = coll, batch
        self.n = 0
        self.acked = []
        self.halt = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.halt.is_set():
                self.coll.insert_many([{"_id": self.n + i, "pad": "p" * 200} for i in range(self.batch)])
                self.n += self.batch
                self.acked.append((self.n - 1, time.time()))
        except Exception as e:  # reported by stop()
            self.error = e

    def stop(self):
        self.halt.set()
        self.join(60)
        assert self.error is None, self.error


def _snapshot_docs(config_dir, cfg, snapshot_id, db, out):
    """{ns: {_id: raw}} of db's collections in the snapshot, through a real restore to a mongodump folder."""
    js = store.JobStore(cfg["store"], cfg["job"])
    with master_keys.kmip_client(config_dir, cfg["group"]) as client:
        keys = store.Keys(js, provider=client, encryption=True)
        entry, selected = restore.plan(js, snapshot_id, keys, include=[db + ".*"], expect_encryption=True)
        restore.execute(js, keys, entry, selected, restore.DirectoryTarget(out))
    got = {}
    for name in os.listdir(os.path.join(out, db)):
        if name.endswith(".bson"):
            with open(os.path.join(out, db, name), "rb") as f:
                got["%s.%s" % (db, name[:-5])] = {d["_id"]: bytes(d.raw) for d in decode_all(f.read(), RAW)}
    return got


def _open_head(config_dir, data_dir, cfg):
    folder = datadir.head_dir(data_dir, cfg["job"], cfg["generation"])
    with master_keys.kmip_client(config_dir, cfg["group"]) as client:
        key = client.unwrap(files.read_json(os.path.join(folder, "headkey.json"))["wrapped"])
    return head.Head(os.path.join(folder, "head.db"), key)


@contextlib.contextmanager
def head_stalled(config_dir, data_dir, cfg):
    """Hold the job's head write lock from this process: the daemon's capture waits for it, so under a write load the
    head falls seconds behind the source (a daemon that applies slower than the source writes, made certain)."""
    h = _open_head(config_dir, data_dir, cfg)
    try:
        with h.write():
            yield
    finally:
        h.close()


def _acked_write(db, coll, doc):
    """Insert doc (acknowledged); returns (raw as stored, the operation's cluster time as (t, i))."""
    with db.client.start_session() as s:
        db[coll].insert_one(doc, session=s)
        t = s.operation_time
    return bytes(db.get_collection(coll, codec_options=RAW).find_one({"_id": doc["_id"]}).raw), (t.time, t.inc)


def test_snapshot_holds_every_write_acknowledged_before_the_request(dirs, tmp_path, pki, kmip_server, mongo_server,
                                                                    scratch_db):
    """Under a write load, with the head seconds behind the source when the snapshot is requested: the snapshot holds
    the last write acknowledged before the request and every load document acknowledged before it, byte for byte."""
    config_dir, data_dir = dirs
    write_kmip_setup(config_dir, pki, kmip_server["port"])
    tag = uuid.uuid4().hex[:10]
    job, db = "cover-%s" % tag, scratch_db
    dbname = db.name
    db["marker"].insert_one({"_id": "seed"})
    cfg = _declare(config_dir, data_dir, job, mongo_server["uri"])
    d = DaemonProcess(config_dir, data_dir).start()
    load = Load(db["load"])
    try:
        d.wait_status(job, _started, timeout=90)
        load.start()
        time.sleep(1)
        with head_stalled(config_dir, data_dir, cfg):
            time.sleep(4)  # the load goes on: the head falls behind by thousands of events
            marker_raw, marker_time = _acked_write(db, "marker", {"_id": "last-%s" % tag, "v": tag})
            before = load.acked[-1][0]
            rid = job_requests.submit_request(data_dir, job, "snapshot", timeout=180)
        answer = job_requests.wait_answer(data_dir, job, rid, timeout=180)
        load.stop()
        assert load.n > before + 1000, "the load did not go on during the snapshot"
    finally:
        load.halt.set()
        d.stop()
    got = _snapshot_docs(config_dir, cfg, answer["id"], dbname, str(tmp_path / "restored"))
    loaded = got["%s.load" % dbname]
    missing = [i for i in range(before + 1) if i not in loaded]
    assert got["%s.marker" % dbname].get("last-%s" % tag) == marker_raw, (
        "the last acknowledged write is not in the snapshot (nor %d load documents acknowledged before it)" % len(missing))
    assert missing == [], "%d load documents acknowledged before the request are missing (first %s)" % (len(missing), missing[:5])
    assert loaded[0] == bytes(db.get_collection("load", codec_options=RAW).find_one({"_id": 0}).raw)
    # read after the marker was acknowledged (an operationTime can be later than the write's own event)
    assert tuple(answer["source_cluster_time"]) >= marker_time, answer


def test_backup_snapshot_waits_for_the_head_or_fails_naming_the_lag(dirs, pki, kmip_server, mongo_server, ansible,
                                                                    scratch_db):
    """backup_snapshot returns the source time its snapshot covers; when the head cannot reach it within the module's
    timeout, the module fails with the daemon's answer naming the lag, and no snapshot is written."""
    config_dir, data_dir = dirs
    write_kmip_setup(config_dir, pki, kmip_server["port"])
    tag = uuid.uuid4().hex[:10]
    job, db = "lagmod-%s" % tag, scratch_db
    db["marker"].insert_one({"_id": "seed"})
    cfg = _declare(config_dir, data_dir, job, mongo_server["uri"])
    task = {"kmipbackup.mongodb.backup_snapshot": dict(job=job, config_dir=config_dir, data_dir=data_dir)}
    js = store.JobStore(cfg["store"], job)
    d = DaemonProcess(config_dir, data_dir).start()
    load = Load(db["load"])
    try:
        d.wait_status(job, _started, timeout=90)
        d.wait_status(job, lambda st: st.get("last_snapshot"), timeout=60)  # the first scheduled snapshot, due at once
        load.start()
        runs = []
        catalog = [e["snapshot_id"] for e in js.catalog()]
        t = threading.Thread(target=lambda: runs.append(ansible.run([dict(task, **{
            "kmipbackup.mongodb.backup_snapshot": dict(task["kmipbackup.mongodb.backup_snapshot"], timeout=30)})])))
        with head_stalled(config_dir, data_dir, cfg):  # the load goes on while the head cannot apply: it falls behind
            t.start()
            assert timeutil.wait_for(lambda: job_requests.pending_requests(data_dir, job), 60, 0.05), "no request"
            rid, req = job_requests.pending_requests(data_dir, job)[0]
            deadline = time.monotonic() + daemon._wait_budget(rid, req)  # when the daemon stops waiting for its head
            time.sleep(12)
        # released: one capture round, then the daemon picks the request up and pokes its heartbeat, which reads the
        # source's cluster time (the log says when). Then the daemon is frozen until its deadline has passed, so the head
        # cannot reach that time in the budget however fast it applies (the head's lock would wait for the capture's
        # batches while it catches up)
        picked = "snapshot request %s waits for the head" % rid
        assert timeutil.wait_for(lambda: picked in d.log_tail(200), 30, 0.02), d.log_tail()
        time.sleep(0.5)
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            assert time.monotonic() < deadline - 2, "the request was picked up too late to test the lag"
            time.sleep(max(0.0, deadline + 0.5 - time.monotonic()))
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        t.join(120)
        r = runs[0]
        assert r[0].get("failed") and r[0]["request_id"], r.output[-3000:]
        msg = r[0]["msg"]
        assert "did not catch up with the source's cluster time" in msg and "s of cluster time behind the source" in msg, msg
        assert "nothing was written" in msg and "did not reach an answer" not in msg, msg
        print(msg)
        assert [e["snapshot_id"] for e in js.catalog()] == catalog, "a snapshot was written although the request failed"

        # with time to catch up the same request succeeds and covers a write acknowledged before it
        _raw, marker_time = _acked_write(db, "marker", {"_id": "last-%s" % tag})
        r = ansible.run([dict(task, **{"kmipbackup.mongodb.backup_snapshot": dict(
            task["kmipbackup.mongodb.backup_snapshot"], timeout=300)})])
        load.stop()
    finally:
        load.halt.set()
        d.stop()
    assert r[0]["changed"] and not r[0].get("failed"), r.output[-3000:]
    snap = r[0]["snapshot"]
    assert len(snap["source_cluster_time"]) == 2 and tuple(snap["source_cluster_time"]) >= marker_time, snap
    entry = js.catalog()[-1]
    assert entry["snapshot_id"] == snap["id"] and snap["cluster_time"] == entry["cluster_time"], (snap, entry)


def _status_mtime(data_dir, job):
    try:
        return os.stat(datadir.status_path(data_dir, job)).st_mtime_ns
    except FileNotFoundError:
        return None


def _outage_seen(d, job, down):
    """The status that first shows the outage begun at monotonic time down; AssertionError unless within 2 s."""
    st = d.wait_status(job, lambda s: not s["consistent"] and s.get("last_error"), timeout=15, interval=0.05)
    seen = time.monotonic() - down
    assert seen <= 2.0, "the outage showed in status after %.1f s: %r" % (seen, st)
    assert st["source"]["reachable"] is False and st["last_error"].startswith("source unreachable for"), st
    return st


def _recovered(d, job, cfg, ns, raw):
    """Capture runs again: STARTED, consistent, source reachable, no error, and raw (written after the outage) in the head."""
    def in_head():
        h = _open_head(d.config_dir, d.data_dir, cfg)
        try:
            with h.read() as r:
                return any(bytes(doc) == raw for _k, doc in r.scan(ns))
        finally:
            h.close()
    assert timeutil.wait_for(in_head, 60, 0.3), "a write made after the outage did not reach the head:\n" + d.log_tail()
    return d.wait_status(job, lambda s: _started(s) and s["source"]["reachable"] and s["last_error"] is None, timeout=30)


def test_source_outage_shows_in_status_within_two_seconds(dirs, tmp_path, pki, kmip_server):
    """The job's own source (connect_timeout 10 s, the default) is stopped for about 8 s, then started again on the same
    port and storage: within 2 s the status says the source is unreachable, not consistent, with an error naming it;
    while it lasts the status is rewritten at least every second and its lag grows; once it is back, capture resumes, a
    write made after the restart reaches the head and the error clears. Then the source hangs (SIGSTOP: nothing refuses,
    nothing answers): that shows within 2 s too, and clears when it answers again."""
    config_dir, data_dir = dirs
    write_kmip_setup(config_dir, pki, kmip_server["port"])
    tag = uuid.uuid4().hex[:10]
    job = "outage-%s" % tag
    folder = str(tmp_path / "source")
    src = lab.start_mongo_server(folder)
    try:
        mc = pymongo.MongoClient(src["uri"])
        mc["kboutage"]["c"].insert_many([{"_id": i} for i in range(100)])
        mc.close()
        cfg = _declare(config_dir, data_dir, job, src["uri"], connect_timeout=10)
        d = DaemonProcess(config_dir, data_dir).start()
        try:
            d.wait_status(job, _started, timeout=90)
            time.sleep(2)
            lab.stop(src["pid"])  # a clean stop: SecantusDB loses resume positions on SIGKILL
            down = time.monotonic()
            st = _outage_seen(d, job, down)
            assert "127.0.0.1:%d" % src["port"] in st["source"]["error"], st
            first_lag = st["lag_seconds"]
            # status is rewritten at least every second while the source is down, and the lag grows
            gaps, last, last_change = [], _status_mtime(data_dir, job), time.monotonic()
            while time.monotonic() < down + 8:
                m = _status_mtime(data_dir, job)
                if m != last:
                    gaps.append(time.monotonic() - last_change)
                    last, last_change = m, time.monotonic()
                time.sleep(0.02)
            gaps.append(time.monotonic() - last_change)
            assert max(gaps) <= 1.0, "status went %.2f s without an update during the outage" % max(gaps)
            st = d.status(job)
            assert st["source"]["reachable"] is False and not st["consistent"] and st["state"] == "STARTED", st
            assert first_lag is not None and st["lag_seconds"] >= first_lag + 4.5, (first_lag, st)
            assert st["source"]["unreachable_seconds"] >= 6, st

            src = lab.start_mongo_server(folder, port=src["port"])  # the same port and storage
            mc = pymongo.MongoClient(src["uri"])
            raw, _t = _acked_write(mc["kboutage"], "c", {"_id": "after-%s" % tag})
            st = _recovered(d, job, cfg, "kboutage.c", raw)
            assert st["lag_seconds"] is not None and st["lag_seconds"] < 5, st

            os.killpg(src["pid"], signal.SIGSTOP)
            down = time.monotonic()
            try:
                _outage_seen(d, job, down)
            finally:
                os.killpg(src["pid"], signal.SIGCONT)
            raw, _t = _acked_write(mc["kboutage"], "c", {"_id": "after-hang-%s" % tag})
            _recovered(d, job, cfg, "kboutage.c", raw)
            mc.close()
        finally:
            d.stop()
    finally:
        lab.stop(src["pid"], timeout=5)  # after a SIGSTOP, SecantusDB may ignore SIGTERM: SIGKILL then
