# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Change segments: what point-in-time restore replays on top of a snapshot (no Ansible imports). PRIVATE.

A segment holds the records the daemon applied to the head over a cluster-time range (start
exclusive, end inclusive), in apply order, raw BSON as received: change events, and the daemon's
own corrections of the head that did not come from an event (correction()). The open segment's
records live in the head database (head.Writer.log_records, same transaction as the changes they
made); closing one (close()) fixes its range at a cluster-time boundary, sealing it (seal_closed())
puts it into the store and only then forgets its records, so a crash anywhere loses nothing.

Store object <job>/segments/<timeline>/<seq:010d>-<from_t>.<from_i>-<to_t>.<to_i>:
  "KBS1" | len(key id) | key id | predecessor's SHA-256 (32 bytes, zeros for a timeline's first)
  | seal(key, zstd frames of the records, aad)
records: for each record, its cluster time (two big-endian uint32: t, i) then the BSON document; compressed as one or
more zstd frames back to back (one per head transaction, as the head kept them: sealing does not recompress).
aad = "kmipbackup segment\\0<job>\\0<timeline>\\0<seq>\\0<key id>\\0<from_t>.<from_i>-<to_t>.<to_i>\\0<prev hex>",
so a segment moved to another job, timeline, place in the chain or range, or edited, fails to open;
the predecessor's digest chains each segment to the one before it (a reordered, replaced or
replayed segment breaks the chain), and sequence numbers without holes reveal a removed one.
A correction record is a document whose first field is "kb" (events start with "_id"):
  {"kb": "doc", "ns", "key": id_key, "doc": raw document or null (deleted)}
  {"kb": "ns", "ns", "info": {"options", "indexes", "uuid"} or null (dropped)}
  {"kb": "refresh", "ns", "info": ... or null}: what the source said when applying the event before
  it re-read the namespace (Applier.refresh), so a replay applies the event exactly as the head did.
  {"kb": "post", "ns", "docs": binary}: post-images, the segment's last records (at its end's cluster time): every
  document of ns changed in the segment as the head held it at the segment's end, in id_key order, packed as
  (uint32 id_key length, uint32 document length or 0xFFFFFFFF: deleted, id_key, document), the lengths big-endian. The head writes
  them when it closes a segment whose changes its change log lists one by one (head.Writer.close_segment); a restore
  to the segment's end or later may apply them instead of the segment's events (point_in_time, pitr_replay.prescan);
  the sequential replay skips them (the events before them made the same state).
  A segment with post-images ends with a zstd skippable frame (POST_TRAILER: magic 0x184D2A5B, size 12, "KBPI", uint64
  little-endian) giving the offset of their first frame in the compressed stream, so a reader that applies them
  decompresses only them (read_segments' posts_for); a plain zstd reader skips it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import datetime
import hashlib
import io
import itertools
import re
import struct
import threading
import time
from typing import TYPE_CHECKING, Callable

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import crypto
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import (
    IntegrityError, KmipBackupError, PointNotRestorable, StoreError)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.timeutil import iso

if TYPE_CHECKING:  # annotations only
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.head import Head
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.store import JobStore, Keys

try:
    import bson
    from bson.binary import Binary
    from bson.raw_bson import RawBSONDocument
    BSON_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    bson = Binary = RawBSONDocument = None
    BSON_IMPORT_ERROR = e

MAGIC = b"KBS1"
TIMELINE_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
NAME_RE = re.compile(r"^([0-9]{10})-([0-9]+)\.([0-9]+)-([0-9]+)\.([0-9]+)$")
NO_PREDECESSOR = b"\x00" * 32
DEFAULT_SEGMENT_SECONDS = 60
DEFAULT_WINDOW_HOURS = 24
_CT = struct.Struct(">II")
RECORD_TIME = _CT  # a record's header in a segment's plaintext: its cluster time (t, i) (encode_records)
_I32 = struct.Struct("<i")
_I32U = struct.Struct("<I")
_KB = b"\x02kb\x00"  # a correction's first element: a string named "kb"
MAX_INC = 0xFFFFFFFF


def _require_bson():
    if bson is None:
        raise KmipBackupError("The Python package pymongo (bson) is missing (%s): install the collection's requirements." % BSON_IMPORT_ERROR)


# ---- cluster times and points ---------------------------------------------------------------------

def ct_time(ct: tuple) -> str:
    """The UTC time (ISO, whole seconds) of a cluster time."""
    return iso(datetime.datetime.fromtimestamp(int(ct[0]), datetime.timezone.utc))


def end_time(ct: tuple) -> str:
    """The last whole second (ISO) up to whose end a coverage ending at cluster time ct reaches: a time means the end
    of that second (parse_point), so this time, given back, is inside the coverage."""
    return ct_time(ct) if ct[1] == MAX_INC else ct_time((ct[0] - 1, 0))


def _ct_dict(ct):
    return {"t": int(ct[0]), "i": int(ct[1])}


def parse_point(value) -> tuple[int, int]:
    """A point in time as a cluster time (t, i), from a cluster time {"t", "i"} (or [t, i]), an ISO time string
    (YYYY-MM-DDTHH:MM:SS, a trailing Z or +00:00 offset; any offset is converted to UTC) or a datetime (naive = UTC).
    A time means the end of that second: every operation in it is included."""
    if isinstance(value, dict) and set(value) >= {"t", "i"}:
        t, i = value["t"], value["i"]
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        t, i = value
    else:
        dt = value
        if isinstance(value, str):
            text = value.strip()
            if text.endswith("Z") or text.endswith("z"):
                text = text[:-1] + "+00:00"
            try:
                dt = datetime.datetime.fromisoformat(text)
            except ValueError:
                raise PointNotRestorable("point_in_time %r is neither an ISO time (like 2026-11-30T14:37:00Z) nor a cluster "
                                         "time {t, i}: give one of those." % (value,)) from None
        if not isinstance(dt, datetime.datetime):
            raise PointNotRestorable("point_in_time %r is neither an ISO time (like 2026-11-30T14:37:00Z) nor a cluster time "
                                     "{t, i}: give one of those." % (value,))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.timezone.utc)
        return int(dt.timestamp()), MAX_INC
    try:
        t, i = int(t), int(i)
    except (TypeError, ValueError):
        raise PointNotRestorable("point_in_time %r: a cluster time needs integers t and i." % (value,)) from None
    if not (0 <= t <= MAX_INC and 0 <= i <= MAX_INC):
        raise PointNotRestorable("point_in_time %r: t and i must be between 0 and 4294967295." % (value,))
    return t, i


