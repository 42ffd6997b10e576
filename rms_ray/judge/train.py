"""``rms-ray train-judge``: supervised fine-tuning of a VLM safety judge on labelled data, under Ray Train.

Flow (the driver coordinates; Ray Data and the Ray Train workers read, train and write):

1. Driver, before Ray: the base model is a Qwen2/2.5-VL model folder (``builtin:<preset>``, a folder or a hub id
   in the local cache); every dataset passes :func:`rms_ray.data.labelled.scan` (labels, tasks, ids, empty
   files: the same resolution ``rms-ray evaluate`` does); an output folder holding an earlier run is resumed only
   if it is the same run (:func:`run_identity`).
2. Ray Data: each row's image is loaded, decoded and normalised by the judge's decoder, and its example rendered
   once to count its tokens (:func:`rms_ray.judge.train_data.prepare_rows`). The driver reads only small columns
   (ids, labels, hashes): rows with a missing/undecodable image, an empty query or too many tokens go to
   ``excluded.jsonl`` with the reason; a training set with one class, no usable rows, a validation set that
   overlaps it (same id, or same image bytes and query), or more workers than the cluster holds stop here with one
   :class:`TrainError`. ``row_limit`` keeps the first rows of one seeded random order (nested subsets).
3. Ray Train: ``TorchTrainer`` with :func:`rms_ray.judge.train_loop.train_loop_per_worker` on ``num_workers``
   workers (DDP), the training rows as Ray Data shards, validation + a checkpoint every ``eval_every_steps``,
   ``CheckpointConfig`` keeping the best by the validation metric (and the latest), ``FailureConfig`` restarting
   the workers from the latest checkpoint. Storage is ``<output>/_ray/<run_name>``: re-running the same command
   resumes from its latest checkpoint (Ray Train V2 restores a run by its ``RunConfig(name, storage_path)``).
4. Rank 0 writes the judge from the best checkpoint at the end of training
   (:func:`rms_ray.judge.train_loop.export_model`: LoRA merged, tokenizer/processor files copied from the base);
   the driver then writes the small files (meta, log, curves).

Output folder::

    <output>/
      model/             THE JUDGE: pass this folder to `rms-ray evaluate --judge` (vLLM and transformers load it);
                         it also holds a copy of judge_meta.json
      adapter/           the LoRA adapter (PEFT format; method lora only)
      judge_meta.json    base model, prompt version, resolved config, data hashes and counts, label vocabulary,
                         budget, best validation metrics, library versions
      train_config.yaml  the resolved config
      train_log.jsonl    one record per optimiser step and per validation (and per resume)
      train_curves.png   training loss, validation loss / F1 / AUPRC by examples seen
      val_scores.jsonl   the best checkpoint's validation scores (id, label, unsafe_score)
      excluded.jsonl     rows not used, with the reason
      _ray/              Ray Train's run storage (checkpoints); _work/ scratch, progress, worker pid files
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from rms_ray.judge.report import serialised
from rms_ray.judge.config import JudgeConfig

logger = logging.getLogger(__name__)

_MARKER = "_work/train.json"
#: Config keys that may change when an interrupted run is resumed (how it runs, not what it learns).
_RESUMABLE_KEYS = ("cpus_per_worker", "max_failures", "precision")


class TrainError(ValueError):
    """A problem with the inputs of ``train-judge`` found before training starts (the message says what to fix)."""


class TrainInterrupted(KeyboardInterrupt):
    """Training was stopped by Ctrl-C (SIGINT) before its last step; its checkpoints are kept, and running the same
    command again resumes from the latest one. ``step`` is that checkpoint's step (None: no checkpoint yet)."""

    def __init__(self, step: int | None, total: int) -> None:
        super().__init__(f"training interrupted; latest checkpoint: step {step} of {total}" if step is not None
                         else f"training interrupted before its first checkpoint (of {total} steps)")
        self.step, self.total = step, total


