"""``rms-ray train-judge`` under real Ray Train (2 workers, fractional CPUs, DDP over gloo) on the synthetic XOR
safety set (:mod:`rms_ray.testing.synthetic_safety`): the label needs both the image and the query.

Two training runs of the ``judge-cpu-tiny`` profile's recipe (base ``builtin:tiny-train``):

* ``learned`` (normal data, the profile's 250 optimiser steps x 8 examples = 2000 examples seen): a Ray Train
  worker is SIGKILLed after the first checkpoint; FailureConfig restarts the worker group, which resumes from that
  checkpoint (not from step 0) and finishes. Held-out F1 must be well above chance, both in training-time
  validation and through the real path (the output folder loaded by vLLM in ``rms-ray evaluate``), and the two
  paths' scores must agree row by row.
* ``interrupted`` (a 40-step LoRA run on a seeded subset of 176 rows): interrupted (SIGINT, as Ctrl-C) after its
  first checkpoint, and the same call is made again: it says it resumes, continues from that checkpoint and
  finishes; the output is the PEFT adapter beside the merged model.

The other half of "does it learn?", that the same recipe stays near chance when the image is blank or the query is
empty, is checked by tests/test_judge_study.py, whose compare-datasets run trains those two ablations side by side
with the learnable set (one training of each instead of two).

Measured (2026-12-01, this 2-core AVX2 machine, float32; final-step validation on 64 held-out rows; in brackets:
the same run with the training labels shuffled, the deliberately broken check):
  normal: F1 1.00, AUPRC 1.00 at step 250 (F1 0.90 at step 150, 0.94 at 200; evaluate through vLLM agrees row by
  row within 0.05)   [shuffled: F1 0.5x, AUPRC 0.5x]
Thresholds, with margin for other CPUs (bf16 autocast on AVX-512 BF16 machines) and seeds: learned F1 >= 0.85 and
AUPRC >= 0.9.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from rms_ray.data.labelled import LabelledWriter
from rms_ray.judge.config import load_judge_config
from rms_ray.judge.train import TrainError, TrainInterrupted, run_train
from rms_ray.testing.synthetic_safety import synthetic_rows, write_synthetic_safety

LEARNED_F1, LEARNED_AUPRC = 0.85, 0.90
N_TRAIN, N_VAL = 192, 64
BASE = "builtin:tiny-train"
STEPS = 250  # the profile's budget: train.examples_seen 2000 / (2 workers x batch 4)


def _cfg(**sets):
    return load_judge_config("judge-cpu-tiny", {"model.source": BASE, **sets})


class Lines(list):
    def __call__(self, line: str) -> None:
        self.append(line)


def _data(root: Path, variant: str) -> tuple[Path, Path]:
    return (write_synthetic_safety(root / f"train-{variant}.parquet", N_TRAIN, seed=1, variant=variant, id_prefix="t"),
            write_synthetic_safety(root / f"val-{variant}.parquet", N_VAL, seed=2, variant=variant, id_prefix="v"))


def _snapshot_has_checkpoint(out: Path) -> bool:
    snap = out / "_ray" / "judge" / "checkpoint_manager_snapshot.json"
    try:
        return "checkpoint_step" in snap.read_text()
    except OSError:
        return False


def _when_checkpointed(out: Path, action, timeout: float = 600) -> threading.Thread:
    """Run ``action()`` in a thread once Ray Train has committed the run's first checkpoint."""
    def watch():
        t0 = time.time()
        while time.time() - t0 < timeout:
            if _snapshot_has_checkpoint(out):
                action()
                return
            time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _final_eval(out: Path) -> dict:
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    return [h for h in log if h["event"] == "eval"][-1]


