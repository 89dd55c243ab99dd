# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""mongod handling (no Ansible imports). PRIVATE to the collection.

connect() opens a source (replica set or sharded cluster through mongos; a standalone is
refused), initial_sync() fills a head (cluster-wide change stream opened first, clone as
raw BSON, catch-up until consistent), Capture applies the change stream continuously and
verify() compares the head's and the source's documents byte for byte and heals what differs.

Every head transaction stores the resume token and cluster time of the changes it holds,
so a restart (even after kill -9) resumes by token without a gap or a duplicate. A head
whose initial sync was interrupted is cleared and synced again.

Namespaces: every database except admin, config and local; every collection and view
except system.* collections, but system.js (stored functions, which mongodump keeps too).
"""
from __future__ import annotations

import concurrent.futures
import os
import queue
import struct
import threading
import time
from typing import TYPE_CHECKING

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, crypto
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.segments import RECORD_TIME, correction
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import HistoryLostError, SourceError
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.events import (
    EXCLUDED_DBS, IGNORED, Applier, CloneRepair, kept_collection, keeps, merge_fragments, parse_elements)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.mongo import (
    RAW, aggregate_raw, client_options, find_one_raw, find_raw_batches, split_namespace)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.rawbson import id_key_from_document

if TYPE_CHECKING:  # annotations only: the source code fills the Head it is given
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.head import Head, Writer
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.progress import Meter

try:
    import pymongo
    from bson import encode as bson_encode
    from bson.raw_bson import RawBSONDocument
    from bson.timestamp import Timestamp
    from pymongo import errors as mongo_errors
    PYMONGO_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    pymongo = mongo_errors = RawBSONDocument = bson_encode = Timestamp = None
    PYMONGO_IMPORT_ERROR = e

HISTORY_LOST_CODES = (286, 280, 260)  # ChangeStreamHistoryLost, ChangeStreamFatalError, InvalidResumeToken
CLONE_COMMIT_BYTES = 32 << 20
CLONE_IDLE_COMMIT_BYTES = 1 << 20  # the least a clone commits while it waits for the source (see _clone)
CLONE_BATCH_DOCS = 4096  # as many as a plain scan asks for: a short tail of writes after the last batch
VERIFY_COUNTS = ("checked", "mismatched", "recopied", "removed")  # verify()'s document counts, added up in status
# an empty getMore proves the catch-up complete once the majority read proved its end committed (_majority_reached):
# the wait adds nothing to that proof; without it, a longer wait gives a lagging majority point time to pass the end
CATCH_UP_AWAIT_MS = 1
CATCH_UP_UNPROVEN_AWAIT_MS = 50
# a clone cursor ended by DDL: NamespaceNotFound, CursorNotFound, QueryPlanKilled, CursorKilled
DDL_INTERRUPTED_CODES = (26, 43, 175, 237)
# a snapshot read at a cluster time the server cannot serve: SnapshotTooOld, SnapshotUnavailable, InvalidOptions,
# IllegalOperation, NotImplemented (older servers, mongos without snapshot reads)
SNAPSHOT_READ_UNAVAILABLE_CODES = (239, 246, 72, 20, 238)
# the head copies from the source at majority read concern, as the stream delivers only majority-committed changes (a
# rolled-back write copied at "local" would stay: no event takes it out); ReadConcernMajorityNotEnabled (a 4.x server
# with enableMajorityReadConcern off): read at the server's default there
MAJORITY_UNAVAILABLE_CODES = (148,)
_i32 = struct.Struct("<i")


def _require():
    if pymongo is None:
        raise SourceError("The Python package pymongo is missing (%s): install the collection's requirements in the "
                          "daemon's virtualenv." % PYMONGO_IMPORT_ERROR)


def _redact(text, source):
    """text without the source's passwords (pymongo messages may carry the URI)."""
    text = str(text)
    secrets = [source.get("password")]
    netloc = (source.get("uri") or "").split("://", 1)[-1].split("/", 1)[0]
    if "@" in netloc and ":" in netloc.rsplit("@", 1)[0]:
        secrets.append(netloc.rsplit("@", 1)[0].split(":", 1)[1])
    for secret in secrets:
        if secret:
            text = text.replace(str(secret), config.MASK)
    return text


def connect(source: dict) -> pymongo.MongoClient:
    """A MongoClient (raw BSON documents) for a job's source settings, checked: reachable,
    authenticated, and a replica set or mongos. Raises SourceError with what to do."""
    _require()
    if not source.get("uri"):
        raise SourceError("The source has no uri: set source.uri to the replica set or mongos connection string.")
    try:
        client = pymongo.MongoClient(source["uri"], **client_options(source))
    except (mongo_errors.ConfigurationError, mongo_errors.InvalidURI, ValueError, TypeError) as e:
        raise SourceError("The source settings are invalid (%s): fix source.uri and the TLS/authentication options."
                          % _redact(e, source)) from None
    try:
        hello = client.admin.command("hello")
        client.admin.command("listDatabases", nameOnly=True)  # authentication (URI or settings) and authorization
    except mongo_errors.OperationFailure as e:
        client.close()
        if e.code in (18, 13, 11):
            raise SourceError("The source refused the credentials (authentication failed or not authorized): check "
                              "source.username, source.password, source.auth_mechanism and source.auth_source; the "
                              "backup user needs the backup role (read on all databases, changeStream).") from None
        raise SourceError("The source failed a check command: %s." % _redact(e, source)) from None
    except mongo_errors.ConfigurationError as e:
        client.close()
        raise SourceError("The source settings are invalid (%s): fix source.uri and the TLS/authentication options."
                          % _redact(e, source)) from None
    except mongo_errors.PyMongoError as e:
        client.close()
        raise SourceError("The source %s cannot be reached (%s): check that it runs, the host and port, the firewall "
                          "and the TLS settings (source.tls, tls_ca_file, tls_certificate_key_file)."
                          % (_hosts(source), _redact(_short(e), source))) from None
    if hello.get("msg") != "isdbgrid" and not hello.get("setName"):
        client.close()
        raise SourceError("The source %s is a standalone mongod: change streams need a replica set or a sharded cluster "
                          "(connect through mongos). Convert it to a one-member replica set (replication.replSetName, "
                          "then rs.initiate()) and try again." % _hosts(source))
    return client


