# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Backup job lifecycle shared by the modules and the daemon (no Ansible imports).

PRIVATE to the collection: it can change at any time.
A job is declared by jobs/<job>.yml in config_dir (written here only); the daemon answers
with status/<job>.json and serves request files under requests/<job>/ in data_dir.
"""
from __future__ import annotations

import copy
import os
import shutil
import time
import uuid

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, files
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import (
    ConfigError, KmipBackupError, KmipError, SourceError)

DEFAULT_CONFIG_DIR = config.DEFAULT_CONFIG_DIR
DEFAULT_DATA_DIR = config.DEFAULT_DATA_DIR
STATUS_NAMES = ("INACTIVE", "PROVISIONING", "STARTED", "STOPPED", "TERMINATING")
ACTIONS = ("snapshot", "verify", "resync")
REDACTED = "********"

SOURCE_DEFAULTS = {
    "uri": None, "tls": False, "tls_ca_file": None, "tls_certificate_key_file": None,
    "username": None, "password": None, "auth_mechanism": None, "auth_source": None,
    "connect_timeout": 10,
}
SCHEDULE_DEFAULTS = {"interval_hours": 6, "recent_days": 2, "daily_days": 7, "weekly_weeks": 4,
                     "monthly_months": 13}
# Ops Manager's snapshotSchedule ranges, used until retention.py provides its own check
_SCHEDULE_RULES = {"interval_hours": (6, 8, 12, 24), "recent_days": range(2, 6), "daily_days": range(1, 366),
                   "weekly_weeks": range(1, 53), "monthly_months": range(1, 37)}


# ---- paths -------------------------------------------------------------------------------

def check_name(name, what="job"):
    return config.validate_name(name, what + " name")


jobs_dir = config.jobs_dir
job_path = config.job_path
list_jobs = config.list_jobs


def status_path(data_dir, job):
    return os.path.join(data_dir, "status", check_name(job) + ".json")


def requests_dir(data_dir, job):
    return os.path.join(data_dir, "requests", check_name(job))


def heads_dir(data_dir, job):
    return os.path.join(data_dir, "heads", check_name(job))


def head_dir(data_dir, job, generation):
    return os.path.join(heads_dir(data_dir, job), str(int(generation)))


# ---- job files ---------------------------------------------------------------------------

def load_job(config_dir, job):
    """The job's configuration (dict) or None when it is not declared."""
    if not os.path.exists(job_path(config_dir, job)):
        return None
    data = config.load_job(config_dir, job)
    if data.get("job") != job:
        raise ConfigError("Job file %s is not a valid job configuration: declare the job again with "
                          "kmipbackup.mongodb.backup_job_encryption." % job_path(config_dir, job))
    return data


def write_job(config_dir, cfg):
    files.ensure_private_dir(config_dir)
    files.ensure_private_dir(jobs_dir(config_dir))
    files.write_yaml(job_path(config_dir, cfg["job"]), cfg)


def remove_job(config_dir, job):
    try:
        os.unlink(job_path(config_dir, job))
    except FileNotFoundError:
        return False
    files.fsync_dir(jobs_dir(config_dir))
    return True


def redact(cfg):
    """A copy of a job configuration safe to show (the source password replaced)."""
    if cfg is None:
        return None
    out = copy.deepcopy(cfg)
    src = out.get("source") or {}
    if src.get("password"):
        src["password"] = REDACTED
    return out


# ---- parameters --------------------------------------------------------------------------

def normalize_source(source):
    if not isinstance(source, dict) or not source.get("uri"):
        raise ConfigError("source.uri is required: give the MongoDB URI of the replica set or mongos to back up.")
    unknown = set(source) - set(SOURCE_DEFAULTS)
    if unknown:
        raise ConfigError("Unknown source option(s): %s." % ", ".join(sorted(unknown)))
    out = dict(SOURCE_DEFAULTS)
    out.update({k: v for k, v in source.items() if v is not None})
    if not str(out["uri"]).startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError("source.uri must start with mongodb:// or mongodb+srv://.")
    for f in ("tls_ca_file", "tls_certificate_key_file"):
        if out[f] and not os.path.isfile(out[f]):
            raise ConfigError("source.%s %s does not exist: give the path of a readable PEM file." % (f, out[f]))
    out["tls"] = bool(out["tls"])
    out["connect_timeout"] = int(out["connect_timeout"])
    if out["connect_timeout"] <= 0:
        raise ConfigError("source.connect_timeout must be a positive number of seconds.")
    return out


def normalize_schedule(schedule):
    out = dict(SCHEDULE_DEFAULTS)
    out.update({k: v for k, v in (schedule or {}).items() if v is not None})
    unknown = set(out) - set(SCHEDULE_DEFAULTS)
    if unknown:
        raise ConfigError("Unknown schedule option(s): %s." % ", ".join(sorted(unknown)))
    try:
        from ansible_collections.kmipbackup.mongodb.plugins.module_utils import retention
    except ImportError:
        retention = None
    if retention is not None and hasattr(retention, "validate_schedule"):
        return retention.validate_schedule(out)
    for k, allowed in _SCHEDULE_RULES.items():
        v = out[k]
        if not isinstance(v, int) or isinstance(v, bool) or v not in allowed:
            raise ConfigError("schedule.%s=%r is out of range: allowed %s." % (
                k, v, ", ".join(map(str, allowed)) if isinstance(allowed, tuple) else "%d-%d" % (allowed[0], allowed[-1])))
    return out


