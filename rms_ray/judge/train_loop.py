"""What runs inside each Ray Train worker (the training loop, top to bottom) and the export of the trained judge.

The driver (:mod:`rms_ray.judge.train`) validates the data, prepares it with Ray Data and starts a
``ray.train.torch.TorchTrainer`` with :func:`train_loop_per_worker`. Each worker:

1. loads the base model and makes it trainable (:func:`make_trainable`: LoRA adapters through PEFT, or full
   fine-tuning; vision tower / merger frozen as configured);
2. loads ``ray.train.get_checkpoint()`` if there is one (a restarted worker group after a worker died, or a re-run
   of an interrupted run): trainable weights, optimiser and LR-schedule state, step, epoch and the position in the
   epoch, the log so far;
3. wraps the model with ``ray.train.torch.prepare_model`` (DDP: gloo on CPU, NCCL on GPU);
4. iterates its shard of the training set (``ray.train.get_dataset_shard("train")``; one shard per worker, equal
   sizes, a deterministic split because the driver asks Ray Data to preserve order), renders each row with
   :func:`rms_ray.judge.train_data.render_judge_example` and takes an optimiser step every ``grad_accum``
   micro-batches, with the loss on the answer tokens only;
5. every ``eval_every_steps`` steps and at the end: validates on the whole validation set (rows split across
   workers by index, gathered on every rank: loss, F1 and AUPRC from P(unsafe) read at the first answer position
   through :func:`rms_ray.judge.prompt.unsafe_score`) and calls ``ray.train.report(metrics, checkpoint=...)``;
   rank 0 writes the checkpoint;
6. at the end, rank 0 loads the best reported checkpoint (``ray.train.get_all_reported_checkpoints``) into the
   model it holds and writes the judge folder (:func:`export_model`: LoRA merged). A worker group that dies while
   exporting restarts from the final checkpoint and exports again.

Checkpoint layout (a folder Ray Train persists under ``<output>/_ray/<run>/checkpoint_*``): ``trainable.safetensors``
(only the trained tensors: LoRA adapters, or the unfrozen weights), ``optimizer.pt``, ``scheduler.pt``,
``state.json`` (step, epoch, micro-batches done in that epoch, examples seen, the log of every step, resumes),
``val_scores.json`` (per validation row: id, label, unsafe score).

Ray Train docs: "Saving and loading checkpoints", "Handling failures and node preemption" (FailureConfig restarts
the worker group, which then restores from the latest reported checkpoint), "Data loading and preprocessing"
(``get_dataset_shard``, ``DataConfig``). PEFT docs: ``LoraConfig``, ``get_peft_model``, ``merge_and_unload``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from rms_ray.judge.train_data import (
    STATE_FILE,
    TRAINABLE_FILE,
    VAL_SCORES_FILE,
    base_model_dir,
)

logger = logging.getLogger(__name__)

#: Files of a base model folder that are weights or the model config (written by ``save_pretrained``) or that
#: belong to the base only (the tiny builder's stamp): not copied into a trained judge.
_NOT_COPIED = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.index\.json|^config\.json|^rms_ray_tiny\.json|"
                         r"^\.rms_ray_tiny_building|\.tmp)$")


# -- the model -------------------------------------------------------------------------------------------------------
def vision_prefixes(model: Any) -> tuple[str, str]:
    """Module-name prefixes of the vision tower and of its merger (the vision->language projector), e.g.
    ``("model.visual", "model.visual.merger")`` in transformers 5 (``visual`` / ``visual.merger`` in 4.x)."""
    names = [n for n, _ in model.named_modules()]
    visual = min((n for n in names if n.split(".")[-1] == "visual"), key=len, default=None)
    if visual is None:
        raise ValueError("the model has no vision tower named 'visual' (not a Qwen2/2.5-VL model)")
    return visual, f"{visual}.merger"


def make_trainable(model: Any, train: Any) -> Any:
    """Mark what trains, per ``train`` (:class:`~rms_ray.judge.config.TrainSettings`); returns the model to train
    (a ``peft.PeftModel`` for LoRA).

    * ``full``: every weight trains, except the vision tower's blocks (``freeze_vision``) and the merger
      (``freeze_projector``).
    * ``lora``: the base is frozen; PEFT adds adapters (rank ``r``, scale ``alpha / r``, ``dropout``) to the modules
      named by ``target_modules``, in the language model only when ``freeze_vision`` (Qwen's vision blocks share
      the MLP names); ``freeze_projector: false`` trains the merger in full (PEFT ``modules_to_save``).
    """
    visual, merger = vision_prefixes(model)
    if train.method == "full":
        for name, p in model.named_parameters():
            in_merger = name.startswith(merger + ".")
            in_vision = name.startswith(visual + ".") and not in_merger
            p.requires_grad_(not ((in_vision and train.freeze_vision) or (in_merger and train.freeze_projector)))
        return model
    from peft import LoraConfig, get_peft_model

    modules = "|".join(re.escape(m) for m in train.lora.target_modules)
    # PEFT matches a string target with re.fullmatch against each module's full name
    target: Any = (rf"^(?!{re.escape(visual)}\.).*\.({modules})$" if train.freeze_vision
                   else list(train.lora.target_modules))
    lora = LoraConfig(r=train.lora.r, lora_alpha=train.lora.alpha, lora_dropout=train.lora.dropout,
                      target_modules=target, bias="none",
                      modules_to_save=None if train.freeze_projector else [merger.split(".")[-1]])
    return get_peft_model(model, lora)


def load_base_model(model_source: str, dtype: Any = None) -> Any:
    """The base VLM (``AutoModelForImageTextToText``) in ``dtype`` (default float32: the trained weights and the
    optimiser state stay in float32; bf16 is used through autocast only)."""
    from transformers import AutoModelForImageTextToText

    from rms_ray.engine.vllm_engine import resolve_model_source

    return AutoModelForImageTextToText.from_pretrained(resolve_model_source(model_source),
                                                       dtype=dtype or torch.float32)


def trainable_state(model: Any) -> dict[str, Any]:
    """``{name: tensor}`` of the parameters that train (on CPU, contiguous): what a checkpoint stores."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, path: str | Path) -> None:
    """Load ``trainable.safetensors`` into ``model`` (made trainable the same way).

    Raises:
        ValueError: the file's tensors are not exactly the model's trainable parameters (another base model,
            method or freezing).
    """
    from safetensors.torch import load_file

    saved = load_file(str(path))
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(own) or any(saved[n].shape != own[n].shape for n in own):
        missing, extra = sorted(set(own) - set(saved))[:3], sorted(set(saved) - set(own))[:3]
        raise ValueError(f"checkpoint {path} does not match this model's trainable weights (missing {missing}, "
                         f"unexpected {extra}): another base model or train.method / freezing")

    with torch.no_grad():
        for n, p in own.items():
            p.copy_(saved[n].to(p.device, p.dtype))


