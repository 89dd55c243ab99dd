"""kill -9 campaign: an encrypted job on a real SecantusDB source under a write workload (every BSON type, CRUD with
operators, DDL), its supervised daemon SIGKILLed at random moments (the whole daemon, the worker alone, or the
supervisor alone) and restarted the documented way (`--status`, then `--supervise --detach`, as the backup_daemon
role does), with on-demand snapshots between kills, some cut short by a kill. Then writes stop, the head catches
up, a last snapshot restores byte-equal to the source, document by document, and every snapshot the catalog lists
restores and verifies. The random seed is printed: a failure can be replayed with KB_CRASH_SEED."""
import os
import random
import signal
import threading
import time
import uuid

import pymongo
import pytest

import kmipbackup_lab as lab
import workload
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    config, daemon, datadir, files, job_config, job_requests, job_status, kmip, restore, source, store, timeutil)
from daemon_helper import alive, launcher, write_kmip_setup
from snapshot_helpers import drop_standin_phantoms, restored_image, source_image

KILLS = 12


@pytest.fixture(scope="module")
def own_mongo(tmp_path_factory):
    """A source of its own: the job backs up the whole deployment, so every namespace is this test's."""
    info = lab.start_mongo_server(str(tmp_path_factory.mktemp("crashmongo")))
    yield info
    lab.stop(info["pid"])


def _running_pid(cd, dd, timeout=20):
    """The daemon's pid as --status confirms it (the lock holder)."""
    out = {}

    def running():
        st = launcher(cd, dd, "--status")
        if st.returncode == 0 and st.stdout.startswith("running (pid ") and "unknown" not in st.stdout:
            out["pid"] = int(st.stdout.strip()[len("running (pid "):-1])
            return True
        return False
    assert timeutil.wait_for(running, timeout, 0.1), "the daemon did not start; log:\n" + _log_tail(dd)
    return out["pid"]


def _worker_pid(dd, supervisor, timeout=20):
    """The worker that holds worker.lock, a child of this supervisor."""
    out = {}

    def ready():
        held, pid = daemon.lock_holder(os.path.join(dd, daemon.WORKER_LOCK_FILE), settle=0)
        if held and pid and _ppid(pid) == supervisor:
            out["pid"] = pid
            return True
        return False
    return out["pid"] if timeutil.wait_for(ready, timeout, 0.05) else None


