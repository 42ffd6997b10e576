"""Input listing: a folder, a glob, or a Parquet/JSONL listing of images, local or on a pyarrow filesystem.

Every input gets a stable ``image_id`` derived from its path relative to the input root (or from the listing's
``id`` column), so moving the root folder keeps ids, and a resumed run recognises what it already finished.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs
import pyarrow.parquet as pq

LISTING_COLUMNS = ("image", "image_path", "path", "file")


@dataclass(frozen=True)
class ImageSource:
    """One input image: ``uri`` is what :func:`read_bytes` opens; ``rel_path`` is the id-bearing display path."""

    image_id: str
    uri: str
    rel_path: str


def make_image_id(key: str) -> str:
    """``img_`` + 16 hex chars of sha256(``key``): stable, filesystem-safe, order-independent."""
    return "img_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _fs(spec: str) -> tuple[pafs.FileSystem, str]:
    if "://" in spec:
        return pafs.FileSystem.from_uri(spec)
    return pafs.LocalFileSystem(), str(Path(spec).expanduser().resolve())


def _uri(spec: str, path: str) -> str:
    return f"{spec.split('://', 1)[0]}://{path}" if "://" in spec else path


def _read_listing(spec: str) -> list[tuple[str, str]]:
    """(path as listed, id key) pairs from a .parquet / .jsonl listing."""
    fs, path = _fs(spec)
    if path.endswith(".parquet"):
        rows = pq.read_table(path, filesystem=fs).to_pylist()
    else:
        with fs.open_input_stream(path) as f:
            rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    if not rows:
        return []
    col = next((c for c in LISTING_COLUMNS if c in rows[0]), None)
    if col is None:
        raise ValueError(f"listing {spec} has none of the columns {LISTING_COLUMNS}; found {sorted(rows[0])}")
    return [(str(r[col]), str(r.get("id") or r[col])) for r in rows]


def list_images(spec: str, extensions: tuple[str, ...]) -> tuple[list[ImageSource], int]:
    """Expand ``spec`` into image sources, sorted by ``image_id``.

    Args:
        spec: a folder (recursive, filtered by ``extensions``, case-insensitive), a glob (``*``/``?``/``[``, with
            ``fnmatch`` semantics: case-sensitive, and ``*`` also matches ``/``, so ``dir/*.jpg`` is recursive), or a
            ``.parquet``/``.jsonl`` listing with an ``image``/``image_path``/``path``/``file`` column (relative
            paths resolve against the listing's folder) and an optional ``id`` column. ``s3://``/``gs://``/...
            URIs go through ``pyarrow.fs``.
        extensions: lower-case suffixes with the dot, e.g. ``(".jpg", ".png")``.
    Returns:
        ``(sources, n_repeated)``: unique sources, and how many listed entries repeated an earlier one.
    Raises:
        FileNotFoundError: ``spec`` does not exist. ValueError: a listing without a path column.
    """
    fs, path = _fs(spec)
    entries: list[tuple[str, str, str]] = []  # (uri, rel_path, id key)
    if path.endswith((".parquet", ".jsonl")):
        base = str(PurePosixPath(path).parent)
        for listed, key in _read_listing(spec):
            full = listed if ("://" in listed or listed.startswith("/")) else f"{base}/{listed}"
            uri = full if "://" in full else _uri(spec, full)
            entries.append((uri, listed, key))
    elif any(ch in path for ch in "*?["):
        root = path
        while any(ch in root for ch in "*?["):
            root = str(PurePosixPath(root).parent)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        for info in infos:
            if info.type == pafs.FileType.File and fnmatch.fnmatch(info.path, path):
                rel = str(PurePosixPath(info.path).relative_to(root))
                entries.append((_uri(spec, info.path), rel, rel))
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input {spec} does not exist")
        if info.type == pafs.FileType.File:
            entries.append((_uri(spec, path), PurePosixPath(path).name, PurePosixPath(path).name))
        else:
            for fi in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
                if fi.type == pafs.FileType.File and PurePosixPath(fi.path).suffix.lower() in extensions:
                    rel = str(PurePosixPath(fi.path).relative_to(path))
                    entries.append((_uri(spec, fi.path), rel, rel))
    seen: dict[str, ImageSource] = {}
    for uri, rel, key in entries:
        src = ImageSource(make_image_id(key), uri, rel)
        seen.setdefault(src.image_id, src)
    return sorted(seen.values(), key=lambda s: s.image_id), len(entries) - len(seen)


def read_bytes(uri: str) -> bytes:
    """All bytes of ``uri`` (local path or pyarrow-filesystem URI). Raises OSError on unreadable files."""
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read()
