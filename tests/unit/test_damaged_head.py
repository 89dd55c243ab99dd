# -*- coding: utf-8 -*-
"""A head document that is already damaged (an element of negative length, one that runs past the document's end, a
document cut short): the applier stops with the head's damage error (HeadError, "resync") instead of reading the
damage as "field absent" and appending to it, on the one-scan $set path, the path-by-path splice and through the
Applier (capture and replay paths, catch-up too), and the head keeps what it had."""
import os
import random

import bson
import pytest
from bson import Timestamp
from bson.raw_bson import RawBSONDocument

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import events, head
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import HeadError, NotApplicable
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.rawbson import id_key_from_document, skip_value

DOC = bson.encode({"_id": 1, "a": "x" * 30, "n": {"p": "q" * 9, "r": [1, "two", {"s": 3}]}, "b": 2.5, "c": b"\x01\x02",
                   "t": "end"})


def _elements(raw, start=0, path=()):
    """(element start, value start, type, path of its container) of the elements of the document at raw[start], those of
    its sub-documents and arrays too."""
    out, pos, end, i = [], start + 4, start + int.from_bytes(raw[start:start + 4], "little") - 1, 0
    while pos < end:
        t, ne = raw[pos], raw.index(b"\x00", pos + 1)
        out.append((pos, ne + 1, t, path))
        if t in (0x03, 0x04):
            out += _elements(raw, ne + 1, path + (raw[pos + 1:ne].decode(),))
        pos = skip_value(raw, t, ne + 1)
        i += 1
    return out


def _ud(updated, removed=()):
    return bson.encode({"updatedFields": updated, "removedFields": list(removed), "truncatedArrays": []})


def _updates(path):
    """updateDescriptions that must read every element of the container at path (a new field or index there)."""
    if not path:
        return [("a new field ($set, one scan)", _ud({"zz": 1})), ("the last field ($set, one scan)", _ud({"t": "new"})),
                ("a new field after a removal (path by path)", _ud({"zz": 1}, ["nothere"])),
                ("a dotted path into a missing parent", _ud({"zz.y": 1}))]
    last = "9" if path[-1] == "r" else "zz"  # n.r is an array: an index past its end pads it
    return [("a new field or index in %s" % ".".join(path), _ud({".".join(path + (last,)): 1}))]


def _damaged_copies():
    """(what, bytes, updates) of DOC damaged, with the updates that must read the damaged part: each length prefix (of a
    string, binary, document, array) made negative, too small for its type or run past the end of the document, and DOC
    cut short inside an element (with its length prefix and terminator fixed, or not)."""
    out = []
    for pos, vs, t, path in _elements(DOC):
        if t in (0x02, 0x05, 0x03, 0x04):
            for n in (-1, -(vs - pos) - 4, len(DOC), 1 << 30) + ((0,) if t != 0x05 else ()):  # a binary may be empty
                bad = DOC[:vs] + n.to_bytes(4, "little", signed=True) + DOC[vs + 4:]
                out.append(("length %d at %d" % (n, vs), bad, _updates(path)))
    boundaries = {pos for pos, _vs, _t, path in _elements(DOC) if not path} | {len(DOC) - 1}
    for cut in range(6, len(DOC) - 1):
        if cut not in boundaries:
            body = DOC[:cut]
            out.append(("cut at %d" % cut, (cut + 1).to_bytes(4, "little") + body[4:] + b"\x00", _updates(())))
            out.append(("cut at %d, prefix kept" % cut, body, _updates(())))
    return out


def test_every_damaged_copy_is_refused_not_appended_to():
    copies = _damaged_copies()
    assert len(copies) > 150
    rng = random.Random(12)
    flips = [("random flips", _flip(rng), _updates(())) for _ in range(300)]
    for what, bad, updates in copies + flips:
        for name, ud in updates:
            try:
                got = events.apply_update_description(bad, ud)
            except HeadError as e:
                assert "damaged" in str(e) or "Unsupported BSON type" in str(e), (what, name)
                continue
            except NotApplicable:  # a flip that left the elements fitting, the parent of a path gone: re-copied
                assert what == "random flips", (what, name)
                continue
            # only a flip may leave elements that still fit (another type, another name): then the splice is framed
            assert what == "random flips", (what, name)
            assert int.from_bytes(got[:4], "little") == len(got) and got[-1] == 0, (what, name)


def _flip(rng):
    """DOC with a few random bytes of its length prefixes or type bytes changed."""
    raw = bytearray(DOC)
    spots = [p for pos, vs, t, _path in _elements(DOC) for p in ((pos,) + ((vs, vs + 3) if t in (0x02, 0x05, 0x03, 0x04) else ()))]
    for _ in range(rng.randrange(1, 3)):
        raw[rng.choice(spots)] = rng.randrange(256)
    return bytes(raw)


def _update_event(updated, removed=()):
    return bson.encode({"_id": {"_data": "x"}, "operationType": "update", "clusterTime": Timestamp(9, 1),
                        "ns": {"db": "d", "coll": "c"}, "documentKey": {"_id": 1},
                        "updateDescription": {"updatedFields": updated, "removedFields": list(removed),
                                              "truncatedArrays": []}})


@pytest.mark.parametrize("catch_up", [False, True])
@pytest.mark.parametrize("fast", [False, True])
def test_the_applier_stops_and_the_head_keeps_what_it_had(tmp_path, fast, catch_up):
    h = head.Head(str(tmp_path / "head.db"), os.urandom(32))
    bad = DOC[:DOC.index(b"\x02t\x00") + 3] + (-9).to_bytes(4, "little", signed=True) + DOC[DOC.index(b"\x02t\x00") + 7:]
    with h.write() as w:
        w.create_namespace("d.c", bson.encode({}))
        w.upsert("d.c", id_key_from_document(DOC), bad)
    a = events.Applier(keep=events.keeps)
    for ev in (_update_event({"zz": 1}), _update_event({"zz": 1}, ["gone"]), _update_event({"t.x": 1})):
        with pytest.raises(HeadError, match="damaged"):
            with h.write() as w:
                if fast:
                    a.apply_raw(w, ev, catch_up)
                else:
                    a.apply(w, RawBSONDocument(ev), catch_up)
        assert a.recopy == []
    with h.read() as r:
        assert list(r.scan("d.c")) == [(id_key_from_document(DOC), bad)]
    h.close()