def prev_tick(ct: tuple) -> tuple[int, int]:
    """The cluster time just before ct."""
    t, i = ct
    return (t, i - 1) if i > 0 else (t - 1, MAX_INC)


# ---- records ----------------------------------------------------------------------------------------

def correction(kind: str, ns: str, key: bytes | None = None, doc: bytes | None = None, info: dict | None = None) -> bytes:
    """A correction record (raw BSON): kind "doc" (key = the head's id_key, doc raw or None = deleted), "ns" or
    "refresh" (info = {"options", "indexes", "uuid"} or None = the namespace does not exist)."""
    _require_bson()
    if kind == "doc":
        body = {"kb": "doc", "ns": ns, "key": Binary(bytes(key)), "doc": RawBSONDocument(bytes(doc)) if doc is not None else None}
    else:
        if info is not None:
            info = {"options": RawBSONDocument(bytes(info["options"])),
                    "indexes": [RawBSONDocument(bytes(s)) for s in info.get("indexes") or []],
                    "uuid": Binary(bytes(info["uuid"])) if info.get("uuid") is not None else None}
        body = {"kb": kind, "ns": ns, "info": info}
    return bson.encode(body)


POST_RECORD_BYTES = 4 << 20  # a post-image record's packed documents, at most (one document may take it over)
POST_DELETED = 0xFFFFFFFF  # a post-image entry's document length for a deleted document
POST_TRAILER = struct.Struct("<II4sQ")  # a zstd skippable frame: magic, payload size, tag, where the post-images start
_TRAILER_HEAD = (0x184D2A5B, 12, b"KBPI")


def post_trailer(offset: int) -> bytes:
    """The skippable frame a segment's compressed records end with when post-images start at offset (see the module doc)."""
    return POST_TRAILER.pack(*_TRAILER_HEAD, offset)


def post_offset(compressed: bytes) -> int | None:
    """Where a segment's post-image frames start in its compressed records (post_trailer), or None when it has none.
    The trailer counts only as the stream's last frame with the offset at a frame boundary, found by walking the frames
    from the start: a record's own bytes (a raw zstd block ends with them) can look like a trailer, never like that."""
    end = len(compressed) - POST_TRAILER.size
    if end <= 0:
        return None
    *head, offset = POST_TRAILER.unpack_from(compressed, end)
    if tuple(head) != _TRAILER_HEAD or not 0 < offset < end:
        return None
    starts = _frame_starts(compressed)
    return offset if starts is not None and starts[-1] == end and offset in starts else None


_ZSTD_MAGIC = 0xFD2FB528
_FCS_SIZES, _DICT_SIZES = (0, 2, 4, 8), (0, 1, 2, 4)


def _frame_starts(data: bytes) -> list | None:
    """Where each zstd frame of data starts (RFC 8878: frame headers and block headers only, nothing decompressed),
    or None when data is not a whole number of frames."""
    starts, pos, n = [], 0, len(data)
    try:
        while pos < n:
            starts.append(pos)
            magic = _I32U.unpack_from(data, pos)[0]
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame
                pos += 8 + _I32U.unpack_from(data, pos + 4)[0]
                continue
            if magic != _ZSTD_MAGIC:
                return None
            fhd = data[pos + 4]
            single = fhd >> 5 & 1
            fcs = _FCS_SIZES[fhd >> 6] or single
            pos += 5 + (0 if single else 1) + _DICT_SIZES[fhd & 3] + fcs
            while True:
                block = int.from_bytes(data[pos:pos + 3], "little")
                kind, size = block >> 1 & 3, block >> 3
                if kind == 3 or pos + 3 > n:
                    return None
                pos += 3 + (1 if kind == 1 else size)
                if block & 1:
                    break
            pos += 4 if fhd & 4 else 0
    except (IndexError, struct.error):
        return None
    return starts if pos == n else None


_POST_ENTRY = struct.Struct(">II")  # a post-image entry's id_key length, document length (POST_DELETED: deleted)
_POST_HEAD = _KB + _I32.pack(5) + b"post\x00\x02ns\x00"  # a post-image record's BSON after its length, up to the ns


