"""A job whose snapshot store is an S3 bucket (object_store), end to end against real SeaweedFS, PyKMIP and SecantusDB
servers: declared with backup_job_encryption, run by the real Backup Daemon (snapshot, incremental, key rotation),
listed with snapshot_info, restored with snapshot_restore to MongoDB, a directory and an archive byte-equal to the
source, tamper and rollback detection through the modules, wrong credentials, and playbooks/restore.yml on a fresh
host with only the bucket's credentials, the KMIP server and a certificate. No plaintext canary in any object of the
bucket (each read back through boto3), and the secret key in no module output, status or log.

One job and one daemon serve every assertion (the suite runs on 2-core machines)."""
import os
import uuid

import boto3
import pymongo
from botocore.config import Config

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    job_config, job_status, master_keys, rawbson, storage, store)
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from daemon_helper import DaemonProcess, write_kmip_setup
from test_snapshot_modules import CANARY, SECRET, fill_source, read_archive, read_dir

BJ = "kmipbackup.mongodb.backup_job_encryption"
BS = "kmipbackup.mongodb.backup_snapshot"
SI = "kmipbackup.mongodb.snapshot_info"
SR = "kmipbackup.mongodb.snapshot_restore"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAW = CodecOptions(document_class=RawBSONDocument)
JOB = "s3job"


