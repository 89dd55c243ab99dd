"""Unit tests of the change-event applier with hand-built events (shapes from the change-events reference)."""
import datetime
import os

import bson
import pytest
from bson import Decimal128, Int64, ObjectId, Timestamp
from bson.binary import Binary
from bson.raw_bson import RawBSONDocument

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import events, head, rawbson
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import HistoryLostError

NS = {"db": "d", "coll": "c"}


def raw(d):
    return RawBSONDocument(bson.encode(d))


def upd(_id, updated=None, removed=(), truncated=(), disambiguated=None, ns=NS):
    ud = {"updatedFields": updated or {}, "removedFields": list(removed), "truncatedArrays": list(truncated)}
    if disambiguated is not None:
        ud["disambiguatedPaths"] = disambiguated
    return raw({"_id": {"_data": "x"}, "operationType": "update", "clusterTime": Timestamp(1, 1), "ns": ns,
                "documentKey": {"_id": _id}, "updateDescription": ud})


def ins(d, op="insert", ns=NS):
    return raw({"_id": {"_data": "x"}, "operationType": op, "clusterTime": Timestamp(1, 1), "ns": ns,
                "documentKey": {"_id": d["_id"]}, "fullDocument": d})


def ddl(op, ns=NS, **fields):
    return raw(dict({"_id": {"_data": "x"}, "operationType": op, "clusterTime": Timestamp(1, 1), "ns": ns}, **fields))


@pytest.fixture
def h(tmp_path):
    hd = head.Head(str(tmp_path / "head.db"), os.urandom(32))
    yield hd
    hd.close()


def run(h, evs, catch_up=False, applier=None):
    a = applier or events.Applier()
    with h.write() as w:
        out = [a.apply(w, e, catch_up=catch_up) for e in evs]
    return out, a


def stored(h, _id, ns="d.c"):
    with h.read() as r:
        return r.get(ns, rawbson.id_key_from_value(_id))


def check(h, before, evs, after, **kw):
    run(h, [ins(before)])
    out, a = run(h, evs, **kw)
    assert stored(h, before["_id"]) == bson.encode(after), bson.decode(stored(h, before["_id"]))
    return out, a


def test_set_beyond_end_pads_with_null(h):
    check(h, {"_id": 1, "arr": [1, 2, 3]}, [upd(1, {"arr.5": 9})], {"_id": 1, "arr": [1, 2, 3, None, None, 9]})


def test_truncation_plus_element_change(h):
    check(h, {"_id": 1, "arr": ["foo", {"a": "bar"}, 1, 2, 3]},
          [upd(1, {"arr.1.b": 3}, truncated=[{"field": "arr", "newSize": 2}])],
          {"_id": 1, "arr": ["foo", {"a": "bar", "b": 3}]})


def test_removed_fields_and_in_place_and_appended_sets_keep_order(h):
    check(h, {"_id": 1, "a": 1, "b": 2, "n": {"x": 1, "y": 2}, "c": 3},
          [upd(1, {"c": Int64(7), "a": "s", "z": {"q": 1}, "n.w": -0.0}, removed=["b", "n.x", "missing.path"])],
          {"_id": 1, "a": "s", "n": {"y": 2, "w": -0.0}, "c": Int64(7), "z": {"q": 1}})


def test_numeric_field_names_with_disambiguated_paths(h):
    before = {"_id": 1, "arrayWithNumericField": [[{"1": "a"}]], "o": {"0": "zero"}, "arr": [{"0": "x"}]}
    after = {"_id": 1, "arrayWithNumericField": [[{"1": "b"}]], "o": {"0": "ZERO"}, "arr": [{"0": "y"}]}
    check(h, before, [upd(1, {"arrayWithNumericField.0.0.1": "b", "o.0": "ZERO", "arr.0.0": "y"},
                          disambiguated={"arrayWithNumericField.0.0.1": ["arrayWithNumericField", 0, 0, "1"],
                                         "o.0": ["o", "0"], "arr.0.0": ["arr", 0, "0"]})], after)


def test_numeric_components_without_disambiguated_paths_follow_the_parent_type(h):
    before = {"_id": 1, "o": {"10": 1}, "a": [0, {"10": 1}]}
    check(h, before, [upd(1, {"o.10": 2, "a.1.10": 3, "a.0": Int64(5)})], {"_id": 1, "o": {"10": 2}, "a": [Int64(5), {"10": 3}]})


