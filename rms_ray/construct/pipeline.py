"""The construction job: list -> ingest (decode, hash, quarantine) -> dedup -> generate in an engine actor pool
-> finalise. Each step is a small function; :func:`run_construct` strings them together.

Ray Data shape of the generation pass::

    from_items(todo) -> map_batches(load_images, tasks, decode_num_cpus)
                     -> map_batches(ConstructUDF, actor pool of engine_replicas vLLM engines, batch_size images)
                     -> iter_rows() in the driver: small per-image summaries for progress and accounting

Images are decoded per row (one bad file never costs the others) and twice: once in the ingest pass (hashes for
dedup, quarantine reasons; cached in ``_work/ingest.parquet``, committed in parts while the pass runs) and again
right before the engine, so that the object store only ever holds images in flight. Decoding is milliseconds; an
image's generation is seconds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pyarrow as pa

from rms_ray.common.config import ConstructConfig
from rms_ray.common.progress import ImageProgress, report, start_channel
from rms_ray.common.ray_utils import init_ray, shutdown_ray
from rms_ray.data.dedup import COLOR_SIG_PREFIX, find_duplicates
from rms_ray.data.images import ImagePolicy, NormalizedImage, Quarantined, QuarantineReason, normalize_image
from rms_ray.data.sources import ImageSource, list_images, read_bytes
from rms_ray.data.store import INGEST_SCHEMA, OutputStore, table

logger = logging.getLogger(__name__)  # one line per stage milestone (see rms_ray.common.failures.RunLog)


def image_policy(cfg: ConstructConfig) -> ImagePolicy:
    """The :class:`~rms_ray.data.images.ImagePolicy` of a config (built as config validation checks it)."""
    return cfg.images.policy()


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


#: The ingest pass commits its results every this many rows or seconds (whichever comes first), so a pass that
#: dies keeps what it decoded (see :func:`ingest`).
INGEST_PART_ROWS = 8192
INGEST_PART_SECONDS = 60.0


class Ingested(NamedTuple):
    """What :func:`ingest` returns: one row per source (sorted by id) and how many inputs this call decoded."""

    table: pa.Table
    decoded: int


def _ingest_blocks(n: int) -> int:
    # >= 32 rows a block (task overhead), <= 1024 (a block's results reach the driver, and its part file, when the
    # whole block is decoded: small blocks keep a crash from losing much)
    return max(1, min(n // 32, max(64, -(-n // 1024))))


def ingest(sources: list[ImageSource], cfg: ConstructConfig, store: OutputStore, *,
           part_rows: int = INGEST_PART_ROWS, part_seconds: float = INGEST_PART_SECONDS,
           on_part: Callable[[int, int], None] | None = None) -> Ingested:
    """Decode + hash every source once; cached per (image id, size, mtime), so a resumed run re-reads only files
    that are new or changed (or whose cached row predates a column, see :func:`reusable_ingest_cache`).

    Results are committed while the pass runs: every ``part_rows`` rows or ``part_seconds`` seconds the driver
    writes them as a part file (``_work/ingest/part-*.parquet``, atomic), so a pass killed at 90% is resumed
    from the parts and decodes only the rest. When the pass ends the parts are merged into
    ``_work/ingest.parquet``. ``on_part(rows_committed, rows_to_decode)`` is called after each part.

    Returns:
        :class:`Ingested`: one row per source, sorted by id, and the number of inputs decoded by this call.
    """
    pc = pa.compute
    stored = store.read_ingest_cache()
    cached = pa.concat_tables([reusable_ingest_cache(t) for t in stored]) if stored else INGEST_SCHEMA.empty_table()
    fresh = {(s.image_id, s.size, s.mtime_ns) for s in sources if s.size is not None}
    keys = list(zip(*(cached.column(c).to_pylist() for c in ("image_id", "size", "mtime_ns"))))
    seen: set[str] = set()
    reuse = []
    for k in keys:  # this input's files as they are now, once each (the cache and a part may both hold one)
        ok = k in fresh and k[0] not in seen
        reuse.append(ok)
        if ok:
            seen.add(k[0])
    cached = cached.filter(pa.array(reuse, pa.bool_()))
    have = set(cached.column("image_id").to_pylist())
    missing = [s for s in sources if s.image_id not in have]
    parts_pending = store.ingest_parts.is_dir() and any(store.ingest_parts.glob("part-*.parquet"))
    if missing:
        import ray

        ds = ray.data.from_items(_items(missing), override_num_blocks=_ingest_blocks(len(missing)))
        ds = ds.map_batches(ingest_batch, fn_kwargs={"policy": image_policy(cfg)}, batch_size=32,
                            num_cpus=cfg.resources.decode_num_cpus)
        new, buf, done = [], [], 0
        last = time.monotonic()

        def commit(rows: list[dict]) -> None:
            nonlocal done
            for i in range(0, len(rows), part_rows):
                part = table(rows[i:i + part_rows], INGEST_SCHEMA)
                store.write_ingest_part(part)
                new.append(part)
                done += part.num_rows
                if on_part is not None:
                    on_part(done, len(missing))

        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            buf += batch.to_pylist()
            if len(buf) >= part_rows or time.monotonic() - last >= part_seconds:
                commit(buf)
                buf, last = [], time.monotonic()
        commit(buf)
        cached = pa.concat_tables([cached, *new])
    if missing or parts_pending:
        store.merge_ingest(cached)  # one file again: a resume reads it, not one file per part
    wanted = pa.array([s.image_id for s in sources], pa.string())
    return Ingested(cached.filter(pc.is_in(cached.column("image_id"), wanted)).sort_by("image_id"), len(missing))


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
    ``progress``: a :class:`rms_ray.common.progress.ProgressChannel` actor (or None) told when the engine is up
    and when each image's generation ends, for the driver's per-image progress bar.
    """

    def __init__(self, cfg_json: str, output_dir: str, progress: Any = None) -> None:
        from rms_ray.construct.loop import Constructor
        from rms_ray.engine.vllm_engine import VLMEngine

        self.cfg = ConstructConfig.model_validate_json(cfg_json)
        self.progress = progress
        t0 = time.perf_counter()
        engine = VLMEngine(self.cfg.model, self.cfg.resources, seed=self.cfg.generation.seed)
        self.engine_init_s = time.perf_counter() - t0  # reported once, with this actor's first batch
        self.dtype_json = json.dumps(engine.dtype_choice.to_dict())
        report(progress, {"kind": "engine_ready", "init_s": self.engine_init_s, **engine.dtype_choice.to_dict()})
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
        outcomes = list(self.flows.map(self._flow, inputs)) if inputs else []
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
                "engine_init_s": [init] * len(images), "engine_stats": [engine_stats] * len(images),
                "engine_dtype": [self.dtype_json] * len(images)}

    def _flow(self, im: Any) -> Any:
        outcome = self.constructor.construct([im])[0]
        report(self.progress, {"kind": "image", "image_id": im.image_id, "status": outcome.status})
        return outcome


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
    dtypes: list[dict[str, str]] = field(default_factory=list)  # distinct dtype choices the engines reported

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
             on_image: Callable[[dict[str, Any]], None] | None = None, progress: Any = None) -> GenerationStats:
    """Stream ``todo`` through the engine actor pool; ``on_image`` is called with each image's summary row.
    ``shas`` maps image id -> sha256 seen at ingest; ``progress``: a progress channel actor for the engines."""
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

    ds = map_engine(ds, ConstructUDF, res, fn_constructor_args=(cfg.model_dump_json(), str(store.root), progress))
    for row in ds.iter_rows():
        stats.images += 1
        stats.gen_tokens += int(row["gen_tokens"])
        stats.engine_init_s = max(stats.engine_init_s, float(row["engine_init_s"]))
        es = json.loads(row["engine_stats"])
        if es["steps"] >= stats.engine.get(es["actor"], {}).get("steps", -1):
            stats.engine[es.pop("actor")] = es
        dtype = json.loads(row["engine_dtype"])
        if dtype not in stats.dtypes:
            stats.dtypes.append(dtype)
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
    decoded: int = 0  # inputs the ingest pass decoded (the others came from its cache)

    def still_to_do(self, store: OutputStore) -> list[ImageSource]:
        """Canonical images not committed (with their current content) in ``store`` now."""
        done = store.done_keys()
        return [s for s in self.canonical if (s.image_id, self.shas[s.image_id]) not in done]


