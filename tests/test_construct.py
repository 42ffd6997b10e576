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


# ---------------------------------------------------------------------------------------------- the safe side

SAFE_SIDE_STAGES = {"contrast_query", "verify_contrast", "naive_response"}
CONTRAST_COLS = ("contrast_query", "contrast_rounds", "verdict_contrast", "reason_contrast")
NAIVE_COLS = ("naive_response", "naive_rounds", "verdict_naive_response", "reason_naive_response")


def _stage(req) -> str:
    """The step of a recorded request (``tag`` is ``(stage, *seed parts)``); naive checks reuse verify_response."""
    return "verify_naive" if req.tag[0] == "verify_response" and "naive" in req.tag else req.tag[0]


def _data(value) -> str:
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")


def _check_safe_side_rows(outcomes, max_rounds):
    """Stored verdicts agree with acceptance; failures carry a reason; an image's rows share its contrast query."""
    for o in outcomes:
        rows = [r for r in o.accepted + o.rejected if r["candidate_index"] >= 0]
        assert len({tuple(r[k] for k in CONTRAST_COLS) for r in rows}) <= 1, o.image_id
        for r in rows:
            assert 1 <= r["contrast_rounds"] <= max_rounds
            if r["contrast_query"] is not None:
                assert r["verdict_contrast"] == "safe" and r["reason_contrast"], r
            else:  # failed after its whole budget, with the latest failure kept
                assert r["contrast_rounds"] == max_rounds and r["verdict_contrast"] in (None, "unsafe")
                assert re.match(r"round \d+ (contrast=unsafe|contrast_query|verify_contrast)", r["reason_contrast"])
        for r in o.accepted:
            assert 1 <= r["naive_rounds"] <= max_rounds
            if r["naive_response"] is not None:
                assert r["verdict_naive_response"] == "unsafe" and r["reason_naive_response"], r
            else:
                assert r["naive_rounds"] == max_rounds and r["verdict_naive_response"] in (None, "safe")
                assert re.match(r"round \d+ (naive_response|verify_naive_response)", r["reason_naive_response"])
        assert o.status == ("accepted" if o.accepted else "rejected")  # the safe side never rejects a sample


def test_contrast_queries_and_naive_responses_are_verified(vllm_engine):
    cfg, eng = vllm_engine
    assert cfg.generation.contrast.query and cfg.generation.contrast.naive_response  # on by default
    rec = Recorder(eng)
    outcomes = Constructor(cfg, rec, "builtin:tiny").construct(_inputs())
    _check_safe_side_rows(outcomes, cfg.generation.max_rounds)
    by_stage = {}
    for r in rec.requests:
        by_stage.setdefault(_stage(r), []).append(r)
    accepted = [r for o in outcomes for r in o.accepted]
    assert accepted, "the fixed-seed tiny model accepts a few samples"
    # every stored text is exactly one that went through its own verification request, with the image
    for r in accepted:
        if r["contrast_query"]:
            checks = [q for q in by_stage["verify_contrast"] if _data(r["contrast_query"]) in q.user]
            assert checks and all(q.image is not None for q in checks), r["sample_id"]
        if r["naive_response"]:
            checks = [q for q in by_stage["verify_naive"] if _data(r["naive_response"]) in q.user]
            assert checks and all(q.image is not None and _data(r["query"]) in q.user for q in checks)
    assert any(r["contrast_query"] for r in accepted) and any(r["naive_response"] for r in accepted)
    # one contrast query per image with candidates (not per candidate), each try within its budget
    with_candidates = {o.image_id for o in outcomes if any(r["candidate_index"] >= 0 for r in o.accepted + o.rejected)}
    assert {q.tag[1] for q in by_stage["contrast_query"]} == with_candidates
    per_image_round = [(q.tag[1], q.tag[2]) for q in by_stage["contrast_query"] if q.temperature == 0.0]
    assert len(per_image_round) == len(set(per_image_round))


def test_failed_safe_side_is_recorded_fed_back_and_never_rejects(vllm_engine):
    """Outputs cut at 16 tokens (the config's floor) almost never parse: the contrast queries and naive responses
    spend their whole budget, with the failure fed back each round, and the accepted samples stay accepted. (A
    float32 engine on an AVX2 machine once closed a short contrast query within 16 tokens; it was then verified
    unsafe, another recorded failure.)"""
    _, eng = vllm_engine
    cfg = load_config("cpu-tiny", {"generation.max_tokens.contrast_query": 16,
                                   "generation.max_tokens.naive_response": 16})
    max_rounds = cfg.generation.max_rounds
    rec = Recorder(eng)
    outcomes = Constructor(cfg, rec, "builtin:tiny").construct(_inputs())
    _check_safe_side_rows(outcomes, max_rounds)
    accepted = [r for o in outcomes for r in o.accepted]
    assert accepted
    for r in accepted:
        assert r["contrast_query"] is None and r["contrast_rounds"] == max_rounds
        assert r["reason_contrast"].startswith(f"round {max_rounds} contrast")
        assert r["naive_response"] is None and r["naive_rounds"] == max_rounds
        assert "cut at max_tokens=16" in r["reason_naive_response"]
    assert sum(r["reason_contrast"].startswith(f"round {max_rounds} contrast_query: invalid_json")
               for r in accepted) >= len(accepted) / 2
    # the reason of round n is in the prompt of round n + 1 (first tries only; retries are the same prompt)
    firsts = [q for q in rec.requests if _stage(q) in ("contrast_query", "naive_response") and q.temperature == 0.0]
    fed = [q for q in firsts if "An earlier attempt failed verification" in q.user]
    assert fed and sum("invalid_json" in q.user for q in fed) >= len(fed) / 2
    # the budget belongs to the final query and is spent in full, even past the candidates' last round
    for r in accepted:
        image_id, k = r["image_id"], r["candidate_index"]
        tries = [q for q in firsts if _stage(q) == "naive_response" and q.tag[1:3] == (image_id, k)
                 and _data(r["query"]) in q.user]
        assert len(tries) == max_rounds, r["sample_id"]


def test_contrast_off_sends_no_extra_requests(vllm_engine):
    _, eng = vllm_engine
    cfg = load_config("cpu-tiny", {"generation.contrast": False})
    assert not cfg.generation.contrast.query and not cfg.generation.contrast.naive_response
    rec = Recorder(eng)
    calls = []
    generate = rec.generate
    rec.generate = lambda reqs: calls.append(len(reqs)) or generate(reqs)
    outcomes = Constructor(cfg, rec, "builtin:tiny").construct(_inputs(NAMES[:4]))
    assert {_stage(q) for q in rec.requests} <= {"scene_analysis", "verify_image_alone", "query_synthesis",
                                                 "guidance_response", "verify_query_alone", "verify_pair",
                                                 "verify_response"}
    # scene + image check, then 3 calls per round at most, each re-asked at most parse_retries times
    g = cfg.generation
    assert len(calls) <= (1 + 3 * g.max_rounds) * (1 + g.parse_retries)
    rows = [r for o in outcomes for r in o.accepted + o.rejected]
    assert rows and all(r.get(k) is None for r in rows for k in CONTRAST_COLS + NAIVE_COLS)