def _ppid(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def _log_tail(dd, n=60):
    try:
        with open(os.path.join(dd, "log", "daemon.log"), errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def _documented_start(cd, dd, pidfile):
    """What the role runs: --status; --supervise --detach when it says 3 (not running)."""
    st = launcher(cd, dd, "--status", pidfile=pidfile)
    assert st.returncode == 3, "a killed daemon still counts as running: %r" % (st.stdout + st.stderr)
    r = launcher(cd, dd, "--supervise", "--detach", pidfile=pidfile)
    assert r.returncode == 0, r.stderr
    return _running_pid(cd, dd)


def _restore(cd, root, job, sid, folder, dbname):
    with kmip.KmipClient(config.load_kmip_config(cd), config.load_group(cd, "group1")) as client:
        js = store.JobStore(root, job)
        keys = store.Keys(js, provider=client, encryption=True)
        summary = restore.restore(js, sid, keys, restore.DirectoryTarget(folder), include=[dbname + ".*"])
    return restored_image(folder, dbname), summary


def test_kill_9_campaign_ends_with_byte_equal_restore(tmp_path, pki, kmip_server, own_mongo):
    started = time.monotonic()
    seed = int(os.environ.get("KB_CRASH_SEED") or random.SystemRandom().randrange(10 ** 6))
    print("crash campaign seed", seed)
    rnd = random.Random(seed)
    cd, dd = str(tmp_path / "etc"), str(tmp_path / "data")
    for folder in (cd, dd, str(tmp_path / "run")):
        files.ensure_private_dir(folder)
    pidfile = str(tmp_path / "run" / "kmipbackup-daemon.pid")
    write_kmip_setup(cd, pki, kmip_server["port"])
    tag = uuid.uuid4().hex[:8]
    job, dbname = "crash-%s" % tag, "kbcrash%s" % tag
    mc = pymongo.MongoClient(own_mongo["uri"])
    db = mc[dbname]
    workload.seed(db, 150)
    cfg, _ = job_config.plan_job({"job": job, "group": "group1", "source": {"uri": own_mongo["uri"], "connect_timeout": 3},
                                  "encryption": "enabled", "config_dir": cd, "data_dir": dd, "store": None,
                                  "master_key": {"create": True}, "state": "present"}, None, source.check_source)
    job_config.write_job(cd, cfg)
    root = datadir.store_root(cfg, dd)
    js = store.JobStore(root, job)

    stop_writes = threading.Event()
    wl = workload.Workload(db, seed=seed)
    writer = wl.run_in_thread(stop_writes)
    answered, kinds = [], []
    try:
        supervisor = _documented_start(cd, dd, pidfile)
        for i in range(KILLS):
            kind = ("daemon", "worker", "supervisor")[i % 3]
            if i % 2 == 0:  # a snapshot between kills, answered
                rid = job_requests.submit_request(dd, job, "snapshot")
                answered.append(job_requests.wait_answer(dd, job, rid, timeout=90, generation=cfg["generation"])["id"])
            else:  # a snapshot the kill may cut short
                job_requests.submit_request(dd, job, "snapshot")
            worker = _worker_pid(dd, supervisor)
            assert worker, "no worker under supervisor %d; log:\n%s" % (supervisor, _log_tail(dd))
            time.sleep(rnd.uniform(0.0, 1.5))
            if kind == "daemon":  # supervisor and worker at once; detached, the daemon is its own session
                os.killpg(os.getpgid(supervisor), signal.SIGKILL)
            elif kind == "worker":  # the supervisor restarts it
                os.kill(worker, signal.SIGKILL)
            else:  # an orphaned worker stops by itself; the restarted daemon's worker waits for it
                os.kill(supervisor, signal.SIGKILL)
            kinds.append(kind)
            assert writer.is_alive(), "the workload stopped"
            if kind == "worker":
                assert timeutil.wait_for(lambda s=supervisor, w=worker: _worker_pid(dd, s, timeout=0) not in (None, w), 20, 0.1), \
                    "the supervisor did not restart its worker; log:\n" + _log_tail(dd)
            else:
                assert timeutil.wait_for(lambda: launcher(cd, dd, "--status").returncode == 3, 10, 0.1)
                supervisor = _documented_start(cd, dd, pidfile)
                if kind == "supervisor":
                    assert timeutil.wait_for(lambda w=worker: not alive(w), 20, 0.2), "the orphaned worker kept running"
        assert len(kinds) >= 10 and set(kinds) == {"daemon", "worker", "supervisor"}

        # writes stop; one last write marks the point the head must reach
        stop_writes.set()
        writer.join(30)
        assert not writer.is_alive()
        # the stand-in's listCollections can mint back an empty ddl_N the workload renamed away, with no change event
        # (see drop_standin_phantoms; mongod never does): dropped here, while the daemon runs, as the other tests do
        drop_standin_phantoms(mc, dbname)
        with mc.start_session() as s:
            db["marker"].insert_one({"_id": "end", "ops": wl.ops}, session=s)
            t = s.operation_time
        assert timeutil.wait_for(lambda: (lambda st: st.get("state") == "STARTED" and st.get("consistent") and st.get("cluster_time")
                                          and tuple(st["cluster_time"]) >= (t.time, t.inc))(job_status.read_status(dd, job) or {}),
                                 90, 0.2), "the head did not catch up; log:\n" + _log_tail(dd)
        rid = job_requests.submit_request(dd, job, "snapshot")
        final = job_requests.wait_answer(dd, job, rid, timeout=90, generation=cfg["generation"])["id"]
        st = job_status.read_status(dd, job)
    finally:
        stop_writes.set()
        launcher(cd, dd, "--stop", pidfile=pidfile)
    assert wl.ops > 0 and st["initial_syncs"] >= 1

    expected = source_image(mc, dbname)
    image, summary = _restore(cd, root, job, final, str(tmp_path / "final"), dbname)
    assert summary["snapshot_id"] == final and summary["encryption"] is True
    assert sorted(image) == sorted(expected)
    for ns in expected:
        assert image[ns].keys() == expected[ns].keys(), ns
        diff = [k for k in expected[ns] if image[ns][k] != expected[ns][k]]
        assert diff == [], "%s: %d documents differ" % (ns, len(diff))

    # every listed snapshot restores and verifies (chunks authenticated, namespace hashes and counts checked)
    catalog = js.catalog()
    listed = [e["snapshot_id"] for e in catalog]
    assert set(answered) | {final} <= set(listed), (answered, listed)
    for n, e in enumerate(catalog):
        img, summ = _restore(cd, root, job, e["snapshot_id"], str(tmp_path / ("all-%d" % n)), dbname)
        assert summ["snapshot_id"] == e["snapshot_id"] and summ["documents"] == e["doc_count"]
        assert sum(len(v) for v in img.values()) == e["doc_count"], e["snapshot_id"]
    print("crash campaign: %d kills (%s), %d workload ops, %d snapshots listed, %d initial syncs, %.0fs"
          % (len(kinds), ",".join(kinds), wl.ops, len(listed), st["initial_syncs"], time.monotonic() - started))

