"""Store integrity against someone who can write to the snapshot store but holds no key (security review, issue 9
items 2-7): replayed and swapped catalog entries, rollback (removed newest entry, replayed expired snapshot, a
whole-store rollback seen against the daemon's own record), wrap modes the configuration does not allow, and
tampered wrapped keys. Keys come from the real PyKMIP server over mutual TLS; the data from real heads."""
import base64
import datetime
import json
import os
import shutil

import bson
import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    config, crypto, job_config, job_status, kmip, restore, retention, snapshot, store, timeutil)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError
from snapshot_helpers import make_head, split_docs, upsert_docs

T0 = datetime.datetime(2026, 11, 1, 0, 0, 0, tzinfo=datetime.timezone.utc)
ONLY_RECENT = {"interval_hours": 6, "recent_days": 2, "daily_days": 0, "weekly_weeks": 0, "monthly_months": 0}


def client_for(pki, kmip_server, **kw):
    kc = config.KmipConfig(servers=["127.0.0.1:%d" % kmip_server["port"]], ca_file=pki["ca"], **kw)
    return kmip.KmipClient(kc, config.GroupConfig("g", pki["clients"]["group1"]["pem"]))


@pytest.fixture(scope="module")
def master_uid(pki, kmip_server):
    with client_for(pki, kmip_server) as c:
        return c.create_master_key("store-integrity-test")


def docs_v(v, n=50):
    return [{"_id": i, "v": v} for i in range(n)]


@pytest.fixture
def three(tmp_path, pki, kmip_server, master_uid):
    """A job with snapshots S1, S2, S3 six hours apart, whose documents carry v=1, 2, 3."""
    h = make_head(str(tmp_path / "h" / "head.db"), {"d.c": docs_v(1)}, key=os.urandom(32))
    js = store.JobStore(str(tmp_path / "store"), "ijob")
    out = []
    with client_for(pki, kmip_server) as c:
        keys = store.Keys(js, c)
        for i in (1, 2, 3):
            if i > 1:
                with h.write() as w:
                    upsert_docs(w, "d.c", docs_v(i))
            e = snapshot.take_snapshot(h, js, keys, "ijob", master_uid, True, now=T0 + datetime.timedelta(hours=6 * i))
            h.mark_snapshotted(e["change_seq"])
            out.append(e)
    h.close()
    return {"tmp": tmp_path, "js": js, "entries": out, "root": tmp_path / "store" / "ijob"}


def restored_v(path):
    got = split_docs((path / "d" / "c.bson").read_bytes())
    assert got and len(got) == 50
    return {bson.decode(raw)["v"] for raw in got}


def test_restores_are_byte_equal_per_snapshot(three, pki, kmip_server):
    """Control: each snapshot restores its own documents, byte-equal."""
    with client_for(pki, kmip_server) as c:
        for i, e in enumerate(three["entries"], 1):
            out = three["tmp"] / ("ok%d" % i)
            restore.restore(three["js"], e["snapshot_id"], store.Keys(three["js"], c), restore.DirectoryTarget(str(out)))
            assert split_docs((out / "d" / "c.bson").read_bytes()) == [bson.encode(d) for d in docs_v(i)]


def test_replayed_entry_copied_over_another_is_refused(three, pki, kmip_server):
    """Item 2: S1's catalog entry copied over S2's restored S1's data as S2."""
    s1, s2 = (e["snapshot_id"] for e in three["entries"][:2])
    cat = three["root"] / "catalog"
    shutil.copyfile(cat / (s1 + ".json"), cat / (s2 + ".json"))
    out = three["tmp"] / "replayed"
    with client_for(pki, kmip_server) as c:
        with pytest.raises(IntegrityError) as err:
            restore.restore(three["js"], s2, store.Keys(three["js"], c), restore.DirectoryTarget(str(out)))
    assert err.value.kind == "catalog entry" and err.value.object_id == s2
    assert "holds the entry of another snapshot (%s)" % s1 in str(err.value)
    assert not out.exists()


def test_removed_newest_entry_is_a_rollback(three, pki, kmip_server):
    """Item 3: deleting the newest entry made 'latest' restore the one before, silently."""
    s3 = three["entries"][2]["snapshot_id"]
    os.unlink(three["root"] / "catalog" / (s3 + ".json"))
    out = three["tmp"] / "latest"
    with client_for(pki, kmip_server) as c:
        keys = store.Keys(three["js"], c)
        for call in (lambda: restore.restore(three["js"], "latest", keys, restore.DirectoryTarget(str(out))),
                     lambda: three["js"].live_catalog(keys)):
            with pytest.raises(IntegrityError) as err:
                call()
            assert err.value.kind == "catalog entry" and err.value.object_id == s3
            assert "is missing, but the catalog head lists it as live (sequence number 3)" in str(err.value)
    assert not out.exists()


