"""The kmip_client role with ansible-core alone: without the lab PKI it loads and runs where community.crypto is not
installed (its lab PKI tasks are included only when asked for), against the real PyKMIP server."""
import os
import stat

import yaml

from ansible_runner_helper import ROOT, AnsibleRunner


def _collections_without_crypto(tmp_path):
    """A collections path that holds this collection and nothing else."""
    colls = tmp_path / "collections"
    (colls / "ansible_collections" / "kmipbackup").mkdir(parents=True)
    os.symlink(ROOT, colls / "ansible_collections" / "kmipbackup" / "mongodb")
    return str(colls)


def test_role_runs_without_community_crypto(tmp_path, pki, kmip_server):
    runner = AnsibleRunner(str(tmp_path))
    colls = _collections_without_crypto(tmp_path)
    base_env = runner.env
    runner.env = lambda: dict(base_env(), ANSIBLE_COLLECTIONS_PATH=colls, ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false")
    etc = tmp_path / "etc"
    client = pki["clients"]["group1"]
    v = {"kmipbackup_config_dir": str(etc),
         "kmipbackup_kmip": {"servers": ["127.0.0.1"], "port": kmip_server["port"], "ca_file": str(etc / "pki/ca.pem"),
                             "ca_src": pki["ca"], "connect_timeout": 3, "connect_retries": 0},
         "kmipbackup_groups": [{"name": "group1", "client_cert_file": str(etc / "pki/group1.pem"),
                                "client_cert_src": client["pem"]}]}
    pb = tmp_path / "role.yml"
    pb.write_text(yaml.safe_dump([{"hosts": "localhost", "gather_facts": False,
                                   "roles": [{"role": "kmipbackup.mongodb.kmip_client"}]}]))
    # the environment really lacks it: asking for the lab PKI fails on the missing collection
    lab = runner.run_playbook(str(pb), extra_vars=dict(v, kmip_client_lab_pki=True))
    assert lab.returncode != 0 and "community.crypto" in lab.stdout + lab.stderr, lab.stdout[-2000:] + lab.stderr[-2000:]

    r = runner.run_playbook(str(pb), extra_vars=v)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "failed=0" in r.stdout and not (etc / "lab-pki").exists()
    with open(pki["ca"], "rb") as f:
        assert (etc / "pki/ca.pem").read_bytes() == f.read()
    assert stat.S_IMODE((etc / "pki/group1.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((etc / "pki").stat().st_mode) == 0o700
    kmip_yml = yaml.safe_load((etc / "kmip.yml").read_text())
    assert kmip_yml["ca_file"] == str(etc / "pki/ca.pem") and (etc / "groups/group1.yml").exists()
