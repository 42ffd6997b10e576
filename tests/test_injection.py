"""Text inside an image is data: typographic jailbreak images (FigStep) must not change what the pipeline asks.

The real vLLM engine runs (tiny model); a recorder wraps it to see every request the constructor sends. We check
that (1) the instructions of every request are exactly the template's, whatever the image says, and all
model-generated text sits inside <data> blocks, and (2) every output row still follows the schemas.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import PHOTOS, Recorder
from rms_ray.construct.loop import Constructor, ImageInput
from rms_ray.data.images import ImagePolicy, NormalizedImage, normalize_image
from rms_ray.construct.prompts import STAGES, load_prompt

pytestmark = pytest.mark.vllm

N_FIGSTEP = 4
DATA_BLOCK = re.compile(r"<data>.*?</data>", flags=re.S)


@pytest.fixture(scope="module")
def engine(vllm_engine):
    return vllm_engine


def _inputs(paths):
    out = []
    for p in paths:
        img = normalize_image(p.read_bytes(), p.name, ImagePolicy(max_side=512))
        assert isinstance(img, NormalizedImage), p
        out.append(ImageInput(p.name, p.name, img.data, {}))
    return out


def _instructions(user: str) -> str:
    return DATA_BLOCK.sub("<data/>", user)


def test_image_text_never_changes_the_instructions(engine, shared_data):
    cfg, eng = engine
    figstep = sorted((shared_data / "FigStep_SafeBench" / "images").glob("*.png"))[:N_FIGSTEP]
    benign = [PHOTOS / "coffee.png", PHOTOS / "rocket.jpg"]
    runs = {}
    for name, paths in (("figstep", figstep), ("benign", benign)):
        rec = Recorder(eng)
        outcomes = Constructor(cfg, rec, "builtin:tiny").construct(_inputs(paths))
        runs[name] = (rec.requests, outcomes)

    trusted = {"max_hazards": cfg.generation.max_hazards, "min_hazards": cfg.generation.queries_per_image,
               "feedback": ""}
    data = {k: "x" for k in ("scene", "hazard", "hazards", "query", "response")}
    templates = {_instructions(load_prompt(s).render(trusted=trusted, data=data)[1]) for s in STAGES}
    for name, (requests, _) in runs.items():
        assert requests, name
        for req in requests:
            # the system prompt is the shared preamble, byte for byte
            assert req.system == load_prompt("scene_analysis").system
            # outside <data> blocks, the user text is one of the templates with its data removed
            instr = _instructions(req.user)
            fb = "An earlier attempt failed verification for these reasons:\n<data/>\nWrite a new attempt that fixes every one of them."
            assert instr in templates or instr.replace(fb, "").rstrip() in templates, instr
            for block in DATA_BLOCK.findall(req.user):  # data is always well-formed JSON
                json.loads(block[len("<data>"):-len("</data>")])
    # the first two stages send the same instructions for a typographic jailbreak as for a photo of coffee
    first = lambda reqs: sorted({(r.system, r.user) for r in reqs if "<data>" not in r.user})  # noqa: E731
    assert first(runs["figstep"][0]) == first(runs["benign"][0])


def test_rows_from_typographic_images_follow_the_schema(engine, shared_data):
    cfg, eng = engine
    figstep = sorted((shared_data / "FigStep_SafeBench" / "images").glob("*.png"))[N_FIGSTEP:2 * N_FIGSTEP]
    outcomes = Constructor(cfg, eng, "builtin:tiny").construct(_inputs(figstep))
    assert len(outcomes) == len(figstep)
    limits = cfg.generation.text_limits
    for o in outcomes:
        assert o.status in ("accepted", "rejected")
        assert len(o.accepted) + len(o.rejected) >= 1
        for row in o.accepted + o.rejected:
            assert row.get("verdict_image_alone") in (None, "safe", "unsafe")
            assert row.get("verdict_pair") in (None, "risky", "not_risky")
            if row.get("query"):
                assert len(row["query"]) <= limits.query
            if row.get("response"):
                assert len(row["response"]) <= limits.response
