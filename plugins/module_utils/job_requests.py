# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Requests to the Backup Daemon (no Ansible imports). PRIVATE to the collection.

A module drops requests/<job>/<id>.json in data_dir (submit_request) and waits for the daemon's
answer, <id>.done.json (wait_answer); the daemon lists the pending ones and answers them.
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Any

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, datadir, files, job_status, timeutil
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError, KmipBackupError

ACTIONS = ("snapshot", "verify", "resync")


def submit_request(data_dir: str, job: str, action: str, daemon_user: str = config.DEFAULT_DAEMON_USER, **args) -> str:
    """Drop a request for the daemon; returns its id."""
    if action not in ACTIONS:
        raise ConfigError("Unknown request %r: use one of %s." % (action, ", ".join(ACTIONS)))
    config.validate_name(job, "job name")
    rid = "%d-%s" % (time.time() * 1000, uuid.uuid4().hex[:12])
    body = dict(args)
    body["action"] = action
    body["created"] = timeutil.iso(timeutil.utcnow())
    with datadir.open_data_dir(data_dir, daemon_user) as root, root.walk("requests", job) as folder:
        folder.write(rid + ".json", files.dump_json(body))
    return rid


def pending_requests(data_dir: str, job: str) -> list:
    """[(id, request dict)] not answered yet, oldest first."""
    folder = datadir.requests_dir(data_dir, job)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.startswith(".") or not n.endswith(".json") or n.endswith(".done.json"):
            continue
        rid = n[:-5]
        if os.path.exists(os.path.join(folder, rid + ".done.json")):
            continue
        try:
            body = files.read_json(os.path.join(folder, n))
        except ValueError:
            body = {"action": None}
        if body is not None:
            out.append((rid, body))
    return out


def answer_request(data_dir: str, job: str, rid: str, result: Any = None, error: str | None = None) -> None:
    with datadir.open_data_dir(data_dir) as root, root.walk("requests", config.validate_name(job, "job name")) as folder:
        folder.write(rid + ".done.json", files.dump_json({"ok": error is None, "result": result, "error": error,
                                                          "answered": timeutil.iso(timeutil.utcnow())}))
        folder.unlink(rid + ".json")


def read_answer(data_dir: str, job: str, rid: str) -> dict | None:
    return files.read_json(os.path.join(datadir.requests_dir(data_dir, job), rid + ".done.json"))


def wait_answer(data_dir: str, job: str, rid: str, timeout: float, generation: int | None = None) -> Any:
    """The daemon's answer to a request; KmipBackupError when it failed or did not come in time. While the job is
    INACTIVE with an error (e.g. waiting for KMIP or the source) its runner serves no request: fail at once with
    that error and withdraw the request, instead of waiting the whole timeout. generation: the job's current one
    (a status of another generation is not this job's state yet)."""
    inactive = {}

    def answered():
        answer = read_answer(data_dir, job, rid)
        if answer:
            return answer
        st = job_status.read_status(data_dir, job) or {}
        if (st.get("state") == "INACTIVE" and st.get("last_error")
                and (generation is None or st.get("generation") == generation)):
            inactive.update(st)
            return True
        return None
    answer = timeutil.wait_for(answered, timeout)
    if answer is True:
        withdrawn = _withdraw_request(data_dir, job, rid)
        answer = read_answer(data_dir, job, rid)  # served after all, between the two reads
        if not answer:
            raise KmipBackupError("Job %s is INACTIVE, so the Backup Daemon cannot serve request %s; the job's last error: "
                                  "%s. Fix that (the daemon retries by itself) and ask again once the job is STARTED%s."
                                  % (job, rid, inactive["last_error"],
                                     "; the request was withdrawn" if withdrawn else ""))
    if not answer:
        raise job_status.wait_timeout_error(job, job_status.read_status(data_dir, job), "an answer to request %s" % rid)
    if not answer.get("ok"):
        raise KmipBackupError(answer.get("error") or "The daemon could not serve request %s." % rid)
    return answer.get("result")


def _withdraw_request(data_dir, job, rid):
    try:
        os.unlink(os.path.join(datadir.requests_dir(data_dir, job), rid + ".json"))
        return True
    except FileNotFoundError:
        return False
