# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The post-image builder: a process that builds closed change segments' post-images (no Ansible imports). PRIVATE
to the collection.

Why a process: building a segment's post-images reads every document it changed from the head (SQLite releases the
GIL for each row, and the builder takes it back for each): on a thread of the capturing process the two threads hand
the GIL to each other thousands of times per segment, and the capture slowed by more than the build cost. In a process
of its own the build runs on another core and the capture only waits for the pin (a round trip).

Head starts it (Builder.start) when it begins recording segments, as point_in_time starts the replay process
(child_process.spawn: a fresh interpreter, two pipes, standard error to /dev/null, an environment holding only the
parent's sys.path). It opens the head as a second reader; the head's
path and key come on standard input (never in its arguments or environment), and it keeps its connection.

Protocol (little-endian): parent to child: _HELLO (length) + JSON {"path", "key" (hex, or null)}, once; then per
segment _ASK (change sequence the segment opened after, t, i of its end, the sizes to build to). Child to parent: per _ASK, one byte _PINNED
(its read transaction is open on the state just committed: the parent holds the head's lock until then, so no write
lands before) or _FAILED; after _PINNED the answer: _ANSWER (status, frame count), then per frame _FRAME (t, i,
length) + a zstd frame of post-image records (head._post_image_frames). Status 0: no post-images (they are
optional). The child exits when its input ends or a write fails."""
from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import time

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import child_process

_HELLO = struct.Struct("<I")
_ASK = struct.Struct("<qIIQQQ")  # opened, t, i; the sizes to build to: record, frame, most (head.post_image_limits)
_ANSWER = struct.Struct("<BI")
_FRAME = struct.Struct("<IIQ")
_PINNED, _FAILED, _BUILT = b"P", b"F", 1
PIN_TIMEOUT = 60.0  # seconds the capture waits for the builder's pin at most (then: no post-images, builder ended)
BUILD_TIMEOUT = 120.0  # seconds a build may take from its question (then: no post-images, builder ended): a stalled
# builder must not hold back the seal of its segment and of every later one

BUILDER_NICE = 5  # the builder runs at a lower CPU priority than the capture: its work can wait (BUILD_TIMEOUT), the capture cannot
BOOTSTRAP = child_process.bootstrap(__name__)


def _read_exact(f, size: int, wait=None) -> bytes:
    """size bytes from an unbuffered pipe (a read may return fewer); EOFError when it ends first, or when wait (a
    function: whether the pipe became readable in time) says it did not."""
    buf = bytearray()
    while len(buf) < size:
        if wait is not None and not wait():
            raise EOFError("the post-image builder did not answer in time")
        more = f.read(size - len(buf))
        if not more:
            raise EOFError("the post-image builder's pipe ended")
        buf += more
    return bytes(buf)


class Builder:
    """The parent's end: one question at a time (ask), its answer read once ready (answer)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.asked, self.deadline = proc, None, 0.0  # asked: what the unread answer is for (the caller's tag)
        self._poll = select.poll()  # not select(): no limit on the descriptor's number
        self._poll.register(proc.stdout.fileno(), select.POLLIN)

    @classmethod
    def start(cls, path: str, key_hex: str | None) -> Builder:
        """A started builder for the head at path (OSError when it cannot start)."""
        proc = child_process.spawn(BOOTSTRAP)  # close() ends it
        hello = json.dumps({"path": path, "key": key_hex}).encode("utf-8")
        try:
            proc.stdin.write(_HELLO.pack(len(hello)) + hello)  # a few hundred bytes: one write to a pipe
        except OSError:
            cls(proc).close(kill=True)
            raise
        return cls(proc)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, tag, opened: int, to: tuple, limits: tuple) -> bool:
        """Ask for the post-images of the changes after sequence opened, as the head holds them now, built to limits
        (head.post_image_limits()); returns once the builder's read is pinned (True), or False when it could not (the
        builder is then ended)."""
        try:
            self.proc.stdin.write(_ASK.pack(opened, int(to[0]), int(to[1]), *limits))
            if not self._readable(PIN_TIMEOUT) or _read_exact(self.proc.stdout, 1) != _PINNED:
                raise EOFError("the post-image builder did not pin its read")
        except (OSError, EOFError, ValueError, struct.error):
            self.close(kill=True)
            return False
        self.asked, self.deadline = tag, time.monotonic() + BUILD_TIMEOUT
        return True

    def ready(self) -> bool:
        """Whether the answer asked for can be read without waiting for the build (or its time is up: answer() then
        gives up at once)."""
        return self.asked is not None and (self._readable(0) or time.monotonic() >= self.deadline)

    def answer(self) -> list:
        """[(t, i, zstd frame)] of the question asked (waits for the build, until BUILD_TIMEOUT after the question),
        [] when it failed or timed out (the builder is then ended)."""
        self.asked = None

        def in_time():
            return self._readable(max(0.0, self.deadline - time.monotonic()))
        try:
            out = self.proc.stdout
            status, count = _ANSWER.unpack(_read_exact(out, _ANSWER.size, in_time))
            frames = []
            for _n in range(count):
                t, i, size = _FRAME.unpack(_read_exact(out, _FRAME.size, in_time))
                frames.append((t, i, _read_exact(out, size, in_time)))
            return frames if status == _BUILT else []
        except (OSError, EOFError, ValueError, struct.error):
            self.close(kill=True)
            return []

    def _readable(self, timeout: float) -> bool:
        """Whether the pipe has data or ended (unbuffered: nothing waits in Python), waiting up to timeout seconds."""
        return bool(self._poll.poll(int(timeout * 1000)))

    def close(self, kill: bool = False) -> None:
        """End the builder: its input ends, and it is killed if it does not exit within 5 s, or at once with kill (it
        failed to answer)."""
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            if kill:
                raise subprocess.TimeoutExpired(self.proc.args, 0)
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.asked = None


def main() -> None:
    """The builder process (never returns): open the head, then answer each question until the input ends."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head  # pylint: disable=import-outside-toplevel
    inp, out = os.fdopen(0, "rb", buffering=0), os.fdopen(1, "wb", buffering=1 << 20)
    os.nice(BUILDER_NICE)
    code = 1
    try:
        hello = json.loads(_read_exact(inp, _HELLO.unpack(_read_exact(inp, _HELLO.size))[0]))
        key = bytes.fromhex(hello["key"]) if hello["key"] is not None else None
        h = head.Head(hello["path"], key)
        del key, hello
        conn = h._conn  # pylint: disable=protected-access
        while True:
            try:
                opened, t, i, *limits = _ASK.unpack(_read_exact(inp, _ASK.size))
            except EOFError:  # the head closed: its input ended
                code = 0
                break
            try:
                conn.execute("BEGIN")
                conn.execute("SELECT value FROM meta WHERE name='change_seq'").fetchone()  # pins the image
            except Exception:  # pylint: disable=broad-except
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                out.write(_FAILED)
                out.flush()
                continue
            out.write(_PINNED)
            out.flush()
            try:
                frames = head._post_image_frames(conn, opened, (t, i), tuple(limits))  # pylint: disable=protected-access
                status = _BUILT
            except Exception:  # pylint: disable=broad-except  # optional: the segment is replayed event by event
                frames, status = [], 0
            finally:
                conn.execute("ROLLBACK")
            out.write(_ANSWER.pack(status, len(frames)))
            for ft, fi, frame in frames:
                out.write(_FRAME.pack(ft, fi, len(frame)))
                out.write(frame)
            out.flush()
    except (OSError, EOFError, ValueError):
        pass
    finally:
        os._exit(code)  # pylint: disable=protected-access
