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
dot without disambiguatedPaths) is not guessed: the document key goes to `recopy`, and
the capture layer re-reads that document from the source in the same transaction.
"""
from __future__ import annotations

import struct

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import HistoryLostError
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.head import (
    _skip, id_key_from_document, EMPTY_BSON)

try:
    from bson import decode as bson_decode
    from bson import encode as bson_encode
    from bson.raw_bson import RawBSONDocument
    BSON_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    bson_decode = bson_encode = RawBSONDocument = None
    BSON_IMPORT_ERROR = e

APPLIED, SKIPPED, RECOPY, IGNORED = "applied", "skipped", "recopy", "ignored"
DEFAULT_ID_INDEX = b".\x00\x00\x00\x10v\x00\x02\x00\x00\x00\x03key\x00\x0e\x00\x00\x00\x10_id\x00\x01\x00\x00\x00\x00\x02name\x00\x05\x00\x00\x00_id_\x00\x00"  # {v: 2, key: {_id: 1}, name: "_id_"}

_i32 = struct.Struct("<i")


class NotApplicable(Exception):
    """The update does not fit the stored document: re-copy it instead of guessing."""


# --- raw BSON element trees -------------------------------------------------------------------

def parse_elements(raw):
    """[[name bytes, type, value bytes], ...] of a raw BSON document or array."""
    els, pos, end = [], 4, len(raw) - 1
    while pos < end:
        t = raw[pos]
        ne = raw.index(b"\x00", pos + 1)
        vend = _skip(raw, t, ne + 1)
        els.append([raw[pos + 1:ne], t, raw[ne + 1:vend]])
        pos = vend
    return els


def build_document(elements):
    """Raw BSON bytes from [[name, type, value], ...] (values: bytes or _Node)."""
    parts = []
    for name, t, v in elements:
        if isinstance(v, _Node):
            v = v.encode()
        parts.append(b"%c%s\x00%s" % (t, name, v))
    body = b"".join(parts)
    return _i32.pack(len(body) + 5) + body + b"\x00"


class _Node:
    """A document (is_array False) or array whose elements are parsed; children stay raw until touched."""
    __slots__ = ("els", "is_array")

    def __init__(self, raw, is_array):
        self.els = parse_elements(raw)
        self.is_array = is_array

    def encode(self):
        return build_document(self.els)

    def find(self, name):
        for el in self.els:
            if el[0] == name:
                return el
        return None

    def child(self, el):
        """The _Node of element el when it is a document or array, else None."""
        if isinstance(el[2], _Node):
            return el[2]
        if el[1] in (0x03, 0x04):
            el[2] = _Node(el[2], el[1] == 0x04)
            return el[2]
        return None


def _components(path, disambiguated):
    comps = disambiguated.get(path) if disambiguated else None
    if comps is not None:
        return [c if isinstance(c, int) else str(c) for c in comps], True
    return path.split("."), False


def _step(node, comp, exact, rest):
    """The element of node for one path component (None when absent)."""
    if node.is_array:
        if isinstance(comp, int):
            idx = comp
        elif not exact and comp.isdigit():
            idx = int(comp)
        else:
            raise NotApplicable("a field name on an array")
        return node.els[idx] if idx < len(node.els) else None, idx
    if isinstance(comp, int):
        raise NotApplicable("an array index on a document")
    name = comp.encode()
    if not exact and rest:
        dotted = [el[0] for el in node.els if b"." in el[0]]
        if dotted:  # a literal "a.b" field may be what the path means: ambiguous without disambiguatedPaths
            for k in range(1, len(rest) + 1):
                if ".".join([comp] + [str(r) for r in rest[:k]]).encode() in dotted:
                    raise NotApplicable("a dotted field name without disambiguatedPaths")
    return node.find(name), name


def _walk(root, comps, exact):
    """The parent _Node of the last component and the last component's key (index or name)."""
    node = root
    for i, comp in enumerate(comps[:-1]):
        el, _ = _step(node, comp, exact, comps[i + 1:])
        if el is None:
            raise NotApplicable("a missing parent on an update path")
        child = node.child(el)
        if child is None:
            raise NotApplicable("a parent on an update path is not a document or an array")
        node = child
    return node, comps[-1]


def _set(root, comps, exact, t, value):
    parent, last = _walk(root, comps, exact)
    el, key = _step(parent, last, exact, [])
    if el is not None:
        el[1], el[2] = t, value  # in place: the field keeps its position
    elif parent.is_array:
        while len(parent.els) < key:  # pad with null, as mongod's diff applier does
            parent.els.append([str(len(parent.els)).encode(), 0x0A, b""])
        parent.els.append([str(key).encode(), t, value])
    else:
        parent.els.append([key, t, value])


def _remove(root, comps, exact):
    try:
        parent, last = _walk(root, comps, exact)
    except NotApplicable:
        return
    if parent.is_array:
        raise NotApplicable("removedFields on an array element")
    name = last.encode() if isinstance(last, str) else None
    parent.els = [el for el in parent.els if el[0] != name]