def autocast_choice(precision: str, device_type: str) -> tuple[Any, str]:
    """(``torch.bfloat16`` or None, reason) for ``train.precision`` on this worker's device.

    ``auto``: bf16 autocast on a GPU that supports bf16 and on a CPU with ``avx512_bf16``/``amx_bf16`` (where
    bf16 matmuls are native; elsewhere they are emulated and slower than float32: see
    :mod:`rms_ray.engine.dtype`), else float32.
    """

    if precision == "float32":
        return None, "set in the config"
    if precision == "bf16":
        return torch.bfloat16, "set in the config"
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "gpu supports bf16"
        return None, "gpu without bf16"
    from rms_ray.engine.dtype import dtype_from_cpu_flags, read_cpu_flags

    flags = read_cpu_flags()
    if flags is None:
        return None, "cpu flags unreadable"
    dtype, reason = dtype_from_cpu_flags(flags)
    return (torch.bfloat16 if dtype == "bfloat16" else None), reason


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """The LR multiplier per optimiser step: linear warm-up over ``warmup_steps``, then constant, linear decay
    to 0 or half-cosine decay to 0 at ``total_steps`` (the schedules of ``transformers.get_*_schedule_with_warmup``,
    written out so a checkpoint's ``scheduler.pt`` is just the step count)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, progress))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# -- one forward pass ------------------------------------------------------------------------------------------------
MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def hf_model(model: Any) -> Any:
    """The ``transformers`` model inside DDP / :class:`JudgeForward` / PEFT wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, JudgeForward):
            model = model.model
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


