"""What must keep holding at scale (issue 8): a run whose engine actor is SIGKILLed mid-run, or whose disk fills
during generation and then during finalisation, ends with rows identical to a run that was never interrupted.

The disk is a real full file system: a small tmpfs mounted in a private user+mount namespace (``unshare``; no root
on the host needed), so every write in the run (the workers' shards, the driver's tables) meets a real ``ENOSPC``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import PHOTOS
from rms_ray.common.config import load_config

pytestmark = pytest.mark.vllm

RMS_RAY = Path(sys.executable).parent / "rms-ray"
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "RAY_USAGE_STATS_ENABLED": "0"}
ENV.pop("RAY_ADDRESS", None)
# Smallest real construction (one candidate per image, one round), one image per batch so a run has several commits.
OVERRIDES = {"generation.max_rounds": 1, "generation.queries_per_image": 1, "generation.max_hazards": 1,
             "generation.contrast": False, "resources.batch_size": 1}
SETS = ["--set", *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in OVERRIDES.items())]
NAMES = ("coffee.png", "brick.png", "camera.png")
SUBS = ("data", "rejected", "quarantine", "duplicates")


def _rows(out: Path, sub: str) -> list[dict]:
    files = sorted((out / sub).glob("*.parquet"))
    rows = pq.read_table(files).to_pylist() if files else []
    return sorted(rows, key=lambda r: (r.get("sample_id") or r["image_id"]))


def _kb(path: Path) -> int:
    """Disk usage in KiB as a file system counts it (whole blocks), like ``du -sk``."""
    return sum(os.stat(p).st_blocks for p in path.rglob("*") if p.is_file()) // 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local):
    """An uninterrupted run of the same input and settings, and its input folder."""
    from rms_ray.construct.pipeline import run_construct

    base = tmp_path_factory.mktemp("crash")
    inp = base / "in"
    inp.mkdir()
    for name in NAMES:
        shutil.copy(PHOTOS / name, inp / name)
    out = base / "reference"
    manifest = run_construct(load_config("cpu-tiny", OVERRIDES), str(inp), out, progress=False)
    assert manifest["accounting"]["balanced"] and manifest["accounting"]["images_in"] == len(NAMES)
    return inp, out, manifest


def _assert_same_rows(out: Path, ref: Path) -> None:
    for sub in SUBS:
        assert _rows(out, sub) == _rows(ref, sub), sub
    ids = [r["sample_id"] for r in _rows(out, "data") + _rows(out, "rejected")]
    assert len(ids) == len(set(ids))
    assert not list((out / "_work" / "tmp").iterdir())


def _can_mount_tmpfs() -> str | None:
    """None when ``unshare`` can mount a tmpfs here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    d = tempfile.mkdtemp()
    try:
        r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {d}"], capture_output=True, text=True, timeout=30)
        return None if r.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {r.stderr.strip()}"
    finally:
        os.rmdir(d)


# Runs the command three times on one tmpfs, growing it between runs: full during generation, then full during
# finalisation, then room enough; copies the output out before the namespace (and its tmpfs) goes away.
_SCRIPT = r"""
set -u
mnt=$1; keep=$2; gen_kb=$3; fin_kb=$4; shift 4
mount -t tmpfs -o size=${gen_kb}k tmpfs "$mnt" || exit 90
for step in 1 2 3; do
  "$@" -o "$mnt/out" >"$keep/run$step.out" 2>"$keep/run$step.err"; echo $? >"$keep/run$step.rc"
  if [ $step = 1 ]; then mount -o remount,size=${fin_kb}k "$mnt"; fi
  if [ $step = 2 ]; then mount -o remount,size=64m "$mnt"; fi
done
cp -a "$mnt/out" "$keep/out"
"""


