"""A construct output as labelled rows (:mod:`rms_ray.data.labelled`): the training/evaluation data of a judge.

Per accepted sample of ``data/``:

==========================  =========  ========  =====================================================
id                          task       label     text
==========================  =========  ========  =====================================================
``<sample_id>:prompt``      prompt     unsafe    image + the risky query (safe alone, risky with it)
``<sample_id>:guidance``    response   safe      the risky query + its verified guidance response
``<sample_id>:naive``       response   unsafe    the risky query + its naive response (when verified)
``<image_id>:contrast``     prompt     safe      image + the benign contrast query (when verified; once
                                                 per image, though ``data/`` repeats it on each row)
==========================  =========  ========  =====================================================

``category`` is the emergent category of the sample (null on contrast rows: a benign query has no risk
category); ``source`` is ``rms``; extra columns ``sample_id``, ``image_id``, ``hazard``, ``mlcommons_category``
(null where they do not apply). Outputs made before the safe side existed (no contrast columns) give prompt and
guidance rows only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

SOURCE = "rms"
#: What is read from ``data/``: never the whole row (scene text, verdicts, reasons stay on disk).
COLUMNS = ("sample_id", "image_id", "image_path", "image", "query", "response", "hazard", "category",
           "mlcommons_category", "contrast_query", "naive_response")


def _check_output(root: Path) -> dict[str, Any]:
    manifest_path, data = root / "manifest.json", root / "data"
    missing = [name for name, ok in (("manifest.json", manifest_path.is_file()), ("data/", data.is_dir())) if not ok]
    if missing:
        raise ValueError(f"{root} is not an rms_ray construct output (no {' and no '.join(missing)}): "
                         "pass the --output folder of a finished `rms-ray construct` run")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{root} is not an rms_ray construct output: unreadable manifest.json ({e})") from None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("rms_ray.dataset/"):
        raise ValueError(f"{root} is not an rms_ray construct output: manifest.json has no rms_ray.dataset format")
    return manifest


def _image_of(row: dict[str, Any], input_root: Path | None) -> dict[str, Any]:
    image = row.get("image")
    if image and image.get("bytes"):
        return {"bytes": image["bytes"], "path": image.get("path") or row["image_path"]}
    # output.embed_images=false: only the path relative to the construct input is stored
    path = Path(row["image_path"])
    if input_root is not None and not path.is_absolute():
        path = input_root / path
    return {"bytes": None, "path": str(path)}


def iter_labelled_rows(output_dir: str | Path, *, batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """Stream the accepted samples of a construct output as labelled-format rows (see the module docstring).

    Reads ``data/*.parquet`` file by file in pyarrow batches of ``batch_size`` rows, only the columns it needs, so
    memory is bounded by one batch and one image (plus the set of image ids whose contrast row was already given).
    Rows come in the order of ``data/`` (sorted by image id, candidate index): per sample its prompt, guidance and
    naive rows, with an image's contrast row before its first sample's rows.

    ``image`` is ``{"bytes", "path"}`` on every row: the stored normalised image. ``data/`` stores an image's
    bytes once, on its first row (``rms_ray.dataset/v2``); they are carried to the image's later rows, which follow
    it (a row whose image was not just seen is looked up in ``data/``). If the run did not embed images, bytes are
    null and the path is resolved against the construct input when that was a local folder (``LabelledWriter``
    then reads the file).

    Raises:
        ValueError: ``output_dir`` is not a construct output (no ``manifest.json`` or ``data/``, or a manifest of
            another format).
    """
    root = Path(output_dir)
    manifest = _check_output(root)
    inp = str(manifest.get("input") or "")
    input_root = None
    if inp and "://" not in inp:
        p = Path(inp)
        input_root = p if p.is_dir() else p.parent  # a folder, or the folder of a glob / listing file
    embedded = bool(((manifest.get("config") or {}).get("output") or {}).get("embed_images", True))
    seen_images: set[str] = set()
    current: dict[str, Any] = {}  # image id -> image of the image being read (its first row carries the bytes)
    for path in sorted((root / "data").glob("*.parquet")):
        pf = pq.ParquetFile(path)
        cols = [c for c in COLUMNS if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
            for r in batch.to_pylist():
                image = r.get("image")
                if image and image.get("bytes"):
                    current = {r["image_id"]: image}
                elif embedded and "image" in cols:
                    if r["image_id"] not in current:  # rows not in data/'s order: find the image's first row
                        current = {r["image_id"]: _stored_image(root, r["image_id"])}
                    r["image"] = current[r["image_id"]]
                yield from _rows_of(r, input_root, seen_images)


def _stored_image(root: Path, image_id: str) -> dict[str, Any] | None:
    """The image of ``image_id`` as stored in ``data/`` (on one of its rows), or None."""
    import pyarrow.dataset as pads

    t = pads.dataset(str(root / "data"), format="parquet").to_table(
        columns=["image"], filter=pads.field("image_id") == image_id)
    return next((im for im in t.column("image").to_pylist() if im and im.get("bytes")), None)


def _rows_of(r: dict[str, Any], input_root: Path | None, seen_images: set[str]) -> Iterator[dict[str, Any]]:
    image = _image_of(r, input_root)
    sample, image_id = r["sample_id"], r["image_id"]
    extras = {"sample_id": sample, "image_id": image_id, "hazard": r.get("hazard"),
              "mlcommons_category": r.get("mlcommons_category")}
    contrast = r.get("contrast_query")
    if contrast and image_id not in seen_images:
        seen_images.add(image_id)
        yield {"id": f"{image_id}:contrast", "image": image, "query": contrast, "response": None, "label": "safe",
               "category": None, "source": SOURCE, "task": "prompt",
               "sample_id": None, "image_id": image_id, "hazard": None, "mlcommons_category": None}
    base = {"image": image, "query": r["query"], "category": r.get("category"), "source": SOURCE, **extras}
    yield {"id": f"{sample}:prompt", **base, "response": None, "label": "unsafe", "task": "prompt"}
    yield {"id": f"{sample}:guidance", **base, "response": r["response"], "label": "safe", "task": "response"}
    if r.get("naive_response"):
        yield {"id": f"{sample}:naive", **base, "response": r["naive_response"], "label": "unsafe",
               "task": "response"}
