"""Build stage-0 Wings/LLaVA models: from local (or hub) HF checkpoints, or a tiny random preset offline."""

from __future__ import annotations

import os
import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen2Tokenizer,
    Qwen3Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from .configuration import WingsConfig
from .modeling import WingsForConditionalGeneration, inject_learners
from .processing import IMAGE_TOKEN, WingsProcessor

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
TEXT_FAMILIES = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig, "qwen3": Qwen3Config}


def _check_dir(path: str | Path, what: str, kind: str = "any") -> None:
    """Clear errors for local paths (kind of model from config.json, weights whole); anything else is left to
    the hub (which fails fast when offline)."""
    from .model_dir import check_model_dir

    p = Path(os.path.expanduser(str(path)))
    looks_local = p.is_absolute() or str(path).startswith((".", "~")) or os.environ.get("HF_HUB_OFFLINE") == "1"
    if looks_local and not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist")
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {p} is a file, expected a model directory")
    if p.exists():
        check_model_dir(p, what, kind=kind)


def load_vision_encoder(vision_dir: str | Path):
    """A vision *encoder* from a checkpoint that may hold a full CLIP/SigLIP (text + vision) model."""
    _check_dir(vision_dir, "vision encoder directory", kind="vision")
    config = AutoConfig.from_pretrained(vision_dir)
    if config.model_type == "siglip":
        return SiglipVisionModel.from_pretrained(vision_dir)
    if config.model_type == "clip":
        return CLIPVisionModel.from_pretrained(vision_dir)
    return AutoModel.from_pretrained(vision_dir)


def compose(
    llm: torch.nn.Module,
    tokenizer,
    vision: torch.nn.Module,
    image_processor,
    mode: str = "wings",
    rank: int = 64,
    router: str = "position",
    projector: str = "mlp2x_gelu",
    image_pad_mode: str = "pad",
    **config_overrides,
) -> tuple[WingsForConditionalGeneration, WingsProcessor]:
    """Put an LLM (with its tokenizer) and a vision encoder (with its image processor) together.

    Adds `<image>` (and ChatML tokens if missing) to the tokenizer, resizes the LLM's embeddings when needed,
    and injects fresh learners in `mode="wings"` (so the output equals the LLM's until trained).
    """
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or "<|im_end|>"
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = WingsConfig(
        text_config=llm.config.to_dict(),
        vision_config=vision.config.to_dict(),
        image_token_id=image_token_id,
        mode=mode,
        learner_rank=rank,
        router_type=router,
        projector_type=projector,
        **config_overrides,
    )
    llava_config = WingsConfig(**{**config.to_dict(), "mode": "llava"})
    with torch.device("meta"):  # build the shell without allocating; real parts are swapped in below
        model = WingsForConditionalGeneration(llava_config)
    model.language_model, model.vision_tower = llm, vision
    model.projector = _fresh_projector(config)
    model.config = config
    if mode == "wings":
        inject_learners(model.language_model, config)
    model.language_model.config = config.text_config
    model.vision_tower.config = config.vision_config
    processor = WingsProcessor(image_processor, tokenizer, image_seq_length=config.image_seq_length,
                               image_pad_mode=image_pad_mode)
    return model.eval(), processor


def _fresh_projector(config: WingsConfig) -> torch.nn.Module:
    from .modeling.projector import build_projector

    return build_projector(config.projector_type, config.vision_config.hidden_size, config.text_config.hidden_size)


