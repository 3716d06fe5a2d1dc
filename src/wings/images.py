"""One way to turn an image *source* into a decoded RGB `PIL.Image`, with limits checked before allocating.

Every command and the server load images through `open_image`: a file path, a `data:image/...;base64,` URL,
raw bytes, an already open PIL image or (only when the caller's policy allows it) an http(s) URL. The size
limits are checked on the header, before any pixel is decoded, so a 372-byte PNG that claims 100000 x 100000
pixels is refused instead of allocating tens of gigabytes. Problems raise `ImageError` (a `ValueError`)
naming the source and what is wrong; `reason` is a short code that data reports count by.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

REMOTE_SCHEMES = ("http://", "https://")


@dataclass(frozen=True)
class ImageLimits:
    """Refuse sources beyond these sizes (checked before decoding).

    max_bytes: encoded size of a file / data URL / download.
    max_pixels: width * height of the decoded image (64 Mpx, about 8192 x 8192, by default; PIL's own
        decompression-bomb error sits at 179 Mpx).
    max_aspect_ratio: long side / short side; a 100000 x 1 strip is no picture, and padding it to a square
        would allocate 10^10 pixels.
    """

    max_bytes: int = 64 * 2**20
    max_pixels: int = 64 * 2**20
    max_aspect_ratio: float = 100.0


@dataclass(frozen=True)
class SourcePolicy:
    """Which kinds of source a caller accepts.

    allow_paths: local files (and `file://` URLs); with `path_root` set, only files under that folder.
    allow_remote: http(s) URLs (fetched with `remote_timeout` seconds and the byte limit).
    """

    allow_paths: bool = True
    path_root: Path | None = None
    allow_remote: bool = False
    remote_timeout: float = 10.0


DEFAULT_LIMITS = ImageLimits()
LOCAL_ONLY = SourcePolicy()


class ImageError(ValueError):
    """A source that cannot be used as an image. `reason` is one of: missing, not_a_file, not_allowed,
    too_large, too_many_pixels, bad_aspect_ratio, unreadable."""

    def __init__(self, source: str, problem: str, reason: str):
        super().__init__(f"image {source}: {problem}")
        self.source = source
        self.reason = reason


def describe(source: object) -> str:
    """A short name for messages: the path, the URL, or the kind and size of an inline source."""
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height}>"
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, str) and source.startswith("data:"):
        return f"<data URL, {len(source)} characters>"
    text = str(source)
    return text if len(text) <= 200 else text[:200] + "..."


def check_size(width: int, height: int, name: str, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """Refuse dimensions beyond `limits` (before anything of that size is allocated)."""
    if width < 1 or height < 1:
        raise ImageError(name, f"has no pixels ({width}x{height})", "unreadable")
    if width * height > limits.max_pixels:
        raise ImageError(name, f"is {width}x{height} = {width * height:,} pixels, over the limit of "
                               f"{limits.max_pixels:,}", "too_many_pixels")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageError(name, f"is {width}x{height}, an aspect ratio of {ratio:.0f}:1, over the limit of "
                               f"{limits.max_aspect_ratio:g}:1", "bad_aspect_ratio")


def open_image(source: object, limits: ImageLimits = DEFAULT_LIMITS, policy: SourcePolicy = LOCAL_ONLY) -> Image.Image:
    """Decode `source` fully to RGB (EXIF orientation applied), or raise `ImageError` naming it."""
    name = describe(source)
    if isinstance(source, Image.Image):
        check_size(source.width, source.height, name, limits)
        return _to_rgb(source, name)
    if isinstance(source, (bytes, bytearray)):
        return _decode(bytes(source), name, limits)
    if isinstance(source, os.PathLike):
        return _from_path(Path(source), name, limits, policy)
    if not isinstance(source, str):
        raise ImageError(name, f"is a {type(source).__name__}; expected a path, a data URL, bytes or a PIL image",
                         "unreadable")
    if source.startswith("data:"):
        return _decode(_data_url_bytes(source, name, limits), name, limits)
    if source.startswith(REMOTE_SCHEMES):
        if not policy.allow_remote:
            raise ImageError(name, "http(s) image URLs are not allowed here", "not_allowed")
        return _decode(_download(source, name, limits, policy.remote_timeout), name, limits)
    if source.startswith("file://"):
        source = urllib.request.url2pathname(source[len("file://"):])
    return _from_path(Path(source), name, limits, policy)


def _from_path(path: Path, name: str, limits: ImageLimits, policy: SourcePolicy) -> Image.Image:
    if not policy.allow_paths:
        raise ImageError(name, "local image paths are not allowed here", "not_allowed")
    try:
        return _read_path(path, name, limits, policy)
    except (OSError, ValueError, RuntimeError) as err:  # a NUL byte, a name too long, a symlink loop, ...
        if isinstance(err, ImageError):
            raise
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ImageError(name, f"is not a usable file path ({reason})", "missing") from None


def _read_path(path: Path, name: str, limits: ImageLimits, policy: SourcePolicy) -> Image.Image:
    if policy.path_root is not None:
        root = Path(policy.path_root).resolve()
        if not path.resolve().is_relative_to(root):
            raise ImageError(name, f"is outside the allowed image folder {root}", "not_allowed")
    if not path.exists():
        raise ImageError(name, "does not exist", "missing")
    if not path.is_file():
        raise ImageError(name, "is not a file", "not_a_file")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ImageError(name, f"is {size:,} bytes, over the limit of {limits.max_bytes:,}", "too_large")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(name, f"cannot be read ({err.strerror or err})", "unreadable") from None
    return _decode(data, name, limits)


def _data_url_bytes(url: str, name: str, limits: ImageLimits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageError(name, "is not a base64 image data URL (data:image/<type>;base64,...)", "unreadable")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ImageError(name, f"holds more than the limit of {limits.max_bytes:,} bytes", "too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(name, f"has invalid base64 data ({err})", "unreadable") from None


def _download(url: str, name: str, limits: ImageLimits, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (scheme checked above)
            data = response.read(limits.max_bytes + 1)
    except (OSError, ValueError, http.client.HTTPException) as err:  # ValueError: a malformed URL or port
        raise ImageError(name, f"cannot be fetched ({type(err).__name__}: {err})", "unreadable") from None
    if len(data) > limits.max_bytes:
        raise ImageError(name, f"is over the limit of {limits.max_bytes:,} bytes", "too_large")
    return data


def _decode(data: bytes, name: str, limits: ImageLimits) -> Image.Image:
    if len(data) > limits.max_bytes:
        raise ImageError(name, f"is {len(data):,} bytes, over the limit of {limits.max_bytes:,}", "too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            image = Image.open(io.BytesIO(data))  # reads the header only
            check_size(image.width, image.height, name, limits)
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "cannot be decoded as an image (not a format PIL recognises)", "unreadable") from None
    except Image.DecompressionBombError as err:
        raise ImageError(name, f"claims too many pixels, over the limit of {limits.max_pixels:,} ({err})",
                         "too_many_pixels") from None
    except Exception as err:  # noqa: BLE001  PIL raises OSError, SyntaxError, ValueError, struct.error... on bad data
        raise ImageError(name, f"cannot be decoded as an image ({type(err).__name__}: {err})", "unreadable") from None
    return _to_rgb(image, name)


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:  # noqa: BLE001  (a broken EXIF block or palette)
        raise ImageError(name, f"cannot be converted to RGB ({type(err).__name__}: {err})", "unreadable") from None
