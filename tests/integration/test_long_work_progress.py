"""Progress on long work against real servers: an initial sync's counters against the source's estimates (core and
daemon status), a snapshot's, and restore.yml's progress lines and rate; no namespace name in any of it for an
encrypted job."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pymongo
import pytest
from bson import encode

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    config, datadir, head, job_config, job_status, kmip, progress, rawbson, restore_request, snapshot, source, store,
    timeutil)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError
from ansible_collections.kmipbackup.mongodb.plugins.modules import snapshot_restore
from daemon_helper import DaemonProcess, write_kmip_setup
from test_core_flows import request
from test_daemon import _declare, dirs  # noqa: F401  (the dirs fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAD = "p" * 16000  # 16 KB documents: SecantusDB inserts bytes faster in big documents, so the data is quick to make


class Sampled(progress.Meter):
    """A Meter that keeps the report seen after every add: what a reader saw while the work ran.

    hold_for_totals: the first add waits (up to 60 s) until the estimate has answered, so the rest of the work runs
    with totals whatever the estimate's speed (an initial sync asks for it beside the clone)."""

    def __init__(self, hold_for_totals=False):
        super().__init__()
        self.seen = []
        self.hold = hold_for_totals

    def add(self, docs, nbytes, chunks=0):
        if self.hold:
            self.hold = False
            assert timeutil.wait_for(lambda: self.docs_total is not None, 60, 0.01), "no estimate within 60 s"
        super().add(docs, nbytes, chunks)
        self.seen.append(self.report())


@pytest.fixture(scope="module")
def big_source(mongo_server):
    """A database with a canary name: 5000 documents of 16 KB (80 MB) in two collections."""
    tag = uuid.uuid4().hex[:8]
    mc = pymongo.MongoClient(mongo_server["uri"])
    db = mc["kbprogcanary%s" % tag]
    for name, n in (("big_kbprogcanary%s" % tag, 4000), ("small_kbprogcanary%s" % tag, 1000)):
        db[name].insert_many(({"_id": i, "p": PAD} for i in range(n)), ordered=False)
    yield {"db": db.name, "tag": tag, "docs": 5000, "client": mc}
    mc.drop_database(db.name)
    mc.close()


def test_initial_sync_counts_against_the_source_estimates(big_source, mongo_server, tmp_path, monkeypatch):
    monkeypatch.setattr(source, "CLONE_BATCH_DOCS", 500)  # several batches, so progress moves while the clone runs
    client = source.connect({"uri": mongo_server["uri"], "connect_timeout": 5})
    h = head.Head(str(tmp_path / "head.db"), os.urandom(32))
    meter = Sampled(hold_for_totals=True)
    try:
        stats = source.initial_sync(h, client, progress=meter)
    finally:
        h.close()
        client.close()
    mine = [r for r in meter.seen if r["docs_total"]]
    assert mine, meter.seen
    # the estimates came from the listing (dbStats of every database: other tests' data counts too) ...
    assert mine[0]["docs_total"] >= big_source["docs"] and mine[0]["bytes_total"] >= big_source["docs"] * len(PAD)
    # ... and progress moved while the clone ran: percent, a rate and an ETA before the end
    middle = [r for r in mine if 0 < r["bytes"] < stats["bytes"]]
    assert len(middle) >= 5 and all(r["phase"] == "clone" for r in middle)
    assert any(r["percent"] and r["percent"] < 100 and r["bytes_per_second"] > 0 and r["eta_seconds"] is not None
               for r in middle), middle
    assert [r["bytes"] for r in meter.seen] == sorted(r["bytes"] for r in meter.seen)
    assert (meter.docs, meter.bytes) == (stats["docs"], stats["bytes"]) and meter.phase == "catch_up"
    assert stats["docs"] >= big_source["docs"]


def test_the_clone_does_not_wait_for_the_estimate(big_source, mongo_server, tmp_path, monkeypatch):
    """dbStats can take seconds (the stand-in scans): the clone runs meanwhile, progress without totals until the
    estimate answers, and the finished sync has them. The estimate here answers only once the clone has copied a
    batch: a sync that waited for it first would never start (and fail the wait below)."""
    monkeypatch.setattr(source, "CLONE_BATCH_DOCS", 500)
    copied, real = threading.Event(), source.estimate_totals

    def after_the_first_batch(client, namespaces):
        assert copied.wait(20), "the clone waited for the estimate"
        return real(client, namespaces)
    monkeypatch.setattr(source, "estimate_totals", after_the_first_batch)

    class Marking(Sampled):
        def add(self, docs, nbytes, chunks=0):
            super().add(docs, nbytes, chunks)
            copied.set()
    client = source.connect({"uri": mongo_server["uri"], "connect_timeout": 5})
    h = head.Head(str(tmp_path / "head.db"), os.urandom(32))
    meter = Marking()
    try:
        stats = source.initial_sync(h, client, progress=meter)
    finally:
        h.close()
        client.close()
    assert meter.seen[0]["docs_total"] is None and meter.seen[0]["percent"] is None and meter.seen[0]["bytes"] > 0
    assert meter.docs_total >= big_source["docs"] and meter.bytes_total >= big_source["docs"] * len(PAD)
    assert (meter.docs, meter.bytes) == (stats["docs"], stats["bytes"])


