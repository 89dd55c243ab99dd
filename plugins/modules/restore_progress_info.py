#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r'''
---
module: restore_progress_info
short_description: Wait a while for a background restore, then show how far it is or its result
version_added: 0.1.0
description:
  - One poll of a M(kmipbackup.mongodb.snapshot_restore) run in the background (C(async), C(poll=0)) with its
    C(progress_file). It waits on the restore host until the async job has ended or O(wait) seconds have passed,
    looking every 0.1 s, then returns whether it ended and, while it runs, the progress record's line (counts, sizes,
    percent, rate and time left; no namespace name), or once it has ended, its result (RV(result)), as
    M(ansible.builtin.async_status) would read it. A failed restore fails this module with the restore's message.
  - It only reads, with C(cat) over the connection (an action plugin, so a poll costs a few milliseconds and no
    module run on the host).
  - A M(kmipbackup.mongodb.snapshot_restore) task without C(async) shows its progress itself (C(playbooks/restore.yml)
    runs it so); this module is for a restore launched with C(async). It is not in the C(kmipbackup) action group,
    whose defaults are the store and KMIP options it does not take.
author: kmipbackup developers (@kmipbackup)
extends_documentation_fragment:
  - kmipbackup.mongodb.attributes.INFO_MODULE
options:
  results_file:
    description:
      - The async job's results file on the restore host, RV(ansible.builtin.async_status#module:results_file) as the
        C(async) launch registers it (C(results_file)).
      - The job has ended when that file holds the module's result rather than the async wrapper's C(started) record.
    type: path
    required: true
  progress_file:
    description: The restore's progress record, the O(kmipbackup.mongodb.snapshot_restore#module:progress_file) it was given.
    type: path
    required: true
  wait:
    description: Wait at most this many seconds for the job to end (0 looks once).
    type: float
    default: 5
seealso:
  - module: kmipbackup.mongodb.snapshot_restore
  - module: ansible.builtin.async_status
'''

EXAMPLES = r'''
- name: Restore in the background
  kmipbackup.mongodb.snapshot_restore:
    job: orders
    store: /mnt/backup/store
    target_dir: /srv/restore/orders
    progress_file: ~/.kmipbackup/restore-progress/orders.json
  async: 86400
  poll: 0
  register: restore_launch

- name: Wait up to 10 s for the restore, then show how far it is
  kmipbackup.mongodb.restore_progress_info:
    results_file: "{{ restore_launch.results_file }}"
    progress_file: ~/.kmipbackup/restore-progress/orders.json
    wait: 10
  register: restore_poll

- name: Show the progress, or the number of documents restored
  ansible.builtin.debug:
    msg: "{{ restore_poll.result.documents if restore_poll.finished else restore_poll.line }}"
'''

RETURN = r'''
finished:
  description: Whether the async job has ended.
  returned: always
  type: bool
  sample: false
line:
  description:
    - The progress record's line while the restore runs, C(restore starting) before the restore writes its record
      (it checks and plans first); empty once it has ended.
  returned: always
  type: str
  sample: "restore of snapshot 20261130T143700Z-1a2b3c: 41.0 MB of 80.1 MB (51.2 %), 2561 of 5000 document(s), 19.9 MB/s, about 2 s left"
result:
  description:
    - The restore's result (the return values of M(kmipbackup.mongodb.snapshot_restore)), once it has ended.
  returned: when RV(finished)
  type: dict
waited:
  description: Seconds this poll waited.
  returned: always
  type: float
  sample: 0.4
'''

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import async_poll


def read(path, missing=None):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return missing


def main():
    """The same reads as the action plugin (plugins/action/restore_progress_info.py, which playbooks use), here done
    on the host by a module run."""
    module = AnsibleModule(argument_spec=async_poll.ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params

    def look():
        try:
            text = read(p["results_file"])
        except OSError as e:
            module.fail_json(msg="Cannot read the restore's async results file %s: %s" % (p["results_file"], e.strerror))
        if text is None:
            module.fail_json(msg="The restore's async results file %s is missing: give the results_file its async launch "
                                 "registered, on the same host, as the same user." % p["results_file"])
        return async_poll.job_state(text)

    started = time.monotonic()
    deadline = started + max(p["wait"], 0.0)
    finished, data = look()
    while not finished and time.monotonic() < deadline:
        time.sleep(min(async_poll.POLL_INTERVAL, max(deadline - time.monotonic(), 0.0)))
        finished, data = look()
    waited = round(time.monotonic() - started, 2)
    if not finished:
        try:
            record = read(p["progress_file"])
        except OSError:
            record = None
        module.exit_json(changed=False, finished=False, line=async_poll.progress_line(record), waited=waited)
    result, warnings = async_poll.outcome(data)
    for w in warnings:
        module.warn(w)
    if result.get("failed"):
        extra = {k: v for k, v in result.items() if k not in ("failed", "msg", "changed", "finished", "line", "waited")}
        module.fail_json(msg=result.get("msg") or "The restore failed.", finished=True, line="", waited=waited, **extra)
    module.exit_json(changed=False, finished=True, line="", waited=waited, result=result)


if __name__ == "__main__":
    main()
