# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Backup job declarations (no Ansible imports). PRIVATE to the collection.

A job is declared by jobs/<job>.yml in config_dir, written here only: its parameters checked
and completed with their defaults (plan_job), read, written, removed, shown without secrets.
"""
from __future__ import annotations

import copy
import os
from typing import Callable

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, datadir, files, master_keys, retention, storage
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError

STATES = ("present", "absent", "stopped")
ENCRYPTION = ("enabled", "disabled")
INTERVALS = retention.INTERVALS  # the allowed schedule.interval_hours

SOURCE_DEFAULTS = {
    "uri": None, "tls": False, "tls_ca_file": None, "tls_certificate_key_file": None,
    "username": None, "password": None, "auth_mechanism": None, "auth_source": None,
    "connect_timeout": 10,
}
SCHEDULE_DEFAULTS = retention.DEFAULT_SCHEDULE
# point in time (change segments): written into a job file only when not the default, so existing job files keep their shape
POINT_IN_TIME_DEFAULTS = {"point_in_time_segment_seconds": 60, "point_in_time_window_hours": 24}
POINT_IN_TIME_LIMITS = {"point_in_time_segment_seconds": (1, 3600), "point_in_time_window_hours": (0, 8784)}

jobs_dir = config.jobs_dir
job_path = config.job_path
list_jobs = config.list_jobs


def check_name(name: str, what: str = "job") -> str:
    return config.validate_name(name, what + " name")


def load_job(config_dir: str, job: str) -> dict | None:
    """The job's configuration (dict) or None when it is not declared."""
    if not os.path.exists(job_path(config_dir, job)):
        return None
    data = config.load_job(config_dir, job)
    if data.get("job") != job:
        raise ConfigError("Job file %s is not a valid job configuration: declare the job again with "
                          "kmipbackup.mongodb.backup_job_encryption." % job_path(config_dir, job))
    return data


def write_job(config_dir: str, cfg: dict, daemon_user: str = config.DEFAULT_DAEMON_USER) -> None:
    name = os.path.basename(job_path(config_dir, cfg["job"]))
    with config.open_config_dir(config_dir, daemon_user) as root, root.sub("jobs") as folder:
        folder.write(name, files.dump_yaml(cfg))


def remove_job(config_dir: str, job: str, daemon_user: str = config.DEFAULT_DAEMON_USER) -> bool:
    return config.remove_file(config_dir, ("jobs",), os.path.basename(job_path(config_dir, job)), daemon_user)


def redact(cfg: dict | None) -> dict | None:
    """A copy of a job configuration safe to show (the source password and the object store's secrets replaced)."""
    if cfg is None:
        return None
    out = copy.deepcopy(cfg)
    if out.get("object_store"):
        out["object_store"] = storage.redact(out["object_store"])
    src = out.get("source") or {}
    if src.get("password"):
        src["password"] = config.REDACTED
    if src.get("uri"):
        src["uri"] = config.mask_userinfo(src["uri"])
    return out


# ---- parameters --------------------------------------------------------------------------

def normalize_source(source: dict) -> dict:
    if not isinstance(source, dict) or not source.get("uri"):
        raise ConfigError("source.uri is required: give the MongoDB URI of the replica set or mongos to back up.")
    unknown = set(source) - set(SOURCE_DEFAULTS)
    if unknown:
        raise ConfigError("Unknown source option(s): %s." % ", ".join(sorted(unknown)))
    out = dict(SOURCE_DEFAULTS)
    out.update({k: v for k, v in source.items() if v is not None})
    if not str(out["uri"]).startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError("source.uri must start with mongodb:// or mongodb+srv://.")
    userinfo = str(out["uri"]).split("://", 1)[1].split("/", 1)[0].rpartition("@")[0]
    if ":" in userinfo:
        raise ConfigError("source.uri holds a password: give the user in source.username and the password in "
                          "source.password (kept out of logs and output), and leave both out of the URI.")
    for f in ("tls_ca_file", "tls_certificate_key_file"):
        if out[f] and not os.path.isfile(out[f]):
            raise ConfigError("source.%s %s does not exist: give the path of a readable PEM file." % (f, out[f]))
    out["tls"] = bool(out["tls"])
    out["connect_timeout"] = int(out["connect_timeout"])
    if out["connect_timeout"] <= 0:
        raise ConfigError("source.connect_timeout must be a positive number of seconds.")
    return out


def normalize_point_in_time(params: dict) -> dict:
    """The job's point-in-time options that differ from their defaults, checked."""
    out = {}
    for name, default in POINT_IN_TIME_DEFAULTS.items():
        value = params.get(name)
        if value is None:
            continue
        low, high = POINT_IN_TIME_LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError("%s must be a whole number from %d to %d, got %r%s." % (
                name, low, high, value, " (0 turns point-in-time restore off)" if low == 0 else ""))
        if value != default:
            out[name] = value
    return out


