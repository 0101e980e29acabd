"""Turning what a request names as an image into a checked ``PIL.Image``, and its content hash.

A request may give a ``PIL.Image`` (offline API), raw bytes, a ``data:image/...;base64,`` URL,
or, only when the engine allows a local directory (``--allowed-local-media-path``, vLLM's
spelling), a ``file://`` URL inside it. Remote ``http(s)://`` URLs are refused with a message
saying they are not supported yet. Every failure is a ``ValueError`` naming the image (its
index in the request) and what is wrong: not decodable, too many bytes, too many pixels.

The content hash is over the decoded pixels (mode, size, bytes), so the same picture sent as
PNG or as a ``PIL.Image`` is the same image for the prefix cache.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

# An encoded image larger than this is refused before decoding.
MAX_IMAGE_BYTES = 20 * 2**20
# Decoded size limit (width * height): a decompression bomb is refused before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192


def _decode(data: bytes, what: str) -> Any:
    from PIL import Image

    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{what} has {len(data)} bytes; at most {MAX_IMAGE_BYTES} are accepted.")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"{what} is {w}x{h} pixels; at most {MAX_IMAGE_PIXELS} pixels are accepted."
            )
        img.load()
    except ValueError:
        raise
    except Exception as e:  # PIL raises many types for broken data
        raise ValueError(f"{what} could not be decoded as an image ({type(e).__name__}).") from e
    return img


def _from_data_url(url: str, what: str) -> Any:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ValueError(f"{what}: a data URL must look like 'data:image/<type>;base64,<data>'.")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ValueError(f"{what} has more than {MAX_IMAGE_BYTES} bytes.")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what}: the data URL is not valid base64.") from e
    return _decode(data, what)


def _from_file_url(url: str, allowed_dir: str | None, what: str) -> Any:
    if not allowed_dir:
        raise ValueError(
            f"{what}: file:// URLs are refused unless the engine allows a directory with "
            "--allowed-local-media-path."
        )
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{what}: a file:// URL must name a local path.")
    path = Path(unquote(parsed.path)).resolve()
    root = Path(os.path.expanduser(allowed_dir)).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{what}: {path} is outside --allowed-local-media-path ({root}).")
    if not path.is_file():
        raise ValueError(f"{what}: {path} is not a file.")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"{what} has more than {MAX_IMAGE_BYTES} bytes.")
    return _decode(path.read_bytes(), what)


def load_image(source: Any, index: int = 0, allowed_local_media_path: str | None = None) -> Any:
    """A decoded RGB ``PIL.Image`` from ``source`` (see the module doc); ValueError otherwise.
    ``index`` is the image's place in its request, for the messages."""
    from PIL import Image

    what = f"Image {index}"
    if isinstance(source, Image.Image):
        w, h = source.size
        if w * h > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"{what} is {w}x{h} pixels; at most {MAX_IMAGE_PIXELS} pixels are accepted."
            )
        img = source
    elif isinstance(source, (bytes, bytearray)):
        img = _decode(bytes(source), what)
    elif isinstance(source, str):
        scheme = source.split(":", 1)[0].lower() if ":" in source else ""
        if scheme == "data":
            img = _from_data_url(source, what)
        elif scheme == "file":
            img = _from_file_url(source, allowed_local_media_path, what)
        elif scheme in ("http", "https"):
            raise ValueError(f"{what}: remote image URLs ({scheme}://) are not supported yet.")
        else:
            raise ValueError(f"{what}: unsupported image URL; use a data:image/...;base64 URL.")
    else:
        raise ValueError(
            f"{what} must be a PIL.Image, bytes or a URL string, got {type(source).__name__}."
        )
    if img.width < 1 or img.height < 1:
        raise ValueError(f"{what} is empty ({img.width}x{img.height}).")
    return img if img.mode == "RGB" else img.convert("RGB")


def image_hash(img: Any) -> bytes:
    """Content hash of a decoded image: its mode, size and pixel bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.digest()
