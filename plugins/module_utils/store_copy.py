# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Verified copies of a job's snapshots from one store to another (no Ansible imports). PRIVATE to the collection.

Any direction between store.FileStorage and objectstore.S3Storage. Objects are copied as they are stored
(ciphertext, byte for byte): the copy never decrypts anything it writes.

What is checked. Without keys (no KMIP access), only what the format lets anyone check:
- every catalog entry is bound to its name and listed with the same sequence number by the source's catalog head;
- every manifest's SHA-256 equals its catalog entry's manifest_sha256 (before it is copied);
- keyring records, chunks and manifests have their format (record names its key; magic and key id);
- every object written is read back from the destination and must equal the source's bytes (SHA-256);
- an object already at the destination is skipped when it equals the source's (bytes; size for chunks, whose names
  are keyed hashes of their content) and is an error naming it otherwise.
Chunk contents, entry MACs and the head's MAC need the job's data keys: a restore from the destination checks them,
as it does at the source. With keys (a key provider: KMIP access), the copy also authenticates the source's catalog
head, every entry it copies, every manifest (opened) and every chunk it copies (its AEAD tag), and copies only the
chunks the copied snapshots reference.

The catalog head is MAC'ed with a key derived from the job's current snapshot key, so:
- without keys the destination mirrors the source: its head becomes the source's head, copied verbatim, once every
  snapshot that head lists is at the destination (so a reader there detects a removed or put-back entry as at the
  source); the destination then holds exactly the source's live snapshots (those the source expired go too, after
  the head). A selection that would leave out a snapshot the source's head lists, or a retention of the destination's
  own, needs keys. A destination head newer than the source's (a rolled-back or another source) is refused.
- with keys the destination has a head of its own: its authenticated live snapshots plus the copied ones, less those
  its retention expires, MAC'ed with the same key the source's head names; then its garbage collection runs.
Commit order at the destination: keyring, chunks, manifests, catalog entries (oldest first), then the head, then the
entries the head no longer lists. A copy killed before its catalog entries leaves nothing visible; the next run skips
what is there and completes it.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import re

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    config, crypto, job_config, kmip, objectstore, restore_request, retention, segments, storage, store)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import StoreError
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.storenames import SNAPSHOT_RE
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.timeutil import utcnow

GRACE_SECONDS = 3600  # temporary files older than this are a killed copy's (as for the store's garbage collection)
WORKERS = 8  # parallel chunk copies (objectstore.S3Storage's connection pool is larger)
SEGMENT_BATCH = 64  # change segments held in memory at once (read, checked, then written)
KEY_ID_RE = re.compile(r"^(none|(snapshot|chunk_id)-[0-9]+)$")


# pure parts -----------------------------------------------------------------------------------------------
def select(live_ids: list, snapshots: str | list) -> list:
    """The snapshot ids to copy among live_ids (oldest first): 'all', 'latest' or a list of ids (each must be live)."""
    if snapshots == "all":
        return list(live_ids)
    if snapshots == "latest":
        return live_ids[-1:]
    if isinstance(snapshots, str) or not isinstance(snapshots, (list, tuple)):
        raise StoreError("snapshots is %r: use all, latest or a list of snapshot ids." % (snapshots,))
    bad = [s for s in snapshots if not SNAPSHOT_RE.match(str(s))]
    if bad:
        raise StoreError("Invalid snapshot id %r: use ids from snapshot_info." % bad[0])
    missing = [s for s in snapshots if s not in live_ids]
    if missing:
        raise StoreError("Snapshot %s is not a live snapshot of the source store: list them with snapshot_info." % ", ".join(missing))
    return [s for s in live_ids if s in set(snapshots)]


