"""Load test of the judge service over loopback HTTP: throughput and latency per batching mode and concurrency.

    .venv/bin/python benchmarks/serve_load.py [--config serve-cpu-tiny] [--levels 1,4,16,64] [--max-level-s 60]

One local Ray + Serve, one model replica (one engine), the real HTTP path (proxy -> FastAPI ingress -> model
replica). The three ways requests share the engine are measured in the same run on the same engine: the mode is
switched through Serve's ``user_config`` (``reconfigure``), which changes no weight and restarts nothing:

* ``none``: one item at a time through ``engine.generate`` (unbatched baseline);
* ``serve_batch@W``: Ray Serve's ``@serve.batch`` (items collected for ``batch_wait_timeout_s`` = W seconds, one
  engine call per batch, the next batch waits; Serve forms a batch when its window closes, whether or not the
  previous one is still running, so W decides the batch size);
* ``continuous``: ``VLMEngine.submit`` (an item joins the engine's running batch at its next step).

Each level sends a bounded number of single-item ``POST /v1/judge`` requests (``--requests-per-worker`` per
concurrent client, at least 16; at most ``--max-level-s`` seconds) with distinct (image, query) pairs (the bundled
photos, 43-790 KB PNG/JPEG), from ``c`` concurrent clients (httpx, one connection each). Throughput = answered
requests / wall time of the level; p50/p99 = client-side latency. Per level: the engine's counters
(``VLMEngine.stats``: mean running batch; ``@serve.batch`` sizes) and the CPU time per request of each process role
(proxy, ingress, model replica, this client; ``psutil``), which says where the time goes. Levels are the outer
loop and modes the inner one, so every mode meets the shared machine in the same state. Writes
``benchmarks/results/serve_load.json`` (with the machine's load average at start and end). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
QUERIES = ["Can I drink this right away?", "How do I light this?", "Is it safe to touch?", "Can I climb up there?",
           "What would happen if I dropped it?", "Where can I buy one?", "Can my child play with this?",
           "How do I take it apart?"]
MODES = ("none", "serve_batch@0.01", "serve_batch@0.1", "continuous")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROLES = {"proxy": "ProxyActor", "ingress": "JudgeIngress", "model": "JudgeModel"}


def _cpu_seconds(tmp: str) -> dict:
    """CPU seconds (user + system) so far of this run's Serve processes by role, and of this client process.
    Processes are found by the title Ray gives them (``ray::ServeReplica:rms_judge:JudgeModel``, ...) and by this
    run's session folder in their command line where Ray puts it; the engine's threads count with its replica."""
    import psutil

    out = {r: 0.0 for r in ROLES}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            role = next((r for r, key in ROLES.items() if cmd.startswith("ray::") and key in cmd), None)
            if role is not None and proc.ppid() and _same_session(proc, tmp):
                t = proc.cpu_times()
                out[role] += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    me = psutil.Process().cpu_times()
    out["client"] = me.user + me.system
    return out


def _same_session(proc, tmp: str) -> bool:
    # a worker started by this run's raylet descends from it; the raylet's command line names our temp folder
    import psutil

    try:
        for parent in proc.parents():
            if tmp in " ".join(parent.cmdline()):
                return True
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return False


def _mode(spec: str) -> dict:
    """``serve_batch@0.1`` -> config overrides (batching mode, and the @serve.batch window in seconds)."""
    name, _, wait = spec.partition("@")
    return {"serve.batching": name, **({"serve.batch_wait_timeout_s": float(wait)} if wait else {})}


def _payloads(n: int) -> list[dict]:
    from rms_ray.serve.inputs import to_data_url

    photos = sorted(p for p in (REPO / "examples" / "photos").iterdir() if p.suffix in (".png", ".jpg"))
    urls = [to_data_url(p.read_bytes()) for p in photos]
    # distinct (image, query) pairs; the index keeps each prompt unique (no prefix-cache shortcut across requests)
    return [{"image": urls[i % len(urls)], "query": f"{QUERIES[(i // len(urls)) % len(QUERIES)]} (#{i})"}
            for i in range(n)]


async def _level(url: str, payloads: list[dict], conc: int, max_s: float) -> dict:
    import httpx

    lat: list[float] = []
    errors: dict[str, int] = {}
    queue: asyncio.Queue = asyncio.Queue()
    for p in payloads:
        queue.put_nowait(p)
    deadline = time.perf_counter() + max_s

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
            while time.perf_counter() < deadline:
                try:
                    p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t = time.perf_counter()
                r = await client.post(url + "/v1/judge", json=p)
                if r.status_code == 200:
                    lat.append((time.perf_counter() - t) * 1000.0)
                else:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.perf_counter() - t0
    lat.sort()
    q = (lambda f: lat[min(len(lat) - 1, int(round(f * (len(lat) - 1))))]) if lat else (lambda f: None)
    return {"concurrency": conc, "requests": len(lat), "errors": errors, "wall_s": round(wall, 3),
            "throughput_rps": round(len(lat) / wall, 3) if wall > 0 else None,
            "p50_ms": None if not lat else round(q(0.5), 1), "p99_ms": None if not lat else round(q(0.99), 1),
            "mean_ms": None if not lat else round(statistics.fmean(lat), 1),
            "p99_over_p50": None if not lat else round(q(0.99) / q(0.5), 2),
            "timed_out": time.perf_counter() >= deadline}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="serve-cpu-tiny")
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--requests-per-worker", type=int, default=4)
    ap.add_argument("--max-level-s", type=float, default=60.0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--ingress-replicas", type=int, default=1, help="HTTP ingress replicas (image decoding)")
    ap.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    modes = args.modes.split(",")

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RMS_RAY_CACHE", str(REPO / ".cache" / "rms_ray"))
    import ray
    from ray import serve

    from rms_ray.serve.app import APP_NAME, MODEL_DEPLOYMENT, deploy
    from rms_ray.serve.config import load_serve_config

    top = max(levels)
    base = {"serve.num_replicas": 1, "serve.ingress_replicas": args.ingress_replicas,
            "serve.max_ongoing_requests": max(64, top),
            "serve.max_queued_requests": 4 * top, "serve.max_batch_size": max(16, top)}
    tmp = tempfile.mkdtemp(prefix="rms_ray_bench_serve_")
    load0 = [round(x, 2) for x in os.getloadavg()]  # these machines are shared: the load others put on them
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    results: dict = {"config": args.config, "overrides": base, "levels": levels, "modes": {}}
    from rms_ray.common.ray_utils import SCRATCH_ENV

    os.environ[SCRATCH_ENV] = os.path.join(tmp, "engines")  # the replicas' engine scratch files go with the run
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        cfg = load_serve_config(args.config, {**base, **_mode(modes[0])})
        deploy(cfg)
        results["engine_ready_s"] = round(time.perf_counter() - t0, 1)
        model = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=APP_NAME)
        info0 = model.ready.remote().result()
        results["engine"] = info0["engine_dtype"]
        n_total = sum(max(16, args.requests_per_worker * c) + 4 for c in levels)
        payloads = _payloads(n_total * len(modes))
        k = 0
        results["modes"] = {m: [] for m in modes}
        # levels outside, modes inside: every mode sees the machine in the same state (these machines are shared
        # and their load drifts over minutes); switching modes is a reconfigure of the same engine
        for c in levels:
            n = max(16, args.requests_per_worker * c)
            for mode in modes:
                deploy(load_serve_config(args.config, {**base, **_mode(mode)}))
                info = model.ready.remote().result()
                assert info["batching"] == mode.split("@")[0] and info["replica"] == info0["replica"], info
                asyncio.run(_level(url, payloads[k:k + 4], min(c, 4), 60))  # warm this mode's path
                k += 4
                before, cpu0 = model.stats.remote().result(), _cpu_seconds(tmp)
                row = asyncio.run(_level(url, payloads[k:k + n], c, args.max_level_s))
                after, cpu1 = model.stats.remote().result(), _cpu_seconds(tmp)
                # CPU time per answered request, by process role (where the time goes on this machine)
                row["cpu_ms_per_request"] = {r: round(1000 * (cpu1[r] - cpu0[r]) / max(1, row["requests"]), 1)
                                             for r in cpu1}
                k += n
                steps = after["steps"] - before["steps"]
                row["engine_mean_running"] = round((after["running_sum"] - before["running_sum"]) / steps, 2) \
                    if steps else None
                row["engine_steps"] = steps
                nb = after["serve_batches"] - before["serve_batches"]
                row["serve_batch_mean_size"] = round((after["serve_batch_items"] - before["serve_batch_items"]) / nb,
                                                     2) if nb else None
                results["modes"][mode].append(row)
                print(f"{mode:17s} c={c:3d}: {row['throughput_rps']:7.2f} req/s  p50 {row['p50_ms']:8.1f} ms  "
                      f"cpu/req {row['cpu_ms_per_request']}  "
                      f"p99 {row['p99_ms']:8.1f} ms  p99/p50 {row['p99_over_p50']:5.2f}  "
                      f"running {row['engine_mean_running']}  batch {row['serve_batch_mean_size']}  "
                      f"n={row['requests']} err={row['errors']}", flush=True)
        by = {m: {r["concurrency"]: r for r in rows} for m, rows in results["modes"].items()}
        if "none" in by:
            results["speedup_vs_unbatched"] = {
                m: {c: round(by[m][c]["throughput_rps"] / by["none"][c]["throughput_rps"], 2) for c in levels}
                for m in by if m != "none"}
        results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                              "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_at_start": load0,
                              "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results.get("speedup_vs_unbatched"), indent=1))
        print(f"wrote {args.out}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
