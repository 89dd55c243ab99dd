# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""`scripts/quickstart --object-store` (issue 11): the script itself, once, on a lab folder of its own (its
ansible-playbook options pass through, so the lab folder and the sample size are overridden; scripts/setup is a
no-op on a set-up checkout). The lab starts its own SeaweedFS server: the playbook owns its servers, so the
session's cannot stand in. The snapshot must land in the lab bucket (and not in a folder), the restore be verified
byte for byte by the playbook, and the bucket's secret appear nowhere in the output."""
import glob
import json
import os
import signal
import subprocess
import sys

import boto3
from botocore.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import kmipbackup_lab as lab_tool  # noqa: E402

# the daemon's virtualenv, installed once per checkout: not the molecule scenarios' one, which must be built from the
# system's Python (their daemon runs as an unprivileged user); the quickstart builds it from the playbook's Python,
# which may live under /root (pyenv) and would then lock the molecule daemons out of their interpreter
DAEMON_INSTALL_DIR = os.path.join(ROOT, ".build", "quickstart-object-store", "daemon")


def _env():
    e = dict(os.environ, ANSIBLE_FORCE_COLOR="0", PY_COLORS="0", NO_COLOR="1", LC_ALL="C.UTF-8")
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    return e


def _stop(lab):
    subprocess.run([os.path.join(DAEMON_INSTALL_DIR, "bin", "kmipbackup-daemon"), "--stop"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120, check=False)
    try:
        with open(os.path.join(lab, "servers", "lab.json")) as f:
            state = json.load(f)
    except FileNotFoundError:
        return
    for name in ("kmip", "mongo", "s3"):
        pid = (state.get(name) or {}).get("pid")
        if pid and pid > 1 and os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)


def test_quickstart_object_store_snapshots_into_the_bucket_and_restores(tmp_path):
    lab = str(tmp_path / "lab")
    cmd = [os.path.join(ROOT, "scripts", "quickstart"), "--object-store", "-e", "quickstart_dir=%s" % lab,
           "-e", "quickstart_documents=800", "-e", "quickstart_daemon_install_dir=%s" % DAEMON_INSTALL_DIR]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=1500, check=False)
        out = p.stdout
        assert p.returncode == 0, out[-6000:]
        assert "restored byte-for-byte; no plaintext in the daemon's folders" in out, out[-6000:]
        with open(os.path.join(lab, "servers", "lab.json")) as f:
            s3 = json.load(f)["s3"]
        assert "Snapshot store: bucket %s, prefix backups, at %s" % (s3["bucket"], s3["endpoint"]) in out
        secret = lab_tool.s3_secret(s3["credentials_file"])
        assert secret and secret not in out
        client = boto3.client("s3", endpoint_url=s3["endpoint"], aws_access_key_id=s3["access_key"],
                              aws_secret_access_key=secret, region_name="us-east-1",
                              config=Config(s3={"addressing_style": "path"}))
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix="backups/")
                for o in page.get("Contents", [])]
        assert "backups/kmipbackup-store.json" in keys
        assert any(k.startswith("backups/quickstart/chunks/") for k in keys), keys
        assert any(k.startswith("backups/quickstart/catalog/") for k in keys), keys
        # the store is the bucket: no snapshot object under the daemon's data folder
        assert not glob.glob(os.path.join(lab, "data", "store", "**", "chunks", "*"), recursive=True)
    finally:
        _stop(lab)
