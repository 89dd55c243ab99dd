# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading a background (async) restore: the async job's results file and the restore's progress record, as text
(the action plugins of snapshot_restore and restore_progress_info read them over the connection, the latter's module
locally). No Ansible imports. PRIVATE to the collection."""
from __future__ import annotations

import json

ARGUMENT_SPEC = dict(results_file=dict(type="path", required=True), progress_file=dict(type="path", required=True),
                     wait=dict(type="float", default=5))
POLL_INTERVAL = 0.1  # seconds between two looks at the results file: an end is seen at once, at little cost
STARTING = "restore starting"  # the line before the restore writes its first record (it checks and plans first)
# the async wrapper's own keys, and the restore's echo of its arguments: not part of the restore's result
ASYNC_KEYS = frozenset(("started", "finished", "ansible_job_id", "results_file", "invocation", "warnings", "deprecations"))


def job_state(text: str) -> tuple[bool, dict | None]:
    """(finished, the job's result or None) from the async job's results file's text: async_wrapper writes
    {"started": true, "finished": false, ...} first and replaces it (atomically, by rename) with the module's result."""
    try:
        data = json.loads(text)
    except ValueError:
        return False, None  # not written yet: async_status too counts the job as running
    if isinstance(data, dict) and "started" in data and not data.get("finished"):
        return False, None
    if not isinstance(data, dict):
        return True, {"failed": True, "msg": "The restore's async result is not a JSON object: %.200s" % text}
    return True, data


def progress_line(text: str | None) -> str:
    """The progress record's line (counts and sizes only), or STARTING when there is no record (yet)."""
    try:
        line = json.loads(text).get("line") if text else None
    except (ValueError, AttributeError):
        line = None
    return line or STARTING


def outcome(data: dict) -> tuple[dict, list[str]]:
    """(the restore's result without the async keys, its warnings as text) from a finished job's data."""
    return {k: v for k, v in data.items() if k not in ASYNC_KEYS}, [_text(w) for w in data.get("warnings") or []]


def _text(warning) -> str:
    """A warning's text: a string, or (ansible-core 2.19's results) {"event": {"msg": ...}, ...} or {"msg": ...}."""
    if isinstance(warning, dict):
        warning = warning.get("event", warning)
        warning = warning.get("msg", warning) if isinstance(warning, dict) else warning
    return str(warning)
