"""The pure parts of store_copy: which snapshots a copy selects, the destination's retention, and the checks a copy
can make without keys (head and entry shape, sealed-object format, keyring records)."""
import datetime
import json

import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import store_copy
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, StoreError

IDS = ["20261101T000000Z-0000000%d" % i for i in range(1, 5)]


def test_select_all_latest_and_ids_in_catalog_order():
    assert store_copy.select(IDS, "all") == IDS
    assert store_copy.select(IDS, "latest") == IDS[-1:]
    assert store_copy.select([], "latest") == []
    assert store_copy.select(IDS, [IDS[3], IDS[0]]) == [IDS[0], IDS[3]]
    with pytest.raises(StoreError, match="not a live snapshot of the source store"):
        store_copy.select(IDS, ["20261101T000000Z-0000000a"])
    with pytest.raises(StoreError, match="Invalid snapshot id '../x'"):
        store_copy.select(IDS, ["../x"])
    with pytest.raises(StoreError, match="use all, latest or a list"):
        store_copy.select(IDS, "newest")


def entries(days_ago, now):
    return [{"snapshot_id": "%s-%08x" % ((now - datetime.timedelta(days=d)).strftime("%Y%m%dT%H%M%SZ"), i), "seq": i + 1,
             "created": (now - datetime.timedelta(days=d)).strftime("%Y-%m-%dT%H:%M:%SZ"), "type": "scheduled"}
            for i, d in enumerate(days_ago)]


def test_retained_keep_last_schedule_or_everything():
    now = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.timezone.utc)
    es = entries([40, 20, 10, 1, 0.5], now)
    ids = [e["snapshot_id"] for e in es]
    assert store_copy.retained(es) == (ids, [])
    assert store_copy.retained(es, keep_last=2) == (ids[-2:], ids[:-2])
    assert store_copy.retained(es, keep_last=9) == (ids, [])
    with pytest.raises(StoreError, match="keep at least 1"):
        store_copy.retained(es, keep_last=0)
    keep, expire = store_copy.retained(es, schedule={"interval_hours": 24, "recent_days": 2, "daily_days": 7,
                                                     "weekly_weeks": 2, "monthly_months": 0}, now=now)
    assert keep == ids[2:] and expire == ids[:2]  # 40 and 20 days: past the weekly tier (2 weeks), no monthly tier


HEAD = {"format": 1, "job": "orders", "seq": 3, "snapshot_id": IDS[2], "live": [[2, IDS[1]], [3, IDS[2]]],
        "key_id": "snapshot-1", "updated": "2026-11-30T00:00:00Z", "mac": "hmac-sha256:00"}


@pytest.mark.parametrize("change", [
    {"job": "other"}, {"format": 2}, {"mac": None}, {"seq": "3"}, {"live": []}, {"live": [[2, "../../x"]]},
    {"live": [["2", IDS[1]]]}, {"key_id": "../k"}])
def test_head_shape_refuses(change):
    with pytest.raises(IntegrityError, match="catalog head orders has an unknown format"):
        store_copy.check_head_shape(dict(HEAD, **change), "orders")


def test_head_shape_accepts_and_a_missing_head_says_what_to_do():
    assert store_copy.check_head_shape(dict(HEAD), "orders") == HEAD
    assert store_copy.check_head_shape(dict(HEAD, key_id="none", mac="sha256:00"), "orders")
    with pytest.raises(StoreError, match="no catalog head in the source store"):
        store_copy.check_head_shape(None, "orders")


def test_entry_shape_and_sequence_number():
    e = {"snapshot_id": IDS[1], "job": "orders", "seq": 2, "key_id": "snapshot-1", "manifest_sha256": "ab"}
    assert store_copy.check_entry(e, IDS[1], 2, "orders") is e
    with pytest.raises(IntegrityError, match="another sequence number"):
        store_copy.check_entry(e, IDS[1], 3, "orders")
    for change in ({"job": "x"}, {"manifest_sha256": None}, {"key_id": "../k"}):
        with pytest.raises(IntegrityError, match="unknown format"):
            store_copy.check_entry(dict(e, **change), IDS[1], 2, "orders")


def test_sealed_object_format():
    sealed = b"\x00" * 40
    assert store_copy.check_blob(b"KBC1\x0asnapshot-2" + sealed, b"KBC1", "chunk", "c") == "snapshot-2"
    assert store_copy.check_blob(b"KBM1\x04none" + sealed, b"KBM1", "manifest", "m") == "none"
    for bad in (b"KBM1\x0asnapshot-2" + sealed, b"KBC1\x03../" + sealed, b"KBC1\x0asnapshot-2" + b"\x00" * 10, b"KBC1"):
        with pytest.raises(IntegrityError, match="chunk c has an unknown format"):
            store_copy.check_blob(bad, b"KBC1", "chunk", "c")


def test_keyring_record():
    rec = {"key_id": "snapshot-1", "wrapped": {"mode": "kmip-gcm"}}
    assert store_copy.check_keyring_record(json.dumps(rec).encode(), "snapshot-1") == rec
    with pytest.raises(IntegrityError, match="names another key"):
        store_copy.check_keyring_record(json.dumps(rec).encode(), "snapshot-2")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        store_copy.check_keyring_record(b"{", "snapshot-1")
