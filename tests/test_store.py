"""rms_ray.data.store: atomic shard commits, resume ids, duplicate-commit dropping, and final table files that pyarrow,
pandas and Hugging Face `datasets` all read (image column decodes to a PIL image)."""

from __future__ import annotations

import hashlib
import json
import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rms_ray.construct.prompts import STAGES
from rms_ray.data.store import (
    ACCEPTED_SCHEMA,
    ACCEPTED_WORK_SCHEMA,
    IMAGES_SCHEMA,
    REJECTED_SCHEMA,
    OutputStore,
    shard_name,
    table,
)


def _img(image_id: str, status: str = "accepted", n_acc: int = 1) -> dict:
    return {"image_id": image_id, "status": status, "n_accepted": n_acc, "n_rejected": 0, "gen_tokens": 10}


def _acc(image_id: str, sample_id: str) -> dict:
    return {"sample_id": sample_id, "image_id": image_id, "query": "q", "reasons": [], "candidate_index": 0}


def _rej(image_id: str, sample_id: str) -> dict:
    return {"sample_id": sample_id, "image_id": image_id, "stage": "verify_pair", "reasons": ["pair=not_risky: x"]}


@pytest.fixture
def store(tmp_path: Path) -> OutputStore:
    s = OutputStore(tmp_path / "out")
    s.prepare()
    return s


def test_schemas_shape():
    assert ACCEPTED_SCHEMA.names[: len(ACCEPTED_WORK_SCHEMA)] == ACCEPTED_WORK_SCHEMA.names
    assert ACCEPTED_SCHEMA.names[len(ACCEPTED_WORK_SCHEMA):] == [
        "category_id", "category", "mlcommons_category", "mlcommons_score", "config_hash"]
    assert ACCEPTED_SCHEMA.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert [f.name for f in ACCEPTED_SCHEMA.field("prompt_versions").type] == list(STAGES)
    assert "image" not in REJECTED_SCHEMA.names and {"stage", "raw_text"} <= set(REJECTED_SCHEMA.names)
    assert len(set(ACCEPTED_SCHEMA.names)) == len(ACCEPTED_SCHEMA.names)
    safe_side = ["contrast_query", "contrast_rounds", "verdict_contrast", "reason_contrast",
                 "naive_response", "naive_rounds", "verdict_naive_response", "reason_naive_response"]
    for schema in (ACCEPTED_WORK_SCHEMA, ACCEPTED_SCHEMA, REJECTED_SCHEMA):  # same columns in both tables
        i = schema.names.index("contrast_query")
        assert schema.names[i: i + len(safe_side)] == safe_side
        assert schema.field("contrast_rounds").type == schema.field("naive_rounds").type == pa.int32()


def test_table():
    t = table([{"image_id": "a", "status": "accepted"}, {"image_id": "b", "gen_tokens": 7}], IMAGES_SCHEMA)
    assert t.schema == IMAGES_SCHEMA
    assert t.to_pylist() == [
        {"image_id": "a", "sha256": None, "status": "accepted", "n_accepted": None, "n_rejected": None, "gen_tokens": None},
        {"image_id": "b", "sha256": None, "status": None, "n_accepted": None, "n_rejected": None, "gen_tokens": 7},
    ]
    assert table([], ACCEPTED_SCHEMA).schema == ACCEPTED_SCHEMA
    assert table([], ACCEPTED_SCHEMA).num_rows == 0


def test_table_rejects_unknown_columns():
    with pytest.raises(ValueError) as ei:
        table([{"image_id": "a"}, {"image_id": "b", "bogus": 1, "alsobad": 2}], IMAGES_SCHEMA)
    assert str(ei.value) == "columns not in schema: ['alsobad', 'bogus']"


def test_shard_name():
    expect = hashlib.sha256("img_a\nimg_b".encode()).hexdigest()[:20]
    assert shard_name(["img_b", "img_a"]) == shard_name(["img_a", "img_b"]) == expect


def test_prepare_creates_layout(tmp_path: Path):
    s = OutputStore(tmp_path / "new")
    assert {k[0] for k in s.done_keys()} == set()
    s.prepare()
    assert (tmp_path / "new" / "_work" / "commits").is_dir() and (tmp_path / "new" / "_work" / "tmp").is_dir()