def source_check(source):
    """Connect to the source and refuse what cannot be backed up (standalone, bad auth).

    Uses source.py's connect when it provides one."""
    try:
        from ansible_collections.kmipbackup.mongodb.plugins.module_utils import source as source_mod
    except ImportError:
        source_mod = None
    if source_mod is not None and hasattr(source_mod, "check_source"):
        return source_mod.check_source(source)
    if source_mod is not None and hasattr(source_mod, "connect"):
        client = source_mod.connect(source)
        client.close()
        return None
    return _pymongo_check(source)


def _pymongo_check(source):
    try:
        import pymongo
        from pymongo import errors as perr
    except ImportError as e:
        raise SourceError("pymongo is not installed (%s): install the collection's requirements/runtime.txt." % e)
    kw = {"serverSelectionTimeoutMS": source["connect_timeout"] * 1000, "connectTimeoutMS": source["connect_timeout"] * 1000}
    if source.get("tls"):
        kw["tls"] = True
    if source.get("tls_ca_file"):
        kw["tlsCAFile"] = source["tls_ca_file"]
    if source.get("tls_certificate_key_file"):
        kw["tlsCertificateKeyFile"] = source["tls_certificate_key_file"]
    if source.get("username"):
        kw["username"] = source["username"]
        kw["password"] = source.get("password")
    if source.get("auth_mechanism"):
        kw["authMechanism"] = source["auth_mechanism"]
    if source.get("auth_source"):
        kw["authSource"] = source["auth_source"]
    client = pymongo.MongoClient(source["uri"], **kw)
    try:
        hello = client.admin.command("hello")
        if source.get("username") or source.get("auth_mechanism"):
            client.admin.command("connectionStatus")
    except perr.OperationFailure as e:
        raise SourceError("The source refused the credentials (%s): check source.username, password, "
                          "auth_mechanism and auth_source." % ((e.details or {}).get("errmsg") or e.code))
    except perr.PyMongoError as e:
        raise SourceError("Cannot reach the source %s (%s): check source.uri, TLS options and that the "
                          "deployment is up." % (_uri_hosts(source["uri"]), type(e).__name__))
    finally:
        client.close()
    if not hello.get("setName") and hello.get("msg") != "isdbgrid":
        raise SourceError("The source %s is a standalone server: change streams need a replica set or a sharded "
                          "cluster (mongos); convert it to a one-member replica set." % _uri_hosts(source["uri"]))
    return hello


def _uri_hosts(uri):
    rest = uri.split("://", 1)[-1]
    rest = rest.split("@", 1)[-1]
    return rest.split("/", 1)[0].split("?", 1)[0]


# ---- KMIP --------------------------------------------------------------------------------

def kmip_client(config_dir, group):
    """A KmipClient for the group (ConfigError when kmip.yml or the group is missing)."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import kmip
    cfg = config.load_kmip_config(config_dir)
    grp = config.load_group(config_dir, group)
    return kmip.KmipClient(cfg, grp)


# ---- desired state -----------------------------------------------------------------------

def plan_job(params, existing, check_mode=False, kmip_factory=None):
    """Validate the module's parameters against the existing job and work out the new config.

    Returns (new_cfg, info) where info has master_key_uid, key_created, resync_required.
    Creates a master key through KMIP only when one is needed and not in check mode.
    Nothing is written here.
    """
    job = check_name(params["job"])
    group = check_name(params["group"], "group")
    source = normalize_source(params["source"])
    schedule = normalize_schedule(params.get("schedule"))
    encryption = params.get("encryption", "enabled") in ("enabled", True)
    master_key = params.get("master_key") or {}
    if master_key.get("uid") and master_key.get("create"):
        raise ConfigError("master_key: give either uid (an existing KMIP key) or create: true, not both.")
    state = params.get("state") or "present"
    store = params.get("store") or os.path.join(params.get("data_dir") or DEFAULT_DATA_DIR, "store")
    if not os.path.isabs(store):
        raise ConfigError("store must be an absolute path, got %r." % store)

    factory = kmip_factory or (lambda: kmip_client(params["config_dir"], group))
    # unknown group / missing kmip.yml fail here, before anything else happens
    client = factory()
    source_check(source)

    old = existing or {}
    previous = list(old.get("previous_master_key_uids") or [])
    uid = None
    created = False
    if encryption:
        with client:
            if master_key.get("uid"):
                uid = str(master_key["uid"])
                _check_key(client, uid)
            elif old.get("encryption") and old.get("master_key_uid") and old.get("group") == group:
                uid = str(old["master_key_uid"])
                _check_key(client, uid)
            elif check_mode:
                uid = "(created at apply)"
                created = True
            else:
                uid = client.create_master_key(master_key.get("name") or "kmipbackup-%s" % job)
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
    return new, {"master_key_uid": new["master_key_uid"], "key_created": created, "resync_required": resync}


def _check_key(client, uid):
    try:
        client.check_access(uid)
    except KmipError as e:
        if e.kind == "unreachable":
            raise
        raise KmipError("The group's certificate cannot use master key %s (%s): %s" % (uid, e.kind, e),
                        kind=e.kind, uid=uid, servers=e.servers)


def wait_timeout_error(job, status, want):
    state = (status or {}).get("state", "no status")
    err = (status or {}).get("last_error")
    return KmipBackupError("Job %s did not reach %s in time (now %s%s): check that the Backup Daemon runs "
                           "(role kmipbackup.mongodb.backup_daemon) and its log in the data folder."
                           % (job, want, state, ", last error: %s" % err if err else ""))


# ---- status and requests -----------------------------------------------------------------

def read_status(data_dir, job):
    return files.read_json(status_path(data_dir, job))


def write_status(data_dir, job, status):
    folder = files.ensure_private_dir(os.path.join(data_dir, "status"))
    del folder
    files.write_json(status_path(data_dir, job), status)


def remove_status(data_dir, job):
    try:
        os.unlink(status_path(data_dir, job))
    except FileNotFoundError:
        pass


def status_name(data_dir, job, cfg=None):
    """Ops Manager's statusName for the job as seen by a module."""
    st = read_status(data_dir, job)
    if st and (cfg is None or st.get("generation") == cfg.get("generation") or st.get("state") == "TERMINATING"):
        return st.get("state", "INACTIVE")
    if cfg and cfg.get("state") == "stopped":
        return "STOPPED" if st else "INACTIVE"
    return "INACTIVE"


