"""Helpers for the snapshot/store/restore tests: a local KeyProvider double and head builders."""
import datetime
import hashlib
import os
import re
import uuid

import bson
import zstandard
from bson import Binary, Code, DBRef, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding, aes_key_wrap_with_padding

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head as headmod, rawbson, storenames, timeutil


class LocalKeyProvider:
    """wrap/unwrap with RFC 5649 AES key wrap under local master keys; counts calls like KmipClient.
    Stands in for KMIP only where a test claims nothing about KMIP."""

    def __init__(self):
        self.masters = {}
        self.calls = 0

    def create(self, uid):
        self.masters[uid] = os.urandom(32)
        return uid

    def wrap(self, uid, key):
        self.calls += 1
        return {"master_key_uid": uid, "mode": "local-rfc5649", "wrapped": aes_key_wrap_with_padding(self.masters[uid], key).hex()}

    def unwrap(self, wrapped):
        self.calls += 1
        return aes_key_unwrap_with_padding(self.masters[wrapped["master_key_uid"]], bytes.fromhex(wrapped["wrapped"]))


def all_types_docs(canary="CANARY"):
    """Documents covering every BSON type, with the canary in values, field names and string ids."""
    now = datetime.datetime(2026, 11, 27, 18, 0, 0, 123000, tzinfo=datetime.timezone.utc)
    return [
        {"_id": ObjectId(), "double": 1.5, "str": canary + " text é", "doc": {"a": 1, canary: "x"}, "arr": [1, "two", 3.0]},
        {"_id": canary + "-id", "bin": Binary(b"\x00\x01" + canary.encode()), "uuid": Binary(uuid.uuid4().bytes, 4),
         "bool": True, "date": now, "null": None},
        {"_id": 7, "regex": Regex("^" + canary, "i"), "code": Code("function(){return 1}"),
         "codews": Code("function(){return x}", {"x": 1}), "int32": 2 ** 31 - 1, "ts": Timestamp(1760000000, 3)},
        {"_id": Int64(2 ** 40), "int64": Int64(-2 ** 62), "dec": Decimal128("1234.5678E-3"), "min": MinKey(), "max": MaxKey(),
         "dbref": DBRef("c", 1, "d"), "nested": {"deep": [{"x": [1, {"y": canary}]}]}},
        {"_id": {"compound": 1, "k": canary}, "neg0": -0.0, "nan": float("nan"), "inf": float("inf")},
        {"_id": 2.5, "empty_doc": {}, "empty_arr": [], "bin_old": Binary(b"abc", 2), "f" * 200: "long name"},
        {"_id": now, "value": 1},
        {"_id": Binary(b"\x01\x02", 0), "value": 2},
        {"_id": True, "value": 3},
        {"_id": MinKey(), "v": 1},
        {"_id": Decimal128("-1.0"), "v": 2},
    ]


def source_image(mc, dbname):
    """{ns: {id_key: raw}} of every collection of dbname, as the source holds it now."""
    from bson.codec_options import CodecOptions
    from bson.raw_bson import RawBSONDocument
    db = mc.get_database(dbname, codec_options=CodecOptions(document_class=RawBSONDocument))
    return {"%s.%s" % (dbname, c): {rawbson.id_key_from_document(r.raw): r.raw for r in db[c].find()}
            for c in db.list_collection_names()}


# Names the tests' workloads create and then drop or rename away; never left empty on purpose.
TRANSIENT_RE = re.compile(r"^(new\d+|moved\d+|made\d+|tmp_drop|ddl_\d+)$")


def drop_standin_phantoms(mc, dbname, gone=()):
    """Drop what SecantusDB re-created behind our back: its listCollections mints a UUID for every name it
    listed, and when a drop or rename lands between the listing and the mint, the mint writes the catalog row
    back (an empty collection, and no change event). mongod never does this, and no change-stream reader could
    see it. Only empty collections with a transient workload name, or a name the test renamed or dropped away
    for good (`gone`), qualify, so a collection a head lost still fails."""
    db = mc[dbname]
    for name in db.list_collection_names():
        if (TRANSIENT_RE.match(name) or name in gone) and db[name].count_documents({}) == 0:
            db.drop_collection(name)


def restored_image(folder, dbname):
    """{ns: {id_key: raw}} of a mongodump directory restore of dbname under folder."""
    out = {}
    d = os.path.join(folder, dbname)
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if name.endswith(".bson"):
            with open(os.path.join(d, name), "rb") as f:
                out["%s.%s" % (dbname, name[:-5])] = {rawbson.id_key_from_document(r): bytes(r)
                                                      for r in rawbson.split_bson_docs(f.read())}
    return out


def upsert_docs(w, ns, docs):
    for d in docs:
        raw = d if isinstance(d, bytes) else bson.encode(d)
        w.upsert(ns, rawbson.id_key_from_document(raw), raw)


def make_head(path, namespaces, key=None, cluster_time=(1760000000, 1), indexes=None):
    """A consistent head with namespaces {ns: [docs]}; indexes {ns: [spec dicts]}."""
    h = headmod.Head(path, key)
    with h.write() as w:
        for ns, docs in namespaces.items():
            specs = [bson.encode({"v": 2, "key": {"_id": 1}, "name": "_id_"})]
            specs += [bson.encode(s) for s in (indexes or {}).get(ns, [])]
            w.create_namespace(ns, bson.encode({}), uuid=uuid.uuid4().bytes, indexes=specs)
            upsert_docs(w, ns, docs)
        w.set_position(b"token", list(cluster_time), True)
    return h


def split_docs(blob):
    return rawbson.split_bson_docs(blob)



