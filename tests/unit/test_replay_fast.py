"""The replay's fast path (events.Applier.apply_raw on raw event bytes) against the capture's path (Applier.apply on a
RawBSONDocument): the same outcomes, re-copies, errors and head, byte for byte, for every event kind."""
import os

import bson
import pytest
from bson import Int64, ObjectId, Timestamp
from bson.binary import Binary
from bson.raw_bson import RawBSONDocument

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import events, head
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.events import keeps

NS = {"db": "d", "coll": "c"}
ID_INDEX = {"v": 2, "key": {"_id": 1}, "name": "_id_"}


def ev(op, ns=NS, ct=(7, 1), **fields):
    e = {"_id": {"_data": "x"}, "operationType": op, "clusterTime": Timestamp(*ct), "wallTime": None}
    if ns is not None:
        e["ns"] = ns
    e.update(fields)
    return bson.encode(e)


def ins(d, op="insert", ns=NS, **kw):
    return ev(op, ns, documentKey={"_id": d["_id"]}, fullDocument=d, **kw)


def upd(_id, updated=None, removed=(), truncated=(), ns=NS, **kw):
    return ev("update", ns, documentKey={"_id": _id},
              updateDescription=dict({"updatedFields": updated or {}, "removedFields": list(removed),
                                      "truncatedArrays": list(truncated)}, **kw))


def dele(_id, ns=NS):
    return ev("delete", ns, documentKey={"_id": _id})


OID = ObjectId("650000000000000000000001")
BATCHES = [
    [  # inserts of every _id kind, a replace, updates (in place, appended, nested, removed, truncated, disambiguated)
        ev("create", collectionUUID=Binary(b"u" * 16, 4), operationDescription={"idIndex": ID_INDEX}),
        ins({"_id": 1, "a": 1, "arr": [1, 2, 3], "n": {"x": 1}}), ins({"_id": "s", "v": Int64(5), "z": -0.0}),
        ins({"_id": OID, "v": 1}), ins({"_id": {"k": 1, "j": [1]}, "v": 2}), ins({"_id": 2.5, "v": 3}),
        upd(1, {"a": "x", "n.y": 2}, removed=["missing"]), upd(1, {"arr.5": 9}), upd(OID, {"v": Int64(2)}),
        upd("s", {"q": 1}, removed=["z"]), upd(1, {"arr.1": 7}, truncated=[{"field": "arr", "newSize": 3}]),
        upd({"k": 1, "j": [1]}, {"a.b": 1}, disambiguatedPaths={"a.b": ["a.b"]}),
        ins({"_id": 2.5, "w": "replaced"}, op="replace"),
    ],
    [  # re-copies (several new fields, a missing document, a bad path), delete then update, insert after delete
        upd(1, {"new1": 1, "new2": 2}), upd(404, {"a": 1}), upd("s", {"v.x": 1}),
        ins({"_id": 50}), dele(50), ins({"_id": 51, "a": 1}), upd(51, {"a": 2}), ins({"_id": 51, "r": 1}, op="replace"),
        dele(OID), upd(OID, {"v": 3}), ins({"_id": OID, "back": True}), dele(405), dele("s"), ins({"_id": "s", "again": 1}),
        ins({"_id": 9}, ns={"db": "d", "coll": "implicit"}), upd(9, {"a": 1}, ns={"db": "d", "coll": "implicit"}),
        dele(9, ns={"db": "d", "coll": "refreshed"}), ins({"_id": 9}, ns={"db": "d", "coll": "refreshed"}),
    ],
    [  # not kept, DDL between writes, ignored kinds, a merged split event (fields in another order)
        ins({"_id": 1}, ns={"db": "admin", "coll": "x"}), upd(1, {"a": 1}, ns={"db": "admin", "coll": "x"}),
        dele(1, ns={"db": "admin", "coll": "x"}), upd(1, {"a": 1}, ns={"db": "config", "coll": "x"}),
        ins({"_id": 1}, ns={"db": "d", "coll": "system.profile"}),
        ev("createIndexes", operationDescription={"indexes": [{"v": 2, "key": {"x": 1}, "name": "x_1"}]}),
        upd(1, {"a": "after index"}),
        ev("modify", operationDescription={"validator": {"b": 1}}),
        ev("rename", to={"db": "e", "coll": "t"}, operationDescription={"to": {"db": "e", "coll": "t"}}),
        upd(1, {"a": "renamed"}, ns={"db": "e", "coll": "t"}), upd(1, {"a": "gone"}),
        ev("shardCollection", operationDescription={}), ev("dropIndexes", ns={"db": "e", "coll": "t"},
                                                           operationDescription={"indexes": [{"name": "x_1"}]}),
        bytes(events.merge_fragments([RawBSONDocument(bson.encode({"_id": {"_data": "1"}, "fullDocument": {"_id": 77, "big": "y"},
                                                                   "splitEvent": {"fragment": 1, "of": 2}})),
                                      RawBSONDocument(bson.encode({"_id": {"_data": "2"}, "operationType": "insert",
                                                                   "ns": {"db": "e", "coll": "t"}, "documentKey": {"_id": 77},
                                                                   "splitEvent": {"fragment": 2, "of": 2}}))]).raw),
        ev("rename", ns={"db": "e", "coll": "t"}, to={"db": "admin", "coll": "out"}),
        ins({"_id": 5}, ns={"db": "d", "coll": "v"}), ev("drop", ns={"db": "d", "coll": "v"}),
        ins({"_id": 6}, ns={"db": "f", "coll": "a"}), ev("dropDatabase", ns={"db": "f"}),
        ev("insert", ns={"db": "d"}),  # no collection: apply()'s own outcome
    ],
]


