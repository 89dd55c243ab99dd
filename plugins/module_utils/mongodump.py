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

import collections
import struct

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


def escape_collection_name(name):
    """A collection name as a file name, as mongodump escapes it (% and / percent-encoded)."""
    return name.replace("%", "%25").replace("/", "%2F")


def _decode(raw):
    return bson.decode(bytes(raw), codec_options=_ORDERED) if raw else collections.OrderedDict()


def metadata_json(options_raw, index_specs_raw, uuid_bytes, collection_name, kind="collection"):
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

    def __init__(self):
        if fastcrc is None:
            raise KmipBackupError("The Python package fastcrc is missing (%s): install the collection's requirements." % FASTCRC_IMPORT_ERROR)
        self._value = 0

    def update(self, data):
        if data:
            self._value = fastcrc.crc64.xz(data, self._value)

    def value(self):
        return self._value


def signed64(v):
    return v - (1 << 64) if v >= 1 << 63 else v


class ArchiveWriter:
    """Writes a mongodump --archive stream to a binary file object, one namespace after another."""

    def __init__(self, f, server_version=""):
        self.f = f
        self.server_version = server_version
        self.bytes = 0

    def _w(self, data):
        self.f.write(data)
        self.bytes += len(data)

    def prelude(self, collections_meta):
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

    def segment(self, db, coll, docs):
        """One segment of concatenated raw documents (skipped when empty)."""
        if docs:
            self._w(self._header(db, coll, False, 0))
            self._w(docs)
            self._w(TERMINATOR)

    def eof(self, db, coll, crc_value):
        self._w(self._header(db, coll, True, signed64(crc_value)))
        self._w(TERMINATOR)
