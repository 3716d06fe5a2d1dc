"""`wings.images.open_image`: every source kind, and limits checked before any pixel is allocated."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from wings.images import ImageError, ImageLimits, SourcePolicy, open_image
from wings.processing import PAD_MAX_SIDE, pad_to_square


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` (its pixel data is a few bytes: decoding would fail)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def red(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (12, 8), (255, 0, 0)).save(path)
    return path


def test_every_source_kind_gives_the_same_rgb_image(red):
    data = red.read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    images = [open_image(red), open_image(str(red)), open_image(f"file://{red}"), open_image(data),
              open_image(url), open_image(Image.open(red).convert("P"))]
    for image in images:
        assert image.mode == "RGB" and image.size == (12, 8)
        assert image.getpixel((3, 3)) == (255, 0, 0)


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(20000, 20000))
    assert bomb.stat().st_size < 200
    with pytest.raises(ImageError, match=r"bomb.png: claims too many pixels.*400000000 pixels") as err:
        open_image(bomb)  # PIL's own bomb error, raised while reading the header
    assert err.value.reason == "too_many_pixels"
    mid = tmp_path / "mid.png"  # under PIL's limit, over ours: refused before decoding
    mid.write_bytes(png_claiming(10000, 10000))
    with pytest.raises(ImageError, match=r"mid.png: is 10000x10000 = 100,000,000 pixels") as err:
        open_image(mid)
    assert err.value.reason == "too_many_pixels"


def test_extreme_aspect_ratio_is_refused(tmp_path):
    strip = tmp_path / "strip.png"
    strip.write_bytes(png_claiming(100000, 1))
    with pytest.raises(ImageError, match="aspect ratio of 100000:1") as err:
        open_image(strip)
    assert err.value.reason == "bad_aspect_ratio"


def test_limits_are_configurable(red):
    with pytest.raises(ImageError, match="over the limit of 50"):
        open_image(red, ImageLimits(max_pixels=50))
    with pytest.raises(ImageError, match="bytes, over the limit") as err:
        open_image(red, ImageLimits(max_bytes=10))
    assert err.value.reason == "too_large"


@pytest.mark.parametrize("source, reason, message", [
    ("data:text/plain;base64,aGk=", "unreadable", "not a base64 image data URL"),
    ("data:image/png;base64,@@@@", "unreadable", "invalid base64"),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "unreadable", "cannot be decoded"),
    ("http://127.0.0.1:9/x.png", "not_allowed", "http\\(s\\) image URLs are not allowed"),
    (12, "unreadable", "is a int"),
])
def test_bad_sources_name_the_problem(source, reason, message):
    with pytest.raises(ImageError, match=message) as err:
        open_image(source)
    assert err.value.reason == reason


def test_paths_missing_directories_truncated_and_policy(tmp_path, red):
    with pytest.raises(ImageError, match="nope.png: does not exist"):
        open_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is not a file"):
        open_image(tmp_path)
    truncated = tmp_path / "cut.png"
    big = Image.effect_noise((64, 64), 50).convert("RGB")
    truncated.write_bytes(png_bytes(big)[:300])
    with pytest.raises(ImageError, match="cut.png: cannot be decoded"):
        open_image(truncated)
    with pytest.raises(ImageError, match="not allowed"):
        open_image(red, policy=SourcePolicy(allow_paths=False))
    inside = SourcePolicy(path_root=tmp_path / "allowed")
    with pytest.raises(ImageError, match="outside the allowed image folder"):
        open_image(red, policy=inside)
    (tmp_path / "allowed").mkdir()
    with pytest.raises(ImageError, match="outside the allowed image folder"):
        open_image(tmp_path / "allowed" / ".." / "red.png", policy=inside)


def test_pad_to_square_bounds_the_canvas():
    wide = Image.new("RGB", (PAD_MAX_SIDE * 2, 40), (0, 255, 0))
    padded = pad_to_square(wide, (0, 0, 0))
    assert padded.size == (PAD_MAX_SIDE, PAD_MAX_SIDE)
    small = Image.new("RGB", (30, 10), (0, 255, 0))
    assert pad_to_square(small, (0, 0, 0)).size == (30, 30)
