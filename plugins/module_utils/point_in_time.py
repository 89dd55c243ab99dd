# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restoring to a point in time (no Ansible imports). PRIVATE to the collection.

segments.plan_point picks the newest snapshot at or before the point (the base) and the change segments after
it; rebuild() reads and authenticates every one of them, then gives the image at the point by one of two paths.

The fast path, for a window of inserts, replaces, updates, deletes and document corrections on the base's namespaces
(pitr_replay.prescan): a replay process replays each touched base chunk's key range on its own, in memory, in restore
order, and streams the results over a pipe while restore.execute restores the untouched chunks (_ChildSource); each
range is hashed and counted by the parent, each namespace's totals checked at its end, the child's exit status before
anything is published. The replay process is a fresh interpreter (pitr_replay.main), started before the segments are
read so that its start-up overlaps their reading; it holds no key and touches no store or file: it is sent the
base's chunk layout (last keys, counts, sizes), half of each segment's records in the window (once that segment
authenticated and chain-checked: both processes pre-scan while the next segments are read; a later segment that fails
stops the restore and the child) and the touched base chunks' plaintext. The parent waits for it at most
child_timeout seconds at a time (not counting a store read it waits on), and kills it on any failure.
docs/internals.md, "Restore to a point", has the protocol.

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
import hashlib
import itertools
import math
import os
import queue
import select
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from typing import TYPE_CHECKING, Callable, Iterator

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import child_process, crypto, pitr_replay, restore, segments
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import RestoreError, RestoreTimeout
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.head import Head
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.rawbson import EMPTY_BSON, doc_offsets, id_key_from_document, split_bson_docs
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.storenames import namespace_hash

if TYPE_CHECKING:
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.store import JobStore, Keys

try:
    from bson.binary import Binary
except ImportError:  # pragma: no cover (restore.py reports the missing package)
    Binary = None

VIRTUAL_PREFIX = "head:"  # never a store chunk id (64 hex digits)
VIRTUAL_CHUNK_BYTES = pitr_replay.VIRTUAL_CHUNK_BYTES  # the replay process cuts its ranges alike
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


# ---- the fast path: replay in a spawned process while the untouched chunks are restored --------------------------

PREREAD_THREADS = 3
FAST_WINDOW_BYTES = 512 << 20  # the most of a window's change records (raw BSON) the fast path holds in memory
CHILD_TIMEOUT = 300.0  # seconds the parent waits for the replay process's next message (or its exit) before it kills it


def _status_text(returncode: int) -> str:
    return "killed by signal %d" % -returncode if returncode < 0 else "exit status %d" % returncode


class _Silent(Exception):
    """The replay process sent nothing within the timeout (args[0]: True when the restore's deadline cut the wait short)."""


