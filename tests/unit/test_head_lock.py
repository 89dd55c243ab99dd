"""The head's lock is granted in the order it was asked for (a real SQLCipher head)."""
import os
import threading
import time

import bson
import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, rawbson


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
    waited behind a run of back-to-back transactions (2.2 s of a 3 s run of benchmarks/pitr.py); now it waits for the
    one in progress only."""
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


def test_a_waiter_interrupted_leaves_the_line(h):
    """A thread interrupted while it waits (a signal handler raising in it) must not keep its place: the threads
    behind it would wait for ever."""
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