# -- checks before anything runs -------------------------------------------------------------------------------------
def check_base_model(source: str) -> dict[str, Any]:
    """Check that ``source`` names a Qwen2-VL / Qwen2.5-VL model this trainer can fine-tune; returns
    ``{"source", "kind", "path", "model_type", "architectures", "config_sha256"}``.

    Raises:
        TrainError: not a model (see :func:`rms_ray.engine.check_model_source`), or another architecture (its
            ``config.json`` ``model_type`` is not one of
            :data:`rms_ray.judge.train_data.SUPPORTED_MODEL_TYPES`).
    """
    from rms_ray.engine.vllm_engine import ModelSourceError, check_model_source
    from rms_ray.judge.train_data import SUPPORTED_MODEL_TYPES, base_model_dir

    try:
        kind = check_model_source(source)
        path = base_model_dir(source)
    except (ModelSourceError, FileNotFoundError) as e:
        raise TrainError(str(e)) from None
    try:
        text = (path / "config.json").read_text(encoding="utf-8")
        conf = json.loads(text)
    except (OSError, ValueError) as e:
        raise TrainError(f"base model {source}: cannot read its config.json ({e})") from None
    model_type = conf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TrainError(f"base model {source} is a {model_type or 'unknown'!s} model "
                         f"({', '.join(conf.get('architectures') or []) or 'no architectures listed'}); train-judge "
                         f"fine-tunes {' / '.join(SUPPORTED_MODEL_TYPES)} models (Qwen2-VL, Qwen2.5-VL)")
    return {"source": source, "kind": kind, "path": str(path), "model_type": model_type,
            "architectures": conf.get("architectures"),
            "config_sha256": hashlib.sha256(text.encode()).hexdigest()}


def run_identity(cfg: JudgeConfig, base: dict[str, Any], train_hashes: list[str], val_hash: str | None,
                 row_limit: int | None, subset_seed: int | None, run_name: str) -> dict[str, Any]:
    """What makes two runs the same run (resumable into each other): the base model (source and config), the judge
    prompt, the image policy, the answer bounds, the ``train`` section (but :data:`_RESUMABLE_KEYS`), the data
    (file hashes), the subset and the run name."""
    from rms_ray.judge.prompt import load_judge_prompt

    train = cfg.train.model_dump(mode="json", exclude=set(_RESUMABLE_KEYS))
    return {"base_model": base["source"], "base_config_sha256": base["config_sha256"],
            "prompt": load_judge_prompt().version_id, "images": cfg.images.model_dump(mode="json"),
            "judge": cfg.judge.model_dump(mode="json"), "train": train, "max_model_len": cfg.model.max_model_len,
            "train_data": train_hashes, "val_data": val_hash, "row_limit": row_limit, "subset_seed": subset_seed,
            "run_name": run_name}


def _identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _prepare_output(out: Path, identity: dict[str, Any], run_name: str) -> bool:
    """Bind ``out`` to this run. Returns True when it holds the same run from before (resume), False when new.

    An earlier train-judge run with other settings that never wrote a checkpoint (e.g. refused for bad images) is
    replaced; one with checkpoints is not.

    Raises:
        TrainError: ``out`` is a file, a non-empty folder not made by train-judge, or an earlier run with
            checkpoints that differs (the differences are listed: resuming it with other settings would mix two
            runs).
    """
    from rms_ray.common.io import write_json_atomic

    if out.exists() and not out.is_dir():
        raise TrainError(f"output {out} exists and is not a folder")
    marker = out / _MARKER
    if marker.is_file():
        old = json.loads(marker.read_text(encoding="utf-8")).get("identity", {})
        diff = _differences(old, identity)
        trained = any((out / "_ray").glob("*/checkpoint_manager_snapshot.json")) or (out / "judge_meta.json").exists()
        if diff and not trained:  # nothing to resume: bind the folder to this run
            write_json_atomic(marker, {"tool": "rms-ray train-judge", "identity": identity, "created": time.time()})
            return False
        if diff:
            shown = "; ".join(diff[:4]) + (f" (and {len(diff) - 4} more)" if len(diff) > 4 else "")
            raise TrainError(f"output {out} holds another training run ({shown}); resuming it with other settings "
                             "would mix two runs: use a new --output folder (or the earlier settings)")
        return True
    if out.exists() and any(out.iterdir()):
        raise TrainError(f"output {out} is not empty and was not made by rms-ray train-judge: use a new folder")
    write_json_atomic(marker, {"tool": "rms-ray train-judge", "identity": identity, "created": time.time()})
    return False


