"""job_config.py parameter checks that need no server."""
import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import job_config
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError


def test_password_in_uri_is_refused_without_echoing_it():
    with pytest.raises(ConfigError) as e:
        job_config.normalize_source({"uri": "mongodb://backup:s3cret-canary@db1:27017/?replicaSet=rs0"})
    assert "source.password" in str(e.value)
    assert "s3cret-canary" not in str(e.value)


def test_user_without_password_in_uri_is_accepted():
    out = job_config.normalize_source({"uri": "mongodb://backup@db1:27017/?replicaSet=rs0", "password": "x"})
    assert out["uri"].startswith("mongodb://backup@db1")


@pytest.mark.parametrize("schedule, field", [
    ({"interval_hours": 7}, "interval_hours"),
    ({"recent_days": 6}, "recent_days"),
    ({"monthly_months": 37}, "monthly_months"),
])
def test_schedule_out_of_range(schedule, field):
    with pytest.raises(ConfigError) as e:
        job_config.normalize_schedule(schedule)
    assert field in str(e.value)


def test_create_false_without_uid_refused_before_any_kmip_call():
    calls = []

    class NoKmip:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __getattr__(self, name):
            calls.append(name)
            raise AssertionError("no KMIP operation expected, got %s" % name)

    params = {"job": "j1", "group": "g1", "source": {"uri": "mongodb://127.0.0.1:1/?replicaSet=rs"},
              "master_key": {"create": False}, "config_dir": "/nonexistent", "data_dir": "/nonexistent"}
    with pytest.raises(ConfigError) as e:
        job_config.plan_job(params, None, lambda source: None, kmip_factory=NoKmip)  # about the key rule, not the source
    assert "master_key.uid" in str(e.value) and calls == []
