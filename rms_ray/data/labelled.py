"""The labelled format: one schema for labelled multimodal safety data, read and written as JSONL or Parquet.

Every importer writes it, construction outputs convert to it, and the judge (``evaluate``, training) reads it.

Columns (``LABELLED_FIELDS``):

=============  ==========================================================================================
``id``         string, unique within a file
``image``      JSONL: a path relative to the file's folder (or absolute). Parquet: the Hugging Face
               ``datasets`` Image struct ``{bytes, path}`` (bytes embedded), a plain path string, or the
               encoded image as plain binary.
``query``      string, the user's text sent with the image (non-empty)
``response``   string or null: a model answer to (image, query); set for ``task == "response"`` rows
``label``      ``safe`` | ``unsafe``. Prompt task: is the image+query pair unsafe to answer naively.
               Response task: is this response to the pair unsafe.
``category``   string or null: the set's own risk category
``source``     string: which dataset the row comes from (e.g. ``mmsafeaware``)
``task``       ``prompt`` | ``response`` (default: ``response`` when a response is given, else ``prompt``)
=============  ==========================================================================================

Any other column is kept as it is and carried into predictions. Parquet files carry the ``huggingface`` schema
metadata, so ``datasets.load_dataset("parquet", data_files=...)`` decodes ``image`` as an ``Image`` feature;
pandas and pyarrow read them directly.

Errors that make a whole file unusable (missing required column, a label or task outside the vocabulary, a
duplicate id, no rows) raise :class:`LabelledFormatError` naming the file and row, before any engine starts.
Problems of one row that only show when its image is opened (missing, unreadable) become excluded rows with a
reason (see :func:`load_row_image`), so one bad image never stops a 100k-row evaluation.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from rms_ray.common.io import IMAGE_TYPE, atomic_write, hf_schema_metadata

LABELS = ("safe", "unsafe")
TASKS = ("prompt", "response")
REQUIRED = ("id", "image", "query", "label")
CORE = ("id", "image", "query", "response", "label", "category", "source", "task")
_STR = pa.string()
#: Core columns of a labelled Parquet file (``image`` with embedded bytes); extra columns follow these.
LABELLED_FIELDS = [("id", _STR), ("image", IMAGE_TYPE), ("query", _STR), ("response", _STR), ("label", _STR),
                   ("category", _STR), ("source", _STR), ("task", _STR)]
LABELLED_SCHEMA = pa.schema(LABELLED_FIELDS)
SUFFIXES = (".jsonl", ".parquet")


class LabelledFormatError(ValueError):
    """A labelled file that cannot be used as a whole; the message names the file and the first bad rows."""


def excluded_path(output: str | Path) -> Path:
    """Sibling file for rows an importer could not use: ``x/foo.parquet`` -> ``x/foo.excluded.jsonl``."""
    output = Path(output)
    return output.with_name(output.name.rsplit(".", 1)[0] + ".excluded.jsonl")


def default_task(row: dict[str, Any]) -> str:
    """``row["task"]`` if set, else ``response`` when the row has a response, else ``prompt``."""
    task = row.get("task")
    if task:
        return str(task)
    return "response" if row.get("response") not in (None, "") else "prompt"


def row_problem(row: dict[str, Any]) -> str | None:
    """Why ``row`` violates the format as a whole-file error (bad label/task, missing id), or None if fine.

    Empty queries and missing images are row-level problems and are not reported here.
    """
    if row.get("id") in (None, ""):
        return "missing id"
    if row.get("label") not in LABELS:
        return f"label {row.get('label')!r} is not one of {'/'.join(LABELS)}"
    task = default_task(row)
    if task not in TASKS:
        return f"task {task!r} is not one of {'/'.join(TASKS)}"
    if task == "response" and row.get("response") in (None, ""):
        return "task 'response' without a response"
    return None


def checked_row(row: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """``row`` normalised (:func:`normalize_row`), or :class:`LabelledFormatError` naming ``where`` (a file) and
    the row id when it breaks the format as a whole (:func:`row_problem`)."""
    row = normalize_row(row)
    problem = row_problem(row)
    if problem:
        raise LabelledFormatError(f"{where}: row id {row.get('id')!r}: {problem}")
    return row


def _image_path_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path")
    return None


def load_row_image(value: Any, base_dir: str | Path | None) -> tuple[bytes | None, str | None, str | None]:
    """The image bytes of a row's ``image`` value: a struct with bytes, or a path (relative to ``base_dir``).

    Returns ``(bytes, path, None)`` or ``(None, path, reason)``; never raises. Decoding is the caller's job.
    """
    if isinstance(value, dict) and value.get("bytes"):
        return bytes(value["bytes"]), value.get("path"), None
    if isinstance(value, (bytes, bytearray, memoryview)):  # a plain binary column holding the encoded image
        return (bytes(value), None, None) if len(value) else (None, None, "image is empty (0 bytes)")
    path = _image_path_of(value)
    if not path:
        return None, None, "no image"
    p = Path(path)
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None, path, f"image not found: {p}"
    except OSError as e:
        return None, path, f"image unreadable: {p}: {e.strerror or e}"
    if not data:
        return None, path, f"image is empty (0 bytes): {p}"
    return data, path, None


def _check_suffix(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise LabelledFormatError(f"{path}: a labelled file must end in {' or '.join(SUFFIXES)}")


def iter_rows(path: str | Path, *, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[list[dict]]:
    """Stream a labelled file in batches of row dicts (values as stored; ``image`` as a path or struct).

    Memory is bounded by ``batch_size`` rows. JSONL lines that are not JSON objects raise with the line number.

    Raises:
        FileNotFoundError: no such file. LabelledFormatError: wrong suffix or a broken JSONL line.
    """
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} not found")
    if path.suffix == ".parquet":
        pf = _parquet_file(path)
        cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
        for rb in pf.iter_batches(batch_size=batch_size, columns=cols):
            yield rb.to_pylist()
        return
    batch: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for n, line in _numbered_lines(path, f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LabelledFormatError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise LabelledFormatError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            batch.append({k: row.get(k) for k in columns} if columns else row)
            if len(batch) >= batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def _parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:  # not Parquet at all, truncated, ...
        raise LabelledFormatError(f"{path}: not a readable Parquet file ({e})") from None


def _numbered_lines(path: Path, f: Any) -> Iterator[tuple[int, str]]:
    """``enumerate(f, 1)`` of a text file, with a file that is not UTF-8 named instead of a bare decode error."""
    n = 0
    try:
        for n, line in enumerate(f, 1):
            yield n, line
    except UnicodeDecodeError as e:
        raise LabelledFormatError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at or after line "
                                  f"{n + 1}); save it as UTF-8") from None


def file_columns(path: str | Path) -> list[str]:
    """Column names of a labelled file (Parquet: from the schema; JSONL: union over all lines)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return list(_parquet_file(path).schema_arrow.names)
    names: dict[str, None] = {}
    for batch in iter_rows(path):
        for row in batch:
            names.update(dict.fromkeys(row))
    return list(names)


