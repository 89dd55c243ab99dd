# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Private, atomic file handling for the core (no Ansible imports).

PRIVATE to the collection: it can change at any time.
Every file the system writes goes through here: 0600 files in 0700 folders, written to a
temporary file in the same folder, fsynced, renamed over the target, and the folder fsynced,
so a crash leaves either the old content or the new one.
"""
from __future__ import annotations

import json
import os
import tempfile

try:
    import yaml
except ImportError as e:  # PyYAML comes with ansible-core; the import sanity test runs without it
    yaml = None
    YAML_IMPORT_ERROR = e
else:
    YAML_IMPORT_ERROR = None

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def _inherit_owner(fd_or_path, folder):
    """As root, give a new file or folder the owner of the folder it is created in.

    The backup_daemon role makes the daemon's user own config_dir and data_dir; modules
    usually run as root. Inheriting the folder's owner keeps every file readable by the
    daemon without widening any mode.
    """
    if os.geteuid() != 0:
        return
    st = os.stat(folder)
    if isinstance(fd_or_path, int):
        os.fchown(fd_or_path, st.st_uid, st.st_gid)
    else:
        os.chown(fd_or_path, st.st_uid, st.st_gid)


def ensure_private_dir(path):
    """Create path (and parents) as 0700; tighten it if it exists with other modes.

    Folders created here take the owner of their parent (see _inherit_owner).
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        parent = os.path.dirname(path)
        if not os.path.exists(parent):
            ensure_private_dir(parent)
        try:
            os.mkdir(path, PRIVATE_DIR)
        except FileExistsError:
            pass
        else:
            _inherit_owner(path, parent)
    if os.stat(path).st_mode & 0o777 != PRIVATE_DIR:
        os.chmod(path, PRIVATE_DIR)
    return path


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, data, mode=PRIVATE_FILE):
    """Write bytes to path atomically with the given mode; the folder must exist.

    As root, the file takes the owner of its folder (see _inherit_owner)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.fchmod(fd, mode)
        _inherit_owner(fd, folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def dump_yaml(obj):
    return yaml.safe_dump(obj, default_flow_style=False, sort_keys=True).encode("utf-8")


def read_yaml(path, default=None):
    """The parsed YAML file at path, or default when it does not exist."""
    try:
        with open(path, "rb") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        return default


def write_yaml(path, obj, mode=PRIVATE_FILE):
    atomic_write(path, dump_yaml(obj), mode)


def write_json(path, obj, mode=PRIVATE_FILE):
    atomic_write(path, json.dumps(obj, sort_keys=True, indent=1).encode("utf-8"), mode)


def read_json(path, default=None):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return default
