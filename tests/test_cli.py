"""The `rms-ray` console script, run as a real process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import PHOTOS

from rms_ray.common.config import CONFIG_DIR, load_config

RMS_RAY = Path(sys.executable).parent / "rms-ray"
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "RAY_USAGE_STATS_ENABLED": "0"}


def rms_ray(*args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(RMS_RAY), *args], capture_output=True, text=True, timeout=timeout, env=env or ENV,
                          cwd=tempfile.gettempdir())


def test_console_script_installed():
    assert RMS_RAY.is_file() and os.access(RMS_RAY, os.X_OK)


def test_help_lists_commands():
    r = rms_ray("--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("construct", "check-config", "profiles", "build-tiny-model", "manifest"):
        assert cmd in r.stdout


def test_no_args_shows_help():
    r = rms_ray()
    assert "construct" in r.stdout + r.stderr
    assert "Usage" in r.stdout + r.stderr


def test_construct_help_shows_options():
    r = rms_ray("construct", "--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--config", "--input", "--output", "--limit", "--set", "--ray-address", "--no-progress"):
        assert opt in r.stdout, opt


def test_check_config_prints_resolved_config_and_hash():
    r = rms_ray("check-config", "cpu-tiny")
    assert r.returncode == 0, r.stderr
    cfg = load_config("cpu-tiny")
    assert r.stdout.rstrip().splitlines()[-1] == f"# config_hash: {cfg.config_hash()}"
    assert yaml.safe_load(r.stdout) == cfg.model_dump(mode="json")


def test_check_config_applies_overrides():
    r = rms_ray("check-config", "cpu-tiny", "--set", "generation.max_rounds=2", "--set", "model.env.FOO=bar")
    assert r.returncode == 0, r.stderr
    cfg = load_config("cpu-tiny", {"generation.max_rounds": 2, "model.env.FOO": "bar"})
    resolved = yaml.safe_load(r.stdout)
    assert resolved["generation"]["max_rounds"] == 2 and resolved["model"]["env"]["FOO"] == "bar"
    assert f"# config_hash: {cfg.config_hash()}" in r.stdout
    assert cfg.config_hash() != load_config("cpu-tiny").config_hash()


def test_check_config_by_path():
    r = rms_ray("check-config", str(CONFIG_DIR / "gpu-qwen2.5-vl-7b.yaml"))
    assert r.returncode == 0, r.stderr
    assert f"# config_hash: {load_config('gpu-qwen2.5-vl-7b').config_hash()}" in r.stdout


def test_check_config_bad_override_exits_2():
    r = rms_ray("check-config", "cpu-tiny", "--set", "generation.max_rounds=0")
    assert r.returncode == 2
    assert "generation.max_rounds: Input should be greater than or equal to 1 (got 0)" in r.stderr
    assert "config_hash" not in r.stdout


def test_check_config_unknown_key_exits_2():
    r = rms_ray("check-config", "cpu-tiny", "--set", "generation.foo=1")
    assert r.returncode == 2
    assert "  - --set generation.foo=1: unknown key generation.foo" in r.stderr


def test_check_config_set_without_equals_exits_2():
    r = rms_ray("check-config", "cpu-tiny", "--set", "generation.max_rounds")
    assert r.returncode == 2
    assert "--set expects key=value, got 'generation.max_rounds'" in r.stderr


def test_check_config_unknown_profile_exits_2():
    r = rms_ray("check-config", "no-such-profile")
    assert r.returncode == 2
    assert "config no-such-profile not found" in r.stderr and "cpu-tiny" in r.stderr


def test_profiles_lists_shipped_profiles():
    r = rms_ray("profiles")
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert names == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert "CPU demo/test profile" in r.stdout


def test_manifest_missing(tmp_path: Path):
    r = rms_ray("manifest", str(tmp_path))
    assert r.returncode == 2
    assert f"error: {tmp_path / 'manifest.json'} not found" in r.stderr


def test_manifest_prints_accounting(tmp_path: Path):
    (tmp_path / "manifest.json").write_text('{"accounting": {"images_in": 3, "balanced": true}, "other": 1}')
    r = rms_ray("manifest", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout) == {"images_in": 3, "balanced": True}


def test_construct_bad_config_exits_2_before_any_work(tmp_path: Path):
    out = tmp_path / "out"
    r = rms_ray("construct", "-c", "cpu-tiny", "-i", str(tmp_path), "-o", str(out), "--set", "resources.batch_size=0")
    assert r.returncode == 2
    assert "resources.batch_size: Input should be greater than or equal to 1 (got 0)" in r.stderr
    assert not out.exists()


def test_construct_missing_input_exits_2(tmp_path: Path):
    """Starts a real local Ray (about 10 s) before the input is listed."""
    ray_tmp = tempfile.mkdtemp(prefix="rr_", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        missing = tmp_path / "no_such_input"
        env = {**ENV, "RMS_RAY_TMPDIR": ray_tmp}
        env.pop("RAY_ADDRESS", None)
        r = rms_ray("construct", "-c", "cpu-tiny", "-i", str(missing), "-o", str(tmp_path / "out"), "--no-progress",
                    timeout=120, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"error: input {missing} does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_construct_refuses_to_mix_configs_in_one_output(tmp_path):
    out = tmp_path / "out"
    (out / "_work").mkdir(parents=True)
    (out / "_work" / "run_config.json").write_text('{"config_hash": "0000000000000000", "config": {}}')
    (tmp_path / "in").mkdir()
    shutil.copy(PHOTOS / "coins.png", tmp_path / "in")  # an input with no image is refused before this check
    res = subprocess.run([str(RMS_RAY), "construct", "-c", "cpu-tiny", "-i", str(tmp_path / "in"), "-o", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "holds work made with config hash 0000000000000000" in res.stderr


# -- what a new user tripped over ------------------------------------------------------------------------------


def test_construct_with_no_images_fails_before_ray_and_writes_nothing(tmp_path: Path):
    inp, out = tmp_path / "empty", tmp_path / "out"
    inp.mkdir()
    (inp / "notes.txt").write_text("not an image")
    t0 = time.monotonic()
    r = rms_ray("construct", "-c", "cpu-tiny", "-i", str(inp), "-o", str(out))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: no images in {inp} (looked for .jpg, .jpeg, .png, .webp, .gif, .bmp, .tif, .tiff, .mpo); "
        "nothing to build")
    assert not out.exists()  # the output folder was neither created nor bound to the config
    assert "ray" not in r.stderr.lower() and time.monotonic() - t0 < 30  # Ray never started


def test_bad_set_key_names_the_set_not_the_file(tmp_path: Path):
    out = tmp_path / "out"
    r = rms_ray("construct", "-c", "cpu-tiny", "-i", str(PHOTOS), "-o", str(out), "--set",
                "generation.max_rounds=2", "generation.max_roundz=2")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"invalid override for config {CONFIG_DIR / 'cpu-tiny.yaml'} (the file itself is valid):",
        "  - --set generation.max_roundz=2: unknown key generation.max_roundz"]
    assert not out.exists()


@pytest.mark.parametrize(("override", "line"), [
    ("images.jpeg_quality=98",
     "  - --set images.jpeg_quality=98: images.jpeg_quality: Input should be less than or equal to 95 (got 98)"),
    ("images.min_side=1000", "  - --set images.min_side=1000: images: Value error, min_side (1000) > max_side (512)"),
])
def test_image_bounds_of_the_decoder_fail_before_anything_is_written(tmp_path: Path, override: str, line: str):
    out = tmp_path / "out"
    r = rms_ray("construct", "-c", "cpu-tiny", "-i", str(PHOTOS), "-o", str(out), "--set", override)
    assert r.returncode == 2 and line in r.stderr.splitlines(), r.stderr
    assert not out.exists()


def test_one_set_takes_several_overrides():
    r = rms_ray("check-config", "cpu-tiny", "--set", "generation.max_rounds=2", "images.max_side=640",
                "--set", "taxonomy.max_categories=5")
    assert r.returncode == 0, r.stderr
    got = yaml.safe_load(r.stdout)
    assert (got["generation"]["max_rounds"], got["images"]["max_side"], got["taxonomy"]["max_categories"]) == (2, 640, 5)


def test_expand_set_values_stops_at_anything_that_is_not_key_value():
    from rms_ray.cli import expand_set_values

    assert expand_set_values(["--set", "a=1", "b.c=[1, 2]", "-o", "x", "d=3"]) == [
        "--set", "a=1", "--set", "b.c=[1, 2]", "-o", "x", "d=3"]
    assert expand_set_values(["--datasets", "d1", "--set", "a=1", "b=2", "d2.parquet", "runs/x=y"]) == [
        "--datasets", "d1", "--set", "a=1", "--set", "b=2", "d2.parquet", "runs/x=y"]
    assert expand_set_values(["--set=a=1", "b=2", "--", "c=3"]) == ["--set=a=1", "--set", "b=2", "--", "c=3"]


def test_evaluate_keeps_positional_datasets_after_several_overrides(tmp_path: Path):
    d1 = tmp_path / "d1.jsonl"
    d1.write_text("")
    missing = tmp_path / "d2.parquet"
    r = rms_ray("evaluate", "--datasets", str(d1), "--set", "evaluate.n_boot=5", "resources.batch_size=4",
                str(missing), "-o", str(tmp_path / "ev"))
    assert r.returncode == 2 and f"error: dataset {missing} not found" in r.stderr, r.stderr  # d2 is a dataset
    r = rms_ray("evaluate", "--datasets", str(d1), "--set", "evaluate.n_boot=5", "judge.max_tokenz=3",
                str(missing), "-o", str(tmp_path / "ev"))
    assert r.returncode == 2 and "  - --set judge.max_tokenz=3: unknown key judge.max_tokenz" in r.stderr


def test_ctrl_c_says_how_to_resume_exits_130_and_leaves_no_temp_files(tmp_path: Path):
    """A real run (local Ray, ~10 s) interrupted like Ctrl-C in a terminal (SIGINT to its process group) while its
    engine starts; TMPDIR is private, so whatever the run put in the temp folder is seen."""
    tmp = Path(tempfile.mkdtemp(prefix="rr_", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**ENV, "TMPDIR": str(tmp)}
    for key in ("RAY_ADDRESS", "RMS_RAY_TMPDIR"):
        env.pop(key, None)
    proc = subprocess.Popen([str(RMS_RAY), "construct", "-c", "cpu-tiny", "-i", str(PHOTOS), "-o",
                             str(tmp_path / "out"), "--limit", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=tempfile.gettempdir(), start_new_session=True)
    try:
        err = b""
        os.set_blocking(proc.stderr.fileno(), False)
        deadline = time.monotonic() + 180
        while b"starting engine" not in err and proc.poll() is None and time.monotonic() < deadline:
            err += proc.stderr.read() or b""
            time.sleep(0.05)
        assert b"starting engine" in err, err.decode()[-2000:]
        os.killpg(proc.pid, signal.SIGINT)
        os.set_blocking(proc.stderr.fileno(), True)
        _, rest = proc.communicate(timeout=120)
        err = (err + rest).decode()
        assert proc.returncode == 130, err[-2000:]
        assert err.rstrip().splitlines()[-1] == "interrupted; rerun the same command to resume"
        assert "Traceback" not in err
        # its Ray session and engine scratch files are gone, on failure too. torchinductor_<user> (made when the
        # engine imports torch late enough) is torch's compile cache, shared by every torch process: not the run's.
        left = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")
                      if not p.relative_to(tmp).parts[0].startswith("torchinductor_"))
        assert left == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
