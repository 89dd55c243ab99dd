"""Point-in-time restore against real servers (SecantusDB, PyKMIP over mutual TLS): the capture writes change segments
under load (CRUD on every BSON type, DDL: create, drop, rename, indexes; multi-document transactions), the master key
rotates inside the window, and restore_request (what snapshot_restore runs) restores to the moments the load paused:
byte-equal to the source's image then, to a directory and into MongoDB; a transaction is all or nothing at every
point; points outside the window and tampered or missing segments are refused and nothing is written; one
restore.yml run with point_in_time."""
import os
import random
import shutil
import threading
import time
import uuid

import bson
import pymongo
import pytest

import workload
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    ansible_module, config, head, kmip, point_in_time, restore, restore_request, segments, snapshot, source, store)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError, IntegrityError, PointNotRestorable
from ansible_collections.kmipbackup.mongodb.plugins.modules import snapshot_restore
from daemon_helper import write_kmip_setup
from snapshot_helpers import canary_hits, drop_standin_phantoms, restored_image, source_image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = "pitrjob"
CANARY = "PitrRestoreCanary7301"
ACCOUNTS, BALANCE = 10, 100


def params(lab, **kw):
    """snapshot_restore's parameters on a fresh host: the store, the KMIP server and a certificate."""
    spec = ansible_module.full_spec(snapshot_restore.argument_spec, snapshot_restore.SHARED)
    p = {name: opt.get("default") for name, opt in spec.items()}
    p.update(job=JOB, store=lab["store"], config_dir=lab["no_config"], data_dir=lab["no_data"],
             kmip_servers=["127.0.0.1:%d" % lab["kmip_port"]], kmip_ca_file=lab["pki"]["ca"],
             client_cert_file=lab["pki"]["clients"]["group1"]["pem"], show_namespaces=True)
    p.update(kw)
    return p


def transfers(mc, dbname, stop, rnd):
    """Multi-document transactions moving money between accounts: the total never changes."""
    bank = mc[dbname]["bank"]

    def move(s, a, b, x):
        bank.update_one({"_id": a}, {"$inc": {"balance": -x}}, session=s)
        bank.update_one({"_id": b}, {"$inc": {"balance": x}}, session=s)
    while not stop.is_set():
        a, b = rnd.sample(range(ACCOUNTS), 2)
        x = rnd.randint(1, 5)
        with mc.start_session() as s:
            s.with_transaction(lambda s, a=a, b=b, x=x: move(s, a, b, x))


def catch_up(cap, h, t, timeout=60):
    """Capture until the head is consistent and has applied everything up to cluster time t."""
    deadline = time.monotonic() + timeout
    while True:
        cap.run_once(max_time=0.3)
        pos = h.position()
        if pos["consistent"] and pos["cluster_time"] and tuple(pos["cluster_time"]) >= (t.time, t.inc):
            return
        assert time.monotonic() < deadline, "capture did not catch up"