def check_source(source: dict) -> None:
    """Connect to the source once and refuse what cannot be backed up (standalone, bad auth): SourceError."""
    connect(source).close()


def _hosts(source):
    uri = source.get("uri") or ""
    rest = uri.split("://", 1)[-1].split("/", 1)[0]
    return rest.rsplit("@", 1)[-1]


def _short(e):
    text = str(e)
    return text.split(", Timeout:", 1)[0][:300]


def _safe(e):
    """What went wrong, without the server's error text: that text can name namespaces and echo
    _id filters, and these messages reach the status file, the log and Ansible output.
    Connection failures keep their text (host, port and reason only)."""
    if isinstance(e, mongo_errors.ConnectionFailure):
        return _short(e)
    code = getattr(e, "code", None)
    name = (getattr(e, "details", None) or {}).get("codeName") if isinstance(getattr(e, "details", None), dict) else None
    return "%s%s" % (type(e).__name__, " code %s%s" % (code, " %s" % name if name else "") if code is not None else "")


def _cluster_time(client, reply=None):
    """An upper bound of every operation committed so far: the cluster time the source gossips (in reply, a hello
    reply, when given)."""
    reply = reply if reply is not None else client.admin.command("hello")
    times = [t for t in ((reply.get("$clusterTime") or {}).get("clusterTime"), reply.get("operationTime")) if t is not None]
    return max((t.time, t.inc) for t in times) if times else None


def current_cluster_time(client: pymongo.MongoClient, source: dict) -> tuple[int, int] | None:
    """The source's current cluster time (t, i): every write it acknowledged so far is at or before it.
    SourceError when it cannot be read (naming the source's hosts and the cause, never server text)."""
    try:
        return _cluster_time(client)
    except mongo_errors.PyMongoError as e:
        raise SourceError("The source %s cannot be reached to read its cluster time (%s): check that it runs and is "
                          "reachable from the daemon's host." % (_hosts(source), _safe(e))) from None


def monitor_client(source: dict, timeout: float) -> pymongo.MongoClient:
    """A MongoClient for heartbeats: every wait bounded by timeout seconds, so an outage shows at once
    (the capture client waits connect_timeout, default 10 s, before it gives up)."""
    _require()
    ms = max(100, int(float(timeout) * 1000))
    kw = client_options(source)
    kw.update(appname="kmipbackup-heartbeat", connectTimeoutMS=ms, serverSelectionTimeoutMS=ms, socketTimeoutMS=ms,
              heartbeatFrequencyMS=500)
    try:
        return pymongo.MongoClient(source["uri"], **kw)
    except (mongo_errors.ConfigurationError, mongo_errors.InvalidURI, ValueError, TypeError) as e:
        raise SourceError("The source settings are invalid (%s): fix source.uri and the TLS/authentication options."
                          % _redact(e, source)) from None


def list_namespaces(client: pymongo.MongoClient) -> list:
    """[(ns, info RawBSONDocument from listCollections)] of every namespace a backup keeps."""
    out = []
    for db in sorted(client.list_database_names()):
        if db in EXCLUDED_DBS:
            continue
        for info in _list_collections(client, db):
            name = info["name"]
            if kept_collection(db, name):
                out.append(("%s.%s" % (db, name), info))
    return out


def _list_collections(client, db, query=None):
    """listCollections entries as raw BSON (pymongo's list_collections() decodes them)."""
    cmd = {"listCollections": 1, "cursor": {"batchSize": 100000}}
    if query:
        cmd["filter"] = query
    return client[db].command(cmd, codec_options=RAW)["cursor"]["firstBatch"]


def _info_to_head(client, ns, info):
    """{"options", "indexes", "uuid", "type"} of a namespace from its listCollections entry."""
    options = info.get("options")
    uuid = (info.get("info") or {}).get("uuid")
    ctype = info.get("type", "collection")
    indexes = []
    if ctype == "collection":
        db, coll = split_namespace(ns)
        try:
            reply = client[db].command({"listIndexes": coll, "cursor": {"batchSize": 10000}}, codec_options=RAW)
            indexes = [bytes(spec.raw) for spec in reply["cursor"]["firstBatch"]]  # pymongo's list_indexes() decodes to SON
        except mongo_errors.OperationFailure as e:
            if e.code != 26:  # NamespaceNotFound: dropped meanwhile, the stream says so
                raise
    return {"options": bytes(options.raw) if options is not None else bson_encode({}), "indexes": indexes,
            "uuid": bytes(uuid) if uuid is not None else None, "type": ctype}


