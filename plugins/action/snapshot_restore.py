# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""snapshot_restore's action: the module runs in the task itself, and with progress_file a side thread shows the
restore's progress line every progress_seconds while it runs, read over the connection with `cat` (a few ms a look).

One task instead of an async launch and a poll loop of tasks saves restore.yml about a second of fixed cost (the async
wrapper's launch, and a task per poll). The lines are the progress record's: counts and sizes only, never a namespace
name; the task's arguments are never shown.

A second command while the module's runs is only sent where that is known to be safe: the local connection, and ssh
(each command is its own ssh process, multiplexed over ControlPersist) without a password (sshpass and askpass keep
the password's pipe on the connection object), both without become (build_become_command keeps the success marker of
the command being run on the shared become plugin). Elsewhere the task launches the module in the background (async)
and polls it one command at a time, as restore_progress_info does: progress everywhere, at the async launch's cost."""
from __future__ import annotations

import shlex
import threading
import time

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible.utils.vars import merge_hash

from ansible_collections.kmipbackup.mongodb.plugins.action import restore_progress_info
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import async_poll

SAFE_TRANSPORTS = ("local", "ssh")


class ActionModule(ActionBase):
    _supports_check_mode = True  # the module decides what check mode does
    _supports_async = True  # with async the module runs in the background as any module (poll with restore_progress_info)

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        wrap_async = self._task.async_val and not self._connection.has_native_async
        progress_file = self._task.args.get("progress_file")
        try:
            every = float(self._task.args.get("progress_seconds", 5))
        except (TypeError, ValueError):
            raise AnsibleActionFail("progress_seconds must be a number of seconds (0 shows no progress line).") from None
        watcher = None
        if progress_file and every > 0 and not wrap_async and not self._task.check_mode:
            host = (task_vars or {}).get("inventory_hostname", "?")
            why = self._why_no_second_command()
            if not why:
                watcher = _Watcher(self, progress_file, every, host)
                watcher.start()
            elif not self._connection.has_native_async:
                self._display.vv("[%s] the restore runs in the background and is polled: %s" % (host, why))
                return merge_hash(result, self._run_in_background(task_vars, progress_file, every, host))
        try:
            result = merge_hash(result, self._execute_module(task_vars=task_vars, wrap_async=wrap_async))
        finally:
            if watcher:
                watcher.stop.set()
                watcher.join()
        if not wrap_async:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        return result

    def _run_in_background(self, task_vars, progress_file: str, every: float, host: str) -> dict:
        """The module launched async (until the task's timeout, else a day) and polled from here, one command at a time:
        its end within POLL_INTERVAL, its progress line every `every` seconds, then its result as a foreground run's."""
        saved, self._task.async_val = self._task.async_val, self._task.timeout or 86400
        try:
            launch = self._execute_module(task_vars=task_vars, wrap_async=True)
        finally:
            self._task.async_val = saved  # the task itself is not async: the executor must not poll it
        if launch.get("failed") or not launch.get("results_file"):
            return launch
        results_file = launch["results_file"]
        command = restore_progress_info.look_command(results_file, self._remote_expand_user(progress_file))
        shown = time.monotonic()
        while True:
            (finished, data), record = restore_progress_info.look(self, command, results_file)
            if finished:
                break
            if time.monotonic() - shown >= every:
                self._display.display("[%s] %s" % (host, async_poll.progress_line(record)))
                shown = time.monotonic()
            time.sleep(async_poll.POLL_INTERVAL)
        self._low_level_execute_command("rm -f -- %s" % shlex.quote(results_file))
        result, warnings = async_poll.outcome(data)
        for w in warnings:
            self._display.warning(w)
        return result

    def _why_no_second_command(self) -> str | None:
        """Why a second command may not run over this connection while the module runs, or None when it may."""
        transport = self._connection.transport.rpartition(".")[2]
        if transport not in SAFE_TRANSPORTS:
            return "the %s connection is not known to run two commands at once" % transport
        if self._connection.become:
            return "with become, one command at a time may run over the connection"
        if transport == "ssh" and (self._connection.get_option("password") or self._play_context.password):
            return "with ssh password authentication, one command at a time may run over the connection"
        return None


class _Watcher(threading.Thread):
    """Reads the progress record every `every` seconds until stopped, and shows its line (never an error: a failed
    look ends the lines, not the restore)."""

    def __init__(self, action: ActionModule, path: str, every: float, host: str) -> None:
        super().__init__(name="kmipbackup-restore-progress", daemon=True)
        self.action, self.path, self.every, self.host = action, path, every, host
        self.stop = threading.Event()

    def run(self):
        display = self.action._display
        try:
            if self.stop.wait(self.every):
                return
            command = "cat -- %s 2>/dev/null; true" % shlex.quote(self.action._remote_expand_user(self.path))
            while not self.stop.is_set():
                record = self.action._low_level_execute_command(command, sudoable=False)["stdout"]
                if self.stop.is_set():  # the restore ended meanwhile: its result tells the rest
                    return
                display.display("[%s] %s" % (self.host, async_poll.progress_line(record)))
                self.stop.wait(self.every)
        except Exception as e:  # pylint: disable=broad-except
            display.vvv("[%s] no more restore progress lines: %s" % (self.host, e))
