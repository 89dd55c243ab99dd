"""kmip.py against real PyKMIP servers over mutual TLS: keys, both wrap modes, failover,
host-name checks, and one clear error kind per failure."""
import base64
import os
import socket
import time

import pytest

import kmipbackup_lab as lab
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, kmip
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, KmipError


@pytest.fixture(scope="module")
def wrong_host_server(lab_dir, pki):
    """A PyKMIP server whose certificate names kmip.elsewhere.test, not 127.0.0.1/localhost."""
    info = lab.start_kmip_server(os.path.join(lab_dir, "kmip-wrong-host"), pki, server=pki["wrong_host"])
    yield info
    lab.stop(info["pid"], timeout=1)


def kcfg(pki, *servers, **kw):
    kw.setdefault("ca_file", pki["ca"])
    return config.KmipConfig(servers=list(servers), **kw)


def group(path, password=None, key=None):
    return config.GroupConfig("g", path, key, password)


@pytest.fixture(scope="module")
def g1(pki):
    return group(pki["clients"]["group1"]["pem"])


@pytest.fixture(scope="module")
def g2(pki):
    return group(pki["clients"]["group2"]["pem"])


@pytest.fixture(scope="module")
def s1(kmip_server):
    return "127.0.0.1:%d" % kmip_server["port"]


@pytest.fixture(scope="module")
def master(pki, s1, g1):
    with kmip.KmipClient(kcfg(pki, s1), g1) as c:
        return c.create_master_key("core-test-master")


def error(fn):
    with pytest.raises(KmipError) as e:
        fn()
    return e.value


def test_create_key_info_and_access(pki, s1, g1):
    with kmip.KmipClient(kcfg(pki, s1), g1) as c:
        uid = c.create_master_key("core-info")
        assert c.calls == 2  # Create + Activate
        assert c.key_info(uid) == {"uid": uid, "state": "ACTIVE", "name": "core-info"}
        assert c.check_access(uid)["state"] == "ACTIVE"
        assert c.calls == 4


@pytest.mark.parametrize("protocol,mode", [("kmip_1_2", "kmip-gcm"), ("legacy", "rfc5649")])
def test_wrap_unwrap_round_trip(pki, s1, g1, master, protocol, mode):
    data_key = os.urandom(32)
    with kmip.KmipClient(kcfg(pki, s1, protocol=protocol), g1) as c:
        rec = c.wrap(master, data_key)
        assert rec["mode"] == mode and rec["master_key_uid"] == master
        text = repr(rec)
        assert data_key.hex() not in text and base64.b64encode(data_key).decode() not in text
        before = c.calls
        assert c.unwrap(rec) == data_key
        assert c.calls == before + 1  # O(1): one Decrypt or one Get
    # gcm records unwrap whatever the configured protocol; rfc5649 records (which fetch the master key) under kmip_1_2
    # only with allow_legacy_unwrap
    other = "legacy" if protocol == "kmip_1_2" else "kmip_1_2"
    with kmip.KmipClient(kcfg(pki, s1, protocol=other, allow_legacy_unwrap=True), g1) as c:
        assert c.unwrap(rec) == data_key
    with kmip.KmipClient(kcfg(pki, s1, protocol=other), g1) as c:
        if mode == "rfc5649":
            with pytest.raises(IntegrityError, match="does not allow"):
                c.unwrap(rec)
        else:
            assert c.unwrap(rec) == data_key


@pytest.mark.parametrize("field", ["ct", "tag", "iv"])
def test_tampered_gcm_record_fails(pki, s1, g1, master, field):
    with kmip.KmipClient(kcfg(pki, s1), g1) as c:
        rec = c.wrap(master, os.urandom(32))
        raw = bytearray(base64.b64decode(rec[field]))
        raw[0] ^= 0x01
        bad = dict(rec, **{field: base64.b64encode(bytes(raw)).decode()})
        with pytest.raises(IntegrityError, match="failed authentication at the KMIP server"):
            c.unwrap(bad)
        assert len(c.unwrap(rec)) == 32  # the connection stays usable


