# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""restore_progress_info without a module run: it reads the two files over the connection with `cat` (a few ms a look)
where a module costs its AnsiballZ build and a Python start on the restore host (~0.5 s), which every poll paid."""
from __future__ import annotations

import shlex
import time

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import async_poll

SEPARATOR = "--kmipbackup-progress-record--"
MISSING = "--kmipbackup-no-results-file--"


def look_command(results_file: str, progress_file: str) -> str:
    """The shell command that prints the async job's results file (or MISSING), SEPARATOR, and the progress record."""
    r, q = shlex.quote(results_file), shlex.quote(progress_file)
    return "if [ -e %s ]; then cat -- %s; else echo %s; fi; echo; echo %s; cat -- %s 2>/dev/null; true" % (
        r, r, MISSING, SEPARATOR, q)


def look(action: ActionBase, command: str, results_file: str) -> tuple[tuple[bool, dict | None], str]:
    """One look over the action's connection: ((finished, the job's result or None), the progress record's text)."""
    res = action._low_level_execute_command(command)
    if res["rc"] != 0:
        raise AnsibleActionFail("Cannot read the restore's async results file %s: %s" % (results_file, res["stderr"].strip()))
    job, _sep, record = res["stdout"].partition("\n" + SEPARATOR + "\n")
    if job.strip() == MISSING:
        raise AnsibleActionFail("The restore's async results file %s is missing: give the results_file its async "
                                "launch registered, on the same host, as the same user." % results_file)
    return async_poll.job_state(job), record


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = True

    def run(self, tmp=None, task_vars=None):
        self._supports_check_mode = True  # it only reads
        self._supports_async = False
        result = super().run(tmp, task_vars)
        _validation, args = self.validate_argument_spec(argument_spec=async_poll.ARGUMENT_SPEC)
        results_file = self._remote_expand_user(args["results_file"])
        command = look_command(results_file, self._remote_expand_user(args["progress_file"]))
        started = time.monotonic()
        deadline = started + max(args["wait"], 0.0)
        (finished, data), record = look(self, command, results_file)
        while not finished and time.monotonic() < deadline:
            time.sleep(min(async_poll.POLL_INTERVAL, max(deadline - time.monotonic(), 0.0)))
            (finished, data), record = look(self, command, results_file)
        result.update(changed=False, finished=finished, waited=round(time.monotonic() - started, 2),
                      line="" if finished else async_poll.progress_line(record))
        if finished:
            restore_result, warnings = async_poll.outcome(data)
            for w in warnings:
                self._display.warning(w)
            result["result"] = restore_result
            if restore_result.get("failed"):
                extra = {k: v for k, v in restore_result.items() if k not in ("changed", "result", "finished", "line", "waited")}
                result.update(extra, msg=restore_result.get("msg") or "The restore failed.", failed=True)
        return result
