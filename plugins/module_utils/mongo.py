# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""MongoDB connections and raw commands (no Ansible imports). PRIVATE to the collection.

One connection shape for every MongoDB the collection talks to, a backup job's source as a
restore target: a dict of uri, tls, tls_ca_file, tls_certificate_key_file, username, password,
auth_mechanism, auth_source, connect_timeout (seconds). The raw find/aggregate helpers return
raw BSON and run as commands, so names pymongo's Collection refuses ("a..b", "x.") work too.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import KmipBackupError

if TYPE_CHECKING:
    import pymongo

try:
    from bson.codec_options import CodecOptions
    from bson.raw_bson import RawBSONDocument
    RAW = CodecOptions(document_class=RawBSONDocument)
except ImportError:  # pragma: no cover: client() reports it
    RawBSONDocument = RAW = None


def client_options(conn: dict) -> dict:
    """pymongo.MongoClient keyword arguments (raw BSON documents) from a connection dict."""
    timeout_ms = int(float(conn.get("connect_timeout") or 10) * 1000)
    kw = {"document_class": RawBSONDocument, "appname": "kmipbackup", "connectTimeoutMS": timeout_ms,
          "serverSelectionTimeoutMS": timeout_ms}
    if conn.get("tls"):
        kw["tls"] = True
        if conn.get("tls_ca_file"):
            kw["tlsCAFile"] = conn["tls_ca_file"]
        if conn.get("tls_certificate_key_file"):
            kw["tlsCertificateKeyFile"] = conn["tls_certificate_key_file"]
    if conn.get("username"):
        kw["username"] = conn["username"]
    if conn.get("password") is not None and conn.get("username"):
        kw["password"] = conn["password"]
    if conn.get("auth_mechanism"):
        kw["authMechanism"] = conn["auth_mechanism"]
    if conn.get("auth_source"):
        kw["authSource"] = conn["auth_source"]
    return kw


def client(conn: dict, **overrides) -> pymongo.MongoClient:
    """A MongoClient (raw BSON documents, connected lazily) for a connection dict; overrides: MongoClient
    keyword arguments that replace client_options(conn)'s. Nothing is checked here: source.connect checks a source."""
    try:
        import pymongo  # here: a restore to files never connects, and pymongo takes ~0.08 s to import
    except ImportError as e:
        raise KmipBackupError("The Python package pymongo is missing (%s): install the collection's requirements." % e) from None
    kw = client_options(conn)
    kw.update(overrides)
    return pymongo.MongoClient(conn["uri"], **kw)


def split_namespace(ns: str) -> tuple[str, str]:
    """(database, collection) of "db.coll" (the collection name may hold dots)."""
    db, _dot, coll = ns.partition(".")
    return db, coll


def find_raw_batches(client: pymongo.MongoClient, ns: str, query: dict | None = None, batch_size: int | None = None,
                     read_concern: dict | None = None) -> Iterator[bytes]:
    """Raw batches (concatenated BSON documents) of a find on namespace ns. pymongo's
    Collection.find_raw_batches joins each server batch in C, without an object per document; for
    names its Collection refuses but the server accepts ("a..b", "x.") the find and getMore run as
    raw commands instead. The cursor is closed (killCursors) when the generator is. read_concern: the
    find's readConcern document ({"level", "afterClusterTime"}), else the server's default."""
    from pymongo.errors import InvalidName  # pymongo is loaded: client is a MongoClient
    db, coll = split_namespace(ns)
    try:
        collection = client[db][coll]
    except InvalidName:
        collection = None
    if collection is not None:
        with contextlib.ExitStack() as stack:
            session = None
            if read_concern:
                from pymongo.read_concern import ReadConcern
                collection = collection.with_options(read_concern=ReadConcern(read_concern["level"]))
                if read_concern.get("afterClusterTime") is not None:  # pymongo sends it from a causal session's time
                    session = stack.enter_context(client.start_session(causal_consistency=True))
                    session.advance_operation_time(read_concern["afterClusterTime"])
            cursor = stack.enter_context(collection.find_raw_batches(
                query if query is not None else {}, batch_size=int(batch_size or 0), session=session))
            for batch in cursor:
                if batch:
                    yield batch
        return
    cmd = {"find": coll, "filter": query if query is not None else {}}
    if batch_size:
        cmd["batchSize"] = int(batch_size)
    if read_concern:
        cmd["readConcern"] = dict(read_concern)
    group = int(batch_size or 1000)
    with client[db].cursor_command(cmd, codec_options=RAW) as cursor:
        buf = []
        for doc in cursor:
            buf.append(doc.raw)
            if len(buf) >= group:
                yield b"".join(buf)
                buf = []
        if buf:
            yield b"".join(buf)


def find_one_raw(client: pymongo.MongoClient, ns: str, query: dict, projection: dict | None = None,
                 read_concern: dict | None = None) -> RawBSONDocument | None:
    """The first document (RawBSONDocument) matching query in namespace ns, or None; a raw find command."""
    db, coll = split_namespace(ns)
    cmd = {"find": coll, "filter": query, "limit": 1, "singleBatch": True}
    if projection is not None:
        cmd["projection"] = projection
    if read_concern:
        cmd["readConcern"] = dict(read_concern)
    with client[db].cursor_command(cmd, codec_options=RAW) as cursor:
        for doc in cursor:
            return doc
    return None


def aggregate_raw(client: pymongo.MongoClient, ns: str, pipeline: list, read_concern: dict | None = None) -> list:
    """The RawBSONDocuments an aggregation pipeline on namespace ns returns; a raw aggregate command."""
    db, coll = split_namespace(ns)
    cmd = {"aggregate": coll, "pipeline": pipeline, "cursor": {}}
    if read_concern:
        cmd["readConcern"] = dict(read_concern)
    with client[db].cursor_command(cmd, codec_options=RAW) as cursor:
        return list(cursor)