def seal(h, js, keys, uid):
    segments.close(h)
    return segments.seal_closed(h, js, keys, uid)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, pki, kmip_server, mongo_server):
    base = tmp_path_factory.mktemp("pitr")
    cd = str(base / "etc")
    write_kmip_setup(cd, pki, kmip_server["port"], groups=("group1",))
    client = kmip.KmipClient(config.load_kmip_config(cd), config.load_group(cd, "group1"))
    uid = client.create_master_key("pitr-1")
    root = str(base / "store")
    js = store.JobStore(root, JOB)
    keys = store.Keys(js, provider=client, encryption=True)
    dbname = "pitr_%s" % uuid.uuid4().hex[:8]
    mc = pymongo.MongoClient(mongo_server["uri"])
    db = mc[dbname]
    workload.seed(db, n=60)
    db["bank"].insert_many([{"_id": a, "balance": BALANCE} for a in range(ACCOUNTS)])
    db["secret"].insert_one({"_id": CANARY + "-id", "v": CANARY})
    src = source.connect({"uri": mongo_server["uri"], "connect_timeout": 10})
    h = head.Head(str(base / "head" / "head.db"), os.urandom(32))
    h.record_segments = True
    source.initial_sync(h, src)
    cap = source.Capture(h, src)
    with mc.start_session() as s:
        db["marker"].insert_one({"_id": "start"}, session=s)
        t = s.operation_time
    catch_up(cap, h, t)
    seal(h, js, keys, uid)
    base_entry = snapshot.take_snapshot(h, js, keys, JOB, uid, True)
    h.mark_snapshotted(base_entry["change_seq"])

    points, wl, rnd = [], workload.Workload(db, seed=12), random.Random(5)
    for phase in range(3):
        stop = threading.Event()
        threads = [wl.run_in_thread(stop), threading.Thread(target=transfers, args=(mc, dbname, stop, rnd), daemon=True)]
        threads[1].start()
        # DDL in every phase, next to the workload's own: create, index, rename over an existing one, drop, drop index
        db.create_collection("made%d" % phase)
        db["made%d" % phase].insert_many([{"_id": k, "v": k + 100 * phase} for k in range(20)])
        db["made%d" % phase].create_index("v", name="v_1", unique=True)
        if phase:
            db["made%d" % phase].rename("made%d" % (phase - 1), dropTarget=True)
        if phase == 1:
            db["alpha"].drop_index("tags_sparse")
        deadline, next_seal = time.monotonic() + 2.0, time.monotonic() + 0.6
        while time.monotonic() < deadline:  # capture under load, a segment closed every 0.6 s
            cap.run_once(max_time=0.2)
            if time.monotonic() >= next_seal:
                seal(h, js, keys, uid)
                next_seal = time.monotonic() + 0.6
        stop.set()
        for th in threads:
            th.join(30)
        drop_standin_phantoms(mc, dbname)
        with mc.start_session() as s:  # every write acknowledged before it is at or before t
            db["marker"].update_one({"_id": "m"}, {"$inc": {"n": 1}}, upsert=True, session=s)
            t = s.operation_time
        image = source_image(mc, dbname)
        indexes = {c: sorted(mc[dbname][c].index_information()) for c in mc[dbname].list_collection_names()}
        catch_up(cap, h, t)
        seal(h, js, keys, uid)
        points.append({"t": t, "image": image, "indexes": indexes})
        if phase == 0:  # a key rotation inside the window: later segments are sealed under a new epoch
            uid = client.create_master_key("pitr-2")
        time.sleep(1.1)  # the second of t holds no later write: an ISO time of it is the same point
    with mc.start_session() as s:
        db["marker"].update_one({"_id": "m"}, {"$inc": {"n": 1}}, upsert=True, session=s)
        t = s.operation_time
    catch_up(cap, h, t)
    seal(h, js, keys, uid)
    cap.close()
    yield {"store": root, "js": js, "keys": keys, "db": dbname, "mc": mc, "points": points, "base": base_entry,
           "pki": pki, "kmip_port": kmip_server["port"], "no_config": str(base / "no-config"), "no_data": str(base / "no-data"),
           "tmp": base, "uri": mongo_server["uri"], "uids": keys.job_store.keyring_records()}
    h.close()
    src.close()
    mc.drop_database(dbname)
    mc.close()
    client.close()


