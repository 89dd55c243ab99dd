"""A restore reads and authenticates each chunk once (restore.SnapshotSource), so a MongoDB restore meets a tampered or
missing chunk while it writes: the target is put back as it was (what the restore created dropped, a namespace replaced
by drop left as it was, its marker as before), against a real SecantusDB target, a real SeaweedFS bucket whose server is
killed mid-restore, and a folder store."""
import os
import time
import uuid

import boto3
import bson
from bson.raw_bson import RawBSONDocument
import pymongo
import pytest
from botocore.config import Config

import kmipbackup_lab as lab
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import objectstore, restore, snapshot, store
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, RestoreTimeout, StoreError
from snapshot_helpers import LocalKeyProvider, make_head

CANARY = "OnePassCanaryHeron"
NAMESPACES = ("src.a", "src.b", "src.c")


def docs(ns, n):
    return [{"_id": i, "ns": ns, "pad": os.urandom(120).hex(), "tag": CANARY} for i in range(n)]


@pytest.fixture
def job(tmp_path):
    """A folder store with one snapshot of three namespaces of many small chunks (so a tamper lands mid-restore)."""
    provider = LocalKeyProvider()
    provider.create("mk1")
    js = store.JobStore(str(tmp_path / "store"), "onepass")
    data = {ns: docs(ns, 1500) for ns in NAMESPACES}
    h = make_head(str(tmp_path / "h" / "head.db"), data, key=os.urandom(32),
                  indexes={"src.b": [{"v": 2, "key": {"tag": 1}, "name": "tag_1"}]})
    snapshot.take_snapshot(h, js, store.Keys(js, provider), "onepass", "mk1", True, target_bytes=32 << 10)
    h.close()
    keys = store.Keys(js, provider)
    entry = js.catalog_entry("latest")
    manifest = js.read_manifest(entry["snapshot_id"], keys, entry["manifest_sha256"])
    chunks = {n["ns"]: [c["id"] for c in n["chunks"]] for n in manifest["namespaces"]}
    assert all(len(c) >= 4 for c in chunks.values()), chunks
    return {"js": js, "keys": keys, "data": data, "chunks": chunks, "root": tmp_path / "store"}


def image(client, db):
    """{collection: sorted raw documents} of a target database, and its index names."""
    out = {}
    for name in sorted(client[db].list_collection_names()):
        coll = client[db].get_collection(name, codec_options=bson.CodecOptions(document_class=RawBSONDocument))
        out[name] = (sorted(d.raw for d in coll.find({})), sorted(i["name"] for i in coll.list_indexes()))
    return out


def tamper(job, ns, which):
    cid = job["chunks"][ns][which]
    path = job["root"] / "onepass" / "chunks" / cid[:2] / cid
    original = path.read_bytes()
    data = bytearray(original)
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    return cid, lambda: path.write_bytes(original)


def test_each_chunk_read_once_and_a_tampered_chunk_mid_mongodb_restore_puts_the_target_back(job, mongo_server):
    js, keys = job["js"], job["keys"]
    client = pymongo.MongoClient(mongo_server["uri"])
    db, fresh, empty = ("op%s_%s" % (x, uuid.uuid4().hex[:8]) for x in ("done", "new", "empty"))
    target = restore.MongoTarget(mongo_server["uri"])
    markers = client[restore.MARKER_DB][restore.MARKER_COLL]
    try:
        reads, read_chunk = [], js.read_chunk
        js.read_chunk = lambda c, k: reads.append(c["id"]) or read_chunk(c, k)
        restore.restore(js, "latest", keys, target, rename={"src": db})
        js.read_chunk = read_chunk
        every = [c for ns in NAMESPACES for c in job["chunks"][ns]]
        assert sorted(reads) == sorted(every)  # no pre-pass: each chunk read (and authenticated) once
        before = image(client, db)
        assert before["b"][1] == ["_id_", "tag_1"]
        for ns in NAMESPACES:
            assert before[ns[4:]][0] == sorted(bson.encode(d) for d in job["data"][ns])
        marker_before = markers.find_one({"job": "onepass", "state": "complete"})

        cid, untamper = tamper(job, "src.b", 2)  # the second namespace, mid-way: "a" is loaded by then
        # drop over a complete restore: the replaced namespaces load under staging names, never renamed in
        with pytest.raises(IntegrityError) as e:
            restore.restore(js, "latest", keys, target, rename={"src": db}, drop=True)
        assert e.value.kind == "chunk" and e.value.object_id == cid
        assert image(client, db) == before
        assert markers.find_one({"_id": marker_before["_id"]}) == marker_before
        # into a new database: everything created is dropped again, no marker left
        n_markers = markers.count_documents({})
        with pytest.raises(IntegrityError):
            restore.restore(js, "latest", keys, target, rename={"src": fresh})
        assert fresh not in client.list_database_names()
        assert markers.count_documents({}) == n_markers
        # an existing empty collection the restore inserted into is emptied again, and stays
        client[empty].create_collection("a")
        with pytest.raises(IntegrityError):
            restore.restore(js, "latest", keys, target, rename={"src": empty})
        assert client[empty].list_collection_names() == ["a"] and client[empty]["a"].count_documents({}) == 0
        untamper()

        # the same drop now succeeds and replaces the namespaces in place
        restore.restore(js, "latest", keys, target, rename={"src": db}, drop=True)
        assert image(client, db) == before
    finally:
        target.close()
        for name in (db, fresh, empty):
            client.drop_database(name)
        client.close()


