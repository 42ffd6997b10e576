"""Typed config of a judge run (evaluate, train, serve), loaded by the one config loader.

A judge profile in ``configs/judge-*.yaml`` names the judge model, the engine actor pool's resources, the image
policy, the judge's answer bounds and (``train:``) how ``rms-ray train-judge`` fine-tunes it. ``--judge`` on the
command line overrides ``model.source`` (same forms as everywhere: ``builtin:<preset>``, a local folder, a hub id).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from rms_ray.common.config import ImagesConfig, ModelConfig, ResourcesConfig, _Strict, load_config


class JudgeSettings(_Strict):
    """The judge's answer (see :mod:`rms_ray.judge.prompt`)."""

    category_chars: int = Field(40, ge=1, le=200, description="max characters of the category line")
    rationale_chars: int = Field(160, ge=1, le=1000, description="max characters of the rationale line")
    max_tokens: int = Field(96, ge=2, description="generation cap; the verdict is token 1")
    top_logprobs: int = Field(20, ge=2, le=20, description="first-token log-probabilities returned (vLLM caps at 20)")


class EvaluateSettings(_Strict):
    """Metric settings of ``rms-ray evaluate``."""

    threshold: float = Field(0.5, ge=0, le=1, description="unsafe if score >= threshold (unless --threshold-from)")
    n_boot: int = Field(1000, ge=0, le=100_000, description="bootstrap resamples for the 95% intervals (0: none)")
    seed: int = 0


#: Modules PEFT puts LoRA adapters on by default: every linear layer of a Qwen2/2.5 decoder block.
QWEN_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSettings(_Strict):
    """LoRA adapters (PEFT ``LoraConfig``: ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``).

    ``target_modules`` are module-name suffixes. With ``train.freeze_vision`` they are matched in the language
    model only (Qwen's vision blocks also have ``gate_proj``/``up_proj``/``down_proj``); otherwise everywhere.
    """

    r: int = Field(16, ge=1, le=1024, description="adapter rank")
    alpha: float = Field(32.0, gt=0, le=4096, description="scaling numerator: updates are scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: tuple[str, ...] = Field(QWEN_LINEAR_MODULES, min_length=1,
                                            description="module-name suffixes that get an adapter")


class CheckpointSettings(_Strict):
    """Which Ray Train checkpoints are kept (``CheckpointConfig``) and which one becomes the judge."""

    num_to_keep: int = Field(2, ge=1, le=1000, description="checkpoints kept (the best by `metric`; the latest is "
                             "always kept too, for resume)")
    metric: Literal["val_auprc", "val_f1", "val_loss"] = Field(
        "val_auprc", description="validation metric that ranks checkpoints (val_loss: lower is better); without a "
        "validation set the latest checkpoint is the judge")


class TrainSettings(_Strict):
    """``rms-ray train-judge``: supervised fine-tuning of the judge under Ray Train (see
    :mod:`rms_ray.judge.train`).

    **Budget.** Give exactly one of ``examples_seen`` (training examples the optimiser sees, summed over workers,
    e.g. 20000) or ``epochs`` (passes over the training rows, fractional allowed). Either is turned into a number of
    optimiser steps ``ceil(examples / global_batch)`` with ``global_batch = batch_size * num_workers * grad_accum``,
    so the examples actually seen are rounded up to a whole step (recorded in ``judge_meta.json``). Comparing
    datasets fairly means the same ``examples_seen`` for each.
    """

    method: Literal["lora", "full"] = Field("lora", description="lora: PEFT adapters (merged into the saved "
                                            "weights); full: every unfrozen weight is trained")
    lora: LoraSettings = LoraSettings()
    freeze_vision: bool = Field(True, description="keep the vision tower's blocks fixed (no adapters there)")
    freeze_projector: bool = Field(True, description="keep the vision->language merger fixed (false: trained in "
                                   "full, also with LoRA)")
    lr: float = Field(2e-4, gt=0, le=1.0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW weight decay (matrices only)")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of the optimiser steps with a linear warm-up")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after the warm-up")
    max_grad_norm: float = Field(1.0, gt=0, le=1000, description="gradient clipping (global L2 norm)")
    batch_size: int = Field(4, ge=1, le=4096, description="examples per micro-batch, per worker")
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches per optimiser step")
    examples_seen: int | None = Field(None, ge=1, le=10**10, description="training budget in examples (see above)")
    epochs: float | None = Field(None, gt=0, le=10_000, description="training budget in passes (see above)")
    num_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers (data-parallel replicas, DDP)")
    cpus_per_worker: float = Field(1.0, gt=0, le=1024, description="CPUs each worker reserves (fractional on small "
                                   "machines: two workers of 1 CPU take both cores of a 2-core machine)")
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL); false: CPU workers (gloo)")
    precision: Literal["auto", "float32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs with bf16 and on CPUs with avx512_bf16/amx_bf16, else "
        "float32 (rms_ray.engine.dtype); weights and optimiser state stay float32 either way")
    eval_every_steps: int = Field(50, ge=1, description="validate and checkpoint every N optimiser steps (and at "
                                  "the end)")
    checkpoint: CheckpointSettings = CheckpointSettings()
    max_failures: int = Field(2, ge=0, le=100, description="worker-group restarts from the last checkpoint after a "
                              "worker dies (Ray Train FailureConfig.max_failures)")
    seed: int = Field(0, ge=0, description="weights of new adapters, data order, dropout")
    max_len: int | None = Field(None, ge=64, le=131_072, description="tokens of prompt + answer (None: "
                                "model.max_model_len); longer rows are excluded before training, with their reason")
    shuffle_buffer_rows: int = Field(256, ge=1, le=1_000_000, description="per-worker local shuffle buffer (rows) "
                                     "of each epoch, on top of one seeded global order")

    @model_validator(mode="after")
    def _one_budget(self) -> "TrainSettings":
        if (self.examples_seen is None) == (self.epochs is None):
            raise ValueError("give exactly one of examples_seen or epochs (the training budget)")
        return self


class JudgeConfig(_Strict):
    """Everything a judge command needs. Load with :func:`load_judge_config`."""

    profile: str = "custom"
    model: ModelConfig = ModelConfig()
    resources: ResourcesConfig = ResourcesConfig()
    images: ImagesConfig = ImagesConfig()
    judge: JudgeSettings = JudgeSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    train: TrainSettings = TrainSettings(epochs=1)

    @model_validator(mode="after")
    def _train_fits_the_engine(self) -> "JudgeConfig":
        # A judge trained on prompts the engine then refuses (longer than max_model_len) would be useless.
        if self.train.max_len is not None and self.train.max_len > self.model.max_model_len:
            raise ValueError(f"train.max_len ({self.train.max_len}) > model.max_model_len "
                             f"({self.model.max_model_len}): the judge could not be served on what it was trained on")
        return self

    def config_hash(self) -> str:
        """sha256 (16 hex) of everything that shapes a prediction: all but ``profile``, ``resources`` and ``train``
        (how a judge was trained is recorded with the trained judge, not in the hash of a run that uses it)."""
        content = self.model_dump(mode="json", exclude={"profile", "resources", "train"})
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def load_judge_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None,
                      origins: dict[str, str] | None = None) -> JudgeConfig:
    """Read and validate a judge profile (a YAML path or a name in ``configs/``); ``origins`` as in
    :func:`rms_ray.common.config.load_config` (how each override was given, named in errors).

    Raises:
        rms_ray.common.config.ConfigError: unreadable YAML, unknown keys or invalid values (by key path).
    """
    return load_config(name_or_path, overrides, schema=JudgeConfig, origins=origins)
