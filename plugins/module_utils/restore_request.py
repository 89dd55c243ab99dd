# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The flows of the modules that read a job's snapshot store (snapshot_info, snapshot_restore): which KMIP settings
win, listing a job's snapshots, and a restore request in, a result out.

A request is a dict of the module's parameters (the options of kmipbackup.mongodb.snapshot_info or
snapshot_restore, every key present); check mode is passed in, warnings come back in the result's "warnings".
No Ansible here.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import time

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    config, datadir, job_config, job_status, kmip, progress, restore, segments, storage, store)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import (
    ConfigError, IntegrityError, KmipBackupError, RestoreError)

NO_KMIP = "No KMIP access configured"
CONNECTION_DEFAULTS = job_config.SOURCE_DEFAULTS  # target_mongodb has the options of a job's source


def kmip_settings(p: dict, cfg: dict | None) -> tuple[config.KmipConfig, config.GroupConfig] | None:
    """(KmipConfig, GroupConfig) from a request's KMIP options p and the job's configuration cfg (None on a fresh
    host), or None when no KMIP access is configured. Options win over the daemon host's kmip.yml and group."""
    if p["kmip_servers"]:
        if not p["kmip_ca_file"] or not p["client_cert_file"]:
            raise ConfigError("kmip_servers needs kmip_ca_file and client_cert_file: give the KMIP CA and a client certificate.")
        kcfg = config.KmipConfig(servers=p["kmip_servers"], ca_file=p["kmip_ca_file"], port=p["kmip_port"],
                                 connect_timeout=p["kmip_connect_timeout"], protocol=p["kmip_protocol"],
                                 allow_legacy_unwrap=p["kmip_allow_legacy_unwrap"])
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


def open_store(p: dict, cfg: dict | None, must_exist: bool = False) -> tuple[store.JobStore, str, str | None]:
    """(JobStore, where it is for messages, its folder or None for a bucket): the request's store or object_store, else
    the one the job's configuration names (or data_dir's). must_exist: StoreError when the folder is missing or the
    bucket does not answer to the credentials."""
    job = config.validate_name(p["job"], "job name")
    if p["store"] or p.get("object_store"):
        st = storage.open_storage(p["store"], p.get("object_store"), must_exist=must_exist)
        return store.JobStore(st, job), storage.describe(p["store"], p.get("object_store")), p["store"]
    if cfg is None:
        raise ConfigError("Job %s is not declared in %s: give store (the snapshot store folder) or object_store (its bucket)."
                          % (p["job"], config.jobs_dir(p["config_dir"])))
    folder = None if cfg.get("object_store") else datadir.store_root(cfg, p["data_dir"])
    return (store.JobStore(storage.job_storage(cfg, p["data_dir"], must_exist=must_exist), job),
            storage.describe_job(cfg, p["data_dir"]), folder)


def job_encrypted(p: dict, cfg: dict | None, js: store.JobStore) -> tuple[bool, str]:
    """(whether the job is encrypted, why we know): its configuration, or on a fresh host its keyring."""
    if cfg is not None:
        return bool(cfg.get("encryption")), "its configuration in %s enables encryption" % p["config_dir"]
    return bool(js.keyring_records()), "its keyring in the store holds wrapped data keys"


# ---- listing ------------------------------------------------------------------------------------------------

def _listed(js: store.JobStore, name: str) -> dict:
    """A catalog file's public entry, unauthenticated (its file name as id when its content names another snapshot)."""
    try:
        return store.public_entry(js.catalog_entry(name))
    except KmipBackupError:
        return {"id": name}


def list_snapshots(p: dict) -> dict:
    """snapshot_info's result: the job's snapshots, authenticated against the catalog head when KMIP access is
    configured, and the master keys the retained ones need."""
    cfg = job_config.load_job(p["config_dir"], p["job"])  # None on a fresh host
    js, root, _folder = open_store(p, cfg, must_exist=True)
    settings = kmip_settings(p, cfg)
    warnings = []
    if settings is None:
        warnings.append(NO_KMIP + ": the catalog is listed unauthenticated (every snapshot shows authenticated=false); "
                        "give kmip_servers, kmip_ca_file and client_cert_file, or config_dir, to check it.")
        if p["snapshot"]:
            entries = [js.catalog_entry(p["snapshot"])]
            catalog = js.catalog()
        else:
            entries = catalog = js.catalog()
        return {"changed": False, "store": root, "authenticated": False, "warnings": warnings, "point_in_time": None,
                "snapshots": [dict(store.public_entry(e), authenticated=False) for e in entries],
                "master_key_uids_needed": js.master_keys_needed(catalog)}
    encrypted, _why = job_encrypted(p, cfg, js)
    last_known = job_status.daemon_last_snapshot(p["data_dir"], p["job"])
    with kmip.KmipClient(*settings) as client:
        keys = store.Keys(js, provider=client, encryption=encrypted)
        client.require_keys(js.auth_master_key_uids(keys), "that checking the catalog needs")
        live, _head = js.live_catalog(keys, expect_encryption=encrypted, last_known=last_known)
        if p["snapshot"]:
            # an unencrypted entry of an encrypted job is listed as it is (encryption false); a restore refuses it
            entry = js.resolve(p["snapshot"], keys, expect_encryption=False, keyed_head=encrypted, last_known=last_known)
            listed = [dict(store.public_entry(entry), authenticated=True)]
        else:
            ok = {e["snapshot_id"]: e for e in live}
            listed = [dict(store.public_entry(ok[sid]), authenticated=True) if sid in ok else dict(_listed(js, sid), authenticated=False)
                      for sid, _seq in js.catalog_files()]
            # authenticated entries oldest first (as the head orders them), then the others
            listed.sort(key=lambda e: (not e["authenticated"], str(e.get("created")), e["id"]))
        point_in_time = segments.restorable_ranges(js, keys)
    for e in listed:
        if not e["authenticated"]:
            warnings.append("Catalog entry %s is not authenticated (not live in the store's catalog head, or its MAC or id does "
                            "not match): it is ignored; it may have been planted or put back, find out who changed the store."
                            % e["id"])
    return {"changed": False, "store": root, "authenticated": True, "warnings": warnings, "snapshots": listed,
            "point_in_time": point_in_time,
            "master_key_uids_needed": js.master_keys_needed(live)}


