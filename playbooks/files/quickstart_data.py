# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Sample data for the quickstart, the byte-for-byte comparison of a restored database, and the canary scan.

    quickstart_data.py load    URI DB COUNT CANARY   # fills DB's empty collections; prints {"inserted": n}
    quickstart_data.py compare URI DB RESTORED_DB    # prints {"equal": bool, ...}
    quickstart_data.py scan    CANARY PATH...        # prints {"hits": [files holding CANARY], "files": n, "frames": n}

The sample data holds the canary in document values, in _ids and in a collection's name.
"""
import datetime
import hashlib
import json
import os
import re
import sys

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def load(db, count, canary):
    import bson
    from pymongo import ASCENDING
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    ncust = max(1, count // 10)
    samples = {
        "customers": lambda: [{"_id": i, "name": "customer %d %s" % (i, canary), "since": now - datetime.timedelta(days=i)}
                              for i in range(ncust)],
        "orders": lambda: [{"_id": bson.ObjectId(), "customer": i % ncust, "total": bson.Decimal128("%d.%02d" % (i, i % 100)),
                            "items": [{"sku": "sku-%d" % (i % 37), "qty": 1 + i % 3}], "note": canary, "created": now}
                           for i in range(count)],
        # the canary in a namespace name and in _ids
        "tickets-" + canary: lambda: [{"_id": "%s-ticket-%d" % (canary, i), "customer": i % ncust, "open": i % 2 == 0}
                                      for i in range(max(1, count // 20))],
    }
    inserted = 0
    for name, make in samples.items():
        if db[name].estimated_document_count():
            continue
        docs = make()
        db[name].insert_many(docs)
        inserted += len(docs)
        if name == "orders":
            db.orders.create_index([("customer", ASCENDING), ("created", ASCENDING)], name="customer_created")
    return {"inserted": inserted}


def digest(db):
    from pymongo import ASCENDING
    out = {}
    for name in sorted(db.list_collection_names()):
        h, n = hashlib.sha256(), 0
        for doc in db.get_collection(name).find().sort("_id", ASCENDING):
            h.update(doc.raw)
            n += 1
        indexes = sorted((i["name"], json.dumps(i["key"], sort_keys=True)) for i in db.get_collection(name).list_indexes())
        out[name] = {"count": n, "sha256": h.hexdigest(), "indexes": indexes}
    return out


def plaintext_views(data, limit=256 << 20):
    """data itself plus every zstd frame in it, decompressed: the store's chunks and manifests are compressed before
    they are sealed, so plaintext in an unencrypted blob is invisible to grep. Every frame magic is tried wherever it
    is; in ciphertext a magic is random and does not decompress."""
    import zstandard
    views, frames = [data], 0
    pos = data.find(ZSTD_MAGIC)
    while pos >= 0:
        try:
            views.append(zstandard.ZstdDecompressor().decompressobj().decompress(data[pos:pos + limit]))
            frames += 1
        except zstandard.ZstdError:
            pass
        pos = data.find(ZSTD_MAGIC, pos + 1)
    return views, frames


def scan(canary, paths):
    """Files under paths whose path, raw bytes or decompressed zstd frames hold canary (case-insensitive)."""
    pat = re.compile(re.escape(canary.encode()), re.I)
    hits, nfiles, nframes = [], 0, 0
    files = [p for p in paths if os.path.isfile(p)]
    files += [os.path.join(folder, name) for top in paths for folder, _dirs, names in os.walk(top) for name in names]
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:  # removed meanwhile (the daemon runs)
            continue
        views, frames = plaintext_views(data)
        nfiles, nframes = nfiles + 1, nframes + frames
        if canary.lower() in path.lower() or any(pat.search(v) for v in views):
            hits.append(path)
    return {"hits": hits, "files": nfiles, "frames": nframes, "self_test": self_test(canary)}


def self_test(canary):
    """The scan can see the canary inside a zstd frame that sits after other bytes, as in a null-cipher store chunk."""
    import zstandard
    blob = b"header" + zstandard.ZstdCompressor().compress(b"x" * 4096 + canary.upper().encode())
    return canary.encode() not in blob and any(re.search(re.escape(canary.encode()), v, re.I) for v in plaintext_views(blob)[0])


def main(argv):
    if argv[0] == "scan":
        result = scan(argv[1], argv[2:])
    else:
        import bson
        from bson.raw_bson import RawBSONDocument
        from pymongo import MongoClient
        action, uri, dbname = argv[:3]
        with MongoClient(uri, document_class=RawBSONDocument, serverSelectionTimeoutMS=10000) as client:
            if action == "load":
                result = load(client.get_database(dbname, codec_options=bson.CodecOptions()), int(argv[3]), argv[4])
            else:
                source, restored = digest(client[dbname]), digest(client[argv[3]])
                result = {"equal": source == restored and bool(source), "collections": len(source),
                          "documents": sum(c["count"] for c in source.values()), "source": source, "restored": restored}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
