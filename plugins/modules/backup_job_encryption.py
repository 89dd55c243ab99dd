#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r'''
---
module: backup_job_encryption
short_description: Declare a backup job and its encryption for the kmipbackup Backup Daemon
version_added: 0.1.0
description:
  - Writes the job's configuration (C(jobs/<job>.yml) in O(config_dir)) that the Backup Daemon runs.
  - With encryption enabled, the job's head database and snapshots are encrypted with data keys wrapped by
    a KMIP master key. The key is created here, with the group's client certificate, so a KMIP problem fails
    the task rather than the daemon.
  - Enabling or disabling encryption on an existing job needs a new initial sync that recreates the head
    database (RV(resync_required)); the daemon destroys the old head only once the new one is consistent.
  - Everything is validated before anything is written (group, KMIP configuration, source reachability and
    credentials, access to a given master key).
  - O(rotate_master_key=true) rotates the master key of an encrypted job; O(retire_master_keys) forgets rotated
    keys (and O(revoke=true) revokes them in KMIP) once no retained snapshot needs them.
author: kmipbackup developers (@kmipbackup)
extends_documentation_fragment:
  - kmipbackup.mongodb.attributes
  - kmipbackup.mongodb.kmip.DAEMON_USER
  - kmipbackup.mongodb.kmip.FILE_OWNER
  - kmipbackup.mongodb.store
  - kmipbackup.mongodb.requirements
attributes:
  check_mode:
    support: full
    details:
      - No master key is created and nothing is written; the source and KMIP server are still contacted.
  diff_mode:
    support: full
    details:
      - The source password is redacted.
  idempotent:
    support: partial
    details:
      - O(rotate_master_key=true) creates a new master key on every run, so it always reports a change; run it
        once per rotation (for example with the playbook kmipbackup.mongodb.rotate_master_key), not in the
        playbook that declares the job.
      - Everything else is idempotent; retiring or revoking keys already retired or revoked changes nothing.
