"""Source cases beyond the session's plain replica set, each against a real SecantusDB started here
(module scope, shared by this file's tests): SCRAM authentication, TLS (with a client certificate), MONGODB-X509,
a lost resume point (small oplog, forced prune) and a standalone server."""
import os
import subprocess
import time

import pymongo
import pytest

import kmipbackup_lab as lab
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, rawbson, source
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import HistoryLostError, SourceError

USER, PASSWORD = "backup", "Bk-s3cret-pw-77"


def _start(folder, *extra, port=None):
    """secantusd-py on loopback with an explicit empty config; returns {pid, port, uri}."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    port = port or lab.free_port()
    conf = os.path.join(folder, "secantusd.toml")
    open(conf, "a").close()
    log = os.path.join(folder, "server.log")
    with open(os.devnull, "rb") as null, open(log, "ab") as out:
        proc = subprocess.Popen([lab._bin("secantusd-py"), "--config", conf, "--host", "127.0.0.1", "--port", str(port),
                                 "--storage-path", os.path.join(folder, "data"), "--log-level", "WARNING",
                                 "--noop-heartbeat-seconds", "1", *extra],
                                cwd=folder, stdin=null, stdout=out, stderr=out, start_new_session=True)
    lab._wait_port(port, proc, 30, log)
    return {"pid": proc.pid, "port": port, "uri": "mongodb://127.0.0.1:%d/?replicaSet=secantus" % port}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A SecantusDB with --auth and a user (created without auth first, then restarted with --auth)."""
    folder = str(tmp_path_factory.mktemp("mongo-auth"))
    info = _start(folder)
    try:
        c = pymongo.MongoClient(info["uri"], serverSelectionTimeoutMS=10000)
        c.admin.command("createUser", USER, pwd=PASSWORD, roles=["root"])
        c.close()
    finally:  # a failed set-up must not leave the server running
        lab.stop(info["pid"])
    info = _start(folder, "--auth", port=info["port"])
    yield info
    lab.stop(info["pid"])


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki):
    """A SecantusDB over TLS with the lab CA's server certificate (127.0.0.1); client certificates optional."""
    info = _start(str(tmp_path_factory.mktemp("mongo-tls")), "--tls-cert-file", pki["server"]["cert"],
                  "--tls-key-file", pki["server"]["key"], "--tls-ca-file", pki["ca"])
    yield info
    lab.stop(info["pid"])


@pytest.fixture(scope="module")
def x509_server(tmp_path_factory, pki):
    """A SecantusDB over mutual TLS with --auth, where group1's client certificate is a MONGODB-X509 user
    (created before auth is switched on, as with the SCRAM user)."""
    from cryptography import x509
    folder = str(tmp_path_factory.mktemp("mongo-x509"))
    tls = ("--tls-cert-file", pki["server"]["cert"], "--tls-key-file", pki["server"]["key"], "--tls-ca-file", pki["ca"],
           "--tls-require-client-cert")
    info = _start(folder, *tls)
    try:
        with open(pki["clients"]["group1"]["cert"], "rb") as f:
            subject = x509.load_pem_x509_certificate(f.read()).subject.rfc4514_string()
        c = pymongo.MongoClient(info["uri"], tls=True, tlsCAFile=pki["ca"], tlsCertificateKeyFile=pki["clients"]["group1"]["pem"],
                                serverSelectionTimeoutMS=10000)
        # mechanisms: the stand-in asks for it on $external (mongod infers it); the product never creates users
        c["$external"].command("createUser", subject, roles=[{"role": "root", "db": "admin"}], mechanisms=["MONGODB-X509"])
        c.close()
    finally:  # a failed set-up must not leave the server running
        lab.stop(info["pid"])
    info = _start(folder, *tls, "--auth", port=info["port"])
    yield dict(info, subject=subject)
    lab.stop(info["pid"])


@pytest.fixture(scope="module")
def small_oplog_server(tmp_path_factory):
    info = _start(str(tmp_path_factory.mktemp("mongo-oplog")), "--oplog-max-entries", "50")
    yield info
    lab.stop(info["pid"])


def _sync_and_compare(h, client, plain_db):
    """Initial sync into h, then every head document of plain_db's collections is byte-equal to the source."""
    result = source.initial_sync(h, client)
    assert h.position()["consistent"] and not source.needs_initial_sync(h)
    dbname = plain_db.name
    for name in plain_db.list_collection_names():
        want = []
        for batch in client[dbname][name].find_raw_batches({}):
            want.extend(source._split_batch(batch))
        with h.read() as r:
            got = list(r.scan("%s.%s" % (dbname, name)))
        assert got == sorted(want) and want
    return result


def test_wrong_credentials_are_refused_clearly_without_the_password(auth_server, tmp_path):
    for src in ({"uri": auth_server["uri"], "username": USER, "password": "wrong-" + PASSWORD},
                {"uri": auth_server["uri"].replace("//", "//%s:%s@" % (USER, "not" + PASSWORD), 1)},
                {"uri": auth_server["uri"]}):  # no credentials at all: not authorized
        with pytest.raises(SourceError) as e:
            source.connect(dict(src, connect_timeout=5))
        msg = str(e.value)
        assert "credentials" in msg and "source.username" in msg, msg
        assert PASSWORD not in msg and "wrong-" not in msg


