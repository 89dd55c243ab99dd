#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r'''
---
module: backup_snapshot
short_description: Take an on-demand snapshot of a backup job (or verify or resync its head)
version_added: 0.1.0
description:
  - Asks the Backup Daemon for an on-demand snapshot of O(job) (Ops Manager's C(onDemandSnapshot)) through a request
    file under O(data_dir) and, with O(wait=true), waits for the daemon's answer and returns the new snapshot.
  - The snapshot is cut from the job's head at one applied cluster time; the job must be STARTED (head consistent).
    On-demand snapshots follow the daily retention, as in Ops Manager.
  - The snapshot holds every write the source acknowledged before the request. When the daemon picks the request up it
    reads the source's current cluster time and cuts only once the head has applied everything up to that time; when
    the head lags behind the source, the snapshot waits for it (at most until shortly before O(timeout) ends, then the
    module fails naming the lag and nothing is written).
  - Every run takes a new snapshot; this is an action, not a desired state.
  - With O(action=verify) it asks instead for a full head verification, and with O(action=resync) for a new initial
    sync (Ops Manager's resync).
author: kmipbackup developers (@kmipbackup)
extends_documentation_fragment:
  - kmipbackup.mongodb.attributes
  - kmipbackup.mongodb.kmip.DAEMON_USER
  - kmipbackup.mongodb.requirements
attributes:
  check_mode:
    support: full
    details:
      - Reports C(changed=true) without asking the daemon.
  diff_mode:
    support: none
  idempotent:
    support: none
    details:
      - Each run asks for a new snapshot.
options:
  job:
    description: Name of the backup job.
    type: str
    required: true
  config_dir:
    description: The daemon host's configuration folder (the job must be declared there).
    type: path
    default: /etc/kmipbackup
  data_dir:
    description: The daemon's data folder, where requests are dropped and answered.
    type: path
    default: /var/lib/kmipbackup
  action:
    description:
      - V(snapshot) takes an on-demand snapshot.
      - V(verify) compares every document of the head with the source by hash (the daemon samples continuously; this
        checks all of them now) and re-copies what differs; the counts are added to the job's status.
      - V(resync) discards the head and starts a new initial sync; the job is PROVISIONING until the new head is
        consistent, and snapshots already in the store are kept.
    type: str
    choices: [snapshot, verify, resync]
    default: snapshot
  wait:
    description:
      - Wait for the daemon to answer and return its answer (the snapshot, the verification counts, or that the resync started).
      - With V(false), returns the request id at once; the daemon takes the snapshot when it next serves requests.
      - While the job is INACTIVE with an error (for example waiting for KMIP or for its source) the daemon serves no
        request, so the wait fails at once with the job's last error and withdraws the request.
    type: bool
    default: true
  timeout:
    description:
      - Seconds to wait for the daemon's answer with O(wait=true).
      - The daemon waits for a lagging head only within this time (less a margin for the cut itself) and answers with
        an error naming the lag when the head does not catch up; with O(wait=false) it waits up to 600 seconds.
    type: int
    default: 600
notes:
  - Needs a running Backup Daemon (role C(kmipbackup.mongodb.backup_daemon)) on the host.
seealso:
  - module: kmipbackup.mongodb.snapshot_info
  - module: kmipbackup.mongodb.snapshot_restore
'''

EXAMPLES = r'''
- name: Snapshot job orders before a risky migration
  kmipbackup.mongodb.backup_snapshot:
    job: orders
  register: pre_migration

- name: Show the snapshot id to restore if the migration goes wrong
  ansible.builtin.debug:
    msg: "Snapshot {{ pre_migration.snapshot.id }} at cluster time {{ pre_migration.snapshot.cluster_time }}"

- name: Ask without waiting
  kmipbackup.mongodb.backup_snapshot:
    job: orders
    wait: false

- name: Check every head document against the source now
  kmipbackup.mongodb.backup_snapshot:
    job: orders
    action: verify
  register: verified

- name: Start a new initial sync of job orders
  kmipbackup.mongodb.backup_snapshot:
    job: orders
    action: resync
'''

RETURN = r'''
request_id:
  description: Id of the request file the daemon answers.
  returned: when not in check mode
  type: str
  sample: 1764266400000-0123456789ab
snapshot:
  description: The new snapshot (fields as M(kmipbackup.mongodb.snapshot_info) returns them).
  returned: when O(action=snapshot) and O(wait=true), not in check mode
  type: dict
  contains:
    id:
      description: The snapshot id.
      type: str
      sample: 20261127T180000Z-1a2b3c4d
    created:
      description: When the snapshot was taken (ISO 8601, UTC).
      type: str
    cluster_time:
      description: The source cluster time the snapshot is consistent at, C([seconds, increment]).
      type: list
      elements: int
    source_cluster_time:
      description:
        - The source's cluster time the daemon read when it picked the request up, C([seconds, increment]). The
          snapshot holds every write the source acknowledged up to it, so every write acknowledged before the request.
      type: list
      elements: int
    data_bytes:
      description: Size of the documents (uncompressed BSON).
      type: int
    stored_bytes:
      description: Bytes the snapshot references in the store.
      type: int
    written_bytes:
      description: Bytes this snapshot added to the store.
      type: int
    doc_count:
      description: Number of documents.
      type: int
    namespaces:
      description: Number of namespaces.
      type: int
    encryption:
      description: Whether the snapshot is encrypted.
      type: bool
    master_key_uids:
      description: KMIP master key UUIDs the snapshot needs to be restored.
      type: list
      elements: str
    expires:
      description: When retention removes the snapshot, or null.
      type: str
    kind:
      description: V(on-demand).
      type: str
verification:
  description: What the full verification found; the same counts are added to the job's status.
  returned: when O(action=verify) and O(wait=true), not in check mode
  type: dict
  contains:
    checked:
      description: Documents compared.
      type: int
    mismatched:
      description: Documents whose head copy differed from the source (or was missing on one side).
      type: int
    recopied:
      description: Documents re-copied from the source into the head.
      type: int
    removed:
      description: Documents removed from the head because the source no longer has them.
      type: int
resync:
  description: V(started) once the daemon has discarded the head and begun the new initial sync.
  returned: when O(action=resync) and O(wait=true), not in check mode
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
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
        config, job_config, job_requests, job_status, source, storage, store)
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError, KmipBackupError
    IMPORT_ERROR = None
except ImportError:
    IMPORT_ERROR = traceback.format_exc()


def load(params):
    cfg = job_config.load_job(params["config_dir"], params["job"])
    if cfg is None:
        raise ConfigError("Job %s is not declared in %s: declare it with kmipbackup.mongodb.backup_job_encryption first."
                          % (params["job"], config.jobs_dir(params["config_dir"])))
    if params["timeout"] <= 0:
        raise ConfigError("timeout must be a positive number of seconds.")
    return cfg


def snapshot_result(cfg, params, answer):
    """The public fields of the catalog entry of the snapshot the daemon answered with, and the source time it covers."""
    sid = (answer or {}).get("id") or (answer or {}).get("snapshot_id")
    out = store.public_entry(storage.job_store(cfg, params["data_dir"]).catalog_entry(sid))
    out["source_cluster_time"] = (answer or {}).get("source_cluster_time")
    return out


def argument_spec():
    return dict(
        job=dict(type="str", required=True),
        action=dict(type="str", choices=list(job_requests.ACTIONS), default=job_requests.ACTIONS[0]),
        wait=dict(type="bool", default=True),
        timeout=dict(type="int", default=job_status.DEFAULT_WAIT_TIMEOUT),
    )


SHARED = ("config_dir", "data_dir", "daemon_user")  # the base's shared options this module takes


def main():
    module = KmipBackupModule(argument_spec, shared=SHARED, import_error=IMPORT_ERROR)
    p = module.params
    cfg = module.call(load, p)
    if module.check_mode:
        module.exit_json(changed=True)
    # the timeout bounds how long the daemon lets a snapshot wait for a lagging head, so its answer comes in time
    extra = {"timeout": p["timeout"]} if p["wait"] else {}
    rid = module.call(job_requests.submit_request, p["data_dir"], p["job"], p["action"], p["daemon_user"], **extra)
    result = dict(changed=True, request_id=rid)
    if not p["wait"]:
        module.exit_json(**result)
    try:
        answer = job_requests.wait_answer(p["data_dir"], p["job"], rid, p["timeout"], generation=cfg.get("generation"))
        if p["action"] == "snapshot":
            result["snapshot"] = snapshot_result(cfg, p, answer)
        elif p["action"] == "verify":
            result["verification"] = {k: int((answer or {}).get(k, 0)) for k in source.VERIFY_COUNTS}
        else:
            result["resync"] = (answer or {}).get("resync", "started")
    except KmipBackupError as e:
        module.fail_error(e, **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
