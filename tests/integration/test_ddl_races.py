"""DDL racing an initial sync, and updates whose field order events cannot carry, against the real
SecantusDB server of the session. Each test ends with the head equal to the source, document by
document and byte by byte (test_source_sync.assert_same), indexes and options included."""
import os
import random
import threading
import time

import bson
import pymongo
import pytest

import workload
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import source
from test_source_sync import _kill, _spawn, assert_same, drain, new_head, unique  # noqa: F401 (fixtures below)
from test_source_sync import plain, src  # noqa: F401  pylint: disable=unused-import


@pytest.fixture
def fresh(plain):  # noqa: F811
    """unique database names, dropped after the test (the head captures the whole cluster: keep it small)."""
    names = []

    def make(prefix):
        names.append(unique(prefix))
        return names[-1]
    yield make
    for name in names:
        plain.drop_database(name)


def _docs(prefix, n, start=0):
    return [workload.all_types_doc(start + i, random.Random(i)) | {"_id": "%s-%d" % (prefix, start + i)} for i in range(n)]


def _seed(db, names, n=300):
    for name in names:
        db[name].insert_many(_docs(name, n))
        workload.create_indexes(db[name])


def test_every_ddl_between_the_listing_and_the_clone_ends_equal(tmp_path, plain, src, fresh, monkeypatch):  # noqa: F811
    """The clone reads the collection list once; DDL right after it (before any document is copied)
    must not lose or misplace documents: rename, rename across databases, rename onto an existing
    collection, drop + re-create, dropDatabase + re-create, create of a collection the list lacks,
    and writes to a collection just before it is renamed."""
    d1, d2, d3 = fresh("ddl1"), fresh("ddl2"), fresh("ddl3")
    db1, db3 = plain[d1], plain[d3]
    _seed(db1, ["ren_src", "xdb_src", "recreate", "onto_src", "onto_dst", "ins_ren", "stays"])
    _seed(db3, ["a", "b"], n=100)
    real_list = source.list_namespaces

    def list_then_ddl(client):
        listed = real_list(client)
        db1.ren_src.rename("ren_dst")
        plain.admin.command("renameCollection", "%s.xdb_src" % d1, to="%s.xdb_dst" % d2)
        db1.recreate.drop()
        db1.recreate.insert_many(_docs("recreated", 50, start=1000))
        db1.onto_src.rename("onto_dst", dropTarget=True)
        db1.ins_ren.insert_many(_docs("late", 10, start=5000))
        db1.ins_ren.update_one({"_id": "ins_ren-1"}, {"$set": {"str": "before the rename"}})
        db1.ins_ren.rename("ins_ren_dst")
        plain.drop_database(d3)
        db3.c.insert_many(_docs("c", 20))
        db1.created_late.insert_many(_docs("created_late", 30))
        return listed

    monkeypatch.setattr(source, "list_namespaces", list_then_ddl)
    h = new_head(tmp_path)
    result = source.initial_sync(h, src)
    monkeypatch.undo()
    assert h.position()["consistent"] and h.position()["sync"] is None
    assert result["recloned"] >= 4  # the four rename targets; drops and creates replay exactly from the stream
    for dbname in (d1, d2, d3):
        assert_same(h, src, dbname)
    counts = {ns.split(".", 1)[1]: n for ns, n in _head_counts(h, d1).items()}
    assert counts == {"stays": 300, "ren_dst": 300, "recreate": 50, "onto_dst": 300, "ins_ren_dst": 310,
                      "created_late": 30}
    # capture goes on from the synced head: later changes keep it equal
    db1.ren_dst.rename("ren_again")
    db1.ren_again.insert_one({"_id": "after"})
    drain(h, src)
    assert_same(h, src, d1)
    h.close()


def _head_counts(h, dbname):
    with h.read() as r:
        return {n["ns"]: r.count(n["ns"]) for n in r.namespaces() if n["ns"].startswith(dbname + ".")}


@pytest.mark.parametrize("seed", [1, 2])
def test_renames_at_random_moments_of_an_initial_sync_lose_nothing(tmp_path, plain, src, fresh, seed):  # noqa: F811
    """As reported: seven collections of 300 documents renamed 0.05-1.5 s after the sync began (some
    before their clone, some during it, some after), with writes going on; a filler collection that
    sorts first keeps the clone busy. The head must end equal to the source."""
    dbname = fresh("rnd")
    db = plain[dbname]
    db.aaa_filler.insert_many([{"_id": i, "pad": "x" * 400} for i in range(20000)])
    names = ["c%d" % i for i in range(7)]
    _seed(db, names)
    rnd = random.Random(seed)
    delays = sorted(rnd.uniform(0.05, 1.5) for _ in names)
    errors = []

    def renamer():
        try:
            t0 = time.monotonic()
            for name, delay in zip(names, delays, strict=True):
                time.sleep(max(0.0, t0 + delay - time.monotonic()))
                db[name].insert_many(_docs("pre-rename-" + name, 1, start=9000))
                db[name].rename("renamed_" + name)
        except Exception as e:  # reported by the test thread
            errors.append(e)

    h = new_head(tmp_path)
    t = threading.Thread(target=renamer)
    t.start()
    source.initial_sync(h, src)
    t.join()
    assert not errors
    drain(h, src)
    assert_same(h, src, dbname, gone=names)  # each c<i> was renamed away; the stand-in may mint it back empty
    counts = _head_counts(h, dbname)
    assert sum(counts.get("%s.renamed_%s" % (dbname, n), 0) for n in names) == 7 * 301
    h.close()


