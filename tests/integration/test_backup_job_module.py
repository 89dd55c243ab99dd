"""backup_job_encryption and backup_job_info through real ansible-playbook runs, against real
PyKMIP and SecantusDB servers (and a real daemon for wait)."""
import os
import uuid

import pymongo

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, job_config, kmip, master_keys
from daemon_helper import DaemonProcess, write_kmip_setup

BJ = "kmipbackup.mongodb.backup_job_encryption"
INFO = "kmipbackup.mongodb.backup_job_info"


def task(cd, dd, job, uri, **kw):
    args = dict(job=job, group="group1", source={"uri": uri, "connect_timeout": 3}, config_dir=cd, data_dir=dd)
    args.update(kw)
    return {BJ: args}


def setup(tmp_path, pki, kmip_server):
    cd, dd = str(tmp_path / "etc"), str(tmp_path / "data")
    write_kmip_setup(cd, pki, kmip_server["port"], groups=("group1", "group2"))
    return cd, dd


def test_create_check_idempotent_toggle_absent(ansible, tmp_path, pki, kmip_server, mongo_server):
    cd, dd = setup(tmp_path, pki, kmip_server)
    job = "mod-%s" % uuid.uuid4().hex[:8]
    uri = mongo_server["uri"]
    t = task(cd, dd, job, uri, schedule={"interval_hours": 12})
    r = ansible.run([dict(t, check_mode=True), t, t, dict(t, check_mode=True)], diff=True)
    check, first, second, check2 = r.results
    assert check["changed"] is True and not check.get("failed"), r.output
    assert check["diff"]["before"] == {} and check["diff"]["after"]["encryption"] is True
    assert first["changed"] is True and first["master_key_uid"] and first["resync_required"] is False, first
    assert first["status"] == "INACTIVE"  # no daemon runs here
    assert second["changed"] is False and second["master_key_uid"] == first["master_key_uid"], second
    assert check2["changed"] is False
    cfg = config.load_job(cd, job)
    assert cfg["schedule"]["interval_hours"] == 12 and cfg["generation"] == 1 and cfg["master_key_uid"] == first["master_key_uid"]
    assert oct(os.stat(job_config.job_path(cd, job)).st_mode & 0o777) == "0o600"
    with master_keys.kmip_client(cd, "group1") as c:
        assert c.key_info(first["master_key_uid"])["name"] == "kmipbackup-%s" % job
        assert c.key_info(first["master_key_uid"])["state"] == "ACTIVE"

    off = task(cd, dd, job, uri, schedule={"interval_hours": 12}, encryption="disabled")
    absent = {BJ: dict(job=job, state="absent", config_dir=cd, data_dir=dd)}
    r = ansible.run([off, off, absent, absent])
    assert r[0]["changed"] is True and r[0]["resync_required"] is True and r[0]["master_key_uid"] is None, r[0]
    assert r[0]["job"]["generation"] == 2 and r[0]["job"]["previous_master_key_uids"] == [first["master_key_uid"]]
    assert r[1]["changed"] is False and r[1]["resync_required"] is False
    assert r[2]["changed"] is True and r[3]["changed"] is False
    assert job_config.load_job(cd, job) is None


def test_bad_input_fails_and_writes_nothing(ansible, tmp_path, pki, kmip_server, mongo_server, dead_port):
    cd, dd = setup(tmp_path, pki, kmip_server)
    job = "bad-%s" % uuid.uuid4().hex[:8]
    uri = mongo_server["uri"]
    with kmip.KmipClient(config.load_kmip_config(cd), config.load_group(cd, "group2")) as c:
        foreign = c.create_master_key("foreign-%s" % job)
    r = ansible.run([
        task(cd, dd, job, uri, group="nosuchgroup"),
        task(str(tmp_path / "empty"), dd, job, uri),
        task(cd, dd, job, "mongodb://127.0.0.1:%d/?replicaSet=rs0" % dead_port),
        task(cd, dd, job, uri, master_key={"uid": foreign}),
        task(cd, dd, job, uri, master_key={"uid": "99999999"}),
        task(cd, dd, job, uri, schedule={"recent_days": 9}),
        task(cd, dd, "bad/name", uri),
    ])
    for res in r.results:
        assert res.get("failed") is True and res["changed"] is False, res
    msgs = [res["msg"] for res in r.results]
    assert "nosuchgroup" in msgs[0] and "group_kmip" in msgs[0]
    assert "kmip_config" in msgs[1]
    assert str(dead_port) in msgs[2] and "cannot be reached" in msgs[2]
    assert foreign in msgs[3] and r[3]["error_kind"] == "permission_denied"
    assert "99999999" in msgs[4] and r[4]["error_kind"] == "not_found"
    assert "recent_days" in msgs[5]
    assert "bad/name" in msgs[6]
    assert job_config.list_jobs(cd) == [] and not os.path.exists(str(tmp_path / "empty" / "jobs"))


def test_wait_for_daemon_and_info(ansible, tmp_path, pki, kmip_server, mongo_server):
    cd, dd = setup(tmp_path, pki, kmip_server)
    job = "wait-%s" % uuid.uuid4().hex[:8]
    db = "kbmod%s" % uuid.uuid4().hex[:8]
    pymongo.MongoClient(mongo_server["uri"])[db]["c"].insert_one({"x": 1})
    with DaemonProcess(cd, dd) as d:
        t = task(cd, dd, job, mongo_server["uri"], wait=True, wait_timeout=90)
        stopped = task(cd, dd, job, mongo_server["uri"], wait=True, wait_timeout=30, state="stopped")
        r = ansible.run([t, {INFO: dict(config_dir=cd, data_dir=dd)}, stopped, {INFO: dict(job=[job, "missing"], config_dir=cd, data_dir=dd)}])
        assert r[0]["changed"] is True and r[0]["status"] == "STARTED", r[0].get("msg") or d.log_tail()
        assert r[0]["job_status"]["consistent"] is True
        info = r[1]["jobs"]
        assert [j["job"] for j in info] == [job] and info[0]["status_name"] == "STARTED"
        assert info[0]["config"]["master_key_uid"] == r[0]["master_key_uid"]
        assert info[0]["status"]["initial_syncs"] == 1
        assert r[2]["changed"] is True and r[2]["status"] == "STOPPED", r[2]
        assert r[3].get("failed") and "missing" in r[3]["msg"]