def s3(srv):
    return boto3.client("s3", endpoint_url=srv["endpoint"], aws_access_key_id=srv["access_key"],
                        aws_secret_access_key=srv["secret_key"], region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


def image(db):
    return {"%s.%s" % (db.name, c): {rawbson.id_key_from_document(r.raw): r.raw
                                     for r in db[c].with_options(codec_options=RAW).find()}
            for c in db.list_collection_names()}


def bucket_objects(srv, bucket):
    c, out, token = s3(srv), {}, None
    while True:
        page = c.list_objects_v2(Bucket=bucket, **({"ContinuationToken": token} if token else {}))
        for o in page.get("Contents", []):
            out[o["Key"]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated"):
            return out


def test_job_in_a_bucket_end_to_end(ansible, tmp_path, pki, kmip_server, mongo_server, s3_server):
    bucket = "kb-job-%s" % uuid.uuid4().hex[:10]
    s3(s3_server).create_bucket(Bucket=bucket)
    cd, dd = str(tmp_path / "etc"), str(tmp_path / "var")
    write_kmip_setup(cd, pki, kmip_server["port"])
    mc = pymongo.MongoClient(mongo_server["uri"])
    db = mc["s3_%d_%s" % (os.getpid(), uuid.uuid4().hex[:6])]  # its collections carry the canary
    fill_source(db)
    source1 = image(db)
    obj = {"bucket": bucket, "prefix": "kmipbackup/site-a", "endpoint_url": s3_server["endpoint"],
           "access_key": s3_server["access_key"], "secret_key": "{{ s3_secret }}"}  # from a variable, as from a vault
    declare = dict(job=JOB, group="group1", source={"uri": mongo_server["uri"], "connect_timeout": 3}, config_dir=cd,
                   data_dir=dd, object_store=obj, wait=True, wait_timeout=120)
    snap = {BS: dict(job=JOB, config_dir=cd, data_dir=dd, timeout=120)}
    reader = dict(job=JOB, config_dir=cd, object_store=obj)
    runs = []
    secret = {"s3_secret": s3_server["secret_key"]}
    with DaemonProcess(cd, dd) as d:
        r = ansible.run([{BJ: declare}], diff=True, extra_vars=secret)
        runs.append(r)
        assert r[0]["changed"] is True and r[0]["status"] == "STARTED" and not r[0].get("failed"), r.output[-3000:] + d.log_tail()
        old = r[0]["master_key_uid"]
        assert r[0]["diff"]["after"]["object_store"]["bucket"] == bucket
        assert r[0]["diff"]["after"]["object_store"]["secret_key"] != s3_server["secret_key"]

        # a full snapshot, then an incremental one after a small change
        r = ansible.run([snap], extra_vars=secret)
        s1 = r[0]["snapshot"]
        db["misc"].insert_many([{"_id": "%s-more-%d" % (CANARY, i), "v": i} for i in range(5)])
        source2 = image(db)
        r2 = ansible.run([snap], extra_vars=secret)
        s2 = r2[0]["snapshot"]
        runs += [r, r2]
        assert s1["encryption"] and s1["master_key_uids"] == [old], r.output
        assert 0 < s2["written_bytes"] < s2["stored_bytes"] / 2, (s1, s2)  # incremental: most chunks reused

        # restore the incremental one to the three targets, byte-equal
        new_db = "s3restored_%d" % os.getpid()
        out_dir, out_arch = str(tmp_path / "dir"), str(tmp_path / "arch" / "snap.archive")
        r = ansible.run([{SR: dict(reader, snapshot=s2["id"], target_dir=out_dir, include=[db.name + ".*"])},
                         {SR: dict(reader, snapshot=s2["id"], target_archive=out_arch, include=[db.name + ".*"])},
                         {SR: dict(reader, snapshot=s2["id"], target_mongodb={"uri": mongo_server["uri"]},
                                   include=[db.name + ".*"], rename_databases={db.name: new_db},
                                   restore_info_file=str(tmp_path / "info.txt"))},
                         {SI: reader}], extra_vars=secret)
        runs.append(r)
        assert [bool(x.get("failed")) for x in r.results] == [False] * 4, r.output[-4000:]
        assert read_dir(out_dir, db.name) == source2
        assert read_archive(out_arch)[0] == source2
        assert {ns.replace(new_db, db.name, 1): docs for ns, docs in image(mc[new_db]).items()} == source2
        listed = [s["id"] for s in r[3]["snapshots"]]
        assert listed.index(s1["id"]) < listed.index(s2["id"]) and all(s["authenticated"] for s in r[3]["snapshots"])

        # rotation: the next snapshot is under the new key; the first still restores with the old one
        r = ansible.run([{BJ: dict(declare, rotate_master_key=True)}, snap], extra_vars=secret)
        runs.append(r)
        assert r[0]["rotated"] is True and not r[1].get("failed"), r.output[-3000:] + d.log_tail()
        new = r[0]["master_key_uid"]
        assert new != old and r[1]["snapshot"]["master_key_uids"] == [new]
        r = ansible.run([{SR: dict(reader, snapshot=s1["id"], target_dir=str(tmp_path / "old"), include=[db.name + ".*"])}],
                        extra_vars=secret)
        runs.append(r)
        assert not r[0].get("failed") and sorted(r[0]["master_key_uids"]) == [old], r.output[-3000:]
        assert read_dir(str(tmp_path / "old"), db.name) == source1

        status = job_status.read_status(dd, JOB)
        assert status["state"] == "STARTED" and not status.get("last_error"), status
    daemon_text = "".join(open(f, errors="replace").read() for f in [d.log_file] + d.out_files if os.path.exists(f))

    prefix = "kmipbackup/site-a/%s/" % JOB
    # the bucket holds ciphertext only, every object under the job's prefix
    objects = bucket_objects(s3_server, bucket)
    assert objects and all(k.startswith("kmipbackup/site-a/") for k in objects)
    assert all(CANARY.encode() not in v and CANARY not in k for k, v in objects.items())

    # tamper (a chunk of s1 swapped with another chunk) and rollback (the newest catalog entry removed), through the modules
    cfg = job_config.load_job(cd, JOB)
    with master_keys.kmip_client(cd, "group1") as client:
        js = storage.job_store(cfg)
        manifest = js.read_manifest(s1["id"], store.Keys(js, provider=client, encryption=True))
    mine = [ch["id"] for n in manifest["namespaces"] if n["ns"].startswith(db.name + ".") for ch in n["chunks"]]
    victim = prefix + "chunks/%s/%s" % (mine[0][:2], mine[0])
    twin = next(ch["id"] for n in manifest["namespaces"] for ch in n["chunks"] if ch["id"] != mine[0])  # same key epoch
    other = prefix + "chunks/%s/%s" % (twin[:2], twin)
    c = s3(s3_server)
    c.put_object(Bucket=bucket, Key=victim, Body=objects[other])
    r = ansible.run([{SR: dict(reader, snapshot=s1["id"], target_dir=str(tmp_path / "tampered"), include=[db.name + ".*"])}],
                    extra_vars=secret)
    c.put_object(Bucket=bucket, Key=victim, Body=objects[victim])
    latest = sorted(k for k in objects if k.startswith(prefix + "catalog/"))[-1]
    c.delete_object(Bucket=bucket, Key=latest)
    rb = ansible.run([{SI: reader}], extra_vars=secret)
    c.put_object(Bucket=bucket, Key=latest, Body=objects[latest])
    runs += [r, rb]
    assert r[0]["failed"] and r[0]["error_kind"] == "chunk" and "chunk %s" % mine[0] in r[0]["msg"], r.output[-3000:]
    assert "failed authentication" in r[0]["msg"], r[0]["msg"]
    assert not os.path.exists(str(tmp_path / "tampered"))
    assert rb[0]["failed"] and "rollback" in rb[0]["msg"], rb.output[-3000:]

    # wrong credentials: a clear error naming endpoint and bucket, nothing written, the wrong secret nowhere
    wrong = "zqWrongSecret-%s" % uuid.uuid4().hex[:8]
    job_file = open(job_config.job_path(cd, JOB), "rb").read()
    r = ansible.run([{SI: reader}, {SR: dict(reader, target_dir=str(tmp_path / "denied"))},
                     {BJ: dict(declare, schedule={"interval_hours": 12}, wait=False)}], extra_vars={"s3_secret": wrong})
    runs.append(r)
    for x in r.results:
        assert x["failed"] and "refused the credentials" in x["msg"] and bucket in x["msg"] and s3_server["endpoint"] in x["msg"]
    assert not os.path.exists(str(tmp_path / "denied")) and wrong not in r.everything(invocation=True)
    assert open(job_config.job_path(cd, JOB), "rb").read() == job_file  # the declaration was refused, nothing written

    # the fresh-host runbook: only the bucket's credentials, the KMIP server and a certificate
    fresh = str(tmp_path / "fresh")
    ev = dict(job=JOB, object_store=dict(obj, secret_key=s3_server["secret_key"]), target_dir=fresh, config_dir=str(tmp_path / "no-config"),
              kmip_servers=["127.0.0.1:%d" % kmip_server["port"]], kmip_ca_file=pki["ca"],
              client_cert_file=pki["encrypted"]["pem"], client_cert_password=pki["encrypted"]["password"],
              include=[db.name + ".*"])
    p = ansible.run_playbook(os.path.join(ROOT, "playbooks", "restore.yml"), extra_vars=ev, verbosity=3)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert read_dir(fresh, db.name) == source2
    assert CANARY not in out and s3_server["secret_key"] not in out and SECRET not in out

    for x in runs:
        assert s3_server["secret_key"] not in x.everything(invocation=True), x.everything(invocation=True)[:2000]
        assert CANARY not in x.output
    assert s3_server["secret_key"] not in daemon_text and s3_server["secret_key"] not in str(status)
    mc.drop_database(new_db)
    mc.close()
