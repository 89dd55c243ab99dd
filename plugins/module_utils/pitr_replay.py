# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The replay process of a point-in-time restore's fast path (no Ansible imports). PRIVATE to the collection.

point_in_time._Fast starts it as a fresh interpreter (spawn(): `python -I -S -c BOOTSTRAP`, standard input and output
as the two pipes, standard error to /dev/null, an environment holding only the parent's sys.path, so that it imports
this module the way the parent did: from PYTHONPATH in tests, from AnsiballZ's zip in a module run; child_process). It
imports only this module, events, rawbson and child_process (no store, KMIP, crypto, SQLCipher or pymongo client), and it is given only what it
replays: the base's namespaces with their chunks' last keys, counts and sizes, and the window's change records; the
touched base chunks' plaintext later, from the parent, which reads and authenticates them. No key, no store, no file.

Protocol (little-endian; docs/internals.md, "Restore to a point"). The window is cut into parts, two per segment: the
first half of its records (an even part) is the parent's to pre-scan, the second half (odd) the child's. Parent to
child, each as _FEED + data: the layout (BSON: namespaces with ns, type and chunks [{last, count, bytes}]), sent with
the first segment that authenticated; the child's parts' records (_RECORDS, part index: raw BSON, concatenated), as the
segments are read; an empty _NONE record (the records end); the parent's pre-scan of its parts (_PRESCANNED, part index:
pack_ops), an empty _NONE record; then each touched base chunk's plaintext (_FEED with its namespace and range index)
in restore order. Child to parent, each as _MSG (+ data): _TOUCHED (the ranges its parts touch) or _FALLBACK (why
not the fast path: sent as soon as it finds it), then per namespace its touched ranges' _PARTs (cut as
virtual chunks are, with count and CRC-32) each closed by _RANGE_END, the namespace's totals (_NS_END), and _DONE;
or _ERROR with an exception's type name only (a message could hold data). The child exits when its input ends early
(the parent is gone) or when writing fails."""
from __future__ import annotations

import bisect
import gc
import os
import queue
import struct
import threading
import zlib

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import child_process, events
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import NotApplicable, UncertainOrder
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.rawbson import doc_offsets, id_key_from_document, split_bson_docs

try:
    import bson
    from bson.raw_bson import RawBSONDocument
except ImportError:  # pragma: no cover (restore.py reports the missing package)
    bson = RawBSONDocument = None

VIRTUAL_CHUNK_BYTES = 1 << 20  # the size virtual chunks (a rebuilt image's ranges) are cut at
AHEAD_BYTES = 256 << 20  # replayed ranges the child may hold while the parent has not read them yet

_PUT, _DEL, _UPD = 0, 1, 2
_F_OP, _F_NS, _F_KEY, _F_FULL, _F_DESC = events._OP, events._NS, events._KEY, events._FULL, events._DESC  # pylint: disable=protected-access
_OPS = {b"insert": _PUT, b"replace": _PUT, b"update": _UPD, b"delete": _DEL}
_KB = b"\x02kb\x00"  # a correction's first element (segments)
_POST = b"\x05\x00\x00\x00post\x00"  # after _KB: a post-image record (segments.post_records)
_POST_ENTRY = struct.Struct(">II")  # id_key length, document length (_NONE: deleted)
# kind, namespace index, range index, count, bytes, CRC-32 (of a part's data; of a namespace's parts' CRCs); then the data.
# CRC-32 (zlib): cheap; the parent hashes what it receives with SHA-256 for the manifest and checks the CRCs against it.
_MSG = struct.Struct("<BIIQQI")
_FEED = struct.Struct("<IIQ")  # namespace index, range index (_NONE, _NONE: not a base chunk; see _RECORDS), bytes: parent to child
_PART, _RANGE_END, _NS_END, _DONE, _ERROR, _TOUCHED, _FALLBACK = 1, 2, 3, 4, 5, 6, 7
_WITH_DATA = (_PART, _ERROR, _TOUCHED, _FALLBACK)
_OP = struct.Struct("<IIBII")  # namespace index, range index, op, key length, payload length (_NONE: none)
_NONE = 0xFFFFFFFF
_RECORDS, _PRESCANNED = 0xFFFFFFFE, 0xFFFFFFFD  # _FEED's namespace index for a part of the window (its index as range index):
# its records (raw BSON, concatenated: one of the child's parts), or the parent's pre-scan of it (pack_ops)
_ABSENT = object()

PATH_VARIABLE = child_process.PATH_VARIABLE  # the parent's sys.path (JSON): the child's only environment variable
BOOTSTRAP = child_process.bootstrap(__name__)  # what the child runs (python -I -S -c): sys.path as the parent's, then main()


def layout(manifest: dict) -> bytes:
    """What the child knows of the base snapshot's manifest (BSON): each namespace's name, type and chunks' last key,
    count and size; no chunk id, key id or digest."""
    return bson.encode({"namespaces": [{"ns": n["ns"], "type": n.get("type", "collection"),
                                        "chunks": [{"last": bytes(c["last"]), "count": c["count"], "bytes": c["bytes"]}
                                                   for c in n["chunks"]]} for n in manifest["namespaces"]]})


def pack_ops(groups: dict) -> bytes:
    """prescan's groups as bytes, for the replay process (unpack_ops)."""
    out, pack = [], _OP.pack
    for (j, r), ops in groups.items():
        for kind, key, payload in ops:
            out.append(pack(j, r, kind, len(key), _NONE if payload is None else len(payload)))
            out.append(key)
            if payload:
                out.append(payload)
    return b"".join(out)


