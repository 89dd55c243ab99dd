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

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, files, retention
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import source as source_mod
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import (
    ConfigError, KmipBackupError, KmipError)

DEFAULT_DATA_DIR = config.DEFAULT_DATA_DIR
ACTIONS = ("snapshot", "verify", "resync")
_UNREAD = object()
REDACTED = "********"

SOURCE_DEFAULTS = {
    "uri": None, "tls": False, "tls_ca_file": None, "tls_certificate_key_file": None,
    "username": None, "password": None, "auth_mechanism": None, "auth_source": None,
    "connect_timeout": 10,
}
SCHEDULE_DEFAULTS = {"interval_hours": 6, "recent_days": 2, "daily_days": 7, "weekly_weeks": 4,
                     "monthly_months": 13}


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

def store_root(cfg, data_dir):
    """The job's snapshot store folder: cfg's store, else <data_dir>/store."""
    return cfg.get("store") or os.path.join(data_dir, "store")


def load_job(config_dir, job):
    """The job's configuration (dict) or None when it is not declared."""
    if not os.path.exists(job_path(config_dir, job)):
        return None
    data = config.load_job(config_dir, job)
    if data.get("job") != job:
        raise ConfigError("Job file %s is not a valid job configuration: declare the job again with "
                          "kmipbackup.mongodb.backup_job_encryption." % job_path(config_dir, job))
    return data


def write_job(config_dir, cfg, daemon_user=config.DEFAULT_DAEMON_USER):
    name = os.path.basename(job_path(config_dir, cfg["job"]))
    with config.open_config_dir(config_dir, daemon_user) as root, root.sub("jobs") as folder:
        folder.write(name, files.dump_yaml(cfg))


def remove_job(config_dir, job, daemon_user=config.DEFAULT_DAEMON_USER):
    return config.remove_file(config_dir, ("jobs",), os.path.basename(job_path(config_dir, job)), daemon_user)


def open_data_dir(data_dir, daemon_user=config.DEFAULT_DAEMON_USER):
    """data_dir as a files.Folder for writing (checked as config.open_config_dir checks config_dir)."""
    return files.open_root(data_dir, "data_dir", files.trusted_owners(daemon_user))


def redact(cfg):
    """A copy of a job configuration safe to show (the source password replaced)."""
    if cfg is None:
        return None
    out = copy.deepcopy(cfg)
    src = out.get("source") or {}
    if src.get("password"):
        src["password"] = REDACTED
    if src.get("uri"):
        src["uri"] = config.mask_userinfo(src["uri"])
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


def normalize_schedule(schedule):
    out = dict(SCHEDULE_DEFAULTS)
    out.update({k: v for k, v in (schedule or {}).items() if v is not None})
    unknown = set(out) - set(SCHEDULE_DEFAULTS)
    if unknown:
        raise ConfigError("Unknown schedule option(s): %s." % ", ".join(sorted(unknown)))
    return retention.validate_schedule(out)


def source_check(source):
    """Connect to the source once and refuse what cannot be backed up (standalone, bad auth)."""
    source_mod.connect(source).close()


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
    store = store_root(params, params.get("data_dir") or DEFAULT_DATA_DIR)
    if not os.path.isabs(store):
        raise ConfigError("store must be an absolute path, got %r." % store)

    rotate = bool(params.get("rotate_master_key"))
    old = existing or {}
    if rotate:
        if master_key.get("uid"):
            raise ConfigError("rotate_master_key creates a new master key: do not give master_key.uid with it.")
        if not encryption or not old.get("encryption") or not old.get("master_key_uid"):
            raise ConfigError("rotate_master_key needs an existing job %s with encryption enabled: declare it (encryption: "
                              "enabled) first; a new job gets its first master key without rotation." % job)

    factory = kmip_factory or (lambda: kmip_client(params["config_dir"], group))
    # unknown group / missing kmip.yml fail here, before anything else happens
    client = factory()
    source_check(source)

    previous = list(old.get("previous_master_key_uids") or [])
    uid = None
    created = False
    if encryption:
        with client:
            if master_key.get("uid"):
                uid = str(master_key["uid"])
                _check_key(client, uid)
            elif old.get("encryption") and old.get("master_key_uid") and old.get("group") == group and not rotate:
                uid = str(old["master_key_uid"])
                _check_key(client, uid)
            else:
                if master_key.get("create") is False and not rotate:
                    raise ConfigError("master_key.create is false and no master_key.uid is given: give the UID of an "
                                      "existing KMIP key in master_key.uid, or let the module create one (create: true).")
                if rotate:
                    _check_rotatable(client, job, str(old["master_key_uid"]))
                name = master_key.get("name") or (rotated_key_name(job) if rotate else "kmipbackup-%s" % job)
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
    return new, {"master_key_uid": new["master_key_uid"], "key_created": created, "resync_required": resync,
                 "rotated": rotate}