def refresh(ns):
    if ns == "d.refreshed":
        return {"options": bson.encode({"capped": False}), "indexes": [bson.encode(ID_INDEX)], "uuid": b"r" * 16}
    return None


def image(h):
    with h.read() as r:
        return [(n["ns"], n["uuid"], n["options"], n["indexes"], list(r.scan(n["ns"]))) for n in r.namespaces()]


def run(path, batches, fast, catch_up=False):
    """(image after each batch, per-event outcome or error, recopy triples, counts, events that went through apply()) of the batches
    applied in one transaction each."""
    h = head.Head(path, os.urandom(32))
    a = events.Applier(refresh=refresh, keep=keeps)
    outcomes, recopied, slow, images = [], [], [], []
    apply = a.apply
    a.apply = lambda *args: slow.append(1) or apply(*args)
    with h.write() as w:  # a namespace the backup does not keep (events on it are ignored), present in the head
        w.create_namespace("admin.x", bson.encode({}))
        w.upsert("admin.x", b"k", bson.encode({"_id": 1}))
    for batch in batches:
        with h.write() as w:
            for raw in batch:
                try:
                    outcomes.append(a.apply_raw(w, raw, catch_up) if fast else a.apply(w, RawBSONDocument(raw), catch_up))
                except Exception as e:  # pylint: disable=broad-except
                    outcomes.append((type(e).__name__, str(e)))
                recopied.extend(a.recopy)
                a.recopy = []
        images.append(image(h))
    out = images, outcomes, recopied, a.counts, len(slow)
    h.close()
    return out


@pytest.mark.parametrize("catch_up", [False, True])
def test_fast_path_equals_the_capture_applier(tmp_path, catch_up):
    slow = run(str(tmp_path / "slow" / "head.db"), BATCHES, False, catch_up)
    fast = run(str(tmp_path / "fast" / "head.db"), BATCHES, True, catch_up)
    assert fast[:4] == slow[:4]
    outcomes = slow[1]
    assert {"applied", "recopy", "ignored"} <= set(outcomes) or catch_up  # the cases really happen
    assert len(slow[2]) >= (0 if catch_up else 3) and any(isinstance(o, tuple) for o in outcomes)
    assert [n[0] for n in slow[0][-1]] == ["admin.x", "d.implicit", "d.refreshed"]  # d.c renamed to e.t, then out of the backup
    assert fast[4] <= 25 < sum(len(b) for b in BATCHES)  # most events took the fast path: DDL, odd ones fall back


def test_malformed_and_odd_events_fail_or_apply_as_apply_does(tmp_path):
    odd = [
        ins({"_id": 1, "a": 1}),
        ev("insert", fullDocument=None, documentKey={"_id": 2}),  # null fullDocument
        ev("delete", documentKey="not a document"),
        ev("update", documentKey={"_id": 1}),  # no updateDescription
        ev("update", documentKey={"_id": 1}, updateDescription={"updatedFields": {"b": 2}})[:-1],  # cut short
        bson.encode({"operationType": 5, "ns": NS}),
        bson.encode({"_id": {"_data": "x"}, "operationType": "insert", "ns": NS, "fullDocument": {"_id": 3},
                     "fullDocument ": 1}),
        ev("insert", ns={"db": "d", "coll": "c", "extra": 1}, fullDocument={"_id": 4}),
        ev("insert", ns="d.c", fullDocument={"_id": 5}),
        ev("insert", fullDocument={"no_id": 1}),
        ev("invalidate", ns=None),
    ]
    # the same field twice: a decoder keeps the last one
    twice = bson.encode({"_id": {"_data": "x"}, "operationType": "insert", "ns": NS, "fullDocument": {"_id": 6}})
    twice = twice[:-1] + b"\x03fullDocument\x00" + bson.encode({"_id": 7}) + b"\x00"
    twice = (len(twice)).to_bytes(4, "little") + twice[4:]
    odd.append(twice)
    slow = run(str(tmp_path / "slow" / "head.db"), [[r] for r in odd], False)
    fast = run(str(tmp_path / "fast" / "head.db"), [[r] for r in odd], True)
    assert fast[:4] == slow[:4]
    assert any(isinstance(o, tuple) for o in slow[1])


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # pylint: disable=broad-except
        return type(e).__name__


