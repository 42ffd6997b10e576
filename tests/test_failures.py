"""Failures end in bounded time with one clear `error:` line (README "Failures"), on the real engine.

* An engine that cannot start (vLLM refuses the config): `construct` and `evaluate` exit 1 in seconds with one
  `error:` line naming vLLM's reason, the model and max_model_len, and where the full log is; no traceback.
* An engine actor SIGKILLed while it starts (the test kills the real actor process, found by its Ray process title
  among the descendants of the run it started, never anyone else's): killed every time, the job fails after
  exactly (1 + max_engine_restarts) * (1 + max_engine_init_deaths) starts; killed once, Ray restarts it and the run
  succeeds. Killed while processing a batch every time: fails after the bounded retries.
* An output folder that cannot be written: one `error:` line naming it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PHOTOS

RMS_RAY = Path(sys.executable).parent / "rms-ray"
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "RAY_USAGE_STATS_ENABLED": "0"}
ENV.pop("RAY_ADDRESS", None)
BOUND_S = 120  # the bar: a failing engine must end the job well within this
# Smallest real construction: one candidate, one round, no safe side (the engine is what is under test).
SMALL = ["--set", "generation.max_rounds=1", "generation.queries_per_image=1", "generation.max_hazards=1",
         "generation.contrast=false"]


def _photos(tmp_path: Path, n: int = 2) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for name in ("coffee.png", "brick.png")[:n]:
        shutil.copy(PHOTOS / name, d / name)
    return d


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def _assert_one_clear_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    lines = _error_lines(r.stderr)
    assert r.returncode != 0, r.stderr[-3000:]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, (r.stderr[-3000:], r.stdout[-3000:])
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _log_of(line: str) -> Path:
    assert "(full log: " in line, line
    path = Path(line.rsplit("(full log: ", 1)[1].rstrip(")"))
    assert path.is_file(), path
    return path


# -- the one line, without Ray ------------------------------------------------------------------------------------
def test_describe_failure_finds_the_cause_in_rays_text(tmp_path):
    from rms_ray.common.failures import describe_failure, is_user_error
    from rms_ray.engine.errors import EngineStartError

    # What the driver gets from Ray Data: the actor's error as text, with the engine's line inside a traceback.
    remote = ("The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker(...).__init__()"
              "\x1b[39m\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
              "rms_ray.engine.errors.EngineStartError: engine failed to start: TypeError: bad arg (model m, "
              "max_model_len 9)\n")
    assert describe_failure(RuntimeError(remote)) == "engine failed to start: TypeError: bad arg (model m, max_model_len 9)"
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = EngineStartError("engine failed to start: X (model m, max_model_len 9)")
    assert describe_failure(wrapped).startswith("engine failed to start: X")
    out = tmp_path / "f" / "out"
    err = NotADirectoryError(20, "Not a directory", str(out / "_work"))
    assert describe_failure(err, output=out) == f"cannot write to output folder {out} (Not a directory: {out}/_work)"
    assert describe_failure(ValueError("a\nb")) == "ValueError: a"
    # A worker's ValueError re-raised by Ray is Ray's error, not a user error with a self-contained message.
    ray_value_error = type("RayTaskError(ValueError)", (ValueError,), {"__module__": "ray.exceptions"})
    assert is_user_error(ValueError("x")) and not is_user_error(ray_value_error("x"))


def test_describe_failure_of_a_dead_engine_actor_names_bounds_phase_and_memory():
    """Ray's text for an actor its memory monitor killed (the wording is Ray 2.60's; provoking a real memory kill on
    a shared machine is not an honest test): started or not, bounds named, the node's memory named."""
    from rms_ray.common.config import ResourcesConfig
    from rms_ray.common.failures import EngineWatch, describe_failure

    actor_died = type("ActorDiedError", (RuntimeError,), {"__module__": "ray.exceptions"})
    dead = actor_died("The actor died unexpectedly before finishing this task.\n\tpid: 7\nThe actor is dead because "
                      "its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Task was "
                      "killed due to the node running low on memory. Some common causes include: (1) the OOM killer")
    res = ResourcesConfig(max_engine_restarts=2, max_engine_init_deaths=1)
    watch = EngineWatch()
    watch.last = "MapBatches(ConstructUDF): actors died during initialization 2 consecutive time(s)"
    line = describe_failure(dead, resources=res, watch=watch)
    assert line.startswith("an engine actor died while starting and was not brought back "
                           "(resources.max_engine_restarts=2 restarts, then resources.max_engine_init_deaths=1")
    assert "running low on memory" in line and "The node ran out of memory" in line and "causes" not in line
    line = describe_failure(dead, resources=res)  # no record of a death at start-up: it died on a batch
    assert line.startswith("an engine actor died while processing a batch") and "max_task_retries=1" in line
    raised = actor_died("The actor died because of an error raised in its creation task, ray::X.__init__()\n"
                        "Traceback (most recent call last):\n  File ...\nKeyError: 'model'\n")
    assert describe_failure(raised) == "an engine actor failed to start: KeyError: 'model'"


