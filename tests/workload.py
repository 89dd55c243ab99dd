"""A workload generator for tests and benchmarks: documents with every BSON type and a mixed
stream of operations (CRUD with operators on nested and array paths, replaces, deletes,
renames, drops, index builds with unique/sparse/TTL/partial options).

Use: seed(db, n) then run_ops(db, n_ops, seed=...) (or Workload(db).run_in_thread(stop)).
Everything goes through pymongo with default (dict) documents; the generator never issues
operations whose change events cannot carry the result byte-exactly (pipeline reorders,
dotted field names), except dotted_field_update() which tests verification on purpose.
"""
import datetime
import random
import threading
import uuid

from bson import Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary
from pymongo import ASCENDING
from pymongo.errors import OperationFailure

COLLECTIONS = ("alpha", "beta", "gamma")


def all_types_doc(i, rnd=None):
    """A document with every BSON type a backup must keep exactly."""
    rnd = rnd or random.Random(i)
    return {
        "_id": ObjectId(),
        "i": i,
        "i32": rnd.randint(-2 ** 31, 2 ** 31 - 1),
        "i64": Int64(rnd.randint(-2 ** 63, 2 ** 63 - 1)),
        "dbl": rnd.uniform(-1e9, 1e9),
        "negzero": -0.0,
        "nan": float("nan"),
        "inf": float("-inf"),
        "dec": Decimal128("%d.%03dE-5" % (rnd.randint(0, 10 ** 6), i % 1000)),
        "str": "s%d-é-中-\U0001F600" % i,
        "date": datetime.datetime(2020, 1, 1) + datetime.timedelta(milliseconds=rnd.randint(0, 10 ** 11)),
        "ts": Timestamp(1700000000 + i, i % 7),
        "bin0": Binary(rnd.randbytes(8), 0),
        "bin3": Binary(uuid.UUID(int=rnd.getrandbits(128)).bytes, 3),
        "bin4": Binary(uuid.UUID(int=rnd.getrandbits(128)).bytes, 4),
        "bin5": Binary(rnd.randbytes(16), 5),
        "bin128": Binary(b"user-defined", 128),
        "re": Regex("^a.*b$", "im"),
        "code": Code("function() { return %d; }" % i),
        "codews": Code("function() { return x; }", {"x": i}),
        "min": MinKey(),
        "max": MaxKey(),
        "null": None,
        "bool": bool(i % 2),
        "nested": {"a": {"b": {"c": [i, {"d": "deep"}]}}, "n": Int64(i)},
        "arr": [1, 2, 3, [4, 5], {"x": 1}],
        "tags": ["t%d" % (i % 5), "common"],
        "numfield": {"0": "zero", "10": "ten"},
        "ünïcødé_fïeld": "valüe",
        "counter": 0,
        "pad": "p" * rnd.randint(0, 300),
    }


def id_variety_docs():
    """Documents whose _ids cover the common _id types (keys must stay distinct and ordered)."""
    return [{"_id": v, "kind": type(v).__name__} for v in (
        1, Int64(2), 3.5, Decimal128("4.25"), "five", ObjectId(), datetime.datetime(2021, 6, 1),
        Binary(uuid.uuid4().bytes, 4), {"compound": 1, "k": "v"}, Timestamp(5, 5), True, None, MinKey(), MaxKey())]


def big_doc(target=16 * 1024 * 1024 - 64 * 1024):
    """A document just under the 16 MB BSON limit."""
    return {"_id": "big", "blob": Binary(b"\xab" * (target - 100), 0), "n": 1}


INDEXES = [
    ("i", {"name": "i_unique", "unique": True}),
    ("tags", {"name": "tags_sparse", "sparse": True}),
    ("date", {"name": "date_ttl", "expireAfterSeconds": 10 ** 9}),
    ("i32", {"name": "i32_partial", "partialFilterExpression": {"i": {"$gt": 10}}}),
]


def create_indexes(coll):
    for key, opts in INDEXES:
        coll.create_index([(key, ASCENDING)], **opts)


def seed(db, n=300, big=False):
    """Fill db's collections with n all-types documents each, the _id variety, indexes; returns counts."""
    rnd = random.Random(db.name)
    for name in COLLECTIONS:
        db[name].insert_many([all_types_doc(i, rnd) for i in range(n)])
    db["ids"].insert_many(id_variety_docs())
    create_indexes(db["alpha"])
    if big:
        db["big"].insert_one(big_doc())
    return {name: n for name in COLLECTIONS}


