#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: snapshot_copy
short_description: Copy a backup job's snapshots from one snapshot store to another, verified
version_added: 0.2.0
description:
  - Copies a job's snapshots (all, the latest, or a list of ids) from a snapshot store to another, a folder or an
    S3-compatible bucket in any direction (folder to bucket, bucket to folder, bucket to bucket). This is the off-site
    copy of the 3-2-1 rule, and the way to move a folder store into a bucket.
  - Objects are copied as they are stored, ciphertext only; nothing is decrypted. Without O(authenticate) no KMIP
    access and no key is needed.
  - Each object is checked where the format allows it without keys (each manifest against the SHA-256 its catalog
    entry records, each catalog entry against the source's catalog head, the format of chunks, manifests and keyring
    records) and read back from the destination, where it must equal the source's bytes. An object the destination
    holds already is skipped when it equals the source's, and is an error naming it otherwise. A snapshot becomes
    visible at the destination only once everything it references is there; a copy that is interrupted leaves nothing
    visible and the next run completes it.
  - The catalog head, which authenticates the live snapshots, is MAC'ed with the job's keys. Without O(authenticate)
    the destination mirrors the source; it gets the source's catalog head verbatim once it holds every snapshot that
    head lists, so O(snapshots) must leave none of them out (the destination may hold them already), and the
    snapshots the source expired are removed from the destination too. Chunks are never deleted at the destination
    then (see RV(dest_only_chunks)).
  - With O(authenticate) (KMIP access to the job's master keys, as for M(kmipbackup.mongodb.snapshot_restore)) the
    source is authenticated first (catalog head, entries, manifests, every chunk copied), only the chunks the copied
    snapshots reference are copied, and the destination keeps a catalog head of its own, with its own retention
    (O(dest_retention)) and garbage collection.
  - The job's change segments (point in time) after the oldest snapshot live at the destination are copied with the
    snapshots, as stored, before the snapshots become visible; each is checked for its format and its chain (the
    SHA-256 of the segment before it) without keys, and opened with O(authenticate). So the destination restores to a
    point as the source does. Without O(authenticate) the destination's segments are never deleted; with it they are
    collected with the job's O(kmipbackup.mongodb.backup_job_encryption#module:point_in_time_window_hours) (24 when the
    job is not declared on this host).
  - Use one mode per destination, and one copy at a time per destination.
  - See the store format documentation (C(docs/store-format.md), "Copies between stores") for the details.
author: kmipbackup developers (@kmipbackup)
extends_documentation_fragment:
  - kmipbackup.mongodb.attributes
  - kmipbackup.mongodb.kmip.CONNECTION
  - kmipbackup.mongodb.kmip.CLIENT_CERT
  - kmipbackup.mongodb.kmip.ACCESS
  - kmipbackup.mongodb.store
  - kmipbackup.mongodb.requirements
attributes:
  check_mode:
    support: full
    details: Reports the plan (snapshots, objects and bytes to copy, snapshots to expire) without writing anything.
  diff_mode:
    support: none
  idempotent:
    support: full
    details: What the destination holds already is skipped; a second run copies nothing and reports no change.