def post_plaintexts(rows, to: tuple, record_bytes: int | None = None, frame_bytes: int = 16 << 20):
    """Plaintexts (encode_records' bytes, each record at cluster time to) of the post-image records (see the module doc)
    of rows (ns, id_key, document or None: deleted) grouped by ns, in id_key order within it: one or more records per
    namespace, each holding at most about record_bytes (default POST_RECORD_BYTES) of entries, a plaintext per about
    frame_bytes. Each record is the bytes bson.encode({"kb": "post", "ns": ns, "docs": Binary(entries)}) gives, joined
    once from its parts: no copy per document but the join."""
    record_bytes = POST_RECORD_BYTES if record_bytes is None else record_bytes
    stamp, entry = _CT.pack(*to), _POST_ENTRY.pack
    ns, parts, size, frame, frame_size = None, [], 0, [], 0
    for row_ns, key, doc in itertools.chain(rows, [(None, None, None)]):
        if parts and (row_ns != ns or size >= record_bytes or key is None):
            name = ns.encode("utf-8")
            total = 4 + len(_POST_HEAD) + 4 + len(name) + 1 + 1 + 5 + 4 + 1 + size + 1
            frame += (stamp, _I32.pack(total), _POST_HEAD, _I32.pack(len(name) + 1), name, b"\x00\x05docs\x00",
                      _I32.pack(size), b"\x00")
            frame += parts
            frame.append(b"\x00")
            frame_size += size
            parts, size = [], 0
            if frame_size >= frame_bytes or key is None:
                yield b"".join(frame)
                frame, frame_size = [], 0
        if key is None:
            break
        ns = row_ns
        if doc is None:
            parts += (entry(len(key), POST_DELETED), key)
            size += 8 + len(key)
        else:
            parts += (entry(len(key), len(doc)), key, doc)
            size += 8 + len(key) + len(doc)


def is_post(raw: bytes) -> bool:
    """Whether raw (a record) is a post-image record."""
    return raw[4:17] == _KB + b"\x05\x00\x00\x00post\x00"


def is_correction(raw: bytes) -> bool:
    return raw[4:8] == _KB


def encode_records(rows) -> bytes:
    """The plaintext of a segment from [(t, i, raw)]."""
    pack = _CT.pack
    return b"".join([x for t, i, rec in rows for x in (pack(t, i), rec)])


def decode_records(plain: bytes, name: str = "?") -> list:
    """[(t, i, raw bytes)] of a segment's plaintext; IntegrityError naming the segment when it is malformed."""
    out, pos, n = [], 0, len(plain)
    view = plain if type(plain) is bytes else memoryview(plain)  # pylint: disable=unidiomatic-typecheck  # the replay wants bytes
    append, ct, size_of = out.append, _CT.unpack_from, _I32.unpack_from  # once per record of every segment a restore reads
    while pos < n:
        if pos + 13 > n:
            raise crypto.integrity_error("segment", name, "has a malformed record")
        t, i = ct(plain, pos)
        pos += 8
        end = pos + size_of(plain, pos)[0]
        if end < pos + 5 or end > n:
            raise crypto.integrity_error("segment", name, "has a malformed record")
        append((t, i, view[pos:end]))
        pos = end
    return out


# ---- store objects ----------------------------------------------------------------------------------

def segment_name(timeline: str, seq: int, frm: tuple, to: tuple) -> str:
    """<timeline>/<seq>-<from>-<to>: the segment's id, as errors name it and its path below segments/."""
    return "%s/%010d-%d.%d-%d.%d" % (timeline, seq, frm[0], frm[1], to[0], to[1])


def segment_path(job_store: JobStore, meta: dict) -> str:
    return job_store._p("segments", meta["name"])  # pylint: disable=protected-access


def _aad(job, meta, key_id, prev):
    return b"\x00".join((b"kmipbackup segment", job.encode("ascii"), meta["timeline"].encode("ascii"), b"%d" % meta["seq"],
                         key_id.encode("ascii"), b"%d.%d-%d.%d" % (tuple(meta["from"]) + tuple(meta["to"])),
                         prev.hex().encode("ascii")))


def _meta(timeline, seq, frm, to):
    return {"timeline": timeline, "seq": int(seq), "from": tuple(frm), "to": tuple(to),
            "name": segment_name(timeline, seq, frm, to)}


def decompress_frames(data: bytes, name: str = "?") -> bytes:
    """The records of one or more zstd frames back to back (crypto.decompress reads only the first frame)."""
    crypto._require_zstd()  # pylint: disable=protected-access
    try:
        return crypto.zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    except crypto.zstandard.ZstdError:
        raise crypto.integrity_error("segment", name, "does not decompress") from None


def seal_segment(job: str, meta: dict, frames: bytes, key_id: str, key: bytes | None, prev: bytes) -> bytes:
    """The stored bytes of a segment (see the module doc); frames: its records as zstd frames (crypto.compress of
    encode_records, one or more back to back)."""
    kid = key_id.encode("ascii")
    return crypto.seal(key, frames, _aad(job, meta, key_id, prev), MAGIC + bytes([len(kid)]) + kid + bytes(prev))


