"""Typed config of the judge service: a judge profile (:class:`~rms_ray.judge.config.JudgeConfig`) plus ``serve:``.

A serving profile (``configs/serve-*.yaml``) is a judge profile with one more section, so the served judge is built
from exactly the settings ``rms-ray evaluate`` uses (model, resources, images, judge answer bounds: same prompt,
same numbers). It is loaded by the one config loader (:func:`rms_ray.common.config.load_config`) with
``schema=ServeConfig``. Every bound is validated at load time, with the key path in the message.

Resources of one model replica come from ``resources`` (``num_cpus_per_engine``, ``num_gpus_per_engine``: a
replica owns one engine); how many replicas, their queues and autoscaling come from ``serve``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from rms_ray.common.config import _Strict, load_config
from rms_ray.judge.config import JudgeConfig

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MiB = 1 << 20


class AutoscalingSettings(_Strict):
    """Ray Serve autoscaling of the model deployment (``autoscaling_config``; see Ray Serve's
    ``AutoscalingConfig``). A replica is one engine, i.e. one GPU on a GPU profile."""

    min_replicas: int = Field(1, ge=0, le=1000)
    max_replicas: int = Field(2, ge=1, le=1000)
    target_ongoing_requests: float = Field(32.0, gt=0, le=10_000, description="requests in flight per replica the "
                                           "autoscaler aims for (the engine batches them)")
    upscale_delay_s: float = Field(30.0, ge=0, le=3600)
    downscale_delay_s: float = Field(600.0, ge=0, le=86_400)

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ServeSettings(_Strict):
    """The ``serve:`` section: HTTP, batching, replicas, queues, input limits, allow-lists, auth."""

    host: str = Field("127.0.0.1", description="HTTP bind address of `rms-ray serve` (0.0.0.0 to expose it)")
    port: int = Field(8000, ge=1, le=65535)
    model_name: str | None = Field(None, min_length=1, max_length=200,
                                   description="name in /v1/models and the `model` field (None: model.source)")
    # How requests from different callers share the engine (measured in benchmarks/serve_load.py):
    #   continuous  - each item is submitted to the engine's step loop at once (VLMEngine.submit) and joins the
    #                 running batch at the next step;
    #   serve_batch - Ray Serve's @serve.batch collects items for up to batch_wait_timeout_s (max_batch_size)
    #                 and runs them as one engine call; the next batch waits for it (lock-step);
    #   none        - one item at a time through engine.generate (the benchmark's unbatched baseline).
    batching: Literal["continuous", "serve_batch", "none"] = "continuous"
    max_batch_size: int = Field(32, ge=1, le=1024, description="serve_batch: items per engine call")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5, description="serve_batch: wait for a fuller batch")
    num_replicas: int = Field(1, ge=1, le=1000, description="model replicas (one engine each); or autoscaling")
    autoscaling: AutoscalingSettings | None = None
    max_ongoing_requests: int = Field(64, ge=1, le=10_000, description="requests in flight per model replica")
    max_queued_requests: int = Field(128, ge=1, le=100_000, description="requests waiting per caller before 503 "
                                     "(Serve's bounded queue; -1 = unbounded is not allowed here)")
    ingress_replicas: int = Field(1, ge=1, le=100)
    ingress_num_cpus: float = Field(0.1, gt=0, le=64, description="CPUs of one HTTP ingress replica (decodes images)")
    ingress_max_ongoing_requests: int = Field(512, ge=1, le=100_000)
    ingress_max_queued_requests: int = Field(1024, ge=1, le=100_000, description="requests the proxy holds for the "
                                             "ingress before its own 503 (a burst waits here while being routed; "
                                             "the model's queue above is the one that sheds load)")
    request_timeout_s: float = Field(120.0, gt=0, le=3600, description="engine wait per request; then 504")
    replica_death_retries: int = Field(1, ge=0, le=3, description="resends of a request whose model replica died "
                                       "(requests are idempotent: greedy judge, seeded chat)")
    # input limits (each violation is a 4xx with a JSON error; checked before any decoding)
    max_items_per_request: int = Field(32, ge=1, le=1024)
    max_request_bytes: int = Field(64 * MiB, ge=1024, le=1 << 30, description="HTTP body size, bytes")
    max_image_bytes: int = Field(8 * MiB, ge=1024, le=1 << 30, description="one encoded image, bytes")
    max_image_pixels: int = Field(25_000_000, ge=1024, le=1_000_000_000,
                                  description="declared width*height, read from the header before decoding")
    max_text_chars: int = Field(8000, ge=16, le=1_000_000, description="a query, response or chat message")
    max_tokens: int = Field(256, ge=1, le=32_768, description="cap on a chat completion's max_tokens")
    default_max_tokens: int = Field(128, ge=1, le=32_768, description="chat max_tokens when the request has none")
    # where an image may come from besides an inline base64 data URL (both empty: data URLs only)
    allow_urls: tuple[str, ...] = Field((), description="URL prefixes (scheme://host[:port]/path) the service may "
                                        "fetch; link-local addresses are refused even when listed")
    allow_paths: tuple[str, ...] = Field((), description="absolute folders whose files may be named by path")
    url_timeout_s: float = Field(10.0, gt=0, le=300)
    max_redirects: int = Field(3, ge=0, le=10, description="each hop re-checked against allow_urls")
    auth_token_env: str | None = Field(None, description="environment variable holding the bearer token (never "
                                       "the token itself); None: no auth")

    @field_validator("allow_urls")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for u in v:
            parts = urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"allow_urls entry {u!r} must be an http(s) URL with a host")
            if parts.query or parts.fragment or parts.username or parts.password:
                raise ValueError(f"allow_urls entry {u!r}: no query, fragment or credentials in a prefix")
        return v

    @field_validator("allow_paths")
    @classmethod
    def _paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if not os.path.isabs(p):
                raise ValueError(f"allow_paths entry {p!r} must be an absolute folder")
        return v

    @field_validator("auth_token_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError(f"{v!r} is not an environment variable name (give the variable's name, not the token)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ServeSettings":
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) > max_tokens ({self.max_tokens})")
        if self.autoscaling is not None and self.num_replicas != 1:
            raise ValueError("give either num_replicas or autoscaling, not both")
        if self.max_image_bytes > self.max_request_bytes:
            raise ValueError(f"max_image_bytes ({self.max_image_bytes}) > max_request_bytes "
                             f"({self.max_request_bytes})")
        return self

    def replica_counts(self) -> dict[str, Any]:
        """``num_replicas`` or ``autoscaling_config`` for the model deployment's ``.options(...)``."""
        if self.autoscaling is None:
            return {"num_replicas": self.num_replicas}
        return {"autoscaling_config": self.autoscaling.model_dump()}


