# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Paths and the configuration files of a daemon host (no Ansible imports).

PRIVATE to the collection: it can change at any time.
config_dir holds kmip.yml (kmip_config), groups/<group>.yml (group_kmip) and
jobs/<job>.yml (backup_job_encryption); this file reads all of them and writes the
first two. See docs/internals.md, "Files on a daemon host".
"""
from __future__ import annotations

import dataclasses
import os
import re
from urllib.parse import unquote

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import files
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError

DEFAULT_CONFIG_DIR = "/etc/kmipbackup"
DEFAULT_DATA_DIR = "/var/lib/kmipbackup"
# the backup_daemon role's default user: besides root, the only owner config_dir and data_dir may have
DEFAULT_DAEMON_USER = "kmipbackup"
DEFAULT_PORT = 5696
PROTOCOLS = ("kmip_1_2", "legacy")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_HOST = re.compile(r"^[A-Za-z0-9_.:-]+$")
# user:password@ in a URI or a host entry (the password stops at '/', '@' or a space)
_USERINFO = re.compile(r"([^\s/@:\[\]]+):([^\s/@]+)@")
MASK = "********"  # a secret inside a text (a URI's user:password@, a message)
# a whole secret value shown in output or a diff: the marker Ansible itself uses for no_log values
REDACTED = "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"


def userinfo_secrets(text: str | None) -> set:
    """The passwords of every user:password@ in text, as written and percent-decoded."""
    out = set()
    for m in _USERINFO.finditer(str(text or "")):
        out.update(v for v in (m.group(2), unquote(m.group(2))) if v)
    return out


def mask_userinfo(text: str) -> str:
    """text with the password of every user:password@ replaced by ********."""
    return _USERINFO.sub(lambda m: "%s:%s@" % (m.group(1), MASK), str(text))


def validate_name(name: str, what: str = "name") -> str:
    """Return name when it is a safe file name ([A-Za-z0-9_.-]+), else raise ConfigError."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise ConfigError("invalid %s %r: use letters, digits, '_', '.' and '-' only" % (what, name))
    return name


def open_config_dir(config_dir: str, daemon_user: str = DEFAULT_DAEMON_USER, create: bool = True) -> files.Folder | None:
    """config_dir as a files.Folder for writing: refused when it is a link, writable by others or owned by a user
    other than root, the running user or daemon_user (see files.open_root); None when missing and not create."""
    return files.open_root(config_dir, "config_dir", files.trusted_owners(daemon_user), create)


def check_config_dir(config_dir: str, daemon_user: str = DEFAULT_DAEMON_USER) -> None:
    """Refuse (UnsafePathError) an existing config_dir that open_config_dir would refuse, before anything (a KMIP key,
    a file) is created; a missing one is fine (it is created 0700)."""
    folder = open_config_dir(config_dir, daemon_user, create=False)
    if folder is not None:
        folder.close()


def file_owner(owner: str | None = None, group: str | None = None, daemon_user: str = DEFAULT_DAEMON_USER) -> tuple[int, int]:
    """(uid, gid) of the owner and group (names or numbers; None: -1, left as it is) that config files get; checked
    before anything is written: the owner must be one config_dir may have (root, the running user or daemon_user)."""
    uid, gid = files.resolve_owner(owner, group)
    if uid != -1 and uid not in files.trusted_owners(daemon_user):
        raise ConfigError("file_owner %s may not own config_dir: give root, the user the module runs as, or daemon_user "
                          "(%s); nothing was changed." % (owner, daemon_user))
    return uid, gid


def set_owner(config_dir: str, paths: list, ids: tuple[int, int], daemon_user: str = DEFAULT_DAEMON_USER,
              check_mode: bool = False) -> bool:
    """Give config_dir and paths in it (relative, "/"-separated; the folders on the way too) the (uid, gid) of
    file_owner (-1 leaves one as it is), never following a link; True when something changed (in check mode: would;
    a path not written yet counts as a change)."""
    uid, gid = ids
    if uid == -1 and gid == -1:
        return False
    root = open_config_dir(config_dir, daemon_user, create=False)
    if root is None:
        return True
    changed = False
    parts = [p.split("/") for p in paths]
    with root:
        changed |= root.own(None, uid, gid, check_mode)
        for path in dict.fromkeys("/".join(p[:i]) for p in parts for i in range(1, len(p) + 1)):
            *folders, name = path.split("/")
            folder = root.walk(*folders, create=False)
            if folder is None or not folder.exists(name):
                changed = True
                if folder is not None:
                    folder.close()
                continue
            with folder:
                changed |= folder.own(name, uid, gid, check_mode)
    return changed


def kmip_path(config_dir: str = DEFAULT_CONFIG_DIR) -> str:
    return os.path.join(config_dir, "kmip.yml")