def refresh_namespace(client: pymongo.MongoClient, ns: str) -> dict | None:
    """Current options and index specs of ns at the source, or None when it does not exist."""
    db, coll = split_namespace(ns)
    for info in _list_collections(client, db, {"name": coll}):
        return _info_to_head(client, ns, info)
    return None


def _split_batch(batch):
    """[(id_key, raw)] of a raw batch (concatenated BSON documents), without decoding them."""
    return list(_iter_batch(batch))


def _iter_batch(batch, blobs=False):
    """(id_key, raw) pairs of a raw batch, one at a time, without decoding them.

    blobs=True: keys and documents as bytearrays, which sqlcipher3 binds without the adapter lookup it makes for
    every bytes parameter (an executemany of them takes about half the time)."""
    kind = bytearray if blobs else bytes
    if type(batch) is not kind:  # pylint: disable=unidiomatic-typecheck
        batch = kind(batch)
    oid, pos, n = kind(b"\x35"), 0, len(batch)
    unpack, find = _i32.unpack_from, batch.find
    while pos < n:
        end = pos + unpack(batch, pos)[0]
        if find(b"\x07_id\x00", pos + 4, pos + 9) == pos + 4:  # an ObjectId _id first, as mongod stores it
            yield oid + batch[pos + 9:pos + 21], batch[pos:end]
        else:
            doc = batch[pos:end]
            yield kind(id_key_from_document(doc)), doc
        pos = end


def _open_stream(client, resume_token=None, max_await_ms=500, batch_size=None):
    kw = {"show_expanded_events": True, "max_await_time_ms": max_await_ms}
    if resume_token is not None:
        kw["resume_after"] = RawBSONDocument(bytes(resume_token)) if isinstance(resume_token, (bytes, bytearray)) else resume_token
    if batch_size:
        kw["batch_size"] = batch_size
    try:
        return client.watch([{"$changeStreamSplitLargeEvent": {}}], **kw)
    except mongo_errors.OperationFailure as e:
        _raise_history_lost(e)
        raise


def _raise_history_lost(e):
    if getattr(e, "code", None) in HISTORY_LOST_CODES:
        raise HistoryLostError("The source no longer has the change history this head needs (the resume point left the "
                               "oplog, code %s): a new initial sync is needed; the daemon starts one and reports it in status."
                               % e.code) from None


def needs_initial_sync(head: Head) -> bool:
    """True when the head has no stream position to resume from or its initial sync was interrupted."""
    pos = head.position()
    return pos["resume_token"] is None or pos["sync"] is not None


def initial_sync(head: Head, client: pymongo.MongoClient, catch_up_timeout: float = 300,
                 stop_event: threading.Event | None = None, progress: Meter | None = None) -> dict:
    """Fill head from the source: open the stream, clone every namespace, catch up until consistent.

    DDL that races the clone (a rename, drop and re-create, dropDatabase, create after the listing)
    can leave a namespace cloned as another incarnation, under its old name, or not at all. The
    catch-up learns from the DDL events which namespaces that may have happened to (CloneRepair:
    renamed from a namespace the clone may have got wrong, or a clone a DDL interrupted),
    re-clones those once it has passed the clone's end, and catches up again (idempotently, for
    those namespaces only) until a round leaves nothing to re-clone.

    progress (a progress.Meter): given the source's estimated totals at the listing, counts the documents and bytes
    cloned, and names the phase (clone, catch_up).

    Returns {"docs", "bytes", "namespaces", "seconds", "clone_seconds", "events", "recloned"}."""
    t0 = time.monotonic()
    stream = _open_stream(client)
    start_token = stream.resume_token  # the aggregate's postBatchResumeToken: no getMore needed
    stream.close()
    if start_token is None:
        raise SourceError("The source's change stream returned no start point: it cannot be used for a consistent backup.")
    after = _cluster_time(client)  # at or past the stream's start: the clone reads what is committed up to it, at least
    namespaces = list_namespaces(client)
    estimating = None
    if progress is not None:
        progress.phase = "clone"
        estimating = _estimate_later(client, namespaces, progress)
    metas = [(ns, _info_to_head(client, ns, info)) for ns, info in namespaces]
    # the clone's reader starts now: the source prepares its first batch while the head is made ready
    reader = _Reader(client, [ns for ns, meta in metas if meta["type"] == "collection"], stop_event, after)
    try:
        with head.write() as w:  # one transaction: the old head's content, or a head ready for the clone
            w.clear()
            w.set_position(_raw_token(start_token), None, False)
            w.set_sync_state({"phase": "clone"})
            for ns, meta in metas:
                w.create_namespace(ns, meta["options"], uuid=meta["uuid"], indexes=meta["indexes"])
    except BaseException:
        reader.cancel()
        raise
    t_clone = time.monotonic()
    docs, nbytes, interrupted = _clone(head, reader, progress)
    clone_seconds = time.monotonic() - t_clone
    if progress is not None:
        progress.phase = "catch_up"
    cap = Capture(head, client, max_await_ms=CATCH_UP_AWAIT_MS)
    end_time = _catch_up_to(cap, client)
    with head.write() as w:
        w.set_sync_state({"phase": "catch_up", "clone_end": list(end_time) if end_time else None})
    cap.applier.repair = CloneRepair(reclone=interrupted)
    deadline = time.monotonic() + catch_up_timeout
    recloned = 0
    try:
        while not head.position()["consistent"]:
            if stop_event is not None and stop_event.is_set():
                break
            if time.monotonic() > deadline:
                raise SourceError("The initial sync could not catch up with the source's changes within %d s: the "
                                  "source writes faster than the head applies, or renames and drops collections "
                                  "without pause; the daemon retries." % catch_up_timeout)
            if cap.reclone_due:
                names, cap.reclone_due = cap.applier.repair.reclone, False
                d, b, interrupted = _reclone(head, client, names, stop_event, progress)
                docs, nbytes, recloned = docs + d, nbytes + b, recloned + len(names)
                cap.applier.repair = CloneRepair(scope=names, reclone=interrupted)
                _catch_up_to(cap, client)
                continue
            cap.run_once(max_time=2.0)
    finally:
        cap.close()
    if estimating is not None and not (stop_event is not None and stop_event.is_set()):
        estimating.join()  # the totals the finished sync reports; waits only where dbStats took longer than the sync
    return {"docs": docs, "bytes": nbytes, "namespaces": len(namespaces), "seconds": time.monotonic() - t0,
            "clone_seconds": clone_seconds, "events": cap.stats["events"], "recloned": recloned}


