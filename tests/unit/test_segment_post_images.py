"""Post-images (segments.post_plaintexts, head.Writer.close_segment): a closed segment ends with the documents its events
changed, as the head held them at the segment's end, and nothing else; none when the head's change log cannot list
them (DDL, an untracked bulk load, a forget inside the segment, a timeline's end); the fast path of a restore to the
segment's end applies them (and gives what the head held), the sequential path skips them. Real SQLCipher heads, sealed
segments in a folder store, a local key provider."""
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import bson
import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    errors, head, pitr_replay, point_in_time, post_images, rawbson, restore, segments)
from pitr_overlap_helpers import T0, captured, ev, segment_job, upd, wait_post_images_built, window_events
from snapshot_helpers import image_of, restored_dir


@pytest.fixture
def job(tmp_path):
    job = segment_job(tmp_path)
    yield job
    job["head"].close()


def close_and_read(job):
    """Close the open segment, seal it, and read back its records (authenticated) as the restore does."""
    assert segments.close(job["head"]) is not None
    sealed = segments.seal_closed(job["head"], job["js"], job["keys"], "mk")
    (seg, recs), = segments.read_segments(job["js"], job["keys"], sealed)
    return seg, [bytes(r[2]) for r in recs]


def posts_of(raws):
    """{ns: {id_key: raw document or None}} of a segment's post-image records (decoded the replay process's way)."""
    out = {}
    for raw in raws:
        if segments.is_post(raw):
            ns = bson.decode(raw)["ns"]
            _j, _lasts, ops = pitr_replay._post_ops(raw, {ns: (0, [])})  # pylint: disable=protected-access
            assert not isinstance(ops, str), ops
            for kind, key, doc in ops:
                assert key not in out.setdefault(ns, {})
                out[ns][key] = doc if kind == pitr_replay._PUT else None  # pylint: disable=protected-access
    return out


@pytest.mark.parametrize("small", [False, True])
def test_post_images_are_the_heads_documents_at_the_segment_end_for_exactly_the_keys_its_events_changed(job, small, monkeypatch):
    h = job["head"]
    if small:  # many records a namespace and many head rows (zstd frames): a large segment is never held whole
        monkeypatch.setattr(segments, "POST_RECORD_BYTES", 50_000)
        monkeypatch.setattr(head, "POST_FRAME_BYTES", 200_000)  # several frames, each under the cap
        monkeypatch.setattr(head, "POST_MAX_BYTES", 10 ** 6)
    groups = window_events(T0 + 1)
    before = image_of(h)
    for n, group in enumerate(groups):
        captured(h, group, (T0 + 1 + n, 1))
    assert segments.close(h) is not None
    closed = h.closed_segments()[-1]["seg"]
    records, post_frames = h.segment_frames(closed)  # waits for the post-images' builder (a side thread)
    with h.read() as r:  # the head keeps the records only, a row per transaction; the post-images are in memory
        rows = r._c.execute("SELECT recs FROM seg_records WHERE seg=?", (closed,)).fetchall()  # pylint: disable=protected-access
    assert len(rows) == len(groups) and records == b"".join(bytes(x[0]) for x in rows) and post_frames
    sealed = segments.seal_closed(h, job["js"], job["keys"], "mk")
    (seg, recs), = segments.read_segments(job["js"], job["keys"], sealed)
    raws = [bytes(r[2]) for r in recs]
    n_posts = sum(1 for r in raws if segments.is_post(r))
    assert (n_posts > 25) is small and all(len(r) < 60_000 + 4000 for r in raws if small and segments.is_post(r))
    assert len(segments.decode_records(segments.decompress_frames(records + post_frames))) == len(raws)
    # a reader that applies the post-images reads only them: the sealed stream ends with where they start
    (seg_posts, only), = segments.read_segments(job["js"], job["keys"], sealed, posts_for=frozenset([seg["name"]]))
    assert seg_posts["posts_only"] and "posts_only" not in seg and [bytes(r[2]) for r in only] == [r for r in raws if segments.is_post(r)]
    at_end = {ns: {rawbson.id_key_from_document(d): d for d in docs} for ns, docs in image_of(h).items()}
    posts = posts_of(raws)
    # the post-images come last, after every event, at the segment's end
    first_post = min(k for k, r in enumerate(raws) if segments.is_post(r))
    assert all(segments.is_post(r) for r in raws[first_post:]) and first_post == sum(len(g) for g in groups)
    # exactly the keys the kept events touched (the config.x insert is not kept), each as the head holds it
    touched = {}
    for group in groups:
        for e in group:
            d = bson.decode(e.raw)
            ns = "%s.%s" % (d["ns"]["db"], d["ns"]["coll"])
            if ns != "config.x":
                touched.setdefault(ns, set()).add(rawbson.id_key_from_value(d["documentKey"]["_id"]))
    assert all(set(keys) <= touched[ns] for ns, keys in posts.items())
    for ns, keys in posts.items():
        for key, doc in keys.items():
            assert doc == at_end[ns].get(key), (ns, key)
    # every document that changed is among them (an update the applier could not apply changed nothing: the capture
    # re-copies such a document from the source, and that write is listed too)
    was = {ns: {rawbson.id_key_from_document(d): d for d in docs} for ns, docs in before.items()}
    for ns in set(was) | set(at_end):
        for key in set(was.get(ns, {})) | set(at_end.get(ns, {})):
            if was.get(ns, {}).get(key) != at_end.get(ns, {}).get(key):
                assert key in posts.get(ns, {}), (ns, key)
    # and they change something: deletes among them, documents that differ from the base
    assert any(doc is None for keys in posts.values() for doc in keys.values())
    assert any(doc is not None and doc not in before[ns] for ns, keys in posts.items() for doc in keys.values())
    assert sum(len(keys) for keys in posts.values()) > 400  # the 400 inserts past the end among them
    # the next segment starts empty: its post-images list only what changed after this one's end
    captured(h, [upd("big", (T0 + 20, 1), 42, {"pad": "later"})], (T0 + 20, 1))
    _seg, raws = close_and_read(job)
    assert {ns: list(keys) for ns, keys in posts_of(raws).items()} == {"d.big": [rawbson.id_key_from_value(42)]}


