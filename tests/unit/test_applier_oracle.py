# -*- coding: utf-8 -*-
"""apply_update_description against an independent oracle: the document decoded in order (SON), the
updateDescription applied per MongoDB's documented rules (remove, then set in place or append), re-encoded;
the bytes must be equal. Seeded random documents, values of many BSON types, names with unicode, '$', digits; both
layouts of an updateDescription, and the replay's path (Applier.apply_raw into a head) over sequences of events."""
import os
import random

import bson
from bson.timestamp import Timestamp
from bson.codec_options import CodecOptions
from bson.son import SON

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import events, head
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.events import apply_update_description
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.rawbson import id_key_from_document

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


def _update(rng, doc):
    """(updateDescription, expected document) of a random update of doc (SON) per the documented rules."""
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
    return SON([("updatedFields", updated), ("removedFields", removed), ("truncatedArrays", [])]), expect


def _case(rng):
    doc = SON([("_id", _value(rng, 2))] + [(n, _value(rng)) for n in rng.sample(NAMES, rng.randrange(1, 7))])
    ud, expect = _update(rng, doc)
    return bson.encode(doc, codec_options=OPTS), bson.encode(ud), bson.encode(expect, codec_options=OPTS)


def _other_layout(ud):
    """The same updateDescription laid out as mongod does not send a $set (another field order, an empty
    disambiguatedPaths): the parsed path, not the byte-layout one."""
    d = bson.decode(ud, OPTS)
    return bson.encode(SON([("truncatedArrays", d["truncatedArrays"]), ("disambiguatedPaths", {}),
                            ("removedFields", d["removedFields"]), ("updatedFields", d["updatedFields"])]))


def test_applier_equals_the_oracle_on_random_updates(monkeypatch):
    one_scan = []
    set_top_level = events._set_top_level  # pylint: disable=protected-access
    monkeypatch.setattr(events, "_set_top_level", lambda *a: one_scan.append(1) or set_top_level(*a))
    rng = random.Random(20261201)
    for i in range(3000):
        doc, ud, expect = _case(rng)
        got = apply_update_description(doc, ud)
        assert got == expect, (i, bson.decode(doc, OPTS), bson.decode(ud, OPTS))
        assert apply_update_description(doc, _other_layout(ud)) == expect, (i, "other layout")
    assert len(one_scan) > 1500  # the one-scan $set path is taken, both layouts


def _event(op, coll_doc=None, key=None, ud=None, ct=1):
    e = SON([("_id", {"_data": "%08x" % ct}), ("operationType", op), ("clusterTime", Timestamp(ct, 1)),
             ("ns", {"db": "d", "coll": "c"}), ("documentKey", {"_id": key})])
    if op == "insert":
        e["fullDocument"] = coll_doc
    if ud is not None:
        e["updateDescription"] = ud
    return bson.encode(e, codec_options=OPTS)


def test_the_replay_path_equals_the_oracle_over_sequences_of_updates(tmp_path):
    """Applier.apply_raw (the replay's path: writes buffered per namespace, read back by later events of the same
    transaction) over random sequences of updates, inserts and deletes of a few documents, in transactions of random
    length: the head ends byte-equal to the oracle's documents."""
    rng = random.Random(7)
    h = head.Head(str(tmp_path / "head.db"), os.urandom(32))
    with h.write() as w:
        w.create_namespace("d.c", bson.encode({}))
    oracle = {}
    a = events.Applier(keep=events.keeps)
    evs = []
    for ct in range(1, 1500):
        k = rng.randrange(12)
        if k not in oracle or rng.random() < 0.05:
            doc = SON([("_id", k)] + [(n, _value(rng)) for n in rng.sample(NAMES, rng.randrange(1, 7))])
            oracle[k] = doc
            evs.append(_event("insert", doc, k, ct=ct))
        elif rng.random() < 0.05:
            del oracle[k]
            evs.append(_event("delete", key=k, ct=ct))
        else:
            ud, oracle[k] = _update(rng, oracle[k])
            evs.append(_event("update", key=k, ud=ud, ct=ct))
    i = 0
    while i < len(evs):
        n = rng.randrange(1, 200)
        with h.write() as w:
            for raw in evs[i:i + n]:
                assert a.apply_raw(w, raw) == "applied"
        i += n
    with h.read() as r:
        got = dict(r.scan("d.c"))
    h.close()
    assert a.recopy == [] and a.counts.get("applied") == len(evs)
    assert got == {id_key_from_document(bson.encode({"_id": k})): bson.encode(d, codec_options=OPTS) for k, d in oracle.items()}