def retained(entries: list, keep_last: int | None = None, schedule: dict | None = None,
             now: datetime.datetime | None = None) -> tuple[list, list]:
    """(keep, expire) ids among catalog entries (oldest first) under the destination's retention: the newest keep_last,
    or the schedule's rules (retention.select_retained); everything when neither is given. The newest is always kept."""
    ids = [e["snapshot_id"] for e in entries]
    if keep_last is not None:
        if int(keep_last) < 1:
            raise StoreError("keep_last is %r: keep at least 1 snapshot." % (keep_last,))
        return ids[-int(keep_last):], ids[:-int(keep_last)]
    if schedule is not None:
        keep, expire = retention.select_retained(entries, schedule, now or utcnow())
        keep_ids = {e["snapshot_id"] for e in keep}
        return [i for i in ids if i in keep_ids], [i for i in ids if i not in keep_ids]
    return ids, []


def check_head_shape(head: dict | None, job: str) -> dict:
    """The source's catalog head, when it has the head format (no keys: its MAC is not checked here)."""
    if head is None:
        raise StoreError("Job %s has no catalog head in the source store: it has no snapshot (or was written before "
                         "catalog heads existed: take a snapshot first)." % job)
    live = head.get("live")
    if (head.get("job") != job or head.get("format") != store.HEAD_FORMAT or not isinstance(head.get("mac"), str)
            or not isinstance(head.get("seq"), int) or not isinstance(live, list) or not live
            or not all(isinstance(x, list) and len(x) == 2 and isinstance(x[0], int) and SNAPSHOT_RE.match(str(x[1]))
                       for x in live)
            or not KEY_ID_RE.match(str(head.get("key_id")))):
        raise crypto.integrity_error("catalog head", job, "has an unknown format")
    return head


def check_entry(entry: dict, snapshot_id: str, seq: int | None, job: str) -> dict:
    """A catalog entry's shape: its id, job, the head's sequence number for it, a manifest digest."""
    if entry.get("job") != job or not isinstance(entry.get("manifest_sha256"), str) or not KEY_ID_RE.match(str(entry.get("key_id"))):
        raise crypto.integrity_error("catalog entry", snapshot_id, "has an unknown format")
    if seq is not None and entry.get("seq") != seq:
        raise crypto.integrity_error("catalog entry", snapshot_id, "has another sequence number than the catalog head records")
    return entry


def check_blob(blob: bytes, magic: bytes, kind: str, object_id: str) -> str:
    """The key id of a sealed object (chunk or manifest) that has the format; IntegrityError naming it otherwise."""
    key_id, sealed = store._unblob(magic, blob, kind, object_id)
    if not KEY_ID_RE.match(key_id) or len(sealed) < (32 if key_id == "none" else 28):
        raise crypto.integrity_error(kind, object_id, "has an unknown format")
    return key_id


def check_keyring_record(data: bytes, key_id: str) -> dict:
    try:
        rec = json.loads(data)
    except ValueError:
        raise crypto.integrity_error("keyring entry", key_id, "is not valid JSON") from None
    if not isinstance(rec, dict) or rec.get("key_id") != key_id or not isinstance(rec.get("wrapped"), dict):
        raise crypto.integrity_error("keyring entry", key_id, "names another key")
    return rec


def check_segment(blob: bytes, meta: dict, keyring: list) -> bytes:
    """A stored change segment's predecessor digest, when the segment has the format and names a key the keyring holds
    (or none); IntegrityError naming it otherwise. Its seal needs the keys (a keyed copy opens it)."""
    n = blob[4] if len(blob) > 4 else 0
    key_id = bytes(blob[5:5 + n]).decode("ascii", "replace")
    if blob[:4] != segments.MAGIC or not KEY_ID_RE.match(key_id) or len(blob) < 37 + n + 28:
        raise crypto.integrity_error("segment", meta["name"], "has an unknown format")
    if key_id != "none" and key_id not in keyring:
        raise crypto.integrity_error("segment", meta["name"], "names key %s, which the keyring does not hold" % key_id)
    return bytes(blob[5 + n:37 + n])


def _sha(data):
    return hashlib.sha256(data).hexdigest()