def test_dotted_field_name(h):
    before = {"_id": 1, "a.b": 1, "a": {"b": 5}}
    check(h, before, [upd(1, {"a.b": 2}, disambiguated={"a.b": ["a.b"]})], {"_id": 1, "a.b": 2, "a": {"b": 5}})
    # without disambiguatedPaths (or the stand-in's empty one) the path is ambiguous: re-copy, never guess
    out, a = run(h, [upd(1, {"a.b": 3}, disambiguated={})])
    assert out == ["recopy"] and [r[:2] for r in a.recopy] == [("d.c", bson.encode({"_id": 1}))]
    assert stored(h, 1) == bson.encode({"_id": 1, "a.b": 2, "a": {"b": 5}})


def test_nested_arrays_unset_element_and_positional_results(h):
    check(h, {"_id": 1, "m": [[1], [2, 3]], "arr": [1, 2, 3]},
          [upd(1, {"m.1.0": 20, "arr.1": None, "m.0.0": Decimal128("1.10")})],
          {"_id": 1, "m": [[Decimal128("1.10")], [20, 3]], "arr": [1, None, 3]})


def test_values_keep_exact_types_and_untouched_bytes(h):
    t = datetime.datetime(2020, 1, 2, 3, 4, 5, 678000)
    before = {"_id": ObjectId(b"\x01" * 12), "i": Int64(1), "nz": -0.0, "nan": float("nan"), "d": Decimal128("1.000"),
              "ts": Timestamp(5, 6), "b3": Binary(b"\x00" * 16, 3), "b128": Binary(b"xy", 128), "dt": t, "k": 1}
    after = dict(before, k=Int64(2), ts=Timestamp(7, 8), new=Binary(b"q", 5))
    check(h, before, [upd(before["_id"], {"k": Int64(2), "ts": Timestamp(7, 8), "new": Binary(b"q", 5)})], after)


def test_several_new_fields_in_one_document_are_recopied_not_trusted(h):
    """The order of several new fields is the server's choice (mongod 5.0+ sorts them, the stand-in keeps the
    update's): the event cannot carry it, so the document is re-copied, also during an initial sync's catch-up."""
    run(h, [ins({"_id": 1, "f": 1, "o": {"x": 1}, "p": {"y": 1}})])
    for catch_up in (False, True):
        out, a = run(h, [upd(1, {"f2": 1, "cd": 2}, removed=["f"]),  # {$rename: {f: "f2"}, $currentDate: {cd: true}}
                         upd(1, {"o.b": 1, "o.a": 2})],  # two new dotted paths under one parent
                     catch_up=catch_up)
        assert out == ["recopy", "recopy"], catch_up
        assert [bson.decode(r[1])["_id"] for r in a.recopy] == [1, 1]
    assert stored(h, 1) == bson.encode({"_id": 1, "f": 1, "o": {"x": 1}, "p": {"y": 1}})  # nothing guessed
    # one new field per document, or new fields in different documents: the order is known (appended)
    out, a = run(h, [upd(1, {"o.z": 1, "p.z": 2, "g": 3})])
    assert out == ["applied"] and a.recopy == []
    assert stored(h, 1) == bson.encode({"_id": 1, "f": 1, "o": {"x": 1, "z": 1}, "p": {"y": 1, "z": 2}, "g": 3})


def test_non_viable_paths_and_missing_documents(h):
    run(h, [ins({"_id": 1, "a": 5, "arr": [1]})])
    out, a = run(h, [upd(1, {"a.b": 1}), upd(1, {"arr.x": 1}), upd(2, {"a": 1}), upd(1, {"a": 6})])
    assert out == ["recopy", "recopy", "recopy", "applied"]
    assert [bson.decode(r[1])["_id"] for r in a.recopy] == [1, 1, 2]
    out, a = run(h, [upd(1, {"a.b": 1}), upd(3, {"a": 1}), ddl("delete", documentKey={"_id": 3})], catch_up=True)
    assert out == ["skipped", "skipped", "applied"] and a.recopy == []
    assert stored(h, 1) == bson.encode({"_id": 1, "a": 6, "arr": [1]})


def test_insert_replace_delete_store_bytes_as_is(h):
    d = {"_id": "k", "x": {"y": [1, Int64(2)]}, "é": "ü"}
    run(h, [ins(d)])
    assert stored(h, "k") == bson.encode(d)
    run(h, [ins({"_id": "k", "z": 1}, op="replace"), ins({"_id": "k", "z": 2}, op="insert")], catch_up=True)  # idempotent upsert
    assert stored(h, "k") == bson.encode({"_id": "k", "z": 2})
    run(h, [ddl("delete", documentKey={"_id": "k"}), ddl("delete", documentKey={"_id": "k"})])
    assert stored(h, "k") is None
    with h.read() as r:  # implicit creation (no create event on the stand-in) gives the _id index
        assert [bson.decode(s)["name"] for s in r.namespace("d.c")["indexes"]] == ["_id_"]


