import datetime

import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import retention
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 11, 27, 18, 0, tzinfo=UTC)


def entry(dt, kind="scheduled", i=0):
    return {"snapshot_id": dt.strftime("%Y%m%dT%H%M%SZ") + "-%08x" % i, "created": dt.strftime("%Y-%m-%dT%H:%M:%SZ"), "type": kind}


def test_defaults_and_ranges():
    assert retention.validate_schedule({}) == retention.DEFAULT_SCHEDULE
    ok = retention.validate_schedule({"interval_hours": 24, "recent_days": 5, "daily_days": 365, "weekly_weeks": 52,
                                      "monthly_months": 36})
    assert ok["monthly_months"] == 36
    assert retention.validate_schedule({"daily_days": 0, "weekly_weeks": 0, "monthly_months": 0})["daily_days"] == 0
    assert retention.validate_schedule({"interval_hours": "12"})["interval_hours"] == 12


@pytest.mark.parametrize("field,value,needle", [
    ("interval_hours", 7, "interval_hours must be one of 6, 8, 12 or 24"),
    ("recent_days", 1, "recent_days must be between 2 and 5"),
    ("recent_days", 0, "recent_days must be between 2 and 5 (Ops Manager's snapshotRetentionDays; got 0)"),
    ("daily_days", 366, "daily_days must be between 1 and 365 or 0 to disable"),
    ("weekly_weeks", 53, "weekly_weeks must be between 1 and 52"),
    ("monthly_months", 37, "monthly_months must be between 1 and 36"),
    ("monthly_months", "many", "monthly_months must be a whole number"),
    ("daily_days", True, "daily_days must be a whole number"),
])
def test_out_of_range_messages(field, value, needle):
    with pytest.raises(ConfigError) as e:
        retention.validate_schedule({field: value})
    assert needle in str(e.value)


def test_unknown_field():
    with pytest.raises(ConfigError, match="Unknown snapshot schedule field"):
        retention.validate_schedule({"hourly": 1})


def test_due():
    s = {"interval_hours": 6}
    assert retention.due(NOW, None, s)
    assert not retention.due(NOW, entry(NOW - datetime.timedelta(hours=5, minutes=59)), s)
    assert retention.due(NOW, entry(NOW - datetime.timedelta(hours=6)), s)
    assert retention.due(NOW, NOW - datetime.timedelta(hours=7), s)


def test_select_retained_tiers():
    s = {"interval_hours": 6, "recent_days": 2, "daily_days": 7, "weekly_weeks": 4, "monthly_months": 13}
    entries = [entry(NOW - datetime.timedelta(hours=6 * i), i=i) for i in range(4 * 400)]  # 400 days every 6 h
    keep, expire = retention.select_retained(entries, s, NOW)
    assert len(keep) + len(expire) == len(entries)
    kept = {e["snapshot_id"] for e in keep}
    ages = sorted(NOW - retention._created(e) for e in keep)
    recent = [a for a in ages if a < datetime.timedelta(days=2)]
    assert len(recent) == 8  # all snapshots of the last 2 days
    assert all(a < datetime.timedelta(days=7) or retention._created(e).hour == 0 for e in keep
               for a in [NOW - retention._created(e)])
    assert max(ages) < datetime.timedelta(days=13 * 31)
    assert max(ages) > datetime.timedelta(days=360)  # a monthly one from about a year ago
    assert entries[0]["snapshot_id"] in kept
    assert len(keep) < 8 + 7 + 4 + 14


def test_newest_always_kept_and_on_demand_follows_daily():
    s = {"recent_days": 2, "daily_days": 3, "weekly_weeks": 0, "monthly_months": 0}
    old = [entry(NOW - datetime.timedelta(days=100 + i), i=i) for i in range(3)]
    keep, expire = retention.select_retained(old, s, NOW)
    assert [e["snapshot_id"] for e in keep] == [old[0]["snapshot_id"]] and len(expire) == 2
    od = [entry(NOW - datetime.timedelta(days=2, hours=12), "on-demand", 1), entry(NOW - datetime.timedelta(days=3, hours=1), "on-demand", 2),
          entry(NOW - datetime.timedelta(hours=1), "scheduled", 3)]
    keep, expire = retention.select_retained(od, s, NOW)
    assert [e["snapshot_id"] for e in expire] == [od[1]["snapshot_id"]]
    assert retention.select_retained([], s, NOW) == ([], [])


def test_expires():
    s = {"recent_days": 3, "daily_days": 9}
    assert retention.expires(NOW, "scheduled", s) == NOW + datetime.timedelta(days=3)
    assert retention.expires(NOW, "on-demand", s) == NOW + datetime.timedelta(days=9)
    assert retention.add_months(datetime.datetime(2026, 1, 31, tzinfo=UTC), 1).day == 28
