"""Throughput of the Ray construction pipeline vs the same prompts through a bare ``vllm.LLM`` in one process.

    .venv/bin/python benchmarks/construct_throughput.py [--images 200] [--batch-size 32] [--preset bench-100m]

Both sides run the identical construction chain (same config, prompts, seeds, so the same requests and outputs)
on the same images with the same engine settings; only the harness differs:

* ``bare``: one process, one ``VLMEngine`` (a ``vllm.LLM``), ``Constructor.construct`` over the images in batches of
  ``--batch-size`` (the same batch size the pipeline uses; the bare engine sees the same batches).
* ``pipeline``: ``run_construct`` — local Ray, ingest + dedup pass, Ray Data decode tasks, the engine actor pool,
  atomic shard commits, finalise (taxonomy, tables, card).

Each side runs in its own subprocess (clean env, one engine at a time). The engine's load time is measured on
both sides and reported apart; the ratio of steady-state images/s (engine loaded) measures the pipeline's
overhead; the end-to-end ratio includes everything. Writes ``benchmarks/results/construct_throughput.json``.
Uses a randomly initialised ~100M-parameter Qwen2.5-VL (``bench-100m``) so that engine time dominates, as it does
with a real model on a cluster. Not a test: numbers vary with machine load, which is why both run in one go.
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


def run_bare(images_dir: Path, preset: str, batch_size: int) -> dict:
    """Same chain, one process, one vllm.LLM; returns timings."""
    from rms_ray.construct.loop import Constructor, ImageInput
    from rms_ray.engine.vllm_engine import VLMEngine
    from rms_ray.construct.pipeline import image_policy
    from rms_ray.data.images import NormalizedImage, normalize_image
    from rms_ray.data.sources import list_images

    cfg = config(preset, batch_size)
    policy = image_policy(cfg)
    inputs = []
    # same ids (they seed each request) and the same order, hence the same batches, as the pipeline
    for src in list_images(str(images_dir), tuple(cfg.images.extensions))[0]:
        img = normalize_image(Path(src.uri).read_bytes(), src.rel_path, policy)
        if isinstance(img, NormalizedImage):
            inputs.append(ImageInput(src.image_id, src.rel_path, img.data, {}))
    t0 = time.perf_counter()
    engine = VLMEngine(cfg.model, cfg.resources, seed=cfg.generation.seed)
    load_s = time.perf_counter() - t0
    constructor = Constructor(cfg, engine, cfg.model.source)
    t1 = time.perf_counter()
    tokens = accepted = 0
    for i in range(0, len(inputs), batch_size):
        for o in constructor.construct(inputs[i:i + batch_size]):
            tokens += o.gen_tokens
            accepted += len(o.accepted)
    steady_s = time.perf_counter() - t1
    return {"images": len(inputs), "engine_load_s": load_s, "steady_s": steady_s, "total_s": load_s + steady_s,
            "gen_tokens": tokens, "samples_accepted": accepted}


def run_pipeline(images_dir: Path, preset: str, batch_size: int, out: Path) -> dict:
    """The whole Ray job; engine load time is taken from the actor's own measurement (``engine_init_s``)."""
    from rms_ray.construct.pipeline import run_construct

    cfg = config(preset, batch_size)
    t0 = time.perf_counter()
    manifest = run_construct(cfg, str(images_dir), out, progress=False)
    total_s = time.perf_counter() - t0
    gen = manifest["this_run"]
    return {"images": gen["images_generated"], "engine_load_s": gen["engine_init_s"],
            "generate_s": manifest["timings"]["generate_s"],
            "steady_s": manifest["timings"]["generate_s"] - gen["engine_init_s"],
            "total_s": total_s, "gen_tokens": gen["gen_tokens"],
            "samples_accepted": manifest["accounting"]["samples_accepted"], "timings": manifest["timings"]}


def _child(mode: str, args: argparse.Namespace, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--images", str(args.images), "--batch-size",
           str(args.batch_size), "--preset", args.preset, "--workdir", str(workdir)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-5000:])
        raise SystemExit(f"{mode} run failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--preset", default="bench-100m")
    ap.add_argument("--child", choices=["bare", "pipeline"])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--output", type=Path, default=RESULTS / "construct_throughput.json")
    args = ap.parse_args()
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
        bare = _child("bare", args, workdir)
        pipe = _child("pipeline", args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for r in (bare, pipe):
        r["images_per_s_steady"] = r["images"] / r["steady_s"]
        r["images_per_s_total"] = r["images"] / r["total_s"]
        r["gen_tokens_per_s_steady"] = r["gen_tokens"] / r["steady_s"]
    result = {
        "benchmark": "construct_throughput",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "params": {"images": args.images, "batch_size": args.batch_size, "preset": args.preset},
        "bare_vllm": bare,
        "ray_pipeline": pipe,
        "ratio_steady": pipe["images_per_s_steady"] / bare["images_per_s_steady"],
        "ratio_total": pipe["images_per_s_total"] / bare["images_per_s_total"],
        "same_outputs": bare["gen_tokens"] == pipe["gen_tokens"] and bare["samples_accepted"] == pipe["samples_accepted"],
        "target_ratio_steady": 0.85,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"{'':24s}{'bare vLLM':>14s}{'Ray pipeline':>14s}")
    for key in ("images", "engine_load_s", "steady_s", "total_s", "images_per_s_steady", "images_per_s_total",
                "gen_tokens_per_s_steady"):
        print(f"{key:24s}{bare[key]:14.3f}{pipe[key]:14.3f}")
    print(f"ratio (pipeline / bare), steady state: {result['ratio_steady']:.3f}  (target >= 0.85)")
    print(f"ratio (pipeline / bare), end to end:   {result['ratio_total']:.3f}")
    print(f"same generated tokens and accepted samples on both sides: {result['same_outputs']}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
