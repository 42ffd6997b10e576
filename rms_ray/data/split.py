"""Split a labelled file into train and test files without leakage, streaming (``rms-ray split-dataset``).

Why it exists: ``compare-datasets`` scores a judge on a set's *own* test split apart from the other sets, and a
judge trained on part of a benchmark (MMSafeAware, say) must be scored on the rest. A random row split would put
the same photo on both sides (MMSafeAware pairs one image with several queries), and the judge would be scored on
images it was trained on. So rows are split **by group**, by default the image's content (SHA-256 of its bytes):
every row of one image lands on the same side.

Rule (deterministic, no global view needed, so any file size streams in bounded memory): a group goes to *test*
when ``int(sha256("rms-split:<seed>:" + key)[:8 bytes]) / 2**64 < test_fraction``. This is the hash split used by
large-scale data pipelines (e.g. TFDS ``split`` by hashed key); the test share is ``test_fraction`` in
expectation, with binomial noise on small sets, and not stratified by label: ``split.json`` records the counts
per side, and an empty side is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any

from rms_ray.common.io import file_sha256, write_json_atomic
from rms_ray.data.labelled import LabelledWriter, checked_row, iter_rows, load_row_image, write_excluded

GROUP_BY = ("image", "id")
SPLITS = ("train", "test")


def assign_split(key: bytes, test_fraction: float, seed: int) -> str:
    """``"test"`` or ``"train"`` for a group key (see the module docstring for the rule)."""
    h = hashlib.sha256(f"rms-split:{seed}:".encode() + key).digest()
    return "test" if int.from_bytes(h[:8], "big") / 2**64 < test_fraction else "train"


def split_labelled(path: str | Path, out_dir: str | Path, *, test_fraction: float = 0.2, seed: int = 0,
                   group_by: str = "image", suffix: str = ".parquet") -> dict[str, Any]:
    """Split the labelled file ``path`` into ``out_dir/train<suffix>`` and ``out_dir/test<suffix>``.

    Streams the input in batches of 256 rows and writes both outputs as it goes (Parquet: images embedded; the
    ``source`` and extra columns are kept), plus ``out_dir/split.json`` (input sha256, rule, counts per side per
    task and label) and ``out_dir/excluded.jsonl`` (rows whose image cannot be read, with the reason). All three
    outputs are committed atomically; on an error nothing is written.

    Args:
        path: a labelled ``.jsonl`` or ``.parquet`` file (relative image paths resolve against its folder).
        out_dir: output folder (created).
        test_fraction: expected share of groups in the test split, 0 < f < 1.
        seed: which split; the same seed and file give the same split, byte for byte.
        group_by: ``image`` (SHA-256 of the image bytes: one photo never on both sides) or ``id``.
        suffix: ``.parquet`` or ``.jsonl`` for the outputs.
    Returns:
        The ``split.json`` content: ``{"train": {"rows", "counts"}, "test": {...}, "excluded", "groups", ...}``.
    Raises:
        ValueError: a bad argument, or a split that came out empty (too few groups for this fraction).
        FileNotFoundError / LabelledFormatError: an unreadable input, or a row that breaks the format.
    """
    path, out_dir = Path(path), Path(out_dir)
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if group_by not in GROUP_BY:
        raise ValueError(f"--group-by must be one of {'/'.join(GROUP_BY)}, got {group_by!r}")
    if suffix not in (".parquet", ".jsonl"):
        raise ValueError(f"output suffix must be .parquet or .jsonl, got {suffix!r}")
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} not found")
    if out_dir.resolve() == path.parent.resolve():
        raise ValueError(f"--output {out_dir} is the input's own folder: give a new folder for the split")
    t0 = time.perf_counter()
    created = not out_dir.exists()
    try:
        return _split(path, out_dir, test_fraction, seed, group_by, suffix, t0)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # on an error nothing is written: not even the folder this call made
        raise


def _split(path: Path, out_dir: Path, test_fraction: float, seed: int, group_by: str, suffix: str,
           t0: float) -> dict[str, Any]:
    excluded: list[dict[str, Any]] = []
    groups: dict[str, set[str]] = {s: set() for s in SPLITS}
    with contextlib.ExitStack() as stack:
        writers = {s: stack.enter_context(LabelledWriter(out_dir / f"{s}{suffix}")) for s in SPLITS}
        for batch in iter_rows(path, batch_size=256):
            for raw in batch:
                row = checked_row(raw, path)  # an error names the input file, not the output being written
                data, ipath, err = load_row_image(row.get("image"), path.parent)
                if err:
                    excluded.append({"id": row["id"], "reason": err})
                    continue
                key = hashlib.sha256(data).digest() if group_by == "image" else str(row["id"]).encode()
                side = assign_split(key, test_fraction, seed)
                groups[side].add(key.hex())
                writers[side].write({**row, "image": {"bytes": data, "path": ipath}})
        empty = [s for s in SPLITS if writers[s].rows == 0]
        if empty:
            n = sum(len(g) for g in groups.values())
            raise ValueError(f"the {' and '.join(empty)} split of {path} came out empty ({n} {group_by} group(s), "
                             f"test fraction {test_fraction}): use more rows or another --test-fraction")
        result = {
            "input": {"path": str(path), "sha256": file_sha256(path)},
            "rule": {"group_by": group_by, "test_fraction": test_fraction, "seed": seed,
                     "hash": "sha256('rms-split:<seed>:' + key)[:8] / 2**64 < test_fraction"},
            "groups": {s: len(groups[s]) for s in SPLITS},
            **{s: {"path": str(writers[s].path), "rows": writers[s].rows, "counts": writers[s].counts} for s in SPLITS},
            "excluded": len(excluded),
        }
    write_excluded(out_dir / "excluded.jsonl", excluded)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(out_dir / "split.json", result)
    return result