def rotated_key_name(job, now=None):
    """Name of a master key created by rotation: kmipbackup-<job>-<UTC time>, unique per rotation."""
    return "kmipbackup-%s-%s" % (job, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)))


# ---- master keys still needed, retirement ---------------------------------------------------

class KeyInUseError(ConfigError):
    """A master key that a retained snapshot or a head key still needs cannot be retired."""

    kind = "key_in_use"

    def __init__(self, message, needed):
        super().__init__(message)
        self.needed = needed


def master_key_users(cfg, data_dir):
    """{uid: [what needs it]} for the job's retained snapshots (catalog entries of its store: "snapshot <id>")
    and its head keys (heads/<job>/<generation>/headkey.json: "head key of generation <n>")."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import store
    users = {}
    for entry in store.JobStore(cfg["store"], cfg["job"]).catalog():
        for uid in entry.get("master_key_uids") or []:
            users.setdefault(str(uid), []).append("snapshot %s" % entry.get("snapshot_id"))
    folder = heads_dir(data_dir, cfg["job"])
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


def master_keys_needed(cfg):
    """Master key UIDs the job's retained snapshots need (from the store's non-secret catalog)."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import store
    return store.JobStore(cfg["store"], cfg["job"]).master_keys_needed()


def plan_retire(cfg, uids, data_dir):
    """(new configuration, UIDs removed from previous_master_key_uids, UIDs of this job's keys among uids).

    The job's keys are its previous master keys and those its store's keyring names (a retired key stays
    there). KeyInUseError, and nothing to write, when one of uids is the current key or a retained
    snapshot or a head key still needs it. UIDs already retired are left alone (idempotent)."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import store
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
    keyring = {str(r.get("master_key_uid")) for r in store.JobStore(cfg["store"], cfg["job"]).keyring_records()}
    retiring = [u for u in uids if u in previous]
    known = [u for u in uids if u in previous or u in keyring]
    new = dict(cfg, previous_master_key_uids=[u for u in previous if u not in retiring])
    return new, retiring, known


def check_not_shared(config_dir, job, uids):
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


def revoke_keys(client, uids, check_mode=False):
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


def _check_rotatable(client, job, uid):
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


def _check_key(client, uid):
    try:
        client.check_access(uid)
    except KmipError as e:
        if e.kind == "unreachable":
            raise
        raise KmipError("The group's certificate cannot use master key %s (%s): %s" % (uid, e.kind, e),
                        kind=e.kind, uid=uid, servers=e.servers) from e


def wait_timeout_error(job, status, want):
    state = (status or {}).get("state", "no status")
    err = (status or {}).get("last_error")
    return KmipBackupError("Job %s did not reach %s in time (now %s%s): check that the Backup Daemon runs "
                           "(role kmipbackup.mongodb.backup_daemon) and its log in the data folder."
                           % (job, want, state, ", last error: %s" % err if err else ""))


# ---- status and requests -----------------------------------------------------------------

def read_status(data_dir, job):
    return files.read_json(status_path(data_dir, job))


def daemon_last_snapshot(data_dir, job):
    """The Backup Daemon's own record of the job's last snapshot id (its status file), or None where there is none
    (a fresh host, or the daemon has not snapshotted the job yet); a store older than it was rolled back."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import store
    try:
        last = (read_status(data_dir, job) or {}).get("last_snapshot") or {}
    except (OSError, ValueError, AttributeError):
        return None
    sid = last.get("id") if isinstance(last, dict) else None
    return sid if isinstance(sid, str) and store.SNAPSHOT_RE.match(sid) else None


