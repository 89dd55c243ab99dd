"""Unit tests of the head database and the order-preserving _id keys (real SQLCipher, no server)."""
import datetime
import glob
import itertools
import os
import random
import struct
import threading
import time
import uuid

import bson
import pytest
from bson import Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary, UuidRepresentation

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, rawbson

OPTS = bson.CodecOptions(uuid_representation=UuidRepresentation.STANDARD)
CANARY = "zqxCANARY7731"


def key(v):
    return rawbson.id_key_from_document(bson.encode({"_id": v}, codec_options=OPTS))


# Strictly increasing in MongoDB's comparison order (equal values of different numeric types are
# ordered by type tag int32 < int64 < double < decimal128, then raw bytes).
ORDERED = [
    MinKey(), None, float("nan"), float("-inf"), Decimal128("-1E+400"), -2 ** 63, -1.5, -1, Int64(-1), -0.5,
    0, Int64(0), 0.0, Decimal128("0.00"), 1e-300, 0.1, 1, Int64(1), 1.0, Decimal128("1.0"), Decimal128("1.00"), 1.5,
    2 ** 31 - 1, 2 ** 31, 2 ** 53, Int64(2 ** 53 + 1), 2.0 ** 63, 1e300, Decimal128("1E+400"), float("inf"),
    "", "A", "a", "a\x00", "a\x00b", "ab", "b", "é", "\U0001F600",
    {}, {"a": 1}, {"a": 1, "b": 1}, {"a": 2}, {"b": 0}, {"a": "x"},  # element type before name, as MongoDB
    [], [1], [1, 2], [2],
    Binary(b"", 0), Binary(b"a", 0), Binary(b"a", 5), Binary(b"ab", 0), uuid.UUID(int=1), uuid.UUID(int=2),
    ObjectId(b"\x00" * 12), ObjectId(b"\x00" * 11 + b"\x01"), ObjectId(b"\xff" * 12),
    False, True,
    datetime.datetime(1960, 1, 1), datetime.datetime(1970, 1, 1), datetime.datetime(2020, 1, 1),
    Timestamp(1, 2), Timestamp(2, 0), Timestamp(2 ** 32 - 1, 0),
    Regex("a", "i"), Regex("b", ""),
    Code("f()"), Code("f()", {"x": 1}),
    MaxKey(),
]


def test_id_key_order_follows_mongodb_comparison_order():
    keys = [key(v) for v in ORDERED]
    for (a, va), (b, vb) in itertools.pairwise(zip(keys, ORDERED, strict=True)):
        assert a < b, (va, vb)


