"""Unit tests of change segments (real SQLCipher heads and a folder store, no server): seal/open, the chain,
ranges and gaps, plans, and a replay that rebuilds the head's image at each point byte for byte."""
import datetime
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import bson
import pytest
from bson import Timestamp
from bson.binary import Binary
from bson.raw_bson import RawBSONDocument

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import crypto, head, rawbson, segments, snapshot, store
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, PointNotRestorable, StoreError
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.events import Applier
from pitr_overlap_helpers import wait_post_images_built
from snapshot_helpers import LocalKeyProvider, canary_hits, files_under, make_head

NS = "shop.orders"
T0 = int(time.time()) - 86400  # a day ago: collect() compares the window with cluster times and the grace with mtimes
CANARY = "PitrCanary5521"


def ev(op, t, i, _id, doc=None, fields=None):
    e = {"_id": {"_data": "%08x%08x" % (t, i)}, "operationType": op, "clusterTime": Timestamp(t, i),
         "ns": {"db": "shop", "coll": "orders"}, "documentKey": {"_id": _id}}
    if op in ("insert", "replace"):
        e["fullDocument"] = doc
    if op == "update":
        e["updateDescription"] = {"updatedFields": fields, "removedFields": [], "truncatedArrays": []}
    return bson.encode(e)


def capture(h, events, consistent=True):
    """What source.Capture does with segments on: apply each event and log it, in one transaction."""
    ap = Applier()
    rows = []
    with h.write() as w:
        for raw in events:
            e = RawBSONDocument(raw)
            ap.apply(w, e)
            ct = e["clusterTime"]
            rows.append((ct.time, ct.inc, raw))
        ap.flush()
        w.log_records(rows)
        w.set_position(b"token", [rows[-1][0], rows[-1][1]], consistent)


def image(h):
    with h.read() as r:
        return {n["ns"]: list(r.scan(n["ns"])) for n in r.namespaces()}


@pytest.fixture
def env(tmp_path):
    provider = LocalKeyProvider()
    provider.create("mk1")
    provider.create("mk2")
    js = store.JobStore(str(tmp_path / "store"), "job1")
    keys = store.Keys(js, provider)
    h = make_head(str(tmp_path / "head" / "head.db"), {NS: [{"_id": 0, "v": CANARY}]}, key=os.urandom(32), cluster_time=(T0, 1))
    h.record_segments = True
    yield tmp_path, provider, js, keys, h
    h.close()  # ends its post-image builder process


def snap(h, js, keys, mk="mk1"):
    e = snapshot.take_snapshot(h, js, keys, "job1", mk, True)
    h.mark_snapshotted(e["change_seq"])
    return e


def close_seal(h, js, keys, mk="mk1"):
    segments.close(h)
    return segments.seal_closed(h, js, keys, mk)


def build(env):
    """snapshot at T0.1; segments (T0.1, T0+10.3], (.., T0+20.1], (.., T0+30.2]; the expected image at each point."""
    tmp, provider, js, keys, h = env
    base = snap(h, js, keys)
    images = {(T0, 1): image(h)}
    batches = [
        [ev("insert", T0 + 5, 1, 1, {"_id": 1, "v": CANARY + "a"}), ev("insert", T0 + 5, 1, 2, {"_id": 2, "v": "b"}),
         ev("update", T0 + 10, 3, 1, fields={"w": 7})],
        [ev("delete", T0 + 15, 1, 2), ev("insert", T0 + 20, 1, 3, {"_id": 3, "v": "c"})],
        [ev("update", T0 + 25, 1, 3, fields={"v": "cc"}), ev("insert", T0 + 30, 2, 4, {"_id": 4})],
    ]
    for batch in batches:
        for raw in batch:  # one transaction per cluster time, an image after each
            capture(h, [raw])
            e = RawBSONDocument(raw)
            images[(e["clusterTime"].time, e["clusterTime"].inc)] = image(h)
        close_seal(h, js, keys)
    return base, images


def replayed(tmp, js, keys, base_images, plan, name):
    """A head holding the plan's snapshot's image, then the plan replayed (pitrr loads the snapshot itself)."""
    r = make_head(str(tmp / name / "head.db"), {NS: []}, key=os.urandom(32), cluster_time=(T0, 1))
    with r.write() as w:
        for ns, pairs in base_images[tuple(plan["snapshot"]["cluster_time"])].items():
            w.upsert_many(ns, pairs)
    result = segments.replay(r, js, keys, plan)
    out = image(r)
    assert r.position()["cluster_time"] == list(plan["point"])
    r.close()
    return out, result


def test_seal_open_round_trip_and_binding(env):
    _tmp, _provider, js, keys, _h = env
    keys.epoch_for("mk1")
    key = keys.key("snapshot-1")
    meta = segments._meta("20261130T120000Z-0a0b0c0d", 2, (T0, 1), (T0 + 9, 4))
    plain = segments.encode_records([(T0 + 1, 2, bson.encode({"a": CANARY}))])
    prev = os.urandom(32)
    blob = segments.seal_segment("job1", meta, crypto.compress(plain[:13]) + crypto.compress(plain[13:]), "snapshot-1", key, prev)
    assert CANARY.encode() not in blob
    assert segments.open_segment("job1", meta, blob, keys) == (plain, prev)
    assert [(t, i, bytes(r)) for t, i, r in segments.decode_records(plain)] == [(T0 + 1, 2, bson.encode({"a": CANARY}))]
    others = [("job2", meta), ("job1", dict(meta, seq=3)), ("job1", dict(meta, to=(T0 + 9, 5))),
              ("job1", dict(meta, timeline="20261130T120000Z-0a0b0c0e"))]
    for job, m in others:
        with pytest.raises(IntegrityError, match="segment %s" % meta["name"]):
            segments.open_segment(job, dict(m, name=meta["name"]), blob, keys)
    bad = bytearray(blob)
    bad[-20] ^= 1
    with pytest.raises(IntegrityError, match="segment"):
        segments.open_segment("job1", meta, bytes(bad), keys)
    forged_prev = blob[:5 + 10] + os.urandom(32) + blob[5 + 10 + 32:]
    with pytest.raises(IntegrityError):
        segments.open_segment("job1", meta, forged_prev, keys)
    null = segments.seal_segment("job1", meta, crypto.compress(plain), "none", None, prev)
    with pytest.raises(IntegrityError, match="unencrypted"):
        segments.open_segment("job1", meta, null, keys)


