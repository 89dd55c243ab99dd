#!/usr/bin/env python3
"""Lab servers for tests and the quickstart: a generated PKI, a PyKMIP server, a
SecantusDB (MongoDB wire) server and, on request, a SeaweedFS S3 server with a bucket,
each a real subprocess stopped by PID.

For labs and tests only: the PKI's keys are unencrypted files under the lab folder and
PyKMIP's server is not fit for production (see README, "Production KMIP servers").

    python tools/kmipbackup_lab.py up   --dir DIR [--clients a,b] [--s3 [--bucket B]]   # prints lab.json
    python tools/kmipbackup_lab.py down --dir DIR

lab.json never holds the S3 secret: it names the server's credentials file (s3.credentials_file,
0600), which holds it.
"""
import argparse
import datetime
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_NOW = datetime.datetime.now(datetime.timezone.utc)


def _write_private(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key, password=None):
    enc = (serialization.BestAvailableEncryption(password.encode()) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _pem_cert(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(*cns):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kmipbackup lab")]
                     + [x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns])


def _issue(subject, key, issuer, issuer_key, *, ca=False, eku=None, sans=None,
           not_before=None, not_after=None):
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before or _NOW - datetime.timedelta(minutes=5))
         .not_valid_after(not_after or _NOW + datetime.timedelta(days=365))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                          False, False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(True, False, True, False, False, False, False,
                                          False, False), critical=True)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(folder, clients=("group1", "group2"), server_names=("localhost", "127.0.0.1")):
    """Write a lab PKI under folder (0700) and return a dict of paths.

    clients: one client certificate (clientAuth, CN = name) per group.
    Also writes the bad certificates tests need: other_ca, expired, no_client_auth,
    two_cn, wrong_host (a server certificate for another host name).
    """
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)

    def p(name):
        return os.path.join(folder, name)

    out = {"dir": folder, "clients": {}}

    ca_key = _key()
    ca_name = _name("kmipbackup lab CA")
    ca = _issue(ca_name, ca_key, ca_name, ca_key, ca=True,
                not_after=_NOW + datetime.timedelta(days=3650))
    _write_private(p("ca.pem"), _pem_cert(ca))
    out["ca"] = p("ca.pem")

    def leaf(stem, cns, issuer=ca, issuer_key=ca_key, combined=True, password=None, **kw):
        key = _key()
        cert = _issue(_name(*cns), key, issuer.subject, issuer_key, **kw)
        _write_private(p(stem + ".crt"), _pem_cert(cert))
        _write_private(p(stem + ".key"), _pem_key(key, password))
        if combined:
            _write_private(p(stem + ".pem"), _pem_cert(cert) + _pem_key(key, password))
        return {"pem": p(stem + ".pem"), "cert": p(stem + ".crt"), "key": p(stem + ".key")}

    sans = []
    for n in server_names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    out["server"] = leaf("kmip-server", ["localhost"], combined=False,
                         eku=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans)
    out["wrong_host"] = leaf("wrong-host-server", ["kmip.elsewhere.test"], combined=False,
                             eku=[ExtendedKeyUsageOID.SERVER_AUTH],
                             sans=[x509.DNSName("kmip.elsewhere.test")])
    client_eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
    for cn in clients:
        out["clients"][cn] = leaf("client-" + cn, [cn], eku=client_eku)
    # same identity (CN) as the first client, new key pair: "a new certificate provisioned
    # for that key" in Ops Manager's restore wording
    first = clients[0]
    out["reissued"] = leaf("client-%s-reissued" % first, [first], eku=client_eku)
    out["encrypted"] = leaf("client-%s-encrypted" % first, [first], eku=client_eku,
                            password="lab-password")
    out["encrypted"]["password"] = "lab-password"

    other_key = _key()
    other_name = _name("some other CA")
    other = _issue(other_name, other_key, other_name, other_key, ca=True)
    _write_private(p("other-ca.pem"), _pem_cert(other))
    out["other_ca"] = p("other-ca.pem")
    out["bad"] = {
        "other_ca": leaf("bad-other-ca", [first], issuer=other, issuer_key=other_key,
                         eku=client_eku),
        "expired": leaf("bad-expired", [first], eku=client_eku,
                        not_before=_NOW - datetime.timedelta(days=30),
                        not_after=_NOW - datetime.timedelta(days=1)),
        "no_client_auth": leaf("bad-no-client-auth", [first],
                               eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
        "two_cn": leaf("bad-two-cn", [first, "second"], eku=client_eku),
        "expiring": leaf("expiring", [first], eku=client_eku,
                         not_after=_NOW + datetime.timedelta(days=5)),
    }
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port, proc, timeout, logfile):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited with %s; see %s" % (proc.returncode, logfile))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not listen on port %d within %ss; see %s"
                       % (port, timeout, logfile))