def test_top_level_sets_in_one_scan_equal_the_path_by_path_splice():
    """apply_update_description's one-scan case (updatedFields naming top-level fields only) against the general splice,
    byte for byte, over documents of every value kind and updates in place, appended, retyped, repeated and refused."""
    from bson import Code, Decimal128, MaxKey, MinKey, Regex  # pylint: disable=import-outside-toplevel
    values = [1, Int64(2), 2.5, -0.0, "s" * 40, "", None, True, {"x": [1, {"y": 2}]}, [1, [2, 3]], Binary(b"\x00\x01", 5),
              ObjectId("650000000000000000000002"), Timestamp(5, 6), Regex("a.*b", "i"), Code("f()"), Code("g()", {"z": 1}),
              Decimal128("1.5"), MinKey(), MaxKey(), bson.datetime.datetime(2026, 1, 2)]
    docs = [bson.encode({"_id": 1}), bson.encode(dict({"_id": 1}, **{"f%d" % k: v for k, v in enumerate(values)}))]
    dup = bson.encode({"_id": 1, "a": 1, "b": 2})  # a document with a field twice: the first one is updated
    dup = dup[:-1] + b"\x10a\x00\x07\x00\x00\x00\x00"
    docs.append((len(dup)).to_bytes(4, "little") + dup[4:])
    updates = [{"f3": "x"}, {"f1": 5, "f19": None}, {"new": 1}, {"f0": values[8], "new": [1]}, {"new": 1, "new2": 2},
               {"a": Int64(9)}, {"_id": 2}, {"f5": 1, "_id": 2}, {}, {"f4": 1.0, "f9": {"q": 1}}]
    updates += [{"f%d" % k: v} for k, v in enumerate(reversed(values))]
    checked = 0
    for doc in docs:
        for u in updates:
            ud = bson.encode({"updatedFields": u, "removedFields": [], "truncatedArrays": []})
            general = _outcome(events._apply_paths, doc, bson.encode(u), None, None, None)  # pylint: disable=protected-access
            assert _outcome(events.apply_update_description, doc, ud) == general, (bson.decode(doc), u)
            if u:
                fast = _outcome(events._set_top_level, doc, bson.encode(u))  # pylint: disable=protected-access
                assert fast == general, (bson.decode(doc), u)
                checked += 1
    assert checked > 50
    # dotted, removed, truncated or disambiguated: the general path (the one-scan case declines or is not asked)
    assert events._set_top_level(docs[1], bson.encode({"f8.x": 1})) is None  # pylint: disable=protected-access


def _negative_length(raw, name):
    """raw (BSON) with the int32 length of string field name set so that the element "ends" where it starts: a scan
    that trusts it reads that element forever."""
    at = raw.index(b"\x02" + name + b"\x00") + len(name) + 2
    return raw[:at] + (-(len(name) + 6)).to_bytes(4, "little", signed=True) + raw[at + 4:]


def test_negative_lengths_end_the_scans_instead_of_walking_backwards(tmp_path):
    """The scans (event fields, the one-scan update, the element lists, _walk) refuse an element of negative length
    instead of reading it forever, and the fast path still fails or applies as apply() does."""
    doc = bson.encode({"_id": 1, "a": "x" * 70, "b": 2})
    bad = _negative_length(doc, b"a")
    with pytest.raises(events.HeadError, match="damaged"):  # a damaged head document: see test_damaged_head.py
        events._set_top_level(bad, bson.encode({"b": 3}))  # pylint: disable=protected-access
    ud = bson.encode({"updatedFields": {"b": 3}, "removedFields": [], "truncatedArrays": []})
    assert _outcome(events.apply_update_description, bad, ud) == _outcome(
        events._apply_paths, bad, bson.encode({"b": 3}), None, None, None) == "HeadError"  # pylint: disable=protected-access
    assert _outcome(events.parse_elements, bad) == "HeadError"
    event = _negative_length(ev("insert", fullDocument={"_id": 8}, note="y" * 70), b"note")
    assert events._event_fields(event) is None  # pylint: disable=protected-access
    slow = run(str(tmp_path / "slow" / "head.db"), [[ins({"_id": 1, "b": 1})], [event]], False)
    fast = run(str(tmp_path / "fast" / "head.db"), [[ins({"_id": 1, "b": 1})], [event]], True)
    assert fast[:4] == slow[:4]


def test_a_set_of_fields_found_by_its_bytes_equals_the_parsed_description():
    """apply_update_description's byte-layout case ({updatedFields, removedFields: [], truncatedArrays: []}, as mongod
    sends a $set) gives what the parsed description gives, and a description laid out otherwise still parses."""
    doc = bson.encode({"_id": 1, "a": 1, "n": {"x": 1}, "s": "t"})
    for u in ({"a": 2}, {"a": "x", "n.y": 3}, {}, {"new": 1}, {"new": 1, "other": 2}, {"_id": 5}):
        exact = bson.encode({"updatedFields": u, "removedFields": [], "truncatedArrays": []})
        other = bson.encode({"removedFields": [], "updatedFields": u, "truncatedArrays": [], "x": None})
        general = _outcome(events._apply_paths, doc, bson.encode(u), None, None, None)  # pylint: disable=protected-access
        assert _outcome(events.apply_update_description, doc, exact) == general
        assert _outcome(events.apply_update_description, doc, other) == general