class JudgeForward(torch.nn.Module):
    """The model (HF or PEFT) behind one ``forward(batch)`` that returns the answer logits and their targets (see
    :func:`answer_logits`). DDP wraps this module, so the two model calls of a prefix-shared batch are one DDP
    forward and one gradient all-reduce."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        return _answer_forward(self.model, batch)


def _answer_forward(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    k = int(batch["answer_len"].max())
    p = int(batch.get("prefix_len") or 0)
    images = {n: batch[n] for n in ("pixel_values", "image_grid_thw") if n in batch}
    if not p:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    mm_token_type_ids=batch["mm_token_type_ids"], **images, logits_to_keep=k + 1, use_cache=False)
        return out.logits[:, :-1].float(), batch["labels"][:, -k:]
    from transformers import DynamicCache

    base = hf_model(model)
    ids = batch["input_ids"]
    b = ids.shape[0]
    prefix = batch["prefix_ids"]
    ones = torch.ones((b, p), dtype=batch["attention_mask"].dtype, device=ids.device)
    full_mask = torch.cat([ones, batch["attention_mask"]], dim=1)
    # M-RoPE positions of the whole sequences, as the model computes them without a shared prefix
    position_ids, _ = base.model.get_rope_index(
        torch.cat([prefix.expand(b, -1), ids], dim=1),
        mm_token_type_ids=torch.cat([torch.zeros_like(ones), batch["mm_token_type_ids"]], dim=1),
        image_grid_thw=images.get("image_grid_thw"), attention_mask=full_mask)
    cache = DynamicCache(config=base.config)
    model(input_ids=prefix, attention_mask=ones[:1], position_ids=position_ids[:, :1, :p], cache=cache,
          use_cache=True, logits_to_keep=1)  # the shared prefix, once: its keys/values (with their gradients)
    cache.batch_repeat_interleave(b)
    out = model(input_ids=ids, attention_mask=full_mask, position_ids=position_ids[:, :, p:], cache=cache,
                use_cache=True, **images, logits_to_keep=k + 1)
    return out.logits[:, :-1].float(), batch["labels"][:, -k:]


def answer_logits(model: Any, batch: dict[str, Any], device: Any, autocast_dtype: Any) -> tuple[Any, Any]:
    """Logits at the positions that predict answer tokens, and those targets.

    ``model``: a :class:`JudgeForward` (possibly inside DDP), or a bare model (wrapped here). ``batch`` from
    :func:`rms_ray.judge.train_data.collate` (left-padded: every answer ends at the last column). With
    ``K = max(answer_len)`` only the last ``K + 1`` positions go through the LM head (``logits_to_keep``). A shared
    prompt prefix (``prefix_len`` > 0) is run once with a key/value cache that every row then attends to; the
    positions (M-RoPE) are those of the full sequences, so the result equals the unshared forward (tested).
    Returns ``(logits [B, K, V] float32, targets [B, K] with -100 where nothing is predicted)``; row ``i``'s first
    answer token is predicted at column ``K - answer_len[i]``.
    """
    if not isinstance(model, (JudgeForward, torch.nn.parallel.DistributedDataParallel)):
        model = JudgeForward(model)
    moved = {n: (v.to(device) if hasattr(v, "to") else v) for n, v in batch.items()}
    ctx = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        return model(moved)


def token_losses(logits: Any, targets: Any) -> Any:
    """Per-token cross entropy ``[B, K]`` (0 where the target is -100)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")


