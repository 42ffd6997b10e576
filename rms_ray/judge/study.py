"""Measuring a safety dataset the paper's way: train a judge on it with a fixed recipe, score that judge on *other*
safety datasets (``compare-datasets``), and see how the score grows with the dataset's size (``scale-study``).

The paper (arXiv 2509.04403, abstract) proposes "a standardized safety dataset evaluation metric: fine-tuning a
safety judge model and evaluating its capabilities on other safety datasets". Its details are not public; the
choices here, all documented in the README ("Compare datasets"):

* **Same recipe, same budget.** Every training run uses the same judge profile (model, LoRA/full, optimiser,
  schedule) and sees the same number of training examples (``train.examples_seen`` of the profile): a small
  dataset is repeated over more epochs, a large one is not exhausted. Differences between rows of the matrix are
  then differences of data, not of compute.
* **The cell metric.** On an eval set with both labels: F1 (unsafe = positive) at the profile's threshold, with
  its bootstrap interval, and AUPRC. On a one-class set (e.g. only unsafe prompts, as FigStep): F1 and AUPRC are
  undefined, so the cell is recall of the present class (recall of unsafe, or specificity when all are safe), with
  a Wilson interval (:func:`scipy.stats.binomtest`). ``primary`` is that F1 or recall.
* **Quality score** of a training set = the mean ``primary`` over the eval sets that are not its own. An eval set is
  its own when it is the same file, or shares a ``source`` value (the labelled format's dataset-of-origin column,
  set by every importer and by construct) with it: its own test split says how well a judge fits that dataset,
  not how well the dataset teaches safety in general. Ranking = quality score, best first. The untrained base
  judge is a row too (the floor a dataset must beat).
* **Scale study.** Nested subsets (a seeded permutation of the training rows; each size takes its first ``n``
  rows, so each size contains the smaller ones of the same seed), one training run per (size, seed) with the same
  budget, and the mean +- standard deviation over seeds of the quality score and of each eval cell.

Workers write, the driver coordinates: each training run writes its own judge folder (:func:`rms_ray.judge.train.
run_train`), each evaluation its own ``metrics.json`` (:func:`rms_ray.judge.evaluate.run_evaluate`); this module
reads only those small JSON files. A rerun into the same output folder skips every judge and evaluation already
finished (training resumes from its checkpoint where it was cut).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rms_ray.common.io import write_json_atomic, write_text_atomic
from rms_ray.judge.report import serialised
from rms_ray.judge.config import JudgeConfig

logger = logging.getLogger("rms_ray")

BASE = "base"  # the row of the untrained judge


class StudyError(ValueError):
    """Bad arguments of ``compare-datasets`` / ``scale-study`` (raised before any training starts)."""


@dataclass(frozen=True)
class Named:
    """A dataset given on the command line: its unique display name, path and ``source`` values."""

    name: str
    path: Path
    sources: frozenset[str]


def _sources(p: Path) -> frozenset[str]:
    """Distinct values of the ``source`` column (streamed; construct output folders are one source: ``rms``)."""
    from rms_ray.data.labelled import iter_rows

    if p.is_dir():
        return frozenset({"rms"})
    out: set[str] = set()
    try:
        for batch in iter_rows(p, columns=["source"]):
            out.update(str(r["source"]) for r in batch if r.get("source"))
    except (ValueError, KeyError):  # no source column: only "the same file" makes it its own
        return frozenset()
    return frozenset(out)


def name_datasets(specs: list[str], what: str) -> list[Named]:
    """Resolve dataset arguments to unique names with evaluate's one rule
    (:func:`rms_ray.judge.evaluate.name_dataset_specs`: ``NAME=PATH`` names a set, else the file stem / folder
    name, ``-2``, ``-3`` for repeats), plus each set's ``source`` values.

    Raises:
        StudyError: no datasets, a missing path, a bad or repeated NAME, or the same path given twice.
    """
    from rms_ray.judge.evaluate import EvaluateError, name_dataset_specs

    if not specs:
        raise StudyError(f"no {what} datasets given")
    try:
        named = name_dataset_specs(specs, reserved=(BASE,))
    except EvaluateError as e:
        raise StudyError(f"{what} {e}") from None
    return [Named(name, p.resolve(), _sources(p)) for name, p, _ in named]


def own_eval_sets(train: Named, evals: list[Named]) -> list[str]:
    """Names of the eval sets that are ``train``'s own (same file, or a shared ``source``; module docstring)."""
    return [e.name for e in evals if e.path == train.path or (train.sources & e.sources)]


