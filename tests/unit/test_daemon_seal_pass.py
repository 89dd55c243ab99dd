"""The daemon's tick and its seal pass (daemon.JobRunner over a real SQLCipher head, a folder store and a local key
provider; no server): a tick starts a pass (and unwraps a key) only once the oldest closed segment's post-images are
built; a later tick collects it; any failure of a pass is reported and retried, never raised into what collects it."""
import os
import time

import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import daemon, segments, store
from pitr_overlap_helpers import T0, captured, segment_job, upd, wait_post_images_built


class _Daemon:  # what JobRunner reads of its daemon here
    def __init__(self, tmp_path):
        self.data_dir, self.config_dir = str(tmp_path / "data"), str(tmp_path / "config")
        os.makedirs(self.data_dir)


@pytest.fixture
def runner(tmp_path):
    job = segment_job(tmp_path)
    r = daemon.JobRunner(_Daemon(tmp_path), {"job": "job", "store": str(tmp_path / "store"), "encryption": True,
                                             "master_key_uid": "mk", "point_in_time_segment_seconds": 3600})
    r.head, r.kmip = job["head"], job["provider"]
    yield r, job["head"]
    r._close()  # pylint: disable=protected-access


def _closed_and_built(h, n):
    captured(h, [upd("big", (T0 + n, 1), n, {"pad": "x%d" % n})], (T0 + n, 1))
    assert segments.close(h) is not None
    wait_post_images_built(h)


def test_a_tick_starts_a_pass_only_for_built_post_images_and_a_later_tick_collects_it(runner, monkeypatch):
    r, h = runner
    _closed_and_built(h, 1)
    unwrapped = []
    key = store.Keys.key
    monkeypatch.setattr(store.Keys, "key", lambda self, key_id: unwrapped.append(key_id) or key(self, key_id))
    with monkeypatch.context() as m:
        m.setattr(h, "post_images_pending", lambda seg: True)
        for _n in range(3):
            r._segments_tick()  # pylint: disable=protected-access
        assert not r._sealer.busy() and unwrapped == [] and len(h.closed_segments()) == 1  # pylint: disable=protected-access
    r._segments_tick()  # pylint: disable=protected-access
    assert r._sealer.busy() and unwrapped  # pylint: disable=protected-access
    deadline = time.monotonic() + 60
    while r._sealer.busy() and time.monotonic() < deadline:  # pylint: disable=protected-access
        r._segments_tick()  # pylint: disable=protected-access
        time.sleep(0.01)
    assert h.closed_segments() == [] and r._seal_retry == 0.0  # pylint: disable=protected-access
    assert [s["seq"] for s in segments.list_segments(store.JobStore(str(r.cfg["store"]), "job"))] == [1]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), store.StoreError("the store is full")])
def test_a_failed_pass_is_reported_and_retried_never_raised_into_the_reset_that_collects_it(runner, monkeypatch, error):
    r, h = runner
    _closed_and_built(h, 1)

    def fail(*_args, **_kwargs):
        raise error
    monkeypatch.setattr(store.FileStorage, "put_atomic", fail)
    r._segments_tick()  # pylint: disable=protected-access
    assert r._sealer.busy()  # pylint: disable=protected-access
    r._reset_head()  # pylint: disable=protected-access  # a resync: collects the pass first, and goes on
    assert not r._sealer.busy() and r._seal_retry > time.monotonic()  # pylint: disable=protected-access
    assert type(error).__name__ in r.status["last_error"] or str(error) in r.status["last_error"], r.status["last_error"]
    assert "sealing change segments failed" in r.status["last_error"] and h.segment_state()["timeline"] is None
