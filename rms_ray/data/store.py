"""Output layout, atomic shard commits (exactly-once resume) and the final tables: where a row is written.

Layout of an output folder::

    data/train-00000-of-00001.parquet    accepted samples (+ emergent category, MLCommons mapping)
    rejected/rejected-00000-of-00001.parquet   every candidate that failed, with all reasons (and raw text)
    quarantine/quarantine.parquet        inputs that could not be decoded/normalised, with the reason
    duplicates/duplicates.parquet        exact / near-duplicate inputs and the image they duplicate
    manifest.json, README.md, categories.png, taxonomy.json
    _work/ingest.parquet                 per-input decode result (hashes, quarantine reason), per (id, size, mtime)
    _work/run_config.json                the data-shaping config this folder is bound to
    _work/commits/<shard>/               one committed batch: accepted/rejected/images.parquet

Exactly-once: an engine actor writes a batch's three tables into ``_work/tmp/<shard>-<uuid>/`` and commits with
one ``os.rename`` to ``_work/commits/<shard>/`` (atomic on POSIX filesystems). A SIGKILL before the rename leaves
only a tmp folder, removed on resume; after it, the whole batch is there. The shard name hashes the batch's image
ids, so a retried batch commits under the same name and the second commit is discarded. A resumed run skips every
(image id, sha256) found in ``commits/*/images.parquet``, so an edited file under the same name is redone. :meth:`OutputStore.read_committed` also drops any image committed
twice (kept: first shard by name), so the final tables never hold a duplicate. Outputs must live on a POSIX
filesystem that every node sees (local disk for one machine; NFS/EFS/Lustre on a cluster).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from rms_ray.common.io import IMAGE_TYPE, table, write_json_atomic, write_parquet_atomic
from rms_ray.construct.prompts import STAGES

_STR, _I32, _F32 = pa.string(), pa.int32(), pa.float32()
_STRS = pa.list_(pa.string())
PROMPT_VERSIONS = pa.struct([(s, _STR) for s in STAGES])
IMAGE = IMAGE_TYPE  # the Hugging Face `datasets` Image layout

IMAGE_FIELDS = [
    ("image_id", _STR), ("image_path", _STR), ("sha256", _STR), ("phash", _STR),
    ("width", _I32), ("height", _I32), ("source_width", _I32), ("source_height", _I32),
    ("source_format", _STR), ("image_notes", _STRS),
]
SCENE_FIELDS = [("scene_description", _STR), ("scene_setting", _STR), ("scene_entities", _STRS)]
SAMPLE_FIELDS = [
    ("sample_id", _STR), ("candidate_index", _I32), ("hazard", _STR), ("hazard_rationale", _STR),
    ("query", _STR), ("response", _STR), ("rounds", _I32), ("reasons", _STRS),
    *[(f"verdict_{n}", _STR) for n in ("image_alone", "query_alone", "pair", "response")],
    *[(f"reason_{n}", _STR) for n in ("image_alone", "query_alone", "pair", "response")],
]
#: The safe side (``generation.contrast``; null where switched off). The image's contrast query is repeated on
#: each row of that image, so ``data/`` stays one self-contained table; text columns are null when generation
#: failed after ``max_rounds`` attempts, and ``reason_*`` then holds the latest failure.
CONTRAST_FIELDS = [
    ("contrast_query", _STR), ("contrast_rounds", _I32), ("verdict_contrast", _STR), ("reason_contrast", _STR),
    ("naive_response", _STR), ("naive_rounds", _I32), ("verdict_naive_response", _STR),
    ("reason_naive_response", _STR),
]
PROVENANCE_FIELDS = [("model_id", _STR), ("prompt_versions", PROMPT_VERSIONS)]
CATEGORY_FIELDS = [("category_id", _I32), ("category", _STR), ("mlcommons_category", _STR), ("mlcommons_score", _F32)]

#: Work shard of accepted samples (no category yet: categories emerge from the whole dataset at finalise).
ACCEPTED_WORK_SCHEMA = pa.schema([SAMPLE_FIELDS[0], *IMAGE_FIELDS, ("image", IMAGE), *SCENE_FIELDS,
                                  *SAMPLE_FIELDS[1:], *CONTRAST_FIELDS, *PROVENANCE_FIELDS])
#: Final accepted samples: ``data/train-*.parquet``.
ACCEPTED_SCHEMA = pa.schema([*ACCEPTED_WORK_SCHEMA, *CATEGORY_FIELDS, ("config_hash", _STR)])
#: ``rejected/*.parquet``: ``stage`` is the last failing stage; ``reasons`` every failure of every round.
REJECTED_SCHEMA = pa.schema([SAMPLE_FIELDS[0], *IMAGE_FIELDS, *SCENE_FIELDS, *SAMPLE_FIELDS[1:],
                             *CONTRAST_FIELDS, ("stage", _STR), ("raw_text", _STR), *PROVENANCE_FIELDS])
#: Per image outcome of a committed batch.
IMAGES_SCHEMA = pa.schema([("image_id", _STR), ("sha256", _STR), ("status", _STR), ("n_accepted", _I32),
                           ("n_rejected", _I32), ("gen_tokens", pa.int64())])
QUARANTINE_SCHEMA = pa.schema([("image_id", _STR), ("image_path", _STR), ("reason", _STR), ("detail", _STR),
                               ("sha256", _STR)])
#: ``duplicates/``: ``distance`` = pHash bits, ``color_distance`` = max-cell CIE76 Delta E (rms_ray.data.dedup).
DUPLICATES_SCHEMA = pa.schema([("image_id", _STR), ("image_path", _STR), ("duplicate_of", _STR),
                               ("duplicate_of_path", _STR), ("kind", _STR), ("distance", _I32),
                               ("color_distance", _F32)])
#: ``_work/ingest.parquet``; ``color_sig`` (dedup colour signature) is null in caches written before it existed.
INGEST_SCHEMA = pa.schema([*IMAGE_FIELDS, ("status", _STR), ("reason", _STR), ("detail", _STR),
                           ("size", pa.int64()), ("mtime_ns", pa.int64()), ("color_sig", _STR)])

def shard_name(image_ids: Iterable[str]) -> str:
    """Deterministic name of the shard holding exactly these image ids (sha256 of the sorted ids, 20 hex)."""
    return hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()[:20]



class OutputError(ValueError):
    """An output folder this run must not write into (the message says why and what to do)."""


class OutputConfigMismatch(OutputError):
    """An output folder already holds work made with a different data-shaping config."""


class OutputStore:
    """An output folder (see module docstring). Cheap to construct; safe to use from many actors at once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.work = self.root / "_work"
        self.commits = self.work / "commits"
        self.tmp = self.work / "tmp"

    def prepare(self) -> None:
        """Create folders and remove leftovers of a killed run (uncommitted tmp shards). Driver only, before work."""
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        for d in (self.commits, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def check_config(self, config_hash: str, config: dict[str, Any]) -> None:
        """Bind this output folder to one data-shaping config: record it on first use, refuse another later.
        Call before :meth:`prepare`.

        Raises:
            OutputConfigMismatch: the folder holds work made with a different ``config_hash``.
            OutputError: the path is a file, or a non-empty folder that rms_ray did not make.
        """
        path = self.work / "run_config.json"
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"output {self.root} exists and is not a folder")
        if not path.exists() and self.root.exists() and any(self.root.iterdir()):
            raise OutputError(
                f"output {self.root} is not empty and was not made by rms_ray (no {path.relative_to(self.root)}): "
                "refusing to overwrite files there; use an empty or new folder")
        if path.exists():
            recorded = json.loads(path.read_text())
            if recorded["config_hash"] != config_hash:
                raise OutputConfigMismatch(
                    f"{self.root} holds work made with config hash {recorded['config_hash']} (see {path}); this run's "
                    f"config hashes to {config_hash}. Resuming would mix rows made two ways: use a new --output, or "
                    "the same model/images/generation/taxonomy/output settings (resources may differ).")
            return
        write_json_atomic(path, {"config_hash": config_hash, "config": config})

    def commit_shard(self, accepted: list[dict], rejected: list[dict], images: list[dict]) -> str:
        """Atomically commit one batch's rows. Returns the shard name. A batch committed before is left as is.

        Raises:
            ValueError: ``images`` is empty, or a row has columns outside the schemas.
        """
        if not images:
            raise ValueError("a shard needs at least one image")
        name = shard_name(r["image_id"] for r in images)
        final = self.commits / name
        if final.exists():
            return name
        tmp = self.tmp / f"{name}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        pq.write_table(table(accepted, ACCEPTED_WORK_SCHEMA), tmp / "accepted.parquet")
        pq.write_table(table(rejected, REJECTED_SCHEMA), tmp / "rejected.parquet")
        pq.write_table(table(images, IMAGES_SCHEMA), tmp / "images.parquet")
        try:
            os.rename(tmp, final)  # the commit point
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race with a retry of the same batch: same content
        return name

    def _shards(self) -> list[Path]:
        return sorted(p for p in self.commits.glob("*") if p.is_dir()) if self.commits.exists() else []

    def done_keys(self) -> set[tuple[str, str | None]]:
        """``(image_id, sha256)`` of every committed image: a resumed run skips an image only if its file still
        has the same content."""
        keys: set[tuple[str, str | None]] = set()
        for shard in self._shards():
            t = pq.read_table(shard / "images.parquet", columns=["image_id", "sha256"])
            keys.update(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))
        return keys

    def read_committed(self, wanted: dict[str, str | None] | None = None) -> tuple[pa.Table, pa.Table, pa.Table, int]:
        """Concatenate committed shards into (accepted, rejected, images, n_image_commits_dropped).

        Args:
            wanted: ``{image_id: sha256}`` of the current input; commits of other ids, or of an older content of
                the same id (the file changed), are dropped. None keeps every id.
        An image committed in two shards (possible only if a batch were re-split after a failure) is kept from
        the first shard by name only, so every image contributes its rows exactly once.
        """
        acc, rej, img = [], [], []
        seen: set[str] = set()
        dropped = 0
        for shard in self._shards():
            images = pq.read_table(shard / "images.parquet")
            ids, shas = images.column("image_id").to_pylist(), images.column("sha256").to_pylist()
            keep = [i for i, h in zip(ids, shas)
                    if i not in seen and (wanted is None or (i in wanted and wanted[i] == h))]
            dropped += len(ids) - len(keep)
            seen.update(keep)
            keep_set = pa.array(keep, _STR)
            for out, name in ((acc, "accepted"), (rej, "rejected"), (img, "images")):
                t = images if name == "images" else pq.read_table(shard / f"{name}.parquet")
                out.append(t.filter(pa.compute.is_in(t.column("image_id"), keep_set)))
        cat = lambda parts, schema: pa.concat_tables(parts) if parts else schema.empty_table()  # noqa: E731
        return (cat(acc, ACCEPTED_WORK_SCHEMA), cat(rej, REJECTED_SCHEMA), cat(img, IMAGES_SCHEMA), dropped)

    def write_table_files(self, tbl: pa.Table, subdir: str, prefix: str, rows_per_file: int) -> list[str]:
        """Replace ``<root>/<subdir>/`` with ``tbl`` split into ``<prefix>-NNNNN-of-MMMMM.parquet`` files.

        Returns the written paths relative to the root. Always writes at least one (possibly empty) file, so
        every table can be opened even when it has no rows.
        """
        out_dir = self.root / subdir
        n_files = max(1, -(-tbl.num_rows // rows_per_file))
        names = [f"{prefix}-{i:05d}-of-{n_files:05d}.parquet" for i in range(n_files)]
        if out_dir.exists():
            for old in out_dir.glob("*.parquet"):
                if old.name not in names:
                    old.unlink()
        for i, name in enumerate(names):
            write_parquet_atomic(tbl.slice(i * rows_per_file, rows_per_file), out_dir / name, hf_features=True)
        return [f"{subdir}/{n}" for n in names]