def test_replayed_expired_snapshot_is_refused(three, pki, kmip_server):
    """Item 3: an expired snapshot's entry, manifest and chunks put back made it restorable again."""
    js, root = three["js"], three["root"]
    s1, s2, s3 = (e["snapshot_id"] for e in three["entries"])
    saved = three["tmp"] / "saved"
    shutil.copytree(root, saved)  # what an attacker kept before retention and GC ran
    now = T0 + datetime.timedelta(days=2, hours=8)  # S1 is older than 2 days, S2 and S3 are not
    with client_for(pki, kmip_server) as c:
        keys = store.Keys(js, c)
        assert retention.apply_retention(js, ONLY_RECENT, now, keys) == [s1]
        js.gc(keys, now=timeutil.utcnow() + datetime.timedelta(days=1))  # past the grace period of the real files
        assert not (root / "manifests" / s1).exists()
        for sub in ("catalog", "manifests", "chunks"):
            shutil.copytree(saved / sub, root / sub, dirs_exist_ok=True)
        assert {e["snapshot_id"] for e in js.catalog()} == {s1, s2, s3}  # the unverified listing shows it again
        out = three["tmp"] / "expired"
        with pytest.raises(IntegrityError) as err:
            restore.restore(js, s1, keys, restore.DirectoryTarget(str(out)))
        assert err.value.kind == "catalog entry" and err.value.object_id == s1
        assert "is not live according to the catalog head (last sequence number 3)" in str(err.value)
        assert not out.exists()
        assert [e["snapshot_id"] for e in js.live_catalog(keys)[0]] == [s2, s3]
        # the next retention run removes the replayed entry; the live ones still restore
        retention.apply_retention(js, ONLY_RECENT, now, keys)
        assert sorted(e["snapshot_id"] for e in js.catalog()) == [s2, s3]
        restore.restore(js, "latest", keys, restore.DirectoryTarget(str(three["tmp"] / "l")))
        assert restored_v(three["tmp"] / "l") == {3}


def test_whole_store_rollback_detected_against_the_daemons_record(three, pki, kmip_server, master_uid):
    """Item 3: the catalog head itself put back to an older state (S3's entry and head removed, S2's head replayed) is
    consistent in itself; the daemon's own record of its last snapshot (status last_snapshot) shows what is missing."""
    js, root = three["js"], three["root"]
    s2, s3 = three["entries"][1]["snapshot_id"], three["entries"][2]["snapshot_id"]
    old = three["tmp"] / "old"
    shutil.copytree(root, old)
    h = make_head(str(three["tmp"] / "h4" / "head.db"), {"d.c": docs_v(4)}, key=os.urandom(32))
    with client_for(pki, kmip_server) as c:
        s4 = snapshot.take_snapshot(h, js, store.Keys(js, c), "ijob", master_uid, True, now=T0 + datetime.timedelta(hours=24))
        shutil.rmtree(root)
        shutil.copytree(old, root)  # the store as it was before S4
        keys = store.Keys(js, c)
        assert js.resolve("latest", keys)["snapshot_id"] == s3  # alone, the old state looks whole
        for call in (lambda: restore.plan(js, "latest", keys, last_known=s4["snapshot_id"]),
                     lambda: snapshot.take_snapshot(h, js, keys, "ijob", master_uid, True, last_known=s4["snapshot_id"])):
            with pytest.raises(IntegrityError) as err:
                call()
            assert err.value.kind == "catalog head" and err.value.object_id == s3
            assert "record of its last snapshot %s, which is missing from the store" % s4["snapshot_id"] in str(err.value)
        # an older record (a snapshot that has expired since) is no rollback
        assert restore.plan(js, "latest", keys, last_known=s2)[0]["snapshot_id"] == s3
    h.close()


def test_catalog_head_tampering(three, pki, kmip_server):
    js, root = three["js"], three["root"]
    path = root / "catalog-head.json"
    head = json.loads(path.read_text())
    assert head["seq"] == 3 and [sid for _s, sid in head["live"]] == [e["snapshot_id"] for e in three["entries"]]
    with client_for(pki, kmip_server) as c:
        keys = store.Keys(js, c)
        path.write_text(json.dumps(dict(head, live=head["live"][1:])))  # drop S1 from the live set
        with pytest.raises(IntegrityError) as err:
            js.resolve("latest", keys)
        assert err.value.kind == "catalog head" and "failed authentication" in str(err.value)
        path.unlink()
        with pytest.raises(IntegrityError) as err:
            js.resolve(three["entries"][0]["snapshot_id"], keys)
        assert err.value.kind == "catalog head" and "is missing while the catalog holds entries" in str(err.value)


