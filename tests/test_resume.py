"""Kill a real run with SIGKILL in the middle, rerun it, and compare with an uninterrupted run row for row."""

from __future__ import annotations

import json
import os
import re
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


def _cli(inp: Path, out: Path, progress: bool = False) -> list[str]:
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={v}")]
    return [str(Path(sys.executable).parent / "rms-ray"), "construct", "-c", "cpu-tiny", "-i", str(inp), "-o", str(out),
            "--progress" if progress else "--no-progress", *sets]


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

    # The resumed run as a user sees it: progress bar on, default temp handling in a private TMPDIR.
    tmp2 = Path(tempfile.mkdtemp(prefix="rr_", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env2 = {**os.environ, "TMPDIR": str(tmp2)}
    env2.pop("RMS_RAY_TMPDIR", None)
    resumed = subprocess.run(_cli(inp, out, progress=True), cwd=REPO, env=env2, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    err = resumed.stderr.replace("\r", "\n")
    said = [re.fullmatch(rf"resuming: (\d+) of {n_images} images already done", ln) for ln in err.splitlines()]
    done_before = [int(m.group(1)) for m in said if m]
    assert len(done_before) == 1 and done_before[0] >= BATCH, err[-3000:]
    todo = n_images - done_before[0]
    assert manifest["this_run"]["images_generated"] == todo  # what it said was done is what it skipped
    assert "construct (starting engine…)" in err and f" {todo}/{todo} [" in err  # bar over what is left
    for noise in ("Token authentication", "Progress bars disabled", "core_worker.cc", "Loading weights", "Glyph",
                  "Traceback"):
        assert noise not in err, noise
    # Ray's session and vLLM's file store: all removed. torchinductor_<user> is torch's compile cache, made once
    # per user and shared by every torch process (not this run's to remove).
    left = [p.name for p in tmp2.iterdir() if not p.name.startswith("torchinductor_")]
    assert left == [], left
    shutil.rmtree(tmp2, ignore_errors=True)

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
    shutil.rmtree(env["RMS_RAY_TMPDIR"], ignore_errors=True)


def test_changed_file_under_the_same_name_is_regenerated_and_own_output_is_not_input(tmp_path, ray_local,
                                                                                     monkeypatch):
    """Resume keys on (image id, content): an edited photo is redone, its old rows dropped. The output folder
    sits inside the input folder here, and must never be read back as input (its categories.png, say).

    Also, with the real engine actors: relative --output, input and model folder, given from another working
    directory than the actors' (they run in the repository, where Ray started), land where the driver means them
    (rows carry the model path the actors were given); and a committed shard found damaged on the next run is
    moved aside and its image redone in that run, rows not duplicated."""
    import hashlib

    from rms_ray.construct.pipeline import run_construct
    from rms_ray.testing.tiny_model import ensure_tiny_vlm

    monkeypatch.chdir(tmp_path)
    shutil.copytree(ensure_tiny_vlm("tiny"), tmp_path / "models" / "tiny")
    inp = tmp_path / "photos"
    inp.mkdir()
    shutil.copy(PHOTOS / "coins.png", inp / "x.png")
    shutil.copy(PHOTOS / "chelsea.png", inp / "y.png")
    out = inp / "dataset"
    cfg = load_config("cpu-tiny", {"model.source": "models/tiny"})
    first = run_construct(cfg, "photos", "photos/dataset", progress=False)
    assert first["accounting"]["images_in"] == 2 and first["this_run"]["images_generated"] == 2
    model = str(tmp_path / "models" / "tiny")
    assert first["config"]["model"]["source"] == model
    assert {r["model_id"] for sub in ("data", "rejected") for r in _rows(out, sub)} == {model}  # the actors' config
    assert not (REPO / "photos").exists()  # nothing written relative to the actors' working directory

    shutil.copy(PHOTOS / "brick.png", inp / "x.png")  # same name, new content
    second = run_construct(cfg, "photos", "photos/dataset", progress=False)
    assert second["accounting"]["images_in"] == 2  # dataset/categories.png etc. were not listed
    assert second["this_run"]["images_generated"] == 1  # only the changed file
    assert second["accounting"]["committed_images_ignored"] == 1  # the old x.png commit
    assert second["accounting"]["balanced"]
    brick = hashlib.sha256((PHOTOS / "brick.png").read_bytes()).hexdigest()
    rows = [r for sub in ("data", "rejected") for r in _rows(out, sub) if r["image_path"] == "x.png"]
    assert rows and {r["sha256"] for r in rows} == {brick}

    # a machine crash left the shard of x.png's current rows with an empty file: redone, never read
    index = pq.read_table(out / "_work" / "commits.parquet").to_pylist()
    shard = next(r["shard"] for r in index if r["sha256"] == brick)
    (out / "_work" / "commits" / shard / "images.parquet").write_bytes(b"")
    want = {sub: _rows(out, sub) for sub in ("data", "rejected")}
    third = run_construct(cfg, "photos", "photos/dataset", progress=False)
    assert third["this_run"]["images_generated"] == 1 and third["accounting"]["balanced"]
    assert len(list((out / "_work" / "damaged").iterdir())) == 1
    for sub in ("data", "rejected"):
        got = _rows(out, sub)
        assert got == want[sub], sub
        assert len({r["sample_id"] for r in got}) == len(got)