options:
  job:
    description: Name of the backup job (letters, digits, C(_), C(.), C(-)).
    type: str
    required: true
  group:
    description:
      - Group whose KMIP client certificate the job uses (declared with M(kmipbackup.mongodb.group_kmip)).
      - Required unless O(state=absent).
    type: str
  source:
    description: The MongoDB deployment to back up, a replica set or a mongos. Required unless O(state=absent).
    type: dict
    suboptions:
      uri:
        description: MongoDB connection string (C(mongodb://) or C(mongodb+srv://)).
        type: str
        required: true
      tls:
        description: Connect with TLS.
        type: bool
        default: false
      tls_ca_file:
        description: CA file that signs the source's certificates.
        type: path
      tls_certificate_key_file:
        description: Client certificate and key (PEM) for mutual TLS or MONGODB-X509.
        type: path
      username:
        description: User to authenticate as.
        type: str
      password:
        description: Password of O(source.username).
        type: str
      auth_mechanism:
        description: Authentication mechanism, for example C(SCRAM-SHA-256) or C(MONGODB-X509).
        type: str
      auth_source:
        description: Database that holds the user's credentials.
        type: str
      connect_timeout:
        description: Seconds to wait for the source when connecting.
        type: int
        default: 10
  encryption:
    description: Whether the job's head database and snapshots are encrypted.
    type: str
    choices: [enabled, disabled]
    default: enabled
  master_key:
    description:
      - The KMIP master key of an encrypted job. By default a key named C(kmipbackup-<job>) is created once
        and kept on later runs.
    type: dict
    suboptions:
      create:
        description: Create a new AES-256 key in the KMIP server (only when the job has none yet).
        type: bool
        default: true
      name:
        description: Name of the created key; defaults to C(kmipbackup-<job>).
        type: str
      uid:
        description: UID of an existing key the group's certificate can use, instead of creating one.
        type: str
  rotate_master_key:
    description:
      - Rotate the master key of an existing encrypted job. A new AES-256 key is created in the KMIP server with
        the group's certificate (named O(master_key.name), by default C(kmipbackup-<job>-<UTC time>)) and becomes
        RV(master_key_uid); the old one is put first in C(previous_master_key_uids).
      - The daemon then restarts the job without a new initial sync, rewraps the head key under the new master
        key, and starts a new snapshot data-key epoch for the next snapshots. Older epochs stay wrapped by their
        old master keys, so those keys must stay usable in the KMIP server while RV(master_key_uids_needed) lists
        them.
      - The group's certificate must still be able to use the current master key (the daemon unwraps the head key
        with it to rewrap it).
      - Not idempotent, see the C(idempotent) attribute. In check mode no key is created and RV(master_key_uid)
        is a placeholder, not a UID.
    type: bool
    default: false
  retire_master_keys:
    description:
      - UIDs of previous master keys to forget (remove from the job's C(previous_master_key_uids)), for example
        after the snapshots that needed them expired.
      - Refused, with nothing changed, when a UID is the current master key, or when a retained snapshot of the
        store or the head key still needs it; the message names the UIDs and what needs them.
      - UIDs already retired are ignored.
    type: list
    elements: str
    default: []
  revoke:
    description:
      - Also revoke the O(retire_master_keys) in the KMIP server (reason superseded), so they can no longer
        encrypt or decrypt. Only keys of this job (listed in the job or in its store's keyring) and only
        active ones are revoked; refused, with nothing changed, when another declared job uses one of them.
      - Revocation cannot be undone; a revoked key can no longer unwrap the data keys it wrapped.
    type: bool
    default: false
  store:
    description:
      - Root of the snapshot store (a folder); defaults to C(store) in O(data_dir).
      - Mutually exclusive with O(object_store), which keeps the job's snapshots in a bucket instead.
    type: path
  schedule:
    description: Snapshot schedule and retention, with Ops Manager's ranges.
    type: dict
    suboptions:
      interval_hours:
        description: Hours between snapshots.
        type: int
        choices: [6, 8, 12, 24]
        default: 6
      recent_days:
        description: Days every snapshot is kept (2-5).
        type: int
        default: 2
      daily_days:
        description: Days a daily snapshot is kept (1-365).
        type: int
        default: 7
      weekly_weeks:
        description: Weeks a weekly snapshot is kept (1-52).
        type: int
        default: 4
      monthly_months:
        description: Months a monthly snapshot is kept (1-36).
        type: int
        default: 13
  point_in_time_window_hours:
    description:
      - Hours back from now to which the job can be restored to any point in time (as Ops Manager's
        C(pointInTimeWindowHours)). The daemon keeps the change events it applies, in encrypted change
        segments, back to the newest snapshot at or before the start of the window.
      - V(0) turns point-in-time restore off (no segments are written; existing ones are collected).
    type: int
    default: 24
  point_in_time_segment_seconds:
    description:
      - Seconds after which the daemon closes the open change segment and writes it to the store (also at
        every snapshot and key rotation). The last this many seconds of changes exist only in the
        encrypted head until then. Shorter means a store copy is more current, longer means fewer objects.
      - 1 to 3600.
    type: int
    default: 60
  state:
    description:
      - V(present) runs the job, V(stopped) keeps its configuration and head but stops change capture,
        V(absent) removes the job; the daemon then deletes its head (snapshots in the store are kept).
    type: str
    choices: [present, absent, stopped]
    default: present
  wait:
    description:
      - Wait for the daemon to report the job STARTED with a consistent head (STOPPED for O(state=stopped),
        gone for O(state=absent)).
    type: bool
    default: false
  wait_timeout:
    description: Seconds to wait when O(wait=true).
    type: int
    default: 600
  config_dir:
    description: The daemon's configuration folder.
    type: path
    default: /etc/kmipbackup
  data_dir:
    description: The daemon's data folder (status files are read from there).
    type: path
    default: /var/lib/kmipbackup
notes:
  - A master key is never destroyed by this module, and only revoked with O(revoke=true) for retired keys that no
    retained snapshot needs. Keys rotated away from stay listed in the job until retired.
  - Do not pin O(master_key.uid) in a declaration that runs after a rotation; a UID other than the current one
    switches the job to that key.
seealso:
  - module: kmipbackup.mongodb.backup_job_info
  - module: kmipbackup.mongodb.group_kmip
  - module: kmipbackup.mongodb.kmip_config
'''

EXAMPLES = r'''
- name: Back up the orders replica set, encrypted with a new KMIP master key
  kmipbackup.mongodb.backup_job_encryption:
    job: orders
    group: payments
    source:
      uri: mongodb://db1.example.com:27017,db2.example.com:27017/?replicaSet=rs0
      username: backup
      password: "{{ vault_backup_password }}"
      auth_source: admin
    encryption: enabled
    wait: true

- name: Use an existing master key
  kmipbackup.mongodb.backup_job_encryption:
    job: inventory
    group: payments
    source:
      uri: mongodb://db1.example.com:27017/?replicaSet=rs1
    master_key:
      uid: "4711"

- name: Stop change capture, keep the head
  kmipbackup.mongodb.backup_job_encryption:
    job: inventory
    group: payments
    source:
      uri: mongodb://db1.example.com:27017/?replicaSet=rs1
    state: stopped

- name: Rotate the master key of the orders job (a new KMIP key; not idempotent)
  kmipbackup.mongodb.backup_job_encryption:
    job: orders
    group: payments
    source:
      uri: mongodb://db1.example.com:27017,db2.example.com:27017/?replicaSet=rs0
    rotate_master_key: true
  register: rotated

- name: Show the master keys the retained snapshots still need
  ansible.builtin.debug:
    msg: "New key {{ rotated.master_key_uid }}; keep {{ rotated.master_key_uids_needed | join(', ') }}"

- name: Forget and revoke a previous master key once no retained snapshot needs it
  kmipbackup.mongodb.backup_job_encryption:
    job: orders
    group: payments
    source:
      uri: mongodb://db1.example.com:27017,db2.example.com:27017/?replicaSet=rs0
    retire_master_keys: ["41"]
    revoke: true

- name: Remove a job (its snapshots stay in the store)
  kmipbackup.mongodb.backup_job_encryption:
    job: inventory
    state: absent
'''

RETURN = r'''
master_key_uid:
  description: UID of the job's current KMIP master key (null when encryption is disabled).
  returned: when O(state) is not V(absent)
  type: str
  sample: "42"
previous_master_key_uids:
  description: Master keys the job used before, newest first (kept until retired with O(retire_master_keys)).
  returned: when O(state) is not V(absent)
  type: list
  elements: str
  sample: ["41"]
master_key_uids_needed:
  description:
    - Master key UIDs the retained snapshots of the job's store need (from its catalog); keep these keys usable in
      the KMIP server. The same list as M(kmipbackup.mongodb.snapshot_info) returns.
    - With O(state=absent) the store keeps the job's snapshots, so the list (and a warning) says which keys they
      still need after the job is removed.
  returned: always
  type: list
  elements: str
  sample: ["41", "42"]
rotated:
  description: True when this run rotated the master key (or would, in check mode).
  returned: always
  type: bool
retired_master_key_uids:
  description: UIDs this run removed from C(previous_master_key_uids) (or would, in check mode).
  returned: always
  type: list
  elements: str
revoked_master_key_uids:
  description: UIDs this run revoked in the KMIP server (or would, in check mode).
  returned: always
  type: list
  elements: str
resync_required:
  description: True when this run toggled encryption on an existing job, so the daemon rebuilds its head by a new initial sync.
  returned: always
  type: bool
status:
  description: The job's statusName as the daemon reports it (INACTIVE, PROVISIONING, STARTED, STOPPED, TERMINATING).
  returned: always
  type: str
  sample: STARTED
job:
  description: The job's configuration, source password redacted.
  returned: when O(state) is not V(absent)
  type: dict
job_status:
  description: The daemon's full status record for the job, when there is one.
  returned: always
  type: dict
error_kind:
  description: The kind of error (for example V(permission_denied), V(catalog entry), V(ConfigError), V(mongodb)).
  returned: on failure
  type: str
  sample: permission_denied
master_key_users:
  description: With RV(error_kind=key_in_use), what still needs each master key that could not be retired or revoked.
  returned: on failure to retire or revoke a key in use
  type: dict
'''

import traceback

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.ansible_module import KmipBackupModule, mongodb_connection_spec

try:
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import job_config, job_declaration, job_status
    IMPORT_ERROR = None
except ImportError:
    IMPORT_ERROR = traceback.format_exc()


def argument_spec():
    schedule = job_config.SCHEDULE_DEFAULTS
    return dict(
        job=dict(type="str", required=True),
        group=dict(type="str"),
        source=mongodb_connection_spec(job_config.SOURCE_DEFAULTS),
        encryption=dict(type="str", choices=list(job_config.ENCRYPTION), default=job_config.ENCRYPTION[0]),
        master_key=dict(type="dict", no_log=False, options=dict(
            create=dict(type="bool", default=True),
            name=dict(type="str"),
            uid=dict(type="str"),
        )),
        rotate_master_key=dict(type="bool", default=False, no_log=False),
        retire_master_keys=dict(type="list", elements="str", default=[], no_log=False),
        revoke=dict(type="bool", default=False),
        store=dict(type="path"),
        schedule=dict(type="dict", options=dict(
            {name: dict(type="int", default=value) for name, value in schedule.items()},
            interval_hours=dict(type="int", choices=list(job_config.INTERVALS), default=schedule["interval_hours"]),
        )),
        point_in_time_window_hours=dict(type="int", default=job_config.POINT_IN_TIME_DEFAULTS["point_in_time_window_hours"]),
        point_in_time_segment_seconds=dict(type="int",
                                           default=job_config.POINT_IN_TIME_DEFAULTS["point_in_time_segment_seconds"]),
        state=dict(type="str", choices=list(job_config.STATES), default=job_config.STATES[0]),
        wait=dict(type="bool", default=False),
        wait_timeout=dict(type="int", default=job_status.DEFAULT_WAIT_TIMEOUT),
    )


SHARED = ("config_dir", "data_dir", "daemon_user", "file_owner", "object_store")  # the base's shared options it takes


def main():
    # a source.uri with user:password@ is refused: keep that password out of invocation.module_args and messages
    module = KmipBackupModule(argument_spec, shared=SHARED, import_error=IMPORT_ERROR,
                              mutually_exclusive=[("store", "object_store")], secret_values=[lambda p: (p["source"] or {}).get("uri")])
    module.run(job_declaration.declare, module.params, check_mode=module.check_mode)


if __name__ == "__main__":
    main()
