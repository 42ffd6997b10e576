"""Synthetic construct outputs, made directly with the store API (no engine): committed shards of N images with
real-sized image bytes, the ingest cache a run would have written, and the Plan finalise reads.

Also a command for measuring finalise in a fresh process: ``python tests/synthetic.py finalize WARMUP OUT...``
prints one JSON line with the peak resident memory of each finalise call (and Arrow's peak allocation).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from rms_ray.construct.prompts import prompt_versions
from rms_ray.data.sources import ImageSource
from rms_ray.data.store import INGEST_SCHEMA, OutputStore, table

HAZARDS = ["hot stove next to paper towels", "knife left on the counter edge", "wet floor near stairs",
           "open flame under a curtain", "child near an open window", "frayed electrical cord",
           "heavy box on a high shelf", "slippery ice on the path", "broken glass on the floor",
           "unattended candle", "sharp scissors within reach", "car approaching the crossing"]


def image_id(i: int) -> str:
    return f"img_{i:08d}"


def image_bytes(i: int, size: int) -> bytes:
    """``size`` incompressible bytes, the same for image ``i`` every time (a stand-in for a JPEG: finalise never
    decodes it)."""
    return hashlib.shake_256(f"image {i}".encode()).digest(size)


def accepted_row(i: int, k: int, data: bytes | None) -> dict:
    iid = image_id(i)
    return {"sample_id": f"{iid}-{k}", "image_id": iid, "image_path": f"photos/{i}.jpg", "sha256": f"sha-{i}",
            "candidate_index": k, "hazard": HAZARDS[(i + k) % len(HAZARDS)], "query": f"query {i} {k}",
            "response": f"guidance {i} {k}", "rounds": 1, "reasons": [], "verdict_pair": "risky",
            "contrast_query": f"benign {i}" if i % 3 else None, "contrast_rounds": 1,
            "naive_response": f"naive {i} {k}" if k == 0 else None, "naive_rounds": 1,
            "model_id": "synthetic", "prompt_versions": prompt_versions(),
            "image": {"bytes": data, "path": f"photos/{i}.jpg"} if data is not None else None}


def rejected_row(i: int, k: int) -> dict:
    iid = image_id(i)
    return {"sample_id": f"{iid}-{k}", "image_id": iid, "image_path": f"photos/{i}.jpg", "sha256": f"sha-{i}",
            "candidate_index": k, "hazard": HAZARDS[k % len(HAZARDS)], "stage": "verify",
            "reasons": ["pair=not_risky: x"], "raw_text": "x" * 200, "model_id": "synthetic"}


def commit_images(store: OutputStore, ids: list[int], *, accepted: int = 2, rejected: int = 1,
                  image_size: int = 100_000, every_row: bool = True) -> str:
    """Commit one shard holding images ``ids``: ``accepted`` accepted samples (each row given the image, as the
    engine actor does, unless ``every_row`` is False) and ``rejected`` rejected candidates per image."""
    acc, rej, imgs = [], [], []
    for i in ids:
        data = image_bytes(i, image_size)
        acc += [accepted_row(i, k, data if (every_row or k == 0) else None) for k in range(accepted)]
        rej += [rejected_row(i, accepted + k) for k in range(rejected)]
        imgs.append({"image_id": image_id(i), "sha256": f"sha-{i}", "status": "accepted" if accepted else "rejected",
                     "n_accepted": accepted, "n_rejected": rejected, "gen_tokens": 100})
    return store.commit_shard(acc, rej, imgs)


def build_output(root: Path, n_images: int, *, batch: int = 16, image_size: int = 100_000, accepted: int = 2,
                 rejected: int = 1) -> OutputStore:
    """An output folder whose run committed ``n_images`` images in shards of ``batch`` (consecutive ids, as a run
    makes them), plus the ingest cache that lists them."""
    store = OutputStore(root)
    store.prepare()
    for start in range(0, n_images, batch):
        commit_images(store, list(range(start, min(start + batch, n_images))), accepted=accepted, rejected=rejected,
                      image_size=image_size)
    ing = table([{"image_id": image_id(i), "image_path": f"photos/{i}.jpg", "sha256": f"sha-{i}", "status": "ok",
                  "size": image_size, "mtime_ns": 1} for i in range(n_images)], INGEST_SCHEMA)
    store.merge_ingest(ing)
    return store


def plan_of(store: OutputStore):
    """The Plan a run over this output's inputs would make (no duplicates, nothing quarantined)."""
    from rms_ray.construct.pipeline import Plan

    ing = store.read_ingest_cache()[0]
    ok = ing.filter(pc.equal(ing.column("status"), "ok"))
    sources = [ImageSource(i, f"/in/{p}", p, 1, 1) for i, p in zip(ing.column("image_id").to_pylist(),
                                                                    ing.column("image_path").to_pylist())]
    shas = dict(zip(ok.column("image_id").to_pylist(), ok.column("sha256").to_pylist()))
    p = Plan(sources, 0, ing, [], [s for s in sources if s.image_id in shas], [], shas)
    p.todo = p.still_to_do(store)
    return p


def finalize_output(store: OutputStore, cfg=None) -> dict:
    """Finalise ``store`` as a run would (cpu-tiny config, nothing generated by this call)."""
    from rms_ray.common.config import load_config
    from rms_ray.construct.finalize import finalize
    from rms_ray.construct.pipeline import GenerationStats

    cfg = cfg or load_config("cpu-tiny", {"output.rows_per_file": 500})
    return finalize(store, cfg, plan_of(store), GenerationStats(), {}, str(store.root), 0.0)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _measure(outs: list[str], warmup: str | None) -> list[dict]:
    """Finalise each output of ``outs`` in turn in this process and report, per call: the peak of Arrow's
    allocations (a fresh proxy pool per call; image bytes live there) and of Python's (tracemalloc): what could
    hold rows; and the growth of the peak resident memory (VmHWM reset before each call where the kernel allows),
    which also holds torch's and matplotlib's working memory (the taxonomy embedder, the plot)."""
    import tracemalloc

    if warmup:  # the embedder load, lazy imports and first-use caches: paid before any measured call
        finalize_output(OutputStore(warmup))
    base = pa.default_memory_pool()
    res = []
    for out in outs:
        cleared = True
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            cleared = False
        rss_before = _status_kb("VmRSS")
        pool = pa.proxy_memory_pool(base)
        pa.set_memory_pool(pool)
        tracemalloc.start()
        manifest = finalize_output(OutputStore(out))
        py_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        pa.set_memory_pool(base)
        res.append({"out": out, "arrow_peak": pool.max_memory(), "python_peak": py_peak, "cleared": cleared,
                    "rss_growth": (_status_kb("VmHWM") - rss_before) * 1024 if cleared else None,
                    "samples": manifest["accounting"]["samples_accepted"],
                    "balanced": manifest["accounting"]["balanced"], "finalize_s": manifest["timings"]["finalize_s"]})
    return res


if __name__ == "__main__":
    # python tests/synthetic.py finalize WARMUP OUT [OUT ...]
    if sys.argv[1] == "finalize":
        print(json.dumps(_measure(sys.argv[3:], sys.argv[2] or None)))