# -- the cell metric ---------------------------------------------------------------------------------------------
def wilson_interval(k: int, n: int, level: float = 0.95) -> list[float] | None:
    """Wilson score interval of a proportion k/n (:meth:`scipy.stats.binomtest(...).proportion_ci`); None if n=0."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def cell(m: dict[str, Any]) -> dict[str, Any]:
    """One matrix cell from an ``evaluate`` overall metrics dict (:func:`rms_ray.judge.metrics.binary_metrics`).

    Returns ``{"primary", "primary_name", "primary_ci", "f1", "f1_ci", "auprc", "auprc_ci", "recall",
    "specificity", "n", "n_parsed"}``; ``primary`` is F1 on a two-class set, else recall of the class present
    (``primary_name`` says which) with a Wilson interval; None when no row was parsed.
    """
    n_safe, n_unsafe = m.get("n_safe") or 0, m.get("n_unsafe") or 0
    out = {k: m.get(k) for k in ("f1", "f1_ci", "auprc", "auprc_ci", "recall", "specificity", "n", "n_parsed")}
    if n_safe and n_unsafe:
        out.update(primary=m.get("f1"), primary_name="f1", primary_ci=m.get("f1_ci"))
    elif n_unsafe:
        tp, fn = m.get("tp") or 0, m.get("fn") or 0
        out.update(primary=m.get("recall"), primary_name="recall", primary_ci=wilson_interval(tp, tp + fn))
    else:
        tn, fp = m.get("tn") or 0, m.get("fp") or 0
        out.update(primary=m.get("specificity"), primary_name="specificity", primary_ci=wilson_interval(tn, tn + fp))
    return out


def metrics_cells(metrics_json: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Eval set name -> :func:`cell` of its all-tasks overall metrics, from one ``evaluate`` result."""
    out = {}
    for name in metrics_json.get("accounting", {}):
        m = metrics_json.get("metrics", {}).get(name, {}).get("all_tasks", {}).get("overall")
        out[name] = cell(m) if m else {"primary": None, "primary_name": None, "primary_ci": None, "n": 0}
    return out


def quality_score(cells: dict[str, dict[str, Any]], exclude: list[str]) -> float | None:
    """Mean ``primary`` over the cells not in ``exclude`` (cells without a value are skipped); None if none."""
    vals = [c["primary"] for k, c in cells.items() if k not in exclude and c.get("primary") is not None]
    return float(sum(vals) / len(vals)) if vals else None


# -- running judges ----------------------------------------------------------------------------------------------
def _evaluate(cfg: JudgeConfig, judge: str, evals: list[Named], out: Path, progress: bool,
              log: Callable[[str], None]) -> dict[str, Any]:
    """``run_evaluate`` of one judge on every eval set into ``out`` (skipped when ``out`` holds a finished one for
    the same judge and data)."""
    from rms_ray.judge.evaluate import run_evaluate

    done = out / "metrics.json"
    if done.is_file():
        prev = json.loads(done.read_text())
        if prev.get("judge", {}).get("model") == judge and set(prev.get("accounting", {})) == {e.name for e in evals}:
            log(f"evaluation of {judge} already done: {done}")
            return prev
    jcfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": judge})})
    return run_evaluate(jcfg, [f"{e.name}={e.path}" for e in evals], out, progress=progress, log=log)


