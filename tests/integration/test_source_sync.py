"""Initial sync, continuous capture, restart and kill -9 drills, head verification, against the
real SecantusDB server of the session (mongo_server fixture). Every test uses its own
database names and compares only those (the head captures the whole cluster)."""
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pymongo
import pytest
from bson.raw_bson import RawBSONDocument

import workload
from snapshot_helpers import drop_standin_phantoms
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, rawbson, source
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import SourceError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def unique(prefix):
    return "%s_%s" % (prefix, uuid.uuid4().hex[:8])


def kind(client):
    """"sharded" (mongos) or "replica_set"."""
    return "sharded" if client.admin.command("hello").get("msg") == "isdbgrid" else "replica_set"


@pytest.fixture(scope="module")
def plain(mongo_server):
    c = pymongo.MongoClient(mongo_server["uri"])
    yield c
    c.close()


@pytest.fixture
def src(mongo_server):
    c = source.connect({"uri": mongo_server["uri"], "connect_timeout": 10})
    yield c
    c.close()


def new_head(tmp_path, name="head", key=None):
    return head.Head(str(tmp_path / name / "head.db"), key if key is not None else os.urandom(32))


def drain(h, client, idle_rounds=2, timeout=120):
    """Capture until the stream is idle (all changes applied) and the head is consistent."""
    cap = source.Capture(h, client)
    deadline = time.monotonic() + timeout
    idle = 0
    while idle < idle_rounds:
        assert time.monotonic() < deadline, "capture did not catch up"
        n = cap.run_once(max_time=1.0)
        idle = idle + 1 if n == 0 and h.position()["consistent"] else 0
    cap.close()
    return cap


def source_image(client, dbname):
    """{ns: ([(id_key, raw)...] sorted, {index name: raw spec}, options raw)} of one database."""
    out = {}
    for info in source._list_collections(client, dbname):
        name = info["name"]
        if name.startswith("system."):
            continue
        ns = "%s.%s" % (dbname, name)
        meta = source.refresh_namespace(client, ns)
        docs = []
        for batch in client[dbname][name].find_raw_batches({}):
            docs.extend(source._split_batch(batch))
        out[ns] = (sorted(docs), {_name(s): s for s in meta["indexes"]}, meta["options"])
    return out


def head_image(h, dbname):
    out = {}
    with h.read() as r:
        for n in r.namespaces():
            if n["ns"].startswith(dbname + "."):
                out[n["ns"]] = (list(r.scan(n["ns"])), {_name(s): s for s in n["indexes"]}, n["options"])
    return out


def _name(spec):
    return RawBSONDocument(spec)["name"]


def namespace_drift(h, client):
    """{ns: what differs between the head's and the source's namespace (options, index specs, presence)}, decoded,
    for assertion messages: verify() fixes it without saying which namespace it was."""
    want = {ns: source._info_to_head(client, ns, info) for ns, info in source.list_namespaces(client)}
    with h.read() as r:
        got = {n["ns"]: n for n in r.namespaces()}
    out = {}
    for ns in sorted(set(want) | set(got)):
        w, g = want.get(ns), got.get(ns)
        if w is None or g is None:
            out[ns] = "only in the head (%d docs)" % h_count(h, ns) if w is None else "only in the source"
            continue
        d = {}
        if w["options"] != g["options"]:
            d["options"] = {"head": dict(RawBSONDocument(g["options"])), "source": dict(RawBSONDocument(w["options"]))}
        if w["indexes"] != g["indexes"]:
            d["indexes"] = {"head": [dict(RawBSONDocument(s)) for s in g["indexes"]],
                            "source": [dict(RawBSONDocument(s)) for s in w["indexes"]]}
        if d:
            out[ns] = d
    return out


def h_count(h, ns):
    with h.read() as r:
        return r.count(ns)


