# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The snapshot store (no Ansible imports). PRIVATE to the collection.

Storage is a narrow interface (put_atomic, get, exists, list, delete, rename, mtime, touch,
sync) over "/"-separated relative paths, so an object store can follow FileStorage.

A job's area, <root>/<job>/:
  keyring/<key_id>.json    wrapped data keys, one record per key and epoch, authenticated with
                           a MAC keyed by a subkey of the unwrapped key over every field
                           (job, key_id, purpose, epoch, master key UID), so a swapped or
                           edited record fails
  chunks/<aa>/<chunk_id>   "KBC1" + key id + seal(zstd(concatenated raw BSON)), content-addressed
                           by the keyed HMAC of the plaintext and the key id (so each key epoch has
                           chunks of its own); aad binds job, chunk id, key id
  manifests/<snapshot_id>  "KBM1" + key id + seal(zstd(BSON manifest)); aad binds job, snapshot id, key id
  catalog/<snapshot_id>.json   non-secret fields plus a MAC keyed by a subkey of the snapshot's
                           data key (a plain SHA-256 checksum only for an unencrypted snapshot);
                           written last: a snapshot exists only once this file does
The key id "none" (the null cipher) is refused wherever an encrypted job's Keys read: a store
writer without the data keys cannot pass a forged object off as an unencrypted one.
  pending/<snapshot_id>.json   a snapshot in progress (started, base snapshot)
  catalog-head.json        the catalog head: the last committed sequence number and snapshot id and the
                           live (sequence number, snapshot id) pairs, MAC'ed with a subkey of the snapshot key
                           named in it (key_id). Rewritten atomically by the daemon only: after a snapshot's
                           catalog entry (take_snapshot) and before retention deletes entries, so removing,
                           replaying or swapping catalog entries is detected (resolve, live_catalog)

Garbage collection against a concurrent snapshot (pending markers plus a grace period): a
snapshot writes its pending marker (naming its base snapshot) before anything else, touches
every existing chunk it reuses by content, checks at commit that every chunk it references
still exists, and removes the marker after its catalog entry. GC keeps every chunk referenced
by a catalog entry or by the base of a live pending marker, and deletes an unreferenced chunk
only when its mtime is older than both the grace period and the start of every live snapshot.
A kill -9 anywhere leaves a stale marker (ignored after stale_seconds) and unreferenced files
that a later GC removes; catalog entries are removed before the files only they reference.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import os
import socket
import threading
from typing import TYPE_CHECKING, Iterator

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import crypto
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, KmipBackupError, StoreError
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.files import atomic_write, ensure_private_dir, fsync_dir
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.storenames import CHUNK_RE, JOB_RE, SNAPSHOT_RE
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.timeutil import iso, utcnow

if TYPE_CHECKING:  # annotations only: the store takes any storage and key provider with these methods
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.kmip import KmipClient
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.objectstore import S3Storage

try:
    import bson
    BSON_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    bson = None
    BSON_IMPORT_ERROR = e

CATALOG_FIELDS = ("snapshot_id", "seq", "job", "created", "cluster_time", "data_bytes", "stored_bytes", "written_bytes", "doc_count",
                  "namespaces", "encryption", "master_key_uids", "key_id", "manifest_sha256", "expires", "type", "format")
# MAC'ed when present (an entry written before they existed keeps its MAC): the change segment closing at the cut
CATALOG_OPTIONAL = ("segment",)
PURPOSES = ("head", "snapshot", "chunk_id")
HEAD_FIELDS = ("format", "job", "seq", "snapshot_id", "live", "key_id", "updated")
HEAD_FORMAT = 1


def _require_bson():
    if bson is None:
        raise StoreError("The Python package pymongo (bson) is missing (%s): install the collection's requirements." % BSON_IMPORT_ERROR)


# catalog fields shown to users (snapshot_info, backup_snapshot)
PUBLIC_FIELDS = ("created", "cluster_time", "data_bytes", "stored_bytes", "written_bytes", "doc_count", "namespaces",
                 "encryption", "master_key_uids", "expires")


def public_entry(entry: dict) -> dict:
    """The non-secret, user-facing fields of a catalog entry."""
    out = {"id": entry.get("snapshot_id")}
    out.update((k, entry.get(k)) for k in PUBLIC_FIELDS)
    out["kind"] = entry.get("type")
    return out


def canonical(obj: dict | list) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


# put_atomic(sync=False) publishes its files in batches of this many bytes: one round of parallel fsyncs per batch
# instead of an fsync per file on a writer thread's critical path (each a device cache flush, and a journal commit on
# a journaling file system; concurrent ones share them)
BATCH_BYTES = 64 << 20
_FSYNC_THREADS = 16


def _publish(batch):
    """Make a batch of [(fd, temporary name, name)] durable, then give each file its name: fsyncs in parallel,
    renames only once every fsync succeeded. On any error the
    temporary files are removed (a kill -9 leaves them to clean_temporary)."""
    try:
        if len(batch) > 1:
            with concurrent.futures.ThreadPoolExecutor(min(_FSYNC_THREADS, len(batch))) as pool:
                list(pool.map(os.fsync, [fd for fd, _tmp, _full in batch]))
        elif batch:
            os.fsync(batch[0][0])
        for _fd, tmp, full in batch:
            os.replace(tmp, full)
    except BaseException:
        for _fd, tmp, _full in batch:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    finally:
        for fd, _tmp, _full in batch:
            os.close(fd)


