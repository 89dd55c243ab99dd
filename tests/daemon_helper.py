"""Start and stop a Backup Daemon subprocess for tests, and set up a KMIP/group configuration.

    d = DaemonProcess(config_dir, data_dir).start()
    d.wait_status(job, lambda st: st["state"] == "STARTED", timeout=60)
    d.stop()          # SIGTERM, then SIGKILL after a timeout
    d.kill()          # kill -9 (crash drills)
"""
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "ansible_collections.kmipbackup.mongodb.plugins.module_utils.daemon"


def write_kmip_setup(config_dir, pki, kmip_port, groups=("group1",), protocol="kmip_1_2"):
    """kmip.yml and groups/<group>.yml through config.py's own writers."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config
    config.save_kmip_config(config_dir, config.KmipConfig(servers=["127.0.0.1:%d" % kmip_port], ca_file=pki["ca"],
                                                          connect_timeout=2, connect_retries=0, protocol=protocol))
    for g in groups:
        c = pki["clients"][g]
        config.save_group(config_dir, config.GroupConfig(group=g, client_cert_file=c["cert"], client_key_file=c["key"]))


def read_status(data_dir, job):
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import job_status
    return job_status.read_status(data_dir, job)


class DaemonProcess:
    def __init__(self, config_dir, data_dir, poll_interval=0.3, supervise=False, extra_args=()):
        self.config_dir, self.data_dir = config_dir, data_dir
        self.poll_interval, self.supervise, self.extra_args = poll_interval, supervise, list(extra_args)
        self.proc = None
        self.out_files = []  # the daemon's stdout/stderr, one file per start
        # the daemon's TMPDIR, its own so canary scans cover any temporary file it (or SQLite) makes
        self.tmp_dir = os.path.join(os.path.dirname(data_dir.rstrip("/")) or ".", "daemon-tmp")

    @property
    def log_file(self):
        return os.path.join(self.data_dir, "log", "daemon.log")

    def env(self):
        env = dict(os.environ)
        path = os.path.join(ROOT, ".build", "collections")
        env["PYTHONPATH"] = path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        env["TMPDIR"] = self.tmp_dir
        return env

    def start(self):
        cmd = [sys.executable, "-m", MODULE, "--config-dir", self.config_dir, "--data-dir", self.data_dir,
               "--poll-interval", str(self.poll_interval), "--log-level", "DEBUG"] + self.extra_args
        if self.supervise:
            cmd.append("--supervise")
        self.out_files.append(os.path.join(os.path.dirname(self.data_dir.rstrip("/")) or ".", "daemon-%d.out" % time.time_ns()))
        out = open(self.out_files[-1], "ab")
        self.proc = subprocess.Popen(cmd, env=self.env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     start_new_session=True)
        out.close()
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=30):
        if not self.alive():
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def kill(self):
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def status(self, job):
        return read_status(self.data_dir, job)

    def wait_status(self, job, predicate, timeout=60, interval=0.2):
        """The job's status once predicate(status) holds; AssertionError with the last status and log tail."""
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            st = self.status(job)
            if st is not None and predicate(st):
                return st
            if not self.alive():
                break
            time.sleep(interval)
        raise AssertionError("job %s: condition not met within %ss; daemon alive=%s; last status=%r; log tail:\n%s"
                             % (job, timeout, self.alive(), st, self.log_tail()))

    def log_tail(self, n=40):
        try:
            with open(self.log_file, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def launcher(config_dir, data_dir, *args, pidfile=None, timeout=120):
    """Run the daemon's command line the way the backup_daemon role's launcher does (e.g. "--supervise", "--detach",
    or "--status", or "--stop"); returns the CompletedProcess (text stdout/stderr)."""
    cmd = [sys.executable, "-m", MODULE, "--config-dir", config_dir, "--data-dir", data_dir, "--poll-interval", "0.3",
           "--log-level", "DEBUG"] + (["--pidfile", pidfile] if pidfile else []) + list(args)
    env = DaemonProcess(config_dir, data_dir).env()
    return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def lock_pid(data_dir, name="daemon.lock"):
    """The pid recorded in one of the data folder's lock files (None when absent or empty)."""
    try:
        with open(os.path.join(data_dir, name)) as f:
            return int(f.read().strip() or 0) or None
    except FileNotFoundError:
        return None


def proc_state(pid):
    """The process's state letter from /proc (R, S, Z, T, ...), None when there is no such process."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid):
    return proc_state(pid) not in (None, "Z", "X")
