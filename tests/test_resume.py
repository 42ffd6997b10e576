"""Kill a real run with SIGKILL in the middle, rerun it, and compare with an uninterrupted run row for row."""

from __future__ import annotations

import json
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

from conftest import PHOTOS, REPO
from rms_ray.common.config import load_config

pytestmark = pytest.mark.vllm

BATCH = 2
OVERRIDES = {"resources.batch_size": BATCH}


def _cli(inp: Path, out: Path) -> list[str]:
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={v}")]
    return [str(Path(sys.executable).parent / "rms-ray"), "construct", "-c", "cpu-tiny", "-i", str(inp), "-o", str(out),
            "--no-progress", *sets]


def _rows(out: Path, sub: str) -> list[dict]:
    rows = pq.read_table(sorted((out / sub).glob("*.parquet"))).to_pylist()
    return sorted(rows, key=lambda r: (r.get("sample_id") or r["image_id"]))


def _env() -> dict:
    # A short temp dir per Ray start: Ray's unix socket paths must stay under ~107 characters.
    return {**os.environ, "RMS_RAY_TMPDIR": tempfile.mkdtemp(prefix="rr_", dir="/tmp")}


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tmp_path, ray_local):
    from rms_ray.construct.pipeline import run_construct

    inp = tmp_path / "input"
    shutil.copytree(PHOTOS, inp)
    n_images = len([p for p in inp.iterdir() if p.suffix.lower() in (".png", ".jpg")])
    n_batches = -(-n_images // BATCH)

    reference = tmp_path / "reference"
    ref_manifest = run_construct(load_config("cpu-tiny", OVERRIDES), str(inp), reference, progress=False)

    out = tmp_path / "killed"
    env = _env()
    proc = subprocess.Popen(_cli(inp, out), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    commits = out / "_work" / "commits"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if commits.exists() and any(commits.iterdir()):
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, like a crashed node
        proc.wait()
    committed_before = len(list(commits.iterdir()))
    assert 1 <= committed_before < n_batches, "the kill must land in the middle of the run"
    assert not (out / "manifest.json").exists()
    time.sleep(1)

    env2 = _env()
    resumed = subprocess.run(_cli(inp, out), cwd=REPO, env=env2, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())

    # nothing lost, nothing duplicated, and the same rows as the run that was never interrupted
    assert manifest["accounting"] == ref_manifest["accounting"]
    assert manifest["accounting"]["balanced"] and manifest["accounting"]["images_in"] == n_images
    assert manifest["this_run"]["images_generated"] < n_images  # finished images were skipped, not redone
    for sub in ("data", "rejected", "quarantine", "duplicates"):
        got, want = _rows(out, sub), _rows(reference, sub)
        assert got == want, sub
    ids = [r["sample_id"] for r in _rows(out, "data") + _rows(out, "rejected")]
    assert len(ids) == len(set(ids))
    assert not list((out / "_work" / "tmp").iterdir())  # the killed run's uncommitted shard was cleaned up
    for e in (env, env2):
        shutil.rmtree(e["RMS_RAY_TMPDIR"], ignore_errors=True)


def test_changed_file_under_the_same_name_is_regenerated_and_own_output_is_not_input(tmp_path, ray_local):
    """Resume keys on (image id, content): an edited photo is redone, its old rows dropped. The output folder
    sits inside the input folder here, and must never be read back as input (its categories.png, say)."""
    import hashlib

    from rms_ray.construct.pipeline import run_construct

    inp = tmp_path / "photos"
    inp.mkdir()
    shutil.copy(PHOTOS / "coins.png", inp / "x.png")
    shutil.copy(PHOTOS / "chelsea.png", inp / "y.png")
    out = inp / "dataset"
    cfg = load_config("cpu-tiny")
    first = run_construct(cfg, str(inp), out, progress=False)
    assert first["accounting"]["images_in"] == 2 and first["this_run"]["images_generated"] == 2

    shutil.copy(PHOTOS / "brick.png", inp / "x.png")  # same name, new content
    second = run_construct(cfg, str(inp), out, progress=False)
    assert second["accounting"]["images_in"] == 2  # dataset/categories.png etc. were not listed
    assert second["this_run"]["images_generated"] == 1  # only the changed file
    assert second["accounting"]["committed_images_ignored"] == 1  # the old x.png commit
    assert second["accounting"]["balanced"]
    brick = hashlib.sha256((PHOTOS / "brick.png").read_bytes()).hexdigest()
    rows = [r for sub in ("data", "rejected") for r in _rows(out, sub) if r["image_path"] == "x.png"]
    assert rows and {r["sha256"] for r in rows} == {brick}