def test_right_credentials_sync(auth_server, tmp_path):
    admin = pymongo.MongoClient(auth_server["uri"], username=USER, password=PASSWORD)
    admin.authdb.c.insert_many([{"_id": i, "v": "x" * i} for i in range(200)])
    client = source.connect({"uri": auth_server["uri"], "username": USER, "password": PASSWORD, "auth_source": "admin",
                             "auth_mechanism": "SCRAM-SHA-256", "connect_timeout": 5})
    h = head.Head(str(tmp_path / "h" / "head.db"), os.urandom(32))
    assert _sync_and_compare(h, client, admin.authdb)["docs"] >= 200
    admin.authdb.c.update_one({"_id": 3}, {"$set": {"v": "changed"}})
    cap = source.Capture(h, client)
    deadline = time.monotonic() + 30
    with h.read() as r:
        before = r.get("authdb.c", rawbson.id_key_from_value(3))
    while True:
        cap.run_once(max_time=1.0)
        with h.read() as r:
            doc = r.get("authdb.c", rawbson.id_key_from_value(3))
        if doc != before or time.monotonic() > deadline:
            break
    cap.close()
    assert doc == bytes(client.authdb.c.find_one({"_id": 3}).raw) != before
    h.close()
    client.close()
    admin.close()


def test_tls_source_with_ca_and_client_certificate(tls_server, pki, tmp_path):
    settings = {"uri": tls_server["uri"], "tls": True, "tls_ca_file": pki["ca"], "connect_timeout": 5}
    plain = pymongo.MongoClient(tls_server["uri"], tls=True, tlsCAFile=pki["ca"])
    plain.tlsdb.c.insert_many([{"_id": i, "n": i} for i in range(100)])
    for extra in ({}, {"tls_certificate_key_file": pki["clients"]["group1"]["pem"]}):
        client = source.connect(dict(settings, **extra))
        h = head.Head(str(tmp_path / ("h%d" % len(extra)) / "head.db"), os.urandom(32))
        assert _sync_and_compare(h, client, plain.tlsdb)["docs"] >= 100
        h.close()
        client.close()
    plain.close()


def test_x509_source_syncs_and_an_unknown_certificate_is_refused(x509_server, pki, tmp_path):
    settings = {"uri": x509_server["uri"], "tls": True, "tls_ca_file": pki["ca"], "auth_mechanism": "MONGODB-X509",
                "auth_source": "$external", "connect_timeout": 5}
    admin = pymongo.MongoClient(x509_server["uri"], tls=True, tlsCAFile=pki["ca"], authMechanism="MONGODB-X509",
                                tlsCertificateKeyFile=pki["clients"]["group1"]["pem"])
    admin.x509db.c.insert_many([{"_id": i, "n": i} for i in range(100)])
    client = source.connect(dict(settings, tls_certificate_key_file=pki["clients"]["group1"]["pem"]))
    h = head.Head(str(tmp_path / "h" / "head.db"), os.urandom(32))
    assert _sync_and_compare(h, client, admin.x509db)["docs"] >= 100
    h.close()
    client.close()
    # group2's certificate is trusted for TLS but is no user of the server
    with pytest.raises(SourceError) as e:
        source.connect(dict(settings, tls_certificate_key_file=pki["clients"]["group2"]["pem"]))
    assert "credentials" in str(e.value) or "authentication" in str(e.value).lower(), str(e.value)
    admin.close()


def test_tls_source_with_the_wrong_ca_fails_clearly(tls_server, pki):
    with pytest.raises(SourceError) as e:
        source.connect({"uri": tls_server["uri"], "tls": True, "tls_ca_file": pki["other_ca"], "connect_timeout": 3})
    msg = str(e.value)
    assert "cannot be reached" in msg and "tls_ca_file" in msg, msg
    assert "certificate verify failed" in msg.lower() or "ssl" in msg.lower(), msg
    with pytest.raises(SourceError, match="cannot be reached"):  # TLS off against a TLS server
        source.connect({"uri": tls_server["uri"], "connect_timeout": 3})


def test_lost_resume_point_raises_and_a_new_initial_sync_rebuilds_the_head(small_oplog_server, tmp_path):
    plain = pymongo.MongoClient(small_oplog_server["uri"])
    coll = plain.lostdb.c
    coll.insert_many([{"_id": i, "v": 0} for i in range(20)])
    client = source.connect({"uri": small_oplog_server["uri"], "connect_timeout": 5})
    key = os.urandom(32)
    path = str(tmp_path / "h" / "head.db")
    h = head.Head(path, key)
    source.initial_sync(h, client)
    token = h.position()["resume_token"]
    h.close()
    # "the daemon" is down while the source writes far more than its oplog keeps, then prunes
    for i in range(300):
        coll.update_one({"_id": i % 20}, {"$set": {"v": i}})
    coll.insert_many([{"_id": 100 + i} for i in range(100)])
    assert plain.admin.command("secantusAdmin.pruneOplog")["ok"] == 1
    with pytest.raises(HistoryLostError, match="initial sync"):
        source._open_stream(client, token).close()  # resumeAfter a pruned token: 286 on the stand-in
    h = head.Head(path, key)
    assert not source.needs_initial_sync(h)
    cap = source.Capture(h, client)
    with pytest.raises(HistoryLostError, match="new initial sync is needed"):
        cap.run_once(max_time=1.0)
    cap.close()
    h.close()
    h = head.Head(path, key)  # the mark survives a restart: the daemon re-syncs instead of retrying the resume
    assert source.needs_initial_sync(h)
    _sync_and_compare(h, client, plain.lostdb)
    with h.read() as r:
        assert r.count("lostdb.c") == 120
    h.close()
    client.close()
    plain.close()


def test_standalone_is_refused_with_a_clear_message(tmp_path):
    info = _start(str(tmp_path / "standalone"), "--standalone")
    try:
        with pytest.raises(SourceError, match="standalone") as e:
            source.connect({"uri": "mongodb://127.0.0.1:%d/" % info["port"], "connect_timeout": 5})
        assert "replica set" in str(e.value)
    finally:
        lab.stop(info["pid"])
