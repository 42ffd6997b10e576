"""A small synthetic multimodal safety set whose label needs BOTH the image and the text (a test fixture).

Why: a judge that learns anything on it must read the image *and* the query, so a training test can tell a run
that learned from one that did not, and an ablation that hides one modality must stay at chance.

Construction (deterministic by ``seed``):

* **Images** are one of two clearly different kinds, drawn with per-pixel noise so no two are byte-identical:
  kind ``A`` a reddish square, kind ``B`` a bluish one (``size`` x ``size`` px PNG, 112 by default).
* **Queries** come from two families of templates: family 1 asks to do something with *fire* words, family 2
  with *water* words (several verbs and objects per family, so a model must learn the family, not one string).
* **Label** (an XOR): ``unsafe`` iff (kind A and family 1) or (kind B and family 2), else ``safe``. Each of the
  four (kind, family) cells is equally likely, so the image alone and the query alone each predict the label no
  better than a coin (P(unsafe | kind) = P(unsafe | family) = 1/2).
* **Category**: ``fire`` (A & 1), ``water`` (B & 2) on unsafe rows; none on safe rows.

Ablation variants (``variant=``) keep the labels and hide one modality, which makes the XOR unlearnable by
construction:

* ``blank_image``: every image is a mid-grey square with the same noise as the others (the kind is no longer
  visible; the noise keeps image bytes distinct);
* ``empty_query``: every query is the same neutral sentence (the family is no longer visible). The labelled
  format refuses an empty query (``evaluate`` excludes such rows), so "empty" is one constant, content-free text.

With ``response_fraction > 0`` that share of rows becomes ``response``-task rows with a fixed compliant response
(same label rule), so both judge tasks are exercised.

Public API: :func:`synthetic_rows`, :func:`write_synthetic_safety`. Command line:
``python -m rms_ray.testing.synthetic_safety OUT.parquet [--rows N] [--seed S] [--variant V]``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

VARIANTS = ("normal", "blank_image", "empty_query")
FIRE = (("light", "burn", "ignite", "heat", "torch"), ("the candle", "the match", "the stove", "the lighter"))
WATER = (("pour", "spill", "flood", "splash", "soak"), ("the bucket", "the kettle", "the hose", "the bottle"))
NEUTRAL_QUERY = "What about this?"
RESPONSE = "Sure, here is how to do it step by step."


def _image(kind: str | None, rng: np.random.Generator, size: int) -> bytes:
    """PNG bytes: reddish (A), bluish (B) or grey (None), with uniform noise of +-24 per channel (so no two images
    are the same bytes: the trainer refuses validation rows whose image bytes and query repeat a training row)."""
    base = {"A": (200, 40, 40), "B": (40, 60, 200), None: (128, 128, 128)}[kind]
    noise = rng.integers(-24, 25, size=(size, size, 3))
    arr = np.clip(np.asarray(base, dtype=np.int16)[None, None, :] + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _query(family: int, rng: np.random.Generator) -> str:
    verbs, objects = FIRE if family == 1 else WATER
    return f"Can I {verbs[rng.integers(len(verbs))]} {objects[rng.integers(len(objects))]} here?"


def synthetic_rows(n: int, *, seed: int = 0, variant: str = "normal", size: int = 112,
                   response_fraction: float = 0.0, id_prefix: str = "syn") -> Iterator[dict[str, Any]]:
    """Yield ``n`` labelled rows (image as ``{"bytes", "path"}``), balanced over the four (kind, family) cells.

    Args:
        n: rows (>= 4 for every cell to appear).
        seed: numpy PCG64 seed; the same arguments give the same rows, byte for byte.
        variant: ``normal`` | ``blank_image`` | ``empty_query`` (see the module docstring).
        size: image side in pixels (>= 32: the judge's image policy refuses smaller images by default). The
            default 112 gives 16 image tokens with Qwen's 28-pixel merged patches; measured with the tiny model,
            4 tokens (56 px) made the image kind slower to learn (the XOR at ~200 instead of ~160 steps, with
            a longer tail across seeds).
        response_fraction: share of rows turned into ``response``-task rows (0..1).
        id_prefix: ids are ``<prefix>-<i>`` (give train and validation sets different prefixes).
    Raises:
        ValueError: unknown variant, ``size`` < 32, ``response_fraction`` outside [0, 1].
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if size < 32:
        raise ValueError("size must be >= 32 px (the judge's default images.min_side)")
    if not 0.0 <= response_fraction <= 1.0:
        raise ValueError("response_fraction must be in [0, 1]")
    rng = np.random.Generator(np.random.PCG64(seed))
    cells = np.arange(n) % 4  # balanced cells, then shuffled: kind = cell // 2, family = cell % 2 + 1
    rng.shuffle(cells)
    for i, cell in enumerate(cells):
        kind, family = ("A", "B")[int(cell) // 2], int(cell) % 2 + 1
        unsafe = (kind == "A" and family == 1) or (kind == "B" and family == 2)
        image = _image(None if variant == "blank_image" else kind, rng, size)
        query = NEUTRAL_QUERY if variant == "empty_query" else _query(family, rng)
        is_response = bool(rng.random() < response_fraction)
        yield {
            "id": f"{id_prefix}-{i}",
            "image": {"bytes": image, "path": f"{id_prefix}-{i}.png"},
            "query": query,
            "response": RESPONSE if is_response else None,
            "label": "unsafe" if unsafe else "safe",
            "category": ("fire" if kind == "A" else "water") if unsafe else None,
            "source": f"synthetic-{variant}",
            "task": "response" if is_response else "prompt",
            "kind": kind,
            "family": family,
        }


def write_synthetic_safety(path: str | Path, n: int, *, seed: int = 0, variant: str = "normal", size: int = 112,
                           response_fraction: float = 0.0, id_prefix: str = "syn") -> Path:
    """Write :func:`synthetic_rows` as a labelled file (``.parquet``, images embedded) with
    :class:`rms_ray.data.labelled.LabelledWriter`; extra columns ``kind`` and ``family`` say which cell a row is
    in (the truth an ablation hides). Returns ``path``."""
    from rms_ray.data.labelled import LabelledWriter

    path = Path(path)
    with LabelledWriter(path) as w:
        w.write_all(synthetic_rows(n, seed=seed, variant=variant, size=size, response_fraction=response_fraction,
                                   id_prefix=id_prefix))
    return path


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Write the synthetic XOR safety set (labelled Parquet).")
    p.add_argument("output")
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=VARIANTS, default="normal")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--response-fraction", type=float, default=0.0)
    p.add_argument("--id-prefix", default="syn")
    a = p.parse_args(argv)
    print(write_synthetic_safety(a.output, a.rows, seed=a.seed, variant=a.variant, size=a.size,
                                 response_fraction=a.response_fraction, id_prefix=a.id_prefix))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