def _ddl(job):
    captured(job["head"], [ev("createIndexes", "big", (T0 + 2, 1), operationDescription={
        "indexes": [{"v": 2, "key": {"tag": 1}, "name": "tag_1"}]})], (T0 + 2, 1))


def _untracked_load(job):
    with job["head"].write() as w:  # what a re-clone does: documents copied in bulk, not listed in the change log
        doc = bson.encode({"_id": 10 ** 7, "recloned": True})
        w.upsert_many("d.quiet", [(rawbson.id_key_from_document(doc), doc)], track=False)


def _forget(job):
    h = job["head"]
    with h.read() as r:
        seq = r._c.execute("SELECT value FROM meta WHERE name='change_seq'").fetchone()[0]  # pylint: disable=protected-access
    h.mark_snapshotted(seq)  # a snapshot's forget that reaches into the open segment


@pytest.mark.parametrize("inside", [None, _ddl, _untracked_load, _forget])
def test_no_post_images_when_the_change_log_cannot_list_the_segments_changes(job, inside):
    h = job["head"]
    captured(h, [upd("big", (T0 + 1, 1), 3, {"pad": "x"}), ev("delete", "big", (T0 + 1, 1), documentKey={"_id": 4})], (T0 + 1, 1))
    if inside is not None:
        inside(job)
    captured(h, [upd("big", (T0 + 3, 1), 5, {"pad": "y"})], (T0 + 3, 1))
    _seg, raws = close_and_read(job)
    assert any(segments.is_post(r) for r in raws) is (inside is None)
    # the next segment has them again
    captured(h, [upd("big", (T0 + 4, 1), 6, {"pad": "z"})], (T0 + 4, 1))
    _seg, raws = close_and_read(job)
    assert list(posts_of(raws)) == ["d.big"]


def test_a_timeline_that_ends_closes_its_last_segment_without_post_images(job):
    h = job["head"]
    captured(h, [upd("big", (T0 + 1, 1), 3, {"pad": "x"})], (T0 + 1, 1))
    with h.write() as w:
        w.end_timeline()
    sealed = segments.seal_closed(h, job["js"], job["keys"], "mk")
    (_seg, recs), = segments.read_segments(job["js"], job["keys"], sealed)
    assert recs and not any(segments.is_post(bytes(r[2])) for r in recs)


