"""progress.py: rate and ETA over a window, estimates that were too low, the operator's line, the atomic record."""
import os
import stat
import time

import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import progress
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_rate_percent_and_eta_against_the_bytes_total():
    clock = Clock()
    m = progress.Meter(docs_total=1000, bytes_total=100_000, clock=clock)
    r = m.report()
    assert r["percent"] == 0.0 and r["eta_seconds"] is None and r["bytes_per_second"] == 0
    for _ in range(10):
        clock.t += 1
        m.add(20, 2_000)
    r = m.report()
    assert (r["docs"], r["bytes"], r["percent"]) == (200, 20_000, 20.0)
    assert r["bytes_per_second"] == 2_000 and r["docs_per_second"] == 20
    assert r["eta_seconds"] == 40 and r["elapsed_seconds"] == 10.0


def test_the_rate_follows_the_recent_window():
    clock = Clock()
    m = progress.Meter(bytes_total=10**9, clock=clock, window=10)
    for _ in range(30):  # 1 MB/s for 30 s, then 10 MB/s for 30 s
        clock.t += 1
        m.add(1, 10**6)
    for _ in range(30):
        clock.t += 1
        m.add(1, 10**7)
    r = m.report()
    assert 9 * 10**6 <= r["bytes_per_second"] <= 10**7
    assert r["eta_seconds"] == round((10**9 - r["bytes"]) / r["bytes_per_second"])
    f = m.final()
    assert f["seconds"] == 60 and f["bytes_per_second"] == round(330 * 10**6 / 60)


def test_past_a_low_estimate_and_without_totals():
    clock = Clock()
    m = progress.Meter(docs_total=10, bytes_total=100, clock=clock)
    clock.t += 2
    m.add(50, 5000)
    r = m.report()
    assert r["percent"] == 99.9 and r["eta_seconds"] == 0
    m = progress.Meter(clock=clock)
    clock.t += 2
    m.add(5, 500)
    r = m.report()
    assert r["percent"] is None and r["eta_seconds"] is None and r["bytes_per_second"] == 250
    m = progress.Meter(docs_total=100, clock=clock)  # no byte estimate: percent and ETA from the documents
    clock.t += 5
    m.add(25, 999)
    r = m.report()
    assert r["percent"] == 25.0 and r["eta_seconds"] == 15
    m.estimate(200, None)
    m.phase = "clone"
    r = m.report()
    assert r["percent"] == 12.5 and r["docs_total"] == 200 and r["phase"] == "clone"


def test_the_operators_line():
    r = {"docs": 1234, "bytes": 52_400_000, "docs_total": 5000, "bytes_total": 210_000_000, "percent": 25.0,
         "docs_per_second": 100, "bytes_per_second": 41_000_000, "eta_seconds": 3790, "elapsed_seconds": 1.0}
    assert progress.line("restore", r) == ("restore: 52.4 MB of 210.0 MB (25.0 %), 1234 document(s), 41.0 MB/s, "
                                           "about 1 h 03 min left")
    r.update(bytes_total=None, percent=None, eta_seconds=None, bytes=999, bytes_per_second=0)
    assert progress.line("snapshot", r) == "snapshot: 999 B, 1234 document(s), 0 B/s"
    assert progress.human_seconds(75) == "1 min 15 s" and progress.human_bytes(None) == "?"
    final = {"docs": 5000, "bytes": 80_110_000, "seconds": 4.216, "docs_per_second": 1186, "bytes_per_second": 19_001_423}
    assert progress.rate_line(final) == "80.1 MB and 5000 document(s) in 4.2 s: 19.0 MB/s, 1186 document(s)/s"


def test_the_record_is_written_atomically_in_a_private_folder(tmp_path):
    clock = Clock()
    path = str(tmp_path / "p" / "progress.json")
    m = progress.Meter(docs_total=10, bytes_total=1000, clock=clock)
    with progress.Record(path, "restore", m, every=0.05):
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        first = progress.read_record(path)
        assert first["state"] == "running" and first["seq"] == 1 and first["line"].startswith("restore: 0 B of 1.0 KB")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        clock.t += 6
        m.add(5, 500, 1)
        deadline = time.monotonic() + 10
        while (progress.read_record(path) or {}).get("bytes") != 500 and time.monotonic() < deadline:
            time.sleep(0.01)  # the record's thread rewrites it while the work runs, without being asked
        assert progress.read_record(path)["bytes"] == 500
    last = progress.read_record(path)
    assert last["state"] == "done" and last["seq"] >= 3 and last["seconds"] == 6 and last["bytes_per_second"] == 83
    assert last["chunks"] == 1 and "83 B/s" in last["line"]
    assert sorted(os.listdir(os.path.dirname(path))) == ["progress.json"]  # no temp file left
    assert progress.read_record(str(tmp_path / "none.json")) is None
    with pytest.raises(ValueError):
        with progress.Record(path, "restore", m):
            raise ValueError("boom")
    assert progress.read_record(path)["state"] == "failed"
    with progress.Record(path, "restore", m, remove=True):
        assert progress.read_record(path)["state"] == "running"
    assert not os.path.exists(path)


def test_a_shared_folder_is_refused_not_tightened(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(ConfigError, match="not a private folder"):
        progress.Record(str(shared / "progress.json"), "restore", progress.Meter())
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
