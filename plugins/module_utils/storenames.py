# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Names and content hashes of the store format (no Ansible imports). PRIVATE to the collection.

What a writer (snapshot.py) and a reader (restore.py, store.py, the modules) must agree on without
opening the store: the shape of job, snapshot and chunk names, and a namespace's content hash.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import re

JOB_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
SNAPSHOT_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
CHUNK_RE = re.compile(r"^[0-9a-f]{64}$")


def new_snapshot_id(now: datetime.datetime) -> str:
    """<UTC time YYYYMMDDTHHMMSSZ>-<8 random hex digits>."""
    return now.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + os.urandom(4).hex()


def namespace_hash(chunks: list) -> str:
    """The content hash of a namespace: SHA-256 over its chunks' plaintext SHA-256s, in order."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(bytes(c["sha256"]))
    return h.hexdigest()
