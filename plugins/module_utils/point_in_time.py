# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restoring to a point in time (no Ansible imports). PRIVATE to the collection.

segments.plan_point picks the newest snapshot at or before the point (the base) and the change segments after
it; rebuild() reads and authenticates every one of them, then gives the image at the point by one of two paths.

The fast path, for a window of inserts, replaces, updates, deletes and document corrections on the base's namespaces
(prescan): a forked process replays each touched base chunk's key range on its own, in memory, in restore order, and
streams the results over a pipe while restore.execute restores the untouched chunks (_ChildSource); each range is
hashed and counted by the parent, each namespace's totals checked at its end, the child's exit status before anything
is published. docs/internals.md, "Restore to a point", has the protocol.

The sequential path, for everything else:

- a temporary head (SQLCipher under a random key that lives in memory only, in a 0700 folder removed afterwards)
  receives the base snapshot's namespaces, and its documents lazily: a base chunk is loaded the first time the
  replay touches a key in its range (a whole namespace when something scans it), so a point a few events after
  a large snapshot loads only the chunks those events touch. The documents it loads and the replay writes stay in
  an in-memory overlay in front of the database (dicts, no SQL per event), which they spill into only past
  OVERLAY_BYTES or before a scan;
- segments.replay applies the segments' records up to the point to it with the existing applier;
- the image is a manifest like a snapshot's, whose chunk entries are the base's untouched chunks (read from the
  store as a plain restore reads them) and "virtual" chunks: ranges of the temporary head (id "head:<n>": from
  the overlay, or from the database for a namespace that spilled),
  cut at about 1 MiB, with their count, size and SHA-256 taken when the manifest is built.

