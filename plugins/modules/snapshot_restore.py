#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r'''
---
module: snapshot_restore
short_description: Restore a snapshot of a backup job to MongoDB, a mongodump directory or a mongodump archive
version_added: 0.1.0
description:
  - Restores snapshot O(snapshot) of O(job) from the snapshot store O(store) to exactly one target, O(target_mongodb)
    (a MongoDB deployment), O(target_dir) (mongodump layout, C(<db>/<coll>.bson) and C(<coll>.metadata.json)) or
    O(target_archive) (a mongodump C(--archive) file), as C(mongorestore) would then use it.
  - Needs no Backup Daemon and no configuration files; on a fresh host give the store, the KMIP server
    (O(kmip_servers), O(kmip_ca_file)) and a client certificate provisioned for the snapshot's master keys
    (O(client_cert_file)). On a daemon host, O(config_dir) and the job's group are used instead.
  - Before writing anything, resolves O(snapshot) through the store's authenticated catalog head (V(latest) is the
    newest snapshot the head records, never whatever entry an unauthenticated listing shows last), checks that the
    catalog entry is bound to that id and live, compares the head with the Backup Daemon's own record of its last
    snapshot where O(data_dir) has one (a rolled-back store fails naming what is missing), checks that the
    certificate can use every master key the snapshot needs (naming the UUIDs it cannot use), authenticates the
    keyring entries and the manifest, and refuses to write into non-empty target namespaces unless O(drop=true).
    Every chunk is authenticated as it is read; a tampered store object fails the restore with an integrity error
    naming the object.
  - The result's RV(snapshot_id) is the resolved id (RV(snapshot_requested) what was asked for); the restore fails if
    the snapshot restored is not the one resolved.
  - A directory or archive target is built next to its final place and renamed into place at the end, so a failure
    leaves it untouched. A MongoDB target records the restore in C(kmipbackup_restore.restoreInfo) (state
    C(incomplete) until the restore is verified), so an interrupted restore is clearly marked. It inserts as it
    reads each chunk (once); namespaces it replaces (O(drop=true)) load under temporary names renamed over them at
    the end, so a tampered or missing chunk, or a store lost mid-way, leaves the target as it was.
  - Writes C(restoreInfo.txt) as Ops Manager does (snapshot id, cluster time, encryption, master key UUIDs, KMIP
    server) inside a directory target, next to an archive target (C(<archive>.restoreInfo.txt)), or at
    O(restore_info_file) for a MongoDB target.
  - With encryption, namespace names are secret (they never reach the store, logs or Ansible output in plaintext);
    unless O(show_namespaces=true), the result and error messages name namespaces by their position in the
    snapshot (V(#1), V(#2), ...).
  - An unencrypted snapshot is only checksummed, not authenticated, so anyone who can write to the store could forge
    one. A snapshot marked unencrypted is therefore refused when the job is encrypted (its configuration in
    O(config_dir) says so or, on a fresh host, its keyring in the store holds wrapped keys), unless
    O(allow_unencrypted=true).
author: kmipbackup developers (@kmipbackup)
extends_documentation_fragment:
  - kmipbackup.mongodb.attributes
  - kmipbackup.mongodb.kmip.CONNECTION
  - kmipbackup.mongodb.kmip.CLIENT_CERT
  - kmipbackup.mongodb.kmip.ACCESS
  - kmipbackup.mongodb.store
  - kmipbackup.mongodb.requirements
attributes:
  action:
    description: Runs through an action plugin, which shows the restore's progress while the task runs (O(progress_file)).
    support: full
  check_mode:
    support: full
    details:
      - Reports what would be restored (namespaces, counts and sizes from the manifest when the keys are reachable,
        else totals from the catalog) and checks the KMIP keys and the target, without writing anything.
  diff_mode:
    support: none
  idempotent:
    support: full
    details:
      - When the target already holds a complete restore of the same snapshot with the same namespaces (after
        O(include), O(exclude) and O(rename_databases)), nothing is done (C(changed=false)) unless O(force=true).
        The same snapshot restored into other databases is another restore.
options:
  job:
    description: Name of the backup job whose snapshot is restored.
    type: str
    required: true
  snapshot:
    description: The snapshot id (see M(kmipbackup.mongodb.snapshot_info)) or V(latest).
    type: str
    default: latest
  point_in_time:
    description:
      - Restore the job's data as it was at this point in time instead of a snapshot's. An ISO 8601 time
        (V(2026-11-30T14:37:00Z); a time without an offset is UTC; every operation within that second is included)
        or a cluster time as a dict with keys C(t) (seconds) and C(i) (increment), included.
      - The newest snapshot at or before the point is restored (O(snapshot) may stay V(latest), or name exactly that
        snapshot), then the job's change segments after it are authenticated, chain-checked and replayed up to and
        including the point into a temporary encrypted head (a random key held in memory only, in a private folder
        of the system's temporary directory, C(TMPDIR), removed afterwards), and the result is restored to the target
        with O(include), O(exclude) and O(rename_databases) as a snapshot is. Only the snapshot chunks that the
        replayed changes touch are loaded into the temporary head; the others go from the store to the target as
        in a snapshot restore.
      - A point outside every restorable range, or inside a gap (after a resync or a lost resume point), is refused
        naming the nearest restorable times, and nothing is written; M(kmipbackup.mongodb.snapshot_info) lists the
        job's restorable ranges. A missing, modified, reordered or replayed segment fails the restore naming it,
        before anything is written to the target.
      - Needs KMIP access (the segments and the snapshot must be authenticated), also in check mode. In check mode
        the plan (base snapshot, segments, target checks) is made without replaying, and RV(namespaces),
        RV(documents) and RV(bytes) are the base snapshot's.
      - C(restoreInfo.txt) records the point, the base snapshot and the segments used; the restore goes by
        RV(restore_id) (base snapshot and point) for O(force) and the already-restored check.
    type: raw
    version_added: 0.2.0
  store:
    description:
      - The snapshot store root (a folder). When neither this nor O(object_store) is given, the store recorded for
        O(job) in O(config_dir) is used.
    type: path
  target_mongodb:
    description:
      - The MongoDB deployment to restore to, with the same suboptions as the O(kmipbackup.mongodb.backup_job_encryption#module:source)
        of a backup job.
    type: dict
    suboptions:
      uri:
        description: MongoDB connection string (C(mongodb://) or C(mongodb+srv://)); a password in it is masked in the output.
        type: str
        required: true
      tls:
        description: Connect with TLS (O(target_mongodb.tls_ca_file) and O(target_mongodb.tls_certificate_key_file) apply only with it).
        type: bool
        default: false
      tls_ca_file:
        description: CA file that signs the target's certificates.
        type: path
      tls_certificate_key_file:
        description: Client certificate and key (PEM) for mutual TLS or MONGODB-X509.
        type: path
      username:
        description: User to authenticate as.
        type: str
      password:
        description: Password of O(target_mongodb.username).
        type: str
      auth_mechanism:
        description: Authentication mechanism, for example V(SCRAM-SHA-256) or V(MONGODB-X509).
        type: str
      auth_source:
        description: Database that holds the user's credentials.
        type: str
      connect_timeout:
        description: Seconds to wait for the target when connecting.
        type: int
        default: 10
  target_dir:
    description:
      - Folder to restore to in mongodump's directory layout; must be absent or empty unless O(drop=true).
      - It may not be, be inside, or contain the snapshot store, O(data_dir) or O(config_dir) (refused, even with
        O(force=true)).
    type: path
  target_archive:
    description:
      - File to restore to in mongodump's C(--archive) format; must be absent unless O(drop=true).
      - It may not be, be inside, or contain the snapshot store, O(data_dir) or O(config_dir).
    type: path
  restore_info_file:
    description:
      - Where to write C(restoreInfo.txt) for a O(target_mongodb) restore.
      - Default C(~/restoreInfo-<job>-<snapshot id>.txt) in the home folder of the user the module runs as.
    type: path
  include:
    description: Restore only namespaces (V(db.collection)) matching one of these shell patterns.
    type: list
    elements: str
  exclude:
    description: Skip namespaces matching one of these shell patterns.
    type: list
    elements: str
  rename_databases:
    description:
      - Restore each database named by a key into the database named by its value.
      - 'For example C({orders: orders_restored}).'
    type: dict
  drop:
    description:
      - Replace non-empty target namespaces (and an existing directory or archive).
      - With V(false), a restore into non-empty namespaces fails naming them, and nothing is written.
      - An existing O(target_dir) is replaced only when it holds a previous restore or a mongodump layout
        (C(<db>/<coll>.bson), C(.metadata.json), C(restoreInfo.txt)), and an existing O(target_archive) only when it
        is a mongodump archive or a previous restore; anything else is refused unless O(force=true).
    type: bool
    default: false
  force:
    description:
      - Restore even when the target already holds a complete restore of this snapshot; that earlier restore is
        replaced (as with O(drop=true)).
      - With O(drop=true), also replace an existing O(target_dir) or O(target_archive) that is not a previous restore
        or a mongodump layout. Never a target that is, is inside or contains the snapshot store, O(data_dir) or
        O(config_dir).
    type: bool
    default: false
  verify:
    description: Compare every restored namespace's document count and content hash with the manifest.
    type: bool
    default: true
  allow_unencrypted:
    description:
      - Restore a snapshot marked unencrypted even though the job is encrypted, for a job whose snapshots were taken
        before its encryption was enabled. Only with a store you trust, as such a snapshot is not authenticated.
    type: bool
    default: false
  show_namespaces:
    description:
      - Name namespaces in the result and in messages for an encrypted snapshot. Namespace names of unencrypted
        snapshots are always shown.
    type: bool
    default: false
  progress_file:
    description:
      - Write the restore's progress to this file while it runs, as JSON rewritten atomically every second (documents,
        bytes, their totals, percent, rate, ETA, and C(line), one line for an operator); counts and sizes only, never
        a namespace name. The file is removed when the restore ends.
      - The task prints the record's line every O(progress_seconds) while it runs (C(playbooks/restore.yml) does so).
        The action plugin reads the record over the connection with C(cat), while the module runs over the C(local)
        and C(ssh) connections without become (and for ssh without a password), where a second command may run
        beside the module's; elsewhere it runs the module in the background and polls it from the same task, one
        command at a time. With C(async) the task prints nothing; poll it with
        M(kmipbackup.mongodb.restore_progress_info).
      - Its folder must be private to the user the module runs as (mode 0700), or not exist yet (then it is created
        so). Not written in check mode.
    type: path
  progress_seconds:
    description:
      - With O(progress_file), show the restore's progress line every this many seconds while it runs; V(0) shows none.
    type: float
    default: 5
    version_added: 0.2.0
  timeout:
    description:
      - Stop the restore once it has run this many seconds (counted from the module's start, a point's replay
        included) and fail, putting the target back as on a tampered chunk; V(0) sets no limit.
      - Use it rather than the task's C(timeout) keyword, which fails the task but leaves the module running on the host.
    type: int
    default: 0
    version_added: 0.2.0
notes:
  - O(target_mongodb) restores use the target's write concern defaults; documents are inserted as raw BSON, unchanged.
seealso:
  - module: kmipbackup.mongodb.snapshot_info
  - module: kmipbackup.mongodb.backup_snapshot
'''

EXAMPLES = r'''
- name: Restore the latest snapshot of job orders into new databases on a recovery cluster
  kmipbackup.mongodb.snapshot_restore:
    job: orders
    target_mongodb:
      uri: mongodb://recovery.example.com:27017/?replicaSet=rs0
      username: restore
      password: "{{ vault_restore_password }}"
    rename_databases:
      orders: orders_restored

- name: On a fresh host with only the store, the KMIP server and a certificate
  kmipbackup.mongodb.snapshot_restore:
    job: orders
    snapshot: 20261127T180000Z-1a2b3c4d
    store: /mnt/backup/store
    kmip_servers: [kmip1.example.com, kmip2.example.com]
    kmip_ca_file: /etc/pki/kmip/ca.pem
    client_cert_file: /etc/pki/kmip/orders-restore.pem
    client_cert_password: "{{ vault_kmip_password }}"
    target_dir: /srv/restore/orders

- name: On a fresh host from the job's bucket (only the bucket's credentials, the KMIP server and a certificate)
  kmipbackup.mongodb.snapshot_restore:
    job: orders
    object_store:
      bucket: backups
      prefix: kmipbackup
      endpoint_url: https://s3.example.com
      access_key: "{{ vault_s3_access_key }}"
      secret_key: "{{ vault_s3_secret_key }}"
    kmip_servers: [kmip1.example.com]
    kmip_ca_file: /etc/pki/kmip/ca.pem
    client_cert_file: /etc/pki/kmip/orders-restore.pem
    client_cert_password: "{{ vault_kmip_password }}"
    target_dir: /srv/restore/orders

- name: The orders database as it was at 14:37 (UTC), before a bad deployment, next to the live one
  kmipbackup.mongodb.snapshot_restore:
    job: orders
    point_in_time: "2026-11-30T14:37:00Z"
    include: ["orders.*"]
    rename_databases:
      orders: orders_1437
    target_mongodb:
      uri: mongodb://recovery.example.com:27017/?replicaSet=rs0

- name: Up to and including one operation, by its cluster time (as an oplog entry or a change event shows it)
  kmipbackup.mongodb.snapshot_restore:
    job: orders
    point_in_time: {t: 1796049420, i: 3}
    target_dir: /srv/restore/orders-pitr

- name: Only the invoices collection, as a mongodump archive
  kmipbackup.mongodb.snapshot_restore:
    job: orders
    include: [orders.invoices]
    target_archive: /srv/restore/invoices.archive
'''

RETURN = r'''
snapshot_id:
  description:
    - The restored snapshot's id, resolved from O(snapshot) (V(latest)) through the store's catalog head.
    - Without KMIP access (check mode only) it comes from the unauthenticated catalog; see RV(planned_from).
  returned: always
  type: str
  sample: 20261127T180000Z-1a2b3c4d
point_in_time:
  description: The point restored to (O(point_in_time) as a cluster time, and its time in UTC).
  returned: when O(point_in_time) is given
  type: dict
  contains:
    t:
      description: Seconds of the cluster time.
      type: int
    i:
      description: Increment of the cluster time.
      type: int
    time:
      description: The cluster time's seconds as an ISO 8601 time (UTC).
      type: str
  sample: {"t": 1796049420, "i": 4294967295, "time": "2026-11-30T14:37:00Z"}
base_snapshot_id:
  description: The snapshot a point-in-time restore starts from (also RV(snapshot_id)).
  returned: when O(point_in_time) is given
  type: str
restore_id:
  description: What a point-in-time restore goes by in C(restoreInfo.txt) and the MongoDB target's marker,
    C(<base snapshot id>@<t>.<i>).
  returned: when O(point_in_time) is given
  type: str
  sample: 20261130T120000Z-1a2b3c4d@1796049420.4294967295
segments:
  description: Number of change segments replayed (to replay, in check mode).
  returned: when O(point_in_time) is given
  type: int
replayed:
  description: What the replay did.
  returned: when O(point_in_time) is given and a restore ran
  type: dict
  contains:
    events:
      description: Change events replayed. A segment applied by its post-images is read without its events, which are
        not counted here.
      type: int
    records:
      description: Records applied (events, the daemon's corrections of its head, post-image records).
      type: int
    segments:
      description: Segments read.
      type: int
    post_images:
      description: Segments applied by their post-images (the documents they changed, as the daemon's head held them at
        the segment's end) instead of event by event; only on the V(overlap) path.
      type: int
      returned: when path is V(overlap)
    loaded_chunks:
      description: Chunks of the base snapshot loaded into the temporary head because the replay touched them.
      type: int
    path:
      description: How the image at the point was rebuilt. V(overlap) when the changes after the base snapshot are
        only inserts, replaces, updates and deletes on its collections (a separate replay process replays the touched
        key ranges while the untouched chunks are restored), V(sequential) otherwise (a temporary encrypted head).
      type: str
      sample: overlap
snapshot_requested:
  description: The O(snapshot) asked for (an id or V(latest)).
  returned: always
  type: str
  sample: latest
created:
  description: When the snapshot was taken (ISO 8601, UTC).
  returned: always
  type: str
cluster_time:
  description: The source cluster time the restored data is consistent at, C([seconds, increment]) (the point, for
    O(point_in_time)).
  returned: always
  type: list
  elements: int
encryption:
  description: Whether the snapshot is encrypted.
  returned: always
  type: bool
master_key_uids:
  description: The KMIP master key UUIDs the snapshot needs.
  returned: always
  type: list
  elements: str
target:
  description: V(mongodb), V(directory) or V(archive).
  returned: always
  type: str
already_restored:
  description: Whether the target already held a complete restore of this snapshot, with the same namespaces restored to
    the same places, before this run.
  returned: always
  type: bool
planned_from:
  description: V(manifest) when namespaces come from the authenticated manifest, V(catalog) when only the catalog's
    totals were available (check mode without KMIP access).
  returned: always
  type: str
namespaces:
  description: Namespaces restored (would be restored in check mode), in snapshot order.
  returned: when planned from the manifest
  type: list
  elements: dict
  contains:
    source:
      description: The namespace in the snapshot (V(#n) for an encrypted snapshot unless O(show_namespaces=true)).
      type: str
    target:
      description: The namespace written (after O(rename_databases)); V(#n) like RV(namespaces[].source).
      type: str
    count:
      description: Documents.
      type: int
    bytes:
      description: Size of the documents (BSON).
      type: int
    verified:
      description: Whether count and content hash were checked against the manifest.
      type: bool
documents:
  description: Total documents restored (or to restore).
  returned: always
  type: int
bytes:
  description: Total BSON bytes restored (or to restore).
  returned: always
  type: int
busy_namespaces:
  description: Non-empty target namespaces (named as in RV(namespaces[].target)) that O(drop=true) would replace.
  returned: when the target is MongoDB
  type: list
  elements: str
verify:
  description: Verification summary.
  returned: when a restore ran
  type: dict
  contains:
    enabled:
      description: Whether verification ran.
      type: bool
    namespaces_verified:
      description: Namespaces whose count and content hash matched the manifest.
      type: int
restore_info:
  description: Path of C(restoreInfo.txt).
  returned: always
  type: str
restore_info_text:
  description: The content of C(restoreInfo.txt) (no secrets, no namespace names).
  returned: when a restore ran
  type: str
seconds:
  description: How long the restore itself took (after the checks and the plan).
  returned: when a restore ran
  type: float
rate:
  description: The restore's average rate.
  returned: when a restore ran
  type: dict
  contains:
    docs_per_second:
      description: Documents per second.
      type: int
    bytes_per_second:
      description: BSON bytes per second.
      type: int
    summary:
      description: The totals, the time and the rates in one line.
      type: str
      sample: "80.1 MB and 5000 document(s) in 4.2 s: 19.0 MB/s, 1186 document(s)/s"
kmip_calls:
  description: KMIP operations this run made (one access check per master key and one unwrap per data key).
  returned: always
  type: int
kmip_server:
  description: The KMIP server used (host:port), if any.
  returned: always
  type: str
error_kind:
  description: The kind of error (for example V(permission_denied), V(catalog entry), V(ConfigError), V(mongodb)).
  returned: on failure
  type: str
  sample: permission_denied
'''

import traceback

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.ansible_module import KmipBackupModule, mongodb_connection_spec

try:
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import restore_request
    IMPORT_ERROR = None
except ImportError:
    IMPORT_ERROR = traceback.format_exc()

TARGETS = ("target_mongodb", "target_dir", "target_archive")


def argument_spec():
    return dict(
        job=dict(type="str", required=True),
        snapshot=dict(type="str", default="latest"),
        store=dict(type="path"),
        target_mongodb=mongodb_connection_spec(restore_request.CONNECTION_DEFAULTS),
        target_dir=dict(type="path"),
        target_archive=dict(type="path"),
        restore_info_file=dict(type="path"),
        include=dict(type="list", elements="str"),
        exclude=dict(type="list", elements="str"),
        rename_databases=dict(type="dict"),
        drop=dict(type="bool", default=False),
        force=dict(type="bool", default=False),
        verify=dict(type="bool", default=True),
        allow_unencrypted=dict(type="bool", default=False),
        show_namespaces=dict(type="bool", default=False),
        point_in_time=dict(type="raw"),
        progress_file=dict(type="path"),
        progress_seconds=dict(type="float", default=5),  # the action plugin's (plugins/action/snapshot_restore.py)
        timeout=dict(type="int", default=0),
    )


SHARED = ("store_reader", "object_store")  # the base's shared options this module takes


def main():
    module = KmipBackupModule(argument_spec, shared=SHARED, import_error=IMPORT_ERROR,
                              mutually_exclusive=[TARGETS, ("store", "object_store")], required_one_of=[TARGETS],
                              secret_values=[lambda p: (p["target_mongodb"] or {}).get("uri")])
    module.run(restore_request.run_restore, module.params, check_mode=module.check_mode)


if __name__ == "__main__":
    main()