def test_id_key_is_injective_and_orders_numbers_like_python():
    rnd = random.Random(7)
    ints = [rnd.randint(-2 ** 63, 2 ** 63 - 1) for _ in range(3000)] + [rnd.randint(-1000, 1000) for _ in range(300)]
    doubles = [rnd.uniform(-1e6, 1e6) for _ in range(2000)] + [struct.unpack("<d", os.urandom(8))[0] for _ in range(2000)]
    doubles = [d for d in doubles if d == d]
    small = sorted({i for i in ints if -2 ** 31 <= i < 2 ** 31})  # int32; bson encodes the rest as int64
    values = small + [Int64(i) for i in small] + [Int64(i) for i in set(ints) if i not in small] + sorted(set(doubles))
    keys = [key(v) for v in values]
    assert len(set(keys)) == len(keys)
    nums = sorted(set(ints) | set(doubles))
    nkeys = [key(float(n)) if isinstance(n, float) else key(n) for n in nums]
    assert nkeys == sorted(nkeys)
    alphabet = "a\x00bZ\u00e9\u4e2d\U0001F600"
    strings = sorted({"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 6))) for _ in range(500)}, key=lambda s: s.encode())
    skeys = [key(s) for s in strings]
    assert skeys == sorted(skeys) and len(set(skeys)) == len(skeys)
    oids = [ObjectId() for _ in range(200)]
    assert [key(o) for o in sorted(oids)] == sorted(key(o) for o in oids)
    dates = sorted(datetime.datetime(1900, 1, 1) + datetime.timedelta(seconds=rnd.randint(0, 10 ** 10)) for _ in range(300))
    assert [key(d) for d in dates] == sorted(key(d) for d in dates)


def test_id_key_from_document_finds_id_anywhere_and_matches_value_forms():
    oid = ObjectId()
    first = bson.encode({"_id": oid, "a": 1})
    later = bson.encode({"a": [1, {"b": "x"}], "r": Regex("x"), "_id": oid})
    assert rawbson.id_key_from_document(first) == rawbson.id_key_from_document(later) == rawbson.id_key_from_value(oid) == b"\x35" + oid.binary
    raw = bson.raw_bson.RawBSONDocument(bson.encode({"_id": {"k": 1, "s": "v"}, "shard": 3}))
    assert rawbson.id_key_from_value(raw) == rawbson.id_key_from_value({"k": 1, "s": "v"})
    assert rawbson.id_key(struct.pack("<i", 5), 0x10) == key(5)
    with pytest.raises(head.HeadError):
        rawbson.id_key_from_document(bson.encode({"a": 1}))


@pytest.fixture
def enc_head(tmp_path):
    h = head.Head(str(tmp_path / "h" / "head.db"), os.urandom(32))
    yield h
    h.close()


def doc(i, **extra):
    return bson.encode(dict({"_id": i, "v": i}, **extra))


def test_write_read_scan_and_namespaces(enc_head):
    opts = bson.encode({"capped": False})
    with enc_head.write() as w:
        w.create_namespace("db.a", opts, uuid=b"u" * 16)
        w.upsert_many("db.a", [(key(i), doc(i)) for i in (5, 1, 3)])
        w.upsert("db.b", key("x"), doc("x"))  # implicit creation
        w.set_indexes("db.a", [bson.encode({"v": 2, "key": {"_id": 1}, "name": "_id_"}),
                               bson.encode({"v": 2, "key": {"x": 1}, "name": "x_1", "unique": True})])
        w.set_position(b"token", (10, 2), True)
    with enc_head.read() as r:
        assert [bson.decode(d)["_id"] for _, d in r.scan("db.a")] == [1, 3, 5]
        assert [bson.decode(d)["_id"] for _, d in r.scan("db.a", start=key(3), end=key(5))] == [3]
        ns = {n["ns"]: n for n in r.namespaces()}
        assert set(ns) == {"db.a", "db.b"}
        assert ns["db.a"]["options"] == opts and ns["db.a"]["uuid"] == b"u" * 16 and ns["db.b"]["options"] == rawbson.EMPTY_BSON
        assert [bson.decode(s)["name"] for s in ns["db.a"]["indexes"]] == ["_id_", "x_1"]
        assert r.position()["cluster_time"] == [10, 2] and r.position()["consistent"]
        assert r.get("db.a", key(3)) == doc(3) and r.get("db.a", key(4)) is None and r.count("db.a") == 3
        assert r.namespace("db.a") == ns["db.a"] and r.namespace("db.none") is None
        assert r.first_key("db.a") == key(1) and r.first_key("db.a", start=key(2)) == key(3)
        assert r.first_key("db.a", start=key(6)) is None and r.first_key("db.none") is None
    assert enc_head.position()["resume_token"] == b"token"


def test_rename_drop_and_incarnation(enc_head):
    with enc_head.write() as w:
        w.upsert("d1.a", key(1), doc(1))
        w.upsert("d1.b", key(2), doc(2))
        w.upsert("d2.c", key(3), doc(3))
    inc = {n["ns"]: n["incarnation"] for n in enc_head_namespaces(enc_head)}
    with enc_head.write() as w:
        assert w.rename("d1.a", "d2.b")  # cross-database rename
        assert not w.rename("d1.zz", "d2.zz")  # idempotent: source already gone
        assert w.rename("d1.b", "d2.c")  # onto an existing target: dropped first
    after = {n["ns"]: n["incarnation"] for n in enc_head_namespaces(enc_head)}
    assert set(after) == {"d2.b", "d2.c"} and after["d2.b"] > max(inc.values()) and after["d2.c"] != inc["d2.c"]
    with enc_head.read() as r:
        assert [k for k, _ in r.scan("d2.c")] == [key(2)]
    with enc_head.write() as w:
        assert w.drop_database("d2") == 2
        w.upsert("d2.c", key(9), doc(9))
    assert [n["ns"] for n in enc_head_namespaces(enc_head)] == ["d2.c"]
    with enc_head.read() as r:
        assert r.count("d2.c") == 1


def enc_head_namespaces(h):
    with h.read() as r:
        return r.namespaces()


def test_rollback_on_error_keeps_nothing(enc_head):
    with pytest.raises(RuntimeError):
        with enc_head.write() as w:
            w.upsert("db.a", key(1), doc(1))
            w.set_position(b"t", (1, 1), True)
            raise RuntimeError("boom")
    with enc_head.read() as r:
        assert r.count("db.a") == 0 and r.namespaces() == [] and r.position()["resume_token"] is None
    with enc_head.write() as w:  # the namespace cache was reset with the rollback
        w.upsert("db.a", key(1), doc(1))
    with enc_head.read() as r:
        assert r.count("db.a") == 1


def test_read_transaction_is_a_stable_image_while_writing(enc_head):
    with enc_head.write() as w:
        w.upsert_many("db.a", [(key(i), doc(i)) for i in range(1000)])
        w.set_position(b"t1", (1, 0), True)
    stop = threading.Event()

    def writer():
        n = 1000
        while not stop.is_set():
            with enc_head.write() as w:
                w.upsert("db.a", key(n), doc(n))
                w.delete("db.a", key(n - 1000))
                w.set_position(b"t%d" % n, (n, 0), True)
            n += 1

    t = threading.Thread(target=writer)
    with enc_head.read() as r:
        t.start()
        try:
            for _ in range(3):
                ids = [k for k, _ in r.scan("db.a")]
                assert ids == sorted(key(i) for i in range(1000))
                assert r.position()["cluster_time"] == [1, 0]
        finally:
            stop.set()
            t.join()
    assert enc_head.position()["cluster_time"][0] > 1


def test_mark_snapshotted_forgets_only_what_the_snapshot_covered(enc_head):
    with enc_head.write() as w:
        w.upsert_many("db.a", [(key(i), doc(i)) for i in range(5)])
    with enc_head.read() as r:
        seq = r.change_seq
        assert r.changed("db.a") == sorted(key(i) for i in range(5))
    with enc_head.write() as w:  # after the snapshot's image: must survive the mark
        w.upsert("db.a", key(2), doc(2, x=1))
        w.delete("db.a", key(4))
        assert not w.delete("db.a", key(99))
    enc_head.mark_snapshotted(seq)
    with enc_head.read() as r:
        assert r.changed("db.a") == [key(2), key(4)]
        seq2 = r.change_seq
    assert seq2 > seq
    enc_head.mark_snapshotted(seq2)
    with enc_head.read() as r:
        assert r.changed("db.a") == [] and r.change_seq == seq2


def test_reopen_persists_and_wrong_key_is_refused(tmp_path):
    path = str(tmp_path / "head.db")
    k = os.urandom(32)
    with head.Head(path, k) as h:
        with h.write() as w:
            w.upsert("db.a", key(1), doc(1))
            w.set_sync_state({"phase": "clone"})
    with head.Head(path, k) as h:
        assert h.position()["sync"] == {"phase": "clone"}
        with h.read() as r:
            assert r.get("db.a", key(1)) == doc(1)
    with pytest.raises(head.HeadError, match="cannot be read with this job's key"):
        head.Head(path, os.urandom(32))
    with pytest.raises(head.HeadError, match="32 bytes"):
        head.Head(path, b"short")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600" and oct(os.stat(str(tmp_path)).st_mode & 0o777)


def test_unencrypted_head_same_schema(tmp_path):
    path = str(tmp_path / "plain" / "head.db")
    with head.Head(path, None) as h:
        with h.write() as w:
            w.upsert("db." + CANARY, key(CANARY), doc(CANARY))
        h.checkpoint()
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(b"SQLite format 3") and CANARY.encode() in data
    assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == "0o700"


def test_encrypted_head_has_no_plaintext_canary(tmp_path):
    folder = tmp_path / "enc"
    h = head.Head(str(folder / "head.db"), os.urandom(32))
    big = (CANARY + " ") * 5000
    with h.write() as w:
        w.create_namespace("db_%s.coll_%s" % (CANARY, CANARY), bson.encode({"comment": CANARY}))
        w.set_indexes("db_%s.coll_%s" % (CANARY, CANARY), [bson.encode({"v": 2, "key": {CANARY: 1}, "name": CANARY})])
        w.upsert_many("db_%s.coll_%s" % (CANARY, CANARY), [(key("%s-%d" % (CANARY, i)), doc("%s-%d" % (CANARY, i), t=big))
                                                           for i in range(200)])
        w.set_position(CANARY.encode(), (1, 1), True)
    with h.read() as r:  # a reader open while the WAL still holds the pages
        assert r.count("db_%s.coll_%s" % (CANARY, CANARY)) == 200
        files = glob.glob(str(folder / "*"))
        assert any(f.endswith("-wal") for f in files)
        for f in files:
            with open(f, "rb") as fh:
                data = fh.read()
            assert CANARY.encode() not in data and CANARY.encode("utf-16-le") not in data, f
    h.checkpoint()
    h.close()
    for f in glob.glob(str(folder / "*")):
        with open(f, "rb") as fh:
            assert CANARY.encode() not in fh.read()
    assert all(oct(os.stat(f).st_mode & 0o777) == "0o600" for f in glob.glob(str(folder / "*")))


@pytest.mark.parametrize("crash", ["before_key_record", "after_key_record", "after_head_moved", "none"])
def test_rekey_export_and_crash_recovery(tmp_path, crash):
    """The rekey of a head (daemon._rekey_head): the export under a new key holds every row; a crash at any
    step leaves a head that opens with exactly one key, the one its key record names (daemon._finish_rekey)."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import daemon, files
    old_key, new_key = os.urandom(32), os.urandom(32)
    folder = tmp_path / "heads" / "job" / "1"
    h = head.Head(str(folder / "head.db"), old_key)
    docs = [(rawbson.id_key_from_value(i), bson.encode({"_id": i, "pad": "x" * 200})) for i in range(5000)]
    with h.write() as w:
        w.upsert_many("d.c", docs)
        w.set_position(b"\x05\x00\x00\x00\x00", (1760000000, 7), True)
    files.write_json(str(folder / "headkey.json"), {"which": "old"})
    rk = folder / daemon.REKEY_DIR
    rk.mkdir(mode=0o700)
    seen = []
    h.export_rekeyed(str(rk / "head.db"), new_key, lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] > 0 and seen[-1][1] > 0
    if crash != "before_key_record":
        files.write_json(str(rk / "headkey.json"), {"which": "new"})
    h.close()
    if crash == "after_head_moved":
        os.replace(str(rk / "head.db"), str(folder / "head.db"))
    daemon._finish_rekey(str(folder))  # pylint: disable=protected-access
    assert not rk.exists()
    which = files.read_json(str(folder / "headkey.json"))["which"]
    assert which == ("old" if crash == "before_key_record" else "new")
    good, bad = (old_key, new_key) if which == "old" else (new_key, old_key)
    with pytest.raises(head.HeadError):
        head.Head(str(folder / "head.db"), bad)
    with head.Head(str(folder / "head.db"), good) as h2, h2.read() as r:
        assert list(r.scan("d.c")) == sorted(docs)
        assert r.position()["cluster_time"] == [1760000000, 7] and r.position()["consistent"]
    assert oct(os.stat(folder / "head.db").st_mode & 0o777) == "0o600"


def wait_until(predicate, seconds=10):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.001)


def test_a_thread_waiting_for_the_head_gets_it_before_the_writer_s_next_transaction(enc_head):
    """threading.RLock let the writer take the lock back at once after each commit, so a status read or a seal pass
    waited behind a run of back-to-back transactions (2.2 s of a 3 s run of benchmarks/pitr.py); now it waits for the
    one in progress only."""
    h = enc_head
    order = []
    with h.write() as w:  # a transaction of the capture
        w.upsert("d.c", rawbson.id_key_from_value(1), bson.encode({"_id": 1}))
        reader = threading.Thread(target=lambda: (h.position(), order.append("reader")))
        reader.start()
        wait_until(lambda: len(getattr(h._lock, "_queue", ())) == 1)  # the reader waits for the lock
    with h.write() as w:  # the capture's next transaction, asked for at once
        order.append("writer")
        w.upsert("d.c", rawbson.id_key_from_value(2), bson.encode({"_id": 2}))
    reader.join(10)
    assert order == ["reader", "writer"]


def test_a_waiter_interrupted_leaves_the_line(enc_head):
    """A thread interrupted while it waits (a signal handler raising in it) must not keep its place: the threads
    behind it would wait for ever."""
    h = enc_head
    lock = h._lock  # pylint: disable=protected-access
    lock.acquire()
    failed = []

    def interrupted():
        def boom():
            raise KeyboardInterrupt
        lock._cond.wait = lambda *a: boom()  # pylint: disable=protected-access  # the wait raises, as a signal handler's exception
        try:
            lock.acquire()
        except KeyboardInterrupt:
            failed.append(True)
    t = threading.Thread(target=interrupted)
    t.start()
    t.join(10)
    del lock._cond.wait  # pylint: disable=protected-access
    lock.release()
    got = threading.Event()
    other = threading.Thread(target=lambda: (h.position(), got.set()))
    other.start()
    other.join(10)
    assert failed and got.is_set() and not lock._queue  # pylint: disable=protected-access
