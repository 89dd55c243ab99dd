"""Verified copies of a job's snapshots between stores (store_copy, snapshot_copy), against a real S3 server
(SeaweedFS, the s3_server fixture), a real PyKMIP server for the snapshots' keys, and real heads: folder to bucket and
bucket to folder with byte-equal restores from each, idempotence, a tampered source refused, a copy killed midway,
the keyed copy's own head and retention, rollback detection at the destination, and the module through Ansible."""
import datetime
import os
import signal
import subprocess
import sys
import uuid

import boto3
import pytest
from botocore.config import Config

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    ansible_module, config, job_config, kmip, objectstore, restore, snapshot, store, store_copy)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError, IntegrityError, StoreError
from ansible_collections.kmipbackup.mongodb.plugins.modules import snapshot_copy
from daemon_helper import write_kmip_setup
from snapshot_helpers import all_types_docs, make_head, upsert_docs

CANARY = "CopyCanaryHeron"


def client_for(pki, kmip_server):
    kc = config.KmipConfig(servers=["127.0.0.1:%d" % kmip_server["port"]], ca_file=pki["ca"])
    return kmip.KmipClient(kc, config.GroupConfig("g", pki["clients"]["group1"]["pem"]))


def s3(srv, bucket, prefix="offsite"):
    return objectstore.S3Storage(bucket, prefix, endpoint_url=srv["endpoint"], access_key=srv["access_key"],
                                 secret_key=srv["secret_key"])


@pytest.fixture
def bucket(s3_server):
    name = "kbc-%s" % uuid.uuid4().hex[:12]
    boto3.client("s3", endpoint_url=s3_server["endpoint"], aws_access_key_id=s3_server["access_key"],
                 aws_secret_access_key=s3_server["secret_key"], region_name="us-east-1",
                 config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def master_uid(pki, kmip_server):
    with client_for(pki, kmip_server) as c:
        return c.create_master_key("store-copy-test")


def docs(n, start=0):
    return [{"_id": start + i, "pad": os.urandom(100).hex(), "v": start + i} for i in range(n)]


def source(tmp_path, pki, kmip_server, master_uid, snapshots=2, job="orders"):
    """A folder store with `snapshots` snapshots of one head (each after a 1% change), written through real KMIP."""
    js = store.JobStore(str(tmp_path / "src"), job)
    h = make_head(str(tmp_path / "head" / "head.db"), {"db_%s.c" % CANARY: all_types_docs(CANARY), "shop.big": docs(3000)},
                  key=os.urandom(32))
    ids = []
    with client_for(pki, kmip_server) as c:
        for i in range(snapshots):
            if i:
                with h.write() as w:
                    upsert_docs(w, "shop.big", docs(30, start=3000 + 30 * i))
            e = snapshot.take_snapshot(h, js, store.Keys(js, c), job, master_uid, True, target_bytes=32 << 10)
            h.mark_snapshotted(e["change_seq"])
            ids.append(e["snapshot_id"])
    return js, ids


def restored(tmp_path, pki, kmip_server, js, sid, name):
    """{relative path: bytes} of a directory restore of sid from js (the core restore, every object authenticated)."""
    out = tmp_path / name
    with client_for(pki, kmip_server) as c:
        restore.restore(js, sid, store.Keys(js, c), restore.DirectoryTarget(str(out)))
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "restoreInfo.txt"}


def objects(storage, job):
    """{path: bytes} of every object of a job's area (pending markers aside)."""
    out, stack = {}, [job]
    while stack:
        folder = stack.pop()
        for name in storage.list(folder):
            path = folder + "/" + name
            if not storage.exists(path) or os.path.isdir(os.path.join(getattr(storage, "root", ""), path)):
                stack.append(path)  # a folder (an object store has no folder object)
            elif not path.startswith(job + "/pending"):
                out[path] = storage.get(path)
    return out


