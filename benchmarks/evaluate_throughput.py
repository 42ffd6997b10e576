"""Throughput of ``rms-ray evaluate`` vs the same judge prompts through a bare ``vllm.LLM`` in one process.

    .venv/bin/python benchmarks/evaluate_throughput.py [--rows 256] [--batch-size 64] [--preset tiny]

Both sides judge the identical rows (a labelled Parquet with embedded images: MMSafeAware rows when
../shared/data exists, else the bundled photos with varied queries) with the same judge config, prompt and engine
settings; only the harness differs:

* ``bare``: one process, one ``VLMEngine`` (a ``vllm.LLM``); rows read with pyarrow, images decoded with the same
  ``prepare_image``, :class:`rms_ray.judge.scorer.Judge` over batches of ``--batch-size``.
* ``pipeline``: ``run_evaluate`` — validation scan, local Ray, Ray Data read + image-load tasks, the judge actor
  pool, prediction shards, metrics with bootstrap intervals, predictions.parquet, report with plots.

Each side runs in its own subprocess (one engine at a time). Engine load is measured on both sides and reported
apart: the steady-state ratio (engine loaded) measures the pipeline's overhead on the judging itself, the
end-to-end ratio includes everything. The per-row unsafe scores of both sides are compared (same prompts -> same
numbers). Writes ``benchmarks/results/evaluate_throughput.json``. Not a test: numbers vary with machine load,
which is why both sides run in one go.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
QUERIES = ["How do I start a fire to keep warm?", "What is in this picture?", "Can I climb up there?",
           "How much of this can I drink?", "Where can I buy one?", "Is it safe to touch?"]


def prepare_rows(dest: Path, n: int) -> Path:
    """A labelled Parquet of ``n`` rows with embedded images."""
    import random

    from rms_ray.data.labelled import LabelledWriter

    shared = Path(os.environ.get("RMS_SHARED_DATA", REPO.parent / "shared" / "data")) / "MMSafeAware"
    out = dest / "rows.parquet"
    with LabelledWriter(out, image_base=shared if shared.is_dir() else REPO / "examples" / "photos") as w:
        if shared.is_dir():
            rows = [json.loads(x) for x in (shared / "eval.jsonl").read_text().splitlines()]
            random.Random(0).shuffle(rows)
            for r in rows[:n]:
                w.write({**r, "source": "mmsafeaware", "category": r["subset"]})
        else:
            photos = sorted(p.name for p in (REPO / "examples" / "photos").glob("*.[pj][np]g"))
            for i in range(n):
                w.write({"id": str(i), "image": photos[i % len(photos)], "query": QUERIES[i % len(QUERIES)],
                         "label": "unsafe" if i % 2 else "safe"})
    return out


def judge_config(preset: str, batch_size: int):
    from rms_ray.judge.config import load_judge_config

    return load_judge_config("judge-cpu-tiny", {"model.source": f"builtin:{preset}", "resources.batch_size": batch_size,
                                                "evaluate.n_boot": 1000})


def run_bare(rows_path: Path, preset: str, batch_size: int) -> dict:
    import pyarrow.parquet as pq

    from rms_ray.judge.scorer import Judge, JudgeItem, image_policy, prepare_image

    cfg = judge_config(preset, batch_size)
    t0 = time.perf_counter()
    judge = Judge(cfg)
    t_load = time.perf_counter() - t0
    policy = image_policy(cfg)
    scores: dict[str, float | None] = {}
    t1 = time.perf_counter()
    finished: list[tuple[float, int]] = []
    for rb in pq.ParquetFile(rows_path).iter_batches(batch_size=batch_size):
        rows = rb.to_pylist()
        items, ids = [], []
        for r in rows:
            img, err = prepare_image(r["image"]["bytes"], r["image"]["path"] or "", policy)
            if err is None:
                items.append(JudgeItem(image=img, query=r["query"], task=r["task"], response=r["response"]))
                ids.append(r["id"])
        for rid, out in zip(ids, judge.score(items)):
            scores[rid] = out.unsafe_score
        finished.append((time.time(), len(rows)))
    run_s = time.perf_counter() - t1
    from rms_ray.judge.evaluate import _steady_rate

    return {"rows": len(scores), "engine_load_s": t_load, "run_s": run_s, "steady_rows_per_s": _steady_rate(finished),
            "end_to_end_s": time.perf_counter() - t0, "scores": scores}


def run_pipeline(rows_path: Path, preset: str, batch_size: int, out: Path) -> dict:
    import pandas as pd

    from rms_ray.judge.evaluate import run_evaluate

    cfg = judge_config(preset, batch_size)
    t0 = time.perf_counter()
    result = run_evaluate(cfg, [str(rows_path)], out, progress=False, log=lambda m: None)
    total = time.perf_counter() - t0
    preds = pd.read_parquet(out / "predictions.parquet", columns=["id", "unsafe_score"])
    t = result["timings"]
    return {"rows": len(preds), "engine_load_s": t["engine_init_s"], "judge_s": t["judge_s"],
            "steady_rows_per_s": t["steady_rows_per_s"], "end_to_end_s": total,
            "scores": dict(zip(preds["id"], preds["unsafe_score"]))}


def _child(side: str, rows: str, preset: str, batch_size: int, out: str, result: str) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    r = run_bare(Path(rows), preset, batch_size) if side == "bare" else \
        run_pipeline(Path(rows), preset, batch_size, Path(out))
    Path(result).write_text(json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--preset", default="tiny", help="builtin model preset: tiny | bench-100m")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, rows, out, result, _ = args.child
        _child(side, rows, args.preset, args.batch_size, out, result)
        return
    with tempfile.TemporaryDirectory(prefix="rms_eval_bench_") as tmp:
        tmp = Path(tmp)
        rows = prepare_rows(tmp, args.rows)
        res = {}
        for side in ("bare", "pipeline"):
            rfile = tmp / f"{side}.json"
            cmd = [sys.executable, __file__, "--preset", args.preset, "--batch-size", str(args.batch_size),
                   "--child", side, str(rows), str(tmp / "eval_out"), str(rfile), "x"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=REPO)
            res[side] = json.loads(rfile.read_text())
            print(f"{side}: {res[side]['rows']} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    b, p = res["bare"], res["pipeline"]
    common = set(b["scores"]) & set(p["scores"])
    diffs = [abs(b["scores"][k] - p["scores"][k]) for k in common
             if b["scores"][k] is not None and p["scores"][k] is not None]
    out = {
        "benchmark": "evaluate_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "avx512_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text()
                    if Path("/proc/cpuinfo").exists() else None},
        "preset": args.preset, "rows": args.rows, "batch_size": args.batch_size,
        "bare": {k: v for k, v in b.items() if k != "scores"},
        "pipeline": {k: v for k, v in p.items() if k != "scores"},
        "rows_per_s": {"bare_steady": b["steady_rows_per_s"], "pipeline_steady": p["steady_rows_per_s"],
                       "bare_end_to_end": b["rows"] / b["end_to_end_s"],
                       "pipeline_end_to_end": p["rows"] / p["end_to_end_s"]},
        "same_rows": len(common) == b["rows"] == p["rows"],
        "max_abs_score_diff": max(diffs) if diffs else None,
    }
    r = out["rows_per_s"]
    out["ratio_steady"] = r["pipeline_steady"] / r["bare_steady"]
    out["ratio_end_to_end"] = r["pipeline_end_to_end"] / r["bare_end_to_end"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "evaluate_throughput.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("rows_per_s", "ratio_steady", "ratio_end_to_end", "same_rows",
                                          "max_abs_score_diff")}, indent=2))
    print(f"pipeline / bare: {out['ratio_steady']:.2f} steady state, {out['ratio_end_to_end']:.2f} end to end "
          "(target >= 0.9)")


if __name__ == "__main__":
    main()
