"""`ray job submit` exactly as cluster/README.md documents it, against a real local head (`ray start --head`).

Ray 2.60 turns token authentication on for local clusters: the documented commands make sure a token exists
(`ray get-auth-token --generate`) and that every Ray command uses it (`RAY_AUTH_MODE=token`). The job's `python` is
the one on the head's PATH, so the head is started from the activated environment. To stay hermetic and stop only
what it started, the test gives the head its own HOME (so the generated token is its own, not ~/.ray/auth_token),
its own free ports and --temp-dir, and `--block`, so that the head is this test's child: it is stopped by
signalling that process group, never with `ray stop`, which stops every Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

VENV_BIN = Path(sys.executable).parent
SMALL = "--set generation.max_rounds=1 generation.queries_per_image=1 generation.max_hazards=1 generation.contrast=false"


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_USAGE_STATS_ENABLED"}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", NO_COLOR="1", TERM="dumb")
    return env


def _bash(script: str, env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", script], env=env, cwd=REPO, text=True, **kw)


def _stop_head(head: subprocess.Popen, temp_dir: Path) -> None:
    """SIGTERM `ray start --block` (it stops the processes it started), then SIGKILL whatever of this head is
    left: its process group, and any process whose command line names this head's private temp dir."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=20)  # usually seconds; it can wait on its dashboard's grace period: then SIGKILL
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    head.wait(timeout=30)
    mark = str(temp_dir).encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if mark in (d / "cmdline").read_bytes():
                    os.kill(int(d.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def _wait_for_dashboard(port: int, head: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert head.poll() is None, "ray start --head exited"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token: the dashboard is up and enforcing auth
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"dashboard on port {port} not up after {timeout} s")


@pytest.mark.vllm
def test_ray_job_submit_as_documented_builds_a_dataset(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = Path(tempfile.mkdtemp(prefix="rj_", dir="/tmp"))  # short: Ray's socket paths have a length limit
    out = tmp_path / "job_out"
    gcs, dash, agent, client = _free_ports(4)
    env = _env(home)
    activate = f"source {VENV_BIN}/activate"
    # cluster/README.md, with this test's own ports, temp dir and --block (see the module docstring)
    head = _bash(f"{activate} && ray get-auth-token --generate > /dev/null && export RAY_AUTH_MODE=token && "
                 f"exec ray start --head --block --port={gcs} --num-cpus=2 --dashboard-port={dash} "
                 f"--include-dashboard=true --dashboard-agent-listen-port={agent} --ray-client-server-port={client} "
                 f"--temp-dir={temp_dir}", env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 start_new_session=True)
    try:
        _wait_for_dashboard(dash, head)
        assert (home / ".ray" / "auth_token").is_file()  # token auth is on, with this head's own token
        t0 = time.perf_counter()
        sub = _bash(f"{activate} && export RAY_AUTH_MODE=token && "
                    f"ray job submit --address http://127.0.0.1:{dash} --runtime-env cluster/runtime_env.yaml -- "
                    f"python jobs/construct.py --config cpu-tiny --input examples/photos --output {out} --limit 2 "
                    f"--no-progress {SMALL}", env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        log, _ = sub.communicate(timeout=400)
        took = time.perf_counter() - t0
    finally:
        _stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert sub.returncode == 0, log[-5000:]
    assert "succeeded" in log, log[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["accounting"]["images_in"] == 2 and manifest["accounting"]["balanced"]
    assert list((out / "data").glob("*.parquet")) and list((out / "rejected").glob("*.parquet"))
    # Logs reach the user (README "Logs"): rms_ray's milestones, and the engine actor's own output (log_to_driver)
    assert "rms_ray -- ray: joined the cluster" in log and "generation finished: 2 images" in log, log[-3000:]
    assert "(MapWorker(MapBatches(ConstructUDF))" in log, log[-3000:]
    print(f"ray job submit: {took:.1f} s")


def test_job_entrypoint_refuses_a_relative_output_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "jobs/construct.py", "-c", "cpu-tiny", "-i", "examples/photos", "-o",
                        "runs/x"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: --output runs/x is relative"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (REPO / "runs" / "x").exists()


def test_job_entrypoint_run_by_a_python_without_rms_rays_dependencies_says_what_to_do():
    """What `ray job submit` ran on a head started outside the environment: `python` without typer."""
    base = getattr(sys, "_base_executable", None)
    if not base or sys.prefix == sys.base_prefix:
        pytest.skip("not in a virtual environment: no interpreter without rms_ray's dependencies to try")
    has = subprocess.run([base, "-c", "import typer"], capture_output=True, timeout=60).returncode == 0
    if has:
        pytest.skip(f"{base} has typer: cannot show the missing-dependency case with it")
    # inside a job, Ray puts the uploaded working_dir on PYTHONPATH: rms_ray itself imports, its dependencies do not
    r = subprocess.run([base, "jobs/construct.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: No module named 'typer' in ") and "ray start --head" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
