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


def test_directory_restore_publishes_only_fsynced_files_and_folders(tmp_path, monkeypatch):
    """Every file and folder of a directory restore is fsynced before the one rename that publishes it."""
    import bson

    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import restore, snapshot
    from snapshot_helpers import LocalKeyProvider, make_head
    docs = {ns: [{"_id": i, "v": ns * 100} for i in range(50)] for ns in ("d.a", "d.b", "e.c")}
    h = make_head(str(tmp_path / "h" / "head.db"), docs, key=os.urandom(32))
    provider = LocalKeyProvider()
    provider.create("mk")
    js = store.JobStore(str(tmp_path / "store"), "job")
    keys = store.Keys(js, provider)
    e = snapshot.take_snapshot(h, js, keys, "job", "mk", True)
    h.close()
    log, fsync, replace = [], os.fsync, os.replace

    def rec_fsync(fd):
        log.append(("fsync", os.readlink("/proc/self/fd/%d" % fd)))
        fsync(fd)

    def rec_replace(src, dst, **kw):
        log.append(("replace", os.fspath(src), os.fspath(dst)))
        replace(src, dst, **kw)
    monkeypatch.setattr(os, "fsync", rec_fsync)
    monkeypatch.setattr(os, "replace", rec_replace)
    out = str(tmp_path / "out")
    restore.restore(js, e["snapshot_id"], keys, restore.DirectoryTarget(out))
    publish = [i for i, c in enumerate(log) if c[0] == "replace" and c[2] == out]
    assert len(publish) == 1
    tmp = log[publish[0]][1]
    synced = {c[1] for c in log[:publish[0]] if c[0] == "fsync"}
    written = {os.path.join(tmp, os.path.relpath(os.path.join(f, n), out)) for f, _d, names in os.walk(out) for n in names}
    folders = {os.path.join(tmp, os.path.relpath(f, out)).rstrip("/.") for f, _d, _n in os.walk(out)}
    info = os.path.join(tmp, restore.RESTORE_INFO)  # written by files.atomic_write: fsynced under a temporary name
    assert info in written and any(c[0] == "replace" and c[2] == restore.RESTORE_INFO for c in log[:publish[0]])
    written.discard(info)
    assert len(written) == 6 and written <= synced, sorted(written - synced)  # 3 x (.bson, .metadata.json)
    assert folders <= synced, sorted(folders - synced)
    # a folder's fsync that makes its files' names durable comes after they were all created (and fsynced)
    last = {c[1]: i for i, c in enumerate(log[:publish[0]]) if c[0] == "fsync"}
    for path in written:
        assert last[os.path.dirname(path)] > last[path], path
    for ns, want in docs.items():
        db, coll = ns.split(".")
        with open(os.path.join(out, db, coll + ".bson"), "rb") as f:
            assert f.read() == b"".join(bson.encode(d) for d in want)