def init_from_pretrained(llm_dir: str | Path, vision_dir: str | Path, **kwargs):
    """`wings init-model --llm LLM_DIR --vision VISION_DIR`: compose from HF checkpoints (local dirs or hub ids)."""
    _check_dir(llm_dir, "LLM directory", kind="causal_lm")
    _check_dir(vision_dir, "vision encoder directory", kind="vision")
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    vision = load_vision_encoder(vision_dir)
    image_processor = AutoImageProcessor.from_pretrained(vision_dir)
    return compose(llm, tokenizer, vision, image_processor, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Tiny random preset: everything built offline in seconds, for tests and the demo.


@dataclass
class TinySpec:
    """Sizes of the tiny preset (defaults: ~0.3M parameters, 16 image tokens of 32x32 images)."""

    llm: str = "qwen2"  # qwen2 | llama | mistral | qwen3
    vision: str = "siglip"  # siglip | clip
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 600
    max_positions: int = 1024
    tie_embeddings: bool = True
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 48
    vision_layers: int = 2


def tiny_corpus(n_random: int = 2000, seed: int = 0) -> list[str]:
    """Text to train a tiny tokenizer on: real easy-vqa questions/answers, numbers and random words."""
    import easy_vqa

    questions, answers, _ = easy_vqa.get_train_questions()
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(n_random)]
    numbers = [f"{a} + {b} = {a + b}" for a in range(40) for b in range(0, 40, 3)]
    chat = ["You are a helpful assistant.", "user", "assistant", "system", "Answer with one word."]
    return list(questions[:6000]) + list(answers[:2000]) + words + numbers + chat * 20


def train_tiny_tokenizer(vocab_size: int = 600, corpus: list[str] | None = None, show_progress: bool = True):
    """A byte-level BPE with Qwen2's pre-tokenizer, trained locally (about a second). `show_progress=False`
    keeps the tokenizers library's own progress output (written straight to the terminal) off."""
    base = Qwen2Tokenizer(vocab={"a": 0}, merges=[])
    tok = base.train_new_from_iterator(corpus or tiny_corpus(), vocab_size=vocab_size, new_special_tokens=CHAT_TOKENS,
                                       show_progress=show_progress)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else "<|im_end|>"
    return tok


def tiny_text_config(spec: TinySpec, vocab_size: int):
    if spec.llm not in TEXT_FAMILIES:
        raise ValueError(f"unknown tiny LLM family {spec.llm!r}; choose from {sorted(TEXT_FAMILIES)}")
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions, tie_word_embeddings=spec.tie_embeddings,
    )
    if spec.llm == "qwen3":
        kwargs["head_dim"] = spec.hidden // spec.heads
    if spec.llm == "mistral":
        kwargs["sliding_window"] = None
    return TEXT_FAMILIES[spec.llm](**kwargs)


def tiny_vision(spec: TinySpec):
    common = dict(image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.vision_hidden,
                  intermediate_size=spec.vision_hidden * 2, num_hidden_layers=spec.vision_layers,
                  num_attention_heads=4)
    size = {"height": spec.image_size, "width": spec.image_size}
    if spec.vision == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(**common)), SiglipImageProcessorPil(size=size)
    if spec.vision == "clip":
        proc = CLIPImageProcessorPil(size={"shortest_edge": spec.image_size}, crop_size=size)
        return CLIPVisionModel(CLIPVisionConfig(**common)), proc
    raise ValueError(f"unknown tiny vision encoder {spec.vision!r}; choose 'siglip' or 'clip'")


def build_tiny(spec: TinySpec | None = None, tokenizer=None, seed: int = 0, **compose_kwargs):
    """A tiny random model + processor (random LLM and encoder, locally trained tokenizer), fully offline."""
    spec = spec or TinySpec()
    tokenizer = tokenizer or train_tiny_tokenizer(spec.vocab)
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_config(tiny_text_config(spec, len(tokenizer)))
    vision, image_processor = tiny_vision(spec)
    compose_kwargs.setdefault("rank", 8)
    return compose(llm, tokenizer, vision, image_processor, **compose_kwargs)


def save(model: WingsForConditionalGeneration, processor: WingsProcessor, out_dir: str | Path,
         overwrite: bool = True) -> Path:
    """Write model + processor to `out_dir` atomically: into a temp folder next to it, renamed into place once
    complete, so a full disk or Ctrl-C never leaves a config.json without weights. An existing model folder there
    is replaced only with `overwrite`; a non-empty folder that holds no model is never replaced."""
    from .atomic import atomic_dir
    from .paths import OutputError, check_output_dir

    out = check_output_dir(out_dir, "output directory", overwrite)
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise OutputError(f"output directory {out} is not empty and holds no model; refusing to replace it")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out