class ServeConfig(JudgeConfig):
    """A judge profile plus the ``serve:`` section. Load with :func:`load_serve_config`."""

    serve: ServeSettings = ServeSettings()

    @model_validator(mode="after")
    def _fits_model(self) -> "ServeConfig":
        if self.serve.max_tokens >= self.model.max_model_len:
            raise ValueError(f"serve.max_tokens ({self.serve.max_tokens}) must be below model.max_model_len "
                             f"({self.model.max_model_len}): the prompt needs room too")
        return self

    def judge_config(self) -> JudgeConfig:
        """The judge part alone (what ``rms-ray evaluate`` would run with the same sections)."""
        return JudgeConfig.model_validate(self.model_dump(exclude={"serve"}))

    def config_hash(self) -> str:
        """The judge's config hash (as in ``evaluate``'s ``metrics.json``): ``serve`` never changes a score."""
        return self.judge_config().config_hash()

    def served_model_name(self) -> str:
        """The ``model`` id clients name (``serve.model_name``, else ``model.source``)."""
        return self.serve.model_name or self.model.source


def load_serve_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None,
                      origins: dict[str, str] | None = None) -> ServeConfig:
    """Read and validate a serving profile (a YAML path or a name in ``configs/``, e.g. ``serve-cpu-tiny``).

    Raises:
        rms_ray.common.config.ConfigError: unreadable YAML, unknown keys or invalid values (by key path).
    """
    return load_config(name_or_path, overrides, schema=ServeConfig, origins=origins)
