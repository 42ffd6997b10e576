"""A judge bound to an engine: turns (image, query[, response]) items into verdicts and unsafe scores.

Used by the Ray Data actor pool of ``rms-ray evaluate`` and by anything else that scores with a judge (training-time
validation, the HTTP service), so every caller builds the same requests and reads the same
:func:`~rms_ray.judge.prompt.unsafe_score`.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from rms_ray.data.images import ImagePolicy, NormalizedImage, normalize_image
from rms_ray.engine.vllm_engine import Engine, GenRequest, GenResult
from rms_ray.judge.config import JudgeConfig
from rms_ray.judge.prompt import load_judge_prompt, output_regex, parse_verdict, unsafe_score


@dataclass(frozen=True)
class JudgeItem:
    """One item to judge. ``image`` is an RGB PIL image (see :func:`prepare_image`)."""

    image: Image.Image
    query: str
    task: str = "prompt"
    response: str | None = None


@dataclass(frozen=True)
class JudgeOutput:
    """The judge's answer on one item.

    ``unsafe_score`` is P(unsafe) in [0, 1] (None when unparseable); ``verdict`` is the generated label (None when
    unparseable); ``latency_ms`` is the wall time of the engine call that scored the item (items are batched, so
    it is the batch's time, not a per-item service time).
    """

    verdict: str | None
    unsafe_score: float | None
    category: str | None
    rationale: str | None
    parsed: bool
    raw: str
    finish_reason: str | None
    error: str | None
    latency_ms: float


def image_policy(cfg: JudgeConfig) -> ImagePolicy:
    """The decode/resize policy of a judge config (the same decoder construction uses; PNG: no re-encoding loss).
    PNG at zlib level 1: the same pixels as level 6 in a third of the time (~25 vs ~75 ms for 512 px), which
    matters where the judge decodes per request (the HTTP service)."""
    return replace(cfg.images.policy(encode_format="PNG"), png_compress_level=1)


def prepare_image(data: bytes, path: str, policy: ImagePolicy) -> tuple[Image.Image | None, str | None]:
    """Decode and normalise image bytes for the judge: ``(rgb_image, None)`` or ``(None, reason)``; never raises.

    Reasons are those of :func:`rms_ray.data.images.normalize_image` (``truncated``, ``not_an_image``,
    ``decompression_bomb``, ...), prefixed ``image:``.
    """
    out = normalize_image(data, path or "", policy)
    if not isinstance(out, NormalizedImage):
        return None, f"image: {out.reason.value}: {out.detail}"
    img = Image.open(io.BytesIO(out.data))
    img.load()
    return img.convert("RGB"), None


class Judge:
    """Scores :class:`JudgeItem` batches with one engine.

    Args:
        cfg: the judge config (answer bounds, model).
        engine: an :class:`rms_ray.engine.VLMEngine` (or anything with ``generate``); created from ``cfg`` if None.
    """

    def __init__(self, cfg: JudgeConfig, engine: Engine | None = None) -> None:
        if engine is None:
            from rms_ray.engine.vllm_engine import VLMEngine

            engine = VLMEngine(cfg.model, cfg.resources)
        self.cfg = cfg
        self.engine = engine
        self.prompt = load_judge_prompt()
        self.regex = output_regex(cfg.judge.category_chars, cfg.judge.rationale_chars)

    def request(self, item: JudgeItem) -> GenRequest:
        """The engine request of one item (greedy; first-token log-probabilities requested)."""
        system, user = self.prompt.render(item.task, item.query, item.response)
        return GenRequest(system=system, user=user, schema=None, regex=self.regex,
                          max_tokens=self.cfg.judge.max_tokens, image=item.image, temperature=0.0,
                          logprobs=self.cfg.judge.top_logprobs)

    def score(self, items: list[JudgeItem]) -> list[JudgeOutput]:
        """Judge ``items`` in one batched engine call; one output per item, in order. Never raises on model output.

        Raises:
            ValueError: an item with an unknown task, or a response task without a response.
        """
        if not items:
            return []
        reqs = [self.request(it) for it in items]
        t0 = time.perf_counter()
        results = self.engine.generate(reqs)
        ms = (time.perf_counter() - t0) * 1000.0
        return [self._output(r, ms) for r in results]

    @staticmethod
    def _output(r: GenResult, ms: float) -> JudgeOutput:
        v = parse_verdict(r.text, r.finish_reason)
        score = unsafe_score(r.first_logprobs) if v.parsed else None
        error = v.error
        if v.parsed and score is None:  # no label token among the returned log-probabilities: cannot score
            error = "no verdict token among the first-token log-probabilities"
        return JudgeOutput(verdict=v.verdict, unsafe_score=score, category=v.category, rationale=v.rationale,
                           parsed=v.parsed and score is not None, raw=r.text, finish_reason=r.finish_reason,
                           error=error, latency_ms=ms)


def output_row(out: JudgeOutput) -> dict[str, Any]:
    """The prediction columns of one output (names as in ``predictions.parquet``)."""
    return {"verdict": out.verdict, "unsafe_score": out.unsafe_score, "judge_category": out.category,
            "rationale": out.rationale, "parsed": out.parsed, "raw": out.raw, "finish_reason": out.finish_reason,
            "error": out.error, "latency_ms": out.latency_ms}
