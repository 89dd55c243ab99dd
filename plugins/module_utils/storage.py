# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where a job's snapshot store is (no Ansible imports). PRIVATE to the collection.

A store is a folder (store: a path) or an S3-compatible bucket and prefix (object_store: a dict of
bucket, prefix, endpoint_url, region, addressing_style, ca_bundle, access_key, secret_key,
session_token, connect_timeout, read_timeout). Every place that opens a store goes through
open_storage (or job_storage for a job's configuration), and every message names it through
describe(), which never shows credentials.
"""
from __future__ import annotations

import copy
import ipaddress
import os
import re
import urllib.parse
from typing import TYPE_CHECKING

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, datadir, files, store
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError, StoreError

if TYPE_CHECKING:  # objectstore (boto3: a quarter of a second) is imported only for a bucket
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import objectstore

OBJECT_STORE_DEFAULTS = {
    "bucket": None, "prefix": "", "endpoint_url": None, "region": None, "addressing_style": "path",
    "ca_bundle": None, "access_key": None, "secret_key": None, "session_token": None,
    "connect_timeout": 10.0, "read_timeout": 60.0,
}
ADDRESSING_STYLES = ("path", "virtual", "auto")
SECRETS = ("secret_key", "session_token")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _bucket(name):
    """S3's bucket naming rules: 3-63 characters of lowercase letters, digits, dots and hyphens, starting and ending
    with a letter or digit, no '..', not an IP address."""
    name = str(name or "")
    ip = False
    try:
        ipaddress.IPv4Address(name)
        ip = True
    except ValueError:
        pass
    if not _BUCKET_RE.match(name) or ".." in name or ".-" in name or "-." in name or ip:
        raise ConfigError("object_store.bucket %r is not a valid bucket name: use 3 to 63 lowercase letters, digits, "
                          "dots and hyphens, starting and ending with a letter or digit." % (name,))
    return name


def normalize_object_store(obj: dict) -> dict:
    """object_store checked and completed with its defaults (ConfigError saying what to fix); nothing is contacted."""
    if not isinstance(obj, dict):
        raise ConfigError("object_store must be a dictionary with at least bucket.")
    unknown = set(obj) - set(OBJECT_STORE_DEFAULTS)
    if unknown:
        raise ConfigError("Unknown object_store option(s): %s." % ", ".join(sorted(unknown)))
    out = dict(OBJECT_STORE_DEFAULTS)
    out.update({k: v for k, v in obj.items() if v is not None})
    out["bucket"] = _bucket(out["bucket"])
    prefix = str(out["prefix"] or "").strip("/")
    if ".." in prefix.split("/") or "//" in prefix:
        raise ConfigError("object_store.prefix %r is not a valid prefix: use names separated by single '/', no '..'."
                          % (prefix,))
    out["prefix"] = prefix
    if out["addressing_style"] not in ADDRESSING_STYLES:
        raise ConfigError("object_store.addressing_style is %r: use one of %s." % (out["addressing_style"],
                                                                                   ", ".join(ADDRESSING_STYLES)))
    if out["endpoint_url"]:
        url = urllib.parse.urlsplit(str(out["endpoint_url"]))
        if url.scheme not in ("http", "https") or not url.hostname or url.username or url.password:
            raise ConfigError("object_store.endpoint_url %r is not an endpoint URL: give it as https://host[:port] (or "
                              "http:// for a test server), without credentials; omit it for AWS S3."
                              % (config.mask_userinfo(str(out["endpoint_url"])),))
        out["endpoint_url"] = str(out["endpoint_url"]).rstrip("/")
    if out["ca_bundle"] and not os.path.isfile(out["ca_bundle"]):
        raise ConfigError("object_store.ca_bundle %s does not exist: give the path of the PEM file of the CA that signed "
                          "the endpoint's certificate." % out["ca_bundle"])
    if bool(out["access_key"]) != bool(out["secret_key"]):
        raise ConfigError("object_store: give both access_key and secret_key, or neither (then the standard AWS "
                          "credential chain is used: environment, shared file, instance role).")
    if out["session_token"] and not out["access_key"]:
        raise ConfigError("object_store.session_token needs access_key and secret_key.")
    for f in ("connect_timeout", "read_timeout"):
        try:
            out[f] = float(out[f])
        except (TypeError, ValueError):
            out[f] = 0.0
        if out[f] <= 0:
            raise ConfigError("object_store.%s must be a positive number of seconds." % f)
    return out


def redact(obj: dict | None) -> dict | None:
    """A copy of object_store safe to show (secret_key and session_token replaced)."""
    if not obj:
        return obj
    out = copy.deepcopy(obj)
    for f in SECRETS:
        if out.get(f):
            out[f] = config.REDACTED
    return out


def _choose(store_path, object_store):
    if store_path and object_store:
        raise ConfigError("Give either store (a folder) or object_store (a bucket), not both.")


def open_storage(store_path: str | None = None, object_store: dict | None = None, data_dir: str | None = None,
                 create: bool = False, must_exist: bool = False) -> store.FileStorage | objectstore.S3Storage:
    """The Storage of a folder (store_path, else <data_dir>/store) or of a bucket (object_store).
    create: make a missing folder (0700). must_exist: StoreError when the folder is missing or the bucket does
    not answer to the credentials (naming endpoint and bucket and what to do)."""
    _choose(store_path, object_store)
    if object_store:
        from ansible_collections.kmipbackup.mongodb.plugins.module_utils import objectstore  # pylint: disable=import-outside-toplevel
        s = objectstore.S3Storage(**normalize_object_store(object_store))
        if must_exist:
            s.check_bucket()
        return s
    if not store_path:
        if not data_dir:
            raise ConfigError("No snapshot store: give store (a folder) or object_store (a bucket).")
        store_path = os.path.join(data_dir, "store")
    if create:
        files.ensure_private_dir(store_path)
    elif must_exist and not os.path.isdir(store_path):
        raise StoreError("The snapshot store %s does not exist: check the store path (or mount it)." % store_path)
    return store.FileStorage(store_path)


def check_object_store(object_store: dict) -> None:
    """StoreError (naming endpoint and bucket and what to do) unless the bucket answers to the credentials and its
    prefix holds a kmipbackup store or nothing else."""
    store.check_format(open_storage(object_store=object_store, must_exist=True))


def job_storage(cfg: dict, data_dir: str | None = None, create: bool = False,
                must_exist: bool = False) -> store.FileStorage | objectstore.S3Storage:
    """The Storage of a job's configuration: its object_store, else its store folder (else <data_dir>/store)."""
    if cfg.get("object_store"):
        return open_storage(object_store=cfg["object_store"], create=create, must_exist=must_exist)
    return open_storage(datadir.store_root(cfg, data_dir) if data_dir else cfg.get("store"), data_dir=data_dir,
                        create=create, must_exist=must_exist)


def job_store(cfg: dict, data_dir: str | None = None, **kw) -> store.JobStore:
    """The JobStore of a job's configuration (cfg["job"]) in its storage."""
    return store.JobStore(job_storage(cfg, data_dir, **kw), cfg["job"])


def describe(store_path: str | None = None, object_store: dict | None = None, data_dir: str | None = None) -> str:
    """The store for messages: its folder, or bucket, prefix and endpoint (never credentials)."""
    if object_store:
        where = "bucket %s" % object_store.get("bucket")
        if object_store.get("prefix"):
            where += " prefix %s" % str(object_store["prefix"]).strip("/")
        return where + " at %s" % (config.mask_userinfo(str(object_store.get("endpoint_url"))) if object_store.get("endpoint_url")
                                   else "AWS S3")
    return store_path or (os.path.join(data_dir, "store") if data_dir else "(no store)")


def describe_job(cfg: dict, data_dir: str | None = None) -> str:
    if cfg.get("object_store"):
        return describe(object_store=cfg["object_store"])
    return describe(datadir.store_root(cfg, data_dir) if data_dir else cfg.get("store"), data_dir=data_dir)
