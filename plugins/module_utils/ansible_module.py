# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The only Ansible-side helper of the core: shared argument specs, error and diff shaping.

PRIVATE to the collection: it can change at any time.
"""
from __future__ import annotations

import copy

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.config import (
    DEFAULT_CONFIG_DIR, DEFAULT_DAEMON_USER, userinfo_secrets)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import KmipBackupError

REDACTED = "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
SECRET_KEYS = frozenset(("client_cert_password", "password"))


def config_dir_spec():
    """Argument spec piece for config_dir (see the kmipbackup.mongodb.kmip doc fragment)."""
    return dict(config_dir=dict(type="path", default=DEFAULT_CONFIG_DIR))


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
