"""The vLLM engine wrapper: one ``vllm.LLM`` per Ray actor, batched chat generation with JSON-schema outputs.

Why a ``map_batches`` actor pool that owns a ``vllm.LLM`` instead of ``ray.data.llm.build_processor``: the
construction of one image is a chain of dependent generations (scene -> query -> response -> four verifications
-> regenerate the failures, up to ``max_rounds``). ``build_processor`` gives one engine per processor; expressing
the chain with it means one processor (and one model copy, i.e. one GPU) per step, with the self-adaptive loop
unrolled into ``max_rounds`` copies of the chain. Owning the engine in the actor keeps one model copy per replica,
runs every step of a batch of images as one batched ``LLM.chat`` call, and keeps the loop a plain loop. Ray Data
still streams images into the pool and scales it (``ResourcesConfig.engine_replicas``). Ray's own docs describe
this pattern (a stateful callable class passed to ``map_batches`` with an actor pool) for batch inference.
"""

from __future__ import annotations

import os
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from rms_ray.common.config import ModelConfig, ResourcesConfig

# Defaults that make the vLLM CPU build behave on small machines; a profile's ``model.env`` overrides them.
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the CPU default is sized for servers
    "HF_HUB_OFFLINE": "1",  # never reach for a hub at run time; real ids must be in the local cache
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: ~3 s start instead of ~16 s, one process per actor
    "OMP_NUM_THREADS": "1",
}


CPU_MIN_BATCHED_TOKENS = 65536


def resolve_model_source(source: str) -> str:
    """Turn ``ModelConfig.source`` into something ``vllm.LLM(model=...)`` accepts.

    ``builtin:<preset>`` builds (once, cached) the tiny random Qwen2.5-VL of :mod:`rms_ray.testing.tiny_model`; a local
    folder is returned as an absolute path; anything else is passed through as a hub id.
    """
    if source.startswith("builtin:"):
        from rms_ray.testing.tiny_model import ensure_tiny_vlm

        return str(ensure_tiny_vlm(source.split(":", 1)[1]))
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


@dataclass(frozen=True)
class GenRequest:
    """One chat generation, constrained by a JSON schema (``schema``) or a regular expression (``regex``).

    ``image`` is an RGB PIL image or None (text-only request); ``seed`` makes sampling reproducible per request.
    ``logprobs``: how many top log-probabilities to return for each generated position (None: none). The values
    are vLLM's ``raw_logprobs``: computed after the structured-output mask and before temperature/top-k/top-p, so
    a label the grammar allows keeps its probability whatever the sampling settings (see
    :func:`rms_ray.judge.prompt.unsafe_score`).
    """

    system: str
    user: str
    schema: dict[str, Any] | None
    max_tokens: int
    image: Image.Image | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    regex: str | None = None
    logprobs: int | None = None
    tag: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class GenResult:
    """Text and token count of one request's output.

    ``first_logprobs`` maps decoded token text -> log-probability at the first generated position (only when the
    request asked for ``logprobs``); ``finish_reason`` starts with ``"error: "`` for a request the engine refused.
    """

    text: str
    num_tokens: int
    finish_reason: str | None
    first_logprobs: dict[str, float] | None = None


def apply_engine_env(model_cfg: ModelConfig, num_gpus: float) -> None:
    """Set vLLM environment variables in this process, before ``vllm`` is imported (CPU defaults only on CPU)."""
    env = dict(CPU_ENV_DEFAULTS) if num_gpus == 0 else {"HF_HUB_OFFLINE": "1"}
    env.update(model_cfg.env)
    for key, value in env.items():
        if key == "OMP_NUM_THREADS" and key in os.environ and key not in model_cfg.env:
            continue  # Ray already sized the thread pool to the actor's CPUs
        os.environ[key] = value