def assert_same(h, client, dbname, gone=()):
    drop_standin_phantoms(client, dbname, gone)
    want, got = source_image(client, dbname), head_image(h, dbname)
    assert sorted(got) == sorted(want)
    for ns in want:
        wd, wi, wo = want[ns]
        gd, gi, go = got[ns]
        assert len(gd) == len(wd), ns
        assert [k for k, _ in gd] == [k for k, _ in wd], ns
        diff = [k for (k, a), (_, b) in zip(gd, wd, strict=True) if a != b]
        assert not diff, (ns, len(diff))
        assert gi == wi, ns  # unique, sparse, TTL and partial options included
        assert go == wo, ns


def test_initial_sync_with_concurrent_workload_then_capture_is_byte_equal(tmp_path, plain, src):
    dbname = unique("sync")
    db = plain[dbname]
    workload.seed(db, n=400, big=True)
    h = new_head(tmp_path)
    stop = threading.Event()
    wl = workload.Workload(db, seed=11)
    t = wl.run_in_thread(stop, max_ops=1500)
    result = source.initial_sync(h, src)  # the workload writes during the clone and the catch-up
    assert h.position()["consistent"] and h.position()["sync"] is None and result["docs"] >= 3 * 400
    cap = source.Capture(h, src)
    while t.is_alive():
        cap.run_once(max_time=1.0)
    cap.close()
    assert wl.ops == 1500
    # an empty tmp_drop the stand-in minted back after its drop (no event: see drop_standin_phantoms) is not
    # drift; the drop's event is drained with the rest
    drop_standin_phantoms(plain, dbname)
    drain(h, src)
    # every change carried by events applies byte-exactly: nothing for verification to fix
    before = head_image(h, dbname)
    drift = namespace_drift(h, src)
    counts = source.verify(h, src, full=True)
    assert counts["checked"] > 0
    assert counts["mismatched"] == counts["namespaces_fixed"] == 0, (counts, drift)
    assert head_image(h, dbname) == before
    assert_same(h, src, dbname)
    with h.read() as r:
        big = r.get(dbname + ".big", rawbson.id_key_from_value("big"))
    assert len(big) > 15 * 1024 * 1024
    h.close()


def test_dotted_field_update_is_recopied_or_healed_by_verification(tmp_path, plain, src):
    dbname = unique("dotted")
    db = plain[dbname]
    db.c.insert_many([{"_id": i, "a": {"b": 1}, "a.b": 0} for i in range(3)])
    h = new_head(tmp_path)
    source.initial_sync(h, src)
    workload.dotted_field_update(db.c, 1)
    cap = drain(h, src)
    counts = source.verify(h, src, full=True)
    # either the capture re-copied it (ambiguous path detected) or verification healed it; the head ends equal
    assert cap.stats["recopied"] + counts["recopied"] >= 1
    assert_same(h, src, dbname)
    assert source.verify(h, src, full=True)["mismatched"] == 0
    h.close()


def test_capture_keeps_out_the_namespaces_a_backup_excludes(tmp_path, plain, src):
    """The stand-in's cluster-wide stream also shows admin, config and local (mongod's never does): capture
    must not put those namespaces in the head, or verification finds namespaces to fix (it drops them)."""
    dbname, tag = unique("excl"), uuid.uuid4().hex[:8]
    plain[dbname].kept.insert_one({"_id": 1})
    plain[dbname].leaves.insert_one({"_id": 1})
    h = new_head(tmp_path)
    source.initial_sync(h, src)
    try:
        for excluded in ("admin", "config"):
            coll = plain[excluded]["kb_" + tag]
            coll.insert_one({"_id": 1})
            coll.update_one({"_id": 1}, {"$set": {"x": 1}})
            coll.create_index("x", name="x_1")
            coll.drop_index("x_1")
        plain[excluded]["kb_" + tag].rename("kb2_" + tag)
        plain.admin.command("renameCollection", "%s.leaves" % dbname, to="admin.kb3_%s" % tag)
        plain[dbname].kept.insert_one({"_id": 2})
        cap = drain(h, src)
        with h.read() as r:
            names = [n["ns"] for n in r.namespaces()]
        assert [ns for ns in names if ns.split(".", 1)[0] in source.EXCLUDED_DBS] == []
        assert dbname + ".kept" in names and dbname + ".leaves" not in names
        assert cap.applier.counts.get("ignored", 0) >= 9
        counts = source.verify(h, src, full=True)
        assert counts["mismatched"] == counts["namespaces_fixed"] == counts["removed"] == 0, counts
        assert_same(h, src, dbname)
    finally:
        for name in ("kb_", "kb2_", "kb3_"):
            plain.admin.drop_collection(name + tag)
            plain.config.drop_collection(name + tag)
        h.close()


