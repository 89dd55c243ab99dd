"""The modules' flows called directly in the core, without ansible-playbook: restore_request (which KMIP settings
win, listing, a restore request in and a result out) and job_declaration (a declaration in, a change out), against
real PyKMIP and SecantusDB servers. The requests are the modules' own parameters with their argument spec's
defaults."""
import os
import time
import uuid

import pymongo
import pytest
from bson import encode

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    ansible_module, config, head, job_config, job_declaration, kmip, rawbson, restore_request, snapshot, store)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import (
    ConfigError, IntegrityError, KeyInUseError, RestoreError)
from ansible_collections.kmipbackup.mongodb.plugins.modules import backup_job_encryption, snapshot_info, snapshot_restore
from daemon_helper import write_kmip_setup


def request(module, **kw):
    """A module's parameters: its whole argument spec's defaults (shared options included), then kw."""
    spec = ansible_module.full_spec(module.argument_spec, module.SHARED)
    return dict({name: opt.get("default") for name, opt in spec.items()}, **kw)


def restore_params(**kw):
    return request(snapshot_restore, **kw)


def info_params(**kw):
    return request(snapshot_info, **kw)


def declaration(cd, dd, **kw):
    return request(backup_job_encryption, config_dir=cd, data_dir=dd, daemon_user=str(os.geteuid()), **kw)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, pki, kmip_server, mongo_server):
    """An encrypted job 'flowjob' of group1 declared in config_dir, with one snapshot of two collections."""
    base = tmp_path_factory.mktemp("flows")
    cd, dd = str(base / "etc"), str(base / "var")
    write_kmip_setup(cd, pki, kmip_server["port"], groups=("group1", "group2"))
    root = os.path.join(dd, "store")
    client = kmip.KmipClient(config.load_kmip_config(cd), config.load_group(cd, "group1"))
    uid = client.create_master_key("flowjob")
    job_config.write_job(cd, {"job": "flowjob", "group": "group1", "source": dict(job_config.SOURCE_DEFAULTS, uri=mongo_server["uri"]),
                        "encryption": True, "master_key_uid": uid, "previous_master_key_uids": [], "store": root,
                        "state": "present", "generation": 1, "schedule": dict(job_config.SCHEDULE_DEFAULTS)})
    js = store.JobStore(root, "flowjob")
    h = head.Head(os.path.join(dd, "heads", "flowjob", "1", "head.db"), os.urandom(32))
    with h.write() as w:
        for coll, n in (("orders", 40), ("misc", 7)):
            ns = "shop.%s" % coll
            w.create_namespace(ns, encode({}))
            docs = [encode({"_id": i, "v": "%s-%d" % (coll, i)}) for i in range(n)]
            w.upsert_many(ns, [(rawbson.id_key_from_document(d), d) for d in docs])
        w.set_position(None, [int(time.time()), 1], True)
    entry = snapshot.take_snapshot(h, js, store.Keys(js, provider=client, encryption=True), master_key_uid=uid,
                                   encryption=True, kind="on-demand")
    yield {"config_dir": cd, "data_dir": dd, "store": root, "uid": uid, "entry": entry, "pki": pki,
           "kmip_port": kmip_server["port"]}
    h.close()
    client.close()


def fresh(lab, tmp_path, **kw):
    """A fresh host's request: no configuration, the store, the KMIP server and a certificate as options."""
    return dict(config_dir=str(tmp_path / "no-config"), data_dir=str(tmp_path / "no-data"), store=lab["store"],
                kmip_servers=["127.0.0.1:%d" % lab["kmip_port"]], kmip_ca_file=lab["pki"]["ca"],
                client_cert_file=lab["pki"]["clients"]["group1"]["pem"], **kw)


def test_kmip_settings_options_win_then_the_hosts_configuration(lab, tmp_path):
    p = restore_params(**fresh(lab, tmp_path, job="flowjob"))
    kcfg, grp = restore_request.kmip_settings(p, None)
    assert kcfg.servers == p["kmip_servers"] and grp.client_cert_file == p["client_cert_file"] and grp.group == "restore"
    cfg = job_config.load_job(lab["config_dir"], "flowjob")
    kcfg, grp = restore_request.kmip_settings(restore_params(job="flowjob", config_dir=lab["config_dir"]), cfg)
    assert kcfg == config.load_kmip_config(lab["config_dir"]) and grp.group == "group1"
    assert restore_request.kmip_settings(restore_params(job="x", config_dir=str(tmp_path / "none")), None) is None
    with pytest.raises(ConfigError, match="kmip_servers needs kmip_ca_file"):
        restore_request.kmip_settings(restore_params(job="x", kmip_servers=["h"]), None)
    with pytest.raises(ConfigError, match="No KMIP client certificate"):
        restore_request.kmip_settings(restore_params(job="x", config_dir=lab["config_dir"]), None)


