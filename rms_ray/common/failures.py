"""A failed run ends with one ``error:`` line that names the cause; the full detail goes to a log file.

What reaches the driver when an engine fails is Ray's exception, whose text holds a worker's traceback through Ray
Data and vLLM (330-410 lines for an engine that cannot start). :func:`describe_failure` turns it into one line:

* the :class:`~rms_ray.engine.errors.EngineStartError` line raised inside the actor (``engine failed to start:
  <vLLM's reason> (model X, max_model_len Y)``), found again in Ray's text;
* an engine actor whose process died (killed by Ray's memory monitor, SIGKILL, a crash) and whose bounds are used
  up, while starting or while processing a batch, with the bounds that applied and Ray's reason;
* a file the run could not write (e.g. a read-only output folder), with the path;
* anything else: the exception's type and the last line of its (remote) traceback.

:class:`RunLog` keeps the run's ``rms_ray`` log records and, on failure, writes them with the full traceback to
``<output>/_work/logs/<command>-<time>.log`` (a temp folder when the output cannot hold it) and says where.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from rms_ray.engine.errors import ENGINE_START_PREFIX

log = logging.getLogger("rms_ray")

_MAX_LINE = 700  # characters of one error line, the cause's own text included
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's text for a worker killed by its memory monitor (not the generic "could have been the OOM killer" hint).
_MEMORY = re.compile(r"low on memory|OutOfMemoryError|memory monitor|memory pressure", re.IGNORECASE)


def _is_ray_error(exc: BaseException) -> bool:
    return any(c.__module__.startswith("ray.") for c in type(exc).__mro__)


def is_user_error(exc: BaseException, kinds: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)) -> bool:
    """A problem with what the user gave (missing input, bad listing, refused output folder: by default a
    ``ValueError`` / ``FileNotFoundError`` raised by rms_ray in the driver) whose own message is the whole story.
    Ray's remote errors can also be instances of these (a worker's exception re-raised as its type); they are not."""
    return isinstance(exc, kinds) and not _is_ray_error(exc)


class EngineWatch(logging.Handler):
    """Watches Ray Data's actor-pool records in the driver: an engine actor that died while starting is reported
    there (and replaced, or the job fails) with no other trace in the exception."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last: str | None = None  # Ray Data's latest record about it

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "died during initialization" in msg:
            self.last = msg.splitlines()[0]


class _OneLine(logging.Formatter):
    """Ray Data's console records as one line each (their tracebacks stay in Ray Data's log file)."""

    def format(self, record: logging.LogRecord) -> str:
        lines = record.getMessage().strip().splitlines() or [""]
        return f"{self.formatTime(record)}\t{record.levelname} ray.data -- {lines[0]}"


