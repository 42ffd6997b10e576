"""Training throughput of ``rms-ray train-judge`` with 1 and with 2 Ray Train workers (data parallel, DDP).

    .venv/bin/python benchmarks/train_throughput.py [--preset bench-100m] [--steps 6] [--batch-size 2] [--grad-accum 2]

Both runs go through the real path (:func:`rms_ray.judge.train.run_train`: Ray Data preparation, ``TorchTrainer``,
DDP over gloo on CPU, checkpoint, export) on the same synthetic rows (:mod:`rms_ray.testing.synthetic_safety`) and
recipe, one after the other in one local Ray (2 logical CPUs): each worker reserves 1 CPU and runs 1 torch thread,
so "2 workers" is data parallelism over the 2 cores, with the same per-worker batch (the global batch doubles).

Samples/s is measured in the steady state from the run's own log (``train_log.jsonl``): examples of the optimiser
steps after the first ``--warmup`` steps, over their wall time (worker start-up, model load, data start and the
final checkpoint/export are outside the window and reported apart). The model should be large enough that compute
dominates communication: ``bench-100m`` (98.7M parameters) with full fine-tuning all-reduces 395 MB of float32
gradients per optimiser step (over gloo, on the same 2 cores that compute), once per ``--grad-accum``
micro-batches. Writes ``benchmarks/results/train_throughput_<preset>_<method>_ga<grad_accum>.json``. Not a test:
numbers vary with machine load, which is why both runs are made in one go.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def steady_rate(out: Path, warmup: int, global_batch: int) -> dict:
    """Steady-state numbers of one run from its ``train_log.jsonl``."""
    steps = [h for h in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if h["event"] == "step"]
    window = steps[warmup:]
    span = window[-1]["time"] - window[0]["time"]
    n = len(window) - 1
    per_step = [b["time"] - a["time"] for a, b in zip(window, window[1:])]
    parts = {k: round(statistics.median(h[k] for h in window[1:]), 4)
             for k in ("data_s", "render_s", "compute_s", "optimizer_s") if k in window[-1]}
    return {"steps_measured": n, "seconds": round(span, 3), "samples_per_s": round(n * global_batch / span, 4),
            "median_step_s": round(statistics.median(per_step), 4), "median_step_parts_rank0": parts,
            "final_train_loss": steps[-1]["train_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="bench-100m", help="builtin model preset (tiny_model.PRESETS)")
    ap.add_argument("--method", default="full", choices=["full", "lora"])
    ap.add_argument("--steps", type=int, default=6, help="optimiser steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the rate")
    ap.add_argument("--batch-size", type=int, default=2, help="per worker and micro-batch")
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimiser step (one gradient "
                    "all-reduce per step, as in the GPU profiles)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from rms_ray.common.ray_utils import configure_ray_data
    from rms_ray.engine.dtype import read_cpu_flags
    from rms_ray.judge.config import load_judge_config
    from rms_ray.judge.train import run_train
    from rms_ray.testing.synthetic_safety import write_synthetic_safety
    from rms_ray.testing.tiny_model import PRESETS, ensure_tiny_vlm

    ensure_tiny_vlm(args.preset)  # built once, outside the timings
    tmp = Path(tempfile.mkdtemp(prefix="rms_ray_train_bench_"))
    train = write_synthetic_safety(tmp / "train.parquet", args.rows, seed=1, id_prefix="t")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp / "ray"))
    configure_ray_data()
    runs = {}
    try:
        for w in [int(x) for x in args.workers.split(",")]:
            cfg = load_judge_config("judge-cpu-tiny", {
                "model.source": f"builtin:{args.preset}", "train.method": args.method,
                "train.num_workers": w, "train.cpus_per_worker": 1, "train.batch_size": args.batch_size,
                "train.grad_accum": args.grad_accum,
                "train.examples_seen": args.steps * args.batch_size * args.grad_accum * w,
                "train.eval_every_steps": 10_000, "train.precision": "auto"})
            t0 = time.perf_counter()
            s = run_train(cfg, str(train), tmp / f"out-{w}", progress=False, log=lambda m: print("  ", m))
            wall = time.perf_counter() - t0
            rate = steady_rate(tmp / f"out-{w}", args.warmup, s["global_batch"])
            meta = json.loads((tmp / f"out-{w}" / "judge_meta.json").read_text())
            runs[str(w)] = {"workers": w, "global_batch": s["global_batch"], **rate, "wall_s": round(wall, 2),
                            "timings": s["timings"], "precision": meta["precision"]}
            print(f"{w} worker(s): {rate['samples_per_s']:.3f} samples/s (median step {rate['median_step_s']:.2f} s, "
                  f"global batch {s['global_batch']}); run {wall:.1f} s")
    finally:
        ray.shutdown()
    keys = sorted(runs, key=int)
    ratio = runs[keys[-1]]["samples_per_s"] / runs[keys[0]]["samples_per_s"] if len(keys) > 1 else None
    spec = PRESETS[args.preset]
    result = {
        "benchmark": "train_throughput", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "bf16_flags": any(f in (read_cpu_flags() or "").split() for f in ("avx512_bf16", "amx_bf16")),
                    "loadavg_at_end": os.getloadavg()},
        "model": {"preset": args.preset, "hidden_size": spec.hidden_size, "layers": spec.num_hidden_layers,
                  "method": args.method},
        "settings": vars(args), "runs": runs,
        "ratio_2_over_1": None if ratio is None else round(ratio, 3), "target_ratio": 1.6,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    from rms_ray.common.io import write_json_atomic

    path = RESULTS / f"train_throughput_{args.preset}_{args.method}_ga{args.grad_accum}.json"
    write_json_atomic(path, result)
    print(json.dumps({k: result[k] for k in ("ratio_2_over_1", "target_ratio")}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