def unpack_ops(blob: bytes) -> dict:
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


def prescan(raws, manifest: dict) -> tuple[dict | None, str | None]:
    """({(namespace index, range index): [(op, id_key, payload)]}, None) for the window's records (their raw BSON, in
    order), grouped by the base chunk whose key range each one falls in (range index len(chunks): past the last chunk),
    in order; (None, why) when the window holds anything the fast path does not replay: a DDL event, a namespace
    correction, an event on a namespace the base does not have (implicit creation) or one the scan cannot read.
    Documents are independent of each other under insert/replace/update/delete, so each range replays on its own."""
    where = {n["ns"]: (j, [bytes(c["last"]) for c in n["chunks"]]) for j, n in enumerate(manifest["namespaces"])
             if n.get("type", "collection") == "collection"}
    scan, keeps, bisect_left = events._event_fields, events.keeps, bisect.bisect_left  # pylint: disable=protected-access
    groups, where_of = {}, {}  # where_of: the bytes of an event's ns -> where[ns], or None (a namespace not kept)
    for raw in raws:
        if type(raw) is not bytes:  # pylint: disable=unidiomatic-typecheck
            raw = bytes(raw)
        if raw[4:8] == _KB:
            if raw[8:17] == _POST:  # a segment's post-images: many documents' state at its end
                post = _post_ops(raw, where)
                if isinstance(post, str):
                    return None, post
                j, lasts, ops = post
                for op in ops:
                    jr = (j, bisect_left(lasts, op[1]))
                    have = groups.get(jr)
                    if have is None:
                        groups[jr] = [op]
                    else:
                        have.append(op)
                continue
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


def _post_ops(raw: bytes, where: dict) -> tuple | str:
    """(namespace index, its chunks' last keys, [op]) of a post-image record (segments.post_records: a PUT or DEL per
    document, in id_key order), or why the fast path cannot use it."""
    try:
        doc = RawBSONDocument(raw)
        ns, packed = doc["ns"], bytes(doc["docs"])
    except Exception:  # pylint: disable=broad-except  # the sequential replay skips post-images
        return "post-images the scan cannot read"
    w = where.get(ns)
    if w is None:
        return "an event on a namespace the base snapshot does not have"
    out, pos, n, unpack = [], 0, len(packed), _POST_ENTRY.unpack_from
    try:
        while pos < n:
            kl, dl = unpack(packed, pos)
            pos += 8
            key = packed[pos:pos + kl]
            pos += kl
            if dl == _NONE:
                out.append((_DEL, key, None))
            else:
                out.append((_PUT, key, packed[pos:pos + dl]))
                pos += dl
    except struct.error:
        return "post-images the scan cannot read"
    if pos != n:
        return "post-images the scan cannot read"
    return w[0], w[1], out


