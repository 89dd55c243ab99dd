# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Raw BSON helpers (no Ansible imports). PRIVATE to the collection.

Work on BSON bytes without decoding documents: split concatenated documents, skip a value,
and id_key(), the order-preserving, injective encoding of an _id value that keys the head's
rows (head.py) and the change stream's events (events.py).
"""
from __future__ import annotations

import decimal
import itertools
import struct
from typing import Any

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import HeadError

try:
    from bson import encode as bson_encode
    from bson.binary import Binary
    from bson.decimal128 import Decimal128
    from bson.raw_bson import RawBSONDocument
    BSON_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    bson_encode = Binary = Decimal128 = RawBSONDocument = None
    BSON_IMPORT_ERROR = e

EMPTY_BSON = b"\x05\x00\x00\x00\x00"


def doc_offsets(data: bytes) -> list | None:
    """Where each document of data (BSON documents back to back) starts, then len(data); None when data is not whole
    documents back to back (by their length prefixes)."""
    offs, pos, end, size = [], 0, len(data), _i32.unpack_from
    append = offs.append
    while pos < end:
        append(pos)
        step = size(data, pos)[0] if pos + 4 <= end else 0
        if step < 5:
            return None
        pos += step
    if pos != end:
        return None
    append(end)
    return offs


def split_bson_docs(blob: bytes) -> list:
    """Split concatenated BSON documents into a list of bytes (ValueError when blob is not whole documents)."""
    offs = doc_offsets(blob)
    if offs is None:
        raise ValueError("data that does not split into BSON documents")
    mv = memoryview(blob)
    return [bytes(mv[a:b]) for a, b in itertools.pairwise(offs)]


# ---------------------------------------------------------------------------------------------
# id_key: order-preserving, injective encoding of a BSON _id value.
#
# Layout: a class byte in MongoDB's canonical comparison order, then a self-delimiting body,
# so embedded documents encode element by element (class, name, body) as MongoDB compares them.
# Numbers (int32, int64, double, decimal128) share one exact decimal space: NaN < -inf <
# negatives < 0 < positives < +inf, then a type tag and, for double and decimal128, the raw
# bytes: numerically equal values of different types or decimal128 cohorts (1.0 vs 1.00) get
# distinct keys, ordered by (value, type, raw bytes). Doubles are encoded exactly (Decimal of
# the binary value), so ints and doubles order correctly even beyond 2**53.
# Strings compare by UTF-8 bytes (no collation), as MongoDB's default. BinData orders by
# length, subtype, bytes, as MongoDB does.
# ---------------------------------------------------------------------------------------------

C_MINKEY, C_UNDEFINED, C_NULL, C_NUMBER, C_STRING, C_OBJECT, C_ARRAY, C_BINARY = 0x01, 0x02, 0x05, 0x10, 0x15, 0x20, 0x25, 0x30
C_OID, C_BOOL, C_DATE, C_TIMESTAMP, C_REGEX, C_DBPOINTER, C_CODE, C_CODEWS, C_MAXKEY = 0x35, 0x40, 0x45, 0x47, 0x50, 0x55, 0x60, 0x65, 0x7F
# BSON types with no value bytes (null, undefined, MinKey, MaxKey) -> their class
_VALUELESS = {0x0A: C_NULL, 0x06: C_UNDEFINED, 0xFF: C_MINKEY, 0x7F: C_MAXKEY}

_N_NAN, _N_NEGINF, _N_NEG, _N_ZERO, _N_POS, _N_POSINF = 1, 2, 3, 4, 5, 6
_T_INT32, _T_INT64, _T_DOUBLE, _T_DECIMAL = 1, 2, 3, 4
_EXP_BIAS = 0x8000

_i32 = struct.Struct("<i")
_i64 = struct.Struct("<q")
_u64 = struct.Struct("<Q")
_dbl = struct.Struct("<d")
_be_u64 = struct.Struct(">Q")
_be_u16 = struct.Struct(">H")
_be_u32 = struct.Struct(">I")

_POS_DIGITS = bytes.maketrans(b"0123456789", bytes(range(1, 11)))
_NEG_DIGITS = bytes.maketrans(b"0123456789", bytes(range(10, 0, -1)))


def _escape(b):
    """Order-preserving, self-delimiting bytes: 0x00 -> 00 FF, terminated by 00 00."""
    return b.replace(b"\x00", b"\x00\xff") + b"\x00\x00"


def _num_digits(negative, digits, exp10):
    """value = 0.digits * 10**exp10 with digits (ASCII, no leading/trailing zero) non-empty."""
    if not negative:
        return bytes((_N_POS,)) + _be_u16.pack(exp10 + _EXP_BIAS) + digits.translate(_POS_DIGITS) + b"\x00"
    return bytes((_N_NEG,)) + _be_u16.pack(0xFFFF - (exp10 + _EXP_BIAS)) + digits.translate(_NEG_DIGITS) + b"\xff"


def _num_int(n):
    if n == 0:
        return bytes((_N_ZERO,))
    s = str(abs(n)).encode()
    return _num_digits(n < 0, s.rstrip(b"0"), len(s))


def _num_decimal(d):
    if d.is_nan():
        return bytes((_N_NAN,))
    if d.is_infinite():
        return bytes((_N_NEGINF if d < 0 else _N_POSINF,))
    if not d:
        return bytes((_N_ZERO,))
    sign, digits, exponent = d.as_tuple()
    s = "".join(map(str, digits)).lstrip("0")
    stripped = s.rstrip("0")
    return _num_digits(bool(sign), stripped.encode(), len(s) + exponent)


def _num_double(raw8):
    x = _dbl.unpack(raw8)[0]
    if x != x:  # NaN  # pylint: disable=comparison-with-itself
        body = bytes((_N_NAN,))
    elif x.is_integer():
        body = _num_int(int(x))
    elif x in (float("inf"), float("-inf")):
        body = bytes((_N_POSINF if x > 0 else _N_NEGINF,))
    else:
        body = _num_decimal(decimal.Decimal(x))
    return body + bytes((_T_DOUBLE,)) + raw8


def _cstring_end(buf, pos):
    return buf.index(b"\x00", pos)


def _encode(buf, t, pos, out):
    """Append the encoding of the value of type t at buf[pos:] to out; return the end position."""
    if t == 0x07:
        out += bytes((C_OID,)) + buf[pos:pos + 12]
        return pos + 12
    if t == 0x10:
        out += bytes((C_NUMBER,)) + _num_int(_i32.unpack_from(buf, pos)[0]) + bytes((_T_INT32,))
        return pos + 4
    if t == 0x12:
        out += bytes((C_NUMBER,)) + _num_int(_i64.unpack_from(buf, pos)[0]) + bytes((_T_INT64,))
        return pos + 8
    if t in (0x02, 0x0E, 0x0D):  # string, symbol, code
        n = _i32.unpack_from(buf, pos)[0]
        s = bytes(buf[pos + 4:pos + 3 + n])
        if t == 0x0D:
            out += bytes((C_CODE,)) + _escape(s)
        else:
            out += bytes((C_STRING,)) + _escape(s) + (b"\x01" if t == 0x02 else b"\x02")
        return pos + 4 + n
    if t == 0x01:
        out += bytes((C_NUMBER,)) + _num_double(bytes(buf[pos:pos + 8]))
        return pos + 8
    if t == 0x09:
        out += bytes((C_DATE,)) + _be_u64.pack(_i64.unpack_from(buf, pos)[0] + (1 << 63))
        return pos + 8
    if t == 0x05:
        n = _i32.unpack_from(buf, pos)[0]
        out += bytes((C_BINARY,)) + _be_u32.pack(n) + buf[pos + 4:pos + 5] + buf[pos + 5:pos + 5 + n]
        return pos + 5 + n
    if t in (0x03, 0x04):
        n = _i32.unpack_from(buf, pos)[0]
        out.append(C_OBJECT if t == 0x03 else C_ARRAY)
        p, end = pos + 4, pos + n - 1
        while p < end:
            et = buf[p]
            ne = _cstring_end(buf, p + 1)
            if t == 0x03:
                sub, p0 = bytearray(), p
                p = _encode(buf, et, ne + 1, sub)
                out.append(sub[0])  # the element's class first, then its name, then its body (MongoDB's order)
                out += buf[p0 + 1:ne] + b"\x00"
                out += sub[1:]
            else:
                p = _encode(buf, et, ne + 1, out)
        out.append(0)
        return pos + n
    if t == 0x08:
        out += bytes((C_BOOL, 1 if buf[pos] else 0))
        return pos + 1
    if t == 0x11:
        out += bytes((C_TIMESTAMP,)) + _be_u64.pack(_u64.unpack_from(buf, pos)[0])
        return pos + 8
    if t == 0x13:
        out += bytes((C_NUMBER,)) + _num_decimal(_decimal128(bytes(buf[pos:pos + 16]))) + bytes((_T_DECIMAL,)) + buf[pos:pos + 16]
        return pos + 16
    if t in _VALUELESS:  # null, undefined, MinKey, MaxKey: the class alone is the key
        out.append(_VALUELESS[t])
        return pos
    if t == 0x0B:
        e1 = _cstring_end(buf, pos)
        e2 = _cstring_end(buf, e1 + 1)
        out += bytes((C_REGEX,)) + _escape(bytes(buf[pos:e1])) + _escape(bytes(buf[e1 + 1:e2]))
        return e2 + 1
    if t == 0x0C:
        n = _i32.unpack_from(buf, pos)[0]
        out += bytes((C_DBPOINTER,)) + _escape(bytes(buf[pos + 4:pos + 3 + n])) + buf[pos + 4 + n:pos + 16 + n]
        return pos + 16 + n
    if t == 0x0F:
        n = _i32.unpack_from(buf, pos)[0]
        sn = _i32.unpack_from(buf, pos + 4)[0]
        out += bytes((C_CODEWS,)) + _escape(bytes(buf[pos + 8:pos + 7 + sn]))
        _encode(buf, 0x03, pos + 8 + sn, out)
        return pos + n
    raise HeadError("Unsupported BSON type 0x%02x in an _id value: the source document cannot be keyed." % t)


def _decimal128(raw16):
    return Decimal128.from_bid(raw16).to_decimal()


def id_key(raw_value: bytes, bson_type: int) -> bytes:
    """The id_key of a BSON value given as its raw value bytes (no type byte, no name) and its type."""
    out = bytearray()
    _encode(bytes(raw_value), bson_type, 0, out)
    return bytes(out)


def id_key_from_document(raw: bytes) -> bytes:
    """The id_key of the _id of a raw BSON document (bytes), read without decoding the document."""
    if type(raw) is not bytes:  # pylint: disable=unidiomatic-typecheck
        raw = bytes(raw)
    if raw[4] == 0x07 and raw[5:9] == b"_id\x00":  # fast path: ObjectId _id first, as mongod stores it
        return b"\x35" + bytes(raw[9:21])
    pos, end = 4, len(raw) - 1
    while pos < end:
        t = raw[pos]
        ne = raw.index(b"\x00", pos + 1)
        if raw[pos + 1:ne] == b"_id":
            out = bytearray()
            _encode(raw, t, ne + 1, out)
            return bytes(out)
        pos = skip_value(raw, t, ne + 1)
    raise HeadError("A document without _id cannot be stored in the head.")


def id_key_from_value(value: Any) -> bytes:
    """The id_key of an _id given as a Python value (or a documentKey RawBSONDocument / raw bytes)."""
    if isinstance(value, (bytes, bytearray)) and not isinstance(value, Binary):
        return id_key_from_document(value)
    raw = getattr(value, "raw", None)
    if raw is not None and isinstance(value, RawBSONDocument):
        return id_key_from_document(raw)
    return id_key_from_document(bson_encode({"_id": value}))


FIXED_SIZES = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x06: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16, 0xFF: 0, 0x7F: 0}


def skip_value(buf: bytes, t: int, pos: int) -> int:
    """The position after the value of type t starting at pos."""
    n = FIXED_SIZES.get(t)
    if n is not None:
        return pos + n
    if t in (0x02, 0x0D, 0x0E):
        return pos + 4 + _i32.unpack_from(buf, pos)[0]
    if t in (0x03, 0x04, 0x0F):
        return pos + _i32.unpack_from(buf, pos)[0]
    if t == 0x05:
        return pos + 5 + _i32.unpack_from(buf, pos)[0]
    if t == 0x0B:
        return buf.index(b"\x00", buf.index(b"\x00", pos) + 1) + 1
    if t == 0x0C:
        return pos + 16 + _i32.unpack_from(buf, pos)[0]
    raise HeadError("Unsupported BSON type 0x%02x in a document: it cannot be parsed." % t)
