"""Construction throughput: the Ray pipeline vs the lock-step loop over a bare engine vs the saturated engine.

    .venv/bin/python benchmarks/construct_throughput.py --workload gpu-like      # tiny model: overhead-bound steps
    .venv/bin/python benchmarks/construct_throughput.py --workload engine-bound  # bench-100m: compute-bound steps

Three sides, same config, prompts, images and per-request seeds, each in its own subprocess (one engine at a time):

* ``lockstep``: one process, one ``VLMEngine``; ``Constructor.construct`` over batches of ``--batch-size`` images:
  every stage is one call over the whole batch and waits for its slowest request (the loop before continuous
  batching; it still runs on the same engine, so the engine counters are measured the same way).
* ``saturated``: same process, right after ``lockstep``: every request ``lockstep`` made is replayed at once with
  exactly its recorded number of output tokens (``GenRequest.exact_tokens``: unconstrained, end-of-sequence
  ignored). The engine is kept full, so this is the physical limit on these token shapes.
* ``pipeline``: ``run_construct`` — local Ray, ingest + dedup, Ray Data decode, the engine actor pool where every image
  is its own flow feeding the engine's continuous batching (``batches_in_flight`` calls per actor), atomic commits,
  finalise.

Reported per side: generated tokens/s as the engine saw it (tokens / engine wall time since the engine was up),
images/s, the engine's average running batch (requests in flight per step, capped at max_num_seqs) and its idle
share (time with no request in flight / engine wall time). Targets (from the issue): gpu-like: pipeline >= 1.3x
lock-step tokens/s; engine-bound: pipeline >= 0.9x saturated. Writes ``benchmarks/results/construct_<workload>.json``.
Not a test: numbers vary with machine load, which is why all sides run in one go.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
WORKLOADS = {
    "gpu-like": {"preset": "tiny", "images": 96, "batch_size": 16},
    "engine-bound": {"preset": "bench-100m", "images": 48, "batch_size": 24},
}


def prepare_images(dest: Path, n: int) -> list[Path]:
    """``n`` distinct real images: MMSafeAware (unique by content) when ../shared/data exists, else crops of the
    bundled photos."""
    import hashlib

    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    shared = Path(os.environ.get("RMS_SHARED_DATA", REPO.parent / "shared" / "data")) / "MMSafeAware" / "images"
    out: list[Path] = []
    if shared.is_dir():
        seen = set()
        for p in sorted(shared.iterdir(), key=lambda p: p.name):
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            shutil.copy(p, dest / p.name)
            out.append(dest / p.name)
            if len(out) == n:
                return out
    photos = sorted((REPO / "examples" / "photos").glob("*.[pj][np]g"))
    i = 0
    while len(out) < n:  # distinct crops: different pHash, so dedup keeps them
        src = Image.open(photos[i % len(photos)]).convert("RGB")
        k = i // len(photos)
        w, h = src.size
        box = ((k * 37) % (w // 3), (k * 53) % (h // 3), w - (k * 29) % (w // 3), h - (k * 41) % (h // 3))
        path = dest / f"crop_{i:04d}.jpg"
        src.crop(box).rotate(90 * (k % 4), expand=True).save(path, quality=90)
        out.append(path)
        i += 1
    return out


def config(preset: str, batch_size: int):
    from rms_ray.common.config import load_config

    return load_config("cpu-tiny", {"model.source": f"builtin:{preset}", "resources.batch_size": batch_size})


class _Recorder:
    """Delegates to the real engine and keeps (request, output tokens) of every call, for the saturated replay."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, requests):
        results = self.engine.generate(requests)
        self.calls += [(r, res.num_tokens) for r, res in zip(requests, results)]
        return results


def _engine_side(stats: dict, images: int) -> dict:
    wall = stats["wall_s"]
    return {"images": images, "gen_tokens": stats["gen_tokens"], "engine_wall_s": wall,
            "gen_tokens_per_s": stats["gen_tokens"] / wall if wall else None,
            "images_per_s": images / wall if wall else None,
            "mean_running": stats["mean_running"], "idle_share": stats["idle_share"], "steps": stats["steps"],
            "requests": stats["requests"]}