@pytest.fixture(scope="module")
def learned(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    train, val = _data(root, "normal")
    # a second training file (JSONL) whose rows are unusable: excluded with their reason, never a crash
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = root / "bad.jsonl"
    bad.write_text("".join(json.dumps({"id": f"bad-{i}", "image": img, "query": "Can I light the candle here?",
                                       "label": "unsafe"}) + "\n"
                           for i, img in enumerate(["missing.png", "broken.png", "broken.png"])))
    out = root / "out"
    killed: dict = {}

    def kill_rank1():
        info = json.loads((out / "_work" / "workers" / "rank1.json").read_text())
        killed["pid"] = info["pid"]
        os.kill(info["pid"], signal.SIGKILL)

    watcher = _when_checkpointed(out, kill_rank1)
    lines = Lines()
    t0 = time.time()
    summary = run_train(_cfg(), [str(train), str(bad)], out, val=str(val), progress=False, log=lines)
    watcher.join(timeout=5)
    return {"summary": summary, "out": out, "val": val, "lines": lines, "killed": killed, "wall": time.time() - t0}


def test_a_killed_worker_restarts_from_the_last_checkpoint(learned):
    s, out = learned["summary"], learned["out"]
    assert learned["killed"], "the killer thread never saw a checkpoint"
    every = _cfg().train.eval_every_steps
    assert len(s["restarts"]) == 1 and s["restarts"][0] >= every and s["restarts"][0] % every == 0, s["restarts"]
    assert s["steps"] == STEPS and s["examples_seen"] == STEPS * 8 and not s["resumed"]
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    # the log is the resumed run's: every step once, in order (steps after the checkpoint were redone, not doubled)
    assert [h["step"] for h in log if h["event"] == "step"] == list(range(1, STEPS + 1))
    assert [(h["kind"], h["step"]) for h in log if h["event"] == "resumed"] == [("restart", s["restarts"][0])]
    assert any("workers restarted after a failure: resuming from checkpoint at step" in ln for ln in learned["lines"])


def test_the_judge_learns_a_signal_that_needs_image_and_text(learned):
    final = _final_eval(learned["out"])
    assert final["val_f1"] >= LEARNED_F1 and final["val_auprc"] >= LEARNED_AUPRC, final
    assert learned["summary"]["best_val"]["val_f1"] >= LEARNED_F1


def test_output_folder(learned):
    out, s = learned["out"], learned["summary"]
    model = Path(s["model_dir"])
    assert model == out / "model"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "processor_config.json", "generation_config.json", "judge_meta.json"):
        assert (model / f).is_file(), f
    assert not (model / "rms_ray_tiny.json").exists()  # the base's build stamp does not describe the judge
    meta = json.loads((out / "judge_meta.json").read_text())
    assert meta["base_model"]["source"] == BASE and meta["base_model"]["model_type"] == "qwen2_5_vl"
    assert meta["judge_prompt"].startswith("judge@v") and meta["config"]["train"]["examples_seen"] == STEPS * 8
    assert meta["budget"]["steps"] == STEPS and meta["budget"]["global_batch"] == 8
    assert meta["data"]["used"]["train_counts"] == {"prompt": {"safe": 96, "unsafe": 96}}
    assert meta["label_vocabulary"]["categories"] == ["fire", "water"]
    assert {"torch", "transformers", "ray", "peft"} <= set(meta["versions"])
    assert [d["rows"] for d in meta["data"]["train"]] == [N_TRAIN, 3] and len(meta["data"]["train"][0]["sha256"]) == 64
    # rows in = used + excluded, and each excluded row says why
    excluded = [json.loads(ln) for ln in (out / "excluded.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in excluded) == ["bad-0", "bad-1", "bad-2"]
    assert {r["reason"].split(":")[0] for r in excluded} == {"image not found", "image"}
    assert meta["data"]["excluded"]["rows"] == 3 and s["rows"] == {"train": N_TRAIN, "val": N_VAL, "excluded": 3}
    assert (out / "train_curves.png").stat().st_size > 5000
    assert load_judge_config(out / "train_config.yaml") == _cfg()
    scores = [json.loads(ln) for ln in (out / "val_scores.jsonl").read_text().splitlines()]
    assert len(scores) == N_VAL and all(0 <= r["unsafe_score"] <= 1 for r in scores)


def test_the_trained_folder_is_a_judge_vllm_loads(learned, tmp_path):
    """The real path: rms-ray evaluate loads OUTPUT/model in vLLM; its held-out F1 and its per-row P(unsafe) (the
    same unsafe_score, under the output constraint) agree with training-time validation."""
    from rms_ray.judge.evaluate import run_evaluate

    cfg = load_judge_config("judge-cpu-tiny", {"model.source": learned["summary"]["model_dir"],
                                               "evaluate.n_boot": 0})
    result = run_evaluate(cfg, [str(learned["val"])], tmp_path / "eval", progress=False, log=lambda m: None)
    m = result["metrics"]["val-normal"]["all_tasks"]["overall"]
    assert result["accounting"]["val-normal"]["unparseable"] == 0
    assert m["f1"] >= LEARNED_F1 and m["auprc"] >= LEARNED_AUPRC, m
    import pandas as pd

    served = pd.read_parquet(tmp_path / "eval" / "predictions.parquet").set_index("id")["unsafe_score"]
    trained = {r["id"]: r["unsafe_score"] for r in
               map(json.loads, (learned["out"] / "val_scores.jsonl").read_text().splitlines())}
    diffs = [abs(served[i] - s) for i, s in trained.items()]
    # weights are saved in the base's bfloat16 and served by vLLM in float32 here: small differences only
    assert max(diffs) < 0.05 and sum(diffs) / len(diffs) < 0.01, (max(diffs), sum(diffs) / len(diffs))


INTERRUPTED_STEPS = 40  # a short run of the same recipe: resuming is under test here, not learning


@pytest.fixture(scope="module")
def interrupted(ray_local, tmp_path_factory):
    """Ctrl-C after the first checkpoint, then the same call again; LoRA (the GPU profiles' method: the checkpoint
    holds the adapters and their optimiser state), trained on a seeded subset of 176 rows."""
    root = tmp_path_factory.mktemp("interrupted")
    train, val = _data(root, "normal")
    out = root / "out"
    cfg = _cfg(**{"train.examples_seen": INTERRUPTED_STEPS * 8, "train.eval_every_steps": 10, "train.method": "lora"})

    def interrupt():  # Ctrl-C: Ray Train's handler aborts the run gracefully, keeping its checkpoints
        p = json.loads((out / "_work" / "progress.json").read_text())
        if p["step"] < p["total_steps"] - 10:
            os.kill(os.getpid(), signal.SIGINT)

    watcher = _when_checkpointed(out, interrupt)
    first = Lines()
    with pytest.raises(TrainInterrupted) as info:
        run_train(cfg, str(train), out, val=str(val), progress=False, log=first, row_limit=176, subset_seed=3)
    watcher.join(timeout=5)
    second = Lines()
    summary = run_train(cfg, str(train), out, val=str(val), progress=False, log=second, row_limit=176, subset_seed=3)
    return {"summary": summary, "out": out, "interrupted_at": info.value.step, "second": second, "cfg": cfg}


def test_an_interrupted_run_resumes_when_run_again(interrupted):
    s, step, n = interrupted["summary"], interrupted["interrupted_at"], INTERRUPTED_STEPS
    assert step is not None and step > 0 and step % interrupted["cfg"].train.eval_every_steps == 0
    assert f"resuming from checkpoint at step {step} (of {n})" in interrupted["second"]
    assert s["resumed"] and s["resumed_from_step"] == step and s["restarts"] == []
    assert s["steps"] == n and s["examples_seen"] == n * 8
    log = [json.loads(ln) for ln in (interrupted["out"] / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log if h["event"] == "step"] == list(range(1, n + 1))
    assert [(h["kind"], h["step"]) for h in log if h["event"] == "resumed"] == [("rerun", step)]


def test_lora_output_is_the_adapter_beside_a_merged_model(interrupted):
    from safetensors import safe_open

    out = interrupted["out"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == interrupted["cfg"].train.lora.r
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    # LoRA matrices, plus the projector trained in full (judge-cpu-tiny: freeze_projector false -> modules_to_save)
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    assert adapter["modules_to_save"] == ["merger"]
    assert all("lora_" in k or ".merger." in k for k in keys), [k for k in keys if "lora_" not in k][:5]
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:  # merged: the base's own parameter names
        assert f.keys() and not any("lora_" in k or "base_layer" in k for k in f.keys())
    meta = json.loads((out / "judge_meta.json").read_text())
    assert meta["config"]["train"]["method"] == "lora"


def test_a_seeded_subset_is_what_was_trained_on(interrupted):
    s = interrupted["summary"]
    assert s["rows"]["train"] == 176
    meta = json.loads((interrupted["out"] / "judge_meta.json").read_text())
    assert meta["data"]["subset"] == {"row_limit": 176, "subset_seed": 3, "order_seed": 3}
    assert sum(meta["data"]["used"]["train_counts"]["prompt"].values()) == 176


# -- bad inputs found with Ray, before training starts --------------------------------------------------------------
def _rows(n, **kw):
    return list(synthetic_rows(n, **kw))


def test_a_validation_set_overlapping_the_training_set_is_refused(ray_local, tmp_path):
    train = write_synthetic_safety(tmp_path / "t.parquet", 16, seed=1, id_prefix="t")
    rows = _rows(16, seed=1, id_prefix="t")
    with LabelledWriter(tmp_path / "v.parquet") as w:
        w.write_all({**r, "id": f"v{i}"} for i, r in enumerate(rows[:4]))  # same image bytes and query, new ids
        w.write_all(_rows(6, seed=7, id_prefix="t")[4:])  # other items under training ids t-4, t-5
        w.write_all(_rows(8, seed=9, id_prefix="w"))
    with pytest.raises(TrainError, match=r"--val overlaps the training data: 2 id\(s\) in both and 4 item\(s\) with "
                                         r"the same image bytes and query \(e.g. val ids 't-4', 't-5', 'v0'"):
        run_train(_cfg(), str(train), tmp_path / "o", val=str(tmp_path / "v.parquet"), progress=False,
                  log=lambda m: None)
    assert not list((tmp_path / "o").glob("_ray/*"))  # nothing trained


def test_all_images_bad_is_refused_and_counted(ray_local, tmp_path):
    rows = _rows(6, seed=1)
    with LabelledWriter(tmp_path / "t.parquet") as w:
        w.write_all({**r, "image": {"bytes": b"definitely not an image " + bytes([i]), "path": "x.png"}}
                    for i, r in enumerate(rows))
    with pytest.raises(TrainError, match=r"no usable training rows: all 6 were excluded \(\{\"image: not_an_image\""):
        run_train(_cfg(), str(tmp_path / "t.parquet"), tmp_path / "o", progress=False, log=lambda m: None)
    assert len((tmp_path / "o" / "excluded.jsonl").read_text().splitlines()) == 6


def test_more_workers_than_the_cluster_holds_is_refused(ray_local, tmp_path):
    train = write_synthetic_safety(tmp_path / "t.parquet", 16)
    with pytest.raises(TrainError, match=r"train.num_workers=8 x train.cpus_per_worker=0.5 = 4 CPUs, but the Ray "
                                         r"cluster has 2"):
        run_train(_cfg(**{"train.num_workers": 8}), str(train), tmp_path / "o", progress=False, log=lambda m: None)


def test_resuming_with_another_base_model_is_refused(learned, tmp_path):
    cfg = _cfg(**{"model.source": "builtin:tiny"})
    with pytest.raises(TrainError, match="holds another training run .*base_model: 'builtin:tiny-train' -> "
                                         "'builtin:tiny'"):
        run_train(cfg, [str(learned["out"].parent / "train-normal.parquet"), str(learned["out"].parent / "bad.jsonl")],
                  learned["out"], val=str(learned["val"]), progress=False, log=lambda m: None)
    assert (learned["out"] / "model" / "config.json").is_file()  # the finished judge is untouched


def test_rerunning_a_finished_run_does_nothing(learned):
    lines = Lines()
    s = run_train(_cfg(), [str(learned["out"].parent / "train-normal.parquet"),
                           str(learned["out"].parent / "bad.jsonl")], learned["out"], val=str(learned["val"]),
                  progress=False, log=lines)
    assert s["already_complete"] and s["model_dir"] == learned["summary"]["model_dir"]
    assert any("already complete" in ln for ln in lines)
