"""Session-wide real servers: a lab PKI, two PyKMIP servers over mutual TLS, and a
SecantusDB (MongoDB wire) server. Started once per test session, stopped by PID."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, ".build", "collections"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import kmipbackup_lab as lab  # noqa: E402

GROUPS = ("group1", "group2")
# scripts/test runs the suite on pytest-xdist workers with --dist loadfile: each module whole on one worker, modules
# handed out in collection order. This module's molecule scenarios and quickstart runs (they share the daemon's
# virtualenv and its pid file) take a third of the suite's time: collected first, they do not start last.
FIRST = ("tests/integration/test_roles_playbooks.py::",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))  # stable: every other test keeps its order


@pytest.fixture(scope="session")
def lab_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lab"))


@pytest.fixture(scope="session")
def pki(lab_dir):
    """Paths of the lab PKI: ca, server, clients[group] (pem/cert/key), reissued,
    encrypted (+password), other_ca, bad{other_ca, expired, no_client_auth, two_cn,
    expiring}, wrong_host (a server certificate for another host name)."""
    return lab.make_pki(os.path.join(lab_dir, "pki"), GROUPS)


def _server(factory, *args, **kw):
    info = factory(*args, **kw)
    return info


@pytest.fixture(scope="session")
def kmip_server(lab_dir, pki):
    """A PyKMIP server on 127.0.0.1: {pid, port, dir, log}."""
    info = lab.start_kmip_server(os.path.join(lab_dir, "kmip1"), pki)
    yield info
    lab.stop(info["pid"])


@pytest.fixture(scope="session")
def kmip_server2(lab_dir, pki):
    """A second, independent PyKMIP server (its own database), for failover tests."""
    info = lab.start_kmip_server(os.path.join(lab_dir, "kmip2"), pki)
    yield info
    lab.stop(info["pid"])


@pytest.fixture(scope="session")
def mongo_server(lab_dir):
    """A SecantusDB server, one-member replica set: {pid, port, uri, dir, log}."""
    info = lab.start_mongo_server(os.path.join(lab_dir, "mongo"))
    yield info
    lab.stop(info["pid"])


@pytest.fixture(scope="session")
def s3_server(lab_dir):
    """A SeaweedFS server (a real S3 server) on loopback: {pid, port, endpoint, access_key, secret_key, dir, log}."""
    info = lab.start_s3_server(os.path.join(lab_dir, "s3"))
    yield info
    lab.stop(info["pid"])


@pytest.fixture(scope="session")
def dead_port():
    """A loopback port nothing listens on."""
    return lab.free_port()


@pytest.fixture
def ansible(tmp_path):
    """Runs tasks through a real ansible-playbook against localhost (see helpers)."""
    from ansible_runner_helper import AnsibleRunner
    return AnsibleRunner(str(tmp_path))