class _BelowError(logging.Filter):
    """Ray Data logs a failure it is about to raise at ERROR, traceback and all; rms_ray reports what it raises as
    one ``error:`` line, so the console skips those records (Ray Data's log file keeps them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


_WATCHES: list[EngineWatch] = []  # the watches of the RunLogs active in this process


def one_line_ray_data_console() -> None:
    """Make Ray Data's console handler print its warnings (an engine actor replaced, ...) as one line each, leave
    failures to rms_ray's ``error:`` line, and attach the active :class:`EngineWatch` es. Idempotent.

    Call after ``import ray.data`` (it configures its logger on import, removing any handler added before):
    :func:`rms_ray.common.ray_utils.configure_ray_data` does.
    """
    logger = logging.getLogger("ray.data")
    for h in logger.handlers:
        if h.name == "console":
            h.setFormatter(_OneLine())
            if not any(isinstance(f, _BelowError) for f in h.filters):
                h.addFilter(_BelowError())
    for watch in _WATCHES:
        if watch not in logger.handlers:
            logger.addHandler(watch)


def _clip(text: str) -> str:
    text = " ".join(_ANSI.sub("", text).split())
    return text if len(text) <= _MAX_LINE else text[: _MAX_LINE - 3] + "..."


def _ray_death_reason(text: str) -> str:
    """Ray's own sentence about why an actor's process died, without its list of generic possible causes."""
    text = _ANSI.sub("", text)
    m = re.search(r"The actor is dead because[^\n]*", text) or re.search(r"The actor died[^\n]*", text)
    reason = m.group(0) if m else text.strip().splitlines()[0] if text.strip() else "unknown"
    reason = re.split(r"\s*(?:Some common causes include|There are some potential root causes)", reason)[0]
    return reason.strip().rstrip(".")


def _last_error_line(text: str) -> str:
    """The ``Type: message`` line that ends a (remote) traceback, else the first line."""
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b.*:", ln):
            return ln
    return lines[0] if lines else ""


# The line a Python OSError ends a (remote) traceback with: "OSError: [Errno 28] No space left on device: '/x'".
_OS_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*Error): \[Errno (\d+)\] ([^\n]*)$", re.MULTILINE)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _remote_os_error(text: str) -> str | None:
    """A worker that could not write (disk full, quota, read-only, permissions), named by its OSError, or None.

    Ray wraps a worker's exception in its own (``UserCodeException: UDF failed to process a data block``); the
    cause is the last ``XxxError: [Errno N] ...`` line of the remote traceback."""
    found = _OS_ERROR_LINE.findall(_ANSI.sub("", text))
    if not found:
        return None
    kind, num, rest = found[-1]
    hint = ""
    if int(num) in _DISK_FULL:
        hint = ": free space (or raise the quota) and rerun the same command; it resumes from what was committed"
    return f"a worker could not write: {kind}: [Errno {num}] {rest.strip()}{hint}"


def describe_failure(exc: BaseException, *, output: str | Path | None = None, resources: Any = None,
                     watch: EngineWatch | None = None) -> str:
    """One line naming why a run failed (see the module docstring).

    Args:
        exc: what the run raised.
        output: the run's output folder; an ``OSError`` on a path inside it is reported as the output's problem.
        resources: the run's ``ResourcesConfig``, to name the bounds that applied to a dead engine actor.
        watch: the :class:`EngineWatch` of the run, to tell a death while starting from one during a batch.
    """
    text = str(exc)
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    for e in chain:
        m = re.search(re.escape(ENGINE_START_PREFIX) + r"[^\n]*", _ANSI.sub("", str(e)))
        if m:
            return _clip(m.group(0))
    if isinstance(exc, OSError) and not _is_ray_error(exc):
        what = f"{exc.strerror or type(exc).__name__}: {exc.filename}" if exc.filename else f"{exc}"
        if output is not None and exc.filename:
            out, bad = os.path.abspath(os.fspath(output)), os.path.abspath(os.fspath(exc.filename))
            if os.path.commonpath([out, bad]) == out:
                return _clip(f"cannot write to output folder {output} ({what})")
        return _clip(f"{type(exc).__name__}: {what}")
    name = type(exc).__name__
    if "ActorDied" in name or "RayActorError" in name or "ActorUnavailable" in name:
        if "error raised in its creation task" in text:  # the actor's constructor raised (not a dead process)
            return _clip(f"an engine actor failed to start: {_last_error_line(text)}")
        reason = _ray_death_reason(text)
        oom = " The node ran out of memory: size the engine down (model.max_model_len, the KV cache: " \
              "model.env.VLLM_CPU_KVCACHE_SPACE or engine_kwargs.gpu_memory_utilization) or give it a bigger node." \
            if _MEMORY.search(text) else ""
        r = resources
        if watch is not None and watch.last is not None:
            bounds = "" if r is None else (f" (resources.max_engine_restarts={r.max_engine_restarts} restarts, then "
                                           f"resources.max_engine_init_deaths={r.max_engine_init_deaths} "
                                           "replacements)")
            return _clip(f"an engine actor died while starting and was not brought back{bounds}: {reason}.{oom}")
        bounds = "" if r is None else (f" (resources.max_engine_restarts={r.max_engine_restarts}, "
                                       f"resources.max_task_retries={r.max_task_retries})")
        return _clip(f"an engine actor died while processing a batch and its retries are used up{bounds}: "
                     f"{reason}.{oom}")
    if _is_ray_error(exc):
        os_error = _remote_os_error(text)
        if os_error is not None:
            return _clip(os_error)
        return _clip(f"a worker failed: {_last_error_line(text)}")
    return _clip(f"{name}: {text.strip().splitlines()[0] if text.strip() else ''}")


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class RunLog:
    """The log of one command run: collects ``rms_ray`` records while active; :meth:`fail` writes them with the
    full traceback of a failure and returns the one ``error:`` line (without the ``error:`` prefix).

    Use as a context manager around the run. Records are kept in memory (a few dozen lines) because the output
    folder may not exist yet, or may be one the run refuses, while the run starts.
    """

    def __init__(self, command: str, output: str | Path, resources: Any = None) -> None:
        self.command, self.output, self.resources = command, Path(output), resources
        self.watch = EngineWatch()
        self._keep = _Keep()

    def __enter__(self) -> "RunLog":
        # Milestones on stderr, one line each, unless the caller configured logging itself (then it decides).
        self._console = None
        if not log.handlers and not logging.getLogger().handlers:
            self._console = logging.StreamHandler()
            self._console.setLevel(logging.INFO)
            self._console.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s rms_ray -- %(message)s"))
            log.addHandler(self._console)
        log.addHandler(self._keep)
        if log.level == logging.NOTSET or log.level > logging.DEBUG:
            self._old_level = log.level
            log.setLevel(logging.DEBUG)
        else:
            self._old_level = None
        _WATCHES.append(self.watch)
        if "ray.data" in sys.modules:  # else configure_ray_data attaches it once Ray Data is imported
            one_line_ray_data_console()
        return self

    def __exit__(self, *exc: Any) -> None:
        log.removeHandler(self._keep)
        if self._console is not None:
            log.removeHandler(self._console)
        if self._old_level is not None:
            log.setLevel(self._old_level)
        logging.getLogger("ray.data").removeHandler(self.watch)
        if self.watch in _WATCHES:
            _WATCHES.remove(self.watch)

    def log_dir(self) -> Path:
        """``<output>/_work/logs`` when the output's work folder exists and is writable, else a temp folder."""
        work = self.output / "_work"
        if work.is_dir() and os.access(work, os.W_OK):
            try:
                (work / "logs").mkdir(exist_ok=True)
                probe = work / "logs" / f".probe-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
                return work / "logs"
            except OSError:
                pass
        return self._temp_log_dir()

    @staticmethod
    def _temp_log_dir() -> Path:
        d = Path(tempfile.gettempdir()) / "rms_ray-logs"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def fail(self, exc: BaseException) -> str:
        """Write the log file of a failed run; return the one-line cause with the log's path."""
        line = describe_failure(exc, output=self.output, resources=self.resources, watch=self.watch)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        body = [f"rms-ray {self.command} failed: {line}", "", "-- rms_ray log --", *self._keep.lines]
        if self.watch.last:
            body += ["", f"-- Ray Data: engine actors that died while starting: {self.watch.last}"]
        body += ["", "-- traceback (remote tracebacks are inside the exception's text) --",
                 _ANSI.sub("", "".join(traceback.format_exception(exc)))]
        text = "\n".join(body)
        error: OSError | None = None
        # The output folder first; when it cannot hold the log (full disk, read-only), the temp folder.
        for folder in (self.log_dir, self._temp_log_dir):
            path = None
            try:
                path = folder() / f"{self.command}-{stamp}-{os.getpid()}.log"
                path.write_text(text, encoding="utf-8")
                return f"{line} (full log: {path})"
            except OSError as e:
                error = e
                if path is not None:
                    path.unlink(missing_ok=True)  # no half-written log left beside the data
        return f"{line} (no log file: {error})"  # nowhere to write: the line itself must still come out
