"""The one atomic writer: every file rms_ray produces (Parquet tables, JSON, Markdown, plots) lands through here.

Writes go to a unique temp name in the target folder, are fsynced, then renamed over the target (atomic on POSIX
filesystems), so a reader or a resumed run never sees a half-written file and two processes never share a temp
name.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def tmp_suffix() -> str:
    """``<pid>-<12 random hex>``: part of every temp name, so two processes (or two threads of one) never share
    one, even on a filesystem that many machines share (pids repeat across machines, the random part does not)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def fsync_dir(path: str | Path) -> None:
    """fsync a folder, so that a rename or a new entry in it survives a machine crash (a file's own fsync does not
    cover its name). Filesystems that cannot fsync a folder (EINVAL on some network filesystems) are left as they
    are: there is nothing more a writer can do there."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, fsync the result, rename it to ``path`` (parents created) and fsync the folder.

    Raises:
        OSError: the folder is not writable or the disk is full (the temp file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself must reach the disk too
    return path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (bounded memory for any size)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (non-JSON values through ``str``)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


#: The Hugging Face ``datasets`` Image layout: a column of this type named ``image`` loads as an ``Image`` feature.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# `datasets.load_dataset("parquet", ...)` reads this key and decodes `image` as an Image feature.
_HF_FEATURES = {"image": {"_type": "Image"}}


def hf_schema_metadata(schema: pa.Schema) -> dict[bytes, bytes]:
    """The ``huggingface`` schema metadata for ``schema`` (``image`` as an Image feature), merged with its own."""
    meta = {b"huggingface": json.dumps({"info": {"features": _full_features(schema)}}).encode()}
    return {**(schema.metadata or {}), **meta}


def table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts; missing keys become null, extra keys are an error) -> a table with exactly ``schema``.

    Raises:
        ValueError: a row has a key that is not a column of ``schema``.
    """
    rows = list(rows)
    names = set(schema.names)
    for r in rows:
        extra = set(r) - names
        if extra:
            raise ValueError(f"columns not in schema: {sorted(extra)}")
    return pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in rows], schema=schema)


def write_parquet_atomic(tbl: pa.Table, path: Path, hf_features: bool = False) -> None:
    """Write ``tbl`` to ``path`` via a temp file + rename, so readers never see a half-written file.

    ``hf_features`` adds the ``huggingface`` schema metadata that `datasets` reads, so ``image`` loads as an
    ``Image`` feature with ``load_dataset("parquet", ...)``.
    """
    if hf_features:
        tbl = tbl.replace_schema_metadata(hf_schema_metadata(tbl.schema))
    atomic_write(path, lambda tmp: pq.write_table(tbl, tmp, compression="zstd"))


def _hf_dtype(t: pa.DataType) -> str:
    if pa.types.is_string(t):
        return "string"
    if pa.types.is_int32(t):
        return "int32"
    if pa.types.is_int64(t):
        return "int64"
    if pa.types.is_float32(t):
        return "float32"
    if pa.types.is_float64(t):
        return "float64"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_binary(t):
        return "binary"
    raise TypeError(f"no datasets dtype for {t}")


def _full_features(schema: pa.Schema) -> dict[str, Any]:
    def feat(t: pa.DataType) -> Any:
        if pa.types.is_list(t):
            return {"_type": "List", "feature": feat(t.value_type)}
        if pa.types.is_struct(t):
            return {f.name: feat(f.type) for f in t}
        return {"_type": "Value", "dtype": _hf_dtype(t)}

    out = {f.name: feat(f.type) for f in schema}
    out.update({k: v for k, v in _HF_FEATURES.items() if k in schema.names})
    return out


