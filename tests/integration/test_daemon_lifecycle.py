"""The daemon's start, stop, restart and status by its command line (what the backup_daemon role's launcher and
handler run): the data folder's flock, not a pid, says whether a daemon runs. A SIGKILLed daemon (even one left a
zombie) restarts; a second daemon on one data folder is refused; a stale or reused pid is never signalled; an
orphaned worker of a killed supervisor stops and never runs beside a new one."""
import os
import signal
import subprocess
import sys
import time

import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import daemon, files, timeutil
from daemon_helper import DaemonProcess, alive, launcher, lock_pid, proc_state


@pytest.fixture
def dirs(tmp_path):
    c, d, r = str(tmp_path / "etc"), str(tmp_path / "data"), str(tmp_path / "run")
    for folder in (c, d, r):
        files.ensure_private_dir(folder)
    return c, d, os.path.join(r, "kmipbackup-daemon.pid")


def _log(data_dir):
    try:
        with open(os.path.join(data_dir, "log", "daemon.log")) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _started_pids(data_dir):
    return [int(line.rsplit("(pid ", 1)[1].rstrip(")")) for line in _log(data_dir).splitlines() if "daemon started (pid" in line]


def _wait(predicate, timeout=20, what="condition", data_dir=None):
    assert timeutil.wait_for(predicate, timeout, 0.1), "%s not met within %ss; log:\n%s" % (what, timeout, _log(data_dir)[-3000:] if data_dir else "")


@pytest.fixture
def cleanup():
    """Stop whatever a test started: launched daemons by their data folder, helper processes by pid."""
    folders, procs = [], []
    yield folders, procs
    for c, d in folders:
        launcher(c, d, "--stop")
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_sigkilled_daemon_left_a_zombie_restarts_the_documented_way(dirs, cleanup):
    config_dir, data_dir, pidfile = dirs
    cleanup[0].append((config_dir, data_dir))
    # started by this process and never reaped after kill -9: a zombie that os.kill(pid, 0) still finds, as with a
    # detached daemon in a container without an init
    d = DaemonProcess(config_dir, data_dir, supervise=True, extra_args=["--pidfile", pidfile]).start()
    _wait(lambda: len(_started_pids(data_dir)) == 1, what="first start", data_dir=data_dir)
    first = d.proc.pid
    assert int(files.read_bytes(pidfile)) == first
    os.killpg(first, signal.SIGKILL)
    _wait(lambda: proc_state(first) == "Z", what="zombie")
    for _ in range(3):  # the role's check, then its start, as often as the role is re-run
        st = launcher(config_dir, data_dir, "--status", pidfile=pidfile)
        assert st.returncode == 3 and st.stdout.strip() == "not running", (st.stdout, st.stderr)
        r = launcher(config_dir, data_dir, "--supervise", "--detach", pidfile=pidfile)
        assert r.returncode == 0, r.stderr
        _wait(lambda: launcher(config_dir, data_dir, "--status").returncode == 0, what="restart", data_dir=data_dir)
        new = lock_pid(data_dir)
        assert new != first and alive(new) and int(files.read_bytes(pidfile)) == new
        _wait(lambda: len(_started_pids(data_dir)) >= 2, what="a worker of the restarted daemon", data_dir=data_dir)
        assert launcher(config_dir, data_dir, "--status").stdout.strip() == "running (pid %d)" % new
        os.killpg(os.getpgid(new), signal.SIGKILL)  # detached: its own session, worker included
        _wait(lambda: launcher(config_dir, data_dir, "--status").returncode == 3, what="lock released by kill -9")
    d.proc.wait()