def test_snapshot_counts_written_and_reused_chunks(tmp_path):
    h = head.Head(str(tmp_path / "head.db"), None)
    docs = {("d.c", rawbson.id_key_from_document(encode({"_id": i}))): encode({"_id": i, "p": PAD}) for i in range(600)}
    with h.write() as w:
        w.create_namespace("d.c", encode({}))
        w.upsert_many("d.c", [(k, raw) for (_ns, k), raw in docs.items()])
        w.set_position(None, [int(time.time()), 1], True)
    js = store.JobStore(str(tmp_path / "store"), "pjob")
    keys = store.Keys(js, provider=None, encryption=False)
    first = Sampled()
    e1 = snapshot.take_snapshot(h, js, keys, encryption=False, progress=first)
    total = sum(len(v) for v in docs.values())
    assert (first.docs, first.bytes, first.chunks) == (600, total, e1["written_chunks"]) and first.chunks > 3
    assert first.bytes_total == h.size()  # no previous snapshot: the head file's size, an overestimate
    h.mark_snapshotted(e1["change_seq"])
    with h.write() as w:  # change one document: the next snapshot rewrites one chunk and reuses the others
        k = rawbson.id_key_from_document(encode({"_id": 7}))
        w.upsert("d.c", k, encode({"_id": 7, "p": PAD + "x"}))
        w.set_position(None, [int(time.time()) + 1, 1], True)
    second = Sampled()
    e2 = snapshot.take_snapshot(h, js, keys, encryption=False, progress=second)
    h.close()
    assert (second.docs_total, second.bytes_total) == (e1["doc_count"], e1["data_bytes"])
    assert second.docs == 600 and second.bytes == total + 1 and second.chunks == e2["written_chunks"] == 1
    assert e2["reused_chunks"] == first.chunks - 1


def test_initial_sync_progress_in_the_daemons_status(big_source, dirs, pki, kmip_server, mongo_server):  # noqa: F811
    config_dir, data_dir = dirs
    write_kmip_setup(config_dir, pki, kmip_server["port"])
    job = "prog-%s" % big_source["tag"]
    _declare(config_dir, data_dir, job, mongo_server["uri"])
    d = DaemonProcess(config_dir, data_dir).start()
    seen, texts = [], []
    try:
        def started():
            try:
                with open(datadir.status_path(data_dir, job)) as f:
                    text = f.read()
                st = json.loads(text)
            except (OSError, ValueError):
                return False
            texts.append(text)
            if st.get("initial_sync"):
                seen.append(st)
            return st.get("state") == "STARTED" and st.get("consistent")
        assert timeutil.wait_for(started, 180, 0.05), d.log_tail()
        final = job_status.read_status(data_dir, job)
    finally:
        d.stop()
    # the status written as the sync starts shows it (a sync of this source can end before the next periodic write)
    assert seen, "status never showed the initial sync running"
    assert all(st["state"] == "PROVISIONING" and st["initial_sync"].get("phase") in (None, "clone", "catch_up")
               for st in seen), seen
    for st in seen:  # the estimate runs beside the clone: totals once it answered, none before
        line = job_status.progress_line(st)
        assert line.startswith("initial sync") and "document(s)" in line
        sync = st["initial_sync"]
        assert sync["docs_total"] is None or (sync["docs_total"] >= big_source["docs"]
                                              and sync["bytes_total"] >= big_source["docs"] * len(PAD)), sync
    assert final["initial_sync"] is None and final["snapshot"] is None
    last = final["last_initial_sync"]
    assert last["docs"] >= big_source["docs"] and last["bytes"] >= big_source["docs"] * len(PAD) and last["seconds"] > 0
    assert last["bytes_per_second"] > 0
    # the finished sync reports the source's estimates (it waits for them where they come later than the sync ends)
    assert last["docs_total"] >= big_source["docs"] and last["bytes_total"] >= big_source["docs"] * len(PAD), last
    # an encrypted job: no namespace name (or document) in any status the daemon wrote
    assert not [t for t in texts if big_source["tag"] in t.replace(job, "")]


