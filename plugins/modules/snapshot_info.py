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
  - The catalog is plaintext, each entry authenticated with a MAC keyed by its snapshot's data key, and the store's
    catalog head (MAC'ed as well) records which entries are live. With KMIP access (a daemon host's O(config_dir),
    or O(kmip_servers) and a certificate) every entry is checked against the head and RV(snapshots[].authenticated)
    says whether it passed; an entry that did not (planted, replayed, or a copy of another one) is listed with
    V(false) and a warning, and takes no part in RV(master_key_uids_needed). A live entry that is missing (a rolled
    back store) fails the module with an integrity error naming it.
  - Without KMIP access it still works on a fresh host that has only the store, but nothing can be checked; every
    entry is listed with RV(snapshots[].authenticated=false), V(latest) is the newest unverified entry, and a warning
    says so. M(kmipbackup.mongodb.snapshot_restore) authenticates everything before it writes anything.
author: kmipbackup developers (@kmipbackup)
extends_documentation_fragment:
  - kmipbackup.mongodb.attributes
  - kmipbackup.mongodb.attributes.INFO_MODULE
  - kmipbackup.mongodb.kmip.CONNECTION
  - kmipbackup.mongodb.kmip.CLIENT_CERT
  - kmipbackup.mongodb.kmip.ACCESS
  - kmipbackup.mongodb.store
  - kmipbackup.mongodb.requirements
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
      - When neither this nor O(object_store) is given, the store recorded for O(job) in O(config_dir) is used.
    type: path
  config_dir:
    description:
      - The daemon host's configuration folder; read (never written) to find the job's store when O(store) is not
        given, and for KMIP access (C(kmip.yml), the job's group) when O(kmip_servers) is not given.
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

- name: On a fresh host, from the job's bucket
  kmipbackup.mongodb.snapshot_info:
    job: orders
    object_store:
      bucket: backups
      prefix: kmipbackup
      endpoint_url: https://s3.example.com
      access_key: "{{ vault_s3_access_key }}"
      secret_key: "{{ vault_s3_secret_key }}"

- name: Show which master keys must stay in the KMIP server
  ansible.builtin.debug:
    msg: "Keep master keys {{ orders_snapshots.master_key_uids_needed | join(', ') }}"
'''

RETURN = r'''
store:
  description: The store that was read, its folder or V(bucket <bucket> [prefix <prefix>] at <endpoint>) (never credentials).
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
    authenticated:
      description:
        - Whether the entry's MAC was checked and the catalog head lists it as live (V(false) for every entry without
          KMIP access). Do not act on an entry that is not authenticated.
      type: bool
authenticated:
  description: Whether the listing was checked against the store's authenticated catalog head (KMIP access was given).
  returned: always
  type: bool
master_key_uids_needed:
  description:
    - Master key UUIDs that the job's retained snapshots still need; they must stay in the KMIP server.
    - From the authenticated entries only when RV(authenticated=true).
  returned: always
  type: list
  elements: str
  sample: ["42", "57"]
point_in_time:
  description:
    - The job's restorable ranges for a restore to a point in time (change segments after a snapshot), and the gaps
      between them, oldest first. A point inside a range can be given to M(kmipbackup.mongodb.snapshot_restore).
    - Null without KMIP access (nothing can be authenticated then).
  returned: always
  type: dict
  contains:
    ranges:
      description:
        - Contiguous coverage by change segments that starts at a snapshot's cluster time; C(from)/C(to) are cluster
          times V({t, i}); C(from_time) is the UTC second of the start and C(to_time) the last whole second covered
          (a time given as C(point_in_time) to M(kmipbackup.mongodb.snapshot_restore) means the end of that second).
        - C(base_snapshots) are the snapshots inside the range a restore can start from; C(timeline) changes at a
          resync, a lost resume point or an invalidated change stream.
      type: list
      elements: dict
      sample: [{"timeline": "20261130T120000Z-0a0b0c0d", "from": {"t": 1764504000, "i": 3},
                "from_time": "2026-11-30T12:00:00Z", "to": {"t": 1764511200, "i": 1}, "to_time": "2026-11-30T14:00:00Z",
                "base_snapshots": ["20261130T120000Z-8bbcda20"]}]
    gaps:
      description: Times between two ranges (or after the last one) that cannot be restored to, with the reason
        (a new timeline, a segment missing from the store, no snapshot starting the coverage).
      type: list
      elements: dict
      sample: [{"from_time": "2026-11-30T14:00:00Z", "to_time": "2026-11-30T14:05:00Z",
                "from": {"t": 1764511200, "i": 1}, "to": {"t": 1764511500, "i": 2},
                "reason": "a new timeline started (a resync, a lost resume point or an invalidated change stream)"}]
error_kind:
  description: The kind of error (for example V(permission_denied), V(catalog entry), V(ConfigError), V(mongodb)).
  returned: on failure
  type: str
  sample: permission_denied
'''

import traceback

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.ansible_module import KmipBackupModule

try:
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import restore_request
    IMPORT_ERROR = None
except ImportError:
    IMPORT_ERROR = traceback.format_exc()


def argument_spec():
    return dict(
        job=dict(type="str", required=True),
        snapshot=dict(type="str"),
        store=dict(type="path"),
    )


SHARED = ("store_reader", "object_store")  # the base's shared options this module takes


def main():
    module = KmipBackupModule(argument_spec, shared=SHARED, import_error=IMPORT_ERROR,
                              mutually_exclusive=[("store", "object_store")])
    module.run(restore_request.list_snapshots, module.params)


if __name__ == "__main__":
    main()
