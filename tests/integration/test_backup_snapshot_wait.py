"""backup_snapshot with wait: true while the job is INACTIVE (its KMIP server unreachable): it fails at once with the
job's last error and withdraws its request, instead of waiting its whole timeout. Real daemon, PyKMIP, SecantusDB and
ansible-playbook."""
import re
import time
import uuid

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import files, job_config, job_requests, source
from daemon_helper import DaemonProcess, write_kmip_setup

BS = "kmipbackup.mongodb.backup_snapshot"
PREFIX = "Job %s is INACTIVE, so the Backup Daemon cannot serve request %s; the job's last error: "


def test_wait_fails_at_once_while_the_job_is_inactive(ansible, tmp_path, pki, kmip_server, mongo_server, dead_port):
    cd, dd = str(tmp_path / "etc"), str(tmp_path / "data")
    files.ensure_private_dir(cd)
    files.ensure_private_dir(dd)
    write_kmip_setup(cd, pki, kmip_server["port"])
    job = "inactive-%s" % uuid.uuid4().hex[:8]
    cfg, _ = job_config.plan_job({"job": job, "group": "group1", "source": {"uri": mongo_server["uri"], "connect_timeout": 3},
                                  "encryption": "enabled", "config_dir": cd, "data_dir": dd, "store": None,
                                  "master_key": {"create": True}, "state": "present"}, None, source.check_source)
    job_config.write_job(cd, cfg)
    write_kmip_setup(cd, pki, dead_port)  # the KMIP server goes away: the job waits for KMIP, INACTIVE
    with DaemonProcess(cd, dd) as d:
        d.wait_status(job, lambda s: s["state"] == "INACTIVE" and "waiting for KMIP" in (s.get("last_error") or ""),
                      timeout=30)
        started = time.monotonic()
        r = ansible.run([{BS: dict(job=job, config_dir=cd, data_dir=dd, timeout=90)}], timeout=200)
        elapsed = time.monotonic() - started
        st = d.status(job)
    res = r[0]
    assert res.get("failed") is True, r.output
    assert elapsed < 30, "waited %.0fs of its 90s timeout" % elapsed
    rid = res["request_id"]
    msg = res["msg"]
    assert msg.startswith(PREFIX % (job, rid)), msg
    assert msg.endswith(". Fix that (the daemon retries by itself) and ask again once the job is STARTED; "
                        "the request was withdrawn."), msg
    last_error = msg[len(PREFIX % (job, rid)):].split(". Fix that")[0]
    # the job's own error, as its status has it (only the retry delay grows meanwhile)
    def same(e):
        return re.sub(r"\(retry in \d+s\)", "", e)
    assert last_error.startswith("waiting for KMIP") and str(dead_port) in last_error, msg
    assert same(last_error) == same(st["last_error"]), (msg, st)
    assert job_requests.pending_requests(dd, job) == [] and job_requests.read_answer(dd, job, rid) is None