def test_disk_full_in_generation_then_in_finalise_fails_cleanly_and_reruns_complete_identically(
        tmp_path, reference):
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    inp, ref, ref_manifest = reference
    work_kb = _kb(ref / "_work")
    total_kb = _kb(ref)
    # Half of what generation commits (so the first run fills the disk mid-generation); then all of it plus half of
    # what finalisation adds (so the second run finishes generating and fills the disk while finalising).
    gen_kb = max(work_kb // 2, 16)
    fin_kb = work_kb + (total_kb - work_kb) // 2
    assert gen_kb < work_kb < fin_kb < total_kb, (gen_kb, work_kb, fin_kb, total_kb)
    mnt, keep = tmp_path / "mnt", tmp_path / "keep"
    mnt.mkdir()
    keep.mkdir()
    script = tmp_path / "disk_full.sh"
    script.write_text(_SCRIPT)
    cmd = [str(RMS_RAY), "construct", "-c", "cpu-tiny", "-i", str(inp), "--no-progress", *SETS]
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", str(script), str(mnt), str(keep),
                        str(gen_kb), str(fin_kb), *cmd], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rc = [int((keep / f"run{i}.rc").read_text()) for i in (1, 2, 3)]
    err = [(keep / f"run{i}.err").read_text() for i in (1, 2, 3)]
    out = [(keep / f"run{i}.out").read_text() for i in (1, 2, 3)]

    for i, phase_done in ((0, False), (1, True)):
        lines = [ln for ln in err[i].splitlines() if ln.startswith("error:")]
        assert rc[i] != 0 and len(lines) == 1, err[i][-3000:]
        assert "No space left on device" in lines[0], lines[0]
        assert "Traceback" not in err[i] + out[i]
        # run 1 fails while generating; run 2 finishes generating, then fails while finalising
        assert ("generation finished" in err[i]) is phase_done, err[i][-3000:]
        assert "finalise done" not in err[i]
    assert "free space" in [ln for ln in err[0].splitlines() if ln.startswith("error:")][0]
    assert "resuming: " in err[1] and "resuming: " in err[2]
    assert rc[2] == 0, err[2][-3000:]
    assert "generation started" not in err[2]  # everything had been generated: the third run only finalised

    final = keep / "out"
    _assert_same_rows(final, ref)
    import json
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["accounting"] == ref_manifest["accounting"]


# -- one of two engine actors SIGKILLed mid-run -----------------------------------------------------------------------
def _engine_actors(root: int) -> list[int]:
    """Processes under ``root`` whose Ray title says they are a construct engine actor running a batch."""
    from test_failures import _descends_from

    title = b"ray::MapWorker(MapBatches(ConstructUDF)).submit"
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


def test_one_of_two_engine_actors_killed_mid_run_gives_the_rows_of_an_uninterrupted_run(tmp_path, reference):
    """Two engine replicas; once a batch is committed, one actor is SIGKILLed while processing its next batch (what
    Ray's memory monitor does). Ray restarts it, the batch is retried, and the rows are those of the reference."""
    inp, ref, ref_manifest = reference
    out = tmp_path / "out"
    args = [str(RMS_RAY), "construct", "-c", "cpu-tiny", "-i", str(inp), "-o", str(out), "--no-progress", *SETS,
            "resources.engine_replicas=2", "resources.num_cpus_per_engine=0.5"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         cwd=tempfile.gettempdir(), start_new_session=True)
    commits = out / "_work" / "commits"
    killed: list[int] = []
    t0 = time.monotonic()
    try:
        while p.poll() is None and time.monotonic() - t0 < 400 and not killed:
            if commits.is_dir() and any(commits.iterdir()):
                busy = _engine_actors(p.pid)
                if busy:
                    time.sleep(0.2)  # inside the batch
                    try:
                        os.kill(busy[0], signal.SIGKILL)
                        killed.append(busy[0])
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)
        stdout, stderr = p.communicate(timeout=400)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert len(killed) == 1, stderr[-3000:]
    assert p.returncode == 0, stderr[-3000:]
    n_commits = len(list(commits.iterdir()))
    assert n_commits == len(NAMES)  # one image per batch; the killed batch was committed once, by its retry
    _assert_same_rows(out, ref)
    import json
    assert json.loads((out / "manifest.json").read_text())["accounting"] == ref_manifest["accounting"]