def test_a_restore_to_the_segment_end_applies_its_post_images_and_gives_what_the_head_held(job):
    h, js, keys, tmp = job["head"], job["js"], job["keys"], job["tmp"]
    for n, group in enumerate(window_events(T0 + 1)):
        captured(h, group, (T0 + 1 + n, 1))
    seg, _raws = close_and_read(job)
    held = {ns: docs for ns, docs in image_of(h).items() if docs and not ns.startswith("config.")}
    point = tuple(seg["to"])
    for overlap in (True, False):
        out = str(tmp / ("out-%s" % overlap))
        plan = segments.plan_point(js, keys, point)
        with point_in_time.rebuild(js, keys, plan, work_dir=str(tmp), overlap=overlap) as image:
            restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest),
                            restore.DirectoryTarget(out))
            assert image.path == ("overlap" if overlap else "sequential")
            assert image.replayed.get("post_images", 0) == (1 if overlap else 0)
        assert restored_dir(out) == held
    # one record before the end: the segment's events, not its post-images
    last_event = max((t, i) for t, i, _r in next(iter(segments.read_segments(js, keys, [seg])))[1]
                     if (t, i) < point)
    with point_in_time.rebuild(js, keys, segments.plan_point(js, keys, last_event), work_dir=str(tmp)) as image:
        assert image.path == "overlap" and image.replayed["post_images"] == 0


def test_a_window_that_ends_in_ddl_reads_the_post_imaged_segments_again_whole_for_the_sequential_replay(job, monkeypatch):
    h, js, keys, tmp = job["head"], job["js"], job["keys"], job["tmp"]
    for n, group in enumerate(window_events(T0 + 1)):
        captured(h, group, (T0 + 1 + n, 1))
    first, raws = close_and_read(job)
    assert any(segments.is_post(r) for r in raws)
    captured(h, [ev("createIndexes", "big", (T0 + 30, 1), operationDescription={
        "indexes": [{"v": 2, "key": {"tag": 1}, "name": "tag_1"}]}), upd("big", (T0 + 30, 2), 7, {"pad": "after"})],
        (T0 + 30, 2))
    second, _raws = close_and_read(job)
    held = {ns: docs for ns, docs in image_of(h).items() if docs and not ns.startswith("config.")}
    reads = []
    real = segments.read_segments
    monkeypatch.setattr(segments, "read_segments",
                        lambda *a, **k: reads.append(a[3] if len(a) > 3 else k.get("posts_for", frozenset())) or real(*a, **k))
    out = str(tmp / "out")
    plan = segments.plan_point(js, keys, (T0 + 30, 2))
    with point_in_time.rebuild(js, keys, plan, work_dir=str(tmp)) as image:
        restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest), restore.DirectoryTarget(out))
        # the pre-scan read the first segment's post-images alone (the second has none), then found the DDL: the
        # sequential replay read both whole
        assert (image.path, reads) == ("sequential", [frozenset([first["name"], second["name"]]), frozenset()]), image.why
        assert image.replayed["segments"] == 2 and image.replayed["events"] > 2
    assert restored_dir(out) == held


def test_a_window_over_the_fast_paths_limit_reads_the_post_imaged_segments_whole_for_the_sequential_replay(job, monkeypatch):
    h, js, keys, tmp = job["head"], job["js"], job["keys"], job["tmp"]
    # the first segment has no post-images (DDL in it) and takes the window over the fast path's limit; the second has
    # post-images and ends by the point: the sequential replay must get its events
    captured(h, [ev("createIndexes", "big", (T0 + 1, 1), operationDescription={
        "indexes": [{"v": 2, "key": {"tag": 1}, "name": "tag_1"}]}), upd("big", (T0 + 1, 2), 7, {"pad": "s1"})], (T0 + 1, 2))
    _first, raws = close_and_read(job)
    assert not any(segments.is_post(r) for r in raws)
    for n, group in enumerate(window_events(T0 + 10)):
        captured(h, group, (T0 + 10 + n, 1))
    second, raws = close_and_read(job)
    assert any(segments.is_post(r) for r in raws)
    held = {ns: docs for ns, docs in image_of(h).items() if docs and not ns.startswith("config.")}
    monkeypatch.setattr(point_in_time, "FAST_WINDOW_BYTES", 1)  # stands for a first segment of over 512 MiB
    out = str(tmp / "out")
    with point_in_time.rebuild(js, keys, segments.plan_point(js, keys, tuple(second["to"])), work_dir=str(tmp)) as image:
        restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest), restore.DirectoryTarget(out))
        assert image.path == "sequential" and "more than" in image.why and image.replayed["events"] > 100
    assert restored_dir(out) == held


