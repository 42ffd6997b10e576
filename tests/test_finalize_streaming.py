"""Finalising at scale, on synthetic committed shards made with the store API (no engine): memory that does not grow
with the rows, an image's bytes stored once, damaged shards redone and never read, resume from a compacted index.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO
from PIL import Image
from synthetic import accepted_row, build_output, commit_images, finalize_output, image_id, plan_of, rejected_row

from rms_ray.data.store import COMPACT_AFTER, INGEST_SCHEMA, ROW_GROUP_BYTES, DamagedShardError, OutputStore, table

MB = 1 << 20
N_IMAGES = 250  # N: 500 accepted rows of ~100 KB images (25 MB of image bytes); 4N: 2,000 rows (100 MB)
IMAGE_SIZE = 100_000


def _measure(warm: Path, outs: list[Path]) -> list[dict]:
    cmd = [sys.executable, str(REPO / "tests" / "synthetic.py"), "finalize", str(warm), *map(str, outs)]
    # glibc keeps what it frees (no trim, no per-thread arenas): the embedder's working memory, once resident after
    # the warm-up, is reused instead of being returned and faulted in again, which would show as noise in VmHWM
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
           "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {Path(m["out"]).name: m for m in json.loads(r.stdout.strip().splitlines()[-1])}


def test_finalize_memory_does_not_grow_with_the_rows(tmp_path):
    """Finalise N and 4N rows with ~100 KB image bytes each in one fresh process (after a warm-up on 4 images that
    loads the taxonomy embedder, so its load is in neither side): the memory that could hold rows (Arrow buffers,
    Python objects) is the same for both, and so, within noise, is the peak resident memory. A finalise that held
    the rows would need the 75 MB of extra image bytes more (and the copies a concat and a sort make)."""
    warm = build_output(tmp_path / "warm", 4, image_size=IMAGE_SIZE).root
    build_output(tmp_path / "n", N_IMAGES, image_size=IMAGE_SIZE)
    build_output(tmp_path / "4n", 4 * N_IMAGES, image_size=IMAGE_SIZE)
    res = _measure(warm, [tmp_path / "n", tmp_path / "4n"])
    small, big = res["n"], res["4n"]
    assert (small["samples"], big["samples"]) == (2 * N_IMAGES, 8 * N_IMAGES) and small["balanced"] and big["balanced"]
    extra = 3 * N_IMAGES * IMAGE_SIZE
    held = {k: r["arrow_peak"] + r["python_peak"] for k, r in res.items()}
    line = (f"\nfinalise, N = {2 * N_IMAGES} rows vs 4N = {8 * N_IMAGES} rows ({extra / MB:.1f} MB more image bytes):"
            f" Arrow peak {small['arrow_peak'] / MB:.1f} / {big['arrow_peak'] / MB:.1f} MB, Python peak "
            f"{small['python_peak'] / MB:.1f} / {big['python_peak'] / MB:.1f} MB")
    if small["cleared"] and big["cleared"]:
        line += f", peak RSS growth {small['rss_growth'] / MB:.1f} / {big['rss_growth'] / MB:.1f} MB"
    print(line + f"; {small['finalize_s']} s / {big['finalize_s']} s")
    assert held["4n"] - held["n"] < 8 * MB, "finalise holds more as rows grow"
    assert big["arrow_peak"] < 2 * ROW_GROUP_BYTES + 16 * MB  # a row group being written + the shards being read
    if small["cleared"] and big["cleared"]:  # (no VmHWM reset on this kernel: the deterministic check above stays)
        assert big["rss_growth"] - small["rss_growth"] < extra / 2


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + i, 6), ((40 * i) % 256, 100, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _data_rows(out: Path) -> list[tuple[str, dict]]:
    return [(p.name, r) for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_image_bytes_stored_once_per_image_and_every_reader_gets_them(tmp_path):
    """data/ and the work shards hold each image's bytes exactly once (its first row); datasets still decodes
    `image`, the documented pandas join fills every row, and the labelled export gives every row its image."""
    store = OutputStore(tmp_path / "out")
    store.prepare()
    pngs = {i: _png(i) for i in range(7)}
    for ids in ([0, 1, 2], [3, 4], [5, 6]):  # three candidates per image, all rows given the image by the actor
        store.commit_shard([accepted_row(i, k, pngs[i]) for i in ids for k in (2, 0, 1)],
                           [rejected_row(i, 3) for i in ids],
                           [{"image_id": image_id(i), "sha256": f"sha-{i}", "status": "accepted", "n_accepted": 3,
                             "n_rejected": 1, "gen_tokens": 1} for i in ids])
    store.merge_ingest(table([{"image_id": image_id(i), "image_path": f"photos/{i}.jpg", "sha256": f"sha-{i}",
                               "status": "ok"} for i in range(7)], INGEST_SCHEMA))
    for shard in store.commits.iterdir():  # the work shards already store an image once, on its first row
        acc = pq.read_table(shard / "accepted.parquet").to_pylist()
        keys = [(r["image_id"], r["candidate_index"]) for r in acc]
        assert keys == sorted(keys)
        assert all((r["image"] is not None) == (r["candidate_index"] == 0) for r in acc)
    from rms_ray.common.config import load_config

    manifest = finalize_output(store, load_config("cpu-tiny", {"output.rows_per_file": 4}))
    assert manifest["format"] == "rms_ray.dataset/v2" and manifest["accounting"]["balanced"]

    rows = _data_rows(store.root)
    assert len(rows) == 21 and len({f for f, _ in rows}) == 7  # 3 rows an image, 4 rows a file: one image a file
    assert [(r["image_id"], r["candidate_index"]) for _, r in rows] == sorted(
        (r["image_id"], r["candidate_index"]) for _, r in rows)
    files_of = {}
    for f, r in rows:
        files_of.setdefault(r["image_id"], set()).add(f)
    assert all(len(f) == 1 for f in files_of.values())  # an image's rows are never split across files
    stored = Counter(r["image"]["bytes"] for _, r in rows if r["image"] is not None)
    assert stored == Counter(set(pngs.values()))  # every image's bytes exactly once, on its first row
    assert all((r["image"] is not None) == (r["candidate_index"] == 0) for _, r in rows)

    import datasets
    import pandas as pd

    ds = datasets.load_dataset("parquet", data_files=str(store.root / "data" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image)
    firsts = [r for r in ds if r["image"] is not None]
    assert len(firsts) == 7 and all(isinstance(r["image"], Image.Image) for r in firsts)
    first = {}  # the join documented in the card / README
    for k, i in enumerate(ds["image_id"]):
        first.setdefault(i, k)
    assert all(ds[first[r["image_id"]]]["image"].size == (8 + int(r["image_id"][4:]), 6) for r in ds)
    df = pd.read_parquet(store.root / "data")
    df["image"] = df.groupby("image_id")["image"].transform("first")
    assert all(row["image"]["bytes"] == pngs[int(row["image_id"][4:])] for _, row in df.iterrows())

    from rms_ray.construct.export import iter_labelled_rows

    labelled = list(iter_labelled_rows(store.root, batch_size=2))
    assert len([r for r in labelled if r["task"] == "prompt" and r["label"] == "unsafe"]) == 21
    assert all(r["image"]["bytes"] == pngs[int(r["image_id"][4:])] for r in labelled)
    # rows in another order than data/'s (a user re-sorted the file): each image is looked up, never a wrong one
    shuffled = pq.read_table(sorted((store.root / "data").glob("*.parquet"))).sort_by([("sample_id", "descending")])
    for p in (store.root / "data").glob("*.parquet"):
        p.unlink()
    pq.write_table(shuffled, store.root / "data" / "train-00000-of-00001.parquet")
    assert all(r["image"]["bytes"] == pngs[int(r["image_id"][4:])] for r in iter_labelled_rows(store.root))


def _rows(out: Path, sub: str) -> list[dict]:
    rows = pq.read_table(sorted((out / sub).glob("*.parquet"))).to_pylist()
    return sorted(rows, key=lambda r: r["sample_id"])


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero-byte":
        path.write_bytes(b"")
    else:  # same size, other bytes: only the sha256 tells
        path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])


def test_damaged_shards_are_redone_and_never_read(tmp_path):
    """Committed shards left truncated or empty (a machine crash on a filesystem that lost data) after a complete
    run: the resumed run's check moves them aside, their images are generated again (here: committed again, as the
    engine would), and the dataset equals the original, no row duplicated."""
    from rms_ray.construct.pipeline import redo_damaged

    store = build_output(tmp_path / "out", 48, batch=8, image_size=500)
    assert store.verify_commits() == []  # what a run does after generation: check, and compact into the index
    first = finalize_output(store)
    want = {sub: _rows(store.root, sub) for sub in ("data", "rejected")}
    shards = sorted(p.name for p in store.commits.iterdir())
    damage = {shards[0]: ("accepted.parquet", "truncated"), shards[2]: ("images.parquet", "zero-byte"),
              shards[3]: ("rejected.parquet", "zero-byte"), shards[5]: ("_SUCCESS", "zero-byte")}
    victim_ids = []
    for name, (target, how) in damage.items():
        victim_ids += pq.read_table(store.commits / name / "images.parquet").column("image_id").to_pylist()
        _damage(store.commits / name / target, how)

    p = plan_of(store)
    assert p.todo == []  # the resume's plan reads the index, which still lists the shards (none is opened)
    with pytest.warns(RuntimeWarning, match="is damaged"):
        redo = redo_damaged(p, store)  # after generation, before finalising: every shard checked against _SUCCESS
    assert sorted(s.image_id for s in redo) == sorted(victim_ids)
    assert not any((store.commits / name).exists() for name in damage)
    notes = sorted((d / "DAMAGED.txt").read_text().split(" ")[0] for d in store.damaged.iterdir())
    assert notes == sorted(t for t, _ in damage.values())
    commit_again = sorted(int(i[4:]) for i in victim_ids)
    for start in range(0, len(commit_again), 8):  # generated again, in the same batches (so the same shard names:
        # the damaged ones were moved out of the way)
        commit_images(store, commit_again[start:start + 8], image_size=500)
    assert all((store.commits / name).exists() for name in damage)
    second = finalize_output(store)
    assert second["accounting"] == first["accounting"] and second["complete"]
    for sub in ("data", "rejected"):
        got = _rows(store.root, sub)
        assert len({r["sample_id"] for r in got}) == len(got)
        assert got == want[sub], sub


def test_shard_changed_after_its_check_is_caught_when_finalising(tmp_path):
    """Same size, other bytes (only the sha256 tells): finalising refuses to write it, moves it aside, and the
    next run redoes its images."""
    store = build_output(tmp_path / "out", 24, batch=8, image_size=500)
    want = finalize_output(store)["accounting"]
    victim = store.commits / sorted(p.name for p in store.commits.iterdir())[1]
    ids = pq.read_table(victim / "images.parquet").column("image_id").to_pylist()
    _damage(victim / "accepted.parquet", "flipped")
    assert store.verify_commits() == []  # sizes match: the cheap check passes
    with pytest.raises(DamagedShardError, match="rerun the same command to redo its images"):
        finalize_output(store)
    assert not victim.exists()
    p = plan_of(store)
    assert sorted(s.image_id for s in p.todo) == sorted(ids)
    commit_images(store, [int(i[4:]) for i in ids], image_size=500)
    assert finalize_output(store)["accounting"] == want


def test_done_keys_reads_the_compacted_index_not_the_shards(tmp_path):
    """More than COMPACT_AFTER shards: done_keys compacts them into _work/commits.parquet once, then reads that
    file (the shards' own key lists can be gone) plus only the few shards committed since."""
    n = COMPACT_AFTER + 6
    store = build_output(tmp_path / "out", n, batch=1, image_size=10)
    assert not store.index_path.exists()
    keys = OutputStore(store.root).done_keys()
    assert {k[0] for k in keys} == {image_id(i) for i in range(n)}
    assert store.index_path.exists() and pq.read_metadata(store.index_path).num_rows == n
    for shard in store.commits.iterdir():  # proof that the index, not the shards, is read from now on
        (shard / "images.parquet").unlink()
    for i in range(n, n + 3):
        commit_images(store, [i], image_size=10)
    before = store.index_path.stat().st_mtime_ns
    assert {k[0] for k in OutputStore(store.root).done_keys()} == {image_id(i) for i in range(n + 3)}
    assert store.index_path.stat().st_mtime_ns == before  # three new shards are read directly, not compacted
    assert (image_id(0), "sha-0") in keys


def test_compaction_is_atomic(tmp_path, monkeypatch):
    """A compaction killed while writing leaves the previous index whole (and only a temp file, removed by the next
    run's prepare); an index a lying filesystem truncated is rebuilt from the shards. done_keys stays complete."""
    store = build_output(tmp_path / "out", 10, batch=1, image_size=10)
    assert store.compact() == 10
    old = store.index_path.read_bytes()
    for i in range(10, 15):
        commit_images(store, [i], image_size=10)
    everything = {image_id(i) for i in range(15)}

    real_write = pq.write_table

    def dies_half_way(tbl, where, **kw):  # the process dies after writing half of the new index
        real_write(tbl, where, **kw)
        Path(where).write_bytes(Path(where).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        store.compact()
    monkeypatch.undo()
    assert store.index_path.read_bytes() == old
    assert {k[0] for k in OutputStore(store.root).done_keys()} == everything

    leftover = store.work / f".{store.index_path.name}.12345.0123456789ab.tmp"  # what a SIGKILL leaves
    leftover.write_bytes(b"PAR1 half an index")
    assert {k[0] for k in OutputStore(store.root).done_keys()} == everything
    store.prepare()
    assert not leftover.exists()

    store.index_path.write_bytes(old[: len(old) // 2])  # truncated by a machine crash
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert {k[0] for k in OutputStore(store.root).done_keys()} == everything
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert OutputStore(store.root).compact() == 15
    assert pq.read_metadata(store.index_path).num_rows == 15
