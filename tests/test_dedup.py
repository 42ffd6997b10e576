"""rms_ray.data.dedup: exact (sha256) and near (pHash AND colour) duplicates, without chains; deterministic, order
independent, fast.

Real photos from examples/photos (always) and ../shared/data/pypi_sample_photos when present (generated images
otherwise), images built with PIL, real normalize_image() outputs, no mocks.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFilter

from rms_ray.data.dedup import (
    COLOR_SIG_PREFIX,
    DEFAULT_MAX_COLOR_DISTANCE,
    DuplicateOf,
    _near_pairs,
    _parse_color_sigs,
    color_distance,
    color_signature,
    find_duplicates,
    hamming,
)
from rms_ray.data.images import NormalizedImage, normalize_image

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "examples" / "photos"
SHARED_DATA = Path(os.environ.get("RMS_SHARED_DATA", REPO.parent / "shared" / "data"))
PHOTOS_DIR = SHARED_DATA / "pypi_sample_photos"
MMSAFEAWARE_IMAGES = SHARED_DATA / "MMSafeAware" / "images"

# Photos with distinct content (textures brick/grass/gravel are left out of the near-duplicate test: a 50%
# resize + q70 re-encode moves brick.png's phash by exactly 4 bits, right at the threshold).
NEAR_DUP_PHOTOS = (
    "scikit-image/astronaut.png",
    "scikit-image/chelsea.png",
    "scikit-image/coffee.png",
    "scikit-image/rocket.jpg",
    "scikit-image/camera.png",
    "scikit-image/coins.png",
    "scikit-image/hubble_deep_field.jpg",
    "scikit-learn/china.jpg",
    "scikit-learn/flower.jpg",
    "matplotlib/grace_hopper.jpg",
)
# A stereo pair: the same scene from two camera positions a few cm apart. At max_hamming=4 it IS a near duplicate
# (measured distance 4 with pillow 13 / imagehash 4.3.2); that is the intended behaviour for a safety dataset.
STEREO_PAIR = ("motorcycle_left.png", "motorcycle_right.png")
# Bundled colour photos (the others are greyscale: a hue rotation does not change them)
COLOUR_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
# Same layout, other colours: a product shot (see _product_shot)
PRODUCT_COLOURS = {"red": (200, 30, 30), "green": (30, 150, 50), "blue": (30, 60, 190), "black": (30, 30, 30),
                   "purple": (120, 40, 150), "orange": (240, 120, 20), "teal": (20, 140, 140)}
# A synthetic colour signature for the hash-only tests: every row the same colour
GREY_SIG = COLOR_SIG_PREFIX + "808080" * 16


def _generated_photo(seed: int) -> bytes:
    """Structurally distinct synthetic 'photo': a random 6x6 colour field upsampled smoothly, plus noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
    im = np.asarray(coarse.resize((320, 240), Image.Resampling.BICUBIC), dtype=np.float32)
    im = np.clip(im + rng.normal(0, 5, im.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(im, "RGB").save(buf, "PNG")
    return buf.getvalue()


def _photos() -> dict[str, bytes]:
    """name -> original file bytes. Real photos when available, else 12 generated ones."""
    if PHOTOS_DIR.is_dir():
        files = sorted(p for p in PHOTOS_DIR.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if files:
            return {str(p.relative_to(PHOTOS_DIR)): p.read_bytes() for p in files}
    return {f"generated_{i:02d}.png": _generated_photo(i) for i in range(12)}


def _bundled() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(BUNDLED.iterdir()) if p.suffix.lower() in (".png", ".jpg")}


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _variant(data: bytes) -> bytes:
    """The same photo downscaled to 50% (LANCZOS) and re-encoded as JPEG quality 70."""
    im = _rgb(data)
    return _encode(im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS), "JPEG", quality=70)


def _compression_variants(data: bytes) -> dict[str, bytes]:
    """Size / compression changes only: what a near duplicate is."""
    im = _rgb(data)
    w, h = im.size
    return {
        "half_q70": _variant(data),
        "80pct_q85": _encode(im.resize((w * 4 // 5, h * 4 // 5), Image.Resampling.BICUBIC), "JPEG", quality=85),
        "webp50": _encode(im, "WEBP", quality=50),
    }


def _hue(im: Image.Image, degrees: int) -> Image.Image:
    hsv = np.asarray(im.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + degrees * 256 // 360) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _scale(im: Image.Image, factor) -> Image.Image:
    """Multiply the sRGB values (a scalar: brightness; per channel: a tint), rounded and clipped."""
    return Image.fromarray(np.clip(np.rint(np.asarray(im, dtype=np.float64) * factor), 0, 255).astype(np.uint8))


def _colour_variants(data: bytes) -> dict[str, bytes]:
    """Colour changes only (same layout): recolours, another time of day. Not duplicates."""
    im = _rgb(data)
    out = {f"hue{d}": _encode(_hue(im, d)) for d in (30, 90, 180)}
    out["bgr"] = _encode(Image.fromarray(np.asarray(im)[..., ::-1].copy()))
    out["dusk"] = _encode(_scale(im, np.array([0.75, 0.6, 0.5])))  # darker and warmer
    out["night"] = _encode(_scale(im, np.array([0.45, 0.5, 0.7])))  # dark and blue
    out["brighter"] = _encode(_scale(im, 1.3))
    return out


def _product_shot(colour: tuple[int, int, int], size=(400, 300)) -> Image.Image:
    """A mug on a white table (body, handle, highlight, shadow), slightly blurred like a photo."""
    w, h = size
    im = Image.new("RGB", size, (250, 250, 250))
    d = ImageDraw.Draw(im)
    d.ellipse((w * 0.2, h * 0.82, w * 0.7, h * 0.92), fill=(200, 200, 200))
    d.rounded_rectangle((w * 0.25, h * 0.2, w * 0.6, h * 0.85), radius=18, fill=colour)
    d.ellipse((w * 0.55, h * 0.35, w * 0.75, h * 0.65), outline=colour, width=14)
    d.rectangle((w * 0.3, h * 0.25, w * 0.34, h * 0.8), fill=tuple(min(255, c + 60) for c in colour))
    return im.filter(ImageFilter.GaussianBlur(1.5))


def _norm(data: bytes, name: str) -> NormalizedImage:
    result = normalize_image(data, name)
    assert isinstance(result, NormalizedImage), (name, result)
    return result


@pytest.fixture(scope="module")
def photos() -> dict[str, NormalizedImage]:
    return {name: _norm(data, name) for name, data in _photos().items()}


def _item(image_id: str, n: NormalizedImage) -> tuple[str, str, str, str]:
    return image_id, n.sha256, n.phash, n.color_sig


def _dup(image_id: str, of: str, kind: str, a: NormalizedImage, b: NormalizedImage) -> DuplicateOf:
    """The expected row for ``a`` duplicating ``b``, distances computed independently of find_duplicates."""
    return DuplicateOf(image_id, of, kind, hamming(a.phash, b.phash), round(color_distance(a.color_sig, b.color_sig), 2))


# --- colour signature -----------------------------------------------------------------------------------------


def test_color_signature_lab_values():
    """Known sRGB -> CIE L*a*b* (D65) values (e.g. Lindbloom's calculator): red (53.24, 80.09, 67.20), green
    (87.73, -86.18, 83.18), blue (32.30, 79.19, -107.86), mid grey 119 -> L* 50.0; within the 1-byte quantisation."""
    expected = {(255, 0, 0): (53.24, 80.09, 67.20), (0, 255, 0): (87.73, -86.18, 83.18),
                (0, 0, 255): (32.30, 79.19, -107.86), (255, 255, 255): (100, 0, 0), (0, 0, 0): (0, 0, 0),
                (119, 119, 119): (50.0, 0, 0)}
    for rgb, lab in expected.items():
        sig = color_signature(Image.new("RGB", (50, 37), rgb))
        assert sig.startswith(COLOR_SIG_PREFIX) and len(sig) == len(COLOR_SIG_PREFIX) + 96
        cells = _parse_color_sigs([sig])[0]
        assert np.allclose(cells, np.array(lab, dtype=np.float32), atol=0.6), (rgb, cells[0])
    # the grid is spatial: left half red, right half blue -> the left cells are red, the right ones blue
    im = Image.new("RGB", (40, 40), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 40))
    cells = _parse_color_sigs([color_signature(im)])[0].reshape(4, 4, 3)
    assert np.allclose(cells[:, :2, 2], 67, atol=1) and np.allclose(cells[:, 2:, 2], -108, atol=1)
    # tiny and non-RGB images work; means are taken in linear light (a 50/50 black/white mix is L* 76, not 50)
    assert color_signature(Image.new("L", (1, 1), 0)).startswith(COLOR_SIG_PREFIX)
    checker = Image.fromarray((np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8), "L")
    assert abs(_parse_color_sigs([color_signature(checker)])[0, 0, 0] - 76.07) < 0.5
    with pytest.raises(ValueError, match="colour signature"):
        color_distance(GREY_SIG, "hsv4x4:" + "00" * 48)
    assert color_distance(GREY_SIG, GREY_SIG) == 0.0


def test_normalize_image_sets_color_sig(photos):
    for name, n in photos.items():
        assert n.color_sig.startswith(COLOR_SIG_PREFIX), name
    a = next(iter(photos.values()))
    assert color_distance(a.color_sig, a.color_sig) == 0.0


# --- behaviour on real images ---------------------------------------------------------------------------------


def test_exact_duplicates_same_bytes_two_ids():
    data = _photos()[sorted(_photos())[0]]
    a, b = _norm(data, "a.png"), _norm(data, "b.png")
    assert a.sha256 == b.sha256 and a.phash == b.phash and a.color_sig == b.color_sig
    dups = find_duplicates([_item("img_b", b), _item("img_a", a)])
    assert dups == [DuplicateOf(image_id="img_b", canonical_id="img_a", kind="exact", distance=0, color_distance=0.0)]


def test_near_duplicates_resized_and_reencoded(photos):
    originals = _photos()
    names = [n for n in NEAR_DUP_PHOTOS if n in originals] or sorted(originals)
    items, expected, distances = [], [], {}
    for i, name in enumerate(names):
        variant = _norm(_variant(originals[name]), f"{name}.variant.jpg")
        distances[name] = (hamming(photos[name].phash, variant.phash),
                           round(color_distance(photos[name].color_sig, variant.color_sig), 2))
        items += [_item(f"p{i:02d}_orig", photos[name]), _item(f"p{i:02d}_variant", variant)]
        expected.append(_dup(f"p{i:02d}_variant", f"p{i:02d}_orig", "near", variant, photos[name]))
    print(f"\n(pHash bits, colour Delta E) original vs 50% + JPEG q70: {distances}")
    assert max(d for d, _ in distances.values()) <= 4
    assert max(c for _, c in distances.values()) <= DEFAULT_MAX_COLOR_DISTANCE / 2  # far below the threshold
    assert find_duplicates(items) == expected  # every variant found, no two different photos merged


def test_bundled_compression_variants_are_near():
    """Every bundled photo (colour and greyscale) re-encoded 3 ways: each variant is a near duplicate of it."""
    items, expected, measured = [], [], {}
    for i, (name, data) in enumerate(_bundled().items()):
        orig = _norm(data, name)
        items.append(_item(f"b{i}", orig))
        for k, v in _compression_variants(data).items():
            n = _norm(v, f"{k}.img")
            items.append(_item(f"b{i}_{k}", n))
            expected.append(_dup(f"b{i}_{k}", f"b{i}", "near", n, orig))
            measured[f"{name}/{k}"] = (expected[-1].distance, expected[-1].color_distance)
    print(f"\ncompression variants (pHash bits, colour Delta E): {measured}")
    print(f"max colour Delta E {max(c for _, c in measured.values())}")
    assert find_duplicates(items) == sorted(expected, key=lambda d: d.image_id)


def test_colour_variants_are_not_merged():
    """The user's report: the same layout in other colours (hue rotations, channel swap, dusk/night/brighter
    versions of a photo) had pHash distances 0-2 and were merged. pHash still calls most of them near; the colour
    check keeps every one of them."""
    items, measured = [], {}
    for name in COLOUR_PHOTOS:
        data = (BUNDLED / name).read_bytes()
        orig = _norm(data, name)
        items.append(_item(name, orig))
        for k, v in _colour_variants(data).items():
            n = _norm(v, f"{k}.png")
            items.append(_item(f"{name}~{k}", n))
            measured[f"{name}/{k}"] = (hamming(orig.phash, n.phash), round(color_distance(orig.color_sig, n.color_sig), 1))
    print(f"\ncolour variants (pHash bits, colour Delta E): {measured}")
    print(f"min colour Delta E {min(c for _, c in measured.values())}")
    within = [k for k, (bits, _) in measured.items() if bits <= 4]
    assert len(within) >= len(measured) * 2 // 3, "premise: pHash alone would merge most colour variants"
    assert min(c for _, c in measured.values()) > DEFAULT_MAX_COLOR_DISTANCE
    assert find_duplicates(items) == []
    # with the colour check switched off in effect (any colour passes), pHash merges them: the test has teeth
    assert len(find_duplicates(items, max_color_distance=1000.0)) >= len(within)


def test_product_in_seven_colours_not_merged_but_its_jpeg_copies_are():
    shots = {k: _norm(_encode(_product_shot(c)), f"{k}.png") for k, c in PRODUCT_COLOURS.items()}
    pairs = {(a, b): (hamming(shots[a].phash, shots[b].phash), round(color_distance(shots[a].color_sig,
                                                                                       shots[b].color_sig), 1))
             for a, b in itertools.combinations(shots, 2)}
    print(f"\nproduct shots (pHash bits, colour Delta E): {pairs}")
    assert max(bits for bits, _ in pairs.values()) <= 4, "premise: every pair is a pHash near duplicate"
    assert min(c for _, c in pairs.values()) > DEFAULT_MAX_COLOR_DISTANCE
    items = [_item(f"shot_{k}", n) for k, n in shots.items()]
    assert find_duplicates(items) == []
    expected = []
    for k, c in PRODUCT_COLOURS.items():
        small = _product_shot(c).resize((200, 150), Image.Resampling.LANCZOS)
        n = _norm(_encode(small, "JPEG", quality=70), f"{k}_small.jpg")
        items.append(_item(f"shot_{k}_small", n))
        expected.append(_dup(f"shot_{k}_small", f"shot_{k}", "near", n, shots[k]))
    assert find_duplicates(items) == sorted(expected, key=lambda d: d.image_id)


def test_unrelated_images_that_hash_alike_are_not_merged():
    """Flat images of different colours all have the same pHash (8000000000000000; black 0000000000000000), and
    luma-preserving tints of a greyscale photo have its exact pHash: pHash collisions of different images."""
    colours = [(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 128, 0), (0, 0, 255), (128, 128, 128), (250, 200, 40),
               (90, 40, 120)]
    flats = {c: _norm(_encode(Image.new("RGB", (64 + 8 * i, 48 + 4 * i), c)), "flat.png") for i, c in enumerate(colours)}
    assert len({n.phash for c, n in flats.items() if c != (0, 0, 0)}) == 1
    items = [_item(f"flat_{i}", n) for i, n in enumerate(flats.values())]
    assert find_duplicates(items) == []
    # the same flat colour at another size and as JPEG is a near duplicate
    same = _norm(_encode(Image.new("RGB", (300, 200), (255, 0, 0)), "JPEG", quality=80), "red.jpg")
    assert find_duplicates(items + [_item("flat_red_big", same)]) == [
        _dup("flat_red_big", "flat_2", "near", same, flats[(255, 0, 0)])
    ]

    grey = np.asarray(Image.open(BUNDLED / "camera.png").convert("L"), dtype=np.float64)

    def tint(red_green: float, blue: float) -> NormalizedImage:
        # keep ITU-R 601 luma (what pHash sees: 0.299 R + 0.587 G + 0.114 B) and add chroma
        rgb = np.stack([grey + red_green, grey - (0.299 * red_green + 0.114 * blue) / 0.587, grey + blue], -1)
        return _norm(_encode(Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))), "tint.png")

    camera = _norm((BUNDLED / "camera.png").read_bytes(), "camera.png")
    tints = {"grey": camera, "red": tint(40, 0), "green": tint(-40, 0), "blue": tint(0, 60), "yellow": tint(0, -60)}
    bits = {k: hamming(camera.phash, n.phash) for k, n in tints.items()}
    print(f"\nluma-preserving tints of camera.png: pHash bits {bits}, colour Delta E "
          f"{ {k: round(color_distance(camera.color_sig, n.color_sig), 1) for k, n in tints.items()} }")
    assert max(bits.values()) == 0, "premise: a pHash collision"
    assert find_duplicates([_item(k, n) for k, n in tints.items()]) == []


def test_exact_copy_is_exact_of_its_twin_and_chains_do_not_merge():
    """Real chain: chelsea.png at brightness 1.0, 0.9 and 0.8 (same pHash; colour Delta E ~6 per step, ~11.5 from
    end to end). Before: one group under the first, and the byte-identical copy of the darkest was "near" of the
    first. Now: 0.9 is near 1.0; 0.8 is not near 1.0, so it is kept (its pair with 0.9 does not count: 0.9 is no
    kept image); its copy is "exact" of it."""
    im = Image.open(BUNDLED / "chelsea.png").convert("RGB")
    data = {f: _encode(_scale(im, f)) for f in (1.0, 0.9, 0.8)}
    n = {f: _norm(d, f"chelsea_{f}.png") for f, d in data.items()}
    copy = _norm(data[0.8], "copy.png")
    cd = {(a, b): color_distance(n[a].color_sig, n[b].color_sig) for a, b in [(1.0, 0.9), (0.9, 0.8), (1.0, 0.8)]}
    print(f"\nbrightness chain colour Delta E: {cd}")
    assert cd[1.0, 0.9] <= DEFAULT_MAX_COLOR_DISTANCE - 1 and cd[0.9, 0.8] <= DEFAULT_MAX_COLOR_DISTANCE - 1
    assert cd[1.0, 0.8] > DEFAULT_MAX_COLOR_DISTANCE + 2  # premises, with margin
    assert max(hamming(n[a].phash, n[b].phash) for a, b in cd) <= 2
    items = [_item("a", n[1.0]), _item("b", n[0.9]), _item("c", n[0.8]), _item("d", copy)]
    assert find_duplicates(items) == [_dup("b", "a", "near", n[0.9], n[1.0]), DuplicateOf("d", "c", "exact", 0, 0.0)]
    # the copy with the smallest id: the twins keep their roles, the copy is never "near" of a third image
    items = [_item("a", n[1.0]), _item("b", n[0.9]), _item("c", copy), _item("0", n[0.8])]
    assert find_duplicates(items) == [_dup("b", "a", "near", n[0.9], n[1.0]), DuplicateOf("c", "0", "exact", 0, 0.0)]
    # middle of the chain first: both ends are near it
    items = [_item("b", n[1.0]), _item("a", n[0.9]), _item("c", n[0.8]), _item("d", copy)]
    assert find_duplicates(items) == [_dup("b", "a", "near", n[1.0], n[0.9]), _dup("c", "a", "near", n[0.8], n[0.9]),
                                      DuplicateOf("d", "c", "exact", 0, 0.0)]


def test_near_off_and_zero_threshold():
    """``near=False`` (config ``images.near_duplicates: false``): exact duplicates only. ``max_hamming=0``: identical
    pHash only, and the colour is still compared (it is not an off switch)."""
    items, variant_bits = [], {}
    for i, (name, data) in enumerate(_bundled().items()):
        orig, variant = _norm(data, name), _norm(_variant(data), "v.jpg")
        items += [_item(f"p{i}", orig), _item(f"p{i}_copy", orig), _item(f"p{i}_variant", variant)]
        variant_bits[f"p{i}_variant"] = hamming(orig.phash, variant.phash)
    exact = [DuplicateOf(f"p{i}_copy", f"p{i}", "exact", 0, 0.0) for i in range(len(_bundled()))]
    assert find_duplicates(items, near=False) == exact
    assert find_duplicates(items, max_hamming=64, max_color_distance=1000.0, near=False) == exact
    zero = find_duplicates(items, max_hamming=0)
    assert {d.image_id for d in zero if d.kind == "near"} == {k for k, b in variant_bits.items() if b == 0}
    assert 0 < sum(b == 0 for b in variant_bits.values()) < len(variant_bits)  # both cases occur
    assert all(d.distance == 0 for d in zero)
    flats = [_item(f"flat{i}", _norm(_encode(Image.new("RGB", (64, 64), c)), "f.png"))
             for i, c in enumerate([(255, 0, 0), (0, 0, 255), (255, 0, 0)])]
    assert find_duplicates(flats, max_hamming=0) == [DuplicateOf("flat2", "flat0", "exact", 0, 0.0)]
    assert find_duplicates(flats, max_hamming=0, max_color_distance=0.0) == [DuplicateOf("flat2", "flat0", "exact", 0, 0.0)]


def test_config_switches_and_validation():
    from rms_ray.common.config import ConfigError, load_config

    im = load_config("cpu-tiny").images
    assert im.near_duplicates is True and im.near_duplicate_hamming == 4
    assert im.near_duplicate_color_distance == DEFAULT_MAX_COLOR_DISTANCE
    off = load_config("cpu-tiny", {"images.near_duplicates": False}).images
    assert off.near_duplicates is False
    for key, value, message in [
        ("images.near_duplicate_color_distance", -1, "greater than or equal to 0"),
        ("images.near_duplicate_color_distance", float("nan"), "finite"),
        ("images.near_duplicate_color_distance", "blue", "valid number"),
        ("images.near_duplicate_hamming", -1, "greater than or equal to 0"),
        ("images.near_duplicate_hamming", 2.5, "valid integer"),
        ("images.near_duplicates", "sometimes", "valid boolean"),
    ]:
        with pytest.raises(ConfigError, match=rf"{key}: .*{message}"):
            load_config("cpu-tiny", {key: value})


def test_plan_uses_the_config_and_rebuilds_an_old_ingest_cache(tmp_path):
    """plan() passes images.near_duplicates / thresholds to find_duplicates, and an ingest cache written before
    color_sig existed is not trusted for ok rows (they are decoded again), without Ray: the cache is prepared here
    with the pipeline's own ingest_batch."""
    from rms_ray.common.config import load_config
    from rms_ray.construct.pipeline import _items, image_policy, ingest_batch, plan, reusable_ingest_cache
    from rms_ray.data.sources import list_images
    from rms_ray.data.store import INGEST_SCHEMA, OutputStore

    inp = tmp_path / "in"
    inp.mkdir()
    chelsea = (BUNDLED / "chelsea.png").read_bytes()
    (inp / "a.png").write_bytes(chelsea)
    (inp / "b.png").write_bytes(chelsea)  # exact
    (inp / "c.jpg").write_bytes(_variant(chelsea))  # near
    (inp / "d.png").write_bytes(_encode(_hue(_rgb(chelsea), 90)))  # colour variant: not a duplicate
    (inp / "e.png").write_bytes(b"not an image")  # quarantined
    cfg = load_config("cpu-tiny")
    sources, repeated = list_images(str(inp), tuple(cfg.images.extensions))
    batch = {k: np.array([it[k] for it in _items(sources)], dtype=object) for k in _items(sources)[0]}
    rows = pa.Table.from_pydict(ingest_batch(batch, image_policy(cfg)), schema=INGEST_SCHEMA)
    assert rows.column("color_sig").null_count == 1  # only the quarantined row
    store = OutputStore(tmp_path / "out")
    store.prepare()
    pq.write_table(rows, store.work / "ingest.parquet")
    ids = {s.rel_path: s.image_id for s in sources}
    twin, copy = sorted([ids["a.png"], ids["b.png"]])  # ids are hashes of the paths: order them
    variant = ids["c.jpg"]
    exact = {(copy, twin, "exact")}
    near = {(max(twin, variant), min(twin, variant), "near")}  # the smaller id of the two is kept

    def found(overrides):
        c = load_config("cpu-tiny", overrides)
        return {(d.image_id, d.canonical_id, d.kind) for d in plan(sources, repeated, c, store).duplicates}

    assert found({}) == exact | near  # d.png (hue rotated) is not a duplicate
    assert found({"images.near_duplicates": False}) == exact
    assert found({"images.near_duplicate_color_distance": 0}) == exact  # the JPEG variant's colours moved a bit
    assert found({"images.near_duplicate_hamming": 0}) == exact | near  # its pHash did not

    # an old cache (no color_sig column): quarantined rows are reused, ok rows are left for re-decoding
    old = rows.drop_columns(["color_sig"])
    reused = reusable_ingest_cache(old)
    assert reused.schema == INGEST_SCHEMA
    assert reused.column("status").to_pylist() == ["quarantined"]
    assert reusable_ingest_cache(rows).num_rows == rows.num_rows  # a current cache is reused whole
    stale = rows.set_column(rows.schema.get_field_index("color_sig"), "color_sig",
                            pa.array(["hsv4x4:00"] * rows.num_rows, pa.string()))
    assert reusable_ingest_cache(stale).column("status").to_pylist() == ["quarantined"]
    bad = pa.table({"image_id": pa.array([1, 2]), "size": pa.array(["x", "y"])})
    assert reusable_ingest_cache(bad).num_rows == 0  # uncastable: dropped, not a crash


def test_distinct_photos_not_merged(photos):
    names = sorted(photos)
    dists = {(a, b): hamming(photos[a].phash, photos[b].phash) for a, b in itertools.combinations(names, 2)}
    closest = sorted(dists.items(), key=lambda kv: kv[1])[:4]
    print(f"\nclosest distinct pairs: {closest}")
    dups = find_duplicates([_item(n, photos[n]) for n in names])
    stereo = {n for n in names if Path(n).name in STEREO_PAIR}
    merged = {d.image_id for d in dups} | {d.canonical_id for d in dups}
    assert merged <= stereo, dups  # nothing but the stereo pair, if at all
    others = [d for (a, b), d in dists.items() if not ({a, b} <= stereo)]
    assert min(others) > 4 + 4, "distinct photos should be far from the threshold"


def test_order_independent(photos):
    originals = _photos()
    items = [_item(n, photos[n]) for n in sorted(photos)]
    for i, name in enumerate(sorted(originals)[:5]):
        items.append(_item(f"{name}~variant", _norm(_variant(originals[name]), "v.jpg")))
        items.append(_item(f"{name}~copy{i}", photos[name]))  # exact copy
        items.append(_item(f"{name}~hue90", _norm(_encode(_hue(_rgb(originals[name]), 90)), "h.png")))
    reference = find_duplicates(items)
    assert len(reference) >= 10
    assert [d.image_id for d in reference] == sorted(d.image_id for d in reference)
    rng = random.Random(7)
    for _ in range(5):
        shuffled = items[:]
        rng.shuffle(shuffled)
        assert find_duplicates(shuffled) == reference
    assert find_duplicates(reversed(items)) == reference  # any iterable


# --- semantics on synthetic hashes ----------------------------------------------------------------------------


def _h(x: int) -> str:
    return f"{x:016x}"


def _flip(x: int, bits) -> int:
    for b in bits:
        x ^= 1 << b
    return x


def _sigs(lab: np.ndarray) -> list[str]:
    """Colour signatures (color_signature's encoding) from an (n, 16, 3) array of L*a*b* cells."""
    q = np.empty(lab.shape)
    q[..., 0] = np.rint(lab[..., 0] * 2.55)
    q[..., 1:] = np.rint(lab[..., 1:]) + 128
    raw = np.clip(q, 0, 255).astype(np.uint8).reshape(len(lab), -1)
    return [COLOR_SIG_PREFIX + row.tobytes().hex() for row in raw]


def _sig(cells) -> str:
    """A colour signature from 16 (L, a, b) cells (or one cell repeated)."""
    return _sigs(np.broadcast_to(np.asarray(cells, dtype=np.float64), (1, 16, 3)))[0]


def _it(image_id: str, sha: str, phash: int, sig: str = GREY_SIG) -> tuple[str, str, str, str]:
    return image_id, sha, _h(phash), sig


def test_threshold_boundary():
    base = 0x0123456789ABCDEF
    items = [_it("a", "s1", base), _it("b", "s2", _flip(base, range(4))), _it("c", "s3", _flip(base, range(10, 15)))]
    assert find_duplicates(items) == [DuplicateOf("b", "a", "near", 4)]  # c is 5 bits away: kept
    assert find_duplicates(items, max_hamming=5) == [DuplicateOf("b", "a", "near", 4), DuplicateOf("c", "a", "near", 5)]
    assert find_duplicates(items, max_hamming=0) == []
    # colour boundary (inclusive, like the pHash one): one cell exactly 8 Delta E away (a* 0 -> 8)
    far = COLOR_SIG_PREFIX + "808080" * 15 + "808880"  # a* byte 0x88 = 128 + 8
    assert color_distance(GREY_SIG, far) == 8.0
    pair = [_it("a", "s1", base), _it("b", "s2", base, far)]
    assert find_duplicates(pair) == [DuplicateOf("b", "a", "near", 0, 8.0)]
    assert find_duplicates(pair, max_color_distance=7.99) == []


def test_chain_does_not_put_the_far_end_under_the_first():
    """A~B (4 bits) and B~C (4 other bits), A-C 8 bits: B is a duplicate of A; C is not near A and B is not kept,
    so C is kept. No reported distance exceeds the thresholds."""
    a = 0xF0F0F0F0F0F0F0F0
    b = _flip(a, range(0, 4))
    c = _flip(b, range(20, 24))
    assert hamming(_h(a), _h(c)) == 8
    items = [_it("id_a", "sa", a), _it("id_b", "sb", b), _it("id_c", "sc", c)]
    assert find_duplicates(items) == [DuplicateOf("id_b", "id_a", "near", 4)]
    # the middle of the chain has the smallest id: it is kept, both ends are 4 bits from it
    items = [_it("id_2", "sa", a), _it("id_1", "sb", b), _it("id_3", "sc", c)]
    assert find_duplicates(items) == [DuplicateOf("id_2", "id_1", "near", 4), DuplicateOf("id_3", "id_1", "near", 4)]
    # a long chain (video frames drifting 3 bits per frame): kept images every other frame, each member near its own
    frames, x = [], 0x0123456789ABCDEF
    for k in range(20):
        frames.append(_it(f"f{k:02d}", f"s{k}", x))
        x = _flip(x, range(3 * k % 60, 3 * k % 60 + 3))
    dups = find_duplicates(frames)
    assert [d.image_id for d in dups] == [f"f{k:02d}" for k in range(1, 20, 2)]
    assert all(d.canonical_id == f"f{int(d.image_id[1:]) - 1:02d}" and d.distance <= 4 for d in dups)
    # C near two kept images A and B (6 bits apart, so both kept): C joins the closer one; on a tie the smaller id
    a, b = 0, _flip(0, range(6))
    closer_to_b = _flip(0, range(4))  # 4 bits from A, 2 from B
    tie = _flip(0, [0, 1, 2, 6])  # 4 from A, 4 from B
    assert find_duplicates([_it("a", "1", a), _it("b", "2", b), _it("c", "3", closer_to_b)]) == [
        DuplicateOf("c", "b", "near", 2)
    ]
    assert find_duplicates([_it("a", "1", a), _it("b", "2", b), _it("c", "3", tie)]) == [
        DuplicateOf("c", "a", "near", 4)
    ]


def test_exact_groups_then_near_groups():
    """b1/b2 share bytes; a is a near duplicate of their content and has the smallest id. b1 is near of a; b2 is
    an exact copy of its twin b1 (never "near" of a third image); a_copy is exact of a."""
    p = 0x1111222233334444
    items = [
        _it("b1", "sha_b", p),
        _it("b2", "sha_b", p),
        _it("a", "sha_a", _flip(p, [1, 2])),
        _it("a_copy", "sha_a", _flip(p, [1, 2])),
        _it("z", "sha_z", ~p & (2**64 - 1)),
    ]
    assert find_duplicates(items) == [
        DuplicateOf("a_copy", "a", "exact", 0),
        DuplicateOf("b1", "a", "near", 2),
        DuplicateOf("b2", "b1", "exact", 0),
    ]
    # same sha256 always merges, whatever the phash and colour say (exact stage first)
    assert find_duplicates([_it("a", "s", 0), _it("b", "s", 2**64 - 1, _sig([100, 0, 0]))]) == [
        DuplicateOf("b", "a", "exact", 64, round(100 - 128 / 2.55, 2))  # GREY_SIG's L* is 128 / 2.55
    ]
    # different bytes with identical pHash and colour signature: near, distance 0; grouped under the smallest id
    items = [_it("c", "s3", p), _it("a", "s1", p), _it("b", "s2", p), _it("d", "s4", p, _sig([20, 30, 0]))]
    assert find_duplicates(items) == [DuplicateOf("b", "a", "near", 0), DuplicateOf("c", "a", "near", 0)]


def test_input_validation():
    assert find_duplicates([]) == []
    with pytest.raises(ValueError, match="duplicate image_id"):
        find_duplicates([_it("a", "s", 1), _it("a", "t", 2)])
    with pytest.raises(ValueError):
        find_duplicates([("a", "s", "xyz", GREY_SIG)])
    with pytest.raises(ValueError):
        find_duplicates([("a", "s", "zz" * 8, GREY_SIG)])
    with pytest.raises(ValueError, match="colour signature"):
        find_duplicates([("a", "s", _h(1), "lab4x4:" + "zz" * 48)])
    with pytest.raises(ValueError, match="recompute"):
        find_duplicates([("a", "s", _h(1), "8080")])
    with pytest.raises(TypeError):
        find_duplicates([("a", "s", _h(1))])  # the old 3-tuples: colour is required
    with pytest.raises(TypeError):
        find_duplicates([("a", "s", _h(1), None)])
    with pytest.raises(TypeError):
        find_duplicates([(1, "s", _h(1), GREY_SIG)])
    with pytest.raises(ValueError, match="0..64"):
        find_duplicates([_it("a", "s", 1)], max_hamming=65)
    with pytest.raises(TypeError):
        find_duplicates([_it("a", "s", 1)], max_hamming=True)
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="max_color_distance"):
            find_duplicates([_it("a", "s", 1)], max_color_distance=bad)
    with pytest.raises(TypeError, match="max_color_distance"):
        find_duplicates([_it("a", "s", 1)], max_color_distance="8")
    with pytest.raises(TypeError, match="near"):
        find_duplicates([_it("a", "s", 1)], near="no")
    sig = _sig([70, 30, -20])
    upper = COLOR_SIG_PREFIX + sig[len(COLOR_SIG_PREFIX):].upper()
    assert upper != sig
    assert find_duplicates([("a", "s", "ABCDEF0123456789", upper), ("b", "t", "abcdef0123456789", sig)]) == [
        DuplicateOf("b", "a", "near", 0)
    ]


def _synthetic_hashes(n: int, near_fraction: float, max_flip: int, seed: int) -> np.ndarray:
    """n random 64-bit hashes; the last near_fraction*n are copies of earlier ones with <= max_flip bits flipped."""
    return _synthetic(n, near_fraction, max_flip, seed)[0]


def _synthetic(n: int, near_fraction: float, max_flip: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, src): as _synthetic_hashes, and the index each planted copy was made from."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    k = int(n * near_fraction)
    src = rng.integers(0, n - k, k)
    flips = np.zeros(k, dtype=np.uint64)
    for j in range(k):
        for bit in rng.choice(64, int(rng.integers(0, max_flip + 1)), replace=False):
            flips[j] |= np.uint64(1) << np.uint64(bit)
    h[n - k :] = h[src] ^ flips
    return h, src


@pytest.mark.parametrize("max_hamming", [0, 1, 4, 7, 12])
def test_banding_matches_all_pairs(max_hamming):
    h = _synthetic_hashes(3000, near_fraction=0.3, max_flip=max_hamming + 2, seed=max_hamming)
    # clusters: chains of near duplicates, and hashes shared by several colours
    h[100:140] = h[100] ^ (np.uint64(1) << np.arange(40, dtype=np.uint64) % np.uint64(64))
    h[200:230] = h[200]
    rng = np.random.default_rng(max_hamming)
    lab = np.repeat(rng.uniform([20, -20, -20], [80, 20, 20], (3000, 1, 3)), 16, axis=1).astype(np.float32)
    lab[1500:] = lab[:1500] + rng.normal(0, 4, (1500, 16, 3)).astype(np.float32)  # half close, half far
    got = _near_pairs(h, lab, max_hamming, 8.0, "bands")
    ref = _near_pairs(h, lab, max_hamming, 8.0, "all_pairs")
    assert all(np.array_equal(x, y) for x, y in zip(got, ref))
    assert got[0].size > 0 and np.all(got[0] < got[1]) and np.all(got[3] <= 8.0)
    assert len(set(zip(got[0].tolist(), got[1].tolist()))) == got[0].size  # each pair once


def test_scales_to_50k():
    n = 50_000
    h, src = _synthetic(n, near_fraction=0.1, max_flip=4, seed=1)
    k = src.size
    rng = np.random.default_rng(2)
    lab = rng.uniform([10, -40, -40], [90, 40, 40], (n, 16, 3))
    lab[n - k :] = lab[src] + rng.normal(0, 0.5, (k, 16, 3))  # planted copies: their source's colours + noise
    sigs = _sigs(lab)
    items = [(f"img{i:06d}", f"sha{i % 48_000}", f"{int(x):016x}", sigs[i]) for i, x in enumerate(h)]
    random.Random(3).shuffle(items)
    t0, c0 = time.perf_counter(), time.process_time()
    dups = find_duplicates(items)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    kinds = collections.Counter(d.kind for d in dups)
    print(f"\nfind_duplicates on {n} rows: {wall:.2f}s wall, {cpu:.2f}s CPU; {dict(kinds)}")
    near_ids = {d.image_id for d in dups if d.kind == "near"}
    # every planted near duplicate (<= 4 bits, about the same colours) is found: pigeonhole makes banding exact.
    # Ids 48000.. share a sha256 with 0..1999: those are exact copies first.
    assert near_ids == {f"img{i:06d}" for i in range(n - k, 48_000)}
    assert kinds["exact"] == 2_000
    assert all(d.distance <= 4 and d.color_distance <= 8.0 for d in dups if d.kind == "near")
    assert cpu < 10


# --- real data ------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.skipif(
    not MMSAFEAWARE_IMAGES.is_dir(),
    reason=f"MMSafeAware images not found at {MMSAFEAWARE_IMAGES} (set RMS_SHARED_DATA to the shared data dir)",
)
def test_mmsafeaware_duplicates():
    """MMSafeAware reuses images across prompts: report exact and near duplicate counts. Only one file per sha256
    is decoded (same bytes -> same phash and colour), which keeps this test cheap."""
    files = sorted(MMSAFEAWARE_IMAGES.iterdir())
    by_sha: dict[str, Path] = {}
    shas = {}
    for p in files:
        shas[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
        by_sha.setdefault(shas[p.name], p)
    norm = {sha: _norm(p.read_bytes(), str(p)) for sha, p in by_sha.items()}
    items = [(name, sha, norm[sha].phash, norm[sha].color_sig) for name, sha in shas.items()]
    t0 = time.perf_counter()
    dups = find_duplicates(items)
    elapsed = time.perf_counter() - t0
    kinds = collections.Counter(d.kind for d in dups)
    phash_only = collections.Counter(d.kind for d in find_duplicates(items, max_color_distance=1000.0))
    print(
        f"\nMMSafeAware: {len(files)} files, {len(by_sha)} distinct sha256; duplicates {dict(kinds)} "
        f"(pHash alone: {dict(phash_only)}); {len(files) - len(dups)} kept images; near (bits, Delta E) "
        f"{sorted((d.distance, d.color_distance) for d in dups if d.kind == 'near')}; "
        f"find_duplicates {1000 * elapsed:.1f} ms"
    )
    # every file that is not the smallest name among identical bytes is listed as an exact copy of that name
    smallest = {sha: min(n for n, s in shas.items() if s == sha) for sha in by_sha}
    listed = {d.image_id: d for d in dups}
    assert len(listed) == len(dups)
    for name, sha in shas.items():
        if name != smallest[sha]:
            assert listed[name] == DuplicateOf(name, smallest[sha], "exact", 0, 0.0)
    # near rows point at kept images, within both thresholds
    near = [d for d in dups if d.kind == "near"]
    assert not {d.canonical_id for d in near} & set(listed)
    assert all(d.distance <= 4 and d.color_distance <= DEFAULT_MAX_COLOR_DISTANCE for d in near)
    assert kinds["exact"] >= 1
