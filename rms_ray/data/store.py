"""Output layout, atomic shard commits (exactly-once resume), the commit index, and the final tables written as a
stream: where a row is written, and how a run that is killed, crashes or is started twice stays exact.

Layout of an output folder::

    data/train-NNNNN-of-MMMMM.parquet    accepted samples (+ emergent category, MLCommons mapping); an image's bytes
                                         are stored once, on its first row (see "Image bytes" below)
    rejected/rejected-NNNNN-of-MMMMM.parquet   every candidate that failed, with all reasons (and raw text)
    quarantine/, duplicates/             inputs that could not be decoded / exact and near duplicates
    manifest.json, README.md, categories.png, taxonomy.json
    _work/lock                           flock-ed by the one run writing here (released by the OS if it dies)
    _work/run_config.json                the data-shaping config + binding (prompt versions, model revision)
    _work/ingest.parquet                 merged per-input decode results (hashes, quarantine reason), per (id, size,
                                         mtime); ``_work/ingest/part-*.parquet``: results committed while an ingest
                                         pass runs, merged into it when the pass ends
    _work/commits/<shard>/               one committed batch: accepted/rejected/images.parquet + _SUCCESS
    _work/commits.parquet                the commit index: the images.parquet rows of compacted shards + shard name
    _work/damaged/                       shards found damaged on read, moved aside (their images are redone)

Exactly-once: an engine actor writes a batch's three tables into ``_work/tmp/<shard>-<pid>-<random>/``, fsyncs
them, writes ``_SUCCESS`` (size and sha256 of each file) last, fsyncs the folder, and commits with one
``os.rename`` to ``_work/commits/<shard>/`` (atomic on POSIX filesystems), then fsyncs ``commits/``. A SIGKILL
before the rename leaves only a tmp folder, removed on resume; after it, the whole batch is there. The shard name
hashes the batch's image ids, so a retried batch commits under the same name and the second commit is discarded.
A shard whose files do not match its ``_SUCCESS`` (a machine crash on a filesystem that lied about fsync, a
truncated copy) is moved to ``_work/damaged/`` when it is read, never read as data, and its images are redone.

Resume reads O(1) files: :meth:`OutputStore.compact` folds the ``images.parquet`` key lists of committed shards
into ``_work/commits.parquet`` (written atomically; a run compacts after generation and whenever more than
:data:`COMPACT_AFTER` shards are not in it), and :meth:`OutputStore.done_keys` reads that index plus the few
shards committed since. A resumed run skips every (image id, sha256) found there, so an edited file under the
same name is redone. An image committed twice (possible only if a batch were re-split after a failure) is kept
from the first shard by name, so the final tables never hold a duplicate.

Image bytes: in ``data/`` the normalised image is stored once per image, on the image's first row (lowest
``candidate_index``); its other rows have ``image = null``. All rows of an image are adjacent (``data/`` is sorted
by ``image_id, candidate_index``) and in the same file (files are cut at image boundaries, so a file may hold a
few rows more than ``output.rows_per_file``). Work shards store them the same way.

The final tables are written by :meth:`OutputStore.write_files` from a stream of batches (one output file open at
a time, row groups of at most :data:`ROW_GROUP_BYTES`), and :meth:`OutputStore.iter_committed` streams the rows of
the kept images shard by shard in (image id, candidate index) order: the driver never holds the dataset, only
the shards whose image-id ranges overlap the position being written (one or two: a batch is a run of consecutive
ids). Outputs must live on a POSIX filesystem that every node sees (local disk for one machine; NFS/EFS/Lustre on
a cluster).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rms_ray.common.io import (
    IMAGE_TYPE,
    atomic_write,
    fsync_dir,
    hf_schema_metadata,
    table,
    tmp_suffix,
    write_json_atomic,
    write_parquet_atomic,
)
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
#: ``_work/commits.parquet``: the images.parquet rows of every compacted shard, with the shard's name.
INDEX_SCHEMA = pa.schema([*IMAGES_SCHEMA, ("shard", _STR)])
QUARANTINE_SCHEMA = pa.schema([("image_id", _STR), ("image_path", _STR), ("reason", _STR), ("detail", _STR),
                               ("sha256", _STR)])
#: ``duplicates/``: ``distance`` = pHash bits, ``color_distance`` = max-cell CIE76 Delta E (rms_ray.data.dedup).
DUPLICATES_SCHEMA = pa.schema([("image_id", _STR), ("image_path", _STR), ("duplicate_of", _STR),
                               ("duplicate_of_path", _STR), ("kind", _STR), ("distance", _I32),
                               ("color_distance", _F32)])
#: ``_work/ingest.parquet``; ``color_sig`` (dedup colour signature) is null in caches written before it existed.
INGEST_SCHEMA = pa.schema([*IMAGE_FIELDS, ("status", _STR), ("reason", _STR), ("detail", _STR),
                           ("size", pa.int64()), ("mtime_ns", pa.int64()), ("color_sig", _STR)])

#: The files of a committed shard, and the one written last that lists their sizes and sha256.
SHARD_FILES = ("accepted.parquet", "rejected.parquet", "images.parquet")
SUCCESS = "_SUCCESS"
#: Shards committed since the last compaction that :meth:`OutputStore.done_keys` reads one by one before it
#: compacts them into the index (so a resume opens at most this many shard folders).
COMPACT_AFTER = 64
#: A final file's row groups hold at most this many bytes (images dominate): bounded memory while writing, and
#: row groups small enough for readers that fetch one at a time (the Hugging Face viewer, streaming datasets).
ROW_GROUP_BYTES = 8 << 20
ROW_GROUP_ROWS = 10_000


def shard_name(image_ids: Iterable[str]) -> str:
    """Deterministic name of the shard holding exactly these image ids (sha256 of the sorted ids, 20 hex)."""
    return hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()[:20]


class OutputError(ValueError):
    """An output folder this run must not write into (the message says why and what to do)."""


class OutputConfigMismatch(OutputError):
    """An output folder already holds work made with a different data-shaping config, prompts or model."""


class OutputBusy(OutputError):
    """Another run holds the output folder's lock."""


