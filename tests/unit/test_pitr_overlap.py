"""The fast path of a point-in-time restore (point_in_time: the replay in a spawned process, pitr_replay, while
restore.execute restores the base's untouched chunks): through real sealed segments, it must restore byte for byte what
the sequential path (a temporary head) restores and what the capture's own head held at the point, to a directory and
an archive, with include/exclude; a DDL event in the window takes the sequential path (and says why); a replay process
killed or stopped (hung) before or mid-way, or one whose totals do not add up, fails the restore with the target put
back; a tampered segment is named before anything of it reaches the replay process (the first: before it is sent
anything) and before anything is written; the
replay process is a fresh interpreter given no key; no plaintext in the restore's temporary files. Real SQLCipher
heads, a folder store, a local key provider."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import pitr_replay, point_in_time, restore, segments
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError, RestoreError, RestoreTimeout
from pitr_overlap_helpers import CANARY, build_lab
from snapshot_helpers import canary_hits, read_archive, restored_dir


def files(out):
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _s, fs in os.walk(out) for f in fs if f != restore.RESTORE_INFO}


def info(path):
    return [line for line in open(path).read().splitlines() if not line.startswith("Restored:")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = build_lab(tmp_path_factory.mktemp("overlap"))
    yield lab
    lab["head"].close()


def restore_point(lab, point, out, overlap=True, target="directory", **select):
    js, keys = lab["js"], lab["keys"]
    plan = segments.plan_point(js, keys, point)
    with point_in_time.rebuild(js, keys, plan, work_dir=str(lab["tmp"]), overlap=overlap) as image:
        selected = restore.select_namespaces(image.manifest, **select)
        t = restore.DirectoryTarget(out) if target == "directory" else restore.ArchiveTarget(out)
        summary = restore.execute(image.store, keys, image.entry, selected, t)
        return image, summary


def test_fast_path_restores_what_the_head_held_and_what_the_sequential_path_restores(lab):
    images, tmp = lab["images"], lab["tmp"]
    for k, point in enumerate(sorted(p for p in images if p < lab["ddl"])):
        fast, summary = restore_point(lab, point, str(tmp / ("fast%d" % k)))
        slow, summary_slow = restore_point(lab, point, str(tmp / ("slow%d" % k)), overlap=False)
        assert (fast.path, fast.why, slow.path, slow.why) == ("overlap", None, "sequential", "overlap is off"), fast.why
        assert restored_dir(str(tmp / ("fast%d" % k))) == {ns: docs for ns, docs in images[point].items() if docs}, point
        assert files(str(tmp / ("fast%d" % k))) == files(str(tmp / ("slow%d" % k)))  # metadata too, byte for byte
        # restoreInfo (documents, bytes of the whole image) and the summary: as the sequential path's
        assert info(str(tmp / ("fast%d" % k) / restore.RESTORE_INFO)) == info(str(tmp / ("slow%d" % k) / restore.RESTORE_INFO))
        assert {x: summary[x] for x in ("documents", "bytes", "snapshot_id")} == {
            x: summary_slow[x] for x in ("documents", "bytes", "snapshot_id")}
        # each segment that ends by the point is applied by its post-images (the head's documents at its end), the
        # sequential path replays its events: both give the head's image above. The fast path reads only the
        # post-images of those segments: it replays the events of the point's segment alone
        plan = segments.plan_point(lab["js"], lab["keys"], point)
        by_posts = {s["name"] for s in plan["segments"] if tuple(s["to"]) <= point}
        parts = [(s["name"] in by_posts, [bytes(r[2]) for r in recs])
                 for s, recs in segments.window_parts(plan, segments.read_segments(lab["js"], lab["keys"], plan["segments"]))]
        assert fast.replayed == {"post_images": len(by_posts), "segments": slow.replayed["segments"],
                                 "events": sum(1 for posts, raws in parts if not posts for r in raws if not segments.is_correction(r)),
                                 "records": sum(sum(1 for r in raws if segments.is_post(r)) if posts else len(raws) for posts, raws in parts)}
        assert slow.replayed["events"] == sum(1 for _p, raws in parts for r in raws if not segments.is_correction(r))
        assert fast.loaded_chunks <= slow.loaded_chunks + 1
        assert [(n["count"], n["hash"]) for n in fast.manifest["namespaces"]] == [
            (n["count"], n["hash"]) for n in slow.manifest["namespaces"]]
    point = max(p for p in images if p < lab["ddl"])
    # an archive, byte for byte (its prelude's sizes are known only at the end); include/exclude
    restore_point(lab, point, str(tmp / "fast.archive"), target="archive")
    restore_point(lab, point, str(tmp / "slow.archive"), overlap=False, target="archive")
    assert open(str(tmp / "fast.archive"), "rb").read() == open(str(tmp / "slow.archive"), "rb").read()
    _h, _c, docs, _crc = read_archive(str(tmp / "fast.archive"))
    assert docs["d.big"] == images[point]["d.big"]
    out = str(tmp / "some")
    image, summary = restore_point(lab, point, out, include=["d.*"], exclude=["d.quiet"])
    assert image.path == "overlap" and summary["namespaces"] == 2
    assert restored_dir(out) == {ns: images[point][ns] for ns in ("d.big", "d.types")}
    slow_out = str(tmp / "some-slow")
    restore_point(lab, point, slow_out, overlap=False, include=["d.*"], exclude=["d.quiet"])
    assert info(os.path.join(out, restore.RESTORE_INFO)) == info(os.path.join(slow_out, restore.RESTORE_INFO))
    assert canary_hits(str(tmp / "store"), CANARY) == []
    assert not [p for p in tmp.iterdir() if p.name.startswith("kmipbackup-pitr-")]  # the fast path writes no temporary head


def test_a_ddl_event_in_the_window_takes_the_sequential_path(lab):
    out = str(lab["tmp"] / "ddl")
    image, _s = restore_point(lab, lab["ddl"], out)
    assert image.path == "sequential" and "other than insert" in image.why
    assert restored_dir(out) == {ns: docs for ns, docs in lab["images"][lab["ddl"]].items() if docs}


def test_a_killed_replay_process_fails_the_restore_and_writes_nothing(lab):
    js, keys, tmp = lab["js"], lab["keys"], lab["tmp"]
    point = max(p for p in lab["images"] if p < lab["ddl"])
    plan = segments.plan_point(js, keys, point)
    out = str(tmp / "killed")
    with point_in_time.rebuild(js, keys, plan, work_dir=str(tmp)) as image:
        assert image.path == "overlap"
        os.kill(image.child_pid, signal.SIGKILL)  # blocked on its pipe: 1.2 MB of inserts past the end are not read yet
        with pytest.raises(RestoreError, match="killed by signal 9"):
            restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest), restore.DirectoryTarget(out))
    assert not os.path.exists(out) and [p.name for p in tmp.iterdir() if p.name.startswith(".killed")] == []
    archive = str(tmp / "killed.archive")
    with point_in_time.rebuild(js, keys, plan, work_dir=str(tmp)) as image:
        os.kill(image.child_pid, signal.SIGKILL)
        with pytest.raises(RestoreError, match="killed by signal 9"):
            restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest), restore.ArchiveTarget(archive))
    assert not os.path.exists(archive) and not os.path.exists(archive + "." + restore.RESTORE_INFO)


def test_a_replay_process_whose_totals_do_not_add_up_is_refused(lab, monkeypatch):
    real = pitr_replay.combine  # the parent's side: the child (another interpreter) claims the real combination
    monkeypatch.setattr(pitr_replay, "combine", lambda crcs: real(crcs) ^ 1)
    out = str(lab["tmp"] / "lies")
    with pytest.raises(IntegrityError, match="does not add up"):
        restore_point(lab, max(p for p in lab["images"] if p < lab["ddl"]), out)
    assert not os.path.exists(out)


@pytest.mark.parametrize("seen", [lambda offs: None, lambda offs: offs[:-1]], ids=["not-documents", "one-fewer"])
def test_a_range_whose_documents_are_not_what_the_replay_process_counts_is_refused(lab, monkeypatch, seen):
    """The parent walks each range it receives: data that does not split into documents, or holds another number of
    them than the child says, is refused before anything of it is written (the parent's walk stands for what a
    faulty child would send)."""
    real = point_in_time.doc_offsets
    monkeypatch.setattr(point_in_time, "doc_offsets", lambda data: seen(real(data)))
    out = str(lab["tmp"] / ("miscounted-%d" % len(os.listdir(str(lab["tmp"])))))
    with pytest.raises(IntegrityError, match="do not match what the replay process says"):
        restore_point(lab, max(p for p in lab["images"] if p < lab["ddl"]), out)
    assert not os.path.exists(out)


def flip_a_byte(path):
    """Flip one bit of a stored object near its end (its ciphertext or tag); its original bytes are returned."""
    saved = open(path, "rb").read()
    blob = bytearray(saved)
    blob[-30] ^= 1
    open(path, "wb").write(bytes(blob))
    return saved


def test_a_tampered_segment_is_named_before_anything_is_sent_or_written(lab, monkeypatch):
    RecordingPopen.seen = []
    monkeypatch.setattr(point_in_time.subprocess, "Popen", RecordingPopen)
    segs = segments.list_segments(lab["js"])
    path = os.path.join(str(lab["tmp"] / "store"), "job", "segments", segs[0]["name"])
    saved = flip_a_byte(path)
    out = str(lab["tmp"] / "tampered")
    try:
        with pytest.raises(IntegrityError, match=segs[0]["name"]):
            restore_point(lab, max(p for p in lab["images"] if p < lab["ddl"]), out)
    finally:
        open(path, "wb").write(saved)
    assert not os.path.exists(out)
    (_args, _kw, sent), = RecordingPopen.seen  # started early, stopped unsent
    assert sent == []


def test_a_tampered_later_segment_is_named_and_none_of_it_reaches_the_replay_process(lab, monkeypatch):
    """The segments are pre-scanned as they are read, so the child gets the parts of the segments that authenticated
    before a later one fails: that one is named, nothing of it reaches the child, the child is stopped and reaped, and
    nothing is written."""
    RecordingPopen.seen, RecordingPopen.procs = [], []
    monkeypatch.setattr(point_in_time.subprocess, "Popen", RecordingPopen)
    added, real_add = [], point_in_time._Fast.add
    monkeypatch.setattr(point_in_time._Fast, "add", lambda fast, records: (added.append(len(records)), real_add(fast, records))[1])
    js, keys = lab["js"], lab["keys"]
    point = max(p for p in lab["images"] if p < lab["ddl"])
    plan = segments.plan_point(js, keys, point)
    assert len(plan["segments"]) >= 2
    last = plan["segments"][-1]
    read = list(segments.read_segments(js, keys, plan["segments"]))  # before the tampering: each segment's records
    earlier = [bytes(raw) for _s, recs in read[:-1] for _t, _i, raw in recs]
    its = [bytes(raw) for _t, _i, raw in read[-1][1]]
    assert its and not set(its) & set(earlier)
    saved = flip_a_byte(os.path.join(str(lab["tmp"] / "store"), "job", "segments", last["name"]))
    out = str(lab["tmp"] / "tampered-later")
    try:
        with pytest.raises(IntegrityError, match=last["name"]):
            restore_point(lab, point, out)
    finally:
        open(os.path.join(str(lab["tmp"] / "store"), "job", "segments", last["name"]), "wb").write(saved)
    assert not os.path.exists(out)
    assert len(added) == len(read) - 1 and sum(added) > 0  # the segments before it were pre-scanned as they came
    (_args, _kw, sent), = RecordingPopen.seen
    given = b"".join(sent)
    assert not any(raw in given for raw in its)
    proc, = RecordingPopen.procs
    assert proc.returncode is not None  # stopped and reaped


def test_a_tampered_touched_base_chunk_is_named_and_nothing_is_written(lab):
    js, keys = lab["js"], lab["keys"]
    manifest = js.read_manifest(lab["base"]["snapshot_id"], keys)
    big = [n for n in manifest["namespaces"] if n["ns"] == "d.big"][0]
    cid = big["chunks"][0]["id"]  # holds _id 10, which the window updates: fed to the replay process by the parent
    path = [os.path.join(d, f) for d, _s, fs in os.walk(str(lab["tmp"] / "store")) for f in fs if f == cid][0]
    saved = flip_a_byte(path)
    out = str(lab["tmp"] / "bad-base")
    try:
        with pytest.raises(IntegrityError, match=cid):
            restore_point(lab, max(p for p in lab["images"] if p < lab["ddl"]), out)
    finally:
        open(path, "wb").write(saved)
    assert not os.path.exists(out)


def test_a_fallback_found_by_the_parent_stops_the_replay_process(lab, monkeypatch):
    monkeypatch.setattr(pitr_replay, "prescan", lambda raws, manifest: (None, "the parent's half says no"))  # the parent's only
    point = max(p for p in lab["images"] if p < lab["ddl"])
    out = str(lab["tmp"] / "parent-fallback")
    image, _s = restore_point(lab, point, out)
    assert (image.path, image.why) == ("sequential", "the parent's half says no")
    assert restored_dir(out) == {ns: docs for ns, docs in lab["images"][point].items() if docs}


def test_a_replay_process_that_cannot_start_leaves_the_restore_to_the_sequential_path(lab, monkeypatch):
    """A child that fails before its pre-scan (here: its bootstrap exits at once, as a failed import would) has been
    sent nothing but the layout and records, and nothing was written: the sequential path restores, and says why."""
    monkeypatch.setattr(pitr_replay, "BOOTSTRAP", "import os; os._exit(3)")
    point = max(p for p in lab["images"] if p < lab["ddl"])
    out = str(lab["tmp"] / "no-child")
    image, _s = restore_point(lab, point, out)
    assert (image.path, image.why) == ("sequential", "the replay process failed before its pre-scan: the replay process "
                                                      "ended without its result: exit status 3")
    assert restored_dir(out) == {ns: docs for ns, docs in lab["images"][point].items() if docs}


def test_a_window_larger_than_the_fast_paths_memory_streams_sequentially(lab, monkeypatch):
    """Past FAST_WINDOW_BYTES of change records the fast path (which holds the window in memory) is not taken: the
    rest of the segments stream into the sequential replay, with the same result."""
    point = max(p for p in lab["images"] if p < lab["ddl"])
    monkeypatch.setattr(point_in_time, "FAST_WINDOW_BYTES", 1)
    out = str(lab["tmp"] / "capped")
    image, _summary = restore_point(lab, point, out)
    assert image.path == "sequential" and "MiB of changes" in image.why
    assert restored_dir(out) == {ns: docs for ns, docs in lab["images"][point].items() if docs}


def test_a_slow_store_read_of_a_touched_base_chunk_is_not_taken_for_a_silent_replay_process(lab, monkeypatch):
    """The child waits for the base chunks the parent reads from the store: while such a read is slow (here 2 s, four
    times the child's timeout), the child's silence is the store's, so the restore waits instead of killing it."""
    js, tmp = lab["js"], lab["tmp"]
    fasts, slow = [], []
    real_feed, real_read = point_in_time._Fast._feed, js.read_chunk

    def feed(fast, loads):
        fast.timeout = 0.5  # made short only now: a loaded machine may be slow to start the child
        fasts.append(fast)
        return real_feed(fast, loads)

    def read_chunk(entry, keys_):
        data = real_read(entry, keys_)
        if threading.current_thread().name.startswith("kmipbackup-pitr") and not slow:
            slow.append(entry["id"])
            time.sleep(2)
            fasts[0].timeout = 60  # past the slow read: a loaded machine may be slow to replay
        return data
    monkeypatch.setattr(point_in_time._Fast, "_feed", feed)
    monkeypatch.setattr(js, "read_chunk", read_chunk)
    point = max(p for p in lab["images"] if p < lab["ddl"])
    out = str(tmp / "slow-store")
    image, _summary = restore_point(lab, point, out)
    assert image.path == "overlap" and slow and fasts
    assert restored_dir(out) == {ns: docs for ns, docs in lab["images"][point].items() if docs}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_a_replay_process_killed_or_hung_mid_stream_fails_the_restore_and_the_target_is_put_back(lab, monkeypatch, sig):
    """After the child sent its first range (1.2 MB of inserts past the end are still to come): killed, the restore
    names its signal; stopped (hung), the parent gives up after its timeout (rebuild's child_timeout, lowered to 0.5 s
    once the child is stopped), kills it and says so. Either way the target is put back, and the child is gone."""
    js, keys, tmp = lab["js"], lab["keys"], lab["tmp"]
    real = point_in_time._Fast._message

    def message(fast):
        out = real(fast)
        if not signalled and out[0] == pitr_replay._PART:  # pylint: disable=protected-access
            # at the first range's first part: the parent then reads at most a pipe's worth (64 KiB) more, so it cannot
            # reach the child's result whatever order the restore asks for the ranges in (signalled after a whole range,
            # a loaded run once read on to the result first)
            os.kill(fast.pid, sig)
            signalled.append(out[1:3])
            fast.timeout = 0.5  # rebuild's child_timeout, made short only now: a loaded machine may be slow before
        return out
    monkeypatch.setattr(point_in_time._Fast, "_message", message)
    signalled = []
    plan = segments.plan_point(js, keys, max(p for p in lab["images"] if p < lab["ddl"]))
    for target in ("directory", "archive"):
        del signalled[:]
        out = str(tmp / ("mid-stream-%d-%s" % (sig, target)))
        t = restore.DirectoryTarget(out) if target == "directory" else restore.ArchiveTarget(out)
        with point_in_time.rebuild(js, keys, plan, work_dir=str(tmp), child_timeout=60) as image:
            assert image.path == "overlap" and image.store.fast.timeout == 60
            want = "killed by signal 9" if sig == signal.SIGKILL else r"sent nothing for 0\.5 s and was stopped \(killed by signal 9\)"
            with pytest.raises(RestoreError, match=want):
                restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest), t)
            assert signalled
            with pytest.raises(ProcessLookupError):
                os.kill(image.child_pid, 0)  # reaped
        assert not os.path.exists(out) and not [p for p in tmp.iterdir() if p.name.startswith(".mid-stream")]
        assert not os.path.exists(out + "." + restore.RESTORE_INFO)


