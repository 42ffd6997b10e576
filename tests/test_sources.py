"""rms_ray.data.sources: folders, globs and .jsonl/.parquet listings expand to sorted sources with stable image ids."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rms_ray.common.config import ImagesConfig
from rms_ray.data.sources import LISTING_COLUMNS, ImageSource, list_images, make_image_id, read_bytes

EXT = ImagesConfig().extensions


def _id(key: str) -> str:
    return "img_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _touch(root: Path, rel: str, content: bytes | None = None) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if content is not None else rel.encode())
    return p


@pytest.fixture
def tmp_path(tmp_path: Path) -> Path:
    return tmp_path.resolve()  # sources resolve local paths: compare against the resolved form


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for rel in ("a.jpg", "B.JPG", "c.Png", "sub/d.jpeg", "sub/deeper/e.webp", "notes.txt", "sub/f.gif.bak",
                "sub/README", "g.tiff"):
        _touch(root, rel)
    return root


def test_make_image_id():
    assert make_image_id("a.jpg") == _id("a.jpg")
    assert make_image_id("a.jpg").startswith("img_") and len(make_image_id("a.jpg")) == 20
    assert make_image_id("a.jpg") != make_image_id("A.jpg")


def test_folder_recursive_case_insensitive(tree: Path):
    sources, repeated = list_images(str(tree), EXT)
    assert repeated == 0
    rels = {s.rel_path for s in sources}
    assert rels == {"a.jpg", "B.JPG", "c.Png", "sub/d.jpeg", "sub/deeper/e.webp", "g.tiff"}
    for s in sources:
        assert s.image_id == _id(s.rel_path)
        assert s.uri == str(tree / s.rel_path)
        assert read_bytes(s.uri) == s.rel_path.encode()
    assert [s.image_id for s in sources] == sorted(s.image_id for s in sources)


def test_folder_extension_filter(tree: Path):
    sources, _ = list_images(str(tree), (".png",))
    assert [s.rel_path for s in sources] == ["c.Png"]
    assert list_images(str(tree), (".heic",)) == ([], 0)


def test_single_file(tree: Path):
    sources, repeated = list_images(str(tree / "sub" / "d.jpeg"), EXT)
    assert (sources, repeated) == ([ImageSource(_id("d.jpeg"), str(tree / "sub" / "d.jpeg"), "d.jpeg")], 0)


def test_ids_stable_when_root_moves(tree: Path, tmp_path: Path):
    before, _ = list_images(str(tree), EXT)
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    tree.rename(moved)
    after, _ = list_images(str(moved), EXT)
    assert [(s.image_id, s.rel_path) for s in after] == [(s.image_id, s.rel_path) for s in before]
    assert all(s.uri.startswith(str(moved) + "/") for s in after)
    assert {s.uri for s in after}.isdisjoint({s.uri for s in before})


def test_relative_spec_resolves(tree: Path, monkeypatch):
    monkeypatch.chdir(tree.parent)
    sources, _ = list_images("photos", EXT)
    assert sources == list_images(str(tree), EXT)[0]


def test_glob(tree: Path):
    sources, repeated = list_images(str(tree / "*.jpg"), EXT)
    assert repeated == 0
    assert [(s.rel_path, s.uri) for s in sources] == [("a.jpg", str(tree / "a.jpg"))]
    assert sources[0].image_id == _id("a.jpg")
    # [..] classes work, and the extension filter applies to globs too (notes.txt is not an image)
    assert {s.rel_path for s in list_images(str(tree / "[ng]*"), EXT)[0]} == {"g.tiff"}
    # ids from a glob equal ids from listing the folder (relative to the glob's root)
    by_folder = {s.rel_path: s.image_id for s in list_images(str(tree), EXT)[0]}
    by_glob = {s.rel_path: s.image_id for s in list_images(str(tree / "sub" / "*"), EXT)[0]}
    assert by_glob["d.jpeg"] != by_folder["sub/d.jpeg"]  # root of the glob is sub/: rel path differs
    assert by_glob["d.jpeg"] == _id("d.jpeg")


def test_glob_matching_nothing(tree: Path):
    assert list_images(str(tree / "*.heic"), EXT) == ([], 0)


def test_jsonl_listing_relative_paths_and_id_column(tmp_path: Path):
    imgs = tmp_path / "ds"
    _touch(imgs, "images/x.jpg", b"X")
    _touch(imgs, "images/y.png", b"Y")
    outside = _touch(tmp_path, "abs/z.jpg", b"Z")
    rows = [
        {"image_path": "images/x.jpg", "id": "row-1"},
        {"image_path": "images/y.png"},
        {"image_path": str(outside), "id": "row-3"},
    ]
    listing = imgs / "listing.jsonl"
    listing.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    sources, repeated = list_images(str(listing), EXT)
    assert repeated == 0
    by_rel = {s.rel_path: s for s in sources}
    assert set(by_rel) == {"images/x.jpg", "images/y.png", str(outside)}
    assert by_rel["images/x.jpg"].image_id == _id("row-1")
    assert by_rel["images/y.png"].image_id == _id("images/y.png")  # no id: the path as listed
    assert by_rel[str(outside)].image_id == _id("row-3")
    assert by_rel["images/x.jpg"].uri == str(imgs / "images" / "x.jpg")
    assert by_rel[str(outside)].uri == str(outside)
    assert [read_bytes(by_rel[k].uri) for k in ("images/x.jpg", "images/y.png", str(outside))] == [b"X", b"Y", b"Z"]
    assert [s.image_id for s in sources] == sorted(s.image_id for s in sources)


def test_listing_ids_stable_when_dataset_moves(tmp_path: Path):
    ds = tmp_path / "ds"
    _touch(ds, "images/x.jpg")
    (ds / "l.jsonl").write_text(json.dumps({"file": "images/x.jpg"}) + "\n")
    before, _ = list_images(str(ds / "l.jsonl"), EXT)
    ds.rename(tmp_path / "ds2")
    after, _ = list_images(str(tmp_path / "ds2" / "l.jsonl"), EXT)
    assert [s.image_id for s in after] == [s.image_id for s in before] == [_id("images/x.jpg")]
    assert after[0].uri == str(tmp_path / "ds2" / "images" / "x.jpg")


def test_parquet_listing(tmp_path: Path):
    _touch(tmp_path, "p/1.jpg")
    _touch(tmp_path, "p/2.jpg")
    pq.write_table(pa.table({"path": ["p/1.jpg", "p/2.jpg", "p/1.jpg"], "label": [0, 1, 0]}), tmp_path / "l.parquet")
    sources, repeated = list_images(str(tmp_path / "l.parquet"), EXT)
    assert repeated == 1
    assert sorted((s.rel_path, s.image_id, s.uri) for s in sources) == [
        ("p/1.jpg", _id("p/1.jpg"), str(tmp_path / "p/1.jpg")),
        ("p/2.jpg", _id("p/2.jpg"), str(tmp_path / "p/2.jpg")),
    ]


def test_listing_column_priority(tmp_path: Path):
    assert LISTING_COLUMNS == ("image", "image_path", "path", "file")
    pq.write_table(pa.table({"file": ["f.jpg"], "image": ["i.jpg"]}), tmp_path / "l.parquet")
    sources, _ = list_images(str(tmp_path / "l.parquet"), EXT)
    assert [s.rel_path for s in sources] == ["i.jpg"]


def test_repeated_entries_counted(tmp_path: Path):
    rows = [{"path": "a.jpg"}, {"path": "b.jpg"}, {"path": "a.jpg"}, {"path": "a.jpg"},
            {"path": "c.jpg", "id": "same"}, {"path": "c.jpg", "id": "same"}, {"path": "e.jpg", "id": 0}]
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    sources, repeated = list_images(str(tmp_path / "l.jsonl"), EXT)
    assert repeated == 3
    assert {s.image_id: s.rel_path for s in sources} == {
        _id("a.jpg"): "a.jpg", _id("b.jpg"): "b.jpg", _id("same"): "c.jpg", _id("0"): "e.jpg"}  # id 0 is an id


def test_one_id_for_two_files_is_an_error_not_a_silent_drop(tmp_path: Path):
    rows = [{"path": "c.jpg", "id": "same"}, {"path": "d.jpg", "id": "same"}]
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="one id names two different files .1.: 'same': c.jpg and d.jpg"):
        list_images(str(tmp_path / "l.jsonl"), EXT)


def test_malformed_listings_name_the_line(tmp_path: Path):
    (tmp_path / "l.jsonl").write_text('{"path": "a.jpg"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        list_images(str(tmp_path / "l.jsonl"), EXT)
    (tmp_path / "m.jsonl").write_text('{"path": "a.jpg"}\n{"path": null}\n')
    with pytest.raises(ValueError, match="row 2: no 'path' value"):
        list_images(str(tmp_path / "m.jsonl"), EXT)


def test_exclude_and_file_metadata(tmp_path: Path):
    _touch(tmp_path, "in/a.jpg", b"abc")
    _touch(tmp_path, "in/out/categories.png", b"x")
    sources, _ = list_images(str(tmp_path / "in"), EXT, exclude=str((tmp_path / "in" / "out").resolve()))
    assert [s.rel_path for s in sources] == ["a.jpg"]
    assert sources[0].size == 3 and sources[0].mtime_ns > 0


def test_listing_without_path_column(tmp_path: Path):
    (tmp_path / "l.jsonl").write_text(json.dumps({"url": "a.jpg", "id": "1"}) + "\n")
    with pytest.raises(ValueError) as ei:
        list_images(str(tmp_path / "l.jsonl"), EXT)
    assert "has none of the columns ('image', 'image_path', 'path', 'file'); found ['id', 'url']" in str(ei.value)
    pq.write_table(pa.table({"name": ["a.jpg"]}), tmp_path / "l.parquet")
    with pytest.raises(ValueError, match=r"found \['name'\]"):
        list_images(str(tmp_path / "l.parquet"), EXT)


def test_empty_listing(tmp_path: Path):
    (tmp_path / "l.jsonl").write_text("\n\n")
    assert list_images(str(tmp_path / "l.jsonl"), EXT) == ([], 0)


@pytest.mark.parametrize("rel", ["missing", "missing.jsonl", "missing.parquet", "missing_dir/*.jpg"])
def test_nonexistent_input(tmp_path: Path, rel: str):
    with pytest.raises(FileNotFoundError):
        list_images(str(tmp_path / rel), EXT)


def test_nonexistent_folder_message(tmp_path: Path):
    spec = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as ei:
        list_images(spec, EXT)
    assert str(ei.value) == f"input {spec} does not exist"


def test_read_bytes_missing(tmp_path: Path):
    with pytest.raises(OSError):
        read_bytes(str(tmp_path / "nope.jpg"))


def test_uri_inputs_go_through_pyarrow_filesystems(tmp_path):
    """file:// takes the same pyarrow.fs path as s3:// and gs://; ids match the plain local path."""
    from rms_ray.data.sources import read_bytes

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.png").write_bytes(b"png-bytes")
    (tmp_path / "d" / "b.JPG").write_bytes(b"jpg-bytes")
    via_uri, _ = list_images(f"file://{tmp_path / 'd'}", (".png", ".jpg"))
    local, _ = list_images(str(tmp_path / "d"), (".png", ".jpg"))
    assert [s.image_id for s in via_uri] == [s.image_id for s in local] and len(local) == 2
    assert all(s.uri.startswith("file://") for s in via_uri)
    assert sorted(read_bytes(s.uri) for s in via_uri) == [b"jpg-bytes", b"png-bytes"]
