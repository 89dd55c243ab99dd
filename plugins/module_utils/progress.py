# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Progress of long work (initial sync, snapshot, restore): counters against an estimated total, the rate and an ETA,
and the restore's progress record (no Ansible imports). PRIVATE to the collection.

Nothing here names a namespace: progress is counts and sizes only, so it is safe for encrypted jobs.
"""
from __future__ import annotations

import collections
import os
import stat
import threading
import time
from typing import Callable

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import files
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError

WINDOW = 20.0  # seconds of recent samples the rate is measured over (the average since the start until then)


class Meter:
    """Documents and bytes done against estimated totals; thread-safe (add from a worker, report from another)."""

    def __init__(self, docs_total: int | None = None, bytes_total: int | None = None,
                 clock: Callable[[], float] = time.monotonic, window: float = WINDOW) -> None:
        self.docs_total = docs_total
        self.bytes_total = bytes_total
        self.docs = self.bytes = self.chunks = 0
        self.phase = None  # the worker's current phase, when it has several (initial sync: clone, catch_up)
        self._clock = clock
        self._window = window
        self.started = clock()
        self._samples = collections.deque([(self.started, 0, 0)])
        self._lock = threading.Lock()

    def estimate(self, docs_total: int | None, bytes_total: int | None) -> None:
        """Set the estimated totals (when they are known only once the work has begun)."""
        self.docs_total, self.bytes_total = docs_total or None, bytes_total or None

    def add(self, docs: int, nbytes: int, chunks: int = 0) -> None:
        with self._lock:
            self.docs += docs
            self.bytes += nbytes
            self.chunks += chunks
            now = self._clock()
            if now - self._samples[-1][0] >= 0.5:  # a sample per half second bounds the deque to window * 2
                self._samples.append((now, self.docs, self.bytes))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
                self._samples.popleft()

    def report(self) -> dict:
        """{"docs", "bytes", "chunks", "docs_total", "bytes_total", "percent", "docs_per_second", "bytes_per_second",
        "eta_seconds", "elapsed_seconds"} (and "phase" when set): percent and eta_seconds are None without a total (or a rate), and the
        percent stops at 99.9 while work goes on past an estimate that was too low."""
        with self._lock:
            now = self._clock()
            t0, d0, b0 = self._samples[0]
            docs, nbytes, chunks = self.docs, self.bytes, self.chunks
        span = now - t0
        bps = (nbytes - b0) / span if span > 0 else 0.0
        dps = (docs - d0) / span if span > 0 else 0.0
        done, total, rate = (nbytes, self.bytes_total, bps) if self.bytes_total else (docs, self.docs_total, dps)
        percent = eta = None
        if total:
            percent = round(min(99.9, 100.0 * done / total), 1)
            if rate > 0:
                eta = round(max(0, total - done) / rate)
        out = {"docs": docs, "bytes": nbytes, "chunks": chunks, "docs_total": self.docs_total, "bytes_total": self.bytes_total,
               "percent": percent, "docs_per_second": round(dps), "bytes_per_second": round(bps),
               "eta_seconds": eta, "elapsed_seconds": round(now - self.started, 1)}
        if self.phase:
            out["phase"] = self.phase
        return out

    def final(self) -> dict:
        """The totals and the average rate over the whole run."""
        with self._lock:
            seconds = self._clock() - self.started
            docs, nbytes = self.docs, self.bytes
        return {"docs": docs, "bytes": nbytes, "chunks": self.chunks, "seconds": round(seconds, 3),
                "docs_per_second": round(docs / seconds) if seconds > 0 else None,
                "bytes_per_second": round(nbytes / seconds) if seconds > 0 else None}


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1000.0
    return "?"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "unknown"
    s = int(round(s))
    if s < 60:
        return "%d s" % s
    if s < 3600:
        return "%d min %02d s" % (s // 60, s % 60)
    return "%d h %02d min" % (s // 3600, s % 3600 // 60)


def line(what: str, r: dict) -> str:
    """One short line for an operator: what, done of total (percent), rate, time left."""
    total = " of %s" % human_bytes(r["bytes_total"]) if r.get("bytes_total") else ""
    pct = " (%.1f %%)" % r["percent"] if r.get("percent") is not None else ""
    eta = ", about %s left" % human_seconds(r["eta_seconds"]) if r.get("eta_seconds") is not None else ""
    done, rate = human_bytes(r["bytes"]), human_bytes(r["bytes_per_second"])
    return "%s: %s%s%s, %d document(s), %s/s%s" % (what, done, total, pct, r["docs"], rate, eta)


def rate_line(final: dict) -> str:
    """The end of long work in one line, from Meter.final()."""
    took = human_seconds(final["seconds"]) if final["seconds"] >= 60 else "%.1f s" % final["seconds"]
    return "%s and %d document(s) in %s: %s/s, %s document(s)/s" % (
        human_bytes(final["bytes"]), final["docs"], took, human_bytes(final["bytes_per_second"] or 0), final["docs_per_second"] or 0)


class Record:
    """A progress record: JSON in a private (0700) folder, rewritten atomically every `every` seconds by a thread while
    the work runs (so it shows a stall too), so a reader (the restore playbook's poll) never sees a partial one.

        with progress.Record(path, "restore", meter):
            work(progress=meter)

    state: "running", then "done" or "failed" (written on leaving the block), or, with remove, the record removed
    then (whoever ran the work reports its result); seq counts the writes."""

    def __init__(self, path: str, what: str, meter: Meter, every: float = 1.0, remove: bool = False) -> None:
        self.path = path
        self.remove = remove
        self.what = what
        self.meter = meter
        self.every = every
        self.seq = 0
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()
        _private_folder(os.path.dirname(os.path.abspath(path)))

    def __enter__(self) -> Record:
        self.write("running")
        self._thread = threading.Thread(target=self._run, name="kmipbackup-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        if not self.remove:
            self._try_write("done" if exc_type is None else "failed")
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _run(self):
        while not self._stop.wait(self.every):
            self._try_write("running")

    def _try_write(self, state):
        try:
            self.write(state)
        except OSError:  # a full or vanished folder (the reader gave up and removed it) must not fail the work
            pass

    def write(self, state: str) -> None:
        report = self.meter.report()
        if state != "running":
            report.update(self.meter.final())
        with self._lock:
            self.seq += 1
            files.write_json(self.path, dict(report, what=self.what, state=state, seq=self.seq, line=line(self.what, report)))


def _private_folder(folder):
    """Create folder 0700, or check that it is one of ours that nobody else can read (never tighten a shared one)."""
    if not os.path.lexists(folder):
        files.ensure_private_dir(folder)
        return
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError("The progress record's folder %s is not a private folder of this user (mode 0700): give a path "
                          "in a folder of its own, e.g. one made by ansible.builtin.tempfile." % folder)


def read_record(path: str) -> dict | None:
    try:
        return files.read_json(path)
    except (OSError, ValueError):
        return None
