# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Time helpers (no Ansible imports). PRIVATE to the collection.

UTC timestamps as the store, status and request files write them (YYYY-MM-DDTHH:MM:SSZ), polling with
a deadline, and the one exponential backoff every retry loop uses.
"""
from __future__ import annotations

import datetime
import time
from typing import Any, Callable

ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso(dt: datetime.datetime) -> str:
    return dt.astimezone(datetime.timezone.utc).strftime(ISO_FORMAT)


def parse_iso(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, ISO_FORMAT).replace(tzinfo=datetime.timezone.utc)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Poll predicate() until it returns a truthy value or timeout seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class Backoff:
    """Exponential backoff: next() gives first, then twice the previous delay, at most cap; reset() starts over."""

    def __init__(self, first: float = 1.0, cap: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    def next(self) -> float:
        """The delay to wait now (the following one doubles, up to cap)."""
        delay = self.delay
        self.delay = min(delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.first
