"""The head's lock is granted in the order it was asked for, and the capture gives way at its next cluster-time
boundary while another thread waits (real SQLCipher heads; the change events are played to source.Capture from a list,
no server: the namespace exists, so the applier asks the source nothing)."""
import os
import threading
import time

import bson
import pytest
from bson import Timestamp
from bson.raw_bson import RawBSONDocument

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, rawbson, source


@pytest.fixture
def h(tmp_path):
    hd = head.Head(str(tmp_path / "h" / "head.db"), os.urandom(32))
    yield hd
    hd.close()


def wait_until(predicate, seconds=10):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.001)


def test_a_thread_waiting_for_the_head_gets_it_before_the_writer_s_next_transaction(h):
    """threading.RLock let the writer take the lock back at once after each commit, so a status read or a seal pass
    waited behind a run of back-to-back transactions; now it waits for the one in progress only."""
    order = []
    with h.write() as w:  # a transaction of the capture
        w.upsert("d.c", rawbson.id_key_from_value(1), bson.encode({"_id": 1}))
        reader = threading.Thread(target=lambda: (h.position(), order.append("reader")))
        reader.start()
        wait_until(h.wanted)
        time.sleep(0.05)  # the reader is blocked on the lock
    with h.write() as w:  # the capture's next transaction, asked for at once
        order.append("writer")
        w.upsert("d.c", rawbson.id_key_from_value(2), bson.encode({"_id": 2}))
    reader.join(10)
    assert order == ["reader", "writer"]


def test_wanted_says_whether_another_thread_waits(h):
    assert not h.wanted()
    got = threading.Event()
    with h.write():
        t = threading.Thread(target=lambda: (h.position(), got.set()))
        t.start()
        wait_until(h.wanted)
        assert h.wanted() and not got.is_set()
    t.join(10)
    assert got.is_set() and not h.wanted()


class ListStream:
    """A change stream's try_next over a list; calls hook(n) before handing out event n."""

    def __init__(self, evs, hook):
        self.evs, self.hook, self.n, self.resume_token = evs, hook, 0, None

    def try_next(self):
        if self.n >= len(self.evs):
            return None
        self.hook(self.n)
        self.n += 1
        return self.evs[self.n - 1]


def insert_event(n):
    return RawBSONDocument(bson.encode({
        "_id": {"_data": "%08d" % n}, "operationType": "insert", "clusterTime": Timestamp(100 + n, 1),
        "ns": {"db": "d", "coll": "c"}, "documentKey": {"_id": n}, "fullDocument": {"_id": n, "v": "x" * 100}}))


def test_capture_commits_at_the_next_boundary_while_another_thread_waits(h):
    with h.write() as w:
        w.upsert("d.c", rawbson.id_key_from_value(-1), bson.encode({"_id": -1}))
        w.set_position(bson.encode({"_data": "start"}), (99, 1), True)
    waiter, got = [], []

    def hook(n):
        if n == 50:  # inside the capture's first transaction: a status read asks for the head
            waiter.append(threading.Thread(target=lambda: got.append(h.position())))
            waiter[0].start()
            wait_until(h.wanted)
    cap = source.Capture(h, client=None, max_batch_events=100000, max_batch_seconds=3600)
    stream = ListStream([insert_event(n) for n in range(500)], hook)
    first, more = cap._one_transaction(stream, time.monotonic() + 3600)  # pylint: disable=protected-access
    waiter[0].join(10)
    # event 50 (a later cluster time) proved event 49 complete: the capture committed the 50 before it (not the 500 its
    # limits allow), then the waiter read the head, at a consistent position
    assert more and first == 50
    assert got and tuple(got[0]["cluster_time"]) == (149, 1) and got[0]["consistent"]
    total = first
    while more:
        n, more = cap._one_transaction(stream, time.monotonic() + 3600)  # pylint: disable=protected-access
        total += n
    assert total == 500
    with h.read() as r:
        assert r.count("d.c") == 501
    assert tuple(h.position()["cluster_time"]) == (599, 1)