def test_commit_then_done_ids(store: OutputStore):
    name = store.commit_shard([_acc("img_a", "s1"), _acc("img_a", "s2")], [_rej("img_b", "s3")],
                              [_img("img_a", n_acc=2), _img("img_b", "rejected", 0)])
    assert name == shard_name(["img_a", "img_b"])
    shard = store.commits / name
    assert sorted(p.name for p in shard.iterdir()) == ["_SUCCESS", "accepted.parquet", "images.parquet", "rejected.parquet"]
    assert pq.read_table(shard / "accepted.parquet").schema == ACCEPTED_WORK_SCHEMA
    assert pq.read_table(shard / "rejected.parquet").schema == REJECTED_SCHEMA
    assert pq.read_table(shard / "images.parquet").schema == IMAGES_SCHEMA
    assert list(store.tmp.iterdir()) == []  # the tmp folder was renamed away
    assert {k[0] for k in store.done_keys()} == {"img_a", "img_b"}
    store.commit_shard([], [], [_img("img_c")])
    assert {k[0] for k in store.done_keys()} == {"img_a", "img_b", "img_c"}
    # a fresh object over the same folder (a resumed run) sees the same
    assert {k[0] for k in OutputStore(store.root).done_keys()} == {"img_a", "img_b", "img_c"}


def test_same_batch_twice_keeps_one_shard(store: OutputStore):
    first = store.commit_shard([_acc("img_a", "s1")], [], [_img("img_a"), _img("img_b", "rejected", 0)])
    # a retry of the same batch (ids in another order, different content) commits under the same name: discarded
    second = store.commit_shard([_acc("img_a", "other")], [], [_img("img_b", "rejected", 0), _img("img_a")])
    assert first == second
    assert [p.name for p in store.commits.iterdir()] == [first]
    assert list(store.tmp.iterdir()) == []
    acc, _, img, dropped = store.read_committed()
    assert acc.column("sample_id").to_pylist() == ["s1"]
    assert img.num_rows == 2 and dropped == 0


def test_commit_needs_images(store: OutputStore):
    with pytest.raises(ValueError, match="a shard needs at least one image"):
        store.commit_shard([_acc("img_a", "s1")], [], [])
    assert list(store.commits.iterdir()) == []


def test_bad_rows_commit_nothing(store: OutputStore):
    with pytest.raises(ValueError, match=r"columns not in schema: \['nope'\]"):
        store.commit_shard([{**_acc("img_a", "s1"), "nope": 1}], [], [_img("img_a")])
    assert list(store.commits.iterdir()) == []
    assert {k[0] for k in store.done_keys()} == set()


def test_prepare_removes_leftover_tmp_and_keeps_commits(store: OutputStore):
    name = store.commit_shard([], [], [_img("img_a")])
    leftover = store.tmp / f"{shard_name(['img_z'])}-deadbeef"
    leftover.mkdir()
    (leftover / "accepted.parquet").write_bytes(b"half written")
    store.prepare()
    assert store.tmp.is_dir() and list(store.tmp.iterdir()) == []
    assert [p.name for p in store.commits.iterdir()] == [name]
    assert {k[0] for k in store.done_keys()} == {"img_a"}  # the killed batch is not counted as done


def test_read_committed_drops_image_committed_twice(store: OutputStore):
    # two different batches that share img_b (a batch re-split after a failure)
    s1 = store.commit_shard([_acc("img_a", "A-a"), _acc("img_b", "A-b")], [_rej("img_b", "A-rb")],
                            [_img("img_a"), _img("img_b")])
    s2 = store.commit_shard([_acc("img_b", "B-b"), _acc("img_c", "B-c")], [_rej("img_b", "B-rb"), _rej("img_c", "B-rc")],
                            [_img("img_b"), _img("img_c")])
    assert s1 != s2
    assert {k[0] for k in store.done_keys()} == {"img_a", "img_b", "img_c"}
    acc, rej, img, dropped = store.read_committed()
    assert dropped == 1
    assert (acc.schema, rej.schema, img.schema) == (ACCEPTED_WORK_SCHEMA, REJECTED_SCHEMA, IMAGES_SCHEMA)
    assert sorted(img.column("image_id").to_pylist()) == ["img_a", "img_b", "img_c"]
    # img_b is kept from the first shard by name only
    b_from = "A" if s1 < s2 else "B"
    assert sorted(acc.column("sample_id").to_pylist()) == sorted(["A-a", f"{b_from}-b", "B-c"])
    assert sorted(rej.column("sample_id").to_pylist()) == sorted([f"{b_from}-rb", "B-rc"])