def _record(root, key_id):
    return json.loads((root / "keyring" / (key_id + ".json")).read_text())


def test_legacy_wrap_mode_refused_without_opt_in(three, pki, kmip_server, master_uid):
    """Item 6: a keyring record rewritten to mode rfc5649 made a kmip_1_2 client fetch the master key (KMIP Get)."""
    js, root = three["js"], three["root"]
    rec = _record(root, "snapshot-1")
    rec["wrapped"] = {"master_key_uid": master_uid, "mode": "rfc5649", "wrapped": base64.b64encode(os.urandom(40)).decode()}
    (root / "keyring" / "snapshot-1.json").write_text(json.dumps(rec))
    out = three["tmp"] / "legacy"
    with client_for(pki, kmip_server) as c:
        with pytest.raises(IntegrityError) as err:
            restore.restore(js, "latest", store.Keys(js, c), restore.DirectoryTarget(str(out)))
        assert c.calls == 0  # refused before any KMIP operation: no Get
    assert err.value.kind == "keyring entry" and err.value.object_id == "snapshot-1"
    msg = str(err.value)
    assert "uses the legacy mode rfc5649" in msg and "allow_legacy_unwrap" in msg and "ijob/keyring/snapshot-1.json" in msg
    assert not out.exists()
    # with the explicit opt-in the record is unwrapped (Get), and then fails its own integrity check
    with client_for(pki, kmip_server, allow_legacy_unwrap=True) as c:
        with pytest.raises(IntegrityError, match="failed its integrity check") as err:
            restore.restore(js, "latest", store.Keys(js, c), restore.DirectoryTarget(str(out)))
        assert c.calls == 1 and err.value.object_id == "snapshot-1"


def test_legacy_records_unwrap_with_legacy_protocol_or_opt_in(pki, kmip_server, master_uid):
    data_key = os.urandom(32)
    with client_for(pki, kmip_server, protocol="legacy") as c:
        rec = c.wrap(master_uid, data_key)
        assert rec["mode"] == "rfc5649" and c.unwrap(rec) == data_key
    with client_for(pki, kmip_server) as c:
        with pytest.raises(IntegrityError, match="does not allow") as err:
            c.unwrap(rec)
        assert err.value.kind == "wrapped_key" and c.calls == 0
    with client_for(pki, kmip_server, allow_legacy_unwrap=True) as c:
        assert c.unwrap(rec) == data_key


def test_tampered_wrapped_key_names_the_keyring_entry(three, pki, kmip_server, master_uid):
    """Item 7: a tampered wrapped key failed naming the master key, not the store object."""
    js, root = three["js"], three["root"]
    rec = _record(root, "snapshot-1")
    ct = bytearray(base64.b64decode(rec["wrapped"]["ct"]))
    ct[0] ^= 1
    rec["wrapped"]["ct"] = base64.b64encode(bytes(ct)).decode()
    (root / "keyring" / "snapshot-1.json").write_text(json.dumps(rec))
    with client_for(pki, kmip_server) as c:
        with pytest.raises(IntegrityError) as err:
            restore.restore(js, "latest", store.Keys(js, c), restore.DirectoryTarget(str(three["tmp"] / "t")))
    assert err.value.kind == "keyring entry" and err.value.object_id == "snapshot-1"
    msg = str(err.value)
    assert msg.startswith("The snapshot store's keyring entry snapshot-1 (ijob/keyring/snapshot-1.json) cannot be used:")
    assert "failed authentication at the KMIP server" in msg and "restore the keyring from a copy of the store" in msg
    # a record whose wrapped key names another master key than the record is refused before any KMIP call
    rec = _record(root, "chunk_id-1")
    rec["wrapped"]["master_key_uid"] = "999999"
    (root / "keyring" / "chunk_id-1.json").write_text(json.dumps(rec))
    with client_for(pki, kmip_server) as c:
        with pytest.raises(IntegrityError, match="names master key %s but its wrapped key names 999999" % master_uid):
            store.Keys(js, c).key("chunk_id-1")
        assert c.calls == 0


# ---- through the modules and the restore playbook (real ansible-playbook runs) ----------------------------------------