# the copy -------------------------------------------------------------------------------------------------
class Copy:
    """One copy of job's snapshots from src to dst (storages). provider: a key provider (kmip.KmipClient) for a keyed
    copy, else None; encryption: whether the job is encrypted (its configuration says; None: its keyring tells), for a
    keyed copy. plan() computes what to do without writing; run() does it. The result counts objects and bytes."""

    def __init__(self, src: store.FileStorage | objectstore.S3Storage, dst: store.FileStorage | objectstore.S3Storage, job: str,
                 snapshots: str | list = "all", provider: kmip.KmipClient | None = None, keep_last: int | None = None,
                 schedule: dict | None = None, now: datetime.datetime | None = None, encryption: bool | None = None,
                 workers: int = WORKERS, window_hours: float | None = None) -> None:
        self.src = store.JobStore(src, job)
        if not src.list(job):
            raise StoreError("The source store %s has no job %s: check the job name and the store." % (src.root, job))
        self.dst_storage = dst
        self.job, self.snapshots, self.provider = job, snapshots, provider
        self.keep_last, self.schedule, self.now = keep_last, schedule, now or utcnow()
        self.encryption = encryption
        self.workers = workers
        self.window_hours = window_hours  # a keyed copy collects the destination's segments with this window
        self.counts = {"keyring": 0, "chunks": 0, "segments": 0, "manifests": 0, "catalog": 0}
        self.skipped = 0
        self.bytes = 0
        self.gc = None

    # helpers --------------------------------------------------------------------------------------------
    def _put(self, path, data, kind, object_id, compare_size=False):
        """Copy one object: skip it when the destination has it equal, refuse a different one, read back what was written."""
        dst = self.dst_storage
        if dst.exists(path):
            same = dst.size(path) == len(data) if compare_size else dst.get(path) == data
            if not same:
                raise crypto.integrity_error(
                    kind, object_id, "differs between the source and the destination (%s in %s): one of them was modified; "
                    "check both stores before copying again" % (path, dst.root))
            return False
        dst.put_atomic(path, data)
        if _sha(dst.get(path)) != _sha(data):
            raise StoreError("The destination %s returned other bytes for %s than were written: check the store." % (dst.root, path))
        return True

    # plan -----------------------------------------------------------------------------------------------
    def plan(self) -> dict:
        """What the copy does: snapshots to copy and to expire, objects and bytes; reads only (checks the source)."""
        src, job = self.src, self.job
        keyed = self.provider is not None
        if keyed:
            if self.encryption is None:  # not known from the job's configuration: its keyring holds wrapped keys
                self.encryption = bool(src.keyring_records())
            self.src_keys = store.Keys(src, self.provider, self.encryption)
            entries, head = src.live_catalog(self.src_keys)
            if head is None:
                check_head_shape(None, job)
        else:
            if self.keep_last is not None or self.schedule is not None:
                raise StoreError("A retention of the destination's own rewrites its catalog head, which is MAC'ed with the "
                                 "job's data keys: give KMIP access to the copy, or leave the retention out (without keys the "
                                 "destination keeps the source's live snapshots).")
            head = check_head_shape(src.read_head(), job)
            self.src_head_bytes = store.canonical(head)  # the head as planned: the one the destination gets
            entries = [check_entry(self._live_entry(sid, seq), sid, seq, job) for seq, sid in head["live"]]
        self.src_head = head
        by_id = {e["snapshot_id"]: e for e in entries}
        chosen = select(list(by_id), self.snapshots)
        # the destination
        dst_exists = self.dst_storage.exists(store.FORMAT_FILE) or bool(self.dst_storage.list(job))
        self.dst = store.JobStore(self.dst_storage, job) if dst_exists else None
        dst_live, dst_head = [], None
        if self.dst is not None:
            if keyed:
                dst_live, dst_head = self.dst.live_catalog(self._dst_keys())
            else:
                dst_head = self.dst.read_head()
        held = {sid for sid, _seq in (self.dst.catalog_files() if self.dst else [])}
        if keyed:
            final = {e["snapshot_id"]: e for e in dst_live}
            final.update((sid, by_id[sid]) for sid in chosen)
            ordered = sorted(final.values(), key=lambda e: (e["seq"], e["snapshot_id"]))
            keep, expire = retained(ordered, self.keep_last, self.schedule, self.now)
            live = [[final[sid]["seq"], sid] for sid in keep]
            live_entries = [final[sid] for sid in keep]
        else:
            need = [sid for _seq, sid in head["live"]]
            left_out = [sid for sid in need if sid not in held and sid not in chosen]
            if left_out:
                raise StoreError(
                    "Without keys the destination's catalog head can only be the source's, which lists %s: copy all "
                    "snapshots (snapshots=all) or give KMIP access to the copy, so it writes the destination's own head."
                    % ", ".join(left_out))
            if dst_head is not None and isinstance(dst_head.get("seq"), int) and dst_head["seq"] > head["seq"]:
                raise StoreError(
                    "The destination's catalog head of job %s is newer (sequence number %d) than the source's (%d): the "
                    "source was rolled back or is another store; check both, or copy with KMIP access."
                    % (job, dst_head["seq"], head["seq"]))
            keep, live = need, head["live"]
            live_entries = [by_id[sid] for sid in need if sid in by_id]
            expire = [sid for sid, seq in (self.dst.catalog_files() if self.dst else [])
                      if sid not in need and (seq is None or seq <= head["seq"])]
        for sid in keep:  # a snapshot the destination holds already: its entry must be the source's
            if sid in held and sid in by_id and self.dst.catalog_entry(sid) != by_id[sid]:
                raise crypto.integrity_error(
                    "catalog entry", sid, "differs between the source and the destination (in %s): one of them was "
                    "modified; check both stores before copying again" % self.dst_storage.root)
        self.live = live
        self.to_copy = [sid for sid in keep if sid not in held]
        self.expire = [sid for sid in expire if sid in held]
        self.dst_head = dst_head
        self._plan_objects(by_id, keyed)
        self._plan_segments(live_entries)
        return self.summary(planned=True)

    def _live_entry(self, sid, seq):
        if not self.src.storage.exists(self.src._p("catalog", sid + ".json")):
            raise crypto.integrity_error(
                "catalog entry", sid, "is missing from the source store, but its catalog head lists it as live (sequence "
                "number %d): it was removed (rollback); the copy stops" % seq)
        return self.src.catalog_entry(sid)

    def _dst_keys(self):
        if not hasattr(self, "dst_keys"):
            self.dst_keys = store.Keys(self.dst, self.provider, self.encryption)
        return self.dst_keys

    def _plan_objects(self, by_id, keyed):
        src = self.src
        self.keyring = [n[:-5] for n in src.storage.list(src._p("keyring")) if n.endswith(".json")]
        self.entries = [by_id[sid] for sid in self.to_copy]
        if keyed:
            refs = {}
            for e in self.entries:
                m = src.read_manifest(e["snapshot_id"], src._entry_keys(e, self.src_keys), e["manifest_sha256"])
                for ns in m["namespaces"]:
                    refs.update((c["id"], c["key"]) for c in ns["chunks"])
            chunks = sorted(refs)
            self.chunk_keys = refs
        else:
            for e in self.entries:  # before anything is written
                self._manifest(e)
            chunks = sorted(src.chunk_ids())
            self.chunk_keys = {}
        have = set(self.dst.chunk_ids()) if self.dst else set()
        # without keys the destination's chunks are never deleted (a chunk lost at the source must not take the copy's
        # with it): those the source no longer holds are counted, and a keyed copy collects the unreferenced ones
        self.dest_only_chunks = len(have - set(chunks)) if not keyed else 0
        self.chunks_new = [c for c in chunks if c not in have]
        self.chunks_have = [c for c in chunks if c in have]
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            sizes = list(pool.map(lambda c: src.storage.size(src.chunk_path(c)), self.chunks_new))
        self.planned_bytes = sum(sizes) + sum(src.storage.size(src._p("manifests", e["snapshot_id"])) for e in self.entries)

    def _plan_segments(self, live_entries):
        """The change segments a point-in-time restore from the destination's live snapshots can replay: every segment
        of the source ending at or after the oldest of them (one ending at it is the snapshot's recorded cut)."""
        cts = [tuple(e["cluster_time"]) for e in live_entries if e.get("cluster_time")]
        listed = segments.list_segments(self.src) if cts else []
        self.segments = [s for s in listed if s["to"] >= min(cts)] if cts else []
        have = {s["name"] for s in segments.list_segments(self.dst)} if self.dst and self.segments else set()
        self.segments_new = [s for s in self.segments if s["name"] not in have]
        src = self.src
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            self.planned_bytes += sum(pool.map(lambda s: src.storage.size(segments.segment_path(src, s)), self.segments_new))

    def _manifest(self, entry):
        """The manifest's bytes from the source, checked against its catalog entry's digest and for its format."""
        sid = entry["snapshot_id"]
        data = self.src.storage.get(self.src._p("manifests", sid))
        if _sha(data) != entry["manifest_sha256"]:
            raise crypto.integrity_error("manifest", sid, "does not match its catalog entry (in the source store)")
        check_blob(data, b"KBM1", "manifest", sid)
        return data

    def summary(self, planned: bool = False) -> dict:
        head_changes = self.head_changes()
        out = {"job": self.job, "source": self.src.storage.root, "dest": self.dst_storage.root,
               "authenticated": self.provider is not None, "snapshots": list(self.to_copy), "expired": list(self.expire),
               "live": [sid for _seq, sid in self.live], "head": head_changes, "dest_only_chunks": self.dest_only_chunks}
        if planned:
            out.update(objects={"chunks": len(self.chunks_new), "segments": len(self.segments_new), "manifests": len(self.entries),
                                "catalog": len(self.entries)}, bytes=self.planned_bytes)
        else:
            out.update(objects=dict(self.counts), bytes=self.bytes, skipped=self.skipped)
        if not planned:
            out["gc"] = self.gc
        out["changed"] = bool(self.expire or head_changes != "unchanged"
                              or (any(self.counts.values()) if not planned else self.to_copy or self.chunks_new or self.segments_new))
        return out

    def head_changes(self) -> str:
        """'copied' (the source's, verbatim), 'written' (the destination's own) or 'unchanged'."""
        if self.provider is None:
            return "unchanged" if self.dst_head == self.src_head else "copied"
        old = self.dst_head
        if old is not None and old.get("live") == sorted(self.live) and old.get("key_id") == self.src_head["key_id"]:
            return "unchanged"
        return "written"

    # run ------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Copy what plan() found, in commit order; returns the summary of what was done."""
        if not hasattr(self, "live"):
            self.plan()
        src, job = self.src, self.job
        store.check_format(self.dst_storage, create=True)
        if self.dst is None:
            self.dst = store.JobStore(self.dst_storage, job)
        for key_id in self.keyring:
            data = src.storage.get(src.keyring_path(key_id))
            check_keyring_record(data, key_id)
            self._count("keyring", self._put(self.dst.keyring_path(key_id), data, "keyring entry", key_id), data)
        self._copy_chunks()
        self._copy_segments()  # before the catalog entries: an entry's recorded cut segment must be there
        for e in self.entries:
            sid = e["snapshot_id"]
            data = self._manifest(e)
            self._count("manifests", self._put(src._p("manifests", sid), data, "manifest", sid), data)
        for e in sorted(self.entries, key=lambda x: x["seq"]):
            sid = e["snapshot_id"]
            data = src.storage.get(src._p("catalog", sid + ".json"))
            if json.loads(data) != e:
                raise crypto.integrity_error("catalog entry", sid, "changed in the source store during the copy")
            self._count("catalog", self._put(src._p("catalog", sid + ".json"), data, "catalog entry", sid), data)
        self._commit_head()
        for sid in self.expire:  # after the head no longer lists them; their manifests are needed by nothing else
            self.dst_storage.delete(self.dst._p("catalog", sid + ".json"))
            self.dst_storage.delete(self.dst._p("manifests", sid))
        if self.provider is not None:
            self.gc = self.dst.gc(self._dst_keys(), now=self.now)
            if self.window_hours is not None:  # segments no restore inside the window needs, as the daemon collects them
                self.gc["segments"] = segments.collect(self.dst, self._dst_keys(), self.window_hours, self.now)
        elif hasattr(self.dst_storage, "clean_temporary"):  # what a killed copy left in a folder (gc does it with keys)
            self.dst_storage.clean_temporary(job, self.now.timestamp() - GRACE_SECONDS)
        return self.summary()

    def _count(self, kind, written, data):
        if written:
            self.counts[kind] += 1
            self.bytes += len(data)
        else:
            self.skipped += 1

    def _copy_chunks(self):
        src = self.src

        def one(cid):
            path = src.chunk_path(cid)
            data = src.storage.get(path)
            key_id = check_blob(data, b"KBC1", "chunk", cid)
            if self.provider is not None:
                src._open_chunk(cid, self.src_keys, self.chunk_keys.get(cid))  # its AEAD tag, with the key its manifest names
            elif key_id != "none" and key_id not in self.keyring:
                raise crypto.integrity_error("chunk", cid, "names key %s, which the keyring does not hold" % key_id)
            return self._put(path, data, "chunk", cid, compare_size=True), len(data)

        def have(cid):
            path = src.chunk_path(cid)
            if self.dst_storage.size(path) != src.storage.size(path):
                raise crypto.integrity_error("chunk", cid, "differs between the source and the destination (%s in %s): one of "
                                             "them was modified; check both stores before copying again" % (path, self.dst_storage.root))
        if self.provider is not None:
            for key_id in set(self.chunk_keys.values()):  # unwrap every key the chunks need once, before the threads
                self.src_keys.key(key_id)
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(have, self.chunks_have))
            for written, size in pool.map(one, self.chunks_new):
                if written:
                    self.counts["chunks"] += 1
                    self.bytes += size
                else:
                    self.skipped += 1
        self.skipped += len(self.chunks_have)

    def _copy_segments(self):
        """Copy the planned segments in order, a batch at a time: each checked for its format (opened with the keys, in
        a keyed copy) and chained to its predecessor (the SHA-256 of the predecessor's stored bytes, which needs no
        key), then written; one the destination holds is skipped when equal and an error naming it otherwise."""
        src = self.src
        digests = {}
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            for k in range(0, len(self.segments), SEGMENT_BATCH):
                batch = self.segments[k:k + SEGMENT_BATCH]
                blobs = list(pool.map(lambda s: bytes(src.storage.get(segments.segment_path(src, s))), batch))
                for s, data in zip(batch, blobs, strict=True):
                    prev = check_segment(data, s, self.keyring)
                    if self.provider is not None:
                        segments.open_segment(self.job, s, data, self.src_keys)
                    before = segments.NO_PREDECESSOR if s["seq"] == 1 else digests.get((s["timeline"], s["seq"] - 1))
                    if before is not None and prev != before:
                        raise crypto.integrity_error("segment", s["name"], "does not chain to its predecessor (in the source "
                                                     "store): a segment was replaced, reordered or replayed")
                    digests[(s["timeline"], s["seq"])] = hashlib.sha256(data).digest()
                puts = pool.map(lambda s, data: self._put(segments.segment_path(src, s), data, "segment", s["name"]), batch, blobs)
                for written, data in zip(puts, blobs, strict=True):
                    self._count("segments", written, data)

    def _commit_head(self):
        path = self.dst._p("catalog-head.json")
        if self.provider is None:
            # the head planned from, even if the source has a newer one by now (its entries are the ones copied)
            data = self.src_head_bytes
            if self.dst_storage.exists(path) and self.dst_storage.get(path) == data:
                return
            self.dst_storage.put_atomic(path, data)
            if self.dst_storage.get(path) != data:
                raise StoreError("The destination %s returned another catalog head than was written: check the store."
                                 % self.dst_storage.root)
            return
        if self.head_changes() == "unchanged":
            return
        self.dst.put_head(self._dst_keys(), self.live, self.src_head["key_id"], prev=self.dst_head, now=self.now)