def test_ddl_without_refresh(h):
    uuid = Binary(b"u" * 16, 4)
    id_index = {"v": 2, "key": {"_id": 1}, "name": "_id_"}
    run(h, [ddl("create", collectionUUID=uuid, operationDescription={"validator": {"a": 1}, "idIndex": id_index}),
            ins({"_id": 1}),
            ddl("createIndexes", operationDescription={"indexes": [{"v": 2, "key": {"x": 1}, "name": "x_1", "unique": True}]}),
            ddl("create", ns={"db": "d", "coll": "v"}, operationDescription={"viewOn": "c", "viewPipeline": [{"$match": {}}],
                                                                             "idIndex": id_index}),
            ddl("modify", operationDescription={"validationLevel": "moderate", "validator": {"b": 1}})])
    with h.read() as r:
        c = r.namespace("d.c")
        assert c["uuid"] == b"u" * 16
        assert bson.decode(c["options"]) == {"validator": {"b": 1}, "validationLevel": "moderate"}
        assert [bson.decode(s) for s in c["indexes"]] == [id_index, {"v": 2, "key": {"x": 1}, "name": "x_1", "unique": True}]
        assert bson.decode(r.namespace("d.v")["options"]) == {"viewOn": "c", "pipeline": [{"$match": {}}]}
    run(h, [ddl("dropIndexes", operationDescription={"indexes": [{"v": 2, "key": {"x": 1}, "name": "x_1"}]}),
            ddl("drop", ns={"db": "e", "coll": "t"}),
            ddl("rename", to={"db": "e", "coll": "t"}, operationDescription={"to": {"db": "e", "coll": "t"}})])
    with h.read() as r:
        assert [n["ns"] for n in r.namespaces()] == ["d.v", "e.t"]
        assert [bson.decode(s)["name"] for s in r.namespace("e.t")["indexes"]] == ["_id_"]
        assert r.count("e.t") == 1
    out, _ = run(h, [ddl("rename", to={"db": "e", "coll": "t"})], catch_up=True)  # replayed: already done
    assert out == ["skipped"]
    run(h, [ddl("dropDatabase", ns={"db": "e"}), ddl("shardCollection", operationDescription={})])
    with h.read() as r:
        assert [n["ns"] for n in r.namespaces()] == ["d.v"]
    with pytest.raises(HistoryLostError):
        run(h, [raw({"_id": {"_data": "x"}, "operationType": "invalidate", "clusterTime": Timestamp(1, 1)})])


def test_ddl_uses_refresh_for_full_index_specs(h):
    full = [bson.encode({"v": 2, "key": {"_id": 1}, "name": "_id_"}),
            bson.encode({"v": 2, "key": {"x": 1}, "name": "x_1", "unique": True, "sparse": True})]
    calls = []

    def refresh(ns):
        calls.append(ns)
        return {"options": bson.encode({"capped": False}), "indexes": full, "uuid": None} if ns == "d.c" else None

    a = events.Applier(refresh=refresh)
    run(h, [ins({"_id": 1}), ddl("createIndexes", operationDescription={"indexes": [{"v": 2, "key": {"x": 1}, "name": "x_1"}]}),
            ins({"_id": 1}, ns={"db": "d", "coll": "gone"})], applier=a)
    assert calls == ["d.c", "d.c", "d.gone"]
    with h.read() as r:
        assert r.namespace("d.c")["indexes"] == full
        assert [bson.decode(s)["name"] for s in r.namespace("d.gone")["indexes"]] == ["_id_"]


def test_merge_fragments():
    f1 = raw({"_id": {"_data": "1"}, "operationType": "insert", "splitEvent": {"fragment": 1, "of": 2}})
    f2 = raw({"_id": {"_data": "2"}, "fullDocument": {"_id": 1}, "splitEvent": {"fragment": 2, "of": 2}})
    assert bson.decode(events.merge_fragments([f1, f2]).raw) == {"_id": {"_data": "1"}, "operationType": "insert",
                                                                 "fullDocument": {"_id": 1}}


def test_recorded_batch_applies(h):
    """A recorded batch of a mixed stream (inserts, updates, deletes) applies completely.
    Its speed is measured by benchmarks/run, not here."""
    evs = []
    ids = [ObjectId() for _ in range(10000)]
    for i, _id in enumerate(ids):
        evs.append(ins({"_id": _id, "n": i, "s": "x" * 200, "arr": [1, 2, 3], "sub": {"a": 1, "b": "y"}}))
    for i, _id in enumerate(ids):
        evs.append(upd(_id, {"n": i + 1, "sub.a": 2, "arr.3": 4}, disambiguated={}))
    for _id in ids[::2]:
        evs.append(ddl("delete", documentKey={"_id": _id}))
    a = events.Applier()
    with h.write() as w:
        for e in evs:
            a.apply(w, e)
    assert a.counts == {"applied": len(evs)}
    assert stored(h, ids[1]) == bson.encode({"_id": ids[1], "n": 2, "s": "x" * 200, "arr": [1, 2, 3, 4], "sub": {"a": 2, "b": "y"}})
    with h.read() as r:
        assert r.count("d.c") == len(ids) // 2


