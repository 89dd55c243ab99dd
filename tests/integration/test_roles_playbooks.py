# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Roles and playbooks through the real tools: ansible-doc, ansible-lint, molecule scenarios
(each starts what it needs: lab PyKMIP and SecantusDB servers, the daemon), and the quickstart
playbook run twice on its own lab folder."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
ROLES = sorted(os.listdir(os.path.join(ROOT, "roles")))
SCENARIOS = sorted(d for d in os.listdir(os.path.join(ROOT, "molecule"))
                   if os.path.exists(os.path.join(ROOT, "molecule", d, "molecule.yml")))
# the daemon's virtualenv is shared with the molecule scenarios: installed once per checkout
DAEMON_INSTALL_DIR = os.path.join(ROOT, ".build", "molecule", "daemon")


def tool(name):
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        path = shutil.which(name)
    if not path:
        pytest.fail("%s is not installed: run scripts/setup (requirements/test.txt pins it)" % name)
    return path


def env():
    e = dict(os.environ)
    e.update(ANSIBLE_COLLECTIONS_PATH=os.path.join(ROOT, ".build", "collections"), ANSIBLE_LOCALHOST_WARNING="false",
             ANSIBLE_FORCE_COLOR="0", PY_COLORS="0", NO_COLOR="1", LC_ALL="C.UTF-8")
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    return e


def run(argv, timeout=900, extra_env=None):
    p = subprocess.run(argv, cwd=ROOT, env=dict(env(), **(extra_env or {})), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return p.returncode, p.stdout


def recap(output):
    """{'ok': n, 'changed': n, 'failed': n, ...} of the last PLAY RECAP line for localhost."""
    lines = [line for line in output.splitlines() if re.match(r"^localhost\s+:\s+ok=", line)]
    assert lines, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1])}


@pytest.mark.parametrize("role", ROLES)
def test_ansible_doc_renders_role(role):
    rc, out = run([tool("ansible-doc"), "-t", "role", "kmipbackup.mongodb." + role])
    assert rc == 0, out
    assert re.search(r"ENTRY POINT:\W*main", out) and "Options (= indicates it is required)" in out, out


def test_encrypted_job_argument_spec_rejects_bad_inventory(tmp_path):
    play = tmp_path / "play.yml"
    play.write_text(
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role: {name: kmipbackup.mongodb.encrypted_job}\n"
        "      vars:\n"
        "        kmipbackup_kmip: {servers: [kmip.example.com], ca_file: /nonexistent/ca.pem}\n"
        "        kmipbackup_groups: [{name: g, client_cert_file: /nonexistent/g.pem}]\n"
        "        kmipbackup_jobs: [{name: j, group: g, source: {uri: 'mongodb://x'}, encryption: sometimes}]\n")
    inv = tmp_path / "inv.ini"
    inv.write_text("localhost ansible_connection=local ansible_python_interpreter=%s\n" % sys.executable)
    rc, out = run([tool("ansible-playbook"), "-i", str(inv), str(play)])
    assert rc != 0
    assert "encryption" in out and "sometimes" in out and "validate" in out.lower(), out


def test_ansible_lint_production_profile():
    rc, out = run([tool("ansible-lint"), "--profile", "production", "--offline", "roles/", "playbooks/", "molecule/",
                   "examples/"])
    assert rc == 0, out


@pytest.mark.parametrize("playbook", ["site", "rotate_master_key", "quickstart", "restore"])
def test_playbook_syntax(playbook):
    if not os.path.exists(os.path.join(ROOT, "playbooks", playbook + ".yml")):
        pytest.fail("playbooks/%s.yml is missing" % playbook)
    rc, out = run([tool("ansible-playbook"), "--syntax-check", "-i", "examples/inventory/hosts.yml",
                   "kmipbackup.mongodb." + playbook])
    assert rc == 0, out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario(scenario, tmp_path):
    # molecule keeps its state ("prepared", ...) under ~/.ansible/tmp, keyed by the checkout
    # folder's name only: a fresh folder per run keeps a stale state from skipping prepare
    rc, out = run([tool("molecule"), "test", "-s", scenario], timeout=1500,
                  extra_env={"MOLECULE_EPHEMERAL_DIRECTORY": str(tmp_path / "molecule")})
    assert rc == 0, out[-6000:]
    for step in ("converge", "idempotence", "verify"):
        assert re.search(r"%s\W+%s: Executed: Successful" % (scenario, step), out), out[-6000:]