SI = "kmipbackup.mongodb.snapshot_info"
SR = "kmipbackup.mongodb.snapshot_restore"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def daemon_host(tmp_path, pki, kmip_server):
    """A daemon host's configuration (kmip.yml, group1, job 'mjob', encrypted) and a store with S1 (v=1), S2 (v=2)."""
    from daemon_helper import write_kmip_setup
    cd, dd = str(tmp_path / "etc"), str(tmp_path / "var")
    write_kmip_setup(cd, pki, kmip_server["port"])
    root = os.path.join(dd, "store")
    client = kmip.KmipClient(config.load_kmip_config(cd), config.load_group(cd, "group1"))
    uid = client.create_master_key("mjob")
    job_config.write_job(cd, {"job": "mjob", "group": "group1", "source": dict(job_config.SOURCE_DEFAULTS, uri="mongodb://unused"),
                              "encryption": True, "master_key_uid": uid, "previous_master_key_uids": [], "store": root,
                              "state": "present", "generation": 1, "schedule": dict(job_config.SCHEDULE_DEFAULTS)})
    js = store.JobStore(root, "mjob")
    h = make_head(str(tmp_path / "h" / "head.db"), {"d.c": docs_v(1)}, key=os.urandom(32))
    out = []
    for i in (1, 2):
        if i > 1:
            with h.write() as w:
                upsert_docs(w, "d.c", docs_v(i))
        out.append(snapshot.take_snapshot(h, js, store.Keys(js, client), "mjob", uid, True, now=T0 + datetime.timedelta(hours=6 * i)))
    h.close()
    client.close()
    yield {"config_dir": cd, "data_dir": dd, "root": root, "js": js, "uid": uid, "entries": out, "tmp": tmp_path}


def plant(js, like, sid, seq, uids):
    """An entry written by someone without keys: any fields, a MAC that cannot check."""
    entry = dict(like, snapshot_id=sid, seq=seq, master_key_uids=uids, mac="hmac-sha256:" + "0" * 64)
    js.storage.put_atomic(js._p("catalog", sid + ".json"), json.dumps(entry).encode())


def test_modules_replayed_entry_refused(ansible, daemon_host):
    """Items 2 and 4 through snapshot_restore: S1's entry copied over S2's restored S1's data as S2, changed=true."""
    s1, s2 = (e["snapshot_id"] for e in daemon_host["entries"])
    cat = os.path.join(daemon_host["root"], "mjob", "catalog")
    shutil.copyfile(os.path.join(cat, s1 + ".json"), os.path.join(cat, s2 + ".json"))
    out = str(daemon_host["tmp"] / "out")
    r = ansible.run([{SR: dict(job="mjob", snapshot=s2, config_dir=daemon_host["config_dir"], target_dir=out)}])
    assert r[0].get("failed") and r[0]["error_kind"] == "catalog entry", r.output[-3000:]
    assert "catalog entry %s holds the entry of another snapshot (%s)" % (s2, s1) in r[0]["msg"]
    assert not os.path.exists(out)


def test_snapshot_info_marks_planted_entry_unauthenticated(ansible, daemon_host):
    """Item 5: a planted entry was listed like any other, its attacker-chosen master key UID among the keys needed."""
    js, uid = daemon_host["js"], daemon_host["uid"]
    s1, s2 = (e["snapshot_id"] for e in daemon_host["entries"])
    planted = "20270101T000000Z-0badc0de"
    plant(js, daemon_host["entries"][1], planted, 99, ["attacker-777"])
    args = dict(job="mjob", config_dir=daemon_host["config_dir"])
    r = ansible.run([{SI: args}, {SI: dict(args, snapshot="latest")}, {SI: dict(args, snapshot=planted)},
                     {SI: dict(job="mjob", store=daemon_host["root"], config_dir=str(daemon_host["tmp"] / "none"))}])
    assert r[0]["authenticated"] is True, r.output[-3000:]
    assert [(s["id"], s["authenticated"]) for s in r[0]["snapshots"]] == [(s1, True), (s2, True), (planted, False)]
    assert r[0]["master_key_uids_needed"] == [uid]
    assert any(planted in w and "not authenticated" in w for w in r[0]["warnings"]), r[0]
    assert r[1]["snapshots"][0]["id"] == s2 and r[1]["snapshots"][0]["authenticated"] is True
    assert r[2].get("failed") and r[2]["error_kind"] == "catalog entry"
    assert "is newer than the catalog head (last sequence number 2) but does not authenticate" in r[2]["msg"]
    # without KMIP access nothing is checked, and it says so
    assert r[3]["authenticated"] is False and {s["authenticated"] for s in r[3]["snapshots"]} == {False}
    assert any("No KMIP access configured" in w for w in r[3]["warnings"])


