"""Fixture factory: writes one small file per awkward/bad input kind, generated with PIL at test time.

``write_bad_images(directory)`` returns ``{name: Case(path, outcome, expected, size)}`` where

* ``outcome`` is ``"normalized"`` or ``"quarantined"``;
* ``expected`` is the exact :class:`rms_ray.data.images.QuarantineReason` for quarantined cases, or the exact
  ``notes`` tuple of the resulting :class:`rms_ray.data.images.NormalizedImage`;
* ``size`` is the expected ``(width, height)`` after normalisation (``None`` for quarantined cases).

Every file is at most a few hundred KB and the whole set is written in well under a second.
Pixel layouts are chosen so tests can check colours: see the comment on each writer.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from rms_ray.data.images import QuarantineReason as R

NORMALIZED = "normalized"
QUARANTINED = "quarantined"

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


class Case(NamedTuple):
    path: Path
    outcome: str
    expected: R | tuple[str, ...]
    size: tuple[int, int] | None = None


# --- helpers ------------------------------------------------------------------------------------------------


def _halves(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    """Image whose left half is ``left`` and right half is ``right``."""
    im = Image.new(mode, size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return im


def _photo_like(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Smooth gradient + mild noise: compresses like a photo, deterministic."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 100 * np.sin(x / max(w, 1) * 6.0)
    g = 127 + 100 * np.cos(y / max(h, 1) * 5.0)
    b = 127 + 60 * np.sin((x + y) / max(w + h, 1) * 9.0)
    arr = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A structurally valid PNG that *declares* width x height RGB but carries (almost) no pixel data.

    Costs ~60 bytes to build, whatever the declared size: the decompression-bomb check must reject it from the
    header without decoding.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def valid_jpeg(size: tuple[int, int] = (128, 96), seed: int = 0) -> bytes:
    return _encode(_photo_like(size, seed), "JPEG", quality=90)


def valid_png(size: tuple[int, int] = (96, 96), seed: int = 0) -> bytes:
    return _encode(_photo_like(size, seed), "PNG")


# --- the kinds ----------------------------------------------------------------------------------------------


def _kinds() -> dict[str, tuple[str, Callable[[], bytes], str, R | tuple[str, ...], tuple[int, int] | None]]:
    """name -> (file name, bytes factory, outcome, expected reason/notes, expected size)."""

    def exif_rotated(size, orientation=6):
        # left half RED, right half BLUE as stored; orientation 6 = rotate 90 deg clockwise for display, so the
        # displayed image has RED on top and BLUE at the bottom.
        im = _halves(size, RED, BLUE)
        exif = Image.Exif()
        exif[0x0112] = orientation
        return _encode(im, "JPEG", quality=95, exif=exif)

    def gif_animated():
        frames = [Image.new("RGB", (64, 64), c).convert("P") for c in (RED, GREEN, BLUE)]
        return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)

    def webp_animated():
        frames = [Image.new("RGB", (64, 64), c) for c in (RED, GREEN, BLUE)]
        return _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)

    def apng():
        frames = [Image.new("RGB", (64, 64), c) for c in (RED, GREEN, BLUE)]
        return _encode(frames[0], "PNG", save_all=True, append_images=frames[1:])

    def mpo():
        # first picture RED, second (e.g. the depth/preview picture of a phone photo) BLUE
        frames = [Image.new("RGB", (64, 48), c) for c in (RED, BLUE)]
        return _encode(frames[0], "MPO", save_all=True, append_images=frames[1:])

    def cmyk_jpeg():
        # left half pure red in CMYK (C=0, M=Y=255, K=0), right half pure blue (C=M=255, Y=0, K=0)
        im = _halves((64, 64), (0, 255, 255, 0), (255, 255, 0, 0), mode="CMYK")
        return _encode(im, "JPEG", quality=95)

    def gray16_png():
        # left half 16-bit mid-grey (32768 -> 128 in 8 bit), right half 16-bit white (65535 -> 255)
        arr = np.full((64, 64), 32768, dtype=np.uint16)
        arr[:, 32:] = 65535
        im = Image.fromarray(arr)
        assert im.mode == "I;16", im.mode
        return _encode(im, "PNG")

    def palette_transparent_png():
        # palette index 0 (black) is transparent: left half -> must become WHITE; right half index 1 = RED
        im = Image.new("P", (64, 64), 0)
        im.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
        im.paste(1, (32, 0, 64, 64))
        return _encode(im, "PNG", transparency=0)

    def rgba_png():
        # columns 0-21 fully transparent black -> WHITE; 22-42 black at alpha 128 -> mid grey; 43-63 opaque GREEN
        im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        im.paste((0, 0, 0, 128), (22, 0, 43, 64))
        im.paste((0, 255, 0, 255), (43, 0, 64, 64))
        return _encode(im, "PNG")

    def rgba_opaque_png():
        return _encode(Image.new("RGBA", (64, 64), (0, 0, 255, 255)), "PNG")

    def la_png():
        # left half black, alpha 0 -> WHITE; right half black, opaque -> BLACK
        im = _halves((64, 64), (0, 0), (0, 255), mode="LA")
        return _encode(im, "PNG")

    def rgb_trns_png():
        # RGB PNG with a tRNS colour key: RED pixels are transparent -> WHITE; right half BLUE stays
        return _encode(_halves((64, 64), RED, BLUE), "PNG", transparency=RED)

    def float_tiff():
        arr = np.full((64, 64), 0.5, dtype=np.float32)  # float mid-grey in 0..1 -> 128
        return _encode(Image.fromarray(arr, mode="F"), "TIFF")

    def truncated(b: bytes, frac: float) -> bytes:
        return b[: int(len(b) * frac)]

    def corrupt_jpeg_header():
        # JPEG signature, then the marker structure is wiped out (no 0xFF marker follows SOI). Note: random
        # bytes in the header usually give *truncated* instead, because a random marker length points past the
        # end of the file and the parser runs out of bytes.
        b = bytearray(valid_jpeg())
        b[3:200] = bytes(197)
        return bytes(b)

    def corrupt_png_idat():
        # keep the signature and IHDR, flip the zlib stream inside IDAT: inflate fails
        b = bytearray(valid_png((64, 64)))
        idat = b.index(b"IDAT") + 4
        for i in range(idat + 2, idat + 40):
            b[i] ^= 0xA5
        return bytes(b)

    return {
        # -- quarantined -----------------------------------------------------------------------------------
        "zero_byte": ("zero_byte.jpg", lambda: b"", QUARANTINED, R.EMPTY_FILE, None),
        "text_as_jpg": ("notes.jpg", lambda: b"this is not an image\n" * 20, QUARANTINED, R.NOT_AN_IMAGE, None),
        "html_as_png": (
            "error_page.png",
            lambda: b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n",
            QUARANTINED,
            R.NOT_AN_IMAGE,
            None,
        ),
        "random_bytes": (
            "random.jpg",
            lambda: np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
            QUARANTINED,
            R.NOT_AN_IMAGE,
            None,
        ),
        "corrupt_jpeg_header": ("corrupt.jpg", corrupt_jpeg_header, QUARANTINED, R.CORRUPT, None),
        "corrupt_png_idat": ("corrupt.png", corrupt_png_idat, QUARANTINED, R.CORRUPT, None),
        "truncated_jpeg": ("truncated.jpg", lambda: truncated(valid_jpeg((256, 256)), 0.5), QUARANTINED,
                           R.TRUNCATED, None),
        "truncated_png": ("truncated.png", lambda: truncated(valid_png((256, 256)), 0.5), QUARANTINED,
                          R.TRUNCATED, None),
        "truncated_webp": ("truncated.webp", lambda: truncated(
            _encode(_photo_like((128, 128)), "WEBP", quality=90), 0.5), QUARANTINED, R.TRUNCATED, None),
        "truncated_animated_webp": ("truncated_anim.webp", lambda: truncated(webp_animated(), 0.6), QUARANTINED,
                                    R.TRUNCATED, None),
        "bomb_png_30000": ("bomb.png", lambda: png_header_only(30000, 30000), QUARANTINED,
                           R.DECOMPRESSION_BOMB, None),
        # 81 Mpx: above policy.max_pixels (64 M) but below PIL's own warning limit (~89 M): our check must catch it
        "bomb_png_9000": ("bomb9000.png", lambda: png_header_only(9000, 9000), QUARANTINED,
                          R.DECOMPRESSION_BOMB, None),
        "tiny_png": ("tiny.png", lambda: _encode(Image.new("RGB", (16, 16), RED), "PNG"), QUARANTINED,
                     R.TOO_SMALL, None),
        "one_pixel_gif": ("pixel.gif", lambda: _encode(Image.new("P", (1, 1), 0), "GIF"), QUARANTINED,
                          R.TOO_SMALL, None),
        # 4000x40 would be 1024x10 after the max_side resize
        "banner_jpeg": ("banner.jpg", lambda: _encode(_photo_like((4000, 40)), "JPEG"), QUARANTINED,
                        R.TOO_SMALL, None),
        "svg_as_png": (
            "vector.png",
            lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>',
            QUARANTINED,
            R.UNSUPPORTED_FORMAT,
            None,
        ),
        "heic_signature": (
            "IMG_0001.heic",
            lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200,
            QUARANTINED,
            R.UNSUPPORTED_FORMAT,
            None,
        ),
        # -- normalised ------------------------------------------------------------------------------------
        "plain_jpeg": ("plain.jpg", lambda: valid_jpeg(), NORMALIZED, (), (128, 96)),
        "webp": ("photo.webp", lambda: _encode(_photo_like((80, 60)), "WEBP", quality=90), NORMALIZED, (),
                 (80, 60)),
        "bmp": ("photo.bmp", lambda: _encode(_photo_like((40, 40)), "BMP"), NORMALIZED, (), (40, 40)),
        "png_named_jpeg": ("actually_png.jpeg", lambda: valid_png(), NORMALIZED,
                           ("extension_mismatch:jpeg->png",), (96, 96)),
        "jpeg_named_png": ("actually_jpeg.png", lambda: valid_jpeg(), NORMALIZED,
                           ("extension_mismatch:png->jpeg",), (128, 96)),
        "exif_rotated_jpeg": ("rotated.jpg", lambda: exif_rotated((100, 50)), NORMALIZED, ("exif_transposed",),
                              (50, 100)),
        "exif_rotated_large_jpeg": ("rotated_large.jpg", lambda: _encode(
            _big(), "JPEG", quality=85, exif=_exif(6)), NORMALIZED, ("exif_transposed", "resized"), (512, 1024)),
        "large_jpeg": ("large.jpg", lambda: _encode(_big(), "JPEG", quality=85), NORMALIZED, ("resized",),
                       (1024, 512)),
        "large_png_portrait": ("large.png", lambda: _encode(_photo_like((700, 2100)), "PNG", compress_level=1),
                               NORMALIZED, ("resized",), (341, 1024)),
        "animated_gif": ("anim.gif", gif_animated, NORMALIZED, ("first_frame_of_3", "converted_from_P"),
                         (64, 64)),
        "animated_webp": ("anim.webp", webp_animated, NORMALIZED, ("first_frame_of_3",), (64, 64)),
        "apng": ("anim.png", apng, NORMALIZED, ("first_frame_of_3",), (64, 64)),
        "mpo": ("camera.jpg", mpo, NORMALIZED, ("first_frame_of_2",), (64, 48)),
        "cmyk_jpeg": ("cmyk.jpg", cmyk_jpeg, NORMALIZED, ("converted_from_CMYK",), (64, 64)),
        "gray16_png": ("gray16.png", gray16_png, NORMALIZED, ("converted_from_I;16",), (64, 64)),
        "gray8_jpeg": ("gray.jpg", lambda: _encode(_photo_like((64, 64)).convert("L"), "JPEG"), NORMALIZED,
                       ("converted_from_L",), (64, 64)),
        "bilevel_png": ("bilevel.png", lambda: _encode(_halves((64, 64), 0, 1, mode="1"), "PNG"), NORMALIZED,
                        ("converted_from_1",), (64, 64)),
        "float_tiff": ("float.tif", float_tiff, NORMALIZED, ("converted_from_F",), (64, 64)),
        "palette_transparent_png": ("palette.png", palette_transparent_png, NORMALIZED,
                                    ("converted_from_P", "alpha_composited"), (64, 64)),
        "rgba_png": ("rgba.png", rgba_png, NORMALIZED, ("converted_from_RGBA", "alpha_composited"), (64, 64)),
        "rgba_opaque_png": ("opaque.png", rgba_opaque_png, NORMALIZED, ("converted_from_RGBA",), (64, 64)),
        "la_png": ("la.png", la_png, NORMALIZED, ("converted_from_LA", "alpha_composited"), (64, 64)),
        "rgb_trns_png": ("trns.png", rgb_trns_png, NORMALIZED, ("alpha_composited",), (64, 64)),
    }


@functools.lru_cache(maxsize=1)
def _big() -> Image.Image:
    return _photo_like((3000, 1500))


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


KIND_NAMES: tuple[str, ...] = tuple(_kinds())


def write_bad_images(directory: str | Path) -> dict[str, Case]:
    """Write every kind into ``directory`` (created if missing); return ``{name: Case}``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}
    for name, (filename, factory, outcome, expected, size) in _kinds().items():
        sub = directory / name  # one folder per kind, so file names (which matter: extensions) never clash
        sub.mkdir(exist_ok=True)
        path = sub / filename
        path.write_bytes(factory())
        cases[name] = Case(path, outcome, expected, size)
    return cases
