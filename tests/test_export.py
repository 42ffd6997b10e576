"""rms_ray.construct.export: a real construct output (local Ray, real vLLM CPU engine, tiny model) as labelled rows,
checked against counts computed independently from its data/ Parquet files, and written with LabelledWriter."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import PHOTOS
from rms_ray.common.config import load_config
from rms_ray.construct.export import iter_labelled_rows
from rms_ray.data.labelled import LabelledWriter, iter_rows, scan

pytestmark = pytest.mark.vllm

NAMES = ("astronaut.png", "brick.png", "camera.png", "coffee.png", "rocket.jpg")
# three candidates per image: with the fixed tiny model some image then has two accepted samples, so its contrast
# row must still come once although data/ repeats the contrast query on both rows
OVERRIDES = {"generation.queries_per_image": 3, "output.rows_per_file": 2}


def _construct(root: Path, names, overrides) -> Path:
    from rms_ray.construct.pipeline import run_construct

    inp, out = root / "input", root / "out"
    inp.mkdir(parents=True)
    for n in names:
        shutil.copy(PHOTOS / n, inp / n)
    run_construct(load_config("cpu-tiny", overrides), str(inp), out, progress=False)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ray_local):
    # rows_per_file=2: data/ is several files (cut at image boundaries: an image with three samples gets a file of
    # three rows), and the image's bytes are on its first row only
    return _construct(tmp_path_factory.mktemp("export"), NAMES, OVERRIDES)


def _data(out: Path) -> list[dict]:
    return pq.read_table(sorted((out / "data").glob("*.parquet"))).to_pylist()


def _expected(train: list[dict]) -> dict[str, tuple[str, str]]:
    """id -> (task, label), from data/ alone."""
    want = {}
    for r in train:
        want[f"{r['sample_id']}:prompt"] = ("prompt", "unsafe")
        want[f"{r['sample_id']}:guidance"] = ("response", "safe")
        if r["naive_response"] is not None:
            want[f"{r['sample_id']}:naive"] = ("response", "unsafe")
        if r["contrast_query"] is not None:
            want[f"{r['image_id']}:contrast"] = ("prompt", "safe")
    return want


def test_rows_match_the_data_exactly(run_dir):
    out = run_dir
    train = _data(out)
    assert len(list((out / "data").glob("*.parquet"))) >= 2
    per_image = Counter(r["image_id"] for r in train if r["contrast_query"])
    assert max(per_image.values()) >= 2, "an image with two accepted samples and a contrast query"
    rows = list(iter_labelled_rows(out))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    want = _expected(train)
    assert {r["id"]: (r["task"], r["label"]) for r in rows} == want
    counts = Counter((r["task"], r["label"]) for r in rows)
    assert counts[("prompt", "unsafe")] == counts[("response", "safe")] == len(train) > 0
    assert counts[("response", "unsafe")] == sum(r["naive_response"] is not None for r in train) > 0
    assert counts[("prompt", "safe")] == len({r["image_id"] for r in train if r["contrast_query"]}) > 0
    manifest = json.loads((out / "manifest.json").read_text())["accounting"]
    assert counts[("prompt", "safe")] == manifest["contrast_queries"]
    assert counts[("response", "unsafe")] == manifest["naive_responses"]

    by_sample = {r["sample_id"]: r for r in train}
    by_image = {r["image_id"]: r for r in train}
    stored = {r["image_id"]: r["image"] for r in train if r["image"] is not None}  # once per image
    assert len(stored) == len(by_image) == sum(r["image"] is not None for r in train)
    for row in rows:
        assert row["source"] == "rms"
        kind = row["id"].rsplit(":", 1)[1]
        src = by_image[row["image_id"]] if kind == "contrast" else by_sample[row["sample_id"]]
        assert row["image"] == {"bytes": stored[row["image_id"]]["bytes"], "path": stored[row["image_id"]]["path"]}
        if kind == "contrast":
            assert (row["query"], row["response"], row["category"], row["sample_id"], row["hazard"]) == (
                src["contrast_query"], None, None, None, None)
            continue
        assert (row["query"], row["category"], row["hazard"], row["image_id"], row["mlcommons_category"]) == (
            src["query"], src["category"], src["hazard"], src["image_id"], src["mlcommons_category"])
        assert row["response"] == {"prompt": None, "guidance": src["response"], "naive": src["naive_response"]}[kind]


def test_streaming_in_small_batches_gives_the_same_rows(run_dir):
    # one row per batch: an image's contrast row is still given once, even when its rows are in other batches
    small = list(iter_labelled_rows(run_dir, batch_size=1))
    assert len({r["id"] for r in small}) == len(small)
    assert small == list(iter_labelled_rows(run_dir))


def test_labelled_writer_writes_a_file_scan_accepts(run_dir, tmp_path):
    rows = list(iter_labelled_rows(run_dir))
    path = tmp_path / "rms.parquet"
    with LabelledWriter(path) as w:
        w.write_all(iter_labelled_rows(run_dir))
    summary = scan(path)
    assert summary.rows == len(rows)
    want = Counter((r["task"], r["label"]) for r in rows)
    assert summary.counts == {t: {lbl: want[(t, lbl)] for lbl in ("safe", "unsafe")} for t in ("prompt", "response")}
    assert {"sample_id", "image_id", "hazard", "mlcommons_category"} <= set(summary.columns)
    back = {r["id"]: r for batch in iter_rows(path) for r in batch}
    assert set(back) == {r["id"] for r in rows}
    for r in rows:  # image bytes embedded as stored; texts kept
        assert back[r["id"]]["image"]["bytes"] == r["image"]["bytes"]
        assert (back[r["id"]]["query"], back[r["id"]]["response"]) == (r["query"], r["response"])


def test_output_without_safe_side_columns_still_converts(run_dir, tmp_path):
    """A dataset made before contrast queries existed: prompt and guidance rows only."""
    out = tmp_path / "old"
    (out / "data").mkdir(parents=True)
    shutil.copy(run_dir / "manifest.json", out / "manifest.json")
    t = pq.read_table(sorted((run_dir / "data").glob("*.parquet")))
    pq.write_table(t.drop_columns(["contrast_query", "naive_response"]), out / "data" / "train-00000-of-00001.parquet")
    rows = list(iter_labelled_rows(out))
    assert Counter(r["id"].rsplit(":", 1)[1] for r in rows) == {"prompt": t.num_rows, "guidance": t.num_rows}


def test_not_a_construct_output_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"is not an rms_ray construct output \(no manifest\.json and no data/\)"):
        list(iter_labelled_rows(tmp_path))
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match=r"\(no manifest\.json\)"):
        list(iter_labelled_rows(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(ValueError, match="no rms_ray.dataset format"):
        list(iter_labelled_rows(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable manifest.json"):
        list(iter_labelled_rows(tmp_path))
    with pytest.raises(ValueError, match=r"\(no manifest\.json and no data/\)"):
        list(iter_labelled_rows(tmp_path / "missing"))


def test_import_dataset_rms_and_evaluate_on_a_construct_folder(run_dir, tmp_path):
    """The `rms` importer writes the same rows as the export; `evaluate` accepts the construct folder itself, with
    the accounting of exactly those rows (both labels present, so F1/AUPRC are defined)."""
    from typer.testing import CliRunner

    from rms_ray.cli import app
    from rms_ray.judge.config import load_judge_config
    from rms_ray.judge.evaluate import run_evaluate

    want = _expected(_data(run_dir))
    out = tmp_path / "demo.parquet"
    r = CliRunner().invoke(app, ["import-dataset", "rms", str(run_dir), "--output", str(out)])
    assert r.exit_code == 0, r.output
    got = {row["id"]: (row["task"], row["label"]) for batch in iter_rows(out) for row in batch}
    assert got == want
    cfg = load_judge_config("judge-cpu-tiny", {"evaluate.n_boot": 50})
    res = run_evaluate(cfg, [str(run_dir)], tmp_path / "eval", progress=False, log=lambda m: None)
    acc = res["accounting"][run_dir.name]
    assert acc["rows_in"] == len(want) == acc["evaluated"] and acc["excluded"] == 0 and acc["balanced"]
    counts = Counter(want.values())
    m = res["metrics"][run_dir.name]["all_tasks"]["overall"]
    assert m["n_unsafe"] == counts[("prompt", "unsafe")] + counts[("response", "unsafe")]
    assert m["n_safe"] == counts[("prompt", "safe")] + counts[("response", "safe")]
    assert m["f1"] is not None and m["auprc"] is not None