def normalize_schedule(schedule: dict | None) -> dict:
    out = dict(SCHEDULE_DEFAULTS)
    out.update({k: v for k, v in (schedule or {}).items() if v is not None})
    unknown = set(out) - set(SCHEDULE_DEFAULTS)
    if unknown:
        raise ConfigError("Unknown schedule option(s): %s." % ", ".join(sorted(unknown)))
    return retention.validate_schedule(out)


# ---- desired state -----------------------------------------------------------------------

def plan_job(params: dict, existing: dict | None, check_source: Callable[[dict], None], check_mode: bool = False,
             kmip_factory: Callable | None = None) -> tuple[dict, dict]:
    """Validate the module's parameters against the existing job and work out the new config.

    check_source(source) refuses a source that cannot be backed up (source.check_source connects once;
    given by the caller so that this file needs no MongoDB driver).
    Returns (new_cfg, info) where info has master_key_uid, key_created, resync_required.
    Creates a master key through KMIP only when one is needed and not in check mode.
    Nothing is written here.
    """
    job = check_name(params["job"])
    group = check_name(params["group"], "group")
    source = normalize_source(params["source"])
    schedule = normalize_schedule(params.get("schedule"))
    point_in_time = normalize_point_in_time(params)
    encryption = params.get("encryption", "enabled") in ("enabled", True)
    master_key = params.get("master_key") or {}
    if master_key.get("uid") and master_key.get("create"):
        raise ConfigError("master_key: give either uid (an existing KMIP key) or create: true, not both.")
    state = params.get("state") or "present"
    object_store = storage.normalize_object_store(params["object_store"]) if params.get("object_store") else None
    if object_store and params.get("store"):
        raise ConfigError("Give either store (a folder) or object_store (a bucket), not both.")
    store = None if object_store else datadir.store_root(params, params.get("data_dir") or datadir.DEFAULT_DATA_DIR)
    if store is not None and not os.path.isabs(store):
        raise ConfigError("store must be an absolute path, got %r." % store)

    rotate = bool(params.get("rotate_master_key"))
    old = existing or {}
    if rotate:
        if master_key.get("uid"):
            raise ConfigError("rotate_master_key creates a new master key: do not give master_key.uid with it.")
        if not encryption or not old.get("encryption") or not old.get("master_key_uid"):
            raise ConfigError("rotate_master_key needs an existing job %s with encryption enabled: declare it (encryption: "
                              "enabled) first; a new job gets its first master key without rotation." % job)

    factory = kmip_factory or (lambda: master_keys.kmip_client(params["config_dir"], group))
    # unknown group / missing kmip.yml fail here, before anything else happens
    client = factory()
    check_source(source)
    if object_store:  # the bucket answers to the credentials and holds no other format, before anything is written
        storage.check_object_store(object_store)

    previous = list(old.get("previous_master_key_uids") or [])
    uid = None
    created = False
    if encryption:
        with client:
            if master_key.get("uid"):
                uid = str(master_key["uid"])
                master_keys.check_key(client, uid)
            elif old.get("encryption") and old.get("master_key_uid") and old.get("group") == group and not rotate:
                uid = str(old["master_key_uid"])
                master_keys.check_key(client, uid)
            else:
                if master_key.get("create") is False and not rotate:
                    raise ConfigError("master_key.create is false and no master_key.uid is given: give the UID of an "
                                      "existing KMIP key in master_key.uid, or let the module create one (create: true).")
                if rotate:
                    master_keys.check_rotatable(client, job, str(old["master_key_uid"]))
                name = master_key.get("name") or (master_keys.rotated_key_name(job) if rotate else "kmipbackup-%s" % job)
                uid = "(created at apply)" if check_mode else client.create_master_key(name)
                created = True
    if old.get("master_key_uid") and uid != old["master_key_uid"] and old["master_key_uid"] not in previous:
        # keep the old key listed: snapshots and the head taken under it may still need it
        previous.insert(0, old["master_key_uid"])

    generation = int(old.get("generation") or 1)
    resync = bool(existing) and bool(old.get("encryption")) != encryption
    if resync:
        generation += 1
    new = {
        "job": job, "group": group, "source": source, "encryption": encryption,
        "master_key_uid": uid if encryption else None,
        "previous_master_key_uids": previous,
        "store": store, "state": "stopped" if state == "stopped" else "present",
        "generation": generation, "schedule": schedule,
    }
    if object_store:  # a folder job's file keeps its shape: store only
        new["object_store"] = object_store
    new.update(point_in_time)
    return new, {"master_key_uid": new["master_key_uid"], "key_created": created, "resync_required": resync,
                 "rotated": rotate}
