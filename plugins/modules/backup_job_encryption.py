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
    description: Root of the snapshot store; defaults to C(store) in O(data_dir).
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
'''

import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import ansible_module, config

try:
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import job_config, job_status, master_keys, source
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import KeyInUseError, KmipBackupError
    IMPORT_ERROR = IMPORT_TRACE = None
except ImportError as e:  # a missing third-party package of the core
    IMPORT_ERROR = e
    IMPORT_TRACE = traceback.format_exc()


def argument_spec():
    return dict(
        job=dict(type="str", required=True),
        group=dict(type="str"),
        source=dict(type="dict", options=dict(
            uri=dict(type="str", required=True),
            tls=dict(type="bool", default=False),
            tls_ca_file=dict(type="path"),
            tls_certificate_key_file=dict(type="path", no_log=False),
            username=dict(type="str"),
            password=dict(type="str", no_log=True),
            auth_mechanism=dict(type="str"),
            auth_source=dict(type="str"),
            connect_timeout=dict(type="int", default=10),
        )),
        encryption=dict(type="str", choices=["enabled", "disabled"], default="enabled"),
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
            interval_hours=dict(type="int", choices=[6, 8, 12, 24], default=6),
            recent_days=dict(type="int", default=2),
            daily_days=dict(type="int", default=7),
            weekly_weeks=dict(type="int", default=4),
            monthly_months=dict(type="int", default=13),
        )),
        state=dict(type="str", choices=["present", "absent", "stopped"], default="present"),
        wait=dict(type="bool", default=False),
        wait_timeout=dict(type="int", default=600),
        **ansible_module.config_dir_spec(),
        **ansible_module.daemon_user_spec(),
        data_dir=dict(type="path", default=config.DEFAULT_DATA_DIR),
    )


def run(module):
    p = module.params
    job = job_config.check_name(p["job"])
    # refuse an unsafe config_dir before anything (a KMIP key included) is created
    config.check_config_dir(p["config_dir"], p["daemon_user"])
    existing = job_config.load_job(p["config_dir"], job)
    result = {"changed": False, "resync_required": False, "rotated": False, "retired_master_key_uids": [],
              "revoked_master_key_uids": []}
    retire = p["retire_master_keys"] or []
    if p["revoke"] and not retire:
        module.fail_json(msg="revoke applies to retire_master_keys: list the UIDs to retire and revoke.", **result)

    if p["state"] == "absent":
        if p["rotate_master_key"] or retire:
            module.fail_json(msg="rotate_master_key and retire_master_keys need state present or stopped.", **result)
        result["changed"] = existing is not None
        result["master_key_uids_needed"] = needed = master_keys.master_keys_needed(existing) if existing else []
        if needed:
            module.warn("The store %s keeps the snapshots of job %s; they need master key(s) %s: keep those keys and a "
                        "certificate that can use them to restore them (kmipbackup.mongodb.snapshot_restore with store=%s)."
                        % (existing["store"], job, ", ".join(needed), existing["store"]))
        if module._diff:
            result["diff"] = {"before": job_config.redact(existing) or {}, "after": {}}
        if existing is not None and not module.check_mode:
            job_config.remove_job(p["config_dir"], job, p["daemon_user"])
            if p["wait"]:
                job_status.wait_removed(p["data_dir"], job, p["wait_timeout"])
        st = job_status.read_status(p["data_dir"], job)
        result["status"] = st.get("state") if st else "INACTIVE"
        result["job_status"] = st or {}
        return result

    for name in ("group", "source"):
        if not p[name]:
            module.fail_json(msg="%s is required when state is %s." % (name, p["state"]), **result)
    if retire and existing is None:
        module.fail_json(msg="retire_master_keys needs the existing job %s: it is not declared in %s." % (job, p["config_dir"]), **result)
    # retirement is checked first: a refusal must leave everything as it was, KMIP included
    retiring = known = []
    if retire:
        _cfg, retiring, known = master_keys.plan_retire(existing, retire, p["data_dir"])
        if p["revoke"]:
            master_keys.check_not_shared(p["config_dir"], job, known)
    master_key = dict(p["master_key"] or {})
    if master_key.get("uid"):
        master_key["create"] = False
    new, info = job_config.plan_job(dict(p, master_key=master_key), existing, source.check_source, check_mode=module.check_mode)
    new["previous_master_key_uids"] = [u for u in new["previous_master_key_uids"] if u not in retiring]
    revoked = []
    if p["revoke"] and known:
        revoked = master_keys.revoke_keys(master_keys.kmip_client(p["config_dir"], new["group"]), known, check_mode=module.check_mode)
    changed = new != existing or bool(revoked)
    result.update(changed=changed, master_key_uid=info["master_key_uid"], resync_required=info["resync_required"],
                  rotated=info["rotated"], retired_master_key_uids=retiring, revoked_master_key_uids=revoked,
                  previous_master_key_uids=new["previous_master_key_uids"], job=job_config.redact(new))
    if module._diff:
        result["diff"] = {"before": job_config.redact(existing) or {}, "after": job_config.redact(new)}
    if new != existing and not module.check_mode:
        job_config.write_job(p["config_dir"], new, p["daemon_user"])
    if p["wait"] and not module.check_mode:
        job_status.wait_ready(p["data_dir"], job, new, p["wait_timeout"])
    result["master_key_uids_needed"] = master_keys.master_keys_needed(new)
    st = job_status.read_status(p["data_dir"], job)
    result["status"] = job_status.status_name(p["data_dir"], job, new, status=st)
    result["job_status"] = st or {}
    return result


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    # a source.uri with user:password@ is refused: keep that password out of invocation.module_args and messages
    ansible_module.hide_userinfo(module, (module.params.get("source") or {}).get("uri"))
    if IMPORT_ERROR is not None:
        module.fail_json(msg="The kmipbackup core cannot be imported: %s. Install requirements/runtime.txt on the host."
                         % IMPORT_ERROR, exception=IMPORT_TRACE)
    try:
        result = run(module)
    except KmipBackupError as e:
        extra = {"master_key_users": e.needed} if isinstance(e, KeyInUseError) else {}
        module.fail_json(msg=str(e), error_kind=getattr(e, "kind", None) or type(e).__name__, **extra)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