def open_segment(job: str, meta: dict, blob: bytes, keys: Keys) -> tuple[bytes, bytes]:
    """(plaintext, predecessor digest) of a stored segment, authenticated; IntegrityError naming it."""
    compressed, prev = _open_sealed(job, meta, blob, keys)
    return decompress_frames(compressed, meta["name"]), prev


def _open_sealed(job, meta, blob, keys):
    """(the records' zstd frames, predecessor digest) of a stored segment, authenticated."""
    name = meta["name"]
    if blob[:4] != MAGIC or len(blob) < 5:
        raise crypto.integrity_error("segment", name, "has an unknown format")
    n = blob[4]
    try:
        key_id = bytes(blob[5:5 + n]).decode("ascii")
    except UnicodeDecodeError:
        raise crypto.integrity_error("segment", name, "has an unknown format") from None
    prev = bytes(blob[5 + n:37 + n])
    if len(prev) != 32:
        raise crypto.integrity_error("segment", name, "has an unknown format")
    if keys.encryption and key_id in ("", "none"):
        raise crypto.integrity_error("segment", name, "names no data key (unencrypted) in an encrypted job")
    return crypto.open_sealed(keys.key(key_id), blob[37 + n:], _aad(job, meta, key_id, prev), "segment", name), prev


def list_segments(job_store: JobStore) -> list:
    """Every segment the store holds, by name (unauthenticated: replay authenticates what it uses), sorted by
    timeline and sequence number: [{"timeline", "seq", "from", "to", "name"}]."""
    out = []
    for path in job_store.storage.list_tree(job_store._p("segments")):  # pylint: disable=protected-access
        timeline, _sep, rest = path.partition("/")
        m = NAME_RE.match(rest)
        if ".tmp" in path or not TIMELINE_RE.match(timeline) or not m:
            continue
        seq, ft, fi, tt, ti = (int(x) for x in m.groups())
        out.append(_meta(timeline, seq, (ft, fi), (tt, ti)))
    return sorted(out, key=lambda s: (s["timeline"], s["seq"]))


# ---- writing (the daemon) ---------------------------------------------------------------------------

