"""FileStorage.put_atomic(sync=False): files are written under temporary names and published in batches. The order
of the system calls is the durability guarantee (a name only for a file whose data is fsynced; sync() returns only
once names and folders are durable), so these tests record the real os calls (they still run) and check that order."""
import os

import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import store


@pytest.fixture
def calls(monkeypatch):
    """[(call, path)] of os.fsync (of files), os.replace and store.fsync_dir, in order (each still runs)."""
    log = []
    fsync, replace, fsync_dir = os.fsync, os.replace, store.fsync_dir

    def rec_fsync(fd):
        path = os.readlink("/proc/self/fd/%d" % fd)
        if not os.path.isdir(path):  # a folder's fsync is logged as fsync_dir
            log.append(("fsync", path))
        fsync(fd)

    def rec_replace(src, dst, **kw):
        log.append(("replace", dst))
        replace(src, dst, **kw)

    def rec_fsync_dir(path):
        log.append(("fsync_dir", path))
        fsync_dir(path)
    monkeypatch.setattr(os, "fsync", rec_fsync)
    monkeypatch.setattr(os, "replace", rec_replace)
    monkeypatch.setattr(store, "fsync_dir", rec_fsync_dir)
    return log


def test_batched_files_get_their_names_only_after_their_fsync(tmp_path, calls, monkeypatch):
    monkeypatch.setattr(store, "BATCH_BYTES", 3000)
    fs = store.FileStorage(str(tmp_path))
    paths = ["j/chunks/%02x/c%d" % (i, i) for i in range(5)]
    for i, p in enumerate(paths[:2]):
        fs.put_atomic(p, bytes([i]) * 1000, sync=False)
    # below the batch size: nothing named yet, the data only under temporary names (which list() leaves out)
    assert not any(fs.exists(p) for p in paths[:2]) and calls == []
    assert fs.list_tree("j") == []
    fs.put_atomic(paths[2], b"\x02" * 1000, sync=False)  # the batch is full: fsynced, then named
    full = [os.path.join(str(tmp_path), p) for p in paths]
    fsynced = {os.path.dirname(path) for kind, path in calls if kind == "fsync"}
    assert [c for c in calls if c[0] == "replace"] == [("replace", f) for f in full[:3]]
    assert len([c for c in calls if c[0] == "fsync"]) == 3 and fsynced == {os.path.dirname(f) for f in full[:3]}
    assert max(i for i, c in enumerate(calls) if c[0] == "fsync") < min(i for i, c in enumerate(calls) if c[0] == "replace")
    del calls[:]
    for i, p in enumerate(paths[3:], 3):
        fs.put_atomic(p, bytes([i]) * 1000, sync=False)
    assert not fs.exists(paths[3])
    fs.sync(paths)  # the rest of the batch, then every folder
    kinds = [c[0] for c in calls]
    assert kinds == ["fsync", "fsync", "replace", "replace"] + ["fsync_dir"] * 5, calls
    for i, p in enumerate(paths):
        assert fs.get(p) == bytes([i]) * 1000
    assert [n for _f, _d, names in os.walk(str(tmp_path)) for n in names if ".tmp" in n] == []


def test_a_failed_fsync_names_nothing_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    fs = store.FileStorage(str(tmp_path))
    fs.put_atomic("j/a", b"a" * 10, sync=False)
    fs.put_atomic("j/b", b"b" * 10, sync=False)

    def failing(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        fs.sync(["j/a", "j/b"])
    assert os.listdir(str(tmp_path / "j")) == []