def test_list_snapshots_authenticated_or_not(lab, tmp_path):
    out = restore_request.list_snapshots(info_params(job="flowjob", config_dir=lab["config_dir"], data_dir=lab["data_dir"]))
    assert out["authenticated"] and [s["id"] for s in out["snapshots"]] == [lab["entry"]["snapshot_id"]]
    assert out["master_key_uids_needed"] == [lab["uid"]] and out["warnings"] == []
    bare = restore_request.list_snapshots(info_params(job="flowjob", store=lab["store"], config_dir=str(tmp_path / "none")))
    assert not bare["authenticated"] and not bare["snapshots"][0]["authenticated"]
    assert any(restore_request.NO_KMIP in w for w in bare["warnings"])


def test_restore_to_a_directory_check_mode_then_restore_then_already_restored(lab, tmp_path):
    p = restore_params(**fresh(lab, tmp_path, job="flowjob", target_dir=str(tmp_path / "out")))
    planned = restore_request.run_restore(p, check_mode=True)
    assert planned["changed"] and planned["planned_from"] == "manifest" and not os.path.exists(p["target_dir"])
    assert planned["documents"] == 47 and planned["snapshot_id"] == lab["entry"]["snapshot_id"] and planned["kmip_calls"] > 0
    done = restore_request.run_restore(p)
    assert done["changed"] and done["verify"] == {"enabled": True, "namespaces_verified": 2}
    assert os.path.isfile(os.path.join(p["target_dir"], "shop", "orders.bson"))
    again = restore_request.run_restore(p)
    assert again["changed"] is False and again["already_restored"] is True


def test_restore_without_kmip_plans_from_the_catalog_in_check_mode_only(lab, tmp_path):
    p = restore_params(job="flowjob", store=lab["store"], config_dir=str(tmp_path / "none"), target_dir=str(tmp_path / "o"))
    planned = restore_request.run_restore(p, check_mode=True)
    assert planned["planned_from"] == "catalog" and any(restore_request.NO_KMIP in w for w in planned["warnings"])
    with pytest.raises(ConfigError, match="is encrypted: give the KMIP server"):
        restore_request.run_restore(p)


def test_restore_to_mongodb_uses_the_sources_connection_options_and_refuses_busy_namespaces(lab, tmp_path, mongo_server):
    db = "flows_%s" % uuid.uuid4().hex[:8]
    target = {"uri": mongo_server["uri"], "tls": False, "tls_ca_file": "/nonexistent/ca.pem", "connect_timeout": 5}
    p = restore_params(**fresh(lab, tmp_path, job="flowjob", target_mongodb=target, rename_databases={"shop": db},
                               restore_info_file=str(tmp_path / "info.txt")))
    done = restore_request.run_restore(p)  # tls false: the TLS files are ignored, as for a job's source
    assert done["changed"] and done["target"] == "mongodb" and done["busy_namespaces"] == []
    with pymongo.MongoClient(mongo_server["uri"]) as c:
        assert c[db]["orders"].count_documents({}) == 40
    with pytest.raises(RestoreError, match="not empty"):  # another selection is not that restore: its namespaces are busy
        restore_request.run_restore(dict(p, include=["shop.orders"]))


def test_an_unencrypted_snapshot_of_an_encrypted_job_is_refused(lab, tmp_path):
    entry = {"snapshot_id": "x", "encryption": False}
    cfg = job_config.load_job(lab["config_dir"], "flowjob")
    p = restore_params(job="flowjob", config_dir=lab["config_dir"])
    with pytest.raises(IntegrityError, match="marked unencrypted"):
        restore_request.check_encryption_expected(p, cfg, None, entry)
    assert restore_request.check_encryption_expected(dict(p, allow_unencrypted=True), cfg, None, entry) is False


def test_declare_checks_creates_is_idempotent_and_refuses_to_retire_the_current_key(tmp_path, pki, kmip_server, mongo_server):
    cd, dd = str(tmp_path / "etc"), str(tmp_path / "var")
    write_kmip_setup(cd, pki, kmip_server["port"])
    job = "decl-%s" % uuid.uuid4().hex[:8]
    p = declaration(cd, dd, job=job, group="group1", source={"uri": mongo_server["uri"], "connect_timeout": 3})
    check = job_declaration.declare(p, check_mode=True)
    assert check["changed"] and check["diff"]["before"] == {} and job_config.load_job(cd, job) is None
    first = job_declaration.declare(p)
    assert first["changed"] and first["master_key_uid"] and first["status"] == "INACTIVE"
    assert job_config.load_job(cd, job)["master_key_uid"] == first["master_key_uid"]
    again = job_declaration.declare(p)
    assert again["changed"] is False and again["master_key_uid"] == first["master_key_uid"]
    assert job_declaration.declare(dict(p, file_owner=str(os.geteuid()), file_group=str(os.getegid())))["changed"] is False
    with pytest.raises(ConfigError, match="may not own config_dir"):
        job_declaration.declare(dict(p, file_owner="4242"))
    with pytest.raises(KeyInUseError) as e:
        job_declaration.declare(dict(p, retire_master_keys=[first["master_key_uid"]]))
    assert e.value.details == {"master_key_users": {first["master_key_uid"]: ["current master key"]}}
    with pytest.raises(ConfigError, match="revoke applies to retire_master_keys"):
        job_declaration.declare(dict(p, revoke=True))
    gone = job_declaration.declare(dict(p, state="absent"))
    assert gone["changed"] and job_config.load_job(cd, job) is None and gone["diff"]["after"] == {}