def run_bare(images_dir: Path, preset: str, batch_size: int) -> dict:
    """lockstep, then saturated, in one process with one engine."""
    import dataclasses

    from rms_ray.construct.loop import Constructor, ImageInput
    from rms_ray.construct.pipeline import image_policy
    from rms_ray.data.images import NormalizedImage, normalize_image
    from rms_ray.data.sources import list_images
    from rms_ray.engine.vllm_engine import VLMEngine

    cfg = config(preset, batch_size)
    policy = image_policy(cfg)
    inputs = []
    for src in list_images(str(images_dir), tuple(cfg.images.extensions))[0]:
        img = normalize_image(Path(src.uri).read_bytes(), src.rel_path, policy)
        if isinstance(img, NormalizedImage):
            inputs.append(ImageInput(src.image_id, src.rel_path, img.data, {}))
    t0 = time.perf_counter()
    engine = VLMEngine(cfg.model, cfg.resources, seed=cfg.generation.seed)
    load_s = time.perf_counter() - t0
    rec = _Recorder(engine)
    constructor = Constructor(cfg, rec, cfg.model.source)
    engine.reset_stats()
    accepted = 0
    for i in range(0, len(inputs), batch_size):
        accepted += sum(len(o.accepted) for o in constructor.construct(inputs[i:i + batch_size]))
    lock = _engine_side(engine.stats(), len(inputs))
    lock.update(engine_load_s=load_s, samples_accepted=accepted)

    replay = [dataclasses.replace(r, exact_tokens=n, logprobs=None) for r, n in rec.calls if n > 0]
    engine.reset_stats()
    engine.generate(replay)
    sat = _engine_side(engine.stats(), len(inputs))
    sat["replayed_requests"] = len(replay)
    return {"lockstep": lock, "saturated": sat}


def run_pipeline(images_dir: Path, preset: str, batch_size: int, out: Path) -> dict:
    """The whole Ray job; engine counters come from the actor (``manifest.this_run.engine``)."""
    from rms_ray.construct.pipeline import run_construct

    cfg = config(preset, batch_size)
    t0 = time.perf_counter()
    manifest = run_construct(cfg, str(images_dir), out, progress=False)
    total_s = time.perf_counter() - t0
    run = manifest["this_run"]
    eng = run["engine"]
    wall = eng.get("wall_s")
    side = {"images": run["images_generated"], "gen_tokens": eng["gen_tokens"], "engine_wall_s": wall,
            "gen_tokens_per_s": eng["gen_tokens"] / wall if wall else None,
            "images_per_s": run["images_generated"] / wall if wall else None,
            "mean_running": eng["mean_running"], "idle_share": eng["idle_share"], "steps": eng["steps"],
            "requests": eng["requests"], "engine_load_s": run["engine_init_s"],
            "samples_accepted": manifest["accounting"]["samples_accepted"], "end_to_end_s": total_s,
            "timings": manifest["timings"]}
    return {"pipeline": side}


def _child(mode: str, args: argparse.Namespace, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--preset", args.preset, "--batch-size", str(args.batch_size),
           "--workdir", str(workdir)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-5000:])
        raise SystemExit(f"{mode} run failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="gpu-like")
    ap.add_argument("--images", type=int, help="override the workload's image count")
    ap.add_argument("--batch-size", type=int, help="override the workload's batch size")
    ap.add_argument("--preset", help="override the workload's model preset")
    ap.add_argument("--child", choices=["bare", "pipeline"])
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    w = WORKLOADS[args.workload]
    args.images = args.images or w["images"]
    args.batch_size = args.batch_size or w["batch_size"]
    args.preset = args.preset or w["preset"]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.child:
        images_dir = args.workdir / "images"
        if args.child == "bare":
            result = run_bare(images_dir, args.preset, args.batch_size)
        else:
            result = run_pipeline(images_dir, args.preset, args.batch_size, args.workdir / "out")
        print(json.dumps(result))
        return

    from rms_ray.testing.tiny_model import ensure_tiny_vlm

    ensure_tiny_vlm(args.preset)
    workdir = Path(tempfile.mkdtemp(prefix="rms_bench_"))
    try:
        prepare_images(workdir / "images", args.images)
        sides = {**_child("bare", args, workdir), **_child("pipeline", args, workdir)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lock, sat, pipe = sides["lockstep"], sides["saturated"], sides["pipeline"]
    result = {
        "benchmark": "construct_throughput",
        "workload": args.workload,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "avx512_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text()},
        "params": {"images": args.images, "batch_size": args.batch_size, "preset": args.preset},
        **sides,
        "pipeline_vs_lockstep": pipe["gen_tokens_per_s"] / lock["gen_tokens_per_s"],
        "pipeline_vs_saturated": pipe["gen_tokens_per_s"] / sat["gen_tokens_per_s"],
        "lockstep_vs_saturated": lock["gen_tokens_per_s"] / sat["gen_tokens_per_s"],
        "targets": {"gpu-like": "pipeline_vs_lockstep >= 1.3", "engine-bound": "pipeline_vs_saturated >= 0.9"},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"construct_{args.workload}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'':22s}{'lockstep':>12s}{'pipeline':>12s}{'saturated':>12s}")
    for key in ("images", "gen_tokens", "engine_wall_s", "gen_tokens_per_s", "images_per_s", "mean_running",
                "idle_share"):
        print(f"{key:22s}" + "".join(f"{(s.get(key) or 0):12.3f}" for s in (lock, pipe, sat)))
    print(f"pipeline / lockstep tokens/s:  {result['pipeline_vs_lockstep']:.3f}")
    print(f"pipeline / saturated tokens/s: {result['pipeline_vs_saturated']:.3f}")
    print(f"lockstep / saturated tokens/s: {result['lockstep_vs_saturated']:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