def test_the_event_by_event_replay_refuses_a_segment_read_as_its_post_images_alone(job):
    h, js, keys, tmp = job["head"], job["js"], job["keys"], job["tmp"]
    for n, group in enumerate(window_events(T0 + 1)):
        captured(h, group, (T0 + 1 + n, 1))
    seg, _raws = close_and_read(job)
    plan = segments.plan_point(js, keys, tuple(seg["to"]))
    read = list(segments.read_segments(js, keys, plan["segments"], frozenset([seg["name"]])))
    assert read[0][0]["posts_only"]
    rebuilt = head.Head(str(tmp / "r" / "head.db"), bytes(32))
    try:
        with pytest.raises(errors.KmipBackupError, match="post-images alone"):
            segments.replay(rebuilt, js, keys, plan, read=read)
    finally:
        rebuilt.close()


def test_a_restart_between_the_seal_and_forgetting_the_records_keeps_the_sealed_copy_with_its_post_images(job, monkeypatch):
    h, js, keys = job["head"], job["js"], job["keys"]
    captured(h, [upd("big", (T0 + 1, 1), 3, {"pad": "x"})], (T0 + 1, 1))
    segments.close(h)
    real = type(h).segment_sealed

    def crash(*_a, **_k):
        raise KeyboardInterrupt("killed after the store write")
    monkeypatch.setattr(type(h), "segment_sealed", crash)
    with pytest.raises(KeyboardInterrupt):
        segments.seal_closed(h, js, keys, "mk")
    monkeypatch.setattr(type(h), "segment_sealed", real)
    (seg,) = segments.list_segments(js)
    stored = js.storage.get(segments.segment_path(js, seg))
    path = h.path
    h.close()  # the process is gone: the post-images it built with it
    h2 = job["head"] = type(h)(path, h._key_hex and bytes.fromhex(h._key_hex))  # pylint: disable=protected-access
    h2.record_segments = True
    assert segments.seal_closed(h2, js, keys, "mk")  # this run's frames have no post-images: the stored copy is kept
    assert js.storage.get(segments.segment_path(js, seg)) == stored and not h2.closed_segments()
    (_s, recs), = segments.read_segments(js, keys, [seg])
    assert segments.is_post(bytes(recs[-1][2]))
    captured(h2, [upd("big", (T0 + 2, 1), 4, {"pad": "y"})], (T0 + 2, 1))  # the chain goes on from the kept copy
    _seg2, raws = close_and_read(job)
    assert segments.is_post(raws[-1]) and len(segments.list_segments(js)) == 2
    segments.plan_point(js, keys, (T0 + 2, 1))


def test_post_images_over_the_cap_are_dropped_and_the_segment_restores_from_its_events(job, monkeypatch):
    monkeypatch.setattr(head, "POST_FRAME_BYTES", 2_000)
    monkeypatch.setattr(head, "POST_MAX_BYTES", 1_000)  # compressed: two of the documents (random pads) take more
    h, js, keys, tmp = job["head"], job["js"], job["keys"], job["tmp"]
    for n, group in enumerate(window_events(T0 + 1)):
        captured(h, group, (T0 + 1 + n, 1))
    seg, raws = close_and_read(job)
    assert raws and not any(segments.is_post(r) for r in raws)
    out = str(tmp / "out")
    with point_in_time.rebuild(js, keys, segments.plan_point(js, keys, tuple(seg["to"])), work_dir=str(tmp)) as image:
        restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest), restore.DirectoryTarget(out))
        assert (image.path, image.replayed["post_images"]) == ("overlap", 0)
    assert restored_dir(out) == {ns: docs for ns, docs in image_of(h).items() if docs and not ns.startswith("config.")}


def test_the_builder_reads_the_segment_end_while_the_capture_goes_on(job):
    """The post-images are pinned at the close's commit: writes made after it are not in them, whether the builder
    (stopped here as soon as the close returns) had built them before or builds them after."""
    h = job["head"]
    captured(h, [upd("big", (T0 + 1, 1), 3, {"pad": "at the end"})], (T0 + 1, 1))
    assert segments.close(h) is not None
    builder = h._builder.proc  # pylint: disable=protected-access
    os.kill(builder.pid, signal.SIGSTOP)  # pinned (close returned): it builds nothing until the writes below are in
    try:
        at_end = {rawbson.id_key_from_document(d): d for d in image_of(h)["d.big"]}
        captured(h, [upd("big", (T0 + 2, 1), 3, {"pad": "later"}), ev("delete", "big", (T0 + 2, 1), documentKey={"_id": 4})],
                 (T0 + 2, 1))
    finally:
        os.kill(builder.pid, signal.SIGCONT)
    sealed = segments.seal_closed(h, job["js"], job["keys"], "mk")
    (_s, recs), = segments.read_segments(job["js"], job["keys"], sealed[:1])
    posts = posts_of([bytes(r[2]) for r in recs])
    key = rawbson.id_key_from_value(3)
    assert posts == {"d.big": {key: at_end[key]}} and b"later" not in at_end[key]