def _bin(name):
    cand = os.path.join(os.path.dirname(sys.executable), name)
    return cand if os.path.exists(cand) else name


def start_kmip_server(folder, pki, port=None, server=None):
    """Start pykmip-server over mutual TLS 1.2. Returns {pid, port, dir, log}."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    policies = os.path.join(folder, "policies")
    os.makedirs(policies, mode=0o700, exist_ok=True)
    port = port or free_port()
    server = server or pki["server"]
    conf = os.path.join(folder, "server.conf")
    with open(conf, "w") as f:
        f.write("[server]\nhostname=127.0.0.1\nport=%d\ncertificate_path=%s\nkey_path=%s\n"
                "ca_path=%s\nauth_suite=TLS1.2\npolicy_path=%s\nenable_tls_client_auth=True\n"
                "logging_level=WARNING\ndatabase_path=%s\n"
                % (port, server["cert"], server["key"], pki["ca"], policies,
                   os.path.join(folder, "pykmip.db")))
    log = os.path.join(folder, "server.log")
    old = os.umask(0o077)  # the server's database holds keys unencrypted
    try:
        with open(os.devnull, "rb") as null, open(log, "ab") as out:
            proc = subprocess.Popen([_bin("pykmip-server"), "-f", conf, "-l", log],
                                    cwd=folder, stdin=null, stdout=out, stderr=out,
                                    start_new_session=True)
    finally:
        os.umask(old)
    _wait_port(port, proc, 30, log)
    return {"pid": proc.pid, "port": port, "dir": folder, "log": log}


def start_mongo_server(folder, port=None, oplog_max_entries=2_000_000):
    """Start SecantusDB (a one-member replica set) on loopback. Returns {pid, port, uri}."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    port = port or free_port()
    log = os.path.join(folder, "server.log")
    conf = os.path.join(folder, "secantusd.toml")  # an explicit, empty config: no discovery
    open(conf, "a").close()
    with open(os.devnull, "rb") as null, open(log, "ab") as out:
        proc = subprocess.Popen(
            [_bin("secantusd-py"), "--config", conf, "--host", "127.0.0.1", "--port", str(port),
             "--storage-path", os.path.join(folder, "data"), "--log-level", "WARNING",
             "--noop-heartbeat-seconds", "1", "--oplog-max-entries", str(oplog_max_entries),
             "--oplog-retention-seconds", "86400"],
            cwd=folder, stdin=null, stdout=out, stderr=out, start_new_session=True)
    _wait_port(port, proc, 30, log)
    return {"pid": proc.pid, "port": port, "dir": folder, "log": log,
            "uri": "mongodb://127.0.0.1:%d/?replicaSet=secantus" % port}


def _free_ports(n):
    """n free loopback ports p whose p + 10000 (SeaweedFS's gRPC twin of every HTTP port) is free too."""
    out = []
    while len(out) < n:
        p = free_port()
        if p + 10000 > 65535 or p in out or p + 10000 in out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        out.append(p)
    return out


def s3_secret(conf):
    """The secret key in a SeaweedFS credentials file (s3.json) that start_s3_server wrote."""
    with open(conf) as f:
        return json.load(f)["identities"][0]["credentials"][0]["secretKey"]