def estimate_totals(client: pymongo.MongoClient, namespaces: list) -> tuple[int | None, int | None]:
    """(documents, bytes) the source estimates for the databases of namespaces: dbStats' objects and dataSize (the
    uncompressed size; a mongos sums its shards), one cheap command per database. (None, None) where the user may
    not run dbStats: progress then shows no percent and no ETA."""
    docs = nbytes = 0
    for db in sorted({split_namespace(ns)[0] for ns, _info in namespaces}):
        try:
            stats = client[db].command("dbStats")
        except mongo_errors.PyMongoError:
            return None, None
        docs += int(stats.get("objects") or 0)
        nbytes += int(stats.get("dataSize") or 0)
    return docs, nbytes


def _estimate_later(client: pymongo.MongoClient, namespaces: list, progress: Meter) -> threading.Thread:
    """estimate_totals on a side thread (returned), into progress when it answers: dbStats can take seconds (a server
    that counts by scanning) and the clone need not wait for it; progress shows no percent until then."""
    def run():
        try:
            progress.estimate(*estimate_totals(client, namespaces))
        except Exception:  # pylint: disable=broad-except  # progress is advisory: the sync goes on without totals
            pass
    thread = threading.Thread(target=run, name="kmipbackup-estimate", daemon=True)
    thread.start()
    return thread


def _majority_reached(client: pymongo.MongoClient, t: tuple[int, int] | None, hello: dict) -> bool:
    """Wait until the source's majority-committed point reaches cluster time t: a majority read with afterClusterTime
    t, which the server answers only then (causal consistency). Change streams return majority-committed changes
    only, so after this an empty batch proves every change up to t delivered, however short the wait for it was.
    False when it cannot tell: a sharded cluster (hello from a mongos; its stream merges the shards'), or a server
    that refuses the read."""
    if t is None or hello.get("msg") == "isdbgrid":
        return False
    try:
        client.admin.command({"find": "kmipbackup_catch_up", "filter": {}, "limit": 1, "singleBatch": True,
                              "readConcern": _majority(t)})
    except mongo_errors.OperationFailure:
        return False
    return True


def _catch_up_to(cap: Capture, client: pymongo.MongoClient) -> tuple[int, int] | None:
    """Make cap catch up to the source's current cluster time (returned), waiting for an empty batch only briefly
    where the majority read proved that time committed (else CATCH_UP_UNPROVEN_AWAIT_MS, as long as before)."""
    hello = client.admin.command("hello")
    cap.catch_up_until = t = _cluster_time(client, hello)
    ms = CATCH_UP_AWAIT_MS if _majority_reached(client, t, hello) else CATCH_UP_UNPROVEN_AWAIT_MS
    if ms != cap.max_await_ms:
        cap.close()  # the stream's wait is set when it opens: reopened from the head's token
        cap.max_await_ms = ms
    return t


def _reclone(head, client, names, stop_event=None, progress=None):
    """Replace names in the head with the source's current namespaces (options, indexes, documents), or drop
    them where the source no longer has them. Returns _clone's (docs, bytes, interrupted)."""
    metas = {ns: refresh_namespace(client, ns) for ns in sorted(names) if ns and kept_collection(*split_namespace(ns))}
    with head.write() as w:
        for ns, meta in metas.items():
            w.drop_namespace(ns)
            if meta is not None:
                w.create_namespace(ns, meta["options"], uuid=meta["uuid"], indexes=meta["indexes"])
    names = [ns for ns, meta in metas.items() if meta is not None and meta["type"] == "collection"]
    return _clone(head, _Reader(client, names, stop_event, _cluster_time(client)), progress)


