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
  - Restores snapshot O(snapshot) of O(job) from the snapshot store O(store) to exactly one target, O(target_uri)
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
    C(incomplete) until the restore is verified), so an interrupted restore is clearly marked.
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
  - kmipbackup.mongodb.kmip.ACCESS
attributes:
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
  store:
    description:
      - The snapshot store root. When omitted, the store recorded for O(job) in O(config_dir) is used.
    type: path
  config_dir:
    description:
      - The daemon host's configuration folder; read (never written) for the job's store and group, and for the KMIP
        configuration when O(kmip_servers) is not given. Not needed on a fresh host.
    type: path
    default: /etc/kmipbackup
  target_uri:
    description:
      - MongoDB URI of the target deployment. Treated as a secret (it may carry credentials).
    type: str
  target_tls:
    description: Use TLS to the target.
    type: bool
    default: false
  target_tls_ca_file:
    description: CA file for the target's TLS certificate.
    type: path
  target_tls_certificate_key_file:
    description: Client certificate and key (PEM) for the target (mutual TLS, MONGODB-X509).
    type: path
  target_username:
    description: User name on the target.
    type: str
  target_password:
    description: Password on the target.
    type: str
  target_auth_mechanism:
    description: Authentication mechanism on the target (for example V(SCRAM-SHA-256), V(MONGODB-X509)).
    type: str
  target_auth_source:
    description: Authentication database on the target.
    type: str
  target_connect_timeout:
    description: Seconds to wait for the target deployment.
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
      - Where to write C(restoreInfo.txt) for a O(target_uri) restore.
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
notes:
  - O(target_uri) restores use the target's write concern defaults; documents are inserted as raw BSON, unchanged.
seealso:
  - module: kmipbackup.mongodb.snapshot_info
  - module: kmipbackup.mongodb.backup_snapshot
'''

EXAMPLES = r'''
- name: Restore the latest snapshot of job orders into new databases on a recovery cluster
  kmipbackup.mongodb.snapshot_restore:
    job: orders
    target_uri: mongodb://recovery.example.com:27017/?replicaSet=rs0
    target_username: restore
    target_password: "{{ vault_restore_password }}"
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
  description: The source cluster time the restored data is consistent at, C([seconds, increment]).
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
kmip_calls:
  description: KMIP operations this run made (one access check per master key and one unwrap per data key).
  returned: always
  type: int
kmip_server:
  description: The KMIP server used (host:port), if any.
  returned: always
  type: str