class _Fast:
    """The parent's side of the fast path: the replay process (a fresh interpreter running pitr_replay.main), the pipe
    it sends on (read with a timeout, checked as it is read) and the threads that feed it."""

    def __init__(self, job_store: JobStore, keys: Keys, timeout: float = CHILD_TIMEOUT, deadline: tuple | None = None) -> None:
        self.job_store, self.keys, self.timeout, self.deadline = job_store, keys, timeout, deadline
        self.manifest = self.base_chunks = self.entry = None
        self.proc = self.pid = self.stdin = self.poll = self.sender = self.feeder = self.ended = self.outbox = None
        self.touched, self.parts, self.claims = set(), {}, {}  # parts: (j, r) -> [entry]; claims: j -> the child's totals
        self.finished, self.done, self.used, self.status, self.feed_error = set(), False, False, None, None
        self.loaded = 0  # touched base chunks
        self.fed = None  # (a base chunk read from the store is awaited, when the last one came): see _read

    def spawn(self) -> str | None:
        """Start the replay process: a fresh interpreter that imports pitr_replay as this process does (its sys.path
        in the environment, the only variable passed) and waits for its input; its start-up overlaps the reading of
        the segments. None, or why it could not start."""
        try:
            self.proc = child_process.spawn(pitr_replay.BOOTSTRAP)  # close() ends it
        except OSError as e:
            return "the replay process could not be started (%s)" % (e.strerror or type(e).__name__)
        self.pid, self.stdin = self.proc.pid, self.proc.stdin  # stdin: the threads' own, as close() may drop proc first
        self.poll = select.poll()
        self.poll.register(self.proc.stdout.fileno(), select.POLLIN)
        return None

    def begin(self, manifest: dict) -> None:
        """Get ready to pre-scan the window segment by segment (add), against the base's manifest."""
        self.manifest = manifest
        self.base_chunks = [list(n["chunks"]) for n in manifest["namespaces"]]
        self.outbox = queue.SimpleQueue()
        self.mine, self.next_part, self.records, self.events, self.post_images = [], 0, 0, 0, 0

    def add(self, records: list) -> str | None:
        """One segment's records in the window ([(t, i, raw)], authenticated and chain-checked): the second half goes to
        the replay process (a sender thread writes it) and the parent pre-scans the first half meanwhile, so both
        pre-scan while the next segments are read. None, or why the fast path cannot be taken."""
        self._start_sender()  # with the first segment that authenticated: nothing goes to the child before
        self.records += len(records)
        self.events += sum(1 for _t, _i, raw in records if raw[4:8] != pitr_replay._KB)  # pylint: disable=protected-access
        posts = len(records)
        while posts and segments.is_post(records[posts - 1][2]):
            posts -= 1
        k, half = self.next_part, len(records) // 2
        if posts < len(records):  # the segment ends in the window: its post-images stand for its records, and the
            records, half = records[posts:], 0  # replay process scans them all (about 1 us a document) while this one reads
            self.post_images += 1
        self.next_part += 2
        if half < len(records):  # part k + 1, the child's: joined and written by the sender thread
            self.outbox.put((pitr_replay._RECORDS, k + 1, [r[2] for r in records[half:]]))  # pylint: disable=protected-access
        groups, why = pitr_replay.prescan([r[2] for r in records[:half]], self.manifest)
        if groups is None:
            return why
        if groups:
            self.mine.append((k, groups))
        return None

    def _start_sender(self) -> None:
        """The sender thread started, the layout first in its queue (once)."""
        if self.sender is None:
            self.sender = self._thread(self._send)
            self.outbox.put((pitr_replay._NONE, pitr_replay._NONE, [pitr_replay.layout(self.manifest)]))  # pylint: disable=protected-access

    def end_scan(self) -> str | None:
        """The window's last segment added: the replay process's answer, which ranges its parts touch (or why not the
        fast path); with them the touched set, and the feeder thread started. None when the fast path runs."""
        self._start_sender()  # an empty window: the layout alone
        self.outbox.put((pitr_replay._NONE, pitr_replay._NONE, []))  # pylint: disable=protected-access  # the records end
        self.outbox.put(None)
        try:
            kind, _j, _r, data = self._message()
        except RestoreTimeout:
            raise  # the restore's own deadline passed: not a reason to start over sequentially
        except RestoreError:  # it could not start (no usable interpreter, an import failed) or died: nothing is lost yet
            return "the replay process failed before its pre-scan: %s" % self.ended
        if kind == pitr_replay._FALLBACK:  # pylint: disable=protected-access
            return data.decode("utf-8", "replace")
        if kind != pitr_replay._TOUCHED:  # pylint: disable=protected-access
            raise self._error("the replay process said something unexpected")
        pairs = struct.unpack("<%dI" % (len(data) // 4), data)
        self.touched = {(pairs[x], pairs[x + 1]) for x in range(0, len(pairs), 2)}
        for _k, groups in self.mine:
            self.touched.update(groups)
        loads = sorted((j, r) for j, r in self.touched if r < len(self.base_chunks[j]))
        self.feeder = self._thread(self._feed, loads)
        self.loaded = len(loads)
        return None

    def _thread(self, target, *args):
        t = threading.Thread(target=target, args=args, name="kmipbackup-pitr-feed", daemon=True)
        t.start()
        return t

    def _write(self, j: int, r: int, data: bytes) -> None:
        for part in (pitr_replay._FEED.pack(j, r, len(data)), data):  # pylint: disable=protected-access
            view = memoryview(part)
            while view:
                view = view[self.stdin.write(view):]  # an unbuffered pipe: a write may be partial

    def _send(self) -> None:
        """The layout and the child's parts of the records, as add() queues them, until None (a thread: the parent
        pre-scans meanwhile, and a stopped child cannot block it). Once a write fails (the child ended: the parent
        learns why from its pipe) the rest is dropped."""
        gone = False
        while True:
            item = self.outbox.get()
            if item is None:
                return
            if not gone:
                try:
                    self._write(item[0], item[1], b"".join(item[2]))
                except OSError:
                    gone = True

    def _feed(self, loads: list) -> None:
        """The parent's parts of the pre-scan (packed here, while the restore starts), then the touched base chunks to
        the replay process, in its order (a thread: reads and writes release the GIL)."""
        try:
            self.sender.join()  # the records first
            for k, groups in self.mine:
                self._write(pitr_replay._PRESCANNED, k, pitr_replay.pack_ops(groups))  # pylint: disable=protected-access
            self.mine = None
            self._write(pitr_replay._NONE, pitr_replay._NONE, b"")  # pylint: disable=protected-access
            pool = concurrent.futures.ThreadPoolExecutor(PREREAD_THREADS, thread_name_prefix="kmipbackup-pitr")
            try:
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
                    self.fed = (True, None)  # the child may wait on this read: its silence is not counted meanwhile
                    data = f.result()
                    self.fed = (False, time.monotonic())
                    self._write(j, r, data)
                    del data
            finally:
                pool.shutdown(wait=False, cancel_futures=True)  # stopped early: reads in flight are not waited for
        except BrokenPipeError:
            pass  # the child ended: the parent learns why from its pipe
        except BaseException as e:  # pylint: disable=broad-except  # a tampered base chunk: raised by the parent
            self.feed_error = e
        finally:
            self.fed = (False, time.monotonic())  # no read awaited any more (one that failed too)
            self.sender.join()
            try:
                self.stdin.close()  # its input ends: a child still waiting for a base chunk reports EOFError
            except OSError:
                pass

    def _error(self, what: str) -> Exception:
        if self.feed_error is not None:
            return self.feed_error  # what stopped the child: a base chunk that did not authenticate, the store gone
        return RestoreError("The replay of this point-in-time restore failed (%s); nothing was published and the target was "
                            "put back as it was: restore again." % what)

    def _read(self, size: int) -> bytes | None:
        """size bytes from the child (None: its output ended first); _Silent when it sends nothing for timeout s, counted
        from the later of this call, its last bytes and the last base chunk it was sent, and not while the feeder waits
        for a base chunk from the store (the child may be waiting for it: a slow store is not a hung child)."""
        parts, fd = [], self.proc.stdout.fileno()
        since = time.monotonic()
        while size:
            now, fed = time.monotonic(), self.fed
            if fed is not None:
                since = now if fed[0] else max(since, fed[1])
            wait, late = since + self.timeout - now, False
            if self.deadline is not None and self.deadline[0] - now < wait:  # the restore's own timeout:
                wait, late = self.deadline[0] - now, True  # no wait on the child outlasts it
            if not self.poll.poll(max(0, math.ceil(wait * 1000))):  # rounded up: an empty poll means wait has passed
                fed = self.fed
                if not late and fed is not None and (fed[0] or fed[1] > since):
                    continue  # a base chunk came from the store meanwhile, or is still coming: the silence counts later
                raise _Silent(late)
            data = os.read(fd, size)  # never more than asked for: nothing to keep for the next read
            if not data:
                return None
            parts.append(data)
            size -= len(data)
            since = time.monotonic()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _remaining(self) -> float | None:
        """Seconds to the restore's deadline (None: no deadline)."""
        return None if self.deadline is None else max(0.0, self.deadline[0] - time.monotonic())

    def _ended(self, what: str, grace: float = 1) -> Exception:
        """The child ended early (grace: the seconds its exit may take) or stopped answering (0): make sure it is
        gone, then say why."""
        self.stop(grace)
        if self.feeder is not None:
            self.feeder.join(self._remaining())  # it may be in a store read that outlasts the restore's deadline
        self.ended = what % _status_text(self.status)
        return self._error(self.ended)

    def _message(self):
        try:
            head = self._read(pitr_replay._MSG.size)  # pylint: disable=protected-access
            if head is None:
                raise self._ended("the replay process ended without its result: %s")
            kind, j, r, count, size, crc = pitr_replay._MSG.unpack(head)  # pylint: disable=protected-access
            data = self._read(size) if kind in pitr_replay._WITH_DATA else None  # pylint: disable=protected-access
        except _Silent as e:
            if e.args[0]:  # the restore's deadline, not the child's silence, ended the wait
                self._ended("the restore's timeout passed (%s)", 0)
                raise RestoreTimeout("The restore ran past its timeout of %s s and was stopped; the target was put back as it "
                                     "was: restore again with a longer timeout (restore.yml: restore_timeout)."
                                     % self.deadline[1]) from None
            raise self._ended("the replay process sent nothing for %g s and was stopped (%%s)" % self.timeout, 0) from None
        if data is None and kind in pitr_replay._WITH_DATA:  # pylint: disable=protected-access
            raise self._ended("the replay process ended without its result: %s")
        if kind == pitr_replay._ERROR:  # pylint: disable=protected-access
            raise self._ended("the replay process raised %s (%%s)" % data.decode("ascii", "replace"))
        if kind == pitr_replay._PART:  # pylint: disable=protected-access
            offs = doc_offsets(data)
            if zlib.crc32(data) != crc or offs is None or len(offs) - 1 != count:
                raise crypto.integrity_error("point-in-time image", self.entry["snapshot_id"],
                                             "has a range whose documents do not match what the replay process says")
            self.parts.setdefault((j, r), []).append({"id": "%s%d.%d" % (VIRTUAL_PREFIX, j, r), "key": None, "count": count,
                                                      "bytes": size, "sha256": hashlib.sha256(data).digest(), "stored": 0,
                                                      "crc": crc})
        elif kind == pitr_replay._NS_END:  # pylint: disable=protected-access
            self.claims[j] = (count, size, crc)
        elif kind == pitr_replay._DONE:  # pylint: disable=protected-access
            self.done = True
        return kind, j, r, data

    def range_parts(self, j: int, r: int) -> list:
        """[(entry, data)] of touched range r of namespace j: the child's next messages for it (others' are counted)."""
        out = []
        while True:
            kind, jj, rr, data = self._message()
            if (jj, rr) == (j, r) and kind == pitr_replay._PART:  # pylint: disable=protected-access
                out.append((self.parts[(j, r)][-1], data))
            elif (jj, rr) == (j, r) and kind == pitr_replay._RANGE_END:  # pylint: disable=protected-access
                return out
            elif kind == pitr_replay._DONE:  # pylint: disable=protected-access
                raise self._error("the replay process skipped a range")

    def finish_namespace(self, j: int) -> dict:
        """Namespace j's manifest entry with its final chunks and totals, once the child sent them all and they agree."""
        while j not in self.claims:
            if self._message()[0] == pitr_replay._DONE:  # pylint: disable=protected-access
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
                    pitr_replay.combine([c["crc"] for c in chunks if "crc" in c]))
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
        try:
            self.status = self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            raise self._ended("the replay process did not exit after its result (%s)") from None
        self.feeder.join()
        if self.feed_error is not None:
            raise self.feed_error
        if self.status != 0:
            raise self._error("the replay process ended with %s" % _status_text(self.status))
        namespaces = self.manifest["namespaces"]
        self.entry.update(doc_count=sum(n["count"] for n in namespaces), data_bytes=sum(n["bytes"] for n in namespaces))

    def stop(self, grace: float = 0) -> None:
        """The child gone (killed unless it exits within grace seconds: it holds plaintext) and reaped."""
        if self.status is None:
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.status = self.proc.wait()

    def close(self) -> None:
        if self.proc is None:
            return
        if self.outbox is not None:
            self.outbox.put(None)  # a sender still waiting for parts ends (the fast path was not taken)
        self.stop()
        for t in (self.sender, self.feeder):
            if t is not None:
                t.join(self._remaining())  # the child is gone: their writes fail at once (a store read may not end)
        if self.feeder is None or not self.feeder.is_alive():
            self.stdin.close()  # else the feeder's own finally closes it, once its store read ends
        self.proc.stdout.close()
        self.proc = None
        self.mine = self.outbox = None  # the pre-scan is not kept through a sequential replay


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


def _fast_image(fast: _Fast, plan: dict, manifest: dict, used: int) -> tuple[Image | None, str | None]:
    """(the image restore.execute reads through _ChildSource, None) with the replay process (fast.spawn()ed, every
    segment of the window add()ed) running, or (None, why the fast path is not taken)."""
    job_store, keys = fast.job_store, fast.keys
    for key_id in sorted({c["key"] for n in manifest["namespaces"] for c in n["chunks"] if c.get("key")}):
        keys.key(key_id)  # every data key unwrapped before the restore starts: no KMIP call mid-way
    base = plan["snapshot"]
    fast.entry = entry = dict(base)
    entry.update(snapshot_id=point_id(base["snapshot_id"], plan["point"]), cluster_time=list(plan["point"]),
                 base_snapshot_id=base["snapshot_id"], restore_info_lines=info_lines(plan))
    why = fast.end_scan()
    if why is not None:
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
    replayed = {"events": fast.events, "records": fast.records, "segments": used, "post_images": fast.post_images}
    image = Image(entry, fast.manifest, store, replayed, fast.loaded)
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
            progress: Callable | None = None, overlap: bool = True, child_timeout: float = CHILD_TIMEOUT,
            deadline: tuple | None = None) -> Iterator[Image]:
    """The image at plan["point"] (segments.plan_point's plan). Every segment is read and authenticated first. Then,
    when the window holds only inserts, replaces, updates, deletes and document corrections on the base's namespaces
    (prescan) and overlap is on, the fast path: a replay process (a fresh interpreter, started before the segments are
    read) replays each touched key range while restore.execute restores the untouched chunks (image.path "overlap");
    child_timeout: how long the restore waits for its next message before it kills it and fails; deadline (as
    restore.execute's: time.monotonic() value, timeout in s): no such wait goes past it (RestoreTimeout). Otherwise (image.why
    says why) the base snapshot is loaded lazily into a temporary encrypted head, the segments replayed (replay:
    segments.replay) and the manifest built (image.path "sequential"). The child, or the head and its folder, are gone
    when the context ends."""
    base = plan["snapshot"]
    fast = _Fast(job_store, keys, child_timeout, deadline) if replay is None and overlap else None
    # its interpreter starts while the manifest and segments are read; it is sent nothing before they all authenticated
    why = "a replay function was given" if replay is not None else None if overlap else "overlap is off"
    why = fast.spawn() if fast is not None else why
    try:
        manifest = job_store.read_manifest(base["snapshot_id"], keys, base.get("manifest_sha256"))
        read, partial = None, False  # partial: a segment was read without its events
        if replay is None:
            # each segment is pre-scanned (fast.add) as soon as it is read and authenticated, while the next are read.
            # The fast path holds the window's records in memory: past FAST_WINDOW_BYTES the rest streams, sequentially.
            # It applies the post-images of the segments that end by the point: of those, only they are read
            point = tuple(plan["point"])
            posts_for = frozenset(s["name"] for s in plan["segments"] if tuple(s["to"]) <= point) if why is None else frozenset()
            rest, read, size, used = segments.read_segments(job_store, keys, plan["segments"], posts_for), [], 0, 0
            if why is None:
                fast.begin(manifest)

            def kept():
                nonlocal size, partial
                for item in rest:
                    read.append(item)  # what the sequential path replays if the fast one is not taken
                    size += sum(len(r[2]) for r in item[1])
                    partial = partial or item[0].get("posts_only", False)
                    yield item
            src = kept()
            for _seg, recs in segments.window_parts(plan, src):
                if size > FAST_WINDOW_BYTES:
                    break
                used += 1
                if why is None:
                    why = fast.add(recs)
            else:
                for _item in src:  # any segment of the plan past the point's record: authenticated all the same
                    if size > FAST_WINDOW_BYTES:
                        break
            if size > FAST_WINDOW_BYTES:
                why = why or "the window holds more than %d MiB of changes" % (FAST_WINDOW_BYTES >> 20)
                if posts_for:  # the rest would come as post-images alone: read every segment whole (below)
                    partial = True
                else:
                    read = itertools.chain(read, rest)
        if read is not None and why is None:
            image, why = _fast_image(fast, plan, manifest, used)
            if image is not None:
                read = None  # the child has its copy: not kept through the restore
                if progress is not None:
                    progress(image.replayed["events"], used, len(plan["segments"]))
                yield image
                return
        if partial:  # the sequential path replays events: segments.replay reads every segment whole
            rest.close()
            read = None
    finally:
        if fast is not None:
            fast.close()  # not taken, or done: the replay process is gone before the sequential path runs
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
