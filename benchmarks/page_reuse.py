# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How much writing a file costs depending on when memory was last freed: why pitr_restore.py waits (--settle) before
each timed restore.

  python benchmarks/page_reuse.py            # 1 GB, delays 0, 0.5, 1, 2, 4 s, 3 rounds
  python benchmarks/page_reuse.py --mb 256 --rounds 1

Each measurement writes --mb MB to a new file (1 MiB writes, each from a fresh copy, as a restore writes decompressed
chunks) after removing a file of the same size and waiting the delay. On a VM whose balloon driver reports free pages
to the host (/sys/module/page_reporting), the pages a removal frees go back to the host within about half a second,
and writing into pages the host took back is several times slower than writing into pages freed just before. A
restore that starts writing at once after its predecessor's output was removed (the plain restore, in a loop that
removes the previous output first) gets the fast pages; one that reads and pre-scans for half a second first (the
restore to a point) gets the slow ones.
"""
import argparse
import os
import statistics
import tempfile
import time


def write(path, mb, blocks):
    t = time.perf_counter()
    with open(path, "wb", buffering=1 << 20) as f:
        for k in range(mb):
            f.write(bytes(blocks[k % len(blocks)]))  # a new object each time: a restore writes fresh buffers
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delays", default="0,0.5,1,2,4")
    ap.add_argument("--dir", default="/var/tmp")
    opts = ap.parse_args()
    delays = [float(d) for d in opts.delays.split(",")]
    blocks = [os.urandom(1 << 20) for _ in range(8)]
    reporting = "/sys/module/page_reporting/parameters/reported_kib"
    print("free page reporting: %s" % ("present (%s KiB reported so far)" % open(reporting).read().strip()
                                       if os.path.exists(reporting) else "absent"))
    work = tempfile.mkdtemp(prefix="kmipbackup-page-reuse-", dir=opts.dir)
    try:
        old, new = os.path.join(work, "old"), os.path.join(work, "new")
        seconds = {d: [] for d in delays}
        for _round in range(opts.rounds):
            for d in delays:
                write(old, opts.mb, blocks)
                os.sync()
                os.unlink(old)
                os.sync()
                time.sleep(d)
                seconds[d].append(write(new, opts.mb, blocks))
                os.unlink(new)
                os.sync()
        print("| delay after the removal (s) | write %d MB (median of %d, s) | all |" % (opts.mb, opts.rounds))
        print("|---|---|---|")
        for d in delays:
            print("| %g | %.2f | %s |" % (d, statistics.median(seconds[d]), ", ".join("%.2f" % s for s in seconds[d])))
    finally:
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)


if __name__ == "__main__":
    main()
