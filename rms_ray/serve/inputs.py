"""Untrusted image references -> checked bytes -> the judge's RGB image, or a 4xx :class:`InputError`.

An image in a request is a string, one of:

* a **data URL** ``data:image/<type>;base64,<data>`` (always accepted);
* an **http(s) URL**, only when it starts with one of ``serve.allow_urls`` (scheme, host and port equal, path
  under the prefix's path). The service never fetches anything else: link-local and cloud metadata addresses are
  refused even when listed (checked on the resolved addresses), redirects are followed by hand and each hop is
  checked again (at most ``serve.max_redirects``), the body is read up to ``serve.max_image_bytes`` and no further;
* an **absolute path** (or ``file://`` URL), only under one of ``serve.allow_paths``: the path is resolved
  (symlinks and ``..`` included) before the check, so a link out of an allowed folder is refused.

Then, before any pixel is decoded: the byte size (from the base64 length, ``Content-Length``/bytes read, or
``stat``) against ``serve.max_image_bytes`` and the declared ``width * height`` from the image header (PIL reads
the header only) against ``serve.max_image_pixels``. Decoding and normalisation are
:func:`rms_ray.judge.scorer.prepare_image` with the judge config's policy: the same preprocessing as ``evaluate``.

Status codes (each a JSON error naming the field): 400 not base64 / not an image / corrupt / unreachable URL,
403 a URL or path outside the allow-lists, 413 too many bytes or pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from PIL import Image

from rms_ray.data.images import ImagePolicy
from rms_ray.serve.config import ServeSettings

#: Addresses never fetched, even when their host is allow-listed: cloud instance metadata services.
METADATA_ADDRESSES = frozenset({"169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254"})
_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_WS = re.compile(rb"\s+")


class ServiceError(Exception):
    """A request the service answers with an error: ``status``, a short ``code``, a message and the field
    (``param``). Rendered as ``{"error": {"message", "type": code, "param", "status"}}`` (OpenAI's error shape plus
    the status), so the official client raises its usual ``APIStatusError`` subclasses."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.code, "param": self.param, "status": self.status}}


class InputError(ServiceError):
    """A request refused for what it contains (a 4xx status)."""


def image_kind(ref: str) -> str:
    """``data``, ``url``, ``path`` or ``unknown`` (what kind of image reference ``ref`` is)."""
    low = ref[:16].lower()
    if low.startswith("data:"):
        return "data"
    if low.startswith(("http://", "https://")):
        return "url"
    if low.startswith("file://") or ref.startswith("/"):
        return "path"
    return "unknown"


