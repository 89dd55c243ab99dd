# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The data folder's layout (no Ansible imports). PRIVATE to the collection.

data_dir holds, per job: status/<job>.json (job_status), requests/<job>/ (job_requests),
heads/<job>/<generation>/ (the head and its key) and, unless the job names another, store/.
"""
from __future__ import annotations

import os
import shutil

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, files

DEFAULT_DATA_DIR = config.DEFAULT_DATA_DIR


def _job(job: str) -> str:
    return config.validate_name(job, "job name")


def status_path(data_dir: str, job: str) -> str:
    return os.path.join(data_dir, "status", _job(job) + ".json")


def requests_dir(data_dir: str, job: str) -> str:
    return os.path.join(data_dir, "requests", _job(job))


def heads_dir(data_dir: str, job: str) -> str:
    return os.path.join(data_dir, "heads", _job(job))


def head_dir(data_dir: str, job: str, generation: int) -> str:
    return os.path.join(heads_dir(data_dir, job), str(int(generation)))


def store_root(cfg: dict, data_dir: str) -> str:
    """The job's snapshot store folder: cfg's store, else <data_dir>/store."""
    return cfg.get("store") or os.path.join(data_dir, "store")


def open_data_dir(data_dir: str, daemon_user: str = config.DEFAULT_DAEMON_USER) -> files.Folder:
    """data_dir as a files.Folder for writing (checked as config.open_config_dir checks config_dir)."""
    return files.open_root(data_dir, "data_dir", files.trusted_owners(daemon_user))


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
