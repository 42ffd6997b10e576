"""Keep the console for what a user can act on.

Most noise is quieted where it starts (logger levels, Ray's auth mode set explicitly, progress bars of libraries
switched off; see :mod:`rms_ray.common.ray_utils`, :mod:`rms_ray.engine.vllm_engine`). One line cannot be: Ray's
C++ core worker in the driver logs an ERROR, straight to file descriptor 2, for every actor created with
constructor arguments in the object store and ``max_restarts > 0`` -- which is every Ray Data actor pool with
bounded restarts (ray-project/ray#53727); it lands in the middle of the progress bar. :class:`NativeStderrFilter`
passes everything written to fd 2 through a thread that drops exactly the lines matching :data:`NOISE` and
forwards everything else at once (partial lines too, so a progress bar still redraws in place).
"""

from __future__ import annotations

import os
import re
import sys
import threading

#: Lines dropped from fd 2 while a filter is active (a Ray log line: "[<date> <time> E <pid> <tid>] file:line: ...").
NOISE = (
    re.compile(rb"\[\d{4}-\d\d-\d\d [\d:,.]+ [EW] \d+ \d+\] core_worker\.cc:\d+: Actor with class name: [^\n]*"
               rb"has constructor arguments in the object store and max_restarts > 0[^\n]*\n?"),
)
_LOG_START = re.compile(rb"\[\d{4}-")  # a partial chunk that may be the start of a Ray log line: hold it


class NativeStderrFilter:
    """While started, file descriptor 2 is a pipe read by a thread that drops :data:`NOISE` lines and forwards the
    rest to the real stderr. Start it after child processes are spawned (they keep the real stderr) and stop it
    before the process exits; both are no-ops where fd 2 cannot be redirected."""

    def __init__(self, patterns: tuple[re.Pattern[bytes], ...] = NOISE) -> None:
        self.patterns = patterns
        self._saved: int | None = None
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def start(self) -> "NativeStderrFilter":
        """Redirect fd 2 through the filter (idempotent)."""
        if self._saved is not None:
            return self
        try:
            sys.stderr.flush()
            saved = os.dup(2)
            r, w = os.pipe()
            os.dup2(w, 2)
            os.close(w)
        except (OSError, ValueError, AttributeError):  # no fd 2 (embedded interpreters, closed stderr)
            return self
        self._saved = saved
        self._thread = threading.Thread(target=self._pump, args=(r, saved), name="stderr-filter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Give fd 2 back to the real stderr and forward whatever is still in the pipe (idempotent)."""
        if self._saved is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._saved, 2)  # the pipe's last writer is gone: the thread drains it, sees EOF and ends
        if self._thread is not None:
            self._thread.join(timeout=5)
        os.close(self._saved)
        self._saved, self._thread = None, None

    def filter_chunk(self, pending: bytes) -> tuple[bytes, bytes]:
        """Split ``pending`` into (bytes to forward now, bytes to keep until more arrive), noise removed."""
        cut = pending.rfind(b"\n") + 1
        head, tail = pending[:cut], pending[cut:]
        for pat in self.patterns:  # complete lines only: a noise line is one write, so it arrives whole
            head, n = pat.subn(b"", head)
            self.dropped += n
        start = _LOG_START.search(tail)
        if start is None:  # nothing that could become a noise line: forward all of it (progress bars redraw)
            return head + tail, b""
        return head + tail[:start.start()], tail[start.start():]

    def _pump(self, r: int, out: int) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                forward, pending = self.filter_chunk(pending + chunk)
                if len(pending) > 65536:  # not a log line after all
                    forward, pending = forward + pending, b""
                if forward:
                    os.write(out, forward)
        except OSError:
            pass
        finally:
            if pending:
                try:
                    os.write(out, pending)
                except OSError:
                    pass
            os.close(r)
