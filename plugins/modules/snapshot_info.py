#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r'''
---
module: snapshot_info
short_description: List the snapshots of a backup job in its snapshot store
version_added: 0.1.0
description:
  - Lists a backup job's snapshots from the store's catalog, oldest first, with their non-secret fields only
    (id, created, cluster time, sizes, encryption, master key UUIDs, expiry, kind), and the master key UUIDs the
    retained snapshots still need, which must stay in the KMIP server.
  - Needs neither the Backup Daemon nor KMIP access, so it works on a fresh host that has only the store.
    The catalog is plaintext and authenticated with a MAC keyed by the snapshot's data key; this module cannot
    check that MAC without KMIP access, so what it shows is unverified. M(kmipbackup.mongodb.snapshot_restore)
    checks it (and every other store object) before it writes anything.
author: kmipbackup developers (@kmipbackup)
extends_documentation_fragment:
  - kmipbackup.mongodb.attributes
  - kmipbackup.mongodb.attributes.INFO_MODULE
options:
  job:
    description: Name of the backup job.
    type: str
    required: true
  snapshot:
    description:
      - Show only this snapshot, by id, or V(latest) for the newest one.
      - Fails when the snapshot is not in the store.
    type: str
  store:
    description:
      - The snapshot store root (the folder that holds one area per job).
      - When omitted, the store recorded for O(job) in O(config_dir) is used.
    type: path
  config_dir:
    description:
      - The daemon host's configuration folder; only read to find the job's store when O(store) is not given.
    type: path
    default: /etc/kmipbackup
seealso:
  - module: kmipbackup.mongodb.backup_snapshot
  - module: kmipbackup.mongodb.snapshot_restore
'''

EXAMPLES = r'''
- name: List the snapshots of job orders (store found through /etc/kmipbackup/jobs/orders.yml)
  kmipbackup.mongodb.snapshot_info:
    job: orders
  register: orders_snapshots

- name: On a fresh host with only a copy of the store
  kmipbackup.mongodb.snapshot_info:
    job: orders
    store: /mnt/backup/store
    snapshot: latest
  register: latest_snapshot

- name: Show which master keys must stay in the KMIP server
  ansible.builtin.debug:
    msg: "Keep master keys {{ orders_snapshots.master_key_uids_needed | join(', ') }}"
'''

RETURN = r'''
store:
  description: The store root that was read.
  returned: always
  type: str
  sample: /var/lib/kmipbackup/store
snapshots:
  description: The job's snapshots (only the requested one with O(snapshot)), oldest first.
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: The snapshot id.
      type: str
      sample: 20261127T180000Z-1a2b3c4d
    created:
      description: When the snapshot was taken (ISO 8601, UTC).
      type: str
      sample: "2026-11-27T18:00:00Z"
    cluster_time:
      description: The source cluster time the snapshot is consistent at, as C([seconds, increment]).
      type: list
      elements: int
      sample: [1764266400, 3]
    data_bytes:
      description: Size of the documents (uncompressed BSON).
      type: int
    stored_bytes:
      description: Bytes the snapshot references in the store (compressed, encrypted; shared chunks counted).
      type: int
    written_bytes:
      description: Bytes this snapshot added to the store (chunks it did not reuse, plus its manifest).
      type: int
    doc_count:
      description: Number of documents.
      type: int
    namespaces:
      description: Number of namespaces (collections and views).
      type: int
    encryption:
      description: Whether the snapshot is encrypted.
      type: bool
    master_key_uids:
      description: KMIP master key UUIDs whose data keys the snapshot needs to be restored.
      type: list
      elements: str
    expires:
      description: When retention removes the snapshot (ISO 8601, UTC), or null.
      type: str
    kind:
      description: V(scheduled) or V(on-demand).
      type: str
master_key_uids_needed:
  description: Master key UUIDs that the job's retained snapshots still need; they must stay in the KMIP server.
  returned: always
  type: list
  elements: str
  sample: ["42", "57"]
'''

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import ansible_module, config, jobs, store
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError, StoreError


def store_root(params):
    if params["store"]:
        return params["store"]
    cfg = jobs.load_job(params["config_dir"], params["job"])
    if cfg is None:
        raise ConfigError("Job %s is not declared in %s: give store (the snapshot store folder) instead."
                          % (params["job"], config.jobs_dir(params["config_dir"])))
    return jobs.store_root(cfg, config.DEFAULT_DATA_DIR)


def info(params):
    root = store_root(params)
    if not os.path.isdir(root):
        raise StoreError("The snapshot store %s does not exist: check the store path (or mount it)." % root)
    js = store.JobStore(root, config.validate_name(params["job"], "job name"))
    if params["snapshot"]:
        entries = [js.catalog_entry(params["snapshot"])]
        catalog = js.catalog()
    else:
        entries = catalog = js.catalog()
    return {"store": root, "snapshots": [store.public_entry(e) for e in entries],
            "master_key_uids_needed": js.master_keys_needed(catalog)}


def main():
    spec = dict(
        job=dict(type="str", required=True),
        snapshot=dict(type="str"),
        store=dict(type="path"),
    )
    spec.update(ansible_module.config_dir_spec())
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    result = ansible_module.call(module, info, module.params)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
