"""pitr_replay.replay_parts, the replay process's work on one base-chunk range (a pure function): the base chunk's
documents with the window's operations applied, in key order, cut as virtual chunks are. It looks only at documents
next to a change (a search, or every key when changes are dense); checked against the plain rule (every document into
a dict, the operations applied in order, sorted, cut) on random ranges with _ids of every kind."""
import random

import bson
import pytest
from bson import Decimal128, Int64, MaxKey, MinKey, ObjectId

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import events, pitr_replay
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import NotApplicable, UncertainOrder
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.rawbson import id_key_from_document

PUT, DEL, UPD = pitr_replay._PUT, pitr_replay._DEL, pitr_replay._UPD  # pylint: disable=protected-access


def reference(plain, ops, limit):
    """The plain rule: what the replay process did before it searched."""
    docs = {}
    pos = 0
    while plain and pos < len(plain):
        size = int.from_bytes(plain[pos:pos + 4], "little")
        d = plain[pos:pos + size]
        docs[id_key_from_document(d)] = d
        pos += size
    for kind, key, payload in ops:
        if kind == PUT:
            docs[key] = payload
        elif kind == DEL:
            docs.pop(key, None)
        elif docs.get(key) is not None:
            try:
                docs[key] = events.apply_update_description(docs[key], payload)
            except (NotApplicable, UncertainOrder):
                pass
    keys, out, a = sorted(docs), [], 0
    while a < len(keys):
        b, size = a, 0
        while b < len(keys) and size < limit:
            size += len(docs[keys[b]])
            b += 1
        out.append((b - a, b"".join(docs[k] for k in keys[a:b])))
        a = b
    return out


def ids(rnd, n):
    """n distinct _ids of mixed kinds."""
    pool = ([rnd.randrange(-10 ** 6, 10 ** 6) for _ in range(n)] + [Int64(rnd.randrange(10 ** 12)) for _ in range(n // 4)]
            + [rnd.random() * 1000 for _ in range(n // 4)] + ["s%06d" % rnd.randrange(10 ** 6) for _ in range(n // 2)]
            + [ObjectId() for _ in range(n // 2)] + [{"a": rnd.randrange(100), "b": "x"} for _ in range(n // 8)]
            + [Decimal128("%d.5" % rnd.randrange(1000)) for _ in range(n // 8)] + [MinKey(), MaxKey(), None, True])
    seen, out = set(), []
    for v in pool:
        raw = bson.encode({"_id": v})
        k = id_key_from_document(raw)
        if k not in seen:
            seen.add(k)
            out.append(v)
    rnd.shuffle(out)
    return out[:n]


def doc(rnd, _id):
    return bson.encode({"_id": _id, "v": rnd.randrange(1000), "pad": "p" * rnd.randrange(0, 300), "arr": [1, 2, 3]})


@pytest.mark.parametrize("seed", range(12))
def test_replay_parts_equals_the_plain_rule(seed):
    rnd = random.Random(seed)
    values = ids(rnd, 400)
    base_ids = rnd.sample(values, rnd.choice([0, 5, 150, 300]))
    base = sorted((bson.encode({"_id": v}) for v in base_ids), key=id_key_from_document)
    base = [doc(rnd, bson.decode(b)["_id"]) for b in base]
    plain = b"".join(base) if base or rnd.random() < 0.5 else None  # None: the range past a namespace's last chunk
    touched = rnd.sample(values, rnd.choice([1, 3, 20, 200, 390]))  # sparse (searched) to dense (every key read)
    ops = []
    for v in touched * rnd.choice([1, 2]):
        key = id_key_from_document(bson.encode({"_id": v}))
        kind = rnd.choice([PUT, DEL, UPD, UPD])
        if kind == PUT:
            ops.append((PUT, key, doc(rnd, v)))
        elif kind == DEL:
            ops.append((DEL, key, None))
        else:
            desc = rnd.choice([{"updatedFields": {"v": -1, "new": "n"}, "removedFields": ["pad"], "truncatedArrays": []},
                               {"updatedFields": {"arr.7": 1}, "removedFields": [], "truncatedArrays": []},  # does not apply
                               {"updatedFields": {}, "removedFields": [], "truncatedArrays": [{"field": "arr", "newSize": 1}]}])
            ops.append((UPD, key, bson.encode(desc)))
    for limit in (1, 700, 5000, 1 << 20):
        got = pitr_replay.replay_parts(plain, ops, limit)
        assert [(c, bytes(d)) for c, d in got] == reference(plain, ops, limit), (seed, limit)
        assert all(c == len(pitr_replay.split_bson_docs(d)) for c, d in got)


def test_a_base_chunk_that_does_not_split_into_documents_is_refused():
    good = bson.encode({"_id": 1})
    for bad in (good[:-1], good + b"\x00\x00\x00\x00", b"\x04\x00\x00\x00"):
        with pytest.raises(ValueError, match="does not split into documents"):
            pitr_replay.replay_parts(bad, [(DEL, id_key_from_document(good), None)])