def test_a_hung_replay_process_does_not_hold_the_restore_past_its_timeout(lab, monkeypatch):
    """The restore's own timeout (restore_request passes its deadline to rebuild) bounds every wait on the replay
    process, not only the gaps between runs: a child stopped after its first range, with the deadline passing 0.5 s
    later and the per-message timeout at 60 s, ends the restore with RestoreTimeout at the deadline; the child is
    killed and the target put back."""
    js, keys, tmp = lab["js"], lab["keys"], lab["tmp"]
    real, stopped = point_in_time._Fast._message, []

    def message(fast):
        out = real(fast)
        if not stopped and out[0] == pitr_replay._PART:  # pylint: disable=protected-access  # as in the test above
            os.kill(fast.pid, signal.SIGSTOP)
            stopped.append(time.monotonic())
            fast.deadline = (stopped[0] + 0.5, 7)  # set only now: a loaded machine may be slow before
        return out
    monkeypatch.setattr(point_in_time._Fast, "_message", message)
    plan = segments.plan_point(js, keys, max(p for p in lab["images"] if p < lab["ddl"]))
    out = str(tmp / "past-deadline")
    with point_in_time.rebuild(js, keys, plan, work_dir=str(tmp), child_timeout=60, deadline=(time.monotonic() + 3600, 3600)) as image:
        assert image.path == "overlap" and image.store.fast.deadline[1] == 3600
        with pytest.raises(RestoreTimeout, match=r"ran past its timeout of 7 s"):
            restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest), restore.DirectoryTarget(out))
        assert stopped and time.monotonic() - stopped[0] < 30  # at the deadline, not after the 60 s message timeout
        with pytest.raises(ProcessLookupError):
            os.kill(image.child_pid, 0)  # killed and reaped
    assert not os.path.exists(out) and not os.path.exists(out + "." + restore.RESTORE_INFO)