RebuiltStore serves both kinds of chunk to restore.py, so the three targets, include/exclude/rename, the checks
(every chunk against its entry; counts and namespace content hashes against the manifest; the target's count)
and restoreInfo are restore.py's own, unchanged.
"""
from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import gc
import hashlib
import itertools
import os
import shutil
import signal
import struct
import tempfile
import threading
import zlib
from typing import TYPE_CHECKING, Callable, Iterator

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import crypto, events, restore, segments
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import NotApplicable, RestoreError, UncertainOrder
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.head import Head
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.rawbson import EMPTY_BSON, id_key_from_document, split_bson_docs
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.storenames import namespace_hash

if TYPE_CHECKING:
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.store import JobStore, Keys

try:
    from bson.binary import Binary
    from bson.raw_bson import RawBSONDocument
except ImportError:  # pragma: no cover (restore.py reports the missing package)
    Binary = RawBSONDocument = None

VIRTUAL_PREFIX = "head:"  # never a store chunk id (64 hex digits)
VIRTUAL_CHUNK_BYTES = 1 << 20
OVERLAY_BYTES = 256 << 20  # the temporary head's documents kept in memory (with ENTRY_BYTES each) before they spill into it
CACHE_BYTES = 64 << 20  # the temporary head's page cache, for what spills (the daemon's heads: 32 MiB)


def _after(key: bytes) -> bytes:
    """The smallest id_key greater than key: id_keys compare as byte strings, so (key, x) == [key + 00, x)."""
    return bytes(key) + b"\x00"


class _Base:
    """The base snapshot's chunks of one namespace of the temporary head, and which of them are loaded."""

    def __init__(self, n: dict) -> None:
        self.n = n
        # chunk i holds the keys in (last of i-1, last of i]: the one of key is bisect_left(lasts, key), none past the last
        self.lasts = [bytes(c["last"]) for c in n["chunks"]]
        self.loaded = set()

    def touch(self, w: _LazyWriter, ns: str, keys) -> None:
        """Load (w: the open transaction's _LazyWriter; ns: this base's namespace now) the chunks that hold keys
        (a sequence of id_keys, bytes) and are not loaded yet; a key past the last chunk has none."""
        lasts = self.lasts
        if len(keys) == 1:  # a read or a delete: once per replayed event
            i = bisect.bisect_left(lasts, keys[0])
            if i < len(lasts) and i not in self.loaded:
                w._h.load(w, ns, i)  # pylint: disable=protected-access
            return
        needed = set(map(bisect.bisect_left, itertools.repeat(lasts), keys))  # a flush: thousands of keys, in C
        needed.discard(len(lasts))
        for i in sorted(needed - self.loaded):
            w._h.load(w, ns, i)  # pylint: disable=protected-access


def _never(_id_key, _size):
    return False


_ABSENT = object()  # the undo log's "the key was not in the overlay"
ENTRY_BYTES = 120  # what an overlay entry costs in memory besides its document: key, dict slot, bytes headers


def _size(d: dict) -> int:
    """What the overlay of one namespace holds in memory, about."""
    return sum(ENTRY_BYTES + len(v or b"") for v in d.values())


class RebuildHead(Head):
    """A temporary head that holds a base snapshot lazily (see the module's docs). Its writers load the chunk of
    every key they read or write, and the whole namespace before a scan; renames and drops carry the base along.

    Documents live in an in-memory overlay, {ns_id: {id_key: raw, or None: deleted}}, in front of the SQLCipher
    head, which keeps the namespaces (names, options, indexes, position) and only the documents that spill: when
    the overlay passes overlay_bytes, or before a scan of a namespace, its documents are written to the head and
    the namespace's reads go on through it (ns_id in `spilled`: its SQL rows count, tombstones mark deletions).
    Keyed by ns_id, a rename carries the documents as the head's row does. A transaction that rolls back undoes
    its overlay changes from an undo log; one that spilled on the way leaves the head unusable (a failed replay
    fails the restore anyway)."""

    def __init__(self, path: str, key: bytes, job_store: JobStore, keys: Keys, manifest: dict,
                 overlay_bytes: int | None = None) -> None:
        super().__init__(path, key)
        # a temporary head (random key in memory only, removed afterwards): a crash discards it anyway, so no syncs.
        # It keeps Head's WAL: a rollback journal in memory would hold a copy of every page a transaction changes
        # once documents spilled (peak RSS 940 MB against 576 MB: 100,000 events spread over a 600 MB snapshot)
        self._conn.execute("PRAGMA synchronous=OFF")
        self._conn.execute("PRAGMA cache_size=-%d" % (CACHE_BYTES >> 10))  # decrypted pages, kept while replay jumps around
        # its image is read by ranges cut by size: no chunk-boundary flags (a keyed hash per document) and no change log
        self._is_boundary = _never
        self.job_store, self.keys = job_store, keys
        self.bases = {}  # ns -> _Base, for namespaces that still have base chunks (loaded or not)
        self.loaded_chunks = 0
        self.loading = []  # (base, chunk index) loaded by the open transaction: forgotten if it rolls back
        self.overlay, self.overlay_size = {}, 0
        self.overlay_bytes = OVERLAY_BYTES if overlay_bytes is None else overlay_bytes
        self.spilled = set()  # ns_ids whose documents the SQL head holds (an over-approximation is harmless)
        self.undo = None  # the open transaction's [(ns_id, id_key or None for the whole namespace, old value)]; False: lost
        self.broken = False
        self._sorted = {}  # sorted_keys()
        with super().write() as w:
            for n in manifest["namespaces"]:
                w.create_namespace(n["ns"], bytes(n["options"] or EMPTY_BSON), uuid=bytes(n["uuid"]) if n.get("uuid") else None,
                                   indexes=[bytes(s) for s in n["indexes"]])
                if n["chunks"]:
                    self.bases[n["ns"]] = _Base(n)

    def write(self) -> _LazyWrite:
        if self.broken:
            raise RestoreError("The temporary head of this point-in-time restore is unusable after a failed transaction: restore again.")
        return _LazyWrite(self, super().write())

    @contextlib.contextmanager
    def read(self, flush: bool = True):
        """Head.read(), with the overlay written to the head first (flush=False: namespaces only)."""
        if flush and self.overlay:
            with self.write() as w:
                w.spill()
        with super().read() as r:
            yield r

    def load(self, w, ns: str, index: int) -> None:
        """Load chunk index of ns's base into the overlay (w: the open transaction's _LazyWriter)."""
        base = self.bases[ns]
        if index in base.loaded:
            return
        plain = self.job_store.read_chunk(base.n["chunks"][index], self.keys)
        w.put_many(w.ns_id(ns), [(id_key_from_document(d), d) for d in split_bson_docs(plain)])
        base.loaded.add(index)
        self.loading.append((base, index))
        self.loaded_chunks += 1

    def load_all(self, w, ns: str) -> None:
        base = self.bases.get(ns)
        for i in range(len(base.lasts) if base else 0):
            self.load(w, ns, i)

    def sorted_keys(self, ns_id: int) -> list:
        """The overlay's keys of namespace ns_id (deletions too), sorted; kept once the image is cut (it no longer
        changes: a change under it shows in the chunks' digests)."""
        if ns_id not in self._sorted:
            self._sorted[ns_id] = sorted(self.overlay.get(ns_id) or ())
        return self._sorted[ns_id]

    def overlay_docs(self, ns_id: int, keys: list) -> bytes | None:
        """The documents of keys (in that order) joined, from the overlay; None when one is no longer there."""
        d = self.overlay.get(ns_id)
        try:
            return b"".join([d[k] for k in keys])
        except (KeyError, TypeError):
            return None


class _LazyWrite:
    """Head.write()'s transaction, yielding a _LazyWriter."""

    def __init__(self, h: RebuildHead, transaction) -> None:
        self._h, self._t = h, transaction

    def __enter__(self) -> _LazyWriter:
        self._h.loading, self._h.undo = [], []
        self._bases = dict(self._h.bases)  # drops and renames move bases: a rollback puts them back
        return _LazyWriter(self._h, self._t.__enter__())

    def __exit__(self, *exc):
        try:
            if exc[0] is not None:
                self._rolled_back()
                return self._t.__exit__(*exc)
            try:
                return self._t.__exit__(*exc)  # the Applier's buffered writes (before_commit), COMMIT
            except BaseException:
                self._rolled_back()
                raise
        finally:
            self._h.undo = None

    def _rolled_back(self):
        """The transaction rolls back: so do the chunks it loaded and its overlay changes."""
        h = self._h
        for base, index in h.loading:
            base.loaded.discard(index)
            h.loaded_chunks -= 1
        h.loading = []
        h.bases = self._bases
        if h.undo is False:
            h.broken = True
            return
        for ns_id, key, old in reversed(h.undo):
            if key is None:  # a namespace's overlay created (old None) or dropped/spilled (old: its dict)
                if old is None:
                    h.overlay.pop(ns_id, None)
                else:
                    h.overlay[ns_id] = old
            elif old is _ABSENT:
                h.overlay[ns_id].pop(key, None)
            else:
                h.overlay[ns_id][key] = old
        h.undo = []
        h.overlay_size = sum(_size(d) for d in h.overlay.values())


class _LazyWriter:
    """A head Writer (every attribute passes through) that loads base chunks before touching their keys and keeps
    documents in the head's overlay."""

    def __init__(self, h: RebuildHead, w) -> None:
        self._h, self._w = h, w

    def __getattr__(self, name):
        return getattr(self._w, name)

    def ns_id(self, ns, create=False):
        ns_id = self._w._ns_id(ns)  # pylint: disable=protected-access
        if ns_id is None and create:
            ns_id = self._w._ensure_ns(ns)  # pylint: disable=protected-access  # implicit creation, as Writer.upsert
        return ns_id

    def has_namespace(self, ns):  # as Writer's, without __getattr__: once per replayed event
        return self._w._ns_id(ns) is not None  # pylint: disable=protected-access

    def _touch(self, ns, id_key):
        base = self._h.bases.get(ns)
        if base is not None:
            base.touch(self, ns, (id_key,))

    def put_many(self, ns_id, pairs):
        """Set (id_key, raw or None: deleted) pairs of namespace ns_id in the overlay, with undo entries."""
        h = self._h
        d = h.overlay.get(ns_id)
        if d is None:
            d = h.overlay[ns_id] = {}
            if h.undo is not False:
                h.undo.append((ns_id, None, None))
        undo = h.undo if h.undo is not False else None
        size = 0
        tombstones = ns_id in h.spilled
        for k, v in pairs:
            old = d.get(k, _ABSENT)
            if undo is not None:
                undo.append((ns_id, k, old))
            if old is not _ABSENT:
                size -= ENTRY_BYTES + len(old or b"")
            if v is None and not tombstones:
                d.pop(k, None)
            else:
                d[k] = v
                size += ENTRY_BYTES + len(v or b"")
        h.overlay_size += size
        if h.overlay_size > h.overlay_bytes:
            self.spill()
            h.undo = False  # what it undid is in the head now, in this transaction

    def _stored(self, ns_id, id_key):
        d = self._h.overlay.get(ns_id)
        v = d.get(id_key, _ABSENT) if d is not None else _ABSENT
        if v is not _ABSENT:
            return v
        if ns_id in self._h.spilled:
            row = self._w._c.execute("SELECT doc FROM docs WHERE ns_id=? AND id_key=?", (ns_id, id_key)).fetchone()
            return row[0] if row else None
        return None

    def spill(self, only=None):
        """Write the overlay (of namespace id only, or all) into the head's documents and forget it there."""
        h, c = self._h, self._w._c
        for ns_id in [only] if only is not None else list(h.overlay):
            d = h.overlay.pop(ns_id, None)
            if d is None:
                continue
            if h.undo is not False:
                h.undo.append((ns_id, None, d))
            keys = sorted(d)  # in key order: B-tree pages are written once each
            c.executemany("INSERT OR REPLACE INTO docs (ns_id, id_key, doc, bnd) VALUES (?, ?, ?, 0)",
                          [(ns_id, k, d[k]) for k in keys if d[k] is not None])
            if ns_id in h.spilled:
                c.executemany("DELETE FROM docs WHERE ns_id=? AND id_key=?", [(ns_id, k) for k in keys if d[k] is None])
            h.spilled.add(ns_id)
            h.overlay_size -= _size(d)
        if only is None:
            h.overlay_size = 0

    def get(self, ns, id_key):
        # _touch and _stored inlined: the applier reads each updated document through here
        id_key, h = bytes(id_key), self._h
        base = h.bases.get(ns)
        if base is not None:
            base.touch(self, ns, (id_key,))
        ns_id = self._w._ns_id(ns)  # pylint: disable=protected-access
        if ns_id is None:
            return None
        d = h.overlay.get(ns_id)
        v = d.get(id_key, _ABSENT) if d is not None else _ABSENT
        return self._stored(ns_id, id_key) if v is _ABSENT else v

    def delete(self, ns, id_key):
        id_key = bytes(id_key)
        self._touch(ns, id_key)
        ns_id = self._w._ns_id(ns)  # pylint: disable=protected-access
        if ns_id is None or self._stored(ns_id, id_key) is None:
            return False
        self.put_many(ns_id, [(id_key, None)])
        return True

    def upsert(self, ns, id_key, raw):
        id_key = bytes(id_key)
        self._touch(ns, id_key)
        self.put_many(self.ns_id(ns, True), [(id_key, bytes(raw))])

    def upsert_many(self, ns, pairs, track=True):
        pairs = [(bytes(k), bytes(v)) for k, v in pairs]
        base = self._h.bases.get(ns)
        if base is not None and pairs:
            base.touch(self, ns, [k for k, _doc in pairs])
        self.put_many(self.ns_id(ns, True), pairs)

    def _whole(self, ns):
        self._h.load_all(self, ns)
        ns_id = self.ns_id(ns)
        if ns_id is not None:
            self.spill(ns_id)

    def scan(self, ns, start=None, end=None):
        self._whole(ns)
        return self._w.scan(ns, start, end)

    def read_range(self, ns, start=None, end=None):
        self._whole(ns)
        return self._w.read_range(ns, start, end)

    def count(self, ns):
        self._whole(ns)
        return self._w.count(ns)

    def first_key(self, ns, start=None):
        self._whole(ns)
        return self._w.first_key(ns, start)

    def _forget(self, ns):
        """Drop ns's overlay (its head rows go with the namespace)."""
        ns_id = self.ns_id(ns)
        d = self._h.overlay.pop(ns_id, None) if ns_id is not None else None
        if d is not None:
            if self._h.undo is not False:
                self._h.undo.append((ns_id, None, d))
            self._h.overlay_size -= _size(d)

    def drop_namespace(self, ns):
        self._h.bases.pop(ns, None)
        self._forget(ns)
        return self._w.drop_namespace(ns)

    def drop_database(self, db):
        names = [n["ns"] for n in self._w.namespaces() if n["ns"].startswith(db + ".")]
        for ns in names:
            self.drop_namespace(ns)
        return len(names)

    def rename(self, ns, to, drop_target=True):
        if ns != to and self._w.has_namespace(ns):  # the documents move with the namespace's row: so does its base
            self._h.bases.pop(to, None)
            if drop_target:
                self._forget(to)
            base = self._h.bases.pop(ns, None)
            if base is not None:
                self._h.bases[to] = base
        return self._w.rename(ns, to, drop_target)

    def clear(self):
        self._h.bases.clear()
        for ns_id in list(self._h.overlay):
            d = self._h.overlay.pop(ns_id)
            if self._h.undo is not False:
                self._h.undo.append((ns_id, None, d))
        self._h.overlay_size = 0
        return self._w.clear()


class RebuiltStore:
    """A JobStore for restore.py (every attribute passes through to job_store) that also reads the virtual chunks of a
    rebuilt image from its head, checked against their entries as store chunks are, and knows the image's entry."""

    def __init__(self, job_store: JobStore, h: RebuildHead, entry: dict) -> None:
        self._js, self._h = job_store, h
        self.entry = entry
        self.fast = None  # the fast path's _Fast: restore.execute then reads through restore_source
        # virtual chunk id -> (ns_id, its id_keys) in the overlay, or (ns, start, end) in the head's documents
        self.ranges = {}

    def __getattr__(self, name):
        return getattr(self._js, name)

    def restore_source(self, keys: Keys, verify: bool = True) -> restore.SnapshotSource | None:
        """The source restore.execute reads a fast-path image through (None: the image's chunks, as a snapshot's)."""
        return _ChildSource(self.fast, keys, verify) if self.fast is not None else None

    def catalog_entry(self, snapshot_id: str) -> dict:
        return self.entry if snapshot_id == self.entry["snapshot_id"] else self._js.catalog_entry(snapshot_id)

    def _virtual(self, cid):
        where = self.ranges[cid]
        if isinstance(where[1], list):
            return self._h.overlay_docs(*where)
        with self._h.read(flush=False) as r:  # a spilled namespace: its head rows merged with its overlay
            return b"".join(doc for _k, doc in _merged(self._h, r, *where))

    def read_chunk(self, entry: dict, keys: Keys) -> bytes:
        cid = entry["id"]
        if not cid.startswith(VIRTUAL_PREFIX):
            return self._js.read_chunk(entry, keys)
        plain = self._virtual(cid)
        if plain is None or len(plain) != entry["bytes"] or hashlib.sha256(plain).digest() != bytes(entry["sha256"]):
            raise RestoreError("The temporary head of this point-in-time restore changed under it (range %s): restore again." % cid)
        return plain

    def _open_chunk(self, cid, keys, expect_key=None):
        if cid.startswith(VIRTUAL_PREFIX):
            return b""  # authenticated when its segments were replayed; read_chunk checks it against its entry
        return self._js._open_chunk(cid, keys, expect_key)  # pylint: disable=protected-access


def _merged(h: RebuildHead, r, ns: str, ns_id: int, start: bytes | None, end: bytes | None) -> Iterator[tuple]:
    """(id_key, raw) pairs of a spilled namespace in [start, end), in id_key order: the head's rows (r, a Reader)
    with the overlay's over them (a None there deletes)."""
    d = h.overlay.get(ns_id) or {}
    keys = h.sorted_keys(ns_id)
    i = 0 if start is None else bisect.bisect_left(keys, start)
    n = len(keys) if end is None else bisect.bisect_left(keys, end)
    for k, doc in r.scan(ns, start, end):
        while i < n and keys[i] < k:
            if d.get(keys[i]) is not None:
                yield keys[i], d[keys[i]]
            i += 1
        if i < n and keys[i] == k:
            doc = d.get(k, doc)
            i += 1
        if doc is not None:
            yield k, doc
    for k in keys[i:n]:
        if d.get(k) is not None:
            yield k, d[k]


def _cut(store: RebuiltStore, pairs, where: Callable) -> list:
    """Chunk entries for (id_key, raw) pairs in id_key order, cut at about VIRTUAL_CHUNK_BYTES; where(first, last,
    id_keys) says where RebuiltStore reads each one back."""
    out = []

    def emit(keys, digest, size):
        cid = "%s%d" % (VIRTUAL_PREFIX, len(store.ranges))
        store.ranges[cid] = where(keys[0], keys[-1], keys)
        out.append({"id": cid, "key": None, "first": keys[0], "last": keys[-1], "count": len(keys), "bytes": size,
                    "sha256": digest.digest(), "stored": 0})
    keys, digest, size = [], hashlib.sha256(), 0
    for k, doc in pairs:
        digest.update(doc)
        keys.append(k)
        size += len(doc)
        if size >= VIRTUAL_CHUNK_BYTES:
            emit(keys, digest, size)
            keys, digest, size = [], hashlib.sha256(), 0
    if keys:
        emit(keys, digest, size)
    return out


def _namespace(store: RebuiltStore, h: RebuildHead, r, info: dict, base: _Base | None) -> dict:
    """The manifest entry of one namespace of the rebuilt head: the base's untouched chunks, virtual ones for the rest,
    cut from the overlay (or from the head's documents, when the namespace spilled: r, a Reader of the head)."""
    ns = info["ns"]
    ns_id = r._ns_id(ns)  # pylint: disable=protected-access
    if ns_id in h.spilled:
        def part(start, end):
            return _cut(store, _merged(h, r, ns, ns_id, start, end), lambda first, last, _keys: (ns, ns_id, first, _after(last)))
    else:
        d = h.overlay.get(ns_id, {})
        live = sorted(k for k, v in d.items() if v is not None)

        def part(start, end):  # [start, end) of the sorted keys, as the head's scan
            a = 0 if start is None else bisect.bisect_left(live, start)
            b = len(live) if end is None else bisect.bisect_left(live, end)
            return _cut(store, ((k, d[k]) for k in live[a:b]), lambda _first, _last, keys: (ns_id, keys))
    if base is None:
        chunks = part(None, None)
    else:
        chunks, prev = [], None
        for i, c in enumerate(base.n["chunks"]):
            if i in base.loaded:
                chunks.extend(part(None if prev is None else _after(prev), _after(base.lasts[i])))
            else:
                chunks.append(c)
            prev = base.lasts[i]
        chunks.extend(part(_after(prev), None))  # inserted past the base's last key
    return {"ns": ns, "uuid": Binary(bytes(info["uuid"]), 4) if info.get("uuid") else None,
            "options": bytes(info["options"] or EMPTY_BSON), "indexes": [bytes(s) for s in info["indexes"]],
            "incarnation": info["incarnation"], "type": "collection", "chunks": chunks,
            "count": sum(c["count"] for c in chunks), "bytes": sum(c["bytes"] for c in chunks),
            "stored": sum(c.get("stored", 0) for c in chunks), "hash": namespace_hash(chunks)}


# ---- the fast path: replay in a child process while the untouched chunks are restored -------------------------

_PUT, _DEL, _UPD = 0, 1, 2
_F_OP, _F_NS, _F_KEY, _F_FULL, _F_DESC = events._OP, events._NS, events._KEY, events._FULL, events._DESC  # pylint: disable=protected-access
_OPS = {b"insert": _PUT, b"replace": _PUT, b"update": _UPD, b"delete": _DEL}
_KB = b"\x02kb\x00"  # a correction's first element (segments)
# kind, namespace index, range index, count, bytes, CRC-32 (of a part's data; of a namespace's parts' CRCs); then the data.
# The child computes no SHA-256: zlib takes no lock another thread of the parent could have held at the fork (OpenSSL's
# hashlib does); the parent hashes what it receives for the manifest and checks the child's CRCs against it.
_MSG = struct.Struct("<BIIQQI")
_FEED = struct.Struct("<IIQ")  # namespace index, range index, bytes: a base chunk's plaintext to the replay process
_PART, _RANGE_END, _NS_END, _DONE, _ERROR, _TOUCHED, _FALLBACK = 1, 2, 3, 4, 5, 6, 7
_WITH_DATA = (_PART, _ERROR, _TOUCHED, _FALLBACK)
_OP = struct.Struct("<IIBII")  # namespace index, range index, op, key length, payload length (_NONE: none)
_NONE = 0xFFFFFFFF


def _pack_ops(groups: dict) -> bytes:
    """prescan's groups as bytes, for the replay process (_unpack_ops)."""
    out, pack = [], _OP.pack
    for (j, r), ops in groups.items():
        for kind, key, payload in ops:
            out.append(pack(j, r, kind, len(key), _NONE if payload is None else len(payload)))
            out.append(key)
            if payload:
                out.append(payload)
    return b"".join(out)


def _unpack_ops(blob: bytes) -> dict:
    groups, pos, n, unpack, size = {}, 0, len(blob), _OP.unpack_from, _OP.size
    while pos < n:
        j, r, kind, kl, pl = unpack(blob, pos)
        pos += size
        key = blob[pos:pos + kl]
        pos += kl
        payload = None
        if pl != _NONE:
            payload = blob[pos:pos + pl]
            pos += pl
        ops = groups.get((j, r))
        if ops is None:
            ops = groups[(j, r)] = []
        ops.append((kind, key, payload))
    return groups


PREREAD_THREADS = 3
FAST_WINDOW_BYTES = 512 << 20  # the most of a window's change records (raw BSON) the fast path holds in memory


def prescan(records: list, manifest: dict) -> tuple[dict | None, str | None]:
    """({(namespace index, range index): [(op, id_key, payload)]}, None) for the window's records (segments.window),
    grouped by the base chunk whose key range each one falls in (range index len(chunks): past the last chunk), in
    order; (None, why) when the window holds anything the fast path does not replay: a DDL event, a namespace
    correction, an event on a namespace the base does not have (implicit creation) or one the scan cannot read.
    Documents are independent of each other under insert/replace/update/delete, so each range replays on its own."""
    where = {n["ns"]: (j, [bytes(c["last"]) for c in n["chunks"]]) for j, n in enumerate(manifest["namespaces"])
             if n.get("type", "collection") == "collection"}
    scan, keeps, bisect_left = events._event_fields, events.keeps, bisect.bisect_left  # pylint: disable=protected-access
    groups, where_of = {}, {}  # where_of: the bytes of an event's ns -> where[ns], or None (a namespace not kept)
    for _t, _i, raw in records:
        if type(raw) is not bytes:  # pylint: disable=unidiomatic-typecheck
            raw = bytes(raw)
        if raw[4:8] == _KB:
            try:
                doc = RawBSONDocument(raw)
                kind = doc["kb"]
                if kind != "doc":
                    return None, "a correction of a namespace (%s) in the window" % kind
                ns, key, new = doc["ns"], bytes(doc["key"]), doc["doc"]
            except Exception:  # pylint: disable=broad-except  # the sequential replay reports it
                return None, "a correction the scan cannot read"
            w = where.get(ns)
            if w is None:
                return None, "an event on a namespace the base snapshot does not have"
            op = (_PUT, key, bytes(new.raw)) if new is not None else (_DEL, key, None)
        else:
            f = scan(raw)  # the applier's own scan (Applier.apply_raw): both read an event alike
            opf = f[_F_OP] if f else None
            kind = _OPS.get(raw[opf[1] + 4:opf[2] - 1]) if opf is not None and opf[0] == 0x02 else None
            nsf = f[_F_NS] if kind is not None else None
            if nsf is None or nsf[0] != 0x03:
                return None, "an event other than insert, replace, update or delete (or one the scan cannot read)"
            ns_raw = raw[nsf[1]:nsf[2]]
            w = where_of.get(ns_raw, _ABSENT)
            if w is _ABSENT:
                d = RawBSONDocument(ns_raw)
                db, coll = d.get("db"), d.get("coll")
                if not isinstance(db, str) or not isinstance(coll, str):
                    return None, "an event the scan cannot read"
                ns = "%s.%s" % (db, coll)
                w = where_of[ns_raw] = where.get(ns, _ABSENT) if keeps(db, ns) else None
            if w is None:
                continue  # a namespace the backup does not keep: the applier ignores it
            if w is _ABSENT:
                return None, "an event on a namespace the base snapshot does not have"
            keyf = f[_F_FULL if kind == _PUT else _F_KEY]
            descf = f[_F_DESC] if kind == _UPD else (0x03,)
            if keyf is None or keyf[0] != 0x03 or descf is None or descf[0] != 0x03:
                return None, "an event the scan cannot read"
            doc = raw[keyf[1]:keyf[2]]
            op = (kind, id_key_from_document(doc), doc if kind == _PUT else raw[descf[1]:descf[2]] if kind == _UPD else None)
        jr = (w[0], bisect_left(w[1], op[1]))
        ops = groups.get(jr)
        if ops is None:
            groups[jr] = [op]
        else:
            ops.append(op)
    return groups, None


def _replay_range(plain: bytes | None, ops: list) -> dict:
    """{id_key: raw} of one key range: the base chunk's documents (plain) with ops applied as the applier applies them."""
    docs = {id_key_from_document(d): d for d in split_bson_docs(plain)} if plain else {}
    update = events.apply_update_description
    for kind, key, payload in ops:
        if kind == _PUT:
            docs[key] = payload
        elif kind == _DEL:
            docs.pop(key, None)
        else:
            stored = docs.get(key)
            if stored is not None:
                try:
                    docs[key] = update(stored, payload)
                except (NotApplicable, UncertainOrder):
                    pass  # the capture re-copied the document from the source: its "doc" correction follows in the range
    return docs


def _read_exact(f, size: int) -> bytes | None:
    data = f.read(size)
    return data if len(data) == size else None


def _child(inp: int, out_fd: int, manifest: dict, records: list, half: int) -> None:
    """The replay process; never returns. It pre-scans records[half:] (the parent scans records[:half] meanwhile) and
    sends which ranges they touch (or why the fast path cannot be taken), then takes the parent's pre-scan of
    records[:half] from inp, and for each namespace in order replays each touched range (its base chunk's plaintext
    comes from the parent on inp too) and sends it cut as virtual chunks are (about VIRTUAL_CHUNK_BYTES), then the
    namespace's totals."""
    code = 1
    out = os.fdopen(out_fd, "wb", buffering=1 << 20)
    try:
        gc.disable()  # short-lived, and its objects form no cycles
        send = out.write
        later, why = prescan(records[half:], manifest)
        if later is None:
            what = why.encode("utf-8")
            send(_MSG.pack(_FALLBACK, 0, 0, 0, len(what), 0) + what)
            out.flush()
            code = 0
            return
        pairs = struct.pack("<%dI" % (2 * len(later)), *[x for jr in sorted(later) for x in jr])
        send(_MSG.pack(_TOUCHED, 0, 0, len(later), len(pairs), 0) + pairs)
        out.flush()
        base = os.fdopen(inp, "rb", buffering=1 << 20)
        head = _read_exact(base, _FEED.size)  # the parent's pre-scan of records[:half]: they come first
        blob = _read_exact(base, _FEED.unpack(head)[2]) if head is not None else None
        if blob is None:
            raise EOFError("the parent's pre-scan")
        groups = _unpack_ops(blob)
        del blob
        for jr, ops in later.items():
            groups.setdefault(jr, []).extend(ops)
        for j, n in enumerate(manifest["namespaces"]):
            chunks, entries = n["chunks"], []
            for r in range(len(chunks) + 1):
                ops = groups.get((j, r))
                if ops is None:
                    if r < len(chunks):
                        entries.append(chunks[r])
                    continue
                plain = None
                if r < len(chunks):  # the base chunk, from the parent (it reads the store)
                    head = _read_exact(base, _FEED.size)
                    if head is None or _FEED.unpack(head)[:2] != (j, r):
                        raise EOFError("base chunk")
                    plain = _read_exact(base, _FEED.unpack(head)[2])
                    if plain is None:
                        raise EOFError("base chunk")
                docs = _replay_range(plain, ops)
                keys = sorted(docs)
                a = 0
                while a < len(keys):
                    b, size = a, 0
                    while b < len(keys) and size < VIRTUAL_CHUNK_BYTES:
                        size += len(docs[keys[b]])
                        b += 1
                    data = b"".join([docs[k] for k in keys[a:b]])
                    crc = zlib.crc32(data)
                    send(_MSG.pack(_PART, j, r, b - a, len(data), crc))
                    send(data)
                    entries.append({"count": b - a, "bytes": len(data), "crc": crc})
                    a = b
                send(_MSG.pack(_RANGE_END, j, r, 0, 0, 0))
                out.flush()  # the parent may be waiting for this range now
            send(_MSG.pack(_NS_END, j, 0, sum(c["count"] for c in entries), sum(c["bytes"] for c in entries),
                           _combine([c["crc"] for c in entries if "crc" in c])))
        send(_MSG.pack(_DONE, 0, 0, 0, 0, 0))
        out.flush()
        code = 0
    except BaseException as e:  # pylint: disable=broad-except  # reported by kind only: a message could hold data
        try:
            what = type(e).__name__.encode("ascii", "replace")
            out.write(_MSG.pack(_ERROR, 0, 0, 0, len(what), 0) + what)
            out.flush()
        except BaseException:  # pylint: disable=broad-except  # the parent sees the pipe end
            pass
    finally:
        os._exit(code)  # pylint: disable=protected-access  # nothing of the parent's (atexit, buffers, tempdirs) runs here


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "exit status %d" % os.waitstatus_to_exitcode(status)


class _Fast:
    """The parent's side of the fast path: the replay process, the pipe it sends on (checked as it is read) and the
    thread that feeds it the touched base chunks."""

    def __init__(self, job_store: JobStore, keys: Keys, manifest: dict, records: list) -> None:
        self.job_store, self.keys, self.manifest, self.records = job_store, keys, manifest, records
        self.base_chunks = [list(n["chunks"]) for n in manifest["namespaces"]]
        self.pid = self.pipe = self.feed = self.feeder = self.image = self.entry = None
        self.touched, self.parts, self.claims = set(), {}, {}  # parts: (j, r) -> [entry]; claims: j -> the child's totals
        self.finished, self.done, self.used, self.status, self.feed_error = set(), False, False, None, None
        self.loaded = 0  # touched base chunks

    def start(self) -> str | None:
        """Fork the replay process and pre-scan the first half of the window while it scans the second; None when
        the fast path runs (then feed it), else why not (the child is stopped). None of this module's threads run at
        the fork; another library's may (a MongoDB client's monitors), which is safe because the child takes no lock
        such a thread could hold: no OpenSSL (CRC-32 from zlib), no store, KMIP, logging or shared file object."""
        half = len(self.records) // 2
        rfd, wfd = os.pipe()
        feed_r, feed_w = os.pipe()
        gc.freeze()  # the collector then leaves the objects both processes share alone: fewer copy-on-write faults
        try:
            self.pid = os.fork()
        finally:
            if self.pid != 0:
                gc.unfreeze()
        if self.pid == 0:  # pragma: no cover (the child)
            os.close(rfd)
            os.close(feed_w)
            _child(feed_r, wfd, self.manifest, self.records, half)
        os.close(wfd)
        os.close(feed_r)
        self.pipe, self.feed = os.fdopen(rfd, "rb", buffering=1 << 20), os.fdopen(feed_w, "wb", buffering=0)
        first, why = prescan(self.records[:half], self.manifest)
        self.records = None  # the child has its copy
        if first is None:
            return why
        kind, _j, _r, data = self._message()
        if kind == _FALLBACK:
            return data.decode("utf-8", "replace")
        if kind != _TOUCHED:
            raise self._error("the replay process said something unexpected")
        pairs = struct.unpack("<%dI" % (len(data) // 4), data)
        self.touched = set(first) | {(pairs[x], pairs[x + 1]) for x in range(0, len(pairs), 2)}
        loads = sorted((j, r) for j, r in self.touched if r < len(self.base_chunks[j]))
        self.feeder = threading.Thread(target=self._feed, args=(first, loads), name="kmipbackup-pitr-feed", daemon=True)
        self.feeder.start()
        self.loaded = len(loads)
        return None

    def _feed(self, first: dict, loads: list) -> None:
        """The parent's pre-scan (packed here, while the restore starts), then the touched base chunks to the replay
        process, in its order (a thread: reads and writes release the GIL)."""
        try:
            ops = _pack_ops(first)
            del first
            self.feed.write(_FEED.pack(_NONE, _NONE, len(ops)))
            self.feed.write(ops)
            del ops
            with concurrent.futures.ThreadPoolExecutor(PREREAD_THREADS, thread_name_prefix="kmipbackup-pitr") as pool:
                todo, ahead = iter(loads), collections.deque()
                while True:
                    while len(ahead) < 2 * PREREAD_THREADS:  # a few chunks in flight, not the whole snapshot
                        jr = next(todo, None)
                        if jr is None:
                            break
                        ahead.append((jr, pool.submit(self.job_store.read_chunk, self.base_chunks[jr[0]][jr[1]], self.keys)))
                    if not ahead:
                        break
                    (j, r), f = ahead.popleft()
                    plain = f.result()
                    self.feed.write(_FEED.pack(j, r, len(plain)))
                    self.feed.write(plain)
        except BrokenPipeError:
            pass  # the child ended: the parent learns why from its pipe
        except BaseException as e:  # pylint: disable=broad-except  # a tampered base chunk: raised by the parent
            self.feed_error = e
        finally:
            try:
                self.feed.close()
            except OSError:
                pass

    def _error(self, what: str) -> Exception:
        if self.feed_error is not None:
            return self.feed_error  # what stopped the child: a base chunk that did not authenticate, the store gone
        return RestoreError("The replay of this point-in-time restore failed (%s); nothing was published and the target was "
                            "put back as it was: restore again." % what)

    def _died(self):
        if self.feeder is not None:
            self.feeder.join()
        return self._error("the replay process ended without its result: %s" % _status_text(self.wait()))

    def _message(self):
        head = self.pipe.read(_MSG.size)
        if len(head) < _MSG.size:
            raise self._died()
        kind, j, r, count, size, crc = _MSG.unpack(head)
        data = self.pipe.read(size) if kind in _WITH_DATA else None  # (a namespace's end: size is its total)
        if data is not None and len(data) < size:
            raise self._died()
        if kind == _ERROR:
            if self.feeder is not None:
                self.feeder.join()
            raise self._error("the replay process raised %s" % data.decode("ascii", "replace"))
        if kind == _PART:
            if zlib.crc32(data) != crc or _count_docs(data) != count:
                raise crypto.integrity_error("point-in-time image", self.entry["snapshot_id"],
                                             "has a range whose documents do not match what the replay process says")
            self.parts.setdefault((j, r), []).append({"id": "%s%d.%d" % (VIRTUAL_PREFIX, j, r), "key": None, "count": count,
                                                      "bytes": size, "sha256": hashlib.sha256(data).digest(), "stored": 0,
                                                      "crc": crc})
        elif kind == _NS_END:
            self.claims[j] = (count, size, crc)
        elif kind == _DONE:
            self.done = True
        return kind, j, r, data

    def range_parts(self, j: int, r: int) -> list:
        """[(entry, data)] of touched range r of namespace j: the child's next messages for it (others' are counted)."""
        out = []
        while True:
            kind, jj, rr, data = self._message()
            if (jj, rr) == (j, r) and kind == _PART:
                out.append((self.parts[(j, r)][-1], data))
            elif (jj, rr) == (j, r) and kind == _RANGE_END:
                return out
            elif kind == _DONE:
                raise self._error("the replay process skipped a range")

    def finish_namespace(self, j: int) -> dict:
        """Namespace j's manifest entry with its final chunks and totals, once the child sent them all and they agree."""
        while j not in self.claims:
            if self._message()[0] == _DONE:
                raise self._error("the replay process skipped a namespace")
        n = self.manifest["namespaces"][j]
        if j not in self.finished:
            chunks = []
            for r in range(len(self.base_chunks[j]) + 1):
                if (j, r) in self.touched:
                    chunks.extend(self.parts.get((j, r), []))
                elif r < len(self.base_chunks[j]):
                    chunks.append(self.base_chunks[j][r])
            mine = (sum(c["count"] for c in chunks), sum(c["bytes"] for c in chunks),
                    _combine([c["crc"] for c in chunks if "crc" in c]))
            if mine != self.claims[j]:
                raise crypto.integrity_error("point-in-time image", self.entry["snapshot_id"], "does not add up to the totals "
                                             "the replay process gives for namespace #%d" % (j + 1))
            n.update(chunks=chunks, count=mine[0], bytes=mine[1], hash=namespace_hash(chunks),
                     stored=sum(c.get("stored", 0) for c in chunks))
            self.finished.add(j)
        return n

    def finish(self) -> None:
        """Every namespace's totals (the image's, for restoreInfo) and the child's clean exit, before anything is
        published."""
        while not self.done:
            self._message()
        for j in range(len(self.manifest["namespaces"])):
            self.finish_namespace(j)
        status = self.wait()
        self.feeder.join()
        if self.feed_error is not None:
            raise self.feed_error
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            raise self._error("the replay process ended with %s" % _status_text(status))
        namespaces = self.manifest["namespaces"]
        self.entry.update(doc_count=sum(n["count"] for n in namespaces), data_bytes=sum(n["bytes"] for n in namespaces))

    def wait(self) -> int:
        if self.status is None:
            self.status = os.waitpid(self.pid, 0)[1]
        return self.status

    def close(self) -> None:
        if self.pid is None:
            return
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)  # not needed (never read, or a failed restore): it holds plaintext
            except ProcessLookupError:
                pass
            self.wait()
        if self.feeder is not None:
            self.feeder.join()  # the child is gone: its writes fail at once
        else:
            self.feed.close()
        self.pipe.close()


def _combine(crcs: list) -> int:
    """One CRC-32 for a namespace's parts, from theirs in order."""
    return zlib.crc32(struct.pack("<%dI" % len(crcs), *crcs))


def _count_docs(data: bytes) -> int:
    count, pos, n, unpack = 0, 0, len(data), struct.Struct("<i").unpack_from
    while pos < n:
        size = unpack(data, pos)[0]
        if size < 5:
            return -1
        pos += size
        count += 1
    return count if pos == n else -1


class _ChildSource(restore.SnapshotSource):
    """restore.py's source for a fast-path image: the base's untouched chunks read from the store as a plain restore
    reads them (same threads, same checks) and, in their place, the touched ranges as the replay process sends them;
    a namespace's totals are checked (and set in its manifest entry) at its end, the child's exit status at the end."""

    def __init__(self, fast: _Fast, keys: Keys, verify: bool) -> None:
        super().__init__(fast.job_store, keys, fast.entry["snapshot_id"], verify)
        self.fast = fast

    def prepare(self, selected):
        if self.fast.used:
            raise RestoreError("This point-in-time image was restored already: rebuild it to restore it again.")
        self.fast.used = True
        super().prepare([(i, {"chunks": self.fast.base_chunks[i - 1]}, db, coll) for i, _n, db, coll in selected])

    def _items(self, selected):
        out = []
        for k, (i, _n, _db, _coll) in enumerate(selected):
            chunks = self.fast.base_chunks[i - 1]
            for r in range(len(chunks) + 1):
                if (i - 1, r) in self.fast.touched:
                    out.append((k, {"range": (i - 1, r), "bytes": 0}))
                elif r < len(chunks):
                    out.append((k, chunks[r]))
        return out

    def _fetch(self, pool, c):
        return None if "range" in c else super()._fetch(pool, c)

    def _take(self, c, fetched):
        return self.fast.range_parts(*c["range"]) if "range" in c else super()._take(c, fetched)

    def _end(self, selected, k, counts, hashes, name):
        self.fast.finish_namespace(selected[k][0] - 1)
        return super()._end(selected, k, counts, hashes, name)

    def _done(self, selected, name):
        self.fast.finish()


def _fast_image(job_store: JobStore, keys: Keys, plan: dict, manifest: dict, records: list, used: int) -> tuple[Image | None, str | None]:
    """(the image restore.execute reads through _ChildSource, None) with the replay process running, or (None, why
    the fast path is not taken)."""
    for key_id in sorted({c["key"] for n in manifest["namespaces"] for c in n["chunks"] if c.get("key")}):
        keys.key(key_id)  # every data key unwrapped before the fork: neither process asks the KMIP server mid-way
    fast = _Fast(job_store, keys, manifest, records)
    base = plan["snapshot"]
    fast.entry = entry = dict(base)
    entry.update(snapshot_id=point_id(base["snapshot_id"], plan["point"]), cluster_time=list(plan["point"]),
                 base_snapshot_id=base["snapshot_id"], restore_info_lines=info_lines(plan))
    try:
        why = fast.start()
    except BaseException:
        fast.close()
        raise
    if why is not None:
        fast.close()
        return None, why
    fast.manifest = {"format": 1, "job": job_store.job, "snapshot_id": entry["snapshot_id"], "cluster_time": list(plan["point"]),
                     "namespaces": [{"ns": n["ns"], "uuid": n.get("uuid"), "options": bytes(n["options"] or EMPTY_BSON),
                                     "indexes": [bytes(s) for s in n["indexes"]], "incarnation": n.get("incarnation"),
                                     "type": n.get("type", "collection"), "chunks": list(n["chunks"]),
                                     # the base's totals until the namespace's end (_Fast.finish_namespace)
                                     "count": n["count"], "bytes": n["bytes"], "stored": n.get("stored", 0),
                                     "hash": n["hash"]} for n in manifest["namespaces"]]}
    store = RebuiltStore(job_store, None, entry)
    store.fast = fast
    events_n = sum(1 for _t, _i, raw in records if raw[4:8] != _KB)
    image = Image(entry, fast.manifest, store, {"events": events_n, "records": len(records), "segments": used}, fast.loaded)
    image.path, image.child_pid = "overlap", fast.pid
    return image, None


def point_id(base_snapshot_id: str, point: tuple) -> str:
    """The id a point-in-time restore goes by (restoreInfo, the MongoDB target's marker): base snapshot and point."""
    return "%s@%d.%d" % (base_snapshot_id, point[0], point[1])


def info_lines(plan: dict) -> list:
    """restoreInfo.txt's lines about the point, the base snapshot and the segments used."""
    t, i = plan["point"]
    segs = plan["segments"]
    lines = ["Restore Type: point in time",
             "Point In Time: %s (Timestamp(%d, %d))" % (iso_of(t), t, i),
             "Base Snapshot ID: %s" % plan["snapshot"]["snapshot_id"],
             "Base Snapshot Cluster Time: %d %d" % tuple(plan["snapshot"]["cluster_time"]),
             "Segments: %d" % len(segs)]
    if segs:
        lines.append("Segment IDs: %s" % ", ".join(s["name"] for s in segs))
    return lines


def iso_of(t: int) -> str:
    """The UTC time (ISO, whole seconds) of a cluster time's seconds."""
    return segments.ct_time((t, 0))


class Image:
    """A rebuilt image (what rebuild() yields): entry (a catalog entry for restore.py: the base's, with the point's
    id, cluster time and totals), manifest, store (a RebuiltStore for restore.execute), counts of the replay."""

    def __init__(self, entry, manifest, store, replayed, loaded_chunks):
        self.entry, self.manifest, self.store = entry, manifest, store
        self.replayed, self.loaded_chunks = replayed, loaded_chunks
        self.path, self.why, self.child_pid = "sequential", None, None  # which path rebuilt it, and why not the fast one


@contextlib.contextmanager
def rebuild(job_store: JobStore, keys: Keys, plan: dict, replay: Callable | None = None, work_dir: str | None = None,
            progress: Callable | None = None, overlap: bool = True) -> Iterator[Image]:
    """The image at plan["point"] (segments.plan_point's plan). Every segment is read and authenticated first. Then,
    when the window holds only inserts, replaces, updates, deletes and document corrections on the base's namespaces
    (prescan) and overlap is on, the fast path: a forked process replays each touched key range while
    restore.execute restores the untouched chunks (image.path "overlap"). Otherwise (image.why says why) the base
    snapshot is loaded lazily into a temporary encrypted head, the segments replayed (replay: segments.replay) and the
    manifest built (image.path "sequential"). The child, or the head and its folder, are gone when the context ends."""
    base = plan["snapshot"]
    manifest = job_store.read_manifest(base["snapshot_id"], keys, base.get("manifest_sha256"))
    why = "a replay function was given" if replay is not None else None
    read = None
    if replay is None:
        # the fast path holds the window's records in memory: past FAST_WINDOW_BYTES the rest streams, sequentially
        rest, read, size = segments.read_segments(job_store, keys, plan["segments"]), [], 0
        for item in rest:
            read.append(item)
            size += sum(len(r[2]) for r in item[1])
            if size > FAST_WINDOW_BYTES:
                why, read = "the window holds more than %d MiB of changes" % (FAST_WINDOW_BYTES >> 20), itertools.chain(read, rest)
                break
    if read is not None and why is None:
        records, used = segments.window(plan, read)
        image, why = None, None if overlap else "overlap is off"
        if why is None:
            image, why = _fast_image(job_store, keys, plan, manifest, records, used)
        if image is not None:
            read = records = None  # the child has its copy: not kept through the restore
            if progress is not None:
                progress(image.replayed["events"], used, len(plan["segments"]))
            try:
                yield image
            finally:
                image.store.fast.close()
            return
    replay = replay or segments.replay
    folder = tempfile.mkdtemp(prefix="kmipbackup-pitr-", dir=work_dir)  # 0700
    h = None
    try:
        h = RebuildHead(os.path.join(folder, "head.db"), os.urandom(32), job_store, keys, manifest)
        if read is not None:
            replayed = replay(h, job_store, keys, plan, progress=progress, read=read)
        else:
            replayed = replay(h, job_store, keys, plan, progress=progress)
        entry = dict(base)
        entry.update(snapshot_id=point_id(base["snapshot_id"], plan["point"]), cluster_time=list(plan["point"]),
                     base_snapshot_id=base["snapshot_id"], restore_info_lines=info_lines(plan))
        store = RebuiltStore(job_store, h, entry)
        with h.read(flush=False) as r:
            namespaces = [_namespace(store, h, r, info, h.bases.get(info["ns"])) for info in r.namespaces()]
        entry.update(doc_count=sum(n["count"] for n in namespaces), data_bytes=sum(n["bytes"] for n in namespaces),
                     namespaces=len(namespaces))
        image_manifest = {"format": 1, "job": job_store.job, "snapshot_id": entry["snapshot_id"],
                          "cluster_time": list(plan["point"]), "namespaces": namespaces}
        image = Image(entry, image_manifest, store, replayed, h.loaded_chunks)
        image.why = why
        yield image
    finally:
        if h is not None:
            h.close()
        shutil.rmtree(folder, ignore_errors=True)
