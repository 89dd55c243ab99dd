# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Cutting a snapshot from a head (no Ansible imports). PRIVATE to the collection.

Read transactions on the head, all on one image (head.reads), give the image at the head's
cluster time. Per namespace, the documents in id_key order are cut into chunks after documents whose keyed hash of id_key
falls under size/target (so chunks average target bytes and a boundary depends only on its
own document), with a hard maximum. The head flags those boundary documents when it writes
them (for its 1 MiB target; a larger target's boundaries are the flagged ones the keyed hash keeps),
so a snapshot reads the boundary keys through an index and then each chunk's documents with one
query: no per-document Python work. Incremental: chunk i of
the previous manifest covers the id_keys (last of chunk i-1, last of chunk i]; only the runs of
chunks whose range holds a changed id_key are re-read and re-cut, every other chunk is reused
without reading it. The caller's thread finds the chunks' ranges (boundary flags, the change log);
worker threads, each with a read transaction of its own, read the ranges, compress, hash, seal
and write (SQLite, zstd, hashlib, AES-GCM and file I/O release the GIL), so every core works.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import datetime
import hashlib
import itertools
import os
import queue
import struct
import threading
from typing import TYPE_CHECKING

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import crypto, segments
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import KmipBackupError, SnapshotError, StoreError
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.rawbson import EMPTY_BSON, id_key_from_document
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.store import JobStore, Keys, check_format
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.storenames import namespace_hash, new_snapshot_id
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.timeutil import iso, utcnow

if TYPE_CHECKING:  # annotations only: a snapshot reads the Head it is given
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.head import Head
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.progress import Meter

try:
    from bson.binary import Binary
    BSON_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    Binary = None
    BSON_IMPORT_ERROR = e

# Chunks average TARGET_BYTES, the head's flagged boundary target (head.BOUNDARY_TARGET). A larger target (fewer chunk
# files, more bytes rewritten per isolated change) works on the same flags: its boundaries are the flagged ones
# is_boundary keeps. 2 MiB saved about 3% CPU per GB but doubled the incremental bytes at 200 MB: not the default
# until measured on an idle machine.
TARGET_BYTES = 1 << 20
MAX_BYTES = 4 * TARGET_BYTES
LIST_PAGE = 1000  # keys per listing request of an object store (S3's maximum)
_CORES = os.cpu_count() or 2
# Threads reading, sealing and writing chunks: two per core (up to 8), so the cores stay busy while a worker waits for
# the head's pages or for a batch of chunk files to be fsynced (store.BATCH_BYTES); an object store's parallelism when
# higher (its uploads wait). Each costs about 15 MB of peak RSS (its chunk's copies, its malloc arena): 185 MB at 2 GB with four.
WORKERS = min(8, 2 * _CORES)
READERS = min(WORKERS, _CORES + 1)  # of which read the head at once, each on a connection of its own
READER_CACHE_KIB = 4096  # each reader's page cache: chunks are read once, in key order
KINDS = ("scheduled", "on-demand")
_INT32 = struct.Struct("<i")
FORMAT = 1


class _Writer:
    """Reads, compresses, seals and stores the chunks of one snapshot on worker threads, deduplicating by content
    address. Each worker reads its chunk's key range from the head with a read transaction of its own (readers: all
    on the snapshot's image), so reading the head runs on every core too (SQLite, zstd, hashlib, AES-GCM and file
    I/O release the GIL).

    range() and emit() return a future of the chunk entries (id, key, stored size and hash filled in); at most
    2 * threads are in flight, so memory stays bounded whatever the snapshot's size."""

    def __init__(self, job_store, key_id, key, id_key, is_boundary, max_bytes, readers=(), threads=WORKERS, known=None,
                 progress=None, keep=None):
        self.js, self.key_id, self.key, self.id_key = job_store, key_id, key, id_key
        self.progress = progress
        self.known = known  # chunk ids the store held when the snapshot began (one listing), else None: ask per chunk
        self.is_boundary = is_boundary
        self.keep = keep  # which of the head's flagged boundaries end a chunk (None: all)
        self.max_bytes = max_bytes
        self.unsynced = []
        self.written_bytes = 0
        self.written_chunks = 0
        self._readers = queue.SimpleQueue()
        for r in readers:
            self._readers.put(r)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kmipbackup-chunk")
        self._inflight = set()
        self._limit = 2 * threads
        self._lock = threading.Lock()
        self._mine = {}  # chunk id -> stored size (None while being written) of chunks this snapshot writes
        self._late = []  # entries waiting for the stored size of a chunk another worker writes

    def _submit(self, fn, *args):
        # waits for any one to finish, not the oldest: a worker publishing a batch of chunk files (store.BATCH_BYTES:
        # fsyncs) must not hold up the queue while the other workers run dry
        while len(self._inflight) >= self._limit:
            done, self._inflight = concurrent.futures.wait(self._inflight, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                f.result()
        future = self._pool.submit(fn, *args)
        self._inflight.add(future)
        return future

    def emit(self, plain, count, first, last):
        """A future of [the chunk entry] for plain (count raw documents of ns from first to last id_key, joined)."""
        return self._submit(lambda: [self._store(plain, count, first, last)])

    def range(self, ns, lo, hi):
        """A future of the chunk entries for the documents of ns in [lo, hi): one chunk, read by a worker with a
        reader of its own, or several when the range holds over max_bytes (cut at max_bytes)."""
        return self._submit(self._range, ns, lo, hi)

    def _range(self, ns, lo, hi):
        reader = self._readers.get()
        try:
            first, last, count, plain = reader.read_joined(ns, lo, hi)
        finally:
            self._readers.put(reader)
        if len(plain) > self.max_bytes:
            return [self._store(*piece) for piece in self.split(plain, first, last)]
        return [self._store(plain, count, first, last)] if count else []

    def split(self, plain, first, last):
        """The pieces (documents, count, first, last) of a range's joined documents (first to last id_key) that
        hold over max_bytes, cut as pieces() cuts it: before a document that would take a piece over
        max_bytes (a range's only boundary is its last document). Walks the documents' length prefixes; reads an
        id_key only where it cuts."""
        unpack, max_bytes, end = _INT32.unpack_from, self.max_bytes, len(plain)
        start = prev = pos = n = 0
        key = first
        while pos < end:
            size = unpack(plain, pos)[0]
            if size < 5 or pos + size > end:
                raise SnapshotError("The head of job %s holds a damaged document: resync the job "
                                    "(kmipbackup.mongodb.backup_snapshot action=resync)." % self.js.job)
            if pos > start and pos + size - start > max_bytes:
                yield plain[start:pos], n, key, id_key_from_document(plain[prev:pos])
                start, n, key = pos, 0, id_key_from_document(plain[pos:pos + size])
            prev, pos, n = pos, pos + size, n + 1
        if n:
            yield plain[start:], n, key, last

    def written_ids(self) -> set:
        """The ids of the chunks this snapshot wrote (not those it found in the store)."""
        with self._lock:
            return {cid for cid, stored in self._mine.items() if stored is not None}

    def _store(self, plain, count, first, last):
        digest = hashlib.sha256(plain).digest()
        cid = crypto.chunk_id(self.id_key, plain, digest, self.key_id)
        entry = {"id": cid, "key": self.key_id, "first": Binary(first), "last": Binary(last), "count": count,
                 "bytes": len(plain), "sha256": Binary(digest)}
        path = self.js.chunk_path(cid)
        with self._lock:
            mine = cid in self._mine
            stored_before = (cid in self.known) if self.known is not None else self.js.storage.exists(path)
            if not mine and not stored_before:
                self._mine[cid] = None
                write = True
            else:
                write = False
        if write:
            stored = self.js.put_chunk(cid, plain, self.key_id, self.key, sync=False)
            with self._lock:
                self._mine[cid] = stored
                self.unsynced.append(path)
                self.written_bytes += stored
                self.written_chunks += 1
            entry["stored"] = stored
        elif mine:  # equal content twice in this snapshot
            with self._lock:
                entry["stored"] = self._mine[cid]
                if entry["stored"] is None:
                    self._late.append(entry)
        else:  # the id binds the key id: a stored chunk with this id is sealed under this snapshot's key
            self.js.storage.touch(path)  # GC grace: a reused chunk is young again
            entry["stored"] = self.js.storage.size(path)
        if self.progress is not None:
            self.progress.add(entry["count"], len(plain), 1 if write else 0)
        return entry

    def finish(self):
        """Wait for every chunk; raises what a worker raised."""
        try:
            for f in concurrent.futures.as_completed(self._inflight):
                f.result()
        finally:
            self._pool.shutdown(wait=True)
        for entry in self._late:
            entry["stored"] = self._mine[entry["id"]]

    def abort(self):
        self._pool.shutdown(wait=True, cancel_futures=True)
        try:  # the chunks written so far get their names (unreferenced: the next GC removes them), no descriptor stays open
            self.js.storage.sync(self.unsynced)
        except (OSError, KmipBackupError):
            pass

    def pieces(self, rows):
        """(joined documents, count, first, last) of each chunk of (id_key, raw) rows in order, cut where is_boundary
        says and at max_bytes."""
        docs, size, first, last = [], 0, None, None
        is_boundary, max_bytes = self.is_boundary, self.max_bytes
        for key, raw in rows:
            n = len(raw)
            if docs and size + n > max_bytes:
                yield b"".join(docs), len(docs), first, last
                docs, size = [], 0
            if not docs:
                first = key
            docs.append(raw)
            size += n
            last = key
            if is_boundary(key, n):
                yield b"".join(docs), len(docs), first, last
                docs, size = [], 0
        if docs:
            yield b"".join(docs), len(docs), first, last

    def cut(self, reader, ns, start, end):
        """Futures of the chunk entries of ns in [start, end): the head's boundary flags give the chunks' ends
        (read here, through their index, and submitted as they are read), the workers read each chunk's range."""
        out, lo = [], start
        for b in itertools.chain(reader.iter_boundaries(ns, start, end, self.keep), [None]):  # the first range starts at once
            hi = end if b is None else b + b"\x00"
            out.append(self.range(ns, lo, hi))
            lo = hi
        return out


def _entries(items):
    """A namespace's chunk entries from its items: entries (reused) and futures of lists of entries (cut)."""
    out = []
    for item in items:
        if isinstance(item, concurrent.futures.Future):
            out.extend(item.result())
        else:
            out.append(item)
    return out


def _prev_namespaces(prev_manifest, head_path):
    if not prev_manifest or prev_manifest.get("head_path") != head_path:
        return {}
    return {n["ns"]: n for n in prev_manifest["namespaces"]}


def _runs(indices):
    runs, cur = [], None
    for i in sorted(indices):
        if cur and i == cur[1] + 1:
            cur[1] = i
        else:
            cur = [i, i]
            runs.append(cur)
    return runs


def _cut(reader, ns, start, end, writer, flagged):
    if flagged:
        return writer.cut(reader, ns, start, end)
    return [writer.emit(*piece) for piece in writer.pieces(reader.scan(ns, start, end))]


def _namespace_chunks(reader, ns, prev, writer, flagged):
    """The chunk list of ns: a full cut, or the previous list with changed ranges re-cut; chunks sealed
    under another key epoch count as changed, so a snapshot never needs an older epoch's key."""
    if prev is None or not prev["chunks"]:
        return _cut(reader, ns, None, None, writer, flagged)
    chunks = prev["chunks"]
    lasts = [bytes(c["last"]) for c in chunks]
    n = len(chunks)
    affected = {min(bisect.bisect_left(lasts, k), n - 1) for k in reader.changed(ns)}
    affected.update(i for i, c in enumerate(chunks) if c.get("key") != writer.key_id)
    if not affected:
        return list(chunks)
    out, i = [], 0
    for a, b in _runs(affected):
        out.extend(chunks[i:a])
        start = lasts[a - 1] + b"\x00" if a > 0 else None
        end = lasts[b] + b"\x00" if b < n - 1 else None
        out.extend(_cut(reader, ns, start, end, writer, flagged))
        i = b + 1
    out.extend(chunks[i:])
    return out


def _committed_by_another(job_store, snapshot_id):
    """After a failed catalog head update: True when the head now lists snapshot_id (another writer took its entry as
    live: it is committed); else its catalog entry and pending marker are removed (best effort: an unreachable store
    keeps them, a stale marker and an entry the next snapshot's head update takes or drops) and False."""
    try:
        won = job_store.read_head() or {}
        if any(sid == snapshot_id for _seq, sid in won.get("live") or []):
            return True
        job_store.uncommit(snapshot_id)
        job_store.end(snapshot_id)
    except KmipBackupError:
        pass
    return False


def take_snapshot(head: Head, job_store: JobStore, keys: Keys, job: str | None = None, master_key_uid: str | None = None,
                  encryption: bool = True, kind: str = "scheduled", now: datetime.datetime | None = None,
                  expires: datetime.datetime | None = None, target_bytes: int = TARGET_BYTES, max_bytes: int = MAX_BYTES,
                  last_known: str | None = None, progress: Meter | None = None) -> dict:
    """Cut a snapshot of head into job_store; returns its catalog entry plus "change_seq" (to pass to
    head.mark_snapshotted once this returns) and "reused_chunks"/"written_chunks".

    The catalog is checked against its authenticated head first (and against last_known, the daemon's own record
    of its last snapshot id): a snapshot is never built on a rolled-back catalog. The new entry is written once all
    it references is durable, then the head (sequence number, live entries) is rewritten to include it.

    progress (a progress.Meter): counts the documents and bytes cut (chunks written) and reused, against the previous
    snapshot's size (else the head's file size, an overestimate)."""
    if Binary is None:
        raise StoreError("The Python package pymongo (bson) is missing (%s): install the collection's requirements." % BSON_IMPORT_ERROR)
    if job is not None and job != job_store.job:
        raise SnapshotError("Job %s does not match the store area of job %s." % (job, job_store.job))
    if kind not in KINDS:
        raise SnapshotError("Unknown snapshot type %r: use one of %s." % (kind, ", ".join(KINDS)))
    if bool(encryption) != keys.encryption:
        raise SnapshotError("The job's encryption setting and its keys disagree: reload the job configuration.")
    now = now or utcnow()
    check_format(job_store.storage, create=True)  # before the first write: a root holding something else is refused
    # an encrypted job's head is keyed once its keyring exists (before that: its unencrypted past, or nothing)
    keyed = bool(encryption) and bool(job_store.keyring_records())
    key_id, id_key_id = keys.epoch_for(master_key_uid if encryption else None, now)
    key = keys.key(key_id)
    id_key = keys.key(id_key_id) if encryption else crypto.NULL_ID_KEY
    entries, chead = job_store.live_catalog(keys, expect_encryption=keyed, last_known=last_known)
    base = entries[-1] if entries else None
    last_seq = max([0] + [int(e.get("seq") or 0) for e in entries] + ([chead["seq"]] if chead else []))
    snapshot_id = new_snapshot_id(now)
    job_store.begin(snapshot_id, base["snapshot_id"] if base else None, now)
    prev_manifest = None
    if base is not None:
        try:
            prev_manifest = job_store.read_manifest(base["snapshot_id"], keys, base.get("manifest_sha256"))
        except (StoreError, KmipBackupError):
            prev_manifest = None  # an unreadable base means a full snapshot, never a wrong one
    is_boundary = head.boundary_fn(target_bytes)
    # The head flags the boundaries of its own target; a larger target's are a subset of them (the same keyed hash
    # under a lower threshold), so they are the flagged ones is_boundary keeps (one keyed hash per flag).
    flagged = bool(head.boundary_target) and target_bytes >= head.boundary_target
    keep = is_boundary if flagged and target_bytes != head.boundary_target else None
    known = set(job_store.chunk_ids())  # one listing instead of a request per new chunk
    if progress is not None:
        progress.estimate(base.get("doc_count") if base else None, base.get("data_bytes") if base else head.size())
    threads = max(getattr(job_store.storage, "parallelism", WORKERS), WORKERS)
    try:
        with head.reads(1 + min(threads, READERS), cache_kib=READER_CACHE_KIB) as (r, *readers):
            writer = _Writer(job_store, key_id, key, id_key, is_boundary, max_bytes, readers, threads, known, progress, keep)
            try:
                pos = r.position()
                if not pos.get("consistent") or not pos.get("cluster_time"):
                    raise SnapshotError("The head of job %s is not consistent yet (initial sync or catch-up running): a snapshot "
                                        "can only be cut at a consistent cluster time; wait for status STARTED." % job_store.job)
                change_seq = r.change_seq
                cut = segments.cut_segment(head)  # the segment closed last (the daemon closes one right before a cut)
                prev = _prev_namespaces(prev_manifest, head.path)
                if prev_manifest is not None and prev and prev_manifest.get("change_seq", 0) > change_seq:
                    prev = {}
                namespaces, reused = [], 0
                for info in r.namespaces():
                    ns = info["ns"]
                    p = prev.get(ns)
                    if p is not None and p.get("incarnation") != info["incarnation"]:
                        p = None
                    items = _namespace_chunks(r, ns, p, writer, flagged)
                    if p is not None:
                        prev_ids = {id(c) for c in p["chunks"]}
                        kept = [c for c in items if id(c) in prev_ids]
                        reused += len(kept)
                        if progress is not None:
                            progress.add(sum(c["count"] for c in kept), sum(c["bytes"] for c in kept))
                    namespaces.append({
                        "ns": ns, "uuid": Binary(bytes(info["uuid"]), 4) if info.get("uuid") else None,
                        "options": Binary(bytes(info["options"] or EMPTY_BSON)),
                        "indexes": [Binary(bytes(s)) for s in info["indexes"]], "incarnation": info["incarnation"],
                        "type": info.get("type") or "collection", "chunks": items})
                cluster_time = list(pos["cluster_time"])
                writer.finish()
            except BaseException:
                writer.abort()  # before the readers' transactions end
                raise
    except BaseException:
        job_store.end(snapshot_id)
        raise
    for n in namespaces:
        chunks = _entries(n.pop("chunks"))
        n.update(count=sum(c["count"] for c in chunks), bytes=sum(c["bytes"] for c in chunks),
                 stored=sum(c["stored"] for c in chunks), hash=namespace_hash(chunks), chunks=chunks)
    job_store.storage.sync(writer.unsynced)
    # A chunk this snapshot wrote is new, and GC spares new objects (its grace period); one it reuses may have been
    # collected meanwhile: check only those, by one listing of the chunk area when that takes fewer requests (a
    # page per LIST_PAGE chunks) than asking for each, else each in parallel.
    reused_ids = sorted({c["id"] for n in namespaces for c in n["chunks"]} - writer.written_ids())
    if len(reused_ids) > len(known) // LIST_PAGE + 1:
        listed = set(job_store.chunk_ids())
        missing = [cid for cid in reused_ids if cid not in listed]
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            present = list(pool.map(job_store.has_chunk, reused_ids))
        missing = [cid for cid, ok in zip(reused_ids, present, strict=True) if not ok]
    if missing:
        job_store.end(snapshot_id)
        raise SnapshotError("%d chunk(s) this snapshot reuses were removed meanwhile (garbage collection of a stale "
                            "store?): take the snapshot again." % len(missing))
    key_ids = sorted({c["key"] for n in namespaces for c in n["chunks"]} | {key_id})
    master_uids = sorted({u for u in (keys.master_key_uid(k) for k in key_ids) if u})
    manifest = {"format": FORMAT, "job": job_store.job, "snapshot_id": snapshot_id, "created": iso(now),
                "cluster_time": cluster_time, "change_seq": change_seq, "head_path": head.path,
                "namespaces": namespaces}
    manifest_sha, manifest_size = job_store.put_manifest(snapshot_id, manifest, key_id, key)
    entry = {"snapshot_id": snapshot_id, "seq": last_seq + 1, "job": job_store.job,
             "created": iso(now), "cluster_time": cluster_time,
             "data_bytes": sum(n["bytes"] for n in namespaces),
             "stored_bytes": sum(n["stored"] for n in namespaces) + manifest_size,
             "written_bytes": writer.written_bytes + manifest_size,
             "doc_count": sum(n["count"] for n in namespaces), "namespaces": len(namespaces),
             "encryption": bool(encryption), "master_key_uids": master_uids, "key_id": key_id,
             "manifest_sha256": manifest_sha, "expires": iso(expires) if isinstance(expires, datetime.datetime) else expires,
             "type": kind, "format": FORMAT, "segment": cut}
    moved = job_store.read_head()
    if (moved or {}).get("seq") != (chead or {}).get("seq") or (moved or {}).get("snapshot_id") != (chead or {}).get("snapshot_id"):
        job_store.end(snapshot_id)  # its chunks and manifest are unreferenced: the next GC removes them
        raise SnapshotError("Another writer committed a snapshot of job %s to the store %s while this one was taken: only one "
                            "Backup Daemon may write a job's store (check that no other host runs this job); this snapshot "
                            "was not committed." % (job_store.job, getattr(job_store.storage, "root", "")))
    entry = job_store.put_catalog(entry, keys)
    try:
        job_store.put_head(keys, [(e["seq"], e["snapshot_id"]) for e in entries] + [(entry["seq"], snapshot_id)], key_id,
                           prev=chead, now=now)
    except StoreError:
        if not _committed_by_another(job_store, snapshot_id):
            raise
    job_store.end(snapshot_id)
    result = dict(entry)
    result.update(change_seq=change_seq, written_chunks=writer.written_chunks, reused_chunks=reused)
    return result