class DamagedShardError(OutputError):
    """A committed shard changed since it was verified (found while finalising); it was moved aside."""


class RunLock:
    """The run lock of one output folder (``fcntl.flock`` on ``_work/lock``), held by this process until
    :meth:`release` or its exit: the OS drops it when the process dies, so a crashed run never leaves it stuck."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        """False once released (or when the filesystem supports no locks, see :meth:`OutputStore.lock`)."""
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _parquet_bytes(tbl: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(tbl, sink)
    return sink.getvalue().to_pybytes()


def _image_once(rows: list[dict]) -> list[dict]:
    """Accepted rows sorted by (image id, candidate index), the image's bytes on its first row only."""
    def key(r: dict) -> tuple[str, int]:
        ci = r.get("candidate_index")
        return (r["image_id"], -1 if ci is None else ci)

    rows = sorted(rows, key=key)
    first: dict[str, Any] = {}
    for r in rows:  # the first row that has the image (any row of an image may carry it)
        if r.get("image") and r["image_id"] not in first:
            first[r["image_id"]] = r["image"]
    out, placed = [], set()
    for r in rows:
        r = dict(r)
        r["image"] = None if r["image_id"] in placed else first.get(r["image_id"])
        placed.add(r["image_id"])
        out.append(r)
    return out


def image_on_first_row(batch: pa.Table) -> pa.Table:
    """``batch`` (sorted by image id, starting at an image boundary) with ``image`` null on every row but the first
    of each image: the bytes are stored once per image. Rows that already follow this layout are unchanged."""
    n = batch.num_rows
    if n <= 1 or "image" not in batch.column_names:
        return batch
    ids = batch.column("image_id")
    first = pa.chunked_array([pa.array([True]), pc.not_equal(ids.slice(1), ids.slice(0, n - 1))]).combine_chunks()
    col = batch.column("image")
    image = pc.if_else(first, col, pa.nulls(n, col.type))
    return batch.set_column(batch.schema.get_field_index("image"), batch.schema.field("image"), image)


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """``t`` with exactly ``schema``'s columns: columns a shard made by an older rms_ray lacks are null."""
    for f in schema:
        if f.name not in t.column_names:
            t = t.append_column(f.name, pa.nulls(t.num_rows, f.type))
    return t.select(schema.names).cast(schema)


