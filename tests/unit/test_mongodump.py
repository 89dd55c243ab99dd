import base64
import hashlib
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


@pytest.mark.parametrize("name, file", [
    ("plain-name_1.x~", "plain-name_1.x~"), ("a b", "a%20b"), ("a+b", "a+b"), ("$&+:=@", "$&+:=@"),
    ("?;,#[]*!'()\"<>\\^`{|}", "%3F%3B%2C%23%5B%5D%2A%21%27%28%29%22%3C%3E%5C%5E%60%7B%7C%7D"),
    ("\u00e9t\u00e9", "%C3%A9t%C3%A9"), ("\U0001F600", "%F0%9F%98%80"), ("tab\tnl\n", "tab%09nl%0A"),
    ("/abs", "%2Fabs"), ("..", ".."), ("a%2Fb", "a%252Fb"), ("%24", "%2524")])
def test_escape_is_go_path_escape(name, file):
    """mongo-tools' util.EscapeCollectionName is Go's url.PathEscape: letters, digits, -._~ and $&+:=@ stay,
    every other byte of the UTF-8 name becomes %XX (upper-case hex)."""
    assert mongodump.escape_collection_name(name) == file


def test_escape_long_names_cut_and_hashed_as_mongodump():
    """mongodump/prepare.go outputPath: an escaped name over 238 bytes becomes its first 208 bytes, %24 and the
    unpadded base64url of the SHA-1 of the unescaped name (27 characters): 238 bytes."""
    assert mongodump.escape_collection_name("c" * 238) == "c" * 238
    long = "c" * 239
    digest = hashlib.sha1(long.encode()).digest()
    assert mongodump.escape_collection_name(long) == "c" * 208 + "%24" + base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert len(mongodump.escape_collection_name("\u00e9" * 80)) == 238  # 160 bytes, 480 once escaped
    names = ["c" * 239, "c" * 240, "c" * 208 + "%24", "\u00e9" * 80, "\u00e9" * 79 + "e", "/" * 80, "%2F" * 80]
    assert len({mongodump.escape_collection_name(n) for n in names}) == len(names)


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
