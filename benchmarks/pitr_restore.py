# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Point-in-time restore (issue 12): replay speed, and a restore to a point N events after a snapshot against the
plain restore of that snapshot, to a mongodump directory, in the same run.

  . scripts/env.sh && python benchmarks/pitr_restore.py                       # 1 GB snapshot, 100,000 events
  python benchmarks/pitr_restore.py --size-mb 200 --events 20000 --repeat 1   # a quick look
  python benchmarks/pitr_restore.py --fresh    # each restore in a fresh process, as the snapshot_restore module runs one

The job's data is bench.py's (order-like documents, 4 collections, time-ordered ObjectIds). The events are change
events as a change stream delivers them (raw BSON), sealed into segments of --segment-events events with the
segments module's own sealing and chain, after the snapshot's cluster time:
  --mix recent (default): 40% inserts of new orders, 50% updates ($set status, rev) of orders among the newest 2%
                          of each collection, 10% deletes among them: what an order system does;
  --mix uniform:          the same, with updates and deletes spread uniformly over every document (worst case: the
                          replay touches nearly every chunk, so the whole snapshot is loaded into the temporary head).
Plain restore and restore-to-point alternate, --repeat times; medians are printed. --settle S waits S seconds after
removing the previous output before each timed restore, so that both write into the same kind of pages (settle()).
The point-in-time output is checked byte for byte against the snapshot's head with the same events applied by the
capture's applier. Keys come
from a local key provider (a restore makes O(key epochs) KMIP calls, none in the timed loop). Say the load
(uptime) next to the figures: the machine may be shared.
"""
import argparse
import cProfile
import filecmp
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, ".build", "collections")]

import bson  # noqa: E402
from bson import Timestamp  # noqa: E402
from bson.raw_bson import RawBSONDocument  # noqa: E402
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding, aes_key_wrap_with_padding  # noqa: E402

from bench import HEAD_KEY, JOB, build_head, write_dump_dir  # noqa: E402
from data import Generator, namespaces  # noqa: E402

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (  # noqa: E402
    events as events_mod, head, point_in_time, restore, segments, snapshot, store)

T0 = 1760000000


class LocalKeys:
    """wrap/unwrap under a local master key (RFC 5649): the KMIP server's part, out of the timed path."""

    def __init__(self):
        self.master = os.urandom(32)

    def wrap(self, uid, key):
        return {"master_key_uid": uid, "mode": "local-rfc5649", "wrapped": aes_key_wrap_with_padding(self.master, key).hex()}

    def unwrap(self, wrapped):
        return aes_key_unwrap_with_padding(self.master, bytes.fromhex(wrapped["wrapped"]))