def copy_snapshots(src: store.FileStorage | objectstore.S3Storage, dst: store.FileStorage | objectstore.S3Storage, job: str, snapshots: str | list = "all",
                   provider: kmip.KmipClient | None = None, keep_last: int | None = None, schedule: dict | None = None,
                   check: bool = False, now: datetime.datetime | None = None, encryption: bool | None = None,
                   window_hours: float | None = None) -> dict:
    """Copy job's snapshots (all, latest or a list of ids), and the change segments after the oldest snapshot live at
    the destination, from src to dst; check: only plan. window_hours: a keyed copy collects the destination's segments
    with this point-in-time window (None: keeps them). Returns the summary: snapshots copied, expired, objects and
    bytes, what happened to the destination's head, changed."""
    c = Copy(src, dst, job, snapshots, provider, keep_last, schedule, now, encryption, window_hours=window_hours)
    planned = c.plan()
    return planned if check else c.run()


# the module's request ---------------------------------------------------------------------------------------
def snapshots_option(value: list | str | None) -> str | list:
    """The snapshots option (a list, as Ansible gives it) as copy_snapshots takes it."""
    values = [value] if isinstance(value, str) else list(value or ["all"])
    if values in (["all"], ["latest"]):
        return values[0]
    if "all" in values or "latest" in values:
        raise StoreError("snapshots is %s: give all, latest, or a list of snapshot ids." % ", ".join(values))
    return values


