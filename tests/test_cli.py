"""The `rms-ray` console script, run as a real process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

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
    assert "generation.foo: unknown key (not allowed here)" in r.stderr


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
    res = subprocess.run([str(RMS_RAY), "construct", "-c", "cpu-tiny", "-i", str(tmp_path / "in"), "-o", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "holds work made with config hash 0000000000000000" in res.stderr
