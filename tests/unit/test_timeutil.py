"""timeutil: timestamps, polling and the one backoff every retry loop uses."""
import datetime

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import timeutil


def test_backoff_doubles_up_to_cap_and_resets():
    b = timeutil.Backoff(cap=30.0)
    assert [b.next() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    b.reset()
    assert b.next() == 1.0


def test_backoff_from_a_small_first_delay():
    """kmip's connect retries: 0.25 s doubled, at most 5 s (what min(5, 0.25 * 2 ** (attempt - 1)) gave)."""
    b = timeutil.Backoff(0.25, 5.0)
    assert [b.next() for _ in range(7)] == [min(5.0, 0.25 * 2 ** n) for n in range(7)]


def test_iso_round_trip_in_utc():
    t = datetime.datetime(2026, 11, 30, 9, 30, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    assert timeutil.iso(t) == "2026-11-30T07:30:05Z"
    assert timeutil.parse_iso(timeutil.iso(t)) == t


def test_wait_for_returns_the_last_value():
    calls = []
    assert timeutil.wait_for(lambda: calls.append(1) or len(calls) >= 3, 5, 0) is True
    assert timeutil.wait_for(lambda: None, 0) is None
