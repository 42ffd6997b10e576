"""rms_ray.data.images: every input is normalised or quarantined with a reason; nothing raises.

Real PIL-generated files (tests/bad_images.py), a seeded fuzz, and -- where ../shared/data exists -- every image of
MMSafeAware. No mocks.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bad_images import (  # noqa: E402
    BLACK,
    BLUE,
    GREEN,
    KIND_NAMES,
    NORMALIZED,
    QUARANTINED,
    RED,
    WHITE,
    png_header_only,
    valid_jpeg,
    valid_png,
    write_bad_images,
)

from rms_ray.data.images import (  # noqa: E402
    SUPPORTED_FORMATS,
    ImagePolicy,
    NormalizedImage,
    Quarantined,
    QuarantineReason,
    normalize_image,
    open_rgb,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RMS_SHARED_DATA", REPO.parent / "shared" / "data"))
MMSAFEAWARE_IMAGES = SHARED_DATA / "MMSafeAware" / "images"


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return write_bad_images(tmp_path_factory.mktemp("bad_images"))


def _px(im: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return im.getpixel((x, y))


def _close(actual, expected, tol: int) -> bool:
    return all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected))


def _check_pixels(name: str, im: Image.Image) -> None:
    """Colour semantics per kind (images are JPEG-re-encoded, so flat areas are compared with a tolerance)."""
    w, h = im.size
    left, right, mid_y = (w // 6, 5 * w // 6, h // 2)
    if name == "exif_rotated_jpeg":  # stored: RED left / BLUE right; orientation 6 -> RED top / BLUE bottom
        assert _close(_px(im, w // 2, h // 6), RED, 10), _px(im, w // 2, h // 6)
        assert _close(_px(im, w // 2, 5 * h // 6), BLUE, 10), _px(im, w // 2, 5 * h // 6)
    elif name == "gray16_png":  # 16-bit 32768 -> 128 (not clipped to white), 65535 -> 255
        assert _close(_px(im, left, mid_y), (128, 128, 128), 2), _px(im, left, mid_y)
        assert _close(_px(im, right, mid_y), WHITE, 2), _px(im, right, mid_y)
    elif name == "float_tiff":
        assert _close(_px(im, w // 2, mid_y), (128, 128, 128), 2)
    elif name == "palette_transparent_png":  # transparent palette entry -> white
        assert _close(_px(im, left, mid_y), WHITE, 3), _px(im, left, mid_y)
        assert _close(_px(im, right, mid_y), RED, 10), _px(im, right, mid_y)
    elif name == "rgba_png":  # alpha 0 -> white; black at alpha 128 over white -> ~127; opaque green stays
        assert _close(_px(im, 5, mid_y), WHITE, 3)
        assert _close(_px(im, 32, mid_y), (127, 127, 127), 4), _px(im, 32, mid_y)
        assert _close(_px(im, 58, mid_y), GREEN, 10)
    elif name == "la_png":
        assert _close(_px(im, left, mid_y), WHITE, 3)
        assert _close(_px(im, right, mid_y), BLACK, 3)
    elif name == "rgb_trns_png":  # tRNS colour key RED -> white
        assert _close(_px(im, left, mid_y), WHITE, 3)
        assert _close(_px(im, right, mid_y), BLUE, 10)
    elif name == "cmyk_jpeg":  # CMYK (0,255,255,0) ~ red, (255,255,0,0) ~ blue
        assert _close(_px(im, left, mid_y), RED, 12), _px(im, left, mid_y)
        assert _close(_px(im, right, mid_y), BLUE, 12), _px(im, right, mid_y)
    elif name in ("animated_gif", "animated_webp", "apng", "mpo"):  # first frame is RED
        assert _close(_px(im, w // 2, mid_y), RED, 10), _px(im, w // 2, mid_y)
    elif name == "bilevel_png":
        assert _close(_px(im, left, mid_y), BLACK, 3)
        assert _close(_px(im, right, mid_y), WHITE, 3)


EXPECTED_SOURCE_FORMAT = {
    "png_named_jpeg": "PNG",
    "jpeg_named_png": "JPEG",
    "mpo": "MPO",
    "animated_gif": "GIF",
    "animated_webp": "WEBP",
    "apng": "PNG",
    "webp": "WEBP",
    "bmp": "BMP",
    "float_tiff": "TIFF",
    "cmyk_jpeg": "JPEG",
}


@pytest.mark.parametrize("name", KIND_NAMES)
def test_each_bad_input_kind(cases, name):
    case = cases[name]
    data = case.path.read_bytes()
    result = normalize_image(data, str(case.path))
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    if case.outcome == QUARANTINED:
        assert isinstance(result, Quarantined), f"{name}: expected quarantine, got notes {result.notes}"
        assert result.reason is case.expected, f"{name}: {result.reason} ({result.detail})"
        assert result.detail
        return
    assert case.outcome == NORMALIZED
    assert isinstance(result, NormalizedImage), f"{name}: quarantined {result.reason}: {result.detail}"
    assert result.notes == case.expected
    assert (result.width, result.height) == case.size
    assert result.source_format in SUPPORTED_FORMATS
    if name in EXPECTED_SOURCE_FORMAT:
        assert result.source_format == EXPECTED_SOURCE_FORMAT[name]
    with Image.open(case.path) as raw:
        assert (result.source_width, result.source_height) == raw.size
    assert len(result.phash) == 16 and int(result.phash, 16) >= 0
    assert result.data[:3] == b"\xff\xd8\xff"  # default policy re-encodes as JPEG
    im = open_rgb(result.data)
    assert im.mode == "RGB" and im.size == (result.width, result.height)
    _check_pixels(name, im)


def test_animated_policy_quarantine(cases):
    policy = ImagePolicy(animated="quarantine")
    for name in ("animated_gif", "animated_webp", "apng"):
        path = cases[name].path
        result = normalize_image(path.read_bytes(), str(path), policy)
        assert isinstance(result, Quarantined) and result.reason is QuarantineReason.ANIMATED, name
    # MPO is a multi-picture photo, not an animation: still normalised (first picture)
    mpo = normalize_image(cases["mpo"].path.read_bytes(), "camera.jpg", policy)
    assert isinstance(mpo, NormalizedImage) and mpo.notes == ("first_frame_of_2",)


def test_max_pixels_policy_is_checked_before_decoding():
    data = valid_png((200, 200))
    result = normalize_image(data, "x.png", ImagePolicy(max_pixels=10_000))
    assert isinstance(result, Quarantined) and result.reason is QuarantineReason.DECOMPRESSION_BOMB
    assert "40000" in result.detail
    # a header claiming 2 billion pixels is rejected in well under a second of CPU (nothing is decoded)
    t0 = time.process_time()
    bomb = normalize_image(png_header_only(50_000, 40_000), "bomb.png")
    assert isinstance(bomb, Quarantined) and bomb.reason is QuarantineReason.DECOMPRESSION_BOMB
    assert time.process_time() - t0 < 0.5


def test_png_output_is_lossless(cases):
    path = cases["palette_transparent_png"].path
    result = normalize_image(path.read_bytes(), str(path), ImagePolicy(encode_format="PNG"))
    assert isinstance(result, NormalizedImage)
    assert result.data.startswith(b"\x89PNG\r\n\x1a\n")
    im = open_rgb(result.data)
    assert im.getpixel((5, 5)) == WHITE and im.getpixel((60, 5)) == RED


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((2000, 1000), 1024, (1024, 512)),
        ((1000, 2000), 1024, (512, 1024)),
        ((1025, 1025), 1024, (1024, 1024)),
        ((1024, 700), 1024, (1024, 700)),  # exactly max_side: untouched
        ((4032, 3024), 1024, (1024, 768)),  # phone photo; JPEG decoded with DCT scaling (draft)
        ((3000, 1999), 512, (512, 341)),
        ((999, 333), 300, (300, 100)),
        ((640, 427), 2048, (640, 427)),  # never upscaled
    ],
)
def test_resize_respects_max_side_and_aspect(size, max_side, expected):
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    arr = np.stack([(x * 255 // size[0]), (y * 255 // size[1]), np.full_like(x, 90)], -1).astype(np.uint8)
    data = io.BytesIO()
    Image.fromarray(arr, "RGB").save(data, "JPEG", quality=85)
    result = normalize_image(data.getvalue(), "g.jpg", ImagePolicy(max_side=max_side))
    assert isinstance(result, NormalizedImage), result
    assert (result.width, result.height) == expected
    assert max(result.width, result.height) <= max_side
    # aspect ratio kept up to rounding of the shorter side
    assert abs(result.width / result.height - size[0] / size[1]) <= size[0] / size[1] / min(expected)
    assert ("resized" in result.notes) == (max(size) > max_side)
    # content follows the geometry: red grows left->right, green top->bottom
    im = open_rgb(result.data)
    assert im.getpixel((2, im.height // 2))[0] < 40 and im.getpixel((im.width - 3, im.height // 2))[0] > 215
    assert im.getpixel((im.width // 2, 2))[1] < 40 and im.getpixel((im.width // 2, im.height - 3))[1] > 215


# PIL warns (UserWarning, not an exception) when it meets mangled EXIF; that is expected for mutated inputs.
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_never_raises_on_fuzz():
    """200 seeded cases: random bytes, random bytes behind real magic numbers, random truncations and random
    byte mutations of valid JPEG/PNG/GIF/WEBP files. Each must give a result, never an exception."""
    rng = np.random.default_rng(20250604)
    jpeg, png = valid_jpeg((160, 120), seed=3), valid_png((120, 90), seed=4)
    frames = [Image.new("RGB", (48, 48), c) for c in (RED, GREEN)]
    gif_buf, webp_buf = io.BytesIO(), io.BytesIO()
    frames[0].save(gif_buf, "GIF", save_all=True, append_images=frames[1:])
    frames[0].save(webp_buf, "WEBP", save_all=True, append_images=frames[1:])
    valid = [jpeg, png, gif_buf.getvalue(), webp_buf.getvalue()]
    magics = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x10\x00\x00WEBPVP8 ", b"BM",
              b"II*\x00", b"MM\x00*"]
    inputs: list[bytes] = []
    for _ in range(40):
        inputs.append(rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes())
    for i in range(30):
        tail = rng.integers(0, 256, int(rng.integers(0, 2000)), dtype=np.uint8).tobytes()
        inputs.append(magics[i % len(magics)] + tail)
    for _ in range(45):
        inputs.append(jpeg[: int(rng.integers(0, len(jpeg)))])
    for _ in range(45):
        inputs.append(png[: int(rng.integers(0, len(png)))])
    for i in range(40):
        b = bytearray(valid[i % len(valid)])
        for pos in rng.integers(0, len(b), int(rng.integers(1, 12))):
            b[pos] = int(rng.integers(0, 256))
        inputs.append(bytes(b))
    assert len(inputs) == 200

    outcomes: collections.Counter[str] = collections.Counter()
    t0 = time.process_time()
    for i, data in enumerate(inputs):
        result = normalize_image(data, f"fuzz_{i}.jpg")  # must not raise
        assert isinstance(result, (NormalizedImage, Quarantined))
        assert result.sha256 == hashlib.sha256(data).hexdigest()
        if isinstance(result, NormalizedImage):
            assert max(result.width, result.height) <= 1024
            assert open_rgb(result.data).size == (result.width, result.height)
            outcomes["normalized"] += 1
        else:
            assert isinstance(result.reason, QuarantineReason) and result.detail
            outcomes[result.reason.value] += 1
    elapsed = time.process_time() - t0
    print(f"\nfuzz outcomes: {dict(outcomes)} in {elapsed:.2f}s CPU")
    # the truncations must mostly be caught, not accepted with grey fill
    assert outcomes[QuarantineReason.TRUNCATED.value] >= 40
    assert elapsed < 20


def test_truncated_is_not_silently_accepted():
    jpeg = valid_jpeg((256, 256), seed=5)
    for frac in (0.3, 0.6, 0.9, 0.99):
        result = normalize_image(jpeg[: int(len(jpeg) * frac)], "t.jpg")
        assert isinstance(result, Quarantined) and result.reason is QuarantineReason.TRUNCATED, (frac, result)


def test_pil_globals_untouched(cases):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for case in cases.values():
        normalize_image(case.path.read_bytes(), str(case.path))
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before == (Image.MAX_IMAGE_PIXELS, False)


def test_global_load_truncated_images_is_flagged(monkeypatch):
    """If some other code sets PIL's global LOAD_TRUNCATED_IMAGES, truncation cannot be detected; the result
    then carries a note instead of pretending the check happened."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    jpeg = valid_jpeg((256, 256), seed=5)
    result = normalize_image(jpeg[: len(jpeg) // 2], "t.jpg")
    assert isinstance(result, NormalizedImage)
    assert "load_truncated_images_enabled" in result.notes


def test_deterministic_and_accepts_bytes_like():
    data = valid_jpeg()
    a = normalize_image(data, "a.jpg")
    b = normalize_image(bytearray(data), "a.jpg")
    c = normalize_image(memoryview(data), "a.jpg")
    assert a == b == c


def test_wrong_argument_types_raise_type_error():
    with pytest.raises(TypeError):
        normalize_image("not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        normalize_image(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        normalize_image(b"", path=Path("x.jpg"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        normalize_image(b"", policy={"max_side": 10})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        open_rgb("x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_side": 0}, {"animated": "all"}, {"encode_format": "WEBP"}, {"jpeg_quality": 101},
     {"min_side": 2000}, {"max_pixels": -1}],
)
def test_policy_validation(kwargs):
    with pytest.raises(ValueError):
        ImagePolicy(**kwargs)


def test_quarantine_reason_values_are_stable():
    assert {r.name: r.value for r in QuarantineReason} == {
        "EMPTY_FILE": "empty_file",
        "NOT_AN_IMAGE": "not_an_image",
        "UNSUPPORTED_FORMAT": "unsupported_format",
        "CORRUPT": "corrupt",
        "TRUNCATED": "truncated",
        "DECOMPRESSION_BOMB": "decompression_bomb",
        "TOO_SMALL": "too_small",
        "ANIMATED": "animated",
        "UNSUPPORTED_MODE": "unsupported_mode",
        "UNREADABLE": "unreadable",
    }
    assert QuarantineReason("truncated") is QuarantineReason.TRUNCATED


# --- real data ----------------------------------------------------------------------------------------------

_EXT_FAMILY = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}


