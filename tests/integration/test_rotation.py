"""Master key rotation end to end: backup_job_encryption (rotate_master_key, retire_master_keys, revoke) through
real ansible-playbook runs, the real Backup Daemon, PyKMIP and SecantusDB. Snapshots taken before and after a
rotation restore byte-equal; a key that a retained snapshot needs cannot be retired; once none does, it can
(and revoked, it is no longer active in KMIP).

The job backs up a whole deployment (cluster-wide change streams), so it gets a SecantusDB server of its own:
every namespace of its snapshots is then this test's, and which master keys they need is exact."""
import os
import time
import uuid

import pymongo
import pytest
from bson.objectid import ObjectId

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    config, datadir, files, head, job_config, job_requests, kmip, master_keys, rawbson, restore, store, timeutil)
from daemon_helper import DaemonProcess, write_kmip_setup
from snapshot_helpers import canary_hits, restored_image, source_image
import kmipbackup_lab as lab

BJ = "kmipbackup.mongodb.backup_job_encryption"


@pytest.fixture(scope="module")
def own_mongo(tmp_path_factory):
    info = lab.start_mongo_server(str(tmp_path_factory.mktemp("rotmongo")))
    yield info
    lab.stop(info["pid"])


def task(cd, dd, job, uri, **kw):
    args = dict(job=job, group="group1", source={"uri": uri, "connect_timeout": 3}, config_dir=cd, data_dir=dd)
    args.update(kw)
    return {BJ: args}


def wait_applied(d, job, session, timeout=60):
    """Wait until the daemon's head has applied everything up to the session's last operation."""
    t = session.operation_time
    assert t is not None
    # complete_cluster_time, not cluster_time (the last event applied): the stand-in may answer with an operationTime
    # past the session's last write (a later tick of its clock), which no event ever reaches
    d.wait_status(job, lambda s: s.get("consistent") and s.get("complete_cluster_time")
                  and tuple(s["complete_cluster_time"]) >= (t.time, t.inc), timeout=timeout)


def snapshot(dd, job):
    rid = job_requests.submit_request(dd, job, "snapshot")
    return job_requests.wait_answer(dd, job, rid, timeout=60)


def restore_dir(cd, root, job, sid, folder, dbname):
    """Restore snapshot sid of the job with a fresh KMIP session; returns (image, KMIP calls, summary)."""
    with kmip.KmipClient(config.load_kmip_config(cd), config.load_group(cd, "group1")) as client:
        keys = store.Keys(store.JobStore(root, job), provider=client, encryption=True)
        summary = restore.restore(store.JobStore(root, job), sid, keys, restore.DirectoryTarget(folder), include=[dbname + ".*"])
        return restored_image(folder, dbname), client.calls, summary


def probe_key(cd):
    with master_keys.kmip_client(cd, "group1") as c:
        return int(c.create_master_key("kmipbackup-test-probe"))


