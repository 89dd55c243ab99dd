"""Privilege boundaries, restore targets and URI secrets (security review, issue 9 items 1, 8, 10), through real
ansible-playbook runs as root against real PyKMIP (and SecantusDB for the source URI): planted links, folders owned by
another user, restores aimed at the store, data_dir or config_dir, and passwords in URIs."""
import hashlib
import os
import pwd
import stat
import subprocess
import uuid

import bson
import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    config, job_config, kmip, snapshot, store)
from daemon_helper import write_kmip_setup
from snapshot_helpers import make_head

KC = "kmipbackup.mongodb.kmip_config"
GK = "kmipbackup.mongodb.group_kmip"
BJ = "kmipbackup.mongodb.backup_job_encryption"
BS = "kmipbackup.mongodb.backup_snapshot"
SR = "kmipbackup.mongodb.snapshot_restore"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root-run modules are what these tests attack")


def tree_state(root):
    """{relative path: (kind, mode, uid, gid, sha256 or link target)} of everything under root (links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ["."]:
            p = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    what = ("file", hashlib.sha256(f.read()).hexdigest())
            else:
                what = ("dir", None)
            out[os.path.relpath(p, root)] = what + (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return out


def victim(tmp_path):
    """A root-owned 0755 folder with a file: what a planted link points to."""
    v = tmp_path / "victim"
    v.mkdir()
    os.chmod(str(v), 0o755)
    (v / "precious").write_bytes(b"do not touch")
    return str(v)


@pytest.fixture
def other_user():
    """A throwaway system user (not root, not the daemon's user): (name, uid)."""
    name = "kbt%s" % uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield name, pwd.getpwnam(name).pw_uid
    finally:
        subprocess.run(["userdel", name], check=False)


def private(path):
    os.makedirs(path, 0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


# ---- 1. privilege boundaries -----------------------------------------------------------------------------------

def test_backup_snapshot_refuses_planted_requests_link(ansible, tmp_path, pki, kmip_server, mongo_server):
    """data_dir/requests -> a foreign folder: before, the root-run module chmodded it 0700 and wrote into it."""
    cd, dd = private(str(tmp_path / "etc")), private(str(tmp_path / "data"))
    write_kmip_setup(cd, pki, kmip_server["port"])
    job_config.write_job(cd, {"job": "pj", "group": "group1", "source": dict(job_config.SOURCE_DEFAULTS, uri=mongo_server["uri"]),
                              "encryption": False, "master_key_uid": None, "previous_master_key_uids": [], "store": None,
                              "state": "present", "generation": 1, "schedule": dict(job_config.SCHEDULE_DEFAULTS)})
    v = victim(tmp_path)
    os.symlink(v, os.path.join(dd, "requests"))
    before = tree_state(v)
    r = ansible.run([{BS: dict(job="pj", config_dir=cd, data_dir=dd, wait=False)}])
    assert r[0].get("failed") and r[0]["changed"] is False, r.output
    assert r[0]["msg"] == ("folder %s/requests is a symbolic link or not a folder: kmipbackup never follows links inside its "
                           "folders; remove it (or replace it with a real folder) and run again." % dd)
    assert tree_state(v) == before


def test_group_kmip_refuses_planted_groups_link(ansible, tmp_path, pki):
    cd = private(str(tmp_path / "etc"))
    config.save_kmip_config(cd, config.KmipConfig(servers=["127.0.0.1"], ca_file=pki["ca"]))
    v = victim(tmp_path)
    os.symlink(v, os.path.join(cd, "groups"))
    before = tree_state(v)
    c = pki["clients"]["group1"]
    r = ansible.run([{GK: dict(group="group1", client_cert_file=c["cert"], client_key_file=c["key"], config_dir=cd)}])
    assert r[0].get("failed") and "groups is a symbolic link or not a folder" in r[0]["msg"], r.output
    assert tree_state(v) == before and sorted(os.listdir(cd)) == ["groups", "kmip.yml"]


def test_config_dir_owned_by_another_user_or_writable_is_refused(ansible, tmp_path, pki, kmip_server, other_user):
    name, uid = other_user
    cd = private(str(tmp_path / "etc"))
    os.chown(cd, uid, uid)
    kc = {KC: dict(kmip_servers=["127.0.0.1:%d" % kmip_server["port"]], kmip_ca_file=pki["ca"], config_dir=cd)}
    c = pki["clients"]["group1"]
    gk = {GK: dict(group="group1", client_cert_file=c["cert"], client_key_file=c["key"], config_dir=cd)}
    r = ansible.run([kc, gk])
    for res in r.results:
        assert res.get("failed") and res["changed"] is False, r.output
        assert res["msg"].startswith("config_dir %s is owned by %s (uid %d), not by root or the daemon's user" % (cd, name, uid))
        assert "set daemon_user" in res["msg"]
    assert os.listdir(cd) == [] and os.stat(cd).st_uid == uid

    # the same folder is fine when that user is the configured daemon user; new files take its ownership
    r = ansible.run([dict(kc, **{KC: dict(kc[KC], daemon_user=name)}), dict(gk, **{GK: dict(gk[GK], daemon_user=name)})])
    assert all(res["changed"] is True and not res.get("failed") for res in r.results), r.output
    for p in ("kmip.yml", "groups", "groups/group1.yml"):
        st = os.stat(os.path.join(cd, p))
        assert st.st_uid == uid and stat.S_IMODE(st.st_mode) in (0o600, 0o700), p

    # group-writable: refused, and not silently tightened
    os.chmod(cd, 0o770)
    before = tree_state(cd)
    r = ansible.run([{KC: dict(kc[KC], kmip_port=5697, daemon_user=name)}])
    assert r[0].get("failed") and "is writable by its group or by others (mode 0770)" in r[0]["msg"], r.output
    assert tree_state(cd) == before


def test_backup_job_encryption_refuses_unsafe_config_dir_before_creating_a_key(ansible, tmp_path, pki, kmip_server,
                                                                               mongo_server, other_user):
    name, uid = other_user
    cd, dd = private(str(tmp_path / "etc")), private(str(tmp_path / "data"))
    write_kmip_setup(cd, pki, kmip_server["port"])
    os.chown(cd, uid, uid)
    before = tree_state(cd)
    r = ansible.run([{BJ: dict(job="pj2", group="group1", source={"uri": mongo_server["uri"], "connect_timeout": 3},
                               config_dir=cd, data_dir=dd)}])
    assert r[0].get("failed") and "is owned by %s (uid %d)" % (name, uid) in r[0]["msg"], r.output
    assert "master_key_uid" not in r[0] and tree_state(cd) == before


def test_daemon_refuses_writable_or_linked_data_dir(tmp_path):
    """The Backup Daemon does not tighten a group-writable data_dir (before: chmod 0700 and run) nor follow a link."""
    from daemon_helper import DaemonProcess
    cd = private(str(tmp_path / "etc"))
    dd = str(tmp_path / "data")
    os.mkdir(dd)
    os.chmod(dd, 0o770)
    link = str(tmp_path / "data-link")
    os.symlink(dd, link)
    for data_dir, words in ((dd, "is writable by its group or by others (mode 0770)"),
                            (link, "is a symbolic link or not a folder")):
        d = DaemonProcess(cd, data_dir).start()
        try:
            rc = d.proc.wait(30)
        finally:
            d.stop()
        with open(d.out_files[-1]) as f:
            out = f.read()
        assert rc == 2 and ("data_dir %s %s" % (data_dir, words)) in out, out
        assert stat.S_IMODE(os.stat(dd).st_mode) == 0o770 and os.listdir(dd) == []


# ---- 8. restore targets ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rjob(tmp_path_factory, pki, kmip_server):
    """An encrypted job 'rjob' with one snapshot (real KMIP master key), its store in data_dir/store."""
    base = tmp_path_factory.mktemp("rjob")
    cd, dd = private(str(base / "etc")), private(str(base / "var"))
    write_kmip_setup(cd, pki, kmip_server["port"])
    root = os.path.join(dd, "store")
    client = kmip.KmipClient(config.load_kmip_config(cd), config.load_group(cd, "group1"))
    uid = client.create_master_key("rjob")
    job_config.write_job(cd, {"job": "rjob", "group": "group1", "source": dict(job_config.SOURCE_DEFAULTS, uri="mongodb://127.0.0.1:1/"),
                              "encryption": True, "master_key_uid": uid, "previous_master_key_uids": [], "store": root,
                              "state": "present", "generation": 1, "schedule": dict(job_config.SCHEDULE_DEFAULTS)})
    js = store.JobStore(root, "rjob")
    keys = store.Keys(js, provider=client, encryption=True)
    h = make_head(os.path.join(dd, "heads", "rjob", "1", "head.db"), {"app.items": [{"_id": i, "v": "x" * 50} for i in range(40)]},
                  key=os.urandom(32))
    entry = snapshot.take_snapshot(h, js, keys, job="rjob", master_key_uid=uid, encryption=True, kind="on-demand")
    h.close()
    client.close()
    yield {"config_dir": cd, "data_dir": dd, "store": root, "base": str(base), "entry": entry}


def sr(job, **kw):
    args = dict(job="rjob", config_dir=job["config_dir"], data_dir=job["data_dir"])
    args.update(kw)
    return {SR: args}


def test_restore_refuses_store_data_dir_and_config_dir_targets(ansible, rjob, tmp_path):
    """Before: target_dir=<store> with drop=true reported success and deleted every backup of every job."""
    s, dd, cd = rjob["store"], rjob["data_dir"], rjob["config_dir"]
    link = str(tmp_path / "to-store")
    os.symlink(s, link)
    before = {p: tree_state(p) for p in (rjob["base"],)}
    cases = [
        (dict(target_dir=s, drop=True, force=True), "is the same folder as the snapshot store"),
        (dict(target_dir=link, drop=True), "is the same folder as the snapshot store"),
        (dict(target_dir=dd, drop=True), "is a folder that contains the snapshot store"),
        (dict(target_dir=rjob["base"], drop=True), "is a folder that contains the snapshot store"),
        (dict(target_dir=os.path.join(s, "rjob"), drop=True), "is inside the snapshot store"),
        (dict(target_dir=os.path.join(cd, "restore")), "is inside the config_dir"),
        (dict(target_dir=os.path.join(dd, "heads"), drop=True), "is inside the data_dir"),
        (dict(target_archive=os.path.join(s, "rjob.archive"), drop=True), "is inside the snapshot store"),
        (dict(target_archive=dd, drop=True, force=True), "is a folder that contains the snapshot store"),
    ]
    r = ansible.run([sr(rjob, **kw) for kw, _ in cases])
    for (kw, words), res in zip(cases, r.results, strict=True):
        assert res.get("failed") and res["changed"] is False, (kw, res)
        assert words in res["msg"] and "nothing was written" in res["msg"], (kw, res["msg"])
    assert {p: tree_state(p) for p in before} == before  # store, data_dir and config_dir byte-for-byte unchanged
    assert store.JobStore(s, "rjob").catalog_entry("latest")["snapshot_id"] == rjob["entry"]["snapshot_id"]


def test_drop_replaces_only_restores_or_dumps_unless_force(ansible, rjob, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_bytes(b"mine")
    (home / "docs").mkdir()
    (home / "docs" / "cv.odt").write_bytes(b"cv")
    archive = tmp_path / "report.pdf"
    archive.write_bytes(b"%PDF-1.7 not an archive")
    before = {"home": tree_state(str(home)), "archive": archive.read_bytes()}
    r = ansible.run([sr(rjob, target_dir=str(home), drop=True), sr(rjob, target_archive=str(archive), drop=True)])
    for res, what in zip(r.results, ("layout", "archive"), strict=True):
        assert res.get("failed") and res["changed"] is False, r.output
        assert ("holds something other than a previous restore or a mongodump %s: drop replaces only those. Choose another "
                "location, or set force=true as well to replace it anyway; nothing was written." % what) in res["msg"]
    assert tree_state(str(home)) == before["home"] and archive.read_bytes() == before["archive"]

    # a previous restore (and a mongodump layout) is replaced by drop alone; anything else with force
    dump = tmp_path / "dump"
    r = ansible.run([sr(rjob, target_dir=str(dump)), sr(rjob, target_dir=str(dump), snapshot=rjob["entry"]["snapshot_id"],
                                                        drop=True, include=["app.*"], rename_databases={"app": "app2"}),
                     sr(rjob, target_dir=str(home), drop=True, force=True),
                     sr(rjob, target_archive=str(archive), drop=True, force=True)])
    assert all(not res.get("failed") and res["changed"] is True for res in r.results), r.output
    assert sorted(os.listdir(str(dump))) == ["app2", "restoreInfo.txt"]
    assert sorted(os.listdir(str(home))) == ["app", "restoreInfo.txt"]
    assert sorted(os.listdir(str(home / "app"))) == ["items.bson", "items.metadata.json"]
    with open(str(home / "app" / "items.bson"), "rb") as f:
        assert [d["_id"] for d in bson.decode_all(f.read())] == list(range(40))
    with open(str(archive), "rb") as f:
        assert f.read(4) == bytes.fromhex("6de29981")


# ---- 10. passwords in URIs ---------------------------------------------------------------------------------------

def test_uri_passwords_never_echoed(ansible, tmp_path, pki, kmip_server, mongo_server):
    """A refused source.uri or KMIP server entry with user:password@: not in the message, not in
    invocation.module_args, not anywhere at -vvv (before: both echoed it)."""
    pw = "Pw-%s" % uuid.uuid4().hex[:10]
    cd, dd = private(str(tmp_path / "etc")), private(str(tmp_path / "data"))
    write_kmip_setup(cd, pki, kmip_server["port"])
    host = mongo_server["uri"].split("://", 1)[1]
    # from a variable, as a vault would give it (a literal in the play would be echoed by Ansible's own error display)
    r = ansible.run([{BJ: dict(job="pj3", group="group1", source={"uri": "mongodb://bob:{{ pw }}@%s" % host},
                               config_dir=cd, data_dir=dd)},
                     {KC: dict(kmip_servers=["admin:{{ pw }}@127.0.0.1:%d" % kmip_server["port"]], kmip_ca_file=pki["ca"],
                               config_dir=str(tmp_path / "etc2"))}], verbosity=3, extra_vars={"pw": pw})
    assert r[0].get("failed") and "source.uri holds a password" in r[0]["msg"], r.output
    assert r[1].get("failed") and "KMIP servers take no user or password" in r[1]["msg"], r.output
    assert "admin:********@127.0.0.1" in r[1]["msg"]
    text = r.everything(invocation=True)
    assert pw not in text, text[max(0, text.find(pw) - 800):][:1600]
    # -vvv prints invocation.module_args: the URI is there, its password masked
    assert '"uri": "mongodb://bob:********@%s"' % host in r.stdout and '"admin:********@127.0.0.1:' in r.stdout
    assert not os.path.exists(job_config.job_path(cd, "pj3")) and not os.path.exists(str(tmp_path / "etc2" / "kmip.yml"))