# -- data --------------------------------------------------------------------------------------------------------------
def render_rows(rows: dict[str, Any], processor: Any, cfg: Any) -> list[Any]:
    """A Ray Data numpy batch of training rows (:data:`rms_ray.judge.train_data.WORKER_COLUMNS`) -> rendered
    examples with their target answers."""
    import io

    from PIL import Image

    from rms_ray.judge.train_data import render_judge_example, target_answer

    out = []
    for i in range(len(rows["id"])):
        image = Image.open(io.BytesIO(rows["image"][i])).convert("RGB")  # the normalised PNG (see prepare_rows)
        task, label = str(rows["task"][i]), str(rows["label"][i])
        category = rows["category"][i]
        response = rows["response"][i]
        answer = target_answer(task, label, None if category is None else str(category),
                               category_chars=cfg.judge.category_chars, rationale_chars=cfg.judge.rationale_chars)
        out.append(render_judge_example(processor, task=task, query=str(rows["query"][i]),
                                        response=None if response is None else str(response), image=image,
                                        answer=answer))
    return out


# -- the loop ------------------------------------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    from rms_ray.common.io import write_json_atomic

    write_json_atomic(path, obj)


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_mean(value: float) -> float:

    dist = _dist()
    if dist is None:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _gather(obj: Any) -> list[Any]:
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def validation_metrics(labels: list[str], scores: list[float | None], threshold: float) -> dict[str, float]:
    """F1 (unsafe = positive, unsafe if score >= threshold), AUPRC (average precision) and accuracy with
    scikit-learn, over the rows with a score; rows without one (no label token among the top log-probabilities)
    are counted in ``val_unscored``. A metric that is undefined (no scored row, or one class among them) is 0.0,
    the worst value, so such a checkpoint is never ranked best."""
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score

    pairs = [(lbl == "unsafe", s) for lbl, s in zip(labels, scores) if s is not None]
    out = {"val_n": float(len(labels)), "val_unscored": float(len(labels) - len(pairs)),
           "val_f1": 0.0, "val_auprc": 0.0, "val_accuracy": 0.0}
    if not pairs:
        return out
    y = [p[0] for p in pairs]
    s = [p[1] for p in pairs]
    pred = [v >= threshold for v in s]
    out["val_f1"] = float(f1_score(y, pred, zero_division=0.0))
    out["val_accuracy"] = float(accuracy_score(y, pred))
    if 0 < sum(y) < len(y):
        out["val_auprc"] = float(average_precision_score(y, s))
    return out