options:
  job:
    description: Name of the backup job (its area in both stores).
    type: str
    required: true
  snapshots:
    description:
      - Which of the source's live snapshots to copy - V(all), V(latest), or a list of snapshot ids (from
        M(kmipbackup.mongodb.snapshot_info)).
    type: list
    elements: str
    default: [all]
  store:
    description:
      - The source snapshot store's folder. Mutually exclusive with O(object_store).
      - When neither is given, the store recorded for O(job) in O(config_dir) is used.
      - O(object_store) (below) is the source store in a bucket.
    type: path
  dest_store:
    description:
      - The destination snapshot store's folder (created when missing). One of O(dest_store) and O(dest_object_store)
        is required.
    type: path
  dest_object_store:
    description:
      - The destination snapshot store in an S3-compatible bucket (the bucket must exist).
    type: dict
    suboptions:
      bucket:
        description: The bucket (3 to 63 lowercase letters, digits, dots and hyphens). It must exist.
        type: str
        required: true
      prefix:
        description: The key prefix below which the store lives (one area per job under it); empty for the bucket's root.
        type: str
        default: ''
      endpoint_url:
        description: The S3 endpoint, V(https://host[:port]) (V(http://) only for a test server). Omit for AWS S3.
        type: str
      region:
        description: The bucket's region; V(us-east-1) when omitted.
        type: str
      addressing_style:
        description: V(path) (most self-hosted servers), V(virtual) (bucket in the host name) or V(auto).
        type: str
        choices: [path, virtual, auto]
        default: path
      ca_bundle:
        description: The PEM file of the CA that signed the endpoint's certificate, when not a public CA.
        type: path
      access_key:
        description: The access key id. Without it and O(dest_object_store.secret_key), the standard AWS credential chain is used.
        type: str
      secret_key:
        description: The secret access key. Never logged nor returned.
        type: str
      session_token:
        description: A session token for temporary credentials. Never logged nor returned.
        type: str
      connect_timeout:
        description: Seconds to wait for a connection to the endpoint.
        type: float
        default: 10
      read_timeout:
        description: Seconds to wait for an answer.
        type: float
        default: 60
  authenticate:
    description:
      - Authenticate the source with the job's keys through KMIP before copying, copy only the chunks the copied
        snapshots reference, and give the destination a catalog head and a retention of its own.
      - Needs KMIP access (O(kmip_servers), O(kmip_ca_file) and O(client_cert_file), or O(config_dir) on a daemon
        host). Required by O(dest_retention), and by O(snapshots) that leave out a live snapshot the destination does
        not hold.
    type: bool
    default: false
  dest_retention:
    description:
      - The destination's own retention, applied after the copy (needs O(authenticate)). The newest snapshot is always
        kept. Without it, an authenticated copy expires nothing, and a copy without keys follows the source's expiry.
    type: dict
    suboptions:
      keep_last:
        description: Keep the newest N snapshots.
        type: int
      schedule:
        description:
          - Ops Manager's retention rules, as a job's schedule takes them (interval_hours, recent_days, daily_days,
            weekly_weeks, monthly_months), or V(job) for the job's own schedule from O(config_dir).
        type: raw
seealso:
  - module: kmipbackup.mongodb.snapshot_info
  - module: kmipbackup.mongodb.snapshot_restore
"""

EXAMPLES = r"""
- name: Mirror job orders' snapshots into an off-site bucket (no KMIP access needed)
  kmipbackup.mongodb.snapshot_copy:
    job: orders
    dest_object_store:
      bucket: offsite-backups
      prefix: kmipbackup
      endpoint_url: https://s3.dc2.example.com
      access_key: "{{ offsite_access_key }}"
      secret_key: "{{ offsite_secret_key }}"

- name: Keep the latest snapshot of each day for 30 days in a folder on another site, authenticated
  kmipbackup.mongodb.snapshot_copy:
    job: orders
    snapshots: latest
    dest_store: /mnt/dc2/kmipbackup
    authenticate: true
    dest_retention:
      schedule: {interval_hours: 24, recent_days: 2, daily_days: 30, weekly_weeks: 0, monthly_months: 0}

- name: Move a folder store into a bucket
  kmipbackup.mongodb.snapshot_copy:
    job: orders
    store: /var/lib/kmipbackup/store
    dest_object_store:
      bucket: backups
      endpoint_url: https://minio.example.com:9000
      access_key: "{{ minio_access_key }}"
      secret_key: "{{ minio_secret_key }}"
"""

RETURN = r"""
source:
  description: The source store (a folder, or s3://bucket/prefix; never credentials).
  returned: success
  type: str
  sample: /var/lib/kmipbackup/store
dest:
  description: The destination store.
  returned: success
  type: str
  sample: s3://offsite-backups/kmipbackup
authenticated:
  description: Whether the copy was made with the job's keys (O(authenticate)).
  returned: success
  type: bool
snapshots:
  description: The ids of the snapshots copied (to be copied, in check mode), oldest first.
  returned: success
  type: list
  elements: str
  sample: ["20261130T091927Z-8bbcda20"]
expired:
  description: The snapshots removed from the destination (their catalog entries, after its new catalog head).
  returned: success
  type: list
  elements: str
live:
  description: The destination's live snapshots after the copy, oldest first.
  returned: success
  type: list
  elements: str
head:
  description:
    - What happened to the destination's catalog head - V(copied) (the source's, verbatim), V(written) (its own,
      authenticated copies) or V(unchanged).
  returned: success
  type: str
  sample: copied
objects:
  description: Objects copied (to be copied, in check mode) by kind.
  returned: success
  type: dict
  sample: {"keyring": 2, "chunks": 118, "segments": 42, "manifests": 1, "catalog": 1}
bytes:
  description: Bytes copied (to be copied, in check mode).
  returned: success
  type: int
  sample: 123456789
skipped:
  description: Objects the destination held already, equal to the source's.
  returned: success and not check mode
  type: int
dest_only_chunks:
  description:
    - Chunks the destination holds that the source no longer does (chunks of snapshots the source expired, collected
      by an authenticated copy). Copies without keys never delete chunks.
  returned: success
  type: int
gc:
  description:
    - The destination's garbage collection after an authenticated copy (chunks and bytes freed), with C(segments) the
      change segments' collection (C(segments_deleted), C(bytes_freed), C(segments) kept).
  returned: success, authenticated copies, not check mode
  type: dict
error_kind:
  description: The kind of error (for example V(manifest), V(chunk), V(catalog entry), V(StoreError)).
  returned: on failure
  type: str
  sample: manifest
"""

import traceback

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.ansible_module import KmipBackupModule, object_store_spec

try:
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import store_copy
    IMPORT_ERROR = None
except ImportError:
    IMPORT_ERROR = traceback.format_exc()


def argument_spec():
    return dict(
        job=dict(type="str", required=True),
        snapshots=dict(type="list", elements="str", default=["all"]),
        store=dict(type="path"),
        dest_store=dict(type="path"),
        **object_store_spec("dest_object_store"),
        authenticate=dict(type="bool", default=False),
        dest_retention=dict(type="dict", options=dict(keep_last=dict(type="int"), schedule=dict(type="raw")),
                            mutually_exclusive=[("keep_last", "schedule")]),
    )


SHARED = ("store_reader", "object_store")  # the base's shared options this module takes


def main():
    module = KmipBackupModule(argument_spec, shared=SHARED, import_error=IMPORT_ERROR,
                              mutually_exclusive=[("store", "object_store"), ("dest_store", "dest_object_store")],
                              required_one_of=[("dest_store", "dest_object_store")])
    module.run(store_copy.copy_request, module.params, module.check_mode)


if __name__ == "__main__":
    main()
