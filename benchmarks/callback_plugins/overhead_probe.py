# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Benchmark-only callback (benchmarks/playbook_overhead.py): writes to $OVERHEAD_PROBE_FILE, as JSON, when the
playbook started (time.time(), to compare with the process's launch), each task's wall time summed by name, and the
restore's own core time (the "seconds" of the last result that holds a restore's rate)."""
from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r'''
name: overhead_probe
type: aggregate
short_description: Times restore.yml's tasks for benchmarks/playbook_overhead.py
description: Benchmark helper, not part of the collection.
requirements: [enable in ansible.cfg or ANSIBLE_CALLBACKS_ENABLED]
'''


def _core_seconds(value):
    """The seconds of the innermost dict with a restore's rate (the module's result, as registered or in a fact)."""
    if isinstance(value, dict):
        if "rate" in value and "seconds" in value:
            return value["seconds"]
        value = list(value.values())
    if isinstance(value, list):
        for v in value:
            s = _core_seconds(v)
            if s is not None:
                return s
    return None


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "overhead_probe"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.data = {"tasks": {}, "core_seconds": None}
        self.task, self.t0 = None, None

    def v2_playbook_on_start(self, playbook):
        self.data["playbook_start"] = time.time()

    def _end_task(self):
        if self.task is not None:
            tasks = self.data["tasks"]
            tasks[self.task] = tasks.get(self.task, 0.0) + time.perf_counter() - self.t0
        self.task = None

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._end_task()
        self.task, self.t0 = task.get_name(), time.perf_counter()

    def v2_playbook_on_handler_task_start(self, task):
        self.v2_playbook_on_task_start(task, False)

    def v2_runner_on_ok(self, result):
        s = _core_seconds(result._result)
        if s is not None:
            self.data["core_seconds"] = s

    def v2_playbook_on_stats(self, stats):
        self._end_task()
        self.data["playbook_end"] = time.time()
        with open(os.environ["OVERHEAD_PROBE_FILE"], "w") as f:
            json.dump(self.data, f)