# ---- restore ------------------------------------------------------------------------------------------------

def make_target(p: dict, sid: str, protected: dict) -> tuple:
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
    if not p["target_mongodb"]:
        raise ConfigError("Give exactly one target: target_mongodb, target_dir or target_archive.")
    info = p["restore_info_file"] or os.path.join(pwd.getpwuid(os.getuid()).pw_dir, "restoreInfo-%s-%s.txt" % (p["job"], sid))
    info = os.path.abspath(info)
    # the same connection dict as a job's source, the client built by the same core code (mongo.client_options)
    return restore.MongoTarget.from_connection(p["target_mongodb"], info), info


def check_encryption_expected(p: dict, cfg: dict | None, js: store.JobStore, entry: dict) -> bool:
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


def run_restore(p: dict, check_mode: bool = False) -> dict:
    """snapshot_restore's result for the request p: resolve, check, plan and (outside check mode) restore."""
    return _Restore(p, check_mode).run()


class _Restore:
    def __init__(self, p, check_mode):
        self.p = p
        self.check_mode = check_mode
        self.client = None
        self.keys = self.last_known = None
        self.checked = set()  # master key UIDs whose access was checked
        timeout = p.get("timeout") or 0  # counted from the module's start: a point's replay counts too
        self.deadline = (time.monotonic() + timeout, timeout) if timeout > 0 else None

    def label(self, entry, i, name):
        return restore.label(entry.get("encryption"), i, name, self.p["show_namespaces"])

    def run(self):
        p = self.p
        cfg = job_config.load_job(p["config_dir"], p["job"])  # None on a fresh host
        js, _root, folder = open_store(p, cfg)
        settings = kmip_settings(p, cfg)
        target = None
        result = {"snapshot_requested": p["snapshot"], "kmip_calls": 0, "kmip_server": None, "warnings": []}
        try:
            if settings is not None:
                self.client = kmip.KmipClient(*settings)
            self.last_known = job_status.daemon_last_snapshot(p["data_dir"], p["job"])
            if p.get("point_in_time") is not None:
                return self._run_point(js, cfg, folder, settings, result)
            entry, self.keys = self._resolve(js, cfg)
            sid = entry["snapshot_id"]
            expect_encryption = check_encryption_expected(p, cfg, js, entry)
            protected = {"snapshot store": folder, "data_dir": p["data_dir"], "config_dir": p["config_dir"]}
            if folder is None:  # a bucket: no local folder to keep the target out of
                del protected["snapshot store"]
            target, info_path = make_target(p, sid, protected)
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
                if not self.check_mode:
                    raise ConfigError("Snapshot %s is encrypted: give the KMIP server (kmip_servers, kmip_ca_file) and a client "
                                      "certificate provisioned for master key(s) %s (client_cert_file), or config_dir and group."
                                      % (sid, ", ".join(result["master_key_uids"])))
                result["warnings"].append(NO_KMIP + ": the plan comes from the unauthenticated catalog.")
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
        return self._restore(js, keys, entry, selected, target, settings, result)

    def _restore(self, js, keys, entry, selected, target, settings, result):
        """The already-restored, busy and target checks, then (outside check mode) the restore of selected."""
        p, sid = self.p, entry["snapshot_id"]
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
        if self.check_mode:
            result["changed"] = True
            return result
        servers = ["%s:%d" % a for a in settings[0].addresses()] if settings else None
        meter = progress.Meter(result["documents"], result["bytes"])
        what = "restore of snapshot %s" % sid
        with progress.Record(p["progress_file"], what, meter, remove=True) if p.get("progress_file") else contextlib.nullcontext():
            summary = restore.execute(js, keys, entry, selected, target, drop=drop, verify=p["verify"], kmip_servers=servers,
                                      show_namespaces=p["show_namespaces"], progress=meter, deadline=self.deadline)
        final = meter.final()
        result.update(seconds=final["seconds"], rate={"docs_per_second": final["docs_per_second"],
                                                      "bytes_per_second": final["bytes_per_second"],
                                                      "summary": progress.rate_line(final)})
        if summary["snapshot_id"] != sid:
            raise IntegrityError("Snapshot %s was resolved for %s, but %s was restored: the store changed during the restore; "
                                 "restore again and find out who changed the store." % (sid, p["snapshot"], summary["snapshot_id"]),
                                 kind="catalog entry", object_id=sid)
        for k, ns in enumerate(result["namespaces"]):  # a point-in-time image's totals are final only now
            ns.update(verified=p["verify"], count=selected[k][1]["count"], bytes=selected[k][1]["bytes"])
        result.update(documents=summary["documents"], bytes=summary["bytes"])
        result.update(restore_info_text=summary["restore_info"],
                      verify={"enabled": p["verify"], "namespaces_verified": len(selected) if p["verify"] else 0})
        result["changed"] = True
        return result

    # ---- point in time --------------------------------------------------------------------------------------

    def _run_point(self, js, cfg, folder, settings, result):
        """A restore to p["point_in_time"]: segments.plan_point picks the base snapshot and the segments, and
        point_in_time.rebuild replays them into a temporary encrypted head; check mode plans without replaying."""
        from ansible_collections.kmipbackup.mongodb.plugins.module_utils import point_in_time  # only here: it loads the head (SQLCipher)
        p = self.p
        point = segments.parse_point(p["point_in_time"])
        if self.client is None:
            raise ConfigError("point_in_time needs the job's keys to authenticate its snapshots and change segments: give the "
                              "KMIP server (kmip_servers, kmip_ca_file) and a client certificate (client_cert_file), or "
                              "config_dir and group.")
        encrypted, _why = job_encrypted(p, cfg, js)
        keys = store.Keys(js, provider=self.client, encryption=encrypted)
        self.checked.update(self.client.require_keys(js.auth_master_key_uids(keys), "that checking the catalog needs"))
        js.live_catalog(keys, expect_encryption=encrypted, last_known=self.last_known)  # the rollback checks of a plain restore
        plan = segments.plan_point(js, keys, point)
        base = plan["snapshot"]
        sid = base["snapshot_id"]
        if p["snapshot"] not in (None, "latest", sid):
            raise ConfigError("point_in_time %s is restored from snapshot %s, the newest at or before it, not from %s: leave "
                              "snapshot at latest (or give %s); nothing was written." % (_point_text(plan["point"]), sid, p["snapshot"], sid))
        expect_encryption = check_encryption_expected(p, cfg, js, base)
        if keys.encryption != bool(base.get("encryption")):  # an older unencrypted base (allow_unencrypted)
            keys = store.Keys(js, provider=self.client, encryption=bool(base.get("encryption")))
        if base.get("encryption"):
            self.client.require_keys([u for u in base.get("master_key_uids") or [] if str(u) not in self.checked])
        result["kmip_server"] = self.client.server
        restore_id = point_in_time.point_id(sid, plan["point"])
        protected = {"snapshot store": folder, "data_dir": p["data_dir"], "config_dir": p["config_dir"]}
        if folder is None:
            del protected["snapshot store"]
        target, info_path = make_target(p, restore_id, protected)
        t, i = plan["point"]
        result.update(snapshot_id=sid, created=base.get("created"), cluster_time=[t, i], encryption=bool(base.get("encryption")),
                      master_key_uids=base.get("master_key_uids") or [], target=target.kind, restore_info=info_path,
                      point_in_time={"t": t, "i": i, "time": point_in_time.iso_of(t)}, base_snapshot_id=sid,
                      segments=len(plan["segments"]), restore_id=restore_id)
        try:
            if self.check_mode:  # the base snapshot's namespaces: replaying is the restore's work
                entry, selected = restore.plan(js, sid, keys, p["include"], p["exclude"], p["rename_databases"],
                                               expect_encryption, last_known=self.last_known)
                entry = dict(entry, snapshot_id=restore_id)
                return self._restore(point_in_time.RebuiltStore(js, None, entry), keys, entry, selected, target, settings, result)
            with point_in_time.rebuild(js, keys, plan, deadline=self.deadline) as image:
                selected = restore.select_namespaces(image.manifest, p["include"], p["exclude"], p["rename_databases"])
                result["replayed"] = dict(image.replayed, loaded_chunks=image.loaded_chunks, path=image.path)
                return self._restore(image.store, keys, image.entry, selected, target, settings, result)
        finally:
            if target.kind == "mongodb":
                target.close()


def _point_text(point):
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import point_in_time
    return "%s (Timestamp(%d, %d))" % (point_in_time.iso_of(point[0]), point[0], point[1])