def decode_data_url(ref: str, max_bytes: int, param: str) -> bytes:
    """The bytes of a base64 data URL, size-checked from the base64 length before decoding.

    Raises:
        InputError: 400 not an ``image/*`` base64 data URL or not valid base64; 413 over ``max_bytes``.
    """
    m = _DATA_URL.match(ref[:512])
    if not m:
        raise InputError(400, "invalid_image", "not a data URL (expected data:image/<type>;base64,<data>)", param)
    media, params = m.group(1).strip().lower(), m.group(2).lower()
    if not media.startswith("image/"):
        raise InputError(400, "invalid_image", f"data URL media type {media or 'none'!r} is not an image/* type",
                         param)
    if ";base64" not in params:
        raise InputError(400, "invalid_image", "data URL is not base64-encoded (expected ;base64,)", param)
    payload = ref[m.end():]
    # 4 base64 characters carry 3 bytes: refuse an oversized image before decoding a byte of it
    if (len(payload) // 4) * 3 > max_bytes + 3:
        raise InputError(413, "image_too_large", f"image is about {(len(payload) // 4) * 3} bytes; the limit is "
                         f"{max_bytes} bytes (serve.max_image_bytes)", param)
    try:
        data = base64.b64decode(_WS.sub(b"", payload.encode("ascii")), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise InputError(400, "invalid_image", "image data is not valid base64", param) from None
    if not data:
        raise InputError(400, "invalid_image", "image is empty (0 bytes)", param)
    if len(data) > max_bytes:
        raise InputError(413, "image_too_large", f"image is {len(data)} bytes; the limit is {max_bytes} bytes "
                         "(serve.max_image_bytes)", param)
    return data


def _port(parts: Any) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def url_allowed(url: str, allow: tuple[str, ...]) -> bool:
    """Whether ``url`` starts with one of the ``allow`` prefixes: same scheme, host (case-insensitive) and port, and
    its path under the prefix's path. A path with a ``..`` segment (also percent-encoded) or credentials in the
    URL is never allowed."""
    try:
        parts = urlsplit(url)
        port = _port(parts)
    except ValueError:  # e.g. a port that is not a number
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return False
    path = unquote(parts.path) or "/"
    if ".." in path.split("/") or "\\" in path:
        return False
    for prefix in allow:
        p = urlsplit(prefix)
        if (p.scheme, (p.hostname or "").lower(), _port(p)) != (parts.scheme, parts.hostname.lower(), port):
            continue
        base = p.path or "/"
        if path == base or path.startswith(base if base.endswith("/") else base + "/"):
            return True
    return False


def _address_refused(addr: str) -> str | None:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if str(ip) in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "not a unicast address"
    return None


def check_host(host: str, port: int, param: str) -> None:
    """Refuse a host whose resolved addresses include a link-local, metadata, multicast or unspecified one.

    Loopback and private addresses are allowed: the host was listed by the operator. (The check runs before the
    connection; a DNS answer that changes in between is not caught: list hosts whose DNS you control.)

    Raises:
        InputError: 403 refused address; 400 the host does not resolve.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise InputError(400, "image_unreachable", f"image URL host {host!r} does not resolve ({e})", param) from None
    for info in infos:
        why = _address_refused(str(info[4][0]))
        if why:
            raise InputError(403, "image_source_forbidden", f"image URL host {host!r} resolves to {why}; the service "
                             "never fetches those", param)


def fetch_url(url: str, settings: ServeSettings, param: str) -> bytes:
    """GET an allow-listed image URL (redirects followed by hand, each hop re-checked), at most
    ``settings.max_image_bytes`` bytes. Synchronous: call it in a worker thread.

    Raises:
        InputError: 403 outside ``allow_urls`` (or a redirect out of it, or a refused address); 413 too large;
            400 unreachable, an HTTP error status, or too many redirects.
    """
    import httpx

    if not settings.allow_urls:
        raise InputError(403, "image_source_forbidden", "image URLs are not accepted by this service "
                         "(serve.allow_urls is empty): send the image inline as a base64 data URL", param)
    limit = settings.max_image_bytes
    # trust_env=False: no proxy from the service's environment may carry the fetch elsewhere
    with httpx.Client(follow_redirects=False, timeout=settings.url_timeout_s, trust_env=False) as client:
        for hop in range(settings.max_redirects + 1):
            if not url_allowed(url, settings.allow_urls):
                where = "redirect target" if hop else "image URL"
                raise InputError(403, "image_source_forbidden", f"{where} {url[:200]!r} is not under an allowed "
                                 "prefix (serve.allow_urls)", param)
            parts = urlsplit(url)
            check_host(parts.hostname or "", _port(parts), param)
            try:
                with client.stream("GET", url) as r:
                    if r.is_redirect:
                        loc = r.headers.get("location")
                        if not loc:
                            raise InputError(400, "image_unreachable", f"redirect without a Location ({url[:200]})",
                                             param)
                        url = urljoin(url, loc)
                        continue
                    if r.status_code != 200:
                        raise InputError(400, "image_unreachable", f"image URL answered HTTP {r.status_code}", param)
                    declared = r.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > limit:
                        raise InputError(413, "image_too_large", f"image is {declared} bytes; the limit is {limit} "
                                         "bytes (serve.max_image_bytes)", param)
                    buf = bytearray()
                    for chunk in r.iter_bytes():
                        buf += chunk
                        if len(buf) > limit:
                            raise InputError(413, "image_too_large", f"image is over the limit of {limit} bytes "
                                             "(serve.max_image_bytes)", param)
                    return bytes(buf)
            except httpx.HTTPError as e:
                raise InputError(400, "image_unreachable", f"could not fetch the image URL: {type(e).__name__}",
                                 param) from None
    raise InputError(400, "image_unreachable", f"more than {settings.max_redirects} redirects (serve.max_redirects)",
                     param)


def read_path(ref: str, settings: ServeSettings, param: str) -> bytes:
    """Read an image file named by an absolute path (or ``file://`` URL) under ``settings.allow_paths``.

    The path is resolved (symlinks, ``..``) first; the allow-list check comes before any existence check, so the
    answer never tells whether a file outside the roots exists.

    Raises:
        InputError: 403 outside ``allow_paths``; 413 over ``max_image_bytes`` (from ``stat``); 400 not a file.
    """
    if not settings.allow_paths:
        raise InputError(403, "image_source_forbidden", "image paths are not accepted by this service "
                         "(serve.allow_paths is empty): send the image inline as a base64 data URL", param)
    raw = unquote(urlsplit(ref).path) if ref[:7].lower() == "file://" else ref
    if "\x00" in raw or not os.path.isabs(raw):
        raise InputError(400, "invalid_image", "an image path must be absolute", param)
    real = Path(os.path.realpath(raw))
    roots = [Path(os.path.realpath(r)) for r in settings.allow_paths]
    if not any(real == r or r in real.parents for r in roots):
        raise InputError(403, "image_source_forbidden", "image path is not under an allowed folder "
                         "(serve.allow_paths)", param)
    try:
        st = real.stat()
        if not real.is_file():
            raise InputError(400, "invalid_image", "image path is not a file", param)
        if st.st_size > settings.max_image_bytes:
            raise InputError(413, "image_too_large", f"image is {st.st_size} bytes; the limit is "
                             f"{settings.max_image_bytes} bytes (serve.max_image_bytes)", param)
        with real.open("rb") as f:
            data = f.read(settings.max_image_bytes + 1)
    except FileNotFoundError:
        raise InputError(400, "invalid_image", "image file not found", param) from None
    except OSError as e:
        raise InputError(400, "invalid_image", f"image file unreadable ({e.strerror or type(e).__name__})",
                         param) from None
    if len(data) > settings.max_image_bytes:
        raise InputError(413, "image_too_large", f"image is over the limit of {settings.max_image_bytes} bytes",
                         param)
    return data


def load_image_bytes(ref: Any, settings: ServeSettings, param: str) -> bytes:
    """The encoded bytes of an image reference (data URL, allow-listed URL or path); size-checked, not decoded.
    Synchronous (may fetch a URL): call it in a worker thread.

    Raises:
        InputError: see :func:`decode_data_url`, :func:`fetch_url`, :func:`read_path`; 422 when ``ref`` is not a
            string.
    """
    if not isinstance(ref, str):
        raise InputError(422, "invalid_request", f"expected a string (a base64 data URL, or an allow-listed URL or "
                         f"path), got {type(ref).__name__}", param)
    kind = image_kind(ref)
    if kind == "data":
        return decode_data_url(ref, settings.max_image_bytes, param)
    if kind == "url":
        return fetch_url(ref, settings, param)
    if kind == "path":
        return read_path(ref, settings, param)
    raise InputError(400, "invalid_image", "image must be a data URL (data:image/<type>;base64,...), an http(s) "
                     "URL or an absolute path", param)


def check_pixels(data: bytes, max_pixels: int, param: str) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels (PIL reads the header only; no pixel
    is decoded). Bytes PIL cannot identify pass through: the decoder names what is wrong with them.

    Raises:
        InputError: 413 too many pixels.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError:
        raise InputError(413, "image_too_large", "image declares more pixels than the decoder allows",
                         param) from None
    except Exception:  # noqa: BLE001 - not identifiable here: prepare_image gives the reason
        return
    if w * h > max_pixels:
        raise InputError(413, "image_too_large", f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} "
                         "(serve.max_image_pixels)", param)


def decode_image(data: bytes, policy: ImagePolicy, max_pixels: int, param: str) -> Image.Image:
    """Checked bytes -> the judge's RGB image via :func:`rms_ray.judge.scorer.prepare_image` (evaluate's decoder).

    Raises:
        InputError: 413 over ``max_pixels`` (header) or a decompression bomb; 400 not an image, corrupt,
            truncated, too small, unsupported format.
    """
    from rms_ray.judge.scorer import prepare_image

    check_pixels(data, max_pixels, param)
    img, err = prepare_image(data, "", policy)
    if img is None:
        reason = (err or "").split(":")[1].strip() if err and err.count(":") >= 1 else ""
        status = 413 if reason == "decompression_bomb" else 400
        raise InputError(status, "invalid_image" if status == 400 else "image_too_large", err or "image: unreadable",
                         param)
    return img


def load_image(ref: Any, settings: ServeSettings, policy: ImagePolicy, param: str) -> Image.Image:
    """:func:`load_image_bytes` then :func:`decode_image`: an untrusted reference to the judge's RGB image."""
    return decode_image(load_image_bytes(ref, settings, param), policy, settings.max_image_pixels, param)


def to_data_url(data: bytes) -> str:
    """Encode image bytes as a base64 data URL (media type from the magic bytes; the service checks the content
    itself, not this type)."""
    mime = "image/png"
    if data[:3] == b"\xff\xd8\xff":
        mime = "image/jpeg"
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        mime = "image/gif"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    elif data[:2] == b"BM":
        mime = "image/bmp"
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        mime = "image/tiff"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
