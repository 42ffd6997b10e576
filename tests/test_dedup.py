"""rms_ray.data.dedup: exact (sha256) and near (phash Hamming) duplicates; deterministic, order independent, fast.

Real photos from ../shared/data/pypi_sample_photos when present (generated images otherwise), real
normalize_image() outputs, no mocks.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rms_ray.data.dedup import DuplicateOf, _near_components, find_duplicates, hamming
from rms_ray.data.images import NormalizedImage, normalize_image

REPO = Path(__file__).resolve().parents[1]
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


def _variant(data: bytes) -> bytes:
    """The same photo downscaled to 50% (LANCZOS) and re-encoded as JPEG quality 70."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im = im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=70)
        return buf.getvalue()


def _norm(data: bytes, name: str) -> NormalizedImage:
    result = normalize_image(data, name)
    assert isinstance(result, NormalizedImage), (name, result)
    return result


@pytest.fixture(scope="module")
def photos() -> dict[str, NormalizedImage]:
    return {name: _norm(data, name) for name, data in _photos().items()}


def _item(image_id: str, n: NormalizedImage) -> tuple[str, str, str]:
    return image_id, n.sha256, n.phash


# --- behaviour on real images ---------------------------------------------------------------------------------


def test_exact_duplicates_same_bytes_two_ids():
    data = _photos()[sorted(_photos())[0]]
    a, b = _norm(data, "a.png"), _norm(data, "b.png")
    assert a.sha256 == b.sha256 and a.phash == b.phash
    dups = find_duplicates([_item("img_b", b), _item("img_a", a)])
    assert dups == [DuplicateOf(image_id="img_b", canonical_id="img_a", kind="exact", distance=0)]


def test_near_duplicates_resized_and_reencoded(photos):
    originals = _photos()
    names = [n for n in NEAR_DUP_PHOTOS if n in originals] or sorted(originals)
    items, distances = [], {}
    for i, name in enumerate(names):
        variant = _norm(_variant(originals[name]), f"{name}.variant.jpg")
        distances[name] = hamming(photos[name].phash, variant.phash)
        items += [_item(f"p{i:02d}_orig", photos[name]), _item(f"p{i:02d}_variant", variant)]
    print(f"\nphash distance original vs 50% + JPEG q70: {distances}")
    assert max(distances.values()) <= 4
    dups = find_duplicates(items)
    expected = [
        DuplicateOf(f"p{i:02d}_variant", f"p{i:02d}_orig", "near", distances[name]) for i, name in enumerate(names)
    ]
    assert dups == expected  # every variant found, no two different photos merged


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
        items.append((f"{name}~copy{i}", photos[name].sha256, photos[name].phash))  # exact copy
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


def test_threshold_boundary():
    base = 0x0123456789ABCDEF
    items = [("a", "s1", _h(base)), ("b", "s2", _h(_flip(base, range(4)))), ("c", "s3", _h(_flip(base, range(10, 15))))]
    assert find_duplicates(items) == [DuplicateOf("b", "a", "near", 4)]  # c is 5 bits away: kept
    assert find_duplicates(items, max_hamming=5) == [DuplicateOf("b", "a", "near", 4), DuplicateOf("c", "a", "near", 5)]
    assert find_duplicates(items, max_hamming=0) == []


def test_transitive_chain_is_one_group():
    """Single linkage: A~B (4 bits) and B~C (4 other bits) put A, B, C in one group although A-C is 8 bits.
    The canonical is the smallest id, and the reported distance is to the canonical (may exceed max_hamming)."""
    a = 0xF0F0F0F0F0F0F0F0
    b = _flip(a, range(0, 4))
    c = _flip(b, range(20, 24))
    assert hamming(_h(a), _h(c)) == 8
    items = [("id_a", "sa", _h(a)), ("id_b", "sb", _h(b)), ("id_c", "sc", _h(c))]
    assert find_duplicates(items) == [DuplicateOf("id_b", "id_a", "near", 4), DuplicateOf("id_c", "id_a", "near", 8)]
    # the middle of the chain has the smallest id: it becomes canonical, both ends are 4 bits from it
    items = [("id_2", "sa", _h(a)), ("id_1", "sb", _h(b)), ("id_3", "sc", _h(c))]
    assert find_duplicates(items) == [DuplicateOf("id_2", "id_1", "near", 4), DuplicateOf("id_3", "id_1", "near", 4)]


def test_exact_groups_then_near_groups():
    """b1/b2 share bytes; a is a near duplicate of their content and has the smallest id: everything maps to a.
    kind describes the relation to the canonical: b1, b2 have other bytes than a -> "near"."""
    p = 0x1111222233334444
    items = [
        ("b1", "sha_b", _h(p)),
        ("b2", "sha_b", _h(p)),
        ("a", "sha_a", _h(_flip(p, [1, 2]))),
        ("a_copy", "sha_a", _h(_flip(p, [1, 2]))),
        ("z", "sha_z", _h(~p & (2**64 - 1))),
    ]
    assert find_duplicates(items) == [
        DuplicateOf("a_copy", "a", "exact", 0),
        DuplicateOf("b1", "a", "near", 2),
        DuplicateOf("b2", "a", "near", 2),
    ]
    # same sha256 always merges, whatever the phash says (exact stage first)
    assert find_duplicates([("a", "s", _h(0)), ("b", "s", _h(2**64 - 1))]) == [DuplicateOf("b", "a", "exact", 64)]