def _majority(after: tuple[int, int] | None = None) -> dict:
    """A majority readConcern; with after (a cluster time), one the server answers only once its majority point has
    passed it (causal consistency: a write before it is seen once committed, even by a just elected primary)."""
    return {"level": "majority"} if after is None else {"level": "majority", "afterClusterTime": Timestamp(*after)}


def _committed_batches(client, ns, query, batch_size=None, after=None):
    """find_raw_batches at majority read concern (_majority(after)); at the server's default where the server has
    majority reads off (refused before the first batch)."""
    started = False
    try:
        for batch in find_raw_batches(client, ns, query, batch_size, read_concern=_majority(after)):
            started = True
            yield batch
    except mongo_errors.OperationFailure as e:
        if started or e.code not in MAJORITY_UNAVAILABLE_CODES:
            raise
        yield from find_raw_batches(client, ns, query, batch_size)


def _committed(read, *args):
    """read(*args) at majority read concern (its read_concern argument); at the server's default where the server has
    majority reads off."""
    try:
        return read(*args, read_concern=_majority())
    except mongo_errors.OperationFailure as e:
        if e.code not in MAJORITY_UNAVAILABLE_CODES:
            raise
        return read(*args)


class _Reader:
    """Raw batches of every document of names, fetched by a thread into a bounded queue: (ns, batch) items, then
    None. interrupted lists the namespaces whose cursor a DDL ended (re-cloned after the catch-up). after: the source's
    cluster time read once the change stream that follows the clone was opened. Every read waits for the majority point
    to pass it, so a write from before the stream's start is in the clone once committed; a rolled-back write is not."""

    def __init__(self, client: pymongo.MongoClient, names: list, stop_event: threading.Event | None = None,
                 after: tuple[int, int] | None = None) -> None:
        self.after = after
        self.queue = queue.Queue(maxsize=8)
        self.failure, self.interrupted = [], []
        self._stops = [e for e in (stop_event, threading.Event()) if e is not None]
        self.thread = threading.Thread(target=self._run, args=(client, names), name="kmipbackup-clone", daemon=True)
        self.thread.start()

    def _run(self, client, names):
        try:
            for ns in names:
                try:
                    for batch in _committed_batches(client, ns, {}, CLONE_BATCH_DOCS, self.after):
                        self.queue.put((ns, batch))
                        if any(e.is_set() for e in self._stops):
                            return
                except mongo_errors.OperationFailure as e:
                    if e.code not in DDL_INTERRUPTED_CODES:
                        raise
                    self.interrupted.append(ns)  # dropped or renamed under the cursor
        except BaseException as e:  # handed to the writer thread
            self.failure.append(e)
        finally:
            self.queue.put(None)

    def cancel(self) -> None:
        """Stop the thread (after the batch it is fetching) and wait for it."""
        self._stops[-1].set()
        while self.queue.get() is not None:
            pass
        self.thread.join()


def _clone(head, reader, progress=None):
    """Copy every document reader fetches into head: the reader's thread fetches raw batches while this thread writes.

    Returns (docs, bytes, [namespaces whose clone a DDL interrupted])."""
    q = reader.queue
    docs = nbytes = pending = 0
    done = False
    ctx = head.write()
    w = ctx.__enter__()
    try:
        while True:
            item = q.get()
            if item is None:
                done = True
                break
            ns, batch = item
            n = w.upsert_many(ns, _iter_batch(batch, blobs=True), track=False)
            docs += n
            nbytes += len(batch)
            pending += len(batch)
            if progress is not None:
                progress.add(n, len(batch))
            # commit when the source has nothing ready (the writer is idle anyway) or the transaction is large: a clone
            # from a source slower than the head then ends with a short commit, not with up to CLONE_COMMIT_BYTES
            if pending >= CLONE_COMMIT_BYTES or (pending >= CLONE_IDLE_COMMIT_BYTES and q.empty()):
                ctx.__exit__(None, None, None)
                ctx = head.write()
                w = ctx.__enter__()
                pending = 0
        ctx.__exit__(None, None, None)
    except BaseException as e:
        ctx.__exit__(type(e), e, e.__traceback__)
        raise
    finally:
        if done:
            reader.thread.join()
        else:
            reader.cancel()  # the writer failed: a reader blocked on the full queue would wait forever
    if reader.failure:
        e = reader.failure[0]
        if isinstance(e, mongo_errors.PyMongoError):
            raise SourceError("Cloning from the source failed (%s): the daemon restarts the initial sync." % _safe(e)) from None
        raise e
    return docs, nbytes, reader.interrupted


