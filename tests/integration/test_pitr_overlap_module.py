"""The point-in-time fast path through the real snapshot_restore module (ansible-playbook, AnsiballZ), keys from a
real KMIP server: the replay process, a fresh interpreter, imports the collection the way the module did, from the
module's zip (the run gets no PYTHONPATH, and the child would ignore one), and the restore equals what the capture's
head held at the point."""
import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, kmip
from daemon_helper import write_kmip_setup
from pitr_overlap_helpers import CANARY, build_lab
from snapshot_helpers import restored_dir


@pytest.fixture(scope="module")
def lab(tmp_path_factory, pki, kmip_server):
    base = tmp_path_factory.mktemp("overlap-module")
    cd = str(base / "etc")
    write_kmip_setup(cd, pki, kmip_server["port"], groups=("group1",))
    client = kmip.KmipClient(config.load_kmip_config(cd), config.load_group(cd, "group1"))
    lab = build_lab(base, provider=client, uid=client.create_master_key("overlap-module"))
    lab.update(pki=pki, kmip_port=kmip_server["port"])
    yield lab
    lab["head"].close()
    client.close()


def test_the_module_takes_the_fast_path_and_its_replay_process_imports_from_the_module_zip(ansible, lab):
    env = ansible.env
    ansible.env = lambda: {k: v for k, v in env().items() if k != "PYTHONPATH"}
    point = max(p for p in lab["images"] if p < lab["ddl"])
    out = str(lab["tmp"] / "module-out")
    r = ansible.run([{"kmipbackup.mongodb.snapshot_restore": dict(
        job="job", store=str(lab["tmp"] / "store"), target_dir=out, config_dir=str(lab["tmp"] / "no-config"),
        data_dir=str(lab["tmp"] / "no-data"), kmip_servers=["127.0.0.1:%d" % lab["kmip_port"]], kmip_ca_file=lab["pki"]["ca"],
        client_cert_file=lab["pki"]["clients"]["group1"]["pem"], point_in_time={"t": point[0], "i": point[1]})}])
    assert not r[0].get("failed"), r[0].get("msg")
    assert r[0]["changed"] and r[0]["replayed"]["path"] == "overlap", r[0]["replayed"]
    assert restored_dir(out) == {ns: docs for ns, docs in lab["images"][point].items() if docs}
    assert CANARY not in r.everything()