def groups_dir(config_dir: str = DEFAULT_CONFIG_DIR) -> str:
    return os.path.join(config_dir, "groups")


def group_path(config_dir: str, group: str) -> str:
    return os.path.join(groups_dir(config_dir), validate_name(group, "group name") + ".yml")


def jobs_dir(config_dir: str = DEFAULT_CONFIG_DIR) -> str:
    return os.path.join(config_dir, "jobs")


def job_path(config_dir: str, job: str) -> str:
    return os.path.join(jobs_dir(config_dir), validate_name(job, "job name") + ".yml")


def parse_server(entry: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """(host, port) of a server entry: 'host', 'host:port', '[v6 address]' or '[v6 address]:port'."""
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError("invalid KMIP server entry %r: give a host name or address, optionally with ':port'" % (entry,))
    entry = entry.strip()
    if "@" in entry:  # never echo a password given as user:password@host
        raise ConfigError("invalid KMIP server entry %r: KMIP servers take no user or password (the client certificate "
                          "is the identity); give only the host name or address, optionally with ':port'"
                          % mask_userinfo(entry))
    host, port = entry, default_port
    if entry.startswith("["):
        end = entry.find("]")
        if end < 0:
            raise ConfigError("invalid KMIP server entry %r: missing ']' after the IPv6 address" % entry)
        host, rest = entry[1:end], entry[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError("invalid KMIP server entry %r: expected ':port' after ']'" % entry)
            port = rest[1:]
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    try:
        port = int(port)
    except (TypeError, ValueError):
        port = 0
    if not 0 < port < 65536:
        raise ConfigError("invalid port in KMIP server entry %r: use 1-65535" % entry)
    if not host or not _HOST.match(host):
        raise ConfigError("invalid host in KMIP server entry %r" % entry)
    return host, port


@dataclasses.dataclass
class KmipConfig:
    """kmip.yml: the KMIP servers (tried in order), their port, the CA that signs them."""
    servers: list
    ca_file: str
    port: int = DEFAULT_PORT
    connect_timeout: float = 5.0
    connect_retries: int = 2
    protocol: str = "kmip_1_2"
    # unwrap legacy (rfc5649) records under protocol kmip_1_2: such a record makes the client fetch the master key
    allow_legacy_unwrap: bool = False

    def __post_init__(self):
        if not isinstance(self.servers, list) or not self.servers:
            raise ConfigError("KMIP servers must be a non-empty list of host names or addresses")
        self.servers = [str(s).strip() for s in self.servers]
        try:
            self.port = int(self.port)
            self.connect_timeout = float(self.connect_timeout)
            self.connect_retries = int(self.connect_retries)
        except (TypeError, ValueError) as e:
            raise ConfigError("invalid KMIP setting (port, connect_timeout, connect_retries): %s" % e) from e
        if not 0 < self.port < 65536:
            raise ConfigError("invalid KMIP port %r: use 1-65535" % self.port)
        if self.connect_timeout <= 0:
            raise ConfigError("connect_timeout must be positive (seconds)")
        if self.connect_retries < 0:
            raise ConfigError("connect_retries must be 0 or more")
        if self.protocol not in PROTOCOLS:
            raise ConfigError("invalid KMIP protocol %r: use one of %s" % (self.protocol, ", ".join(PROTOCOLS)))
        if not isinstance(self.allow_legacy_unwrap, bool):
            raise ConfigError("allow_legacy_unwrap must be true or false (got %r)" % (self.allow_legacy_unwrap,))
        if not self.ca_file or not isinstance(self.ca_file, str):
            raise ConfigError("ca_file is required: the PEM file of the CA that signs the KMIP servers' certificates")
        for s in self.servers:
            parse_server(s, self.port)

    def addresses(self) -> list:
        """[(host, port)] in failover order."""
        return [parse_server(s, self.port) for s in self.servers]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if not out["allow_legacy_unwrap"]:
            del out["allow_legacy_unwrap"]  # files written before the option existed stay unchanged
        return out


@dataclasses.dataclass
class GroupConfig:
    """groups/<group>.yml: the group's KMIP client certificate (and key, password)."""
    group: str
    client_cert_file: str
    client_key_file: str = None
    client_cert_password: str = None

    def __post_init__(self):
        validate_name(self.group, "group name")
        if not self.client_cert_file or not isinstance(self.client_cert_file, str):
            raise ConfigError("group %s: client_cert_file is required" % self.group)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _from_dict(cls, data, path):
    if not isinstance(data, dict):
        raise ConfigError("%s is not a YAML mapping: rewrite it with the module that owns it" % path)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError("%s has unknown keys %s: rewrite it with the module that owns it" % (path, ", ".join(unknown)))
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError("%s is incomplete (%s): rewrite it with the module that owns it" % (path, e)) from e
    except ConfigError as e:
        raise ConfigError("%s: %s" % (path, e)) from e


def read_raw(path: str) -> dict | list | None:
    try:
        return files.read_yaml(path)
    except ConfigError:  # a link planted at path (files.UnsafePathError): its own message
        raise
    except OSError as e:
        raise ConfigError("cannot read %s: %s" % (path, e.strerror or e)) from e
    except Exception as e:  # yaml.YAMLError, without importing yaml here
        raise ConfigError("%s is not valid YAML (%s): rewrite it with the module that owns it" % (path, type(e).__name__)) from e


def load_kmip_config(config_dir: str = DEFAULT_CONFIG_DIR) -> KmipConfig:
    path = kmip_path(config_dir)
    data = read_raw(path)
    if data is None:
        raise ConfigError("no KMIP configuration at %s: run kmipbackup.mongodb.kmip_config first" % path)
    return _from_dict(KmipConfig, data, path)


def save_kmip_config(config_dir: str, cfg: KmipConfig, daemon_user: str = DEFAULT_DAEMON_USER) -> None:
    with open_config_dir(config_dir, daemon_user) as root:
        root.write("kmip.yml", files.dump_yaml(cfg.to_dict()))
    return kmip_path(config_dir)


def delete_kmip_config(config_dir: str, daemon_user: str = DEFAULT_DAEMON_USER) -> bool:
    """Remove kmip.yml; True when it existed."""
    return remove_file(config_dir, (), "kmip.yml", daemon_user)


def load_group(config_dir: str, group: str) -> GroupConfig:
    path = group_path(config_dir, group)
    data = read_raw(path)
    if data is None:
        raise ConfigError("no KMIP client certificate configured for group %s (%s): run kmipbackup.mongodb.group_kmip first"
                          % (group, path))
    grp = _from_dict(GroupConfig, data, path)
    if grp.group != group:
        raise ConfigError("%s names group %s, not %s: rewrite it with kmipbackup.mongodb.group_kmip" % (path, grp.group, group))
    return grp


def save_group(config_dir: str, grp: GroupConfig, daemon_user: str = DEFAULT_DAEMON_USER) -> None:
    path = group_path(config_dir, grp.group)
    with open_config_dir(config_dir, daemon_user) as root, root.sub("groups") as folder:
        folder.write(os.path.basename(path), files.dump_yaml(grp.to_dict()))
    return path


def delete_group(config_dir: str, group: str, daemon_user: str = DEFAULT_DAEMON_USER) -> bool:
    """Remove groups/<group>.yml; True when it existed."""
    return remove_file(config_dir, ("groups",), os.path.basename(group_path(config_dir, group)), daemon_user)


def remove_file(config_dir: str, folders: tuple, name: str, daemon_user: str = DEFAULT_DAEMON_USER) -> bool:
    """Remove config_dir/<folders...>/name without following links; True when it existed."""
    root = open_config_dir(config_dir, daemon_user, create=False)
    if root is None:
        return False
    with root:
        folder = root.walk(*folders, create=False)
        if folder is None:
            return False
        with folder:
            return folder.unlink(name)


def _names(folder):
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(e[:-4] for e in entries if e.endswith(".yml") and not e.startswith(".") and _NAME.match(e[:-4]))


def list_groups(config_dir: str = DEFAULT_CONFIG_DIR) -> list:
    return _names(groups_dir(config_dir))


def list_jobs(config_dir: str = DEFAULT_CONFIG_DIR) -> list:
    return _names(jobs_dir(config_dir))


def load_job(config_dir: str, job: str) -> dict:
    """The parsed jobs/<job>.yml (a dict; written by backup_job_encryption)."""
    path = job_path(config_dir, job)
    data = read_raw(path)
    if data is None:
        raise ConfigError("no backup job %s at %s: create it with kmipbackup.mongodb.backup_job_encryption" % (job, path))
    if not isinstance(data, dict):
        raise ConfigError("%s is not a YAML mapping: rewrite it with kmipbackup.mongodb.backup_job_encryption" % path)
    return data


def master_key_uids(config_dir: str, group: str | None = None, exclude_job: str | None = None) -> dict:
    """{uid: [job, ...]} of the current and previous master keys of the declared jobs (only the group's jobs when
    group is given; without exclude_job)."""
    uids = {}
    for job in list_jobs(config_dir):
        if job == exclude_job:
            continue
        data = load_job(config_dir, job)
        if group is not None and data.get("group") != group:
            continue
        for uid in [data.get("master_key_uid")] + list(data.get("previous_master_key_uids") or []):
            if uid:
                uids.setdefault(str(uid), []).append(job)
    return uids