def test_gcm_record_is_bound_to_its_master_key(pki, s1, g1, master):
    with kmip.KmipClient(kcfg(pki, s1), g1) as c:
        other = c.create_master_key("core-other")
        rec = c.wrap(master, os.urandom(32))
        with pytest.raises(IntegrityError):
            c.unwrap(dict(rec, master_key_uid=other))


def test_tampered_legacy_record_fails(pki, s1, g1, master):
    with kmip.KmipClient(kcfg(pki, s1, protocol="legacy"), g1) as c:
        rec = c.wrap(master, os.urandom(32))
        raw = bytearray(base64.b64decode(rec["wrapped"]))
        raw[-1] ^= 0x01
        with pytest.raises(IntegrityError, match="failed its integrity check"):
            c.unwrap(dict(rec, wrapped=base64.b64encode(bytes(raw)).decode()))


def test_second_identity_denied_vs_not_found(pki, s1, g2, master):
    with kmip.KmipClient(kcfg(pki, s1), g2) as c:
        e = error(lambda: c.check_access(master))
        assert e.kind == "permission_denied" and e.uid == master
        assert "identity group2" in str(e) and "belongs to another identity" in str(e)
        e = error(lambda: c.unwrap({"master_key_uid": master, "mode": "kmip-gcm", "iv": "AAAAAAAAAAAAAAAA",
                                    "ct": "AAAA", "tag": "AAAAAAAAAAAAAAAAAAAAAA=="}))
        assert e.kind == "permission_denied"
        e = error(lambda: c.check_access("987654321"))
        assert e.kind == "not_found" and "no key with UID 987654321" in str(e)


def test_not_active_after_revoke(pki, s1, g1):
    with kmip.KmipClient(kcfg(pki, s1), g1) as c:
        uid = c.create_master_key("core-revoked")
        rec = c.wrap(uid, os.urandom(32))
        c.revoke_key(uid)
        assert c.key_info(uid)["state"] == "DEACTIVATED"
        assert error(lambda: c.check_access(uid)).kind == "not_active"
        assert error(lambda: c.wrap(uid, os.urandom(32))).kind == "not_active"
        assert error(lambda: c.unwrap(rec)).kind == "not_active"


def test_failover_when_first_server_is_down(pki, g1, dead_port, kmip_server2):
    second = "localhost:%d" % kmip_server2["port"]
    t = time.monotonic()
    with kmip.KmipClient(kcfg(pki, "127.0.0.1:%d" % dead_port, second), g1) as c:
        uid = c.create_master_key("failover")
        assert c.server == second
        assert c.unwrap(c.wrap(uid, b"\x01" * 32)) == b"\x01" * 32
    assert time.monotonic() - t < 5  # the dead server is refused at once, not waited for


def test_unreachable_lists_the_servers_tried(pki, g1, dead_port):
    t = time.monotonic()
    e = error(lambda: kmip.KmipClient(kcfg(pki, "127.0.0.1:%d" % dead_port, "localhost:%d" % dead_port,
                                           connect_retries=1), g1).ping())
    elapsed = time.monotonic() - t
    assert e.kind == "unreachable"
    assert "127.0.0.1:%d (connection refused)" % dead_port in str(e) and "localhost:%d" % dead_port in str(e)
    assert "2 attempt(s)" in str(e)
    assert 0.2 <= elapsed < 5  # one backoff between the two rounds


def test_permanent_errors_are_not_retried(pki, g1, wrong_host_server, kmip_server2):
    # a wrong host name on the first server fails at once, without trying the second one
    t = time.monotonic()
    e = error(lambda: kmip.KmipClient(kcfg(pki, "127.0.0.1:%d" % wrong_host_server["port"],
                                           "127.0.0.1:%d" % kmip_server2["port"], connect_retries=5), g1).ping())
    assert e.kind == "hostname_mismatch" and "not valid for the host name 127.0.0.1" in str(e)
    assert e.servers == ["127.0.0.1:%d" % wrong_host_server["port"]]  # the second server was never tried
    assert time.monotonic() - t < 5  # five retries with backoff would take longer


