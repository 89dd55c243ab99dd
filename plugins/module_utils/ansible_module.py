# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The only Ansible-side helper of the core: shared argument specs, error and diff shaping.

PRIVATE to the collection: it can change at any time.
"""
from __future__ import annotations

import copy

import os

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.config import (
    DEFAULT_CONFIG_DIR, DEFAULT_DAEMON_USER, userinfo_secrets)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError, KmipBackupError

REDACTED = "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
SECRET_KEYS = frozenset(("client_cert_password", "password"))


def config_dir_spec():
    """Argument spec piece for config_dir (see the kmipbackup.mongodb.kmip doc fragment)."""
    return dict(config_dir=dict(type="path", default=DEFAULT_CONFIG_DIR))


def kmip_access_spec():
    """Argument spec piece for a store reader's KMIP access (see the kmipbackup.mongodb.kmip.ACCESS doc fragment)."""
    return dict(
        group=dict(type="str"),
        kmip_servers=dict(type="list", elements="str"),
        kmip_port=dict(type="int", default=config.DEFAULT_PORT),
        kmip_ca_file=dict(type="path"),
        kmip_protocol=dict(type="str", default="kmip_1_2", choices=list(config.PROTOCOLS)),
        kmip_allow_legacy_unwrap=dict(type="bool", default=False),
        kmip_connect_timeout=dict(type="float", default=5.0),
        client_cert_file=dict(type="path"),
        client_key_file=dict(type="path", no_log=False),
        client_cert_password=dict(type="str", no_log=True),
        data_dir=dict(type="path", default=config.DEFAULT_DATA_DIR),
    )


def kmip_settings(p, cfg):
    """(KmipConfig, GroupConfig) from kmip_access_spec() parameters p and the job's configuration cfg (None on a fresh
    host), or None when no KMIP access is configured."""
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


def daemon_user_spec():
    """Argument spec piece for daemon_user (see the kmipbackup.mongodb.kmip.DAEMON_USER doc fragment)."""
    return dict(daemon_user=dict(type="str", default=DEFAULT_DAEMON_USER))


def hide_userinfo(module, *values):
    """Add the passwords of any user:password@ in values (strings or lists of them) to the module's no_log values,
    so they are masked in invocation.module_args, messages and results. Call before any exit_json/fail_json."""
    for value in values:
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, str):
                module.no_log_values.update(userinfo_secrets(v))


def call(module, fn, *args, **kwargs):
    """fn(*args, **kwargs); a KmipBackupError becomes fail_json with its message (and kind), no traceback."""
    try:
        return fn(*args, **kwargs)
    except KmipBackupError as e:
        fail(module, e)


def fail(module, error, **result):
    kind = getattr(error, "kind", None)
    if kind:
        result.setdefault("error_kind", kind)
    module.fail_json(msg=str(error), **result)


def redact(value, keys=SECRET_KEYS):
    """A deep copy of value with the values of secret keys replaced (None stays None)."""
    if isinstance(value, dict):
        return {k: (REDACTED if k in keys and v is not None else redact(v, keys)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, keys) for v in value]
    return copy.deepcopy(value)


def diff(before, after, keys=SECRET_KEYS):
    """A module diff of two mappings (None: absent) with secrets redacted; a changed secret shows as changed."""
    b = redact(before or {}, keys)
    a = redact(after or {}, keys)
    if before and after:
        for k in keys:
            if k in a and a[k] == REDACTED and before.get(k) != after.get(k) and before.get(k) is not None:
                a[k] = REDACTED + " (changed)"
    return {"before": b, "after": a}
