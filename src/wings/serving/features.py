"""An LRU cache of projected image features keyed by the image's hash, so a repeated image is not re-encoded.

The key is the sha256 of the decoded image (mode, size and pixel bytes, `image_hash`), taken when a request is
prepared. Features are computed one prompt at a time (a prompt's images together, as the model's own image path
batches them), so what a row gets never depends on which other requests share its prefill. Entries are counted
in images; `capacity=0` turns the cache off.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..prompting import Prompt
    from .batch import ModelRunner


def image_hash(image) -> str:
    """sha256 of a PIL image's pixels (with its mode and size: equal bytes of another shape are another image)."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class FeatureCache:
    """hash -> projected features of one image [tokens, d], least recently used evicted first."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # the scheduler thread writes; /metrics and stats read
        self.hits = 0
        self.misses = 0
        self.unsupported = False  # this model's image features do not split per image

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: str, feats: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[key] = feats
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def features_for(self, runner: ModelRunner, prompts: list[Prompt],
                     hashes: list[list[str]]) -> list[torch.Tensor] | None:
        """Every image's features of a prefill batch, in order (cached ones reused, the others computed per prompt
        and kept); None when the cache is off or this model's features cannot be split per image."""
        if self.capacity <= 0 or self.unsupported:
            return None
        out: list[torch.Tensor] = []
        for prompt, keys in zip(prompts, hashes, strict=True):
            if not keys:
                continue
            found = [self.get(k) for k in keys]
            if all(f is not None for f in found):
                self.hits += len(keys)
                out.extend(found)
                continue
            feats = runner.encode_images(prompt)
            if feats is None or len(feats) != len(keys):
                self.unsupported = True
                return None
            self.misses += len(keys)
            for key, f in zip(keys, feats, strict=True):
                self.put(key, f)
            out.extend(feats)
        return out
