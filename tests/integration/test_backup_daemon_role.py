"""The backup_daemon role on localhost, into a temporary prefix, as the current user:
a virtualenv with the pinned requirements, 0700 folders, the supervised daemon running,
and a second run that changes nothing; after kill -9 (the daemon left a zombie, as in a
container without an init) a re-run starts it again."""
import ctypes
import getpass
import grp
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import yaml


def _recap(output):
    m = re.search(r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", output)
    assert m, output[-3000:]
    return {"ok": int(m.group(1)), "changed": int(m.group(2)), "failed": int(m.group(4))}


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PR_SET_CHILD_SUBREAPER = 36


def _subreaper(on):
    """Make this process the reaper of its orphaned descendants (the detached daemon), and reap none of them:
    a killed daemon then stays a zombie, as under a container's init that does not reap."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())


def _zombie_children():
    out = []
    for name in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            out.append(int(name))
    return out


def test_role_installs_and_runs_the_daemon(ansible, tmp_path):
    prefix = tmp_path / "prefix"
    # a frozen copy of the collection's code, so the idempotence check does not see edits made meanwhile
    src = tmp_path / "collection"
    shutil.copytree(os.path.join(ROOT, "plugins", "module_utils"), src / "plugins" / "module_utils",
                    ignore=shutil.ignore_patterns("__pycache__"))
    v = {
        "backup_daemon_user": getpass.getuser(),
        "backup_daemon_group": grp.getgrgid(os.getgid()).gr_name,
        "backup_daemon_manage_user": False,
        "backup_daemon_config_dir": str(prefix / "etc/kmipbackup"),
        "backup_daemon_data_dir": str(prefix / "var/lib/kmipbackup"),
        "backup_daemon_log_dir": str(prefix / "var/log/kmipbackup"),
        "backup_daemon_run_dir": str(prefix / "run/kmipbackup"),
        "backup_daemon_install_dir": str(prefix / "opt/kmipbackup"),
        "backup_daemon_python": sys.executable,
        "backup_daemon_service_manager": "supervised",
        "backup_daemon_poll_interval": 0.5,
        "backup_daemon_collection_src": str(src),
    }
    pb = tmp_path / "role.yml"
    pb.write_text(yaml.safe_dump([{"hosts": "localhost", "gather_facts": False,
                                   "roles": [{"role": "kmipbackup.mongodb.backup_daemon"}]}]))
    launcher = prefix / "opt/kmipbackup/bin/kmipbackup-daemon"
    _subreaper(True)
    try:
        check = ansible.run_playbook(str(pb), "--check", extra_vars=v)
        assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
        assert not launcher.exists(), "check mode wrote the launcher"

        first = ansible.run_playbook(str(pb), extra_vars=v, timeout=600)
        assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-3000:]
        assert _recap(first.stdout)["changed"] > 0

        assert subprocess.run([str(launcher), "--status"]).returncode == 0
        pidfile = prefix / "run/kmipbackup/kmipbackup-daemon.pid"
        pid = int(pidfile.read_text())
        for d in ("etc/kmipbackup", "var/lib/kmipbackup", "var/log/kmipbackup", "run/kmipbackup"):
            assert stat.S_IMODE((prefix / d).stat().st_mode) == 0o700, d
        log = prefix / "var/log/kmipbackup/daemon.log"
        deadline = time.monotonic() + 20
        while "daemon started" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "daemon started" in log.read_text()
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        assert (prefix / "opt/kmipbackup/venv/bin/python").exists()
        out = subprocess.run([str(prefix / "opt/kmipbackup/venv/bin/python"), "-c",
                              "import kmip, pymongo, sqlcipher3, zstandard; print(pymongo.version)"],
                             capture_output=True, text=True)
        assert out.stdout.strip() == "4.20.1", out.stderr

        second = ansible.run_playbook(str(pb), extra_vars=v, timeout=600)
        assert second.returncode == 0, second.stdout[-3000:]
        assert _recap(second.stdout)["changed"] == 0, second.stdout[-3000:]
        assert int(pidfile.read_text()) == pid, "an unchanged run restarted the daemon"

        # the supervisor restarts a worker that dies
        worker = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        assert worker, "no worker under the supervisor"
        os.kill(int(worker[0]), 9)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
            if now and now != worker:
                break
            time.sleep(0.3)
        assert now and now != worker, "the supervisor did not restart the worker"

        # kill -9 of the whole daemon (supervisor and worker), left zombies: re-running the role starts it again
        os.killpg(os.getpgid(pid), 9)
        deadline = time.monotonic() + 10
        while pid not in _zombie_children() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid in _zombie_children()
        deadline = time.monotonic() + 10
        while subprocess.run([str(launcher), "--status"]).returncode != 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert subprocess.run([str(launcher), "--status"]).returncode == 3, "a killed daemon still counts as running"
        starts = log.read_text().count("daemon started")  # how often a worker started so far (handlers restart too)
        again = ansible.run_playbook(str(pb), extra_vars=v, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:]
        assert _recap(again.stdout)["changed"] == 1, again.stdout[-3000:]
        status = subprocess.run([str(launcher), "--status"], capture_output=True, text=True)
        restarted = int(pidfile.read_text())
        assert status.returncode == 0 and status.stdout.strip() == "running (pid %d)" % restarted and restarted != pid
        deadline = time.monotonic() + 20
        while log.read_text().count("daemon started") <= starts and time.monotonic() < deadline:
            time.sleep(0.2)
        assert log.read_text().count("daemon started") > starts, "the restarted daemon runs no worker"
        worker = subprocess.run(["pgrep", "-P", str(restarted)], capture_output=True, text=True).stdout.split()
        assert worker and "daemon started (pid %s)" % worker[0] in log.read_text(), "the restarted daemon runs no worker"
        # a second daemon on the same data folder is refused, and the running one is kept
        second = subprocess.run([str(launcher), "--supervise", "--detach"], capture_output=True, text=True)
        assert second.returncode == 1 and "already runs" in second.stderr, second.stderr
        assert int(pidfile.read_text()) == restarted

        stopped = ansible.run_playbook(str(pb), extra_vars=dict(v, backup_daemon_state="stopped"))
        assert stopped.returncode == 0, stopped.stdout[-3000:]
        assert subprocess.run([str(launcher), "--status"]).returncode == 3
    finally:
        if launcher.exists():
            subprocess.run([str(launcher), "--stop"])
        _subreaper(False)
        for z in _zombie_children():
            os.waitpid(z, 0)