def test_second_daemon_on_one_data_folder_is_refused(dirs, cleanup):
    config_dir, data_dir, pidfile = dirs
    cleanup[0].append((config_dir, data_dir))
    r = launcher(config_dir, data_dir, "--supervise", "--detach", pidfile=pidfile)
    assert r.returncode == 0, r.stderr
    _wait(lambda: launcher(config_dir, data_dir, "--status").returncode == 0, what="start")
    pid = lock_pid(data_dir)
    _wait(lambda: len(_started_pids(data_dir)) == 1, what="worker", data_dir=data_dir)
    for args in (("--supervise", "--detach"), ("--supervise",), ()):
        second = launcher(config_dir, data_dir, *args, pidfile=pidfile, timeout=30)
        assert second.returncode == 1, (args, second.returncode, second.stderr)
        assert second.stderr.strip() == (
            "A Backup Daemon already runs on data folder %s (pid %d holds %s): nothing was started. Stop it first "
            "(--stop), or give this one another --data-dir." % (data_dir, pid, os.path.join(data_dir, "daemon.lock")))
    time.sleep(1)
    assert lock_pid(data_dir) == pid and alive(pid) and int(files.read_bytes(pidfile)) == pid
    assert len(_started_pids(data_dir)) == 1, "a second worker ran on the data folder"
    stop = launcher(config_dir, data_dir, "--stop", pidfile=pidfile)
    assert stop.returncode == 0 and stop.stdout.strip() == "stopped", stop.stderr
    # --stop returns once the lock is released; the supervisor may still be finishing its exit (CI saw it alive once)
    _wait(lambda: not alive(pid), timeout=10, what="the supervisor's exit")
    assert not os.path.exists(pidfile)
    assert launcher(config_dir, data_dir, "--status").returncode == 3


def test_stale_or_reused_pid_is_never_signalled(dirs, cleanup):
    config_dir, data_dir, pidfile = dirs
    bystander = subprocess.Popen(["sleep", "300"])
    cleanup[1].append(bystander)
    # a daemon that died long ago: its pidfile and lock file name a pid the system has given to another process
    with open(pidfile, "w") as f:
        f.write("%d\n" % bystander.pid)
    with open(os.path.join(data_dir, "daemon.lock"), "w") as f:
        f.write("%d\n" % bystander.pid)
    st = launcher(config_dir, data_dir, "--status", pidfile=pidfile)
    assert st.returncode == 3 and st.stdout.strip() == "not running"
    stop = launcher(config_dir, data_dir, "--stop", pidfile=pidfile)
    assert stop.returncode == 0 and stop.stdout.strip() == "not running", stop.stderr
    time.sleep(0.5)
    assert bystander.poll() is None, "--stop signalled a pid that holds no lock"

    # the lock is held, but the pid in it is not the holder's: nothing is signalled, the error says so
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('held', flush=True)\ntime.sleep(300)", os.path.join(data_dir, "daemon.lock")],
                              stdout=subprocess.PIPE, text=True)
    cleanup[1].append(holder)
    assert holder.stdout.readline().strip() == "held"
    stop = launcher(config_dir, data_dir, "--stop", pidfile=pidfile)
    lock = os.path.join(data_dir, "daemon.lock")
    assert stop.returncode == 1
    assert stop.stderr.strip() == (
        "The Backup Daemon lock %s is held by a process that cannot be identified (the pid in the file does not hold "
        "it): nothing was signalled. Find the process with `fuser %s` and stop it." % (lock, lock))
    st = launcher(config_dir, data_dir, "--status")
    assert st.returncode == 0 and st.stdout.strip() == "running (pid unknown)"
    start = launcher(config_dir, data_dir, "--supervise", "--detach", pidfile=pidfile)
    assert start.returncode == 1 and "pid unknown holds" in start.stderr
    time.sleep(0.5)
    assert bystander.poll() is None and holder.poll() is None