def test_verify_heals_and_counts(tmp_path, plain, src):
    dbname = unique("verify")
    db = plain[dbname]
    db.c.insert_many([{"_id": i, "v": i} for i in range(50)])
    h = new_head(tmp_path)
    source.initial_sync(h, src)
    ns = dbname + ".c"
    with h.write() as w:  # damage the head: one changed, one missing, one extra
        w.upsert(ns, rawbson.id_key_from_value(1), b"\x15\x00\x00\x00\x10_id\x00\x01\x00\x00\x00\x10v\x00\x63\x00\x00\x00\x00")
        w.delete(ns, rawbson.id_key_from_value(2))
        w.upsert(ns, rawbson.id_key_from_value(999), b"\x0e\x00\x00\x00\x10_id\x00\xe7\x03\x00\x00\x00")
    sampled = source.verify(h, src, sample=200)
    assert sampled["checked"] > 0
    counts = source.verify(h, src, full=True)
    assert sampled["mismatched"] + counts["mismatched"] >= 3
    assert sampled["recopied"] + counts["recopied"] >= 2 and sampled["removed"] + counts["removed"] >= 1
    assert_same(h, src, dbname)
    final = source.verify(h, src, full=True)
    assert final["checked"] >= 2 * 50 and final["mismatched"] == final["recopied"] == final["removed"] == 0
    with h.write() as w:  # a namespace the source lacks, index specs that differ
        w.upsert(dbname + ".ghost", rawbson.id_key_from_value(1), b"\x0e\x00\x00\x00\x10_id\x00\x01\x00\x00\x00\x00")
        w.set_indexes(ns, [])
    fixed = source.verify(h, src, full=True)
    assert fixed["namespaces_fixed"] >= 2 and fixed["removed"] >= 1
    assert_same(h, src, dbname)
    h.close()


def test_restart_resumes_from_stored_token_without_resync(tmp_path, plain, src):
    dbname = unique("restart")
    db = plain[dbname]
    workload.seed(db, n=100)
    key = os.urandom(32)
    h = new_head(tmp_path, key=key)
    source.initial_sync(h, src)
    drain(h, src)
    h.close()
    workload.Workload(db, seed=5).run(300)  # written while "the daemon" is down
    h = new_head(tmp_path, key=key)
    assert not source.needs_initial_sync(h)
    with h.read() as r:
        incarnations = {n["ns"]: n["incarnation"] for n in r.namespaces() if n["ns"].startswith(dbname + ".")}
    cap = drain(h, src)
    assert cap.stats["events"] >= 300
    with h.read() as r:  # resumed, not re-synced: namespaces kept their incarnation
        after = {n["ns"]: n["incarnation"] for n in r.namespaces() if n["ns"] in incarnations}
    assert {ns: after[ns] for ns in after if ns.rsplit(".", 1)[1] in workload.COLLECTIONS} == \
        {ns: incarnations[ns] for ns in incarnations if ns.rsplit(".", 1)[1] in workload.COLLECTIONS}
    assert source.verify(h, src, full=True)["mismatched"] == 0
    assert_same(h, src, dbname)
    h.close()


CAPTURE_SCRIPT = r"""
import os, sys, time
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, source
h = head.Head(sys.argv[1], bytes.fromhex(os.environ["HEAD_KEY"]))
c = source.connect({"uri": sys.argv[2]})
if sys.argv[3] == "sync":
    print("syncing", flush=True)
    source.initial_sync(h, c)
cap = source.Capture(h, c, max_batch_events=50, max_batch_seconds=0.05)
print("capturing", flush=True)
while True:
    cap.run_once(1.0)
"""