def test_a_seal_pass_reads_the_builders_answer_without_holding_up_the_capture(job, monkeypatch):
    """The pass (segments.Sealer's thread) reads the builder's answer outside the head's lock: held inside that read
    here, the capture still writes and closes the next segment, which then has no post-images (nothing is asked of
    the builder while its answer is read: the protocol stays in step); both segments are sealed with their records,
    the first with its post-images, and the builder answers the segment after."""
    h = job["head"]
    captured(h, [upd("big", (T0 + 1, 1), 3, {"pad": "first"})], (T0 + 1, 1))
    assert segments.close(h) is not None
    wait_post_images_built(h)
    at_end = {rawbson.id_key_from_document(d): d for d in image_of(h)["d.big"]}
    reading, release, answer = threading.Event(), threading.Event(), post_images.Builder.answer

    def held_answer(self):
        reading.set()
        assert release.wait(30)
        return answer(self)
    monkeypatch.setattr(post_images.Builder, "answer", held_answer)
    sealed = []
    seal = threading.Thread(target=lambda: sealed.extend(segments.seal_closed(h, job["js"], job["keys"], "mk")))
    seal.start()
    try:
        assert reading.wait(30)
        captured(h, [upd("big", (T0 + 2, 1), 3, {"pad": "second"})], (T0 + 2, 1))  # the lock is free
        assert segments.close(h) is not None and not h.post_images_pending(h.closed_segments()[-1]["seg"])
    finally:
        release.set()
        seal.join(30)
    monkeypatch.undo()
    assert [s["seq"] for s in sealed] == [1]
    sealed += segments.seal_closed(h, job["js"], job["keys"], "mk")
    (_a, first), (_b, second) = segments.read_segments(job["js"], job["keys"], sealed)
    key = rawbson.id_key_from_value(3)
    assert posts_of([bytes(r[2]) for r in first]) == {"d.big": {key: at_end[key]}}
    assert posts_of([bytes(r[2]) for r in second]) == {} and len(second) == 1 and b"second" in bytes(second[0][2])
    captured(h, [upd("big", (T0 + 3, 1), 3, {"pad": "third"})], (T0 + 3, 1))
    _seg, raws = close_and_read(job)
    assert b"third" in posts_of(raws)["d.big"][key]


def test_the_ticks_seal_waits_for_post_images_still_being_built(job, monkeypatch):
    h = job["head"]
    captured(h, [upd("big", (T0 + 1, 1), 3, {"pad": "x"})], (T0 + 1, 1))
    first = segments.close(h)
    captured(h, [upd("big", (T0 + 2, 1), 5, {"pad": "y"})], (T0 + 2, 1))
    assert segments.close(h) is not None and len(h.closed_segments()) == 2
    monkeypatch.setattr(type(h), "post_images_pending", lambda self, seg: seg == first)  # the first one still building
    assert segments.seal_closed(h, job["js"], job["keys"], "mk", wait=False) == []  # in order: the second waits too
    assert len(h.closed_segments()) == 2
    monkeypatch.undo()
    assert [s["seq"] for s in segments.seal_closed(h, job["js"], job["keys"], "mk")] == [1, 2]  # waits for the builds


# A stand-in for the builder process (post_images.main's protocol, first steps only): it takes the hello and one
# question, says it pinned, then never answers.
_SILENT_BUILDER = """
import struct, sys, time
inp = sys.stdin.buffer
n = struct.unpack("<I", inp.read(4))[0]; inp.read(n)
inp.read(struct.calcsize("<qIIQQQ"))
sys.stdout.buffer.write(b"P"); sys.stdout.buffer.flush()
time.sleep(600)
"""