@pytest.mark.vllm
def test_engine_start_error_is_one_line_with_vllms_reason():
    """In-process (vLLM refuses both before loading anything): the message, its cause, and that it pickles
    (it crosses from the engine actor to the driver)."""
    from rms_ray.common.config import load_config
    from rms_ray.engine import EngineStartError, VLMEngine

    cfg = load_config("cpu-tiny")
    with pytest.raises(EngineStartError) as e:
        VLMEngine(cfg.model.model_copy(update={"max_model_len": 8192}), cfg.resources)
    msg = str(e.value)
    assert msg.startswith("engine failed to start: User-specified max_model_len (8192) is greater than")
    assert msg.endswith("(model builtin:tiny, max_model_len 8192)") and "\n" not in msg
    assert e.value.__cause__ is not None and len(msg) < 500
    assert str(pickle.loads(pickle.dumps(e.value))) == msg
    with pytest.raises(EngineStartError, match=r"unexpected keyword argument 'no_such_engine_arg'.*engine_kwargs"):
        VLMEngine(cfg.model.model_copy(update={"engine_kwargs": {"no_such_engine_arg": 1}}), cfg.resources)


# -- an engine that cannot start: the real commands ---------------------------------------------------------------
def _run(args: list[str], timeout: float = 2 * BOUND_S) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = subprocess.run([str(RMS_RAY), *args], capture_output=True, text=True, timeout=timeout, env=ENV,
                       cwd=tempfile.gettempdir())
    return r, time.perf_counter() - t0


@pytest.mark.vllm
def test_construct_with_an_engine_that_cannot_start_fails_fast(tmp_path):
    out = tmp_path / "out"
    r, took = _run(["construct", "-c", "cpu-tiny", "-i", str(_photos(tmp_path)), "-o", str(out), "--no-progress",
                    "--set", "model.max_model_len=8192"])
    line = _assert_one_clear_error(r, "error: engine failed to start: User-specified max_model_len (8192)",
                                   "(model builtin:tiny, max_model_len 8192)")
    assert took < BOUND_S, took
    log = _log_of(line)
    assert log.parent == out / "_work" / "logs"
    text = log.read_text()
    assert "Traceback" in text and "ValidationError" in text and "generation started" in text  # the full detail


@pytest.mark.vllm
def test_evaluate_with_an_engine_that_cannot_start_fails_fast(tmp_path):
    data = tmp_path / "set.jsonl"
    data.write_text('{"id": "1", "image": "in/coffee.png", "query": "q", "label": "safe"}\n')
    _photos(tmp_path, 1)
    r, took = _run(["evaluate", "--datasets", str(data), "-o", str(tmp_path / "ev"), "--no-progress",
                    "--set", "model.engine_kwargs={no_such_engine_arg: 1}"])
    line = _assert_one_clear_error(r, "error: engine failed to start: TypeError:", "no_such_engine_arg",
                                   "(model builtin:tiny, max_model_len 2048")
    assert took < BOUND_S, took
    assert "EngineArgs" in _log_of(line).read_text()


# -- an engine actor killed (SIGKILL, as Ray's memory monitor does) ----------------------------------------------
def _parent(pid: int) -> int:
    try:  # field 4 of /proc/PID/stat, after the parenthesised command name (which may hold spaces)
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _descends_from(pid: int, root: int) -> bool:
    for _ in range(64):
        pid = _parent(pid)
        if pid == root:
            return True
        if pid <= 1:
            return False
    return False


def _engine_actors(root: int, phase: str) -> list[int]:
    """Processes of the run started as ``root`` whose Ray title says they are the construct engine actor in
    ``phase`` (``__init__``: starting; ``submit``: running a batch). Only this test's own run, never another's."""
    title = f"ray::MapWorker(MapBatches(ConstructUDF)).{phase}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if cmd == title and _descends_from(int(d.name), root):
                found.append(int(d.name))
    return found