# -- data ------------------------------------------------------------------------------------------------------------
def _read(inputs: list[tuple[str, Any]], cfg: JudgeConfig, order_seed: int, max_actors: int):
    """One Ray dataset of :data:`~rms_ray.judge.train_data.TRAIN_SCHEMA` rows over ``inputs`` (``(split, input)``
    pairs: the training files and the validation file), materialised: read tasks load the rows and image bytes
    (evaluate's readers), then an actor pool (1 to ``max_actors`` actors, the processor loaded once each) decodes
    and normalises the images and renders each example once to count its tokens."""
    import ray

    from rms_ray.judge.train_data import PrepareRows, stream_rows

    parts = []
    for i, (split, d) in enumerate(inputs):
        fmt = "parquet" if d.path.suffix == ".parquet" else "jsonl"
        kwargs = {"fmt": fmt, "dataset": d.name, "base_dir": str(d.base_dir or d.path.parent), "split": split,
                  "dataset_index": i}
        blocks = max(1, min(200, math.ceil(d.summary.rows / 512)))
        read = ray.data.read_parquet if fmt == "parquet" else ray.data.read_text
        # read tasks as light as the decode tasks (Ray's default is 1 CPU; see judge/evaluate.py build_dataset)
        parts.append(read(str(d.path), override_num_blocks=blocks, num_cpus=cfg.resources.decode_num_cpus).map_batches(
            stream_rows, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=512,
            num_cpus=cfg.resources.decode_num_cpus))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(PrepareRows, fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(),
                                                              "order_seed": order_seed},
                          compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, max_actors)),
                          batch_format="pyarrow", batch_size=256,
                          num_cpus=cfg.resources.decode_num_cpus).materialize()


