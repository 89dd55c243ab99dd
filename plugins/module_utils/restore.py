# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restoring a snapshot (no Ansible imports). PRIVATE to the collection.

Targets: MongoTarget (a MongoDB deployment through pymongo), DirectoryTarget (mongodump
layout) and ArchiveTarget (mongodump --archive file). The writers take their documents from a
source (SnapshotSource: the snapshot's chunks; a point-in-time restore passes another source with
the same runs() method). Chunks are read once, in order, while a few worker threads read,
authenticate and decompress the next ones across namespaces (AES-GCM and zstd release the GIL); a
chunk's plaintext is already mongodump's .bson format, so it goes to the file as it is. Every chunk
is checked against its manifest entry (key, size; SHA-256 for null-cipher chunks) and every
namespace against the manifest's document count and content hash.
Directory and archive restores are built in a temporary sibling, flushed to disk as they are
written and fsynced before they are renamed into place, so a failure leaves the target untouched.
A MongoDB restore inserts as it reads: namespaces it creates are created, namespaces it replaces
(drop) load into staging collections renamed over them only once every chunk has been read and
verified, and a tampered or missing chunk (or a store gone mid-way) makes it drop what it created
and the staging collections, so the target is left as it was. Indexes are built once all the
data is in, a few collections at a time (as mongorestore does). Its progress is recorded in
the marker collection kmipbackup_restore.restoreInfo (state incomplete until the restore is
verified), keyed by job, snapshot and a digest of the namespaces restored, so one snapshot can go
to several databases.
Namespace names come from the manifest and are restored as the source had them: a directory
restore names files the way mongodump does (percent-encoded, long names cut and hashed), so no
name leaves the restore folder, and a MongoDB restore writes through raw commands (pymongo's
Collection refuses names servers accept, such as "a..b"). A name a target cannot hold is refused
before anything is written, naming the namespace by its position (#n) and suggesting exclude.
Messages name namespaces as #n (their position in the snapshot) for an encrypted snapshot;
errors of pymongo and of the file system are reported by kind and code, never with their text
(which can hold documents, _id values, namespaces and paths).
"""
from __future__ import annotations

import collections
import concurrent.futures
import fnmatch
import hashlib
import io
import json
import os
import shutil
import stat
import time
from typing import TYPE_CHECKING, Callable, Iterator

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import crypto, mongo, mongodump
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, RestoreError, RestoreTimeout, StoreError
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.files import atomic_write, ensure_private_dir, fsync_dir
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.storenames import namespace_hash
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.timeutil import iso, utcnow

if TYPE_CHECKING:  # annotations only: a restore reads the store through the JobStore and Keys it is given
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.progress import Meter
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.store import JobStore, Keys

try:
    import bson
    from bson.codec_options import CodecOptions
    from bson.raw_bson import RawBSONDocument
    BSON_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    bson = CodecOptions = RawBSONDocument = None
    BSON_IMPORT_ERROR = e

pymongo = None  # imported by _require_pymongo, for a MongoDB target: a directory or archive restore does without (~0.08 s)

RESTORE_INFO = "restoreInfo.txt"
MARKER_DB = "kmipbackup_restore"
MARKER_COLL = "restoreInfo"
INSERT_BATCH_BYTES = 8 << 20
READ_THREADS = 3  # reading, decrypting and decompressing release the GIL; the main thread writes
SYNC_EVERY = 64 << 20
FINISHERS = 4  # threads fsyncing a directory restore's finished files (concurrent fsyncs are flushed together)
READ_AHEAD = 4
READ_AHEAD_BYTES = 64 << 20  # plaintext being read ahead, at most (plus one chunk)
DB_NAME_FORBIDDEN = frozenset('/\\. "$\x00')
DB_NAME_MAX_BYTES = 63  # MongoDB's limit (and a database's folder name in a directory restore)
NS_MAX_BYTES = 255  # MongoDB's limit of a fully qualified namespace, db.collection (4.4 and later)
INSERT_BATCH_DOCS = 100000  # MongoDB's maxWriteBatchSize
INDEX_THREADS = 4  # index builds of several collections at once (mongorestore: 4 collections in parallel)
STAGING_PREFIX = "kmipbackup_tmp_"  # a namespace replaced by drop loads under this name, then is renamed over it


def _require_bson():
    if bson is None:
        raise RestoreError("The Python package pymongo (bson) is missing (%s): install the collection's requirements." % BSON_IMPORT_ERROR)


def _require_pymongo():
    global pymongo
    if pymongo is None:
        try:
            import pymongo.errors  # binds the global pymongo (the package)
        except ImportError as e:
            raise RestoreError("The Python package pymongo is missing (%s): install the collection's requirements." % e) from None


def restore_info_text(entry: dict, job: str, kmip_servers: list | None = None, selection: list | None = None) -> str:
    """restoreInfo.txt as Ops Manager writes it: what was restored and which keys it needs (selection: the
    selection_digest of the namespaces restored, so a later run knows what the target holds)."""
    ct = entry.get("cluster_time") or [0, 0]
    lines = ["Restore Information",
             "Backup Job: %s" % job,
             "Snapshot ID: %s" % entry["snapshot_id"],
             "Snapshot Type: %s" % entry.get("type"),
             "Created: %s" % entry["created"],
             "Last Oplog Applied: Timestamp(%d, %d)" % (ct[0], ct[1]),
             "Cluster Time: %d %d" % (ct[0], ct[1]),
             "Documents: %d" % entry.get("doc_count", 0),
             "Data Bytes: %d" % entry.get("data_bytes", 0),
             "Encryption: %s" % ("enabled" if entry.get("encryption") else "disabled")]
    lines += entry.get("restore_info_lines") or []  # a point-in-time restore's point, base snapshot and segments
    if selection:
        lines.append("Namespace Selection: %s" % selection)
    if entry.get("encryption"):
        lines.append("Master Key UUID: %s" % ", ".join(entry.get("master_key_uids") or []))
        if kmip_servers:
            lines.append("KMIP Server: %s" % ", ".join(kmip_servers))
        lines.append("You must have a certificate provisioned for this Master Key on the KMIP server to restore it again.")
    lines.append("Restored: %s" % iso(utcnow()))
    return "\n".join(lines) + "\n"


def _info_matches(text, job, snapshot_id, selection=None):
    return (("Snapshot ID: %s\n" % snapshot_id) in text and ("Backup Job: %s\n" % job) in text
            and (selection is None or ("Namespace Selection: %s\n" % selection) in text))


def label(encryption: bool, index: int, name: str, show: bool = False) -> str:
    """How messages and results name a namespace: its name, or #index for an encrypted snapshot unless show."""
    return name if show or not encryption else "#%d" % index


def valid_database_name(name: str) -> bool:
    """A MongoDB database name, which is also a safe single folder name."""
    return (isinstance(name, str) and bool(name) and not DB_NAME_FORBIDDEN.intersection(name)
            and len(name.encode("utf-8")) <= DB_NAME_MAX_BYTES)


def name_problem(db: str, coll: str) -> str | None:
    """Why no target can hold namespace db.coll (a MongoDB rule it breaks), or None. Collection names are
    free otherwise: a directory restore escapes them (mongodump.escape_collection_name)."""
    if not valid_database_name(db):
        return ("its database name is not one MongoDB allows (empty, longer than %d bytes, or with one of "
                "/ \\ . space \" $ NUL)" % DB_NAME_MAX_BYTES)
    if not isinstance(coll, str) or not coll or "\x00" in coll:
        return "its collection name is empty or holds a NUL character"
    return None


def mongodb_name_problem(db: str, coll: str) -> str | None:
    """Why a MongoDB target cannot hold db.coll (MongoDB's documented naming rules), or None."""
    if coll.startswith("."):
        return "MongoDB refuses collection names that start with '.'"
    if "$" in coll:
        return "MongoDB refuses collection names with '$'"
    if coll.startswith("system.") and coll != "system.js":
        return "MongoDB reserves collection names that start with 'system.'"
    if len(db.encode("utf-8")) + 1 + len(coll.encode("utf-8")) > NS_MAX_BYTES:
        return "with its target database name it is longer than MongoDB's %d bytes per namespace" % NS_MAX_BYTES
    return None


def _name_error(what, label_i, reason):
    """The RestoreError of a name a target cannot hold: which namespace (#n, the name too where shown) and what to do."""
    return RestoreError("Namespace %s cannot be restored to %s: %s; nothing was written. Leave it out with exclude (its "
                        "name, or a pattern), or restore its database under another name with rename_databases."
                        % (label_i, what, reason))


def select_namespaces(manifest: dict, include: list | None = None, exclude: list | None = None, rename: dict | None = None) -> list:
    """[(index, namespace entry, target db, target collection)] after include/exclude patterns (fnmatch on
    "db.collection") and database rename ({source db: target db}); index is the namespace's 1-based position
    in the snapshot. RestoreError for an invalid rename target, and for a namespace whose name no target can
    hold (name_problem; named by position only, as plan cannot tell whether the snapshot is encrypted)."""
    rename = rename or {}
    for db in rename.values():
        if not valid_database_name(db):
            raise RestoreError("rename_databases maps a database to %r, which is not a valid database name (empty, longer "
                               "than %d bytes, or with one of / \\ . space \" $ NUL): give a plain database name."
                               % (db, DB_NAME_MAX_BYTES))
    out = []
    for i, n in enumerate(manifest["namespaces"], 1):
        ns = n["ns"]
        if include and not any(fnmatch.fnmatchcase(ns, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(ns, p) for p in exclude):
            continue
        db, _dot, coll = ns.partition(".")
        problem = name_problem(rename.get(db, db), coll)  # a renamed database needs only its new name to be valid
        if problem:
            raise _name_error("any target", "#%d" % i, problem)
        out.append((i, n, rename.get(db, db), coll))
    return out


def selection_digest(selected: list) -> str:
    """A digest of which namespaces are restored where: keys a restore's marker together with job and snapshot."""
    pairs = sorted([n["ns"], "%s.%s" % (db, coll)] for _i, n, db, coll in selected)
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode("utf-8")).hexdigest()[:32]


class DirectoryTarget:
    """protected: {what: folder} the target may not be, be inside or contain (see check_target_location); force: drop
    may replace a folder that is not a previous restore or a mongodump layout."""
    kind = "directory"

    def __init__(self, path: str, protected: dict | None = None, force: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.protected = dict(protected or {})
        self.force = force

    def describe(self) -> str:
        return self.path


class ArchiveTarget:
    """protected and force as DirectoryTarget's."""
    kind = "archive"

    def __init__(self, path: str, protected: dict | None = None, force: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.protected = dict(protected or {})
        self.force = force

    def describe(self) -> str:
        return self.path

    @property
    def info_path(self) -> str:
        return self.path + "." + RESTORE_INFO


class MongoTarget:
    """A MongoDB deployment to restore into: a URI and pymongo.MongoClient keyword arguments, or
    from_connection(conn) with the connection dict a job's source has (mongo.client_options)."""

    kind = "mongodb"

    def __init__(self, uri: str, restore_info_path: str | None = None, **client_options) -> None:
        self.uri = uri
        self.client_options = client_options
        self.restore_info_path = restore_info_path
        self._client = None

    @classmethod
    def from_connection(cls, conn: dict, restore_info_path: str | None = None) -> MongoTarget:
        return cls(conn["uri"], restore_info_path, **mongo.client_options(conn))

    def describe(self) -> str:
        return "MongoDB"

    def client(self) -> pymongo.MongoClient:
        _require_pymongo()
        if self._client is None:
            kw = {"document_class": RawBSONDocument}
            kw.update(self.client_options)
            self._client = pymongo.MongoClient(self.uri, **kw)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def make_target(target: str | DirectoryTarget | ArchiveTarget | MongoTarget) -> DirectoryTarget | ArchiveTarget | MongoTarget:
    if isinstance(target, (DirectoryTarget, ArchiveTarget, MongoTarget)):
        return target
    if isinstance(target, str) and target.startswith(("mongodb://", "mongodb+srv://")):
        return MongoTarget(target)
    raise RestoreError("Unknown restore target %r: give a MongoDB URI, a DirectoryTarget or an ArchiveTarget." % (target,))


def _read_text(path):
    with open(path) as f:
        return f.read()


def already_restored(job_store: JobStore, snapshot: str, target: str | DirectoryTarget | ArchiveTarget | MongoTarget,
                     selected: list | None = None) -> bool:
    """True when target already holds a complete restore of this snapshot with the same namespaces (selected,
    as plan returns it); selected None: with any namespaces (for changed=false)."""
    target = make_target(target)
    sid = job_store.catalog_entry(snapshot)["snapshot_id"]
    digest = None if selected is None else selection_digest(selected)
    if target.kind == "directory":
        info = os.path.join(target.path, RESTORE_INFO)
        return os.path.exists(info) and _info_matches(_read_text(info), job_store.job, sid, digest)
    if target.kind == "archive":
        return (os.path.exists(target.path) and os.path.exists(target.info_path)
                and _info_matches(_read_text(target.info_path), job_store.job, sid, digest))
    query = {"job": job_store.job, "snapshot_id": sid, "state": "complete"}
    if digest is not None:
        query["selection"] = digest
    return target.client()[MARKER_DB][MARKER_COLL].find_one(query, projection={"_id": 1}) is not None


class SnapshotSource:
    """Where a restore's documents come from: a snapshot's chunks in the store. The seam between the writers and
    their data: a writer only calls runs() (a point-in-time restore gives the writers another source with the same
    method, e.g. a rebuilt head).

    runs(selected, name) yields (k, data) in order: data is a run of whole raw BSON documents (mongodump's .bson
    format) of namespace selected[k], and (k, None) ends namespace k once it is verified; every namespace gets its
    end, an empty one only that. Each chunk is read and authenticated once: a bounded pool of threads reads,
    opens and decompresses the next ones across namespace boundaries (the store's parallelism for an object store,
    whose reads wait on the network) while the caller writes, with at most READ_AHEAD_BYTES of plaintext in flight.
    An IntegrityError (tampered chunk or manifest) or StoreError (missing chunk, endpoint gone) comes out of the
    iteration at the chunk it concerns, so writers must leave the target as they promise when it does.
    A subclass changes what is read (_items, _fetch, _take) and checks totals known only at a namespace's end (_end,
    which may set the namespace's count, bytes and hash then) or at the very end (_done): point_in_time's fast path.
    Writers therefore read a namespace's totals only after its end, and restoreInfo only once the source is read."""

    def __init__(self, job_store: JobStore, keys: Keys, snapshot_id: str, verify: bool = True) -> None:
        self.job_store, self.keys, self.snapshot_id, self.verify = job_store, keys, snapshot_id, verify

    def prepare(self, selected: list) -> None:
        """Unwrap every data key the selected chunks need, once, before worker threads read them."""
        for key_id in sorted({c["key"] for _i, n, _db, _coll in selected for c in n["chunks"] if c.get("key")}):
            self.keys.key(key_id)

    def _items(self, selected):
        """(k, chunk entry) in restore order: what runs() reads (_fetch) and hands out (_take)."""
        return [(k, c) for k, (_i, n, _db, _coll) in enumerate(selected) for c in n["chunks"]]

    def _fetch(self, pool, c):
        """What _take gets the data of item c from: a read on the pool."""
        return pool.submit(self.job_store.read_chunk, c, self.keys)

    def _take(self, c, fetched):
        """[(entry, data)] of item c once it is its turn: here the chunk read by _fetch, checked against c by read_chunk."""
        return [(c, fetched.result())]

    def _done(self, selected, name):
        """After the last namespace's end (a source whose totals come late checks them here)."""

    def runs(self, selected: list, name: Callable[[int, str, str], str]) -> Iterator[tuple[int, bytes | None]]:
        threads = getattr(self.job_store.storage, "parallelism", READ_THREADS)
        ahead = max(READ_AHEAD, 2 * threads)
        todo = iter(self._items(selected))
        counts, hashes = [0] * len(selected), [[] for _k in selected]
        pending, inflight, ended, more = collections.deque(), 0, 0, True
        pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kmipbackup-restore")
        try:
            while True:
                while more and len(pending) < ahead and inflight < READ_AHEAD_BYTES:
                    k, c = next(todo, (None, None))
                    if c is None:
                        more = False
                        break
                    pending.append((k, c, self._fetch(pool, c)))
                    inflight += c["bytes"]
                if not pending:
                    break
                k, c, f = pending.popleft()
                inflight -= c["bytes"]
                while ended < k:
                    yield self._end(selected, ended, counts, hashes, name)
                    ended += 1
                for part, data in self._take(c, f):
                    counts[k] += part["count"]
                    hashes[k].append({"sha256": part["sha256"]})
                    yield k, data
            while ended < len(selected):
                yield self._end(selected, ended, counts, hashes, name)
                ended += 1
            self._done(selected, name)
        finally:  # an error or an abandoned iteration: reads not started are dropped, running ones awaited
            pool.shutdown(wait=True, cancel_futures=True)

    def _end(self, selected, k, counts, hashes, name):
        """(k, None) once namespace k's chunks add up to its manifest entry (documents, content hash)."""
        i, n, db, coll = selected[k]
        if self.verify and (counts[k] != n["count"] or namespace_hash(hashes[k]) != n["hash"]):
            raise crypto.integrity_error("manifest", self.snapshot_id, "does not match the restored documents of namespace %s"
                                         % name(i, db, coll))
        return k, None


class _Progress:
    """A source that counts what it hands out into a progress.Meter: bytes and chunks as each run goes to the
    writer, a namespace's documents at its end (no per-document work)."""

    def __init__(self, source, meter):
        self.source, self.meter = source, meter

    def prepare(self, selected):
        self.source.prepare(selected)

    def runs(self, selected, name):
        for k, data in self.source.runs(selected, name):
            yield k, data
            if data is not None:
                self.meter.add(0, len(data), 1)
            else:
                self.meter.add(selected[k][1]["count"], 0)


class _Deadline:
    """A source that stops the restore (RestoreTimeout) once time.monotonic() passes deadline: checked before each
    run is handed to the writer, so the target is put back as on any failure between two chunks."""

    def __init__(self, source, deadline, seconds):
        self.source, self.deadline, self.seconds = source, deadline, seconds

    def prepare(self, selected):
        self.source.prepare(selected)

    def runs(self, selected, name):
        for k, data in self.source.runs(selected, name):
            if time.monotonic() > self.deadline:
                raise RestoreTimeout("The restore ran past its timeout of %s s and was stopped; the target was put back as "
                                     "it was: restore again with a longer timeout (restore.yml: restore_timeout)."
                                     % self.seconds)
            yield k, data


def _tmp_sibling(path):
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):  # a missing parent is created 0700; an existing one (/tmp ...) keeps its mode
        ensure_private_dir(parent)
    return os.path.join(parent, ".%s.kmipbackup-tmp-%s" % (os.path.basename(path), os.urandom(4).hex()))


def check_target_location(path: str, protected: dict | None) -> None:
    """RestoreError when path is, is inside, or contains one of the protected folders ({what: folder}: the store,
    data_dir, config_dir): drop would delete it and a restore would write into it. Links are resolved first."""
    real = os.path.realpath(path)
    for what, folder in (protected or {}).items():  # in the caller's order: the most specific first
        if not folder:
            continue
        other = os.path.realpath(folder)
        if real == other:
            how = "the same folder as"
        elif real.startswith(other.rstrip(os.sep) + os.sep):
            how = "inside"
        elif other.startswith(real.rstrip(os.sep) + os.sep):
            how = "a folder that contains"
        else:
            continue
        raise RestoreError("The restore target %s is %s the %s (%s): a restore there could replace or delete it. Choose "
                           "a target outside the snapshot store, data_dir and config_dir; nothing was written."
                           % (path, how, what, folder))


_DUMP_TOP_FILES = (RESTORE_INFO, "prelude.json", "oplog.bson")
_DUMP_SUFFIXES = (".bson", ".metadata.json", ".bson.gz", ".metadata.json.gz")


def _is_dump_layout(path):
    """True when folder path holds only a mongodump layout (<db>/<coll>.bson, .metadata.json) and restoreInfo.txt:
    what a previous restore or mongodump leaves. Nothing is followed: a link anywhere makes it False."""
    try:
        with os.scandir(path) as top:
            for e in top:
                if e.is_file(follow_symlinks=False) and e.name in _DUMP_TOP_FILES:
                    continue
                if not e.is_dir(follow_symlinks=False):
                    return False
                with os.scandir(e.path) as db:
                    for f in db:
                        if not (f.is_file(follow_symlinks=False) and f.name.endswith(_DUMP_SUFFIXES)):
                            return False
    except OSError:
        return False
    return True


def _is_archive(path):
    """True when path is a regular file that starts as a mongodump archive, or one a previous restore wrote."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return False
        return f.read(len(mongodump.ARCHIVE_MAGIC)) == mongodump.ARCHIVE_MAGIC or os.path.isfile(path + "." + RESTORE_INFO)


def check_file_target(path: str, drop: bool, force: bool = False, protected: dict | None = None, kind: str | None = None) -> None:
    """RestoreError unless the directory or archive path is absent or empty, or drop allows replacing it: drop
    replaces only a previous restore or a mongodump layout (a mongodump archive for kind "archive") unless force.
    A target that is, is inside or contains a protected folder is always refused (check_target_location)."""
    check_target_location(path, protected)
    if kind == "archive" and os.path.isdir(path):
        raise RestoreError("The archive target %s is a folder: give the path of a file to write the archive to; nothing "
                           "was written." % path)
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)):
        if not drop:
            raise RestoreError("The restore target %s exists and is not empty: choose an empty or new location, or set "
                               "drop to replace it." % path)
        if kind == "archive":
            replaceable = _is_archive(path)
        else:
            replaceable = not os.path.islink(path) and os.path.isdir(path) and _is_dump_layout(path)
        if not force and not replaceable:
            raise RestoreError("The restore target %s holds something other than a previous restore or a mongodump %s: "
                               "drop replaces only those. Choose another location, or set force=true as well to replace "
                               "it anyway; nothing was written."
                               % (path, "archive" if kind == "archive" else "layout"))


def busy_namespaces(target: MongoTarget, selected: list) -> list:
    """The selected namespaces that are not empty in a MongoDB target, as (index, db, coll)."""
    client = target.client()
    names, busy = {}, []
    for i, _n, db, coll in selected:
        if mongodb_name_problem(db, coll):
            continue  # the target cannot hold it: the restore refuses it by name before writing anything
        if db not in names:
            names[db] = set(client[db].list_collection_names())
        if coll in names[db] and mongo.find_one_raw(client, "%s.%s" % (db, coll), {}, {"_id": 1}) is not None:
            busy.append((i, db, coll))
    return busy


def _os_error(e, what):
    """A RestoreError for an OSError, without its text (its file names hold namespace names)."""
    return RestoreError("%s failed: %s. Fix the target (space, permissions) and restore again." % (what, e.strerror or type(e).__name__))


def _pymongo_summary(e):
    """Kind, code and counts of a pymongo error: its text can hold documents, _id values and namespaces."""
    parts = [type(e).__name__]
    if getattr(e, "code", None) is not None:
        parts.append("code %s" % e.code)
    details = getattr(e, "details", None)
    if isinstance(e, pymongo.errors.BulkWriteError) and isinstance(details, dict):
        errors = len(details.get("writeErrors") or [])
        parts.append("%d write error(s), %d document(s) inserted" % (errors, int(details.get("nInserted") or 0)))
    return ", ".join(parts)


def _replace(tmp, path):
    """Move the finished tmp into place (over path when drop allowed it)."""
    old = None
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        old = _tmp_sibling(path) + ".old"
        os.rename(path, old)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    if old is not None:  # a link (force) goes itself, never what it points to
        shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.unlink(old)


def _inside(path, root):
    """RestoreError unless path resolves inside root (names are checked already: this is the last line of defence)."""
    if not os.path.realpath(path).startswith(os.path.realpath(root) + os.sep):
        raise RestoreError("A restore file would be written outside the restore folder: the snapshot's manifest is corrupt; "
                           "restore another snapshot.")
    return path


def _restore_directory(source, _job, entry, selected, target, drop, verify, info, name):
    check_file_target(target.path, drop, target.force, target.protected, target.kind)
    tmp = _tmp_sibling(target.path)
    ensure_private_dir(tmp)
    try:
        # Files are written in place inside tmp (published by one rename once all is durable): a finished file's fsync
        # runs on a finisher thread, overlapping with writing the next ones; every 64 MB written a flush starts there too
        with concurrent.futures.ThreadPoolExecutor(FINISHERS, thread_name_prefix="kmipbackup-fsync") as finisher:
            finishing, f, syncing, unsynced, label_i, folders = [], None, [], 0, None, set()
            try:
                for k, plain in source.runs(selected, name):
                    i, n, db, coll = selected[k]
                    if f is None:  # the namespace's first run (or its end, when it is empty)
                        label_i = name(i, db, coll)
                        folder = ensure_private_dir(_inside(os.path.join(tmp, db), tmp))
                        folders.add(folder)
                        base = os.path.join(folder, mongodump.escape_collection_name(coll))
                        meta = mongodump.metadata_json(n["options"], n["indexes"], n.get("uuid"), coll,
                                                       n.get("type", "collection")).encode("utf-8")
                        _write_new(_inside(base + ".metadata.json", folder), meta)
                        finishing.append(finisher.submit(_finish_file, base + ".metadata.json", len(meta), label_i))
                        fd = os.open(_inside(base + ".bson", folder), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        f, syncing, unsynced = os.fdopen(fd, "wb", buffering=1 << 20), [], 0
                    if plain is not None:
                        f.write(plain)
                        unsynced += len(plain)
                        if unsynced >= SYNC_EVERY:  # flush to disk as we go: the final fsync then has little left
                            f.flush()
                            syncing.append(finisher.submit(os.fdatasync, f.fileno()))
                            unsynced = 0
                        continue
                    f = _close(f, syncing)
                    finishing.append(finisher.submit(_finish_file, base + ".bson", n["bytes"], label_i))
            except OSError as e:
                raise _os_error(e, "Writing namespace %s into %s" % (label_i, target.describe())) from None
            finally:
                if f is not None:
                    _close(f, syncing, check=False)
            for fin in finishing:
                fin.result()
            list(finisher.map(fsync_dir, sorted(folders)))  # the files' names; tmp's own fsync comes with RESTORE_INFO
        atomic_write(os.path.join(tmp, RESTORE_INFO), info().encode("utf-8"))
        _replace(tmp, target.path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _close(f, syncing, check=True):
    """Close a namespace's file once its flushes are done (the descriptor stays open until then)."""
    try:
        concurrent.futures.wait(syncing)
        if check:
            for s in syncing:
                s.result()
    finally:
        try:
            f.close()
        except OSError:
            if check:
                raise
    return None


def _write_new(path, data):
    """A new file in a restore's private tmp folder (no temporary name: the folder is published whole)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _finish_file(path, size, name):
    """fsync a written file and check that it holds what was written (a page-cache read-back would prove no more)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            got = os.fstat(fd).st_size
        finally:
            os.close(fd)
    except OSError as e:
        raise _os_error(e, "Writing namespace %s" % name) from None
    if got != size:
        raise RestoreError("Verification failed: the file of namespace %s holds %d bytes where %d were written (another "
                           "writer, or a full disk?); restore again." % (name, got, size))


def _restore_archive(source, _job, entry, selected, target, drop, verify, info, name):
    check_file_target(target.path, drop, target.force, target.protected, target.kind)
    tmp = _tmp_sibling(target.path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb", buffering=1 << 20) as f, \
                concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kmipbackup-fsync") as finisher:
            w, syncing = mongodump.ArchiveWriter(f), []
            prelude = _prelude(selected)
            f.write(prelude)
            crc, unsynced = mongodump.Crc64(), 0
            for k, plain in source.runs(selected, name):
                _i, _n, db, coll = selected[k]
                if plain is None:
                    w.eof(db, coll, crc.value())
                    crc = mongodump.Crc64()
                    continue
                crc.update(plain)
                w.segment(db, coll, plain)
                unsynced += len(plain)
                if unsynced >= SYNC_EVERY:  # as a directory restore's files: the final fsync then has little left
                    f.flush()
                    syncing.append(finisher.submit(os.fdatasync, f.fileno()))
                    unsynced = 0
            f.flush()
            final = _prelude(selected)
            if final != prelude:  # a point-in-time source knows the sizes only now: same length (Int64 sizes)
                if len(final) != len(prelude):
                    raise RestoreError("The archive's prelude changed length while the restore ran: restore again.")
                os.pwrite(f.fileno(), final, 0)
            for done in syncing:
                done.result()
            os.fsync(f.fileno())
        atomic_write(target.info_path, info().encode("utf-8"))
        _replace(tmp, target.path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _prelude(selected):
    """The archive's prelude (namespaces, metadata, sizes) as bytes."""
    buf = io.BytesIO()
    mongodump.ArchiveWriter(buf).prelude([(db, coll, mongodump.metadata_json(n["options"], n["indexes"], n.get("uuid"), coll,
                                                                             n.get("type", "collection")), n["bytes"])
                                          for _i, n, db, coll in selected])
    return buf.getvalue()


def _index_specs(n):
    out = []
    for raw in n["indexes"]:
        spec = bson.decode(bytes(raw))
        if spec.get("name") == "_id_":
            continue
        spec.pop("ns", None)
        out.append(spec)
    return out


def _restore_mongodb(source, job, entry, selected, target, drop, verify, info, name):
    for i, _n, db, coll in selected:  # before anything is read from or written to the target
        problem = mongodb_name_problem(db, coll)
        if problem:
            label_i = name(i, db, coll)  # "#i" for an encrypted snapshot: a "db.coll" name always holds a dot
            raise _name_error("MongoDB", label_i if label_i == "#%d" % i else "#%d (%s)" % (i, label_i), problem)
    client = target.client()
    busy = busy_namespaces(target, selected)
    if busy and not drop:
        raise RestoreError("The target's namespace(s) %s are not empty; nothing was written: restore into other databases "
                           "(rename), or set drop to replace them." % ", ".join(name(i, db, coll) for i, db, coll in busy))
    marker = client[MARKER_DB][MARKER_COLL]
    selection = selection_digest(selected)
    marker_id = "%s/%s/%s" % (job, entry["snapshot_id"], selection)
    previous = marker.find_one({"_id": marker_id})
    marker.replace_one({"_id": marker_id}, {"_id": marker_id, "job": job, "snapshot_id": entry["snapshot_id"],
                                            "selection": selection, "state": "incomplete", "started": iso(utcnow()),
                                            "restoreInfo": info()}, upsert=True)
    load = _MongoLoad(client, selected, drop, verify, name)
    try:
        load.run(source)
    except pymongo.errors.PyMongoError as e:
        load.discard_staging()
        raise RestoreError("The restore into MongoDB stopped at namespace %s (%s): the target is incomplete, as recorded in "
                           "%s.%s (_id %s, state incomplete); restore again with drop."
                           % (load.at, _pymongo_summary(e), MARKER_DB, MARKER_COLL, marker_id)) from None
    except (IntegrityError, StoreError, RestoreTimeout):
        # a tampered or missing chunk, the store gone, or the timeout: take back what this restore wrote, then the marker
        load.undo()
        if previous is None:
            marker.delete_one({"_id": marker_id})
        else:
            marker.replace_one({"_id": marker_id}, previous)
        raise
    except BaseException:
        load.discard_staging()
        raise
    info_text = info()  # a point-in-time source knows the image's totals only now
    marker.update_one({"_id": marker_id}, {"$set": {"state": "complete", "finished": iso(utcnow()), "restoreInfo": info_text}})
    if target.restore_info_path:
        try:
            atomic_write(target.restore_info_path, info_text.encode("utf-8"))
        except OSError as e:
            raise _os_error(e, "Writing restoreInfo.txt to %s" % target.restore_info_path) from None


class _MongoLoad:
    """Loads the selected namespaces into a MongoDB target from one pass over the source: each chunk is read and
    authenticated once, as its documents are inserted. Until the source has been read to its end the target is only
    added to: a namespace that exists in the target is replaced (drop) by loading a staging collection in its database
    (STAGING_PREFIX + random hex) renamed over it at the end; one that does not exist is created. So when a chunk
    turns out tampered or missing, undo() puts the target back: it drops what was created and the staging
    collections, and empties an existing empty collection that was inserted into. Indexes are built after all the
    data, as mongorestore does, INDEX_THREADS collections at a time; views are created at the end."""

    def __init__(self, client, selected, drop, verify, name):
        self.client, self.selected, self.drop, self.verify, self.name = client, selected, drop, verify, name
        self.codec = CodecOptions(document_class=RawBSONDocument)
        self.existing = {}  # db: collection names in the target before the restore
        self.created, self.staged, self.filled = [], {}, []  # (db, coll) created; k: staging name; (db, coll) inserted into
        self.at = None  # the namespace being written, as messages name it

    def _exists(self, db, coll):
        if db not in self.existing:
            self.existing[db] = set(self.client[db].list_collection_names())
        return coll in self.existing[db]

    def _open(self, k):
        """The collection namespace k's documents go to (created, or a staging collection), or None for a view."""
        _i, n, db, coll = self.selected[k]
        options = bson.decode(bytes(n["options"])) if n["options"] else {}
        if options.get("viewOn"):
            return None
        database = self.client[db]
        if self._exists(db, coll) and self.drop:
            self.staged[k] = "%s%s" % (STAGING_PREFIX, os.urandom(6).hex())
            _write_command(database, bson.SON([("create", self.staged[k])] + list(options.items())))
            return self.staged[k]
        if self._exists(db, coll):
            self.filled.append((db, coll))  # empty (busy_namespaces): its documents are this restore's
        else:
            _write_command(database, bson.SON([("create", coll)] + list(options.items())))
            self.created.append((db, coll))
        return coll

    def run(self, source):
        loaded, current, into, batch, batch_bytes, inserted = [], None, None, [], 0, 0
        for k, plain in source.runs(self.selected, self.name):
            i, n, db, coll = self.selected[k]
            if k != current:
                current, self.at = k, self.name(i, db, coll)
                into, batch, batch_bytes, inserted = self._open(k), [], 0, 0
            if into is None:
                continue
            database = self.client[db]
            if plain is None:
                if batch:
                    inserted += _insert(database, into, batch, inserted)
                if self.verify and inserted != n["count"]:
                    raise RestoreError("Verification failed: the target acknowledged %d documents of namespace %s "
                                       "where the snapshot has %d; restore again with drop." % (inserted, self.at, n["count"]))
                loaded.append((k, into))
                continue
            for doc in bson.decode_all(plain, self.codec):
                size = len(doc.raw)
                if batch and (batch_bytes + size > INSERT_BATCH_BYTES or len(batch) >= INSERT_BATCH_DOCS):
                    inserted += _insert(database, into, batch, inserted)  # a command stays under 16 MB + one document
                    batch, batch_bytes = [], 0
                batch.append(doc)
                batch_bytes += size
        # the indexes once every document is in (as mongorestore's RestoreIndexes): an index build running beside the
        # inserts competes with them for the server, and a chunk found tampered late costs no index build to undo
        with concurrent.futures.ThreadPoolExecutor(INDEX_THREADS, thread_name_prefix="kmipbackup-index") as indexer:
            building = [(k, indexer.submit(self._complete, k, into)) for k, into in loaded]  # leaving waits for all
        for k, f in building:
            i, _n, db, coll = self.selected[k]
            self.at = self.name(i, db, coll)
            f.result()
        self._finish()

    def _complete(self, k, into):
        """After the data (on an index thread): a collection's indexes, then its count."""
        i, n, db, coll = self.selected[k]
        database = self.client[db]
        specs = _index_specs(n)
        if specs:
            database.command("createIndexes", into, indexes=specs)
        if self.verify:
            got = _count(database, into)
            if got != n["count"]:
                raise RestoreError("Verification failed: namespace %s of the target holds %d documents where the snapshot has "
                                   "%d (another writer?); restore again with drop." % (self.name(i, db, coll), got, n["count"]))

    def _finish(self):
        """The source is read and verified: views, then the staging collections renamed into place."""
        for i, n, db, coll in self.selected:
            self.at = self.name(i, db, coll)
            database = self.client[db]
            options = bson.decode(bytes(n["options"])) if n["options"] else {}
            if options.get("viewOn"):
                if self.drop:
                    database.drop_collection(coll)  # by name: not validated by pymongo
                if self.drop or not self._exists(db, coll):
                    _write_command(database, bson.SON([("create", coll)] + list(options.items())))
        for k, tmp in sorted(self.staged.items()):
            i, _n, db, coll = self.selected[k]
            self.at = self.name(i, db, coll)
            self.client.admin.command(bson.SON([("renameCollection", "%s.%s" % (db, tmp)), ("to", "%s.%s" % (db, coll)),
                                                ("dropTarget", True)]))
        self.staged = {}

    def discard_staging(self):
        """Drop the staging collections (best effort: the target may be what failed)."""
        for k, tmp in self.staged.items():
            try:
                self.client[self.selected[k][2]].drop_collection(tmp)
            except pymongo.errors.PyMongoError:
                pass

    def undo(self):
        """Put the target back as it was before the restore: see the class."""
        self.discard_staging()
        for db, coll in self.created:
            self.client[db].drop_collection(coll)
        for db, coll in self.filled:
            _write_command(self.client[db], bson.SON([("delete", coll), ("deletes", [{"q": {}, "limit": 0}])]))


def _write_command(database, cmd):
    """Run a write command with the client's write concern (what pymongo's Collection methods would send)."""
    wc = database.write_concern
    if not wc.is_server_default:
        cmd["writeConcern"] = wc.document
    return database.command(cmd)


def _insert(database, coll, docs, inserted):
    """Insert raw documents with one insert command; a BulkWriteError (as insert_many raises) on write errors."""
    reply = _write_command(database, bson.SON([("insert", coll), ("documents", docs), ("ordered", False),
                                               ("bypassDocumentValidation", True)]))
    if reply.get("writeErrors") or reply.get("writeConcernError"):
        raise pymongo.errors.BulkWriteError({
            "writeErrors": reply.get("writeErrors") or [], "nInserted": inserted + int(reply.get("n") or 0),
            "writeConcernErrors": [reply["writeConcernError"]] if reply.get("writeConcernError") else []})
    return int(reply.get("n") or 0)


def _count(database, coll):
    """The number of documents in coll: the count command without a query, which MongoDB answers from the collection's
    metadata (exact after a clean write, as here; no scan)."""
    return int(database.command(bson.SON([("count", coll)]))["n"])


def plan(job_store: JobStore, snapshot: str, keys: Keys, include: list | None = None, exclude: list | None = None,
         rename: dict | None = None, expect_encryption: bool | None = None, last_known: str | None = None) -> tuple[dict, list]:
    """(catalog entry, selected) of snapshot (an id or 'latest'): the catalog entry (bound to its id, authenticated
    and live according to the catalog head: JobStore.resolve) and the manifest authenticated, selected as
    select_namespaces returns it. expect_encryption (default keys.encryption): refuse a snapshot that says it is
    unencrypted (IntegrityError: a store writer without the keys could otherwise pass off forged data as unencrypted).
    last_known: the daemon's own record of its last snapshot id, when available (rollback check)."""
    _require_bson()
    entry = job_store.resolve(snapshot, keys, expect_encryption, last_known)
    sid = entry["snapshot_id"]
    if snapshot != "latest" and sid != snapshot:  # resolve binds entries to their ids; never restore another one
        raise crypto.integrity_error("catalog entry", snapshot, "resolved to another snapshot (%s)" % sid)
    manifest = job_store.read_manifest(sid, keys, entry.get("manifest_sha256"))
    return entry, select_namespaces(manifest, include, exclude, rename)


def execute(job_store: JobStore, keys: Keys, entry: dict, selected: list, target: str | DirectoryTarget | ArchiveTarget | MongoTarget,
            drop: bool = False, verify: bool = True, kmip_servers: list | None = None, show_namespaces: bool = False,
            source: SnapshotSource | None = None, progress: Meter | None = None, deadline: tuple | None = None) -> dict:
    """Restore what plan() returned to target; returns a summary dict. Messages name namespaces as #n for an
    encrypted snapshot unless show_namespaces. source: where the documents come from (default: the snapshot's
    chunks, SnapshotSource); progress (a progress.Meter) counts the documents and bytes as they are written;
    deadline (time.monotonic() value, timeout in s): RestoreTimeout past it, the target put back."""
    _require_bson()
    target = make_target(target)
    digest = selection_digest(selected)

    def info():  # at the end too: a source may know the image's totals only once it is read (point_in_time)
        return restore_info_text(entry, job_store.job, kmip_servers, digest)
    run = {"directory": _restore_directory, "archive": _restore_archive, "mongodb": _restore_mongodb}[target.kind]
    encryption = bool(entry.get("encryption"))

    def name(i, db, coll):
        return label(encryption, i, "%s.%s" % (db, coll), show_namespaces)
    if source is None and getattr(job_store, "restore_source", None) is not None:
        source = job_store.restore_source(keys, verify)  # a rebuilt point-in-time image's own (None: its chunks)
    if source is None:
        source = SnapshotSource(job_store, keys, entry["snapshot_id"], verify)
    source.prepare(selected)
    if progress is not None:
        source = _Progress(source, progress)
    if deadline is not None:
        source = _Deadline(source, *deadline)
    try:
        run(source, job_store.job, entry, selected, target, drop, verify, info, name)
    except OSError as e:
        raise _os_error(e, "The restore to %s" % target.describe()) from None
    except Exception as e:
        if pymongo is not None and isinstance(e, pymongo.errors.PyMongoError):
            raise RestoreError("The target MongoDB deployment failed (%s): check the target's URI, TLS and authentication "
                               "options and that it is up; nothing was written." % _pymongo_summary(e)) from None
        raise
    return {"snapshot_id": entry["snapshot_id"], "created": entry["created"], "cluster_time": entry["cluster_time"],
            "encryption": entry.get("encryption"), "master_key_uids": entry.get("master_key_uids") or [],
            "target": target.kind, "namespaces": len(selected),
            "documents": sum(n["count"] for _i, n, _d, _c in selected), "bytes": sum(n["bytes"] for _i, n, _d, _c in selected),
            "restore_info": info()}


def restore(job_store: JobStore, snapshot: str, keys: Keys, target: str | DirectoryTarget | ArchiveTarget | MongoTarget,
            include: list | None = None, exclude: list | None = None, rename: dict | None = None, drop: bool = False,
            verify: bool = True, kmip_servers: list | None = None, expect_encryption: bool | None = None,
            show_namespaces: bool = False) -> dict:
    """Restore snapshot (an id or 'latest') of job_store to target: plan() then execute(); returns a summary dict.

    IntegrityError names a tampered chunk, manifest, keyring entry or catalog entry."""
    entry, selected = plan(job_store, snapshot, keys, include, exclude, rename, expect_encryption)
    return execute(job_store, keys, entry, selected, target, drop, verify, kmip_servers, show_namespaces)
