# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A job's master keys (no Ansible imports). PRIVATE to the collection.

The KMIP client of a job's group, the checks that a key is usable or rotatable, the name of a
rotated key, which retained snapshots and head keys still need a key, and retiring and revoking
the keys nothing needs any more.
"""
from __future__ import annotations

import os
import time

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, datadir, files, kmip, storage
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError, KeyInUseError, KmipError


def kmip_client(config_dir: str, group: str) -> kmip.KmipClient:
    """A KmipClient for the group (ConfigError when kmip.yml or the group is missing)."""
    cfg = config.load_kmip_config(config_dir)
    grp = config.load_group(config_dir, group)
    return kmip.KmipClient(cfg, grp)


def rotated_key_name(job: str, now: float | None = None) -> str:
    """Name of a master key created by rotation: kmipbackup-<job>-<UTC time>, unique per rotation."""
    return "kmipbackup-%s-%s" % (job, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)))


def check_key(client: kmip.KmipClient, uid: str) -> None:
    """KmipError when the group's certificate cannot use master key uid."""
    try:
        client.check_access(uid)
    except KmipError as e:
        if e.kind == "unreachable":
            raise
        raise KmipError("The group's certificate cannot use master key %s (%s): %s" % (uid, e.kind, e),
                        kind=e.kind, uid=uid, servers=e.servers) from e


def check_rotatable(client: kmip.KmipClient, job: str, uid: str) -> None:
    """The daemon unwraps the head key with the current master key to rewrap it under the new one."""
    try:
        client.check_access(uid)
    except KmipError as e:
        if e.kind == "unreachable":
            raise
        raise KmipError("Cannot rotate job %s: the daemon must unwrap its head key with the current master key %s, which the "
                        "group's certificate cannot use (%s: %s). Make that key usable again and rotate, or disable and re-enable "
                        "encryption for the job (a new head by a new initial sync)." % (job, uid, e.kind, e),
                        kind=e.kind, uid=uid, servers=e.servers) from e


# ---- master keys still needed, retirement ---------------------------------------------------

def master_key_users(cfg: dict, data_dir: str) -> dict:
    """{uid: [what needs it]} for the job's retained snapshots (catalog entries of its store: "snapshot <id>")
    and its head keys (heads/<job>/<generation>/headkey.json: "head key of generation <n>")."""
    users = {}
    for entry in storage.job_store(cfg, data_dir).catalog():
        for uid in entry.get("master_key_uids") or []:
            users.setdefault(str(uid), []).append("snapshot %s" % entry.get("snapshot_id"))
    folder = datadir.heads_dir(data_dir, cfg["job"])
    try:
        generations = sorted((n for n in os.listdir(folder) if n.isdigit()), key=int)
    except FileNotFoundError:
        generations = []
    for gen in generations:
        try:
            record = files.read_json(os.path.join(folder, gen, "headkey.json"))
        except ValueError:
            raise ConfigError("The head key record of job %s, generation %s, is not valid JSON: no master key can be retired "
                              "until the daemon has rebuilt it (resync the job)." % (cfg["job"], gen)) from None
        uid = ((record or {}).get("wrapped") or {}).get("master_key_uid")
        if uid:
            users.setdefault(str(uid), []).append("head key of generation %s" % gen)
    return users


def master_keys_needed(cfg: dict) -> list:
    """Master key UIDs the job's retained snapshots need (from the store's non-secret catalog)."""
    return storage.job_store(cfg).master_keys_needed()


def plan_retire(cfg: dict, uids: list, data_dir: str) -> tuple[dict, list, list]:
    """(new configuration, UIDs removed from previous_master_key_uids, UIDs of this job's keys among uids).

    The job's keys are its previous master keys and those its store's keyring names (a retired key stays
    there). KeyInUseError, and nothing to write, when one of uids is the current key or a retained
    snapshot or a head key still needs it. UIDs already retired are left alone (idempotent)."""
    uids = [str(u) for u in dict.fromkeys(uids or [])]
    current = cfg.get("master_key_uid")
    if current and str(current) in uids:
        raise KeyInUseError("Master key %s is the current master key of job %s and can never be retired: rotate the job to a "
                            "new key first (rotate_master_key: true)." % (current, cfg["job"]), {str(current): ["current master key"]})
    if not uids:
        return dict(cfg), [], []
    users = master_key_users(cfg, data_dir)
    busy = {u: users[u] for u in uids if u in users}
    if busy:
        raise KeyInUseError(
            "Cannot retire master key(s) of job %s still needed, nothing changed: %s. Keep them in the KMIP server; retire "
            "them once those snapshots have expired or been deleted%s." % (
                cfg["job"], "; ".join("%s by %s" % (u, _first(busy[u])) for u in sorted(busy)),
                " and the daemon has rewrapped the head key under the current master key"
                if any(w.startswith("head key") for ws in busy.values() for w in ws) else ""), busy)
    previous = [str(u) for u in cfg.get("previous_master_key_uids") or []]
    keyring = {str(r.get("master_key_uid")) for r in storage.job_store(cfg, data_dir).keyring_records()}
    retiring = [u for u in uids if u in previous]
    known = [u for u in uids if u in previous or u in keyring]
    new = dict(cfg, previous_master_key_uids=[u for u in previous if u not in retiring])
    return new, retiring, known


def check_not_shared(config_dir: str, job: str, uids: list) -> None:
    """KeyInUseError when another declared job uses one of uids as its current or a previous master key
    (master_key.uid can point two jobs at one key): revoking it would break that job."""
    shared = {uid: ["job %s" % other for other in others]
              for uid, others in config.master_key_uids(config_dir, exclude_job=job).items() if uid in uids}
    if shared:
        raise KeyInUseError("Cannot revoke master key(s) another job also uses, nothing changed: %s. Retire them without "
                            "revoke, or retire them from those jobs first." % "; ".join(
                                "%s by %s" % (u, _first(shared[u])) for u in sorted(shared)), shared)


def _first(items, n=5):
    return ", ".join(items[:n]) + (" and %d more" % (len(items) - n) if len(items) > n else "")


def revoke_keys(client: kmip.KmipClient, uids: list, check_mode: bool = False) -> list:
    """Revoke (reason superseded) those of uids that are ACTIVE in KMIP; returns them. In check mode only
    reads their state. Keys already revoked or gone are skipped, so a second run does nothing."""
    active = []
    with client:
        for uid in uids:
            try:
                state = client.key_info(uid)["state"]
            except KmipError as e:
                if e.kind == "not_found":
                    continue
                raise
            if state == "ACTIVE":
                if not check_mode:
                    client.revoke_key(uid)
                active.append(uid)
    return active
