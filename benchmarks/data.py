# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Deterministic benchmark documents: order-like records as raw BSON, the same bytes for the same seed.

Documents average about 700 bytes and carry time-ordered ObjectIds (as mongod assigns them),
nested documents, arrays, dates, Decimal128 prices, binary and text drawn from a vocabulary, so
they compress about as much as business data does (zstd about 4-5x), not as much as padding.
They are assembled from pools of pre-encoded parts (65,536 notes, item lists and customers drawn
with a seeded generator) picked by a per-document hash, so generation runs at a few hundred
thousand documents per second and any document can be regenerated alone (updates)."""
import datetime
import random
import struct

import bson
from bson import Decimal128

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu amber cobalt denim ember fern garnet harbor ivory "
         "jasper kelp lagoon meadow nectar onyx pearl quartz russet saffron topaz umber velvet willow").split()
STATUS = ("new", "paid", "packed", "shipped", "delivered", "returned")
CITIES = ("Lisbon", "Oslo", "Quito", "Hanoi", "Perth", "Dakar", "Lima", "Riga", "Kyiv", "Cusco", "Turku", "Accra")
EPOCH = 1_760_000_000
POOL = 1 << 16
MASK64 = (1 << 64) - 1
_i32, _i64, _dbl = struct.Struct("<i"), struct.Struct("<q"), struct.Struct("<d")


def object_id(i):
    """The i-th ObjectId bytes: 4-byte seconds (10 ids per second), 5-byte machine, 3-byte counter."""
    return (EPOCH + i // 10).to_bytes(4, "big") + b"\x5e\xed\x00\x00\x01" + (i & 0xFFFFFF).to_bytes(3, "big")


def _mix(x):
    """splitmix64: 64 well-mixed bits from x."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _element_value(doc, name):
    """The raw value bytes of a top-level element of an encoded single-field document."""
    return doc[4 + 1 + len(name) + 1:-1]


class Generator:
    def __init__(self, seed=1):
        self.seed = seed
        rnd = random.Random(seed)
        prices = [Decimal128("%d.%02d" % (rnd.randint(1, 999), rnd.randint(0, 99))) for _ in range(1024)]
        self.notes = [self._str(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 40)))) for _ in range(POOL)]
        self.items = [_element_value(bson.encode({"v": [
            {"sku": "SKU-%05d" % rnd.randint(0, 99_999), "qty": rnd.randint(1, 9), "price": rnd.choice(prices)}
            for _ in range(rnd.randint(1, 6))]}), "v") for _ in range(POOL)]
        self.customers = [_element_value(bson.encode({"v": {
            "id": rnd.randint(1, 200_000), "name": "%s %s" % (rnd.choice(WORDS).title(), rnd.choice(WORDS).title()),
            "city": rnd.choice(CITIES), "vip": rnd.random() < 0.05}}), "v") for _ in range(POOL)]
        self.tags = [_element_value(bson.encode({"v": rnd.sample(WORDS, rnd.randint(0, 4))}), "v") for _ in range(POOL)]
        self.status = [self._str(s) for s in STATUS]
        self.created0 = int(datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc).timestamp() * 1000)

    @staticmethod
    def _str(s):
        b = s.encode()
        return _i32.pack(len(b) + 1) + b + b"\x00"

    def raw(self, i, version=0):
        """Document i (version > 0: an updated revision of it) as raw BSON."""
        h1 = _mix(self.seed * 1_000_003 + i)
        h2 = _mix(h1 ^ version)
        p = POOL - 1
        body = b"".join((
            b"\x07_id\x00", object_id(i),
            b"\x12orderNo\x00", _i64.pack(10_000_000 + i),
            b"\x03customer\x00", self.customers[h1 & p],
            b"\x02status\x00", self.status[(h2 >> 16) % 6],
            b"\x09created\x00", _i64.pack(self.created0 + i * 3000 + (h1 >> 16) % 3000),
            b"\x04items\x00", self.items[(h1 >> 24) & p],
            b"\x01total\x00", _dbl.pack(((h2 >> 20) % 500_000) / 100.0),
            b"\x02note\x00", self.notes[(h2 >> 40) & p],
            b"\x04tags\x00", self.tags[(h1 >> 40) & p],
            b"\x05ref\x00\x0c\x00\x00\x00\x00", h1.to_bytes(8, "little"), (h2 & 0xFFFFFFFF).to_bytes(4, "little"),
            b"\x10rev\x00", _i32.pack(version),
        ))
        return _i32.pack(len(body) + 5) + body + b"\x00"

    def raws(self, start, count, version=0):
        raw = self.raw
        return [raw(i, version) for i in range(start, start + count)]


def namespaces(total_docs, n_collections=4):
    """[(ns, first doc index, count)]: total_docs split over n_collections of one database."""
    per = total_docs // n_collections
    out, start = [], 0
    for c in range(n_collections):
        count = per if c < n_collections - 1 else total_docs - start
        out.append(("bench.orders%d" % c, start, count))
        start += count
    return out


def write_changes(coll, gen, n):
    """n change events on coll: n // 2 inserts of new orders, then updates of nested and top-level fields and every
    10th a delete, among the inserted ones."""
    from bson import ObjectId
    from bson.raw_bson import RawBSONDocument
    from pymongo import DeleteOne, UpdateOne
    inserts = n // 2
    for s in range(0, inserts, 5000):
        coll.insert_many([RawBSONDocument(d) for d in gen.raws(s, min(5000, inserts - s))], ordered=False)
    ops = []
    for i in range(n - inserts):
        oid = ObjectId(object_id(i * 7 % inserts))
        if i % 10 == 9:
            ops.append(DeleteOne({"_id": oid}))
        else:
            ops.append(UpdateOne({"_id": oid}, {"$set": {"status": "s%d" % i, "customer.city": "Oslo"}, "$inc": {"rev": 1}}))
    for i in range(0, len(ops), 1000):
        coll.bulk_write(ops[i:i + 1000], ordered=True)