def test_folder_to_bucket_to_folder_byte_equal_and_idempotent(tmp_path, pki, kmip_server, master_uid, s3_server, bucket):
    src, ids = source(tmp_path, pki, kmip_server, master_uid)
    dst = s3(s3_server, bucket)
    # check mode: the plan, nothing written
    plan = store_copy.copy_snapshots(src.storage, dst, "orders", check=True)
    assert plan["changed"] and plan["snapshots"] == ids and plan["objects"]["manifests"] == 2 and plan["bytes"] > 0
    assert plan["head"] == "copied" and not plan["authenticated"]
    assert dst.list("") == []
    # the copy: keyless (no KMIP), the head copied verbatim, every object byte-equal
    r = store_copy.copy_snapshots(src.storage, dst, "orders")
    assert r["changed"] and r["snapshots"] == ids and r["objects"]["catalog"] == 2 and r["head"] == "copied"
    assert r["objects"]["chunks"] == plan["objects"]["chunks"] and r["bytes"] >= plan["bytes"]
    assert objects(dst, "orders") == objects(src.storage, "orders")
    assert store.check_format(dst)["format"] == "kmipbackup-store"
    dst_js = store.JobStore(dst, "orders")
    for sid in ids:
        assert restored(tmp_path, pki, kmip_server, dst_js, sid, "b-" + sid) == restored(tmp_path, pki, kmip_server, src, sid, "s-" + sid)
    # idempotent: a second run copies nothing
    again = store_copy.copy_snapshots(src.storage, dst, "orders")
    assert not again["changed"] and again["snapshots"] == [] and sum(again["objects"].values()) == 0 and again["head"] == "unchanged"
    assert not store_copy.copy_snapshots(src.storage, dst, "orders", check=True)["changed"]
    # and back: bucket -> another folder, restores byte-equal with the source's
    back = store.FileStorage(str(tmp_path / "back"))
    store_copy.copy_snapshots(dst, back, "orders")
    back_js = store.JobStore(back, "orders")
    for sid in ids:
        assert restored(tmp_path, pki, kmip_server, back_js, sid, "f-" + sid) == restored(tmp_path, pki, kmip_server, src, sid, "s2-" + sid)
    assert restored(tmp_path, pki, kmip_server, back_js, "latest", "f-latest") == restored(tmp_path, pki, kmip_server, src, ids[-1], "s-l")


def test_mirror_follows_the_source_and_detects_rollback_at_the_destination(tmp_path, pki, kmip_server, master_uid, s3_server, bucket):
    src, ids = source(tmp_path, pki, kmip_server, master_uid, snapshots=3)
    dst = s3(s3_server, bucket)
    # without keys, a selection that leaves out a snapshot the source's head lists cannot have a head
    with pytest.raises(StoreError, match="snapshots=all"):
        store_copy.copy_snapshots(src.storage, dst, "orders", snapshots="latest")
    store_copy.copy_snapshots(src.storage, dst, "orders")
    dst_js = store.JobStore(dst, "orders")
    # an entry removed at the destination is a rollback there, as at the source
    saved = dst.get("orders/catalog/%s.json" % ids[1])
    dst.delete("orders/catalog/%s.json" % ids[1])
    with client_for(pki, kmip_server) as c, pytest.raises(IntegrityError, match="removed from the store"):
        dst_js.resolve(ids[1], store.Keys(dst_js, c))
    dst.put_atomic("orders/catalog/%s.json" % ids[1], saved)
    # the source expires its oldest: the next copy replaces the head, then drops the entry
    with client_for(pki, kmip_server) as c:
        src.expire_snapshots([ids[0]], store.Keys(src, c))
    r = store_copy.copy_snapshots(src.storage, dst, "orders")
    assert r["expired"] == [ids[0]] and r["head"] == "copied" and r["changed"]
    assert sorted(sid for sid, _ in dst_js.catalog_files()) == sorted(ids[1:])  # (ids of one second sort by their random part)
    # an expired entry put back at the destination is refused, as at the source
    dst.put_atomic("orders/catalog/%s.json" % ids[0], src.storage.get("orders/catalog/%s.json" % ids[1]).replace(
        ids[1].encode(), ids[0].encode()))
    with client_for(pki, kmip_server) as c, pytest.raises(IntegrityError):
        dst_js.resolve(ids[0], store.Keys(dst_js, c))
    dst.delete("orders/catalog/%s.json" % ids[0])
    # a source whose head is older than the copy's (rolled back, or another store) never rolls the copy back
    with client_for(pki, kmip_server) as c:
        src.expire_snapshots([ids[1]], store.Keys(src, c))
    store_copy.copy_snapshots(src.storage, dst, "orders")
    newer = src.storage.get("orders/catalog-head.json")
    src.storage.put_atomic("orders/catalog-head.json", newer.replace(b'"seq":3,', b'"seq":2,'))
    with pytest.raises(StoreError, match="newer .*than the source's"):
        store_copy.copy_snapshots(src.storage, dst, "orders")
    src.storage.put_atomic("orders/catalog-head.json", newer)
    # a retention of the destination's own needs keys
    with pytest.raises(StoreError, match="KMIP access"):
        store_copy.copy_snapshots(src.storage, dst, "orders", keep_last=1)


