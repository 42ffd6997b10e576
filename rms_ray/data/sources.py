"""Input listing: a folder, a glob, or a Parquet/JSONL listing of images, local or on a pyarrow filesystem.

Every input gets a stable ``image_id`` derived from its path relative to the input root (or from the listing's
``id`` column), so moving the root folder keeps ids, and a resumed run recognises what it already finished. Size
and modification time are kept too: a resumed run re-reads a file whose size or mtime changed (see
:mod:`rms_ray.construct.pipeline`), so an edited photo under the same name is not mistaken for finished work.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs
import pyarrow.parquet as pq

LISTING_COLUMNS = ("image", "image_path", "path", "file")
LISTING_SUFFIXES = (".parquet", ".jsonl")


@dataclass(frozen=True)
class ImageSource:
    """One input image: ``uri`` is what :func:`read_bytes` opens; ``rel_path`` is the id-bearing display path.

    ``size`` (bytes) and ``mtime_ns`` come from the filesystem listing; None when the file does not exist.
    """

    image_id: str
    uri: str
    rel_path: str
    size: int | None = field(default=None, compare=False)
    mtime_ns: int | None = field(default=None, compare=False)


def make_image_id(key: str) -> str:
    """``img_`` + 16 hex chars of sha256(``key``): stable, filesystem-safe, order-independent."""
    return "img_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _fs(spec: str) -> tuple[pafs.FileSystem, str]:
    if "://" in spec:
        return pafs.FileSystem.from_uri(spec)
    return pafs.LocalFileSystem(), str(Path(spec).expanduser().resolve())


def _uri(spec: str, path: str) -> str:
    return f"{spec.split('://', 1)[0]}://{path}" if "://" in spec else path


def _read_listing(spec: str, fs: pafs.FileSystem, path: str) -> list[tuple[str, str]]:
    """(path as listed, id key) pairs from a .parquet / .jsonl listing.

    Raises:
        ValueError: a malformed line (with its number), no path column, a row without a path.
    """
    if path.lower().endswith(".parquet"):
        rows = pq.read_table(path, filesystem=fs).to_pylist()
    else:
        with fs.open_input_stream(path) as f:
            lines = f.read().decode().splitlines()
        rows = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"listing {spec}, line {n}: not valid JSON ({e})") from None
    if not rows:
        return []
    col = next((c for c in LISTING_COLUMNS if c in rows[0]), None)
    if col is None:
        raise ValueError(f"listing {spec} has none of the columns {LISTING_COLUMNS}; found {sorted(rows[0])}")
    out = []
    for n, r in enumerate(rows, 1):
        listed = r.get(col)
        if listed in (None, ""):
            raise ValueError(f"listing {spec}, row {n}: no {col!r} value")
        rid = r.get("id")
        out.append((str(listed), str(rid) if rid not in (None, "") else str(listed)))
    return out


def list_images(spec: str, extensions: tuple[str, ...], exclude: str | None = None) -> tuple[list[ImageSource], int]:
    """Expand ``spec`` into image sources, sorted by ``image_id``.

    Args:
        spec: a folder (recursive, filtered by ``extensions``, case-insensitive), a glob (``*``/``?``/``[``, with
            ``fnmatch`` semantics: case-sensitive, and ``*`` also matches ``/``, so ``dir/*.jpg`` is recursive;
            also filtered by ``extensions``), or a ``.parquet``/``.jsonl`` listing with an
            ``image``/``image_path``/``path``/``file`` column (relative paths resolve against the listing's folder)
            and an optional ``id`` column. ``s3://``/``gs://``/``file://`` URIs go through ``pyarrow.fs``.
        extensions: lower-case suffixes with the dot, e.g. ``(".jpg", ".png")``.
        exclude: a folder (as :func:`_fs` resolves it) whose files are never listed, e.g. the run's own output.
    Returns:
        ``(sources, n_repeated)``: unique sources, and how many listed entries repeated an earlier one exactly.
    Raises:
        FileNotFoundError: ``spec`` does not exist. ValueError: a malformed listing, or one id given to two paths.
    """
    fs, path = _fs(spec)
    entries: list[tuple[str, str, str]] = []  # (path on fs, rel_path, id key)
    infos: dict[str, pafs.FileInfo] = {}

    def walk(root: str, keep) -> None:
        for fi in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            if fi.type == pafs.FileType.File and PurePosixPath(fi.path).suffix.lower() in extensions and keep(fi.path):
                rel = str(PurePosixPath(fi.path).relative_to(root))
                entries.append((fi.path, rel, rel))
                infos[fi.path] = fi

    if path.lower().endswith(LISTING_SUFFIXES):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input listing {spec} does not exist")
        base = str(PurePosixPath(path).parent)
        for listed, key in _read_listing(spec, fs, path):
            full = listed if listed.startswith("/") or "://" in listed else f"{base}/{listed}"
            entries.append((full.split("://", 1)[-1] if "://" in full else full, listed, key))
        infos = {fi.path: fi for fi in fs.get_file_info(sorted({e[0] for e in entries}))}
    elif any(ch in path for ch in "*?["):
        root = path
        while any(ch in root for ch in "*?["):
            root = str(PurePosixPath(root).parent)
        walk(root, lambda p: fnmatch.fnmatch(p, path))
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input {spec} does not exist")
        if info.type == pafs.FileType.File:
            name = PurePosixPath(path).name
            entries.append((path, name, name))
            infos[path] = info
        else:
            walk(path, lambda p: True)
    if exclude:
        entries = [e for e in entries if not e[0].startswith(exclude.rstrip("/") + "/")]

    seen: dict[str, ImageSource] = {}
    conflicts: list[str] = []
    for fpath, rel, key in entries:
        fi = infos.get(fpath)
        found = fi is not None and fi.type == pafs.FileType.File
        src = ImageSource(make_image_id(key), _uri(spec, fpath), rel, fi.size if found else None,
                          fi.mtime_ns if found else None)
        prev = seen.setdefault(src.image_id, src)
        if prev.uri != src.uri:
            conflicts.append(f"{key!r}: {prev.rel_path} and {rel}")
    if conflicts:
        raise ValueError(f"input {spec}: one id names two different files ({len(conflicts)}): "
                         + "; ".join(conflicts[:5]))
    return sorted(seen.values(), key=lambda s: s.image_id), len(entries) - len(seen)


def read_bytes(uri: str) -> bytes:
    """All bytes of ``uri`` (local path or pyarrow-filesystem URI). Raises OSError on unreadable files."""
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read()