def test_a_store_read_that_hangs_does_not_hold_the_restore_past_its_timeout(lab, monkeypatch):
    """A touched base chunk whose store read outlasts the restore's deadline (here 6 s against 1 s): the restore ends
    with RestoreTimeout at the deadline, not when the read returns, the child is killed and the target put back."""
    js, keys, tmp = lab["js"], lab["keys"], lab["tmp"]
    real_read, fasts, slow = js.read_chunk, [], []
    real_feed = point_in_time._Fast._feed

    def feed(fast, loads):
        fast.deadline = (time.monotonic() + 1, 9)  # set only now: a loaded machine may be slow to start the child
        fasts.append(fast)
        return real_feed(fast, loads)

    def read_chunk(entry, keys_):
        if threading.current_thread().name.startswith("kmipbackup-pitr") and not slow:
            slow.append(time.monotonic())
            time.sleep(6)
        return real_read(entry, keys_)
    monkeypatch.setattr(point_in_time._Fast, "_feed", feed)
    monkeypatch.setattr(js, "read_chunk", read_chunk)
    plan = segments.plan_point(js, keys, max(p for p in lab["images"] if p < lab["ddl"]))
    out = str(tmp / "hung-store")
    with point_in_time.rebuild(js, keys, plan, work_dir=str(tmp), child_timeout=60, deadline=(time.monotonic() + 3600, 3600)) as image:
        assert image.path == "overlap"
        with pytest.raises(RestoreTimeout, match=r"ran past its timeout of 9 s"):
            restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest), restore.DirectoryTarget(out))
        assert slow and time.monotonic() - fasts[0].deadline[0] < 3  # at the deadline, not when the read returns
    assert time.monotonic() - fasts[0].deadline[0] < 3  # leaving the context does not wait for the read either
    with pytest.raises(ProcessLookupError):
        os.kill(image.child_pid, 0)  # killed and reaped
    assert not os.path.exists(out) and not os.path.exists(out + "." + restore.RESTORE_INFO)


