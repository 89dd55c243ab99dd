#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r'''
---
module: backup_job_info
short_description: Show kmipbackup backup jobs and what the Backup Daemon reports about them
version_added: 0.1.0
description:
  - Returns every declared backup job (or the named ones) with its configuration, secrets redacted, and the
    daemon's status (statusName, consistency, applied cluster time, lag, head size, last error, last snapshot).
author: kmipbackup developers (@kmipbackup)
extends_documentation_fragment:
  - kmipbackup.mongodb.attributes
  - kmipbackup.mongodb.attributes.INFO_MODULE
  - kmipbackup.mongodb.requirements
options:
  job:
    description: Names of the jobs to show; all declared jobs when omitted.
    type: list
    elements: str
  config_dir:
    description: The daemon's configuration folder.
    type: path
    default: /etc/kmipbackup
  data_dir:
    description: The daemon's data folder.
    type: path
    default: /var/lib/kmipbackup
seealso:
  - module: kmipbackup.mongodb.backup_job_encryption
'''

EXAMPLES = r'''
- name: Show every job
  kmipbackup.mongodb.backup_job_info:
  register: backup_jobs

- name: Fail when a job is not running with a consistent head
  ansible.builtin.assert:
    that: item.ready
  loop: "{{ backup_jobs.jobs }}"
  loop_control:
    label: "{{ item.job }}"

- name: Show the long work running (initial syncs, snapshots), one line per job
  ansible.builtin.debug:
    msg: "{{ item.job }}: {{ item.progress }}"
  loop: "{{ backup_jobs.jobs | selectattr('progress') }}"
  loop_control:
    label: "{{ item.job }}"