def restored_dir(out):
    """{db.coll: [raw documents]} of a mongodump directory's .bson files."""
    got = {}
    for db in sorted(os.listdir(out)):
        if os.path.isdir(os.path.join(out, db)):
            for f in sorted(os.listdir(os.path.join(out, db))):
                if f.endswith(".bson"):
                    got["%s.%s" % (db, f[:-5])] = split_docs(open(os.path.join(out, db, f), "rb").read())
    return got


def image_of(h):
    """{ns: [raw documents in key order]} of a head."""
    with h.read() as r:
        return {n["ns"]: [doc for _k, doc in r.scan(n["ns"])] for n in r.namespaces()}

def read_archive(path):
    """Parse a mongodump archive per mongo-tools' spec: (header, [collection metadata], {ns: [raw docs]}, {ns: crc})."""
    data = open(path, "rb").read()
    assert data[:4] == bytes.fromhex("6de29981"), "bad magic"
    pos = 4

    def doc():
        nonlocal pos
        n = int.from_bytes(data[pos:pos + 4], "little")
        raw = data[pos:pos + n]
        pos += n
        return raw

    def terminator():
        nonlocal pos
        if data[pos:pos + 4] == b"\xff\xff\xff\xff":
            pos += 4
            return True
        return False

    header = bson.decode(doc())
    metas = []
    while not terminator():
        metas.append(bson.decode(doc()))
    docs, crcs = {}, {}
    while pos < len(data):
        h = bson.decode(doc())
        ns = h["db"] + "." + h["collection"]
        if h["EOF"]:
            crcs[ns] = h["CRC"]
            assert terminator()
            continue
        assert h["CRC"] == 0
        while not terminator():
            docs.setdefault(ns, []).append(doc())
    return header, metas, docs, crcs


_POLY = 0xC96C5795D7870F42
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc64_ecma_reference(data):
    """Go's crc64.Checksum(data, crc64.MakeTable(crc64.ECMA)), bit by bit from the polynomial."""
    crc = 0xFFFFFFFFFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFFFFFFFFFF


def files_under(root):
    for folder, _dirs, names in os.walk(root):
        for n in names:
            yield os.path.join(folder, n)


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def plaintext_views(data, limit=256 << 20):
    """data itself plus every zstd frame in it, decompressed: the store's chunks and manifests are zstd then
    sealed, so scanning raw bytes alone cannot see plaintext an unencrypted (null cipher) blob holds. Trying
    every frame magic, wherever it is, covers any container format; in ciphertext a magic is random and does
    not decompress."""
    views = [data]
    pos = data.find(ZSTD_MAGIC)
    while pos >= 0:
        try:
            views.append(zstandard.ZstdDecompressor().decompressobj().decompress(data[pos:pos + limit]))
        except zstandard.ZstdError:
            pass
        pos = data.find(ZSTD_MAGIC, pos + 1)
    return views


def canary_hits(root, canary):
    """Files under root whose name, raw bytes or zstd-decompressed content holds canary (case-insensitive)."""
    pat = re.compile(re.escape(canary.encode()), re.I)
    hits = []
    for p in files_under(root):
        with open(p, "rb") as f:
            data = f.read()
        if canary.lower() in p.lower() or any(pat.search(v) for v in plaintext_views(data)):
            hits.append(p)
    return hits


def forge_null_snapshot(js, like, namespaces, encryption, new=False):
    """Write a snapshot the way anyone who can write to the store can, without any data key: null-cipher
    chunks and manifest (key id "none") and a catalog entry with a public checksum, claiming encryption
    as given. namespaces {ns: [docs]}; like: a real catalog entry to copy fields from; new: a new snapshot
    id (then the latest), else like's id is overwritten. Returns the snapshot id."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import store
    sid = storenames.new_snapshot_id(timeutil.utcnow()) if new else like["snapshot_id"]
    out = []
    for ns, docs in namespaces.items():
        plain = b"".join(bson.encode(d) for d in docs)
        digest = hashlib.sha256(plain).digest()
        cid = hashlib.sha256(b"forged\x00" + ns.encode()).hexdigest()
        js.put_chunk(cid, plain, "none", None)
        chunks = [{"id": cid, "key": "none", "first": Binary(b"a"), "last": Binary(b"b"), "count": len(docs), "bytes": len(plain),
                   "sha256": Binary(digest), "stored": 1}]
        out.append({"ns": ns, "uuid": None, "options": Binary(bson.encode({})), "indexes": [], "incarnation": 1, "type": "collection",
                    "count": len(docs), "bytes": len(plain), "stored": 1, "hash": storenames.namespace_hash(chunks), "chunks": chunks})
    manifest = {"format": like["format"], "job": js.job, "snapshot_id": sid, "created": like["created"],
                "cluster_time": like["cluster_time"], "change_seq": 0, "head_path": "forged", "namespaces": out}
    sha, _size = js.put_manifest(sid, manifest, "none", None)
    entry = {k: like.get(k) for k in store.CATALOG_FIELDS}
    entry.update(snapshot_id=sid, seq=int(like["seq"]) + (1 if new else 0), key_id="none", manifest_sha256=sha,
                 encryption=encryption, master_key_uids=[], doc_count=sum(len(d) for d in namespaces.values()))
    js.put_catalog(entry, store.Keys(js, None, False))
    return sid


def commit_to_head(js, keys):
    """List every catalog entry in the job's catalog head, as only a writer holding the job's keys (the daemon) can:
    makes a forged entry live, for tests of what a live snapshot of that kind does (a store writer without the keys
    cannot do this: its entries stay outside the head and are refused)."""
    head = js.catalog_head(keys, keyed=False)
    return js.put_head(keys, [(e["seq"], e["snapshot_id"]) for e in js.catalog()], head["key_id"], prev=head)