def plan(sources: list[ImageSource], repeated: int, cfg: ConstructConfig, store: OutputStore, *,
         on_ingest_part: Callable[[int, int], None] | None = None) -> Plan:
    """Ingest and dedup listed inputs; decide which canonical images still need generation (reads the commit index
    and the few shards committed since, not every shard: see :meth:`OutputStore.done_keys`)."""
    ing, decoded = ingest(sources, cfg, store, on_part=on_ingest_part)
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
    p = Plan(sources, repeated, ing, dups, canonical, [], shas, decoded)
    p.todo = p.still_to_do(store)
    return p


def redo_damaged(p: Plan, store: OutputStore) -> list[ImageSource]:
    """After generation: check every committed shard (:meth:`OutputStore.verify_commits`: sizes against its
    ``_SUCCESS``), move damaged ones aside, and return the images that must be generated again (theirs, and any
    other still missing). Empty in a healthy run. Finalising reads every shard, so this costs one stat per file
    there and then, not on every resume."""
    if not store.verify_commits():
        return []
    return p.still_to_do(store)


class NoImagesError(ValueError):
    """The input lists no image with a configured extension: there is nothing to build."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_construct(cfg: ConstructConfig, input_spec: str, output_dir: str | Path, *, limit: int | None = None,
                  ray_address: str | None = None, progress: bool = True,
                  log: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Build (or resume) an RMS dataset from ``input_spec`` into ``output_dir``; returns the manifest dict.

    ``progress``: a per-image bar on stderr. ``log``: where one-line notes go (e.g. "resuming: N of M images
    already done"); default stderr.

    Raises:
        FileNotFoundError: the input does not exist. NoImagesError: it lists no image.
        rms_ray.engine.ModelSourceError: ``model.source`` names no model.
        rms_ray.data.store.OutputError: an output folder this run must not write into (``OutputBusy``: another
            run is writing there; ``OutputConfigMismatch``: made with another config, prompts or model revision).
        All of them before Ray starts and before the output folder is bound to this config; and after Ray starts,
        OutputError when a multi-node cluster's nodes do not all see the output folder.
    """
    from rms_ray.construct.finalize import finalize
    from rms_ray.engine.vllm_engine import check_model_source

    from rms_ray.common.placement import check_output_shared, resolve_run_paths
    from rms_ray.construct.binding import run_binding

    t_start = time.perf_counter()
    # absolute on the driver: actors (a job's working_dir copy, other machines) must write to the same place
    cfg, out_abs = resolve_run_paths(cfg, output_dir)
    # fail fast, before Ray starts; never read our own output back in as input
    sources, repeated = list_images(input_spec, tuple(cfg.images.extensions), exclude=out_abs)
    if limit is not None:
        sources = sources[:limit]
    if not sources:
        raise NoImagesError(f"no images in {input_spec} (looked for {', '.join(cfg.images.extensions)}); "
                            "nothing to build")
    check_model_source(cfg.model.source)
    store = OutputStore(out_abs)
    run_lock = store.lock()  # one run per output folder; released by the OS if this process dies
    try:
        store.check_config(cfg.config_hash(), cfg.model_dump(mode="json"), binding=run_binding(cfg))
        store.prepare()
        started = init_ray(cfg.resources.ray_num_cpus, ray_address)
    except BaseException:
        run_lock.release()
        raise
    try:
        check_output_shared(out_abs, store.work)  # a multi-node run needs an output every node sees
        t0 = time.perf_counter()
        p = plan(sources, repeated, cfg, store)
        t_plan = time.perf_counter() - t0
        already = len(p.canonical) - len(p.todo)
        logger.info("ingest done: %d inputs -> %d quarantined, %d duplicates, %d to generate (%d already done) "
                    "in %.1f s", len(p.sources), len(p.sources) - len(p.shas), len(p.duplicates), len(p.todo),
                    already, t_plan)
        if already:
            log(f"resuming: {already} of {len(p.canonical)} images already done")
        channel = start_channel() if progress and p.todo else None
        bar = ImageProgress(len(p.todo), channel) if channel is not None else None
        if p.todo:
            logger.info("generation started: %d images, %d engine replica(s), batches of %d", len(p.todo),
                        cfg.resources.engine_replicas, cfg.resources.batch_size)
        try:
            stats = generate(p.todo, p.shas, cfg, store, bar.committed if bar else None, progress=channel)
        finally:
            if bar is not None:
                bar.close()
        if p.todo:
            logger.info("generation finished: %d images in %.1f s (engine start %.1f s)", stats.images,
                        stats.seconds, stats.engine_init_s)
        redo = redo_damaged(p, store)  # shards damaged on disk (e.g. by a machine crash) are redone, never read
        if redo:
            log(f"{len(redo)} committed images were in damaged shards (moved to {store.damaged}): redoing them")
            more = generate(redo, p.shas, cfg, store)
            stats.images, stats.gen_tokens = stats.images + more.images, stats.gen_tokens + more.gen_tokens
            stats.seconds += more.seconds
            stats.engine.update({f"redo-{k}": v for k, v in more.engine.items()})
            stats.dtypes += [d for d in more.dtypes if d not in stats.dtypes]
        timings = {"plan_s": round(t_plan, 3), "generate_s": round(stats.seconds, 3)}
        t0 = time.perf_counter()
        manifest = finalize(store, cfg, p, stats, timings, input_spec, t_start)
        a = manifest["accounting"]
        logger.info("finalise done: %d samples accepted, %d rejected -> %s in %.1f s", a["samples_accepted"],
                    a["samples_rejected"], store.root, time.perf_counter() - t0)
    finally:
        if started:
            shutdown_ray()  # also removes this run's scratch folder (Ray's session, engine scratch files)
        run_lock.release()
    return manifest
