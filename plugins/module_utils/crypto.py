# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Data keys, sealing and keyed hashes of the snapshot store (no Ansible imports).

PRIVATE to the collection: it can change at any time.
A sealed blob is a 96-bit random nonce followed by AES-256-GCM ciphertext and tag; the
associated data (aad) binds the blob to what refers to it. With key None (an unencrypted
job) the same calls use the null cipher: the blob is a SHA-256 checksum of aad and
plaintext followed by the plaintext, which detects damage but is not secret.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import threading
from typing import Callable

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, KmipBackupError

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    CRYPTOGRAPHY_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    AESGCM = InvalidTag = None
    CRYPTOGRAPHY_IMPORT_ERROR = e

try:
    import zstandard
    ZSTD_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    zstandard = None
    ZSTD_IMPORT_ERROR = e

KEY_BYTES = 32
NONCE_BYTES = 12
_NULL_SUM = 32
ZSTD_LEVEL = 1  # about 1.6x the speed of level 3 for 8% more bytes on document data
# The null cipher's key for keyed hashes: an unencrypted job's ids and boundaries are not secret.
NULL_ID_KEY = b"kmipbackup unencrypted job id key"
_local = threading.local()


def _require_cryptography():
    if AESGCM is None:
        raise KmipBackupError("The Python package cryptography is missing (%s): install the collection's requirements." % CRYPTOGRAPHY_IMPORT_ERROR)


def _require_zstd():
    if zstandard is None:
        raise KmipBackupError("The Python package zstandard is missing (%s): install the collection's requirements." % ZSTD_IMPORT_ERROR)


def new_key() -> bytes:
    """A fresh 256-bit data key."""
    return os.urandom(KEY_BYTES)


def derive(key: bytes, label: str) -> bytes:
    """A 32-byte subkey of key for one purpose (HMAC-SHA256 as a KDF over a fixed label)."""
    return hmac.new(key, b"kmipbackup derive " + label.encode("ascii"), hashlib.sha256).digest()


def seal(key: bytes | None, plaintext: bytes, aad: bytes, prefix: bytes = b"") -> bytes | bytearray:
    """prefix || nonce || AES-256-GCM(key, plaintext, aad); key None: prefix || the null cipher (checksum ||
    plaintext). The ciphertext is written into the result in place (a segment is many MB: no copy of it)."""
    if key is None:
        return b"".join((prefix, hashlib.sha256(aad + b"\x00" + plaintext).digest(), plaintext))
    _require_cryptography()
    nonce = os.urandom(NONCE_BYTES)
    start = len(prefix) + NONCE_BYTES
    out = bytearray(start + len(plaintext) + 16)
    out[:start] = prefix + nonce
    AESGCM(key).encrypt_into(nonce, plaintext, aad, memoryview(out)[start:])
    return out


def open_sealed(key: bytes | None, blob: bytes, aad: bytes, kind: str = "object", object_id: str | None = None) -> bytes:
    """The plaintext of a sealed blob; IntegrityError naming kind/object_id when it fails authentication."""
    blob = bytes(blob)
    if key is None:
        body = blob[_NULL_SUM:]
        if len(blob) < _NULL_SUM or not hmac.compare_digest(blob[:_NULL_SUM], hashlib.sha256(aad + b"\x00" + body).digest()):
            raise integrity_error(kind, object_id)
        return body
    _require_cryptography()
    if len(blob) < NONCE_BYTES + 16:
        raise integrity_error(kind, object_id)
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise integrity_error(kind, object_id) from None


def integrity_error(kind: str, object_id: str | None, why: str = "failed authentication (it was modified, damaged or swapped)") -> IntegrityError:
    name = "%s %s" % (kind, object_id) if object_id is not None else kind
    return IntegrityError("The snapshot store's %s %s: restore from another snapshot or a copy of the store, "
                          "and find out who changed the store." % (name, why), kind=kind, object_id=object_id)


def chunk_id(id_key: bytes, data: bytes, sha256: bytes | None = None, key_id: str = "") -> str:
    """A chunk's content address, hex: HMAC-SHA256 under the chunk-id key of the plaintext's SHA-256
    (sha256: that digest when the caller has it already, so the plaintext is hashed once) and of the
    data-key id that seals it, so equal content sealed under another key epoch gets another id and a
    new epoch never reuses (and keeps needing) an old epoch's chunks."""
    digest = sha256 if sha256 is not None else hashlib.sha256(data).digest()
    return hmac.new(id_key, digest + key_id.encode("ascii"), hashlib.sha256).hexdigest()


def mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def boundary_threshold_fn(id_key: bytes, target_bytes: int) -> Callable[[bytes, int], bool]:
    """A function (doc_id_key, doc_size) -> bool: True when a chunk ends after this document.

    The keyed hash (BLAKE2b, fast on short inputs) of the document's id_key, as a fraction of 2**64, is compared with
    size / target_bytes, so chunks average about target_bytes whatever the documents' sizes,
    and a boundary depends only on that document, not on its neighbours."""
    bkey = derive(id_key, "boundary")
    scale = (1 << 64) / float(target_bytes)
    blake2b = hashlib.blake2b
    from_bytes = int.from_bytes

    def is_boundary(doc_key, size):
        return from_bytes(blake2b(doc_key, key=bkey, digest_size=8).digest(), "big") < size * scale
    return is_boundary


def _zstd(kind, level=None):
    """This thread's zstd compressor (per level) or decompressor: contexts are reused, never shared between threads."""
    _require_zstd()
    cache = getattr(_local, "zstd", None)
    if cache is None:
        cache = _local.zstd = {}
    z = cache.get((kind, level))
    if z is None:
        z = cache[(kind, level)] = zstandard.ZstdCompressor(level=level) if kind == "c" else zstandard.ZstdDecompressor()
    return z


def compress(data: bytes, level: int | None = None) -> bytes:
    return _zstd("c", ZSTD_LEVEL if level is None else level).compress(data)


def decompress(data: bytes, kind: str = "chunk", object_id: str | None = None) -> bytes:
    try:
        return _zstd("d").decompress(data)
    except zstandard.ZstdError:
        raise integrity_error(kind, object_id, "does not decompress") from None
