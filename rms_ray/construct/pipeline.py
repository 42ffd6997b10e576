"""The construction job: list -> ingest (decode, hash, quarantine) -> dedup -> generate in an engine actor pool
-> finalise. Each step is a small function; :func:`run_construct` strings them together.

Ray Data shape of the generation pass::

    from_items(todo) -> map_batches(load_images, tasks, decode_num_cpus)
                     -> map_batches(ConstructUDF, actor pool of engine_replicas vLLM engines, batch_size images)
                     -> iter_rows() in the driver: small per-image summaries for progress and accounting

Images are decoded per row (one bad file never costs the others) and twice: once in the ingest pass (hashes for
dedup, quarantine reasons; cached in ``_work/ingest.parquet``) and again right before the engine, so that the
object store only ever holds images in flight. Decoding is milliseconds; an image's generation is seconds.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rms_ray.common.config import ConstructConfig
from rms_ray.common.ray_utils import init_ray
from rms_ray.data.dedup import COLOR_SIG_PREFIX, find_duplicates
from rms_ray.data.images import ImagePolicy, NormalizedImage, Quarantined, QuarantineReason, normalize_image
from rms_ray.data.sources import ImageSource, list_images, read_bytes
from rms_ray.data.store import INGEST_SCHEMA, OutputStore, table, write_parquet_atomic


def image_policy(cfg: ConstructConfig) -> ImagePolicy:
    """The :class:`~rms_ray.data.images.ImagePolicy` of a config."""
    im = cfg.images
    return ImagePolicy(max_side=im.max_side, max_pixels=im.max_pixels, min_side=im.min_side, animated=im.animated,
                       encode_format=im.encode_format, jpeg_quality=im.jpeg_quality)


def decode_source(uri: str, rel_path: str, policy: ImagePolicy):
    """Read and normalise one input. Unreadable files become ``Quarantined(reason=UNREADABLE)``; never raises."""
    try:
        data = read_bytes(uri)
    except OSError as e:
        return Quarantined(QuarantineReason.UNREADABLE, f"cannot read: {e}", None)
    return normalize_image(data, rel_path, policy)


def _meta(img: NormalizedImage) -> dict[str, Any]:
    return {"sha256": img.sha256, "phash": img.phash, "width": img.width, "height": img.height,
            "source_width": img.source_width, "source_height": img.source_height,
            "source_format": img.source_format, "image_notes": list(img.notes)}


def _int(value: Any) -> int | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else int(value)


def ingest_batch(batch: dict[str, np.ndarray], policy: ImagePolicy) -> dict[str, list]:
    """Ray Data batch UDF: decode + hash each input; returns metadata only (no pixels). Stateless, retry-safe."""
    rows = []
    for image_id, uri, rel, size, mtime in zip(batch["image_id"], batch["uri"], batch["rel_path"], batch["size"],
                                               batch["mtime_ns"]):
        out = decode_source(str(uri), str(rel), policy)
        row: dict[str, Any] = {"image_id": str(image_id), "image_path": str(rel), "size": _int(size),
                               "mtime_ns": _int(mtime)}
        if isinstance(out, NormalizedImage):
            row.update(_meta(out), color_sig=out.color_sig, status="ok")
        else:
            row.update(status="quarantined", reason=out.reason.value, detail=out.detail, sha256=out.sha256)
        rows.append(row)
    return table(rows, INGEST_SCHEMA).to_pydict()


def _items(sources: list[ImageSource]) -> list[dict[str, Any]]:
    return [{"image_id": s.image_id, "uri": s.uri, "rel_path": s.rel_path, "size": s.size, "mtime_ns": s.mtime_ns}
            for s in sources]


def reusable_ingest_cache(cached: pa.Table) -> pa.Table:
    """The rows of an ingest cache (``_work/ingest.parquet``) that can be reused as they are, as ``INGEST_SCHEMA``.

    A cache written by an older version may lack columns (``color_sig``, added when near duplicates started to
    compare colour) or hold a colour signature made by another method (other prefix): its ``ok`` rows are left
    out, so :func:`ingest` decodes those files again (milliseconds each) instead of failing in dedup. Quarantined
    rows need no signature and stay. A cache whose columns cannot be cast to the schema is dropped whole.
    """
    try:
        for field in INGEST_SCHEMA:
            if field.name not in cached.column_names:
                cached = cached.append_column(field.name, pa.nulls(cached.num_rows, field.type))
        cached = cached.select(INGEST_SCHEMA.names).cast(INGEST_SCHEMA)
    except (pa.ArrowException, TypeError, ValueError):
        return INGEST_SCHEMA.empty_table()
    pc = pa.compute
    sig_ok = pc.starts_with(pc.fill_null(cached.column("color_sig"), ""), COLOR_SIG_PREFIX)
    keep = pc.fill_null(pc.or_(pc.not_equal(cached.column("status"), "ok"), sig_ok), False)
    return cached.filter(keep)


def ingest(sources: list[ImageSource], cfg: ConstructConfig, store: OutputStore) -> pa.Table:
    """Decode + hash every source once; cached in ``_work/ingest.parquet`` per (image id, size, mtime), so a
    resumed run re-reads only files that are new or changed (or whose cached row predates a column, see
    :func:`reusable_ingest_cache`). Returns one row per source, sorted by id."""
    path = store.work / "ingest.parquet"
    cached = reusable_ingest_cache(pq.read_table(path)) if path.exists() else INGEST_SCHEMA.empty_table()
    fresh = {(s.image_id, s.size, s.mtime_ns) for s in sources if s.size is not None}
    keys = zip(*(cached.column(c).to_pylist() for c in ("image_id", "size", "mtime_ns")))
    reuse = pa.array([k in fresh for k in keys], pa.bool_())
    cached = cached.filter(reuse)
    have = set(cached.column("image_id").to_pylist())
    missing = [s for s in sources if s.image_id not in have]
    if missing:
        import ray

        ds = ray.data.from_items(_items(missing), override_num_blocks=max(1, min(len(missing) // 32, 64)))
        ds = ds.map_batches(ingest_batch, fn_kwargs={"policy": image_policy(cfg)}, batch_size=32,
                            num_cpus=cfg.resources.decode_num_cpus)
        new = pa.Table.from_pylist(ds.take_all(), schema=INGEST_SCHEMA)
        cached = pa.concat_tables([cached, new])
        write_parquet_atomic(cached, path)
    wanted = pa.array([s.image_id for s in sources], pa.string())
    return cached.filter(pa.compute.is_in(cached.column("image_id"), wanted)).sort_by("image_id")


META_COLUMNS = ("sha256", "phash", "width", "height", "source_width", "source_height", "source_format",
                "image_notes")


def load_images(batch: dict[str, np.ndarray], policy: ImagePolicy) -> dict[str, list]:
    """Ray Data batch UDF before the engine: read + normalise again, attach the normalised bytes and metadata. An
    input that fails now though it passed ingest (changed on disk) is passed on with ``error`` set and recorded as
    rejected, not dropped."""
    out: dict[str, list] = {k: [] for k in ("image_id", "image_path", "data", "error", "ingest_sha256", *META_COLUMNS)}
    for image_id, uri, rel, ingest_sha in zip(batch["image_id"], batch["uri"], batch["rel_path"], batch["sha256"]):
        img = decode_source(str(uri), str(rel), policy)
        ok = isinstance(img, NormalizedImage)
        meta = _meta(img) if ok else dict.fromkeys(META_COLUMNS)
        out["image_id"].append(str(image_id))
        out["image_path"].append(str(rel))
        out["data"].append(img.data if ok else b"")
        out["error"].append("" if ok else f"{img.reason.value}: {img.detail}")
        out["ingest_sha256"].append(str(ingest_sha))
        for k in META_COLUMNS:
            out[k].append(meta[k])
    return out


class ConstructUDF:
    """Ray Data actor-pool UDF: owns one vLLM engine; builds, verifies and commits a batch of images.

    Each call commits its rows atomically (see :mod:`rms_ray.data.store`) and returns one summary row per image.
    Writing inside the actor keeps all rows of an image in one commit, which is what makes resume exact.
    """

    def __init__(self, cfg_json: str, output_dir: str) -> None:
        from rms_ray.construct.loop import Constructor
        from rms_ray.engine.vllm_engine import VLMEngine

        self.cfg = ConstructConfig.model_validate_json(cfg_json)
        t0 = time.perf_counter()
        engine = VLMEngine(self.cfg.model, self.cfg.resources, seed=self.cfg.generation.seed)
        self.engine_init_s = time.perf_counter() - t0  # reported once, with this actor's first batch
        self.engine = engine
        self.actor_key = f"{os.getpid()}-{id(self)}"
        self.constructor = Constructor(self.cfg, engine, model_id=self.cfg.model.source)
        self.store = OutputStore(output_dir)
        self.flows = ThreadPoolExecutor(max_workers=self.cfg.resources.batch_size * self.cfg.resources.batches_in_flight,
                                        thread_name_prefix="image-flow")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from rms_ray.construct.loop import ImageInput

        inputs, failed = [], []
        for i, (image_id, rel, err) in enumerate(zip(batch["image_id"], batch["image_path"], batch["error"])):
            if err:  # changed or vanished since ingest: rejected under the content ingest saw
                failed.append({"image_id": str(image_id), "image_path": str(rel), "sample_id": f"{image_id}-img",
                               "candidate_index": -1, "stage": "load", "reasons": [f"load: {err}"], "rounds": 0,
                               "ingest_sha256": str(batch["ingest_sha256"][i])})
                continue
            meta = {k: _py(batch[k][i]) for k in META_COLUMNS}
            inputs.append(ImageInput(str(image_id), str(rel), bytes(batch["data"][i]), meta))
        # One flow per image, all feeding the engine's continuous batching (see rms_ray.engine.vllm_engine): an
        # image's next step is queued as soon as its own previous step is done, not when the batch's slowest is.
        outcomes = list(self.flows.map(lambda im: self.constructor.construct([im])[0], inputs)) if inputs else []
        accepted, rejected, images = [], list(failed), []
        for r in failed:
            images.append({"image_id": r["image_id"], "sha256": r.pop("ingest_sha256"), "status": "rejected",
                           "n_accepted": 0, "n_rejected": 1, "gen_tokens": 0})
        by_id = {im.image_id: im for im in inputs}
        for o in outcomes:
            if self.cfg.output.embed_images:
                for row in o.accepted:
                    row["image"] = {"bytes": by_id[o.image_id].data, "path": row["image_path"]}
            accepted += o.accepted
            rejected += o.rejected
            images.append({"image_id": o.image_id, "sha256": by_id[o.image_id].meta["sha256"],
                           "status": o.status, "n_accepted": len(o.accepted),
                           "n_rejected": len(o.rejected), "gen_tokens": o.gen_tokens})
        self.store.commit_shard(accepted, rejected, images)
        init, self.engine_init_s = self.engine_init_s, 0.0
        engine_stats = json.dumps({"actor": self.actor_key, **self.engine.stats()})  # cumulative, this actor
        return {**{k: [im[k] for im in images] for k in ("image_id", "status", "n_accepted", "n_rejected",
                                                          "gen_tokens")},
                "engine_init_s": [init] * len(images), "engine_stats": [engine_stats] * len(images)}


def _py(value: Any) -> Any:
    """numpy scalars / arrays from a Ray batch -> plain Python values for pyarrow."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