def close(head: Head) -> int | None:
    """Close the head's open segment at the cluster time the head is complete through (the last applied cluster time,
    or just before an idle stream's post-batch resume token when that is later). Nothing is closed while the head is
    not consistent (inside a run of one cluster time): a transaction is never split. Returns the closed segment's
    local id, or None."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.events import token_time  # pylint: disable=import-outside-toplevel
    with head.write() as w:
        pos = w.position()
        if not pos["consistent"] or not pos["cluster_time"]:
            return None
        to = tuple(pos["cluster_time"])
        token = token_time(pos["resume_token"])
        if token is not None and tuple(token) > to:
            to = max(to, prev_tick(tuple(token)))
        return w.close_segment(to)


def cut_segment(head: Head) -> dict | None:
    """What a snapshot cut now records in its catalog entry: the last segment of the current timeline that is sealed
    into the store, {"timeline", "seq", "to": [t, i], "sha256": hex digest of the stored object}; None when the head
    records no timeline or has sealed none of it yet (a segment still in the head could be lost with the host, so it is
    never vouched for). The analysis then requires the store to hold it (_check_cuts)."""
    state = head.segment_state()
    # the closed segments before the chain: a seal pass on its own thread (Sealer) may move the chain on meanwhile, and
    # the segment after the chain's last one is still in a list read before it (closes happen on the caller's thread)
    closed = head.closed_segments()
    link = head.segment_chain(state["timeline"]) if state["timeline"] is not None else None
    if link is None or state["from"] is None:
        return None
    seq, digest = link
    if seq == state["next_seq"] - 1:
        to = state["from"]
    else:  # closed segments await sealing: the last sealed one ends where the next one starts
        nxt = [c["from"] for c in closed if c["timeline"] == state["timeline"] and c["seq"] == seq + 1]
        if not nxt:
            return None
        to = nxt[0]
    return {"timeline": state["timeline"], "seq": seq, "to": list(to), "sha256": digest.hex()}


def due(head: Head, seconds: float, now: float | None = None) -> bool:
    """Whether the open segment is older than seconds."""
    state = head.segment_state()
    return state["timeline"] is not None and state["opened"] is not None and (now or time.time()) - state["opened"] >= seconds


def sealable(head: Head) -> bool:
    """Whether a seal pass (seal_closed, wait=False: the daemon's tick) would seal anything now: a segment is closed and
    the oldest one's post-images are built (it waits for a later tick otherwise, and nothing is unwrapped meanwhile)."""
    closed = head.closed_segments()
    return bool(closed) and not head.post_images_pending(closed[0]["seg"])


def seal_closed(head: Head, job_store: JobStore, keys: Keys, master_key_uid: str | None, wait: bool = True) -> list:
    """Put every closed segment into the store, oldest first, sealed under the current epoch's snapshot key and chained
    to its predecessor; forget each one's records once it is durable. Idempotent after a crash between the put and
    the forget (an equal object already in place is kept). Returns the sealed segments' metadata. wait False: stop at
    the first segment whose post-images are still being built (the capture goes on meanwhile; a later call seals it)."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.store import check_format  # pylint: disable=import-outside-toplevel
    closed = head.closed_segments()
    if not wait:
        closed = list(itertools.takewhile(lambda c: not head.post_images_pending(c["seg"]), closed))
    if not closed:
        return []
    check_format(job_store.storage, create=True)
    key_id = keys.epoch_for(master_key_uid)[0]
    key = keys.key(key_id)
    out = []
    for c in closed:
        meta = _meta(c["timeline"], c["seq"], c["from"], c["to"])
        link = head.segment_chain(c["timeline"])
        if c["seq"] == 1:
            prev = NO_PREDECESSOR
        elif link is not None and link[0] == c["seq"] - 1:
            prev = link[1]
        else:  # cannot happen: seals are in order and the link is kept with each
            raise StoreError("The head's change segments of timeline %s lost their chain before segment %d: the daemon "
                             "starts a new timeline." % (c["timeline"], c["seq"]))
        records, posts = head.segment_frames(c["seg"])
        frames = b"".join((records, posts, post_trailer(len(records)))) if posts else records
        path = segment_path(job_store, meta)
        blob = _existing(job_store, meta, path, frames, prev, keys)
        if blob is None:
            blob = seal_segment(job_store.job, meta, frames, key_id, key, prev)
            job_store.storage.put_atomic(path, blob)
        head.segment_sealed(c["seg"], c["timeline"], c["seq"], hashlib.sha256(blob).digest())
        out.append(dict(meta, stored=len(blob)))
    return out


class Sealer:
    """seal_closed passes (wait=False, as the daemon's tick) on a thread of their own, one at a time: the capture goes on
    while segments are read, encrypted and written (a bucket's upload takes seconds). The caller unwraps the current
    epoch's key before a pass (Keys.key; a pass may still unwrap an older epoch's key, so a KMIP client shared with
    the caller must take one call at a time: daemon._OneCallAtATime) and collects each pass (collect) before
    anything else touches the head's segments or closes it: a snapshot's or a rotation's own seal, a reset, a stop.
    A pass's thread is a daemon thread: a runner given up at exit does not hold the process."""

    def __init__(self) -> None:
        self._pass = None  # (thread, outcome: {"sealed": list} or {"error": exception}, job store, keys)

    def busy(self) -> bool:
        """Whether a pass has started and not been collected."""
        return self._pass is not None

    def target(self) -> tuple | None:
        """(job store, keys) of the pass started and not collected, or None."""
        return self._pass[2:] if self._pass is not None else None

    def start(self, head: Head, job_store: JobStore, keys: Keys, master_key_uid: str | None) -> None:
        if self._pass is not None:
            raise RuntimeError("a seal pass is already running: collect it first")
        outcome = {}

        def run():
            try:
                outcome["sealed"] = seal_closed(head, job_store, keys, master_key_uid, False)
            except BaseException as e:  # pylint: disable=broad-except  # raised by collect, on the caller's thread
                outcome["error"] = e
        thread = threading.Thread(target=run, name="kmipbackup-seal", daemon=True)
        thread.start()
        self._pass = (thread, outcome, job_store, keys)

    def collect(self, wait: bool = True) -> list | None:
        """What the pass sealed (seal_closed's list; its error is raised here), once; None when no pass ran, or (wait
        False) it is still running."""
        if self._pass is None:
            return None
        thread, outcome = self._pass[:2]
        if not wait and thread.is_alive():
            return None
        thread.join()
        self._pass = None
        if "error" in outcome:
            raise outcome["error"]
        return outcome["sealed"]

    def close(self) -> None:
        """Wait for a pass still running (its error is dropped: its segments stay closed in the head, sealed again
        at the next start)."""
        try:
            self.collect()
        except Exception:  # pylint: disable=broad-except
            pass


def _existing(job_store, meta, path, frames, prev, keys):
    """The stored segment when it is already in place with this content (a seal a crash cut short), else None."""
    blob = job_store.storage.get(path) if job_store.storage.exists(path) else None
    if blob is None:
        return None
    try:
        got, got_prev = open_segment(job_store.job, meta, blob, keys)
    except (IntegrityError, StoreError):
        return None
    want = decompress_frames(frames, meta["name"])
    if got_prev != prev or not got.startswith(want):
        return None
    # the same records; a copy sealed before a restart may also end with post-images this run did not build again
    try:
        rest = decode_records(got[len(want):], meta["name"])
    except IntegrityError:
        return None
    return bytes(blob) if all(is_post(r[2]) for r in rest) else None


def collect(job_store: JobStore, keys: Keys, window_hours: float, now: datetime.datetime | None = None,
            grace_seconds: float = 3600) -> dict:
    """Retention of segments: keep those a restore to any point inside the window needs, i.e. every segment after the
    oldest live snapshot that starts a range inside the window (the newest snapshot at or before the window's start,
    else the oldest); window_hours 0 keeps none. Like chunks, a segment goes only once written more than grace
    seconds ago. Returns {"segments_deleted", "bytes_freed", "segments"}."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    segs = list_segments(job_store)
    if not segs:
        return {"segments_deleted": 0, "bytes_freed": 0, "segments": 0}
    if window_hours and window_hours > 0:
        entries, _head = job_store.live_catalog(keys)
        start = (int(now.timestamp() - float(window_hours) * 3600), 0)
        cts = sorted(tuple(e["cluster_time"]) for e in entries if e.get("cluster_time"))
        before = [ct for ct in cts if ct <= start]
        base = before[-1] if before else (cts[0] if cts else None)
        if base is None:
            return {"segments_deleted": 0, "bytes_freed": 0, "segments": len(segs)}  # no snapshot yet: nothing is older
        drop = [s for s in segs if s["to"] <= base]
    else:
        drop = segs
    cutoff = now.timestamp() - grace_seconds
    deleted = freed = 0
    for s in drop:
        size = job_store.delete_if_older(segment_path(job_store, s), cutoff)
        if size is not None:
            deleted += 1
            freed += size
    return {"segments_deleted": deleted, "bytes_freed": freed, "segments": len(segs) - deleted}


# ---- ranges and plans (restore side) ----------------------------------------------------------------

def _runs(segs):
    """Contiguous runs of segments: [(timeline, [segments], reason the run started)]."""
    runs, last = [], None
    for s in segs:
        if last is not None and s["timeline"] == last["timeline"] and s["seq"] == last["seq"] + 1 and s["from"] == last["to"]:
            runs[-1][1].append(s)
        else:
            if last is None or s["timeline"] != last["timeline"]:
                reason = "a new timeline started (a resync, a lost resume point or an invalidated change stream)"
            elif s["seq"] != last["seq"] + 1:
                reason = "segment %s/%010d is missing (removed from the store)" % (last["timeline"], last["seq"] + 1)
            else:
                reason = "segment %s does not start where segment %s ends" % (s["name"], last["name"])
            runs.append((s["timeline"], [s], reason))
        last = s
    return runs


def _gap(frm, to, reasons):
    return {"from_time": end_time(frm), "to_time": ct_time(to), "from": _ct_dict(frm), "to": _ct_dict(to),
            "reason": "; ".join(dict.fromkeys(reasons)) or "no snapshot starts this coverage"}


def _check_cuts(entries, segs):
    """Each live snapshot's entry records the last sealed segment at its cut (cut_segment): the store must hold it while
    it holds an earlier segment of that timeline (retention removes a timeline's segments oldest first, so one missing
    after an earlier one was removed from the newest end). IntegrityError naming the first segment missing."""
    held = {(s["timeline"], s["seq"]): s for s in segs}
    for e in entries:
        cut = e.get("segment")
        if not isinstance(cut, dict):
            continue
        timeline, seq, to = cut.get("timeline"), cut.get("seq"), tuple(cut.get("to") or (0, 0))
        s = held.get((timeline, seq))
        if s is not None and s["to"] != to:
            raise crypto.integrity_error("segment", s["name"], "does not end at cluster time %d.%d, where snapshot %s "
                                         "records it ends" % (to + (e["snapshot_id"],)))
        earlier = [x["seq"] for x in segs if x["timeline"] == timeline and x["seq"] < seq]
        if s is None and earlier:
            raise crypto.integrity_error(
                "segment", "%s/%010d" % (timeline, max(earlier) + 1),
                "is missing (removed from the store): snapshot %s records that its timeline reaches segment %010d, "
                "ending at cluster time %d.%d; segments up to %010d are gone from the newest end"
                % ((e["snapshot_id"], seq) + to + (seq,)))


def _analyse(job_store, keys):
    """(ranges with their segments and snapshots, gaps); ranges sorted by time. IntegrityError when segments a live
    snapshot vouches for were removed (_check_cuts)."""
    entries, _head = job_store.live_catalog(keys)
    # by cluster time only (two snapshots of an idle head share one), in catalog order among equals
    snaps = sorted(((tuple(e["cluster_time"]), e) for e in entries if e.get("cluster_time")), key=lambda x: x[0])
    segs = list_segments(job_store)
    _check_cuts(entries, segs)
    ranges, gaps, prev_end, reasons, unusable_to = [], [], None, [], None
    for timeline, run, reason in sorted(_runs(segs), key=lambda r: r[1][0]["from"]):
        start, end = run[0]["from"], run[-1]["to"]
        bases = [(ct, e) for ct, e in snaps if start <= ct <= end]
        if prev_end is not None:
            reasons.append(reason)
        if not bases:  # coverage no snapshot starts: not restorable
            unusable_to = end
            continue
        r = {"timeline": timeline, "from": bases[0][0], "to": end, "snapshots": bases, "segments": run}
        if prev_end is not None:
            gaps.append(_gap(prev_end, r["from"], reasons))
        ranges.append(r)
        prev_end, reasons, unusable_to = end, [], None
    if prev_end is not None and unusable_to is not None:  # segments after the last range that no snapshot starts
        gaps.append(_gap(prev_end, unusable_to, reasons))
    return ranges, gaps


def restorable_ranges(job_store: JobStore, keys: Keys) -> dict:
    """{"ranges": [{"timeline", "from", "from_time", "to", "to_time", "base_snapshots"}], "gaps": [{"from_time", "to_time",
    "from", "to", "reason"}]}: the contiguous coverage by segments that starts at a live snapshot's cluster time, oldest
    first (cluster times as {"t", "i"}, times ISO UTC: a range's from_time is the second of its start, to_time the
    last whole second it covers, so both are restorable points as given). Snapshots are authenticated; segments are
    listed by name (replay authenticates them)."""
    ranges, gaps = _analyse(job_store, keys)
    return {"ranges": [{"timeline": r["timeline"], "from": _ct_dict(r["from"]), "from_time": ct_time(r["from"]),
                        "to": _ct_dict(r["to"]), "to_time": end_time(r["to"]),
                        "base_snapshots": [e["snapshot_id"] for _ct, e in r["snapshots"]]} for r in ranges],
            "gaps": gaps}


def plan_point(job_store: JobStore, keys: Keys, point) -> dict:
    """{"snapshot": catalog entry, "segments": [segment metadata in order], "point": (t, i)} to rebuild the image at
    point: the newest live snapshot at or before it in its range, then every segment after the snapshot up to the one
    holding point. PointNotRestorable naming the nearest restorable times before and after when point is in no range."""
    point = parse_point(point)
    ranges, gaps = _analyse(job_store, keys)
    for r in ranges:
        if r["from"] <= point <= r["to"]:
            snap_ct, entry = [(ct, e) for ct, e in r["snapshots"] if ct <= point][-1]
            segs = [s for s in r["segments"] if s["to"] > snap_ct and s["from"] < point]
            cut = entry.get("segment")
            if segs and isinstance(cut, dict) and cut.get("sha256") and (cut.get("timeline"), cut.get("seq")) == (
                    segs[0]["timeline"], segs[0]["seq"] - 1):  # the chain's link before the plan, from the catalog
                segs[0] = dict(segs[0], prev_sha256=cut["sha256"])
            return {"snapshot": entry, "segments": segs, "point": point}
    near = []
    for gap in gaps:
        if (gap["from"]["t"], gap["from"]["i"]) < point < (gap["to"]["t"], gap["to"]["i"]):
            near.append("it is in a gap of the coverage: %s" % gap["reason"])
    before = [r["to"] for r in ranges if r["to"] < point]
    after = [r["from"] for r in ranges if r["from"] > point]
    if before:
        near.append("the latest restorable time before it is %s (cluster time %d.%d)" % ((end_time(before[-1]),) + tuple(before[-1])))
    if after:
        near.append("the earliest restorable time after it is %s (cluster time %d.%d)" % ((ct_time(after[0]),) + tuple(after[0])))
    if not ranges:
        near.append("job %s has no restorable range (point in time needs a snapshot followed by change segments)" % job_store.job)
    raise PointNotRestorable("The point in time %s (cluster time %d.%d) is not restorable for job %s: %s. Choose a point "
                             "inside a restorable range (snapshot_info lists them)."
                             % (ct_time(point), point[0], point[1], job_store.job, "; ".join(near)),
                             before=end_time(before[-1]) if before else None, after=ct_time(after[0]) if after else None)


# ---- replay -----------------------------------------------------------------------------------------

def _info(doc):
    info = doc.get("info")
    if info is None:
        return None
    uuid = info.get("uuid")
    return {"options": bytes(info["options"].raw), "indexes": [bytes(s.raw) for s in info.get("indexes") or []],
            "uuid": bytes(uuid) if uuid is not None else None}


def _check_chain(job_store, segs):
    """The first segment's predecessor digest: the one the base snapshot's entry records (plan_point), else the
    predecessor's when the store still holds it (retention may have collected it); None when it cannot be checked."""
    first = segs[0]
    if first["seq"] == 1:
        return NO_PREDECESSOR
    if first.get("prev_sha256"):
        return bytes.fromhex(first["prev_sha256"])
    for s in list_segments(job_store):
        if s["timeline"] == first["timeline"] and s["seq"] == first["seq"] - 1:
            path = segment_path(job_store, s)
            return hashlib.sha256(bytes(job_store.storage.get(path))).digest() if job_store.storage.exists(path) else None
    return None


READ_AHEAD = 2  # segments read, authenticated, decompressed and split at once (file or S3 reads, AES-GCM and zstd release the GIL)


def _read_one(job_store: JobStore, keys: Keys, s: dict, posts_only: bool) -> tuple[bytes, bytes, list, bool]:
    """(predecessor digest it names, its own digest, its records, whether they are its post-images only) of stored
    segment s, authenticated; posts_only: only its post-images when it has them (its other frames are not
    decompressed)."""
    path, name = segment_path(job_store, s), s["name"]
    if not job_store.storage.exists(path):
        raise crypto.integrity_error("segment", name, "is missing (removed from the store)")
    blob = bytes(job_store.storage.get(path))
    compressed, prev = _open_sealed(job_store.job, s, blob, keys)
    start = post_offset(compressed) if posts_only else None
    if start is None:
        return prev, hashlib.sha256(blob).digest(), decode_records(decompress_frames(compressed, name), name), False
    recs = decode_records(decompress_frames(compressed[start:len(compressed) - POST_TRAILER.size], name), name)
    if not recs or not all(is_post(r[2]) and (r[0], r[1]) == tuple(s["to"]) for r in recs):
        raise crypto.integrity_error("segment", name, "has malformed post-images")
    return prev, hashlib.sha256(blob).digest(), recs, True


def read_segments(job_store: JobStore, keys: Keys, segs: list, posts_for: frozenset = frozenset()):
    """Yield (segment metadata, [(t, i, raw)]) for segs in order, each authenticated and chain-checked before it is
    yielded: IntegrityError naming the segment (missing, modified, from another job or place, out of order). The next
    READ_AHEAD segments are read on side threads while the caller uses this one; errors come out in order, at the
    segment they concern (an order error before that segment's own). posts_for: names of segments whose post-images
    the caller applies instead of their events: of those that have them, only those are read, and their metadata comes
    with "posts_only": True."""
    expect = _check_chain(job_store, segs) if segs else None
    last, todo, ahead = None, iter(segs), collections.deque()
    with concurrent.futures.ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="kmipbackup-segments") as pool:
        try:
            while True:
                while len(ahead) < READ_AHEAD:
                    s = next(todo, None)
                    if s is None:
                        break
                    ahead.append((s, pool.submit(_read_one, job_store, keys, s, s["name"] in posts_for)))
                if not ahead:
                    return
                s, f = ahead.popleft()
                if last is not None and (s["timeline"] != last["timeline"] or s["seq"] != last["seq"] + 1 or s["from"] != last["to"]):
                    raise crypto.integrity_error("segment", s["name"], "does not follow segment %s" % last["name"])
                prev, digest, recs, posts_only = f.result()
                if expect is not None and prev != expect:
                    raise crypto.integrity_error("segment", s["name"], "does not chain to its predecessor (a segment was "
                                                 "replaced, reordered or replayed)")
                expect, last = digest, s
                yield (dict(s, posts_only=True) if posts_only else s), recs
        finally:
            for _s, f in ahead:
                f.cancel()


def window_parts(plan: dict, read):
    """(segment, [(t, i, raw)] of its records the replay applies) for each segment it uses, from read, the plan's
    segments as read_segments yields them: every record after the snapshot's cluster time up to and including the
    point, in order (replay's rule: a record at its segment's start and the snapshot's time is a correction made after
    a cut there). Nothing of a segment after the one that holds the point is taken from read."""
    point, after = tuple(plan["point"]), tuple(plan["snapshot"]["cluster_time"])
    for seg, recs in read:
        start, out = tuple(seg["from"]), []
        for t, i, raw in recs:
            ct = (t, i)
            if ct > point:
                yield seg, out
                return
            if ct > after or (ct == after and start == after):
                out.append((t, i, raw))
        yield seg, out


def replay(head: Head, job_store: JobStore, keys: Keys, plan: dict, progress: Callable | None = None,
           batch_records: int = 20000, read: list | None = None) -> dict:
    """Apply the plan's segments to head (holding the plan's snapshot): every record after the snapshot's cluster time
    up to and including plan["point"], in transactions of about batch_records records (whole cluster times), with the
    same Applier as the capture for events and upsert/delete for corrections. Each segment is authenticated and
    chain-checked before anything of it is applied (read: the plan's segments already read, as read_segments yields
    them). The head's position becomes the point (consistent).
    progress(events, segments done, segments total) after each segment. Returns {"events", "records", "segments"}."""
    # pylint: disable=import-outside-toplevel
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.events import Applier, keeps
    _require_bson()
    point = tuple(plan["point"])
    after = tuple(plan["snapshot"]["cluster_time"])
    refreshes = collections.deque()
    applier = Applier(refresh=lambda ns: refreshes.popleft() if refreshes else None, keep=keeps)
    apply_raw = applier.apply_raw
    events = records = done = 0
    total = len(plan["segments"])
    for seg, recs in read if read is not None else read_segments(job_store, keys, plan["segments"]):
        if seg.get("posts_only"):  # its events were not read: replaying it would drop them
            raise KmipBackupError("A change segment read as its post-images alone was given to the event-by-event "
                                  "replay; nothing was published: restore again.")
        # a record at its segment's start is a correction made after that boundary (head verification): it belongs
        # after a snapshot cut there
        start = tuple(seg["from"])
        n, stop = len(recs), False
        k = 0
        while k < n and not stop:
            with head.write() as w:
                count, last_ct = 0, None
                while k < n:
                    t, i, raw = recs[k]
                    ct = (t, i)
                    if ct > point:
                        stop = True
                        break
                    if count >= batch_records and ct != last_ct:
                        break
                    k += 1
                    if ct < after or (ct == after and start != after):
                        continue
                    raw = bytes(raw)
                    if raw[4:8] != _KB:
                        if refreshes:
                            refreshes.clear()
                        j = k
                        while j < n and recs[j][2][4:8] == _KB and RawBSONDocument(bytes(recs[j][2]))["kb"] == "refresh":
                            refreshes.append(_info(RawBSONDocument(bytes(recs[j][2]))))
                            j += 1
                        apply_raw(w, raw)
                        if applier.recopy:
                            applier.recopy = []  # the capture's re-copies follow as "doc" corrections
                        events += 1
                    else:
                        doc = RawBSONDocument(raw)
                        kind = doc["kb"]
                        if kind == "doc":
                            applier.flush()
                            if doc["doc"] is None:
                                w.delete(doc["ns"], bytes(doc["key"]))
                            else:
                                w.upsert(doc["ns"], bytes(doc["key"]), bytes(doc["doc"].raw))
                        elif kind == "ns":
                            applier.flush()
                            info = _info(doc)
                            if info is None:
                                w.drop_namespace(doc["ns"])
                            else:
                                w.create_namespace(doc["ns"], info["options"], uuid=info["uuid"], indexes=info["indexes"])
                        # "refresh" records were consumed with their event
                    records += 1
                    count += 1
                    last_ct = ct
        done += 1
        if progress is not None:
            progress(events, done, total)
        if stop:
            break
    with head.write() as w:
        w.set_position(None, point, True)
    return {"events": events, "records": records, "segments": done}