@pytest.mark.parametrize("how", ["ddl", "cap"])
def test_the_pre_scan_is_not_held_through_a_sequential_replay(lab, monkeypatch, how):
    """When the fast path is given up after some segments were pre-scanned (a DDL event, the memory cap), what the
    parent pre-scanned is dropped with the replay process, not held while the sequential path replays."""
    js, keys, fasts = lab["js"], lab["keys"], []
    real = point_in_time._Fast.begin
    monkeypatch.setattr(point_in_time._Fast, "begin", lambda f, m: (fasts.append(f), real(f, m))[1])
    point = lab["ddl"] if how == "ddl" else max(p for p in lab["images"] if p < lab["ddl"])
    plan = segments.plan_point(js, keys, point)
    if how == "cap":
        first = next(iter(segments.read_segments(js, keys, plan["segments"])))
        monkeypatch.setattr(point_in_time, "FAST_WINDOW_BYTES", sum(len(r[2]) for r in first[1]))
    with point_in_time.rebuild(js, keys, plan, work_dir=str(lab["tmp"])) as image:
        assert image.path == "sequential" and fasts[0].proc is None
        assert not fasts[0].mine


class RecordingPopen(subprocess.Popen):
    """subprocess.Popen that records its arguments and every byte written to the child's standard input."""
    seen, procs = [], []

    def __init__(self, args, **kw):
        super().__init__(args, **kw)
        sent = []
        RecordingPopen.seen.append((args, kw, sent))
        RecordingPopen.procs.append(self)
        stdin = self.stdin

        class Tee:
            def write(self, data):
                sent.append(bytes(data))
                return stdin.write(data)

            def close(self):
                stdin.close()
        self.stdin = Tee()


