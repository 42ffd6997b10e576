"""The self-adaptive loop against the real vLLM CPU engine (tiny model), observed through a recorder."""

from __future__ import annotations

import json
import re

import pytest

from conftest import PHOTOS, Recorder
from rms_ray.common.config import load_config
from rms_ray.construct.loop import Constructor, ImageInput, request_seed
from rms_ray.data.images import ImagePolicy, normalize_image

pytestmark = pytest.mark.vllm

NAMES = ("astronaut.png", "coffee.png", "rocket.jpg", "chelsea.png", "camera.png", "coins.png")


def _inputs(names=NAMES):
    out = []
    for n in names:
        img = normalize_image((PHOTOS / n).read_bytes(), n, ImagePolicy(max_side=512))
        out.append(ImageInput(n, n, img.data, {}))
    return out


def test_unparseable_output_is_retried_then_rejected_with_the_raw_text(vllm_engine):
    _, eng = vllm_engine
    cfg = load_config("cpu-tiny", {"generation.max_tokens.scene": 16, "generation.parse_retries": 1})
    rec = Recorder(eng)
    outcomes = Constructor(cfg, rec, "builtin:tiny").construct(_inputs(NAMES[:3]))
    scene_requests = [r for r in rec.requests if r.max_tokens == 16]
    assert len(scene_requests) == 2 * 3  # first try + one retry per image
    assert {r.temperature for r in scene_requests} == {0.0, cfg.generation.retry_temperature}
    for o in outcomes:
        assert o.status == "rejected" and not o.accepted and len(o.rejected) == 1
        row = o.rejected[0]
        assert row["stage"] == "scene_analysis" and row["candidate_index"] == -1
        assert "invalid_json" in row["reasons"][0] and "cut at max_tokens=16" in row["reasons"][0]
        assert row["raw_text"].startswith("{")  # what the model said, kept for inspection


def test_failures_are_fed_back_into_the_next_round(vllm_engine):
    cfg, eng = vllm_engine
    rec = Recorder(eng)
    outcomes = Constructor(cfg, rec, "builtin:tiny").construct(_inputs())
    rows = [r for o in outcomes for r in o.accepted + o.rejected if r["candidate_index"] >= 0]
    regenerated = [r for r in rows if r["rounds"] >= 2]
    assert regenerated, "with random verdicts some candidate needs a second round"
    prompts = [r.user for r in rec.requests]
    for r in regenerated:
        round1 = [x for x in r["reasons"] if x.startswith("round 1 ")]
        assert round1
        # the exact round-1 reasons, JSON-encoded inside a <data> block, appear in a later prompt
        fed = [p for p in prompts if "An earlier attempt failed verification" in p
               and any(json.dumps(x.split(" ", 2)[2], ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
                       in p for x in round1)]
        assert fed, r["sample_id"]
    accepted = {x["sample_id"] for o in outcomes for x in o.accepted}
    for r in rows:
        assert 1 <= r["rounds"] <= cfg.generation.max_rounds
        if r["sample_id"] in accepted:
            assert (r["verdict_query_alone"], r["verdict_pair"], r["verdict_response"]) == ("safe", "risky", "safe")


def test_each_image_gets_queries_per_image_candidates_and_stable_ids(vllm_engine):
    cfg, eng = vllm_engine
    outcomes = Constructor(cfg, eng, "builtin:tiny").construct(_inputs())
    for o in outcomes:
        rows = o.accepted + o.rejected
        if rows[0]["candidate_index"] == -1:  # rejected before candidates (scene or image-alone)
            assert len(rows) == 1 and rows[0]["sample_id"] == f"{o.image_id}-img"
            continue
        assert sorted(r["candidate_index"] for r in rows) == list(range(cfg.generation.queries_per_image))
        assert {r["sample_id"] for r in rows} == {f"{o.image_id}-{k}" for k in range(cfg.generation.queries_per_image)}


def test_request_seed_is_stable_and_depends_on_every_part():
    a = request_seed(0, "scene_analysis", "img_1")
    assert a == request_seed(0, "scene_analysis", "img_1") and 0 <= a < 2**31
    assert len({a, request_seed(1, "scene_analysis", "img_1"), request_seed(0, "verify_pair", "img_1"),
                request_seed(0, "scene_analysis", "img_2")}) == 4
    assert re.fullmatch(r"\d+", str(a))