def replay_parts(plain: bytes | None, ops: list, limit: int = VIRTUAL_CHUNK_BYTES) -> list:
    """[(count, data)] of one key range: the base chunk's documents (plain, in key order) with ops applied as the
    applier applies them, in key order, cut as virtual chunks are (a part ends with the document that takes it to
    limit bytes). Only documents next to a change are looked at: the rest are copied as runs of the base's bytes."""
    data = plain or b""
    offs = doc_offsets(data)  # offs[i]: where base document i starts; offs[-1]: the end
    if offs is None:
        raise ValueError("a base chunk that does not split into documents")
    n = len(offs) - 1
    view = memoryview(data)

    def key_at(i):
        o = offs[i]
        if data[o + 4] == 0x07 and data[o + 5:o + 9] == b"_id\x00":  # id_key_from_document's own first case, inlined
            return b"\x35" + data[o + 9:o + 21]
        return id_key_from_document(data[o:offs[i + 1]])
    # every base document's key, when the changes are dense enough that reading them all costs less than searching
    keys = [key_at(i) for i in range(n)] if len(ops) * max(n, 1).bit_length() > n else None
    changed = _changes(ops, lambda key: _base_doc(data, offs, key_at, keys, key))
    order = sorted(changed)
    pieces, at = [], 0  # runs (first, end) of unchanged base documents, and new documents (bytes)
    for key in order:
        i = bisect.bisect_left(keys, key, at) if keys is not None else bisect.bisect_left(range(n), key, at, key=key_at)
        if i > at:
            pieces.append((at, i))
        same = i < n and (keys[i] if keys is not None else key_at(i)) == key
        at = i + 1 if same else i
        if changed[key] is not None:
            pieces.append(changed[key])
    if at < n:
        pieces.append((at, n))
    return _cut(view, offs, pieces, limit)


def _base_doc(data, offs, key_at, keys, key):
    """The base document with id_key key, or None."""
    n = len(offs) - 1
    i = bisect.bisect_left(keys, key) if keys is not None else bisect.bisect_left(range(n), key, key=key_at)
    if i < n and (keys[i] if keys is not None else key_at(i)) == key:
        return data[offs[i]:offs[i + 1]]
    return None


def _changes(ops: list, base_doc) -> dict:
    """{id_key: its document after ops (in order), or None: deleted} of the keys ops change; base_doc(key) gives a
    base document an update applies to. An update of a missing document, or one that does not apply, changes nothing
    (the capture re-copied the document from the source: its "doc" correction follows in the range)."""
    changed, update = {}, events.apply_update_description
    for kind, key, payload in ops:
        if kind == _PUT:
            changed[key] = payload
        elif kind == _DEL:
            changed[key] = None
        else:
            stored = changed[key] if key in changed else base_doc(key)
            if stored is not None:
                try:
                    changed[key] = update(stored, payload)
                except (NotApplicable, UncertainOrder):
                    pass
    return changed


def _cut(view, offs: list, pieces: list, limit: int) -> list:
    """[(count, data)] of pieces (runs (first, end) of base documents in view, or documents) cut as virtual chunks are."""
    out, buf, count, size = [], [], 0, 0
    for piece in pieces:
        if type(piece) is tuple:  # pylint: disable=unidiomatic-typecheck
            a, e = piece
            while a < e:
                b = bisect.bisect_left(offs, limit - size + offs[a], a + 1, e + 1)  # the document that reaches limit
                stop = min(b, e)
                buf.append(view[offs[a]:offs[stop]])
                count += stop - a
                size += offs[stop] - offs[a]
                a = stop
                if b <= e:
                    out.append((count, b"".join(buf)))
                    buf, count, size = [], 0, 0
        else:
            buf.append(piece)
            count += 1
            size += len(piece)
            if size >= limit:
                out.append((count, b"".join(buf)))
                buf, count, size = [], 0, 0
    if count:
        out.append((count, b"".join(buf)))
    return out


def combine(crcs: list) -> int:
    """One CRC-32 for a namespace's parts, from theirs in order."""
    return zlib.crc32(struct.pack("<%dI" % len(crcs), *crcs))