class Workload:
    """A random, reproducible mix of operations on one database."""

    def __init__(self, db, seed=1, ddl=True):
        self.db, self.with_ddl = db, ddl
        self.rnd = random.Random(seed)
        self.ops = 0
        self.next_i = 10 ** 6
        self.renamed = 0

    def _coll(self):
        return self.db[self.rnd.choice(COLLECTIONS)]

    def _pick(self, coll):
        docs = list(coll.aggregate([{"$sample": {"size": 1}}, {"$project": {"_id": 1}}]))
        return docs[0]["_id"] if docs else None

    def step(self):
        r, coll = self.rnd.random(), self._coll()
        _id = self._pick(coll)
        if _id is None or r < 0.15:
            self.next_i += 1
            coll.insert_one(all_types_doc(self.next_i, self.rnd))
        elif r < 0.65:
            coll.update_one({"_id": _id}, self.rnd.choice(self._updates()))
        elif r < 0.75:
            doc = all_types_doc(self.rnd.randint(10 ** 7, 10 ** 8), self.rnd)
            doc["_id"] = _id
            coll.replace_one({"_id": _id}, doc)
        elif r < 0.85:
            coll.delete_one({"_id": _id})
        elif r < 0.88:
            coll.update_many({"tags": "common", "i": {"$mod": [7, self.rnd.randint(0, 6)]}}, {"$inc": {"counter": 1}})
        elif r < 0.90:
            if self.with_ddl:
                self.ddl()
        else:
            coll.update_one({"_id": _id, "arr.1": {"$exists": True}}, {"$set": {"arr.$[]": "all"}})
        self.ops += 1

    def _updates(self):
        n = self.rnd.randint(0, 1000)
        return [
            {"$set": {"str": "upd%d" % n, "nested.a.b.c.1.d": n}},
            {"$unset": {"pad": ""}},
            {"$inc": {"counter": 1, "i64": Int64(1)}},
            {"$set": {"i64": Int64(n), "dec": Decimal128("%d.10" % n), "negzero": -0.0}},
            {"$push": {"tags": "p%d" % n}},
            {"$push": {"arr": {"$each": [n, n + 1], "$position": 1}}},
            {"$push": {"tags": {"$each": ["s%d" % n], "$slice": -3}}},
            {"$pull": {"tags": "common"}},
            {"$pop": {"arr": 1}},
            {"$pop": {"arr": -1}},
            {"$addToSet": {"tags": "set%d" % (n % 3)}},
            {"$set": {"arr.7": "padded"}},
            {"$set": {"arr.0": {"new": n}}},
            {"$unset": {"arr.1": ""}},
            {"$set": {"new.deep.path": n, "numfield.10": "TEN"}},
            {"$set": {"numfield.5": n}},
            {"$rename": {"str": "renamed_str"}},
            {"$currentDate": {"date": True}},
            {"$min": {"i32": -n}},
            {"$mul": {"dbl": 1.5}},
            {"$set": {"ts": Timestamp(1800000000, n), "bin4": Binary(uuid.uuid4().bytes, 4)}},
            {"$set": {"max": MinKey(), "min": MaxKey()}},
        ]

    def ddl(self):
        k = self.rnd.randint(0, 4)
        name = "ddl_%d" % self.renamed
        if k == 0:
            self.next_i += 5
            self.db[name].insert_many([all_types_doc(self.next_i - i, self.rnd) for i in range(5)])
            create_indexes(self.db[name])
        elif k == 1 and name in self.db.list_collection_names():
            self.db[name].rename("ddl_%d" % (self.renamed + 1), dropTarget=True)
            self.renamed += 1
        elif k == 2:
            self.db["tmp_drop"].insert_one({"x": 1})
            self.db["tmp_drop"].drop()
        elif k == 3:
            try:
                self.db["gamma"].create_index([("str", ASCENDING)], name="str_1", sparse=True)
            except OperationFailure:
                pass
        else:
            self.db["gamma"].drop_index("str_1") if "str_1" in self.db["gamma"].index_information() else None

    def run(self, n):
        for _ in range(n):
            self.step()
        return self.ops

    def run_until(self, stop_event, max_ops=10 ** 9):
        while not stop_event.is_set() and self.ops < max_ops:
            self.step()
        return self.ops

    def run_in_thread(self, stop_event, max_ops=10 ** 9):
        t = threading.Thread(target=self.run_until, args=(stop_event, max_ops), daemon=True)
        t.start()
        return t


def dotted_field_update(coll, _id):
    """An update of a literal dotted field name ($setField): its event is ambiguous without
    disambiguatedPaths (the stand-in sends an empty one), so only verification can heal it."""
    coll.update_one({"_id": _id}, [{"$replaceWith": {"$setField": {"field": "a.b", "input": "$$ROOT", "value": 42}}}])
