"""Snapshots and restores end to end: a real head (head.py), real KMIP (PyKMIP over mutual TLS),
a real MongoDB-wire target (SecantusDB), and kill -9 during a snapshot and during GC."""
import os
import signal
import subprocess
import sys
import time

import bson
import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, kmip, restore, snapshot, store
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, KmipError, RestoreError
from snapshot_helpers import all_types_docs, canary_hits, make_head, read_archive, split_docs, upsert_docs

CANARY = "QuokkaCanary77"
HERE = os.path.dirname(os.path.abspath(__file__))


def client_for(pki, kmip_server, grp="group1"):
    kc = config.KmipConfig(servers=["127.0.0.1:%d" % kmip_server["port"]], ca_file=pki["ca"])
    return kmip.KmipClient(kc, config.GroupConfig("g", pki["clients"][grp]["pem"]))


@pytest.fixture(scope="module")
def master_uid(pki, kmip_server):
    with client_for(pki, kmip_server) as c:
        return c.create_master_key("snapshot-restore-test")


@pytest.fixture(scope="module")
def job(tmp_path_factory, pki, kmip_server, master_uid):
    tmp = tmp_path_factory.mktemp("snapjob")
    ns = "shop_%s.orders_%s" % (CANARY, CANARY)
    docs = {ns: all_types_docs(CANARY), "shop_%s.bulk" % CANARY: [{"_id": i, "n": CANARY + str(i), "x": os.urandom(64)} for i in range(20000)]}
    h = make_head(str(tmp / "head" / "head.db"), docs, key=os.urandom(32),
                  indexes={ns: [{"v": 2, "key": {"str": 1, "date": -1}, "name": "str_date", "sparse": True}]})
    js = store.JobStore(str(tmp / "store"), "job-e2e")
    with client_for(pki, kmip_server) as c:
        e = snapshot.take_snapshot(h, js, store.Keys(js, c), "job-e2e", master_uid, True, target_bytes=256 << 10)
        first_calls = c.calls
    h.mark_snapshotted(e["change_seq"])
    return {"tmp": tmp, "head": h, "store": js, "entry": e, "ns": ns, "first_calls": first_calls}


def head_docs(h):
    with h.read() as r:
        return {n["ns"]: ([raw for _k, raw in r.scan(n["ns"])], n["indexes"]) for n in r.namespaces()}


def test_kmip_calls_o1_per_snapshot_and_per_epoch_restore(job, pki, kmip_server, master_uid):
    assert job["first_calls"] <= 4  # two data keys wrapped (chunk-id, snapshot key), nothing per chunk
    js, h = job["store"], job["head"]
    with client_for(pki, kmip_server) as c:
        keys = store.Keys(js, c)
        for i in range(2):
            with h.write() as w:
                upsert_docs(w, job["ns"], [{"_id": "new-%d" % i}])
            h.mark_snapshotted(snapshot.take_snapshot(h, js, keys, "job-e2e", master_uid, True, target_bytes=256 << 10)["change_seq"])
        assert c.calls <= 4  # one connection's worth: unwraps once, then cached
    with client_for(pki, kmip_server) as c:
        restore.restore(js, "latest", store.Keys(js, c), restore.DirectoryTarget(str(job["tmp"] / "calls")))
        assert c.calls <= 2  # one epoch: one unwrap of the snapshot key (and maybe its record check)


def test_restore_directory_archive_byte_equal(job, pki, kmip_server):
    js = job["store"]
    expect = head_docs(job["head"])
    with client_for(pki, kmip_server) as c:
        keys = store.Keys(js, c)
        out = job["tmp"] / "dir"
        restore.restore(js, "latest", keys, restore.DirectoryTarget(str(out)), kmip_servers=["127.0.0.1:%d" % kmip_server["port"]])
        arch = job["tmp"] / "a" / "dump.archive"
        restore.restore(js, "latest", keys, restore.ArchiveTarget(str(arch)))
    for ns, (docs, specs) in expect.items():
        db, coll = ns.split(".", 1)
        assert split_docs((out / db / (coll + ".bson")).read_bytes()) == docs
        meta = bson.json_util.loads((out / db / (coll + ".metadata.json")).read_text())
        assert meta["indexes"] == [bson.decode(s) for s in specs]
    info = (out / "restoreInfo.txt").read_text()
    assert "Encryption: enabled" in info and "Master Key UUID: " in info and "KMIP Server: 127.0.0.1" in info
    _h, metas, docs, crcs = read_archive(str(arch))
    assert {m["db"] + "." + m["collection"] for m in metas} == set(expect)
    for ns, (d, _s) in expect.items():
        assert docs[ns] == d
    assert restore.already_restored(js, "latest", restore.DirectoryTarget(str(out)))


def test_restore_mongodb_byte_equal_and_refuses_non_empty(job, pki, kmip_server, mongo_server):
    js = job["store"]
    expect = head_docs(job["head"])
    rename = {"shop_%s" % CANARY: "restored_e2e"}
    target = restore.MongoTarget(mongo_server["uri"])
    with client_for(pki, kmip_server) as c:
        keys = store.Keys(js, c)
        assert not restore.already_restored(js, "latest", target)
        restore.restore(js, "latest", keys, target, rename=rename)
        assert restore.already_restored(js, "latest", target)
        with pytest.raises(RestoreError) as e:
            restore.restore(js, "latest", keys, target, rename=rename)
        assert "not empty" in str(e.value) and "#1, #2" in str(e.value)  # encrypted: namespaces by position only
        assert CANARY not in str(e.value) and "restored_e2e" not in str(e.value)
        with pytest.raises(RestoreError) as e:
            restore.restore(js, "latest", keys, target, rename=rename, show_namespaces=True)
        assert "restored_e2e.bulk" in str(e.value)
    client = target.client()
    for ns, (docs, specs) in expect.items():
        coll = client["restored_e2e"][ns.split(".", 1)[1]]
        got = sorted(d.raw for d in coll.find({}))
        assert got == sorted(docs)
        idx = {i["name"]: (dict(i["key"]), i.get("sparse")) for i in coll.list_indexes()}
        assert idx == {s["name"]: (dict(s["key"]), s.get("sparse")) for s in map(bson.decode, specs)}
    target.close()