def _read_exact(f, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise EOFError("the parent's input ended")  # the parent is gone, or stopped the fast path
    return data


def _read_feed(f) -> tuple:
    """(namespace index, range index, data) of the parent's next _FEED record."""
    j, r, size = _FEED.unpack(_read_exact(f, _FEED.size))
    return j, r, _read_exact(f, size)


def _read_fed(f, where: tuple = (_NONE, _NONE)) -> bytes:
    """The data of the parent's next _FEED record, which must be for where."""
    j, r, data = _read_feed(f)
    if (j, r) != where:
        raise EOFError("the parent's input is out of order")
    return data


class _Sender:
    """The child's output, written to the parent by a thread with up to AHEAD_BYTES queued: the child replays the next
    touched ranges while the parent still restores the untouched chunks before them, instead of waiting on a full pipe
    (64 KiB) for the parent to reach each range. A failed write (the parent is gone) is raised at the next send."""

    def __init__(self, fd: int, limit: int) -> None:
        self.out, self.limit = os.fdopen(fd, "wb", buffering=1 << 20), limit
        self.queue, self.queued, self.error = queue.SimpleQueue(), 0, None
        self.room = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def send(self, data: bytes) -> None:
        with self.room:
            while self.queued > self.limit and self.error is None:
                self.room.wait()
            if self.error is not None:
                raise self.error
            self.queued += len(data)
        self.queue.put(data)

    def close(self) -> None:
        """Every message written, then the output closed (raises what a write raised)."""
        self.queue.put(None)
        self.thread.join()
        try:
            self.out.close()
        except OSError:
            pass  # the write that failed already says why
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while True:
                data = self.queue.get()
                if data is None:
                    self.out.flush()
                    return
                self.out.write(data)
                with self.room:
                    self.queued -= len(data)
                    self.room.notify()
                if self.queue.empty():
                    self.out.flush()  # nothing more yet: the parent may be waiting for this
        except BaseException as e:  # pylint: disable=broad-except  # the main thread raises it
            with self.room:
                self.error = e
                self.room.notify_all()


def main() -> None:
    """The replay process (never returns). It reads the layout and pre-scans its parts of the window as they come
    (the parent scans its own meanwhile), sends which ranges they touch (or why the fast path cannot be taken), then
    takes the parent's pre-scan of its parts, puts each range's operations in the window's order (by part), and for
    each namespace in order replays each touched range (its base
    chunk's plaintext comes from the parent too) and sends it cut as virtual chunks are (about VIRTUAL_CHUNK_BYTES),
    then the namespace's totals."""
    code, out = 1, _Sender(1, AHEAD_BYTES)
    try:
        gc.disable()  # short-lived, and its objects form no cycles
        inp = os.fdopen(0, "rb", buffering=1 << 20)
        send = out.send
        manifest = bson.decode(_read_fed(inp))
        parts = {}  # part index -> its operations grouped by range: the child's odd parts, the parent's even ones
        while True:  # the child's parts of the window, as the parent reads the segments
            j, r, data = _read_feed(inp)
            if j == _NONE:
                break
            if j != _RECORDS:
                raise EOFError("the parent's input is out of order")
            groups, why = prescan(split_bson_docs(data), manifest)
            if groups is None:
                what = why.encode("utf-8")
                send(_MSG.pack(_FALLBACK, 0, 0, 0, len(what), 0) + what)
                out.close()
                code = 0
                return
            parts[r] = groups
        touched = sorted({jr for groups in parts.values() for jr in groups})
        pairs = struct.pack("<%dI" % (2 * len(touched)), *[x for jr in touched for x in jr])
        send(_MSG.pack(_TOUCHED, 0, 0, len(touched), len(pairs), 0) + pairs)
        while True:  # the parent's parts, pre-scanned by the parent
            j, r, data = _read_feed(inp)
            if j == _NONE:
                break
            if j != _PRESCANNED:
                raise EOFError("the parent's input is out of order")
            parts[r] = unpack_ops(data)
        groups = {}
        for k in sorted(parts):  # each range's operations in the window's order
            for jr, ops in parts[k].items():
                have = groups.get(jr)
                if have is None:
                    groups[jr] = ops
                else:
                    have.extend(ops)
        for j, n in enumerate(manifest["namespaces"]):
            chunks, entries = n["chunks"], []
            for r in range(len(chunks) + 1):
                ops = groups.get((j, r))
                if ops is None:
                    if r < len(chunks):
                        entries.append(chunks[r])
                    continue
                plain = _read_fed(inp, (j, r)) if r < len(chunks) else None  # the base chunk, from the parent
                for count, data in replay_parts(plain, ops):
                    crc = zlib.crc32(data)
                    send(_MSG.pack(_PART, j, r, count, len(data), crc))
                    send(data)
                    entries.append({"count": count, "bytes": len(data), "crc": crc})
                send(_MSG.pack(_RANGE_END, j, r, 0, 0, 0))
            send(_MSG.pack(_NS_END, j, 0, sum(c["count"] for c in entries), sum(c["bytes"] for c in entries),
                           combine([c["crc"] for c in entries if "crc" in c])))
        send(_MSG.pack(_DONE, 0, 0, 0, 0, 0))
        out.close()
        code = 0
    except BaseException as e:  # pylint: disable=broad-except  # reported by kind only: a message could hold data
        try:
            what = type(e).__name__.encode("ascii", "replace")
            out.send(_MSG.pack(_ERROR, 0, 0, 0, len(what), 0) + what)
            out.close()
        except BaseException:  # pylint: disable=broad-except  # the parent sees the pipe end
            pass
    finally:
        os._exit(code)  # pylint: disable=protected-access  # no interpreter teardown: nothing to clean up