def make_events(gen, total_docs, n, mix, seed):
    """n change events (raw BSON) on bench's collections, each at its own cluster time after T0.1."""
    rnd = random.Random(seed)
    spaces = namespaces(total_docs)
    out, fresh, version = [], {}, {}
    for k in range(n):
        ns, start, count = spaces[k % len(spaces)]
        db, coll = ns.split(".", 1)
        ct = Timestamp(T0 + 1 + k // 1000, 1 + k % 1000)
        base = {"_id": {"_data": "%016x" % k}, "clusterTime": ct, "ns": {"db": db, "coll": coll}}
        r = rnd.random()
        if mix == "recent":
            i = rnd.randrange(start + count - max(1, count // 50), start + count)
        else:
            i = rnd.randrange(start, start + count)
        if r < 0.4:
            j = 10_000_000 * (1 + spaces.index((ns, start, count))) + fresh.setdefault(ns, 0)
            fresh[ns] += 1
            doc = gen.raw(j)
            ev = dict(base, operationType="insert", documentKey={"_id": RawBSONDocument(doc)["_id"]},
                      fullDocument=RawBSONDocument(doc))
        elif r < 0.9:
            version[i] = version.get(i, 0) + 1
            ev = dict(base, operationType="update", documentKey={"_id": RawBSONDocument(gen.raw(i))["_id"]},
                      updateDescription={"updatedFields": {"status": "shipped-%d" % version[i], "rev": version[i]},
                                         "removedFields": [], "truncatedArrays": []})
        else:
            ev = dict(base, operationType="delete", documentKey={"_id": RawBSONDocument(gen.raw(i))["_id"]})
        out.append((ct.time, ct.inc, bson.encode(ev)))
    return out


def capture_segments(head_path, js, keys, rows, per_segment, post_images=True):
    """The daemon's way to segments: the events applied to the head (a copy of the snapshot's) by the capture's
    applier and logged in the same transactions (2,000 events each), the segment closed every per_segment events
    (head.Writer.close_segment: with post-images unless post_images is False) and sealed into the store. The head
    is then the expected image."""
    h = head.Head(head_path, HEAD_KEY)
    h.record_segments = True
    if not post_images:
        h_writer_posts = head.Writer._post_images_from  # pylint: disable=protected-access
        head.Writer._post_images_from = lambda self: None  # pylint: disable=protected-access
    try:
        a = events_mod.Applier()
        for s in range(0, len(rows), per_segment):
            part = rows[s:s + per_segment]
            for b in range(0, len(part), 2000):
                batch = part[b:b + 2000]
                with h.write() as w:
                    for _t, _i, raw in batch:
                        a.apply(w, RawBSONDocument(raw))
                    a.flush()
                    w.log_records(batch)
                    w.set_position(b"bench-token", [batch[-1][0], batch[-1][1]], True)
            segments.close(h)
            segments.seal_closed(h, js, keys, "mk")
        h.checkpoint()
    finally:
        if not post_images:
            head.Writer._post_images_from = h_writer_posts  # pylint: disable=protected-access
        h.close()


def reset_peak_rss():
    """Reset the process's peak RSS (Linux: VmHWM), so that peak_rss() tells what the restore to the point needed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss():
    """The process's peak RSS since reset_peak_rss(), in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def settle(out, seconds):
    """Remove the previous run's output, flush, then wait seconds before the timed restore starts. On a VM whose balloon
    driver reports free pages to the host, the pages a removal frees go back to the host within a second or so, and
    writing into them again costs more (benchmarks/page_reuse.py: 1 GB in 0.3 s at once, 1.1 s four seconds later). A
    restore that writes at once (the plain one) may so get cheaper pages than one that reads and pre-scans first (the
    restore to a point): --settle 3 puts both on the same footing. Measured here, it slowed both alike (the ratio's
    median moved from 2.03x to 2.05-2.14x), so it is not the default."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # neither restore pays for writing back what the one before it wrote
    time.sleep(seconds)


def cpu():
    """CPU seconds of this process (all threads) and of its reaped children (the replay process): less sensitive to
    a shared machine's load than wall time."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def same_tree(a, b):
    for db in sorted(os.listdir(a)):
        if not os.path.isdir(os.path.join(a, db)):
            continue
        files = sorted(os.listdir(os.path.join(a, db)))
        if files != sorted(os.listdir(os.path.join(b, db))):
            return False
        _match, mismatch, errors = filecmp.cmpfiles(os.path.join(a, db), os.path.join(b, db), files, shallow=False)
        if mismatch or errors:
            return False
    return True


def fresh_restore(spec):
    """One restore in this (fresh) process, as the snapshot_restore module runs one: spec {"kind": "plain" or "point",
    "work", "master" (hex: the benchmark's local master key), "point"}; its measurements as JSON on stdout."""
    provider = LocalKeys()
    provider.master = bytes.fromhex(spec["master"])
    js = store.JobStore(os.path.join(spec["work"], "store"), JOB)
    out = os.path.join(spec["work"], "plain" if spec["kind"] == "plain" else "pit")
    settle(out, spec["settle"])
    res = {}
    t, c = time.perf_counter(), cpu()
    keys = store.Keys(js, provider)
    if spec["kind"] == "plain":
        restore.restore(js, "latest", keys, restore.DirectoryTarget(out))
    else:
        plan = segments.plan_point(js, keys, tuple(spec["point"]))
        with point_in_time.rebuild(js, keys, plan, work_dir=spec["work"]) as image:
            t_built = time.perf_counter()
            restore.execute(image.store, keys, image.entry, restore.select_namespaces(image.manifest), restore.DirectoryTarget(out))
            res.update(execute=time.perf_counter() - t_built, before=t_built - t, path=image.path,
                       events=image.replayed["events"], loaded=image.loaded_chunks)
    child = os.times()
    res.update(seconds=time.perf_counter() - t, cpu=cpu() - c, child_cpu=child.children_user + child.children_system,
               rss_kib=peak_rss())
    print(json.dumps(res))


def run_fresh(kind, work, provider, point, settle_s):
    """fresh_restore in a new interpreter (this script with --child): its measurements."""
    spec = {"kind": kind, "work": work, "master": provider.master.hex(), "point": list(point), "settle": settle_s}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], input=json.dumps(spec).encode(),
                          stdout=subprocess.PIPE, check=True)
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--segment-events", type=int, default=10_000)
    ap.add_argument("--mix", choices=("recent", "uniform"), default="recent")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default=None)
    ap.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                    help="wait this long after removing the previous output before each timed restore (see settle())")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-post-images", action="store_true",
                    help="segments without post-images (as the daemon writes for a segment with DDL in it): the restore "
                         "replays every event")
    ap.add_argument("--profile", metavar="FILE", help="cProfile the last restore to the point into FILE (pstats)")
    ap.add_argument("--sequential", action="store_true",
                    help="the sequential path (replay into a temporary head, then restore) instead of the fast path")
    ap.add_argument("--fresh", action="store_true",
                    help="run each restore in a fresh process (as the snapshot_restore module runs one) instead of in this "
                         "long-lived one, which holds the benchmark's own data (about 500 MB)")
    ap.add_argument("--compare", action="store_true",
                    help="time the sequential path too, in each run after the fast one (same load), and check its output")
    opts = ap.parse_args()
    if opts.fresh and (opts.sequential or opts.compare or opts.profile):
        ap.error("--fresh measures the default (fast) path: leave out --sequential, --compare and --profile")
    work = tempfile.mkdtemp(prefix="kmipbackup-pitr-bench-", dir=opts.work or "/var/tmp")
    print("load at start: %s; each timed restore starts %g s after the previous output was removed (--settle)"
          % (open("/proc/loadavg").read().strip(), opts.settle), flush=True)
    try:
        gen = Generator(opts.seed)
        total_docs = int(opts.size_mb * 1e6 / 600)
        head_path = os.path.join(work, "head", "head.db")
        t0 = time.perf_counter()
        build_head(head_path, gen, total_docs)
        provider = LocalKeys()
        js = store.JobStore(os.path.join(work, "store"), JOB)
        keys = store.Keys(js, provider)
        h = head.Head(head_path, HEAD_KEY)
        entry = snapshot.take_snapshot(h, js, keys, JOB, "mk", True)
        h.mark_snapshotted(entry["change_seq"])
        h.close()
        rows = make_events(gen, total_docs, opts.events, opts.mix, opts.seed)
        expected_head = os.path.join(work, "expected", "head.db")
        os.makedirs(os.path.dirname(expected_head))
        shutil.copy(head_path, expected_head)
        capture_segments(expected_head, js, keys, rows, opts.segment_events, not opts.no_post_images)
        point = (rows[-1][0], rows[-1][1])
        print("%d documents, %.1f MB of BSON in the snapshot; %d events (%s) in %d segments; ready in %.0f s"
              % (entry["doc_count"], entry["data_bytes"] / 1e6, len(rows), opts.mix,
                 len(segments.list_segments(js)), time.perf_counter() - t0), flush=True)

        plain_s, pit_s, replay_s, replay_cpu, execute_s, other_s, pit_rss, loaded, seq_s = [], [], [], [], [], [], [], 0, []
        plain_cpu, pit_cpu, seq_cpu = [], [], []

        def timed_replay(*a, **kw):
            t1, c1 = time.perf_counter(), time.process_time()
            r = segments.replay(*a, **kw)
            replay_s.append(time.perf_counter() - t1)
            replay_cpu.append(time.process_time() - c1)  # the process's CPU (all threads): less sensitive to load
            return r
        for k in range(opts.repeat):
            if opts.fresh:
                # the order alternates: on this VM the second of two restores in a row is often the slower (its output
                # takes pages the host reclaimed from the first's), which a fixed order would charge to one of them
                first = "plain" if k % 2 == 0 else "point"
                runs = {kind: run_fresh(kind, work, provider, point, opts.settle)
                        for kind in (first, "point" if first == "plain" else "plain")}
                plain_s.append(runs["plain"]["seconds"])
                plain_cpu.append(runs["plain"]["cpu"])
                r = runs["point"]
                pit_s.append(r["seconds"])
                pit_cpu.append(r["cpu"])
                execute_s.append(r["execute"])
                path, events_done, loaded = r["path"], r["events"], r["loaded"]
                replay_s.append(r["before"] if path == "overlap" else r["seconds"] - r["execute"])
                replay_cpu.append(r["child_cpu"])
                pit_rss.append(r["rss_kib"])
                other_s.append(0.0)
                print("  run %d (fresh processes, %s first): plain restore %.2f s, restore to the point %.2f s (%s path; "
                      "before the restore starts %.2f s, replay process %.2f s CPU, %d events replayed, %d chunks loaded)"
                      % (k + 1, first, plain_s[-1], pit_s[-1], path, replay_s[-1], replay_cpu[-1], events_done, loaded),
                      flush=True)
                continue
            out = os.path.join(work, "plain")
            settle(out, opts.settle)
            t, c = time.perf_counter(), cpu()
            restore.restore(js, "latest", store.Keys(js, provider), restore.DirectoryTarget(out))
            plain_s.append(time.perf_counter() - t)
            plain_cpu.append(cpu() - c)

            out = os.path.join(work, "pit")
            settle(out, opts.settle)
            rss = reset_peak_rss()
            prof = None
            if opts.profile and k == opts.repeat - 1:
                prof = cProfile.Profile()
                prof.enable()
            t, child0, c = time.perf_counter(), os.times(), cpu()
            k_keys = store.Keys(js, provider)
            plan = segments.plan_point(js, k_keys, point)
            with point_in_time.rebuild(js, k_keys, plan, replay=timed_replay if opts.sequential else None, work_dir=work) as image:
                t_built = time.perf_counter()
                restore.execute(image.store, k_keys, image.entry, restore.select_namespaces(image.manifest),
                                restore.DirectoryTarget(out))
                execute_s.append(time.perf_counter() - t_built)
                loaded = image.loaded_chunks
                events_done = image.replayed["events"]
                path = image.path
            pit_s.append(time.perf_counter() - t)
            pit_cpu.append(cpu() - c)
            child1 = os.times()
            if path == "overlap":  # the replay runs in a child process: its CPU (reaped), and the time before execute
                replay_cpu.append(child1.children_user + child1.children_system - child0.children_user - child0.children_system)
                replay_s.append(t_built - t)
            if prof is not None:
                prof.disable()
                prof.dump_stats(opts.profile)
            if rss:
                pit_rss.append(peak_rss())
            other_s.append(pit_s[-1] - execute_s[-1] - replay_s[-1])
            print("  run %d: plain restore %.2f s, restore to the point %.2f s (%s path; %s %.2f s, replay %.2f s CPU, %d events, "
                  "%d chunks loaded)" % (k + 1, plain_s[-1], pit_s[-1], path,
                                         "before the restore starts" if path == "overlap" else "replay", replay_s[-1],
                                         replay_cpu[-1], events_done, loaded), flush=True)
            if opts.compare:
                out = os.path.join(work, "seq")
                settle(out, opts.settle)
                t, c = time.perf_counter(), cpu()
                k_keys = store.Keys(js, provider)
                plan = segments.plan_point(js, k_keys, point)
                with point_in_time.rebuild(js, k_keys, plan, work_dir=work, overlap=False) as image:
                    restore.execute(image.store, k_keys, image.entry, restore.select_namespaces(image.manifest),
                                    restore.DirectoryTarget(out))
                seq_s.append(time.perf_counter() - t)
                seq_cpu.append(cpu() - c)
                print("         sequential path %.2f s" % seq_s[-1], flush=True)

        write_dump_dir(expected_head, os.path.join(work, "expected-dump"))
        same = same_tree(os.path.join(work, "expected-dump"), os.path.join(work, "pit"))
        if opts.compare:
            same = same and same_tree(os.path.join(work, "expected-dump"), os.path.join(work, "seq"))
        chunks = sum(len(n["chunks"]) for n in js.read_manifest(entry["snapshot_id"], keys)["namespaces"])
        p, q, r = statistics.median(plain_s), statistics.median(pit_s), statistics.median(replay_s)
        print()
        print("| measure | value |")
        print("|---|---|")
        print("| snapshot | %.0f MB of BSON, %d documents, %d chunks |" % (entry["data_bytes"] / 1e6, entry["doc_count"], chunks))
        print("| events after it (%s mix), segments | %d, %d |" % (opts.mix, len(rows), len(segments.list_segments(js))))
        print("| plain restore to a directory (median of %d) | %.2f s |" % (opts.repeat, p))
        print("| restore to the point, same target (median) | %.2f s |" % q)
        print("| restore to the point / plain restore: ratio of the medians; median of each run's ratio | **%.2fx**; %.2fx "
              "(goal <= 1.5x) |" % (q / p, statistics.median(b / a for a, b in zip(plain_s, pit_s, strict=True))))
        if seq_s:
            print("| the sequential path (temporary head; same runs, median) | %.2f s: %.2fx the plain restore |"
                  % (statistics.median(seq_s), statistics.median(seq_s) / p))
        print("| CPU seconds, all threads and processes (median): plain restore, restore to the point%s | %s |"
              % (", sequential path" if seq_cpu else "",
                 ", ".join("%.2f" % statistics.median(x) for x in (plain_cpu, pit_cpu, seq_cpu) if x)))
        if path == "overlap":
            print("| fast path: read + authenticate segments, pre-scan, start the replay process (before the restore starts; "
                  "median) | %.2f s |" % r)
            print("| replay in the child process, CPU (median; runs while the untouched chunks are restored) | %.2f s: %.0f "
                  "of the window's events per CPU second |" % (statistics.median(replay_cpu), len(rows) / statistics.median(replay_cpu)))
        else:
            print("| replay (authenticate, decompress, apply into the temporary head; median) | %.2f s: **%.0f events/s** "
                  "(goal >= 20,000) |" % (r, len(rows) / r))
            print("| replay CPU (process, all threads; median) | %.2f s: %.0f events per CPU second |"
                  % (statistics.median(replay_cpu), len(rows) / statistics.median(replay_cpu)))
        print("| of which: restore.execute (fast path: with the replay alongside; median) | %.2f s (%.2fx the plain restore) |"
              % (statistics.median(execute_s), statistics.median(execute_s) / p))
        print("| of which: planning, temporary head, image manifest, cleanup (median) | %.2f s |" % statistics.median(other_s))
        print("| base chunks loaded into the temporary head | %d of %d |" % (loaded, chunks))
        print("| peak RSS during the restore to the point (VmHWM) | %s |" % ("%.0f MB" % (max(pit_rss) / 1024) if pit_rss else "?"))
        print("| output byte-equal to the head with the same events applied | %s |" % ("yes" if same else "NO"))
        print("load at end: %s" % open("/proc/loadavg").read().strip())
        return 0 if same else 1
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        fresh_restore(json.loads(sys.stdin.read()))
        sys.exit(0)
    sys.exit(main())