def test_rotate_restore_old_and_new_then_retire(ansible, tmp_path, pki, kmip_server, own_mongo):
    started = time.monotonic()
    cd, dd = str(tmp_path / "etc"), str(tmp_path / "data")
    root = os.path.join(dd, "store")
    write_kmip_setup(cd, pki, kmip_server["port"], groups=("group1",))
    tag = uuid.uuid4().hex[:8]
    job, dbname = "rot-%s" % tag, "kbrot%s" % tag
    uri = own_mongo["uri"]
    mc = pymongo.MongoClient(uri)
    mc[dbname]["a"].insert_many([{"_id": ObjectId(), "n": i, "pad": "a" * 64} for i in range(300)])
    mc[dbname]["c"].insert_many([{"_id": i, "v": -i} for i in range(50)])
    canary = "ROTCANARY%s" % tag
    mc[dbname]["c"].insert_one({"_id": canary, "v": canary})
    js = store.JobStore(root, job)
    job_file = job_config.job_path(cd, job)

    with DaemonProcess(cd, dd) as d:
        r = ansible.run([task(cd, dd, job, uri, wait=True, wait_timeout=90)])
        assert r[0]["changed"] is True and r[0]["status"] == "STARTED", r[0].get("msg") or d.log_tail()
        old = r[0]["master_key_uid"]
        assert r[0]["master_key_uids_needed"] in ([], [old]) and r[0]["rotated"] is False

        # a scheduled snapshot is due at once; then one on demand: both under the old master key
        d.wait_status(job, lambda s: s.get("last_snapshot"), timeout=60)
        s1 = snapshot(dd, job)
        image1 = source_image(mc, dbname)
        assert s1["master_key_uids"] == [old]
        s0 = [e["snapshot_id"] for e in js.catalog() if e["snapshot_id"] != s1["id"]]
        assert len(s0) == 1

        # check mode: changed, but no KMIP key created (UIDs of this server are sequential: the probe
        # keys around the run are consecutive) and the job file untouched
        before = files.read_bytes(job_file)
        p1 = probe_key(cd)
        r = ansible.run([dict(task(cd, dd, job, uri, rotate_master_key=True), check_mode=True)], diff=True)
        p2 = probe_key(cd)
        chk = r[0]
        assert chk["changed"] is True and chk["rotated"] is True and not chk.get("failed"), chk
        assert chk["master_key_uid"] == "(created at apply)" and chk["previous_master_key_uids"] == [old]
        assert chk["diff"]["before"]["master_key_uid"] == old
        assert p2 == p1 + 1, "check mode created a KMIP key"
        assert files.read_bytes(job_file) == before

        # rotate for real; wait: the daemon restarts the job under the new key (no new initial sync)
        old_head_record = files.read_json(os.path.join(datadir.head_dir(dd, job, 1), "headkey.json"))
        r = ansible.run([task(cd, dd, job, uri, rotate_master_key=True, wait=True, wait_timeout=60)])
        rot = r[0]
        assert rot["changed"] is True and rot["rotated"] is True and rot["status"] == "STARTED", rot.get("msg") or d.log_tail()
        new = rot["master_key_uid"]
        assert int(new) > p2 and rot["previous_master_key_uids"] == [old] and rot["job"]["previous_master_key_uids"] == [old]
        assert rot["master_key_uids_needed"] == [old]
        cfg = job_config.load_job(cd, job)
        assert cfg["master_key_uid"] == new and cfg["previous_master_key_uids"] == [old] and cfg["generation"] == 1
        with master_keys.kmip_client(cd, "group1") as c:
            info = c.key_info(new)
            assert info["state"] == "ACTIVE" and info["name"].startswith("kmipbackup-%s-" % job)
            assert c.key_info(old)["state"] == "ACTIVE"
        headkey = os.path.join(datadir.head_dir(dd, job, 1), "headkey.json")
        assert timeutil.wait_for(lambda: files.read_json(headkey)["wrapped"]["master_key_uid"] == new, 30), d.log_tail()
        assert files.read_json(headkey)["rekeyed_from"] == old
        st = d.status(job)
        assert st["master_key_uid"] == new and st["initial_syncs"] == 1, st
        assert st["last_rekey"]["head_bytes"] > 0 and not st.get("rekey"), st
        # the head was re-encrypted under a new head key: the old master key's head key no longer opens it
        head_db = os.path.join(datadir.head_dir(dd, job, 1), "head.db")
        with master_keys.kmip_client(cd, "group1") as c:
            old_head_key = c.unwrap(old_head_record["wrapped"])
            new_head_key = c.unwrap(files.read_json(headkey)["wrapped"])
        with pytest.raises(head.HeadError, match="cannot be read with this job's key"):
            head.Head(head_db, old_head_key)
        with head.Head(head_db, new_head_key) as h, h.read() as r:
            assert r.count(dbname + ".a") == 300
            assert r.get(dbname + ".c", rawbson.id_key_from_value(canary)) is not None
        # the rekey wrote no plaintext anywhere in the data folder (the re-encrypted head, its temporary folder)
        assert canary_hits(dd, canary) == []

        # more data, in a new collection only: the first snapshot of the new epoch rewrites every chunk under the new key
        with mc.start_session() as s:
            mc[dbname]["b"].insert_many([{"_id": "b-%d" % i, "v": i} for i in range(100)], session=s)
            wait_applied(d, job, s)
        s2 = snapshot(dd, job)
        image2 = source_image(mc, dbname)
        assert set(image2) == set(image1) | {dbname + ".b"}
        assert s2["master_key_uids"] == [new]
        epochs = {(rec["epoch"], rec["purpose"]): rec["master_key_uid"] for rec in js.keyring_records()}
        assert epochs == {(1, "chunk_id"): old, (1, "snapshot"): old, (2, "chunk_id"): new, (2, "snapshot"): new}
        catalog = {e["snapshot_id"]: e for e in js.catalog()}
        assert catalog[s1["id"]]["master_key_uids"] == [old] and catalog[s2["id"]]["master_key_uids"] == [new]

        # both restore, byte-equal to the source at each snapshot, each with one unwrap per key epoch it spans
        got1, calls1, sum1 = restore_dir(cd, root, job, s1["id"], str(tmp_path / "r1"), dbname)
        got2, calls2, sum2 = restore_dir(cd, root, job, s2["id"], str(tmp_path / "r2"), dbname)
        assert got1 == image1 and got2 == image2
        assert sum1["master_key_uids"] == [old] and sum2["master_key_uids"] == [new]
        # plus, for the older epoch's snapshot, one unwrap of the current epoch's key (the catalog head's MAC key)
        assert calls1 == 2 and calls2 == 1, (calls1, calls2)

        # retiring the old key is refused while snapshots need it (only those taken before the rotation): named,
        # nothing changed, still active
        before = files.read_bytes(job_file)
        r = ansible.run([task(cd, dd, job, uri, retire_master_keys=[old], revoke=True),
                         task(cd, dd, job, uri, retire_master_keys=[new]),
                         task(cd, dd, job, uri, revoke=True)])
        refused, current, lonely = r.results
        assert refused.get("failed") and refused["changed"] is False and refused["error_kind"] == "key_in_use", refused
        for sid in s0 + [s1["id"]]:
            assert sid in refused["msg"], refused["msg"]
        assert s2["id"] not in refused["msg"]
        assert old in refused["msg"] and sorted(refused["master_key_users"]) == [old]
        assert current.get("failed") and "current master key" in current["msg"] and new in current["msg"], current
        assert lonely.get("failed") and "retire_master_keys" in lonely["msg"]
        assert files.read_bytes(job_file) == before
        with master_keys.kmip_client(cd, "group1") as c:
            assert c.key_info(old)["state"] == "ACTIVE"

        # the snapshots taken before the rotation expire (deleted here): no retained snapshot needs the old key, while
        # all the data is still there; check mode, then retire and revoke, then the same again (no change)
        with master_keys.kmip_client(cd, "group1") as c:
            js.expire_snapshots(s0 + [s1["id"]], store.Keys(js, c))  # as retention does: the catalog head first
        retire = task(cd, dd, job, uri, retire_master_keys=[old], revoke=True)
        r = ansible.run([dict(retire, check_mode=True), retire, retire])
        chk, done, again = r.results
        assert chk["changed"] is True and chk["revoked_master_key_uids"] == [old] and not chk.get("failed"), chk
        assert done["changed"] is True and done["retired_master_key_uids"] == [old] and done["revoked_master_key_uids"] == [old], done
        assert done["previous_master_key_uids"] == [] and done["master_key_uids_needed"] == [new]
        assert again["changed"] is False and again["retired_master_key_uids"] == [] and again["revoked_master_key_uids"] == [], again
        assert job_config.load_job(cd, job)["previous_master_key_uids"] == []
        with master_keys.kmip_client(cd, "group1") as c:
            with pytest.raises(Exception) as e:
                c.check_access(old)
            assert getattr(e.value, "kind", None) == "not_active", e.value
            assert c.key_info(new)["state"] == "ACTIVE"

        # with the old key revoked, the retained snapshot restores every collection (a and c included); the daemon
        # keeps running under the new key and its next snapshot is incremental and restores
        got2b, calls2b, _sum2b = restore_dir(cd, root, job, s2["id"], str(tmp_path / "r2b"), dbname)
        assert got2b == image2 and calls2b == 1
        with mc.start_session() as s:
            mc[dbname]["b"].insert_one({"_id": "b-last", "v": 0}, session=s)
            wait_applied(d, job, s)
        s3 = snapshot(dd, job)
        image3 = source_image(mc, dbname)
        assert s3["master_key_uids"] == [new] and s3["written_bytes"] < s2["written_bytes"], (s2, s3)
        got3, calls3, _sum3 = restore_dir(cd, root, job, s3["id"], str(tmp_path / "r3"), dbname)
        assert got3 == image3 and calls3 == 1
        assert d.status(job)["state"] == "STARTED" and d.alive()

        # removing the job keeps its snapshots in the store: the result and a warning name the key they still need
        gone = ansible.run([task(cd, dd, job, uri, state="absent")])[0]
        assert gone["changed"] is True and gone["master_key_uids_needed"] == [new], gone
        assert [w for w in gone.get("warnings", []) if new in w and root in w], gone
        assert job_config.load_job(cd, job) is None and {e["snapshot_id"] for e in js.catalog()} >= {s2["id"], s3["id"]}
    print("rotation test: %.1fs; restore KMIP calls %d (1 epoch), %d (2 epochs)" % (time.monotonic() - started, calls1, calls2))


