"""The ingest pass commits its results while it runs: a pass aborted in the middle keeps what it committed, and the
rerun decodes only the rest (real Ray Data pass over real image files; no engine)."""

from __future__ import annotations

import io
import os

import pyarrow.compute as pc
import pytest
from PIL import Image

from rms_ray.common.config import load_config
from rms_ray.construct.pipeline import ingest
from rms_ray.data.sources import list_images
from rms_ray.data.store import OutputStore

N = 24
PART = 4


class Aborted(Exception):
    pass


def _write_images(root):
    root.mkdir()
    for i in range(N):
        buf = io.BytesIO()
        Image.new("RGB", (48 + i, 40), (10 * i, 100, 200 - 5 * i)).save(buf, format="PNG")
        (root / f"{i:02d}.png").write_bytes(buf.getvalue())


def test_ingest_aborted_in_the_middle_resumes_from_its_parts(tmp_path, ray_local):
    inp = tmp_path / "in"
    _write_images(inp)
    cfg = load_config("cpu-tiny")
    sources, _ = list_images(str(inp), tuple(cfg.images.extensions))
    store = OutputStore(tmp_path / "out")
    store.prepare()

    def abort_after_two_parts(done: int, total: int) -> None:  # like Ctrl-C (or a crash) at 2 parts of 6
        assert total == N
        if done >= 2 * PART:
            raise Aborted

    with pytest.raises(Aborted):
        ingest(sources, cfg, store, part_rows=PART, on_part=abort_after_two_parts)
    parts = sorted(store.ingest_parts.glob("part-*.parquet"))
    assert len(parts) == 2 and not store.ingest_path.exists()
    committed = {r["image_id"] for t in store.read_ingest_cache() for r in t.to_pylist()}
    assert len(committed) == 2 * PART

    # Every input now gets other bytes of the same size and mtime: a file the rerun decodes again shows its new
    # content (here: not a PNG any more, so quarantined); a file taken from the committed parts keeps the old one.
    for s in sources:
        path = inp / s.rel_path
        st = path.stat()
        path.write_bytes(b"\0" * st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again, _ = list_images(str(inp), tuple(cfg.images.extensions))
    assert [(s.size, s.mtime_ns) for s in again] == [(s.size, s.mtime_ns) for s in sources]

    table, decoded = ingest(again, cfg, store, part_rows=PART)
    assert decoded == N - 2 * PART  # only the rest was decoded
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert len(rows) == N
    assert {i for i, r in rows.items() if r["status"] == "ok"} == committed  # reused, not decoded
    assert all(r["status"] == "quarantined" for i, r in rows.items() if i not in committed)  # decoded now
    # the parts were merged into one cache file; a third run decodes nothing
    assert store.ingest_path.exists() and not list(store.ingest_parts.glob("part-*.parquet"))
    table3, decoded3 = ingest(again, cfg, store, part_rows=PART)
    assert decoded3 == 0 and table3.equals(table)
    assert pc.count_distinct(table3.column("image_id")).as_py() == N