def test_buffered_writes_in_one_transaction_and_rollback(h):
    """Writes are buffered per transaction: reads see them, DDL and COMMIT write them, a rollback drops them."""
    a = events.Applier()
    with h.write() as w:
        out = [a.apply(w, e) for e in (ins({"_id": 1, "v": 1}), upd(1, {"v": 2}), ins({"_id": 2, "v": 1}),
                                       ddl("delete", documentKey={"_id": 2}), ins({"_id": 2, "v": 3}), upd(2, {"w": 1}),
                                       ins({"_id": 3}), ddl("delete", documentKey={"_id": 3}))]
        assert w.get("d.c", rawbson.id_key_from_value(1)) is None  # still buffered
        a.apply(w, ddl("rename", to={"db": "d", "coll": "r"}))  # a DDL event writes the buffer first
        a.apply(w, ins({"_id": 4}, ns={"db": "d", "coll": "r"}))
    assert out == ["applied"] * 8
    assert stored(h, 1, "d.r") == bson.encode({"_id": 1, "v": 2})
    assert stored(h, 2, "d.r") == bson.encode({"_id": 2, "v": 3, "w": 1})
    assert stored(h, 3, "d.r") is None and stored(h, 4, "d.r") == bson.encode({"_id": 4})
    with h.read() as r:
        assert len(r.changed("d.r")) == 3
    with pytest.raises(RuntimeError):
        with h.write() as w:
            a.apply(w, ins({"_id": 5}, ns={"db": "d", "coll": "r"}))
            raise RuntimeError("rolled back")
    with h.write() as w:  # the next transaction starts with an empty buffer
        a.apply(w, upd(4, {"x": 1}, ns={"db": "d", "coll": "r"}))
    assert stored(h, 5, "d.r") is None and stored(h, 4, "d.r") == bson.encode({"_id": 4, "x": 1})


def test_update_splices_nested_paths_and_keeps_every_other_byte(h):
    before = {"_id": 1, "a": {"b": {"c": [1, {"d": "x"}]}, "k": "keep"}, "z": Int64(1), "t": [[1, 2], [3]]}
    check(h, before, [upd(1, {"a.b.c.1.d": "longer value", "a.b.c.3": 1, "t.1.0": [9, 9], "a.n": None},
                          removed=["a.k"], truncated=[{"field": "t.0", "newSize": 1}])],
          {"_id": 1, "a": {"b": {"c": [1, {"d": "longer value"}, None, 1]}, "n": None}, "z": Int64(1), "t": [[1], [[9, 9]]]})


def test_clone_repair_marks_rename_targets_of_namespaces_the_clone_may_have_got_wrong(h):
    """CloneRepair's rules: a rename from a namespace the clone copied (not proven exact) leaves its target to
    re-clone; a drop, a create (which, in catch-up, empties what the clone copied under that name) and
    dropDatabase make a namespace exact; a rename moves exactness with the documents."""
    def ns(db, coll):
        return {"db": db, "coll": coll}

    run(h, [ins({"_id": 1}, ns=ns("d", "a")), ins({"_id": 2}, ns=ns("d", "late")), ins({"_id": 3}, ns=ns("e", "x"))])
    a = events.Applier()
    a.repair = events.CloneRepair()
    evs = [ddl("rename", ns=ns("d", "a"), to=ns("d", "b")),      # cloned a -> b: b to re-clone
           ddl("create", ns=ns("d", "late"), operationDescription={}),  # created after the start: exact from here
           ddl("rename", ns=ns("d", "late"), to=ns("d", "c")),   # exact -> c exact
           ddl("rename", ns=ns("d", "b"), to=ns("d", "late")),   # b (to re-clone) -> late: late to re-clone, b gone
           ddl("dropDatabase", ns={"db": "e"})]
    run(h, evs, catch_up=True, applier=a)
    assert a.repair.reclone == {"d.late"}
    assert {"d.a", "d.b", "d.c", "e.x"} <= a.repair.exact
    with h.read() as r:
        assert r.count("d.c") == 0  # the create emptied what was there under "late" before it was renamed to c
    # a later round: only the re-cloned namespaces are in doubt
    r2 = events.CloneRepair(scope={"d.late"})
    assert r2.is_exact("d.other") and not r2.is_exact("d.late")