def evaluate_shard(model: Any, processor: Any, cfg: Any, val_iter: Any, device: Any, autocast_dtype: Any,
                   rank: int, world: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Validate on the whole validation set: this rank scores rows ``i`` with ``i % world == rank``; results are
    gathered on every rank. Returns (metrics, per-row ``{id, label, unsafe_score, loss}``)."""

    from rms_ray.judge.prompt import unsafe_score
    from rms_ray.judge.train_data import collate, first_token_logprobs

    was_training = model.training
    model.eval()
    mine: list[dict[str, Any]] = []
    bs = cfg.train.batch_size
    offset = 0
    with torch.no_grad():
        for rows in val_iter.iter_batches(batch_size=bs * world, batch_format="numpy"):
            n = len(rows["id"])
            take = [i for i in range(n) if (offset + i) % world == rank]
            offset += n
            if not take:
                continue
            sub = {k: v[take] for k, v in rows.items()}
            examples = render_rows(sub, processor, cfg)
            batch = collate(examples, processor.tokenizer.pad_token_id)
            logits, targets = answer_logits(model, batch, device, autocast_dtype)
            losses = token_losses(logits, targets)
            k = logits.shape[1]
            for j, rid in enumerate(sub["id"]):
                a = int(batch["answer_len"][j])
                lp = first_token_logprobs(logits[j, k - a], processor.tokenizer)
                mine.append({"id": str(rid), "label": str(sub["label"][j]), "unsafe_score": unsafe_score(lp),
                             "loss_sum": float(losses[j].sum()), "tokens": int((targets[j] != -100).sum())})
    if was_training:
        model.train()
    rows_all = [r for part in _gather(mine) for r in part]
    tokens = sum(r["tokens"] for r in rows_all)
    metrics = validation_metrics([r["label"] for r in rows_all], [r["unsafe_score"] for r in rows_all],
                                 cfg.evaluate.threshold)
    metrics["val_loss"] = sum(r["loss_sum"] for r in rows_all) / tokens if tokens else float("nan")
    scores = [{"id": r["id"], "label": r["label"], "unsafe_score": r["unsafe_score"]} for r in rows_all]
    return metrics, scores


def train_loop_per_worker(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train worker function (``TorchTrainer(train_loop_per_worker=...)``).

    Returns (rank 0; Ray Train's ``Result.return_value``): ``{"best_checkpoint", "best_step", "export"}`` after
    rank 0 wrote the judge (:func:`export_model`) from the best checkpoint; other ranks return None.

    ``spec`` (built by the driver): ``cfg_json`` (the :class:`~rms_ray.judge.config.JudgeConfig`), ``total_steps``
    (optimiser steps), ``global_batch`` (examples per optimiser step, all workers), ``work_dir`` (where rank 0
    writes ``progress.json`` and every worker ``workers/rank<N>.json`` with its pid), ``has_val``, ``identity``
    (the run's identity hash, stored in each checkpoint and checked on restore), ``fit_id`` (one per ``fit``: tells
    a worker-group restart after a failure from a re-run of the command), ``model_dir`` / ``adapter_dir`` (where
    rank 0 writes the judge and the LoRA adapter).
    """
    import numpy as np  # noqa: F401 - Ray Data's numpy batches
    import ray.train
    from ray.train.torch import get_device, prepare_model

    from rms_ray.judge.config import JudgeConfig
    from rms_ray.judge.train_data import collate, load_processor

    cfg = JudgeConfig.model_validate_json(spec["cfg_json"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    work = Path(spec["work_dir"])
    t_start = time.time()
    try:
        import psutil

        created = psutil.Process().create_time()  # the worker's process start: actor start-up before this function
    except Exception:  # noqa: BLE001 - psutil is Ray's dependency; the time is only diagnostic
        created = None
    marks: dict[str, float] = {}  # seconds since this function started, per start-up stage (in the worker file)

    def worker_file(stage: str) -> None:
        marks[stage] = round(time.time() - t_start, 2)
        _write_json(work / "workers" / f"rank{rank}.json", {"pid": os.getpid(), "rank": rank, "world_size": world,
                                                            "host": socket.gethostname(), "started": t_start,
                                                            "process_created": created, "startup_s": marks})

    worker_file("entered")
    # which start of this fit this is: 0 the first, >0 a worker-group restart after a failure (FailureConfig)
    attempts = work / "attempts" / spec["fit_id"]
    attempt = len(list(attempts.glob("*.json"))) if attempts.is_dir() else 0
    if rank == 0:
        _write_json(attempts / f"{attempt}-{os.getpid()}.json", {"time": time.time()})
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    device = get_device()
    autocast_dtype, precision_reason = autocast_choice(tc.precision, device.type)

    torch.manual_seed(tc.seed)  # the same new adapters on every rank (DDP also broadcasts rank 0's at wrap time)
    processor = load_processor(cfg.model.source)
    core = make_trainable(load_base_model(cfg.model.source), tc)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "examples_seen": 0, "history": [],
                             "resumes": [], "identity": spec["identity"]}
    opt_state = sched_state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = json.loads((Path(d) / STATE_FILE).read_text())
            if saved.get("identity") != spec["identity"]:
                raise RuntimeError(f"checkpoint {ckpt.path} belongs to another run (identity {saved.get('identity')}"
                                   f" != {spec['identity']})")
            load_trainable(core, Path(d) / TRAINABLE_FILE)
            opt_state = torch.load(Path(d) / "optimizer.pt", map_location="cpu", weights_only=True)
            sched_state = torch.load(Path(d) / "scheduler.pt", map_location="cpu", weights_only=True)
        state = saved
        kind = "restart" if attempt > 0 else "rerun"  # a failure within this fit, or a re-run of the command
        state["resumes"].append({"step": state["step"], "kind": kind, "fit_id": spec["fit_id"], "time": time.time()})
        state["history"].append({"event": "resumed", "kind": kind, "step": state["step"],
                                 "examples_seen": state["examples_seen"], "time": time.time()})
        if rank == 0:
            logger.info("resumed from checkpoint at step %d", state["step"])
    worker_file("model_loaded")
    # DDP (when world > 1) around the module that runs a whole batch; moves it to this worker's device
    model = prepare_model(JudgeForward(core))
    worker_file("model_prepared")
    trainable = [p for p in core.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr)
    total = int(spec["total_steps"])
    warmup = int(round(tc.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.schedule, warmup, total))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
        sched.load_state_dict(sched_state)

    train_it = ray.train.get_dataset_shard("train")
    val_it = ray.train.get_dataset_shard("val") if spec["has_val"] else None
    pad_id = processor.tokenizer.pad_token_id
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    meta = {"precision": "bf16-autocast" if autocast_dtype is not None else "float32",
            "precision_reason": precision_reason, "device": device.type, "world_size": world}
    last_progress = 0.0
    last_eval: dict[str, Any] = {}

    def progress(status: str, extra: dict[str, Any] | None = None, force: bool = False) -> None:
        nonlocal last_progress
        if rank != 0 or (not force and time.time() - last_progress < 0.5):
            return
        last_progress = time.time()
        _write_json(work / "progress.json", {"status": status, "step": state["step"], "total_steps": total,
                                             "epoch": state["epoch"], "examples_seen": state["examples_seen"],
                                             "resumes": state["resumes"], "time": time.time(), **meta,
                                             "last_eval": last_eval, **(extra or {})})

    def checkpoint_and_report(train_loss: float) -> None:
        metrics: dict[str, Any] = {"step": state["step"], "epoch": state["epoch"],
                                   "examples_seen": state["examples_seen"], "train_loss": train_loss,
                                   "lr": sched.get_last_lr()[0]}
        scores: list[dict[str, Any]] = []
        if val_it is not None:
            progress("validating", force=True)
            val, scores = evaluate_shard(model, processor, cfg, val_it, device, autocast_dtype, rank, world)
            metrics.update(val)
        state["history"].append({"event": "eval", **metrics, "time": time.time()})
        last_eval.clear()
        last_eval.update(metrics)
        progress("training", force=True)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="rms_ray_ckpt_") as tmp:
            save_file(trainable_state(core), str(Path(tmp) / TRAINABLE_FILE))
            torch.save(opt.state_dict(), Path(tmp) / "optimizer.pt")
            torch.save(sched.state_dict(), Path(tmp) / "scheduler.pt")
            (Path(tmp) / STATE_FILE).write_text(json.dumps({**state, **meta}, default=float))
            (Path(tmp) / VAL_SCORES_FILE).write_text(json.dumps(scores))
            # unique per report: a worker group restarted from an earlier checkpoint may report this step again
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_step{state['step']:07d}_{uuid.uuid4().hex[:8]}")

    model.train()
    micro, loss_acc, tok_acc = 0, 0.0, 0
    timing: dict[str, float] = {"since": time.perf_counter(), "render_s": 0.0, "compute_s": 0.0}
    progress("training", force=True)
    while state["step"] < total:
        epoch = state["epoch"]
        skip = state["batch_in_epoch"]  # micro-batches of this epoch done before the checkpoint
        batches = train_it.iter_batches(batch_size=tc.batch_size, drop_last=True, batch_format="numpy",
                                        local_shuffle_buffer_size=max(tc.shuffle_buffer_rows, tc.batch_size),
                                        local_shuffle_seed=tc.seed * 1_000_003 + epoch)
        done_in_epoch = 0
        for rows in batches:
            done_in_epoch += 1
            if skip:
                skip -= 1
                continue
            # dropout depends on (seed, step, micro-batch, rank) only, so a resumed run draws what it would have
            torch.manual_seed(tc.seed * 7919 + state["step"] * 131 + micro * 17 + rank)
            if "first_batch" not in marks:
                worker_file("first_batch")
            t0 = time.perf_counter()
            batch = collate(render_rows(rows, processor, cfg), pad_id)
            t1 = time.perf_counter()
            sync = micro + 1 == tc.grad_accum
            # DDP all-reduces the gradients only on the last micro-batch of a step; no_sync must cover the forward
            # too (DDP arms its reducer in forward)
            with (model.no_sync() if ddp and not sync else contextlib.nullcontext()):
                logits, targets = answer_logits(model, batch, device, autocast_dtype)
                losses = token_losses(logits, targets)
                n_tok = int((targets != -100).sum())
                loss = losses.sum() / max(1, n_tok)
                (loss / tc.grad_accum).backward()
            t2 = time.perf_counter()
            timing["render_s"] += t1 - t0
            timing["compute_s"] += t2 - t1
            micro += 1
            state["batch_in_epoch"] += 1
            loss_acc += float(losses.sum())
            tok_acc += n_tok
            if not sync:
                continue
            t3 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            state["examples_seen"] += int(spec["global_batch"])
            train_loss = _all_mean(loss_acc / max(1, tok_acc))
            micro, loss_acc, tok_acc = 0, 0.0, 0
            timing["optimizer_s"] = time.perf_counter() - t3
            # where this rank's time went since the last step: waiting for data, rendering, forward+backward
            # (with the all-reduce of the last micro-batch), optimiser
            now = time.perf_counter()
            timing["data_s"] = max(0.0, now - timing.pop("since") - timing["render_s"] - timing["compute_s"]
                                   - timing["optimizer_s"])
            state["history"].append({"event": "step", "step": state["step"], "epoch": epoch,
                                     "examples_seen": state["examples_seen"], "train_loss": train_loss,
                                     "lr": sched.get_last_lr()[0], "time": time.time(),
                                     **{k: round(v, 4) for k, v in timing.items()}})
            timing = {"since": now, "render_s": 0.0, "compute_s": 0.0}
            progress("training", {"train_loss": train_loss})
            if state["step"] % tc.eval_every_steps == 0 or state["step"] >= total:
                checkpoint_and_report(train_loss)
                timing["since"] = time.perf_counter()  # validation and checkpoint are not the next step's time
            if state["step"] >= total:
                break
        else:  # the shard is used up: next epoch
            if done_in_epoch == 0:
                raise RuntimeError(f"worker {rank}: its training shard holds no full batch of {tc.batch_size}")
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            continue
        break
    # rank 0 writes the judge from the best checkpoint (the latest without validation) while the model is loaded
    if rank != 0:
        return None
    progress("exporting", force=True)
    best = best_checkpoint(tc.checkpoint.metric if spec["has_val"] else None)
    best_state = state
    if best is not None:
        with best.as_directory() as d:
            best_state = json.loads((Path(d) / STATE_FILE).read_text())
            if best_state["step"] != state["step"]:
                load_trainable(core, Path(d) / TRAINABLE_FILE)
    export = export_model(core, cfg, spec["model_dir"], spec.get("adapter_dir"))
    progress("done", force=True)
    return {"best_checkpoint": None if best is None else best.path, "best_step": best_state["step"],
            "export": export}


def best_checkpoint(metric: str | None) -> Any:
    """The best checkpoint this run reported (``ray.train.get_all_reported_checkpoints``: the ones Ray Train kept)
    by ``metric`` (``val_loss``: lowest; others: highest; ties: the later step), or the latest when ``metric`` is
    None. None when nothing was reported."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    reported = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
    if not reported:
        return None
    if metric is None:
        return max(reported, key=lambda r: r.metrics.get("step", 0)).checkpoint
    sign = -1.0 if metric == "val_loss" else 1.0
    scored = [r for r in reported if isinstance(r.metrics.get(metric), (int, float))]
    if not scored:
        return max(reported, key=lambda r: r.metrics.get("step", 0)).checkpoint
    return max(scored, key=lambda r: (sign * r.metrics[metric], r.metrics.get("step", 0))).checkpoint


# -- export ----------------------------------------------------------------------------------------------------------
def export_model(model: Any, cfg: Any, out_dir: str, adapter_dir: str | None) -> dict[str, Any]:
    """Write a trained judge: a model folder vLLM and ``transformers`` load directly.

    ``model`` is the trained model as made by :func:`make_trainable` (a ``PeftModel`` for LoRA; unwrapped from DDP).
    LoRA adapters are saved to ``adapter_dir`` (PEFT format) and merged into the weights (``merge_and_unload``; the
    model is changed in place). The weights are saved in the base model's dtype (its ``config.json``) with
    ``save_pretrained`` (safetensors), and the base folder's tokenizer, processor, chat-template and generation
    files are copied unchanged (never its weights, config or the tiny builder's stamp). Everything is written to a
    temporary folder beside ``out_dir`` and renamed into place, so ``out_dir`` is the previous complete judge or the
    new one. Returns ``{"parameters", "dtype", "copied_files", "seconds"}``.
    """

    t0 = time.time()
    base_dir = base_model_dir(cfg.model.source)
    base_cfg = json.loads((base_dir / "config.json").read_text())
    save_dtype = getattr(torch, str(base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "float32"))
    model = model.to("cpu")
    if cfg.train.method == "lora":
        if adapter_dir is not None:
            _replace_dir(Path(adapter_dir), lambda tmp: model.save_pretrained(str(tmp)))
        model = model.merge_and_unload()
    model = model.to(save_dtype)
    copied: list[str] = []

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for f in sorted(base_dir.iterdir()):
            if f.is_file() and not _NOT_COPIED.search(f.name) and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
                copied.append(f.name)

    _replace_dir(Path(out_dir), write)
    return {"parameters": int(sum(p.numel() for p in model.parameters())), "dtype": str(save_dtype).split(".")[-1],
            "copied_files": copied, "seconds": round(time.time() - t0, 2)}


def export_judge(cfg_json: str, checkpoint_path: str, out_dir: str, adapter_dir: str | None) -> dict[str, Any]:
    """Write the judge of a checkpoint (e.g. another one than the run picked): load the base (float32), make it
    trainable as in training, load the checkpoint's trained tensors, then :func:`export_model`."""
    from rms_ray.judge.config import JudgeConfig

    cfg = JudgeConfig.model_validate_json(cfg_json)
    model = make_trainable(load_base_model(cfg.model.source), cfg.train)
    with _checkpoint_dir(checkpoint_path) as d:
        load_trainable(model, Path(d) / TRAINABLE_FILE)
    return export_model(model, cfg, out_dir, adapter_dir)


@contextlib.contextmanager
def _checkpoint_dir(path: str):
    """A local folder with a checkpoint's files (Ray's ``Checkpoint`` for remote storage paths)."""
    if os.path.isdir(path):
        yield path
        return
    import ray.train

    with ray.train.Checkpoint(path).as_directory() as d:
        yield d


def _replace_dir(target: Path, write) -> None:
    """``write(tmp)`` into a new folder beside ``target``, then swap it in (rename; the old one removed after)."""
    from rms_ray.common.io import fsync_dir, tmp_suffix

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{tmp_suffix()}.tmp")
    old = target.with_name(f".{target.name}.{tmp_suffix()}.old")
    try:
        tmp.mkdir()
        write(tmp)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # save_file creates 0600 files; other users' engines must read them
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