def test_restore_to_each_paused_moment_is_byte_equal(lab):
    assert len(segments.list_segments(lab["js"])) >= 6
    assert {r["epoch"] for r in lab["uids"]} == {1, 2}  # the rotation: two key epochs in the window
    for k, pt in enumerate(lab["points"]):
        t = pt["t"]
        out = str(lab["tmp"] / ("dir%d" % k))
        # the middle one by ISO time (the end of that second: nothing was written later in it), the others by {t, i}
        when = point_in_time.iso_of(t.time) if k == 1 else {"t": t.time, "i": t.inc}
        r = restore_request.run_restore(params(lab, target_dir=out, point_in_time=when))
        assert r["changed"] and r["base_snapshot_id"] == lab["base"]["snapshot_id"] and r["segments"] >= 1
        assert r["verify"]["namespaces_verified"] == len(r["namespaces"])
        got = restored_image(out, lab["db"])
        assert got == pt["image"], k
        for coll, names in pt["indexes"].items():
            meta = open(os.path.join(out, lab["db"], coll + ".metadata.json")).read()
            assert all('"name": "%s"' % n in meta or '"name":"%s"' % n in meta for n in names), (coll, names)
        info = open(os.path.join(out, restore.RESTORE_INFO)).read()
        assert "Base Snapshot ID: %s\n" % lab["base"]["snapshot_id"] in info and "Segment IDs: " in info
        again = restore_request.run_restore(params(lab, target_dir=out, point_in_time=when))
        assert not again["changed"] and again["already_restored"]


def test_restore_into_mongodb_with_rename(lab):
    pt = lab["points"][2]
    to = lab["db"] + "_r"
    r = restore_request.run_restore(params(lab, target_mongodb={"uri": lab["uri"]},
                                           point_in_time={"t": pt["t"].time, "i": pt["t"].inc}, rename_databases={lab["db"]: to},
                                           include=[lab["db"] + ".*"],  # the head holds the whole shared server
                                           restore_info_file=str(lab["tmp"] / "mongo-restoreInfo.txt")))
    try:
        assert r["changed"]
        want = {ns.replace(lab["db"] + ".", to + ".", 1): docs for ns, docs in pt["image"].items()}
        assert source_image(lab["mc"], to) == want
    finally:
        lab["mc"].drop_database(to)


def test_a_transaction_is_all_or_nothing_at_every_point(lab):
    """At the cluster time of a transaction's events (all share it) and just before it: the total is whole."""
    js, keys, db = lab["js"], lab["keys"], lab["db"]
    segs = [s for s in segments.list_segments(js) if s["to"] > tuple(lab["base"]["cluster_time"])]
    txn_times, ops = [], set()
    for _s, recs in segments.read_segments(js, keys, segs):
        for t, i, raw in recs:
            ev = bson.decode(bytes(raw))
            ops.add(ev.get("operationType"))
            if "txnNumber" in ev and ev["ns"].get("coll") == "bank":  # an event from a transaction (not a correction)
                txn_times.append((t, i))
    assert len(set(txn_times)) >= 10 and len(txn_times) >= 2 * len(set(txn_times))  # two updates per transaction
    assert {"insert", "update", "replace", "delete", "create", "rename", "drop", "createIndexes",
            "dropIndexes"} <= ops, ops
    rnd = random.Random(9)
    picked = rnd.sample(sorted(set(txn_times)), 3)
    moved = False
    for k, point in enumerate(picked + [segments.prev_tick(p) for p in picked]):
        plan = segments.plan_point(js, keys, point)
        with point_in_time.rebuild(js, keys, plan, work_dir=str(lab["tmp"])) as image:
            folder = [p for p in lab["tmp"].iterdir() if p.name.startswith("kmipbackup-pitr-")][0]
            assert canary_hits(str(folder), CANARY) == []  # the temporary head holds no plaintext
            out = str(lab["tmp"] / ("bank%d" % k))
            restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest, include=[db + ".bank"]),
                            restore.DirectoryTarget(out))
        balances = [bson.decode(raw)["balance"] for raw in restored_image(out, db)[db + ".bank"].values()]
        assert len(balances) == ACCOUNTS and sum(balances) == ACCOUNTS * BALANCE, point
        moved = moved or balances != [BALANCE] * ACCOUNTS
    assert moved


