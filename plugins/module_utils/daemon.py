# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Backup Daemon (no Ansible imports).

PRIVATE to the collection: it can change at any time.
Runs every job of config_dir/jobs/*.yml in a thread, notices configuration changes by
polling mtimes, writes status/<job>.json atomically, serves request files and takes
scheduled snapshots. Unwrapped keys stay in memory. Run it as

    python -m ansible_collections.kmipbackup.mongodb.plugins.module_utils.daemon \\
        --config-dir /etc/kmipbackup --data-dir /var/lib/kmipbackup [--supervise] [--detach] [--pidfile F]

and --status / --stop with the same --data-dir: both go by the lock DATA_DIR/daemon.lock, never by a pid alone.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import fcntl
import logging
import os
import pwd
import secrets
import signal
import subprocess
import sys
import threading
import time
from logging.handlers import WatchedFileHandler

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import (
    config, datadir, events, files, head, job_config, job_requests, job_status, master_keys, progress, retention, segments,
    snapshot, source, storage, store, timeutil)
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import (
    ConfigError, HistoryLostError, KmipBackupError, KmipError, ResyncRequested, SnapshotError, SourceError, Stopped,
    UnsafePathError)

LOG = logging.getLogger("kmipbackup.daemon")
# changes to these keys restart a job's runner; others (schedule, store, object_store) are picked up live
RESTART_KEYS = ("group", "source", "encryption", "master_key_uid", "generation", "state")
BACKOFF_MAX = 30.0
SUPERVISOR_BACKOFF_MAX = 60.0  # a worker that keeps dying is restarted at most once a minute
STATUS_EVERY = 1.0
VERIFY_EVERY = 600.0     # seconds between sampled head verifications
STORE_CHECK_EVERY = 60.0  # at most this (or 10 segments) between comparisons of the store's range with the head's
VERIFY_SAMPLE = 100      # documents per collection and side
HEARTBEAT_EVERY = 0.5    # seconds between reads of the source's cluster time
HEARTBEAT_TIMEOUT = 1.0  # a read not answered within this marks the source unreachable: outages show within 2 s
SNAPSHOT_WAIT = 600.0    # how long an on-demand snapshot waits for the head when the request names no timeout
OUTAGE_PREFIX = "source unreachable for"


class SourceMonitor(threading.Thread):
    """The job's heartbeat: a reader thread reads the source's cluster time every HEARTBEAT_EVERY seconds with a
    short-timeout `hello` on its own client, whatever the capture thread does (a change-stream read blocks for
    connect_timeout when the source goes away); this thread keeps the job's status current meanwhile (reachability,
    lag in seconds of cluster time), after each read and every HEARTBEAT_EVERY seconds even while a read hangs."""

    def __init__(self, runner: JobRunner) -> None:
        super().__init__(name="heartbeat-%s" % runner.job, daemon=True)
        self.runner = runner
        self.wake = threading.Event()  # read now
        self.beat = threading.Event()  # write status now
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.reachable = None      # None until the first read
        self.cluster_time = None   # (t, i) of the last successful read
        self.read_at = None        # (started, done) monotonic times of that read
        self.checked = None        # its wall time (ISO)
        self.down_since = None     # monotonic time of the first failed read of the current outage
        self.error = None
        self.recoveries = 0        # successful reads that ended an outage

    def poke(self) -> None:
        """Read the source now (an on-demand snapshot waits for a read that started after it was picked up)."""
        self.wake.set()

    def stop(self) -> None:
        self.done.set()
        self.wake.set()
        self.beat.set()

    def _stopped(self):
        return self.done.is_set() or self.runner.stop_event.is_set()

    def run(self) -> None:
        reader = threading.Thread(target=self._read_loop, name="heartbeat-read-%s" % self.runner.job, daemon=True)
        reader.start()
        try:
            while not self._stopped():
                try:
                    self.runner.heartbeat()
                except Exception as e:  # a status write that failed: try again next beat
                    LOG.error("job %s: status not written (%s)", self.runner.job, type(e).__name__)
                self.beat.wait(HEARTBEAT_EVERY)
                self.beat.clear()
        finally:
            reader.join(HEARTBEAT_TIMEOUT + HEARTBEAT_EVERY)

    def _read_loop(self):
        client = None
        try:
            while not self._stopped():
                started = time.monotonic()
                try:
                    if client is None:
                        client = source.monitor_client(self.runner.cfg["source"], HEARTBEAT_TIMEOUT)
                    self._record(started, source.current_cluster_time(client, self.runner.cfg["source"]), None)
                except Exception as e:  # any failure of the read is an unreachable source for the status
                    self._record(started, None, _safe(e, self.runner.cfg))
                self.beat.set()
                self.wake.wait(max(0.0, HEARTBEAT_EVERY - (time.monotonic() - started)))
                self.wake.clear()
        finally:
            if client is not None:
                client.close()

    def _record(self, started, cluster_time, error):
        with self.lock:
            if error is None and cluster_time is not None:
                if self.reachable is False:
                    self.recoveries += 1
                    LOG.info("job %s: source reachable again", self.runner.job)
                self.reachable, self.cluster_time, self.error, self.down_since = True, tuple(cluster_time), None, None
                self.read_at, self.checked = (started, time.monotonic()), timeutil.iso(timeutil.utcnow())
            else:
                if self.reachable is not False:
                    self.down_since = started
                    LOG.warning("job %s: source unreachable: %s", self.runner.job, error)
                self.reachable, self.error = False, error or "the source reported no cluster time"

    def reading_after(self, t: float) -> tuple | None:
        """(cluster_time, done) of a successful read that started after monotonic time t, or None."""
        with self.lock:
            if self.reachable and self.read_at is not None and self.read_at[0] > t:
                return self.cluster_time, self.read_at[1]
            return None

    def fields(self, complete: bool) -> dict:
        """Status fields: source {reachable, cluster_time, checked, unreachable_seconds, error} and lag_seconds, the
        seconds of cluster time the head is behind the source (complete: the time the head holds every write up to)."""
        with self.lock:
            now = time.monotonic()
            down = round(now - self.down_since, 1) if self.down_since is not None else None
            src = {"reachable": self.reachable, "cluster_time": list(self.cluster_time) if self.cluster_time else None,
                   "checked": self.checked, "unreachable_seconds": down, "error": self.error}
            lag = None
            if complete is not None and self.cluster_time is not None:
                lag = max(0, self.cluster_time[0] - complete[0])
                if not self.reachable:  # the source's clock went on while it could not be read: lag grows
                    lag += now - self.read_at[0]
                lag = round(lag, 1)
            return {"source": src, "lag_seconds": lag}


class JobRunner(threading.Thread):
    """Keeps one job's head current: head key, initial sync, capture, requests, snapshots."""

    def __init__(self, daemon: Daemon, cfg: dict) -> None:
        super().__init__(name="job-%s" % cfg["job"], daemon=True)
        self.d = daemon
        self.cfg = cfg
        self.job = cfg["job"]
        self.generation = int(cfg.get("generation") or 1)
        self.stop_event = threading.Event()
        self.kmip = None
        self.head = None
        self.status = self._initial_status()
        self._status_written = 0.0
        self._status_lock = threading.RLock()  # the runner and its heartbeat both write status
        self._next_check = None
        self._storage = None
        self.monitor = SourceMonitor(self)
        self._complete = None      # (t, i): the head holds every source write up to this cluster time
        self._idle_read_at = None  # monotonic start of the last capture read that found the stream idle
        self._waits = {}           # on-demand snapshot requests waiting for the head: {rid: {...}}
        self._seal_retry = 0.0     # monotonic time before which a failed segment seal is not retried
        self._sealer = segments.Sealer()  # the tick's seal passes, on a thread of their own
        self._events_at_close = 0  # status "events" when the open segment began (its events: those since)
        self._store_check = 0.0    # monotonic time of the next comparison of the store's range with the head (segments)
        self._store_range = {"restorable_to": None, "restorable_cluster_time": None, "store_checked": None, "problem": None}
        self._meters = {}          # long work running: status field -> progress.Meter, reported at every status write

    # ---- status ----------------------------------------------------------------------

    def _initial_status(self):
        prev = job_status.read_status(self.d.data_dir, self.job) or {}
        same = prev.get("generation") == self.generation
        return {
            "job": self.job, "state": "INACTIVE", "generation": self.generation,
            "encryption": bool(self.cfg.get("encryption")), "master_key_uid": self.cfg.get("master_key_uid"),
            "consistent": False, "cluster_time": None, "lag_seconds": None, "head_bytes": 0,
            "initial_syncs": prev.get("initial_syncs", 0) if same else 0,
            "history_lost": prev.get("history_lost", 0) if same else 0,
            "verification": prev.get("verification") if same and prev.get("verification") else
            {"checked": 0, "mismatched": 0, "recopied": 0}, "complete_cluster_time": None, "source": None,
            "last_snapshot": prev.get("last_snapshot"), "last_error": None,
            "initial_sync": None, "last_initial_sync": prev.get("last_initial_sync") if same else None, "snapshot": None,
            "updated": None, "pid": os.getpid(), "segments": None,
        }

    def set_status(self, force: bool = True, **fields) -> None:
        with self._status_lock:
            self.status.update(fields)
            now = time.monotonic()
            if not force and now - self._status_written < STATUS_EVERY:
                return
            self._status_written = now
            self.status["updated"] = timeutil.iso(timeutil.utcnow())
            self.status["pid"] = os.getpid()
            for field, meter in self._meters.items():
                self.status[field] = meter.report()
            h = self.head
            self.status["head_bytes"] = h.size() if h is not None else _folder_bytes(self.head_path)
            job_status.write_status(self.d.data_dir, self.job, self.status)

    @contextlib.contextmanager
    def _progress(self, field):
        """A progress.Meter that status reports as field (its counters, rate and ETA) while the block runs, then null."""
        meter = progress.Meter()
        with self._status_lock:
            self._meters[field] = meter
        try:
            yield meter
        finally:
            with self._status_lock:
                del self._meters[field]
                self.status[field] = None
            self.set_status(force=False)

    def heartbeat(self) -> None:
        """Called by the heartbeat after each read: an outage shows in status at once and, while it lasts, status is
        rewritten every heartbeat with a growing lag; otherwise at least every STATUS_EVERY seconds."""
        with self._status_lock:
            was_down = (self.status.get("source") or {}).get("reachable") is False
            fields = self._source_fields({})
            down = fields["source"]["reachable"] is False
            self.set_status(force=down or was_down, **fields)

    def _source_fields(self, fields):
        """fields plus the heartbeat's: source, lag_seconds and, while the source is unreachable, consistent=false and
        last_error saying so (an error of the runner's own is kept). Call with _status_lock held."""
        out = dict(fields, **self.monitor.fields(self._complete))
        src = out["source"]
        err = out["last_error"] if "last_error" in out else self.status.get("last_error")
        ours = (err or "").startswith(OUTAGE_PREFIX)
        if src["reachable"] is False:
            out["consistent"] = False  # the head is consistent at its own time, no longer with the source
            if ours or not err:
                out["last_error"] = "%s %.1f s: %s Change capture resumes when it is back." % (
                    OUTAGE_PREFIX, src["unreachable_seconds"] or 0.0, src["error"])
        elif ours:
            out["last_error"] = None  # capture sets consistent again once it reads the stream
        return out

    def error(self, state: str, message: str) -> None:
        """Record a failure the runner will retry (message carries no secret or document content)."""
        if message != self.status.get("last_error") or state != self.status.get("state"):
            LOG.warning("job %s: %s", self.job, message)
        self.set_status(state=state, last_error=message, consistent=False)

    # ---- control ---------------------------------------------------------------------

    @property
    def head_path(self) -> str:
        return datadir.head_dir(self.d.data_dir, self.job, self.generation)

    def update(self, cfg: dict) -> None:
        """Apply a change that does not need a restart (schedule, store)."""
        self.cfg = cfg

    def stop(self) -> None:
        self.stop_event.set()
        self.monitor.stop()

    def sleep(self, seconds: float) -> None:
        if self.stop_event.wait(seconds):
            raise Stopped()

    def check_stop(self) -> None:
        if self.stop_event.is_set():
            raise Stopped()

    def run(self) -> None:
        backoff = timeutil.Backoff(cap=BACKOFF_MAX)
        try:
            if self.cfg.get("state") == "stopped":
                self.set_status(state="STOPPED", consistent=False, lag_seconds=None, last_error=None)
                LOG.info("job %s: stopped", self.job)
                self.stop_event.wait()
                return
            self.monitor.start()
            while True:
                try:
                    self._run()
                    return
                except Stopped:
                    raise
                except Exception as e:  # keep the daemon alive, report it, retry with backoff
                    if isinstance(e, KmipBackupError):
                        LOG.error("job %s: %s", self.job, e)
                    elif self.cfg.get("encryption"):  # no traceback: messages could quote data
                        LOG.error("job %s: unexpected failure (%s)", self.job, type(e).__name__)
                    else:
                        LOG.exception("job %s: unexpected failure", self.job)
                    self._close()
                    delay = backoff.next()
                    self.error("INACTIVE", "%s; retrying in %ds" % (_safe(e, self.cfg), delay))
                    self.sleep(delay)
        except Stopped:
            pass
        finally:
            self.monitor.stop()
            self._close()
            if self.monitor.is_alive():
                self.monitor.join(timeout=2 * HEARTBEAT_TIMEOUT + HEARTBEAT_EVERY)

    def _close(self):
        self._sealer.close()  # a pass still running uses the head and the KMIP session
        for obj in (self.head, self.kmip):
            close = getattr(obj, "close", None)
            if close:
                try:
                    close()
                except Exception:  # closing on the way out: nothing more to do
                    pass
        self.head = None
        self.kmip = None

    def _run(self):
        backoff = timeutil.Backoff(cap=BACKOFF_MAX)
        key, rotated = self._head_key()
        files.ensure_private_dir(self.head_path)
        self.head = head.Head(os.path.join(self.head_path, "head.db"), key)
        if rotated:
            self._rekey_head()
        self._segments_start(rotated)
        while True:
            self.check_stop()
            try:
                self._sync()
                backoff.reset()
            except HistoryLostError:
                self.status["history_lost"] = self.status.get("history_lost", 0) + 1
                LOG.warning("job %s: resume point lost; starting a new initial sync", self.job)
                self.error("PROVISIONING", "the source's history no longer holds the resume point; a new initial sync runs")
                self._reset_head()
            except ResyncRequested:
                self._reset_head()
            except SourceError as e:
                delay = backoff.next()
                self.error(self.status["state"] if self.status["state"] in ("PROVISIONING", "STARTED") else "INACTIVE",
                           "source unavailable, retrying in %ds: %s" % (delay, _safe(e, self.cfg)))
                self._source_backoff(delay)

    def _source_backoff(self, seconds):
        """Wait seconds, or less when the heartbeat sees the source come back from an outage meanwhile."""
        recoveries = self.monitor.recoveries
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.monitor.recoveries == recoveries:
            self.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _reset_head(self):
        self._seal_collect()
        with self.head.write() as w:
            w.clear()
        self._complete = None

    # ---- change segments (point in time) ---------------------------------------------

    def _pitr(self):
        """(segment seconds, window hours) of the job; window 0: point in time is off."""
        return (float(self.cfg.get("point_in_time_segment_seconds") or segments.DEFAULT_SEGMENT_SECONDS),
                float(self.cfg.get("point_in_time_window_hours", segments.DEFAULT_WINDOW_HOURS) or 0))

    def _segments_start(self, rotated):
        """After the head opens: record segments when the job keeps a window; seal what a previous run closed or left
        open (a key rotation or a restart closes the open segment; a kill -9 loses nothing: the records are in the head)."""
        self._seal_collect()
        _seconds, window = self._pitr()
        self.head.record_segments = window > 0
        if window <= 0 and self.head.segment_state()["timeline"] is not None:
            with self.head.write() as w:  # point in time was turned off: the timeline ends here
                w.end_timeline()
        elif rotated:
            self._close_segment()
        self._segments_seal()

    def _segments_tick(self):
        """Between capture rounds: close the open segment once it is point_in_time_segment_seconds old, seal what is
        closed (a failed seal, e.g. the store unreachable, is retried every 30 s; its records stay in the head)."""
        seconds, window = self._pitr()
        if (window > 0) != self.head.record_segments:
            self._segments_start(False)  # the option changed: picked up live
        if self.head.record_segments and segments.due(self.head, seconds):
            self._close_segment()
        self._seal_collect(wait=False)
        if not self._sealer.busy() and time.monotonic() >= self._seal_retry and segments.sealable(self.head):
            self._segments_seal(wait=False)
        self._segments_status()

    def _close_segment(self):
        if segments.close(self.head) is not None:
            self._events_at_close = self.status.get("events") or 0

    def _segments_close(self, js=None, keys=None):
        if self.head.record_segments:
            self._close_segment()
        self._segments_seal(js, keys)

    def _segments_seal(self, js=None, keys=None, wait=True):
        """Seal the closed segments: now (wait), or (not wait: the tick) in a pass on the sealer's thread, collected
        by a later tick (_seal_collect). A pass still running is collected first: passes seal in order, one at a time."""
        self._seal_collect()
        if not self.head.closed_segments():
            return
        try:
            if self.cfg.get("encryption") and self.kmip is None:
                self.kmip = self._kmip_client()
            if js is None:
                js, keys = self._job_store()
            if not wait:
                keys.key(keys.epoch_for(self.cfg.get("master_key_uid"))[0])  # unwrapped here: KMIP stays on this thread
                self._sealer.start(self.head, js, keys, self.cfg.get("master_key_uid"))
                return
            self._sealed(segments.seal_closed(self.head, js, keys, self.cfg.get("master_key_uid")), js, keys)
        except KmipBackupError as e:
            self._seal_failed(e)

    def _seal_collect(self, wait=True):
        """The sealer's pass, once finished (wait: waits for it): its outcome reported as a seal done here is."""
        if not self._sealer.busy():
            return
        js, keys = self._sealer.target()
        try:
            sealed = self._sealer.collect(wait)
        except Exception as e:  # pylint: disable=broad-except  # any failure of the pass: retried, never the caller's
            sealed = e
        if isinstance(sealed, Exception):
            self._seal_failed(sealed)
        elif sealed is not None:
            self._sealed(sealed, js, keys)

    def _sealed(self, sealed, js, keys):
        self._seal_retry = 0.0
        if sealed:
            LOG.debug("job %s: %d change segments sealed", self.job, len(sealed))
        if time.monotonic() >= self._store_check:
            self._segments_check_store(js, keys)

    def _seal_failed(self, e):
        self._seal_retry = time.monotonic() + 30
        self.set_status(last_error="sealing change segments failed (kept in the head, retried): %s" % _safe(e, self.cfg))
        LOG.warning("job %s: sealing change segments failed; retrying in 30 s", self.job)

    def _segments_check_store(self, js, keys):
        """After a seal at most every STORE_CHECK_EVERY seconds (or 10 segments), and after each snapshot: the newest
        restorable range as the store shows it (restorable_ranges: what a restore can use), compared with the last
        segment this head sealed. The store alone cannot vouch for segments after its newest snapshot; the head can: one
        missing is reported (status segments.problem). Never fails the caller (a snapshot is committed by then)."""
        self._store_check = time.monotonic() + min(STORE_CHECK_EVERY, 10 * self._pitr()[0])
        last = segments.cut_segment(self.head)
        problem, newest = None, None
        try:
            ranges = segments.restorable_ranges(js, keys)["ranges"]
            newest = ranges[-1] if ranges else None
        except Exception as e:  # reported in status, checked again later
            problem = "reading the store's restorable ranges failed: %s" % _safe(e, self.cfg)
        if newest is not None and last is not None and newest["timeline"] == last["timeline"] and (
                newest["to"]["t"], newest["to"]["i"]) < tuple(last["to"]):
            problem = ("the store's restorable range of timeline %s ends at cluster time %d.%d, but this daemon sealed "
                       "segment %010d up to %d.%d: change segments were removed from the store"
                       % (last["timeline"], newest["to"]["t"], newest["to"]["i"], last["seq"], last["to"][0], last["to"][1]))
        if problem:
            LOG.warning("job %s: point in time: %s", self.job, problem)
        with self._status_lock:
            self._store_range = {"restorable_to": newest["to_time"] if newest else None,
                                 "restorable_cluster_time": [newest["to"]["t"], newest["to"]["i"]] if newest else None,
                                 "store_checked": timeutil.iso(timeutil.utcnow()), "problem": problem}

    def _segments_status(self):
        """status["segments"]: point-in-time health, counts and times only."""
        if self.head is None:
            return
        state = self.head.segment_state()
        last = segments.cut_segment(self.head)
        out = {"enabled": bool(self.head.record_segments), "timeline": state["timeline"],
               "sealed_to": segments.ct_time(last["to"]) if last else None,
               "sealed_cluster_time": last["to"] if last else None,
               "open_events": max(0, (self.status.get("events") or 0) - self._events_at_close) if state["timeline"] else 0,
               "awaiting_seal": len(self.head.closed_segments())}
        out.update(self._store_range)
        if out != self.status.get("segments"):
            self.set_status(force=False, segments=out)

    def _segments_collect(self, js, keys, now):
        """Segments no restore inside the window needs go with the snapshots' garbage collection."""
        _seconds, window = self._pitr()
        try:
            out = segments.collect(js, keys, window, now)
            if out["segments_deleted"]:
                LOG.info("job %s: %d change segments collected", self.job, out["segments_deleted"])
        except KmipBackupError as e:
            LOG.warning("job %s: collecting change segments failed: %s", self.job, _safe(e, self.cfg))

    # ---- keys ------------------------------------------------------------------------

    def _head_key(self):
        """(head key bytes, whether the master key was rotated since the head key was wrapped); (None, False)
        for an unencrypted job. Waits with backoff while KMIP is unreachable; nothing is written meanwhile."""
        if not self.cfg.get("encryption"):
            return None, False
        uid = self.cfg.get("master_key_uid")
        if not uid:
            raise ConfigError("job %s has encryption on but no master_key_uid" % self.job)
        path = os.path.join(self.head_path, "headkey.json")
        backoff = timeutil.Backoff(cap=BACKOFF_MAX)
        while True:
            self.check_stop()
            try:
                self.kmip = self.kmip or self._kmip_client()
                _finish_rekey(self.head_path)
                record = files.read_json(path)
                if record is None:
                    key = secrets.token_bytes(32)
                    record = {"job": self.job, "generation": self.generation, "created": timeutil.iso(timeutil.utcnow()),
                              "wrapped": self.kmip.wrap(uid, key)}
                    files.ensure_private_dir(self.head_path)
                    files.write_json(path, record)
                    LOG.info("job %s: head key created for generation %d", self.job, self.generation)
                    return key, False
                key = self.kmip.unwrap(record["wrapped"])
                return key, str(record["wrapped"].get("master_key_uid")) != str(uid)
            except (KmipError, ConfigError) as e:
                self._drop_kmip()
                delay = backoff.next()
                self.error("INACTIVE", "waiting for KMIP (retry in %ds): %s" % (delay, e))
                self.sleep(delay)

    def _rekey_head(self):
        """The master key was rotated: re-encrypt the head under a new head key wrapped by the new master key,
        so an old master key no longer opens the head (rewrapping the old head key would not do that).

        Capture pauses meanwhile (the stream resumes from the head's token); status shows the progress.
        Crash-safe: the new head and its key record are written into heads/<job>/<gen>/rekey/; the head file
        is moved into place first, then the key record, and _finish_rekey completes a move a crash cut short."""
        uid = self.cfg["master_key_uid"]
        folder = os.path.join(self.head_path, REKEY_DIR)
        datadir.remove_tree(folder)  # an earlier rekey cut short before its head file was moved: start over
        files.ensure_private_dir(folder)
        key = secrets.token_bytes(32)
        old = files.read_json(os.path.join(self.head_path, "headkey.json"))
        record = {"job": self.job, "generation": self.generation, "created": timeutil.iso(timeutil.utcnow()),
                  "wrapped": self.kmip.wrap(uid, key), "rekeyed_from": old["wrapped"].get("master_key_uid")}
        started = time.monotonic()
        LOG.info("job %s: master key rotated; re-encrypting the head under a new head key", self.job)

        def progress(done, total):
            self.set_status(force=False, state="PROVISIONING", consistent=False, last_error=None,
                            rekey={"bytes_written": done, "head_bytes": total, "seconds": round(time.monotonic() - started, 1)})
        self.set_status(state="PROVISIONING", consistent=False, last_error=None, rekey={"bytes_written": 0})
        self.head.export_rekeyed(os.path.join(folder, "head.db"), key, progress)
        files.write_json(os.path.join(folder, "headkey.json"), record)
        self.head.close()
        self.head = None
        _finish_rekey(self.head_path)
        self.head = head.Head(os.path.join(self.head_path, "head.db"), key)
        seconds = time.monotonic() - started
        last = {"finished": timeutil.iso(timeutil.utcnow()), "seconds": round(seconds, 1), "head_bytes": self.head.size()}
        self.set_status(rekey=None, last_rekey=last)
        LOG.info("job %s: head re-encrypted under the new master key in %.1fs", self.job, seconds)

    def _kmip_client(self):
        """The job's KMIP client, one call at a time: the sealer's thread may unwrap an older epoch's key (a segment
        stored before a crash) while this thread uses the session."""
        return _OneCallAtATime(master_keys.kmip_client(self.d.config_dir, self.cfg["group"]))

    def _drop_kmip(self):
        if self.kmip is not None:
            try:
                self.kmip.close()
            except Exception:  # a broken session: it is replaced anyway
                pass
        self.kmip = None

    # ---- sync and capture ------------------------------------------------------------

    def _sync(self):
        client = source.connect(self.cfg["source"])
        try:
            if source.needs_initial_sync(self.head):
                LOG.info("job %s: initial sync of generation %d", self.job, self.generation)
                with self._progress("initial_sync") as meter:
                    self.set_status(state="PROVISIONING", consistent=False, last_error=None)  # shows the sync started
                    stats = source.initial_sync(self.head, client, stop_event=self.stop_event, progress=meter)
                self.check_stop()
                self.status["initial_syncs"] = self.status.get("initial_syncs", 0) + 1
                self.status["last_initial_sync"] = dict(meter.final(), finished=timeutil.iso(timeutil.utcnow()),
                                                        docs_total=meter.docs_total, bytes_total=meter.bytes_total)
                LOG.info("job %s: initial sync done: %d namespaces, %d documents, %d bytes, %d events, %.1fs",
                         self.job, stats["namespaces"], stats["docs"], stats["bytes"], stats["events"], stats["seconds"])
            self._capture(client)
        finally:
            client.close()

    def _capture(self, client):
        cap = source.Capture(self.head, client)
        self._events_at_close = 0  # the capture counts its events from 0
        next_verify = time.monotonic() + VERIFY_EVERY
        try:
            while True:
                self.check_stop()
                started = time.monotonic()
                applied = cap.run_once(max_time=0.5)
                pos = self.head.position()
                consistent = bool(pos.get("consistent"))
                ct = pos.get("cluster_time")
                if consistent and not applied:
                    self._idle_read_at = started  # a read that began at `started` found nothing more to apply
                self._complete = _complete_time(pos) or self._complete
                if consistent and self.status["state"] != "STARTED":
                    LOG.info("job %s: head consistent; capture running", self.job)
                    self.set_status(state="STARTED", consistent=True, cluster_time=ct, last_error=None)
                    self.d.generation_ready(self.job, self.generation)
                with self._status_lock:
                    self.set_status(force=False, **self._source_fields(dict(
                        consistent=consistent, cluster_time=ct, events=cap.stats["events"],
                        complete_cluster_time=list(self._complete) if self._complete else None,
                        last_error=None if self.status["state"] == "STARTED" else self.status.get("last_error"))))
                self._serve_requests(client)
                if consistent and time.monotonic() >= next_verify:
                    next_verify = time.monotonic() + VERIFY_EVERY
                    self._verify(client, full=False)
                if consistent:
                    self._scheduled_snapshot()
                self._segments_tick()
        finally:
            cap.close()

    # ---- requests and snapshots ------------------------------------------------------

    def _serve_requests(self, client):
        pending = job_requests.pending_requests(self.d.data_dir, self.job)
        for rid in set(self._waits) - {rid for rid, _req in pending}:
            del self._waits[rid]  # answered or removed meanwhile
        for rid, req in pending:
            action = req.get("action")
            try:
                if action == "snapshot":
                    result = self._requested_snapshot(rid, req)
                    if result is None:
                        continue  # the head has not reached the source's cluster time yet: look again next round
                elif action == "verify":
                    result = self._verify(client, full=True)
                elif action == "resync":
                    job_requests.answer_request(self.d.data_dir, self.job, rid, result={"resync": "started"})
                    LOG.info("job %s: resync requested", self.job)
                    raise ResyncRequested()
                else:
                    raise ConfigError("unknown request action %r: use snapshot, verify or resync" % action)
                job_requests.answer_request(self.d.data_dir, self.job, rid, result=result)
            except KmipBackupError as e:
                job_requests.answer_request(self.d.data_dir, self.job, rid, error=_safe(e, self.cfg))

    def _requested_snapshot(self, rid, req):
        """An on-demand snapshot holding every write the source acknowledged before the request was picked up; None
        while the head has not reached that point yet. The source's cluster time is read (by the heartbeat) after the
        pick-up; the cut waits until the head holds every write up to that time, at most until shortly before the
        requester stops waiting, then fails naming the lag and writes nothing."""
        now = time.monotonic()
        w = self._waits.get(rid)
        if w is None:
            if self.status.get("state") != "STARTED":  # an initial sync can take hours: say so now, as before
                raise SnapshotError("job %s has no consistent head yet: wait for status STARTED and try again"
                                    % self.job)
            budget = _wait_budget(rid, req)
            w = self._waits[rid] = {"picked": now, "deadline": now + budget, "target": None}
            self.monitor.poke()
            LOG.info("job %s: snapshot request %s waits for the head to reach the source's cluster time (at most %.0f s)",
                     self.job, rid, budget)
        if w["target"] is None:
            reading = self.monitor.reading_after(w["picked"])
            if reading is not None:
                w["target"], w["read_done"] = reading
        if w["target"] is not None and self._covers(w):
            self._waits.pop(rid, None)
            result = self.take_snapshot(on_demand=True)
            result.update(source_cluster_time=list(w["target"]), waited_seconds=round(time.monotonic() - w["picked"], 3))
            return result
        if now < w["deadline"]:
            return None
        self._waits.pop(rid, None)
        waited = now - w["picked"]
        if w["target"] is None:
            raise SnapshotError(
                "Job %s: the source's current cluster time could not be read within %.0f s (%s), so no snapshot can be "
                "shown to hold every acknowledged write; nothing was written. Check that the source is reachable from the "
                "daemon's host (status source.error) and ask again." % (self.job, waited, self.monitor.error or "no answer"))
        behind = self.monitor.fields(self._complete)["lag_seconds"]
        raise SnapshotError(
            "Job %s: the head did not catch up with the source's cluster time %s (read when the snapshot was requested) "
            "within %.0f s: %s; nothing was written. Ask again with a longer timeout, or find why the daemon applies "
            "changes slower than the source takes them (status lag_seconds, the daemon's log)." % (
                self.job, list(w["target"]), waited,
                "it is %s s of cluster time behind the source (the head holds every write up to %s)" % (
                    behind, list(self._complete)) if behind is not None and self._complete
                else "the head is not consistent (status consistent, last_error)"))

    def _covers(self, w):
        """True when the head holds every source write at or before the request's target cluster time."""
        pos = self.head.position()
        if not pos.get("consistent"):
            return False
        target = tuple(w["target"])
        if pos.get("cluster_time") and tuple(pos["cluster_time"]) >= target:
            return True  # consistent at a time at or past the target: nothing more is coming up to it
        token = events.token_time(pos.get("resume_token"))
        if token is not None:
            return token > target  # an idle stream's post-batch token past the target: every event before it applied
        # a resume token of unknown format: an idle read of the stream that began after the target was read
        return self._idle_read_at is not None and self._idle_read_at > w["read_done"]

    def _verify(self, client, full):
        counts = source.verify(self.head, client, sample=VERIFY_SAMPLE, full=full)
        v = self.status["verification"]
        for k in source.VERIFY_COUNTS:
            v[k] = v.get(k, 0) + int(counts.get(k, 0))
        v["last"] = timeutil.iso(timeutil.utcnow())
        if counts.get("mismatched"):
            LOG.warning("job %s: verification found %d mismatched documents and re-copied them", self.job, counts["mismatched"])
        self.set_status()
        return counts

    def _job_store(self):
        """The job's JobStore and Keys; the Storage (a bucket's client) is kept while the store settings stay."""
        where = (self.cfg.get("store"), self.cfg.get("object_store"))
        if self._storage is None or self._storage[0] != where:
            self._storage = (where, storage.job_storage(self.cfg, self.d.data_dir, create=True))
        js = store.JobStore(self._storage[1], self.job)
        return js, store.Keys(js, provider=self.kmip, encryption=bool(self.cfg.get("encryption")))

    def _scheduled_snapshot(self):
        now = timeutil.utcnow()
        if self._next_check and now < self._next_check:
            return
        self._next_check = now + datetime.timedelta(seconds=30)
        try:
            js, _keys = self._job_store()
            entries = [e for e in js.catalog() if e.get("type") != "on-demand"]
            if retention.due(now, entries[-1] if entries else None, self.cfg.get("schedule") or job_config.SCHEDULE_DEFAULTS):
                self.take_snapshot(on_demand=False)
        except KmipBackupError as e:
            self.set_status(last_error="scheduled snapshot failed: %s" % _safe(e, self.cfg))
            LOG.warning("job %s: scheduled snapshot failed", self.job)

    def take_snapshot(self, on_demand: bool) -> dict:
        if not (self.head.position() or {}).get("consistent"):
            raise KmipBackupError("job %s has no consistent head yet: wait for status STARTED and try again" % self.job)
        schedule = self.cfg.get("schedule") or job_config.SCHEDULE_DEFAULTS
        kind = "on-demand" if on_demand else "scheduled"
        started = time.monotonic()
        if self.cfg.get("encryption") and self.kmip is None:
            self.kmip = self._kmip_client()
        js, keys = self._job_store()
        self._segments_close(js, keys)  # the snapshot's cluster time is a segment boundary
        now = timeutil.utcnow()
        with self._progress("snapshot") as meter:
            info = snapshot.take_snapshot(self.head, js, keys, job=self.job, master_key_uid=self.cfg.get("master_key_uid"),
                                          encryption=bool(self.cfg.get("encryption")), kind=kind, now=now,
                                          expires=retention.expires(now, kind, schedule),
                                          last_known=(self.status.get("last_snapshot") or {}).get("id"), progress=meter)
        self.head.mark_snapshotted(info["change_seq"])
        expired = retention.apply_retention(js, schedule, now, keys)
        gc = js.gc(keys)
        self._segments_collect(js, keys, now)
        if self.head.record_segments:
            self._segments_check_store(js, keys)
            self._segments_status()
        last = {"id": info["snapshot_id"], "created": info["created"], "cluster_time": info["cluster_time"], "type": kind}
        self.set_status(last_snapshot=last, snapshots=gc["catalog_entries"])
        LOG.info("job %s: %s snapshot in %.1fs: %d chunks written, %d reused; %d expired; %d chunks collected",
                 self.job, kind, time.monotonic() - started, info.get("written_chunks", 0), info.get("reused_chunks", 0),
                 len(expired), gc.get("chunks_deleted", 0))
        return dict(last, data_bytes=info.get("data_bytes"), written_bytes=info.get("written_bytes"),
                    doc_count=info.get("doc_count"), master_key_uids=info.get("master_key_uids"))


def _complete_time(pos):
    """The cluster time up to which a head position holds every source write, or None when it is not consistent: its
    last applied cluster time, or the time of an idle stream's post-batch resume token when that is later."""
    if not pos or not pos.get("consistent") or not pos.get("cluster_time"):
        return None
    ct = tuple(pos["cluster_time"])
    token = events.token_time(pos.get("resume_token"))
    return max(ct, tuple(token)) if token is not None else ct


def _wait_budget(rid, req):
    """Seconds an on-demand snapshot may wait for the head: the requester's timeout (request field "timeout") less the
    time since the request was made (its id starts with that time in ms) and a margin for the cut itself, so the
    requester gets the daemon's answer, not a timeout of its own."""
    try:
        timeout = float(req.get("timeout") or 0)
    except (TypeError, ValueError):
        timeout = 0.0
    if timeout <= 0:
        return SNAPSHOT_WAIT
    try:
        elapsed = max(0.0, time.time() - int(rid.split("-", 1)[0]) / 1000.0)
    except ValueError:
        elapsed = 0.0
    return max(0.0, timeout - elapsed - min(30.0, max(1.0, 0.2 * timeout)))


REKEY_DIR = "rekey"


def _finish_rekey(head_path):
    """Complete or discard a head rekey (JobRunner._rekey_head) that a crash cut short: once the new key
    record exists, the new head file is complete and its move is finished; before that, the new files
    are discarded and the old head (still whole, checkpointed) stays."""
    folder = os.path.join(head_path, REKEY_DIR)
    if not os.path.isdir(folder):
        return
    new_db, new_key = os.path.join(folder, "head.db"), os.path.join(folder, "headkey.json")
    if os.path.exists(new_key):
        if os.path.exists(new_db):
            for suffix in ("-wal", "-shm"):  # the old head's, empty after its checkpoint and close
                try:
                    os.unlink(os.path.join(head_path, "head.db" + suffix))
                except FileNotFoundError:
                    pass
            os.replace(new_db, os.path.join(head_path, "head.db"))
        os.replace(new_key, os.path.join(head_path, "headkey.json"))
        files.fsync_dir(head_path)
    datadir.remove_tree(folder)


class _OneCallAtATime:
    """A client whose methods are called under one lock (a KMIP session is not shared between threads)."""

    def __init__(self, client) -> None:
        self._client, self._lock = client, threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)
        return call


def _safe(err, cfg):
    """An error's message for status and logs (KmipBackupError messages carry no secrets; a
    source error keeps its class and code, never the server's text)."""
    if isinstance(err, KmipBackupError):
        return str(err)
    if source.mongo_errors is not None and isinstance(err, source.mongo_errors.PyMongoError):
        hint = ""
        if getattr(err, "code", None) in (13, 18):  # Unauthorized, AuthenticationFailed
            hint = ": grant the source user the backup role (read on every database, listDatabases, changeStream)"
        return "source error %s%s" % (source._safe(err), hint)  # pylint: disable=protected-access
    return type(err).__name__


def _folder_bytes(path):
    total = 0
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.is_file(follow_symlinks=False):
                    total += e.stat().st_size
    except FileNotFoundError:
        pass
    return total


class Daemon:
    """Runs every declared job; reconciles with config_dir every poll_interval seconds."""

    def __init__(self, config_dir: str, data_dir: str, poll_interval: float = 1.0) -> None:
        self.config_dir = config_dir
        self.data_dir = data_dir
        self.poll_interval = poll_interval
        self.runners = {}
        self.mtimes = {}
        self.stop_event = threading.Event()
        with datadir.open_data_dir(data_dir) as root:  # refused when a link, writable by others or foreign-owned
            for sub in ("status", "heads", "requests"):
                root.sub(sub).close()

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        LOG.info("daemon started (pid %d)", os.getpid())
        try:
            while not self.stop_event.is_set():
                try:
                    self.reconcile()
                except Exception as e:  # keep serving the other jobs
                    LOG.error("reconcile failed: %s", type(e).__name__)
                self.stop_event.wait(self.poll_interval)
        finally:
            for r in list(self.runners.values()):
                r.stop()
            for r in list(self.runners.values()):
                r.join(timeout=30)
            LOG.info("daemon stopped")

    def _read_jobs(self):
        """{job: (mtime, cfg)} of the declared jobs that parse."""
        out = {}
        for job in config.list_jobs(self.config_dir):
            path = config.job_path(self.config_dir, job)
            try:
                mtime = os.stat(path).st_mtime_ns
            except FileNotFoundError:
                continue
            if job in self.mtimes and self.mtimes[job][0] == mtime:
                out[job] = self.mtimes[job]
                continue
            try:
                cfg = job_config.load_job(self.config_dir, job)
            except ConfigError as e:
                LOG.error("job %s: %s", job, e)
                continue
            if cfg is not None:
                out[job] = (mtime, cfg)
        return out

    def reconcile(self) -> None:
        declared = self._read_jobs()
        for job, (mtime, cfg) in declared.items():
            runner = self.runners.get(job)
            if runner is not None and not runner.is_alive() and not runner.stop_event.is_set():
                runner = None  # crashed: restart below
            if runner is None:
                self._start(cfg)
            elif self.mtimes.get(job, (None,))[0] != mtime:
                if any(runner.cfg.get(k) != cfg.get(k) for k in RESTART_KEYS):
                    LOG.info("job %s: configuration changed; restarting its runner", job)
                    runner.stop()
                    runner.join(timeout=60)
                    self._start(cfg)
                else:
                    runner.update(cfg)
            self.mtimes[job] = (mtime, cfg)
        for job in list(self.runners):
            if job not in declared:
                self._terminate(job)
        # heads left by jobs removed while the daemon was down
        try:
            leftovers = set(os.listdir(os.path.join(self.data_dir, "heads"))) - set(declared)
        except FileNotFoundError:
            leftovers = set()
        for job in leftovers:
            if config._NAME.match(job):
                self._terminate(job)

    def _start(self, cfg):
        runner = JobRunner(self, cfg)
        self.runners[cfg["job"]] = runner
        runner.start()

    def _terminate(self, job):
        LOG.info("job %s: removed; terminating", job)
        runner = self.runners.pop(job, None)
        self.mtimes.pop(job, None)
        status = job_status.read_status(self.data_dir, job) or {"job": job}
        status.update(state="TERMINATING", updated=timeutil.iso(timeutil.utcnow()), pid=os.getpid(), consistent=False)
        job_status.write_status(self.data_dir, job, status)
        if runner is not None:
            runner.stop()
            runner.join(timeout=60)
        datadir.remove_tree(datadir.heads_dir(self.data_dir, job))
        datadir.remove_tree(datadir.requests_dir(self.data_dir, job))
        job_status.remove_status(self.data_dir, job)
        LOG.info("job %s: head removed (snapshots in the store are kept)", job)

    def generation_ready(self, job: str, generation: int) -> None:
        """The head of this generation is consistent: destroy older generations' heads."""
        folder = datadir.heads_dir(self.data_dir, job)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return
        for n in names:
            if n.isdigit() and int(n) != generation:
                datadir.remove_tree(os.path.join(folder, n))
                LOG.info("job %s: head of generation %s removed (generation %d is consistent)", job, n, generation)


# ---- process: logging, signals, supervision ----------------------------------------------

def setup_logging(path: str, level: str = "INFO") -> None:
    files.ensure_private_dir(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, files.PRIVATE_FILE)
    try:
        os.fchmod(fd, files.PRIVATE_FILE)  # the log file itself, never a link's target
    finally:
        os.close(fd)
    handler = WatchedFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(message)s"))
    root = logging.getLogger("kmipbackup")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return path


# ---- the data folder's locks ----------------------------------------------------------------
# Whether a daemon runs is decided by flock, never by a pid: the kernel drops a lock when its holder dies
# (kill -9 included; a zombie holds none), whereas a pid can name a zombie or an unrelated process that
# reuses it. daemon.lock is held by the process the launcher starts (the supervisor, or the worker when
# unsupervised); worker.lock by the process that runs the jobs, so an orphaned worker of a killed supervisor
# still keeps a second worker off the folder. Each holds its own pid inside. The files are never removed
# or replaced: a new inode would let two processes each lock their own file.
LOCK_FILE = "daemon.lock"
WORKER_LOCK_FILE = "worker.lock"


class DataDirLock:
    """An exclusive flock on a file of the data folder, held for the holder's lifetime."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = None

    def try_acquire(self, wait: float = 0.0) -> bool:
        """True once held; False when another process holds it after `wait` seconds."""
        try:  # never through a link planted in the data folder (the lock file is truncated below)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, files.PRIVATE_FILE)
        except PermissionError:
            raise ConfigError("The daemon's lock file %s cannot be opened for writing by this user (uid %d): give it "
                              "to the daemon's user (chown) or run the daemon as its owner." % (self.path, os.geteuid())) from None
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise UnsafePathError("The daemon's lock file %s is a symbolic link: kmipbackup never follows links inside "
                                  "its folders; remove it and start the daemon again." % self.path) from None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.1)
        try:
            os.fchmod(fd, files.PRIVATE_FILE)
        except PermissionError:  # created by another user (e.g. root before --user): the lock still works
            pass
        os.ftruncate(fd, 0)  # no pid until record(): a reader never sees a former holder's pid as ours
        self.fd = fd
        return True

    def record(self, pid: int) -> None:
        """Write the holder's pid (after --detach's forks, the final process's)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, b"%d\n" % pid, 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the lock
            self.fd = None


def _opens(pid, path):
    """Whether process pid has path open: the recorded pid is trusted only if it does (Linux /proc);
    None where /proc cannot tell."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    try:
        want = os.stat(path)
        names = os.listdir("/proc/%d/fd" % pid)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    for n in names:
        try:
            st = os.stat("/proc/%d/fd/%s" % (pid, n))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            return True
    return False


def lock_holder(path: str, settle: float = 2.0) -> tuple[bool, int | None]:
    """(held, pid): whether a process holds the lock at path, and its pid when confirmed (else None).
    A pid is returned only if the lock is held and that process has the lock file open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, None
    except PermissionError:
        raise ConfigError("The daemon's lock file %s cannot be read by this user (uid %d): run this as the daemon's "
                          "user or root." % (path, os.geteuid())) from None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise UnsafePathError("The daemon's lock file %s is a symbolic link: remove it." % path) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False, None
        except BlockingIOError:
            pass
        deadline = time.monotonic() + settle
        while True:  # a holder that just took the lock writes its pid a moment later
            try:
                pid = int(os.pread(fd, 32, 0).decode().strip())
            except ValueError:
                pid = None
            if pid and _opens(pid, path) is not False:
                return True, pid
            if time.monotonic() >= deadline:
                return True, None
            time.sleep(0.1)
    finally:
        os.close(fd)


def _stop_holder(path, what, timeout):
    """SIGTERM the confirmed holder of the lock at path, SIGKILL it after timeout; True when one was stopped."""
    held, pid = lock_holder(path)
    if not held:
        return False
    if pid is None:
        raise KmipBackupError("The %s lock %s is held by a process that cannot be identified (the pid in the file "
                              "does not hold it): nothing was signalled. Find the process with `fuser %s` and stop it."
                              % (what, path, path))
    _signal(pid, signal.SIGTERM)
    if _released(path, timeout):
        return True
    held, again = lock_holder(path)
    if not held:
        return True
    if again == pid:  # still the same confirmed holder: never a pid read earlier
        _signal(pid, signal.SIGKILL)
        if _released(path, 10):
            return True
    raise KmipBackupError("The %s (pid %d) did not stop within %ds: its lock %s is still held." % (what, pid, timeout, path))


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # exited meanwhile
        pass


def _released(path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not lock_holder(path, settle=0)[0]:
            return True
        time.sleep(0.2)
    return False


def stop_daemon(data_dir: str, timeout: float = 60) -> bool:
    """Stop the daemon that holds data_dir's lock, then any worker still holding the worker lock (orphaned by a
    supervisor killed with -9). Only confirmed lock holders are signalled. True when something was stopped."""
    stopped = _stop_holder(os.path.join(data_dir, LOCK_FILE), "Backup Daemon", timeout)
    return _stop_holder(os.path.join(data_dir, WORKER_LOCK_FILE), "Backup Daemon worker", timeout) or stopped


def run_worker(config_dir: str, data_dir: str, poll_interval: float = 1.0, supervisor_pid: int | None = None) -> int:
    stop = threading.Event()
    d = {"daemon": None}

    def on_signal(signum, frame):
        stop.set()
        if d["daemon"] is not None:
            d["daemon"].stop()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if supervisor_pid:
        def watchdog():  # an orphan (supervisor killed with -9) stops: the next supervisor starts a new worker
            while not stop.wait(0.5):
                if os.getppid() != supervisor_pid:
                    LOG.warning("worker: the supervisor (pid %d) is gone; stopping", supervisor_pid)
                    on_signal(None, None)
                    return
        threading.Thread(target=watchdog, name="supervisor-watchdog", daemon=True).start()
    lock = DataDirLock(os.path.join(data_dir, WORKER_LOCK_FILE))
    waited = 0.0
    while not lock.try_acquire(wait=1.0):  # a previous worker still stopping: never two on one folder
        if stop.is_set():
            return 0
        waited += 1.0
        if waited in (1.0, 10.0) or waited % 60 == 0:
            LOG.warning("worker: waiting for the previous worker (pid %s) to exit",
                        lock_holder(lock.path, settle=0)[1] or "unknown")
    try:
        lock.record(os.getpid())
        if stop.is_set():
            return 0
        d["daemon"] = Daemon(config_dir, data_dir, poll_interval)
        if stop.is_set():
            return 0
        d["daemon"].run()
        return 0
    finally:
        lock.release()


def supervise(argv_worker: list) -> int:
    """Run the worker as a child process; restart it with backoff when it dies."""
    stop = threading.Event()
    child = {"p": None}

    def on_signal(signum, frame):
        stop.set()
        p = child["p"]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    backoff = timeutil.Backoff(cap=SUPERVISOR_BACKOFF_MAX)
    argv_worker = argv_worker + ["--supervisor-pid", str(os.getpid())]
    while not stop.is_set():
        started = time.monotonic()
        child["p"] = subprocess.Popen([sys.executable, "-m", _MODULE] + argv_worker)
        LOG.info("supervisor: worker started (pid %d)", child["p"].pid)
        rc = child["p"].wait()
        if stop.is_set():
            break
        if time.monotonic() - started > 60:
            backoff.reset()
        delay = backoff.next()
        LOG.warning("supervisor: worker exited with %s; restarting in %ds", rc, delay)
        stop.wait(delay)
    return 0


_MODULE = "ansible_collections.kmipbackup.mongodb.plugins.module_utils.daemon"


def _detach():
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    fd = os.open(os.devnull, os.O_RDWR)
    for n in (0, 1, 2):
        os.dup2(fd, n)
    os.close(fd)


def _switch_user(name):
    pw = pwd.getpwnam(name)
    if pw.pw_uid == os.geteuid():
        return
    os.setgid(pw.pw_gid)
    os.initgroups(name, pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ["HOME"] = pw.pw_dir


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kmipbackup-daemon", description="The kmipbackup Backup Daemon.")
    ap.add_argument("--config-dir", default=config.DEFAULT_CONFIG_DIR)
    ap.add_argument("--data-dir", default=config.DEFAULT_DATA_DIR)
    ap.add_argument("--poll-interval", type=float, default=1.0)
    ap.add_argument("--log-file", help="default: DATA_DIR/log/daemon.log")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ap.add_argument("--supervise", action="store_true", help="run the worker as a child and restart it when it dies")
    ap.add_argument("--detach", action="store_true", help="go to the background")
    ap.add_argument("--pidfile", help="write the daemon's process id here (informational: --status and --stop use "
                                      "the lock DATA_DIR/daemon.lock)")
    ap.add_argument("--stop", action="store_true", help="stop the daemon that holds DATA_DIR's lock and exit")
    ap.add_argument("--status", action="store_true", help="exit 0 when a daemon holds DATA_DIR's lock, 3 otherwise")
    ap.add_argument("--user", help="when started as root, run as this user")
    ap.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)  # set by supervise() for its worker
    a = ap.parse_args(argv)
    config_dir, data_dir = os.path.abspath(a.config_dir), os.path.abspath(a.data_dir)
    os.umask(0o077)
    lock_path = os.path.join(data_dir, LOCK_FILE)
    if a.stop:
        try:
            stopped = stop_daemon(data_dir)
        except KmipBackupError as e:
            sys.stderr.write("%s\n" % e)
            return 1
        _remove_pidfile(a.pidfile)
        sys.stdout.write("stopped\n" if stopped else "not running\n")
        return 0
    if a.status:
        try:
            held, pid = lock_holder(lock_path)
        except KmipBackupError as e:
            sys.stderr.write("%s\n" % e)
            return 4  # LSB: status unknown
        if held:
            sys.stdout.write("running (pid %s)\n" % (pid or "unknown"))
            return 0
        sys.stdout.write("not running\n")
        return 3
    if a.user and os.geteuid() == 0:
        _switch_user(a.user)
    if a.pidfile and not os.path.isdir(os.path.dirname(os.path.abspath(a.pidfile))):
        sys.stderr.write("The folder of --pidfile %s does not exist: create it (the backup_daemon role's "
                         "backup_daemon_run_dir) or pass another --pidfile.\n" % a.pidfile)
        return 2
    try:  # refused, not tightened, when a link, writable by others or foreign-owned
        datadir.open_data_dir(data_dir, a.user or config.DEFAULT_DAEMON_USER).close()
    except KmipBackupError as e:
        sys.stderr.write("%s\n" % e)
        return 2
    if a.supervisor_pid:  # the supervisor holds daemon.lock; run_worker takes the worker lock
        log_file = os.path.abspath(a.log_file or os.path.join(data_dir, "log", "daemon.log"))
        setup_logging(log_file, a.log_level)
        return run_worker(config_dir, data_dir, a.poll_interval, supervisor_pid=a.supervisor_pid)
    lock = DataDirLock(lock_path)
    try:
        acquired = lock.try_acquire(wait=1.0)
    except KmipBackupError as e:
        sys.stderr.write("%s\n" % e)
        return 1
    if not acquired:
        pid = lock_holder(lock_path)[1]
        sys.stderr.write("A Backup Daemon already runs on data folder %s (pid %s holds %s): nothing was started. "
                         "Stop it first (--stop), or give this one another --data-dir.\n"
                         % (data_dir, pid or "unknown", lock_path))
        return 1
    log_file = os.path.abspath(a.log_file or os.path.join(data_dir, "log", "daemon.log"))
    setup_logging(log_file, a.log_level)
    if a.detach:
        _detach()  # the lock's open file goes with the process that stays
    if a.pidfile:  # before the lock names us: whoever --status shows running finds the pidfile current
        files.atomic_write(os.path.abspath(a.pidfile), b"%d\n" % os.getpid())
    lock.record(os.getpid())
    try:
        if a.supervise:
            worker = ["--config-dir", config_dir, "--data-dir", data_dir, "--poll-interval", str(a.poll_interval),
                      "--log-level", a.log_level, "--log-file", log_file]
            return supervise(worker)
        return run_worker(config_dir, data_dir, a.poll_interval)
    finally:
        _remove_pidfile(a.pidfile, os.getpid())
        lock.release()


def _remove_pidfile(pidfile, only_pid=None):
    """Remove the informational pidfile (only if it names only_pid, when given)."""
    if not pidfile:
        return
    try:
        if only_pid is not None and files.read_bytes(pidfile).strip() != b"%d" % only_pid:
            return
        os.unlink(pidfile)
    except (FileNotFoundError, ValueError):
        pass


if __name__ == "__main__":
    raise SystemExit(main())