def _truncate(root, comps, exact, size):
    parent, last = _walk(root, comps, exact)
    el, _ = _step(parent, last, exact, [])
    arr = parent.child(el) if el is not None else None
    if arr is None or not arr.is_array:
        raise NotApplicable("truncatedArrays on something that is not an array")
    del arr.els[size:]


def apply_update_description(doc_raw, ud_raw):
    """The stored document doc_raw with updateDescription ud_raw (raw BSON) applied; raises NotApplicable."""
    updated = removed = truncated = disambiguated = None
    for name, t, v in parse_elements(ud_raw):
        if name == b"updatedFields":
            updated = v
        elif name == b"removedFields":
            removed = v
        elif name == b"truncatedArrays":
            truncated = v
        elif name == b"disambiguatedPaths":
            disambiguated = bson_decode(v)
    root = _Node(doc_raw, False)
    if truncated and len(truncated) > 5:
        for item in bson_decode(truncated).values():
            comps, exact = _components(item["field"], disambiguated)
            _truncate(root, comps, exact, int(item["newSize"]))
    if removed and len(removed) > 5:
        for path in bson_decode(removed).values():
            comps, exact = _components(path, disambiguated)
            _remove(root, comps, exact)
    if updated and len(updated) > 5:
        for name, t, v in parse_elements(updated):
            comps, exact = _components(name.decode("utf-8"), disambiguated)
            if comps and comps[0] == "_id":
                raise NotApplicable("an update of _id")
            _set(root, comps, exact, t, v)
    return root.encode()


# --- events -----------------------------------------------------------------------------------

def _raw(value):
    """Raw bytes of a sub-document of an event (RawBSONDocument, bytes or mapping)."""
    if isinstance(value, RawBSONDocument):
        raw = value.raw
        return raw if type(raw) is bytes else bytes(raw)
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


def merge_fragments(fragments):
    """One event from the fragments of a split event ($changeStreamSplitLargeEvent), raw BSON bytes."""
    seen, out = set(), []
    for frag in fragments:
        for el in parse_elements(_raw(frag)):
            if el[0] != b"splitEvent" and el[0] not in seen:
                seen.add(el[0])
                out.append(el)
    return RawBSONDocument(build_document(out))


def options_from_create(op_desc_raw):
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


class Applier:
    """Applies change events inside a head write transaction.

    refresh(ns) -> None when ns no longer exists at the source, else {"options": raw,
    "indexes": [raw], "uuid": bytes or None}: re-reads what DDL events may not carry in full
    (the stand-in drops unique/sparse/TTL/partial from index events; collMod details).
    After apply(), `recopy` holds (ns, documentKey raw) pairs the caller must re-read from
    the source (upsert, or delete when gone) before committing.
    """

    def __init__(self, refresh=None):
        self.refresh = refresh
        self.recopy = []
        self.counts = {}

    def _count(self, outcome):
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        return outcome

    def apply(self, w, ev, catch_up=False):
        """Apply one event (RawBSONDocument or mapping) with writer w; returns applied|skipped|recopy|ignored."""
        op = ev["operationType"]
        if op in ("insert", "replace"):
            db, ns = _ns(ev["ns"])
            full = _raw(ev["fullDocument"])
            if not w.has_namespace(ns):
                self._implicit_create(w, ns, _uuid(ev))
            w.upsert(ns, id_key_from_document(full), full)
            return self._count(APPLIED)
        if op == "update":
            return self._count(self._update(w, ev, catch_up))
        if op == "delete":
            db, ns = _ns(ev["ns"])
            w.delete(ns, id_key_from_document(_raw(ev["documentKey"])))
            return self._count(APPLIED)
        handler = getattr(self, "_ddl_" + op, None)
        if handler is None:
            if op == "invalidate":
                raise HistoryLostError("The change stream was invalidated: a new initial sync is needed, the daemon starts one.")
            return self._count(IGNORED)  # shardCollection, refine/reshard...: nothing to keep in the head
        return self._count(handler(w, ev, catch_up))

    def _update(self, w, ev, catch_up):
        db, ns = _ns(ev["ns"])
        dkey = _raw(ev["documentKey"])
        ik = id_key_from_document(dkey)
        stored = w.get(ns, ik)
        if stored is None:
            if catch_up:
                return SKIPPED
            self.recopy.append((ns, dkey))
            return RECOPY
        try:
            new = apply_update_description(stored, _raw(ev["updateDescription"]))
        except NotApplicable:
            if catch_up:
                return SKIPPED
            self.recopy.append((ns, dkey))
            return RECOPY
        w.upsert(ns, ik, new)
        return APPLIED

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
        to = ev.get("to") or (ev.get("operationDescription") or {}).get("to")
        to_ns = _ns(to)[1]
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