def test_server_certificate_for_another_host_is_rejected(pki, g1, wrong_host_server):
    e = error(lambda: kmip.KmipClient(kcfg(pki, "localhost:%d" % wrong_host_server["port"]), g1).ping())
    assert e.kind == "hostname_mismatch"
    r = kmip.verify_server(kcfg(pki, "x"), "127.0.0.1:%d" % wrong_host_server["port"])
    assert r["ok"] is False and r["kind"] == "hostname_mismatch"


def test_server_not_trusted_by_our_ca(pki, s1, g1):
    e = error(lambda: kmip.KmipClient(kcfg(pki, s1, ca_file=pki["other_ca"]), g1).ping())
    assert e.kind == "untrusted_server" and pki["other_ca"] in str(e)


@pytest.mark.parametrize("name,kind,words", [
    ("other_ca", "unknown_ca", "does not trust the client certificate"),
    ("expired", "bad_client_cert", "as expired"),
    ("no_client_auth", "no_client_auth", "clientAuth extended key usage"),
    ("two_cn", "bad_client_cert", "exactly one common name"),
])
def test_bad_client_certificates_at_the_server(pki, s1, name, kind, words):
    e = error(lambda: kmip.KmipClient(kcfg(pki, s1), group(pki["bad"][name]["pem"])).ping())
    assert e.kind == kind and words in str(e)


def test_encrypted_key_with_and_without_the_right_password(pki, s1):
    enc = pki["encrypted"]
    with kmip.KmipClient(kcfg(pki, s1), group(enc["pem"], enc["password"])) as c:
        assert "1.4" in c.ping()
    for pw in ("wrong", None):
        e = error(lambda pw=pw: kmip.KmipClient(kcfg(pki, s1), group(enc["pem"], pw)).ping())
        assert e.kind == "bad_client_cert" and "client_cert_password" in str(e)


def test_separate_key_file_and_mismatched_key(pki, s1):
    c1, c2 = pki["clients"]["group1"], pki["clients"]["group2"]
    with kmip.KmipClient(kcfg(pki, s1), group(c1["cert"], key=c1["key"])) as c:
        c.ping()
    e = error(lambda: kmip.KmipClient(kcfg(pki, s1), group(c1["cert"], key=c2["key"])).ping())
    assert e.kind == "bad_client_cert" and "does not belong to the certificate" in str(e)


def test_one_connection_for_many_operations_and_reconnect(pki, s1, g1, master):
    with kmip.KmipClient(kcfg(pki, s1), g1) as c:
        rec = c.wrap(master, b"\x02" * 32)
        sock = c._proxy.socket
        for _ in range(50):
            assert c.unwrap(rec) == b"\x02" * 32
        assert c._proxy.socket is sock  # no reconnects
        sock.shutdown(socket.SHUT_RDWR)  # the connection breaks under us
        assert c.unwrap(rec) == b"\x02" * 32
        assert c._proxy.socket is not sock


def test_verify_server(pki, s1):
    r = kmip.verify_server(kcfg(pki, s1), s1)
    assert r["ok"] is True and "verified" in r["reason"]
    r = kmip.verify_server(kcfg(pki, s1, ca_file=pki["other_ca"]), s1)
    assert r["ok"] is False and r["kind"] == "untrusted_server"


def test_verify_server_needs_a_certificate_from_the_server(pki):
    """A listener that accepts and closes (a wrong port, a non-TLS service) is not verified."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]

    def serve():
        for _ in range(4):
            try:
                conn, _addr = listener.accept()
            except OSError:
                return
            conn.recv(4096)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        entry = "127.0.0.1:%d" % port
        r = kmip.verify_server(kcfg(pki, entry), entry)
        assert r["ok"] is False and r["kind"] == "protocol", r
    finally:
        listener.close()