class Commands(pymongo.monitoring.CommandListener):
    """The names of the commands a client sends, in order (with the collection of an insert or createIndexes)."""

    def __init__(self):
        self.sent = []

    def started(self, event):
        name = event.command_name
        self.sent.append((name, event.command.get(name)) if name in ("insert", "createIndexes") else (name, None))

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


def test_indexes_are_built_once_every_document_is_in_and_not_at_all_when_a_late_chunk_is_tampered(job, mongo_server):
    js, keys = job["js"], job["keys"]
    client = pymongo.MongoClient(mongo_server["uri"])
    db, other = ("ix%s_%s" % (x, uuid.uuid4().hex[:8]) for x in ("done", "bad"))
    commands = Commands()
    target = restore.MongoTarget(mongo_server["uri"], event_listeners=[commands])
    try:
        restore.restore(js, "latest", keys, target, rename={"src": db})
        names = [name for name, _coll in commands.sent]
        inserts = [k for k, (name, _coll) in enumerate(commands.sent) if name == "insert"]
        builds = [k for k, (name, _coll) in enumerate(commands.sent) if name == "createIndexes"]
        # every collection's inserts come before the first index build (as mongorestore: indexes after all the data)
        assert {coll for name, coll in commands.sent if name == "insert"} == {"a", "b", "c"}
        assert builds and max(inserts) < min(builds), names
        assert image(client, db)["b"][1] == ["_id_", "tag_1"]

        del commands.sent[:]
        cid, untamper = tamper(job, "src.c", len(job["chunks"]["src.c"]) - 1)  # the last chunk of the last namespace
        try:
            with pytest.raises(IntegrityError) as e:
                restore.restore(js, "latest", keys, target, rename={"src": other})
        finally:
            untamper()
        assert e.value.object_id == cid
        assert ("insert", "a") in commands.sent and ("insert", "b") in commands.sent  # found late: a and b were loaded ...
        assert not [c for c in commands.sent if c[0] == "createIndexes"]  # ... but no index was built for nothing
        assert other not in client.list_database_names()
    finally:
        target.close()
        for name in (db, other):
            client.drop_database(name)
        client.close()


def test_missing_chunk_fails_a_directory_and_an_archive_restore_untouched(job, tmp_path):
    js, keys = job["js"], job["keys"]
    cid = job["chunks"]["src.c"][1]
    os.unlink(str(job["root"] / "onepass" / "chunks" / cid[:2] / cid))
    for t in (restore.DirectoryTarget(str(tmp_path / "dir")), restore.ArchiveTarget(str(tmp_path / "dump.archive"))):
        with pytest.raises(StoreError, match="missing"):
            restore.restore(js, "latest", keys, t)
    assert sorted(os.listdir(str(tmp_path))) == ["h", "store"]  # no target, no temporary sibling left