class VLMEngine:
    """One vLLM engine in this process.

    Args:
        model_cfg: which model and how vLLM loads it.
        resources: tensor parallelism and whether GPUs are used.
    Raises:
        Whatever ``vllm.LLM`` raises for a model it cannot load (a missing path, an unsupported architecture).
    """

    def __init__(self, model_cfg: ModelConfig, resources: ResourcesConfig, seed: int = 0) -> None:
        apply_engine_env(model_cfg, resources.num_gpus_per_engine)
        from vllm import LLM

        self.model_id = model_cfg.source
        kwargs: dict[str, Any] = dict(
            model=resolve_model_source(model_cfg.source),
            dtype=model_cfg.dtype,
            max_model_len=model_cfg.max_model_len,
            limit_mm_per_prompt={"image": 1, "video": 0},
            structured_outputs_config={"backend": model_cfg.structured_outputs_backend, "disable_any_whitespace": True},
            tensor_parallel_size=resources.tensor_parallel_size,
            trust_remote_code=model_cfg.trust_remote_code,
            seed=seed,
        )
        if resources.num_gpus_per_engine == 0:
            kwargs["enforce_eager"] = True  # no CUDA graphs / compilation on the CPU
            # vLLM(-cpu 0.29) crashes ("CPU Generator does not use offset") when a seeded request's prefill is
            # chunked. A token budget larger than any batch we send keeps prefills whole.
            kwargs["max_num_batched_tokens"] = max(CPU_MIN_BATCHED_TOKENS, model_cfg.max_model_len)
        if model_cfg.max_num_seqs:
            kwargs["max_num_seqs"] = model_cfg.max_num_seqs
        kwargs.update(model_cfg.engine_kwargs)
        self.llm = LLM(**kwargs)

    @staticmethod
    def messages(req: GenRequest) -> list[dict[str, Any]]:
        """OpenAI-style chat messages for ``req``; the image goes first in the user turn, as Qwen-VL expects."""
        content: list[dict[str, Any]] = []
        if req.image is not None:
            content.append({"type": "image_pil", "image_pil": req.image})
        content.append({"type": "text", "text": req.user})
        return [{"role": "system", "content": req.system}, {"role": "user", "content": content}]

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Run ``requests`` as one batch; returns one result per request, in order. Empty in, empty out.

        A request vLLM refuses (e.g. a prompt longer than ``max_model_len``) does not fail the batch: it comes back
        with ``text=""`` and ``finish_reason="error: ..."``, and the caller records it as a rejection.
        """
        if not requests:
            return []
        params = [self.sampling_params(r) for r in requests]
        try:
            outputs = self.llm.chat([self.messages(r) for r in requests], params, use_tqdm=False)
        except _refused_classes() as e:  # one bad request (e.g. longer than max_model_len) must not fail the others
            if len(requests) == 1:
                return [_refused(e)]
            # vLLM aborts what it had added; rerun one by one so only the offending requests fail.
            return [self._one(r, p) for r, p in zip(requests, params)]
        return [_result(o.outputs[0]) for o in outputs]

    @staticmethod
    def sampling_params(r: GenRequest) -> Any:
        """The ``vllm.SamplingParams`` of one request (the one place they are built)."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        constraint = StructuredOutputsParams(regex=r.regex) if r.regex else StructuredOutputsParams(json=r.schema)
        return SamplingParams(
            max_tokens=r.max_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            seed=r.seed if r.temperature > 0 else None,  # greedy needs none; see CPU note in __init__
            structured_outputs=constraint,
            logprobs=r.logprobs,
        )

    def _one(self, request: GenRequest, params: Any) -> GenResult:
        try:
            return _result(self.llm.chat([self.messages(request)], [params], use_tqdm=False)[0].outputs[0])
        except _refused_classes() as e:
            return _refused(e)


@lru_cache(maxsize=1)
def _refused_classes() -> tuple[type[BaseException], ...]:
    # vLLM (vllm-cpu 0.29) raises VLLMValidationError for a prompt over max_model_len; it is not a ValueError.
    try:
        from vllm.exceptions import VLLMValidationError

        return (ValueError, VLLMValidationError)
    except ImportError:  # older/newer vLLM without that module
        return (ValueError,)



def _refused(e: BaseException) -> GenResult:
    return GenResult(text="", num_tokens=0, finish_reason=f"error: {type(e).__name__}: {str(e)[:300]}")


def _result(o: Any) -> GenResult:
    first = None
    if o.logprobs:  # list over generated positions of {token_id: Logprob(logprob, rank, decoded_token)}
        first = {(lp.decoded_token if lp.decoded_token is not None else str(tid)): float(lp.logprob)
                 for tid, lp in o.logprobs[0].items()}
    return GenResult(text=o.text, num_tokens=len(o.token_ids), finish_reason=o.finish_reason, first_logprobs=first)
