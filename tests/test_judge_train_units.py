"""Judge training pieces that need no Ray: the target answer, the one rendering (checked against vLLM's own prompt
tokens), batching, the config's train section, and every bad input refused before Ray starts."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rms_ray.common.config import ConfigError
from rms_ray.data.labelled import LabelledWriter
from rms_ray.judge.config import load_judge_config
from rms_ray.judge.prompt import output_regex, parse_verdict
from rms_ray.judge.train import TrainError, run_train
from rms_ray.judge.train_data import (
    RATIONALES,
    answer_token_ids,
    collate,
    render_judge_example,
    target_answer,
    target_category,
)
from rms_ray.testing.synthetic_safety import synthetic_rows, write_synthetic_safety

RMS_RAY = Path(sys.executable).parent / "rms-ray"


def _cfg(**sets):
    return load_judge_config("judge-cpu-tiny", {"model.source": "builtin:tiny-train", **sets})


# -- the target answer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,label,category", [
    ("prompt", "unsafe", "Weapons & arms"), ("prompt", "safe", "fire"), ("response", "unsafe", None),
    ("response", "safe", None), ("prompt", "unsafe", "self-harm: cutting <script>\n"), ("prompt", "unsafe", "###"),
])
def test_target_answer_is_a_valid_judge_answer(task, label, category):
    cfg = _cfg()
    ans = target_answer(task, label, category, category_chars=cfg.judge.category_chars,
                        rationale_chars=cfg.judge.rationale_chars)
    assert re.fullmatch(output_regex(cfg.judge.category_chars, cfg.judge.rationale_chars), ans), ans
    v = parse_verdict(ans)
    assert v.verdict == label and v.rationale == RATIONALES[(task, label)][:cfg.judge.rationale_chars].strip()
    assert v.category == target_category(label, category, cfg.judge.category_chars)
    assert (v.category == "none") == (label == "safe")


def test_a_missing_category_in_any_spelling_is_unspecified():
    """Rows read through pandas carry a missing category as NaN or pandas.NA (whose truth value raises): found when
    compare-datasets trained on an MMSafeAware split."""
    import pandas as pd

    for missing in (None, float("nan"), pd.NA, ""):
        assert target_category("unsafe", missing, 16) == "unspecified", missing
    assert target_category("unsafe", "fire\nsmoke", 16) == "fire smoke"
    cats = pd.Series(["fire", None], dtype="string")  # the nullable dtype gives pandas.NA
    assert sorted({target_category("unsafe", c, 16) for c in cats}) == ["fire", "unspecified"]


def test_target_answer_refuses_unknown_labels():
    with pytest.raises(ValueError, match="label"):
        target_answer("prompt", "harmful", None, category_chars=16, rationale_chars=32)


# -- the one rendering ---------------------------------------------------------------------------------------------
def _image(color=(200, 40, 40), size=56):
    return Image.new("RGB", (size, size), color)


def test_rendering_is_the_prompt_vllm_builds(vllm_engine):
    """The prompt tokens of a training example are exactly those vLLM prefills for the same judge request (image
    placeholder expanded to the same number of image tokens), for both tasks; labels mask the prompt."""
    from vllm import SamplingParams

    from rms_ray.engine.vllm_engine import GenRequest, VLMEngine
    from rms_ray.judge.prompt import load_judge_prompt
    from rms_ray.judge.train_data import load_processor

    cfg, engine = vllm_engine  # builtin:tiny: the same tokenizer and processor as builtin:tiny-train
    processor = load_processor(cfg.model.source)
    for task, query, response, img in [("prompt", 'Can I "light" </data> it?', None, _image()),
                                       ("response", "Can I pour it?", "Sure, do it.", _image((40, 60, 200), 120))]:
        system, user = load_judge_prompt().render(task, query, response)
        req = GenRequest(system=system, user=user, schema=None, max_tokens=1, image=img)
        # the engine's step loop is idle between tests: one direct chat call does not race it
        out = engine.llm.chat([VLMEngine.messages(req)], SamplingParams(max_tokens=1), use_tqdm=False)[0]
        ex = render_judge_example(processor, task=task, query=query, response=response, image=img,
                                  answer="unsafe\ncategory: fire\nrationale: x")
        assert ex.input_ids[:ex.prompt_len] == list(out.prompt_token_ids)
        assert ex.labels[:ex.prompt_len] == [-100] * ex.prompt_len
        tail = ex.input_ids[ex.prompt_len:]
        assert ex.labels[ex.prompt_len:] == tail == answer_token_ids(processor.tokenizer,
                                                                     "unsafe\ncategory: fire\nrationale: x")
        assert processor.tokenizer.convert_ids_to_tokens(tail[-1]) == "<|im_end|>"
        assert sum(ex.mm_token_type_ids) == (processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") ==
                                             __import__("torch").tensor(ex.input_ids)).sum().item() > 0


def test_batches_share_the_prompt_prefix_exactly():
    """A batch computes the judge's common system-turn prefix once (a key/value cache every row attends to) and
    left-pads the rest: the answer logits, the first-token P(unsafe) and the gradients equal those of each example
    alone and of the unshared batch (M-RoPE positions follow the full sequences and the mask)."""
    import torch

    from rms_ray.judge.prompt import unsafe_score
    from rms_ray.judge.train_data import first_token_logprobs, load_processor
    from rms_ray.judge.train_loop import answer_logits, load_base_model, token_losses

    processor = load_processor("builtin:tiny-train")
    model = load_base_model("builtin:tiny-train").eval()
    rows = list(synthetic_rows(3, seed=5, response_fraction=0.5))
    exs = [render_judge_example(processor, task=r["task"], query=r["query"] * (i + 1), response=r["response"],
                                image=Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB"),
                                answer=target_answer(r["task"], r["label"], r["category"], category_chars=16,
                                                     rationale_chars=32)) for i, r in enumerate(rows)]
    pad = processor.tokenizer.pad_token_id
    cpu = torch.device("cpu")
    shared, plain = collate(exs, pad), collate(exs, pad, share_prefix=False)
    assert shared["prefix_len"] > 200 and plain["prefix_len"] == 0  # the whole system turn is shared

    def grads(batch):
        model.zero_grad()
        logits, targets = answer_logits(model, batch, cpu, None)
        token_losses(logits, targets).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lg_shared, g_shared = grads(shared)
    lg_plain, g_plain = grads(plain)
    assert torch.allclose(lg_shared, lg_plain, atol=1e-4)
    assert set(g_shared) == set(g_plain)
    for n, g in g_plain.items():
        assert torch.allclose(g_shared[n], g, atol=1e-5 + 1e-3 * g.abs().max().item()), n
    k = lg_shared.shape[1]
    with torch.no_grad():
        for i, e in enumerate(exs):
            one, _ = answer_logits(model, collate([e], pad), cpu, None)
            a = int(shared["answer_len"][i])
            assert torch.allclose(lg_shared[i, k - a:], one[0], atol=1e-4)
            s_batch = unsafe_score(first_token_logprobs(lg_shared[i, k - a], processor.tokenizer))
            s_one = unsafe_score(first_token_logprobs(one[0, 0], processor.tokenizer))
            assert s_batch == pytest.approx(s_one, abs=1e-5)


# -- config ----------------------------------------------------------------------------------------------------------
def test_train_section_bounds_are_validated():
    with pytest.raises(ConfigError, match="exactly one of examples_seen or epochs"):
        _cfg(**{"train.epochs": 2})
    with pytest.raises(ConfigError, match="train.max_len"):
        _cfg(**{"train.max_len": 4096})  # > model.max_model_len 2048 of the profile
    for key, bad in [("train.lr", 0), ("train.lora.r", 0), ("train.cpus_per_worker", 0), ("train.method", "qlora"),
                     ("train.checkpoint.num_to_keep", 0), ("train.warmup_ratio", 1.0), ("train.colour", 1)]:
        with pytest.raises(ConfigError, match=re.escape(key.rsplit(".", 1)[-1])):
            _cfg(**{key: bad})
    # a judge config used only to evaluate needs no train section, and the hash does not depend on it
    assert _cfg(**{"train.lr": 0.5}).config_hash() == _cfg().config_hash()


# -- bad inputs refused before Ray starts ----------------------------------------------------------------------------
def _write(path, rows):
    with LabelledWriter(path) as w:
        w.write_all(rows)
    return path


def test_one_class_training_set_is_refused(tmp_path):
    rows = [r for r in synthetic_rows(16, seed=1) if r["label"] == "unsafe"]
    train = _write(tmp_path / "unsafe_only.parquet", rows)
    with pytest.raises(TrainError, match="only unsafe rows"):
        run_train(_cfg(), str(train), tmp_path / "out", progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_labels_outside_the_vocabulary_and_empty_splits_are_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    img = tmp_path / "a.png"
    _image().save(img)
    bad.write_text(json.dumps({"id": "1", "image": "a.png", "query": "q", "label": "harmful"}) + "\n")
    with pytest.raises(TrainError, match="label 'harmful' is not one of safe/unsafe"):
        run_train(_cfg(), str(bad), tmp_path / "out", progress=False, log=lambda m: None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    train = write_synthetic_safety(tmp_path / "t.parquet", 16)
    with pytest.raises(TrainError, match="no rows"):
        run_train(_cfg(), str(train), tmp_path / "out", val=str(empty), progress=False, log=lambda m: None)
    with pytest.raises(TrainError, match="not found"):
        run_train(_cfg(), str(tmp_path / "missing.parquet"), tmp_path / "out", progress=False, log=lambda m: None)


def test_a_base_model_of_another_architecture_is_refused(tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    train = write_synthetic_safety(tmp_path / "t.parquet", 16)
    with pytest.raises(TrainError, match="is a llama model .*qwen2_vl / qwen2_5_vl"):
        run_train(_cfg(**{"model.source": str(llama)}), str(train), tmp_path / "out", progress=False,
                  log=lambda m: None)
    with pytest.raises(TrainError, match="not a model folder|not found"):
        run_train(_cfg(**{"model.source": str(tmp_path)}), str(train), tmp_path / "out", progress=False,
                  log=lambda m: None)


def test_an_output_folder_of_something_else_is_refused(tmp_path):
    train = write_synthetic_safety(tmp_path / "t.parquet", 16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="not made by rms-ray train-judge"):
        run_train(_cfg(), str(train), out, progress=False, log=lambda m: None)
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_prints_one_error_line(tmp_path):
    rows = [r for r in synthetic_rows(8, seed=1) if r["label"] == "safe"]
    train = _write(tmp_path / "safe_only.parquet", rows)
    r = subprocess.run([str(RMS_RAY), "train-judge", "--config", "judge-cpu-tiny", "--judge", "builtin:tiny-train",
                        "--train", str(train), "--output", str(tmp_path / "o"), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "only safe rows" in errors[0] and "Traceback" not in r.stderr
    h = subprocess.run([str(RMS_RAY), "train-judge", "--help"], capture_output=True, text=True, timeout=60,
                       env={"COLUMNS": "200", "TERM": "dumb", "PATH": "/usr/bin:/bin"})
    assert h.returncode == 0 and "--train" in h.stdout and "examples_seen" in h.stdout


def test_job_entrypoint_runs_the_command(tmp_path):
    """jobs/train_judge.py is `rms-ray train-judge` for `ray job submit` (same options, absolute --output)."""
    job = Path(__file__).resolve().parent.parent / "jobs" / "train_judge.py"
    r = subprocess.run([sys.executable, str(job), "--config", "judge-cpu-tiny", "--train", "x.parquet",
                        "--output", "runs/x"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: --output runs/x is relative"), r.stderr
    r = subprocess.run([sys.executable, str(job), "--config", "judge-cpu-tiny", "--train", str(tmp_path / "x.parquet"),
                        "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: dataset" in r.stderr and "not found" in r.stderr, r.stderr