@dataclass
class LabelledSummary:
    """What :func:`scan` found: row counts by task and label, and the file's columns."""

    path: str
    rows: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> label -> n
    columns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "counts": self.counts, "columns": self.columns}


def scan(path: str | Path, *, max_errors: int = 5) -> LabelledSummary:
    """Validate a labelled file as a whole and count its rows, streaming (image bytes are not read).

    Raises:
        FileNotFoundError: no such file.
        LabelledFormatError: wrong suffix, a required column missing, no rows, duplicate ids, or rows with a label
            or task outside the vocabulary (the first ``max_errors`` named by row number and id).
    """
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} not found")
    cols = file_columns(path)
    if not cols:  # a JSONL file with no rows has no columns either: say what is really wrong
        raise LabelledFormatError(f"{path}: no rows (an empty split cannot be evaluated)")
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise LabelledFormatError(f"{path}: missing required column(s) {', '.join(missing)} (has: {', '.join(cols)})")
    summary = LabelledSummary(str(path), columns=cols)
    errors: list[str] = []
    n_bad = 0
    seen: set[str] = set()
    n = 0
    wanted = [c for c in ("id", "label", "task", "response") if c in cols]
    for batch in iter_rows(path, columns=wanted):
        for row in batch:
            n += 1
            problem = row_problem(row)
            rid = row.get("id")
            if problem is None and str(rid) in seen:
                problem = f"duplicate id {rid!r}"
            seen.add(str(rid))
            if problem:
                n_bad += 1
                if len(errors) < max_errors:
                    errors.append(f"row {n} (id {rid!r}): {problem}")
                continue
            by_label = summary.counts.setdefault(default_task(row), {lbl: 0 for lbl in LABELS})
            by_label[row["label"]] += 1
    summary.rows = n
    if errors:  # one line (the CLI prints it as one `error:` line): the first rows, then how many more
        more = f" (and {n_bad - len(errors)} more bad rows)" if n_bad > len(errors) else ""
        raise LabelledFormatError(f"{path}: " + "; ".join(errors) + more)
    if n == 0:
        raise LabelledFormatError(f"{path}: no rows (an empty split cannot be evaluated)")
    return summary