def test_a_build_that_does_not_answer_in_time_gives_none_and_ends_the_builder(monkeypatch):
    monkeypatch.setattr(post_images, "BUILD_TIMEOUT", 0.5)
    proc = subprocess.Popen([sys.executable, "-c", _SILENT_BUILDER], stdin=subprocess.PIPE,  # pylint: disable=consider-using-with
                            stdout=subprocess.PIPE, bufsize=0)
    b = post_images.Builder(proc)
    proc.stdin.write(struct.pack("<I", 2) + b"{}")
    assert b.ask(7, 0, (1, 1), head.post_image_limits()) and b.asked == 7
    assert not b.ready()  # pinned, building
    time.sleep(0.6)
    assert b.ready()  # its time is up: answer() gives up at once
    started = time.monotonic()
    assert b.answer() == [] and time.monotonic() - started < 2 and proc.poll() is not None and b.asked is None


def test_a_builder_that_does_not_pin_in_time_is_ended(monkeypatch):
    monkeypatch.setattr(post_images, "PIN_TIMEOUT", 0.5)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdin=subprocess.PIPE,  # pylint: disable=consider-using-with
                            stdout=subprocess.PIPE, bufsize=0)
    started = time.monotonic()
    assert not post_images.Builder(proc).ask(7, 0, (1, 1), head.post_image_limits())
    assert time.monotonic() - started < 3 and proc.poll() is not None


def test_the_builder_process_gets_the_key_on_its_input_only(job):
    h = job["head"]
    captured(h, [upd("big", (T0 + 1, 1), 3, {"pad": "x"})], (T0 + 1, 1))
    assert segments.close(h) is not None
    proc = h._builder.proc  # pylint: disable=protected-access
    pid = proc.pid
    key_hex = h._key_hex.encode()  # pylint: disable=protected-access
    for what in ("cmdline", "environ"):
        with open("/proc/%d/%s" % (pid, what), "rb") as f:
            seen = f.read()
        assert seen and key_hex not in seen.lower() and bytes.fromhex(key_hex.decode()) not in seen
    with open("/proc/%d/stat" % pid) as f:  # it runs below the capture's CPU priority (it has answered: it is set)
        assert int(f.read().rsplit(")", 1)[1].split()[16]) == os.getpriority(os.PRIO_PROCESS, 0) + post_images.BUILDER_NICE
    h.close()  # ends the builder: its input ends
    assert proc.returncode is not None  # exited (1 when its answer found the pipe closed)


@pytest.mark.parametrize("how", ["no start", "answer lost", "killed before the close"])
def test_a_builder_that_cannot_start_or_fails_leaves_the_segment_without_post_images(job, monkeypatch, how):
    """Post-images are optional: without them the segment is sealed with its records (a restore replays them), the
    capture goes on, and the next segment has its own from a new builder."""
    h = job["head"]
    captured(h, [upd("big", (T0 + 1, 1), 3, {"pad": "x"})], (T0 + 1, 1))
    first = h._builder.proc  # pylint: disable=protected-access  # started when the head began recording segments
    if how == "no start":  # the builder ended; a new one cannot start
        def fail(*_a):
            monkeypatch.undo()
            raise OSError("too many open files")
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        monkeypatch.setattr(post_images.Builder, "start", classmethod(lambda cls, *a: fail()))
        assert segments.close(h) is not None  # the close committed: no error
        assert h._builder is None and not h._posts  # pylint: disable=protected-access
    elif how == "answer lost":  # pinned, then its pipe breaks before the answer is read
        assert segments.close(h) is not None
        first.stdout.close()
    else:  # the builder died between segments: the close starts another
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert segments.close(h) is not None and h._builder.proc is not first  # pylint: disable=protected-access
    captured(h, [upd("big", (T0 + 2, 1), 5, {"pad": "y"})], (T0 + 2, 1))
    sealed = segments.seal_closed(h, job["js"], job["keys"], "mk")
    (_s, recs), = segments.read_segments(job["js"], job["keys"], sealed)
    assert recs and any(segments.is_post(bytes(r[2])) for r in recs) is (how == "killed before the close")
    _seg, raws = close_and_read(job)  # the next one has its own (a new builder where it ended), only its own
    assert list(posts_of(raws)["d.big"]) == [rawbson.id_key_from_value(5)]
    assert first.poll() is not None


def test_no_change_after_a_close_in_the_same_transaction(job):
    h = job["head"]
    captured(h, [upd("big", (T0 + 1, 1), 3, {"pad": "x"})], (T0 + 1, 1))
    with pytest.raises(errors.HeadError, match="same transaction"):
        with h.write() as w:
            w.close_segment((T0 + 1, 1))
            w.delete("d.big", rawbson.id_key_from_value(7))
    assert not h.closed_segments() and h._post_pending is None  # pylint: disable=protected-access  # rolled back
    assert segments.close(h) is not None
