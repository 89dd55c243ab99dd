"""Names the source accepts (security review, issue 9 item 9): collections named "/abs", "a..b", with dots,
spaces, unicode, 120- and 200-byte names, names equal to mongodump's escape sequences ("%2F", "%24"), in a
database with a unicode name, go source -> head (initial sync, capture, verification) -> encrypted snapshot
(real PyKMIP) -> restore to MongoDB (SecantusDB), a mongodump directory and a mongodump archive, byte-equal
per document. A name a target cannot hold is a RestoreError naming the namespace's position and exclude,
with nothing written."""
import base64
import hashlib
import os
import time
import uuid

import bson
import pymongo
import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    config, head, kmip, mongo, restore, snapshot, source, store)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import RestoreError
from snapshot_helpers import canary_hits, read_archive, split_docs

RAW = CodecOptions(document_class=RawBSONDocument)
TAG = uuid.uuid4().hex[:8]
DB = "hn_" + TAG
DB2 = "hn\u00e9_" + TAG  # a unicode database name
LONG = "\u00e9" * 100  # 200 bytes: 600 once percent-encoded, so its file name is cut and hashed
CORPUS = [
    "/abs", "a..b", "trail.", "a.b.c", "x..", "dots...in...a.row", "with space", " lead space", "trail space ",
    "\u00e9t\u00e9 \u2603 \U0001F600", "c" * 120, "\u00e9" * 60, LONG, "\u00e9" * 99 + "x",
    "a/b", "a%2Fb", "a%252Fb", "%", "%25", "%24", "x%24" + "y" * 27, "a\\b", "a/../../up", "a%2F..%2F..%2Fup", "/..",
    "q?;,#[]*", "tab\tx", "new\nline", "&+:=@~", "plain",
]
MAYBE = ["$dollar", "a$b", "a.$b"]  # MongoDB refuses "$" in collection names; kept where the source allows it
INDEXED = "a..b"


def client_for(pki, kmip_server):
    kc = config.KmipConfig(servers=["127.0.0.1:%d" % kmip_server["port"]], ca_file=pki["ca"])
    return kmip.KmipClient(kc, config.GroupConfig("g", pki["clients"]["group1"]["pem"]))


def go_path_escape(name):
    """Go's url.PathEscape byte by byte (letters, digits and -._~$&+:=@ kept, every other byte %XX), then
    mongodump's outputPath rule for names over 238 bytes; written from the Go sources, independently of
    mongodump.escape_collection_name."""
    out = "".join(chr(b) if (chr(b).isascii() and chr(b).isalnum()) or chr(b) in "-._~$&+:=@" else "%%%02X" % b
                  for b in name.encode("utf-8"))
    if len(out) > 238:
        out = out[:208] + "%24" + base64.urlsafe_b64encode(hashlib.sha1(name.encode("utf-8")).digest()).decode().rstrip("=")
    return out


def docs_for(name):
    return [{"_id": 1, "name": name, "v": os.urandom(16)}, {"_id": "s-" + name, "n": 2},
            {"_id": bson.ObjectId(), "nested": {"name": name, "arr": [1, name]}}]


def run(db, cmd):
    return db.command(cmd, codec_options=RAW)


def source_docs(client, ns):
    return sorted(d for b in mongo.find_raw_batches(client, ns, {}) for d in split_docs(b))