@dataclass
class GenerationStats:
    """What the driver saw of the generation pass."""

    images: int = 0
    gen_tokens: int = 0
    seconds: float = 0.0
    engine_init_s: float = 0.0  # longest engine start among the actors (they start in parallel)
    engine: dict[str, dict[str, float]] = field(default_factory=dict)  # actor -> its engine's latest stats

    def engine_summary(self) -> dict[str, float]:
        """Engine counters summed over actors (``mean_running`` and ``idle_share`` averaged, step-weighted)."""
        if not self.engine:
            return {}
        vals = list(self.engine.values())
        steps = sum(v["steps"] for v in vals)
        out = {k: round(sum(v[k] for v in vals), 3) for k in ("steps", "busy_s", "idle_s", "requests", "gen_tokens")}
        out["mean_running"] = round(sum(v["mean_running"] * v["steps"] for v in vals) / steps, 3) if steps else 0.0
        out["idle_share"] = round(sum(v["idle_share"] for v in vals) / len(vals), 4)
        out["wall_s"] = round(max(v["wall_s"] for v in vals), 3)  # engines run in parallel
        out["engines"] = len(vals)
        return out


def generate(todo: list[ImageSource], shas: dict[str, str], cfg: ConstructConfig, store: OutputStore,
             on_image: Callable[[dict[str, Any]], None] | None = None) -> GenerationStats:
    """Stream ``todo`` through the engine actor pool; ``on_image`` is called with each image's summary row.
    ``shas`` maps image id -> sha256 seen at ingest."""
    import ray

    stats = GenerationStats()
    if not todo:
        return stats
    res = cfg.resources
    t0 = time.perf_counter()
    items = [{**it, "sha256": shas[it["image_id"]]} for it in _items(todo)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(todo) // res.batch_size)))
    ds = ds.map_batches(load_images, fn_kwargs={"policy": image_policy(cfg)}, batch_size=res.batch_size,
                        num_cpus=res.decode_num_cpus)
    from rms_ray.engine.pool import map_engine

    ds = map_engine(ds, ConstructUDF, res, fn_constructor_args=(cfg.model_dump_json(), str(store.root)))
    for row in ds.iter_rows():
        stats.images += 1
        stats.gen_tokens += int(row["gen_tokens"])
        stats.engine_init_s = max(stats.engine_init_s, float(row["engine_init_s"]))
        es = json.loads(row["engine_stats"])
        if es["steps"] >= stats.engine.get(es["actor"], {}).get("steps", -1):
            stats.engine[es.pop("actor")] = es
        if on_image:
            on_image(row)
    stats.seconds = time.perf_counter() - t0
    return stats


@dataclass
class Plan:
    """What a run will do, decided in the driver before generation."""

    sources: list[ImageSource]
    repeated_entries: int
    ingest: pa.Table
    duplicates: list[Any]
    canonical: list[ImageSource]
    todo: list[ImageSource]
    shas: dict[str, str]  # image id -> sha256 at ingest, for every normalised input


def plan(sources: list[ImageSource], repeated: int, cfg: ConstructConfig, store: OutputStore) -> Plan:
    """Ingest and dedup listed inputs; decide which canonical images still need generation."""
    ing = ingest(sources, cfg, store)
    ok = ing.filter(pa.compute.equal(ing.column("status"), "ok"))
    im = cfg.images
    rows = zip(*(ok.column(c).to_pylist() for c in ("image_id", "sha256", "phash", "color_sig")))
    dups = find_duplicates(list(rows),
                           max_hamming=im.near_duplicate_hamming, max_color_distance=im.near_duplicate_color_distance,
                           near=im.near_duplicates)
    dup_ids = {d.image_id for d in dups}
    ok_ids = set(ok.column("image_id").to_pylist())
    canonical = [s for s in sources if s.image_id in ok_ids and s.image_id not in dup_ids]
    shas = dict(zip(ok.column("image_id").to_pylist(), ok.column("sha256").to_pylist()))
    done = store.done_keys()
    todo = [s for s in canonical if (s.image_id, shas[s.image_id]) not in done]
    return Plan(sources, repeated, ing, dups, canonical, todo, shas)


def run_construct(cfg: ConstructConfig, input_spec: str, output_dir: str | Path, *, limit: int | None = None,
                  ray_address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Build (or resume) an RMS dataset from ``input_spec`` into ``output_dir``; returns the manifest dict.

    Raises:
        FileNotFoundError: the input does not exist. ConfigError never (cfg is already validated).
    """
    from rms_ray.construct.finalize import finalize

    t_start = time.perf_counter()
    out_abs = str(Path(output_dir).expanduser().resolve())
    # fail fast, before Ray starts; never read our own output back in as input
    sources, repeated = list_images(input_spec, tuple(cfg.images.extensions), exclude=out_abs)
    if limit is not None:
        sources = sources[:limit]
    store = OutputStore(output_dir)
    store.check_config(cfg.config_hash(), cfg.model_dump(mode="json"))
    store.prepare()
    started = init_ray(cfg.resources.ray_num_cpus, ray_address)
    try:
        t0 = time.perf_counter()
        p = plan(sources, repeated, cfg, store)
        t_plan = time.perf_counter() - t0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(p.todo), desc="construct", unit="img", dynamic_ncols=True)
        counts = {"accepted": 0, "rejected": 0}

        def on_image(row: dict[str, Any]) -> None:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(counts)

        stats = generate(p.todo, p.shas, cfg, store, on_image)
        if bar is not None:
            bar.close()
        timings = {"plan_s": round(t_plan, 3), "generate_s": round(stats.seconds, 3)}
        manifest = finalize(store, cfg, p, stats, timings, input_spec, t_start)
    finally:
        if started:
            import ray

            ray.shutdown()
    return manifest
