"""`rms-ray split-dataset`: a streaming hash split by image, so one photo is never on both sides."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rms_ray.data.labelled import LabelledWriter, scan
from rms_ray.data.split import assign_split, split_labelled
from rms_ray.testing.synthetic_safety import synthetic_rows

RMS_RAY = Path(sys.executable).parent / "rms-ray"


@pytest.fixture
def shared_images(tmp_path):
    """40 images x 3 queries each (JSONL with relative paths), two rows with a missing / empty image."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = []
    for i, r in enumerate(synthetic_rows(40, seed=7)):
        (imgs / f"{i}.png").write_bytes(r["image"]["bytes"])
        for q in range(3):
            rows.append({"id": f"r{i}-{q}", "image": f"imgs/{i}.png", "query": f"{r['query']} ({q})",
                         "label": r["label"], "source": "synth", "cell": i})
    rows.append({"id": "gone", "image": "imgs/missing.png", "query": "x?", "label": "safe"})
    (imgs / "empty.png").write_bytes(b"")
    rows.append({"id": "empty", "image": "imgs/empty.png", "query": "y?", "label": "unsafe"})
    src = tmp_path / "set.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


def test_split_by_image_is_complete_disjoint_grouped_and_deterministic(shared_images, tmp_path):
    r = split_labelled(shared_images, tmp_path / "s", test_fraction=0.3, seed=0)
    train = pq.read_table(tmp_path / "s" / "train.parquet").to_pylist()
    test = pq.read_table(tmp_path / "s" / "test.parquet").to_pylist()
    ids_train, ids_test = {x["id"] for x in train}, {x["id"] for x in test}
    # every usable row exactly once; the two bad images excluded with their reason
    assert not ids_train & ids_test and len(ids_train | ids_test) == 120 == len(train) + len(test)
    excluded = [json.loads(ln) for ln in (tmp_path / "s" / "excluded.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in excluded) == ["empty", "gone"] and r["excluded"] == 2
    assert "image not found" in next(e["reason"] for e in excluded if e["id"] == "gone")
    # grouped: the three queries of an image are on one side, and no image bytes are on both sides
    side = {}
    for name, rows in (("train", train), ("test", test)):
        for x in rows:
            assert side.setdefault(x["cell"], name) == name, f"image {x['cell']} on both sides"
    sha = {name: {hashlib.sha256(x["image"]["bytes"]).hexdigest() for x in rows}
           for name, rows in (("train", train), ("test", test))}
    assert not sha["train"] & sha["test"] and r["groups"] == {"train": len(sha["train"]), "test": len(sha["test"])}
    # the side of an image is the documented rule applied to its bytes
    for x in test:
        assert assign_split(hashlib.sha256(x["image"]["bytes"]).digest(), 0.3, 0) == "test"
    assert 4 <= r["groups"]["test"] <= 20  # 40 images at 0.3: binomial, far from both ends
    # counts in split.json are the files' own; both files are valid labelled sets with the extras kept
    for name, rows in (("train", train), ("test", test)):
        assert r[name]["rows"] == len(rows) == scan(tmp_path / "s" / f"{name}.parquet").rows
        assert sum(r[name]["counts"]["prompt"].values()) == len(rows)
        assert {x["source"] for x in rows} == {"synth"}
    meta = json.loads((tmp_path / "s" / "split.json").read_text())
    assert meta["rule"]["group_by"] == "image" and meta["input"]["sha256"] == hashlib.sha256(
        shared_images.read_bytes()).hexdigest()
    # same seed: the same files byte for byte; another seed: another split
    split_labelled(shared_images, tmp_path / "again", test_fraction=0.3, seed=0)
    assert (tmp_path / "again" / "test.parquet").read_bytes() == (tmp_path / "s" / "test.parquet").read_bytes()
    other = split_labelled(shared_images, tmp_path / "seed1", test_fraction=0.3, seed=1)
    ids1 = {x["id"] for x in pq.read_table(tmp_path / "seed1" / "test.parquet").to_pylist()}
    assert ids1 != ids_test and other["train"]["rows"] + other["test"]["rows"] == 120


def test_split_by_id_separates_rows_of_one_image(shared_images, tmp_path):
    split_labelled(shared_images, tmp_path / "s", test_fraction=0.5, seed=3, group_by="id")
    test = pq.read_table(tmp_path / "s" / "test.parquet", columns=["cell"]).column("cell").to_pylist()
    train = pq.read_table(tmp_path / "s" / "train.parquet", columns=["cell"]).column("cell").to_pylist()
    assert set(test) & set(train)  # with 120 rows at 0.5, some image's queries land on both sides


def test_bad_arguments_and_empty_sides_write_nothing(shared_images, tmp_path):
    for kw, msg in (({"test_fraction": 0}, "between 0 and 1"), ({"test_fraction": 1.5}, "between 0 and 1"),
                    ({"group_by": "query"}, "--group-by"), ({"test_fraction": 1e-6}, "test split of")):
        with pytest.raises(ValueError, match=msg):
            split_labelled(shared_images, tmp_path / "out", **kw)
        assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError):
        split_labelled(tmp_path / "nope.parquet", tmp_path / "out")
    with pytest.raises(ValueError, match="own folder"):
        split_labelled(shared_images, shared_images.parent)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "image": "imgs/0.png", "query": "q", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match="label 'maybe'"):
        split_labelled(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_and_job_entrypoint(shared_images, tmp_path):
    r = subprocess.run([str(RMS_RAY), "split-dataset", str(shared_images), "-o", str(tmp_path / "s"),
                        "--test-fraction", "0.25", "--jsonl"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train.jsonl:" in r.stdout and "test.jsonl:" in r.stdout and "excluded: 2 rows" in r.stdout
    # JSONL output: image paths relative to the new file, readable by the format's own scan
    assert scan(tmp_path / "s" / "test.jsonl").rows + scan(tmp_path / "s" / "train.jsonl").rows == 120
    r = subprocess.run([str(RMS_RAY), "split-dataset", str(shared_images), "-o", str(tmp_path / "t"),
                        "--test-fraction", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --test-fraction must be between 0 and 1 (exclusive), got 2.0"]
    job = Path(__file__).resolve().parent.parent / "jobs" / "split_dataset.py"
    r = subprocess.run([sys.executable, str(job), str(shared_images), "--output", "rel"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: --output rel is relative"), r.stderr


def test_parquet_input_with_embedded_images(tmp_path):
    src = tmp_path / "syn.parquet"
    with LabelledWriter(src) as w:
        w.write_all(synthetic_rows(24, seed=1))
    r = split_labelled(src, tmp_path / "s", test_fraction=0.5)
    assert r["train"]["rows"] + r["test"]["rows"] == 24 and r["excluded"] == 0