def is_ready(status, cfg):
    """True when the daemon reports the job's current generation consistent and running."""
    if not status or not cfg:
        return False
    if cfg.get("state") == "stopped":
        return status.get("state") == "STOPPED"
    return (status.get("state") == "STARTED" and bool(status.get("consistent"))
            and status.get("generation") == cfg.get("generation"))


def wait_for(predicate, timeout, interval=0.5):
    """Poll predicate() until it returns a truthy value or timeout seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_ready(data_dir, job, cfg, timeout):
    status = {}

    def ready():
        status.clear()
        status.update(read_status(data_dir, job) or {})
        return is_ready(status, cfg)
    if not wait_for(ready, timeout):
        raise wait_timeout_error(job, status, "STOPPED" if cfg.get("state") == "stopped" else "STARTED and consistent")
    return dict(status)


def wait_removed(data_dir, job, timeout):
    def gone():
        return not os.path.exists(heads_dir(data_dir, job)) and read_status(data_dir, job) is None
    if not wait_for(gone, timeout):
        raise wait_timeout_error(job, read_status(data_dir, job), "removal")


def submit_request(data_dir, job, action, **args):
    """Drop a request for the daemon; returns its id."""
    if action not in ACTIONS:
        raise ConfigError("Unknown request %r: use one of %s." % (action, ", ".join(ACTIONS)))
    folder = requests_dir(data_dir, job)
    files.ensure_private_dir(os.path.join(data_dir, "requests"))
    files.ensure_private_dir(folder)
    rid = "%d-%s" % (time.time() * 1000, uuid.uuid4().hex[:12])
    body = dict(args)
    body["action"] = action
    body["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    files.write_json(os.path.join(folder, rid + ".json"), body)
    return rid


def pending_requests(data_dir, job):
    """[(id, request dict)] not answered yet, oldest first."""
    folder = requests_dir(data_dir, job)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.startswith(".") or not n.endswith(".json") or n.endswith(".done.json"):
            continue
        rid = n[:-5]
        if os.path.exists(os.path.join(folder, rid + ".done.json")):
            continue
        try:
            body = files.read_json(os.path.join(folder, n))
        except ValueError:
            body = {"action": None}
        if body is not None:
            out.append((rid, body))
    return out


def answer_request(data_dir, job, rid, result=None, error=None):
    folder = requests_dir(data_dir, job)
    files.write_json(os.path.join(folder, rid + ".done.json"),
                     {"ok": error is None, "result": result, "error": error,
                      "answered": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    try:
        os.unlink(os.path.join(folder, rid + ".json"))
    except FileNotFoundError:
        pass


def read_answer(data_dir, job, rid):
    return files.read_json(os.path.join(requests_dir(data_dir, job), rid + ".done.json"))


def wait_answer(data_dir, job, rid, timeout):
    """The daemon's answer to a request; KmipBackupError when it failed or did not come in time."""
    answer = wait_for(lambda: read_answer(data_dir, job, rid), timeout)
    if not answer:
        raise wait_timeout_error(job, read_status(data_dir, job), "an answer to request %s" % rid)
    if not answer.get("ok"):
        raise KmipBackupError(answer.get("error") or "The daemon could not serve request %s." % rid)
    return answer.get("result")


def remove_tree(path):
    shutil.rmtree(path, ignore_errors=True)