def _kill_lab(lab):
    try:
        with open(os.path.join(lab, "servers", "lab.json")) as f:
            state = json.load(f)
    except FileNotFoundError:
        return
    for name in ("kmip", "mongo"):
        pid = (state.get(name) or {}).get("pid")
        if pid and pid > 1 and os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart playbook run twice on its own lab folder: {lab, first, second}."""
    lab = str(tmp_path_factory.mktemp("quickstart") / "lab")
    cmd = [tool("ansible-playbook"), "-i", "playbooks/inventory/quickstart.yml", "kmipbackup.mongodb.quickstart",
           "-e", "quickstart_dir=%s" % lab, "-e", "quickstart_documents=800",
           "-e", "quickstart_daemon_install_dir=%s" % DAEMON_INSTALL_DIR]
    try:
        out = {"lab": lab}
        rc, out["first"] = run(cmd, timeout=1500)
        assert rc == 0, out["first"][-6000:]
        rc, out["second"] = run(cmd, timeout=900)
        assert rc == 0, out["second"][-6000:]
        yield out
    finally:
        subprocess.run([os.path.join(DAEMON_INSTALL_DIR, "bin", "kmipbackup-daemon"), "--stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        _kill_lab(lab)


def test_quickstart_restores_and_verifies(quickstart):
    assert "restored byte-for-byte; no plaintext in the daemon's folders" in quickstart["first"]
    assert "Stop the daemon:" in quickstart["first"]
    with open(os.path.join(quickstart["lab"], "restoreInfo-quickstart.txt")) as f:
        assert "quickstart" in f.read()


def test_quickstart_second_run_unchanged(quickstart):
    # servers, data, daemon, job, snapshot and restore are all kept
    assert recap(quickstart["second"])["changed"] == 0, quickstart["second"][-6000:]
    assert "restored byte-for-byte" in quickstart["second"]


def test_rotate_master_key_playbook(quickstart, tmp_path):
    lab = quickstart["lab"]
    with open(os.path.join(lab, "servers", "lab.json")) as f:
        servers = json.load(f)
    inventory = {"all": {"hosts": {"localhost": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "kmipbackup_config_dir": os.path.join(lab, "etc"), "kmipbackup_data_dir": os.path.join(lab, "data"),
        "kmipbackup_python": os.path.join(DAEMON_INSTALL_DIR, "venv", "bin", "python"),
        "kmipbackup_jobs": [{"name": "quickstart", "group": "group1", "source": {"uri": servers["mongo"]["uri"]},
                             "encryption": "enabled"}]}}}}
    inv = tmp_path / "inventory.json"
    inv.write_text(json.dumps(inventory))
    rc, out = run([tool("ansible-playbook"), "-i", str(inv), "kmipbackup.mongodb.rotate_master_key",
                   "-e", "target=localhost", "-e", "job=quickstart"])
    assert rc == 0, out[-6000:]
    new = re.search(r"job quickstart: new master key UUID (\S+)", out)
    keep = re.search(r"keep in the KMIP server \(retained snapshots need them\): ([^\"]+)", out)
    assert new and keep, out[-6000:]
    old = re.search(r'"master key UUID: ([^"]+)"', quickstart["first"]).group(1)
    # the quickstart's snapshot was taken under the old key: it must still be listed
    assert new.group(1) != old and old in [u.strip() for u in keep.group(1).split(",")], out[-6000:]

    # by group: every job of group1 (the quickstart job) gets another new key; the first key is still needed
    # (the quickstart's snapshot was taken under it)
    rc, out = run([tool("ansible-playbook"), "-i", str(inv), "kmipbackup.mongodb.rotate_master_key",
                   "-e", "target=localhost", "-e", "group=group1"])
    assert rc == 0, out[-6000:]
    newer = re.search(r"job quickstart: new master key UUID (\S+)", out)
    keep = re.search(r"keep in the KMIP server \(retained snapshots need them\): ([^\"]+)", out)
    assert newer and keep and newer.group(1) not in (old, new.group(1)), out[-6000:]
    assert old in [u.strip() for u in keep.group(1).split(",")], out[-6000:]