def test_encrypted_job_role_prints_initial_sync_progress(ansible, big_source, dirs, tmp_path, pki, kmip_server,  # noqa: F811
                                                         mongo_server):
    """The role's wait prints one line per poll for a job still syncing: its state and progress, no namespace name.

    The status is the one a daemon writes mid-clone (test_initial_sync_progress_in_the_daemons_status checks that the
    daemon writes it), held still by the test: with a real daemon, whether a poll lands inside an 80 MB initial sync
    depends on the machine's speed, and on an idle machine the sync can end between two polls."""
    config_dir, data_dir = dirs
    job = "role-%s" % big_source["tag"]
    meter = progress.Meter(docs_total=5000, bytes_total=5000 * len(PAD))
    meter.phase = "clone"
    meter.add(1500, 1500 * len(PAD), 3)
    job_status.write_status(data_dir, job, {"job": job, "state": "PROVISIONING", "consistent": False, "generation": 1,
                                            "initial_sync": meter.report(), "last_error": None})
    play = [{"hosts": "localhost", "gather_facts": False, "roles": [{"role": "kmipbackup.mongodb.encrypted_job"}]}]
    pb = tmp_path / "role.yml"
    pb.write_text(json.dumps(play))
    ev = {"kmipbackup_config_dir": config_dir, "kmipbackup_data_dir": data_dir,
          "kmipbackup_kmip": {"servers": ["127.0.0.1:%d" % kmip_server["port"]], "ca_file": pki["ca"], "connect_retries": 0},
          "kmipbackup_groups": [{"name": "group1", "client_cert_file": pki["clients"]["group1"]["pem"]}],
          "kmipbackup_jobs": [{"name": job, "group": "group1", "source": {"uri": mongo_server["uri"]}, "encryption": "enabled"}],
          "encrypted_job_wait_delay": 1, "encrypted_job_wait_timeout": 3}
    p = ansible.run_playbook(str(pb), extra_vars=ev)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "Job %s is PROVISIONING after 3 s" % job in out, out[-4000:]  # no daemon: it times out
    polls = [ln for ln in out.splitlines() if '"msg": "job %s: PROVISIONING' % job in ln]
    assert len(polls) >= 2, out[-6000:]
    assert all(", initial sync (clone): " in ln and "1500 document(s)" in ln and "30.0 %" in ln for ln in polls), polls
    assert big_source["tag"] not in out.replace(job, "")


@pytest.fixture(scope="module")
def enc_store(big_source, tmp_path_factory, pki, kmip_server, mongo_server):
    """An encrypted job 'progjob' with one snapshot of big_source's database (cut with the core from a head filled with
    the source's raw documents): {config_dir, snapshot_id, expected {collection: {id_key: raw}}}."""
    base = tmp_path_factory.mktemp("progjob")
    cd, root = str(base / "etc"), str(base / "store")
    write_kmip_setup(cd, pki, kmip_server["port"])
    client = kmip.KmipClient(config.load_kmip_config(cd), config.load_group(cd, "group1"))
    uid = client.create_master_key("progjob")
    job_config.write_job(cd, {"job": "progjob", "group": "group1", "source": dict(job_config.SOURCE_DEFAULTS, uri=mongo_server["uri"]),
                              "encryption": True, "master_key_uid": uid, "previous_master_key_uids": [], "store": root,
                              "state": "present", "generation": 1, "schedule": dict(job_config.SCHEDULE_DEFAULTS)})
    js = store.JobStore(root, "progjob")
    h = head.Head(str(base / "head.db"), os.urandom(32))
    src = big_source["client"][big_source["db"]]
    expected = {}
    with h.write() as w:
        for name in src.list_collection_names():
            ns = "%s.%s" % (src.name, name)
            w.create_namespace(ns, encode({}))
            pairs = [(rawbson.id_key_from_document(raw), bytes(raw))
                     for batch in src[name].find_raw_batches() for raw in rawbson.split_bson_docs(batch)]
            w.upsert_many(ns, pairs)
            expected[name] = dict(pairs)
        w.set_position(None, [int(time.time()), 1], True)
    entry = snapshot.take_snapshot(h, js, store.Keys(js, provider=client, encryption=True), master_key_uid=uid, encryption=True)
    h.close()
    client.close()
    return {"config_dir": cd, "snapshot_id": entry["snapshot_id"], "expected": expected}


