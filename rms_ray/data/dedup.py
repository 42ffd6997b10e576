"""Exact and near-duplicate detection over (image_id, sha256, phash, colour signature) rows.

What counts as a duplicate
--------------------------

* **exact**: the same sha256 of the original file bytes. Every byte-identical copy is reported as ``kind="exact"``
  of its *twin*, the smallest ``image_id`` among the copies, whatever else it resembles.
* **near**: the same picture re-encoded, resized, lightly cropped or recompressed. Two images are *near* when BOTH

  1. the Hamming distance between their 64-bit perceptual hashes (``imagehash.phash``, stored as
     :attr:`rms_ray.data.images.NormalizedImage.phash`) is at most ``max_hamming`` bits, and
  2. their colour distance (:func:`color_distance`) is at most ``max_color_distance``.

  pHash (DCT of a 32x32 greyscale thumbnail; Zauner 2010, "Implementation and Benchmarking of Perceptual Image
  Hash Functions", as implemented by the ImageHash library) sees layout and luminance structure only: the same
  product shot in red and in green, or one scene at noon and at dusk, hash 0-4 bits apart. The colour check tells
  them apart; JPEG/resize variants keep their colours and pass it.

Colour signature (:func:`color_signature`): the normalised RGB image is cut into a 4x4 grid of equal cells; each
cell's mean colour is taken in linear light (sRGB transfer function inverted, IEC 61966-2-1) and converted to CIE
1976 L*a*b* (sRGB matrix, D65 white, CIE 15:2004 formulas). The 16 Lab triples are quantised to one byte per
channel (L* in steps of 100/255, a* and b* in steps of 1) and stored as ``"lab4x4:" + 96 hex digits`` in the
ingest metadata. The colour distance of two images is the **largest CIE76 Delta E (Euclidean distance in L*a*b*)
over the 16 cells**: the worst-matching region, so a recoloured object that fills part of one cell is caught,
not averaged away. Units: Delta E 1976; about 2.3 is a just-noticeable difference (Sharma 2003, "Digital Color
Imaging Handbook"); the one-byte quantisation moves a distance by at most ~1.5 (in practice < 0.5).

Measured on the 21 sample photos of ../shared/data/pypi_sample_photos (the 9 in examples/photos among them;
pillow 13, imagehash 4.3.2, colour signature of ``normalize_image`` output): re-encoded variants (50% LANCZOS +
JPEG q70, 80% + q85, WebP q50) are 0-4 pHash bits and Delta E 0.0-3.3 from the original; harsher ones (25% + q30,
JPEG q10, a 2% border crop) stay within Delta E 6.4. Colour variants of the 12 colour photos (hue rotated by 20,
45, 90 or 180 degrees, R/B swapped, brightness x0.6 or x1.3, a warm tint) are 0-10 pHash bits (97 of 123 within 4
bits: pHash alone merged them) but Delta E 10.7-118.5 apart, except the near-black Hubble deep field, whose small
coloured galaxies barely move a cell's mean (2.0-6.3). The default threshold 8.0 sits between the two.
Greyscale photos are unchanged by a hue rotation and rightly stay duplicates of it.

Grouping (no chains)
--------------------

Exact groups come first: one representative per sha256 (its smallest id), and every other copy is reported as
``exact`` of it -- also when that twin is itself a near duplicate of a third image. Near grouping then runs on the
representatives in ascending ``image_id`` order: an image that is near one or more already *kept* images becomes a
near duplicate of the closest of them (fewest pHash bits, then smallest colour distance, then smallest id);
otherwise it is kept. So every near duplicate is itself near its kept image, kept images are pairwise not near,
and the kept image of a group is its smallest id. In a chain A~B~C (ids in that order) with A not near C, B is a
duplicate of A and C is kept. (This is the greedy maximal independent set of the "near" graph in id order.) The
result does not depend on the input order.

Algorithm (no O(n^2) all-pairs scan for the default threshold):

1. sort by image_id; group equal sha256 values (dict) -> exact duplicates, one representative per sha256;
2. collapse representatives with identical (phash, colour signature) into one *unit* (both distances 0);
3. multi-index hashing over the units' phashes: split the 64 bits into ``max_hamming + 1`` bands. By the
   pigeonhole principle two hashes within ``max_hamming`` bits agree exactly on at least one band, so only pairs
   sharing a band value are candidates; each pair is kept only in the first band they share (no repeats),
   verified with a vectorised popcount, then with the colour distance;
4. leader assignment: one pass over the verified pairs sorted by (later unit, closeness).

Cost: O(n log n + P) time where P is the number of candidate pairs; for well-spread hashes and
``max_hamming=4`` (13-bit bands) P is about ``5 * n^2 / 2^13 / 2``, e.g. ~0.8 M for 50k images. Units sharing
one pHash but differing in colour are all candidates of each other (k^2/2 pairs for k such units; real photos
rarely share a full pHash, flat single-colour images do: 10k flat images of random colours take ~4 s CPU, most
pairs rejected by a 3-value mean-colour test before the 48-value one). When a band is shorter than 6 bits
(``max_hamming >= 10``) banding no longer prunes and a chunked all-pairs scan is used instead (O(n^2 / 2)
popcounts). Measured (shared 2-core VM, numpy 2.3, pure-Python row handling included; synthetic rows with 10%
planted near duplicates, ``tests/test_dedup.py::test_scales_to_50k``): 50k rows 0.16 s CPU (0.2-0.5 s wall), 100k
0.43 s CPU, 1M ~11 s CPU (the ~3e8 candidate pairs of 13-bit bands and the per-row Python work dominate; the
pHash-only version this replaced took 8.7 s CPU for 1M).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # PIL is only needed by color_signature's caller; keep this module numpy-only at import
    from PIL import Image

__all__ = [
    "COLOR_SIG_PREFIX",
    "DEFAULT_MAX_COLOR_DISTANCE",
    "DEFAULT_MAX_HAMMING",
    "DuplicateOf",
    "color_distance",
    "color_signature",
    "find_duplicates",
    "hamming",
]

#: Defaults of ``images.near_duplicate_hamming`` / ``images.near_duplicate_color_distance`` (see module docstring).
DEFAULT_MAX_HAMMING = 4
DEFAULT_MAX_COLOR_DISTANCE = 8.0

_GRID = 4  # cells per side of the colour grid
_CELLS = _GRID * _GRID
#: Prefix of every colour signature; names the method, so a signature made another way is never compared.
COLOR_SIG_PREFIX = f"lab{_GRID}x{_GRID}:"
_SIG_HEX = _CELLS * 3 * 2

_MIN_BAND_BITS = 6  # below this, banding prunes nothing worth having: fall back to all-pairs
_BRUTE_CHUNK_CELLS = 1 << 24  # cells of the (rows x n) distance block in the all-pairs scan
_COLOR_CHUNK = 1 << 16  # pairs per vectorised colour-distance block (bounds memory to ~25 MB)

_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

# sRGB (IEC 61966-2-1) linear RGB -> CIE XYZ, D65; reference white D65 (X, Y, Z) with Y = 1.
_RGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_SRGB_TO_LINEAR = np.array(
    [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (np.arange(256) / 255.0)]
)


@dataclass(frozen=True)
class DuplicateOf:
    """``image_id`` duplicates ``canonical_id``.

    Attributes:
        image_id: the duplicate (never a kept image).
        canonical_id: for ``kind="near"``, the kept image of its group (kept images are never listed as
            ``image_id``); for ``kind="exact"``, its byte-identical twin = the smallest image_id with the same
            sha256, which may itself be listed as a near duplicate of another image.
        kind: ``"exact"`` (same sha256) or ``"near"`` (see module docstring).
        distance: pHash Hamming distance (bits, 0..64) between the two; at most ``max_hamming`` for near rows.
        color_distance: colour distance (max-cell CIE76 Delta E, see :func:`color_distance`) between the two,
            rounded to 0.01; at most ``max_color_distance`` for near rows, 0.0 for byte-identical copies.
    """

    image_id: str
    canonical_id: str
    kind: str
    distance: int
    color_distance: float = 0.0


def _popcount(x: np.ndarray) -> np.ndarray:
    """Bit count of each uint64 (vectorised)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return _POP8[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def hamming(phash_a: str, phash_b: str) -> int:
    """Hamming distance in bits between two 16-hex-digit (64-bit) phash strings.

    Raises:
        ValueError: if either is not 16 hex digits.
    """
    a, b = _parse_phashes([phash_a, phash_b])
    return int(_popcount(a ^ b))


def _parse_phashes(hashes: Sequence[str]) -> np.ndarray:
    for h in hashes:
        if not isinstance(h, str) or len(h) != 16:
            raise ValueError(f"phash must be a 16-hex-digit string (64-bit imagehash.phash), got {h!r}")
    try:
        raw = bytes.fromhex("".join(hashes))
    except ValueError as exc:
        raise ValueError(f"phash values must be hex: {exc}") from None
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


# --- colour signature ---------------------------------------------------------------------------------------------


def _linear_rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) linear sRGB in 0..1 -> (..., 3) CIE L*a*b* (D65). CIE 15:2004 formulas."""
    t = (rgb @ _RGB_TO_XYZ.T) / _WHITE_D65
    delta = 6.0 / 29.0
    f = np.where(t > delta**3, np.cbrt(np.maximum(t, 0.0)), t / (3 * delta * delta) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def color_signature(image: "Image.Image") -> str:
    """Colour signature of an image: mean CIE L*a*b* colour of each cell of a 4x4 grid, quantised.

    Args:
        image: a PIL image of any mode convertible to RGB (the pipeline passes the normalised RGB pixels, before
            JPEG/PNG re-encoding). Images smaller than 4 px on a side are upscaled (nearest) to 4 px first.

    Returns:
        ``"lab4x4:"`` followed by 96 lower-case hex digits: for each cell in row-major order, three bytes
        ``round(L* * 2.55)``, ``round(a*) + 128``, ``round(b*) + 128`` (clipped to 0..255; every sRGB colour
        fits). Cell means are taken in linear light, then converted to L*a*b* (see module docstring for sources).

    Raises:
        ValueError: if the image cannot be converted to RGB (PIL's error).

    Cost: one pass over the pixels (a 768 px image: a few ms).
    """
    im = image if image.mode == "RGB" else image.convert("RGB")
    w, h = im.size
    if w < _GRID or h < _GRID:
        im = im.resize((max(w, _GRID), max(h, _GRID)), 0)  # 0 = NEAREST, without importing PIL here
        w, h = im.size
    lin = _SRGB_TO_LINEAR[np.asarray(im, dtype=np.uint8)]  # (h, w, 3) float64: means in linear light
    ys = (np.arange(_GRID) * h) // _GRID
    xs = (np.arange(_GRID) * w) // _GRID
    sums = np.add.reduceat(np.add.reduceat(lin, ys, axis=0), xs, axis=1)  # (4, 4, 3)
    counts = np.diff(np.append(ys, h))[:, None] * np.diff(np.append(xs, w))[None, :]
    lab = _linear_rgb_to_lab(sums / counts[..., None]).reshape(_CELLS, 3)
    q = np.empty((_CELLS, 3), dtype=np.int64)
    q[:, 0] = np.rint(lab[:, 0] * 2.55)
    q[:, 1:] = np.rint(lab[:, 1:]) + 128
    return COLOR_SIG_PREFIX + np.clip(q, 0, 255).astype(np.uint8).tobytes().hex()


def _parse_color_sigs(sigs: Sequence[str]) -> np.ndarray:
    """Colour signatures -> (n, 16, 3) float32 L*a*b*. Raises ValueError on a malformed signature."""
    n_pre = len(COLOR_SIG_PREFIX)
    for s in sigs:
        if not isinstance(s, str) or len(s) != n_pre + _SIG_HEX or not s.startswith(COLOR_SIG_PREFIX):
            raise ValueError(
                f"colour signature must be {COLOR_SIG_PREFIX!r} + {_SIG_HEX} hex digits (color_signature()), "
                f"got {s!r}; recompute it from the image"
            )
    try:
        raw = bytes.fromhex("".join(s[n_pre:] for s in sigs))
    except ValueError as exc:
        raise ValueError(f"colour signature values must be hex: {exc}") from None
    q = np.frombuffer(raw, dtype=np.uint8).reshape(len(sigs), _CELLS, 3).astype(np.float32)
    q[:, :, 0] *= np.float32(1 / 2.55)
    q[:, :, 1:] -= 128
    return q


def _pair_color_distance(lab: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Max-cell CIE76 Delta E between lab[a[k]] and lab[b[k]] for every k (chunked to bound memory)."""
    out = np.empty(a.size, dtype=np.float32)
    for i0 in range(0, a.size, _COLOR_CHUNK):
        d = lab[a[i0 : i0 + _COLOR_CHUNK]] - lab[b[i0 : i0 + _COLOR_CHUNK]]
        out[i0 : i0 + _COLOR_CHUNK] = np.sqrt(np.einsum("kcx,kcx->kc", d, d).max(axis=1))
    return out


def color_distance(sig_a: str, sig_b: str) -> float:
    """Colour distance between two :func:`color_signature` strings.

    Returns:
        The largest CIE76 Delta E (Euclidean distance in L*a*b*) between corresponding cells of the two 4x4
        grids, i.e. how different the worst-matching region's mean colour is. 0.0 for identical signatures;
        ~2.3 is just noticeable; about 100 separates black from white.

    Raises:
        ValueError: if a signature is malformed or was made by another method (other prefix).
    """
    lab = _parse_color_sigs([sig_a, sig_b])
    return float(_pair_color_distance(lab, np.array([0]), np.array([1]))[0])


# --- candidate pairs ----------------------------------------------------------------------------------------------


def _band_layout(max_hamming: int) -> list[tuple[int, int]]:
    """(shift, width) of the ``max_hamming + 1`` bands covering the 64 bits."""
    n_bands = max_hamming + 1
    base, extra = divmod(64, n_bands)
    layout, shift = [], 0
    for i in range(n_bands):
        width = base + (1 if i < extra else 0)
        layout.append((shift, width))
        shift += width
    return layout


class _PairBuffer:
    """Collects verified pairs (a < b) with their distances; concatenated once at the end."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, a: np.ndarray, b: np.ndarray, dh: np.ndarray, dc: np.ndarray) -> None:
        if a.size:
            self.parts.append((np.minimum(a, b), np.maximum(a, b), dh.astype(np.int8), dc))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self.parts:
            e = np.zeros(0, dtype=np.int64)
            return e, e, np.zeros(0, dtype=np.int8), np.zeros(0, dtype=np.float32)
        return tuple(np.concatenate(col) for col in zip(*self.parts))  # type: ignore[return-value]


class _Colours:
    """Cell colours (m, 16, 3) of the units, and their mean over the cells (m, 3) for a cheap first test."""

    def __init__(self, lab: np.ndarray) -> None:
        self.lab = lab
        self.mean = lab.mean(axis=1)


def _verify(colours: _Colours, a: np.ndarray, b: np.ndarray, dh: np.ndarray, max_hamming: int, max_color: float,
            out: _PairBuffer) -> None:
    """Keep the candidate pairs within both thresholds."""
    ok = dh <= max_hamming
    # |mean of the cell differences| <= max over cells of |difference| (triangle inequality): a pair whose mean
    # colours differ by more than max_color cannot pass; this drops most pairs with 3 instead of 48 values
    # (what keeps thousands of flat images that share a pHash affordable). The margin absorbs float32 rounding.
    dm = colours.mean[a] - colours.mean[b]
    ok &= np.einsum("kx,kx->k", dm, dm) <= (max_color + 1e-3) ** 2
    if not ok.any():
        return
    a, b, dh = a[ok], b[ok], dh[ok]
    dc = _pair_color_distance(colours.lab, a, b)
    ok = dc <= max_color
    out.add(a[ok], b[ok], dh[ok], dc[ok])


def _band_pairs(u: np.ndarray, colours: _Colours, max_hamming: int, max_color: float, out: _PairBuffer) -> None:
    """All pairs of units within both thresholds, by multi-index hashing on the phash bands."""
    m = u.size
    layout = _band_layout(max_hamming)
    for bi, (shift, width) in enumerate(layout):
        mask = np.uint64((1 << width) - 1)
        v = (u >> np.uint64(shift)) & mask
        order = np.argsort(v, kind="stable")
        sv = v[order]
        start = np.empty(m, dtype=bool)
        start[0] = True
        np.not_equal(sv[1:], sv[:-1], out=start[1:])
        group = np.cumsum(start) - 1
        group_start = np.flatnonzero(start)
        group_size = np.diff(np.append(group_start, m))
        remaining = group_size[group] - (np.arange(m) - group_start[group]) - 1  # later members in same bucket
        active = np.flatnonzero(remaining > 0)
        d = 1
        while active.size:  # pairs (i, i + d) inside a bucket, for d = 1, 2, ...: total work = candidate pairs
            a, b = order[active], order[active + d]
            x = u[a] ^ u[b]
            close = np.flatnonzero(_popcount(x) <= max_hamming)  # almost every candidate fails here: test first
            if close.size:
                a, b, x = a[close], b[close], x[close]
                first = np.ones(a.size, dtype=bool)  # keep a pair only in the first band it shares: verified once
                for s_prev, w_prev in layout[:bi]:
                    first &= ((x >> np.uint64(s_prev)) & np.uint64((1 << w_prev) - 1)) != 0
                if first.any():
                    _verify(colours, a[first], b[first], _popcount(x[first]), max_hamming, max_color, out)
            d += 1
            active = active[remaining[active] >= d]


def _all_pairs(u: np.ndarray, colours: _Colours, max_hamming: int, max_color: float, out: _PairBuffer) -> None:
    """Reference/fallback: every pair within both thresholds by a chunked O(m^2) scan."""
    m = u.size
    rows = max(1, _BRUTE_CHUNK_CELLS // max(m, 1))
    for i0 in range(0, m, rows):
        i1 = min(m, i0 + rows)
        dist = _popcount(u[i0:i1, None] ^ u[None, :])
        ii, jj = np.nonzero(dist <= max_hamming)
        keep = jj > ii + i0
        ii, jj = (ii[keep] + i0).astype(np.int64), jj[keep].astype(np.int64)
        _verify(colours, ii, jj, dist[ii - i0, jj], max_hamming, max_color, out)


def _near_pairs(u: np.ndarray, lab: np.ndarray, max_hamming: int, max_color: float, method: str = "auto"):
    """Pairs (a < b) of positions in ``u``/``lab`` that are near, with their distances, sorted by (a, b).

    Returns:
        ``(a, b, phash_bits, color_distance)`` arrays.
    """
    out = _PairBuffer()
    if u.size > 1:
        if method == "all_pairs" or (method == "auto" and 64 // (max_hamming + 1) < _MIN_BAND_BITS):
            _all_pairs(u, _Colours(lab), max_hamming, max_color, out)
        elif method in ("auto", "bands"):
            _band_pairs(u, _Colours(lab), max_hamming, max_color, out)
        else:
            raise ValueError(f"unknown method {method!r}")
    a, b, dh, dc = out.arrays()
    order = np.lexsort((b, a))
    return a[order], b[order], dh[order], dc[order]


def _leaders(m: int, a: np.ndarray, b: np.ndarray, dh: np.ndarray, dc: np.ndarray) -> np.ndarray:
    """Greedy assignment in position order (positions = ascending image_id): position j joins the closest
    earlier kept position it is near, else it is kept.

    Args:
        m: number of positions; ``a < b``, ``dh``, ``dc``: the near pairs and their distances (:func:`_near_pairs`).

    Returns:
        For each position, its kept position (itself when kept).
    """
    lead = list(range(m))
    if a.size == 0:
        return np.asarray(lead, dtype=np.int64)
    # by later member, then closeness (phash bits, colour distance, id): the first kept partner is the closest
    order = np.lexsort((a, dc, dh, b))
    kept = bytearray(b"\x01") * m
    for j, i in zip(b[order].tolist(), a[order].tolist()):
        # i < j, and all pairs of smaller j came first: i's status is final here
        if kept[j] and kept[i]:
            kept[j], lead[j] = 0, i
    return np.asarray(lead, dtype=np.int64)


def _check_thresholds(max_hamming, max_color_distance, near) -> tuple[int, float]:
    if not isinstance(near, (bool, np.bool_)):
        raise TypeError(f"near must be bool, not {type(near).__name__}")
    if not isinstance(max_hamming, (int, np.integer)) or isinstance(max_hamming, (bool, np.bool_)):
        raise TypeError(f"max_hamming must be int, not {type(max_hamming).__name__}")
    if not 0 <= int(max_hamming) <= 64:
        raise ValueError(f"max_hamming must be in 0..64 (bits of a 64-bit pHash), got {max_hamming}")
    if not isinstance(max_color_distance, (int, float, np.integer, np.floating)) or isinstance(
        max_color_distance, (bool, np.bool_)
    ):
        raise TypeError(f"max_color_distance must be a number, not {type(max_color_distance).__name__}")
    if not math.isfinite(float(max_color_distance)) or max_color_distance < 0:
        raise ValueError(f"max_color_distance must be a finite Delta E >= 0, got {max_color_distance}")
    return int(max_hamming), float(max_color_distance)


def find_duplicates(
    items: Sequence[tuple[str, str, str, str]] | Iterable[tuple[str, str, str, str]],
    max_hamming: int = DEFAULT_MAX_HAMMING,
    max_color_distance: float = DEFAULT_MAX_COLOR_DISTANCE,
    near: bool = True,
) -> list[DuplicateOf]:
    """Find exact and near-duplicate images (definitions and method in the module docstring).

    Args:
        items: ``(image_id, sha256, phash_hex, color_sig)`` rows; ``image_id`` must be unique, ``sha256`` is
            compared for equality only, ``phash_hex`` is a 16-hex-digit 64-bit perceptual hash
            (``NormalizedImage.phash``), ``color_sig`` a :func:`color_signature` (``NormalizedImage.color_sig``).
        max_hamming: largest pHash Hamming distance (bits, 0..64) of a near pair; 0 = identical pHash only (the
            colour must still match: 0 does NOT turn near detection off, ``near=False`` does).
        max_color_distance: largest colour distance (max-cell CIE76 Delta E, :func:`color_distance`, >= 0) of a
            near pair; 0 = identical colour signature only.
        near: False = exact (sha256) duplicates only; phash and colour are then not compared.

    Returns:
        One :class:`DuplicateOf` per image that is not kept, sorted by ``image_id``. Kept images (and images
        without duplicates) are not listed. Exact copies point at their byte-identical twin (``kind="exact"``);
        near duplicates point at the kept image they are near. Deterministic and independent of the order of
        ``items``.

    Raises:
        TypeError: an item is not a 4-sequence of str, or an argument has the wrong type.
        ValueError: a repeated image_id, a malformed phash or colour signature, max_hamming outside 0..64, or a
            negative / non-finite max_color_distance.
    """
    max_hamming, max_color = _check_thresholds(max_hamming, max_color_distance, near)
    rows = list(items)
    for row in rows:
        if len(row) != 4 or not all(isinstance(x, str) for x in row):
            raise TypeError(
                f"each item must be (image_id: str, sha256: str, phash_hex: str, color_sig: str), got {row!r}"
            )
    if not rows:
        return []
    rows.sort(key=lambda r: r[0])
    ids = [r[0] for r in rows]
    for prev, cur in zip(ids, ids[1:]):
        if prev == cur:
            raise ValueError(f"duplicate image_id {cur!r}")
    shas = [r[1] for r in rows]
    phash_hex = [r[2].lower() for r in rows]
    sig_hex = [r[3].lower() for r in rows]
    hashes = _parse_phashes(phash_hex)
    lab = _parse_color_sigs(sig_hex)
    n = len(rows)

    # 1. exact: twin = first (smallest id) position with that sha256
    first_with_sha: dict[str, int] = {}
    twin = np.fromiter((first_with_sha.setdefault(s, k) for k, s in enumerate(shas)), dtype=np.int64, count=n)
    target = twin.copy()  # what each position is reported against (itself = kept)
    kind_near = np.zeros(n, dtype=bool)

    if near:
        reps = np.flatnonzero(twin == np.arange(n))  # ascending = ascending image_id
        # 2. units: representatives with identical (phash, colour signature); first = smallest id
        first_with_key: dict[tuple[str, str], int] = {}
        keys = ((phash_hex[k], sig_hex[k]) for k in reps.tolist())
        unit_of_rep = np.fromiter((first_with_key.setdefault(key, u) for u, key in enumerate(keys)), dtype=np.int64,
                                  count=reps.size)
        unit_first = np.flatnonzero(unit_of_rep == np.arange(reps.size))  # rep index of each unit's first
        unit_pos = reps[unit_first]  # row position of each unit's first; ascending
        # 3. near pairs between units, 4. greedy leaders in id order
        a, b, dh, dc = _near_pairs(hashes[unit_pos], lab[unit_pos], max_hamming, max_color)
        lead = _leaders(unit_pos.size, a, b, dh, dc)
        unit_index = np.empty(reps.size, dtype=np.int64)
        unit_index[unit_first] = np.arange(unit_first.size)
        u = unit_index[unit_of_rep]  # unit of each rep
        u_lead = lead[u]
        # a kept unit keeps its first rep, the unit's other reps are near of it; a unit that is a duplicate sends
        # all its reps to the same kept image (identical signatures: identical distances to everything)
        rep_target = np.where(u_lead == u, reps[unit_first[u]], unit_pos[u_lead])
        target[reps] = rep_target
        kind_near[reps] = rep_target != reps

    dup = np.flatnonzero(target != np.arange(n))
    tgt = target[dup]
    bits = _popcount(hashes[dup] ^ hashes[tgt]).astype(int)
    colors = _pair_color_distance(lab, dup, tgt)
    return [
        DuplicateOf(image_id=ids[k], canonical_id=ids[c], kind="near" if kn else "exact", distance=int(d),
                    color_distance=round(float(cd), 2))
        for k, c, kn, d, cd in zip(dup.tolist(), tgt.tolist(), kind_near[dup].tolist(), bits.tolist(), colors.tolist())
    ]
