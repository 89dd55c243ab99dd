# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Writers of mongodump's directory and --archive formats (no Ansible imports). PRIVATE to the collection.

Directory: <out>/<db>/<coll>.bson (concatenated BSON documents) and <coll>.metadata.json,
canonical Extended JSON with the fields options, indexes, uuid, collectionName, type in that
order (mongo-tools mongodump/metadata_dump.go). Archive (mongo-tools common/archive/spec.md):
magic 0x8199e26d (little-endian), a header document, one collection-metadata document per
collection, 0xffffffff, then namespace segments (header {db, collection, EOF: false, CRC: 0},
documents, 0xffffffff) and per namespace an EOF header {EOF: true, CRC: CRC-64-ECMA of all its
documents} followed by 0xffffffff.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import struct
from typing import BinaryIO
from urllib.parse import quote

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import KmipBackupError

try:
    import bson
    from bson.int64 import Int64
    from bson.json_util import CANONICAL_JSON_OPTIONS, dumps as json_dumps
    BSON_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    bson = Int64 = CANONICAL_JSON_OPTIONS = json_dumps = None
    BSON_IMPORT_ERROR = e

try:
    import fastcrc
    FASTCRC_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    fastcrc = None
    FASTCRC_IMPORT_ERROR = e

ARCHIVE_MAGIC = struct.pack("<I", 0x8199E26D)
TERMINATOR = b"\xff\xff\xff\xff"
ARCHIVE_VERSION = "0.1"
TOOL_VERSION = "kmipbackup.mongodb"
_ORDERED = CANONICAL_JSON_OPTIONS.with_options(document_class=collections.OrderedDict) if CANONICAL_JSON_OPTIONS else None


PATH_SAFE = "$&+:=@"  # kept by Go's url.PathEscape besides letters, digits and -._~
FILE_NAME_MAX = 238  # an escaped name plus the longest suffix (.metadata.json.gz) fits 255 bytes
FILE_NAME_CUT = 208


def escape_collection_name(name: str) -> str:
    """A collection's file name (without .bson / .metadata.json) as mongodump writes it (mongo-tools:
    util.EscapeCollectionName is Go's url.PathEscape; mongodump/prepare.go outputPath): percent-encoded
    ('/' %2F, '%' %25, space %20, other bytes outside letters, digits and -._~$&+:=@ as %XX of their UTF-8),
    so it is one plain ASCII file name; one longer than 238 bytes is cut to its first 208 bytes, then '%24'
    ($) and the unpadded URL-safe base64 of the SHA-1 of the name. Both steps are one-to-one ('%24' appears
    in no other escaped name), so two collections never share a file."""
    escaped = quote(name, safe=PATH_SAFE)
    if len(escaped) > FILE_NAME_MAX:
        digest = base64.urlsafe_b64encode(hashlib.sha1(name.encode("utf-8")).digest()).rstrip(b"=").decode("ascii")
        escaped = escaped[:FILE_NAME_CUT] + "%24" + digest
    return escaped


def _decode(raw):
    return bson.decode(bytes(raw), codec_options=_ORDERED) if raw else collections.OrderedDict()


def metadata_json(options_raw: bytes, index_specs_raw: list, uuid_bytes: bytes | None, collection_name: str, kind: str = "collection") -> str:
    """The text of <coll>.metadata.json (and of an archive's collection metadata)."""
    meta = collections.OrderedDict()
    meta["options"] = _decode(options_raw)
    meta["indexes"] = [_decode(s) for s in index_specs_raw]
    if uuid_bytes:
        meta["uuid"] = bytes(uuid_bytes).hex()
    meta["collectionName"] = collection_name
    meta["type"] = kind
    return json_dumps(meta, json_options=CANONICAL_JSON_OPTIONS)


class Crc64:
    """Streaming CRC-64-ECMA as Go's hash/crc64 with crc64.ECMA computes it (the CRC-64/XZ variant:
    reflected, init and final xor all ones), through fastcrc (several GB/s)."""

    def __init__(self) -> None:
        if fastcrc is None:
            raise KmipBackupError("The Python package fastcrc is missing (%s): install the collection's requirements." % FASTCRC_IMPORT_ERROR)
        self._value = 0

    def update(self, data: bytes) -> None:
        if data:
            self._value = fastcrc.crc64.xz(data, self._value)

    def value(self) -> int:
        return self._value


def signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


class ArchiveWriter:
    """Writes a mongodump --archive stream to a binary file object, one namespace after another."""

    def __init__(self, f: BinaryIO, server_version: str = "") -> None:
        self.f = f
        self.server_version = server_version
        self.bytes = 0

    def _w(self, data):
        self.f.write(data)
        self.bytes += len(data)

    def prelude(self, collections_meta: list) -> None:
        """collections_meta: [(db, collection, metadata_json_text, size_bytes)]."""
        self._w(ARCHIVE_MAGIC)
        self._w(bson.encode(collections.OrderedDict([
            ("concurrent_collections", 1), ("version", ARCHIVE_VERSION),
            ("server_version", self.server_version), ("tool_version", TOOL_VERSION)])))
        for db, coll, meta, size in collections_meta:
            self._w(bson.encode(collections.OrderedDict([
                ("db", db), ("collection", coll), ("metadata", meta), ("size", Int64(size))])))
        self._w(TERMINATOR)

    def _header(self, db, coll, eof, crc):
        return bson.encode(collections.OrderedDict([("db", db), ("collection", coll), ("EOF", eof), ("CRC", Int64(crc))]))

    def segment(self, db: str, coll: str, docs: bytes) -> None:
        """One segment of concatenated raw documents (skipped when empty)."""
        if docs:
            self._w(self._header(db, coll, False, 0))
            self._w(docs)
            self._w(TERMINATOR)

    def eof(self, db: str, coll: str, crc_value: int) -> None:
        self._w(self._header(db, coll, True, signed64(crc_value)))
        self._w(TERMINATOR)
