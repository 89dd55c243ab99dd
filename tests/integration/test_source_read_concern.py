"""What the head copies from the source is read at majority read concern, as the change stream delivers only
majority-committed changes: a write that is later rolled back is never copied, since no event would take it out of the
head again. The clone's reads also wait for the source's majority point to pass the change stream's start, so a write
from before the start is in the clone once it is committed. The commands are observed as pymongo sends them to the
session's real SecantusDB server (a one-member replica set cannot roll back, so what is checked is what we ask for)."""
import os
import uuid

import pymongo
from bson.timestamp import Timestamp
from pymongo import monitoring

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, mongo, rawbson, source

HOSTILE = "odd..name"  # a name pymongo's Collection refuses: read through raw find commands


class Reads(monitoring.CommandListener):
    """The find and aggregate commands sent on one database: (command, collection, readConcern or None)."""

    def __init__(self, dbname):
        self.dbname, self.seen = dbname, []

    def started(self, event):
        if event.database_name == self.dbname and event.command_name in ("find", "aggregate"):
            self.seen.append((event.command_name, event.command[event.command_name], event.command.get("readConcern")))

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


def _now(client):
    hello = client.admin.command("hello")
    return max((t.time, t.inc) for t in (hello["$clusterTime"]["clusterTime"], hello["operationTime"]))


def test_clone_and_verification_read_majority_committed_data(tmp_path, mongo_server):
    dbname = "rc_%s" % uuid.uuid4().hex[:8]
    plain = pymongo.MongoClient(mongo_server["uri"])
    reads = Reads(dbname)
    client = pymongo.MongoClient(mongo_server["uri"], event_listeners=[reads],
                                 **mongo.client_options({"uri": mongo_server["uri"], "connect_timeout": 10}))
    h = head.Head(str(tmp_path / "head" / "head.db"), os.urandom(32))
    try:
        for name in ("a", "b", HOSTILE):
            plain[dbname].command({"insert": name, "documents": [{"_id": i, "v": "%s-%d" % (name, i)} for i in range(300)]})
        before = _now(plain)

        source.initial_sync(h, client)
        finds = [(coll, rc) for cmd, coll, rc in reads.seen if cmd == "find"]
        assert sorted({coll for coll, _rc in finds}) == sorted(["a", "b", HOSTILE]), reads.seen
        for coll, rc in finds:  # every clone read, both pymongo's Collection path and the raw command path
            assert rc is not None and rc["level"] == "majority", (coll, rc)
            assert rc["afterClusterTime"] >= Timestamp(*before), (coll, rc, before)
        with h.read() as r:
            for name in ("a", "b", HOSTILE):
                ns = "%s.%s" % (dbname, name)
                want = sorted((rawbson.id_key_from_document(d.raw), bytes(d.raw)) for d in plain[dbname].command(
                    {"find": name, "filter": {}, "batchSize": 1000}, codec_options=mongo.RAW)["cursor"]["firstBatch"])
                assert sorted((bytes(k), bytes(d)) for k, d in r.scan(ns)) == want, ns

        reads.seen.clear()
        assert source.verify(h, client, full=True)["mismatched"] == 0
        assert source.verify(h, client, sample=20)["mismatched"] == 0
        kinds = {cmd for cmd, _coll, _rc in reads.seen}
        assert kinds == {"find", "aggregate"}, reads.seen  # the full scan and key look-ups; the $sample
        for cmd, coll, rc in reads.seen:
            assert rc is not None and rc["level"] == "majority", (cmd, coll, rc)
    finally:
        h.close()
        plain.drop_database(dbname)
        client.close()
        plain.close()
