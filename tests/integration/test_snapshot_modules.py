"""backup_snapshot, snapshot_info, snapshot_restore and playbooks/restore.yml through real ansible-playbook runs,
against real PyKMIP and SecantusDB servers. The job's store is built with the core (head + snapshot.take_snapshot,
a real KmipClient as the key provider) from documents inserted into SecantusDB."""
import os
import shutil
import struct
import time

import pytest
from bson import encode, decode
from bson.codec_options import CodecOptions
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    config, head, job_config, job_requests, kmip, rawbson, snapshot, store)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.source import check_source
from daemon_helper import DaemonProcess, write_kmip_setup
from snapshot_helpers import commit_to_head, forge_null_snapshot

SI = "kmipbackup.mongodb.snapshot_info"
SR = "kmipbackup.mongodb.snapshot_restore"
BS = "kmipbackup.mongodb.backup_snapshot"
CANARY = "zqCanary8831"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAW = CodecOptions(document_class=RawBSONDocument)


def fill_source(db):
    """Two collections with canary names, _ids of several types, an index; returns {ns: {id_key: raw}}."""
    a = db["orders_" + CANARY]
    a.insert_many([{"_id": ObjectId(), "n": i, "who": "%s-%d" % (CANARY, i), "tags": ["x", i], "sub": {"f": 1.5, "g": None}}
                   for i in range(300)])
    a.create_index([("who", 1)], name="who_1", unique=True)
    b = db["misc"]
    b.insert_many([{"_id": "%s-id-%d" % (CANARY, i), "v": i} for i in range(50)] + [{"_id": i, "v": -i} for i in range(20)])
    out = {}
    for coll in (a, b):
        raws = coll.with_options(codec_options=RAW).find()
        out["%s.%s" % (db.name, coll.name)] = {rawbson.id_key_from_document(r.raw): r.raw for r in raws}
    return out


def index_specs(coll):
    return [encode(s) for s in coll.list_indexes()]


def make_snapshot(h, js, keys, uid, mclient, db, kind="on-demand"):
    """Copy db's collections into head h (raw), then cut a snapshot with the core."""
    with h.write() as w:
        for name in db.list_collection_names():
            ns = "%s.%s" % (db.name, name)
            w.create_namespace(ns, encode({}), indexes=index_specs(db[name]))
            w.upsert_many(ns, [(rawbson.id_key_from_document(r.raw), r.raw) for r in db[name].with_options(codec_options=RAW).find()])
        w.set_position(None, [int(time.time()), 1], True)
    return snapshot.take_snapshot(h, js, keys, master_key_uid=uid, encryption=True, kind=kind)


@pytest.fixture(scope="module")
def lab_job(tmp_path_factory, pki, kmip_server, mongo_server):
    """An encrypted job 'snapjob' of group1 with one snapshot of database src_<canary>."""
    import pymongo
    base = tmp_path_factory.mktemp("snapjob")
    cd, dd = str(base / "etc"), str(base / "var")
    write_kmip_setup(cd, pki, kmip_server["port"], groups=("group1", "group2"))
    root = os.path.join(dd, "store")
    mclient = pymongo.MongoClient(mongo_server["uri"])
    db = mclient["src_" + CANARY]
    source = fill_source(db)
    client = kmip.KmipClient(config.load_kmip_config(cd), config.load_group(cd, "group1"))
    uid = client.create_master_key("snapjob")
    job_config.write_job(cd, {"job": "snapjob", "group": "group1", "source": dict(job_config.SOURCE_DEFAULTS, uri=mongo_server["uri"]),
                              "encryption": True, "master_key_uid": uid, "previous_master_key_uids": [], "store": root,
                              "state": "present", "generation": 1, "schedule": dict(job_config.SCHEDULE_DEFAULTS)})
    js = store.JobStore(root, "snapjob")
    keys = store.Keys(js, provider=client, encryption=True)
    h = head.Head(os.path.join(dd, "heads", "snapjob", "1", "head.db"), os.urandom(32))
    entry = make_snapshot(h, js, keys, uid, mclient, db)
    indexes = {ns: sorted(decode(s)["name"] for s in index_specs(db[ns.split(".", 1)[1]])) for ns in source}
    yield {"config_dir": cd, "data_dir": dd, "store": root, "uid": uid, "entry": entry, "source": source, "db": db.name,
           "mongo": mclient, "head": h, "js": js, "keys": keys, "client": client, "indexes": indexes}
    h.close()
    client.close()
    mclient.close()