def copy_request(p: dict, check_mode: bool = False) -> dict:
    """snapshot_copy's result from its parameters p: the source (store or object_store, else the job's configured
    store), the destination (dest_store or dest_object_store), snapshots, authenticate (KMIP access as the store
    readers take it) and dest_retention (keep_last, or schedule: a schedule dict or 'job' for the job's own)."""
    job = config.validate_name(p["job"], "job name")
    cfg = job_config.load_job(p["config_dir"], job)  # None on a host that does not run the job
    if p["store"] or p["object_store"]:
        src = storage.open_storage(p["store"], p["object_store"], must_exist=True)
    elif cfg is not None:
        src = storage.job_storage(cfg, p["data_dir"], must_exist=True)
    else:
        raise StoreError("Job %s is not declared in %s: give store or object_store, the source snapshot store."
                         % (job, config.jobs_dir(p["config_dir"])))
    if not (p["dest_store"] or p["dest_object_store"]):
        raise StoreError("No destination: give dest_store (a folder) or dest_object_store (a bucket).")
    dst = storage.open_storage(p["dest_store"], p["dest_object_store"])
    if getattr(src, "root", None) == getattr(dst, "root", None) and type(src) is type(dst):
        raise StoreError("The source and the destination are the same store (%s): give another destination." % src.root)
    retention_opts = p.get("dest_retention") or {}
    keep_last, schedule = retention_opts.get("keep_last"), retention_opts.get("schedule")
    if schedule == "job":
        if cfg is None:
            raise StoreError("dest_retention.schedule is job but job %s is not declared in %s: give the schedule's rules."
                             % (job, config.jobs_dir(p["config_dir"])))
        schedule = cfg.get("schedule") or {}
    if keep_last is not None and schedule is not None:
        raise StoreError("dest_retention: give keep_last or schedule, not both.")
    if isinstance(schedule, dict):
        schedule = retention.validate_schedule(schedule)
    snapshots = snapshots_option(p["snapshots"])
    if not p["authenticate"]:
        return copy_snapshots(src, dst, job, snapshots, None, keep_last, schedule, check=check_mode)
    settings = restore_request.kmip_settings(p, cfg)
    if settings is None:
        raise StoreError("authenticate needs KMIP access: give kmip_servers, kmip_ca_file and client_cert_file, or "
                         "config_dir on a daemon host.")
    encryption = bool(cfg.get("encryption")) if cfg is not None else None  # None: the source's keyring tells
    window = (cfg or {}).get("point_in_time_window_hours", segments.DEFAULT_WINDOW_HOURS)
    with kmip.KmipClient(*settings) as client:
        return copy_snapshots(src, dst, job, snapshots, client, keep_last, schedule, check=check_mode, encryption=encryption,
                              window_hours=float(window or 0))