def concurrency(cfg: JudgeConfig, runs: int, limit: int | None = None) -> int:
    """How many study jobs (a training run, then its evaluation) go side by side: ``floor(CPUs / (num_workers *
    cpus_per_worker))`` (and GPUs / num_workers with ``use_gpu``), at least 1, at most ``runs`` and ``limit``.

    Each run also feeds its workers through Ray Data, which needs a little CPU beside them: a run that would leave
    none is not started beside another. And never more jobs than whole CPUs: every job runs one Ray Data
    execution at a time (data preparation, the workers' shards, or the evaluation), and Ray Data 2.60 splits the
    CPUs left over between concurrent executions by integer division
    (``ray/data/_internal/cluster_autoscaler/default_autoscaling_coordinator.py``,
    ``_refresh_resource_reservations``), so three executions on a 2-CPU cluster get a budget of 0 CPUs each and
    stall (measured here: a compare run with two trainings and an evaluation side by side hung in data
    preparation). On a GPU node with dozens of CPUs this bound is no constraint."""
    import ray

    t = cfg.train
    res = ray.cluster_resources()
    per_run = t.num_workers * t.cpus_per_worker
    fit = int(res.get("CPU", 1) // per_run) if per_run > 0 else runs
    if fit > 1 and fit * per_run >= res.get("CPU", 1):  # keep room for the runs' data pipelines
        fit -= 1
    if t.use_gpu:
        fit = min(fit, int(res.get("GPU", 0) // t.num_workers))
    fit = min(fit, int(res.get("CPU", 1)))
    return max(1, min(runs, fit, limit or runs))


def _check_budget(cfg: JudgeConfig) -> None:
    if cfg.train.examples_seen is None:
        raise StudyError("comparing datasets needs one budget for every run: set train.examples_seen (the profile "
                         f"gives train.epochs={cfg.train.epochs}, which would give a bigger set more training)")


def _train_and_evaluate(cfg: JudgeConfig, jobs: list[dict[str, Any]], evs: list[Named], progress: bool,
                        log: Callable[[str], None], max_concurrent: int | None = None
                        ) -> list[tuple[dict[str, Any] | None, dict[str, Any]]]:
    """For each job dict: train a judge with ``run_train`` (``name``, ``train``, ``out`` and run_train keywords;
    ``train_seed`` sets ``train.seed``), then evaluate it on ``evs`` into ``eval_out``. A job that gives ``judge``
    instead of ``train`` is only evaluated (the untrained base judge).

    Jobs run side by side where resources allow (:func:`concurrency`, from the training recipe's resources), and
    a judge is evaluated as soon as it is trained, in its job's slot: one job's engine start-up and scoring
    overlap another's training. Evaluations take turns, one at a time: an evaluation's engine actor holds its
    CPUs while the evaluation's read tasks need more, so two evaluations can fill a small cluster with their
    engines and then wait on each other's CPUs forever (measured on 2 CPUs: two engines held both, five read
    tasks waited). A training never waits on anything but CPUs that a running job will release, so a full
    cluster delays it, never deadlocks.

    Returns:
        ``(run_train result or None, metrics.json content)`` per job, in job order.
    Raises:
        RuntimeError: naming the job, from the first failed training or evaluation (the study stops there;
            finished jobs are kept and a rerun skips them).
    """
    from rms_ray.judge.train import run_train

    import threading

    n_train = sum(1 for j in jobs if "train" in j)
    one_evaluation = threading.Lock()
    width = concurrency(cfg, len(jobs), max_concurrent)
    log(f"training {n_train} judge(s) and evaluating {len(jobs)}, {width} job(s) at a time")

    def one(job: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        t0 = time.perf_counter()
        name, res = job["name"], None
        jlog = (lambda m: log(f"[{name}] {m}")) if width > 1 else log
        judge = job.get("judge")
        if "train" in job:
            kw = {k: v for k, v in job.items() if k not in ("name", "train", "out", "train_seed", "eval_out")}
            jcfg = cfg
            if "train_seed" in job:  # a seed of the study: the subset, the data order and new weights all change
                jcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": job["train_seed"]})})
            try:
                res = run_train(jcfg, job["train"], job["out"], progress=progress and width == 1, log=jlog,
                                run_name=name, **kw)
            except Exception as e:
                raise RuntimeError(f"training run {name} failed: {e}") from e
            log(f"[{name}] trained in {time.perf_counter() - t0:.0f} s -> {res['model_dir']}")
            judge = str(res["model_dir"])
        try:
            with one_evaluation:
                log(f"[{name}] evaluating {judge} on {len(evs)} eval set(s)")
                ev = _evaluate(cfg, judge, evs, job["eval_out"], progress and width == 1, jlog)
        except Exception as e:
            raise RuntimeError(f"evaluation of {name} ({judge}) failed: {e}") from e
        return res, ev

    if width == 1:
        return [one(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="study") as pool:
        return list(pool.map(one, jobs))


# -- compare-datasets --------------------------------------------------------------------------------------------
def run_compare(cfg: JudgeConfig, train: list[str], evals: list[str], output_dir: str | Path, *,
                include_base: bool = True, max_concurrent: int | None = None, ray_address: str | None = None,
                progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one judge per training dataset with the same recipe and budget, evaluate every judge (and the
    untrained base judge) on every eval set, and write the matrix.

    Args:
        cfg: judge profile with its ``train`` section (the recipe; ``model.source`` is the base judge).
        train: labelled files / construct output folders to compare.
        evals: labelled files / construct output folders to score the judges on.
        output_dir: ``judges/<name>/`` (training runs), ``evals/<row>/`` (evaluate outputs), ``matrix.json``,
            ``matrix.md``, ``heatmap.png``, ``study.json`` (resolved config, data hashes).
        max_concurrent: most training runs side by side (None: as many as the cluster's resources fit).
    Returns:
        The ``matrix.json`` content: ``rows``, ``columns``, ``cells[row][column]`` (see :func:`cell`),
        ``quality`` (row -> score), ``own`` (row -> excluded columns), ``ranking``.
    Raises:
        StudyError: bad arguments (before Ray starts); errors of ``run_train`` / ``run_evaluate`` for bad data.
    """
    from rms_ray.common.ray_utils import init_ray, shutdown_ray

    t0 = time.perf_counter()
    out = Path(output_dir).expanduser().resolve()
    trains, evs = name_datasets(train, "training"), name_datasets(evals, "eval")
    _check_budget(cfg)
    out.mkdir(parents=True, exist_ok=True)
    started = init_ray(cfg.resources.ray_num_cpus, ray_address)
    try:
        jobs = [{"name": t.name, "train": str(t.path), "out": out / "judges" / t.name,
                 "eval_out": out / "evals" / t.name} for t in trains]
        if include_base:  # last: the trainings, which take longest, start first
            jobs.append({"name": BASE, "judge": cfg.model.source, "eval_out": out / "evals" / BASE})
        done = _train_and_evaluate(cfg, jobs, evs, progress, log, max_concurrent)
        results = [res for res, _ in done[:len(trains)]]
        # the base judge is the matrix's first row: the floor a dataset must beat
        rows = {job["name"]: ev for job, (_, ev) in sorted(zip(jobs, done), key=lambda x: x[0]["name"] != BASE)}
    finally:
        if started:
            shutdown_ray()
    cells = {row: metrics_cells(res) for row, res in rows.items()}
    own = {t.name: own_eval_sets(t, evs) for t in trains}
    if include_base:
        own[BASE] = []
    quality = {row: quality_score(cells[row], own.get(row, [])) for row in rows}
    ranking = sorted((r for r in rows if quality[r] is not None), key=lambda r: -quality[r])
    matrix = {
        "rows": list(rows), "columns": [e.name for e in evs], "cells": cells, "quality": quality, "own": own,
        "ranking": ranking, "budget": {"examples_seen": cfg.train.examples_seen},
        "runs": {t.name: _run_summary(r) for t, r in zip(trains, results)},
    }
    write_json_atomic(out / "matrix.json", matrix)
    write_text_atomic(out / "matrix.md", _matrix_markdown(matrix, cfg))
    plot_heatmap(matrix, out / "heatmap.png")
    write_json_atomic(out / "study.json", _provenance(cfg, trains, evs, rows, time.perf_counter() - t0))
    log(f"wrote {out}/matrix.md, matrix.json, heatmap.png")
    return matrix


def _data_hash(p: Path) -> dict[str, str]:
    """``{"sha256": ...}`` of a labelled file; of a construct output folder, the SHA-256 over its ``data/`` files
    (each file's relative path and SHA-256, in name order), the rows a judge trains on."""
    import hashlib

    from rms_ray.common.io import file_sha256

    if not p.is_dir():
        return {"sha256": file_sha256(p)}
    h = hashlib.sha256()
    for f in sorted(q for q in (p / "data").rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p)}\0{file_sha256(f)}\n".encode())
    return {"sha256": h.hexdigest(), "sha256_of": "data/ files"}


def _run_summary(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("model_dir", "examples_seen", "steps", "best_val", "best_step", "resumed", "rows")
    return {k: (str(r[k]) if isinstance(r.get(k), Path) else r.get(k)) for k in keep if k in r}


def _provenance(cfg: JudgeConfig, trains: list[Named], evs: list[Named], rows: dict[str, Any],
                seconds: float) -> dict[str, Any]:
    from rms_ray.judge.prompt import load_judge_prompt

    any_eval = next(iter(rows.values()), {})
    return {
        "config": cfg.model_dump(mode="json"), "config_hash": cfg.config_hash(),
        "prompt_version": load_judge_prompt().version_id,
        "train_sets": {t.name: {"path": str(t.path), "sources": sorted(t.sources), **_data_hash(t.path)}
                       for t in trains},
        "eval_sets": {e.name: {"path": str(e.path), "sources": sorted(e.sources),
                               "sha256": any_eval.get("datasets", {}).get(e.name, {}).get("sha256")} for e in evs},
        "versions": any_eval.get("versions"), "total_s": round(seconds, 1),
    }


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _fmt_cell(c: dict[str, Any]) -> str:
    if c.get("primary") is None:
        return "n/a"
    ci = c.get("primary_ci")
    text = f"{c['primary_name'] if c['primary_name'] != 'f1' else 'F1'} {_fmt(c['primary'])}"
    if ci:
        text += f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
    if c.get("primary_name") == "f1":
        text += f"; AUPRC {_fmt(c.get('auprc'))}"
    return text


def _esc(text: str) -> str:
    return re.sub(r"([|\\`*_\[\]<>])", r"\\\1", str(text))


def _matrix_markdown(matrix: dict[str, Any], cfg: JudgeConfig) -> str:
    cols = matrix["columns"]
    lines = ["# Dataset comparison: a judge trained on each dataset, scored on the others", "",
             f"Recipe: judge profile `{_esc(cfg.profile)}`, base `{_esc(cfg.model.source)}`, "
             f"{cfg.train.method} fine-tuning, the same budget for every run: "
             f"{matrix['budget']['examples_seen']} training examples seen.",
             "Cells: F1 (unsafe = positive) with its 95% bootstrap interval and AUPRC on two-class sets; recall of the "
             "class present with a Wilson interval on one-class sets. *italic*: the row's own eval set (excluded "
             "from its quality score).", "",
             "| trained on | " + " | ".join(_esc(c) for c in cols) + " | quality |",
             "|---" * (len(cols) + 2) + "|"]
    for row in matrix["rows"]:
        cells = []
        for c in cols:
            text = _fmt_cell(matrix["cells"][row].get(c, {}))
            cells.append(f"*{text}*" if c in matrix["own"].get(row, []) else text)
        label = "untrained base judge" if row == BASE else _esc(row)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(matrix['quality'][row])} |")
    lines += ["", "## Ranking (quality score = mean cell over the other datasets)", ""]
    lines += [f"{i}. {_esc(r)}: {_fmt(matrix['quality'][r])}" for i, r in enumerate(matrix["ranking"], 1)]
    return "\n".join(lines) + "\n"


@serialised
def plot_heatmap(matrix: dict[str, Any], path: str | Path) -> Path:
    """PNG heatmap of the ``primary`` cells (rows = training sets, columns = eval sets, own sets hatched)."""
    import numpy as np

    from rms_ray.judge.report import new_figure, save_png

    rows, cols = matrix["rows"], matrix["columns"]
    vals = np.array([[np.nan if matrix["cells"][r].get(c, {}).get("primary") is None
                      else matrix["cells"][r][c]["primary"] for c in cols] for r in rows], dtype=float)
    fig = new_figure((1.6 + 1.3 * len(cols), 1.2 + 0.55 * len(rows)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(vals), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            v = vals[i, j]
            own = c in matrix["own"].get(r, [])
            ax.text(j, i, ("n/a" if math.isnan(v) else f"{v:.2f}") + ("\n(own)" if own else ""), ha="center",
                    va="center", color="white" if not math.isnan(v) and v < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(cols)), labels=cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=[f"{r} (q={_fmt(matrix['quality'][r])})" for r in rows], fontsize=8)
    ax.set_xlabel("eval set")
    ax.set_ylabel("trained on")
    ax.set_title("F1 (recall on one-class sets)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return save_png(fig, Path(path))


# -- scale-study -------------------------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[int]:
    """``"1000,2000,5000"`` -> ``[1000, 2000, 5000]`` (ascending, distinct, positive).

    Raises:
        StudyError: not a comma-separated list of positive integers, or not strictly ascending.
    """
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise StudyError(f"--sizes {text!r}: give comma-separated integers, e.g. 1000,2000,5000") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise StudyError(f"--sizes {text!r}: sizes must be positive")
    if sizes != sorted(set(sizes)):
        raise StudyError(f"--sizes {text!r}: sizes must be distinct and ascending")
    return sizes


def _labelled_rows(p: Path) -> int:
    from rms_ray.data.labelled import scan

    if p.is_dir():
        from rms_ray.construct.export import iter_labelled_rows

        return sum(1 for _ in iter_labelled_rows(p))
    return scan(p).rows


def run_scale_study(cfg: JudgeConfig, train: str, sizes: list[int], seeds: int, evals: list[str],
                    output_dir: str | Path, *, max_concurrent: int | None = None, ray_address: str | None = None,
                    progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score vs training-set size: one training run per (size, seed) on nested subsets, each evaluated on
    ``evals``; writes ``scale.json``, ``scale.md`` and ``scale.png`` (mean +- std over seeds).

    Args:
        sizes: ascending subset sizes in rows; the largest must not exceed the training set.
        seeds: number of seeds (subset permutation and training seed ``train.seed + s``), >= 1.
        max_concurrent: as in :func:`run_compare`.
    Returns:
        The ``scale.json`` content: ``points`` (one per size: ``quality_mean``/``quality_std`` and per eval set
        ``mean``/``std`` of the primary cell, ``n_seeds``) and ``runs`` (one per size and seed).
    Raises:
        StudyError: bad sizes/seeds (before Ray starts).
    """
    from rms_ray.common.ray_utils import init_ray, shutdown_ray

    t0 = time.perf_counter()
    if seeds < 1:
        raise StudyError(f"--seeds {seeds}: need at least 1")
    _check_budget(cfg)
    (tr,), evs = name_datasets([train], "training"), name_datasets(evals, "eval")
    n_rows = _labelled_rows(tr.path)
    if sizes[-1] > n_rows:
        raise StudyError(f"--sizes: {sizes[-1]} rows asked, but {tr.name} has {n_rows}")
    own = own_eval_sets(tr, evs)
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = init_ray(cfg.resources.ray_num_cpus, ray_address)
    runs: list[dict[str, Any]] = []
    try:
        jobs = [{"name": f"n{n}-s{s}", "train": str(tr.path), "out": out / "runs" / f"n{n}-s{s}", "row_limit": n,
                 "subset_seed": cfg.train.seed + s, "train_seed": cfg.train.seed + s}
                for s in range(seeds) for n in sizes]
        for job in jobs:
            job["eval_out"] = job["out"] / "eval"
        for job, (res, ev) in zip(jobs, _train_and_evaluate(cfg, jobs, evs, progress, log, max_concurrent)):
            cells = metrics_cells(ev)
            runs.append({"name": job["name"], "size": job["row_limit"], "seed": job["subset_seed"],
                         "cells": cells, "quality": quality_score(cells, own), **_run_summary(res)})
    finally:
        if started:
            shutdown_ray()
    points = []
    for n in sizes:
        at = [r for r in runs if r["size"] == n]
        p: dict[str, Any] = {"size": n, "n_seeds": len(at), **_mean_std([r["quality"] for r in at], "quality")}
        p["by_eval"] = {e.name: _mean_std([r["cells"][e.name].get("primary") for r in at], "") for e in evs}
        points.append(p)
    result = {"train": tr.name, "sizes": sizes, "seeds": seeds, "own": own, "points": points, "runs": runs,
              "budget": {"examples_seen": cfg.train.examples_seen}}
    write_json_atomic(out / "scale.json", result)
    write_text_atomic(out / "scale.md", _scale_markdown(result, [e.name for e in evs]))
    plot_scale(result, [e.name for e in evs], out / "scale.png")
    write_json_atomic(out / "study.json", _provenance(cfg, [tr], evs, {}, time.perf_counter() - t0))
    log(f"wrote {out}/scale.md, scale.json, scale.png")
    return result


def _mean_std(values: list[float | None], prefix: str) -> dict[str, Any]:
    import numpy as np

    v = np.array([x for x in values if x is not None], dtype=float)
    key = (prefix + "_") if prefix else ""
    return {f"{key}mean": float(v.mean()) if len(v) else None,
            f"{key}std": float(v.std(ddof=1)) if len(v) > 1 else (0.0 if len(v) else None)}


def _scale_markdown(result: dict[str, Any], cols: list[str]) -> str:
    lines = [f"# Scale study: judge trained on {_esc(result['train'])} at growing sizes", "",
             f"Nested subsets, {result['seeds']} seed(s), the same budget per run "
             f"({result['budget']['examples_seen']} examples seen). Cells: mean +- std over seeds of F1 "
             "(recall on one-class sets); quality = mean over the eval sets that are not the training set's own.",
             "", "| rows | quality | " + " | ".join(_esc(c) for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for p in result["points"]:
        cells = [f"{_fmt(p['by_eval'][c]['mean'])} +- {_fmt(p['by_eval'][c]['std'])}" for c in cols]
        lines.append(f"| {p['size']} | {_fmt(p['quality_mean'])} +- {_fmt(p['quality_std'])} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) + "\n"


@serialised
def plot_scale(result: dict[str, Any], cols: list[str], path: str | Path) -> Path:
    """PNG of score vs training rows (log x), error bars = std over seeds; one line per eval set + quality."""
    from rms_ray.judge.report import new_figure, save_png

    fig = new_figure((6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    xs = [p["size"] for p in result["points"]]
    series = [("quality", [p["quality_mean"] for p in result["points"]], [p["quality_std"] for p in result["points"]])]
    series += [(c, [p["by_eval"][c]["mean"] for p in result["points"]], [p["by_eval"][c]["std"]
                                                                         for p in result["points"]]) for c in cols]
    for i, (label, ys, es) in enumerate(series):
        pts = [(x, y, e or 0.0) for x, y, e in zip(xs, ys, es) if y is not None]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=label, linewidth=2.2 if i == 0 else 1.2)
    if len(xs) > 1 and xs[-1] / xs[0] >= 10:
        ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training rows")
    ax.set_ylabel("F1 (recall on one-class sets)")
    ax.set_title(f"Judge trained on {result['train']}: score vs size", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, Path(path))
