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
