"""The snapshot store in an S3 bucket, against a real S3 server (SeaweedFS, started by the s3_server fixture):
the storage contract (atomic and conditional puts, paginated listing, multipart, touch), a snapshot, an
incremental one, a byte-equal restore, tamper detection, garbage collection, the store's format record, clear
errors for wrong credentials, a missing bucket and a dead endpoint, and an endpoint killed mid-snapshot (nothing
visible, the next snapshot succeeds) and mid-restore (it fails, the target untouched)."""
import datetime
import os
import time
import uuid

import boto3
import pytest
from botocore.config import Config

import kmipbackup_lab as lab
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import objectstore, restore, snapshot, store, timeutil
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, SnapshotError, StoreError
from snapshot_helpers import LocalKeyProvider, all_types_docs, make_head, split_docs, upsert_docs

CANARY = "S3CanaryOtter"


def s3_client(srv):
    return boto3.client("s3", endpoint_url=srv["endpoint"], aws_access_key_id=srv["access_key"],
                        aws_secret_access_key=srv["secret_key"], region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


@pytest.fixture
def bucket(s3_server):
    name = "kb-%s" % uuid.uuid4().hex[:12]
    s3_client(s3_server).create_bucket(Bucket=name)
    return name


def storage(srv, bucket, prefix="backups/site-a", **kw):
    return objectstore.S3Storage(bucket, prefix, endpoint_url=srv["endpoint"], access_key=srv["access_key"],
                                 secret_key=srv["secret_key"], **kw)


def docs(n, start=0):
    return [{"_id": start + i, "pad": os.urandom(150).hex(), "v": start + i} for i in range(n)]


def restored(tmp_path, js, provider, sid, name):
    out = tmp_path / name
    restore.restore(js, sid, store.Keys(js, provider), restore.DirectoryTarget(str(out)))
    return {p.parent.name + "." + p.name[:-5]: split_docs(p.read_bytes()) for p in out.glob("*/*.bson")}


def head_image(h):
    with h.read() as r:
        return {n["ns"]: [raw for _k, raw in r.scan(n["ns"])] for n in r.namespaces()}


def test_storage_contract(s3_server, bucket, monkeypatch):
    st = storage(s3_server, bucket)
    st.list_page = 7  # several ListObjectsV2 pages
    for i in range(20):
        st.put_atomic("area/obj-%02d" % i, b"v%d" % i)
    for d in ("x", "y", "z"):
        st.put_atomic("area/%s/inner" % d, b"deep")
    assert st.list("area") == ["obj-%02d" % i for i in range(20)] + ["x", "y", "z"]
    assert st.list("nothing-here") == []
    assert st.get("area/obj-03") == b"v3" and st.exists("area/obj-03") and not st.exists("area/obj-99")
    assert st.size("area/obj-13") == 3
    with pytest.raises(StoreError, match="missing under s3://%s/backups/site-a" % bucket):
        st.get("area/obj-99")
    before = st.mtime("area/obj-00")
    time.sleep(1.1)  # LastModified has one-second resolution
    st.touch("area/obj-00")
    assert st.mtime("area/obj-00") > before and st.get("area/obj-00") == b"v0"
    assert st.put_new("once", b"first") is True
    assert st.put_new("once", b"second") is False  # a conditional PUT: the first writer wins
    assert st.get("once") == b"first"
    st.delete("area/obj-00")
    assert not st.exists("area/obj-00")
    with pytest.raises(FileNotFoundError):
        st.mtime("area/obj-00")
    # multipart above the threshold (S3's smallest part is 5 MiB): assembled only when whole
    monkeypatch.setattr(objectstore, "MULTIPART_BYTES", 5 << 20)
    monkeypatch.setattr(objectstore, "PART_BYTES", 5 << 20)
    big = os.urandom(12 << 20)
    st2 = storage(s3_server, bucket)
    st2.put_atomic("big", big)
    assert st2.get("big") == big
    parts = s3_client(s3_server).head_object(Bucket=bucket, Key="backups/site-a/big", PartNumber=1)
    assert parts.get("PartsCount", 1) >= 2
    # everything under the prefix, nothing outside it
    keys = [o["Key"] for o in s3_client(s3_server).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys and all(k.startswith("backups/site-a/") for k in keys)


def test_snapshot_incremental_restore_tamper_and_gc_in_a_bucket(tmp_path, s3_server, bucket):
    provider = LocalKeyProvider()
    provider.create("mk1")
    js = store.JobStore(storage(s3_server, bucket), "orders")
    ns = "db_%s.c" % CANARY
    h = make_head(str(tmp_path / "h" / "head.db"), {ns: all_types_docs(CANARY), "shop.big": docs(4000)},
                  key=os.urandom(32))
    keys = store.Keys(js, provider)
    e1 = snapshot.take_snapshot(h, js, keys, "orders", "mk1", True, target_bytes=64 << 10)
    h.mark_snapshotted(e1["change_seq"])
    assert store.check_format(js.storage)["format"] == "kmipbackup-store"
    assert restored(tmp_path, js, provider, e1["snapshot_id"], "r1") == head_image(h)
    image1 = head_image(h)
    # incremental: 1% changed, a few chunks written, the rest reused
    with h.write() as w:
        upsert_docs(w, "shop.big", docs(40, start=4000))
    e2 = snapshot.take_snapshot(h, js, keys, "orders", "mk1", True, target_bytes=64 << 10)
    h.mark_snapshotted(e2["change_seq"])
    assert e2["reused_chunks"] > 5 * e2["written_chunks"] > 0
    assert restored(tmp_path, js, provider, "latest", "r2") == head_image(h)
    # no plaintext name or value in any object of the bucket
    c = s3_client(s3_server)
    for o in c.list_objects_v2(Bucket=bucket)["Contents"]:
        assert CANARY.encode() not in c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        assert CANARY not in o["Key"]
    # a chunk replaced by another one of the same job: authentication fails, naming the chunk
    manifest = js.read_manifest(e1["snapshot_id"], store.Keys(js, provider))
    chunks = [ch["id"] for n in manifest["namespaces"] for ch in n["chunks"]]
    a, b = js.chunk_path(chunks[0]), js.chunk_path(chunks[1])
    saved = js.storage.get(a)
    js.storage.put_atomic(a, js.storage.get(b))
    with pytest.raises(IntegrityError, match=chunks[0]):
        restored(tmp_path, js, provider, e1["snapshot_id"], "r3")
    js.storage.put_atomic(a, saved)
    # GC: the first snapshot deleted; chunks only it needed go, the second still restores byte-equal
    js.delete_snapshot(e1["snapshot_id"])
    gc = js.gc(store.Keys(js, provider), now=timeutil.utcnow() + datetime.timedelta(hours=2))
    assert gc["chunks_deleted"] >= 1
    assert restored(tmp_path, js, provider, "latest", "r4") == head_image(h) != image1


def test_gc_is_safe_against_a_snapshot_in_flight(tmp_path, s3_server, bucket):
    """A snapshot between its pending marker and its catalog entry: GC at that moment keeps what it wrote."""
    provider = LocalKeyProvider()
    provider.create("mk1")
    js = store.JobStore(storage(s3_server, bucket), "inflight")
    h = make_head(str(tmp_path / "h" / "head.db"), {"a.b": docs(2000)}, key=os.urandom(32))
    keys = store.Keys(js, provider)
    seen = {}
    put_catalog = js.put_catalog

    def gc_then_commit(entry, k):  # the snapshot's chunks and manifest are written, its entry is not yet
        seen["gc"] = js.gc(store.Keys(js, provider), grace_seconds=0)
        return put_catalog(entry, k)
    js.put_catalog = gc_then_commit
    e = snapshot.take_snapshot(h, js, keys, "inflight", "mk1", True, target_bytes=32 << 10)
    assert seen["gc"]["chunks_deleted"] == 0
    assert restored(tmp_path, js, provider, e["snapshot_id"], "r") == head_image(h)


def test_store_format_record_refuses_foreign_and_newer_stores(tmp_path, s3_server, bucket):
    provider = LocalKeyProvider()
    provider.create("mk1")
    h = make_head(str(tmp_path / "h" / "head.db"), {"a.b": docs(10)}, key=os.urandom(32))
    foreign = storage(s3_server, bucket, prefix="other-tool")
    foreign.put_atomic("index-0001", b"somebody else's backups")
    js = store.JobStore(foreign, "job")
    with pytest.raises(StoreError, match="already holds objects that are not a kmipbackup snapshot store"):
        snapshot.take_snapshot(h, js, store.Keys(js, provider), "job", "mk1", True)
    assert foreign.list("") == ["index-0001"]  # nothing written
    newer = storage(s3_server, bucket, prefix="from-the-future")
    newer.put_atomic(store.FORMAT_FILE, b'{"format": "kmipbackup-store", "version": 99}')
    with pytest.raises(StoreError, match="format version 99, newer than this collection reads"):
        store.JobStore(newer, "job")


def test_wrong_credentials_missing_bucket_and_dead_endpoint_are_clear(s3_server, bucket, dead_port):
    bad = objectstore.S3Storage(bucket, endpoint_url=s3_server["endpoint"], access_key=s3_server["access_key"],
                                secret_key="not-the-secret-%s" % CANARY)
    with pytest.raises(StoreError) as e:
        bad.check_bucket()
    assert "refused the credentials" in str(e.value) and bucket in str(e.value) and s3_server["endpoint"] in str(e.value)
    with pytest.raises(StoreError, match="refused the credentials"):
        bad.get("x")
    assert CANARY not in str(e.value) and s3_server["secret_key"] not in str(e.value)
    with pytest.raises(StoreError, match="does not exist.*create the bucket"):
        storage(s3_server, "kb-no-such-bucket").check_bucket()
    with pytest.raises(StoreError, match="does not exist"):
        storage(s3_server, "kb-no-such-bucket").list("job")
    down = objectstore.S3Storage(bucket, endpoint_url="http://127.0.0.1:%d" % dead_port, access_key="a",
                                 secret_key="b" * 20, connect_timeout=1, max_attempts=1)
    with pytest.raises(StoreError, match="cannot be reached for the bucket %s" % bucket):
        down.exists("x")


def test_endpoint_killed_mid_snapshot_leaves_nothing_visible(tmp_path, monkeypatch):
    """The server dies after a snapshot has written some chunks: the snapshot fails, no catalog entry shows it;
    once the server is back, the next snapshot succeeds and restores byte-equal."""
    srv = lab.start_s3_server(str(tmp_path / "s3"))
    try:
        s3_client(srv).create_bucket(Bucket="kb-crash")
        provider = LocalKeyProvider()
        provider.create("mk1")
        js = store.JobStore(storage(srv, "kb-crash", connect_timeout=1, read_timeout=5, max_attempts=2), "crash")
        h = make_head(str(tmp_path / "h" / "head.db"), {"a.b": docs(3000)}, key=os.urandom(32))
        keys = store.Keys(js, provider)
        keys.epoch_for("mk1")  # the keyring exists (as after a first snapshot)
        put_chunk, count = js.put_chunk, [0]

        def dying_put_chunk(*a, **kw):
            count[0] += 1
            if count[0] == 4:
                lab.stop(srv["pid"])
            return put_chunk(*a, **kw)
        js.put_chunk = dying_put_chunk
        with pytest.raises(StoreError, match="cannot be reached|failed"):
            snapshot.take_snapshot(h, js, keys, "crash", "mk1", True, target_bytes=16 << 10)
        assert count[0] >= 4  # the server died after three chunks were written, inside the snapshot
        srv.update(lab.start_s3_server(str(tmp_path / "s3"), port=srv["port"]))
        js.put_chunk = put_chunk
        assert js.catalog() == []  # nothing of the failed snapshot is visible
        e = snapshot.take_snapshot(h, js, keys, "crash", "mk1", True, target_bytes=16 << 10)
        assert [x["snapshot_id"] for x in js.catalog()] == [e["snapshot_id"]]
        assert restored(tmp_path, js, provider, "latest", "r") == head_image(h)
        # the server dies during a restore: it fails naming the endpoint, the target folder is never created
        read_chunk, reads = js.read_chunk, [0]

        def dying_read_chunk(*a, **kw):
            reads[0] += 1
            if reads[0] == 3:
                lab.stop(srv["pid"])
            return read_chunk(*a, **kw)
        js.read_chunk = dying_read_chunk
        with pytest.raises(StoreError, match="cannot be reached|failed"):
            restored(tmp_path, js, provider, "latest", "r-dead")
        assert not (tmp_path / "r-dead").exists()
    finally:
        lab.stop(srv["pid"])


def test_two_writers_never_both_commit(tmp_path, s3_server, bucket):
    """A second writer (another daemon pointed at the same bucket) commits while a snapshot is being taken: the first
    refuses to commit on top of it, leaving the other's snapshot the only one, restorable."""
    provider = LocalKeyProvider()
    provider.create("mk1")
    js = store.JobStore(storage(s3_server, bucket), "twice")
    other = store.JobStore(storage(s3_server, bucket), "twice")
    h = make_head(str(tmp_path / "h" / "head.db"), {"a.b": docs(500)}, key=os.urandom(32))
    snapshot.take_snapshot(h, js, store.Keys(js, provider), "twice", "mk1", True)
    put_manifest, seen = js.put_manifest, {}

    def other_commits_first(*a, **kw):
        seen["other"] = snapshot.take_snapshot(h, other, store.Keys(other, provider), "twice", "mk1", True)
        return put_manifest(*a, **kw)
    js.put_manifest = other_commits_first
    with pytest.raises(SnapshotError, match="Another writer committed a snapshot of job twice"):
        snapshot.take_snapshot(h, js, store.Keys(js, provider), "twice", "mk1", True)
    live, head = js.live_catalog(store.Keys(js, provider))
    assert head["snapshot_id"] == seen["other"]["snapshot_id"] == live[-1]["snapshot_id"] and len(live) == 2
    assert js.pending(timeutil.utcnow(), 3600) == []
    # the narrow window: the other writer's head lands between this snapshot's last check and its head update; the
    # conditional PUT of the head (If-Match) refuses it and its catalog entry goes
    put_catalog = js.put_catalog

    def other_commits_at_the_entry(*a, **kw):
        seen["third"] = snapshot.take_snapshot(h, other, store.Keys(other, provider), "twice", "mk1", True)
        return put_catalog(*a, **kw)
    js.put_manifest, js.put_catalog = put_manifest, other_commits_at_the_entry
    with pytest.raises(StoreError, match="Another writer changed the catalog head of job twice"):
        snapshot.take_snapshot(h, js, store.Keys(js, provider), "twice", "mk1", True)
    live, head = js.live_catalog(store.Keys(js, provider))
    assert head["snapshot_id"] == seen["third"]["snapshot_id"] == live[-1]["snapshot_id"] and len(live) == 3
    assert len(js.catalog()) == 3 and js.pending(timeutil.utcnow(), 3600) == []
    # the other writer started after this snapshot's entry and took it as live: both are committed, in order
    put_head = js.put_head

    def other_commits_at_the_head(*a, **kw):
        seen["fourth"] = snapshot.take_snapshot(h, other, store.Keys(other, provider), "twice", "mk1", True)
        return put_head(*a, **kw)
    js.put_catalog, js.put_head = put_catalog, other_commits_at_the_head
    mine = snapshot.take_snapshot(h, js, store.Keys(js, provider), "twice", "mk1", True)
    live, head = js.live_catalog(store.Keys(js, provider))
    assert [e["snapshot_id"] for e in live[-2:]] == [mine["snapshot_id"], seen["fourth"]["snapshot_id"]]
    assert js.pending(timeutil.utcnow(), 3600) == []