def _construct_killing_engines(tmp_path: Path, phase: str, kills: int, *sets: str):
    """Run `rms-ray construct` and SIGKILL its engine actor each time it is in ``phase``, up to ``kills`` times.
    Returns (completed process, pids killed, seconds)."""
    out = tmp_path / "out"
    args = [str(RMS_RAY), "construct", "-c", "cpu-tiny", "-i", str(_photos(tmp_path)), "-o", str(out),
            "--no-progress", *SMALL, *sets]
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         cwd=tempfile.gettempdir(), start_new_session=True)
    killed: list[int] = []
    try:
        while p.poll() is None and time.perf_counter() - t0 < 2 * BOUND_S:
            if len(killed) < kills:
                for pid in _engine_actors(p.pid, phase):
                    if pid not in killed:
                        time.sleep(0.3)  # well inside the phase (an engine start takes seconds)
                        try:
                            os.kill(pid, signal.SIGKILL)
                            killed.append(pid)
                        except ProcessLookupError:
                            pass
            time.sleep(0.1)
        hung = p.poll() is None
    finally:
        if p.poll() is None:  # a hang: end this run (its own process group) so the failure is reported, not stuck
            os.killpg(p.pid, signal.SIGKILL)
    stdout, stderr = p.communicate(timeout=60)
    assert not hung, f"no end after {2 * BOUND_S} s, {len(killed)} engine starts killed"
    return subprocess.CompletedProcess(args, p.returncode, stdout, stderr), killed, time.perf_counter() - t0


@pytest.mark.vllm
def test_engine_killed_at_every_start_fails_after_bounded_starts(tmp_path):
    r, killed, took = _construct_killing_engines(tmp_path, "__init__", 99, "resources.max_engine_restarts=1",
                                                 "resources.max_engine_init_deaths=1")
    line = _assert_one_clear_error(r, "an engine actor died while starting",
                                   "resources.max_engine_restarts=1", "resources.max_engine_init_deaths=1",
                                   "worker process has died")
    assert len(killed) == (1 + 1) * (1 + 1), (killed, r.stderr[-2000:])  # each start was killed, then no more
    assert took < BOUND_S, took
    assert "replaced (1 consecutive death" in r.stderr  # Ray Data's replacement, shown as one line
    _log_of(line)


@pytest.mark.vllm
def test_engine_killed_once_while_starting_is_restarted_and_the_run_succeeds(tmp_path):
    r, killed, took = _construct_killing_engines(tmp_path, "__init__", 1, "resources.max_engine_restarts=1")
    assert r.returncode == 0 and len(killed) == 1, r.stderr[-3000:]
    assert "(balanced)" in r.stdout and "2 images in" in r.stdout
    assert "generation finished: 2 images" in r.stderr and not _error_lines(r.stderr)


@pytest.mark.vllm
def test_engine_killed_on_every_batch_fails_after_bounded_retries(tmp_path):
    """An input that kills its engine each time: the batch is retried max_task_retries times on a restarted
    actor, then the job fails with one line (it never loops)."""
    r, killed, took = _construct_killing_engines(tmp_path, "submit", 99, "resources.max_engine_restarts=1",
                                                 "resources.max_task_retries=1")
    _assert_one_clear_error(r, "an engine actor died while processing a batch", "resources.max_task_retries=1")
    assert len(killed) == 2, killed  # the batch, then its one retry on the one restart
    assert took < BOUND_S, took


# -- an output folder that cannot be written ----------------------------------------------------------------------
def _unwritable_output(tmp_path: Path) -> tuple[Path, str]:
    """A path where the output folder cannot be created. As a normal user: inside a folder chmod 0o500. As root
    (CI containers), permission bits do not stop writes (checked, not assumed): then a path under a regular file,
    which no one can create (ENOTDIR), the same kind of OSError from the same code."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    probe = ro / "probe"
    try:
        probe.write_text("")
        probe.unlink()
    except PermissionError:
        return ro / "out", "Permission denied"
    ro.chmod(0o700)
    afile = tmp_path / "a_file"
    afile.write_text("not a folder")
    return afile / "out", "Not a directory"


def test_unwritable_output_is_one_error_line(tmp_path):
    """Both commands fail before Ray starts, in seconds."""
    out, why = _unwritable_output(tmp_path)
    data = tmp_path / "set.jsonl"
    data.write_text('{"id": "1", "image": "in/coffee.png", "query": "q", "label": "safe"}\n')
    photos = _photos(tmp_path, 1)
    try:
        for args in (["construct", "-c", "cpu-tiny", "-i", str(photos), "-o", str(out), "--no-progress"],
                     ["evaluate", "--datasets", str(data), "-o", str(out), "--no-progress"]):
            r, took = _run(args, timeout=120)
            line = _assert_one_clear_error(r, f"error: cannot write to output folder {out}", why)
            assert took < 60, took
            log = _log_of(line)  # not in the output folder, which cannot hold it: in the temp folder, named
            assert log.parent == Path(tempfile.gettempdir()) / "rms_ray-logs"
            log.unlink()
    finally:
        (tmp_path / "readonly").chmod(0o700)
