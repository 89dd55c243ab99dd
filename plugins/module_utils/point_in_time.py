# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restoring to a point in time (no Ansible imports). PRIVATE to the collection.

segments.plan_point picks the newest snapshot at or before the point (the base) and the change segments after
it; rebuild() then gives the image at the point:

- a temporary head (SQLCipher under a random key that lives in memory only, in a 0700 folder removed afterwards)
  receives the base snapshot's namespaces, and its documents lazily: a base chunk is loaded the first time the
  replay touches a key in its range (a whole namespace when something scans it), so a point a few events after
  a large snapshot loads only the chunks those events touch;
- segments.replay applies the segments' records up to the point to it with the existing applier;
- the image is a manifest like a snapshot's, whose chunk entries are the base's untouched chunks (read from the
  store as a plain restore reads them) and "virtual" chunks: ranges of the temporary head (id "head:<n>"),
  cut at about 1 MiB, with their count, size and SHA-256 taken when the manifest is built.

RebuiltStore serves both kinds of chunk to restore.py, so the three targets, include/exclude/rename, the checks
(every chunk against its entry; counts and namespace content hashes against the manifest; the target's count)
and restoreInfo are restore.py's own, unchanged.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Callable, Iterator

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import segments
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import RestoreError
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.head import Head
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.rawbson import EMPTY_BSON, id_key_from_document, split_bson_docs
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.storenames import namespace_hash

if TYPE_CHECKING:
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.store import JobStore, Keys

try:
    from bson.binary import Binary
except ImportError:  # pragma: no cover (restore.py reports the missing package)
    Binary = None

VIRTUAL_PREFIX = "head:"  # never a store chunk id (64 hex digits)
VIRTUAL_CHUNK_BYTES = 1 << 20
CACHE_BYTES = 256 << 20  # the temporary head's page cache (SQLite's default of the daemon's heads: 32 MiB)


def _after(key: bytes) -> bytes:
    """The smallest id_key greater than key: id_keys compare as byte strings, so (key, x) == [key + 00, x)."""
    return bytes(key) + b"\x00"


class _Base:
    """The base snapshot's chunks of one namespace of the temporary head, and which of them are loaded."""

    def __init__(self, n: dict) -> None:
        self.n = n
        self.lasts = [bytes(c["last"]) for c in n["chunks"]]
        self.loaded = set()

    def chunk_of(self, id_key: bytes) -> int | None:
        """The index of the chunk whose range holds id_key (chunk i: (last of i-1, last of i]), None past the last."""
        i = bisect.bisect_left(self.lasts, bytes(id_key))
        return i if i < len(self.lasts) else None


def _never(_id_key, _size):
    return False


class RebuildHead(Head):
    """A temporary head that holds a base snapshot lazily (see the module's docs). Its writers load the chunk of
    every key they read or write, and the whole namespace before a scan; renames and drops carry the base along."""

    def __init__(self, path: str, key: bytes, job_store: JobStore, keys: Keys, manifest: dict) -> None:
        super().__init__(path, key)
        self._conn.execute("PRAGMA synchronous=OFF")  # a temporary head: a crash discards it anyway
        self._conn.execute("PRAGMA cache_size=-%d" % (CACHE_BYTES >> 10))  # decrypted pages, kept while replay jumps around
        # its image is read by ranges cut by size: no chunk-boundary flags (a keyed hash per document) and no change log
        self._is_boundary = _never
        self.job_store, self.keys = job_store, keys
        self.bases = {}  # ns -> _Base, for namespaces that still have base chunks (loaded or not)
        self.loaded_chunks = 0
        self.loading = []  # (base, chunk index) loaded by the open transaction: forgotten if it rolls back
        with super().write() as w:
            for n in manifest["namespaces"]:
                w.create_namespace(n["ns"], bytes(n["options"] or EMPTY_BSON), uuid=bytes(n["uuid"]) if n.get("uuid") else None,
                                   indexes=[bytes(s) for s in n["indexes"]])
                if n["chunks"]:
                    self.bases[n["ns"]] = _Base(n)

    def write(self) -> _LazyWrite:
        return _LazyWrite(self, super().write())

    def load(self, w, ns: str, index: int) -> None:
        """Load chunk index of ns's base into the head (untracked: the image is read by ranges, not by changes)."""
        base = self.bases[ns]
        if index in base.loaded:
            return
        plain = self.job_store.read_chunk(base.n["chunks"][index], self.keys)
        w.upsert_many(ns, [(id_key_from_document(d), d) for d in split_bson_docs(plain)], track=False)
        base.loaded.add(index)
        self.loading.append((base, index))
        self.loaded_chunks += 1

    def load_all(self, w, ns: str) -> None:
        base = self.bases.get(ns)
        for i in range(len(base.lasts) if base else 0):
            self.load(w, ns, i)


class _LazyWrite:
    """Head.write()'s transaction, yielding a _LazyWriter."""

    def __init__(self, h: RebuildHead, transaction) -> None:
        self._h, self._t = h, transaction

    def __enter__(self) -> _LazyWriter:
        self._h.loading = []
        return _LazyWriter(self._h, self._t.__enter__())

    def __exit__(self, *exc):
        if exc[0] is not None:  # rolled back: so are the chunks it loaded
            for base, index in self._h.loading:
                base.loaded.discard(index)
                self._h.loaded_chunks -= 1
        return self._t.__exit__(*exc)


class _LazyWriter:
    """A head Writer (every attribute passes through) that loads base chunks before touching their keys."""

    def __init__(self, h: RebuildHead, w) -> None:
        self._h, self._w = h, w

    def __getattr__(self, name):
        return getattr(self._w, name)

    def _touch(self, ns, id_key):
        base = self._h.bases.get(ns)
        if base is not None:
            i = base.chunk_of(id_key)
            if i is not None and i not in base.loaded:
                self._h.load(self._w, ns, i)

    def get(self, ns, id_key):
        self._touch(ns, id_key)
        return self._w.get(ns, id_key)

    def delete(self, ns, id_key):
        self._touch(ns, id_key)
        return self._w.delete(ns, id_key)

    def upsert(self, ns, id_key, raw):
        self._touch(ns, id_key)
        return self._w.upsert_many(ns, [(id_key, raw)], track=False)

    def upsert_many(self, ns, pairs, track=True):
        pairs = pairs if isinstance(pairs, list) else list(pairs)
        for k, _doc in pairs:
            self._touch(ns, k)
        return self._w.upsert_many(ns, pairs, track=False)

    def _whole(self, ns):
        self._h.load_all(self._w, ns)

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

    def drop_namespace(self, ns):
        self._h.bases.pop(ns, None)
        return self._w.drop_namespace(ns)

    def drop_database(self, db):
        names = [n["ns"] for n in self._w.namespaces() if n["ns"].startswith(db + ".")]
        for ns in names:
            self.drop_namespace(ns)
        return len(names)

    def rename(self, ns, to, drop_target=True):
        if ns != to and self._w.has_namespace(ns):  # the documents move with the namespace's row: so does its base
            self._h.bases.pop(to, None)
            base = self._h.bases.pop(ns, None)
            if base is not None:
                self._h.bases[to] = base
        return self._w.rename(ns, to, drop_target)

    def clear(self):
        self._h.bases.clear()
        return self._w.clear()


class RebuiltStore:
    """A JobStore for restore.py (every attribute passes through to job_store) that also reads the virtual chunks of a
    rebuilt image from its head, checked against their entries as store chunks are, and knows the image's entry."""

    def __init__(self, job_store: JobStore, h: RebuildHead, entry: dict) -> None:
        self._js, self._h = job_store, h
        self.entry = entry
        self.ranges = {}  # virtual chunk id -> (ns in the head, start, end)

    def __getattr__(self, name):
        return getattr(self._js, name)

    def catalog_entry(self, snapshot_id: str) -> dict:
        return self.entry if snapshot_id == self.entry["snapshot_id"] else self._js.catalog_entry(snapshot_id)

    def _virtual(self, cid):
        with self._h.read() as r:
            ns, start, end = self.ranges[cid]
            return b"".join(r.read_range(ns, start, end)[2])

    def read_chunk(self, entry: dict, keys: Keys) -> bytes:
        cid = entry["id"]
        if not cid.startswith(VIRTUAL_PREFIX):
            return self._js.read_chunk(entry, keys)
        plain = self._virtual(cid)
        if len(plain) != entry["bytes"] or hashlib.sha256(plain).digest() != bytes(entry["sha256"]):
            raise RestoreError("The temporary head of this point-in-time restore changed under it (range %s): restore again." % cid)
        return plain

    def _open_chunk(self, cid, keys, expect_key=None):
        if cid.startswith(VIRTUAL_PREFIX):
            return b""  # authenticated when its segments were replayed; read_chunk checks it against its entry
        return self._js._open_chunk(cid, keys, expect_key)  # pylint: disable=protected-access


def _virtual_chunks(store: RebuiltStore, r, ns: str, start: bytes | None, end: bytes | None) -> list:
    """Chunk entries for the documents of ns in [start, end) of the head, cut at about VIRTUAL_CHUNK_BYTES."""
    out = []

    def emit(first, last, digest, count, size):
        cid = "%s%d" % (VIRTUAL_PREFIX, len(store.ranges))
        store.ranges[cid] = (ns, first, _after(last))
        out.append({"id": cid, "key": None, "first": first, "last": last, "count": count, "bytes": size,
                    "sha256": digest.digest(), "stored": 0})
    first = last = None
    digest, count, size = hashlib.sha256(), 0, 0
    for k, doc in r.scan(ns, start, end):
        if first is None:
            first = k
        digest.update(doc)
        count += 1
        size += len(doc)
        last = k
        if size >= VIRTUAL_CHUNK_BYTES:
            emit(first, last, digest, count, size)
            first, digest, count, size = None, hashlib.sha256(), 0, 0
    if first is not None:
        emit(first, last, digest, count, size)
    return out


def _namespace(store: RebuiltStore, r, info: dict, base: _Base | None) -> dict:
    """The manifest entry of one namespace of the rebuilt head: the base's untouched chunks, virtual ones for the rest."""
    ns = info["ns"]
    if base is None:
        chunks = _virtual_chunks(store, r, ns, None, None)
    else:
        chunks, prev = [], None
        for i, c in enumerate(base.n["chunks"]):
            if i in base.loaded:
                chunks.extend(_virtual_chunks(store, r, ns, None if prev is None else _after(prev), _after(base.lasts[i])))
            else:
                chunks.append(c)
            prev = base.lasts[i]
        chunks.extend(_virtual_chunks(store, r, ns, _after(prev), None))  # inserted past the base's last key
    return {"ns": ns, "uuid": Binary(bytes(info["uuid"]), 4) if info.get("uuid") else None,
            "options": bytes(info["options"] or EMPTY_BSON), "indexes": [bytes(s) for s in info["indexes"]],
            "incarnation": info["incarnation"], "type": "collection", "chunks": chunks,
            "count": sum(c["count"] for c in chunks), "bytes": sum(c["bytes"] for c in chunks),
            "stored": sum(c.get("stored", 0) for c in chunks), "hash": namespace_hash(chunks)}


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


@contextlib.contextmanager
def rebuild(job_store: JobStore, keys: Keys, plan: dict, replay: Callable | None = None, work_dir: str | None = None,
            progress: Callable | None = None) -> Iterator[Image]:
    """The image at plan["point"] (segments.plan_point's plan): base snapshot loaded lazily into a temporary
    encrypted head, segments replayed (replay: segments.replay), manifest built. The head and its folder are removed
    when the context ends."""
    replay = replay or segments.replay
    base = plan["snapshot"]
    manifest = job_store.read_manifest(base["snapshot_id"], keys, base.get("manifest_sha256"))
    folder = tempfile.mkdtemp(prefix="kmipbackup-pitr-", dir=work_dir)  # 0700
    h = None
    try:
        h = RebuildHead(os.path.join(folder, "head.db"), os.urandom(32), job_store, keys, manifest)
        replayed = replay(h, job_store, keys, plan, progress=progress)
        entry = dict(base)
        entry.update(snapshot_id=point_id(base["snapshot_id"], plan["point"]), cluster_time=list(plan["point"]),
                     base_snapshot_id=base["snapshot_id"], restore_info_lines=info_lines(plan))
        store = RebuiltStore(job_store, h, entry)
        with h.read() as r:
            namespaces = [_namespace(store, r, info, h.bases.get(info["ns"])) for info in r.namespaces()]
        entry.update(doc_count=sum(n["count"] for n in namespaces), data_bytes=sum(n["bytes"] for n in namespaces),
                     namespaces=len(namespaces))
        image_manifest = {"format": 1, "job": job_store.job, "snapshot_id": entry["snapshot_id"],
                          "cluster_time": list(plan["point"]), "namespaces": namespaces}
        yield Image(entry, image_manifest, store, replayed, h.loaded_chunks)
    finally:
        if h is not None:
            h.close()
        shutil.rmtree(folder, ignore_errors=True)
