# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ops Manager's snapshot schedule and retention rules (no Ansible imports). PRIVATE to the collection.

snapshotIntervalHours 6|8|12|24; snapshotRetentionDays 2-5 (every snapshot younger is kept);
dailySnapshotRetentionDays 1-365, weeklySnapshotRetentionWeeks 1-52, monthlySnapshotRetentionMonths
1-36 (0 disables a tier): the first snapshot of each UTC day, ISO week or month is kept that long.
On-demand snapshots follow the daily retention. The newest snapshot is always kept.
"""
from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import timeutil
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError

if TYPE_CHECKING:  # annotations only: retention works on the JobStore and Keys it is given
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils.store import JobStore, Keys

INTERVALS = (6, 8, 12, 24)
RANGES = {
    "recent_days": (2, 5, "snapshotRetentionDays", False),
    "daily_days": (1, 365, "dailySnapshotRetentionDays", True),
    "weekly_weeks": (1, 52, "weeklySnapshotRetentionWeeks", True),
    "monthly_months": (1, 36, "monthlySnapshotRetentionMonths", True),
}
DEFAULT_SCHEDULE = {"interval_hours": 6, "recent_days": 2, "daily_days": 7, "weekly_weeks": 4, "monthly_months": 13}


def validate_schedule(schedule: dict | None) -> dict:
    """A complete, checked schedule dict (defaults filled in); ConfigError naming each bad field."""
    schedule = dict(schedule or {})
    unknown = sorted(set(schedule) - set(DEFAULT_SCHEDULE))
    if unknown:
        raise ConfigError("Unknown snapshot schedule field(s) %s: use %s." % (", ".join(unknown), ", ".join(sorted(DEFAULT_SCHEDULE))))
    out = dict(DEFAULT_SCHEDULE)
    out.update({k: v for k, v in schedule.items() if v is not None})
    problems = []
    for name, value in out.items():
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                if isinstance(value, bool) or int(str(value)) != float(str(value)):
                    raise ValueError
                out[name] = value = int(str(value))
            except ValueError:
                problems.append("%s must be a whole number (got %r)" % (name, value))
                continue
        if name == "interval_hours":
            if value not in INTERVALS:
                problems.append("interval_hours must be one of 6, 8, 12 or 24 as in Ops Manager (got %d)" % value)
            continue
        lo, hi, om_name, zero_ok = RANGES[name]
        if not (lo <= value <= hi or (zero_ok and value == 0)):
            problems.append("%s must be between %d and %d%s (Ops Manager's %s; got %d)"
                            % (name, lo, hi, " or 0 to disable" if zero_ok else "", om_name, value))
    if problems:
        raise ConfigError("Invalid snapshot schedule: %s. Fix the job's schedule." % "; ".join(problems))
    return out


def _created(entry):
    return timeutil.parse_iso(entry["created"])


def add_months(dt: datetime.datetime, months: int) -> datetime.datetime:
    y, m = divmod(dt.month - 1 + months, 12)
    year, month = dt.year + y, m + 1
    days = [31, 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    return dt.replace(year=year, month=month, day=min(dt.day, days[month - 1]))


def due(now: datetime.datetime, last_snapshot: dict | datetime.datetime | None, schedule: dict) -> bool:
    """True when a scheduled snapshot is due: none yet, or interval_hours passed since the last one.
    last_snapshot: a catalog entry, a datetime or None."""
    if last_snapshot is None:
        return True
    last = last_snapshot if isinstance(last_snapshot, datetime.datetime) else _created(last_snapshot)
    return now - last >= datetime.timedelta(hours=validate_schedule(schedule)["interval_hours"])


def expires(created: datetime.datetime, kind: str, schedule: dict) -> datetime.datetime | None:
    """When a new snapshot expires if no longer-lived tier keeps it (Ops Manager's "expires")."""
    s = validate_schedule(schedule)
    days = (s["daily_days"] or s["recent_days"]) if kind == "on-demand" else s["recent_days"]
    return created + datetime.timedelta(days=days)


def select_retained(entries: list, schedule: dict, now: datetime.datetime) -> tuple[list, list]:
    """(keep, expire): lists of catalog entries; the newest entry is always kept."""
    s = validate_schedule(schedule)
    entries = sorted(entries, key=lambda e: (e["created"], e["snapshot_id"]))
    if not entries:
        return [], []
    keep = set()
    first_of = {"day": {}, "week": {}, "month": {}}
    for e in entries:
        c = _created(e)
        age = now - c
        sid = e["snapshot_id"]
        if age < datetime.timedelta(days=s["recent_days"]):
            keep.add(sid)
        if e.get("type") == "on-demand":
            if age < datetime.timedelta(days=s["daily_days"] or s["recent_days"]):
                keep.add(sid)
            continue
        first_of["day"].setdefault(c.date(), (e, c))
        first_of["week"].setdefault(c.isocalendar()[:2], (e, c))
        first_of["month"].setdefault((c.year, c.month), (e, c))
    for e, c in first_of["day"].values():
        if now - c < datetime.timedelta(days=s["daily_days"]):
            keep.add(e["snapshot_id"])
    for e, c in first_of["week"].values():
        if now - c < datetime.timedelta(weeks=s["weekly_weeks"]):
            keep.add(e["snapshot_id"])
    for e, c in first_of["month"].values():
        if s["monthly_months"] and add_months(c, s["monthly_months"]) > now:
            keep.add(e["snapshot_id"])
    keep.add(entries[-1]["snapshot_id"])
    return [e for e in entries if e["snapshot_id"] in keep], [e for e in entries if e["snapshot_id"] not in keep]


def apply_retention(job_store: JobStore, schedule: dict, now: datetime.datetime, keys: Keys) -> list:
    """Delete the catalog entries retention expires (never the newest); returns their ids.

    Only authenticated live entries (checked against the catalog head) take part, so a planted entry cannot make a
    real one expire. JobStore.expire_snapshots rewrites the head without the expired entries before their files go,
    so a crash in between leaves entries the head no longer lists (refused if read, removed by the next run), never
    a head naming missing ones."""
    entries, _head = job_store.live_catalog(keys)
    if not entries:
        return []
    _keep, expire = select_retained(entries, schedule, now)
    gone = [e["snapshot_id"] for e in expire]
    job_store.expire_snapshots(gone, keys, now)
    return gone