class Capture:
    """Continuous change capture into a head that has a stream position (after initial_sync).

    run_once(max_time) applies what the stream delivers for up to max_time seconds, in
    transactions that each store the resume token and cluster time they bring the head to.
    A transaction ends at a cluster-time boundary (consistent), when the stream is idle
    (consistent: nothing more is coming), or mid-run when a run of equal cluster times is
    too large for one transaction (not consistent until the run ends).
    """

    def __init__(self, head: Head, client: pymongo.MongoClient, max_batch_events: int = 20000, max_batch_seconds: float = 1.0,
                 max_await_ms: int = 500) -> None:
        self.head = head
        self.max_await_ms = max_await_ms
        self.client = client
        self.max_batch_events = max_batch_events
        self.max_batch_seconds = max_batch_seconds
        self.catch_up_until = None  # clone end time during an initial sync: events up to it apply idempotently
        self.reclone_due = False    # the catch-up passed its end, but namespaces must be re-cloned first
        self.applier = Applier(refresh=self._refresh, keep=keeps)
        self._log = None  # this transaction's change-segment records (a _SegmentLog) while the head records segments
        self._log_ct = None
        self.stream = None
        self.stats = {"events": 0, "transactions": 0, "recopied": 0}
        self._fragments = []
        self._carry = None

    def _refresh(self, ns):
        """The source's options and indexes of ns for the Applier; logged after the event that asked (a replay has
        no source to ask)."""
        info = refresh_namespace(self.client, ns)
        if self._log is not None:
            self._log.add(self._log_ct, correction("refresh", ns, info=info))
        return info

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self._carry = None  # a reopened stream delivers it again from the stored token
        self._fragments = []

    def _stream(self):
        if self.stream is None:
            token = self.head.position()["resume_token"]
            if token is None:
                raise SourceError("The head has no change-stream position: run an initial sync first.")
            try:
                self.stream = _open_stream(self.client, token, max_await_ms=self.max_await_ms)
            except HistoryLostError:
                self._history_lost()
                raise
        return self.stream

    def _history_lost(self):
        """Record in the head that it needs a new initial sync (kept across restarts: needs_initial_sync says so)."""
        with self.head.write() as w:
            w.set_sync_state({"phase": "history_lost"})

    def run_once(self, max_time: float = 1.0) -> int:
        """Apply events for up to max_time seconds; returns the number of events applied."""
        deadline = time.monotonic() + max_time
        applied = 0
        try:
            stream = self._stream()
            while True:
                n, more = self._one_transaction(stream, deadline)
                applied += n
                if not more or time.monotonic() >= deadline:
                    break
        except HistoryLostError:
            self.close()
            self._history_lost()
            raise
        except mongo_errors.OperationFailure as e:
            self.close()
            try:
                _raise_history_lost(e)
            except HistoryLostError:
                self._history_lost()
                raise
            raise SourceError("The source's change stream failed (%s): the daemon retries." % _safe(e)) from None
        except mongo_errors.PyMongoError as e:
            self.close()
            raise SourceError("The source cannot be reached for change capture (%s): the daemon retries with backoff."
                              % _safe(e)) from None
        return applied

    def _next(self, stream):
        """The next whole event (fragments of a split event merged), or None when the stream is idle."""
        if self._carry is not None:
            ev, self._carry = self._carry, None
            return ev
        while True:
            ev = stream.try_next()
            if ev is None:
                return None
            split = ev.get("splitEvent")
            if split is None or split["of"] == 1:
                return ev
            self._fragments.append(ev)
            if split["fragment"] == split["of"]:
                ev, self._fragments = merge_fragments(self._fragments), []
                return ev

    def _one_transaction(self, stream, deadline):
        """Apply one transaction's worth of events; returns (events, whether to go on at once)."""
        pos = self.head.position()
        last_ct = tuple(pos["cluster_time"]) if pos["cluster_time"] else None
        count, started = 0, time.monotonic()
        # change segments keep what a consistent head applies (not an initial sync's catch-up)
        log = self._log = _SegmentLog() if self.head.record_segments and self.catch_up_until is None else None
        with self.head.write() as w:
            token, consistent, more, proof = None, False, True, None
            while True:
                ev = self._next(stream)
                if ev is None:  # idle: everything committed so far is applied; the batch's token is past it
                    if stream.resume_token is not None and not self._fragments:
                        token = _raw_token(stream.resume_token)
                    consistent, more, proof = not self._fragments, False, "idle"
                    break
                ctv = ev["clusterTime"]
                ct = (ctv.time, ctv.inc)
                now = time.monotonic()
                if count and last_ct is not None and ct > last_ct and (
                        count >= self.max_batch_events or now - started >= self.max_batch_seconds or now >= deadline):
                    self._carry = ev  # a later cluster time proves last_ct complete: commit a consistent image
                    consistent, proof = True, ct
                    break
                if log is None:
                    self.applier.apply(w, ev, catch_up=self._catch_up(ct, ev))
                else:
                    mark, self._log_ct = len(log.buf), ct
                    if self.applier.apply(w, ev, catch_up=False) != IGNORED:
                        log.add(ct, ev.raw, mark)  # before the refreshes it caused
                self._recopy(w)
                if log is not None and len(log.buf) >= LOG_CHUNK_BYTES:
                    log.cut()
                count += 1
                token, last_ct = bytes(ev["_id"].raw), ct
                if count >= 4 * self.max_batch_events or now >= deadline + 5 * self.max_batch_seconds:
                    break  # inside a huge run of one cluster time: commit, not consistent yet
            if self.catch_up_until is not None:
                if consistent and (proof == "idle" or proof > tuple(self.catch_up_until)):
                    last_ct = max(last_ct or (0, 0), tuple(self.catch_up_until))
                    token = token if token is not None else pos["resume_token"]
                    if self.applier.repair is not None and self.applier.repair.reclone:
                        self.reclone_due, consistent, more = True, False, False  # initial_sync re-clones them
                    else:
                        w.set_sync_state(None)  # past the clone's end: the head is consistent from here on
                        self.catch_up_until = self.applier.repair = None
                else:
                    consistent = False
            if log is not None:  # before set_position: a new timeline starts where the head was
                w.log_frames(log.frames())
            self._log = None
            if token is not None or consistent != pos["consistent"]:
                w.set_position(token if token is not None else pos["resume_token"], last_ct, consistent)
        if count:
            self.stats["events"] += count
            self.stats["transactions"] += 1
        return count, more

    def _catch_up(self, ct, ev):
        if self.catch_up_until is None or ct > tuple(self.catch_up_until):
            return False
        scope = self.applier.repair.scope if self.applier.repair is not None else None
        return scope is None or self.applier._ns(ev.get("ns"))[1] in scope  # pylint: disable=protected-access

    def _recopy(self, w):
        if not self.applier.recopy:
            return
        for ns, dkey, at in self.applier.recopy:
            ik, doc = recopy_document(w, self.client, ns, dkey, at=at)
            if self._log is not None:
                self._log.add(self._log_ct, correction("doc", ns, ik, doc))
            self.stats["recopied"] += 1
        self.applier.recopy = []


