"""Security regressions of the snapshot store and restore (review findings): a downgrade of an encrypted job to
the null cipher, path traversal through manifest namespace names, documents and names in error texts, the mode of
an existing parent folder, and the canary scanner's own positive control. Keys come from a local key-provider
double (nothing here claims KMIP behaviour); the MongoDB target is the real SecantusDB server."""
import datetime
import os
import resource
import signal
import stat

import bson
import pymongo
import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import restore, snapshot, store, timeutil
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, RestoreError
from snapshot_helpers import LocalKeyProvider, all_types_docs, canary_hits, forge_null_snapshot, make_head, split_docs

CANARY = "OcelotCanary19"


def job(tmp, namespaces, encryption=True):
    """(provider, job store, catalog entry) of a job with one snapshot of namespaces {ns: [docs]}."""
    provider = LocalKeyProvider()
    provider.create("mk1")
    js = store.JobStore(str(tmp / "store"), "job1")
    h = make_head(str(tmp / "h" / "head.db"), namespaces, key=os.urandom(32) if encryption else None)
    keys = store.Keys(js, provider if encryption else None, encryption)
    e = snapshot.take_snapshot(h, js, keys, "job1", "mk1" if encryption else None, encryption)
    h.close()
    return provider, js, e


def docs(n=10):
    return [{"_id": i, "v": "%s-%d" % (CANARY, i)} for i in range(n)]


def test_null_cipher_downgrade_of_encrypted_job_fails(tmp_path):
    """/tmp/review/downgrade.py: a forged entry claiming encryption with key "none" and a public checksum."""
    provider, js, e = job(tmp_path, {"d.c": docs()})
    sid = forge_null_snapshot(js, e, {"d.c": [{"_id": 1, "v": "EVIL"}]}, encryption=True)
    out = tmp_path / "out"
    for expect in (True, None):
        with pytest.raises(IntegrityError) as err:
            restore.restore(js, sid, store.Keys(js, provider, True), restore.DirectoryTarget(str(out)), expect_encryption=expect)
        assert err.value.kind == "catalog entry" and err.value.object_id == sid
        assert "claims encryption without a data key" in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # every object of the forgery is refused on its own by an encrypted job's keys
    keys = store.Keys(js, provider, True)
    with pytest.raises(IntegrityError) as err:
        js.read_manifest(sid, keys)
    assert err.value.kind == "manifest" and "names no data key" in str(err.value)
    forged = js.read_manifest(sid, store.Keys(js, None, False))["namespaces"][0]["chunks"][0]
    with pytest.raises(IntegrityError) as err:
        js.read_chunk(forged, keys)
    assert err.value.kind == "chunk" and err.value.object_id == forged["id"]
    with pytest.raises(IntegrityError):
        keys.key("none")
    # the snapshot's two wraps, and per restore one unwrap of its snapshot key (the catalog head's MAC key): nothing for
    # the forgery
    assert provider.calls == 4


def test_catalog_entry_claiming_unencrypted_refused_for_encrypted_job(tmp_path):
    provider, js, e = job(tmp_path, {"d.c": docs()})
    sid = forge_null_snapshot(js, e, {"d.c": [{"_id": 1, "v": "EVIL"}]}, encryption=False, new=True)
    assert js.catalog()[-1]["snapshot_id"] == sid  # the unverified listing shows it as the newest
    for keys, expect in ((store.Keys(js, provider, True), None), (store.Keys(js, provider, False), True)):
        with pytest.raises(IntegrityError, match="unencrypted but the job is encrypted") as err:
            restore.restore(js, sid, keys, restore.DirectoryTarget(str(tmp_path / "o1")), expect_encryption=expect)
        assert err.value.kind == "catalog entry" and err.value.object_id == sid
    # 'latest' follows the catalog head, not the planted entry: the real snapshot restores
    restore.restore(js, "latest", store.Keys(js, provider, True), restore.DirectoryTarget(str(tmp_path / "o2")))
    assert split_docs((tmp_path / "o2" / "d" / "c.bson").read_bytes()) == [bson.encode(d) for d in docs()]
    with pytest.raises(IntegrityError, match="has only a checksum"):  # the whole catalog head forged as well
        js.put_head(store.Keys(js, None, False), [(e["seq"], e["snapshot_id"]), (e["seq"] + 1, sid)], "none")
        restore.plan(js, "latest", store.Keys(js, provider, True))
    assert not (tmp_path / "o1").exists()