def test_a_restore_past_its_timeout_stops_mid_way_and_puts_the_target_back(job, mongo_server, tmp_path):
    """snapshot_restore's timeout (restore.yml's restore_timeout): each chunk read takes 0.1 s, the deadline falls
    after about four of the twelve or more, so the restore stops mid-way; the target is as before, for MongoDB (a
    drop over a complete restore, a new database) and for a directory and an archive."""
    js, keys = job["js"], job["keys"]
    client = pymongo.MongoClient(mongo_server["uri"])
    db, fresh = ("to%s_%s" % (x, uuid.uuid4().hex[:8]) for x in ("done", "new"))
    target = restore.MongoTarget(mongo_server["uri"])
    markers = client[restore.MARKER_DB][restore.MARKER_COLL]
    reads, read_chunk = [], js.read_chunk

    def slow_read(c, k):
        reads.append(c["id"])
        time.sleep(0.1)
        return read_chunk(c, k)

    def timed(t, **kw):
        entry, selected = restore.plan(js, "latest", keys, rename=kw.pop("rename", None))
        del reads[:]
        js.read_chunk = slow_read
        try:
            with pytest.raises(RestoreTimeout, match="ran past its timeout of 7 s .* put back"):
                restore.execute(js, keys, entry, selected, t, deadline=(time.monotonic() + 0.45, 7), **kw)
        finally:
            js.read_chunk = read_chunk
        every = sum(len(c) for c in job["chunks"].values())
        assert 2 <= len(reads) < every  # stopped mid-way, not before the start or after the end
    try:
        restore.restore(js, "latest", keys, target, rename={"src": db})
        before, marker_before = image(client, db), markers.find_one({"job": "onepass", "state": "complete"})
        timed(target, rename={"src": db}, drop=True)
        assert image(client, db) == before
        assert markers.find_one({"_id": marker_before["_id"]}) == marker_before
        n_markers = markers.count_documents({})
        timed(target, rename={"src": fresh})
        assert fresh not in client.list_database_names()
        assert markers.count_documents({}) == n_markers
        for t in (restore.DirectoryTarget(str(tmp_path / "dir")), restore.ArchiveTarget(str(tmp_path / "dump.archive"))):
            timed(t)
        assert sorted(os.listdir(str(tmp_path))) == ["h", "store"]  # no target, no temporary sibling left
    finally:
        target.close()
        for name in (db, fresh):
            client.drop_database(name)
        client.close()


def test_endpoint_killed_mid_mongodb_restore_from_a_bucket(tmp_path, mongo_server):
    """The S3 server dies while a MongoDB restore reads from it: a clear StoreError naming the endpoint, the target as
    it was. The chunks come through the direct GET path while the server answers."""
    srv = lab.start_s3_server(str(tmp_path / "s3"))
    client = pymongo.MongoClient(mongo_server["uri"])
    db = "opdead_%s" % uuid.uuid4().hex[:8]
    target = restore.MongoTarget(mongo_server["uri"])
    try:
        boto3.client("s3", endpoint_url=srv["endpoint"], aws_access_key_id=srv["access_key"],
                     aws_secret_access_key=srv["secret_key"], region_name="us-east-1",
                     config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket="kb-dead")
        st = objectstore.S3Storage("kb-dead", "p", endpoint_url=srv["endpoint"], access_key=srv["access_key"],
                                   secret_key=srv["secret_key"], connect_timeout=1, read_timeout=5, max_attempts=2)
        provider = LocalKeyProvider()
        provider.create("mk1")
        js = store.JobStore(st, "dead")
        h = make_head(str(tmp_path / "h" / "head.db"), {ns: docs(ns, 1500) for ns in NAMESPACES}, key=os.urandom(32))
        snapshot.take_snapshot(h, js, store.Keys(js, provider), "dead", "mk1", True, target_bytes=32 << 10)
        h.close()
        keys = store.Keys(js, provider)
        read_chunk, reads = js.read_chunk, [0]

        def dying_read_chunk(*a, **kw):
            reads[0] += 1
            if reads[0] == 12:
                lab.stop(srv["pid"])
            return read_chunk(*a, **kw)
        js.read_chunk = dying_read_chunk
        with pytest.raises(StoreError, match="cannot be reached|failed") as e:
            restore.restore(js, "latest", keys, target, rename={"src": db})
        assert srv["endpoint"] in str(e.value) and "kb-dead" in str(e.value) and CANARY not in str(e.value)
        assert st.direct_gets > 0
        assert db not in client.list_database_names()
        assert client[restore.MARKER_DB][restore.MARKER_COLL].count_documents({"job": "dead"}) == 0
    finally:
        target.close()
        client.drop_database(db)
        client.close()
        lab.stop(srv["pid"])