def test_points_outside_the_window_are_refused_and_nothing_is_written(lab):
    base_t = lab["base"]["cluster_time"][0]
    out = str(lab["tmp"] / "outside")
    for when, near in (({"t": base_t - 100, "i": 1}, "earliest restorable time after it"),
                       ({"t": base_t + 10 ** 6, "i": 1}, "latest restorable time before it")):
        with pytest.raises(PointNotRestorable, match=near):
            restore_request.run_restore(params(lab, target_dir=out, point_in_time=when))
        assert not os.path.exists(out)
    with pytest.raises(PointNotRestorable, match="neither an ISO time"):
        restore_request.run_restore(params(lab, target_dir=out, point_in_time="yesterday"))
    with pytest.raises(ConfigError, match="newest at or before it"):
        restore_request.run_restore(params(lab, target_dir=out, snapshot="20200101T000000Z-00000000",
                                           point_in_time={"t": lab["points"][0]["t"].time, "i": lab["points"][0]["t"].inc}))
    assert not os.path.exists(out)


def test_tampered_or_missing_segment_is_named_and_nothing_is_written(lab):
    js = lab["js"]
    last = lab["points"][-1]["t"]
    when = {"t": last.time, "i": last.inc}
    segs = [s for s in segments.list_segments(js) if s["from"] >= tuple(lab["base"]["cluster_time"])]
    victim = segs[len(segs) // 2]
    path = os.path.join(lab["store"], JOB, "segments", victim["name"])
    saved = open(path, "rb").read()
    out = str(lab["tmp"] / "tampered")
    try:
        blob = bytearray(saved)
        blob[len(blob) // 2] ^= 0x40
        open(path, "wb").write(bytes(blob))
        with pytest.raises(IntegrityError, match=victim["name"]):
            restore_request.run_restore(params(lab, target_dir=out, point_in_time=when))
        assert not os.path.exists(out)
        mongo_to = lab["db"] + "_t"
        with pytest.raises(IntegrityError, match=victim["name"]):
            restore_request.run_restore(params(lab, target_mongodb={"uri": lab["uri"]},
                                               point_in_time=when, rename_databases={lab["db"]: mongo_to}))
        assert mongo_to not in lab["mc"].list_database_names()
        os.unlink(path)  # a gap from there on: the range ends before it
        with pytest.raises(PointNotRestorable, match="latest restorable time before it"):
            restore_request.run_restore(params(lab, target_dir=out, point_in_time=when))
        assert not os.path.exists(out)
    finally:
        open(path, "wb").write(saved)


def test_check_mode_plans_without_writing(lab):
    out = str(lab["tmp"] / "checked")
    t = lab["points"][0]["t"]
    r = restore_request.run_restore(params(lab, target_dir=out, point_in_time={"t": t.time, "i": t.inc}, show_namespaces=False),
                                    check_mode=True)
    assert r["changed"] and r["planned_from"] == "manifest" and r["segments"] >= 1 and r["point_in_time"]["t"] == t.time
    assert lab["db"] not in str(r) and CANARY not in str(r)  # encrypted: namespaces named #n
    assert not os.path.exists(out)


def test_restore_playbook_with_point_in_time(ansible, lab):
    pt = lab["points"][1]
    d = str(lab["tmp"] / "playbook")
    ev = dict(job=JOB, store=lab["store"], target_dir=d, config_dir=lab["no_config"],
              kmip_servers=["127.0.0.1:%d" % lab["kmip_port"]], kmip_ca_file=lab["pki"]["ca"],
              client_cert_file=lab["pki"]["clients"]["group1"]["pem"], point_in_time=point_in_time.iso_of(pt["t"].time))
    p = ansible.run_playbook(os.path.join(ROOT, "playbooks", "restore.yml"), extra_vars=ev)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "Consistent at cluster time %d, 4294967295" % pt["t"].time in out
    assert CANARY not in out
    assert restored_image(d, lab["db"]) == pt["image"]
    shutil.rmtree(d)