def test_tampered_source_and_a_different_destination_object_are_refused(tmp_path, pki, kmip_server, master_uid, s3_server, bucket):
    src, ids = source(tmp_path, pki, kmip_server, master_uid)
    dst = s3(s3_server, bucket)
    # a manifest that does not match its catalog entry: refused without keys, nothing visible at the destination
    path = "orders/manifests/%s" % ids[0]
    good = src.storage.get(path)
    src.storage.put_atomic(path, good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="manifest %s does not match its catalog entry" % ids[0]):
        store_copy.copy_snapshots(src.storage, dst, "orders")
    assert dst.list("") == []  # refused before anything was written
    src.storage.put_atomic(path, good)
    # a chunk modified at the source: its format is checked without keys; with keys its AEAD tag is
    chunk = sorted(src.chunk_ids())[0]
    cpath = src.chunk_path(chunk)
    cgood = src.storage.get(cpath)
    src.storage.put_atomic(cpath, cgood[:-1] + bytes([cgood[-1] ^ 1]))
    with client_for(pki, kmip_server) as c, pytest.raises(IntegrityError, match="chunk %s" % chunk):
        store_copy.copy_snapshots(src.storage, s3(s3_server, bucket, "keyed"), "orders", provider=c)
    src.storage.put_atomic(cpath, b"KBC1\x04junk")
    with pytest.raises(IntegrityError, match="chunk %s has an unknown format" % chunk):
        store_copy.copy_snapshots(src.storage, s3(s3_server, bucket, "keyless"), "orders")
    src.storage.put_atomic(cpath, cgood)
    # an object at the destination that differs from the source's: an error naming it
    store_copy.copy_snapshots(src.storage, dst, "orders")
    dst.put_atomic("orders/keyring/snapshot-1.json", dst.get("orders/keyring/snapshot-1.json") + b" ")
    with pytest.raises(IntegrityError, match="keyring entry snapshot-1 differs between the source and the destination"):
        store_copy.copy_snapshots(src.storage, dst, "orders")
    dst.put_atomic("orders/keyring/snapshot-1.json", src.storage.get("orders/keyring/snapshot-1.json"))
    entry = "orders/catalog/%s.json" % ids[0]
    dst.put_atomic(entry, dst.get(entry).replace(b'"type":"', b'"type":"x'))
    with pytest.raises(IntegrityError, match="catalog entry %s differs" % ids[0]):
        store_copy.copy_snapshots(src.storage, dst, "orders")
    dst.put_atomic(entry, src.storage.get(entry))
    dst.put_atomic(cpath, cgood + b"x")
    with pytest.raises(IntegrityError, match="chunk %s differs" % chunk):
        store_copy.copy_snapshots(src.storage, dst, "orders")
    dst.put_atomic(cpath, cgood)
    assert not store_copy.copy_snapshots(src.storage, dst, "orders")["changed"]


KILLER = """
import os, signal, sys
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import objectstore, store, store_copy
srv = dict(zip(("endpoint", "access_key", "secret_key", "bucket"), sys.argv[2:6]))
dst = (objectstore.S3Storage(srv["bucket"], "offsite", endpoint_url=srv["endpoint"], access_key=srv["access_key"],
                             secret_key=srv["secret_key"]) if srv["bucket"] != "-" else store.FileStorage(sys.argv[6]))
put, count = dst.put_atomic, [0]
def dying_put(path, data, sync=True):
    count[0] += 1
    if count[0] == int(sys.argv[7]):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the copy: no cleanup runs
    return put(path, data, sync)
dst.put_atomic = dying_put
store_copy.copy_snapshots(store.FileStorage(sys.argv[1]), dst, "orders")
"""


