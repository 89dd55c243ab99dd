# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A job's status as the Backup Daemon reports it (no Ansible imports). PRIVATE to the collection.

The daemon writes status/<job>.json in data_dir; the modules read it, name the job's state as
Ops Manager does (status_name), decide whether it is ready (is_ready) and wait for it.
"""
from __future__ import annotations

import os

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import datadir, files, progress, storenames, timeutil
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import KmipBackupError

_UNREAD = object()
DEFAULT_WAIT_TIMEOUT = 600  # seconds a module waits for the daemon by default (a job ready or gone, an answer)


def read_status(data_dir: str, job: str) -> dict | None:
    return files.read_json(datadir.status_path(data_dir, job))


def write_status(data_dir: str, job: str, status: dict) -> None:
    name = os.path.basename(datadir.status_path(data_dir, job))
    with datadir.open_data_dir(data_dir) as root, root.sub("status") as folder:
        folder.write(name, files.dump_json(status))


def remove_status(data_dir: str, job: str) -> None:
    try:
        os.unlink(datadir.status_path(data_dir, job))
    except FileNotFoundError:
        pass


def daemon_last_snapshot(data_dir: str, job: str) -> str | None:
    """The Backup Daemon's own record of the job's last snapshot id (its status file), or None where there is none
    (a fresh host, or the daemon has not snapshotted the job yet); a store older than it was rolled back."""
    try:
        last = (read_status(data_dir, job) or {}).get("last_snapshot") or {}
    except (OSError, ValueError, AttributeError):
        return None
    sid = last.get("id") if isinstance(last, dict) else None
    return sid if isinstance(sid, str) and storenames.SNAPSHOT_RE.match(sid) else None


def status_name(data_dir: str, job: str, cfg: dict | None = None, status: dict | None = _UNREAD) -> str:
    """Ops Manager's statusName for the job as seen by a module; status: the job's status (read_status) when the caller
    has read it already."""
    st = read_status(data_dir, job) if status is _UNREAD else status
    if st and (cfg is None or st.get("generation") == cfg.get("generation") or st.get("state") == "TERMINATING"):
        return st.get("state", "INACTIVE")
    if cfg and cfg.get("state") == "stopped":
        return "STOPPED" if st else "INACTIVE"
    return "INACTIVE"


def progress_line(status: dict | None) -> str | None:
    """One short line on the long work the daemon reports running for the job (an initial sync, a snapshot, a head
    re-encryption), or None: counts, sizes, rate and ETA only, never a namespace name."""
    st = status or {}
    lines = []
    sync = st.get("initial_sync")
    if isinstance(sync, dict):
        lines.append(progress.line("initial sync" + (" (%s)" % sync["phase"].replace("_", "-") if sync.get("phase") else ""), sync))
    snap = st.get("snapshot")
    if isinstance(snap, dict):
        lines.append(progress.line("snapshot", snap))
    rekey = st.get("rekey")
    if isinstance(rekey, dict) and rekey.get("head_bytes"):
        done, total = progress.human_bytes(rekey.get("bytes_written")), progress.human_bytes(rekey["head_bytes"])
        lines.append("head re-encryption: %s of %s" % (done, total))
    return "; ".join(lines) or None


def is_ready(status: dict | None, cfg: dict | None) -> bool:
    """True when the daemon reports the job's current generation and master key consistent and running."""
    if not status or not cfg:
        return False
    if cfg.get("state") == "stopped":
        return status.get("state") == "STOPPED"
    # the master key too: after a rotation the daemon restarts the job and rewraps the head key first
    return (status.get("state") == "STARTED" and bool(status.get("consistent"))
            and status.get("generation") == cfg.get("generation") and status.get("master_key_uid") == cfg.get("master_key_uid"))


def wait_timeout_error(job: str, status: dict | None, want: str) -> KmipBackupError:
    state = (status or {}).get("state", "no status")
    err = (status or {}).get("last_error")
    return KmipBackupError("Job %s did not reach %s in time (now %s%s): check that the Backup Daemon runs "
                           "(role kmipbackup.mongodb.backup_daemon) and its log in the data folder."
                           % (job, want, state, ", last error: %s" % err if err else ""))


def wait_ready(data_dir: str, job: str, cfg: dict, timeout: float) -> dict:
    status = {}

    def ready():
        status.clear()
        status.update(read_status(data_dir, job) or {})
        return is_ready(status, cfg)
    if not timeutil.wait_for(ready, timeout):
        raise wait_timeout_error(job, status, "STOPPED" if cfg.get("state") == "stopped" else "STARTED and consistent")
    return dict(status)


def wait_removed(data_dir: str, job: str, timeout: float) -> None:
    def gone():
        return not os.path.exists(datadir.heads_dir(data_dir, job)) and read_status(data_dir, job) is None
    if not timeutil.wait_for(gone, timeout):
        raise wait_timeout_error(job, read_status(data_dir, job), "removal")
