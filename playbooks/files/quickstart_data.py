# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Sample data for the quickstart, and the byte-for-byte comparison of a restored database.

    quickstart_data.py load    URI DB COUNT CANARY   # fills DB once; prints {"inserted": n}
    quickstart_data.py compare URI DB RESTORED_DB    # prints {"equal": bool, ...}
"""
import datetime
import hashlib
import json
import sys

import bson
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING, MongoClient


def load(db, count, canary):
    if db.orders.estimated_document_count() or db.customers.estimated_document_count():
        return {"inserted": 0}
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    customers = [{"_id": i, "name": "customer %d %s" % (i, canary), "since": now - datetime.timedelta(days=i)}
                 for i in range(max(1, count // 10))]
    orders = [{"_id": bson.ObjectId(), "customer": i % len(customers), "total": bson.Decimal128("%d.%02d" % (i, i % 100)),
               "items": [{"sku": "sku-%d" % (i % 37), "qty": 1 + i % 3}], "note": canary, "created": now}
              for i in range(count)]
    db.customers.insert_many(customers)
    db.orders.insert_many(orders)
    db.orders.create_index([("customer", ASCENDING), ("created", ASCENDING)], name="customer_created")
    return {"inserted": len(customers) + len(orders)}


def digest(db):
    out = {}
    for name in sorted(db.list_collection_names()):
        h, n = hashlib.sha256(), 0
        for doc in db.get_collection(name).find().sort("_id", ASCENDING):
            h.update(doc.raw)
            n += 1
        indexes = sorted((i["name"], json.dumps(i["key"], sort_keys=True)) for i in db.get_collection(name).list_indexes())
        out[name] = {"count": n, "sha256": h.hexdigest(), "indexes": indexes}
    return out


def main(argv):
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