def test_orphaned_worker_never_runs_beside_a_new_one(dirs, cleanup):
    config_dir, data_dir, pidfile = dirs
    cleanup[0].append((config_dir, data_dir))
    assert launcher(config_dir, data_dir, "--supervise", "--detach", pidfile=pidfile).returncode == 0
    _wait(lambda: lock_pid(data_dir, "worker.lock") and len(_started_pids(data_dir)) == 1, what="worker", data_dir=data_dir)
    supervisor, worker = lock_pid(data_dir), lock_pid(data_dir, "worker.lock")
    assert worker in _started_pids(data_dir) and worker != supervisor
    # kill -9 of the supervisor alone, its worker frozen so it cannot notice yet: the restarted daemon must wait
    os.kill(worker, signal.SIGSTOP)
    os.kill(supervisor, signal.SIGKILL)
    _wait(lambda: launcher(config_dir, data_dir, "--status").returncode == 3, what="supervisor lock released")
    try:
        assert launcher(config_dir, data_dir, "--supervise", "--detach", pidfile=pidfile).returncode == 0
        _wait(lambda: "waiting for the previous worker (pid %d) to exit" % worker in _log(data_dir), what="new worker waits",
              data_dir=data_dir)
        assert len(_started_pids(data_dir)) == 1 and lock_pid(data_dir, "worker.lock") == worker
    finally:
        os.kill(worker, signal.SIGCONT)
    # the orphan sees its supervisor gone and stops; only then does the new worker run
    _wait(lambda: not alive(worker), what="orphan stops", data_dir=data_dir)
    assert "the supervisor (pid %d) is gone; stopping" % supervisor in _log(data_dir)
    _wait(lambda: len(_started_pids(data_dir)) == 2, what="new worker", data_dir=data_dir)
    new_worker = _started_pids(data_dir)[1]
    assert lock_pid(data_dir, "worker.lock") == new_worker != worker
    lines = _log(data_dir).splitlines()
    exits = [i for i, line in enumerate(lines) if "[%d] daemon stopped" % worker in line]
    starts = [i for i, line in enumerate(lines) if "daemon started (pid %d)" % new_worker in line]
    assert exits and starts and exits[0] < starts[0], "the new worker started before the orphan stopped"
    stop = launcher(config_dir, data_dir, "--stop", pidfile=pidfile)
    assert stop.returncode == 0 and stop.stdout.strip() == "stopped"
    assert not alive(new_worker) and launcher(config_dir, data_dir, "--status").returncode == 3
    assert oct(os.stat(os.path.join(data_dir, "daemon.lock")).st_mode & 0o777) == "0o600"
    assert oct(os.stat(os.path.join(data_dir, "worker.lock")).st_mode & 0o777) == "0o600"


def test_bad_pidfile_folder_starts_nothing(dirs, tmp_path):
    config_dir, data_dir, _ = dirs
    r = launcher(config_dir, data_dir, "--supervise", "--detach", pidfile=str(tmp_path / "missing" / "d.pid"))
    assert r.returncode == 2 and "The folder of --pidfile" in r.stderr and "does not exist" in r.stderr
    assert not os.path.exists(os.path.join(data_dir, "daemon.lock"))


def test_stop_ends_an_orphaned_worker_escalating_to_sigkill(dirs, cleanup):
    config_dir, data_dir, pidfile = dirs
    cleanup[0].append((config_dir, data_dir))
    assert launcher(config_dir, data_dir, "--supervise", "--detach", pidfile=pidfile).returncode == 0
    _wait(lambda: lock_pid(data_dir, "worker.lock") and len(_started_pids(data_dir)) == 1, what="worker", data_dir=data_dir)
    supervisor, worker = lock_pid(data_dir), lock_pid(data_dir, "worker.lock")
    os.kill(worker, signal.SIGSTOP)  # frozen: it can neither notice its supervisor is gone nor handle SIGTERM
    os.kill(supervisor, signal.SIGKILL)
    _wait(lambda: not alive(supervisor), what="supervisor gone")
    assert daemon.lock_holder(os.path.join(data_dir, "worker.lock")) == (True, worker)
    started = time.monotonic()
    assert daemon.stop_daemon(data_dir, timeout=2) is True
    assert 2 <= time.monotonic() - started < 12  # SIGTERM could not act within the timeout: SIGKILL ended it
    assert not alive(worker) and daemon.lock_holder(os.path.join(data_dir, "worker.lock")) == (False, None)
    assert "[%d] daemon stopped" % worker not in _log(data_dir), "the frozen worker cannot have stopped by itself"
    assert daemon.stop_daemon(data_dir, timeout=2) is False


def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_untouched(dirs, tmp_path, cleanup):
    """The lock file is opened for writing and truncated: a link planted in its place (by whoever owns the data
    folder) is refused, never followed, so the file it points to keeps its bytes."""
    config_dir, data_dir, _pidfile = dirs
    cleanup[0].append((config_dir, data_dir))
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    os.symlink(str(victim), os.path.join(data_dir, daemon.LOCK_FILE))
    r = launcher(config_dir, data_dir, "--supervise", "--detach")
    assert r.returncode != 0 and "is a symbolic link" in r.stderr, (r.returncode, r.stderr)
    st = launcher(config_dir, data_dir, "--status")
    assert st.returncode == 4 and "symbolic link" in st.stderr, (st.returncode, st.stderr)
    assert victim.read_bytes() == b"precious\n"