@pytest.fixture(scope="module")
def plain(mongo_server):
    c = pymongo.MongoClient(mongo_server["uri"], document_class=RawBSONDocument)
    yield c
    for name in c.list_database_names():
        if name.endswith(TAG):
            c.drop_database(name)
    c.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, plain, mongo_server, pki, kmip_server):
    """The corpus created at the source through raw commands, an encrypted head from an initial sync, and
    one encrypted snapshot of it (real KMIP). names: {ns: name}."""
    refused = []
    names = {}
    for coll in CORPUS + MAYBE:
        for db in (DB, DB2) if coll in ("plain", "/abs") else (DB,):
            try:
                run(plain[db], {"create": coll})
            except pymongo.errors.OperationFailure:
                refused.append(coll)
                continue
            run(plain[db], {"insert": coll, "documents": docs_for(coll)})
            names["%s.%s" % (db, coll)] = coll
    assert not set(refused) - set(MAYBE), refused  # everything but "$" names is accepted by the source
    run(plain[DB], {"createIndexes": INDEXED, "indexes": [{"key": {"n": 1}, "name": "n_1", "sparse": True}]})
    tmp = tmp_path_factory.mktemp("hostile")
    h = head.Head(str(tmp / "head" / "head.db"), os.urandom(32))
    src = source.connect({"uri": mongo_server["uri"], "connect_timeout": 10})
    source.initial_sync(h, src)
    with client_for(pki, kmip_server) as c:
        uid = c.create_master_key("hostile-names")
        js = store.JobStore(str(tmp / "store"), "job-hn")
        entry = snapshot.take_snapshot(h, js, store.Keys(js, c), "job-hn", uid, True)
        manifest = js.read_manifest(entry["snapshot_id"], store.Keys(js, c), entry["manifest_sha256"])
    yield {"tmp": tmp, "head": h, "src": src, "store": js, "entry": entry, "names": names,
           "positions": {n["ns"]: i for i, n in enumerate(manifest["namespaces"], 1)}}
    src.close()
    h.close()


def head_docs(h, ns):
    with h.read() as r:
        return sorted(raw for _k, raw in r.scan(ns))


def test_initial_sync_verify_and_capture_keep_every_name(world, plain):
    h, src = world["head"], world["src"]
    with h.read() as r:
        in_head = {n["ns"] for n in r.namespaces()}
    assert set(world["names"]) <= in_head
    for ns in world["names"]:
        assert head_docs(h, ns) == source_docs(plain, ns) and len(head_docs(h, ns)) == 3, ns
    counts = source.verify(h, src, full=True)
    assert counts["mismatched"] == 0 and counts["checked"] >= 2 * 3 * len(world["names"]), counts
    counts = source.verify(h, src, sample=5)
    assert counts["mismatched"] == 0 and counts["checked"] > 0, counts
    # a document the head lacks is re-read from the source by _id (recopy), in a name pymongo's Collection refuses
    ns = "%s.%s" % (DB, INDEXED)
    extra = bson.encode({"_id": "recopied", "x": 1})
    run(plain[DB], {"insert": INDEXED, "documents": [RawBSONDocument(extra)]})
    with h.write() as w:
        source.recopy_document(w, src, ns, bson.encode({"_id": "recopied"}))
    assert extra in head_docs(h, ns)
    run(plain[DB], {"delete": INDEXED, "deletes": [{"q": {"_id": "recopied"}, "limit": 1}]})
    # change capture: a new hostile collection, inserts and a delete in old ones
    new_ns = "%s.x..new" % DB
    run(plain[DB], {"create": "x..new"})
    run(plain[DB], {"insert": "x..new", "documents": docs_for("x..new")})
    run(plain[DB], {"insert": "/abs", "documents": [{"_id": 99, "late": True}]})
    cap = source.Capture(h, src)
    deadline, idle = time.monotonic() + 60, 0
    while idle < 2:
        assert time.monotonic() < deadline, "capture did not catch up"
        idle = idle + 1 if cap.run_once(max_time=1.0) == 0 and h.position()["consistent"] else 0
    cap.close()
    for ns in (new_ns, "%s./abs" % DB, "%s.%s" % (DB, INDEXED)):
        assert head_docs(h, ns) == source_docs(plain, ns), ns
    run(plain[DB], {"drop": "x..new"})
    run(plain[DB], {"delete": "/abs", "deletes": [{"q": {"_id": 99}, "limit": 1}]})


def test_encrypted_store_holds_no_name(world):
    assert canary_hits(str(world["tmp"] / "store"), TAG) == []  # every database name of the corpus holds TAG


def _restore(world, pki, kmip_server, target, include=(DB + ".*", DB2 + ".*"), **kw):
    js = world["store"]
    with client_for(pki, kmip_server) as c:
        return restore.restore(js, world["entry"]["snapshot_id"], store.Keys(js, c), target, include=list(include), **kw)