def test_resync_killed_midway_under_ddl_converges(tmp_path, plain, src, fresh, mongo_server):  # noqa: F811
    """An initial sync killed (kill -9) at random moments while collections are renamed, created and dropped;
    the next start syncs again and ends equal to the source."""
    dbname = fresh("killddl")
    db = plain[dbname]
    db.aaa_filler.insert_many([{"_id": i, "pad": "y" * 400} for i in range(15000)])
    _seed(db, ["c%d" % i for i in range(4)])
    key = os.urandom(32)
    path = str(tmp_path / "k" / "head.db")
    new_head(tmp_path, "k", key).close()
    stop = threading.Event()
    errors = []

    def ddl():  # a rename, a create and a drop about every 0.2 s, plus document writes
        i = 0
        try:
            wl = workload.Workload(db, seed=3)
            while not stop.is_set():
                name = "c%d" % (i % 4)
                db[name].insert_many(_docs("w", 1, start=10000 + i))
                db[name].rename("moved%d" % i)
                db["moved%d" % i].rename(name)
                db["new%d" % i].insert_many(_docs("n", 5, start=20000 + 5 * i))
                db.drop_collection("new%d" % (i - 2))
                wl.run(5)
                i += 1
                time.sleep(0.2)
        except Exception as e:  # reported by the test thread
            errors.append(e)

    t = threading.Thread(target=ddl)
    t.start()
    rnd = random.Random(7)
    midway = 0
    try:
        for _ in range(3):
            proc = _spawn(path, mongo_server["uri"], "sync", key)
            assert proc.stdout.readline().strip() == b"syncing"
            time.sleep(rnd.uniform(0.1, 0.8))
            _kill(proc)
            h = new_head(tmp_path, "k", key)
            midway += source.needs_initial_sync(h)  # killed before the sync finished: never taken for consistent
            h.close()
        assert midway >= 1, "no kill landed inside an initial sync"
        h = new_head(tmp_path, "k", key)
        if source.needs_initial_sync(h):
            source.initial_sync(h, src)
    finally:
        stop.set()
        t.join()
    assert not errors
    converge(h, src, dbname)
    h.close()


def converge(h, client, dbname, timeout=60):
    """Capture until the head equals the source (assert_same), at most timeout seconds: under load the stand-in's
    change stream can show an empty batch before the last writes are visible to it, so one idle drain is no proof
    that the head has caught up. A lost or misplaced document never converges, and the last comparison fails."""
    deadline = time.monotonic() + timeout
    while True:
        drain(h, client)
        try:
            assert_same(h, client, dbname)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_updates_adding_several_new_fields_are_recopied_byte_equal(tmp_path, plain, src, fresh):  # noqa: F811
    """{$rename, $currentDate} and $set of two new paths under one parent: the source chooses the order of the
    new fields (the stand-in keeps the update's, mongod 5.0+ sorts them), the event lists them in another;
    the head must hold the source's bytes, not the event's order."""
    dbname = fresh("order")
    db = plain[dbname]
    db.c.insert_many([{"_id": i, "f": i, "o": {"x": i}, "keep": "k"} for i in range(200)])
    h = new_head(tmp_path)
    source.initial_sync(h, src)
    for i in range(0, 200, 2):
        db.c.update_one({"_id": i}, {"$rename": {"f": "f2"}, "$currentDate": {"cd": True}})
    for i in range(1, 200, 2):
        db.c.update_one({"_id": i}, {"$set": {"o.zz": i, "o.aa": -i, "top": 1}})
    cap = drain(h, src)
    assert cap.stats["recopied"] >= 200
    assert_same(h, src, dbname)
    assert source.verify(h, src, full=True)["mismatched"] == 0
    h.close()


def test_recopy_reads_as_of_the_event_cluster_time(plain, src, fresh, tmp_path):  # noqa: F811
    """recopy_document asks for the document as of the event's cluster time (readConcern snapshot,
    atClusterTime), the documented way to get what the source held then; a server that cannot serve
    that time falls back to the current document."""
    dbname = fresh("at")
    db = plain[dbname]
    db.c.insert_one({"_id": 1, "v": 1})
    h = new_head(tmp_path)
    source.initial_sync(h, src)
    op_time = plain.admin.command("hello")["operationTime"]
    commands = []

    class Listener(pymongo.monitoring.CommandListener):
        def started(self, event):
            if event.command_name == "find":
                commands.append(event.command)

        def succeeded(self, event):
            pass

        def failed(self, event):
            pass

    c = pymongo.MongoClient("mongodb://%s:%d/" % src.address, event_listeners=[Listener()],
                            document_class=src.codec_options.document_class)
    with h.write() as w:
        source.recopy_document(w, c, dbname + ".c", bson.encode({"_id": 1}), at=op_time)
    c.close()
    assert commands and commands[0]["readConcern"] == {"level": "snapshot", "atClusterTime": op_time}
    assert_same(h, src, dbname)
    h.close()