'''

RETURN = r'''
jobs:
  description: One entry per job.
  returned: always
  type: list
  elements: dict
  contains:
    job:
      description: The job's name.
      type: str
    config:
      description: The job's configuration, source password redacted; null for a job that is being removed.
      type: dict
    status_name:
      description: INACTIVE, PROVISIONING, STARTED, STOPPED or TERMINATING.
      type: str
    ready:
      description:
        - Whether the daemon runs the job as declared, the rule that
          O(kmipbackup.mongodb.backup_job_encryption#module:wait) waits for. V(true) when it reports the job STARTED
          with a consistent head of the declared generation under the declared master key (STOPPED for a stopped job);
          V(false) otherwise, and for a job that is being removed.
      type: bool
    progress:
      description:
        - One line on the long work running for the job, from RV(jobs[].status.initial_sync), RV(jobs[].status.snapshot)
          and the head's re-encryption (C(rekey)); null when none runs. Counts, sizes, rate and ETA only, never a
          namespace name.
      type: str
      sample: "initial sync (clone): 1.2 GB of 2.7 GB (44.4 %), 1204331 document(s), 41.3 MB/s, about 36 s left"
    status:
      description:
        - The daemon's status record (empty when the daemon has not reported yet). Besides the fields below it holds the
          head's size, initial syncs, verification counts, the last snapshot, V(updated) (when the daemon last wrote it,
          at least every second while it runs) and its pid.
      type: dict
      contains:
        state:
          description: The statusName the daemon reports.
          type: str
        consistent:
          description: Whether the head is consistent and the source reachable (false during an outage).
          type: bool
        cluster_time:
          description: The source cluster time of the last change the head applied, C([seconds, increment]).
          type: list
          elements: int
        complete_cluster_time:
          description:
            - The source cluster time up to which the head holds every write, C([seconds, increment]); later than
              RV(jobs[].status.cluster_time) when an idle change stream has shown that nothing more came since.
          type: list
          elements: int
        lag_seconds:
          description:
            - How far the head is behind the source, in seconds of cluster time, measured against the source by the
              daemon's heartbeat (the source's current cluster time less RV(jobs[].status.complete_cluster_time)).
            - While the source cannot be read it grows with the time since the last successful read.
            - Null until the head is consistent and the source has been read once.
          type: float
        initial_sync:
          description:
            - The initial sync running (null otherwise; state PROVISIONING), what it copied against the source's
              estimates at the listing (C(objects) and C(dataSize) of each database's C(dbStats)), its rate over the last
              seconds and the time left at that rate. Counts and sizes only.
          type: dict
          contains:
            phase:
              description: V(clone) (copying the documents), then V(catch_up) (applying the changes made meanwhile).
              type: str
            docs:
              description: Documents copied so far.
              type: int
            bytes:
              description: BSON bytes copied so far.
              type: int
            chunks:
              description: Chunks written (a snapshot; 0 for an initial sync).
              type: int
            docs_total:
              description: The estimated total of documents, or null when unknown.
              type: int
            bytes_total:
              description: The estimated total of bytes, or null when unknown (the user may not run C(dbStats)).
              type: int
            percent:
              description: Done of the estimate (bytes, else documents); stops at 99.9 when the estimate was too low.
              type: float
            bytes_per_second:
              description: The rate over about the last 20 seconds.
              type: int
            docs_per_second:
              description: The rate in documents over the same time.
              type: int
            eta_seconds:
              description: Seconds left at that rate, or null when unknown.
              type: int
            elapsed_seconds:
              description: Seconds since it began.
              type: float
        last_initial_sync:
          description: The last initial sync of this generation once done (C(docs), C(bytes), C(seconds), average
            C(docs_per_second) and C(bytes_per_second), the estimates C(docs_total) and C(bytes_total), C(finished)).
          type: dict
        snapshot:
          description:
            - The snapshot being cut (null otherwise), with the fields of RV(jobs[].status.initial_sync) but no phase,
              documents and bytes cut or reused, chunks written, against the previous snapshot's size (the head
              file's size for a first snapshot, an overestimate).
          type: dict
        source:
          description: What the daemon's heartbeat (a short-timeout C(hello) about every half second) last saw of the source.
          type: dict
          contains:
            reachable:
              description: Whether the last heartbeat reached the source (null before the first one).
              type: bool
            cluster_time:
              description: The source's cluster time at the last successful heartbeat, C([seconds, increment]).
              type: list
              elements: int
            checked:
              description: When the last successful heartbeat was (ISO 8601, UTC).
              type: str
            unreachable_seconds:
              description: How long the source has been unreachable, or null.
              type: float
            error:
              description: Why the last heartbeat failed (host and cause, never server text), or null.
              type: str
        segments:
          description:
            - Point-in-time health (change segments), null until the job's head is open. Times and counts only, never a
              namespace name.
          type: dict
          contains:
            enabled:
              description: Whether the job records change segments (O(kmipbackup.mongodb.backup_job_encryption#module:point_in_time_window_hours) above 0).
              type: bool
            timeline:
              description: The current timeline's id (a resync, a lost resume point or an invalidate starts a new one), or null.
              type: str
            sealed_to:
              description: End (ISO 8601, UTC, whole seconds) of the last segment of the timeline sealed into the store, or null.
              type: str
            sealed_cluster_time:
              description: The same end as a cluster time, C([seconds, increment]).
              type: list
              elements: int
            open_events:
              description: Change events applied since the open segment began (counted by the running capture).
              type: int
            awaiting_seal:
              description: Closed segments kept in the head because sealing them into the store failed (retried every 30 s).
              type: int
            restorable_to:
              description:
                - End (ISO 8601, UTC) of the newest restorable range as the store showed it at RV(jobs[].status.segments.store_checked)
                  (checked after each snapshot and at most every minute after a seal), or null.
              type: str
            restorable_cluster_time:
              description: The same end as a cluster time, C([seconds, increment]).
              type: list
              elements: int
            store_checked:
              description: When the daemon last read the store's restorable ranges (ISO 8601, UTC), or null.
              type: str
            problem:
              description:
                - What that check found wrong, or null. The store alone cannot vouch for segments after its newest
                  snapshot; the daemon compares the store's range with the last segment it sealed and names segments
                  removed from the store, or the integrity error reading the ranges gave.
              type: str
        last_error:
          description: The last failure the daemon retries, or null; names a source outage within about a second.
          type: str
error_kind:
  description: The kind of error (for example V(permission_denied), V(catalog entry), V(ConfigError), V(mongodb)).
  returned: on failure
  type: str
  sample: permission_denied
'''

import traceback

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.ansible_module import KmipBackupModule

try:
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import job_config, job_status
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError
    IMPORT_ERROR = None
except ImportError:
    IMPORT_ERROR = traceback.format_exc()


def job_info(p, name):
    """One job's entry, or None for a job neither declared nor reported."""
    cfg = job_config.load_job(p["config_dir"], name)
    st = job_status.read_status(p["data_dir"], name)
    if cfg is None and st is None:
        if p["job"]:
            raise ConfigError("No backup job %s in %s: declare it with kmipbackup.mongodb.backup_job_encryption."
                              % (name, p["config_dir"]))
        return None
    return {"job": name, "config": job_config.redact(cfg), "status": st or {}, "ready": job_status.is_ready(st, cfg),
            "progress": job_status.progress_line(st),
            "status_name": job_status.status_name(p["data_dir"], name, cfg, status=st) if cfg else (st or {}).get("state", "TERMINATING")}


def info(p):
    out = [job_info(p, name) for name in p["job"] or job_config.list_jobs(p["config_dir"])]
    return {"changed": False, "jobs": [j for j in out if j is not None]}


SHARED = ("config_dir", "data_dir")  # the base's shared options this module takes


def main():
    module = KmipBackupModule(dict(job=dict(type="list", elements="str")), shared=SHARED,
                              import_error=IMPORT_ERROR)
    module.run(info, module.params)


if __name__ == "__main__":
    main()