def test_gc_of_a_job_whose_encryption_was_enabled(tmp_path):
    """Snapshots taken before encryption was enabled stay readable for GC (which only decides what to keep)."""
    provider, js, plain = job(tmp_path, {"d.c": docs(3000)}, encryption=False)
    h = make_head(str(tmp_path / "h2" / "head.db"), {"d.c": docs(3000)}, key=os.urandom(32))
    enc = snapshot.take_snapshot(h, js, store.Keys(js, provider, True), "job1", "mk1", True)
    h.close()
    gc = js.gc(store.Keys(js, provider, True), now=timeutil.utcnow() + datetime.timedelta(hours=2))
    assert gc["chunks_deleted"] == 0 and gc["manifests_deleted"] == 0
    # the catalog head (MAC'ed with the encrypted snapshot's key) is checked first: it needs the job's KMIP access
    restore.restore(js, plain["snapshot_id"], store.Keys(js, provider, False), restore.DirectoryTarget(str(tmp_path / "p")))
    restore.restore(js, enc["snapshot_id"], store.Keys(js, provider, True), restore.DirectoryTarget(str(tmp_path / "e")))


@pytest.mark.parametrize("ns", ["{escaped}.pwn", "a\\b.c", ".c", "d.", "d.x\x00y", "d$x.c", "..c", "d" * 64 + ".c"])
def test_forged_namespace_names_no_target_can_hold(tmp_path, ns):
    """An unencrypted job's store can be rewritten by anyone who can write to it: a manifest name no MongoDB
    allows (a database name with / \\ $ or 64+ bytes, an empty name, NUL) is refused before anything is
    written, by position and with what to do."""
    ns = ns.format(escaped=str(tmp_path / "escaped"))
    _provider, js, e = job(tmp_path, {"d.c": docs()}, encryption=False)
    sid = forge_null_snapshot(js, e, {"d.ok": docs(2), ns: docs(3)}, encryption=False, new=True)
    keys = store.Keys(js, None, False)
    for target in (restore.DirectoryTarget(str(tmp_path / "out")), restore.ArchiveTarget(str(tmp_path / "a" / "x.archive"))):
        with pytest.raises(RestoreError) as err:
            restore.restore(js, sid, keys, target)
        msg = str(err.value)
        assert msg.startswith("Namespace #2 cannot be restored to any target:") and "exclude" in msg, msg
        assert "nothing was written" in msg
    assert sorted(os.listdir(tmp_path)) == ["h", "store"]
    restore.restore(js, sid, keys, restore.DirectoryTarget(str(tmp_path / "out")), exclude=[ns])  # the others restore
    assert sorted(os.listdir(tmp_path / "out")) == ["d", "restoreInfo.txt"]


@pytest.mark.parametrize("ns, file", [("d.../up", "..%2Fup"), ("d..hidden", ".hidden"), ("d.a/../../up", "a%2F..%2F..%2Fup"),
                                      ("d./abs", "%2Fabs"), ("d.\\abs", "%5Cabs"), ("d.%2F..", "%252F.."),
                                      ("d." + "/" * 100, "%2F" * 69 + "%" + "%24" + "I_ypOCbo-0Mvl48CFLlZb_hZqfM")])
def test_forged_collection_names_stay_inside_the_target(tmp_path, ns, file):
    """Collection names that look like paths are restored into files inside their database's folder, named as
    mongodump names them (url.PathEscape; over 238 bytes: 208 bytes, %24, base64url of the name's SHA-1)."""
    _provider, js, e = job(tmp_path, {"d.c": docs()}, encryption=False)
    sid = forge_null_snapshot(js, e, {"d.ok": docs(2), ns: docs(3)}, encryption=False, new=True)
    keys = store.Keys(js, None, False)
    restore.restore(js, sid, keys, restore.DirectoryTarget(str(tmp_path / "out")))
    assert sorted(os.listdir(tmp_path)) == ["h", "out", "store"]
    assert sorted(os.listdir(tmp_path / "out")) == ["d", "restoreInfo.txt"]
    assert sorted(os.listdir(tmp_path / "out" / "d")) == sorted([file + ".bson", file + ".metadata.json", "ok.bson", "ok.metadata.json"])
    assert split_docs((tmp_path / "out" / "d" / (file + ".bson")).read_bytes()) == [bson.encode(d) for d in docs(3)]
    restore.restore(js, sid, keys, restore.ArchiveTarget(str(tmp_path / "a" / "x.archive")))
    assert sorted(os.listdir(tmp_path / "a")) == ["x.archive", "x.archive.restoreInfo.txt"]


