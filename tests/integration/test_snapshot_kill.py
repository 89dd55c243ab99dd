"""kill -9 of a snapshot while it writes its chunks (written under temporary names, fsynced in batches, then named:
store.FileStorage.put_atomic(sync=False)). A snapshot process (this file run as a script) is killed at random moments;
after each kill every chunk name in the store must hold a complete, authentic chunk, no catalog entry may exist
without everything it names, and a garbage collection removes the temporary leftovers. A last, uninterrupted
snapshot (reusing what the killed ones left) restores byte-equal. The random seed is printed: replay a failure with
KB_KILL_SEED. Real SQLCipher head and AES-GCM store; the key provider is local (this test claims nothing about KMIP)."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import bson

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import crypto, restore, snapshot, store, timeutil
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head as headmod
from snapshot_helpers import LocalKeyProvider, make_head, restored_image

JOB, MASTER = "killjob", "mk"
NAMESPACES = ("d.a", "d.b", "d.c")
KILLS = 4  # at random system calls, and as many at random times
BATCH = 1 << 20  # small batches: a kill lands between batches as well as inside one


def _docs(ns, n=300):
    """Documents of ~16 KB of incompressible bytes: each namespace is a few MB, several 256 KB chunks."""
    rnd = random.Random(ns)
    return [{"_id": i, "ns": ns, "pad": rnd.randbytes(16 << 10)} for i in range(n)]


def _provider(master_hex):
    p = LocalKeyProvider()
    p.masters[MASTER] = bytes.fromhex(master_hex)
    return p


def _kill_at(call, n):
    """SIGKILL this process at its n-th os.<call>: in the middle of a chunk file's write (half of it written), right
    before an fsync, or right after a rename (between the renames of a batch). The snapshot code runs unchanged."""
    real, count = getattr(os, call), [0]

    def hooked(*args, **kw):
        count[0] += 1
        if count[0] == n:
            if call == "write":
                real(args[0], memoryview(args[1])[:max(1, len(args[1]) // 2)])
            elif call == "replace":
                real(*args, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kw)
    setattr(os, call, hooked)


def _child(head_path, head_key_hex, root, master_hex, target_kib, kill=""):
    """Take one snapshot; say "ready" first (imports and the head opened), so the parent's clock starts there.
    kill "write:5" (etc.): SIGKILL itself at that system call (_kill_at)."""
    store.BATCH_BYTES = BATCH
    h = headmod.Head(head_path, bytes.fromhex(head_key_hex))
    js = store.JobStore(root, JOB)
    if kill:
        call, n = kill.split(":")
        _kill_at(call, int(n))
    print("ready", flush=True)
    snapshot.take_snapshot(h, js, store.Keys(js, _provider(master_hex)), JOB, MASTER, True, target_bytes=int(target_kib) << 10)
    h.close()


def _check_store(js, keys):
    """Every chunk name holds a complete, authentic chunk; every catalog entry's manifest and chunks are there."""
    for cid in js.chunk_ids():
        crypto.decompress(js._open_chunk(cid, keys), "chunk", cid)  # AES-GCM over the whole file: a torn file fails
    entries, _head = js.live_catalog(keys)
    for e in entries:
        manifest = js.read_manifest(e["snapshot_id"], keys, e.get("manifest_sha256"))
        for n in manifest["namespaces"]:
            for c in n["chunks"]:
                js.read_chunk(c, keys)
    return entries


def _temporary(root):
    return [n for _f, _d, names in os.walk(root) for n in names if ".tmp" in n]


def test_snapshot_killed_while_writing_leaves_only_complete_chunks(tmp_path):
    seed = int(os.environ.get("KB_KILL_SEED") or random.randrange(1 << 30))
    print("KB_KILL_SEED=%d" % seed)
    rnd = random.Random(seed)
    head_key, master = os.urandom(32), os.urandom(32)
    docs = {ns: _docs(ns) for ns in NAMESPACES}
    head_path = str(tmp_path / "head" / "head.db")
    make_head(head_path, docs, key=head_key).close()
    root = str(tmp_path / "store")
    js = store.JobStore(root, JOB)
    keys = store.Keys(js, _provider(master.hex()))
    cmd = [sys.executable, os.path.abspath(__file__), head_path, head_key.hex()]
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    killed_with_temporaries, seconds, moments = 0, None, []
    for i in range(2 * KILLS + 1):
        # the first runs to its end into a store of its own (how long a snapshot takes here); the killed ones write
        # into one store, chunk sizes differing from run to run so each has chunks of its own to write. Half the kills
        # come at a random system call of the chunk writes (_kill_at), half at a random time
        args = [root, master.hex(), str(rnd.choice((128, 192, 256, 384)))] if i else [root + "-timing", master.hex(), "256"]
        if 0 < i <= KILLS:  # first, while most chunks are still to be written: each call kind at least once
            args.append("%s:%d" % (("write", "fsync", "replace", "write")[(i - 1) % 4], rnd.randint(1, 12)))
        proc = subprocess.Popen(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        t0 = time.perf_counter()
        if i == 0:
            assert proc.wait(60) == 0, proc.stderr.read()
            seconds = time.perf_counter() - t0
        else:
            if i > KILLS:
                time.sleep(rnd.uniform(0, 0.9) * seconds)
                proc.send_signal(signal.SIGKILL)
            rc = proc.wait(60)
            assert rc in (0, -signal.SIGKILL), proc.stderr.read()
            moments.append((args[3:] or ["time"])[0] + ("" if rc else " (finished first)"))
            killed_with_temporaries += bool(_temporary(root))
            _check_store(js, keys)
        proc.stdout.close()
        proc.stderr.close()
    print("kills: %s" % ", ".join(moments))
    print("snapshot %.2f s; %d of %d kills left temporary files" % (seconds, killed_with_temporaries, 2 * KILLS))
    # the next snapshot reuses whatever the killed ones left named, and restores byte-equal
    h = headmod.Head(head_path, head_key)
    e = snapshot.take_snapshot(h, js, keys, JOB, MASTER, True, target_bytes=256 << 10)
    h.close()
    # a garbage collection (grace 0, the killed snapshots' pending markers stale) removes the temporary leftovers
    later = timeutil.utcnow()
    js.gc(keys, now=later.replace(year=later.year + 1), grace_seconds=0, stale_seconds=0)
    assert _temporary(root) == []
    assert [x["snapshot_id"] for x in _check_store(js, keys)][-1] == e["snapshot_id"]
    out = tmp_path / "out"
    restore.restore(js, e["snapshot_id"], keys, restore.DirectoryTarget(str(out)))
    image = restored_image(str(out), "d")
    assert sorted(image) == list(NAMESPACES)
    for ns in NAMESPACES:
        assert list(image[ns].values()) == [bson.encode(d) for d in docs[ns]], ns
    print(json.dumps({"kills": 2 * KILLS, "written_chunks": e["written_chunks"], "reused_chunks": e["reused_chunks"]}))


if __name__ == "__main__":
    _child(*sys.argv[1:7])
