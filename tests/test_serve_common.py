"""Shared pieces of the `wings serve` tests: tiny models whose answers differ from prompt to prompt, image data
URLs, a server on a free loopback port in a background thread. Also the guard on transformers' internals."""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("fastapi", reason="wings serve needs the serve extra: pip install -e '.[serve]'")

from wings.builder import save  # noqa: E402
from wings.serving import BackgroundServer, ServedModel, Server, ServerOptions, ServingPolicy, create_app  # noqa: E402


def varied_model(make_tiny, seed: int = 1, **kw):
    """A tiny model whose greedy answers depend on the prompt and image (default-init tiny models repeat one
    token whatever they are asked, which would hide rows being mixed up), with active learners and router."""
    from conftest import randomize_wings_

    model, processor = make_tiny(seed=seed, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.language_model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    if kw.get("mode", "wings") == "wings":
        randomize_wings_(model, std=0.3, seed=seed)
    return model.eval(), processor


@pytest.fixture(scope="session")
def wings_pair(make_tiny):
    return varied_model(make_tiny, seed=1)


@pytest.fixture(scope="session")
def llava_pair(make_tiny):
    return varied_model(make_tiny, seed=2, mode="llava")


@pytest.fixture(scope="session")
def wings_dir(wings_pair, tmp_path_factory):
    return save(*wings_pair, tmp_path_factory.mktemp("serve_wings"))


@pytest.fixture(scope="session")
def image_files():
    import easy_vqa

    paths = easy_vqa.get_test_image_paths()
    return [paths[i] for i in range(8)]


def data_url(path_or_bytes, mime: str = "image/png") -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="session")
def image_urls(image_files):
    return [data_url(p) for p in image_files]


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming `width` x `height` pixels, a few hundred bytes long (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def png_bytes(size=(8, 8), colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def user(text: str, *images: str) -> list[dict]:
    """One user message: image parts (data URLs) first, then the text."""
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


@contextlib.contextmanager
def running(pairs: list[tuple[str, tuple]], compare: bool = False, policy: ServingPolicy | None = None, **options):
    """A server for `(name, (model, processor))` pairs on 127.0.0.1:<free port>; yields (url, Server)."""
    models = [ServedModel(name, model, processor, policy) for name, (model, processor) in pairs]
    server = Server(models, ServerOptions(**options), compare=compare)
    with BackgroundServer(create_app(server)) as http:
        yield http.url, server


def test_transformers_serving_internals_unchanged():
    """Fails loudly when the pinned transformers changes the serving code wings reaches into."""
    import transformers

    from wings.serving.hf_compat import PINNED_TRANSFORMERS, check_serving_internals

    assert transformers.__version__ == PINNED_TRANSFORMERS, (
        f"transformers {transformers.__version__} is installed but src/wings/serving/hf_compat.py was checked "
        f"against {PINNED_TRANSFORMERS}: re-check it, then update PINNED_TRANSFORMERS"
    )
    check_serving_internals()


def start_clients(call: Callable[[int], object], n: int) -> tuple[list[threading.Thread], dict]:
    """n client threads, started: thread i stores call(i) in results[i] (read after joining them)."""
    results: dict = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, call(i))) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def wait_until(condition: Callable[[], bool], seconds: float, poll: float = 0.01) -> None:
    """Poll `condition` until it holds or `seconds` pass (the caller asserts what it needs afterwards)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(poll)