'''

import os
import pwd

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    ansible_module, config, datadir, job_config, job_status, kmip, restore, store)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import (
    ConfigError, IntegrityError, KmipBackupError, RestoreError)

try:
    from pymongo.errors import PyMongoError
except ImportError:  # the core reports the missing package when a MongoDB target is used
    class PyMongoError(Exception):
        pass


def store_root(p, cfg):
    if p["store"]:
        return p["store"]
    if cfg is None:
        raise ConfigError("Job %s is not declared in %s: give store, the snapshot store folder." % (p["job"], p["config_dir"]))
    return datadir.store_root(cfg, p["data_dir"])


def protected_folders(p, root):
    """The folders no directory or archive target may be, be inside or contain."""
    return {"snapshot store": root, "data_dir": p["data_dir"], "config_dir": p["config_dir"]}


def make_target(p, sid, protected):
    """(target, restore info path); a directory or archive target at a protected folder is refused here, before
    anything is written."""
    if p["target_dir"]:
        restore.check_target_location(p["target_dir"], protected)
        t = restore.DirectoryTarget(p["target_dir"], protected, p["force"])
        return t, os.path.join(t.path, restore.RESTORE_INFO)
    if p["target_archive"]:
        restore.check_target_location(p["target_archive"], protected)
        t = restore.ArchiveTarget(p["target_archive"], protected, p["force"])
        return t, t.info_path
    info = p["restore_info_file"] or os.path.join(pwd.getpwuid(os.getuid()).pw_dir, "restoreInfo-%s-%s.txt" % (p["job"], sid))
    opts = {"serverSelectionTimeoutMS": p["target_connect_timeout"] * 1000, "connectTimeoutMS": p["target_connect_timeout"] * 1000}
    for param, opt in (("target_tls_ca_file", "tlsCAFile"), ("target_tls_certificate_key_file", "tlsCertificateKeyFile"),
                       ("target_username", "username"), ("target_password", "password"),
                       ("target_auth_mechanism", "authMechanism"), ("target_auth_source", "authSource")):
        if p[param]:
            opts[opt] = p[param]
    if p["target_tls"]:
        opts["tls"] = True
    return restore.MongoTarget(p["target_uri"], restore_info_path=os.path.abspath(info), **opts), os.path.abspath(info)


def job_encrypted(p, cfg, js):
    """(whether the job is encrypted, why we know): its configuration, or on a fresh host its keyring."""
    if cfg is not None:
        return bool(cfg.get("encryption")), "its configuration in %s enables encryption" % p["config_dir"]
    return bool(js.keyring_records()), "its keyring in the store holds wrapped data keys"


def check_encryption_expected(p, cfg, js, entry):
    """Refuse a snapshot marked unencrypted of an encrypted job (a downgrade) unless allow_unencrypted; returns
    whether the snapshot must be encrypted."""
    if p["allow_unencrypted"]:
        return False
    expected, why = job_encrypted(p, cfg, js)
    if expected and not entry.get("encryption"):
        raise IntegrityError("Snapshot %s is marked unencrypted, but job %s is encrypted (%s): an unencrypted snapshot is "
                             "not authenticated, so a forged one could pass as it. Restore an encrypted snapshot, or set "
                             "allow_unencrypted=true if this job really took unencrypted snapshots before its encryption "
                             "was enabled and you trust the store." % (entry["snapshot_id"], p["job"], why),
                             kind="catalog entry", object_id=entry["snapshot_id"])
    return expected


class Restore:
    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.client = None
        self.keys = self.last_known = None
        self.checked = set()  # master key UIDs whose access was checked

    def label(self, entry, i, name):
        return restore.label(entry.get("encryption"), i, name, self.p["show_namespaces"])

    def run(self):
        p = self.p
        cfg = job_config.load_job(p["config_dir"], p["job"])  # None on a fresh host
        root = store_root(p, cfg)
        js = store.JobStore(root, config.validate_name(p["job"], "job name"))
        settings = ansible_module.kmip_settings(p, cfg)
        target = None
        result = {"snapshot_requested": p["snapshot"], "kmip_calls": 0, "kmip_server": None}
        try:
            if settings is not None:
                self.client = kmip.KmipClient(*settings)
            self.last_known = job_status.daemon_last_snapshot(p["data_dir"], p["job"])
            entry, self.keys = self._resolve(js, cfg)
            sid = entry["snapshot_id"]
            expect_encryption = check_encryption_expected(p, cfg, js, entry)
            target, info_path = make_target(p, sid, protected_folders(p, root))
            result.update(snapshot_id=sid, created=entry.get("created"), cluster_time=entry.get("cluster_time"),
                          encryption=bool(entry.get("encryption")), master_key_uids=entry.get("master_key_uids") or [],
                          target=target.kind, restore_info=info_path)
            return self._run(js, entry, target, settings, result, expect_encryption)
        finally:
            if self.client is not None:
                result["kmip_calls"] = self.client.calls
                self.client.close()
            if target is not None and target.kind == "mongodb":
                target.close()

    def _resolve(self, js, cfg):
        """(catalog entry, Keys of the job's encryption or None): through the authenticated catalog head (and the daemon's
        record) when KMIP access is configured, else the unauthenticated entry (check mode then plans from the catalog)."""
        if self.client is None:
            return js.catalog_entry(self.p["snapshot"]), None
        encrypted, _why = job_encrypted(self.p, cfg, js)
        keys = store.Keys(js, provider=self.client, encryption=encrypted)
        # first the master keys that authenticating will use: a certificate that cannot use one is named with its UUIDs
        self.checked.update(self.client.require_keys(js.auth_master_key_uids(keys), "that checking the catalog needs"))
        # an unencrypted entry of an encrypted job is refused by check_encryption_expected, which knows allow_unencrypted
        return js.resolve(self.p["snapshot"], keys, expect_encryption=False, keyed_head=encrypted,
                          last_known=self.last_known), keys

    def _run(self, js, entry, target, settings, result, expect_encryption):
        p, sid = self.p, entry["snapshot_id"]
        keys = self.keys
        if keys is None or keys.encryption != bool(entry.get("encryption")):
            keys = store.Keys(js, provider=self.client, encryption=bool(entry.get("encryption")))
        if entry.get("encryption"):
            if self.client is None:
                if not self.module.check_mode:
                    raise ConfigError("Snapshot %s is encrypted: give the KMIP server (kmip_servers, kmip_ca_file) and a client "
                                      "certificate provisioned for master key(s) %s (client_cert_file), or config_dir and group."
                                      % (sid, ", ".join(result["master_key_uids"])))
                self.module.warn("No KMIP access configured: the plan comes from the unauthenticated catalog.")
            else:
                self.client.require_keys([u for u in result["master_key_uids"] if str(u) not in self.checked])
                result["kmip_server"] = self.client.server
        if self.client is None and entry.get("encryption"):
            already = restore.already_restored(js, sid, target)
            result.update(already_restored=already, planned_from="catalog", documents=entry.get("doc_count"), bytes=entry.get("data_bytes"))
            result["changed"] = not already or p["force"]
            return result
        entry, selected = restore.plan(js, sid, keys, p["include"], p["exclude"], p["rename_databases"], expect_encryption,
                                       last_known=self.last_known)
        already = restore.already_restored(js, sid, target, selected)
        result.update(already_restored=already, planned_from="manifest",
                      namespaces=[{"source": self.label(entry, i, n["ns"]), "target": self.label(entry, i, "%s.%s" % (db, coll)),
                                   "count": n["count"], "bytes": n["bytes"], "verified": False}
                                  for i, n, db, coll in selected],
                      documents=sum(n["count"] for _i, n, _d, _c in selected),
                      bytes=sum(n["bytes"] for _i, n, _d, _c in selected))
        if already and not p["force"]:
            result["changed"] = False
            return result
        drop = p["drop"] or already
        if target.kind == "mongodb":
            busy = restore.busy_namespaces(target, selected)
            result["busy_namespaces"] = [self.label(entry, i, "%s.%s" % (db, coll)) for i, db, coll in busy]
            if busy and not drop:
                raise RestoreError("The target's namespace(s) %s are not empty; nothing was written: restore into other "
                                   "databases (rename_databases, include/exclude), or set drop=true to replace them."
                                   % ", ".join(result["busy_namespaces"]))
        else:
            restore.check_file_target(target.path, drop, p["force"], target.protected, target.kind)
        if self.module.check_mode:
            result["changed"] = True
            return result
        servers = ["%s:%d" % a for a in settings[0].addresses()] if settings else None
        summary = restore.execute(js, keys, entry, selected, target, drop=drop, verify=p["verify"], kmip_servers=servers,
                                  show_namespaces=p["show_namespaces"])
        if summary["snapshot_id"] != sid:
            raise IntegrityError("Snapshot %s was resolved for %s, but %s was restored: the store changed during the restore; "
                                 "restore again and find out who changed the store." % (sid, p["snapshot"], summary["snapshot_id"]),
                                 kind="catalog entry", object_id=sid)
        for ns in result["namespaces"]:
            ns["verified"] = p["verify"]
        result.update(restore_info_text=summary["restore_info"],
                      verify={"enabled": p["verify"], "namespaces_verified": len(selected) if p["verify"] else 0})
        result["changed"] = True
        return result


def main():
    spec = dict(
        job=dict(type="str", required=True),
        snapshot=dict(type="str", default="latest"),
        store=dict(type="path"),
        target_uri=dict(type="str", no_log=True),
        target_tls=dict(type="bool", default=False),
        target_tls_ca_file=dict(type="path"),
        target_tls_certificate_key_file=dict(type="path", no_log=False),
        target_username=dict(type="str"),
        target_password=dict(type="str", no_log=True),
        target_auth_mechanism=dict(type="str"),
        target_auth_source=dict(type="str"),
        target_connect_timeout=dict(type="int", default=10),
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
    )
    spec.update(ansible_module.config_dir_spec())
    spec.update(ansible_module.kmip_access_spec())
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True,
                           mutually_exclusive=[("target_uri", "target_dir", "target_archive")],
                           required_one_of=[("target_uri", "target_dir", "target_archive")])
    runner = Restore(module)
    try:
        result = runner.run()
    except KmipBackupError as e:
        ansible_module.fail(module, e)
    except PyMongoError as e:
        module.fail_json(msg="The target MongoDB deployment failed (%s): check target_uri, its TLS and authentication "
                             "options, and that it is up; nothing was written unless kmipbackup_restore.restoreInfo "
                             "marks an incomplete restore." % type(e).__name__)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