def write_status(data_dir, job, status):
    name = os.path.basename(status_path(data_dir, job))
    with open_data_dir(data_dir) as root, root.sub("status") as folder:
        folder.write(name, files.dump_json(status))


def remove_status(data_dir, job):
    try:
        os.unlink(status_path(data_dir, job))
    except FileNotFoundError:
        pass


def status_name(data_dir, job, cfg=None, status=_UNREAD):
    """Ops Manager's statusName for the job as seen by a module; status: the job's status (read_status) when the caller
    has read it already."""
    st = read_status(data_dir, job) if status is _UNREAD else status
    if st and (cfg is None or st.get("generation") == cfg.get("generation") or st.get("state") == "TERMINATING"):
        return st.get("state", "INACTIVE")
    if cfg and cfg.get("state") == "stopped":
        return "STOPPED" if st else "INACTIVE"
    return "INACTIVE"


def is_ready(status, cfg):
    """True when the daemon reports the job's current generation and master key consistent and running."""
    if not status or not cfg:
        return False
    if cfg.get("state") == "stopped":
        return status.get("state") == "STOPPED"
    # the master key too: after a rotation the daemon restarts the job and rewraps the head key first
    return (status.get("state") == "STARTED" and bool(status.get("consistent"))
            and status.get("generation") == cfg.get("generation") and status.get("master_key_uid") == cfg.get("master_key_uid"))


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


def submit_request(data_dir, job, action, daemon_user=config.DEFAULT_DAEMON_USER, **args):
    """Drop a request for the daemon; returns its id."""
    if action not in ACTIONS:
        raise ConfigError("Unknown request %r: use one of %s." % (action, ", ".join(ACTIONS)))
    check_name(job)
    rid = "%d-%s" % (time.time() * 1000, uuid.uuid4().hex[:12])
    body = dict(args)
    body["action"] = action
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import store
    body["created"] = store.iso(store.utcnow())
    with open_data_dir(data_dir, daemon_user) as root, root.walk("requests", job) as folder:
        folder.write(rid + ".json", files.dump_json(body))
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
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import store
    with open_data_dir(data_dir) as root, root.walk("requests", check_name(job)) as folder:
        folder.write(rid + ".done.json", files.dump_json({"ok": error is None, "result": result, "error": error,
                                                          "answered": store.iso(store.utcnow())}))
        folder.unlink(rid + ".json")


def read_answer(data_dir, job, rid):
    return files.read_json(os.path.join(requests_dir(data_dir, job), rid + ".done.json"))


def wait_answer(data_dir, job, rid, timeout, generation=None):
    """The daemon's answer to a request; KmipBackupError when it failed or did not come in time. While the job is
    INACTIVE with an error (e.g. waiting for KMIP or the source) its runner serves no request: fail at once with
    that error and withdraw the request, instead of waiting the whole timeout. generation: the job's current one
    (a status of another generation is not this job's state yet)."""
    inactive = {}

    def answered():
        answer = read_answer(data_dir, job, rid)
        if answer:
            return answer
        st = read_status(data_dir, job) or {}
        if (st.get("state") == "INACTIVE" and st.get("last_error")
                and (generation is None or st.get("generation") == generation)):
            inactive.update(st)
            return True
        return None
    answer = wait_for(answered, timeout)
    if answer is True:
        withdrawn = _withdraw_request(data_dir, job, rid)
        answer = read_answer(data_dir, job, rid)  # served after all, between the two reads
        if not answer:
            raise KmipBackupError("Job %s is INACTIVE, so the Backup Daemon cannot serve request %s; the job's last error: "
                                  "%s. Fix that (the daemon retries by itself) and ask again once the job is STARTED%s."
                                  % (job, rid, inactive["last_error"],
                                     "; the request was withdrawn" if withdrawn else ""))
    if not answer:
        raise wait_timeout_error(job, read_status(data_dir, job), "an answer to request %s" % rid)
    if not answer.get("ok"):
        raise KmipBackupError(answer.get("error") or "The daemon could not serve request %s." % rid)
    return answer.get("result")


def _withdraw_request(data_dir, job, rid):
    try:
        os.unlink(os.path.join(requests_dir(data_dir, job), rid + ".json"))
        return True
    except FileNotFoundError:
        return False


def remove_tree(path):
    shutil.rmtree(path, ignore_errors=True)