@pytest.mark.parametrize("record_bytes,frame_bytes", [(None, 16 << 20), (700, 2000), (1, 1)])
def test_post_image_plaintexts_are_the_bson_records_of_their_entries(record_bytes, frame_bytes):
    """post_plaintexts joins each record from its parts: the bytes must be bson.encode's, for any name, in order, split
    by size, and read back by the replay process as the same documents."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import pitr_replay  # pylint: disable=import-outside-toplevel
    rng = __import__("random").Random(5)
    names = ["d.c", "d.\u00fc\u540d\u202e.$x", "x." + "n" * 300, "a.\x7f\U0001f600"]
    rows = []
    for ns in names:
        for k in range(rng.randrange(1, 40)):
            key = rawbson.id_key_from_value(k * 7)
            doc = None if rng.random() < 0.3 else bson.encode({"_id": k * 7, "pad": os.urandom(rng.randrange(0, 400))})
            rows.append((ns, key, doc))
    to = (T0 + 9, 4)
    plains = list(segments.post_plaintexts(iter(rows), to, record_bytes, frame_bytes))
    assert len(plains) > 1 if frame_bytes < 10000 else len(plains) == 1
    records = [r for p in plains for r in segments.decode_records(p)]
    assert {(t, i) for t, i, _r in records} == {to} and all(segments.is_post(bytes(r)) for _t, _i, r in records)
    got = []
    for _t, _i, raw in records:
        raw = bytes(raw)
        d = bson.decode(raw)
        assert raw == bson.encode({"kb": "post", "ns": d["ns"], "docs": Binary(bytes(d["docs"]))})
        j, _lasts, ops = pitr_replay._post_ops(raw, {n: (n, []) for n in names})  # pylint: disable=protected-access
        assert record_bytes is not None or len(ops) == sum(1 for r in rows if r[0] == j)  # one record per namespace
        got += [(j, key, doc if kind == pitr_replay._PUT else None) for kind, key, doc in ops]  # pylint: disable=protected-access
    assert got == rows
    assert list(segments.post_plaintexts(iter([]), to)) == []


def test_a_post_image_trailer_is_skipped_by_plain_readers_and_names_only_post_images(env):
    _tmp, _provider, js, keys, _h = env
    keys.epoch_for("mk1")
    meta = segments._meta("20261130T120000Z-0a0b0c0d", 1, (T0, 1), (T0 + 9, 4))
    event = segments.encode_records([(T0 + 1, 2, bson.encode({"_id": 1, "a": CANARY}))])
    post, = segments.post_plaintexts([("d.c", b"\x35" + bytes(12), None)], (T0 + 9, 4))
    frames = crypto.compress(event) + crypto.compress(post)

    def read(stream, posts_only):
        path = segments.segment_path(js, meta)
        js.storage.put_atomic(path, segments.seal_segment(js.job, meta, stream, "snapshot-1", keys.key("snapshot-1"),
                                                          segments.NO_PREDECESSOR))
        (got, recs), = segments.read_segments(js, keys, [meta], frozenset([meta["name"]]) if posts_only else frozenset())
        return got.get("posts_only", False), segments.encode_records([(t, i, bytes(r)) for t, i, r in recs])
    with_trailer = frames + segments.post_trailer(len(crypto.compress(event)))
    assert segments.post_offset(with_trailer) == len(crypto.compress(event)) and segments.post_offset(frames) is None
    assert segments.decompress_frames(with_trailer) == event + post  # a plain zstd reader skips the trailer
    assert read(with_trailer, False) == (False, event + post)
    assert read(with_trailer, True) == (True, post)
    assert read(frames, True) == (False, event + post)  # no trailer: read whole
    # a trailer that points at anything but post-images (only a key holder can seal one): refused, naming the segment
    for wrong in (0, 3, len(frames)):
        stream = frames + segments.post_trailer(wrong)
        if segments.post_offset(stream) is None:
            assert read(stream, True) == (False, event + post)
            continue
        with pytest.raises(IntegrityError, match="segment %s (has malformed post-images|does not decompress)" % meta["name"]):
            read(stream, True)
    with pytest.raises(IntegrityError, match="segment %s has malformed post-images" % meta["name"]):
        read(crypto.compress(event) + crypto.compress(event) + segments.post_trailer(len(crypto.compress(event))), True)


def test_a_record_that_ends_like_a_trailer_is_not_taken_for_one(env):
    """A segment without post-images whose last record ends with bytes a user chose (an insert with a random BinData _id:
    zstd stores the incompressible block raw, so the stream ends with them) that spell a post-image frame and a trailer
    pointing at it: the frame walk finds no frame there, and the segment is read whole."""
    _tmp, _provider, js, keys, _h = env
    keys.epoch_for("mk1")
    to = (T0 + 9, 4)
    meta = segments._meta("20261130T120000Z-0a0b0c0d", 1, (T0, 1), to)
    forged = crypto.compress(next(segments.post_plaintexts([("admin.system.users", b"\x35" + bytes(12), None)], to)))
    noise = os.urandom(300_000)

    def stream(offset):
        tail = forged + segments.post_trailer(offset)  # its last two bytes are zeros: a document's and its _id's ends
        event = bson.encode({"operationType": "insert", "documentKey": {"_id": Binary(noise + tail[:-2])}})
        return crypto.compress(segments.encode_records([to + (event,)]))
    offset = 0
    for _ in range(10):  # the offset the forged frame lands at, once the stream's length is stable
        compressed = stream(offset)
        offset, was = len(compressed) - segments.POST_TRAILER.size - len(forged), offset
        if offset == was:
            break
    assert compressed.endswith(forged + segments.post_trailer(offset))  # it does look like a trailer
    assert segments.post_offset(compressed) is None
    path = segments.segment_path(js, meta)
    js.storage.put_atomic(path, segments.seal_segment(js.job, meta, compressed, "snapshot-1", keys.key("snapshot-1"),
                                                      segments.NO_PREDECESSOR))
    (got, recs), = segments.read_segments(js, keys, [meta], frozenset([meta["name"]]))
    assert "posts_only" not in got and [bytes(raw)[4:18] for _t, _i, raw in recs] == [b"\x02operationType"]


def test_parse_point():
    assert segments.parse_point({"t": 5, "i": 6}) == (5, 6)
    assert segments.parse_point([5, 6]) == (5, 6)
    assert segments.parse_point("2026-11-30T14:37:00Z") == (int(datetime.datetime(2026, 11, 30, 14, 37, tzinfo=datetime.timezone.utc)
                                                                .timestamp()), segments.MAX_INC)
    assert segments.parse_point("2026-11-30T16:37:00+02:00") == segments.parse_point("2026-11-30T14:37:00Z")
    assert segments.parse_point(datetime.datetime(2026, 11, 30, 14, 37)) == segments.parse_point("2026-11-30T14:37:00Z")
    for bad in ("yesterday", {"t": "x", "i": 1}, {"t": -1, "i": 0}, 12):
        with pytest.raises(PointNotRestorable):
            segments.parse_point(bad)


def test_ranges_plan_and_replay_every_point(env):
    tmp, _provider, js, keys, h = env
    base, images = build(env)
    again = snap(h, js, keys)
    assert again["cluster_time"] == snap(h, js, keys)["cluster_time"]  # an idle head: two snapshots at one cluster time
    ranges = segments.restorable_ranges(js, keys)
    assert ranges["gaps"] == []
    [r] = ranges["ranges"]
    assert (r["from"], r["to"]) == ({"t": T0, "i": 1}, {"t": T0 + 30, "i": 2})
    assert r["base_snapshots"][0] == base["snapshot_id"] and len(r["base_snapshots"]) == 3
    assert r["to_time"] == segments.ct_time((T0 + 29, 0))  # the last whole second covered: restorable as given
    assert segments.plan_point(js, keys, r["to_time"])["point"] == (T0 + 29, segments.MAX_INC)
    assert segments.plan_point(js, keys, r["from_time"])["point"] == (T0, segments.MAX_INC)
    names = [s["name"] for s in segments.list_segments(js)]
    assert len(names) == 3 and names[0].startswith(r["timeline"] + "/0000000001-%d.1-%d.3" % (T0, T0 + 10))
    for n, point in enumerate(sorted(images)):
        plan = segments.plan_point(js, keys, {"t": point[0], "i": point[1]})
        got, result = replayed(tmp, js, keys, images, plan, "r%d" % n)
        assert got == images[point], point
    # a point between two cluster times holds the earlier one's image; a time string means the end of that second
    plan = segments.plan_point(js, keys, (T0 + 12, 0))
    assert [s["seq"] for s in plan["segments"]] == [1, 2]
    assert replayed(tmp, js, keys, images, plan, "between")[0] == images[(T0 + 10, 3)]
    plan = segments.plan_point(js, keys, segments.ct_time((T0 + 5, 0)))
    assert replayed(tmp, js, keys, images, plan, "iso")[0] == images[(T0 + 5, 1)]
    for outside in ((T0 - 100, 0), (T0 + 31, 0)):
        with pytest.raises(PointNotRestorable) as e:
            segments.plan_point(js, keys, outside)
        assert (segments.ct_time((T0 + 29, 0)) if outside > (T0, 1) else segments.ct_time((T0, 1))) in str(e.value)


def test_chain_detects_missing_replaced_reordered_and_foreign(env, tmp_path):
    tmp, provider, js, keys, h = env
    _base, images = build(env)
    segs = segments.list_segments(js)
    paths = [os.path.join(str(tmp / "store"), "job1", "segments", s["name"]) for s in segs]
    plan = segments.plan_point(js, keys, (T0 + 30, 2))
    blobs = [open(p, "rb").read() for p in paths]

    # segment 2 re-sealed with other content under its own name (whoever holds the key): the chain breaks at 3
    key_id = "snapshot-1"
    fake = segments.seal_segment("job1", segs[1], crypto.compress(b""), key_id, keys.key(key_id), blobs[1][15:47])
    open(paths[1], "wb").write(fake)
    with pytest.raises(IntegrityError, match="segment %s does not chain" % segs[2]["name"]):
        replayed(tmp, js, keys, images, plan, "x1")
    # swapped contents between names: authentication fails naming the segment
    open(paths[1], "wb").write(blobs[2])
    with pytest.raises(IntegrityError, match="segment %s" % segs[1]["name"]):
        replayed(tmp, js, keys, images, plan, "x2")
    open(paths[1], "wb").write(blobs[1])
    # from another job (same keys, same name): refused
    other = store.JobStore(str(tmp / "store"), "job2")
    okeys = store.Keys(other, provider)
    okeys.epoch_for("mk1")
    foreign = segments.seal_segment("job2", segs[1], crypto.compress(b""), "snapshot-1", okeys.key("snapshot-1"),
                                    blobs[1][15:47])
    open(paths[1], "wb").write(foreign)
    with pytest.raises(IntegrityError, match="segment %s" % segs[1]["name"]):
        replayed(tmp, js, keys, images, plan, "x3")
    open(paths[1], "wb").write(blobs[1])
    # nothing was applied from a segment that failed: the head stops at the segment before
    # a removed segment: a gap naming it, and the points after it are refused
    os.unlink(paths[1])
    ranges = segments.restorable_ranges(js, keys)
    assert [(r["from"], r["to"]) for r in ranges["ranges"]] == [({"t": T0, "i": 1}, {"t": T0 + 10, "i": 3})]
    [gap] = ranges["gaps"]
    assert gap["reason"] == "segment %s/0000000002 is missing (removed from the store)" % segs[1]["timeline"]
    with pytest.raises(PointNotRestorable, match="latest restorable time before it is %s" % segments.ct_time((T0 + 9, 0))) as e:
        segments.plan_point(js, keys, (T0 + 25, 1))
    assert gap["reason"] in str(e.value)
    with pytest.raises(IntegrityError, match="segment %s is missing" % segs[1]["name"]):
        replayed(tmp, js, keys, images, plan, "x4")


def test_failed_segment_applies_nothing_of_it(env):
    tmp, _provider, js, keys, h = env
    _base, images = build(env)
    segs = segments.list_segments(js)
    path = os.path.join(str(tmp / "store"), "job1", "segments", segs[2]["name"])
    blob = bytearray(open(path, "rb").read())
    blob[-1] ^= 1
    open(path, "wb").write(bytes(blob))
    plan = segments.plan_point(js, keys, (T0 + 30, 2))
    r = make_head(str(tmp / "partial" / "head.db"), {NS: []}, key=os.urandom(32), cluster_time=(T0, 1))
    with r.write() as w:
        for ns, pairs in images[(T0, 1)].items():
            w.upsert_many(ns, pairs)
    with pytest.raises(IntegrityError, match=segs[2]["name"]):
        segments.replay(r, js, keys, plan)
    assert image(r) == images[(T0 + 20, 1)]  # segments 1 and 2 only


def test_new_timeline_after_clear_and_gap(env):
    tmp, _provider, js, keys, h = env
    build(env)
    with h.write() as w:  # a resync: the head is cleared, the timeline ends
        w.clear()
    assert h.segment_state()["timeline"] is None
    with h.write() as w:
        w.create_namespace(NS, bson.encode({}))
        w.set_position(b"t2", [T0 + 100, 1], True)
    capture(h, [ev("insert", T0 + 101, 1, 9, {"_id": 9})])  # starts timeline 2 at T0+100.1
    second = snap(h, js, keys)
    capture(h, [ev("insert", T0 + 102, 1, 10, {"_id": 10})])
    close_seal(h, js, keys)
    ranges = segments.restorable_ranges(js, keys)
    assert len(ranges["ranges"]) == 2 and ranges["ranges"][0]["timeline"] != ranges["ranges"][1]["timeline"]
    assert ranges["ranges"][1]["base_snapshots"] == [second["snapshot_id"]]
    assert ranges["ranges"][1]["from"] == {"t": T0 + 101, "i": 1}
    [gap] = ranges["gaps"]
    assert "new timeline" in gap["reason"] and gap["from"] == {"t": T0 + 30, "i": 2}
    with pytest.raises(PointNotRestorable, match="new timeline"):
        segments.plan_point(js, keys, (T0 + 50, 0))


def test_sealing_is_idempotent_and_nothing_plain_on_disk(env, monkeypatch):
    tmp, _provider, js, keys, h = env
    snap(h, js, keys)
    capture(h, [ev("insert", T0 + 5, 1, 1, {"_id": 1, CANARY: CANARY})])
    segments.close(h)
    # a crash between the put and the forget: the records stay, the next seal keeps the object in place
    monkeypatch.setattr(h, "segment_sealed", lambda *a: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        segments.seal_closed(h, js, keys, "mk1")
    [path] = [p for p in files_under(str(tmp / "store")) if "/segments/" in p]
    first = open(path, "rb").read()
    monkeypatch.undo()
    [sealed] = segments.seal_closed(h, js, keys, "mk1")
    assert open(path, "rb").read() == first and h.closed_segments() == [] and h.segment_state()["records"] == 0
    assert h.segment_chain(sealed["timeline"])[0] == 1
    h.checkpoint()
    assert canary_hits(str(tmp), CANARY) == []


def test_a_sealed_segment_s_records_are_freed_without_rewriting_them_and_secure_delete_stays_on(env):
    """The forget after a seal frees the records' pages without zeroing them (they stay the head key's ciphertext; the
    store keeps the same records sealed): zeroing wrote every freed page to the WAL again. Every other delete still
    zeroes what it frees."""
    _tmp, _provider, js, keys, h = env
    snap(h, js, keys)
    rnd = os.urandom
    capture(h, [ev("insert", T0 + 5, n, 100 + n, {"_id": 100 + n, "b": Binary(rnd(20000))}) for n in range(1, 101)])
    segments.close(h)
    wait_post_images_built(h)
    records = len(h.segment_frames(h.closed_segments()[0]["seg"])[0])
    assert records > 1_900_000  # incompressible: the records' pages hold about as much
    h.checkpoint()  # an empty WAL: what the seal writes is what it adds
    segments.seal_closed(h, js, keys, "mk1")
    wal = os.path.getsize(h.path + "-wal")
    assert wal < records // 4, "the seal wrote %d bytes to the WAL for %d bytes of records" % (wal, records)
    assert h._conn.execute("PRAGMA secure_delete").fetchone()[0] == 1  # pylint: disable=protected-access


def test_a_close_rewrites_none_of_the_segment_s_records(env):
    """The open segment's records carry its id from the start: closing it writes its seg_closed row and the state, not
    the records again (an UPDATE of their id rewrote every row: as many bytes of WAL as records)."""
    _tmp, _provider, js, keys, h = env
    snap(h, js, keys)
    capture(h, [ev("insert", T0 + 4, 1, 99, {"_id": 99})])
    before = segments.close(h)  # not sealed: the next segment's id takes a byte in its rows (an id 1 took none)
    capture(h, [ev("insert", T0 + 5, n, 100 + n, {"_id": 100 + n, "b": Binary(os.urandom(20000))}) for n in range(1, 101)])
    h.checkpoint()  # an empty WAL: what the close writes is what it adds
    seg = segments.close(h)
    records = len(h.segment_frames(seg)[0])
    assert records > 1_900_000
    wal = os.path.getsize(h.path + "-wal")
    assert wal < records // 4, "the close wrote %d bytes to the WAL for %d bytes of records" % (wal, records)
    capture(h, [ev("insert", T0 + 6, 1, 300, {"_id": 300})])  # the next segment's records are its own
    assert h.segment_state()["records"] == 1 and segments.close(h) == seg + 1
    assert [s["seg"] for s in h.closed_segments()] == [before, seg, seg + 1]
    assert len(h.segment_frames(seg)[0]) == records


def test_a_head_written_before_segment_ids_closes_its_open_records_into_the_next_segment(env):
    """A head whose open records were written without their segment's id (before they had one): a reader counts
    them and changes nothing; the next write gives them an id above every closed segment's."""
    _tmp, _provider, js, keys, h = env
    snap(h, js, keys)
    capture(h, [ev("insert", T0 + 5, 1, 1, {"_id": 1, CANARY: CANARY})])
    first = close_seal(h, js, keys)[0]
    capture(h, [ev("insert", T0 + 6, 1, 2, {"_id": 2})])
    closed = segments.close(h)  # closed, not sealed yet
    capture(h, [ev("insert", T0 + 7, 1, 3, {"_id": 3})])
    capture(h, [ev("insert", T0 + 8, 1, 4, {"_id": 4})])
    with h.write() as w:  # what such a head holds: open records without an id, no id counter
        w._c.execute("UPDATE seg_records SET seg=NULL WHERE seg<>?", (closed,))  # pylint: disable=protected-access
        w._c.execute("DELETE FROM meta WHERE name='seg_open'")  # pylint: disable=protected-access
    assert h.segment_state()["records"] == 2
    assert h._conn.execute("SELECT count(*) FROM seg_records WHERE seg IS NULL").fetchone()[0] == 2  # pylint: disable=protected-access
    seg = segments.close(h)
    assert seg == closed + 1
    recs = segments.decode_records(segments.decompress_frames(h.segment_frames(seg)[0]))
    assert [(t, i) for t, i, _raw in recs] == [(T0 + 7, 1), (T0 + 8, 1)]
    sealed = segments.seal_closed(h, js, keys, "mk1")
    assert [s["seq"] for s in sealed] == [first["seq"] + 1, first["seq"] + 2] and h.segment_state()["records"] == 0
    plan = segments.plan_point(js, keys, (T0 + 8, 1))
    assert [s["name"] for s in plan["segments"]] == [first["name"]] + [s["name"] for s in sealed]


