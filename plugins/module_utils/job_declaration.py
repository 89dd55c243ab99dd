# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The flow of declaring a backup job (kmipbackup.mongodb.backup_job_encryption): a declaration in, a change out.

The order is the point: the config folder is checked first, retirement is checked before a master key is created
(a refusal leaves everything as it was, KMIP included), then the new configuration is planned (a key created or
checked), retired keys pruned, revoked, the configuration written, and the daemon waited for.

A declaration is a dict of the module's parameters (every option of backup_job_encryption present); check mode is
passed in, warnings and the diff come back in the result. No Ansible here.
"""
from __future__ import annotations

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, job_config, job_status, master_keys, source, storage
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError, KeyInUseError


def declare(p: dict, check_mode: bool = False) -> dict:
    """backup_job_encryption's result for the declaration p (with "diff", and "warnings" when there are some)."""
    job = job_config.check_name(p["job"])
    # refuse an unsafe config_dir before anything (a KMIP key included) is created
    config.check_config_dir(p["config_dir"], p["daemon_user"])
    owner = config.file_owner(p["file_owner"], p["file_group"], p["daemon_user"])
    existing = job_config.load_job(p["config_dir"], job)
    retire = p["retire_master_keys"] or []
    if p["revoke"] and not retire:
        raise ConfigError("revoke applies to retire_master_keys: list the UIDs to retire and revoke.")
    if p["state"] == "absent":
        if p["rotate_master_key"] or retire:
            raise ConfigError("rotate_master_key and retire_master_keys need state present or stopped.")
        return _remove(p, job, existing, check_mode)
    for name in ("group", "source"):
        if not p[name]:
            raise ConfigError("%s is required when state is %s." % (name, p["state"]))
    if retire and existing is None:
        raise ConfigError("retire_master_keys needs the existing job %s: it is not declared in %s." % (job, p["config_dir"]))
    # retirement is checked first: a refusal must leave everything as it was, KMIP included
    retiring = known = []
    if retire:
        try:
            _cfg, retiring, known = master_keys.plan_retire(existing, retire, p["data_dir"])
            if p["revoke"]:
                master_keys.check_not_shared(p["config_dir"], job, known)
        except KeyInUseError as e:
            e.details = {"master_key_users": e.needed}
            raise
    master_key = dict(p["master_key"] or {})
    if master_key.get("uid"):
        master_key["create"] = False
    new, info = job_config.plan_job(dict(p, master_key=master_key), existing, source.check_source, check_mode=check_mode)
    new["previous_master_key_uids"] = [u for u in new["previous_master_key_uids"] if u not in retiring]
    revoked = []
    if p["revoke"] and known:
        revoked = master_keys.revoke_keys(master_keys.kmip_client(p["config_dir"], new["group"]), known, check_mode=check_mode)
    result = {"changed": new != existing or bool(revoked), "master_key_uid": info["master_key_uid"],
              "resync_required": info["resync_required"], "rotated": info["rotated"],
              "retired_master_key_uids": retiring, "revoked_master_key_uids": revoked,
              "previous_master_key_uids": new["previous_master_key_uids"], "job": job_config.redact(new),
              "diff": {"before": job_config.redact(existing) or {}, "after": job_config.redact(new)}}
    if new != existing and not check_mode:
        job_config.write_job(p["config_dir"], new, p["daemon_user"])
    if config.set_owner(p["config_dir"], ["jobs/%s.yml" % job], owner, p["daemon_user"], check_mode):
        result["changed"] = True
    if p["wait"] and not check_mode:
        job_status.wait_ready(p["data_dir"], job, new, p["wait_timeout"])
    result["master_key_uids_needed"] = master_keys.master_keys_needed(new)
    st = job_status.read_status(p["data_dir"], job)
    result.update(status=job_status.status_name(p["data_dir"], job, new, status=st), job_status=st or {})
    return result


def _remove(p: dict, job: str, existing: dict | None, check_mode: bool) -> dict:
    result = {"changed": existing is not None, "resync_required": False, "rotated": False, "retired_master_key_uids": [],
              "revoked_master_key_uids": [], "diff": {"before": job_config.redact(existing) or {}, "after": {}}, "warnings": []}
    result["master_key_uids_needed"] = needed = master_keys.master_keys_needed(existing) if existing else []
    if needed:
        result["warnings"].append(
            "The store %s keeps the snapshots of job %s; they need master key(s) %s: keep those keys and a certificate that "
            "can use them to restore them (kmipbackup.mongodb.snapshot_restore with %s)."
            % (storage.describe_job(existing), job, ", ".join(needed),
               "object_store" if existing.get("object_store") else "store=%s" % existing["store"]))
    if existing is not None and not check_mode:
        job_config.remove_job(p["config_dir"], job, p["daemon_user"])
        if p["wait"]:
            job_status.wait_removed(p["data_dir"], job, p["wait_timeout"])
    st = job_status.read_status(p["data_dir"], job)
    result.update(status=st.get("state") if st else "INACTIVE", job_status=st or {})
    return result