def _usable(batch, split: str, cutoff: int | None):
    """Ray Data UDF: the rows of ``split`` without an exclusion reason (and within the subset:
    ``order_key <= cutoff``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = pc.and_(pc.equal(batch["split"], split), pc.is_null(batch["excluded_reason"]))
    if cutoff is not None:
        keep = pc.and_(keep, pc.less_equal(batch["order_key"], pa.scalar(cutoff, type=batch["order_key"].type)))
    return batch.filter(keep)


def _meta(ds) -> Any:
    """The small columns of a prepared dataset as a pandas frame (never the image bytes)."""
    from rms_ray.judge.train_data import META_COLUMNS

    return ds.select_columns(META_COLUMNS).to_pandas()


def _counts(frame) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (task, label), n in Counter(zip(frame["task"], frame["label"])).items():
        out.setdefault(task, {"safe": 0, "unsafe": 0})[label] = int(n)
    return out


def _reason_key(reason: str) -> str:
    if reason.startswith("image:"):
        return ":".join(reason.split(":")[:2])
    return reason.split(":", 1)[0]


def _check_overlap(train, val) -> None:
    ids = set(train["id"]) & set(val["id"])
    pairs = set(train["pair_key"].dropna()) & set(val["pair_key"].dropna())
    if ids or pairs:
        same_pair = val[val["pair_key"].isin(pairs)]["id"].tolist()
        shown = sorted(ids)[:3] + [i for i in same_pair if i not in ids][:3]
        raise TrainError(f"--val overlaps the training data: {len(ids)} id(s) in both and {len(pairs)} item(s) with "
                         f"the same image bytes and query (e.g. val ids {', '.join(map(repr, shown))}); a validation "
                         "set must be held out: remove those rows from one of them")


def _one_class(frame, what: str) -> None:
    labels = set(frame["label"])
    if len(labels) < 2:
        raise TrainError(f"{what} has only {'/'.join(sorted(labels)) or 'no'} rows; a judge needs both safe and "
                         "unsafe examples to learn (and to be validated)")


# -- progress --------------------------------------------------------------------------------------------------------
class _Watcher:
    """Reads ``_work/progress.json`` (written by rank 0) while ``fit`` runs and prints what a person wants to see:
    a tqdm bar over optimiser steps (``progress``), one line per validation and per worker-group restart."""

    def __init__(self, path: Path, total: int, log: Callable[[str], None], bar: bool) -> None:
        self.path, self.total, self.log = path, total, log
        self._stop = threading.Event()
        self._bar = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
        self._thread = threading.Thread(target=self._run, name="train-progress", daemon=True)
        self._seen_evals: set[int] = set()
        self._resumes = 0
        self._step = 0

    def __enter__(self) -> "_Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._poll()

    def _poll(self) -> None:
        try:
            p = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        resumes = p.get("resumes") or []
        for r in resumes[self._resumes:]:
            if r.get("kind") == "restart":
                self.log(f"workers restarted after a failure: resuming from checkpoint at step {r['step']}")
        self._resumes = max(self._resumes, len(resumes))
        step = int(p.get("step", 0))
        if self._bar is not None:
            self._bar.n = step
            if "train_loss" in p:
                self._bar.set_postfix(loss=f"{p['train_loss']:.4f}", examples=p.get("examples_seen"))
            self._bar.refresh()
        self._step = step
        ev = p.get("last_eval")
        if ev and ev.get("step") not in self._seen_evals:
            self._seen_evals.add(ev.get("step"))
            val = (f", val loss {ev['val_loss']:.4f} F1 {ev['val_f1']:.3f} AUPRC {ev['val_auprc']:.3f}"
                   if "val_f1" in ev else "")
            self.log(f"step {ev['step']}/{self.total} ({ev['examples_seen']} examples): train loss "
                     f"{ev['train_loss']:.4f}{val}")


# -- outputs ---------------------------------------------------------------------------------------------------------
@serialised
def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """``train_curves.png``: training loss per step and the validation metrics, against examples seen."""
    from rms_ray.judge.report import new_figure, save_png

    steps = [h for h in history if h.get("event") == "step"]
    evals = [h for h in history if h.get("event") == "eval" and "val_loss" in h]
    fig = new_figure((10, 3.6))
    a, b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    a.plot([h["examples_seen"] for h in steps], [h["train_loss"] for h in steps], lw=1, label="train loss")
    if evals:
        a.plot([h["examples_seen"] for h in evals], [h["val_loss"] for h in evals], "o-", label="val loss")
        b.plot([h["examples_seen"] for h in evals], [h["val_f1"] for h in evals], "o-", label="val F1")
        b.plot([h["examples_seen"] for h in evals], [h["val_auprc"] for h in evals], "s-", label="val AUPRC")
        b.set_ylim(-0.02, 1.02)
    for h in history:
        if h.get("event") == "resumed":
            a.axvline(h["examples_seen"], color="grey", ls=":", lw=1)
    a.set_xlabel("examples seen")
    a.set_ylabel("loss (answer tokens)")
    a.set_yscale("log")
    a.legend()
    b.set_xlabel("examples seen")
    b.set_title("validation" if evals else "no validation set")
    if evals:
        b.legend()
    fig.tight_layout()
    save_png(fig, path)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from rms_ray.judge.evaluate import _versions as evaluate_versions

    out = evaluate_versions()
    for pkg in ("peft", "safetensors", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _read_checkpoint_json(checkpoint: Any, name: str) -> Any:
    with checkpoint.as_directory() as d:
        return json.loads((Path(d) / name).read_text(encoding="utf-8"))


def _latest_checkpoint_step(run_dir: Path) -> int | None:
    """Step of the latest checkpoint Ray Train recorded for this run (None: no earlier run or no checkpoint)."""
    if not (run_dir / "checkpoint_manager_snapshot.json").is_file():
        return None
    from ray.train import Result

    try:
        ckpt = Result.from_path(str(run_dir)).checkpoint
    except Exception:  # noqa: BLE001 - an unreadable snapshot: Ray Train itself will say so when it starts
        return None
    if ckpt is None:
        return None
    from rms_ray.judge.train_data import STATE_FILE

    return int(_read_checkpoint_json(ckpt, STATE_FILE)["step"])


# -- the command ---------------------------------------------------------------------------------------------------
def run_train(cfg: JudgeConfig, train: list[str] | str, output_dir: str | Path, *, val: str | None = None,
              ray_address: str | None = None, progress: bool = True, log: Callable[[str], None] = print,
              run_name: str | None = None, row_limit: int | None = None,
              subset_seed: int | None = None) -> dict[str, Any]:
    """Fine-tune the judge ``cfg.model.source`` on ``train`` into ``output_dir`` (see the module docstring).

    Args:
        cfg: judge config; ``cfg.train`` is the recipe (method, budget, workers, ...), ``cfg.model.source`` the
            base model (``builtin:<preset>``, a Qwen2/2.5-VL folder, or a hub id in the local cache).
        train: labelled ``.parquet``/``.jsonl`` file(s) and/or construct output folder(s).
        output_dir: new or empty folder, or the folder of an earlier run of the same settings (resumed from its
            latest checkpoint, or returned as it is when finished).
        val: labelled validation set (validated every ``train.eval_every_steps``; ranks checkpoints by
            ``train.checkpoint.metric``). None: no validation, the last checkpoint is the judge.
        ray_address: a Ray cluster (default ``RAY_ADDRESS`` or a local start with ``resources.ray_num_cpus``).
        progress: show a progress bar over optimiser steps.
        log: where progress lines go.
        run_name: Ray Train run name (default ``judge``); storage is ``<output>/_ray/<run_name>``.
        row_limit: train on this many rows of the training set: the first ones of a seeded random order of the
            usable rows (so a smaller limit gives a subset of a larger one's rows).
        subset_seed: seed of that order (default ``train.seed``); it also orders the rows across workers.
    Returns:
        A summary: ``model_dir`` (the judge folder, ``<output>/model``), ``output_dir``, ``examples_seen``,
        ``steps``, ``global_batch``, ``best_val`` (validation metrics of the exported checkpoint, {} without
        --val), ``best_step``, ``resumed`` (started from an earlier run's checkpoint), ``resumed_from_step``,
        ``restarts`` (steps the worker group restarted from after a failure), ``rows`` (train / val / excluded
        counts), ``timings``.
    Raises:
        TrainError: bad inputs (before training starts): see the module docstring.
        ray.train.TrainingFailedError: training failed (e.g. workers died more than ``train.max_failures`` times).
    """
    from rms_ray.common.io import write_json_atomic, write_text_atomic
    from rms_ray.common.ray_utils import init_ray, shutdown_ray
    from rms_ray.judge.evaluate import EvaluateError, resolve_datasets

    t0 = time.perf_counter()
    tc = cfg.train
    out = Path(output_dir).expanduser().resolve()
    specs = [train] if isinstance(train, (str, Path)) else list(train)
    specs = [str(s) for s in specs]
    run_name = run_name or "judge"
    if not specs:
        raise TrainError("no training data given")
    if row_limit is not None and row_limit < 1:
        raise TrainError(f"row_limit must be >= 1, got {row_limit}")
    for s in specs + ([val] if val else []):
        if not Path(s).expanduser().exists():
            raise TrainError(f"dataset {s} not found")
    base = check_base_model(cfg.model.source)

    existed = out.exists()
    was_empty = existed and out.is_dir() and not any(out.iterdir())
    work = out / "_work"
    try:
        # resolve_datasets needs a scratch folder: a temporary one until the output is bound to this run
        scratch = Path(tempfile.mkdtemp(prefix="rms_ray_train_inputs_"))
        try:
            inputs = resolve_datasets(specs, scratch)
            val_inputs = resolve_datasets([val], scratch / "val") if val else []
        except EvaluateError as e:
            raise TrainError(str(e)) from None
        train_names = {d.path.resolve() for d in inputs}
        if val_inputs and val_inputs[0].path.resolve() in train_names:
            raise TrainError(f"--val {val} is also a training set")
        identity = run_identity(cfg, base, [d.sha256 for d in inputs], val_inputs[0].sha256 if val_inputs else None,
                                row_limit, subset_seed, run_name)
        resumed_run = _prepare_output(out, identity, run_name)
        # the converted inputs (construct outputs) live in the run's own folder from here on
        (work / "inputs").mkdir(parents=True, exist_ok=True)
        for d in inputs + val_inputs:
            if d.path.is_relative_to(scratch):
                dest = work / "inputs" / d.path.relative_to(scratch)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(d.path, dest)
                d.path = dest
        shutil.rmtree(scratch, ignore_errors=True)
        for d in inputs:
            labels = {lbl for by_label in d.summary.counts.values() for lbl, n in by_label.items() if n}
            if len(inputs) == 1 and len(labels) < 2:
                raise TrainError(f"training set {d.origin} has only {'/'.join(sorted(labels))} rows; a judge needs "
                                 "both safe and unsafe examples to learn")
    except TrainError:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        elif was_empty:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise

    ident = _identity_hash(identity)
    meta_path = out / "judge_meta.json"
    if resumed_run and meta_path.is_file() and (out / "model" / "config.json").is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("identity") == ident:
            log(f"{out}: this run is already complete (step {meta['budget']['steps']}); nothing to do "
                f"(the judge: {out / 'model'})")
            return {**meta["summary"], "resumed": True, "already_complete": True}

    for d in inputs:
        log(f"train {d.name}: {d.summary.rows} rows {json.dumps(d.summary.counts)}")
    for d in val_inputs:
        log(f"val {d.name}: {d.summary.rows} rows {json.dumps(d.summary.counts)}")
    order_seed = tc.seed if subset_seed is None else subset_seed
    started = init_ray(cfg.resources.ray_num_cpus, ray_address)
    try:
        import ray

        have = ray.cluster_resources()
        need_cpu = tc.num_workers * tc.cpus_per_worker
        if need_cpu > have.get("CPU", 0) + 1e-9:
            raise TrainError(f"train.num_workers={tc.num_workers} x train.cpus_per_worker={tc.cpus_per_worker} = "
                             f"{need_cpu:g} CPUs, but the Ray cluster has {have.get('CPU', 0):g}: use fewer workers, "
                             "fewer CPUs per worker (fractions are fine) or a bigger cluster")
        if tc.use_gpu and tc.num_workers > have.get("GPU", 0):
            raise TrainError(f"train.num_workers={tc.num_workers} with train.use_gpu needs {tc.num_workers} GPUs, but "
                             f"the Ray cluster has {have.get('GPU', 0):g}")
        t_prep = time.perf_counter()
        total_rows = sum(d.summary.rows for d in inputs + val_inputs)
        max_actors = min(int(have.get("CPU", 1) / cfg.resources.decode_num_cpus), math.ceil(total_rows / 2048))
        prepared = _read([("train", d) for d in inputs] + [("val", d) for d in val_inputs], cfg, order_seed,
                         max_actors)
        meta_all = _meta(prepared)
        tm = meta_all[meta_all["split"] == "train"]
        vm = meta_all[meta_all["split"] == "val"] if val_inputs else None
        excluded = []
        for frame in [tm] + ([vm] if vm is not None else []):
            bad = frame[frame["excluded_reason"].notna()]
            excluded += [{"id": r.id, "dataset": r.dataset, "split": r.split, "reason": r.excluded_reason}
                         for r in bad.itertuples()]
        write_text_atomic(out / "excluded.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in excluded))
        by_reason = dict(Counter(_reason_key(r["reason"]) for r in excluded))
        good = tm[tm["excluded_reason"].isna()]
        if good.empty:
            raise TrainError(f"no usable training rows: all {len(tm)} were excluded ({json.dumps(by_reason)}; see "
                             f"{out / 'excluded.jsonl'})")
        cutoff = None
        if row_limit is not None and row_limit < len(good):
            good = good.sort_values("order_key").head(row_limit)
            cutoff = int(good["order_key"].max())
        _one_class(good, "the training set" + (f" (first {row_limit} rows)" if row_limit else ""))
        vgood = None
        if vm is not None:
            vgood = vm[vm["excluded_reason"].isna()]
            if vgood.empty:
                raise TrainError(f"no usable validation rows: all {len(vm)} were excluded (see excluded.jsonl)")
            _one_class(vgood, f"the validation set {val}")
            _check_overlap(good, vgood)
        n_train = len(good)
        per_worker = n_train // tc.num_workers
        if per_worker < tc.batch_size:
            raise TrainError(f"{n_train} usable training rows are too few for train.num_workers={tc.num_workers} x "
                             f"train.batch_size={tc.batch_size} (every worker needs at least one full batch)")
        if excluded:
            log(f"excluded {len(excluded)} rows ({json.dumps(by_reason)}): see {out / 'excluded.jsonl'}")
        global_batch = tc.batch_size * tc.num_workers * tc.grad_accum
        budget = tc.examples_seen if tc.examples_seen is not None else int(math.ceil(tc.epochs * n_train))
        total_steps = max(1, math.ceil(budget / global_batch))
        # keep usable rows (and the subset); one seeded global order, so each worker's shard mixes the classes
        from rms_ray.judge.train_data import WORKER_COLUMNS

        train_rows = (prepared.map_batches(_usable, fn_kwargs={"split": "train", "cutoff": cutoff},
                                           batch_format="pyarrow", num_cpus=cfg.resources.decode_num_cpus)
                      .sort("order_key").select_columns(WORKER_COLUMNS).materialize())
        datasets = {"train": train_rows}
        if val_inputs:
            datasets["val"] = (prepared.map_batches(_usable, fn_kwargs={"split": "val", "cutoff": None},
                                                    batch_format="pyarrow", num_cpus=cfg.resources.decode_num_cpus)
                               .select_columns(WORKER_COLUMNS).materialize())
        prep_s = time.perf_counter() - t_prep
        log(f"training rows: {n_train} ({json.dumps(_counts(good))}); validation rows: "
            f"{0 if vgood is None else len(vgood)}; {total_steps} steps x {global_batch} examples "
            f"({tc.num_workers} worker(s) x batch {tc.batch_size} x accumulation {tc.grad_accum}) = "
            f"{total_steps * global_batch} examples")

        run_dir = out / "_ray" / run_name
        resumed_step = _latest_checkpoint_step(run_dir)
        if resumed_step is not None:
            log(f"resuming from checkpoint at step {resumed_step} (of {total_steps})")
        elif resumed_run:
            log("the earlier run left no checkpoint: starting from step 0")
        fit_id = uuid.uuid4().hex[:12]
        result = _fit(cfg, datasets, out, run_name, {
            "cfg_json": cfg.model_dump_json(), "total_steps": total_steps, "global_batch": global_batch,
            "work_dir": str(work), "has_val": bool(val_inputs), "identity": ident, "fit_id": fit_id,
            "model_dir": str(out / "model"), "adapter_dir": str(out / "adapter") if tc.method == "lora" else None},
            progress, log)
        t_fit = time.perf_counter() - t_prep - prep_s
        from rms_ray.judge.train_data import STATE_FILE, VAL_SCORES_FILE

        final_state = _read_checkpoint_json(result.checkpoint, STATE_FILE) if result.checkpoint else None
        if final_state is None or final_state["step"] < total_steps or not result.return_value:
            # Ray Train's own SIGINT handler aborts the run gracefully and fit() returns: not a finished run
            raise TrainInterrupted(None if final_state is None else final_state["step"], total_steps)
        done = result.return_value  # rank 0 wrote the judge from the best checkpoint
        best = next((c for c, _ in (result.best_checkpoints or []) if c.path == done["best_checkpoint"]),
                    result.checkpoint)
        best_state = _read_checkpoint_json(best, STATE_FILE)
        best_eval = next((h for h in reversed(best_state["history"]) if h.get("event") == "eval"), {})
        best_val = {k: v for k, v in best_eval.items() if k.startswith("val_")}
        export = done["export"]
        log(f"wrote the judge from the checkpoint of step {done['best_step']} -> {out / 'model'}")
    finally:
        if started:
            shutdown_ray()

    history = final_state["history"]
    write_text_atomic(out / "train_log.jsonl", "".join(json.dumps(h, default=float) + "\n" for h in history))
    plot_curves(history, out / "train_curves.png")
    val_scores = _read_checkpoint_json(best, VAL_SCORES_FILE)
    write_text_atomic(out / "val_scores.jsonl", "".join(json.dumps(r) + "\n" for r in val_scores))
    import yaml

    from rms_ray.judge.prompt import load_judge_prompt
    from rms_ray.judge.train_data import END_OF_TURN, RATIONALES, target_category

    write_text_atomic(out / "train_config.yaml",
                      f"# resolved config of rms-ray train-judge (identity {ident}); base model {base['source']}\n"
                      + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    # worker-group restarts after a failure in this call (a re-run's own start from a checkpoint is not one)
    restarts = [r["step"] for r in final_state.get("resumes", [])
                if r.get("kind") == "restart" and r.get("fit_id") == fit_id]
    categories = sorted({target_category("unsafe", c, cfg.judge.category_chars)
                         for c in good[good["label"] == "unsafe"]["category"]})
    summary = {
        "model_dir": str(out / "model"), "output_dir": str(out), "examples_seen": final_state["examples_seen"],
        "steps": final_state["step"], "global_batch": global_batch, "best_val": best_val,
        "best_step": best_state["step"], "resumed": resumed_step is not None, "resumed_from_step": resumed_step,
        "restarts": restarts,
        "rows": {"train": n_train, "val": 0 if vgood is None else len(vgood), "excluded": len(excluded)},
        "timings": {"prepare_s": round(prep_s, 2), "fit_s": round(t_fit, 2), "export_s": export.get("seconds"),
                    "total_s": round(time.perf_counter() - t0, 2),
                    "examples_per_s": round(
                        (final_state["examples_seen"] - (resumed_step or 0) * global_batch) / t_fit, 2)
                    if t_fit > 0 else None},
    }
    meta = {
        "tool": "rms-ray train-judge", "identity": ident,
        "base_model": base, "judge_prompt": load_judge_prompt().version_id,
        "method": tc.method, "precision": {"mode": final_state.get("precision"),
                                           "reason": final_state.get("precision_reason"),
                                           "device": final_state.get("device")},
        "budget": {"examples_seen_requested": tc.examples_seen, "epochs_requested": tc.epochs,
                   "examples_budget": budget, "steps": total_steps, "global_batch": global_batch,
                   "examples_seen": final_state["examples_seen"],
                   "rule": "steps = ceil(budget / (batch_size x num_workers x grad_accum)); budget = examples_seen "
                           "or ceil(epochs x usable training rows)"},
        "data": {
            "train": [{"name": d.name, "given_as": d.origin, "sha256": d.sha256, "rows": d.summary.rows,
                       "counts": d.summary.counts} for d in inputs],
            "val": [{"name": d.name, "given_as": d.origin, "sha256": d.sha256, "rows": d.summary.rows,
                     "counts": d.summary.counts} for d in val_inputs],
            "used": {"train_rows": n_train, "train_counts": _counts(good),
                     "val_rows": 0 if vgood is None else len(vgood),
                     "val_counts": {} if vgood is None else _counts(vgood)},
            "subset": {"row_limit": row_limit, "subset_seed": subset_seed, "order_seed": order_seed},
            "excluded": {"rows": len(excluded), "by_reason": by_reason, "file": "excluded.jsonl"},
        },
        "label_vocabulary": {"labels": ["safe", "unsafe"], "tasks": sorted(set(good["task"])),
                             "categories": categories, "safe_category": "none"},
        "answer_format": {"lines": ["<safe|unsafe>", "category: <category | none>", "rationale: <template>"],
                          "rationales": {f"{t}/{lbl}": s for (t, lbl), s in RATIONALES.items()},
                          "end_of_turn": END_OF_TURN},
        "best": {"step": best_state["step"], "metric": tc.checkpoint.metric if val_inputs else None,
                 "val": best_val, "checkpoint": best.path},
        "restarts": restarts, "resumed_from_step": resumed_step,
        "export": export,
        "config": cfg.model_dump(mode="json"), "config_hash": cfg.config_hash(),
        "versions": _versions(),
        "summary": summary,
    }
    write_json_atomic(out / "model" / "judge_meta.json", meta)
    write_json_atomic(meta_path, meta)  # last: its presence says the run is complete
    return summary


def _fit(cfg: JudgeConfig, datasets: dict[str, Any], out: Path, run_name: str, spec: dict[str, Any],
         progress: bool, log: Callable[[str], None]):
    """``TorchTrainer.fit`` with the run's scaling, failure, checkpoint and storage settings; returns its Result.

    Raises:
        ray.train.TrainingFailedError: the run failed (after ``train.max_failures`` restarts).
    """
    import os

    from ray.data import ExecutionOptions
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from rms_ray.judge.train_loop import train_loop_per_worker

    tc = cfg.train
    resources: dict[str, float] = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1
    has_val = "val" in datasets
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RMS_RAY_CACHE", "HF_HOME", "HF_HUB_CACHE"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=str(out / "_ray"),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=tc.checkpoint.num_to_keep,
                checkpoint_score_attribute=tc.checkpoint.metric if has_val else None,
                checkpoint_score_order="min" if tc.checkpoint.metric == "val_loss" else "max"),
            worker_runtime_env={"env_vars": env}),
        datasets=datasets,
        # the training rows are split across workers (equal shards); every worker reads the whole validation set
        # and scores its part. preserve_order makes the split deterministic, so a resumed epoch skips exactly the
        # batches it had done.
        dataset_config=DataConfig(datasets_to_split=["train"],
                                  execution_options=ExecutionOptions(preserve_order=True)),
    )
    (out / "_work" / "progress.json").unlink(missing_ok=True)  # an earlier fit's
    import signal

    main = threading.current_thread() is threading.main_thread()
    old_sigint = signal.getsignal(signal.SIGINT) if main else None
    try:
        with _Watcher(out / "_work" / "progress.json", spec["total_steps"], log, progress):
            # fit() installs Ray Train's SIGINT handler (Ctrl-C aborts the controller gracefully: workers stopped,
            # checkpoints kept) and leaves it installed: the caller's handler is put back below. After such an
            # abort, Ray 2.60's fit() raises SystemExit(1) (the controller actor exited on purpose).
            try:
                result = trainer.fit()
            except SystemExit:
                raise TrainInterrupted(_latest_checkpoint_step(out / "_ray" / run_name),
                                       spec["total_steps"]) from None
    finally:
        if main:
            signal.signal(signal.SIGINT, old_sigint)
    if result.error is not None:
        raise result.error
    return result