def _magic_family(data: bytes) -> str:
    """Container family from magic bytes, independent of rms_ray.data.images (MPO is a JPEG container)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return "?"


@pytest.mark.shared_data
@pytest.mark.skipif(
    not MMSAFEAWARE_IMAGES.is_dir(),
    reason=f"MMSafeAware images not found at {MMSAFEAWARE_IMAGES} (set RMS_SHARED_DATA to the shared data dir)",
)
def test_mmsafeaware_all_images():
    files = sorted(p for p in MMSAFEAWARE_IMAGES.iterdir() if p.is_file())
    assert len(files) > 1000
    outcomes: collections.Counter[str] = collections.Counter()
    formats: collections.Counter[str] = collections.Counter()
    notes: collections.Counter[str] = collections.Counter()
    mismatch_expected, mismatch_noted, first_frame = set(), set(), set()
    png_named_jpeg = jpeg_named_png = 0
    elapsed = cpu = 0.0
    for path in files:
        data = path.read_bytes()
        t0, c0 = time.perf_counter(), time.process_time()
        result = normalize_image(data, str(path))  # must not raise
        elapsed += time.perf_counter() - t0
        cpu += time.process_time() - c0
        ext = path.suffix.lower().lstrip(".")
        family = _magic_family(data)
        if _EXT_FAMILY.get(ext) != family:
            mismatch_expected.add(path.name)
        png_named_jpeg += family == "PNG" and ext in ("jpg", "jpeg")
        jpeg_named_png += family == "JPEG" and ext == "png"
        if isinstance(result, NormalizedImage):
            outcomes["normalized"] += 1
            formats[result.source_format] += 1
            notes.update(n.split(":")[0] if n.startswith("extension_mismatch") else n for n in result.notes)
            if any(n.startswith("extension_mismatch:") for n in result.notes):
                mismatch_noted.add(path.name)
                assert f"extension_mismatch:{ext}->{result.source_format.lower()}" in result.notes
            if result.source_format == "MPO":
                first_frame.add(path.name)
                assert "first_frame_of_2" in result.notes
            assert max(result.width, result.height) <= 1024
        else:
            assert isinstance(result, Quarantined)
            outcomes[f"quarantined:{result.reason.value}"] += 1
    print(
        f"\nMMSafeAware: {len(files)} files; outcomes {dict(outcomes)}; source formats {dict(formats)}; "
        f"notes {dict(notes)}; PNG named .jpg/.jpeg: {png_named_jpeg}; JPEG named .png: {jpeg_named_png}; "
        f"extension mismatches noted: {sorted(mismatch_noted)}; "
        f"{1000 * elapsed / len(files):.2f} ms/image wall, {1000 * cpu / len(files):.2f} ms/image CPU "
        f"({elapsed:.1f}s wall total)"
    )
    assert sum(outcomes.values()) == len(files)
    # Every container/extension disagreement (PNG named .jpeg, JPEG named .png, ...) carries the note, and no other
    # file does. In this snapshot that is 0 PNG-named-.jpeg and 1 JPEG-named-.png (2037.png); MPO named .jpeg is
    # not a mismatch (MPO is a JPEG container).
    assert mismatch_noted == mismatch_expected
    # MANIFEST.md: all 1,446 are real images (1,293 JPEG, 140 PNG, 7 WEBP, 6 MPO); none should be quarantined
    assert outcomes["normalized"] == len(files), dict(outcomes)
    assert len(first_frame) == formats["MPO"]
