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
  - Before writing anything, checks that the certificate can use every master key the snapshot needs (naming the
    UUIDs it cannot use), authenticates the catalog entry, the keyring entries and the manifest, and refuses to
    write into non-empty target namespaces unless O(drop=true). Every chunk is authenticated as it is read; a
    tampered store object fails the restore with an integrity error naming the object.
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
  data_dir:
    description:
      - The daemon host's data folder, for the default store (C(store) in it) when the job's configuration names
        none. No directory or archive target may be, be inside or contain it.
    type: path
    default: /var/lib/kmipbackup
  config_dir:
    description:
      - The daemon host's configuration folder; read (never written) for the job's store and group, and for the KMIP
        configuration when O(kmip_servers) is not given. Not needed on a fresh host.
    type: path
    default: /etc/kmipbackup
  group:
    description:
      - The group whose configured certificate (C(groups/<group>.yml) in O(config_dir)) is used.
      - Defaults to the job's group when the job is declared in O(config_dir). Ignored when O(client_cert_file) is set.
    type: str
  kmip_servers:
    description:
      - KMIP servers (host or host:port), tried in order. Give them to restore without O(config_dir)'s C(kmip.yml).
      - Requires O(kmip_ca_file) and O(client_cert_file).
    type: list
    elements: str
  kmip_port:
    description: Port of the O(kmip_servers) without an explicit port.
    type: int
    default: 5696
  kmip_ca_file:
    description: PEM file of the CA that signs the KMIP servers' certificates (with O(kmip_servers)).
    type: path
  kmip_protocol:
    description: V(kmip_1_2) (KMIP Encrypt/Decrypt wrapping) or V(legacy) (KMIP 1.0/1.1 servers), with O(kmip_servers).
    type: str
    choices: [kmip_1_2, legacy]
    default: kmip_1_2
  kmip_connect_timeout:
    description: Seconds to wait for a KMIP connection, with O(kmip_servers).
    type: float
    default: 5
  client_cert_file:
    description:
      - PEM file of a KMIP client certificate provisioned for the snapshot's master keys (the group's, a reissued one
        of the same identity, or another one the KMIP server grants), with its key unless O(client_key_file) is set.
    type: path
  client_key_file:
    description: PEM file of the client certificate's private key, when it is not in O(client_cert_file).
    type: path
  client_cert_password:
    description: Password of an encrypted client key.
    type: str
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
  description: The restored snapshot's id.
  returned: always
  type: str
  sample: 20261127T180000Z-1a2b3c4d
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

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import ansible_module, config, jobs, kmip, restore, store
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import (
    ConfigError, IntegrityError, KmipBackupError, KmipError, RestoreError)

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
    return jobs.store_root(cfg, p["data_dir"])


def kmip_settings(p, cfg):
    """(KmipConfig, GroupConfig), or None when no KMIP access is configured."""
    if p["kmip_servers"]:
        if not p["kmip_ca_file"] or not p["client_cert_file"]:
            raise ConfigError("kmip_servers needs kmip_ca_file and client_cert_file: give the KMIP CA and a client certificate.")
        kcfg = config.KmipConfig(servers=p["kmip_servers"], ca_file=p["kmip_ca_file"], port=p["kmip_port"],
                                 connect_timeout=p["kmip_connect_timeout"], protocol=p["kmip_protocol"])
    elif os.path.exists(config.kmip_path(p["config_dir"])):
        kcfg = config.load_kmip_config(p["config_dir"])
    else:
        return None
    group = p["group"] or (cfg or {}).get("group") or "restore"
    if p["client_cert_file"]:
        grp = config.GroupConfig(group=group, client_cert_file=p["client_cert_file"], client_key_file=p["client_key_file"],
                                 client_cert_password=p["client_cert_password"] or None)
    elif p["group"] or (cfg or {}).get("group"):
        grp = config.load_group(p["config_dir"], group)
    else:
        raise ConfigError("No KMIP client certificate: give client_cert_file, or group (configured with kmipbackup.mongodb.group_kmip).")
    return kcfg, grp


def protected_folders(p, root):
    """The folders no directory or archive target may be, be inside or contain."""
    return {"snapshot store": root, "data_dir": p["data_dir"], "config_dir": p["config_dir"]}


def make_target(p, sid, protected):
    """(target, restore info path); a directory or archive target at a protected folder is refused here, before
    anything is read or written."""
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