def test_restore_directory_names_files_as_mongodump(world, plain, pki, kmip_server):
    out = world["tmp"] / "dir"
    _restore(world, pki, kmip_server, restore.DirectoryTarget(str(out)))
    expect = {}
    for ns, name in world["names"].items():
        db = ns.split(".", 1)[0]
        base = go_path_escape(name)
        expect.setdefault(db, set()).update({base + ".bson", base + ".metadata.json"})
        assert sorted(split_docs((out / db / (base + ".bson")).read_bytes())) == source_docs(plain, ns), ns
        meta = bson.json_util.loads((out / db / (base + ".metadata.json")).read_text())
        assert meta["collectionName"] == name
        if name == INDEXED:
            assert {i["name"] for i in meta["indexes"]} == {"_id_", "n_1"}
    # exactly these files, one per name (no two names share one), each inside its database folder
    assert sorted(os.listdir(out)) == sorted(list(expect) + ["restoreInfo.txt"])
    for db, files in expect.items():
        assert set(os.listdir(out / db)) == files
        assert all(len(f.encode()) <= 255 for f in files)
    assert len(go_path_escape(LONG)) == 238 and go_path_escape(LONG) != go_path_escape(LONG[:-1] + "x")


def test_restore_archive_keeps_every_name(world, plain, pki, kmip_server):
    path = world["tmp"] / "a" / "dump.archive"
    _restore(world, pki, kmip_server, restore.ArchiveTarget(str(path)))
    _h, metas, docs, _crcs = read_archive(str(path))
    assert {m["db"] + "." + m["collection"] for m in metas} == set(world["names"])
    for ns in world["names"]:
        assert sorted(docs[ns]) == source_docs(plain, ns), ns


def test_restore_mongodb_keeps_every_name(world, plain, mongo_server, pki, kmip_server):
    rename = {DB: "hnr_" + TAG, DB2: "hnr\u00e9_" + TAG}
    target = restore.MongoTarget(mongo_server["uri"])
    try:
        result = _restore(world, pki, kmip_server, target, rename=rename)
        assert result["namespaces"] == len(world["names"])
        for ns, name in world["names"].items():
            db = ns.split(".", 1)[0]
            assert source_docs(plain, "%s.%s" % (rename[db], name)) == source_docs(plain, ns), ns
        idx = run(plain[rename[DB]], {"listIndexes": INDEXED, "cursor": {}})["cursor"]["firstBatch"]
        assert {i["name"]: i.get("sparse") for i in idx} == {"_id_": None, "n_1": True}
        # busy check and drop work on the same names
        with pytest.raises(RestoreError, match="not empty"):
            _restore(world, pki, kmip_server, target, rename=rename)
        _restore(world, pki, kmip_server, target, rename=rename, drop=True)
        for ns, name in world["names"].items():
            db = ns.split(".", 1)[0]
            assert source_docs(plain, "%s.%s" % (rename[db], name)) == source_docs(plain, ns), ns
    finally:
        target.close()


def test_name_mongodb_cannot_hold_is_a_clear_error_and_writes_nothing(world, plain, mongo_server, pki, kmip_server):
    """LONG (200 bytes) fits the source's database but not a 55-byte target database (55 + 1 + 200 > 255), where
    its 199-byte neighbour still fits."""
    long_db = ("hnlong_" + TAG + "_" + "d" * 60)[:55]
    target = restore.MongoTarget(mongo_server["uri"])
    markers = plain[restore.MARKER_DB][restore.MARKER_COLL].count_documents({})
    try:
        with pytest.raises(RestoreError) as err:
            _restore(world, pki, kmip_server, target, include=[DB + ".*"], rename={DB: long_db})
        msg = str(err.value)
        pos = world["positions"]["%s.%s" % (DB, LONG)]
        assert msg.startswith("Namespace #%d cannot be restored to MongoDB:" % pos), msg
        assert "255 bytes" in msg and "exclude" in msg and "nothing was written" in msg, msg
        assert LONG not in msg and DB not in msg and long_db not in msg  # encrypted: by position only
        assert long_db not in plain.list_database_names()
        assert plain[restore.MARKER_DB][restore.MARKER_COLL].count_documents({}) == markers
        # leaving it out restores everything else
        _restore(world, pki, kmip_server, target, include=[DB + ".*"], rename={DB: long_db}, exclude=["%s.%s" % (DB, LONG)])
        got = set(plain[long_db].list_collection_names())
        assert got == {name for ns, name in world["names"].items() if ns.startswith(DB + ".") and name != LONG}
    finally:
        target.close()
        plain.drop_database(long_db)
