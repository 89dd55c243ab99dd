"""pitr_replay.prescan, the fast path's pre-scan of a window (a pure function): which base-chunk range each record
falls in and what it does there, and every reason it gives the window to the sequential path instead. The records are
change events as a change stream delivers them (raw BSON) and the segments module's own corrections."""
import bson
from bson import Timestamp

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import pitr_replay, segments
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.rawbson import id_key_from_value

PUT, DEL, UPD = pitr_replay._PUT, pitr_replay._DEL, pitr_replay._UPD  # pylint: disable=protected-access


def prescan(records, manifest):
    """pitr_replay.prescan of [(t, i, raw)] records, as the window holds them."""
    return pitr_replay.prescan([raw for _t, _i, raw in records], manifest)


def key(v):
    return id_key_from_value(v)


# two namespaces of the base: shop.orders in chunks ending at _id 10 and 20 (range 2: past the last chunk), shop.users one chunk
MANIFEST = {"namespaces": [
    {"ns": "shop.orders", "chunks": [{"last": key(10)}, {"last": key(20)}]},
    {"ns": "shop.users", "chunks": [{"last": key("m")}]},
    {"ns": "shop.a_view", "type": "view", "chunks": []},
]}


def event(op, db, coll, _id, k, **extra):  # the raw BSON of one change event
    doc = {"_id": {"_data": "%08x" % k}, "operationType": op, "clusterTime": Timestamp(100, k), "ns": {"db": db, "coll": coll},
           "documentKey": {"_id": _id}}
    doc.update(extra)
    return (100, k, bson.encode(doc))


def test_crud_events_and_document_corrections_are_grouped_by_the_base_range_they_fall_in_in_order():
    full = {"_id": 15, "x": "a"}
    desc = {"updatedFields": {"x": "b"}, "removedFields": [], "truncatedArrays": []}
    records = [
        event("insert", "shop", "orders", 15, 1, fullDocument=full),
        event("update", "shop", "orders", 3, 2, updateDescription=desc),
        event("delete", "shop", "orders", 25, 3),
        event("replace", "shop", "users", "b", 4, fullDocument={"_id": "b", "y": 1}),
        event("update", "shop", "orders", 15, 5, updateDescription=desc),
        (100, 6, segments.correction("doc", "shop.orders", key(4), bson.encode({"_id": 4, "fixed": True}))),
        (100, 7, segments.correction("doc", "shop.users", key("z"), None)),
        event("insert", "admin", "orders", 1, 8, fullDocument={"_id": 1}),  # not kept by a backup: left out, as the applier does
        event("insert", "shop", "system.profile", 1, 9, fullDocument={"_id": 1}),
    ]
    groups, why = prescan(records, MANIFEST)
    assert why is None
    assert groups == {
        (0, 1): [(PUT, key(15), bson.encode(full)), (UPD, key(15), bson.encode(desc))],
        (0, 0): [(UPD, key(3), bson.encode(desc)), (PUT, key(4), bson.encode({"_id": 4, "fixed": True}))],
        (0, 2): [(DEL, key(25), None)],
        (1, 0): [(PUT, key("b"), bson.encode({"_id": "b", "y": 1}))],
        (1, 1): [(DEL, key("z"), None)],  # past the namespace's last chunk
    }


def test_every_window_the_fast_path_cannot_replay_is_refused_with_its_reason():
    ok = event("insert", "shop", "orders", 1, 1, fullDocument={"_id": 1})
    cases = {
        "other than insert": event("drop", "shop", "orders", 1, 2),
        "does not have": event("insert", "shop", "newcoll", 1, 2, fullDocument={"_id": 1}),  # implicit creation
        "correction of a namespace (ns)": (100, 2, segments.correction("ns", "shop.orders", info=None)),
        "scan cannot read": event("update", "shop", "orders", 1, 2),  # an update without its description
    }
    for reason, bad in cases.items():
        groups, why = prescan([ok, bad, ok], MANIFEST)
        assert groups is None and reason in why, (reason, why)
    correction_elsewhere = (100, 2, segments.correction("doc", "shop.elsewhere", key(1), None))
    assert prescan([correction_elsewhere], MANIFEST) == (None, "an event on a namespace the base snapshot does not have")
    bad_ns = event("insert", "shop", "orders", 1, 2, fullDocument={"_id": 1}, ns={"db": 7, "coll": "orders"})
    assert prescan([bad_ns], MANIFEST)[1] == "an event the scan cannot read"
    dup = bson.encode({"operationType": "insert", "ns": {"db": "shop", "coll": "orders"}, "fullDocument": {"_id": 1}})
    dup = dup[:-1] + b"\x02operationType\x00\x07\x00\x00\x00delete\x00\x00"  # a name seen twice: the scan is not trusted
    dup = len(dup).to_bytes(4, "little") + dup[4:]
    assert prescan([(100, 3, dup)], MANIFEST)[0] is None
    assert prescan([], MANIFEST) == ({}, None)