class FileStorage:
    """Storage on a local filesystem: files 0600, folders 0700, atomic replace."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._lock = threading.Lock()
        self._batch, self._batch_bytes = [], 0  # put_atomic(sync=False) files waiting for their fsync and name

    def _p(self, path):
        if path.startswith("/") or ".." in path.split("/"):
            raise StoreError("Invalid store path %r." % path)
        return os.path.join(self.root, *path.split("/"))

    def put_atomic(self, path: str, data: bytes, sync: bool = True) -> None:
        """Write data at path atomically and durably. sync=False (a snapshot's chunks): the file is written under a
        temporary name without an fsync and gets its name in a batch (every BATCH_BYTES, and at sync()): the batch's
        files are fsynced together, then renamed; the folders' fsync waits for sync(paths). A name never shows a
        torn file, and the file's name is durable only after sync(paths) returns."""
        full = self._p(path)
        folder = os.path.dirname(full)
        if not os.path.isdir(folder):
            self._mkdirs(folder)
        if sync:
            atomic_write(full, data)
            return
        tmp = "%s.tmp-%d-%s" % (full, os.getpid(), os.urandom(4).hex())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        with self._lock:
            self._batch.append((fd, tmp, full))
            self._batch_bytes += len(data)
            if self._batch_bytes < BATCH_BYTES:
                return
            batch, self._batch, self._batch_bytes = self._batch, [], 0
        _publish(batch)

    def _publish_all(self):
        with self._lock:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
        _publish(batch)

    def _mkdirs(self, folder):
        """folder and every missing parent up to the root, each 0700."""
        missing = []
        while not os.path.isdir(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for f in reversed(missing):
            ensure_private_dir(f)

    def sync(self, paths: list) -> None:
        """Make earlier put_atomic(sync=False) writes durable: publish the files still waiting for their batch, then
        fsync the paths' folders (in parallel: the file system flushes concurrent fsyncs together)."""
        self._publish_all()
        folders = sorted({os.path.dirname(self._p(path)) for path in paths})
        if len(folders) <= 1:
            for folder in folders:
                fsync_dir(folder)
            return
        with concurrent.futures.ThreadPoolExecutor(min(8, len(folders))) as pool:
            list(pool.map(fsync_dir, folders))

    def get(self, path: str) -> bytes | None:
        try:
            with open(self._p(path), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StoreError("The store object %s is missing under %s: the store is incomplete; restore another snapshot "
                             "or a copy of the store." % (path, self.root)) from None

    def exists(self, path: str) -> bool:
        return os.path.exists(self._p(path))

    def list(self, prefix: str) -> list:
        """Names (not paths) directly under the folder prefix, sorted; temporary files left out."""
        try:
            return sorted(n for n in os.listdir(self._p(prefix)) if ".tmp" not in n)
        except FileNotFoundError:
            return []

    def list_tree(self, prefix: str) -> list:
        """Paths (relative to the folder prefix) of every file below it, at any depth, sorted; temporary files left out."""
        top = self._p(prefix)
        out = []
        for folder, _dirs, names in os.walk(top):
            rel = os.path.relpath(folder, top)
            out.extend(n if rel == "." else rel + "/" + n for n in names if ".tmp" not in n)
        return sorted(out)

    def delete(self, path: str) -> None:
        try:
            os.unlink(self._p(path))
        except FileNotFoundError:
            pass

    def rename(self, src: str, dst: str) -> None:
        os.replace(self._p(src), self._p(dst))
        fsync_dir(os.path.dirname(self._p(dst)))

    def mtime(self, path: str) -> float:
        return os.stat(self._p(path)).st_mtime

    def size(self, path: str) -> int:
        return os.stat(self._p(path)).st_size

    def touch(self, path: str) -> None:
        os.utime(self._p(path))

    def clean_temporary(self, prefix: str, older_than: float) -> None:
        """Remove temporary files a killed writer left under prefix (recursively)."""
        base = self._p(prefix)
        for folder, _dirs, names in os.walk(base):
            for n in names:
                if ".tmp" in n:
                    full = os.path.join(folder, n)
                    try:
                        if os.stat(full).st_mtime < older_than:
                            os.unlink(full)
                    except FileNotFoundError:
                        pass


def _blob(magic, key_id, sealed):
    kid = key_id.encode("ascii")
    return magic + bytes([len(kid)]) + kid + sealed


def _unblob(magic, blob, kind, object_id):
    if blob[:4] != magic or len(blob) < 5:
        raise crypto.integrity_error(kind, object_id, "has an unknown format")
    n = blob[4]
    try:
        key_id = blob[5:5 + n].decode("ascii")
    except UnicodeDecodeError:
        raise crypto.integrity_error(kind, object_id, "has an unknown format") from None
    return key_id, blob[5 + n:]


# The store-level format record at the root of every store (folder or bucket + prefix): readers refuse a
# record of another format or a newer version; the first snapshot writes it (a store of 0.1.0 has none).
FORMAT_FILE = "kmipbackup-store.json"
STORE_FORMAT, STORE_FORMAT_VERSION = "kmipbackup-store", 1
_JOB_AREA = ("keyring", "chunks", "manifests", "catalog", "pending")


def check_format(storage: FileStorage | S3Storage, create: bool = False) -> dict | None:
    """Check the store's format record; with create, write it where it is missing (refusing a root that holds
    something else than job areas). StoreError saying what the root holds and what to do."""
    where = getattr(storage, "root", "")
    if storage.exists(FORMAT_FILE):
        try:
            record = json.loads(storage.get(FORMAT_FILE))
        except ValueError:
            record = {}
        if not isinstance(record, dict) or record.get("format") != STORE_FORMAT:
            raise StoreError("%s holds something else than a kmipbackup snapshot store (its %s is not ours): point "
                             "the job at an empty folder or bucket prefix of its own." % (where, FORMAT_FILE))
        if not isinstance(record.get("version"), int) or record["version"] > STORE_FORMAT_VERSION:
            raise StoreError("The snapshot store %s has format version %r, newer than this collection reads (%d): "
                             "upgrade the collection." % (where, record.get("version"), STORE_FORMAT_VERSION))
        return record
    if not create:
        return None
    for name in storage.list(""):
        if name == FORMAT_FILE or ".tmp" in name:
            continue
        if not JOB_RE.match(name) or not set(storage.list(name)) & set(_JOB_AREA):
            raise StoreError("%s already holds objects that are not a kmipbackup snapshot store (%r): point the job "
                             "at an empty folder or bucket prefix of its own." % (where, name))
    record = canonical({"format": STORE_FORMAT, "version": STORE_FORMAT_VERSION})
    put_new = getattr(storage, "put_new", None)
    if put_new is None:
        storage.put_atomic(FORMAT_FILE, record)
    elif not put_new(FORMAT_FILE, record):
        return check_format(storage)  # another writer created it meanwhile: check theirs
    return json.loads(record)


class JobStore:
    """One job's area of a store (a folder path, a FileStorage or an objectstore.S3Storage)."""

    def __init__(self, storage: str | FileStorage | S3Storage, job: str) -> None:
        if not JOB_RE.match(job or ""):
            raise StoreError("Invalid job name %r: use letters, digits, '_', '.' and '-'." % (job,))
        if isinstance(storage, str):
            storage = FileStorage(storage)
        self.storage = storage
        self.job = job
        check_format(storage)

    def _p(self, *parts):
        return "/".join((self.job,) + parts)

    # keyring -------------------------------------------------------------------------------------------
    def keyring_records(self) -> list:
        out = []
        for name in self.storage.list(self._p("keyring")):
            if name.endswith(".json"):
                try:
                    out.append(json.loads(self.storage.get(self._p("keyring", name))))
                except ValueError:
                    raise crypto.integrity_error("keyring entry", name[:-5], "is not valid JSON") from None
        return sorted(out, key=lambda r: (r.get("epoch", 0), r.get("purpose", "")))

    def keyring_path(self, key_id: str) -> str:
        return self._p("keyring", key_id + ".json")

    def keyring_record(self, key_id: str) -> dict | None:
        path = self.keyring_path(key_id)
        if not self.storage.exists(path):
            raise StoreError("The keyring of job %s has no key %s: the store is incomplete; restore the keyring from a copy "
                             "of the store." % (self.job, key_id))
        try:
            return json.loads(self.storage.get(path))
        except ValueError:
            raise crypto.integrity_error("keyring entry", key_id, "is not valid JSON") from None

    def _record_mac_input(self, record):
        fields = {k: record.get(k) for k in ("key_id", "purpose", "epoch", "master_key_uid", "wrapped", "created")}
        fields["job"] = self.job
        return canonical(fields)

    def put_key(self, key_id: str, purpose: str, epoch: int, master_key_uid: str | None, key: bytes | None, wrapped: dict | None,
                now: datetime.datetime | None = None) -> dict:
        if purpose not in PURPOSES:
            raise StoreError("Unknown key purpose %r." % purpose)
        record = {"key_id": key_id, "purpose": purpose, "epoch": epoch, "master_key_uid": master_key_uid,
                  "wrapped": wrapped, "created": iso(now or utcnow())}
        record["mac"] = crypto.mac(crypto.derive(key, "keyring"), self._record_mac_input(record))
        self.storage.put_atomic(self._p("keyring", key_id + ".json"), canonical(record))
        return record

    def verify_key_record(self, record: dict, key: bytes | None) -> None:
        if not isinstance(record.get("mac"), str) or not crypto.hmac.compare_digest(
                record["mac"], crypto.mac(crypto.derive(key, "keyring"), self._record_mac_input(record))):
            raise crypto.integrity_error("keyring entry", record.get("key_id"))

    # chunks ------------------------------------------------------------------------------------------
    def chunk_path(self, cid: str) -> str:
        return self._p("chunks", cid[:2], cid)

    def _chunk_aad(self, cid, key_id):
        return b"kmipbackup chunk\x00" + self.job.encode() + b"\x00" + cid.encode() + b"\x00" + key_id.encode()

    def has_chunk(self, cid: str) -> bool:
        return self.storage.exists(self.chunk_path(cid))

    def put_chunk(self, cid: str, plaintext: bytes, key_id: str, key: bytes | None, sync: bool = True) -> int:
        """Store a chunk; returns its stored size."""
        blob = _blob(b"KBC1", key_id, crypto.seal(key, crypto.compress(plaintext), self._chunk_aad(cid, key_id)))
        self.storage.put_atomic(self.chunk_path(cid), blob, sync=sync)
        return len(blob)

    @staticmethod
    def _key(keys, key_id, kind, object_id):
        """The data key an object names; IntegrityError naming the object when an encrypted job's object
        names the null cipher."""
        if keys.encryption and key_id in (None, "", "none"):
            raise crypto.integrity_error(kind, object_id, "names no data key (unencrypted) in an encrypted job")
        return keys.key(key_id)

    def _open_chunk(self, cid, keys, expect_key=None):
        """The compressed plaintext of a chunk, authenticated (IntegrityError naming the chunk)."""
        if not CHUNK_RE.match(cid):
            raise crypto.integrity_error("chunk", cid, "has an invalid id")
        blob = self.storage.get(self.chunk_path(cid))
        key_id, sealed = _unblob(b"KBC1", blob, "chunk", cid)
        if expect_key is not None and key_id != expect_key:
            raise crypto.integrity_error("chunk", cid, "names another key than its manifest")
        return crypto.open_sealed(self._key(keys, key_id, "chunk", cid), sealed, self._chunk_aad(cid, key_id), "chunk", cid)

    def read_chunk(self, entry: dict, keys: Keys) -> bytes:
        """The plaintext of a manifest's chunk entry, checked against the entry's key, size and hash
        (one read of the chunk; safe to call from several threads once the keys it needs are unwrapped).
        A chunk sealed with a data key is not hashed again: AES-GCM authenticated it under associated data that
        binds its id, and the id is the keyed hash of that same SHA-256 (store-format.md, chunks), so only the
        key's holder could have written other plaintext there. Null-cipher chunks have only the hash."""
        cid = entry["id"]
        plain = crypto.decompress(self._open_chunk(cid, keys, entry.get("key")), "chunk", cid)
        if len(plain) != entry["bytes"] or (
                entry.get("key") in (None, "", "none") and hashlib.sha256(plain).digest() != bytes(entry["sha256"])):
            raise crypto.integrity_error("chunk", cid, "does not match its manifest")
        return plain

    def chunk_ids(self) -> Iterator[str]:
        # one listing of the whole chunk area (a request per 1000 chunks on an object store), not one per folder
        for path in self.storage.list_tree(self._p("chunks")):
            aa, _sep, cid = path.partition("/")
            if CHUNK_RE.match(cid) and aa == cid[:2]:
                yield cid

    # manifests ---------------------------------------------------------------------------------------
    def _manifest_aad(self, snapshot_id, key_id):
        return b"kmipbackup manifest\x00" + self.job.encode() + b"\x00" + snapshot_id.encode() + b"\x00" + key_id.encode()

    def put_manifest(self, snapshot_id: str, manifest: dict, key_id: str, key: bytes | None) -> tuple[str, int]:
        """Store the manifest (a dict encoded as BSON); returns the blob's SHA-256 hex and size."""
        _require_bson()
        blob = _blob(b"KBM1", key_id, crypto.seal(key, crypto.compress(bson.encode(manifest)),
                                                  self._manifest_aad(snapshot_id, key_id)))
        self.storage.put_atomic(self._p("manifests", snapshot_id), blob)
        return hashlib.sha256(blob).hexdigest(), len(blob)

    def read_manifest(self, snapshot_id: str, keys: Keys, expect_sha256: str | None = None) -> dict:
        _require_bson()
        blob = self.storage.get(self._p("manifests", snapshot_id))
        if expect_sha256 is not None and hashlib.sha256(blob).hexdigest() != expect_sha256:
            raise crypto.integrity_error("manifest", snapshot_id, "does not match its catalog entry")
        key_id, sealed = _unblob(b"KBM1", blob, "manifest", snapshot_id)
        key = self._key(keys, key_id, "manifest", snapshot_id)
        plain = crypto.decompress(crypto.open_sealed(key, sealed, self._manifest_aad(snapshot_id, key_id), "manifest", snapshot_id),
                                  "manifest", snapshot_id)
        try:
            manifest = bson.decode(plain)
        except Exception:
            raise crypto.integrity_error("manifest", snapshot_id, "does not decode") from None
        if manifest.get("snapshot_id") != snapshot_id or manifest.get("job") != self.job:
            raise crypto.integrity_error("manifest", snapshot_id, "belongs to another snapshot")
        return manifest

    def manifest_ids(self) -> list:
        return [n for n in self.storage.list(self._p("manifests")) if SNAPSHOT_RE.match(n)]

    # catalog -----------------------------------------------------------------------------------------
    def _catalog_mac(self, entry, keys):
        fields = {k: entry.get(k) for k in CATALOG_FIELDS}
        fields.update((k, entry[k]) for k in CATALOG_OPTIONAL if k in entry)
        fields = canonical(fields)
        key = keys.key(entry["key_id"]) if entry.get("encryption") else None
        if key is None:
            return "sha256:" + hashlib.sha256(fields).hexdigest()
        return "hmac-sha256:" + crypto.mac(crypto.derive(key, "catalog"), fields)

    def put_catalog(self, entry: dict, keys: Keys) -> dict:
        entry = dict({k: entry.get(k) for k in CATALOG_FIELDS}, **{k: entry[k] for k in CATALOG_OPTIONAL if entry.get(k)})
        entry["mac"] = self._catalog_mac(entry, keys)
        self.storage.put_atomic(self._p("catalog", entry["snapshot_id"] + ".json"), canonical(entry))
        return entry

    def catalog(self) -> list:
        """Catalog entries (unverified, non-secret), oldest first (by seq: each snapshot's is its base's + 1,
        so order holds within one second); entries that do not parse are skipped."""
        out = []
        for name in self.storage.list(self._p("catalog")):
            if name.endswith(".json") and SNAPSHOT_RE.match(name[:-5]):
                try:
                    out.append(json.loads(self.storage.get(self._p("catalog", name))))
                except (ValueError, StoreError):
                    continue
        return sorted(out, key=lambda e: (int(e.get("seq") or 0), str(e.get("created")), str(e.get("snapshot_id"))))

    def _no_snapshot(self):
        return StoreError("Job %s has no snapshot in the store %s: take a snapshot first, or check the job name and "
                          "store location." % (self.job, getattr(self.storage, "root", "")))

    def catalog_files(self) -> list:
        """(snapshot id, seq or None) of every catalog entry file, by file name (unverified)."""
        out = []
        for name in self.storage.list(self._p("catalog")):
            if name.endswith(".json") and SNAPSHOT_RE.match(name[:-5]):
                try:
                    seq = json.loads(self.storage.get(self._p("catalog", name))).get("seq")
                except (ValueError, AttributeError, StoreError):
                    seq = None
                out.append((name[:-5], seq if isinstance(seq, int) else None))
        return out

    def catalog_entry(self, snapshot_id: str) -> dict:
        """The catalog entry of snapshot_id or 'latest' (unverified: resolve() authenticates), bound to its name: an
        entry whose content names another snapshot (a copy of another entry) is an IntegrityError."""
        if snapshot_id == "latest":
            entries = self.catalog()
            if not entries:
                raise self._no_snapshot()
            return entries[-1]
        if not SNAPSHOT_RE.match(snapshot_id or ""):
            raise StoreError("Invalid snapshot id %r: use an id from snapshot_info or 'latest'." % (snapshot_id,))
        path = self._p("catalog", snapshot_id + ".json")
        if not self.storage.exists(path):
            raise StoreError("Job %s has no snapshot %s in the store: list the snapshots with snapshot_info." % (self.job, snapshot_id))
        try:
            entry = json.loads(self.storage.get(path))
        except ValueError:
            raise crypto.integrity_error("catalog entry", snapshot_id, "is not valid JSON") from None
        if not isinstance(entry, dict) or entry.get("snapshot_id") != snapshot_id:
            raise crypto.integrity_error("catalog entry", snapshot_id, "holds the entry of another snapshot (%s): it was copied or "
                                         "swapped" % (entry.get("snapshot_id") if isinstance(entry, dict) else None))
        return entry

    def verify_catalog(self, entry: dict, keys: Keys) -> dict:
        """entry, once its MAC checks: an encrypted snapshot's entry must name a data key and carry a keyed MAC;
        an unencrypted one (a plain checksum) is refused when keys are an encrypted job's."""
        sid = entry.get("snapshot_id")
        mac, encryption = entry.get("mac"), entry.get("encryption")
        if entry.get("job") != self.job or not isinstance(mac, str) or not isinstance(encryption, bool):
            raise crypto.integrity_error("catalog entry", sid)
        if encryption:
            if entry.get("key_id") in (None, "", "none") or not mac.startswith("hmac-sha256:"):
                raise crypto.integrity_error("catalog entry", sid, "claims encryption without a data key and a keyed MAC")
        elif keys.encryption:
            raise crypto.integrity_error("catalog entry", sid, "says the snapshot is unencrypted but the job is encrypted")
        if not crypto.hmac.compare_digest(mac, self._catalog_mac(entry, keys)):
            raise crypto.integrity_error("catalog entry", sid)
        return entry

    # catalog head ------------------------------------------------------------------------------------
    def _head_mac(self, head, keys):
        fields = canonical({k: head.get(k) for k in HEAD_FIELDS})
        if head.get("key_id") in (None, "", "none"):
            return "sha256:" + hashlib.sha256(fields).hexdigest()
        return "hmac-sha256:" + crypto.mac(crypto.derive(keys.key(head["key_id"]), "catalog head"), fields)

    def read_head(self) -> dict | None:
        """The catalog head as stored (unverified), or None when the store has none."""
        path = self._p("catalog-head.json")
        if not self.storage.exists(path):
            return None
        try:
            head = json.loads(self.storage.get(path))
        except ValueError:
            head = None
        if not isinstance(head, dict):
            raise crypto.integrity_error("catalog head", self.job, "is not valid JSON")
        return head

    def catalog_head(self, keys: Keys, keyed: bool | None = None) -> dict | None:
        """The authenticated catalog head, or None when the store has none. keyed (default keys.encryption): refuse a
        head with a plain checksum (an encrypted job's head is always MAC'ed with one of its data keys)."""
        head = self.read_head()
        if head is None:
            return None
        keyed = keys.encryption if keyed is None else keyed
        live = head.get("live")
        if (head.get("job") != self.job or head.get("format") != HEAD_FORMAT or not isinstance(head.get("mac"), str)
                or not isinstance(head.get("seq"), int) or not isinstance(live, list)
                or not all(isinstance(x, list) and len(x) == 2 and isinstance(x[0], int) and SNAPSHOT_RE.match(str(x[1]))
                           for x in live)):
            raise crypto.integrity_error("catalog head", self.job, "has an unknown format")
        if keyed and (head.get("key_id") in (None, "", "none") or not head["mac"].startswith("hmac-sha256:")):
            raise crypto.integrity_error("catalog head", self.job,
                                         "has only a checksum (an unencrypted job's head) but the job is encrypted")
        if not crypto.hmac.compare_digest(head["mac"], self._head_mac(head, keys)):
            raise crypto.integrity_error("catalog head", self.job)
        return head

    def put_head(self, keys: Keys, live: list, key_id: str, prev: dict | None = None, now: datetime.datetime | None = None) -> dict:
        """Write the catalog head: live [(seq, snapshot id)] (the newest last), MAC'ed under the data key key_id.
        The sequence number never goes back, so a replayed older entry can always be told from a new one."""
        live = sorted([int(seq), sid] for seq, sid in live)
        if not live:
            raise StoreError("A catalog head needs at least one live snapshot.")
        head = {"format": HEAD_FORMAT, "job": self.job, "seq": max([live[-1][0]] + ([int(prev["seq"])] if prev else [])),
                "snapshot_id": live[-1][1], "live": live, "key_id": key_id or "none", "updated": iso(now or utcnow())}
        head["mac"] = self._head_mac(head, keys)
        cas = getattr(self.storage, "put_if_unchanged", None)  # an object store: compare-and-swap on the head read
        if cas is None:  # a folder: one daemon (its data_dir lock) writes it
            self.storage.put_atomic(self._p("catalog-head.json"), canonical(head))
        elif not cas(self._p("catalog-head.json"), canonical(head), canonical(prev) if prev else None):
            raise StoreError("Another writer changed the catalog head of job %s in the store %s meanwhile: only one Backup "
                             "Daemon may write a job's store (check that no other host runs this job); nothing was "
                             "committed." % (self.job, getattr(self.storage, "root", "")))
        return head

    def _entry_keys(self, entry, keys):
        """keys, or a Keys of the entry's own encryption sharing their provider (snapshots taken before a job's
        encryption was enabled stay verifiable)."""
        enc = bool(entry.get("encryption"))
        return keys if enc == keys.encryption else Keys(self, keys.provider, enc)

    def check_daemon_record(self, head: dict | None, last_known: str | None) -> None:
        """IntegrityError when the daemon's own record of its last snapshot (last_known, a snapshot id) is newer than
        what the catalog head says: the whole catalog (head included) was rolled back to an older state."""
        if not last_known or head is None or any(sid == last_known for _seq, sid in head["live"]):
            return
        if last_known[:16] >= head["snapshot_id"][:16]:  # ids start with their creation time
            raise crypto.integrity_error(
                "catalog head", head["snapshot_id"],
                "is older than the Backup Daemon's record of its last snapshot %s, which is missing from the store: the "
                "store was rolled back (removed or replayed objects; if an older copy of the store was put back on "
                "purpose, stop the daemon and remove the job's status file status/%s.json to accept it)"
                % (last_known, self.job))

    def resolve(self, snapshot: str, keys: Keys, expect_encryption: bool | None = None, last_known: str | None = None,
                keyed_head: bool | None = None) -> dict:
        """The authenticated catalog entry of snapshot (an id or 'latest'), checked against the catalog head: the entry
        must be bound to its id, authenticate, and be live in the head (or newer than the head and authenticate: a
        snapshot committed just before a crash that kept the head from being updated). expect_encryption (default
        keys.encryption): the job is encrypted, so an unencrypted entry or head is refused. last_known: the daemon's
        own record of its last snapshot, when available. keyed_head (default: as expect_encryption): refuse a catalog
        head with a plain checksum. IntegrityError names what is missing or does not match."""
        enc = keys.encryption if expect_encryption is None else bool(expect_encryption)
        head = self.catalog_head(keys, keyed=enc if keyed_head is None else keyed_head)
        if head is None:
            if not self.catalog():
                raise self._no_snapshot()
            raise crypto.integrity_error(
                "catalog head", self.job, "is missing while the catalog holds entries (it was removed, or the store was "
                "written before catalog heads existed; the Backup Daemon's next snapshot writes it)")
        self.check_daemon_record(head, last_known)
        live = {sid: seq for seq, sid in head["live"]}
        beyond = self._beyond_head(head, keys)
        if snapshot == "latest":
            sid = beyond[-1]["snapshot_id"] if beyond else head["snapshot_id"]
        else:
            if not SNAPSHOT_RE.match(snapshot or ""):
                raise StoreError("Invalid snapshot id %r: use an id from snapshot_info or 'latest'." % (snapshot,))
            sid = snapshot
        exists = self.storage.exists(self._p("catalog", sid + ".json"))
        if sid in live and not exists:
            raise crypto.integrity_error(
                "catalog entry", sid, "is missing, but the catalog head lists it as live (sequence number %d): it was "
                "removed from the store (rollback)" % live[sid])
        entry = self.catalog_entry(sid)
        if enc and not entry.get("encryption"):
            raise crypto.integrity_error(
                "catalog entry", sid, "says the snapshot is unencrypted but the job is encrypted (snapshot_restore: set "
                "allow_unencrypted=true only if the job took unencrypted snapshots before its encryption was enabled and "
                "you trust the store)")
        if sid not in live and not any(e["snapshot_id"] == sid for e in beyond):
            if isinstance(entry.get("seq"), int) and entry["seq"] > head["seq"]:
                raise crypto.integrity_error(
                    "catalog entry", sid, "is newer than the catalog head (last sequence number %d) but does not "
                    "authenticate with the job's keys: it was planted" % head["seq"])
            raise crypto.integrity_error(
                "catalog entry", sid, "is not live according to the catalog head (last sequence number %d): it expired or "
                "was never committed, and an old entry put back into the store is refused" % head["seq"])
        if sid in live and entry.get("seq") != live[sid]:
            raise crypto.integrity_error("catalog entry", sid, "has another sequence number than the catalog head records")
        return self.verify_catalog(entry, self._entry_keys(entry, keys))

    def _beyond_head(self, head, keys):
        """Entries newer than the head (seq above its last committed one) that authenticate, oldest first: normally
        none; one after a crash between a catalog entry and its head update (only the daemon, holding the keys, can
        write one that authenticates). One that does not was planted: it is left out, so it decides nothing
        (snapshot_info lists it as unauthenticated; asking for it by id is an IntegrityError)."""
        keyed = head.get("key_id") not in (None, "", "none")  # then a checksum-only (unencrypted) entry proves nothing
        return [e for e in self.catalog() if isinstance(e.get("seq"), int) and e["seq"] > head["seq"]
                and (e.get("encryption") or not keyed) and self._authenticates(e, keys)]

    def auth_master_key_uids(self, keys: Keys) -> list:
        """The master key UID the catalog head's MAC key is wrapped under (from the unverified head and keyring record),
        so access to it can be checked before authenticating; [] when unknown (resolve() then reports why). Never a UID
        from an unauthenticated catalog entry."""
        try:
            head = self.read_head() or {}
            if head.get("key_id") not in (None, "", "none"):
                return [str(keys.master_key_uid(head["key_id"]))]
        except KmipBackupError:
            pass
        return []

    def live_catalog(self, keys: Keys, expect_encryption: bool | None = None, last_known: str | None = None) -> tuple[list, dict | None]:
        """(entries, head): the authenticated live entries, oldest first, checked against the catalog head (None when
        the store has none yet: then every entry that authenticates). IntegrityError names an entry the head lists
        that is missing or does not authenticate."""
        enc = keys.encryption if expect_encryption is None else bool(expect_encryption)
        head = self.catalog_head(keys, keyed=enc)
        if head is None:
            return [self.verify_catalog(e, self._entry_keys(e, keys)) for e in self.catalog()
                    if (e.get("encryption") or not enc) and self._authenticates(e, keys)], None
        self.check_daemon_record(head, last_known)
        out = []
        for seq, sid in head["live"]:
            if not self.storage.exists(self._p("catalog", sid + ".json")):
                raise crypto.integrity_error(
                    "catalog entry", sid, "is missing, but the catalog head lists it as live (sequence number %d): it was "
                    "removed from the store (rollback)" % seq)
            e = self.catalog_entry(sid)
            if e.get("seq") != seq:
                raise crypto.integrity_error("catalog entry", sid, "has another sequence number than the catalog head records")
            out.append(self.verify_catalog(e, self._entry_keys(e, keys)))
        return out + self._beyond_head(head, keys), head

    def _authenticates(self, entry, keys):
        """Whether entry is bound to its file name and its MAC checks (a key it names that does not exist: no)."""
        try:
            if self.catalog_entry(str(entry.get("snapshot_id"))) != entry:
                return False
            self.verify_catalog(entry, self._entry_keys(entry, keys))
            return True
        except (IntegrityError, StoreError):
            return False

    def expire_snapshots(self, snapshot_ids: list, keys: Keys, now: datetime.datetime | None = None) -> dict:
        """Remove snapshots from the catalog the way retention does: the catalog head is rewritten without them first,
        then their entries go, and so do entries the head does not list that are not newer than it (left over by a
        crash, or put back). Never the last live snapshot. Returns the new head."""
        entries, head = self.live_catalog(keys)
        gone = set(snapshot_ids)
        keep = [e for e in entries if e["snapshot_id"] not in gone]
        if not keep:
            raise StoreError("Snapshot %s is the last restorable snapshot of job %s: it is kept." % (entries[-1]["snapshot_id"]
                             if entries else None, self.job))
        if head is None or len(keep) != len(entries):
            head = self.put_head(keys, [(e["seq"], e["snapshot_id"]) for e in keep],
                                 head["key_id"] if head else keep[-1].get("key_id"), prev=head, now=now)
        live = {e["snapshot_id"] for e in keep}
        for sid, seq in self.catalog_files():
            if sid not in live and seq is not None and seq <= head["seq"]:
                self.delete_snapshot(sid)
        return head

    def delete_snapshot(self, snapshot_id: str, entries: list | None = None) -> None:
        """Remove a snapshot's catalog entry file (its manifest and chunks go at the next GC); never the last one. Only
        after the catalog head no longer lists it (expire_snapshots), else readers report a rollback.
        entries: the current catalog when the caller has just read it (else it is read here)."""
        ids = [e["snapshot_id"] for e in (self.catalog() if entries is None else entries)]
        if snapshot_id in ids and len(ids) <= 1:
            raise StoreError("Snapshot %s is the last restorable snapshot of job %s: it is kept." % (snapshot_id, self.job))
        self.storage.delete(self._p("catalog", snapshot_id + ".json"))

    def uncommit(self, snapshot_id: str) -> None:
        """Remove the catalog entry of a snapshot whose catalog head update lost to another writer (never live)."""
        self.storage.delete(self._p("catalog", snapshot_id + ".json"))

    # pending markers ---------------------------------------------------------------------------------
    def begin(self, snapshot_id: str, base: str | None, now: datetime.datetime | None = None) -> dict:
        marker = {"snapshot_id": snapshot_id, "base": base, "started": (now or utcnow()).timestamp(),
                  "host": socket.gethostname(), "pid": os.getpid()}
        self.storage.put_atomic(self._p("pending", snapshot_id + ".json"), canonical(marker))
        return marker

    def end(self, snapshot_id: str) -> None:
        self.storage.delete(self._p("pending", snapshot_id + ".json"))

    def pending(self, now: datetime.datetime, stale_seconds: float) -> list:
        out = []
        for name in self.storage.list(self._p("pending")):
            try:
                marker = json.loads(self.storage.get(self._p("pending", name)))
            except (ValueError, StoreError):
                continue
            if now.timestamp() - float(marker.get("started", 0)) < stale_seconds:
                out.append(marker)
        return out

    # garbage collection ------------------------------------------------------------------------------
    def gc(self, keys: Keys, now: datetime.datetime | None = None, grace_seconds: float = 3600, stale_seconds: float = 86400) -> dict:
        """Delete chunks and manifests no catalog entry or live snapshot needs; returns counts and bytes, and the number of
        catalog entries it saw (catalog_entries)."""
        now = now or utcnow()
        markers = self.pending(now, stale_seconds)
        cutoff = now.timestamp() - grace_seconds
        for m in markers:
            cutoff = min(cutoff, float(m["started"]) - 60)
        roots = {e["snapshot_id"]: e for e in self.catalog()}
        live_manifests = set(roots) | {m["base"] for m in markers if m.get("base")} | {m["snapshot_id"] for m in markers}
        referenced = set()
        for sid in sorted(live_manifests):
            if not self.storage.exists(self._p("manifests", sid)):
                continue
            entry = roots.get(sid)
            k = keys
            if entry is not None and bool(entry.get("encryption")) != keys.encryption:  # a job whose encryption was toggled
                k = Keys(self, keys.provider, bool(entry.get("encryption")))
            manifest = self.read_manifest(sid, k, entry.get("manifest_sha256") if entry else None)
            for ns in manifest["namespaces"]:
                referenced.update(c["id"] for c in ns["chunks"])
        deleted = freed = 0
        for cid in list(self.chunk_ids()):
            if cid in referenced:
                continue
            size = self.delete_if_older(self.chunk_path(cid), cutoff)
            if size is not None:
                deleted += 1
                freed += size
        manifests = 0
        for sid in self.manifest_ids():
            path = self._p("manifests", sid)
            if sid not in live_manifests and self.storage.mtime(path) < cutoff:
                self.storage.delete(path)
                manifests += 1
        if hasattr(self.storage, "clean_temporary"):
            self.storage.clean_temporary(self.job, cutoff)
        return {"chunks_deleted": deleted, "bytes_freed": freed, "manifests_deleted": manifests, "chunks_referenced": len(referenced),
                "catalog_entries": len(roots)}

    def delete_if_older(self, path: str, cutoff: float) -> int | None:
        """Delete path unless it was written or touched at or after cutoff (garbage collection's grace, which keeps
        what a snapshot in flight may still reference); returns the bytes freed, or None when kept or already gone."""
        try:
            if self.storage.mtime(path) >= cutoff:
                return None
            size = self.storage.size(path)
        except FileNotFoundError:
            return None
        self.storage.delete(path)
        return size

    def master_keys_needed(self, entries: list | None = None) -> list:
        """Master key UIDs the catalog's snapshots need (from the non-secret catalog entries, read here unless given)."""
        out = set()
        for e in (self.catalog() if entries is None else entries):
            out.update(e.get("master_key_uids") or [])
        return sorted(out)


class Keys:
    """A job's data keys: unwrapped once through the KeyProvider and cached in memory only.

    provider: an object with wrap(uid, key) -> dict and unwrap(dict) -> bytes (kmip.KmipClient);
    encryption False: the null cipher, no keys and no provider needed."""

    def __init__(self, job_store: JobStore, provider: KmipClient | None = None, encryption: bool = True) -> None:
        self.job_store = job_store
        self.provider = provider
        self.encryption = bool(encryption)
        self._cache = {}
        self._records = {}
        self._lock = threading.Lock()

    def _record(self, key_id):
        rec = self._records.get(key_id)
        if rec is None:
            rec = self.job_store.keyring_record(key_id)
            if rec.get("key_id") != key_id:
                raise crypto.integrity_error("keyring entry", key_id, "names another key")
            self._records[key_id] = rec
        return rec

    def key(self, key_id: str) -> bytes | None:
        """The unwrapped data key key_id (None for the null cipher, which an encrypted job's Keys refuse)."""
        if key_id in (None, "none"):
            if self.encryption:
                raise crypto.integrity_error("keyring entry", "none", "is the null cipher, which an encrypted job never uses")
            return None
        key = self._cache.get(key_id)
        if key is None:
            with self._lock:  # one unwrap per key even when threads ask at once (a KMIP session is not shared)
                key = self._cache.get(key_id)
                if key is None:
                    key = self._cache[key_id] = self._unwrap(key_id)
        return key

    def _unwrap(self, key_id: str) -> bytes:
        """The data key key_id, unwrapped by the provider and checked against its keyring record."""
        if self.provider is None:
            raise StoreError("Key %s is needed but no KMIP client was given: configure the KMIP client certificate "
                             "for this job." % key_id)
        rec = self._record(key_id)
        wrapped = rec.get("wrapped")
        if not isinstance(wrapped, dict):
            raise crypto.integrity_error("keyring entry", key_id, "has no wrapped key")
        if str(wrapped.get("master_key_uid")) != str(rec.get("master_key_uid")):
            # checked before any KMIP call: the record's MAC can only be checked once it is unwrapped
            raise crypto.integrity_error("keyring entry", key_id, "names master key %s but its wrapped key names %s"
                                         % (rec.get("master_key_uid"), wrapped.get("master_key_uid")))
        try:
            key = self.provider.unwrap(wrapped)
        except IntegrityError as e:
            if e.kind != "wrapped_key":
                raise
            # the KMIP layer only knows the master key; name the store object that holds the bad record
            raise IntegrityError(
                "The snapshot store's keyring entry %s (%s) cannot be used: %s. If it was modified or damaged, restore "
                "the keyring from a copy of the store and find out who changed the store."
                % (key_id, self.job_store.keyring_path(key_id), str(e).rstrip(".")),
                kind="keyring entry", object_id=key_id) from None
        if not isinstance(key, (bytes, bytearray)) or len(key) != crypto.KEY_BYTES:
            raise crypto.integrity_error("keyring entry", key_id, "does not unwrap to a data key")
        self.job_store.verify_key_record(rec, bytes(key))
        return bytes(key)

    def master_key_uid(self, key_id: str) -> str | None:
        if key_id in (None, "none"):
            return None
        return self._record(key_id).get("master_key_uid")

    def epoch_for(self, master_key_uid: str | None, now: datetime.datetime | None = None) -> tuple[str, str]:
        """(snapshot key id, chunk-id key id) of the epoch of master_key_uid, starting a new epoch
        when the job's master key changed (rotation): a new snapshot key and a new chunk-id key, so
        whoever holds an older master key cannot confirm guessed content by chunk id in new epochs
        (chunks are never shared across epochs: their ids bind the snapshot key's id)."""
        if not self.encryption:
            return "none", "none"
        if not master_key_uid:
            raise StoreError("An encrypted job needs a master key UID: run backup_job_encryption for job %s." % self.job_store.job)
        records = self.job_store.keyring_records()
        epochs = {}
        for r in records:
            epochs.setdefault(r.get("epoch", 0), {})[r.get("purpose")] = r
        if epochs:
            last = max(epochs)
            cur = epochs[last]
            if cur.get("snapshot", {}).get("master_key_uid") == master_key_uid and "chunk_id" in cur:
                for r in cur.values():
                    self._records[r["key_id"]] = r
                return cur["snapshot"]["key_id"], cur["chunk_id"]["key_id"]
            epoch = last + 1
        else:
            epoch = 1
        id_key, skey = crypto.new_key(), crypto.new_key()
        sid, cid = "snapshot-%d" % epoch, "chunk_id-%d" % epoch
        # chunk-id record first: an epoch is usable only once its snapshot key exists
        for key_id, purpose, key in ((cid, "chunk_id", id_key), (sid, "snapshot", skey)):
            wrapped = self.provider.wrap(master_key_uid, key)
            rec = self.job_store.put_key(key_id, purpose, epoch, master_key_uid, key, wrapped, now)
            self._records[key_id] = rec
            self._cache[key_id] = key
        return sid, cid