def test_rotate_refused_without_encryption_and_with_foreign_current_key(ansible, tmp_path, pki, kmip_server, mongo_server):
    cd, dd = str(tmp_path / "etc"), str(tmp_path / "data")
    write_kmip_setup(cd, pki, kmip_server["port"], groups=("group1", "group2"))
    job = "rotbad-%s" % uuid.uuid4().hex[:8]
    uri = mongo_server["uri"]
    r = ansible.run([task(cd, dd, job, uri, rotate_master_key=True),
                     task(cd, dd, job, uri, encryption="disabled"),
                     task(cd, dd, job, uri, encryption="disabled", rotate_master_key=True),
                     task(cd, dd, job, uri, retire_master_keys=["1"], state="absent")])
    new_job, plain, plain_rot, absent = r.results
    assert new_job.get("failed") and "existing job" in new_job["msg"] and new_job["changed"] is False, new_job
    assert plain["changed"] is True and not plain.get("failed"), plain
    assert plain_rot.get("failed") and "encryption enabled" in plain_rot["msg"], plain_rot
    assert absent.get("failed") and "state present or stopped" in absent["msg"], absent

    # job x rotated (no daemon, no snapshot: nothing needs its first key); job y declared on that same key:
    # revoking it from x is refused, retiring it without revoke is not
    x, y = job + "-x", job + "-y"
    k1 = "{{ r1.master_key_uid }}"
    r = ansible.run([task(cd, dd, job, uri), task(cd, dd, x, uri), task(cd, dd, x, uri, rotate_master_key=True),
                     task(cd, dd, y, uri, master_key={"uid": k1}),
                     task(cd, dd, x, uri, retire_master_keys=[k1], revoke=True),
                     task(cd, dd, x, uri, retire_master_keys=[k1]),
                     task(cd, dd, x, uri, retire_master_keys=[k1])])
    enc, x1, x2, y1, shared, retired, again = r.results
    assert enc["changed"] is True and enc["master_key_uid"], enc
    k1 = x1["master_key_uid"]
    assert x2["rotated"] is True and x2["previous_master_key_uids"] == [k1] and y1["master_key_uid"] == k1, (x2, y1)
    assert shared.get("failed") and shared["error_kind"] == "key_in_use" and "job %s" % y in shared["msg"] and k1 in shared["msg"], shared
    assert retired["changed"] is True and retired["retired_master_key_uids"] == [k1] and retired["revoked_master_key_uids"] == []
    assert retired["previous_master_key_uids"] == [] and again["changed"] is False, (retired, again)
    with master_keys.kmip_client(cd, "group1") as c:
        assert c.key_info(k1)["state"] == "ACTIVE"

    # an encrypted job whose current key the group's certificate cannot use: rotation refused before any key is made
    cfg = job_config.load_job(cd, job)
    job_config.write_job(cd, dict(cfg, group="group2"))
    before = files.read_bytes(job_config.job_path(cd, job))
    p1 = probe_key(cd)
    r = ansible.run([task(cd, dd, job, uri, group="group2", rotate_master_key=True)])
    p2 = probe_key(cd)
    assert r[0].get("failed") and r[0]["error_kind"] == "permission_denied" and cfg["master_key_uid"] in r[0]["msg"], r[0]
    assert "Cannot rotate job %s" % job in r[0]["msg"]
    assert p2 == p1 + 1 and files.read_bytes(job_config.job_path(cd, job)) == before