def test_rename_targets_validated_and_slash_in_collection_stays_inside(tmp_path):
    _provider, js, _e = job(tmp_path, {"d.a/b": docs(3), "d.c": docs(2)}, encryption=False)
    keys = store.Keys(js, None, False)
    for bad in ("../evil", "a/b", "", "x.y", "/abs", "a\\b", "n\x00ul"):
        with pytest.raises(RestoreError, match="not a valid database name"):
            restore.restore(js, "latest", keys, restore.DirectoryTarget(str(tmp_path / "out")), rename={"d": bad})
    assert not (tmp_path / "out").exists()
    restore.restore(js, "latest", keys, restore.DirectoryTarget(str(tmp_path / "out")), rename={"d": "d2"})
    assert sorted(os.listdir(tmp_path / "out" / "d2")) == ["a%2Fb.bson", "a%2Fb.metadata.json", "c.bson", "c.metadata.json"]


def test_mongodb_errors_name_no_document_id_or_namespace(tmp_path, mongo_server):
    dup = [{"_id": "%s-id-%d" % (CANARY, i), "v": CANARY + "-same"} for i in range(3)]
    provider, js, e = job(tmp_path, {"src.c": dup})
    db = "secdup%d" % os.getpid()
    client = pymongo.MongoClient(mongo_server["uri"])
    client[db]["c"].create_index("v", unique=True)  # empty: not busy, but the restore's inserts collide
    target = restore.MongoTarget(mongo_server["uri"])
    try:
        with pytest.raises(RestoreError) as err:
            restore.restore(js, "latest", store.Keys(js, provider), target, rename={"src": db})
        msg = str(err.value)
        assert "stopped at namespace #1 (BulkWriteError, code" in msg and "write error(s)" in msg, msg
        assert CANARY not in msg and db not in msg and "src" not in msg, msg
        marker = client[restore.MARKER_DB][restore.MARKER_COLL].find_one({"snapshot_id": e["snapshot_id"]})
        assert marker["state"] == "incomplete" and marker["job"] == "job1"
    finally:
        target.close()
        client.drop_database(db)
        client.close()


def test_os_errors_name_no_file_path(tmp_path):
    """A file-system error while writing (here EFBIG: a file-size limit, which binds root too) is reported by its
    kind, without the file's path (it holds the namespace's names)."""
    ns = "db_%s.coll_%s" % (CANARY, CANARY)
    provider, js, _e = job(tmp_path, {ns: docs(3000)})
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, old_limit[1]))
    try:
        with pytest.raises(RestoreError) as err:
            restore.restore(js, "latest", store.Keys(js, provider), restore.DirectoryTarget(str(tmp_path / "out")))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    msg = str(err.value)
    assert "Writing namespace #1 into" in msg and "File too large" in msg and CANARY not in msg, msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_existing_parent_keeps_its_mode(tmp_path):
    provider, js, _e = job(tmp_path, {"d.c": docs()})
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    keys = store.Keys(js, provider)
    restore.restore(js, "latest", keys, restore.DirectoryTarget(str(shared / "out")))
    restore.restore(js, "latest", keys, restore.ArchiveTarget(str(shared / "x.archive")))
    restore.restore(js, "latest", keys, restore.DirectoryTarget(str(shared / "out")), drop=True)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    restore.restore(js, "latest", keys, restore.DirectoryTarget(str(tmp_path / "new" / "deep" / "out")))
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in (tmp_path / "new", tmp_path / "new" / "deep")] == [0o700, 0o700]


def test_canary_scanner_positive_control(tmp_path):
    """The scanner finds the canary in an unencrypted store (its chunks and manifests are zstd-compressed, where a
    scan of raw bytes sees nothing) and finds nothing in an encrypted one."""
    ns = "db_%s.coll_%s" % (CANARY, CANARY)
    namespaces = {ns: all_types_docs(CANARY), "o.c": [{"_id": i, "pad": "p" * 300} for i in range(3000)]}
    plain_dir, enc_dir = tmp_path / "plain", tmp_path / "enc"
    plain_dir.mkdir()
    enc_dir.mkdir()
    job(plain_dir, namespaces, encryption=False)
    hits = canary_hits(str(plain_dir / "store"), CANARY)
    assert any("/chunks/" in p for p in hits) and any("/manifests/" in p for p in hits), hits
    job(enc_dir, namespaces, encryption=True)
    assert canary_hits(str(enc_dir / "store"), CANARY) == []