def test_the_replay_process_is_a_fresh_interpreter_given_no_key(lab, monkeypatch):
    """What the child gets (argv, environment, every byte of its input) holds no data key, chunk-id key or master key,
    raw or hex; its environment is only the parent's sys.path; no standard error, no inherited descriptors."""
    RecordingPopen.seen = []
    monkeypatch.setattr(point_in_time.subprocess, "Popen", RecordingPopen)
    out = str(lab["tmp"] / "no-keys")
    image, _summary = restore_point(lab, max(p for p in lab["images"] if p < lab["ddl"]), out)
    assert image.path == "overlap"
    assert restored_dir(out) == {ns: docs for ns, docs in lab["images"][max(p for p in lab["images"] if p < lab["ddl"])].items() if docs}
    (args, kw, sent), = RecordingPopen.seen
    assert args[:4] == [sys.executable, "-I", "-S", "-c"] and len(args) == 5
    assert list(kw["env"]) == [pitr_replay.PATH_VARIABLE] and json.loads(kw["env"][pitr_replay.PATH_VARIABLE]) == sys.path
    assert kw["close_fds"] and kw["stderr"] == subprocess.DEVNULL and not kw.get("pass_fds")
    secrets = list(lab["keys"]._cache.values()) + list(lab["provider"].masters.values())
    assert len(secrets) >= 3 and all(len(k) == 32 for k in secrets)  # the snapshot's data key, chunk-id key, master key
    given = b"\0".join([a.encode() for a in args] + [(k + "=" + v).encode() for k, v in kw["env"].items()] + sent)
    assert sum(map(len, sent)) > 1 << 20  # the records and the touched base chunks went through here
    for k in secrets:
        assert k not in given and k.hex().encode() not in given and k.hex().upper().encode() not in given