def test_other_identity_denied(job, pki, kmip_server):
    js = job["store"]
    with client_for(pki, kmip_server, "group2") as c:
        with pytest.raises(KmipError) as e:
            restore.restore(js, "latest", store.Keys(js, c), restore.DirectoryTarget(str(job["tmp"] / "denied")))
    assert e.value.kind in ("permission_denied", "not_found")
    assert not (job["tmp"] / "denied").exists()


def test_canary_absent_from_store(job):
    assert canary_hits(str(job["tmp"] / "store"), CANARY) == []


def test_tampered_chunk_leaves_mongodb_target_untouched(job, pki, kmip_server, mongo_server, tmp_path):
    import shutil
    root = tmp_path / "store"
    shutil.copytree(str(job["tmp"] / "store"), str(root))
    js = store.JobStore(str(root), "job-e2e")
    target = restore.MongoTarget(mongo_server["uri"])
    with client_for(pki, kmip_server) as c:
        keys = store.Keys(js, c)
        latest = js.catalog_entry("latest")
        manifest = js.read_manifest(latest["snapshot_id"], keys, latest["manifest_sha256"])
        cid = sorted(ch["id"] for n in manifest["namespaces"] for ch in n["chunks"])[-1]  # a chunk the restore needs
        chunk = root / "job-e2e" / "chunks" / cid[:2] / cid
        data = bytearray(chunk.read_bytes())
        data[-5] ^= 1
        chunk.write_bytes(bytes(data))
        with pytest.raises(IntegrityError) as e:
            restore.restore(js, "latest", keys, target, rename={"shop_%s" % CANARY: "tampered_e2e"})
    assert e.value.kind == "chunk" and e.value.object_id == chunk.name
    assert "tampered_e2e" not in target.client().list_database_names()
    target.close()


WORKER = r'''
import os, sys, time
sys.path[:0] = sys.argv[1].split(os.pathsep)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, head, kmip, snapshot, store
from snapshot_helpers import upsert_docs
port, ca, pem, uid, head_path, head_key, root, mode = sys.argv[2:10]
c = kmip.KmipClient(config.KmipConfig(servers=["127.0.0.1:" + port], ca_file=ca), config.GroupConfig("g", pem))
js = store.JobStore(root, "killjob")
keys = store.Keys(js, c)
h = head.Head(head_path, bytes.fromhex(head_key))
print("ready", flush=True)
i = 0
while True:
    i += 1
    if mode == "snapshot":
        with h.write() as w:
            upsert_docs(w, "k.c", [{"_id": 10 ** 6 + i, "x": os.urandom(3000)}]
                        + [{"_id": j, "x": os.urandom(200)} for j in range(i * 50, i * 50 + 400)])
        e = snapshot.take_snapshot(h, js, keys, "killjob", uid, True, target_bytes=32 << 10)
        h.mark_snapshotted(e["change_seq"])
    else:
        for e in js.catalog()[:-1]:
            js.delete_snapshot(e["snapshot_id"])
        js.gc(keys, grace_seconds=0)
'''


@pytest.mark.parametrize("mode", ["snapshot", "gc"])
def test_kill_9_every_listed_snapshot_restores(mode, tmp_path, pki, kmip_server, master_uid):
    key = os.urandom(32)
    hp = str(tmp_path / "head" / "head.db")
    h = make_head(hp, {"k.c": [{"_id": i, "x": os.urandom(200)} for i in range(5000)]}, key=key)
    js = store.JobStore(str(tmp_path / "store"), "killjob")
    with client_for(pki, kmip_server) as c:
        for _ in range(3):
            with h.write() as w:
                upsert_docs(w, "k.c", [{"_id": int.from_bytes(os.urandom(2), "big"), "x": os.urandom(100)}])
            h.mark_snapshotted(snapshot.take_snapshot(h, js, store.Keys(js, c), "killjob", master_uid, True,
                                                      target_bytes=32 << 10)["change_seq"])
    h.close()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    paths = os.pathsep.join([p for p in sys.path if p] + [os.path.dirname(HERE)])
    for delay in (0.3, 0.7, 1.1):
        p = subprocess.Popen([sys.executable, str(script), paths, str(kmip_server["port"]), pki["ca"],
                              pki["clients"]["group1"]["pem"], master_uid, hp, key.hex(), str(tmp_path / "store"), mode],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout.readline().strip() == b"ready", p.stderr.read()
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
    entries = js.catalog()
    assert entries
    with client_for(pki, kmip_server) as c:
        keys = store.Keys(js, c)
        for i, e in enumerate(entries):
            restore.restore(js, e["snapshot_id"], keys, restore.DirectoryTarget(str(tmp_path / ("r%d" % i))))
        js.gc(keys, grace_seconds=0, stale_seconds=0)
        restore.restore(js, "latest", keys, restore.DirectoryTarget(str(tmp_path / "after-gc")))
