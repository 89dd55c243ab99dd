# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Errors of the core (no Ansible imports). PRIVATE to the collection.

Every exception class of the core is here. Each message says what is wrong and what to do.
None carries key material, document content or, for encrypted jobs, namespace names.
The last few are signals between parts of the daemon, never shown to a user.
"""
from __future__ import annotations


class KmipBackupError(Exception):
    """Base class: a failure the user can understand and act on."""


class ConfigError(KmipBackupError):
    """Missing or invalid configuration (kmip.yml, groups, jobs, parameters)."""


class CertificateError(KmipBackupError):
    """A client certificate or key that cannot be used (kind says why)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


class KmipError(KmipBackupError):
    """A KMIP failure; kind is one of: unknown_ca, untrusted_server, bad_client_cert,
    no_client_auth, permission_denied, not_found, not_active, unreachable, hostname_mismatch,
    protocol."""

    def __init__(self, message: str, kind: str = "protocol", uid: str | None = None, servers: list | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.uid = uid
        self.servers = servers or []


class KeyInUseError(ConfigError):
    """A master key that a retained snapshot or a head key still needs cannot be retired."""

    kind = "key_in_use"

    def __init__(self, message: str, needed: dict) -> None:
        super().__init__(message)
        self.needed = needed


class SourceError(KmipBackupError):
    """The source deployment cannot be used (unreachable, auth, standalone, history lost)."""


class HistoryLostError(SourceError):
    """The change stream cannot resume from the stored point: a new initial sync is needed."""


class IntegrityError(KmipBackupError):
    """A store object failed authentication or does not match what references it."""

    def __init__(self, message: str, kind: str | None = None, object_id: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.object_id = object_id


class PointNotRestorable(KmipBackupError):
    """A point in time outside every restorable range, in a gap, or not a point in time at all; before/after name the
    nearest restorable times (ISO) when there are any."""

    def __init__(self, message: str, before: str | None = None, after: str | None = None) -> None:
        super().__init__(message)
        self.before = before
        self.after = after


class StoreError(KmipBackupError):
    """The snapshot store is missing, unreadable, or a snapshot is not there."""


class HeadError(KmipBackupError):
    """The head database cannot be opened or used (or a document in it cannot be keyed)."""


class SnapshotError(KmipBackupError):
    """A snapshot cannot be taken now (head not consistent, ...)."""


class RestoreError(KmipBackupError):
    """A restore that cannot proceed (target not empty, unreachable, ...)."""


class RestoreTimeout(RestoreError):
    """A restore that ran past its timeout: stopped between two chunks, the target put back as on a tampered chunk."""


class UnsafePathError(ConfigError):
    """A folder or file the system would write through is a symbolic link, writable by others, or owned by an
    untrusted user (config_dir, data_dir, the store)."""


# ---- signals (control flow inside the daemon, never shown to a user) -------------------------

class Stopped(Exception):
    """The job runner was asked to stop."""


class ResyncRequested(Exception):
    """A resync request: the job runner clears its head and starts a new initial sync."""


class NotApplicable(Exception):
    """The update does not fit the stored document: re-copy it instead of guessing."""


class UncertainOrder(Exception):
    """The update added several new fields to one document: their order is the server's choice (mongod 5.0+
    sorts them by name, other servers keep the update's order) and the event does not carry it. The result
    is right but for that order, so the document is re-copied instead of trusted."""
