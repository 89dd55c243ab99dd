import json
import os

import bson
import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import mongodump
from snapshot_helpers import crc64_ecma_reference, read_archive


@pytest.mark.parametrize("size", [0, 1, 7, 4096, 100_003])
def test_crc64_matches_reference(size):
    data = os.urandom(size)
    c = mongodump.Crc64()
    for i in range(0, size, 999):
        c.update(data[i:i + 999])
    assert c.value() == crc64_ecma_reference(data)


def test_crc64_check_value():
    c = mongodump.Crc64()
    c.update(b"123456789")
    assert c.value() == 0x995DC9BBDF1939FA  # CRC-64/XZ (Go crc64.ECMA) check value


def test_metadata_json_canonical_and_ordered():
    text = mongodump.metadata_json(bson.encode({"capped": True, "size": 4096}),
                                   [bson.encode({"v": 2, "key": {"_id": 1}, "name": "_id_"})], bytes(range(16)), "c1")
    assert list(json.loads(text)) == ["options", "indexes", "uuid", "collectionName", "type"]
    assert '"size": {"$numberInt": "4096"}' in text
    assert json.loads(text)["uuid"] == bytes(range(16)).hex()
    assert "uuid" not in json.loads(mongodump.metadata_json(b"", [], None, "c"))


def test_escape():
    assert mongodump.escape_collection_name("a/b%c") == "a%2Fb%25c"


def test_archive_round_trip(tmp_path):
    docs = [bson.encode({"_id": i, "x": "y" * i}) for i in range(50)]
    path = tmp_path / "a.archive"
    with open(path, "wb") as f:
        w = mongodump.ArchiveWriter(f)
        w.prelude([("d", "c", "{}", sum(map(len, docs))), ("d", "e", "{}", 0)])
        w.segment("d", "c", b"".join(docs[:20]))
        w.segment("d", "c", b"".join(docs[20:]))
        w.segment("d", "e", b"")
        crc = mongodump.Crc64()
        crc.update(b"".join(docs))
        w.eof("d", "c", crc.value())
        w.eof("d", "e", mongodump.Crc64().value())
    header, metas, got, crcs = read_archive(path)
    assert header == {"concurrent_collections": 1, "version": "0.1", "server_version": "", "tool_version": "kmipbackup.mongodb"}
    assert [list(m) for m in metas] == [["db", "collection", "metadata", "size"]] * 2
    assert got["d.c"] == docs and "d.e" not in got
    assert crcs["d.c"] % (1 << 64) == crc64_ecma_reference(b"".join(docs)) and crcs["d.e"] == 0
    assert isinstance(mongodump.signed64(2 ** 64 - 1), int) and mongodump.signed64(2 ** 64 - 1) == -1