def check_keys(client, uids):
    """Raise one KmipError naming every master key this certificate cannot use."""
    denied = [(uid, e.kind) for uid, e in client.check_keys(uids) if e is not None]
    if denied:
        raise KmipError("The KMIP client certificate (identity %s) cannot use the master key(s) %s that snapshot needs "
                        "(%s): use a certificate provisioned for these keys (the job's group certificate or a reissued "
                        "one of the same identity)." % (client.identity, ", ".join(u for u, _kind in denied),
                                                        ", ".join("%s: %s" % d for d in denied)),
                        kind=denied[0][1], uid=denied[0][0])


def check_encryption_expected(p, cfg, js, entry):
    """Refuse a snapshot marked unencrypted of an encrypted job (a downgrade) unless allow_unencrypted; returns
    whether the snapshot must be encrypted."""
    if p["allow_unencrypted"]:
        return False
    if cfg is not None:
        expected, why = bool(cfg.get("encryption")), "its configuration in %s enables encryption" % p["config_dir"]
    else:
        expected, why = bool(js.keyring_records()), "its keyring in the store holds wrapped data keys"
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

    def label(self, entry, i, name):
        return restore.label(entry.get("encryption"), i, name, self.p["show_namespaces"])

    def run(self):
        p = self.p
        cfg = jobs.load_job(p["config_dir"], p["job"])  # None on a fresh host
        root = store_root(p, cfg)
        js = store.JobStore(root, config.validate_name(p["job"], "job name"))
        entry = js.catalog_entry(p["snapshot"])
        sid = entry["snapshot_id"]
        target, info_path = make_target(p, sid, protected_folders(p, root))
        expect_encryption = check_encryption_expected(p, cfg, js, entry)
        settings = kmip_settings(p, cfg)
        result = {"snapshot_id": sid, "created": entry.get("created"), "cluster_time": entry.get("cluster_time"),
                  "encryption": bool(entry.get("encryption")), "master_key_uids": entry.get("master_key_uids") or [],
                  "target": target.kind, "restore_info": info_path, "kmip_calls": 0, "kmip_server": None}
        try:
            if settings is not None:
                self.client = kmip.KmipClient(*settings)
            return self._run(js, entry, target, settings, result, expect_encryption)
        finally:
            if self.client is not None:
                result["kmip_calls"] = self.client.calls
                self.client.close()
            if target.kind == "mongodb":
                target.close()

    def _run(self, js, entry, target, settings, result, expect_encryption):
        p, sid = self.p, entry["snapshot_id"]
        keys = store.Keys(js, provider=self.client, encryption=bool(entry.get("encryption")))
        if entry.get("encryption"):
            if self.client is None:
                if not self.module.check_mode:
                    raise ConfigError("Snapshot %s is encrypted: give the KMIP server (kmip_servers, kmip_ca_file) and a client "
                                      "certificate provisioned for master key(s) %s (client_cert_file), or config_dir and group."
                                      % (sid, ", ".join(result["master_key_uids"])))
                self.module.warn("No KMIP access configured: the plan comes from the unauthenticated catalog.")
            else:
                check_keys(self.client, result["master_key_uids"])
                result["kmip_server"] = self.client.server
        if self.client is None and entry.get("encryption"):
            already = restore.already_restored(js, sid, target)
            result.update(already_restored=already, planned_from="catalog", documents=entry.get("doc_count"), bytes=entry.get("data_bytes"))
            result["changed"] = not already or p["force"]
            return result
        entry, selected = restore.plan(js, sid, keys, p["include"], p["exclude"], p["rename_databases"], expect_encryption)
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
        group=dict(type="str"),
        kmip_servers=dict(type="list", elements="str"),
        kmip_port=dict(type="int", default=config.DEFAULT_PORT),
        kmip_ca_file=dict(type="path"),
        kmip_protocol=dict(type="str", default="kmip_1_2", choices=list(config.PROTOCOLS)),
        kmip_connect_timeout=dict(type="float", default=5.0),
        client_cert_file=dict(type="path"),
        client_key_file=dict(type="path", no_log=False),
        client_cert_password=dict(type="str", no_log=True),
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
        data_dir=dict(type="path", default=config.DEFAULT_DATA_DIR),
    )
    spec.update(ansible_module.config_dir_spec())
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