@pytest.mark.parametrize("to_bucket", [True, False], ids=["to-bucket", "to-folder"])
def test_a_copy_killed_midway_leaves_nothing_visible_and_the_next_completes(tmp_path, pki, kmip_server, master_uid, s3_server, bucket,
                                                                            to_bucket):
    src, ids = source(tmp_path, pki, kmip_server, master_uid)
    dst = s3(s3_server, bucket) if to_bucket else store.FileStorage(str(tmp_path / "dest"))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    p = subprocess.run([sys.executable, str(script), src.storage.root, s3_server["endpoint"], s3_server["access_key"],
                        s3_server["secret_key"], bucket if to_bucket else "-", str(tmp_path / "dest"), "20"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    dst_js = store.JobStore(dst, "orders")
    # the 20th write kills it: of the 19 before, 7 may still be in flight in the other threads, 3 are not chunks
    assert len(list(dst_js.chunk_ids())) >= 9 and dst_js.catalog() == [] and dst_js.read_head() is None
    with client_for(pki, kmip_server) as c, pytest.raises(StoreError, match="has no snapshot"):
        dst_js.resolve("latest", store.Keys(dst_js, c))
    r = store_copy.copy_snapshots(src.storage, dst, "orders")
    assert r["snapshots"] == ids and r["skipped"] >= 5 and r["head"] == "copied"
    assert restored(tmp_path, pki, kmip_server, dst_js, "latest", "b") == restored(tmp_path, pki, kmip_server, src, ids[-1], "s")


def test_keyed_copy_has_its_own_head_and_retention(tmp_path, pki, kmip_server, master_uid, s3_server, bucket):
    src, ids = source(tmp_path, pki, kmip_server, master_uid, snapshots=3)
    dst = s3(s3_server, bucket)
    dst_js = store.JobStore(dst, "orders")
    with client_for(pki, kmip_server) as c:
        first = store_copy.copy_snapshots(src.storage, dst, "orders", snapshots=[ids[0]], provider=c)
        assert first["authenticated"] and first["snapshots"] == [ids[0]] and first["head"] == "written"
        assert [sid for _seq, sid in dst_js.catalog_head(store.Keys(dst_js, c))["live"]] == [ids[0]]
        later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=2)  # past GC's grace period
        r = store_copy.copy_snapshots(src.storage, dst, "orders", snapshots="latest", provider=c, keep_last=1, now=later)
        assert r["snapshots"] == [ids[2]] and r["expired"] == [ids[0]] and r["live"] == [ids[2]]
        assert r["gc"]["chunks_referenced"] > 0
        head = dst_js.catalog_head(store.Keys(dst_js, c))
        assert [sid for _seq, sid in head["live"]] == [ids[2]] and head["seq"] == 3
        # only the chunks the copied snapshot references are there
        m = dst_js.read_manifest(ids[2], store.Keys(dst_js, c))
        assert set(dst_js.chunk_ids()) == {ch["id"] for n in m["namespaces"] for ch in n["chunks"]}
        again = store_copy.copy_snapshots(src.storage, dst, "orders", snapshots="latest", provider=c, keep_last=1)
        assert not again["changed"]
        # the schedule's rules keep every young snapshot
        r = store_copy.copy_snapshots(src.storage, dst, "orders", provider=c, schedule={"interval_hours": 6},
                                      now=datetime.datetime.now(datetime.timezone.utc))
        assert r["snapshots"] == ids[:2] and r["expired"] == [] and r["live"] == ids
    for sid in ids:
        assert restored(tmp_path, pki, kmip_server, dst_js, sid, "b-" + sid) == restored(tmp_path, pki, kmip_server, src, sid, "s-" + sid)
    # the destination's own head detects a removed entry
    dst.delete("orders/catalog/%s.json" % ids[1])
    with client_for(pki, kmip_server) as c, pytest.raises(IntegrityError, match="removed from the store"):
        dst_js.resolve(ids[1], store.Keys(dst_js, c))


def test_module_check_mode_copy_idempotence_and_secrets(ansible, tmp_path, pki, kmip_server, master_uid, s3_server, bucket):
    src, ids = source(tmp_path, pki, kmip_server, master_uid)
    offsite = {"bucket": bucket, "prefix": "mod", "endpoint_url": s3_server["endpoint"], "access_key": s3_server["access_key"],
               "secret_key": s3_server["secret_key"]}
    base = {"job": "orders", "store": src.storage.root, "config_dir": str(tmp_path / "no-config"), "dest_object_store": offsite}
    task = {"kmipbackup.mongodb.snapshot_copy": base}
    kmip_access = {"kmip_servers": ["127.0.0.1:%d" % kmip_server["port"]], "kmip_ca_file": pki["ca"],
                   "client_cert_file": pki["clients"]["group1"]["pem"]}
    checked = ansible.run([task], check=True)
    plan = checked[0]
    assert not plan.get("failed"), plan
    assert plan["changed"] and plan["snapshots"] == ids and plan["objects"]["manifests"] == 2 and plan["bytes"] > 0
    dst = s3(s3_server, bucket, "mod")
    assert dst.list("") == []  # check mode wrote nothing
    r = ansible.run([task, task,
                     {"kmipbackup.mongodb.snapshot_copy": dict(base, snapshots=["latest"])},
                     {"kmipbackup.mongodb.snapshot_copy": dict(base, dest_retention={"keep_last": 1})},
                     {"kmipbackup.mongodb.snapshot_copy": dict(base, dest_store=str(tmp_path / "x"))},
                     {"kmipbackup.mongodb.snapshot_copy": dict(base, authenticate=True, dest_retention={"keep_last": 1},
                                                               **kmip_access)}])
    assert r[0]["changed"] and r[0]["snapshots"] == ids and r[0]["head"] == "copied" and r[0]["source"] == src.storage.root
    assert r[0]["dest"] == "s3://%s/mod" % bucket and r[0]["bytes"] >= plan["bytes"]
    assert not r[1]["changed"] and r[1]["snapshots"] == [] and r[1]["skipped"] > 0  # idempotent
    assert not r[2]["changed"]  # the latest is there, and so is every snapshot the source's head lists
    assert r[3]["failed"] and "KMIP access" in r[3]["msg"]
    assert r[4]["failed"] and "mutually exclusive" in r[4]["msg"]
    assert r[5]["changed"] and r[5]["authenticated"] and r[5]["expired"] == [ids[0]] and r[5]["head"] == "written", r[5]
    assert s3_server["secret_key"] not in r.everything()
    dst_js = store.JobStore(dst, "orders")
    assert restored(tmp_path, pki, kmip_server, dst_js, "latest", "m") == restored(tmp_path, pki, kmip_server, src, ids[-1], "s")


def request(**kw):
    """snapshot_copy's parameters: its whole argument spec's defaults (shared options included), then kw."""
    spec = ansible_module.full_spec(snapshot_copy.argument_spec, snapshot_copy.SHARED)
    return dict({name: opt.get("default") for name, opt in spec.items()}, **kw)


def test_copy_request_from_a_daemon_hosts_configuration(tmp_path, pki, kmip_server, master_uid):
    """The flow on a daemon host: the source is the job's configured store, KMIP access and the retention schedule
    come from config_dir."""
    src, ids = source(tmp_path, pki, kmip_server, master_uid, snapshots=3)
    cd = str(tmp_path / "etc")
    write_kmip_setup(cd, pki, kmip_server["port"])
    schedule = dict(job_config.SCHEDULE_DEFAULTS, recent_days=2)
    job_config.write_job(cd, {"job": "orders", "group": "group1", "source": dict(job_config.SOURCE_DEFAULTS, uri="mongodb://x"),
                              "encryption": True, "master_key_uid": master_uid, "previous_master_key_uids": [],
                              "store": src.storage.root, "state": "present", "generation": 1, "schedule": schedule})
    dest = str(tmp_path / "dest")
    r = store_copy.copy_request(request(job="orders", config_dir=cd, dest_store=dest), check_mode=True)
    assert r["source"] == src.storage.root and r["snapshots"] == ids and not os.path.exists(dest)
    r = store_copy.copy_request(request(job="orders", config_dir=cd, dest_store=dest, snapshots=["latest"], authenticate=True,
                                        dest_retention={"keep_last": None, "schedule": "job"}))
    assert r["authenticated"] and r["snapshots"] == ids[-1:] and r["head"] == "written"
    with pytest.raises(StoreError, match="same store"):
        store_copy.copy_request(request(job="orders", config_dir=cd, dest_store=src.storage.root))
    with pytest.raises(StoreError, match="authenticate needs KMIP access"):
        store_copy.copy_request(request(job="orders", config_dir=str(tmp_path / "none"), store=src.storage.root,
                                        dest_store=dest, authenticate=True))
    with pytest.raises(StoreError, match="not declared"):
        store_copy.copy_request(request(job="orders", config_dir=str(tmp_path / "none"), dest_store=dest))
    with pytest.raises(ConfigError, match="interval_hours"):
        store_copy.copy_request(request(job="orders", config_dir=cd, dest_store=dest, authenticate=True,
                                        dest_retention={"keep_last": None, "schedule": {"interval_hours": 5}}))
    with pytest.raises(StoreError, match="give all, latest, or a list"):
        store_copy.copy_request(request(job="orders", config_dir=cd, dest_store=dest, snapshots=["all", ids[0]]))
