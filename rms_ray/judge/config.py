"""Typed config of a judge run (evaluate now; training and serving build on it), loaded by the one config loader.

A judge profile in ``configs/judge-*.yaml`` names the judge model, the engine actor pool's resources, the image
policy and the judge's answer bounds. ``--judge`` on the command line overrides ``model.source`` (same forms as
everywhere: ``builtin:<preset>``, a local folder, a hub id).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from rms_ray.common.config import ImagesConfig, ModelConfig, ResourcesConfig, _Strict, load_config, shaping_hash


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


class JudgeConfig(_Strict):
    """Everything a judge command needs. Load with :func:`load_judge_config`."""

    profile: str = "custom"
    model: ModelConfig = ModelConfig()
    resources: ResourcesConfig = ResourcesConfig()
    images: ImagesConfig = ImagesConfig()
    judge: JudgeSettings = JudgeSettings()
    evaluate: EvaluateSettings = EvaluateSettings()

    def config_hash(self) -> str:
        """sha256 (16 hex) of everything that shapes a prediction (all but ``profile`` and ``resources``)."""
        return shaping_hash(self)


def load_judge_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None,
                      origins: dict[str, str] | None = None) -> JudgeConfig:
    """Read and validate a judge profile (a YAML path or a name in ``configs/``); ``origins`` as in
    :func:`rms_ray.common.config.load_config` (how each override was given, named in errors).

    Raises:
        rms_ray.common.config.ConfigError: unreadable YAML, unknown keys or invalid values (by key path).
    """
    return load_config(name_or_path, overrides, schema=JudgeConfig, origins=origins)
