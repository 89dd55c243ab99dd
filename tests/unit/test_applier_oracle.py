# -*- coding: utf-8 -*-
"""apply_update_description against an independent oracle: the document decoded in order (SON), the
updateDescription applied per MongoDB's documented rules (remove, then set in place or append), re-encoded;
the bytes must be equal. Seeded random documents, values of many BSON types, names with unicode, '$', digits."""
import random

import bson
from bson.codec_options import CodecOptions
from bson.son import SON

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.events import apply_update_description

OPTS = CodecOptions(document_class=SON)
NAMES = ["a", "b", "c", "x1", "é", "$p", "_k", "10", "zz", "n\u4e2d"]


def _value(rng, depth=0):
    k = rng.randrange(10 if depth < 2 else 8)
    return [lambda: rng.randrange(-2**31, 2**31), lambda: bson.int64.Int64(rng.randrange(-2**63, 2**63)),
            lambda: rng.random() * 1e6, lambda: -0.0, lambda: "s" * rng.randrange(40), lambda: None,
            lambda: bson.Binary(bytes(rng.randrange(256) for _ in range(rng.randrange(9))), rng.choice([0, 4, 128])),
            lambda: bson.timestamp.Timestamp(rng.randrange(2**31), rng.randrange(9)),
            lambda: SON((n, _value(rng, depth + 1)) for n in rng.sample(NAMES, rng.randrange(4))),
            lambda: [_value(rng, depth + 1) for _ in range(rng.randrange(4))]][k]()


def _case(rng):
    doc = SON([("_id", _value(rng, 2))] + [(n, _value(rng)) for n in rng.sample(NAMES, rng.randrange(1, 7))])
    expect = SON(doc)
    removed = [n for n in list(doc)[1:] if rng.random() < 0.2]
    for n in removed:
        del expect[n]
    kept = [n for n in expect if n != "_id"]
    updated = SON((n, _value(rng)) for n in kept if rng.random() < 0.4)
    new = [n for n in NAMES if n not in doc and n not in removed]
    if new and rng.random() < 0.5:  # at most one new field: several are recopied, not trusted
        updated[rng.choice(new)] = _value(rng)
    subs = [n for n in kept if isinstance(expect[n], SON) and expect[n] and n not in updated]
    if subs and rng.random() < 0.5:  # a nested path in place
        n = rng.choice(subs)
        m = rng.choice(list(expect[n]))
        updated["%s.%s" % (n, m)] = v = _value(rng)
        expect[n] = SON(expect[n])
        expect[n][m] = v
    for n, v in updated.items():
        if "." not in n:
            expect[n] = v  # in place when present (SON keeps the position), else appended
    ud = SON([("updatedFields", updated), ("removedFields", removed), ("truncatedArrays", [])])
    return bson.encode(doc, codec_options=OPTS), bson.encode(ud), bson.encode(expect, codec_options=OPTS)


def test_applier_equals_the_oracle_on_random_updates():
    rng = random.Random(20261201)
    for i in range(3000):
        doc, ud, expect = _case(rng)
        got = apply_update_description(doc, ud)
        assert got == expect, (i, bson.decode(doc, OPTS), bson.decode(ud, OPTS))