_CAPTURE_FOR_EVER = r"""
import sys, bson
from bson import Timestamp
from bson.raw_bson import RawBSONDocument
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, segments
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.events import Applier
h = head.Head(sys.argv[1], bytes.fromhex(sys.argv[2]))
h.record_segments = True
t0, ap = int(sys.argv[3]), Applier()
n = h.position()["cluster_time"][0] - t0  # go on where the last run's committed position is
while True:
    for _ in range(3):
        rows = []
        with h.write() as w:
            for _ in range(20):
                n += 1
                raw = bson.encode({"_id": {"_data": "%08x" % n}, "operationType": "insert", "clusterTime": Timestamp(t0 + n, 1),
                                   "ns": {"db": "shop", "coll": "orders"}, "documentKey": {"_id": n},
                                   "fullDocument": {"_id": n, "pad": "p" * (n % 700)}})
                ap.apply(w, RawBSONDocument(raw))
                rows.append((t0 + n, 1, raw))
            ap.flush()
            w.log_records(rows)
            w.set_position(b"token", [t0 + n, 1], True)
        print(n, flush=True)
    segments.close(h)
"""


def test_a_capture_killed_at_random_moments_keeps_each_applied_event_in_one_segment_in_order(env):
    """A process applies and logs events, closing a segment every three transactions, and is killed (-9) at a random
    moment (after 0 to 0.4 s of capture), four times over on the same head, each run going on from where the head is.
    Every time: no record without a segment, the open segment's id above every closed one, and the records of the
    closed segments then the open one are exactly the events the head applied, once each, in order; the closed ones
    seal into one chain."""
    _tmp, _provider, js, keys, h = env
    snap(h, js, keys)
    path, key = h.path, h._key_hex  # pylint: disable=protected-access
    h.close()
    sealed = []
    for delay in (0.0, 0.03, 0.15, 0.4):  # where in its work each delay falls is up to the machine: a random moment
        child = subprocess.Popen([sys.executable, "-c", _CAPTURE_FOR_EVER, path, key, str(T0)], stdout=subprocess.PIPE,  # pylint: disable=consider-using-with
                                 env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        assert child.stdout.readline()  # a transaction committed: the kill falls inside the capture, not its start-up
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        h2 = head.Head(path, bytes.fromhex(key))
        try:
            c = h2._conn  # pylint: disable=protected-access
            applied = h2.position()["cluster_time"][0] - T0
            assert c.execute("SELECT count(*) FROM seg_records WHERE seg IS NULL").fetchone()[0] == 0
            closed = [row[0] for row in c.execute("SELECT seg FROM seg_closed ORDER BY seg")]
            open_id = c.execute("SELECT value FROM meta WHERE name='seg_open'").fetchone()[0]
            assert all(seg < open_id for seg in closed)
            assert {row[0] for row in c.execute("SELECT DISTINCT seg FROM seg_records")} <= set(closed) | {open_id}
            times = []
            for seg in closed + [open_id]:
                for (recs,) in c.execute("SELECT recs FROM seg_records WHERE seg=? ORDER BY pos", (seg,)):
                    times += [t - T0 for t, _i, _raw in segments.decode_records(crypto.decompress(recs))]
            already = sealed[-1]["to"][0] - T0 if sealed else 0
            assert times == list(range(already + 1, applied + 1))
            wait_post_images_built(h2)
            sealed += segments.seal_closed(h2, js, keys, "mk1")
            assert [s["seq"] for s in sealed] == list(range(1, len(sealed) + 1))
        finally:
            h2.close()
    assert len(sealed) >= 2


def test_a_seal_pass_on_the_sealers_thread_lets_the_capture_go_on_and_keeps_the_chain(env, monkeypatch):
    """segments.Sealer (the daemon's tick): while a pass is held inside the store's write, the capture applies and logs
    events and closes the next segment (the pass does not lock the head meanwhile); a failed pass's error comes out of
    collect and leaves its segment closed in the head for the next pass; the segments replay to every point."""
    tmp, _provider, js, keys, h = env
    snap(h, js, keys)
    images = {(T0, 1): image(h)}
    entered, release, put = threading.Event(), threading.Event(), js.storage.put_atomic

    def held_put(*args, **kwargs):
        entered.set()
        assert release.wait(30)
        return put(*args, **kwargs)
    monkeypatch.setattr(js.storage, "put_atomic", held_put)

    capture(h, [ev("insert", T0 + 5, 1, 1, {"_id": 1, "v": CANARY})])
    images[(T0 + 5, 1)] = image(h)
    segments.close(h)
    wait_post_images_built(h)
    sealer = segments.Sealer()
    keys.key(keys.epoch_for("mk1")[0])  # as the daemon: unwrapped on the capture's thread
    sealer.start(h, js, keys, "mk1")
    assert entered.wait(30) and sealer.busy() and sealer.collect(wait=False) is None
    with pytest.raises(RuntimeError, match="collect it first"):
        sealer.start(h, js, keys, "mk1")
    capture(h, [ev("update", T0 + 8, 1, 1, fields={"w": 1}), ev("insert", T0 + 8, 1, 2, {"_id": 2})])
    images[(T0 + 8, 1)] = image(h)
    assert segments.close(h) is not None and [c["seq"] for c in h.closed_segments()] == [1, 2]
    release.set()
    [first] = sealer.collect()
    assert first["seq"] == 1 and not sealer.busy() and [c["seq"] for c in h.closed_segments()] == [2]

    def full(*_args, **_kwargs):
        raise StoreError("the store is full")
    monkeypatch.setattr(js.storage, "put_atomic", full)
    wait_post_images_built(h)
    sealer.start(h, js, keys, "mk1")
    with pytest.raises(StoreError, match="full"):
        sealer.collect()
    assert [c["seq"] for c in h.closed_segments()] == [2] and not sealer.busy()
    monkeypatch.setattr(js.storage, "put_atomic", put)
    sealer.start(h, js, keys, "mk1")
    [second] = sealer.collect()
    sealer.close()
    assert second["seq"] == 2 and h.closed_segments() == [] and segments.restorable_ranges(js, keys)["gaps"] == []
    for n, point in enumerate(sorted(images)):
        plan = segments.plan_point(js, keys, {"t": point[0], "i": point[1]})
        assert replayed(tmp, js, keys, images, plan, "s%d" % n)[0] == images[point], point


def test_a_seal_pass_puts_the_segment_while_the_capture_holds_the_head(env, monkeypatch):
    """A pass reads the closed segments, the chain, the records and the post-images without the head's lock, so the
    segment reaches the store while the capture's transaction is open (it waited behind each of them before); it takes
    the lock once, after the put, to forget the records."""
    tmp, _provider, js, keys, h = env
    snap(h, js, keys)
    capture(h, [ev("insert", T0 + 5, 1, 1, {"_id": 1, "v": CANARY})])
    segments.close(h)
    wait_post_images_built(h)
    put, stored = js.storage.put_atomic, threading.Event()

    def put_and_tell(*args, **kwargs):
        put(*args, **kwargs)
        stored.set()
    monkeypatch.setattr(js.storage, "put_atomic", put_and_tell)
    keys.key(keys.epoch_for("mk1")[0])
    sealer = segments.Sealer()
    with h.write() as w:  # the capture's transaction, held open
        w.upsert(NS, rawbson.id_key_from_value(2), bson.encode({"_id": 2}))
        sealer.start(h, js, keys, "mk1")
        assert stored.wait(30), "the pass did not reach the store while the capture held the head"
        assert sealer.collect(wait=False) is None  # it waits for the lock to forget the records
    [sealed] = sealer.collect()
    assert sealed["seq"] == 1 and h.closed_segments() == [] and h.segment_state()["records"] == 0
    assert [p for p in files_under(str(tmp / "store")) if "/segments/" in p]


def test_a_cut_read_while_a_seal_pass_moves_the_chain_names_a_sealed_segment(env, monkeypatch):
    """cut_segment (what a snapshot records, and the status's sealed_to) read on the capture's thread while the sealer's
    pass seals the next segment between its reads of the chain and of the closed segments: it still names the last
    segment it saw sealed, with its stored object's digest and its end, never None."""
    _tmp, _provider, js, keys, h = env
    snap(h, js, keys)
    for n in (1, 2, 3):
        capture(h, [ev("insert", T0 + 5 * n, 1, n, {"_id": n})])
        if n == 1:
            close_seal(h, js, keys)
        else:
            segments.close(h)
    wait_post_images_built(h)
    second, third = h.closed_segments()
    read_chain, passes = h.segment_chain, []

    def chain_then_a_pass(timeline):
        link = read_chain(timeline)
        if not passes:  # the pass seals the second segment (the third's post-images are "still being built")
            passes.append(None)
            with monkeypatch.context() as m:
                m.setattr(h, "segment_chain", read_chain)
                m.setattr(h, "post_images_pending", lambda seg: seg == third["seg"])
                passes[0] = segments.seal_closed(h, js, keys, "mk1", wait=False)
        return link
    monkeypatch.setattr(h, "segment_chain", chain_then_a_pass)
    cut = segments.cut_segment(h)
    assert [[s["seq"] for s in p] for p in passes] == [[2]] and [c["seq"] for c in h.closed_segments()] == [3]
    [first] = [s for s in segments.list_segments(js) if s["seq"] == 1]
    digest = hashlib.sha256(js.storage.get(segments.segment_path(js, first))).hexdigest()
    assert cut == {"timeline": second["timeline"], "seq": 1, "to": list(second["from"]), "sha256": digest}, cut
    monkeypatch.undo()
    assert segments.cut_segment(h)["seq"] == 2


def test_not_consistent_head_does_not_close_or_start(env):
    tmp, _provider, js, keys, h = env
    with h.write() as w:
        w.set_position(b"x", [T0, 1], False)
    capture(h, [ev("insert", T0 + 1, 1, 1, {"_id": 1})], consistent=False)
    assert h.segment_state()["timeline"] is None  # no range can start at a head that is not consistent
    with h.write() as w:
        w.set_position(b"x", [T0 + 1, 1], True)
    capture(h, [ev("insert", T0 + 2, 1, 2, {"_id": 2})], consistent=False)  # inside a run of one cluster time
    assert segments.close(h) is None
    capture(h, [ev("insert", T0 + 3, 1, 3, {"_id": 3})])
    assert segments.close(h) is not None


def test_collect_keeps_the_window(env):
    tmp, _provider, js, keys, h = env
    build(env)
    later = datetime.datetime.fromtimestamp(time.time() + 3 * 3600, datetime.timezone.utc)
    # the only snapshot starts the range covering the window: everything after it is kept
    assert segments.collect(js, keys, 1, now=later, grace_seconds=0)["segments_deleted"] == 0
    snap(h, js, keys)  # a snapshot at T0+30.2, still before the window's start
    assert segments.collect(js, keys, 1, now=later, grace_seconds=0)["segments_deleted"] == 3
    capture(h, [ev("insert", T0 + 40, 1, 7, {"_id": 7})])
    close_seal(h, js, keys)
    assert segments.collect(js, keys, 0, now=later, grace_seconds=3600 * 24)["segments_deleted"] == 0  # grace
    assert segments.collect(js, keys, 0, now=later, grace_seconds=0)["segments_deleted"] == 1


def test_corrections_between_events_replay_after_a_snapshot_at_that_time(env):
    """A heal made after a snapshot at P, while the head is still at P, is tagged P in the segment starting at P: a
    replay from that snapshot applies it; a "refresh" record feeds the replayed event's Applier."""
    tmp, _provider, js, keys, h = env
    capture(h, [ev("insert", T0 + 5, 1, 1, {"_id": 1, "v": "stale"})])
    base = snap(h, js, keys)
    assert segments.close(h) is not None  # the daemon closes at every snapshot
    healed = bson.encode({"_id": 1, "v": "healed"})
    key1 = RawBSONDocument(healed)["_id"]
    ik = rawbson.id_key_from_document(bson.encode({"_id": key1}))
    with h.write() as w:
        w.upsert(NS, ik, healed)
        w.create_namespace("shop.other", bson.encode({}))
        w.log_records([(None, None, segments.correction("doc", NS, ik, healed)),
                       (None, None, segments.correction("ns", "shop.other", info={"options": bson.encode({}),
                                                                                  "indexes": [], "uuid": None}))])
    assert segments.close(h) is None  # the head has not moved past P: the heal stays in the open segment
    capture(h, [ev("insert", T0 + 6, 1, 2, {"_id": 2})])
    segments.close(h)
    segments.seal_closed(h, js, keys, "mk1")
    want = image(h)
    plan = segments.plan_point(js, keys, (T0 + 6, 1))
    assert plan["snapshot"]["snapshot_id"] == base["snapshot_id"]
    got, result = replayed(tmp, js, keys, {(T0 + 5, 1): image_at_snapshot(js, keys, base)}, plan, "heal")
    assert got == want and result["records"] == 3
    with pytest.raises(PointNotRestorable):
        segments.plan_point(js, keys, (T0 + 7, 0))


def image_at_snapshot(js, keys, entry):
    m = js.read_manifest(entry["snapshot_id"], keys, entry["manifest_sha256"])
    out = {}
    for n in m["namespaces"]:
        docs = b"".join(js.read_chunk(c, keys) for c in n["chunks"])
        out[n["ns"]] = [(rawbson.id_key_from_document(d), d) for d in rawbson.split_bson_docs(docs)]
    return out


def test_job_options_checked_and_written_only_when_not_default():
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import job_config
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError
    assert job_config.normalize_point_in_time({"point_in_time_window_hours": 24, "point_in_time_segment_seconds": 60}) == {}
    assert job_config.normalize_point_in_time({"point_in_time_window_hours": 0, "point_in_time_segment_seconds": 5}) == {
        "point_in_time_window_hours": 0, "point_in_time_segment_seconds": 5}
    for bad in ({"point_in_time_window_hours": -1}, {"point_in_time_segment_seconds": 0},
                {"point_in_time_segment_seconds": "10"}, {"point_in_time_window_hours": True}):
        with pytest.raises(ConfigError, match=list(bad)[0]):
            job_config.normalize_point_in_time(bad)


def test_a_snapshot_vouches_for_the_segments_before_its_cut(env):
    """Each catalog entry records the last sealed segment at its cut (MAC'ed): segments removed from the newest end back
    past it are named; after the newest snapshot nothing vouches for them (a shorter range); retention is no removal."""
    _tmp, _provider, js, keys, h = env
    base, _images = build(env)
    assert "segment" not in base  # none sealed at the job's first cut: the field is absent
    later = snap(h, js, keys)
    cut = later["segment"]
    segs = segments.list_segments(js)
    path = lambda s: segments.segment_path(js, s)  # noqa: E731
    assert (cut["seq"], cut["to"], cut["timeline"]) == (3, [T0 + 30, 2], segs[2]["timeline"])
    assert cut["sha256"] == hashlib.sha256(js.storage.get(path(segs[2]))).hexdigest()
    capture(h, [ev("insert", T0 + 40, 1, 7, {"_id": 7})])
    close_seal(h, js, keys)
    segs = segments.list_segments(js)
    saved = {s["seq"]: bytes(js.storage.get(path(s))) for s in segs}

    # the record is authenticated with the entry
    entry_path = js._p("catalog", later["snapshot_id"] + ".json")
    entry = js.storage.get(entry_path)
    js.storage.put_atomic(entry_path, entry.replace(b'"seq":3', b'"seq":2'))
    with pytest.raises(IntegrityError, match="catalog entry %s" % later["snapshot_id"]):
        segments.restorable_ranges(js, keys)
    js.storage.put_atomic(entry_path, entry)

    # the newest segments removed back past the later snapshot's cut: named, for the ranges and for a plan
    for s in segs[2:]:
        js.storage.delete(path(s))
    named = "segment %s/0000000003 is missing" % cut["timeline"]
    with pytest.raises(IntegrityError, match=named):
        segments.restorable_ranges(js, keys)
    with pytest.raises(IntegrityError, match=named):
        segments.plan_point(js, keys, (T0 + 12, 0))
    js.storage.put_atomic(path(segs[2]), saved[3])
    # only after the newest snapshot: the range ends at its cut, documented
    ranges = segments.restorable_ranges(js, keys)["ranges"]
    assert ranges[-1]["to"] == {"t": T0 + 30, "i": 2}
    js.storage.put_atomic(path(segs[3]), saved[4])
    # a plan from the later snapshot links to its recorded digest
    plan = segments.plan_point(js, keys, (T0 + 40, 1))
    assert plan["segments"][0]["seq"] == 4 and plan["segments"][0]["prev_sha256"] == cut["sha256"]
    # retention removes the oldest first: the cut's segment gone with every earlier one is no removal
    for s in segs[:3]:
        js.storage.delete(path(s))
    assert segments.restorable_ranges(js, keys)["ranges"][-1]["to"] == {"t": T0 + 40, "i": 1}


def test_the_frame_walk_finds_every_frame_of_any_zstd_stream_and_refuses_a_cut_one():
    import zstandard
    parts = [zstandard.ZstdCompressor(**kw).compress(data)
             for kw in ({}, {"write_checksum": True}, {"write_content_size": False}, {"level": -1}, {"level": 19})
             for data in (b"", b"x" * 10, os.urandom(300_000), b"ab" * 300_000)]  # raw, RLE and compressed blocks
    streaming = zstandard.ZstdCompressor().compressobj()
    parts.append(streaming.compress(os.urandom(200_000) + b"z" * 200_000) + streaming.flush())  # no content size
    parts.append(segments.post_trailer(7))  # a skippable frame
    stream = b"".join(parts)
    assert segments._frame_starts(stream) == [sum(len(p) for p in parts[:k]) for k in range(len(parts))]
    assert segments._frame_starts(stream[:-1]) is None and segments._frame_starts(stream + b"\x00") is None