def test_read_committed_empty(tmp_path: Path):
    acc, rej, img, dropped = OutputStore(tmp_path / "none").read_committed()
    assert (acc.num_rows, rej.num_rows, img.num_rows, dropped) == (0, 0, 0, 0)
    assert (acc.schema, rej.schema, img.schema) == (ACCEPTED_WORK_SCHEMA, REJECTED_SCHEMA, IMAGES_SCHEMA)


def _png(w: int, h: int, color=(200, 30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _accepted_row(i: int, png: bytes) -> dict:
    return {
        "sample_id": f"smp_{i:03d}", "image_id": f"img_{i:03d}", "image_path": f"photos/{i}.png", "sha256": "0" * 64,
        "phash": "f" * 16, "width": 7, "height": 5, "source_width": 14, "source_height": 10, "source_format": "PNG",
        "image_notes": ["resized"], "image": {"bytes": png, "path": f"photos/{i}.png"},
        "scene_description": "a kitchen", "scene_setting": "kitchen", "scene_entities": ["stove", "pan"],
        "candidate_index": i % 2, "hazard": "hot stove", "hazard_rationale": "burner is lit", "query": "how?",
        "response": "carefully", "rounds": 1, "reasons": [],
        "verdict_image_alone": "safe", "verdict_query_alone": "safe", "verdict_pair": "risky", "verdict_response": "safe",
        "reason_image_alone": "r", "reason_query_alone": "r", "reason_pair": "r", "reason_response": "r",
        "model_id": "builtin:tiny", "prompt_versions": {s: f"{s}@v1+00000000" for s in STAGES},
        "category_id": 0, "category": "burns", "mlcommons_category": "physical harm", "mlcommons_score": 0.5,
        "config_hash": "abcdef0123456789",
    }


def test_write_table_files_splits_and_names(store: OutputStore):
    t = table([{"image_id": f"img_{i}", "status": "accepted"} for i in range(7)], IMAGES_SCHEMA)
    paths = store.write_table_files(t, "data", "train", rows_per_file=3)
    assert paths == ["data/train-00000-of-00003.parquet", "data/train-00001-of-00003.parquet",
                     "data/train-00002-of-00003.parquet"]
    assert [pq.read_table(store.root / p).num_rows for p in paths] == [3, 3, 1]
    back = pa.concat_tables([pq.read_table(store.root / p) for p in paths])
    assert back.column("image_id").to_pylist() == [f"img_{i}" for i in range(7)]
    assert sorted(p.name for p in (store.root / "data").iterdir()) == [Path(p).name for p in paths]  # no tmp files
    # exact multiple: no empty trailing file
    assert store.write_table_files(t.slice(0, 6), "data", "train", 3) == [
        "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]


def test_write_table_files_removes_stale_files(store: OutputStore):
    t = table([{"image_id": f"img_{i}"} for i in range(10)], IMAGES_SCHEMA)
    store.write_table_files(t, "data", "train", 2)
    assert len(list((store.root / "data").glob("*.parquet"))) == 5
    (store.root / "data" / "notes.txt").write_text("keep me")
    paths = store.write_table_files(t.slice(0, 3), "data", "train", 5)
    assert paths == ["data/train-00000-of-00001.parquet"]
    assert sorted(p.name for p in (store.root / "data").iterdir()) == ["notes.txt", "train-00000-of-00001.parquet"]
    assert pq.read_table(store.root / paths[0]).num_rows == 3


def test_write_table_files_empty_table(store: OutputStore):
    paths = store.write_table_files(table([], REJECTED_SCHEMA), "rejected", "rejected", 100)
    assert paths == ["rejected/rejected-00000-of-00001.parquet"]
    t = pq.read_table(store.root / paths[0])
    assert t.num_rows == 0 and t.schema.remove_metadata() == REJECTED_SCHEMA


def test_final_files_readable_everywhere(store: OutputStore, tmp_path: Path):
    pngs = [_png(7, 5), _png(7, 5, (0, 255, 0)), _png(7, 5, (0, 0, 255))]
    rows = [_accepted_row(i, pngs[i]) for i in range(3)]
    paths = store.write_table_files(table(rows, ACCEPTED_SCHEMA), "data", "train", rows_per_file=2)
    assert paths == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    files = [str(store.root / p) for p in paths]

    # pyarrow.dataset over the folder
    ds = pads.dataset(str(store.root / "data"), format="parquet")
    t = ds.to_table()
    assert t.num_rows == 3
    assert t.schema.remove_metadata() == ACCEPTED_SCHEMA
    assert sorted(t.column("sample_id").to_pylist()) == ["smp_000", "smp_001", "smp_002"]

    # pandas
    df = pd.read_parquet(store.root / "data")
    assert len(df) == 3 and list(df.columns) == ACCEPTED_SCHEMA.names
    by_id = df.set_index("sample_id")
    assert by_id.loc["smp_001", "image"]["bytes"] == pngs[1]
    assert list(by_id.loc["smp_000", "scene_entities"]) == ["stove", "pan"]

    # Hugging Face datasets: image decodes to a PIL image, nested features typed
    import datasets

    hf = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf_cache"))
    assert hf.num_rows == 3
    assert isinstance(hf.features["image"], datasets.Image)
    assert hf.features["mlcommons_score"] == datasets.Value("float32")
    assert hf.features["width"] == datasets.Value("int32")
    assert set(hf.features["prompt_versions"]) == set(STAGES)
    by_sample = {r["sample_id"]: r for r in hf}
    img = by_sample["smp_002"]["image"]
    assert isinstance(img, Image.Image)
    assert img.size == (7, 5) and img.convert("RGB").getpixel((3, 2)) == (0, 0, 255)
    assert by_sample["smp_000"]["scene_entities"] == ["stove", "pan"]
    assert by_sample["smp_001"]["prompt_versions"]["verify_pair"] == "verify_pair@v1+00000000"
    assert by_sample["smp_001"]["mlcommons_score"] == pytest.approx(0.5)


def test_output_is_bound_to_one_config(tmp_path):
    from rms_ray.data.store import OutputConfigMismatch

    store = OutputStore(tmp_path / "out")
    store.check_config("aaaa", {"x": 1})
    store.prepare()
    store.check_config("aaaa", {"x": 1})  # same config: a resume
    with pytest.raises(OutputConfigMismatch, match="config hash aaaa.*hashes to bbbb"):
        store.check_config("bbbb", {"x": 2})
    assert json.loads((tmp_path / "out" / "_work" / "run_config.json").read_text())["config_hash"] == "aaaa"


def test_foreign_or_file_outputs_are_refused_untouched(tmp_path):
    from rms_ray.data.store import OutputError

    foreign = tmp_path / "mine"
    (foreign / "data").mkdir(parents=True)
    (foreign / "data" / "train-00000-of-00003.parquet").write_bytes(b"user data")
    with pytest.raises(OutputError, match="not empty and was not made by rms_ray"):
        OutputStore(foreign).check_config("aaaa", {})
    assert (foreign / "data" / "train-00000-of-00003.parquet").read_bytes() == b"user data"
    assert not (foreign / "_work").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        OutputStore(tmp_path / "f").check_config("aaaa", {})
    OutputStore(tmp_path / "empty").check_config("aaaa", {})  # a new folder is fine


def test_committed_images_keeps_the_current_content_of_an_edited_image(tmp_path):
    """A file edited between runs: its old commit (in a shard with other images) and its new one (redone alone)
    are both committed. The current content wins whichever shard sorts first, and the other image stays."""
    orders = set()
    for k in range(8):
        store = OutputStore(tmp_path / f"out{k}")
        store.prepare()
        x, y = f"img_x{k}", f"img_y{k}"
        old = store.commit_shard([_acc(x, "old-x"), _acc(y, "y")], [],
                                 [{**_img(x), "sha256": "old"}, {**_img(y), "sha256": "y"}])
        new = store.commit_shard([_acc(x, "new-x")], [], [{**_img(x), "sha256": "new"}])
        orders.add(old < new)
        acc, _, img, dropped = store.read_committed({x: "new", y: "y"})
        assert sorted(acc.column("sample_id").to_pylist()) == ["new-x", "y"], (k, old < new)
        assert sorted(zip(img.column("image_id").to_pylist(), img.column("sha256").to_pylist())) == [
            (x, "new"), (y, "y")]
        assert dropped == 1
    assert orders == {True, False}  # both shard orders were exercised
