# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The head database of a backup job (no Ansible imports). PRIVATE to the collection.

One SQLCipher database per job, keyed with the job's 32-byte head key as a raw key (no
KDF), SQLCipher 4 defaults (AES-256 pages with HMAC). WAL mode, so a read transaction is
a stable image (a snapshot) while capture goes on writing; temp_store=MEMORY so SQLite
writes no plaintext temp files. An unencrypted job uses the same schema with no key.

Rows are keyed by namespace and rawbson.id_key(), an order-preserving, injective encoding of the
document's _id in MongoDB's comparison order; values are the raw BSON bytes. The change
log remembers which (namespace, id_key) changed since the last snapshot.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
import time
from typing import Callable, Iterable, Iterator

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import crypto, post_images, segments
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import HeadError
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.files import ensure_private_dir
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.rawbson import EMPTY_BSON, split_bson_docs
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.segments import decode_records, encode_records

LOG = logging.getLogger("kmipbackup.head")

try:
    import sqlcipher3
    SQLCIPHER_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    sqlcipher3 = None
    SQLCIPHER_IMPORT_ERROR = e


_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (ns_id INTEGER NOT NULL, id_key BLOB NOT NULL, doc BLOB NOT NULL,
    bnd INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (ns_id, id_key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS namespaces (ns_id INTEGER PRIMARY KEY, ns TEXT NOT NULL UNIQUE, uuid BLOB,
    options BLOB NOT NULL, indexes BLOB NOT NULL, incarnation INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS changes (ns_id INTEGER NOT NULL, id_key BLOB NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (ns_id, id_key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS changes_seq ON changes (seq);
CREATE TABLE IF NOT EXISTS position (one INTEGER PRIMARY KEY CHECK (one = 1), resume_token BLOB,
    ct_t INTEGER, ct_i INTEGER, consistent INTEGER NOT NULL DEFAULT 0, sync TEXT);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seg_records (pos INTEGER PRIMARY KEY, seg INTEGER, t INTEGER NOT NULL, i INTEGER NOT NULL,
    recs BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS seg_state (one INTEGER PRIMARY KEY CHECK (one = 1), timeline TEXT, next_seq INTEGER,
    from_t INTEGER, from_i INTEGER, opened REAL);
CREATE TABLE IF NOT EXISTS seg_closed (seg INTEGER PRIMARY KEY, timeline TEXT NOT NULL, seq INTEGER NOT NULL,
    from_t INTEGER NOT NULL, from_i INTEGER NOT NULL, to_t INTEGER NOT NULL, to_i INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seg_chain (timeline TEXT PRIMARY KEY, seq INTEGER NOT NULL, digest BLOB NOT NULL);
INSERT OR IGNORE INTO position (one, consistent) VALUES (1, 0);
INSERT OR IGNORE INTO seg_state (one) VALUES (1);
INSERT OR IGNORE INTO meta VALUES ('change_seq', 0);
INSERT OR IGNORE INTO meta VALUES ('schema', 1);
"""

# SQLCipher settings of new encrypted heads: 16 KiB pages with HMAC-SHA256 (SHA-NI) read about twice as fast as
# SQLCipher 4's defaults (4 KiB, HMAC-SHA512); heads written with the defaults still open with them.
_CIPHER = ("PRAGMA cipher_page_size = 16384", "PRAGMA cipher_hmac_algorithm = HMAC_SHA256")
# Documents after which a snapshot chunk ends (crypto.boundary_threshold_fn for this target) are flagged
# (docs.bnd) when written, so a snapshot finds chunk ends through a small partial index.
BOUNDARY_TARGET = 1 << 20


def _require():
    if sqlcipher3 is None:
        raise HeadError("The Python package sqlcipher3-binary is missing (%s): install the collection's requirements "
                        "(requirements/daemon.txt) in the daemon's virtualenv." % SQLCIPHER_IMPORT_ERROR)


def _join_specs(specs):
    return b"".join(bytes(s) for s in specs)


class _FairLock:
    """A reentrant lock granted in the order it was asked for. threading.RLock lets the thread that releases it take it
    back at once, so a seal pass or a status read waited behind many of the capture's back-to-back transactions; here
    it waits for the one in progress, and the capture's next one queues behind it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner, self._depth, self._queue = None, 0, collections.deque()

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            if self._owner is not None or self._queue:
                self._queue.append(me)
                try:
                    while self._owner is not None or self._queue[0] != me:
                        self._cond.wait()
                except BaseException:  # interrupted (a signal handler raised): not in line any more
                    self._queue.remove(me)
                    self._cond.notify_all()
                    raise
                self._queue.popleft()
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a lock this thread does not hold")
            self._depth -= 1
            if not self._depth:
                self._owner = None
                if self._queue:
                    self._cond.notify_all()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Head:
    """A job's head database at path; key: 32 bytes (encrypted) or None (unencrypted)."""

    def __init__(self, path: str, key: bytes | None) -> None:
        _require()
        if key is not None and (not isinstance(key, (bytes, bytearray)) or len(key) != 32):
            raise HeadError("The head key must be 32 bytes; the job's wrapped head key is damaged: start a new initial sync.")
        self.path = os.path.abspath(path)
        self._key_hex = bytes(key).hex() if key is not None else None
        self._lock = _FairLock()
        self._boundary_key = crypto.derive(bytes(key) if key is not None else crypto.NULL_ID_KEY, "head chunk boundaries")
        self._is_boundary = crypto.boundary_threshold_fn(self._boundary_key, BOUNDARY_TARGET)
        self.boundary_target = BOUNDARY_TARGET
        ensure_private_dir(os.path.dirname(self.path))
        new = not os.path.exists(self.path) and not os.path.exists(self.path + "-wal")
        if not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))  # SQLite gives -wal/-shm the same mode
        self._cipher = _CIPHER
        try:
            self._conn = self._connect()
        except HeadError:
            if new or key is None:
                raise
            self._cipher = ()  # a head written with SQLCipher 4's defaults (before _CIPHER)
            self._conn = self._connect()
        with self._lock:
            # Only a head missing part of its schema is written to here: opening a head the daemon is
            # writing (a second reader) then needs no write lock at all.
            have = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master")}
            if not {"docs", "namespaces", "changes", "changes_seq", "position", "meta", "docs_boundaries", "seg_records",
                    "seg_state", "seg_closed", "seg_chain"} <= have:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.executescript(_SCHEMA)
                # incarnations unique across head files too, so a new head never reuses an old snapshot's numbers
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('incarnation', ?)", (time.time_ns() // 1000,))
                self._add_boundary_flags()
        self._ns_cache = {}
        # post-images of closed segments: seg -> frames, or None while the builder process (post_images.py) builds them
        # from a read pinned at the close's commit (Writer.close_segment); sealed after the segment's records
        # (segment_frames), dropped once it is sealed
        self._posts, self._post_pending, self._builder = {}, None, None
        self._reading = False  # segment_frames reads the builder's answer outside the lock: nothing is asked meanwhile
        # _posts, _builder and _reading have a lock of their own, taken inside the head's by the capture (after a close's
        # commit) and alone by a seal pass, which reads the closed segments on a connection of its own (_committed): a
        # pass then takes the head's lock once per segment (segment_sealed), not behind every transaction of the capture
        self._posts_lock = threading.Lock()
        self._side, self._side_lock = None, threading.Lock()
        self._record_segments = False

    @property
    def record_segments(self) -> bool:
        """Point in time (segments.py): when True, Writer.log_records keeps change records for the open segment."""
        return self._record_segments

    @record_segments.setter
    def record_segments(self, on: bool) -> None:
        self._record_segments = bool(on)
        with self._posts_lock:
            if on:  # its start-up overlaps the capture up to the first close, which then waits for nothing but the pin
                self._post_image_builder()
            elif self._builder is not None:
                self._builder.close()
                self._builder = None

    def _post_image_builder(self):
        """The running builder process (started now if it is not), or None when it cannot start (_posts_lock held)."""
        if self._builder is None or not self._builder.alive():
            if self._builder is not None:
                self._builder.close()
            try:
                self._builder = post_images.Builder.start(self.path, self._key_hex)
            except OSError as e:
                self._builder = None
                LOG.warning("the post-image builder did not start (%s): restores replay closed segments' events", type(e).__name__)
        return self._builder

    def _add_boundary_flags(self):
        """Flag chunk boundaries in a head written before the flags existed (once), and index the flags."""
        conn = self._conn
        if "bnd" not in [row[1] for row in conn.execute("PRAGMA table_info(docs)")]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("ALTER TABLE docs ADD COLUMN bnd INTEGER NOT NULL DEFAULT 0")
                conn.create_function("kmipbackup_boundary", 2, lambda k, n: 1 if self._is_boundary(k, n) else 0, deterministic=True)
                conn.execute("UPDATE docs SET bnd = kmipbackup_boundary(id_key, length(doc))")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        conn.execute("CREATE INDEX IF NOT EXISTS docs_boundaries ON docs (ns_id, id_key) WHERE bnd = 1")

    def boundary_fn(self, target_bytes: int) -> Callable[[bytes, int], bool]:
        """crypto.boundary_threshold_fn under this head's boundary key: (id_key, size) -> bool; for
        BOUNDARY_TARGET it says exactly what the stored flags say."""
        return crypto.boundary_threshold_fn(self._boundary_key, target_bytes)

    def _connect(self):
        conn = sqlcipher3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
        if self._key_hex is not None:
            conn.execute("PRAGMA cipher_log_level = NONE")  # a wrong key is reported by HeadError, not on stderr
            conn.execute("PRAGMA key = \"x'%s'\"" % self._key_hex)
            for pragma in self._cipher:
                conn.execute(pragma)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlcipher3.DatabaseError as e:
            conn.close()
            raise HeadError("The head database %s cannot be read with this job's key (%s): the head key does not match "
                            "(or the file is damaged); remove the head to start a new initial sync." % (self.path, e)) from None
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a process crash; a power loss keeps the db consistent
        conn.execute("PRAGMA cache_size=-32768")
        conn.execute("PRAGMA busy_timeout=60000")
        return conn

    def close(self) -> None:
        with self._lock:
            with self._posts_lock:
                self._posts.clear()  # post-images not sealed yet are dropped: their segments are sealed without
                if self._builder is not None:
                    self._builder.close()
                    self._builder = None
            with self._side_lock:
                if self._side is not None:
                    self._side.close()
                    self._side = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[Writer]:
        """One write transaction (BEGIN IMMEDIATE .. COMMIT), rolled back on error."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            w = Writer(self, conn)
            try:
                yield w
                w._finish()
                conn.execute("COMMIT")
            except BaseException:
                self._post_pending = None
                conn.execute("ROLLBACK")
                self._ns_cache.clear()
                raise
            pending, self._post_pending = self._post_pending, None  # taken once: never started for a later state
            if pending is not None:  # still under the lock: no write lands before the builder's image is pinned
                self._start_post_images(*pending)

    def _start_post_images(self, seg: int, opened: int, to: tuple) -> None:
        """Ask the post-image builder (a process: post_images.py, started the first time) for closed segment seg's
        post-images, read on the state just committed (the segment's end): once its read is pinned, the capture goes on
        while it builds them on another core. When it cannot (it does not start, or it still builds an earlier
        segment's), the segment has none: they are optional, and the close committed."""
        with self._posts_lock:
            try:  # after the COMMIT: nothing here may fail the write
                if self._reading:
                    LOG.debug("post-images of a closed change segment not built: the builder's last answer is being read")
                    return
                b = self._builder
                if b is not None and b.asked is not None:
                    if not b.ready():
                        LOG.debug("post-images of a closed change segment not built: the builder is still on an earlier one")
                        return
                    self._take_post_images()
                b = self._post_image_builder()
                if b is None:
                    return
                if len(self._posts) >= POST_PENDING_MAX:  # segments not sealed (the store unreachable): memory stays bounded
                    self._drop_post_images(sorted(self._posts)[:len(self._posts) - POST_PENDING_MAX + 1])
                if b.ask(seg, opened, to, post_image_limits()):
                    self._posts[seg] = None  # asked: the answer is read when it is ready or needed
                else:
                    LOG.warning("post-images of a closed change segment not built (the builder ended): a restore replays its events")
            except Exception as e:  # pylint: disable=broad-except  # optional: the segment's records are complete without them
                LOG.warning("post-images of a closed change segment not built (%s): a restore replays its events", type(e).__name__)

    def _take_post_images(self) -> None:
        """Read the builder's answer (waits for the build); kept for its segment unless that was dropped meanwhile
        (_posts_lock held)."""
        seg = self._builder.asked
        frames = self._builder.answer()
        if seg in self._posts:
            self._posts[seg] = frames

    def _drop_post_images(self, segs: list) -> None:
        """Forget the post-images of segs (their segments are sealed without them); an answer still being built is
        read and discarded before the builder is asked again (_posts_lock held)."""
        for seg in segs:
            self._posts.pop(seg, None)

    @contextlib.contextmanager
    def read(self) -> Iterator[Reader]:
        """One read transaction: a stable image of the head while writes go on."""
        with self.reads(1) as readers:
            yield readers[0]

    @contextlib.contextmanager
    def reads(self, n: int, cache_kib: int | None = None) -> Iterator[list[Reader]]:
        """n read transactions on n connections, all on the same image (for reading disjoint key ranges in
        parallel: SQLite releases the GIL while it reads and decrypts pages). Each transaction is pinned
        while a write lock is held on a further connection, so no commit can land between two of them;
        writers wait for the few milliseconds this takes. cache_kib: each connection's page cache."""
        conns = []
        try:
            while len(conns) < n:
                conns.append(self._connect())
                if cache_kib is not None:
                    conns[-1].execute("PRAGMA cache_size=-%d" % int(cache_kib))
            gate = self._connect() if n > 1 else None
            try:
                if gate is not None:
                    gate.execute("BEGIN IMMEDIATE")
                readers = []
                for conn in conns:
                    conn.execute("BEGIN")
                    r = Reader(conn)
                    r.change_seq = conn.execute("SELECT value FROM meta WHERE name='change_seq'").fetchone()[0]  # pins the image
                    readers.append(r)
            finally:
                if gate is not None:
                    gate.execute("ROLLBACK")
                    gate.close()
            yield readers
        finally:
            for conn in conns:
                try:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                finally:
                    conn.close()

    def position(self) -> dict:
        """{"resume_token", "cluster_time" [t, i] or None, "consistent", "sync"} as last committed."""
        with self._lock:
            return _position(self._conn)

    def mark_snapshotted(self, change_seq: int) -> None:
        """Forget changes up to change_seq (after a snapshot covering them is durable)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("DELETE FROM changes WHERE seq <= ?", (int(change_seq),))
                # the open segment's post-images (Writer.close_segment) need every change since it opened
                _set_meta(self._conn, "forget_seq", max(int(change_seq), _meta(self._conn, "forget_seq") or 0))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    # ---- change segments (segments.py): the open segment's records and the closed ones not yet sealed ----
    def segment_state(self) -> dict:
        """{"timeline", "next_seq", "from" (t, i) or None, "opened" (Unix time), "records" (open record rows, one per transaction)}."""
        with self._lock:
            return _segment_state(self._conn)

    def _committed(self, sql: str, args: tuple = ()) -> list:
        """Rows of a read of the last committed state, on a connection of its own: not under the head's lock, so not
        behind the capture's transaction in progress (closed segments, their records and the chain change only at a
        commit)."""
        with self._side_lock:
            if self._side is None:
                self._side = self._connect()
            return self._side.execute(sql, args).fetchall()

    def closed_segments(self) -> list:
        """Segments closed but not yet sealed into the store, oldest first (as last committed):
        [{"seg", "timeline", "seq", "from" (t, i), "to" (t, i)}]."""
        rows = self._committed("SELECT seg, timeline, seq, from_t, from_i, to_t, to_i FROM seg_closed ORDER BY seg")
        return [{"seg": r[0], "timeline": r[1], "seq": r[2], "from": (r[3], r[4]), "to": (r[5], r[6])} for r in rows]

    def post_images_pending(self, seg: int) -> bool:
        """Whether closed segment seg's post-images are still being built (segment_frames would wait for them)."""
        with self._posts_lock:
            return seg in self._posts and self._posts[seg] is None and self._builder is not None and not self._builder.ready()

    def segment_frames(self, seg: int) -> tuple[bytes, bytes]:
        """(the records of a closed segment, in apply order, as zstd frames back to back (one per transaction); its
        post-images' frames, b"" unless this process built them since it closed the segment (waits for the builder)). They are kept in
        memory only, until the segment is sealed: a segment closed before a restart is sealed without them (they are
        optional), and segments._existing keeps a stored copy that has them."""
        with self._posts_lock:
            b = self._builder
            take = seg in self._posts and self._posts[seg] is None and b is not None and b.asked == seg
            if take:
                self._reading = True
            elif seg in self._posts and self._posts[seg] is None:
                self._posts.pop(seg)
        if take:  # megabytes through a pipe from a builder below the capture's priority: read outside the lock
            frames = []
            try:
                frames = b.answer()
            finally:
                with self._posts_lock:
                    self._reading = False
                    if seg in self._posts:
                        self._posts[seg] = frames
        with self._posts_lock:
            posts = self._posts.get(seg) or []
        # a seal pass runs beside the capture (segments.Sealer), and a segment's records are megabytes of pages to read
        # and decrypt. A closed segment's rows change only when it is sealed, by the caller, after this read.
        rows = self._committed("SELECT recs FROM seg_records WHERE seg=? ORDER BY pos", (seg,))
        return b"".join([bytes(r[0]) for r in rows]), b"".join([f[2] for f in posts])

    def segment_chain(self, timeline: str) -> tuple | None:
        """(seq, digest) of the last sealed segment of timeline (as last committed), or None."""
        row = next(iter(self._committed("SELECT seq, digest FROM seg_chain WHERE timeline=?", (timeline,))), None)
        return (row[0], bytes(row[1])) if row else None

    def segment_sealed(self, seg: int, timeline: str, seq: int, digest: bytes) -> None:
        """A closed segment is durable in the store: forget its records, remember its digest (the next one's link)."""
        with self._posts_lock:
            self._posts.pop(seg, None)
        with self.write() as w:
            # its pages are freed without zeroing them (secure_delete stays on for every other delete): they hold what
            # the store now keeps sealed for the window (under the head key when the job is encrypted), and the next
            # records reuse them. Zeroing wrote each freed page twice more (the WAL, then the checkpoint): 2.4 MB per 20,000 events,
            # on the lock the capture writes under.
            secure = w._c.execute("PRAGMA secure_delete").fetchone()[0]
            w._c.execute("PRAGMA secure_delete=0")
            try:
                w._c.execute("DELETE FROM seg_records WHERE seg=?", (seg,))
            finally:
                w._c.execute("PRAGMA secure_delete=%d" % int(secure))
            w._c.execute("DELETE FROM seg_closed WHERE seg=?", (seg,))
            w._c.execute("INSERT OR REPLACE INTO seg_chain VALUES (?, ?, ?)", (timeline, seq, bytes(digest)))

    def size(self) -> int:
        """Bytes on disk of the head (database, WAL and shared memory files)."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.path.getsize(self.path + suffix)
            except OSError:
                pass
        return total

    def checkpoint(self) -> None:
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def export_rekeyed(self, dest: str, key: bytes | None, progress: Callable | None = None) -> None:
        """Copy the whole head into a new database file dest encrypted under key (SQLCipher's
        sqlcipher_export, page by page in C), durably. progress(bytes written, bytes of the head) is
        called about every second. Writes to this head must wait meanwhile (the caller pauses them)."""
        if os.path.exists(dest):
            os.unlink(dest)
        os.close(os.open(dest, os.O_CREAT | os.O_WRONLY, 0o600))
        total = self.size()
        state = {"next": time.monotonic() + 1.0}

        def tick():
            if progress is not None and time.monotonic() >= state["next"]:
                state["next"] = time.monotonic() + 1.0
                progress(os.path.getsize(dest), total)
            return 0
        with self._lock:
            conn = self._conn
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("ATTACH DATABASE ? AS rekeyed KEY ?", (dest, "x'%s'" % bytes(key).hex()))
            try:
                for pragma in _CIPHER:
                    conn.execute(pragma.replace("PRAGMA ", "PRAGMA rekeyed."))
                conn.set_progress_handler(tick, 10000)
                conn.execute("SELECT sqlcipher_export('rekeyed')")
                conn.execute("PRAGMA rekeyed.journal_mode = WAL")
            finally:
                conn.set_progress_handler(None, 0)
                conn.execute("DETACH DATABASE rekeyed")
        with open(dest, "rb+") as f:
            os.fsync(f.fileno())
        if progress is not None:
            progress(os.path.getsize(dest), total)


POST_FRAME_BYTES = 16 << 20  # post-images compressed into one zstd frame at a time
POST_MAX_BYTES = 64 << 20  # a closed segment's compressed post-images, at most (else it has none)
POST_PENDING_MAX = 4  # closed segments whose post-images wait in memory for their seal, at most (the oldest are dropped)


def post_image_limits() -> tuple:
    """The sizes post-images are built to: (record, frame, most); the builder process is given this process's."""
    return segments.POST_RECORD_BYTES, POST_FRAME_BYTES, POST_MAX_BYTES


def _post_image_frames(conn, opened: int, to: tuple, limits: tuple) -> list:
    """[(t, i, zstd frame)] of the post-image records (segments.post_plaintexts) of the changes after sequence opened,
    read on conn (a read transaction pinned at the segment's end: post_images.main), built to limits
    (post_image_limits(): records of about record bytes, a frame per frame bytes, none at all over most bytes
    compressed)."""
    record_bytes, frame_bytes, most_bytes = limits
    # by ns_id, not name: the name's order would sort the joined rows again (a third of the query's time); three
    # columns, packed by post_plaintexts (packing each row in SQL, printf and ||, took longer than Python's join)
    rows = conn.execute("SELECT n.ns, c.id_key, d.doc FROM changes c JOIN namespaces n ON n.ns_id = c.ns_id LEFT JOIN docs d "
                        "ON d.ns_id = c.ns_id AND d.id_key = c.id_key WHERE c.seq > ? ORDER BY c.ns_id, c.id_key", (opened,))
    out, kept = [], 0
    for plain in segments.post_plaintexts(rows, to, record_bytes, frame_bytes):
        out.append(tuple(to) + (crypto.compress(plain),))
        kept += len(out[-1][2])
        if kept > most_bytes:
            return []  # held in memory until the seal: a segment this large is replayed event by event
    return out


def _meta(conn, name):
    row = conn.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
    return row[0] if row else None


def _set_meta(conn, name, value):
    conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, int(value)))


def _segment_state(conn, writing=False):
    row = conn.execute("SELECT timeline, next_seq, from_t, from_i, opened FROM seg_state WHERE one=1").fetchone()
    seg = _open_segment_id(conn, writing)
    n = conn.execute("SELECT count(*) FROM seg_records WHERE seg=? OR seg IS NULL", (seg,)).fetchone()[0]
    return {"timeline": row[0], "next_seq": row[1], "from": (row[2], row[3]) if row[2] is not None else None,
            "opened": row[4], "records": n, "seg": seg}


def _open_segment_id(conn, writing=False):
    """The id the open segment's records carry (its seg_closed row's when it closes): given when they are written, so
    a close rewrites no record (an UPDATE rewrites whole rows: megabytes per segment). Ids only grow. A head written
    before the ids (its open records have none) is given one by the first writer (writing: in its transaction); a
    reader counts its records without (_segment_state)."""
    seg = _meta(conn, "seg_open")
    if seg is None:
        seg = 1 + max(conn.execute("SELECT max(seg) FROM seg_closed").fetchone()[0] or 0,
                      conn.execute("SELECT max(seg) FROM seg_records").fetchone()[0] or 0)
        if writing:
            conn.execute("UPDATE seg_records SET seg=? WHERE seg IS NULL", (seg,))
            _set_meta(conn, "seg_open", seg)
    return seg


def _position(conn):
    row = conn.execute("SELECT resume_token, ct_t, ct_i, consistent, sync FROM position WHERE one=1").fetchone()
    return {"resume_token": row[0], "cluster_time": [row[1], row[2]] if row[1] is not None else None,
            "consistent": bool(row[3]), "sync": json.loads(row[4]) if row[4] else None}


_NAMESPACE_COLUMNS = "SELECT ns, uuid, options, indexes, incarnation FROM namespaces"


def _namespace_entry(row):
    ns, uuid, options, indexes, incarnation = row
    return {"ns": ns, "uuid": uuid, "options": options, "indexes": split_bson_docs(indexes), "incarnation": incarnation}


def _namespaces(conn):
    return [_namespace_entry(row) for row in conn.execute(_NAMESPACE_COLUMNS + " ORDER BY ns")]


class Reader:
    """The read side of one transaction (also the base of Writer)."""

    def __init__(self, conn: sqlcipher3.Connection) -> None:
        self._c = conn
        self.change_seq = None

    def _ns_id(self, ns):
        row = self._c.execute("SELECT ns_id FROM namespaces WHERE ns=?", (ns,)).fetchone()
        return row[0] if row else None

    def position(self) -> dict:
        return _position(self._c)

    def namespaces(self) -> list:
        """[{"ns", "uuid", "options" (raw BSON), "indexes" [raw BSON], "incarnation"}] sorted by ns."""
        return _namespaces(self._c)

    def namespace(self, ns: str) -> dict | None:
        """One entry of namespaces(), or None."""
        row = self._c.execute(_NAMESPACE_COLUMNS + " WHERE ns=?", (ns,)).fetchone()
        return _namespace_entry(row) if row else None

    def scan(self, ns: str, start: bytes | None = None, end: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(id_key, raw) pairs of ns in id_key order, start inclusive, end exclusive."""
        ns_id = self._ns_id(ns)
        if ns_id is None:
            return
        sql, args = self._range("SELECT id_key, doc FROM docs WHERE ns_id=?", ns_id, start, end)
        cur = self._c.execute(sql + " ORDER BY id_key", args)
        while True:
            rows = cur.fetchmany(1000)
            if not rows:
                return
            yield from rows

    def _range(self, sql, ns_id, start, end):
        args = [ns_id]
        if start is not None:
            sql += " AND id_key >= ?"
            args.append(bytes(start))
        if end is not None:
            sql += " AND id_key < ?"
            args.append(bytes(end))
        return sql, args

    def first_key(self, ns: str, start: bytes | None = None) -> bytes | None:
        """The smallest id_key of ns at or after start, or None."""
        ns_id = self._ns_id(ns)
        if ns_id is None:
            return None
        sql, args = self._range("SELECT id_key FROM docs WHERE ns_id=?", ns_id, start, None)
        row = self._c.execute(sql + " ORDER BY id_key LIMIT 1", args).fetchone()
        return row[0] if row else None

    def boundaries(self, ns: str, start: bytes | None = None, end: bytes | None = None,
                   keep: Callable[[bytes, int], bool] | None = None) -> list:
        """Sorted id_keys in [start, end) of the documents flagged as chunk ends (for BOUNDARY_TARGET); with keep, only
        those for which keep(id_key, document size) holds (a larger target's boundaries: a subset of the flagged ones)."""
        return list(self.iter_boundaries(ns, start, end, keep))

    def iter_boundaries(self, ns: str, start: bytes | None = None, end: bytes | None = None,
                        keep: Callable[[bytes, int], bool] | None = None) -> Iterator[bytes]:
        """boundaries() as they are read (keep looks up each flagged document's size: a B-tree seek each)."""
        ns_id = self._ns_id(ns)
        if ns_id is None:
            return
        cols = "id_key" if keep is None else "id_key, length(doc)"
        sql, args = self._range("SELECT %s FROM docs INDEXED BY docs_boundaries WHERE ns_id=? AND bnd = 1" % cols, ns_id, start, end)
        rows = self._c.execute(sql + " ORDER BY id_key", args)
        if keep is None:
            yield from (row[0] for row in rows)
        else:
            yield from (key for key, size in rows if keep(key, size))

    def read_range(self, ns: str, start: bytes | None = None, end: bytes | None = None) -> tuple:
        """(first id_key, last id_key, [raw documents in id_key order]) of ns in [start, end), in three queries."""
        ns_id = self._ns_id(ns)
        if ns_id is None:
            return None, None, []
        sql, args = self._range("FROM docs WHERE ns_id=?", ns_id, start, end)
        docs = [row[0] for row in self._c.execute("SELECT doc " + sql + " ORDER BY id_key", args).fetchall()]
        if not docs:
            return None, None, []
        first = self._c.execute("SELECT id_key " + sql + " ORDER BY id_key LIMIT 1", args).fetchone()[0]
        last = self._c.execute("SELECT id_key " + sql + " ORDER BY id_key DESC LIMIT 1", args).fetchone()[0]
        return first, last, docs

    def read_joined(self, ns: str, start: bytes | None = None, end: bytes | None = None) -> tuple:
        """(first id_key, last id_key, document count, the raw documents in id_key order joined) of ns in [start, end)
        (None, None, 0, b"" when empty), the documents in one query: SQLite joins them in C, with no Python object per
        document and the GIL released the whole time (a snapshot's chunk read; read_range returns a Python bytes object
        per row, taking the GIL back for each).

        group_concat takes its input rows in the order of an ORDER BY subquery (SQLite keeps that ORDER BY under an
        aggregate other than count/min/max, a case its own regression tests pin: ticket 2942); an ORDER BY inside
        group_concat would sort again through a temporary B-tree (1.7 times the CPU). BLOBs pass through
        group_concat's text as bytes (NULs included) and CAST back to BLOB. The first and last id_keys are two
        B-tree seeks of their own: min() and max() in the aggregate cost a fifth of the read's CPU."""
        ns_id = self._ns_id(ns)
        if ns_id is None:
            return None, None, 0, b""
        sql, args = self._range("FROM docs WHERE ns_id=?", ns_id, start, end)
        count, data = self._c.execute(
            "SELECT count(*), CAST(group_concat(doc, x'') AS BLOB) FROM (SELECT doc %s ORDER BY id_key)" % sql, args).fetchone()
        if not count:
            return None, None, 0, b""
        first = self._c.execute("SELECT id_key %s ORDER BY id_key LIMIT 1" % sql, args).fetchone()[0]
        last = self._c.execute("SELECT id_key %s ORDER BY id_key DESC LIMIT 1" % sql, args).fetchone()[0]
        return first, last, count, data

    def get(self, ns: str, id_key: bytes) -> bytes | None:
        ns_id = self._ns_id(ns)
        if ns_id is None:
            return None
        row = self._c.execute("SELECT doc FROM docs WHERE ns_id=? AND id_key=?", (ns_id, bytes(id_key))).fetchone()
        return row[0] if row else None

    def count(self, ns: str) -> int:
        ns_id = self._ns_id(ns)
        if ns_id is None:
            return 0
        return self._c.execute("SELECT count(*) FROM docs WHERE ns_id=?", (ns_id,)).fetchone()[0]

    def changed(self, ns: str) -> list:
        """Sorted id_keys of ns changed since the last mark_snapshotted (in this image)."""
        ns_id = self._ns_id(ns)
        if ns_id is None:
            return []
        return [r[0] for r in self._c.execute("SELECT id_key FROM changes WHERE ns_id=? ORDER BY id_key", (ns_id,))]


class Writer(Reader):
    """The write side of one transaction; every document change is recorded in the change log."""

    def __init__(self, head: Head, conn: sqlcipher3.Connection) -> None:
        super().__init__(conn)
        self._h = head
        self._cache = head._ns_cache
        self._seq = conn.execute("SELECT value FROM meta WHERE name='change_seq'").fetchone()[0] + 1
        self._dirty = False
        self._closed = False  # close_segment scheduled post-images: no change may follow in this transaction
        self.before_commit = []  # callables run just before COMMIT (writes buffered by their owner, e.g. events.Applier)

    def _finish(self):
        for fn in self.before_commit:
            fn()
        if self._dirty:
            self._c.execute("UPDATE meta SET value=? WHERE name='change_seq'", (self._seq,))

    def _namespace_changed(self):
        """A change the change log does not list document by document (a namespace created, altered, dropped or renamed,
        an untracked bulk load): the open segment gets no post-images (close_segment)."""
        self._changing()
        _set_meta(self._c, "ns_seq", self._seq)

    def _changing(self):
        """A change in this transaction: refused after close_segment scheduled post-images in it (they are built at its
        COMMIT, so they would show the change, and the next segment's would not list it: its sequence is the close's)."""
        if self._closed:
            raise HeadError("A change after a change segment was closed in the same transaction: close segments in "
                            "a transaction of their own.")

    def _next_incarnation(self):
        self._c.execute("UPDATE meta SET value = value + 1 WHERE name='incarnation'")
        return self._c.execute("SELECT value FROM meta WHERE name='incarnation'").fetchone()[0]

    def _ns_id(self, ns):
        ns_id = self._cache.get(ns)
        if ns_id is None:
            ns_id = super()._ns_id(ns)
            if ns_id is not None:
                self._cache[ns] = ns_id
        return ns_id

    def has_namespace(self, ns: str) -> bool:
        return self._ns_id(ns) is not None

    def _ensure_ns(self, ns):
        ns_id = self._ns_id(ns)
        if ns_id is None:  # implicit creation (an insert into a new collection)
            ns_id = self.create_namespace(ns, EMPTY_BSON)
        return ns_id

    def create_namespace(self, ns: str, options_raw: bytes, uuid: bytes | None = None, indexes: list | None = None) -> int:
        """Create ns (a no-op apart from options/uuid when it exists). Returns its ns_id."""
        self._namespace_changed()
        ns_id = self._ns_id(ns)
        if ns_id is not None:
            self._c.execute("UPDATE namespaces SET options=?, uuid=coalesce(?, uuid) WHERE ns_id=?",
                            (bytes(options_raw), uuid, ns_id))
            if indexes is not None:
                self.set_indexes(ns, indexes)
            return ns_id
        cur = self._c.execute("INSERT INTO namespaces (ns, uuid, options, indexes, incarnation) VALUES (?, ?, ?, ?, ?)",
                              (ns, uuid, bytes(options_raw), _join_specs(indexes or []), self._next_incarnation()))
        self._cache[ns] = cur.lastrowid
        return cur.lastrowid

    def set_options(self, ns: str, options_raw: bytes) -> None:
        self._namespace_changed()
        self._c.execute("UPDATE namespaces SET options=? WHERE ns_id=?", (bytes(options_raw), self._ensure_ns(ns)))

    def set_indexes(self, ns: str, specs: list) -> None:
        """Replace the index specs of ns with specs (raw BSON documents)."""
        self._namespace_changed()
        self._c.execute("UPDATE namespaces SET indexes=? WHERE ns_id=?", (_join_specs(specs), self._ensure_ns(ns)))

    def drop_namespace(self, ns: str) -> bool:
        """Drop ns and its documents; True when it existed."""
        ns_id = self._ns_id(ns)
        if ns_id is None:
            return False
        self._namespace_changed()
        for table in ("docs", "changes", "namespaces"):
            self._c.execute("DELETE FROM %s WHERE ns_id=?" % table, (ns_id,))
        self._cache.pop(ns, None)
        self._dirty = True
        return True

    def drop_database(self, db: str) -> int:
        """Drop every namespace of db; returns how many."""
        names = [r[0] for r in self._c.execute("SELECT ns FROM namespaces WHERE substr(ns, 1, ?) = ?", (len(db) + 1, db + "."))]
        for ns in names:
            self.drop_namespace(ns)
        return len(names)

    def rename(self, ns: str, to: str, drop_target: bool = True) -> bool:
        """Rename ns to `to` (any database); an existing target is dropped. False when ns does not exist."""
        ns_id = self._ns_id(ns)
        if ns_id is None:
            return False
        if ns == to:
            return True
        self._namespace_changed()
        if drop_target:
            self.drop_namespace(to)
        self._c.execute("UPDATE namespaces SET ns=?, incarnation=? WHERE ns_id=?", (to, self._next_incarnation(), ns_id))
        self._cache.pop(ns, None)
        self._cache[to] = ns_id
        self._dirty = True
        return True

    def upsert(self, ns: str, id_key: bytes, raw: bytes) -> None:
        """Store raw (BSON bytes) under (ns, id_key) and record the change."""
        self._changing()
        ns_id = self._ns_id(ns) or self._ensure_ns(ns)
        self._c.execute("INSERT OR REPLACE INTO docs (ns_id, id_key, doc, bnd) VALUES (?, ?, ?, ?)",
                        (ns_id, id_key, raw, 1 if self._h._is_boundary(id_key, len(raw)) else 0))
        self._c.execute("INSERT OR REPLACE INTO changes VALUES (?, ?, ?)", (ns_id, id_key, self._seq))
        self._dirty = True

    def upsert_many(self, ns: str, pairs: Iterable, track: bool = True) -> int:
        """Store many (id_key, raw) pairs of ns in one statement batch; returns how many. track=False (initial sync
        into a namespace created in this head generation, whose new incarnation makes a snapshot take it whole)
        skips the change log, and pairs may then be an iterator, bound as it yields (no object per document kept
        alive, so none for the garbage collector to walk)."""
        self._changing()
        ns_id = self._ns_id(ns) or self._ensure_ns(ns)
        if track:
            pairs = pairs if isinstance(pairs, list) else list(pairs)
        isb = self._h._is_boundary
        n = self._c.executemany("INSERT OR REPLACE INTO docs (ns_id, id_key, doc, bnd) VALUES (?, ?, ?, ?)",
                                ((ns_id, k, v, 1 if isb(k, len(v)) else 0) for k, v in pairs)).rowcount
        if track:
            self._c.executemany("INSERT OR REPLACE INTO changes VALUES (?, ?, ?)", [(ns_id, k, self._seq) for k, _doc in pairs])
            self._dirty = True
        else:
            self._namespace_changed()
        return n

    def delete(self, ns: str, id_key: bytes) -> bool:
        """Delete (ns, id_key); True when it existed."""
        self._changing()
        ns_id = self._ns_id(ns)
        if ns_id is None:
            return False
        cur = self._c.execute("DELETE FROM docs WHERE ns_id=? AND id_key=?", (ns_id, id_key))
        if cur.rowcount:
            self._c.execute("INSERT OR REPLACE INTO changes VALUES (?, ?, ?)", (ns_id, id_key, self._seq))
            self._dirty = True
        return cur.rowcount > 0

    def set_position(self, resume_token_raw: bytes | None, cluster_time: list | tuple | None, consistent: bool) -> None:
        """Store the stream position these changes bring the head to (same transaction)."""
        t, i = (cluster_time or (None, None))
        self._c.execute("UPDATE position SET resume_token=?, ct_t=?, ct_i=?, consistent=? WHERE one=1",
                        (bytes(resume_token_raw) if resume_token_raw is not None else None, t, i, 1 if consistent else 0))

    def log_records(self, rows: list) -> None:
        """Keep [(t, i, raw record)] in the open change segment (same transaction as the changes they made), when the
        head records segments. The first record after a timeline ended (or ever) starts a new timeline at the head's
        current position, which must be consistent: records of a head that is not are dropped (no range starts there).
        A row with t None (a correction made between events: head verification) gets the later of the head's cluster
        time and the open segment's start: it takes effect right after that segment's start."""
        if not rows or not self._h.record_segments:
            return
        state = self._segment_open()
        if state is None:
            return
        if any(r[0] is None for r in rows):
            now = max(tuple(_position(self._c)["cluster_time"] or (0, 0)), state["from"])
            rows = [now + (r[2],) if r[0] is None else r for r in rows]
        # zstd-compressed: the records (inserts carry whole documents) cost the head a fraction of the documents' bytes
        self.log_frames([(rows[-1][0], rows[-1][1], crypto.compress(encode_records(rows)))])

    def log_frames(self, frames: list) -> None:
        """log_records for records the caller compressed already: [(t, i of the last record, zstd frame of
        segments.encode_records(records))], in apply order."""
        state = self._segment_open() if frames and self._h.record_segments else None
        if state is not None:
            self._c.executemany("INSERT INTO seg_records (seg, t, i, recs) VALUES (?, ?, ?, ?)", [(state["seg"],) + f for f in frames])

    def _segment_open(self):
        """The open segment's state, starting a timeline at the head's position when none is open; None when the head
        is not consistent then."""
        state = _segment_state(self._c, True)
        if state["timeline"] is None:
            pos = _position(self._c)
            if not pos["consistent"] or not pos["cluster_time"]:
                return None
            self.start_timeline(tuple(pos["cluster_time"]))
            state = _segment_state(self._c, True)
        return state

    def start_timeline(self, start: tuple) -> str:
        """Start a new timeline whose first segment starts (exclusive) at cluster time start."""
        timeline = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(4).hex()
        self._c.execute("UPDATE seg_state SET timeline=?, next_seq=1, from_t=?, from_i=?, opened=? WHERE one=1",
                        (timeline, int(start[0]), int(start[1]), time.time()))
        _set_meta(self._c, "seg_open_seq", self._seq - 1)  # this transaction's changes are the segment's
        return timeline

    def close_segment(self, to: tuple, final: bool = False) -> int | None:
        """Close the open segment at cluster time `to` (inclusive; a boundary the caller knows complete): its records
        await sealing (Head.closed_segments). None when there is no timeline or the head has not moved past the
        segment's start (its corrections, if any, stay open); final (the timeline ends): closed if it holds records."""
        state = _segment_state(self._c, True)
        if state["timeline"] is None or (tuple(to) <= state["from"] and not (final and state["records"])):
            return None
        to = max(tuple(to), state["from"])
        posts = None if final else self._post_images_from()
        seg = state["seg"]
        self._c.execute("INSERT INTO seg_closed (seg, timeline, seq, from_t, from_i, to_t, to_i) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (seg, state["timeline"], state["next_seq"]) + tuple(state["from"]) + to)
        _set_meta(self._c, "seg_open", seg + 1)
        self._c.execute("UPDATE seg_state SET next_seq=next_seq + 1, from_t=?, from_i=?, opened=? WHERE one=1",
                        to + (time.time(),))
        self._dirty = True  # the next segment's changes get a later seq than any of this one's
        _set_meta(self._c, "seg_open_seq", self._seq)
        if posts is not None:
            self._h._post_pending = (seg, posts, to)  # pylint: disable=protected-access  # built after COMMIT
            self._closed = True
        return seg

    def _post_images_from(self) -> int | None:
        """The change sequence the open segment started after, when its post-images can be built: every document the
        change log lists as changed since then, as the head holds it at the segment's end (or deleted); a restore to this
        segment's end or later applies them instead of replaying its events one by one. None when the change log cannot
        say: the segment opened before the head kept its start, a snapshot's mark_snapshotted forgot changes of it, or a
        namespace-level change (DDL, a re-clone) happened in it; a restore then replays its events."""
        opened = _meta(self._c, "seg_open_seq")
        if opened is None or (_meta(self._c, "forget_seq") or 0) > opened or (_meta(self._c, "ns_seq") or 0) > opened:
            return None
        return opened

    def end_timeline(self) -> None:
        """End the current timeline where the head last was complete (a resync, a lost resume point): its open
        records are closed into a last segment (a run of one cluster time cut short is left out), and the next
        record starts a new timeline."""
        state = _segment_state(self._c, True)
        if state["timeline"] is None:
            return
        pos = _position(self._c)
        if pos["cluster_time"] and not pos["consistent"]:
            cut = tuple(pos["cluster_time"])
            seg = state["seg"]
            for row_pos, recs in self._c.execute("SELECT pos, recs FROM seg_records WHERE seg=? AND (t > ? OR (t = ? AND i >= ?))",
                                                 (seg, cut[0], cut[0], cut[1])).fetchall():
                keep = [(t, i, bytes(r)) for t, i, r in decode_records(crypto.decompress(recs, "head segment records")) if (t, i) < cut]
                if keep:
                    self._c.execute("UPDATE seg_records SET t=?, i=?, recs=? WHERE pos=?",
                                    (keep[-1][0], keep[-1][1], crypto.compress(encode_records(keep)), row_pos))
                else:
                    self._c.execute("DELETE FROM seg_records WHERE pos=?", (row_pos,))
            last = self._c.execute("SELECT t, i FROM seg_records WHERE seg=? ORDER BY pos DESC LIMIT 1", (seg,)).fetchone()
            to = tuple(last) if last else state["from"]
        else:
            to = tuple(pos["cluster_time"]) if pos["cluster_time"] else state["from"]
        self.close_segment(to, final=True)
        self._c.execute("UPDATE seg_state SET timeline=NULL, next_seq=NULL, from_t=NULL, from_i=NULL, opened=NULL WHERE one=1")

    def set_sync_state(self, state: dict | None) -> None:
        """Initial-sync progress (a JSON-safe dict, or None once consistent)."""
        self._c.execute("UPDATE position SET sync=? WHERE one=1", (json.dumps(state) if state is not None else None,))

    def clear(self) -> None:
        """Remove every namespace and document and reset the position (a fresh initial sync); the change segments'
        timeline ends here."""
        self.end_timeline()
        for (ns,) in self._c.execute("SELECT ns FROM namespaces").fetchall():
            self.drop_namespace(ns)
        self._c.execute("UPDATE position SET resume_token=NULL, ct_t=NULL, ct_i=NULL, consistent=0, sync=NULL WHERE one=1")