class OutputStore:
    """An output folder (see module docstring). Cheap to construct; actors may commit shards at the same time;
    the driver-side methods (lock, prepare, compact, done_keys, finalising) run in the one run holding the lock."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.work = self.root / "_work"
        self.commits = self.work / "commits"
        self.tmp = self.work / "tmp"
        self.damaged = self.work / "damaged"
        self.index_path = self.work / "commits.parquet"
        self.ingest_path = self.work / "ingest.parquet"
        self.ingest_parts = self.work / "ingest"
        self._manifests: dict[str, dict[str, Any] | None] = {}

    # ---------------------------------------------------------------------------------------------------------
    # One run per folder, bound to one config
    # ---------------------------------------------------------------------------------------------------------
    def _check_ours(self) -> None:
        """Refuse a file, or a non-empty folder rms_ray did not make, before anything is written there."""
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"output {self.root} exists and is not a folder")
        if (self.work / "run_config.json").exists() or not self.root.exists():
            return
        # only _work/ (a lock, logs of a run that failed before it recorded its config) is ours too
        foreign = sorted(p.name for p in self.root.iterdir() if p.name != "_work")
        if foreign:
            raise OutputError(
                f"output {self.root} is not empty and was not made by rms_ray (no _work/run_config.json): "
                "refusing to overwrite files there; use an empty or new folder")

    def lock(self) -> RunLock:
        """Take this folder's run lock for the calling process: one run per output folder at a time. Call first,
        before :meth:`check_config` and :meth:`prepare` (which removes the tmp shards of a run it assumes dead).

        The lock is ``fcntl.flock`` on ``_work/lock`` (NFSv4 and most cluster filesystems carry it across
        machines); the file records who holds it, for the message a second run gets. On a filesystem without
        locks a warning says so and the run proceeds unguarded.

        Raises:
            OutputBusy: another process holds it (the message names the folder and the holder).
            OutputError: the output is a file or a foreign non-empty folder (nothing is created then).
        """
        self._check_ours()
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown process"
            finally:
                os.close(fd)
            raise OutputBusy(
                f"another rms_ray run is writing to {self.root} (its lock {path} is held by {holder}): one run per "
                "output folder at a time; wait for it to finish (a crashed run's lock is released by the OS) or "
                "use another --output") from None
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                warnings.warn(f"{path}: this filesystem does not support file locks ({e}); nothing stops a second "
                              "run from writing into the same output folder", RuntimeWarning, stacklevel=2)
                return RunLock(path, None)
            os.close(fd)
            raise
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        return RunLock(path, fd)

    def check_config(self, config_hash: str, config: dict[str, Any], binding: dict[str, Any] | None = None) -> None:
        """Bind this output folder to one data-shaping config and ``binding`` (what else shapes the rows: prompt
        versions, model revision; see :func:`rms_ray.construct.binding.run_binding`): record them on first use,
        refuse others later. Call after :meth:`lock`, before :meth:`prepare`.

        Raises:
            OutputConfigMismatch: the folder holds work made with a different ``config_hash`` or binding (the
                message names what changed), or made by an older rms_ray that did not record a binding.
            OutputError: the path is a file, or a non-empty folder that rms_ray did not make.
        """
        self._check_ours()
        path = self.work / "run_config.json"
        if not path.exists():
            write_json_atomic(path, {"config_hash": config_hash, "config": config, "binding": binding})
            return
        recorded = json.loads(path.read_text())
        if recorded["config_hash"] != config_hash:
            raise OutputConfigMismatch(
                f"{self.root} holds work made with config hash {recorded['config_hash']} (see {path}); this run's "
                f"config hashes to {config_hash}. Resuming would mix rows made two ways: use a new --output, or "
                "the same model/images/generation/taxonomy/output settings (resources may differ).")
        if binding is None:
            return
        before = recorded.get("binding")
        if before is None:
            if self._listing():
                raise OutputConfigMismatch(
                    f"{self.root} was made by an earlier rms_ray that did not record the prompt versions and model "
                    f"revision its rows were made with (see {path}), so resuming could mix rows made two ways: use "
                    "a new --output")
            write_json_atomic(path, {**recorded, "binding": binding})
            return
        changed = []
        for key in sorted(set(before) | set(binding)):
            old, new = before.get(key), binding.get(key)
            if old == new:
                continue
            if isinstance(old, dict) and isinstance(new, dict):
                changed += [f"{key}.{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new))
                            if old.get(k) != new.get(k)]
            else:
                changed.append(f"{key}: {old} -> {new}")
        if changed:
            raise OutputConfigMismatch(
                f"{self.root} holds work made with other prompts or another model revision than this run's ("
                + "; ".join(changed) + f"; recorded in {path}). Resuming would mix rows made two ways: use a new "
                "--output (or restore the prompts / model the folder was made with).")

    def prepare(self) -> None:
        """Create folders and remove leftovers of a killed run: uncommitted tmp shards, temp files of interrupted
        atomic writes in ``_work/``. Driver only, holding the lock, before work."""
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        for d in (self.commits, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.work, self.ingest_parts):
            if d.is_dir():
                # rms_ray.common.io temp files; marker files of rms_ray.common.placement's node probe
                for leftover in [*d.glob(".*.tmp"), *d.glob(".node-probe-*")]:
                    leftover.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------------------------------------
    # Commits
    # ---------------------------------------------------------------------------------------------------------
    def commit_shard(self, accepted: list[dict], rejected: list[dict], images: list[dict]) -> str:
        """Atomically and durably commit one batch's rows. Returns the shard name. A batch committed before is left
        as is. Accepted rows are stored sorted by (image id, candidate index), the image's bytes on its first row.

        Raises:
            ValueError: ``images`` is empty, or a row has columns outside the schemas.
        """
        if not images:
            raise ValueError("a shard needs at least one image")
        name = shard_name(r["image_id"] for r in images)
        final = self.commits / name
        if final.exists():
            return name
        tables = {"accepted.parquet": table(_image_once(accepted), ACCEPTED_WORK_SCHEMA),
                  "rejected.parquet": table(rejected, REJECTED_SCHEMA),
                  "images.parquet": table(images, IMAGES_SCHEMA)}
        tmp = self.tmp / f"{name}-{tmp_suffix()}"
        tmp.mkdir(parents=True)
        try:
            files = {}
            for fname, tbl in tables.items():
                data = _parquet_bytes(tbl)
                _write_durable(tmp / fname, data)
                files[fname] = {"size": len(data), "sha256": _sha256(data)}
            # written last: a shard folder without it, or whose files differ from it, was never fully written
            _write_durable(tmp / SUCCESS, json.dumps({"format": 1, "files": files}).encode())
            fsync_dir(tmp)
            try:
                os.rename(tmp, final)  # the commit point
            except OSError:
                if not final.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost a race with a retry of the same batch: same content
                return name
            fsync_dir(self.commits)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return name

    def _listing(self) -> list[str]:
        """Names of the committed shards: one directory listing, no shard folder opened or even stat-ed (only
        shard folders are ever renamed into ``commits/``; ``is_dir`` would stat each entry where the filesystem
        does not report types, as NFS may)."""
        if not self.commits.is_dir():
            return []
        with os.scandir(self.commits) as it:
            return sorted(e.name for e in it if not e.name.startswith("."))

    def _manifest(self, name: str, fresh: bool = False) -> dict[str, Any] | None:
        """A shard's ``_SUCCESS`` (None for a shard made before it existed), read once per store object unless
        ``fresh``. Raises OSError/ValueError if damaged."""
        if fresh or name not in self._manifests:
            try:
                data = (self.commits / name / SUCCESS).read_bytes()
            except FileNotFoundError:
                if not all((self.commits / name / f).is_file() for f in SHARD_FILES):
                    raise
                self._manifests[name] = None  # a shard committed by an rms_ray without _SUCCESS
            else:
                manifest = json.loads(data)
                if not isinstance(manifest, dict) or set(manifest.get("files", ())) != set(SHARD_FILES):
                    raise ValueError(f"{SUCCESS} does not list {', '.join(SHARD_FILES)}")
                self._manifests[name] = manifest
        return self._manifests[name]

    def check_shard(self, name: str, *, full: bool = False) -> str | None:
        """What is wrong with committed shard ``name``, or None if it is whole: ``_SUCCESS`` present and readable,
        every file of the size it lists, ``images.parquet`` (and with ``full`` every file) of its sha256. A shard
        made before ``_SUCCESS`` existed is checked by opening its files' Parquet footers."""
        d = self.commits / name
        try:
            manifest = self._manifest(name, fresh=True)
        except (OSError, ValueError) as e:
            return f"{SUCCESS} missing or unreadable ({e})"
        if manifest is None:
            for f in SHARD_FILES:
                try:
                    pq.read_metadata(d / f)
                except (OSError, pa.ArrowException) as e:
                    return f"{f} unreadable ({e})"
            return None
        for f, meta in manifest["files"].items():
            try:
                size = os.stat(d / f).st_size
            except OSError as e:
                return f"{f} missing ({e})"
            if size != meta["size"]:
                return f"{f} has {size} bytes, {meta['size']} were committed"
            if (full or f == "images.parquet") and _sha256((d / f).read_bytes()) != meta["sha256"]:
                return f"{f} differs from what was committed (sha256)"
        return None

    def discard_shard(self, name: str, problem: str) -> Path:
        """Move a damaged shard out of ``commits/`` (to ``_work/damaged/``, with a note saying why) and out of the
        index, so it is never read as data and its images count as not done. Returns where it went."""
        self.damaged.mkdir(parents=True, exist_ok=True)
        dest = self.damaged / f"{name}-{tmp_suffix()}"
        os.rename(self.commits / name, dest)
        fsync_dir(self.commits)
        self._manifests.pop(name, None)
        try:
            (dest / "DAMAGED.txt").write_text(problem + "\n")
        except OSError:
            pass  # the note is for people; the move is what matters
        warnings.warn(f"committed shard {name} in {self.root} is damaged ({problem}): moved to {dest}; its images "
                      "are redone", RuntimeWarning, stacklevel=2)
        idx = self._read_index()
        if idx is not None and name in set(pc.unique(idx.column("shard")).to_pylist()):
            write_parquet_atomic(idx.filter(pc.not_equal(idx.column("shard"), name)), self.index_path)
        return dest

    def _read_images(self, name: str) -> pa.Table:
        t = pq.read_table(self.commits / name / "images.parquet").select(IMAGES_SCHEMA.names).cast(IMAGES_SCHEMA)
        return t.append_column("shard", pa.array([name] * t.num_rows, _STR))

    def _read_index(self) -> pa.Table | None:
        """The commit index (INDEX_SCHEMA); empty when absent, None when unreadable (it is written atomically, so
        only a filesystem that lost data makes one): then the shards themselves are read and re-indexed."""
        if not self.index_path.exists():
            return INDEX_SCHEMA.empty_table()
        try:
            return pq.read_table(self.index_path).select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
        except (OSError, pa.ArrowException, KeyError) as e:
            warnings.warn(f"{self.index_path} is unreadable ({e}): rebuilding it from the shards", RuntimeWarning,
                          stacklevel=2)
            return None

    def _committed(self, *, repair: bool) -> tuple[pa.Table, list[str], bool]:
        """(index rows of shards still committed, names of committed shards not in the index, whether the index
        file must be rewritten). Shards not in the index are checked: with ``repair`` a damaged one is discarded,
        else only skipped."""
        listed = self._listing()
        idx = self._read_index()
        stale = idx is None
        if idx is None:
            idx = INDEX_SCHEMA.empty_table()
        indexed = set(pc.unique(idx.column("shard")).to_pylist())
        if indexed - set(listed):  # removed by hand, or discarded: its rows are not there any more
            idx = idx.filter(pc.is_in(idx.column("shard"), pa.array(listed, _STR)))
            stale = True
        extras = []
        for name in (n for n in listed if n not in indexed):
            problem = self.check_shard(name)
            if problem is None:
                extras.append(name)
            elif repair:
                self.discard_shard(name, problem)
        return idx, extras, stale

    def compact(self) -> int:
        """Fold the ``images.parquet`` rows of every committed shard not yet indexed into ``_work/commits.parquet``
        (one atomic write: a crash leaves the previous index, which is still right), checking each first (damaged
        ones are discarded). Returns how many shards were added. Driver only, holding the lock."""
        idx, extras, stale = self._committed(repair=True)
        if not extras and not stale:
            return 0
        tables = [idx, *(self._read_images(n) for n in extras)]
        write_parquet_atomic(pa.concat_tables(tables), self.index_path)
        return len(extras)

    def done_keys(self) -> set[tuple[str, str | None]]:
        """``(image_id, sha256)`` of every committed image: a resumed run skips an image only if its file still
        has the same content. Reads the index and the shards committed since it was written (compacting them
        first when there are more than :data:`COMPACT_AFTER`); a damaged one among those is discarded."""
        if not self.commits.is_dir():
            return set()
        idx, extras, _ = self._committed(repair=True)
        if len(extras) > COMPACT_AFTER:
            self.compact()
            idx, extras, _ = self._committed(repair=True)
        keys = set(zip(idx.column("image_id").to_pylist(), idx.column("sha256").to_pylist()))
        for name in extras:
            t = pq.read_table(self.commits / name / "images.parquet", columns=["image_id", "sha256"])
            keys.update(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))
        return keys

    def verify_commits(self) -> list[str]:
        """Check every committed shard against its ``_SUCCESS`` (file sizes; ``images.parquet`` also by sha256),
        discard the damaged ones and compact the rest into the index. Returns the discarded names. One stat per
        file of every shard: run once before finalising (which reads every shard anyway), not on every resume."""
        bad = []
        for name in self._listing():
            problem = self.check_shard(name)
            if problem is not None:
                self.discard_shard(name, problem)
                bad.append(name)
        self.compact()
        return bad

    def committed_images(self, wanted: dict[str, str | None] | None = None) -> tuple[pa.Table, int]:
        """One row per kept committed image (INDEX_SCHEMA: outcome + shard), sorted by image id, and the number of
        image commits dropped.

        Args:
            wanted: ``{image_id: sha256}`` of the current input; commits of other ids, or of an older content of
                the same id (the file changed), are dropped. None keeps every id.
        An image committed in two shards is kept from the first shard by name only, so every image contributes
        its rows exactly once. Reads the index and shards not yet in it; writes nothing.
        """
        idx, extras, _ = self._committed(repair=False)
        t = pa.concat_tables([idx, *(self._read_images(n) for n in extras)])
        if t.num_rows == 0:
            return INDEX_SCHEMA.empty_table(), 0
        n = t.num_rows
        if wanted is not None:  # first the content: an old commit of an edited file must not hide the new one
            w_ids = pa.array(list(wanted), _STR)
            w_sha = pa.array(list(wanted.values()), _STR)
            pos = pc.index_in(t.column("image_id"), value_set=w_ids)
            same = pc.equal(pc.take(w_sha, pos), t.column("sha256"))
            t = t.filter(pc.fill_null(pc.and_(pc.is_valid(pos), same), False))
        if t.num_rows:  # then one commit per image: the first shard by name
            t = t.sort_by([("image_id", "ascending"), ("shard", "ascending")])
            ids = t.column("image_id")
            t = t.filter(pa.chunked_array([pa.array([True]),
                                           pc.not_equal(ids.slice(1), ids.slice(0, t.num_rows - 1))]))
        return t, n - t.num_rows

    def _read_shard_file(self, name: str, fname: str, columns: list[str] | None, verify: bool) -> pa.Table:
        path = self.commits / name / fname
        manifest = self._manifest(name)
        if verify and manifest is not None:
            data = path.read_bytes()  # read once: hashed, then parsed from memory
            if _sha256(data) != manifest["files"][fname]["sha256"]:
                self.discard_shard(name, f"{fname} differs from what was committed (sha256)")
                raise DamagedShardError(
                    f"committed shard {name} of {self.root} changed after it was verified ({fname}); it was moved "
                    f"to {self.damaged}: rerun the same command to redo its images")
            return pq.read_table(pa.BufferReader(data), columns=columns)
        return pq.read_table(path, columns=columns)

    def iter_committed(self, kind: str, images: pa.Table, columns: list[str] | None = None,
                       verify: bool = False) -> Iterator[pa.Table]:
        """Stream the ``kind`` rows (``accepted`` or ``rejected``) of ``images`` (from :meth:`committed_images`)
        in (image id, candidate index) order, as tables that each hold whole images.

        A shard is read when the position reaches its first kept image and dropped after its last, so memory is
        the shards whose id ranges overlap the position (one or two in a run: a batch is a run of consecutive
        ids). ``columns``: read only these (``image_id`` and ``candidate_index`` are always read). ``verify``:
        check each file's sha256 against ``_SUCCESS`` as it is read (raises :class:`DamagedShardError`).
        """
        schema = ACCEPTED_WORK_SCHEMA if kind == "accepted" else REJECTED_SCHEMA
        cols = None
        if columns is not None:
            cols = ["image_id", "candidate_index", *(c for c in columns if c not in ("image_id", "candidate_index"))]
        ids = images.column("image_id").to_pylist()
        shards = images.column("shard").to_pylist()
        last: dict[str, int] = {}
        members: dict[str, list[str]] = defaultdict(list)
        for i, (image_id, shard) in enumerate(zip(ids, shards)):
            last[shard] = i
            members[shard].append(image_id)
        open_: dict[str, list[Any]] = {}  # shard -> [rows sorted by (image id, candidate index), cursor, counts]
        i, n = 0, len(ids)
        while i < n:
            shard, j = shards[i], i
            while j + 1 < n and shards[j + 1] == shard:
                j += 1
            if shard not in open_:
                t = self._read_shard_file(shard, f"{kind}.parquet", cols, verify)
                t = t.filter(pc.is_in(t.column("image_id"), pa.array(members.pop(shard), _STR)))
                t = t.sort_by([("image_id", "ascending"), ("candidate_index", "ascending")])
                counts: dict[str, int] = defaultdict(int)
                for image_id in t.column("image_id").to_pylist():
                    counts[image_id] += 1
                open_[shard] = [t, 0, counts]
            t, cursor, counts = open_[shard]
            rows = sum(counts.get(ids[k], 0) for k in range(i, j + 1))
            if rows:
                out = t.slice(cursor, rows)
                yield out if cols is not None else _conform(out, schema)
            open_[shard][1] = cursor + rows
            if last[shard] == j:
                del open_[shard]
            i = j + 1

    def read_committed(self, wanted: dict[str, str | None] | None = None) -> tuple[pa.Table, pa.Table, pa.Table, int]:
        """All kept committed rows in memory: (accepted, rejected, images, n_image_commits_dropped), sorted by image
        id. For tests and small outputs only; finalising streams with :meth:`iter_committed` instead.

        Args:
            wanted: as in :meth:`committed_images`.
        """
        images, dropped = self.committed_images(wanted)

        def cat(kind: str, schema: pa.Schema) -> pa.Table:
            parts = list(self.iter_committed(kind, images))
            return pa.concat_tables(parts) if parts else schema.empty_table()

        return (cat("accepted", ACCEPTED_WORK_SCHEMA), cat("rejected", REJECTED_SCHEMA),
                images.select(IMAGES_SCHEMA.names), dropped)

    # ---------------------------------------------------------------------------------------------------------
    # The ingest cache
    # ---------------------------------------------------------------------------------------------------------
    def read_ingest_cache(self) -> list[pa.Table]:
        """The merged ingest cache and every part committed since (as stored; unreadable parts skipped: a part is
        written atomically, so only a filesystem that lost data makes one, and its files are decoded again)."""
        paths = [self.ingest_path] if self.ingest_path.exists() else []
        if self.ingest_parts.is_dir():
            paths += sorted(self.ingest_parts.glob("part-*.parquet"))
        out = []
        for p in paths:
            try:
                out.append(pq.read_table(p))
            except (OSError, pa.ArrowException):
                continue
        return out

    def write_ingest_part(self, tbl: pa.Table) -> Path:
        """Commit some ingest results at once (atomic), so a pass that dies keeps them."""
        path = self.ingest_parts / f"part-{tmp_suffix()}.parquet"
        write_parquet_atomic(tbl, path)
        return path

    def merge_ingest(self, tbl: pa.Table) -> None:
        """Replace the ingest cache with ``tbl`` (which holds every part's rows) and remove the parts. A crash
        between the two leaves parts whose rows are also in the cache: readers keep one row per key."""
        write_parquet_atomic(tbl, self.ingest_path)
        if self.ingest_parts.is_dir():
            for p in self.ingest_parts.glob("part-*.parquet"):
                p.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------------------------------------
    # Final tables
    # ---------------------------------------------------------------------------------------------------------
    def write_files(self, batches: Iterable[pa.Table], subdir: str, prefix: str, schema: pa.Schema,
                    file_rows: list[int]) -> list[str]:
        """Replace ``<root>/<subdir>/`` with ``<prefix>-NNNNN-of-MMMMM.parquet`` files holding the rows of
        ``batches`` in order, file ``k`` holding ``file_rows[k]`` rows. One file is open at a time (written to a
        unique temp name, fsynced, renamed); row groups are flushed every :data:`ROW_GROUP_BYTES`, so memory is
        one row group plus the batch being split.

        Returns the written paths relative to the root. Always writes at least one (possibly empty) file, so every
        table can be opened even when it has no rows. The files carry the ``huggingface`` schema metadata.

        Raises:
            ValueError: ``batches`` hold more or fewer rows than ``sum(file_rows)``.
        """
        file_rows = list(file_rows) or [0]
        out_dir = self.root / subdir
        n_files = len(file_rows)
        names = [f"{prefix}-{i:05d}-of-{n_files:05d}.parquet" for i in range(n_files)]
        if out_dir.exists():
            for old in out_dir.glob("*.parquet"):
                if old.name not in names:
                    old.unlink()
        meta_schema = schema.with_metadata(hf_schema_metadata(schema))
        it = iter(batches)
        pending: list[pa.Table | None] = [None]

        def next_rows(limit: int) -> pa.Table:
            while pending[0] is None or pending[0].num_rows == 0:
                try:
                    b = next(it)
                except StopIteration:
                    raise ValueError(f"{subdir}: fewer rows than the {sum(file_rows)} announced") from None
                pending[0] = b
            b = pending[0]
            if b.num_rows <= limit:
                pending[0] = None
                return b
            pending[0] = b.slice(limit)
            return b.slice(0, limit)

        def write_file(want: int) -> Callable[[Path], None]:
            def write(tmp: Path) -> None:
                with pq.ParquetWriter(tmp, meta_schema, compression="zstd") as w:
                    got, buf, size = 0, [], 0
                    while got < want:
                        part = next_rows(want - got)
                        got += part.num_rows
                        buf.append(part)
                        size += part.nbytes
                        if size >= ROW_GROUP_BYTES or sum(b.num_rows for b in buf) >= ROW_GROUP_ROWS:
                            w.write_table(pa.concat_tables(buf).cast(schema), row_group_size=ROW_GROUP_ROWS)
                            buf, size = [], 0
                    if buf:
                        w.write_table(pa.concat_tables(buf).cast(schema), row_group_size=ROW_GROUP_ROWS)
            return write

        for name, want in zip(names, file_rows):
            atomic_write(out_dir / name, write_file(want))
        while True:  # nothing may be left over
            try:
                extra = next(it)
            except StopIteration:
                break
            if extra.num_rows:
                raise ValueError(f"{subdir}: more rows than the {sum(file_rows)} announced")
        if pending[0] is not None and pending[0].num_rows:
            raise ValueError(f"{subdir}: more rows than the {sum(file_rows)} announced")
        return [f"{subdir}/{n}" for n in names]

    def write_table_files(self, tbl: pa.Table, subdir: str, prefix: str, rows_per_file: int) -> list[str]:
        """Replace ``<root>/<subdir>/`` with ``tbl`` split into ``<prefix>-NNNNN-of-MMMMM.parquet`` files of
        ``rows_per_file`` rows (see :meth:`write_files`). Returns the written paths relative to the root."""
        return self.write_files([tbl], subdir, prefix, tbl.schema, split_rows(tbl.num_rows, rows_per_file))


def split_rows(n: int, rows_per_file: int) -> list[int]:
    """File sizes for ``n`` rows in files of ``rows_per_file``: ``[rpf, ..., rest]`` (``[0]`` for no rows)."""
    if n == 0:
        return [0]
    return [rows_per_file] * (n // rows_per_file) + ([n % rows_per_file] if n % rows_per_file else [])


def image_aligned_files(rows_per_image: Iterable[int], rows_per_file: int) -> list[int]:
    """File sizes for images with these row counts (in order) such that no image is split across two files: a file
    is closed before an image that would take it past ``rows_per_file`` (an image with more rows gets a file of its
    own). ``[0]`` for no rows."""
    files: list[int] = []
    current = 0
    for k in rows_per_image:
        if k == 0:
            continue
        if current and current + k > rows_per_file:
            files.append(current)
            current = 0
        current += k
    if current or not files:
        files.append(current)
    return files