def test_restore_playbook_reports_resolved_latest_and_restores_it(ansible, daemon_host):
    """Item 4: the playbook restores the snapshot 'latest' resolves to through the catalog head, not the planted newest
    entry, and names it (one module run resolves and restores: nothing can change what 'latest' means in between)."""
    s2 = daemon_host["entries"][1]["snapshot_id"]
    plant(daemon_host["js"], daemon_host["entries"][1], "20270101T000000Z-0badc0de", 99, ["attacker-777"])
    d = str(daemon_host["tmp"] / "incident")
    p = ansible.run_playbook(os.path.join(ROOT, "playbooks", "restore.yml"),
                             extra_vars=dict(job="mjob", config_dir=daemon_host["config_dir"], target_dir=d))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "Job mjob: snapshot %s taken" % s2 in out and "0badc0de" not in out, out[-4000:]
    assert split_docs(open(os.path.join(d, "d", "c.bson"), "rb").read()) == [bson.encode(x) for x in docs_v(2)]


def test_snapshot_restore_compares_with_the_daemons_record(ansible, daemon_host):
    """Item 3 on a daemon host: the daemon's status names a last snapshot newer than anything the store holds (the
    store was rolled back wholesale): the restore fails naming it, and writes nothing."""
    newer = "20261102T000000Z-0123abcd"
    job_status.write_status(daemon_host["data_dir"], "mjob", {"job": "mjob", "last_snapshot": {"id": newer}})
    out = str(daemon_host["tmp"] / "out")
    args = dict(job="mjob", config_dir=daemon_host["config_dir"], target_dir=out)
    r = ansible.run([{SR: dict(args, data_dir=daemon_host["data_dir"])}, {SI: dict(job="mjob", config_dir=daemon_host["config_dir"],
                                                                                   data_dir=daemon_host["data_dir"])},
                     {SR: dict(args, data_dir=str(daemon_host["tmp"] / "fresh"))}])
    for res in r.results[:2]:
        assert res.get("failed") and res["error_kind"] == "catalog head", r.output[-3000:]
        assert "record of its last snapshot %s, which is missing from the store" % newer in res["msg"]
    assert r[2]["changed"] is True and r[2]["snapshot_id"] == daemon_host["entries"][1]["snapshot_id"]  # no record: no check


def test_rotation_starts_a_new_chunk_id_key(tmp_path, pki, kmip_server, master_uid):
    """Item 11: the chunk-id key was carried across epochs, so someone holding only the old master key could confirm a
    guessed chunk of a new epoch by computing its id. The guess here is the real content of every new chunk."""
    with client_for(pki, kmip_server) as c:
        new_uid = c.create_master_key("store-integrity-rotated")
        padded = [dict(d, pad="p" * 200) for d in docs_v(1, 3000)]  # about 40 chunks of 16 kB
        h = make_head(str(tmp_path / "h" / "head.db"), {"d.c": padded}, key=os.urandom(32))
        js = store.JobStore(str(tmp_path / "store"), "rjob")
        keys = store.Keys(js, c)
        h.mark_snapshotted(snapshot.take_snapshot(h, js, keys, "rjob", master_uid, True, target_bytes=16 << 10)["change_seq"])
        with h.write() as w:
            upsert_docs(w, "d.c", docs_v(2, 10))
        e2 = snapshot.take_snapshot(h, js, keys, "rjob", new_uid, True, target_bytes=16 << 10)
        h.close()
        assert e2["key_id"] == "snapshot-2" and e2["master_key_uids"] == [new_uid]
        records = {r["key_id"]: r for r in js.keyring_records()}
        assert records["chunk_id-2"]["master_key_uid"] == new_uid
        # the holder of the old master key unwraps the old epoch's chunk-id key...
        old_id_key = c.unwrap(records["chunk_id-1"]["wrapped"])
        new_id_key = keys.key("chunk_id-2")
        # ...and computes the ids the new epoch's chunks would have under it: none is in the store
        chunks = [ch for n in js.read_manifest(e2["snapshot_id"], keys)["namespaces"] for ch in n["chunks"]]
        assert len(chunks) > 20
        stored = set(js.chunk_ids())
        for ch in chunks:
            plain = js.read_chunk(ch, keys)
            assert crypto.chunk_id(new_id_key, plain, key_id="snapshot-2") == ch["id"]  # control: the real derivation
            assert crypto.chunk_id(old_id_key, plain, key_id="snapshot-2") not in stored
        restore.restore(js, "latest", keys, restore.DirectoryTarget(str(tmp_path / "out")))
        expected = [bson.encode(d) for d in docs_v(2, 10) + padded[10:]]
        assert split_docs((tmp_path / "out" / "d" / "c.bson").read_bytes()) == expected