def start_s3_server(folder, port=None, access_key="kmipbackup-lab", secret_key=None):
    """Start SeaweedFS (`weed mini`: a real S3 server) on loopback. Returns {pid, port, endpoint, access_key,
    secret_key, dir, log}; the secret is written to folder/s3.json (0600), the server's credentials file."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    conf = os.path.join(folder, "s3.json")
    if secret_key is None and os.path.exists(conf):
        secret_key = s3_secret(conf)
    secret_key = secret_key or secrets.token_urlsafe(24)
    _write_private(conf, json.dumps({"identities": [{
        "name": "kmipbackup", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}).encode())
    s3, master, filer, volume, webdav = ([port] if port else []) + _free_ports(5 if not port else 4)
    log = os.path.join(folder, "server.log")
    with open(os.devnull, "rb") as null, open(log, "ab") as out:
        proc = subprocess.Popen(
            [_bin("weed"), "mini", "-dir=" + os.path.join(folder, "data"), "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-s3.port=%d" % s3, "-master.port=%d" % master, "-filer.port=%d" % filer, "-volume.port=%d" % volume,
             "-webdav.port=%d" % webdav, "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
             "-s3.config=" + conf],
            cwd=folder, stdin=null, stdout=out, stderr=out, start_new_session=True)
    os.makedirs(os.path.join(folder, "data"), mode=0o700, exist_ok=True)
    _wait_port(s3, proc, 60, log)
    info = {"pid": proc.pid, "port": s3, "endpoint": "http://127.0.0.1:%d" % s3, "access_key": access_key,
            "secret_key": secret_key, "dir": folder, "log": log}
    _wait_s3(info, proc, 60)
    return info


def _wait_s3(info, proc, timeout):
    """Until one S3 call (list buckets) answers: the port opens before the filer behind it is ready."""
    import boto3
    from botocore.config import Config
    client = boto3.client("s3", endpoint_url=info["endpoint"], aws_access_key_id=info["access_key"],
                          aws_secret_access_key=info["secret_key"], region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                        connect_timeout=2, read_timeout=5))
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the S3 server exited with %s; see %s" % (proc.returncode, info["log"]))
        try:
            client.list_buckets()
            return
        except Exception:  # not ready yet
            if time.monotonic() > deadline:
                raise RuntimeError("the S3 server did not answer within %ss; see %s" % (timeout, info["log"])) from None
            time.sleep(0.2)


def ensure_bucket(info, bucket):
    """Create bucket on the lab S3 server unless it exists."""
    import boto3
    from botocore.config import Config
    client = boto3.client("s3", endpoint_url=info["endpoint"], aws_access_key_id=info["access_key"],
                          aws_secret_access_key=info["secret_key"], region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}))
    if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)


def stop(pid, timeout=30):
    """SIGTERM the process group, then SIGKILL after timeout."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:  # not our child: poll for its exit
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, TypeError):
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "status"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--clients", default="group1,group2")
    ap.add_argument("--no-mongo", action="store_true")
    ap.add_argument("--s3", action="store_true", help="also run a SeaweedFS S3 server with a bucket")
    ap.add_argument("--bucket", default="kmipbackup-lab", help="the bucket --s3 creates (default kmipbackup-lab)")
    a = ap.parse_args(argv)
    folder = os.path.abspath(a.dir)
    state_file = os.path.join(folder, "lab.json")
    state = {}
    if os.path.exists(state_file):
        with open(state_file) as f:
            state = json.load(f)
    if a.action == "up":
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if "pki" not in state:
            state["pki"] = make_pki(os.path.join(folder, "pki"), a.clients.split(","))
        kmip = state.get("kmip")
        if not (kmip and _alive(kmip["pid"])):
            state["kmip"] = start_kmip_server(os.path.join(folder, "kmip"), state["pki"],
                                              port=(kmip or {}).get("port"))
        mongo = state.get("mongo")
        if not a.no_mongo and not (mongo and _alive(mongo["pid"])):
            state["mongo"] = start_mongo_server(os.path.join(folder, "mongo"),
                                                port=(mongo or {}).get("port"))
        s3 = state.get("s3")
        if a.s3:
            if not (s3 and _alive(s3["pid"])):  # a restart keeps its port and its secret (in s3.json)
                s3 = start_s3_server(os.path.join(folder, "s3"), port=(s3 or {}).get("port"))
            conf = os.path.join(s3["dir"], "s3.json")
            ensure_bucket(dict(s3, secret_key=s3_secret(conf)), a.bucket)
            state["s3"] = {k: v for k, v in s3.items() if k != "secret_key"}
            state["s3"].update(bucket=a.bucket, credentials_file=conf)
        tmp = state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, state_file)
    elif a.action == "down":
        for name in ("s3", "mongo", "kmip"):
            if name in state:
                stop(state[name]["pid"])
                state[name]["pid"] = None
        if state:
            with open(state_file, "w") as f:
                json.dump(state, f, indent=2)
    print(json.dumps(state, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