def _spawn(path, uri, mode, key):
    env = dict(os.environ, HEAD_KEY=key.hex(),
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, ".build", "collections"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", CAPTURE_SCRIPT, path, uri, mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_kill9_during_initial_sync_and_during_apply_converges(tmp_path, plain, src, mongo_server):
    dbname = unique("kill")
    db = plain[dbname]
    workload.seed(db, n=300)
    key = os.urandom(32)
    path = str(tmp_path / "k" / "head.db")
    head.Head(path, key).close()
    # 1. killed during the initial sync: the next start restarts the sync cleanly
    proc = _spawn(path, mongo_server["uri"], "sync", key)
    assert proc.stdout.readline().strip() == b"syncing"
    time.sleep(0.3)
    _kill(proc)
    h = head.Head(path, key)
    if source.needs_initial_sync(h):
        source.initial_sync(h, src)
    h.close()
    # 2. killed repeatedly while applying a concurrent workload: resumes by token each time
    stop = threading.Event()
    wl = workload.Workload(db, seed=23)
    t = wl.run_in_thread(stop, max_ops=900)
    kills = 0
    try:
        while t.is_alive() and kills < 4:
            proc = _spawn(path, mongo_server["uri"], "capture", key)
            assert proc.stdout.readline().strip() == b"capturing"
            time.sleep(0.7)
            _kill(proc)
            kills += 1
    finally:
        t.join()
    assert kills >= 2
    h = head.Head(path, key)
    assert not source.needs_initial_sync(h)
    drain(h, src)
    counts = source.verify(h, src, full=True)
    assert counts["mismatched"] == counts["namespaces_fixed"] == 0, counts  # no lost change (and duplicates would have shown as drift)
    assert_same(h, src, dbname)
    h.close()


def test_connect_errors_are_clear(dead_port, mongo_server):
    with pytest.raises(SourceError, match="cannot be reached"):
        source.connect({"uri": "mongodb://127.0.0.1:%d/" % dead_port, "connect_timeout": 1})
    for bad in ({"uri": "http://u:s3cretpw@127.0.0.1:%d/" % dead_port},
                {"uri": "mongodb://127.0.0.1:%d/" % dead_port, "username": "u", "password": "s3cretpw", "auth_mechanism": "BOGUS"}):
        with pytest.raises(SourceError, match="settings are invalid") as e:
            source.connect(dict(bad, connect_timeout=1))
        assert "s3cretpw" not in str(e.value)
    with pytest.raises(SourceError, match="no uri"):
        source.connect({})
    c = source.connect({"uri": mongo_server["uri"]})
    assert kind(c) == "replica_set"
    c.close()


def test_writes_just_before_the_clone_end_are_in_the_head_when_the_sync_returns(tmp_path, plain, src, monkeypatch):
    """The catch-up's end T is read after these writes; a majority read at T (the stand-in: a replica set) lets the
    catch-up trust an empty batch after a 1 ms wait: the head the sync returns already holds them, byte for byte,
    with no further capture."""
    dbname = unique("clone_end")
    db = plain[dbname]
    db.c.insert_many([{"_id": i, "v": "before"} for i in range(50)])
    real_catch_up_to, awaits = source._catch_up_to, []

    def writes_first(cap, client):
        db.c.insert_many([{"_id": 1000 + i, "v": "late"} for i in range(20)])
        db.c.update_one({"_id": 3}, {"$set": {"v": "changed late"}})
        db.late.insert_one({"_id": "new collection"})
        t = real_catch_up_to(cap, client)
        awaits.append(cap.max_await_ms)
        return t
    monkeypatch.setattr(source, "_catch_up_to", writes_first)
    h = new_head(tmp_path)
    try:
        source.initial_sync(h, src)
        assert h.position()["consistent"] and h.position()["sync"] is None
        assert awaits == [source.CATCH_UP_AWAIT_MS]
        assert source._majority_reached(src, source._cluster_time(src), src.admin.command("hello"))
        assert_same(h, src, dbname)
        assert h_count(h, dbname + ".c") == 70 and h_count(h, dbname + ".late") == 1
    finally:
        h.close()
        plain.drop_database(dbname)
