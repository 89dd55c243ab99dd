# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The only Ansible-side helper of the core: the module base (shared argument specs, one way to report a missing
package and a core error), and diff shaping.

PRIVATE to the collection: it can change at any time.
"""
from __future__ import annotations

import copy
import dataclasses
import sys

from ansible.module_utils import basic
from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import KmipBackupError


def _pymongo_error(error):
    """Whether error is one of pymongo's. pymongo is imported only where MongoDB is used (~0.08 s a directory or
    archive restore does without), and none can be raised before it is."""
    errors = sys.modules.get("pymongo.errors")
    return errors is not None and isinstance(error, errors.PyMongoError)


REDACTED = config.REDACTED  # the core's one marker for a whole secret value
KMIP_DEFAULTS = {f.name: f.default for f in dataclasses.fields(config.KmipConfig) if f.default is not dataclasses.MISSING}
SECRET_KEYS = frozenset(("client_cert_password", "password", "secret_key", "session_token"))


# ---- shared argument specs (documented by the kmipbackup.mongodb.kmip and .mongodb doc fragments) --------------

def config_dir_spec():
    return dict(config_dir=dict(type="path", default=config.DEFAULT_CONFIG_DIR))


def data_dir_spec():
    return dict(data_dir=dict(type="path", default=config.DEFAULT_DATA_DIR))


def daemon_user_spec():
    return dict(daemon_user=dict(type="str", default=config.DEFAULT_DAEMON_USER))


def file_owner_spec():
    """Who owns config_dir and the files a module writes in it (the kmipbackup.mongodb.kmip.FILE_OWNER fragment)."""
    return dict(file_owner=dict(type="str"), file_group=dict(type="str"))


def kmip_connection_spec(retries=False):
    """The KMIP connection, flat kmip_* options (kmip_connect_retries only where a configuration is written)."""
    spec = dict(
        kmip_servers=dict(type="list", elements="str"),
        kmip_port=dict(type="int", default=KMIP_DEFAULTS["port"]),
        kmip_ca_file=dict(type="path"),
        kmip_connect_timeout=dict(type="float", default=KMIP_DEFAULTS["connect_timeout"]),
        kmip_protocol=dict(type="str", default=KMIP_DEFAULTS["protocol"], choices=list(config.PROTOCOLS)),
        kmip_allow_legacy_unwrap=dict(type="bool", default=False),
    )
    if retries:
        spec["kmip_connect_retries"] = dict(type="int", default=KMIP_DEFAULTS["connect_retries"])
    return spec


def client_cert_spec():
    return dict(
        client_cert_file=dict(type="path"),
        client_key_file=dict(type="path", no_log=False),
        client_cert_password=dict(type="str", no_log=True),
    )


def store_reader_spec():
    """A store reader's KMIP access: the connection, a certificate or a group, and the daemon host's folders."""
    return dict(group=dict(type="str"), **kmip_connection_spec(), **client_cert_spec(), **config_dir_spec(),
                **data_dir_spec())


def mongodb_connection_spec(defaults):
    """A MongoDB connection, one nested dict with the same suboptions everywhere (a job's source, a restore target),
    defaults from the core (defaults: its dict of them); the core builds its client from it (source.client_options)."""
    return dict(type="dict", options=dict(
        uri=dict(type="str", required=True, no_log=False),
        tls=dict(type="bool", default=defaults["tls"]),
        tls_ca_file=dict(type="path"),
        tls_certificate_key_file=dict(type="path", no_log=False),
        username=dict(type="str"),
        password=dict(type="str", no_log=True),
        auth_mechanism=dict(type="str"),
        auth_source=dict(type="str"),
        connect_timeout=dict(type="int", default=defaults["connect_timeout"]),
    ))


def object_store_spec(name="object_store"):
    """A snapshot store in an S3-compatible bucket (the kmipbackup.mongodb.store fragment), mutually exclusive with the
    module's store folder; name: the option's name (a copy's destination uses another)."""
    return {name: dict(type="dict", options=dict(
        bucket=dict(type="str", required=True),
        prefix=dict(type="str", default=""),
        endpoint_url=dict(type="str"),
        region=dict(type="str"),
        addressing_style=dict(type="str", choices=["path", "virtual", "auto"], default="path"),
        ca_bundle=dict(type="path"),
        access_key=dict(type="str", no_log=False),
        secret_key=dict(type="str", no_log=True),
        session_token=dict(type="str", no_log=True),
        connect_timeout=dict(type="float", default=10.0),
        read_timeout=dict(type="float", default=60.0),
    ))}


SHARED_SPECS = {"config_dir": config_dir_spec, "data_dir": data_dir_spec, "daemon_user": daemon_user_spec,
                "file_owner": file_owner_spec, "store_reader": store_reader_spec,
                "object_store": object_store_spec}


def full_spec(argument_spec, shared=()):
    """A module's whole argument spec: the shared pieces named in shared (keys of SHARED_SPECS), then its own
    argument_spec (a dict, or a function returning one)."""
    spec = {}
    for name in shared:
        spec.update(SHARED_SPECS[name]())
    spec.update(argument_spec() if callable(argument_spec) else argument_spec)
    return spec


class KmipBackupModule(AnsibleModule):
    """AnsibleModule with the collection's shared options (shared: names of SHARED_SPECS), check mode, one report
    of a core that cannot be imported (import_error: the traceback of the module's guarded core import) and one way
    to turn a core error into fail_json(msg=..., error_kind=...)."""

    def __init__(self, argument_spec, shared=(), import_error=None, secret_values=(), **kwargs):
        kwargs.setdefault("supports_check_mode", True)
        if import_error is not None:
            # the argument spec may need the core: accept what was given only to report what is missing, and
            # neither log nor echo it (it may hold secrets)
            given = {k: dict(type="raw") for k in basic._load_params() if not k.startswith("_ansible_")}
            super().__init__(argument_spec=given, supports_check_mode=True, no_log=True)
            self.fail_json(msg="The kmipbackup core cannot be imported: %s. Install requirements/runtime.txt on the host."
                           % import_error.strip().splitlines()[-1], exception=import_error, error_kind="missing_requirement",
                           invocation={"module_args": "not shown: the module could not start"})
        super().__init__(argument_spec=full_spec(argument_spec, shared), **kwargs)
        for value in secret_values:  # a user:password@ in these parameters is masked wherever it shows
            self.hide_userinfo(value(self.params))

    def hide_userinfo(self, *values):
        """Add the passwords of any user:password@ in values (strings or lists of them) to the no_log values, so they
        are masked in invocation.module_args, messages and results. Called before any exit_json/fail_json."""
        for value in values:
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(v, str):
                    self.no_log_values.update(config.userinfo_secrets(v))

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs); a core error (or one of pymongo's) fails the module, no traceback."""
        try:
            return fn(*args, **kwargs)
        except KmipBackupError as e:
            self.fail_error(e)
        except Exception as e:
            if not _pymongo_error(e):
                raise
            self.fail_error(e)

    def fail_error(self, error, **result):
        """fail_json with the error's message and kind (and the fields the core attached to it, error.details)."""
        if _pymongo_error(error):
            msg = ("MongoDB failed (%s): check the connection's uri, its TLS and authentication options, and that the "
                   "deployment is up; nothing was written unless kmipbackup_restore.restoreInfo marks an incomplete "
                   "restore." % type(error).__name__)
            self.fail_json(msg=msg, error_kind="mongodb", **result)
        result.update(getattr(error, "details", None) or {})
        self.fail_json(msg=str(error), error_kind=getattr(error, "kind", None) or type(error).__name__, **result)

    def run(self, fn, *args, **kwargs):
        """Run the core call fn(*args, **kwargs) and exit with its result dict (its "warnings" become Ansible's)."""
        result = self.call(fn, *args, **kwargs)
        for w in result.pop("warnings", None) or ():
            self.warn(w)
        if "diff" in result and not self._diff:
            del result["diff"]
        self.exit_json(**result)


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