LOG_CHUNK_BYTES = 2 << 20  # change-segment records per zstd frame, about
_compressor = []


class _SegmentLog:
    """One transaction's change-segment records, encoded as they come (segments.encode_records' bytes: no object per
    record), cut into zstd frames of about LOG_CHUNK_BYTES that one side thread compresses while the next events are
    applied (zstd releases the GIL: the side thread holds it for nothing else)."""

    def __init__(self):
        self.buf, self.last, self._frames = bytearray(), None, []

    def add(self, ct: tuple, raw: bytes, at: int | None = None) -> None:
        """Record raw at cluster time ct, at offset at of the buffer (before records added since: the refreshes and
        re-copies an event caused follow it) or at the end."""
        if at is None or at == len(self.buf):
            self.buf += RECORD_TIME.pack(*ct)
            self.buf += raw
        else:
            self.buf[at:at] = RECORD_TIME.pack(*ct) + raw
        self.last = ct

    def cut(self) -> None:
        if self.buf:
            if not _compressor:
                _compressor.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kmipbackup-segments"))
            self._frames.append(self.last + (_compressor[0].submit(crypto.compress, self.buf),))  # the side thread's now
            self.buf = bytearray()

    def frames(self) -> list:
        """[(t, i of the last record, zstd frame)] of every record, in order (waits for the side thread)."""
        self.cut()
        return [(t, i, f.result()) for t, i, f in self._frames]


def _raw_token(token):
    return bytes(token.raw) if isinstance(token, RawBSONDocument) else bson_encode(token)


def _id_filter(doc_raw):
    """A raw {_id: <value>} filter from a raw document whose _id is anywhere."""
    t, v = _id_value_raw(doc_raw, "A document key without _id cannot be re-read from the source.")
    body = b"%c_id\x00%s" % (t, v)
    return RawBSONDocument(_i32.pack(len(body) + 5) + body + b"\x00")


def recopy_document(w: Writer, client: pymongo.MongoClient, ns: str, doc_key_raw: bytes,
                    at: Timestamp | None = None) -> tuple[bytes, bytes | None]:
    """Re-read one document from the source into the head (delete it when the source lacks it).

    at (a bson Timestamp, the cluster time the head is being brought to): read the document as of
    that time (a snapshot read, MongoDB 5.0+), so the head holds what the source held then and the
    stream's later events apply on top. Where the server cannot read at that time (history gone,
    an older server) the current document is read: later events then re-apply idempotently, as
    in an initial sync's catch-up, and head verification heals what they cannot.
    Returns (id_key, the raw document written, or None when deleted)."""
    doc = None
    if at is not None:
        try:
            doc = _find_one_at(client, ns, _id_filter(doc_key_raw), at)
        except mongo_errors.OperationFailure as e:
            if e.code not in SNAPSHOT_READ_UNAVAILABLE_CODES:
                raise
            at = None
    if at is None:
        doc = _committed(find_one_raw, client, ns, _id_filter(doc_key_raw))
    ik = id_key_from_document(doc_key_raw)
    if doc is None:
        w.delete(ns, ik)
        return ik, None
    w.upsert(ns, ik, bytes(doc.raw))
    return ik, bytes(doc.raw)


def _find_one_at(client, ns, query, at):
    """The document matching query as of cluster time at (readConcern snapshot), raw; None when absent."""
    db, coll = split_namespace(ns)
    reply = client[db].command({"find": coll, "filter": query, "limit": 1, "singleBatch": True,
                                "readConcern": {"level": "snapshot", "atClusterTime": at}}, codec_options=RAW)
    batch = reply["cursor"]["firstBatch"]
    return batch[0] if batch else None