def by_id(raws):
    return {rawbson.id_key_from_document(r): bytes(r) for r in raws}


def assert_db_equal(mclient, lab, target_db):
    for ns, docs in lab["source"].items():
        coll = mclient[target_db][ns.split(".", 1)[1]]
        assert by_id(r.raw for r in coll.with_options(codec_options=RAW).find()) == docs
        assert sorted(decode(s)["name"] for s in index_specs(coll)) == lab["indexes"][ns]
        got = {decode(s)["name"]: decode(s) for s in index_specs(coll)}
        if "who_1" in got:
            assert got["who_1"]["key"] == {"who": 1} and got["who_1"].get("unique") is True


def read_dir(path, db):
    out = {}
    for name in sorted(os.listdir(os.path.join(path, db))):
        if name.endswith(".bson"):
            with open(os.path.join(path, db, name), "rb") as f:
                out["%s.%s" % (db, name[:-5])] = by_id(rawbson.split_bson_docs(f.read()))
    return out


def read_archive(path):
    """{ns: {id_key: raw}} and {ns: metadata json} of a mongodump --archive file."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == struct.pack("<I", 0x8199E26D)
    pos, meta, docs = 4, {}, {}

    def doc_at(p):
        n = struct.unpack_from("<i", data, p)[0]
        return data[p:p + n], p + n
    _hdr, pos = doc_at(pos)
    while data[pos:pos + 4] != b"\xff\xff\xff\xff":
        raw, pos = doc_at(pos)
        d = decode(raw)
        meta["%s.%s" % (d["db"], d["collection"])] = d["metadata"]
    pos += 4
    while pos < len(data):
        raw, pos = doc_at(pos)
        h = decode(raw)
        ns = "%s.%s" % (h["db"], h["collection"])
        while data[pos:pos + 4] != b"\xff\xff\xff\xff":
            d, pos = doc_at(pos)
            if not h["EOF"]:
                docs.setdefault(ns, {})[rawbson.id_key_from_document(d)] = d
        pos += 4
    return docs, meta


def sr(lab, **kw):
    args = dict(job="snapjob", config_dir=lab["config_dir"])
    args.update(kw)
    return {SR: args}


SECRET = "lab-password"  # pki["encrypted"]'s key password


def no_canary(*results):
    """Neither the canary (namespace names, _ids, values) in stdout/stderr or any returned value, nor the key password
    anywhere, the module arguments Ansible echoes in `invocation` included (no_log must redact it there)."""
    for r in results:
        text = r.output + r.results_json()
        assert CANARY not in text, text[max(0, text.find(CANARY) - 1500):][:3000]
        assert SECRET not in r.everything(invocation=True)


def test_snapshot_info_lists_catalog_without_kmip(ansible, lab_job, tmp_path):
    e = lab_job["entry"]
    bare = str(tmp_path / "copy")
    shutil.copytree(lab_job["store"], bare)  # a fresh host: only a copy of the store, no config
    r = ansible.run([{SI: dict(job="snapjob", config_dir=lab_job["config_dir"])},
                     {SI: dict(job="snapjob", store=bare, snapshot="latest", config_dir=str(tmp_path / "none"))},
                     {SI: dict(job="snapjob", store=bare, snapshot="20200101T000000Z-00000000")},
                     {SI: dict(job="nojob", config_dir=lab_job["config_dir"])}], check=True)
    assert r[0]["changed"] is False and r[0]["store"] == lab_job["store"], r.output
    s = r[0]["snapshots"][-1]
    assert s["id"] == e["snapshot_id"] and s["cluster_time"] == e["cluster_time"] and s["kind"] == "on-demand"
    assert s["encryption"] is True and s["master_key_uids"] == [lab_job["uid"]]
    assert s["doc_count"] == 370 and s["namespaces"] == 2 and s["data_bytes"] > 0 and s["stored_bytes"] > 0
    assert set(s) == {"id", "created", "cluster_time", "data_bytes", "stored_bytes", "written_bytes", "doc_count",
                      "namespaces", "encryption", "master_key_uids", "expires", "kind", "authenticated"}
    # the daemon host's configuration gives KMIP access: checked against the catalog head
    assert r[0]["authenticated"] is True and s["authenticated"] is True and not r[0].get("warnings"), r.output
    assert lab_job["uid"] in r[0]["master_key_uids_needed"]
    assert r[1]["snapshots"][0]["id"] == r[0]["snapshots"][-1]["id"]
    # a fresh host without KMIP access: listed, but said to be unauthenticated
    assert r[1]["authenticated"] is False and r[1]["snapshots"][0]["authenticated"] is False
    assert any("No KMIP access configured" in w for w in r[1]["warnings"]), r[1]
    assert r[2]["failed"] and "has no snapshot 20200101T000000Z-00000000" in r[2]["msg"]
    assert r[3]["failed"] and "not declared" in r[3]["msg"]
    no_canary(r)


def test_restore_to_mongodb_directory_archive(ansible, lab_job, tmp_path, mongo_server):
    m = lab_job["mongo"]
    new_db = "restored_%d" % os.getpid()
    d, a = str(tmp_path / "dump"), str(tmp_path / "out" / "snap.archive")
    info_file = str(tmp_path / "restoreInfo-mongo.txt")
    tasks = [sr(lab_job, target_mongodb={"uri": mongo_server["uri"]}, rename_databases={lab_job["db"]: new_db}, restore_info_file=info_file),
             sr(lab_job, target_dir=d), sr(lab_job, target_archive=a)]
    r = ansible.run(tasks, check=True)
    for i in range(3):
        assert r[i]["changed"] is True and not r[i].get("failed"), r.output
        assert r[i]["planned_from"] == "manifest" and r[i]["documents"] == 370
        assert sorted(n["count"] for n in r[i]["namespaces"]) == [70, 300]
    assert [n["source"] for n in r[0]["namespaces"]] == ["#1", "#2"]
    assert not os.path.exists(d) and not os.path.exists(os.path.dirname(a)) and not os.path.exists(info_file)
    assert new_db not in m.list_database_names()

    r1 = ansible.run(tasks)
    r2 = ansible.run(tasks)
    no_canary(r, r1, r2)
    for i in range(3):
        assert r1[i]["changed"] is True and not r1[i].get("failed"), r1.output
        assert r1[i]["snapshot_id"] == lab_job["entry"]["snapshot_id"]
        assert r1[i]["cluster_time"] == lab_job["entry"]["cluster_time"]
        assert r1[i]["verify"] == {"enabled": True, "namespaces_verified": 2}
        assert all(n["verified"] for n in r1[i]["namespaces"])
        # O(key epochs): one access check per master key, one unwrap per data key (one epoch here)
        assert r1[i]["kmip_calls"] == 2 and r1[i]["kmip_server"].startswith("127.0.0.1:")
        assert r2[i]["changed"] is False and r2[i]["already_restored"] is True, r2.output
        assert r2[i]["kmip_calls"] == 2
        text = open(r1[i]["restore_info"]).read()
        assert "Snapshot ID: %s" % lab_job["entry"]["snapshot_id"] in text and "Master Key UUID: %s" % lab_job["uid"] in text
        assert "Encryption: enabled" in text and "KMIP Server: 127.0.0.1:" in text
    assert r1[0]["restore_info"] == info_file and r1[1]["restore_info"] == os.path.join(d, "restoreInfo.txt")
    assert r1[2]["restore_info"] == a + ".restoreInfo.txt"

    assert_db_equal(m, lab_job, new_db)
    src = lab_job["source"]
    assert read_dir(d, lab_job["db"]) == src
    docs, meta = read_archive(a)
    assert docs == src
    assert '"who_1"' in meta["%s.orders_%s" % (lab_job["db"], CANARY)]
    with open(os.path.join(d, lab_job["db"], "orders_%s.metadata.json" % CANARY)) as f:
        assert '"name": "who_1"' in f.read()

    # force: restore again over its own earlier restore
    r3 = ansible.run([sr(lab_job, target_dir=d, force=True)])
    assert r3[0]["changed"] is True and not r3[0].get("failed"), r3.output
    assert read_dir(d, lab_job["db"]) == src


def test_drop_false_refuses_non_empty_target(ansible, lab_job, tmp_path, mongo_server):
    m = lab_job["mongo"]
    busy_db = "busy_%d" % os.getpid()
    m[busy_db]["orders_" + CANARY].insert_one({"_id": 1, "keep": True})
    d = str(tmp_path / "dir")
    os.makedirs(d)
    with open(os.path.join(d, "other.txt"), "w") as f:
        f.write("keep")
    # a snapshot of its own: no earlier restore of it into this MongoDB (see test_second_database_restore)
    sid = make_snapshot(lab_job["head"], lab_job["js"], lab_job["keys"], lab_job["uid"], m, m[lab_job["db"]])["snapshot_id"]
    base = dict(target_mongodb={"uri": mongo_server["uri"]}, rename_databases={lab_job["db"]: busy_db}, snapshot=sid)
    label = "#%d" % (sorted(lab_job["source"]).index("%s.orders_%s" % (lab_job["db"], CANARY)) + 1)  # manifest order
    r = ansible.run([sr(lab_job, **base), sr(lab_job, target_dir=d)])
    no_canary(r)
    assert r[0]["failed"] and "namespace(s) %s are" % label in r[0]["msg"] and "not empty" in r[0]["msg"], r.output
    assert "nothing was written" in r[0]["msg"]
    assert r[1]["failed"] and "not empty" in r[1]["msg"]
    assert list(m[busy_db]["orders_" + CANARY].find()) == [{"_id": 1, "keep": True}]
    assert m[busy_db].list_collection_names() == ["orders_" + CANARY]
    assert os.listdir(d) == ["other.txt"]
    # names in plaintext only when asked; drop replaces
    r = ansible.run([sr(lab_job, show_namespaces=True, **base), sr(lab_job, drop=True, **base)])
    assert r[0]["failed"] and "%s.orders_%s" % (busy_db, CANARY) in r[0]["msg"], r.output
    assert r[1]["changed"] is True and not r[1].get("failed"), r.output
    assert r[1]["busy_namespaces"] == [label]
    assert_db_equal(m, lab_job, busy_db)


def test_second_database_restore_is_not_skipped(ansible, lab_job, mongo_server):
    m = lab_job["mongo"]
    sid = make_snapshot(lab_job["head"], lab_job["js"], lab_job["keys"], lab_job["uid"], m, m[lab_job["db"]])["snapshot_id"]
    dbs = ["second_a_%d" % os.getpid(), "second_b_%d" % os.getpid()]
    r = ansible.run([sr(lab_job, target_mongodb={"uri": mongo_server["uri"]}, snapshot=sid, rename_databases={lab_job["db"]: db},
                        restore_info_file=os.path.join(os.path.dirname(lab_job["store"]), db + ".txt")) for db in dbs])
    assert r[0]["changed"] is True and not r[0].get("failed"), r.output
    assert r[1]["changed"] is True and not r[1].get("failed"), r.output
    assert_db_equal(m, lab_job, dbs[1])
    r = ansible.run([sr(lab_job, target_mongodb={"uri": mongo_server["uri"]}, snapshot=sid, rename_databases={lab_job["db"]: dbs[0]},
                        restore_info_file=os.path.join(os.path.dirname(lab_job["store"]), dbs[0] + ".txt"))])
    assert r[0]["changed"] is False and r[0]["already_restored"] is True, r.output


def test_unencrypted_snapshot_of_encrypted_job_refused(ansible, lab_job, tmp_path, pki, kmip_server):
    """A store writer without keys forges a newer snapshot marked unencrypted: refused on a daemon host (the job's
    configuration) and on a fresh host (the job's keyring holds keys) unless allow_unencrypted."""
    copy = str(tmp_path / "store")
    shutil.copytree(lab_job["store"], copy)
    js = store.JobStore(copy, "snapjob")
    forged = {lab_job["db"] + ".forged": [{"_id": 1, "v": "forged"}]}
    sid = forge_null_snapshot(js, js.catalog()[-1], forged, encryption=False, new=True)
    commit_to_head(js, store.Keys(js, lab_job["client"]))  # as if the job had really taken it, before its encryption
    fresh = dict(job="snapjob", config_dir=str(tmp_path / "no-config"), store=copy, kmip_servers=["127.0.0.1:%d" % kmip_server["port"]],
                 kmip_ca_file=pki["ca"], client_cert_file=pki["clients"]["group1"]["pem"])
    outs = [str(tmp_path / n) for n in ("daemon-host", "fresh", "allowed")]
    r = ansible.run([sr(lab_job, store=copy, target_dir=outs[0]), {SR: dict(fresh, target_dir=outs[1])},
                     {SR: dict(fresh, target_dir=outs[2], allow_unencrypted=True)}])
    for res, why in ((r[0], "its configuration"), (r[1], "its keyring")):
        assert res["failed"] and res["error_kind"] == "catalog entry" and sid in res["msg"] and why in res["msg"], r.output
        assert "allow_unencrypted" in res["msg"]
    assert not os.path.exists(outs[0]) and not os.path.exists(outs[1])
    assert r[2]["changed"] is True and r[2]["snapshot_id"] == sid and r[2]["encryption"] is False, r.output
    assert read_dir(outs[2], lab_job["db"]) == {ns: by_id(encode(d) for d in docs) for ns, docs in forged.items()}
    # positive control for no_canary's results scan: an unencrypted snapshot's namespaces are returned in plaintext,
    # and the default verbosity prints none of it (scanning stdout alone would have missed them)
    assert r[2]["namespaces"][0]["source"] == lab_job["db"] + ".forged"
    assert CANARY in r.results_json() and CANARY not in r.output


def test_certificates(ansible, lab_job, tmp_path, pki, kmip_server):
    d1, d2, d3 = (str(tmp_path / n) for n in ("reissued", "group2", "fresh"))
    fresh = dict(config_dir=str(tmp_path / "no-config"), store=lab_job["store"], kmip_servers=["127.0.0.1:%d" % kmip_server["port"]],
                 kmip_ca_file=pki["ca"], client_cert_file=pki["encrypted"]["pem"], client_cert_password=pki["encrypted"]["password"])
    r = ansible.run([sr(lab_job, target_dir=d1, client_cert_file=pki["reissued"]["pem"]),
                     sr(lab_job, target_dir=d2, group="group2"),
                     {SR: dict(fresh, job="snapjob", target_dir=d3)},
                     {SR: dict(fresh, job="snapjob", target_dir=d3, client_cert_file=pki["clients"]["group2"]["pem"],
                               client_cert_password=None)}])
    no_canary(r)
    assert r[0]["changed"] is True and not r[0].get("failed"), r.output
    assert read_dir(d1, lab_job["db"]) == lab_job["source"]
    assert r[1]["failed"] and lab_job["uid"] in r[1]["msg"] and r[1]["error_kind"] == "permission_denied", r.output
    assert "cannot use the master key(s) %s" % lab_job["uid"] in r[1]["msg"]
    assert not os.path.exists(d2)
    assert r[2]["changed"] is True and not r[2].get("failed"), r.output
    assert read_dir(d3, lab_job["db"]) == lab_job["source"]
    assert r[3]["failed"] and lab_job["uid"] in r[3]["msg"]
    # no KMIP access at all: check mode plans from the catalog, a real run refuses
    bare = dict(config_dir=str(tmp_path / "no-config"), store=lab_job["store"], job="snapjob", target_dir=str(tmp_path / "nokmip"))
    r = ansible.run([{SR: bare}, dict({SR: bare}, check_mode=True)])
    no_canary(r)
    assert r[0]["failed"] and "is encrypted" in r[0]["msg"] and lab_job["uid"] in r[0]["msg"], r.output
    assert r[1]["changed"] is True and r[1]["planned_from"] == "catalog" and r[1]["documents"] == 370
    assert "namespaces" not in r[1] and r[1]["kmip_calls"] == 0
    assert not os.path.exists(str(tmp_path / "no-config")) and not os.path.exists(str(tmp_path / "nokmip"))


def test_tampered_chunk_fails_naming_it(ansible, lab_job, tmp_path):
    copy = str(tmp_path / "store")
    shutil.copytree(lab_job["store"], copy)
    chunks = os.path.join(copy, "snapjob", "chunks")
    sub = sorted(os.listdir(chunks))[0]
    cid = sorted(os.listdir(os.path.join(chunks, sub)))[0]
    path = os.path.join(chunks, sub, cid)
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 1
    open(path, "wb").write(bytes(data))
    d = str(tmp_path / "out")
    r = ansible.run([sr(lab_job, store=copy, target_dir=d)])
    no_canary(r)
    assert r[0]["failed"] and "chunk %s" % cid in r[0]["msg"] and "failed authentication" in r[0]["msg"], r.output
    assert not os.path.exists(d) and not [n for n in os.listdir(str(tmp_path)) if "kmipbackup-tmp" in n]


def test_verbose_run_shows_no_canary(ansible, lab_job, tmp_path, pki, kmip_server, mongo_server):
    """At -vvv Ansible prints every task's whole result, invocation included: successes, check mode and error paths of
    snapshot_info and snapshot_restore name no namespace, _id or value and print no password. Control: the same run
    restoring an unencrypted snapshot does show its names."""
    wrong = "zqWrongPw-4410"
    fresh = dict(job="snapjob", config_dir=str(tmp_path / "no-config"), store=lab_job["store"], kmip_servers=["127.0.0.1:%d" % kmip_server["port"]],
                 kmip_ca_file=pki["ca"], client_cert_file=pki["encrypted"]["pem"], client_cert_password=SECRET)
    d, a = str(tmp_path / "dir"), str(tmp_path / "snap.archive")
    r = ansible.run([{SI: dict(job="snapjob", config_dir=lab_job["config_dir"])},
                     dict(sr(lab_job, target_dir=d), check_mode=True),
                     sr(lab_job, target_dir=d),
                     {SR: dict(fresh, target_archive=a)},
                     sr(lab_job, target_mongodb={"uri": mongo_server["uri"]}),  # into the source database itself: not empty, refused
                     sr(lab_job, target_dir=str(tmp_path / "denied"), group="group2"),
                     {SR: dict(fresh, target_dir=str(tmp_path / "badpw"), client_cert_password=wrong)}], verbosity=3)
    assert [bool(x.get("failed")) for x in r.results] == [False] * 4 + [True] * 3, r.output[-4000:]
    assert "not empty" in r[4]["msg"] and r[5]["error_kind"] == "permission_denied" and "password" in r[6]["msg"]
    assert read_dir(d, lab_job["db"]) == lab_job["source"]
    # the verbose output really holds the results: return values and the echoed (redacted) arguments
    for needle in ('"namespaces_verified"', '"restore_info_text"', '"error_kind"', '"module_args"', "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"):
        assert needle in r.output, needle
    no_canary(r)
    assert wrong not in r.everything(invocation=True)

    copy = str(tmp_path / "plain-store")
    shutil.copytree(lab_job["store"], copy)
    js = store.JobStore(copy, "snapjob")
    forge_null_snapshot(js, js.catalog()[-1], {lab_job["db"] + ".plain": [{"_id": 1}]}, encryption=False, new=True)
    commit_to_head(js, store.Keys(js, lab_job["client"]))  # as if the job had really taken it, before its encryption
    r = ansible.run([{SR: dict(fresh, store=copy, target_dir=str(tmp_path / "plain"), allow_unencrypted=True)}], verbosity=3)
    assert r[0]["changed"] and r[0]["encryption"] is False, r.output[-4000:]
    assert "%s.plain" % lab_job["db"] in r.output


def test_backup_snapshot_through_daemon_then_restore(ansible, tmp_path, pki, kmip_server, mongo_server):
    import pymongo
    cd, dd = str(tmp_path / "etc"), str(tmp_path / "var")
    write_kmip_setup(cd, pki, kmip_server["port"])
    mc = pymongo.MongoClient(mongo_server["uri"])
    db = mc["bs_%d_%s" % (os.getpid(), CANARY)]
    source = fill_source(db)
    cfg, _info = job_config.plan_job({"job": "bsjob", "group": "group1", "source": {"uri": mongo_server["uri"], "connect_timeout": 3},
                                      "encryption": "enabled", "config_dir": cd, "data_dir": dd, "store": None,
                                      "master_key": {"create": True}, "state": "present"}, None, check_source)
    job_config.write_job(cd, cfg)
    task = {BS: dict(job="bsjob", config_dir=cd, data_dir=dd, timeout=60)}
    r = ansible.run([task], check=True)
    assert r[0]["changed"] is True and "request_id" not in r[0], r.output
    assert not job_requests.pending_requests(dd, "bsjob")

    d = DaemonProcess(cd, dd).start()
    try:
        d.wait_status("bsjob", lambda st: st["state"] == "STARTED" and st["consistent"], timeout=120)
        out = str(tmp_path / "restored")
        r = ansible.run([task,
                         {SI: dict(job="bsjob", config_dir=cd)},
                         {SR: dict(job="bsjob", config_dir=cd, snapshot="{{ r0.snapshot.id }}", target_dir=out,
                                   include=[db.name + ".*"])}])
        # a full verification (every head document against the source), then a resync: a second initial sync
        # after which the job is STARTED again
        rv = ansible.run([{BS: dict(task[BS], action="verify")}, {BS: dict(task[BS], action="resync")}])
        verified, resync = rv.results
        d.wait_status("bsjob", lambda st: st.get("initial_syncs") == 2 and st["state"] == "STARTED" and st["consistent"],
                      timeout=120)
        status = d.status("bsjob")
    finally:
        d.stop()
    no_canary(rv)
    ndocs = sum(len(v) for v in source.values())
    v = verified["verification"]
    assert verified["changed"] is True and v["checked"] >= ndocs and v["mismatched"] == v["recopied"] == 0, rv.output
    assert "snapshot" not in verified and resync["resync"] == "started", rv.output
    assert status["verification"]["checked"] >= ndocs, status
    no_canary(r)
    assert r[0]["changed"] is True and not r[0].get("failed"), r.output
    s = r[0]["snapshot"]
    assert s["kind"] == "on-demand" and s["encryption"] is True and s["master_key_uids"] == [cfg["master_key_uid"]]
    assert s["id"] in [x["id"] for x in r[1]["snapshots"]] and s["stored_bytes"] > 0 and s["doc_count"] >= 370
    assert r[2]["changed"] is True and r[2]["snapshot_id"] == s["id"] and not r[2].get("failed"), r.output
    assert read_dir(out, db.name) == source

    # no daemon running: the request is not answered in time; an undeclared job fails at once
    r = ansible.run([{BS: dict(task[BS], timeout=1)}, {BS: dict(job="nojob", config_dir=cd, data_dir=dd)}])
    assert r[0]["failed"] and "did not reach an answer" in r[0]["msg"] and r[0]["request_id"], r.output
    assert r[1]["failed"] and "not declared" in r[1]["msg"]
    mc.close()


def test_restore_playbook(ansible, lab_job, tmp_path, pki, kmip_server):
    d = str(tmp_path / "incident")
    ev = dict(job="snapjob", snapshot=lab_job["entry"]["snapshot_id"], store=lab_job["store"], target_dir=d,
              config_dir=str(tmp_path / "fresh-host"), kmip_servers=["127.0.0.1:%d" % kmip_server["port"]], kmip_ca_file=pki["ca"],
              client_cert_file=pki["encrypted"]["pem"], client_cert_password=pki["encrypted"]["password"])
    pb = os.path.join(ROOT, "playbooks", "restore.yml")
    p = ansible.run_playbook(pb, "--check", extra_vars=ev)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "would be restored (check mode)" in out, out[-4000:]
    assert not os.path.exists(d)
    p = ansible.run_playbook(pb, extra_vars=ev, verbosity=3)  # -vvv: every task's whole result is printed
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "snapshot %s" % lab_job["entry"]["snapshot_id"] in out and "370 document(s)" in out
    assert "Verified: 2 namespace(s)" in out
    assert '"restore_info_text"' in out and '"namespaces_verified"' in out  # the results are in the output scanned
    assert CANARY not in out and SECRET not in out
    assert read_dir(d, lab_job["db"]) == lab_job["source"]
    p = ansible.run_playbook(pb, extra_vars=ev)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "already held this restore, nothing done" in out, out[-4000:]
    assert CANARY not in out and SECRET not in out
    p = ansible.run_playbook(pb, extra_vars=dict(ev, client_cert_file=pki["clients"]["group2"]["pem"], client_cert_password=None,
                                                 target_dir=str(tmp_path / "denied")))
    out = p.stdout + p.stderr
    # refused by the restore's checks before anything is written, naming the key
    assert p.returncode != 0 and "cannot use the master key(s) %s" % lab_job["uid"] in out, out[-4000:]
    assert not os.path.exists(str(tmp_path / "denied"))
    # the same with become: the restore task then runs the module in the background and polls it; its failure is the task's
    p = ansible.run_playbook(pb, extra_vars=dict(ev, client_cert_file=pki["clients"]["group2"]["pem"], client_cert_password=None,
                                                 target_dir=str(tmp_path / "denied"), ansible_become=True))
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "cannot use the master key(s) %s" % lab_job["uid"] in out, out[-4000:]
    assert "TASK [Stop when" not in out and not os.path.exists(str(tmp_path / "denied"))

    # allow_unencrypted passes through, default false: a forged unencrypted snapshot is refused, then allowed
    copy = str(tmp_path / "forged-store")
    shutil.copytree(lab_job["store"], copy)
    js = store.JobStore(copy, "snapjob")
    forge_null_snapshot(js, js.catalog()[-1], {"forged.c": [{"_id": 1}]}, encryption=False, new=True)
    commit_to_head(js, store.Keys(js, lab_job["client"]))  # as if the job had really taken it, before its encryption
    forged = dict(ev, store=copy, snapshot="latest", target_dir=str(tmp_path / "forged"))
    p = ansible.run_playbook(pb, extra_vars=forged)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "allow_unencrypted" in out and not os.path.exists(forged["target_dir"]), out[-4000:]
    p = ansible.run_playbook(pb, extra_vars=dict(forged, allow_unencrypted=True))
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "Encryption: disabled" in out, out[-4000:]
    assert os.path.exists(os.path.join(forged["target_dir"], "forged", "c.bson"))