def test_restore_progress_record_names_no_namespace(big_source, enc_store, tmp_path):
    """Canary: every version of the progress record a reader could see during an encrypted restore holds counts and
    sizes only; it goes away at the end, and a shared folder is refused before anything is written."""
    record = str(tmp_path / "progress" / "restore.json")
    target = str(tmp_path / "out")
    p = request(snapshot_restore, job="progjob", config_dir=enc_store["config_dir"], target_dir=target, progress_file=record)
    seen, done = [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                with open(record) as f:
                    seen.append(f.read())
            except OSError:
                pass
            time.sleep(0.005)
    t = threading.Thread(target=reader)
    t.start()
    try:
        result = restore_request.run_restore(p)
    finally:
        done.set()
        t.join()
    assert result["changed"] and result["rate"]["bytes_per_second"] > 0 and result["seconds"] > 0
    assert seen and all(json.loads(x)["what"] == "restore of snapshot %s" % enc_store["snapshot_id"] for x in seen)
    assert json.loads(seen[0])["bytes_total"] == sum(len(v) for docs in enc_store["expected"].values() for v in docs.values())
    assert not [x for x in seen if big_source["tag"] in x or "kbprogcanary" in x]
    assert not os.path.exists(record) and os.listdir(os.path.dirname(record)) == []
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    p = dict(p, target_dir=str(tmp_path / "out2"), progress_file=str(shared / "r.json"))
    with pytest.raises(ConfigError, match="not a private folder"):
        restore_request.run_restore(p)
    assert not os.path.exists(p["target_dir"]) and os.listdir(shared) == []


@pytest.mark.parametrize("become", [False, True], ids=["side_thread", "become_in_background"])
def test_restore_playbook_shows_progress_and_rate(ansible, big_source, enc_store, tmp_path, mongo_server, become):
    """restore.yml into MongoDB: progress lines on the playbook's output while the restore task runs (read as the output
    streams: each line is seen while the restore is held still, before the task ends), no namespace name, the rate at
    the end, the data byte for byte, and the progress record removed. Without become a side thread of the task reads
    the record while the module runs; with become (one command at a time over the connection) the task runs the module
    in the background and polls it (become to the same user here: the connection still carries a become plugin)."""
    target_db = "restored%s" % uuid.uuid4().hex[:8]
    progress_dir = str(tmp_path / "progress")
    ev = dict(job="progjob", snapshot="latest", config_dir=enc_store["config_dir"], target_mongodb={"uri": mongo_server["uri"]},
              rename_databases={big_source["db"]: target_db}, restore_poll_seconds=1, restore_progress_dir=progress_dir,
              restore_info_file=str(tmp_path / "restoreInfo.txt"), ansible_become=become)
    paused, done = [], threading.Event()

    def pause_target():
        """Hold the target server still (SIGSTOP) for 4 s once the restore's record exists, so progress lines come while
        the restore runs whatever the machine's speed (an idle machine restores these 80 MB in about a second)."""
        while not done.is_set():
            if os.path.isdir(progress_dir) and os.listdir(progress_dir):
                os.kill(mongo_server["pid"], signal.SIGSTOP)
                try:
                    paused.append(time.monotonic())
                    done.wait(4)
                finally:
                    paused.append(time.monotonic())
                    os.kill(mongo_server["pid"], signal.SIGCONT)
                return
            time.sleep(0.002)
    t = threading.Thread(target=pause_target)
    t.start()
    cmd = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", ansible.inventory(),
           os.path.join(ROOT, "playbooks", "restore.yml"), "-e", json.dumps(ev), "-vv"]  # -vv: the results (scanned too), not the arguments
    seen = []  # (when, line) as the playbook prints them
    try:
        with subprocess.Popen(cmd, env=ansible.env(), cwd=ansible.workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            for ln in proc.stdout:
                seen.append((time.monotonic(), ln.rstrip("\n")))
            rc = proc.wait(timeout=300)
    finally:
        done.set()
        t.join()
    out = "\n".join(ln for _t, ln in seen)
    assert rc == 0, out[-4000:]
    assert len(paused) == 2, "the restore's progress record never showed"
    prefix = "[localhost] restore of snapshot %s: " % enc_store["snapshot_id"]
    lines = [(when, ln) for when, ln in seen if ln.startswith(prefix)]
    held = [ln for when, ln in lines if paused[0] <= when < paused[1]]
    assert len(held) >= 2 and all(" %)" in ln and "document(s)" in ln and "/s" in ln for ln in held), out[-6000:]
    task_end = next(when for when, ln in seen if ln.startswith("TASK [Stop when the restore could not authenticate"))
    assert all(when < task_end for when, _ln in lines)
    assert ("the restore runs in the background and is polled: with become" in out) == become
    assert "Rate: 80.1 MB and 5000 document(s) in " in out and " document(s)/s" in out, out[-3000:]
    assert big_source["tag"] not in out
    assert os.listdir(progress_dir) == []  # the record is gone, its private folder stays
    mc = big_source["client"]
    for name, docs in enc_store["expected"].items():
        got = {rawbson.id_key_from_document(r): bytes(r) for batch in mc[target_db][name].find_raw_batches()
               for r in rawbson.split_bson_docs(batch)}
        assert got == docs
    mc.drop_database(target_db)
