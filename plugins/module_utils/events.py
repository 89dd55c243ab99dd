# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Applying MongoDB change events to a head (no Ansible imports). PRIVATE to the collection.

Follows MongoDB's documented change-event contract (see the project's change-events
reference). Inserts and replaces store fullDocument's bytes as they are; deletes need only
the documentKey; updates splice updateDescription into the stored document at the raw BSON
level (only the elements on the updated paths are parsed), so every value keeps its exact
BSON type and bytes (int32/int64/double/-0.0/Decimal128/Timestamp/binary subtypes,
symbols, undefined, DBPointer) and untouched fields keep their order.

An update that cannot be replayed exactly (a document missing outside the initial-sync
catch-up window, a path that does not fit the stored document, a field name containing a
dot without disambiguatedPaths) is not guessed, and an update that adds several new fields
to one document is not trusted (their order is the server's choice, not in the event): the
document key goes to `recopy`, and the capture layer re-reads that document from the source,
as of the event's cluster time, in the same transaction. No head transaction commits a
document the daemon knows may differ from the source.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Callable

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import HeadError, HistoryLostError, NotApplicable, UncertainOrder
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.rawbson import (
    EMPTY_BSON, FIXED_SIZES, id_key_from_document, skip_value)

if TYPE_CHECKING:  # annotations only: applying events needs no head code
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.head import Writer

try:
    from bson import decode as bson_decode
    from bson import encode as bson_encode
    from bson.raw_bson import RawBSONDocument
    from bson.timestamp import Timestamp
    BSON_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    bson_decode = bson_encode = RawBSONDocument = Timestamp = None
    BSON_IMPORT_ERROR = e

APPLIED, SKIPPED, RECOPY, IGNORED = "applied", "skipped", "recopy", "ignored"
# {v: 2, key: {_id: 1}, name: "_id_"}
DEFAULT_ID_INDEX = (b".\x00\x00\x00\x10v\x00\x02\x00\x00\x00\x03key\x00\x0e\x00\x00\x00\x10_id\x00\x01\x00\x00\x00\x00"
                    b"\x02name\x00\x05\x00\x00\x00_id_\x00\x00")

# value size by BSON type for _find: >= 0 fixed, -1 int32-prefixed string, -2 self-sized, -3 other (rawbson.skip_value)
_FIXED_SIZE = [-3] * 256
for _t, _n in {**FIXED_SIZES, 0x02: -1, 0x0D: -1, 0x0E: -1, 0x03: -2, 0x04: -2, 0x0F: -2}.items():
    _FIXED_SIZE[_t] = _n
PENDING_MAX_BYTES = 64 << 20  # buffered document writes beyond this are written at once

_i32 = struct.Struct("<i")


# --- which namespaces a backup keeps, and what a resume token says ----------------------------------

EXCLUDED_DBS = ("admin", "config", "local")


def kept_collection(db: str, coll: str) -> bool:
    """Whether a backup keeps collection coll of database db: not admin, config, local, or system collections
    (but system.js)."""
    return db not in EXCLUDED_DBS and (not coll.startswith("system.") or coll == "system.js")


def keeps(db: str, ns: str | None) -> bool:
    """Applier's keep: whether a backup keeps namespace ns ("db.coll"), or database db when ns is None."""
    return kept_collection(db, ns.partition(".")[2] if ns else "")


def token_time(token_raw: bytes | None) -> tuple[int, int] | None:
    """The cluster time (t, i) a resume token (raw BSON {_data: ...}) stands for, or None when its format is unknown.

    mongod: _data is a hex KeyString whose first value is the event's timestamp (type byte 0x82, then 8 bytes
    big-endian: seconds, increment). SecantusDB: _data is the hex of a BSON document whose "t" is that timestamp.
    For an idle stream's post-batch token this is the time up to which the source has shown every event."""
    if token_raw is None:
        return None
    try:
        data = RawBSONDocument(bytes(token_raw)).get("_data")
        if not isinstance(data, str):
            return None
        blob = bytes.fromhex(data)
    except Exception:  # pylint: disable=broad-except  # an unknown format: the caller falls back
        return None
    if len(blob) >= 5 and _i32.unpack_from(blob)[0] == len(blob) and blob[-1:] == b"\x00":
        try:
            ts = RawBSONDocument(blob).get("t")
        except Exception:  # pylint: disable=broad-except
            ts = None
        if ts is not None and hasattr(ts, "inc"):
            return (ts.time, ts.inc)
    if len(blob) >= 9 and blob[0] == 0x82:
        return struct.unpack_from(">II", blob, 1)
    return None


# --- raw BSON element trees -------------------------------------------------------------------

def _malformed():
    return HeadError("A malformed BSON document (an element of negative length, or past the document's end) cannot be parsed.")


def parse_elements(raw: bytes) -> list:
    """[[name bytes, type, value bytes], ...] of a raw BSON document or array."""
    els, pos, end = [], 4, len(raw) - 1
    fixed, unpack, index = _FIXED_SIZE, _i32.unpack_from, raw.index
    while pos < end:
        t = raw[pos]
        ne = index(0, pos + 1)
        n = fixed[t]
        if n >= 0:
            vend = ne + 1 + n
        elif n == -1:
            vend = ne + 5 + unpack(raw, ne + 1)[0]
            if vend < ne + 6:  # a length below the least a value of its type takes (negative, say)
                raise _malformed()
        elif n == -2:
            vend = ne + 1 + unpack(raw, ne + 1)[0]
            if vend < ne + 6:  # a length below the least a value of its type takes (negative, say)
                raise _malformed()
        else:
            vend = skip_value(raw, t, ne + 1)
        if not pos < vend <= end:
            raise _malformed()
        els.append([raw[pos + 1:ne], t, raw[ne + 1:vend]])
        pos = vend
    return els


def build_document(elements: list) -> bytes:
    """Raw BSON bytes from [[name, type, value bytes], ...]."""
    body = b"".join(b"%c%s\x00%s" % (t, name, v) for name, t, v in elements)
    return _i32.pack(len(body) + 5) + body + b"\x00"


class _Overrun(ValueError):
    """A document's elements do not end exactly where its length prefix says."""


def _walk(buf, pos, end):
    """(element start, type, end of its name, end of its value) of each element of a document's body buf[pos:end];
    _Overrun (a ValueError) when the elements do not end exactly at end (a malformed document)."""
    unpack, fixed = _i32.unpack_from, _FIXED_SIZE
    while pos < end:
        t = buf[pos]
        ne = buf.index(0, pos + 1)
        n = fixed[t]
        if n >= 0:
            vend = ne + 1 + n
        elif n == -1:  # string-like: int32 length, then the bytes
            vend = ne + 5 + unpack(buf, ne + 1)[0]
            if vend < ne + 6:  # a length below the least a value of its type takes (negative, say)
                raise _Overrun()
        elif n == -2:  # document, array, code with scope: the int32 covers the whole value
            vend = ne + 1 + unpack(buf, ne + 1)[0]
            if vend < ne + 6:  # a length below the least a value of its type takes (negative, say)
                raise _Overrun()
        else:
            vend = skip_value(buf, t, ne + 1)
        if not pos < vend <= end:  # a negative length would walk backwards, an overlong one past the end
            raise _Overrun()
        yield pos, t, ne, vend
        pos = vend
    if pos != end:
        raise _Overrun()


def _find(buf, start, name=None, index=-1):
    """The element named name (bytes) or at position index of the document or array at buf[start] (of the head):
    (element start, type, value start, value end), or (None, element count, end position, None) when absent. Every
    element it reads must fit (else the head is damaged: HeadError), so a damaged document never reads as "absent"."""
    end = start + _i32.unpack_from(buf, start)[0] - 1
    i = 0
    try:
        for pos, t, ne, vend in _walk(buf, start + 4, end):
            if i == index or (name is not None and buf[pos + 1:ne] == name):
                return pos, t, ne + 1, vend
            i += 1
    except (ValueError, IndexError, struct.error):  # _Overrun, no name terminator, a length past the buffer
        raise _damaged() from None
    return None, i, end, None


def _names(buf, start):
    end = start + _i32.unpack_from(buf, start)[0] - 1
    try:
        return [bytes(buf[pos + 1:ne]) for pos, _t, ne, _vend in _walk(buf, start + 4, end)]
    except (ValueError, IndexError, struct.error):
        raise _damaged() from None


def _key(buf, start, is_array, comp, exact, rest):
    """(name, index) arguments of _find for one path component in the document or array at buf[start]."""
    if is_array:
        if isinstance(comp, int):
            return None, comp
        if not exact and comp.isdecimal():
            return None, int(comp)
        raise NotApplicable("a field name on an array")
    if isinstance(comp, int):
        raise NotApplicable("an array index on a document")
    if not exact and rest:
        # a literal "a.b" field may be what the path means: ambiguous without disambiguatedPaths
        node = buf[start:start + _i32.unpack_from(buf, start)[0]]
        candidates = [".".join([comp] + rest[:k]).encode() for k in range(1, len(rest) + 1)]
        if any(c + b"\x00" in node for c in candidates) and set(candidates) & set(_names(buf, start)):
            raise NotApplicable("a dotted field name without disambiguatedPaths")
    return comp.encode(), -1


def _descend(buf, comps, exact):
    """Follow comps[:-1] from the root: ([starts of every enclosing document/array], parent start, parent is an array)."""
    start, is_array, starts = 0, False, [0]
    for i, comp in enumerate(comps[:-1]):
        el = _find(buf, start, *_key(buf, start, is_array, comp, exact, comps[i + 1:]))
        if el[0] is None:
            raise NotApplicable("a missing parent on an update path")
        if el[1] not in (0x03, 0x04):
            raise NotApplicable("a parent on an update path is not a document or an array")
        start, is_array = el[2], el[1] == 0x04
        starts.append(start)
    return starts, start, is_array


def _resize(buf, starts, delta):
    """Add delta to the length prefix of every enclosing document/array."""
    for a in starts:
        _i32.pack_into(buf, a, _i32.unpack_from(buf, a)[0] + delta)


def _set(buf, comps, exact, t, value):
    """Set one path; True when it added a new field to a document (appended at its end)."""
    starts, start, is_array = _descend(buf, comps, exact)
    name, index = _key(buf, start, is_array, comps[-1], exact, [])
    el_start, et, vs, ve = _find(buf, start, name, index)
    if el_start is not None:  # in place: the field keeps its position
        buf[el_start] = t
        buf[vs:ve] = value
        _resize(buf, starts, len(value) - (ve - vs))
        return False
    count, end = et, vs
    if is_array:  # pad with null up to the index, as mongod's diff applier does
        new = b"".join(b"\x0a%d\x00" % j for j in range(count, index)) + b"%c%d\x00" % (t, index) + value
    else:
        new = b"%c%s\x00" % (t, name) + value
    buf[end:end] = new
    _resize(buf, starts, len(new))
    return not is_array


def _remove(buf, comps, exact):
    try:
        starts, start, is_array = _descend(buf, comps, exact)
    except NotApplicable:
        return
    if is_array:
        raise NotApplicable("removedFields on an array element")
    last = comps[-1]
    if not isinstance(last, str):
        return
    name = last.encode()
    while True:
        el_start, _t, _vs, ve = _find(buf, start, name)
        if el_start is None:
            return
        del buf[el_start:ve]
        _resize(buf, starts, el_start - ve)


def _truncate(buf, comps, exact, size):
    starts, start, is_array = _descend(buf, comps, exact)
    el_start, t, vs, _ve = _find(buf, start, *_key(buf, start, is_array, comps[-1], exact, []))
    if el_start is None or t != 0x04:
        raise NotApplicable("truncatedArrays on something that is not an array")
    cut, _t, _vs, _ve = _find(buf, vs, None, size)
    if cut is not None:
        end = vs + _i32.unpack_from(buf, vs)[0] - 1
        del buf[cut:end]
        _resize(buf, starts + [vs], cut - end)


def _components(path, disambiguated):
    comps = disambiguated.get(path) if disambiguated else None
    if comps is not None:
        return [c if isinstance(c, int) else str(c) for c in comps], True
    return path.split("."), False


_PLAIN_NAMES = {}  # field name -> whether it is a plain top-level name (_set_top_level; bounded cache)


def _plain_name(name):
    """Whether updatedFields' name names a top-level field: not empty, no dot, UTF-8."""
    ok = _PLAIN_NAMES.get(name)
    if ok is None:
        ok = bool(name) and b"." not in name
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            ok = False
        if len(_PLAIN_NAMES) > 1000:
            _PLAIN_NAMES.clear()
        _PLAIN_NAMES[name] = ok
    return ok


def _damaged():
    """The error of a head document whose elements do not fit it: the capture stops (no document written from it)."""
    return HeadError("A document in the head is damaged (its BSON elements do not fit its length prefix): the head cannot "
                     "be trusted; resync the job (kmipbackup.mongodb.backup_snapshot with action=resync).")


def _set_top_level(doc, updated):
    """What _apply_paths gives for updatedFields updated (raw BSON) when it only names top-level fields (no dot), with
    nothing removed or truncated, from one scan of the document instead of one per field; None when it does not apply
    (the caller takes _apply_paths, which decides). The scans are _walk inlined: this runs once per replayed update."""
    fixed, unpack, plain = _FIXED_SIZE, _i32.unpack_from, _PLAIN_NAMES
    want = {}  # name -> its element in updated (type, name and value: what replaces the stored element)
    index, pos, end = updated.index, 4, len(updated) - 1
    while pos < end:
        t = updated[pos]
        ne = index(0, pos + 1)
        n = fixed[t]
        if n >= 0:
            vend = ne + 1 + n
        elif n == -2:
            vend = ne + 1 + unpack(updated, ne + 1)[0]
            if vend < ne + 6:  # a length below the least a value of its type takes (negative, say)
                raise _malformed()
        elif n == -1:
            vend = ne + 5 + unpack(updated, ne + 1)[0]
            if vend < ne + 6:  # a length below the least a value of its type takes (negative, say)
                raise _malformed()
        else:
            vend = skip_value(updated, t, ne + 1)
        if not pos < vend <= end:
            raise _malformed()
        name = updated[pos + 1:ne]
        ok = plain.get(name)
        if ok is None:
            ok = _plain_name(name)
        if not ok or name in want:
            return None
        if name == b"_id":
            raise NotApplicable("an update of _id")
        want[name] = updated[pos:vend]
        pos = vend
    # one scan of the stored document: the first element of each wanted name is replaced where it stands. Every element
    # it reads must fit the document (a damaged head stops the capture, see _damaged); it stops at the last one it needs
    out, prev, grow = [], 4, 0
    index, pos, end = doc.index, 4, len(doc) - 1
    try:
        while pos < end:
            t = doc[pos]
            ne = index(0, pos + 1)
            n = fixed[t]
            if n >= 0:
                vend = ne + 1 + n
            elif n == -2:
                vend = ne + 1 + unpack(doc, ne + 1)[0]
                if vend < ne + 6:  # a length below the least a value of its type takes (negative, say)
                    raise _damaged()
            elif n == -1:
                vend = ne + 5 + unpack(doc, ne + 1)[0]
                if vend < ne + 6:  # a length below the least a value of its type takes (negative, say)
                    raise _damaged()
            else:
                vend = skip_value(doc, t, ne + 1)
            if not pos < vend <= end:
                raise _damaged()
            name = doc[pos + 1:ne]
            if name in want:
                el = want.pop(name)
                out += (doc[prev:pos], el)
                grow += len(el) - (vend - pos)
                prev = vend
                if not want:
                    break
            pos = vend
        else:
            if pos != end:
                raise _damaged()
    except (ValueError, IndexError, struct.error):
        raise _damaged() from None
    if len(want) > 1:
        raise UncertainOrder()  # several new fields: their order is the server's choice
    for el in want.values():  # a new field: appended
        grow += len(el)
    out += (doc[prev:end], *want.values(), b"\x00")
    return _i32.pack(end + 1 + grow) + b"".join(out)


_EMPTY_REMOVED_TRUNCATED = b"\x04removedFields\x00\x05\x00\x00\x00\x00\x04truncatedArrays\x00\x05\x00\x00\x00\x00\x00"


def apply_update_description(doc_raw: bytes, ud_raw: bytes) -> bytes:
    """The stored document doc_raw with updateDescription ud_raw (raw BSON) applied; raises NotApplicable.

    Works on the bytes: only the elements on the updated paths are located, values are spliced in
    and the enclosing length prefixes adjusted, so everything else keeps its bytes and order."""
    if len(doc_raw) < 5 or _i32.unpack_from(doc_raw, 0)[0] != len(doc_raw) or doc_raw[-1] != 0:
        raise _damaged()
    n = len(ud_raw)
    if (ud_raw[4:19] == b"\x03updatedFields\x00" and ud_raw.endswith(_EMPTY_REMOVED_TRUNCATED)
            and 19 + _i32.unpack_from(ud_raw, 19)[0] == n - len(_EMPTY_REMOVED_TRUNCATED) and _i32.unpack_from(ud_raw, 0)[0] == n):
        # what mongod sends for $set of fields: {updatedFields: {...}, removedFields: [], truncatedArrays: []}, found by
        # its bytes (parse_elements would give the same three elements)
        updated = ud_raw[19:n - len(_EMPTY_REMOVED_TRUNCATED)]
        if len(updated) > 5:
            new = _set_top_level(doc_raw, updated)
            if new is not None:
                return new
        return _apply_paths(doc_raw, updated, None, None, None)
    updated = removed = truncated = disambiguated = None
    for name, _t, v in parse_elements(ud_raw):
        if name == b"updatedFields":
            updated = v
        elif name == b"removedFields":
            removed = v
        elif name == b"truncatedArrays":
            truncated = v
        elif name == b"disambiguatedPaths" and len(v) > 5:
            disambiguated = bson_decode(v)
    if (updated and len(updated) > 5 and disambiguated is None and not (removed and len(removed) > 5)
            and not (truncated and len(truncated) > 5)):
        new = _set_top_level(doc_raw, updated)
        if new is not None:
            return new
    return _apply_paths(doc_raw, updated, removed, truncated, disambiguated)


def _apply_paths(doc_raw, updated, removed, truncated, disambiguated):
    """apply_update_description, path by path."""
    buf = bytearray(doc_raw)
    if truncated and len(truncated) > 5:
        for item in bson_decode(truncated).values():
            comps, exact = _components(item["field"], disambiguated)
            _truncate(buf, comps, exact, int(item["newSize"]))
    if removed and len(removed) > 5:
        for path in bson_decode(removed).values():
            comps, exact = _components(path, disambiguated)
            _remove(buf, comps, exact)
    if updated and len(updated) > 5:
        grown = set()  # parents (paths) that got a new field
        uncertain = False
        for name, t, v in parse_elements(updated):
            comps, exact = _components(name.decode("utf-8"), disambiguated)
            if comps and comps[0] == "_id":
                raise NotApplicable("an update of _id")
            if _set(buf, comps, exact, t, v):
                parent = tuple(comps[:-1])
                uncertain = uncertain or parent in grown
                grown.add(parent)
        if uncertain:
            raise UncertainOrder()
    return bytes(buf)


# --- events -----------------------------------------------------------------------------------

def _raw(value):
    """Raw bytes of a sub-document of an event (RawBSONDocument, bytes or mapping)."""
    if isinstance(value, RawBSONDocument):
        raw = value.raw
        return raw if type(raw) is bytes else bytes(raw)  # pylint: disable=unidiomatic-typecheck
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return bson_encode(value)


def _ns(value):
    if value is None:
        return None, None
    db, coll = value.get("db"), value.get("coll")
    return db, ("%s.%s" % (db, coll) if coll is not None else None)


def _uuid(ev):
    u = ev.get("collectionUUID")
    return bytes(u) if u is not None else None


def _rename_target(ev):
    return ev.get("to") or (ev.get("operationDescription") or {}).get("to")


_FAST_OPS = {b"insert": "insert", b"replace": "replace", b"update": "update", b"delete": "delete"}
_FAST_FIELDS = (b"operationType", b"ns", b"documentKey", b"fullDocument", b"updateDescription", b"clusterTime")
_OP, _NS, _KEY, _FULL, _DESC, _CT = range(6)  # _event_fields' slots
_FAST_SLOTS = {name: i for i, name in enumerate(_FAST_FIELDS)}


def _event_fields(raw: bytes) -> list | None:
    """[(type, value start, value end) or None] of the top-level fields of event raw that Applier.apply_raw reads, in
    _FAST_FIELDS order, from one scan that decodes nothing; None when the scan cannot be trusted (a name seen twice, a
    malformed event): the caller then takes the decoding path. _walk inlined: this runs once per replayed event."""
    end = len(raw) - 1
    if end < 4 or _i32.unpack_from(raw, 0)[0] != end + 1 or raw[end] != 0:
        return None
    out, slots, fixed, unpack, index, pos = [None] * 6, _FAST_SLOTS, _FIXED_SIZE, _i32.unpack_from, raw.index, 4
    try:
        while pos < end:
            ne = index(0, pos + 1)
            n = fixed[raw[pos]]
            if n == -2:  # a document first: most of an event's fields are
                vend = ne + 1 + unpack(raw, ne + 1)[0]
                if vend < ne + 6:
                    return None
            elif n >= 0:
                vend = ne + 1 + n
            elif n == -1:
                vend = ne + 5 + unpack(raw, ne + 1)[0]
                if vend < ne + 6:
                    return None
            else:
                vend = skip_value(raw, raw[pos], ne + 1)
                if vend <= pos:
                    return None
            slot = slots.get(raw[pos + 1:ne])
            if slot is not None:
                if out[slot] is not None:
                    return None
                out[slot] = (raw[pos], ne + 1, vend)
            pos = vend
    except (ValueError, struct.error, HeadError):
        return None
    return out if pos == end else None


def _timestamp(raw, field):
    """The Timestamp at field (type, start, end) of raw, as a decoder gives it (None when absent)."""
    if field is None:
        return None
    if field[0] != 0x11:
        return RawBSONDocument(raw).get("clusterTime")
    inc, t = struct.unpack_from("<II", raw, field[1])
    return Timestamp(t, inc)


def merge_fragments(fragments: list) -> bytes:
    """One event from the fragments of a split event ($changeStreamSplitLargeEvent), raw BSON bytes."""
    seen, out = set(), []
    for frag in fragments:
        for el in parse_elements(_raw(frag)):
            if el[0] != b"splitEvent" and el[0] not in seen:
                seen.add(el[0])
                out.append(el)
    return RawBSONDocument(build_document(out))


def options_from_create(op_desc_raw: bytes) -> bytes:
    """Collection options (as listCollections shows them) from a create event's operationDescription."""
    out = []
    for name, t, v in parse_elements(op_desc_raw):
        if name == b"idIndex":
            continue
        out.append([b"pipeline" if name == b"viewPipeline" else name, t, v])  # the stand-in's name for a view's pipeline
    return build_document(out)


def _index_name(spec_raw):
    for name, t, v in parse_elements(spec_raw):
        if name == b"name" and t == 0x02:
            return v[4:-1]
    return None


class CloneRepair:
    """What an initial sync's clone may have copied wrong, learnt from the DDL events its catch-up applies.

    The clone copies by name, after the stream's start: a namespace renamed away and another created
    under its name before the clone reached it leaves the head with the wrong incarnation's documents
    under that name, and replaying the rename moves them (or nothing) to the target. Documents of a
    namespace created, or emptied by a drop, after the stream's start all come through the stream, so
    such a namespace is exact from that event on; a rename moves exactness with the documents. A rename
    from a namespace that is not exact leaves its target to be re-cloned (`reclone`).
    scope: the namespaces whose head content may be ahead of the stream (None: all, the first round).
    """

    def __init__(self, scope: set | None = None, reclone: tuple = ()) -> None:
        self.scope = scope
        self.exact = set()
        self.reclone = set(reclone)

    def is_exact(self, ns: str) -> bool:
        return ns in self.exact or (self.scope is not None and ns not in self.scope)

    def _mark(self, ns, exact):
        (self.exact.add if exact else self.exact.discard)(ns)
        (self.reclone.discard if exact else self.reclone.add)(ns)

    def ddl(self, w: Writer, op: str, ev: RawBSONDocument | dict) -> None:
        """Before a DDL event is applied."""
        db, ns = _ns(ev["ns"])
        if op == "rename":
            to = _ns(_rename_target(ev))[1]
            self._mark(to, self.is_exact(ns))
            self._mark(ns, True)
        elif op in ("create", "drop"):
            self._mark(ns, True)
        elif op == "dropDatabase":
            for n in w.namespaces():
                if n["ns"].startswith(db + "."):
                    self._mark(n["ns"], True)


class Applier:
    """Applies change events inside a head write transaction.

    refresh(ns) -> None when ns no longer exists at the source, else {"options": raw,
    "indexes": [raw], "uuid": bytes or None}: re-reads what DDL events may not carry in full
    (the stand-in drops unique/sparse/TTL/partial from index events; collMod details).
    keep(db, ns) -> whether the backup keeps namespace ns ("db.coll", None for a whole
    database): events on other namespaces are ignored. mongod's cluster-wide stream never
    shows admin, config, local or system collections; the stand-in shows them all, and
    applying them would put namespaces in the head that the clone and verify() leave out.
    A rename out of the kept namespaces is a drop.
    After apply(), `recopy` holds (ns, documentKey raw, cluster time) triples the caller must
    re-read from the source as of that cluster time (upsert, or delete when gone) before
    committing, after flush().
    """

    def __init__(self, refresh: Callable | None = None, keep: Callable | None = None) -> None:
        self.refresh = refresh
        self.keep = keep
        self.recopy = []
        self.counts = {}
        self._ns_cache = {}
        self._fast_ns = {}  # raw bytes of an event's ns -> ("db.coll", kept): apply_raw
        self._w = None
        self._pending = {}  # {ns: {id_key: raw document}} written in this transaction, not yet in the head
        self._pending_bytes = 0
        self.repair = None  # a CloneRepair while an initial sync catches up

    def _count(self, outcome):
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        return outcome

    def _ns(self, value):
        """(db, "db.coll" or None) of an event's ns, cached by its raw bytes."""
        key = value.raw if isinstance(value, RawBSONDocument) else None
        hit = self._ns_cache.get(key) if key is not None else None
        if hit is None:
            hit = _ns(value)
            if key is not None:
                if len(self._ns_cache) > 10000:
                    self._ns_cache.clear()
                self._ns_cache[key] = hit
        return hit

    def _buffer(self, w):
        """This transaction's buffer of document writes ({ns: {id_key: raw}}), flushed (one statement batch per namespace)
        before COMMIT."""
        if self._w is not w:  # a new transaction: what a rolled-back one buffered is gone with it
            self._w, self._pending, self._pending_bytes = w, {}, 0
            w.before_commit.append(lambda: self._w is w and self.flush())
        return self._pending

    def flush(self) -> None:
        """Write the buffered documents into the current transaction (before DDL, re-copies and COMMIT)."""
        pending = self._pending
        if not pending:
            return
        self._pending, self._pending_bytes = {}, 0
        for ns, docs in pending.items():
            if docs:  # in key order: B-tree pages are written once each, not revisited at random
                self._w.upsert_many(ns, sorted(docs.items()))

    def _put(self, pending, ns, ik, doc):
        docs = pending.get(ns)
        if docs is None:
            docs = pending[ns] = {}
        docs[ik] = doc
        self._pending_bytes += len(doc)
        if self._pending_bytes > PENDING_MAX_BYTES:
            self.flush()

    def apply(self, w: Writer, ev: RawBSONDocument | dict, catch_up: bool = False) -> str:
        """Apply one event (RawBSONDocument or mapping) with writer w; returns applied|skipped|recopy|ignored.

        Document writes are buffered and written, one statement batch per namespace, before the
        transaction commits (Writer.before_commit), before a DDL event and by flush()."""
        op = ev["operationType"]
        if self.keep is not None and op != "invalidate" and not self._kept(ev, op):
            return self._count(IGNORED)
        pending = self._buffer(w)
        if op == "update":
            ns, dkey = self._ns(ev["ns"])[1], _raw(ev["documentKey"])
            return self._count(self._update(w, pending, ns, dkey, lambda: _raw(ev["updateDescription"]), catch_up,
                                            lambda: ev.get("clusterTime")))
        if op in ("insert", "replace"):
            ns = self._ns(ev["ns"])[1]
            full = _raw(ev["fullDocument"])
            if not w.has_namespace(ns):
                self._implicit_create(w, ns, _uuid(ev))
            self._put(pending, ns, id_key_from_document(full), full)
            return self._count(APPLIED)
        if op == "delete":
            ns = self._ns(ev["ns"])[1]
            ik = id_key_from_document(_raw(ev["documentKey"]))
            docs = pending.get(ns)
            if docs:
                docs.pop(ik, None)
            w.delete(ns, ik)
            return self._count(APPLIED)
        handler = getattr(self, "_ddl_" + op, None)
        if handler is None:
            if op == "invalidate":
                raise HistoryLostError("The change stream was invalidated: a new initial sync is needed, the daemon starts one.")
            return self._count(IGNORED)  # shardCollection, refine/reshard...: nothing to keep in the head
        self.flush()
        if self.repair is not None:
            self.repair.ddl(w, op, ev)
        return self._count(handler(w, ev, catch_up))

    def apply_raw(self, w: Writer, raw: bytes, catch_up: bool = False) -> str:
        """apply() of an event given as raw BSON bytes, with the same outcome, head writes and recopy: inserts, replaces,
        updates and deletes in a namespace the head has are read straight from the bytes (one scan of the top level;
        the namespace and keep() cached by the bytes of the event's ns, so keep must depend on its arguments only);
        every other event goes through apply(RawBSONDocument(raw)). Inlined where apply() calls helpers: this runs once
        per replayed event."""
        if type(raw) is not bytes:  # pylint: disable=unidiomatic-typecheck
            raw = bytes(raw)
        f = _event_fields(raw)
        op = f[_OP] if f else None
        op = _FAST_OPS.get(raw[op[1] + 4:op[2] - 1]) if op is not None and op[0] == 0x02 else None
        nsf = f[_NS] if op else None
        if nsf is None or nsf[0] != 0x03:
            return self.apply(w, RawBSONDocument(raw), catch_up)
        ns_raw = raw[nsf[1]:nsf[2]]
        hit = self._fast_ns.get(ns_raw)
        if hit is None:
            db, ns = _ns(RawBSONDocument(ns_raw))
            if ns is None:
                return self.apply(w, RawBSONDocument(raw), catch_up)
            hit = (ns, self.keep is None or bool(self.keep(db, ns)))
            if len(self._fast_ns) > 10000:
                self._fast_ns.clear()
            self._fast_ns[ns_raw] = hit
        ns, kept = hit
        if not kept:
            return self._count(IGNORED)
        if op == "update":
            key, desc = f[_KEY], f[_DESC]
            if desc is None or desc[0] != 0x03:
                key = None
        else:
            key = f[_FULL if op != "delete" else _KEY]
        if key is None or key[0] != 0x03 or not w.has_namespace(ns):
            return self.apply(w, RawBSONDocument(raw), catch_up)  # rare (implicit creation) or malformed: as apply() does
        pending = self._pending if self._w is w else self._buffer(w)
        docs = pending.get(ns)
        if docs is None:
            docs = pending[ns] = {}
        doc = raw[key[1]:key[2]]
        ik = id_key_from_document(doc)
        if op == "update":  # _update inlined
            stored = docs.get(ik)
            if stored is None:
                stored = w.get(ns, ik)
            try:
                if stored is None:
                    raise NotApplicable("a missing document")
                new = apply_update_description(stored, raw[desc[1]:desc[2]])
            except (NotApplicable, UncertainOrder) as e:
                outcome = self._not_applied(docs, ns, ik, doc, e, catch_up, _timestamp(raw, f[_CT]))
            else:
                docs[ik] = new
                self._pending_bytes += len(new)
                outcome = APPLIED
        elif op == "delete":
            docs.pop(ik, None)
            w.delete(ns, ik)
            outcome = APPLIED
        else:
            docs[ik] = doc
            self._pending_bytes += len(doc)
            outcome = APPLIED
        if self._pending_bytes > PENDING_MAX_BYTES:
            self.flush()
        counts = self.counts  # _count inlined
        counts[outcome] = counts.get(outcome, 0) + 1
        return outcome

    def _kept(self, ev, op):
        if self.keep(*self._ns(ev["ns"])):
            return True
        return op == "rename" and self.keep(*_ns(_rename_target(ev)))  # into a kept namespace: what the refresh finds

    def _update(self, w, pending, ns, dkey, description, catch_up, cluster_time):
        """An update of the document with documentKey dkey (raw) in ns; description() and cluster_time() give the
        event's updateDescription (raw) and clusterTime when they are needed."""
        ik = id_key_from_document(dkey)
        docs = pending.get(ns)
        stored = docs.get(ik) if docs else None
        if stored is None:
            stored = w.get(ns, ik)
        try:
            if stored is None:
                raise NotApplicable("a missing document")
            new = apply_update_description(stored, description())
        except (NotApplicable, UncertainOrder) as e:
            return self._not_applied(docs, ns, ik, dkey, e, catch_up, cluster_time())
        self._put(pending, ns, ik, new)
        return APPLIED

    def _not_applied(self, docs, ns, ik, dkey, e, catch_up, cluster_time):
        """The outcome of an update that does not apply (e): skipped in an initial sync's catch-up (the clone read a
        later version; later events bring it on), else re-copied from the source (the caller re-reads it)."""
        if catch_up and isinstance(e, NotApplicable):
            return SKIPPED
        if docs:
            docs.pop(ik, None)
        self.recopy.append((ns, dkey, cluster_time))
        return RECOPY

    def _refresh_into(self, w, ns, uuid=None):
        if self.refresh is None:
            return False
        info = self.refresh(ns)
        if info is None:
            return False
        w.create_namespace(ns, info["options"], uuid=info.get("uuid") or uuid, indexes=info["indexes"])
        return True

    def _implicit_create(self, w, ns, uuid):
        if not self._refresh_into(w, ns, uuid):
            w.create_namespace(ns, EMPTY_BSON, uuid=uuid, indexes=[DEFAULT_ID_INDEX])

    def _ddl_create(self, w, ev, catch_up):
        db, ns = _ns(ev["ns"])
        desc = _raw(ev.get("operationDescription") or {})
        id_index = [v for name, t, v in parse_elements(desc) if name == b"idIndex"]
        if catch_up:  # created after the stream's start: what the clone copied under this name is a later incarnation's
            w.drop_namespace(ns)
        w.create_namespace(ns, options_from_create(desc), uuid=_uuid(ev), indexes=id_index if w.namespace(ns) is None else None)
        self._refresh_into(w, ns, _uuid(ev))
        return APPLIED

    def _ddl_drop(self, w, ev, catch_up):
        w.drop_namespace(_ns(ev["ns"])[1])
        return APPLIED

    def _ddl_dropDatabase(self, w, ev, catch_up):
        w.drop_database(_ns(ev["ns"])[0])
        return APPLIED

    def _ddl_rename(self, w, ev, catch_up):
        ns = _ns(ev["ns"])[1]
        to_db, to_ns = _ns(_rename_target(ev))
        if self.keep is not None and not self.keep(to_db, to_ns):
            w.drop_namespace(ns)  # out of the backup's namespaces
            return APPLIED
        if w.rename(ns, to_ns, drop_target=True):
            self._refresh_into(w, to_ns)  # index events may have been applied without their full specs
            return APPLIED
        return SKIPPED  # already applied (catch-up) or never seen: the target is what the clone/refresh gave

    def _ddl_createIndexes(self, w, ev, catch_up):
        ns = _ns(ev["ns"])[1]
        if self._refresh_into(w, ns, _uuid(ev)):
            return APPLIED
        current = (w.namespace(ns) or {}).get("indexes", [])
        new = [_raw(s) for s in (ev.get("operationDescription") or {}).get("indexes", [])]
        names = {_index_name(s) for s in new}
        w.set_indexes(ns, [s for s in current if _index_name(s) not in names] + new)
        return APPLIED

    def _ddl_dropIndexes(self, w, ev, catch_up):
        ns = _ns(ev["ns"])[1]
        if self._refresh_into(w, ns, _uuid(ev)):
            return APPLIED
        if not w.has_namespace(ns):
            return SKIPPED
        names = {_index_name(_raw(s)) for s in (ev.get("operationDescription") or {}).get("indexes", [])}
        w.set_indexes(ns, [s for s in w.namespace(ns)["indexes"] if _index_name(s) not in names])
        return APPLIED

    def _ddl_modify(self, w, ev, catch_up):
        ns = _ns(ev["ns"])[1]
        if self._refresh_into(w, ns, _uuid(ev)):
            return APPLIED
        if not w.has_namespace(ns):
            return SKIPPED
        changes = [el for el in parse_elements(_raw(ev.get("operationDescription") or {})) if el[0] != b"index"]
        options = parse_elements(w.namespace(ns)["options"])
        for name, t, v in changes:
            for el in options:
                if el[0] == name:
                    el[1], el[2] = t, v
                    break
            else:
                options.append([name, t, v])
        w.set_options(ns, build_document(options))
        return APPLIED
