"""Cluster times from resume tokens and the daemon's snapshot wait budget (no server needed; the integration tests in
tests/integration/test_source_time.py use SecantusDB's real tokens)."""
import struct
import time

import bson
from bson import Timestamp

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import daemon, events


def _token(data):
    return bson.encode({"_data": data})


def test_token_time_of_a_mongod_keystring_token():
    # mongod: 0x82 (KeyString timestamp), 8 bytes big-endian (seconds, increment), then the rest of the token
    data = (b"\x82" + struct.pack(">II", 1796000000, 7) + b"\x2b\x02\x04").hex().upper()
    assert events.token_time(_token(data)) == (1796000000, 7)


def test_token_time_of_a_secantusdb_token():
    # SecantusDB: the hex of a BSON document whose "t" is the event's timestamp (as seen from a live stream)
    data = bson.encode({"s": 2, "t": Timestamp(1796018936, 8), "n": "admin.$cmd.aggregate", "k": {}}).hex()
    assert events.token_time(_token(data)) == (1796018936, 8)
    # a BSON document 130 bytes long starts with 0x82 too: still read as BSON
    data = bson.encode({"s": 2, "t": Timestamp(5, 6), "n": "x" * 91, "k": {}})
    assert data[0] == 0x82 and events.token_time(_token(data.hex())) == (5, 6)


def test_token_time_unknown_formats_are_none():
    for token in (None, _token("zz-not-hex"), _token(""), _token("0102"), bson.encode({"_data": b"\x82\x00"}),
                  bson.encode({"other": 1}), b"\x05\x00\x00\x00"):
        assert events.token_time(token) is None, token


def test_complete_time_is_the_later_of_the_last_event_and_an_idle_token():
    idle = _token((b"\x82" + struct.pack(">II", 200, 1)).hex())
    assert daemon._complete_time({"consistent": True, "cluster_time": [100, 3], "resume_token": idle}) == (200, 1)
    event = _token((b"\x82" + struct.pack(">II", 100, 3)).hex())
    assert daemon._complete_time({"consistent": True, "cluster_time": [100, 3], "resume_token": event}) == (100, 3)
    assert daemon._complete_time({"consistent": True, "cluster_time": [100, 3], "resume_token": None}) == (100, 3)
    assert daemon._complete_time({"consistent": False, "cluster_time": [100, 3], "resume_token": idle}) is None


def test_wait_budget_answers_before_the_requester_gives_up():
    rid = "%d-abc" % (time.time() * 1000)
    assert daemon._wait_budget(rid, {}) == daemon.SNAPSHOT_WAIT
    assert 95 < daemon._wait_budget(rid, {"timeout": 120}) <= 96   # 120 s less a 24 s margin
    assert 569 < daemon._wait_budget(rid, {"timeout": 600}) <= 570  # the margin is at most 30 s
    old = "%d-abc" % ((time.time() - 50) * 1000)                   # picked up 50 s after it was made
    assert 45 < daemon._wait_budget(old, {"timeout": 120}) <= 46
    assert daemon._wait_budget(old, {"timeout": 10}) == 0.0