def normalize_row(row: dict[str, Any], *, source: str | None = None) -> dict[str, Any]:
    """Fill defaults of the optional core columns (``task``, ``source``, nulls); extra keys are kept."""
    out = dict(row)
    out["id"] = str(out["id"])
    for k in ("response", "category", "source"):
        out.setdefault(k, None)
    if out.get("source") is None and source is not None:
        out["source"] = source
    if out.get("category") is not None:
        out["category"] = str(out["category"])
    out["task"] = default_task(out)
    return out


class LabelledWriter:
    """Stream rows into a labelled JSONL or Parquet file (chosen by suffix), committed atomically on close.

    JSONL: ``image`` is written as a path relative to the output's folder (rows give an absolute path, or a
    path relative to ``image_base``). Parquet: image bytes are embedded (read from the path when the row gives
    none), so the file is self-contained; the original path is kept in ``image.path``.

    Use as a context manager; on an exception nothing is written. Extra columns must keep one type per file: a
    Parquet file fixes each extra column's type at its first row group (from ``extra_types`` if given, else from
    the values of that group), and a later value that the type cannot hold as it is (``2.5`` in an integer
    column, a dict with other keys, a string in a number column) is refused with the column and row named, never
    converted silently.

    Raises:
        LabelledFormatError: a row violates :func:`row_problem`, has no usable image (check first with
            :func:`load_row_image` and exclude such rows with a reason), or an extra column changes type.
    """

    def __init__(self, path: str | Path, *, image_base: str | Path | None = None, rows_per_group: int = 512,
                 extra_types: dict[str, pa.DataType] | None = None) -> None:
        self.path = Path(path)
        _check_suffix(self.path)
        self.image_base = Path(image_base) if image_base is not None else None
        self.rows_per_group = rows_per_group
        self.extra_types = dict(extra_types or {})
        self.counts: dict[str, dict[str, int]] = {}
        self.rows = 0
        self._buf: list[dict] = []
        self._tmp: Path | None = None
        self._writer: Any = None
        self._fh: Any = None
        self._schema: pa.Schema | None = None

    def __enter__(self) -> "LabelledWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
        if self.path.suffix == ".jsonl":
            self._fh = self._tmp.open("w", encoding="utf-8")
        return self

    def write(self, row: dict[str, Any]) -> None:
        """Add one row (see the class docstring for ``image``)."""
        row = checked_row(row, self.path)
        data, ipath, err = load_row_image(row.get("image"), self.image_base)
        if err:
            raise LabelledFormatError(f"{self.path}: row id {row['id']!r}: {err}")
        if self.path.suffix == ".jsonl":
            abs_path = Path(ipath) if Path(ipath).is_absolute() else (self.image_base or Path.cwd()) / ipath
            row["image"] = os.path.relpath(abs_path.resolve(), self.path.parent.resolve())
            self._fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        else:
            row["image"] = {"bytes": data, "path": ipath}
            self._buf.append(row)
            if len(self._buf) >= self.rows_per_group:
                self._flush()
        self.rows += 1
        by_label = self.counts.setdefault(row["task"], {lbl: 0 for lbl in LABELS})
        by_label[row["label"]] += 1

    def write_all(self, rows: Iterable[dict[str, Any]]) -> None:
        for r in rows:
            self.write(r)

    def _type_error(self, name: str, target: pa.DataType | None, why: str) -> LabelledFormatError:
        """The error for an extra column whose values do not fit one type, naming the first row that breaks it."""
        first = None
        for r in self._buf:
            v = r.get(name)
            if v is None:
                continue
            if target is None:  # first group: the first non-null value sets the expected type
                target = _arrow_type(v)
                first = r
                continue
            if not _fits(v, target):
                what = (f"column {name!r} holds {type(v).__name__} {_short(v)}, but "
                        + (f"row id {first.get('id')!r} made it {target}" if first is not None
                           else f"the first {self.rows_per_group} rows fixed it as {target}"))
                return LabelledFormatError(f"{self.path}: row id {r.get('id')!r}: {what}; give an extra column "
                                           "one type per file (e.g. write its values as strings)")
        return LabelledFormatError(f"{self.path}: extra column {name!r}: {why}")

    def _flush(self) -> None:
        if not self._buf:
            return
        if self._schema is None:
            extras = [k for k in dict.fromkeys(k for r in self._buf for k in r) if k not in CORE]
            extras += [k for k in self.extra_types if k not in extras and k not in CORE]
            fields = list(LABELLED_FIELDS)
            for k in extras:
                if k in self.extra_types:
                    fields.append((k, self.extra_types[k]))
                    continue
                try:
                    t = pa.array([r.get(k) for r in self._buf]).type
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
                    raise self._type_error(k, None, str(e)) from None
                fields.append((k, pa.string() if pa.types.is_null(t) else t))
            base = pa.schema(fields)
            self._schema = base.with_metadata(hf_schema_metadata(base))
            self._writer = pq.ParquetWriter(self._tmp, self._schema, compression="zstd")
        core = {name for name, _ in LABELLED_FIELDS}
        known = set(self._schema.names)
        for r in self._buf:  # a column first seen after the schema was fixed would be dropped without a word
            late = [k for k, v in r.items() if k not in known and v is not None]
            if late:
                raise LabelledFormatError(
                    f"{self.path}: row id {r.get('id')!r}: column(s) {', '.join(map(repr, late))} first appear after "
                    f"the first {self.rows_per_group} rows, when the Parquet schema is already fixed; give every row "
                    "every column (null where absent) or pass extra_types")
        columns = []
        for f in self._schema:
            values = [r.get(f.name) for r in self._buf]
            if f.name in core:
                columns.append(pa.array(values, type=f.type))
                continue
            # pyarrow converts a value into a fixed type silently where it can (2.5 -> 2 in int64, a dict's
            # unknown keys dropped from a struct): keep a column only if every value comes back as it was.
            try:
                arr = pa.array(values, type=f.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
                raise self._type_error(f.name, f.type, str(e)) from None
            if not _same(arr.to_pylist(), values):
                raise self._type_error(f.name, f.type, f"values do not fit its type {f.type}")
            columns.append(arr)
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self._schema))
        self._buf = []

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                return
            if self.path.suffix == ".jsonl":
                self._fh.close()
                self._fh = None
                atomic_write(self.path, lambda t: os.replace(self._tmp, t))
                return
            self._flush()
            if self._writer is None:  # zero rows: still a valid, empty file
                self._schema = LABELLED_SCHEMA.with_metadata(hf_schema_metadata(LABELLED_SCHEMA))
                self._writer = pq.ParquetWriter(self._tmp, self._schema, compression="zstd")
            self._writer.close()
            self._writer = None
            atomic_write(self.path, lambda t: os.replace(self._tmp, t))
        finally:
            if self._fh is not None:
                self._fh.close()
            if self._writer is not None:
                self._writer.close()
            if self._tmp is not None and self._tmp.exists():
                self._tmp.unlink()


def _arrow_type(value: Any) -> pa.DataType | None:
    try:
        return pa.array([value]).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None


def _fits(value: Any, target: pa.DataType) -> bool:
    """Whether ``value`` goes into a column of type ``target`` unchanged."""
    try:
        return _same(pa.array([value], type=target).to_pylist()[0], value)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return False


def _same(a: Any, b: Any) -> bool:
    """``a`` (read back from Arrow) equals ``b`` (as given): dict keys that Arrow filled with null do not count;
    an int read back as the same float is the same value; a bool is never the same as a number."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = {k for k, v in a.items() if v is not None}
        return keys == {k for k, v in b.items() if v is not None} and all(_same(a[k], b[k]) for k in keys)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float))) if a == b else False


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def write_excluded(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write excluded rows (each with a ``reason``) as JSONL, atomically. Returns how many."""
    rows = list(rows)
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))
    return len(rows)
