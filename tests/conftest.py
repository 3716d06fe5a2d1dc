"""Shared fixtures: tiny random models built offline from configs, a locally trained tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import wings  # noqa: E402,F401  (registers the Auto classes)
from wings.builder import TinySpec, build_tiny, save, train_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """One locally trained byte-level BPE (vocab 600) for the whole session (~1 s)."""
    return train_tiny_tokenizer(600)


@pytest.fixture(scope="session")
def make_tiny(tiny_tokenizer):
    """Factory: make_tiny(llm="qwen2", vision="siglip", seed=0, **compose_kwargs) -> (model, processor).

    Each call gets its own copy of the tokenizer (compose may add tokens) and fresh random weights.
    """
    import copy

    def factory(llm: str = "qwen2", vision: str = "siglip", seed: int = 0, spec: TinySpec | None = None, **kw):
        spec = spec or TinySpec(llm=llm, vision=vision)
        return build_tiny(spec, tokenizer=copy.deepcopy(tiny_tokenizer), seed=seed, **kw)

    return factory


@pytest.fixture(scope="session")
def tiny_model_dir(make_tiny, tmp_path_factory):
    """A saved tiny Wings model (Qwen2 + SigLIP, stage-2 parts present, fresh learners) and its processor."""
    model, processor = make_tiny()
    return save(model, processor, tmp_path_factory.mktemp("tiny_wings"))


@pytest.fixture(scope="session")
def tiny_llava_dir(make_tiny, tmp_path_factory):
    model, processor = make_tiny(mode="llava")
    return save(model, processor, tmp_path_factory.mktemp("tiny_llava"))


def randomize_wings_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Give every learner and router weight a random value so the Wings path really changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".visual." in name or ".textual." in name or ".router." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


@pytest.fixture
def randomize():
    return randomize_wings_
