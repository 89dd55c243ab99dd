# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Private, atomic file handling for the core (no Ansible imports).

PRIVATE to the collection: it can change at any time.
Every file the system writes goes through here: 0600 files in 0700 folders, written to a
temporary file in the same folder, fsynced, renamed over the target, and the folder fsynced,
so a crash leaves either the old content or the new one.

Privilege boundaries: modules run as root write into folders the daemon's user owns, so
inside a trusted root (config_dir, data_dir, the store) nothing is done by path. A Folder
is an open descriptor (O_DIRECTORY|O_NOFOLLOW); sub-folders are opened relative to it, files
are created, renamed, read and removed relative to it, and owner and mode are set with
fchown/fchmod on the new object's descriptor. A symbolic link planted where a folder or file
is expected is refused, never followed. New files and folders take the owner of the folder
they are created in (as root), so the daemon can read what a root-run module wrote; an explicit
owner and group are set afterwards with Folder.own (the modules' file_owner and file_group).
"""
from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import stat
from typing import Any

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import UnsafePathError

try:
    import yaml
except ImportError as e:  # PyYAML comes with ansible-core; the import sanity test runs without it
    yaml = None
    YAML_IMPORT_ERROR = e
else:
    YAML_IMPORT_ERROR = None

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def trusted_owners(daemon_user: str | int | None = None) -> set:
    """The uids that may own a trusted root: root, the user running this code, and daemon_user (a name or a uid)
    when it exists on this host."""
    owners = {0, os.geteuid()}
    if daemon_user is not None and daemon_user != "":
        if isinstance(daemon_user, int) or str(daemon_user).isdigit():
            owners.add(int(daemon_user))
        else:
            try:
                owners.add(pwd.getpwnam(daemon_user).pw_uid)
            except KeyError:
                pass
    return owners


def resolve_owner(owner: str | int | None = None, group: str | int | None = None) -> tuple[int, int]:
    """(uid, gid) of a user and a group given by name or number; -1 for one not given. UnsafePathError (nothing
    changed) for a name this host does not know."""
    def one(value, lookup, what):
        if value is None or value == "":
            return -1
        if isinstance(value, int) or str(value).isdigit():
            return int(value)
        try:
            return lookup(value)
        except KeyError:
            raise UnsafePathError("No %s %s on this host: give an existing %s (name or number)." % (what, value, what)) from None
    return (one(owner, lambda n: pwd.getpwnam(n).pw_uid, "user"), one(group, lambda n: grp.getgrnam(n).gr_gid, "group"))


def _user(uid):
    try:
        return "%s (uid %d)" % (pwd.getpwuid(uid).pw_name, uid)
    except KeyError:
        return "uid %d" % uid


def _check_name(name):
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError("not a single file name: %r" % (name,))
    return name


def _refuse_link(path, what):
    return UnsafePathError("%s %s is a symbolic link or not a %s: kmipbackup never follows links inside its folders; "
                           "remove it (or replace it with a real %s) and run again." % (what, path, what, what))


class Folder:
    """An open folder: every operation is relative to its descriptor, and no name given to it is followed as a
    symbolic link. Use as a context manager (or close()). owners: the uids trusted to own folders below it."""

    def __init__(self, fd: int, path: str, owners: set | None) -> None:
        self.fd, self.path = fd, path
        st = os.fstat(fd)
        self.uid, self.gid = st.st_uid, st.st_gid
        self.owners = set(owners) | {self.uid}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _inherit(self, fd):
        """As root, give a new file or folder (by its descriptor) this folder's owner."""
        if os.geteuid() == 0:
            os.fchown(fd, self.uid, self.gid)

    def own(self, name: str | None, uid: int, gid: int, check_mode: bool = False) -> bool:
        """Give file or folder name (None: this folder) owner uid and group gid (-1: leave it), through its descriptor,
        never through a link; True when that changes something (in check mode: would)."""
        fd = self.fd
        if name is not None:
            try:
                fd = os.open(_check_name(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise _refuse_link(os.path.join(self.path, name), "file") from None
                raise
        try:
            st = os.fstat(fd)
            if (uid in (-1, st.st_uid)) and (gid in (-1, st.st_gid)):
                return False
            if not check_mode:
                os.fchown(fd, uid, gid)
            return True
        finally:
            if fd != self.fd:
                os.close(fd)

    def sub(self, name: str, create: bool = True) -> Folder | None:
        """The sub-folder name as a Folder (created 0700 with this folder's owner when missing and create); None when
        missing and not create. A symbolic link, a file, or a folder owned by an untrusted user is refused."""
        path = os.path.join(self.path, _check_name(name))
        created = False
        if create:
            try:
                os.mkdir(name, PRIVATE_DIR, dir_fd=self.fd)
                created = True
            except FileExistsError:
                pass
        fd = _open_dir(name, self.fd, create, lambda: _refuse_link(path, "folder"))
        if fd is None:
            return None
        try:
            if created:
                self._inherit(fd)
            st = os.fstat(fd)
            if st.st_uid not in self.owners:
                raise UnsafePathError("Folder %s is owned by %s, not by root or the owner of %s: another user may have "
                                      "planted it; remove it and run again." % (path, _user(st.st_uid), self.path))
            if stat.S_IMODE(st.st_mode) != PRIVATE_DIR:
                os.fchmod(fd, PRIVATE_DIR)  # on the descriptor: this folder, never a link's target
            return Folder(fd, path, self.owners)
        except BaseException:
            os.close(fd)
            raise

    def walk(self, *names: str, create: bool = True) -> Folder | None:
        """The folder at names below this one (each opened as sub() does); None when missing and not create."""
        current = Folder(os.dup(self.fd), self.path, self.owners)
        for name in names:
            with current:
                current = current.sub(name, create)
            if current is None:
                return None
        return current

    def write(self, name: str, data: bytes, mode: int = PRIVATE_FILE) -> None:
        """Replace file name with data atomically (temp file, fsync, rename, folder fsync), mode set on the temp
        file's descriptor; a symbolic link at name is replaced, never followed."""
        _check_name(name)
        tmp = ".tmp-%s" % os.urandom(8).hex()  # not the name itself: a long name plus a prefix would pass 255 bytes
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE,
                     dir_fd=self.fd)
        try:
            os.fchmod(fd, mode)
            self._inherit(fd)
            with os.fdopen(fd, "wb") as f:
                fd = None
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            if fd is not None:
                os.close(fd)
            try:
                os.unlink(tmp, dir_fd=self.fd)
            except FileNotFoundError:
                pass
            raise
        os.fsync(self.fd)

    def read(self, name: str) -> bytes | None:
        """The bytes of file name, None when it does not exist; a symbolic link is refused."""
        try:
            fd = os.open(_check_name(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _refuse_link(os.path.join(self.path, name), "file") from None
            raise
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def exists(self, name: str) -> bool:
        try:
            os.stat(_check_name(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def unlink(self, name: str) -> bool:
        """Remove file name (a link itself, not its target); True when it existed."""
        try:
            os.unlink(_check_name(name), dir_fd=self.fd)
        except FileNotFoundError:
            return False
        os.fsync(self.fd)
        return True

    def listdir(self) -> list:
        return os.listdir(self.fd)


def _open_dir(name, dir_fd, create, refused):
    """A descriptor of folder name (relative to dir_fd when given), never through a link: refused() is raised for a
    link or a file there; None when it is missing and not create (FileNotFoundError with create)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise refused() from None
        raise


def open_root(path: str, what: str = "folder", owners: set | None = None, create: bool = True) -> Folder | None:
    """The trusted root folder path (config_dir, data_dir, a store) as a Folder, created 0700 when missing and create.

    Refused (UnsafePathError, nothing changed): a symbolic link or a file at path, a folder writable by its group
    or by others, or one owned by a user outside owners (default: trusted_owners()). Folders above path are the
    administrator's and are followed as they are. None when missing and not create."""
    path = os.path.abspath(path)
    owners = trusted_owners() if owners is None else set(owners)
    if create and not os.path.lexists(path):
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            os.makedirs(parent, PRIVATE_DIR, exist_ok=True)
        try:
            os.mkdir(path, PRIVATE_DIR)
        except FileExistsError:
            pass
    fd = _open_dir(path, None, create, lambda: UnsafePathError(
        "%s %s is a symbolic link or not a folder: give the real folder's path." % (what, path)))
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o022:
            raise UnsafePathError("%s %s is writable by its group or by others (mode %04o): other users could plant links "
                                  "in it. Make it private (chmod 0700 %s) and owned by root or the daemon's user, then run "
                                  "again; nothing was changed." % (what, path, stat.S_IMODE(st.st_mode), path))
        if st.st_uid not in owners:
            raise UnsafePathError("%s %s is owned by %s, not by root or the daemon's user: give it to one of them (chown), "
                                  "or set daemon_user to its owner if that is the daemon's user, then run again; nothing "
                                  "was changed (owners accepted here: %s)."
                                  % (what, path, _user(st.st_uid), ", ".join(_user(u) for u in sorted(owners))))
        if stat.S_IMODE(st.st_mode) != PRIVATE_DIR:
            os.fchmod(fd, PRIVATE_DIR)  # not writable by others (checked above): only read bits go
        return Folder(fd, path, owners)
    except BaseException:
        os.close(fd)
        raise


def _open_parent(folder):
    """folder (the parent of something a path-based caller writes) as a Folder; folder itself is followed."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return Folder(fd, folder, {0, os.geteuid()})


def ensure_private_dir(path: str) -> str | None:
    """Create path (and parents) as 0700; tighten it (through its descriptor) if it exists with other modes.

    Folders created here take the owner of their parent (as root). The last component is never followed: a symbolic
    link there is refused (UnsafePathError). Inside a trusted root prefer open_root(...).walk(...)."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if not name:
        return path
    if not os.path.isdir(parent):
        ensure_private_dir(parent)
    with _open_parent(parent) as f:
        f.sub(name).close()
    return path


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Write bytes to path atomically with the given mode; the folder must exist.

    As root, the file takes the owner of its folder; a symbolic link at path is replaced, not followed."""
    folder, name = os.path.split(os.path.abspath(path))
    with _open_parent(folder) as f:
        f.write(name, data, mode)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_nofollow(path):
    """The bytes at path, None when it does not exist; a symbolic link at path is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _refuse_link(path, "file") from None
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


def dump_yaml(obj: Any) -> bytes:
    return yaml.safe_dump(obj, default_flow_style=False, sort_keys=True).encode("utf-8")


def load_yaml(data: bytes | str | None, default: Any = None) -> Any:
    return default if data is None else yaml.safe_load(data)


def load_json(data: bytes | str | None, default: Any = None) -> Any:
    return default if data is None else json.loads(data)


def dump_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1).encode("utf-8")


def read_yaml(path: str, default: Any = None) -> Any:
    """The parsed YAML file at path, or default when it does not exist (a symbolic link is refused)."""
    return load_yaml(_read_nofollow(path), default)


def write_yaml(path: str, obj: Any, mode: int = PRIVATE_FILE) -> None:
    atomic_write(path, dump_yaml(obj), mode)


def write_json(path: str, obj: Any, mode: int = PRIVATE_FILE) -> None:
    atomic_write(path, dump_json(obj), mode)


def read_json(path: str, default: Any = None) -> Any:
    return load_json(_read_nofollow(path), default)