def verify(head: Head, client: pymongo.MongoClient, sample: int = 100, full: bool = False) -> dict:
    """Compare head and source documents byte for byte; re-copy what differs, delete what the source lacks.

    full=True: every document of every collection (both sides), and the namespaces themselves
    (options and index specs re-read, namespaces missing on either side created or dropped).
    Otherwise `sample` documents per collection from each side ($sample at the source, random
    probes in the head). Returns {"checked", "mismatched", "recopied", "removed",
    "namespaces_fixed"}. Run it while capture is paused (between run_once calls): a document
    changed after the head's position counts as a mismatch and is re-copied, and the stream
    then brings it on as usual."""
    counts = dict.fromkeys(VERIFY_COUNTS + ("namespaces_fixed",), 0)
    with head.read() as r:
        in_head = {n["ns"]: n for n in r.namespaces()}
    if full:
        _verify_namespaces(head, client, in_head, counts)
        with head.read() as r:
            in_head = {n["ns"]: n for n in r.namespaces()}
    for ns in sorted(in_head):
        if parse_options_is_view(in_head[ns]["options"]):
            continue
        if full:
            with head.read() as r:
                head_keys = (k for k, _doc in r.scan(ns))
                _verify_keys(head, client, ns, _chunks(head_keys, 500), counts)
            for batch in _committed_batches(client, ns, {}, 2000):
                _verify_source_batch(head, ns, _split_batch(batch), counts)
        else:
            with head.read() as r:
                probes = _head_probes(r, ns, sample)
            _verify_keys(head, client, ns, [probes], counts)
            docs = _committed(aggregate_raw, client, ns, [{"$sample": {"size": int(sample)}}])
            _verify_source_batch(head, ns, [(id_key_from_document(d.raw), bytes(d.raw)) for d in docs], counts)
    return counts


def _verify_namespaces(head, client, in_head, counts):
    at_source = {ns: _info_to_head(client, ns, info) for ns, info in list_namespaces(client)}
    with head.write() as w:
        heals = []
        for ns in sorted(set(in_head) - set(at_source)):
            counts["removed"] += w.count(ns)
            w.drop_namespace(ns)
            counts["namespaces_fixed"] += 1
            heals.append(correction("ns", ns, info=None))
        for ns, meta in sorted(at_source.items()):
            have = in_head.get(ns)
            if have is None or have["options"] != meta["options"] or have["indexes"] != meta["indexes"]:
                w.create_namespace(ns, meta["options"], uuid=meta["uuid"], indexes=meta["indexes"])
                counts["namespaces_fixed"] += 1
                heals.append(correction("ns", ns, info=meta))
        _log_heals(head, w, heals)


def parse_options_is_view(options_raw: bytes) -> bool:
    return any(name == b"viewOn" for name, _type, _value in parse_elements(options_raw))


def _chunks(it, n):
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _head_probes(r, ns, n):
    keys = []
    first = r.first_key(ns)
    if first is None:
        return keys
    for _i in range(int(n)):
        probe = first[:1] + os.urandom(12)
        row = r.first_key(ns, start=probe) or first
        if row is not None and row not in keys:
            keys.append(row)
    return keys


def _verify_keys(head, client, ns, key_chunks, counts):
    """Check head documents (by id_key) against the source."""
    for keys in key_chunks:
        with head.read() as r:
            docs = [(k, r.get(ns, k)) for k in keys]
        docs = [(k, d) for k, d in docs if d is not None]
        ids = [_id_value_raw(d) for _key, d in docs]
        query = _in_filter(ids)
        src = {}
        for batch in _committed_batches(client, ns, query):
            for k, d in _split_batch(batch):
                src[k] = d
        fixes = []
        for k, d in docs:
            counts["checked"] += 1
            s = src.get(k)
            if s is None or s != d:
                counts["mismatched"] += 1
                fixes.append((k, s))
        if fixes:
            with head.write() as w:
                for k, s in fixes:
                    if s is None:
                        w.delete(ns, k)
                        counts["removed"] += 1
                    else:
                        w.upsert(ns, k, s)
                        counts["recopied"] += 1
                _log_heals(head, w, [correction("doc", ns, k, s) for k, s in fixes])


def _verify_source_batch(head, ns, pairs, counts):
    """Check source documents against the head: missing or different ones are re-copied."""
    with head.read() as r:
        fixes = []
        for k, s in pairs:
            d = r.get(ns, k)
            if d is None or s != d:
                fixes.append((k, s))
    counts["checked"] += len(pairs)
    if fixes:
        counts["mismatched"] += len(fixes)
        counts["recopied"] += len(fixes)
        with head.write() as w:
            for k, s in fixes:
                w.upsert(ns, k, s)
            _log_heals(head, w, [correction("doc", ns, k, s) for k, s in fixes])


def _log_heals(head, w, records):
    """Head verification's heals go into the open change segment (a replay must make them too)."""
    if records and head.record_segments:
        w.log_records([(None, None, r) for r in records])


def _id_value_raw(doc, missing="A head document has no _id."):
    """(type, value bytes) of a raw document's _id; SourceError(missing) without one."""
    for name, t, v in parse_elements(doc):
        if name == b"_id":
            return t, v
    raise SourceError(missing)


def _in_filter(ids):
    """Raw {_id: {$in: [ids...]}} from (type, value bytes) pairs."""
    arr = b"".join(b"%c%d\x00%s" % (t, i, v) for i, (t, v) in enumerate(ids))
    arr = _i32.pack(len(arr) + 5) + arr + b"\x00"
    inner = b"\x04$in\x00" + arr
    inner = _i32.pack(len(inner) + 5) + inner + b"\x00"
    body = b"\x03_id\x00" + inner
    return RawBSONDocument(_i32.pack(len(body) + 5) + body + b"\x00")
