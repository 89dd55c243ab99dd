"""pitr_replay._Sender, the replay process's output: it takes messages without waiting for the parent to read them (up
to its limit), so the child replays the next ranges while the parent restores untouched chunks; what it writes is
every message, whole and in order; a parent that went away is reported at the next send. Real pipes."""
import os
import threading

import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import pitr_replay


def _drain(fd, out):
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            return
        out.append(data)


def test_messages_beyond_the_pipes_capacity_are_taken_at_once_and_arrive_whole_and_in_order():
    r, w = os.pipe()
    sender = pitr_replay._Sender(w, 64 << 20)  # pylint: disable=protected-access
    messages = [os.urandom(1000 + k) for k in range(2000)]  # about 3 MB: far more than a pipe holds (64 KiB)
    for m in messages:
        sender.send(m)  # nobody reads yet: a blocking write would hang here
    got = []
    reader = threading.Thread(target=_drain, args=(r, got))
    reader.start()
    sender.close()
    reader.join()
    os.close(r)
    assert b"".join(got) == b"".join(messages)


def test_past_its_limit_a_send_waits_for_the_parent_and_a_parent_gone_is_raised():
    r, w = os.pipe()
    sender = pitr_replay._Sender(w, 1 << 20)  # pylint: disable=protected-access
    blocked, raised = threading.Event(), []

    def fill():
        try:
            for _k in range(40):  # 40 MiB against a 1 MiB limit: the sends must wait
                sender.send(b"x" * (1 << 20))
        except BrokenPipeError as e:
            raised.append(e)
        blocked.set()
    t = threading.Thread(target=fill, daemon=True)
    t.start()
    assert not blocked.wait(1.0) and sender.queued <= (2 << 20)  # held back, not queued whole
    os.close(r)  # the parent goes away
    t.join(10)
    assert not t.is_alive() and raised  # woken by the failed write, which its send raised
    with pytest.raises(BrokenPipeError):
        sender.send(b"more")
    with pytest.raises(BrokenPipeError):
        sender.close()