def test_input_validation():
    assert find_duplicates([]) == []
    with pytest.raises(ValueError, match="duplicate image_id"):
        find_duplicates([("a", "s", _h(1)), ("a", "t", _h(2))])
    with pytest.raises(ValueError):
        find_duplicates([("a", "s", "xyz")])
    with pytest.raises(ValueError):
        find_duplicates([("a", "s", "zz" * 8)])
    with pytest.raises(TypeError):
        find_duplicates([("a", "s")])
    with pytest.raises(TypeError):
        find_duplicates([(1, "s", _h(1))])
    with pytest.raises(ValueError):
        find_duplicates([("a", "s", _h(1))], max_hamming=65)
    assert find_duplicates([("a", "s", "ABCDEF0123456789"), ("b", "t", "abcdef0123456789")]) == [
        DuplicateOf("b", "a", "near", 0)
    ]


def _synthetic_hashes(n: int, near_fraction: float, max_flip: int, seed: int) -> np.ndarray:
    """n random 64-bit hashes; the last near_fraction*n are copies of earlier ones with <= max_flip bits flipped."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    k = int(n * near_fraction)
    src = rng.integers(0, n - k, k)
    flips = np.zeros(k, dtype=np.uint64)
    for j in range(k):
        for bit in rng.choice(64, int(rng.integers(0, max_flip + 1)), replace=False):
            flips[j] |= np.uint64(1) << np.uint64(bit)
    h[n - k :] = h[src] ^ flips
    return h


@pytest.mark.parametrize("max_hamming", [0, 1, 4, 7, 12])
def test_banding_matches_all_pairs(max_hamming):
    h = _synthetic_hashes(3000, near_fraction=0.3, max_flip=max_hamming + 2, seed=max_hamming)
    # clusters: chains of near duplicates
    h[100:140] = h[100] ^ (np.uint64(1) << np.arange(40, dtype=np.uint64) % np.uint64(64))
    assert np.array_equal(_near_components(h, max_hamming, "bands"), _near_components(h, max_hamming, "all_pairs"))


def test_scales_to_50k():
    n = 50_000
    h = _synthetic_hashes(n, near_fraction=0.1, max_flip=4, seed=1)
    items = [(f"img{i:06d}", f"sha{i % 48_000}", f"{int(x):016x}") for i, x in enumerate(h)]
    random.Random(3).shuffle(items)
    t0, c0 = time.perf_counter(), time.process_time()
    dups = find_duplicates(items)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    kinds = collections.Counter(d.kind for d in dups)
    print(f"\nfind_duplicates on {n} hashes: {wall:.2f}s wall, {cpu:.2f}s CPU; {dict(kinds)}")
    # every planted near duplicate (<= 4 bits from its source) is found: pigeonhole makes banding exact
    dup_ids = {d.image_id for d in dups}
    assert all(f"img{i:06d}" in dup_ids for i in range(n - n // 10, n))
    assert kinds["exact"] >= 2_000 - 50  # ids i and i + 48000 share a sha256
    assert cpu < 10


# --- real data ------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.skipif(
    not MMSAFEAWARE_IMAGES.is_dir(),
    reason=f"MMSafeAware images not found at {MMSAFEAWARE_IMAGES} (set RMS_SHARED_DATA to the shared data dir)",
)
def test_mmsafeaware_duplicates():
    """MMSafeAware reuses images across prompts: report exact and near duplicate counts. Only one file per sha256
    is decoded (same bytes -> same phash), which keeps this test cheap."""
    files = sorted(MMSAFEAWARE_IMAGES.iterdir())
    by_sha: dict[str, Path] = {}
    shas = {}
    for p in files:
        shas[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
        by_sha.setdefault(shas[p.name], p)
    phash_of = {sha: _norm(p.read_bytes(), str(p)).phash for sha, p in by_sha.items()}
    items = [(name, sha, phash_of[sha]) for name, sha in shas.items()]
    t0 = time.perf_counter()
    dups = find_duplicates(items)
    elapsed = time.perf_counter() - t0
    kinds = collections.Counter(d.kind for d in dups)
    print(
        f"\nMMSafeAware: {len(files)} files, {len(by_sha)} distinct sha256; duplicates {dict(kinds)}; "
        f"{len(files) - len(dups)} canonical images; near distances "
        f"{dict(sorted(collections.Counter(d.distance for d in dups if d.kind == 'near').items()))}; "
        f"find_duplicates {1000 * elapsed:.1f} ms"
    )
    # every file that is not the smallest name among identical bytes is listed, pointing at that name or at an
    # even smaller near-duplicate canonical; canonicals are never listed themselves
    smallest = {sha: min(n for n, s in shas.items() if s == sha) for sha in by_sha}
    listed = {d.image_id: d for d in dups}
    assert len(listed) == len(dups)
    for name, sha in shas.items():
        if name != smallest[sha]:
            assert name in listed and listed[name].canonical_id <= smallest[sha]
    assert not {d.canonical_id for d in dups} & set(listed)
    assert kinds["exact"] >= 1
