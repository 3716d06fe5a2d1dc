"""`wings convert-official`: a released AIDC-AI/Wings checkpoint -> our HF directory with compat="official".

Route: compose our model from the base LLM (config + tokenizer) and vision encoder directories, with the
structure the checkpoint's key names imply, then load every official tensor by mapped name, checking each
shape. Every official key must be used; every model tensor must come from the checkpoint except those the
released model drops (the vision tower's last encoder layer, its pooling head and post-layernorm), which
keep the --vision values (unused: features are read before them).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from .mapping import LEARNER_RE, VISION_LAYER_RE, OfficialLayout, infer_layout, map_key
from .reader import read_config, read_safetensors_dir

DEFAULT_SYSTEM_PROMPT_LENGTH = 14  # Qwen1.5 ChatML: system turn (11 tokens) + "<|im_start|>user\n" (3)
EMBEDDING_KEYS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")


def build_model(layout: OfficialLayout, official_config: dict, llm_dir, vision_dir):
    from ..builder import init_from_pretrained

    spl = int(official_config.get("system_prompt_length", DEFAULT_SYSTEM_PROMPT_LENGTH))
    lora_dim = official_config.get("lora_dim")
    if lora_dim is not None and int(lora_dim) != layout.rank:
        raise ValueError(f"config.json says lora_dim={lora_dim} but the learner weights have rank {layout.rank}")
    model, processor = init_from_pretrained(
        llm_dir, vision_dir, mode="wings", rank=layout.rank, router="position", projector=layout.projector_type,
        image_pad_mode="pad", compat="official", system_prompt_length=spl, learner_layers=layout.learner_layers,
        use_textual_learner=layout.has_textual and layout.has_router, use_router=layout.has_router,
        router_max_positions=layout.router_width, vision_feature_layer=-2,
    )
    tokens = official_config.get("image_token_length")
    if tokens is not None and int(tokens) != model.config.image_seq_length:
        raise ValueError(f"config.json says image_token_length={tokens} but the vision encoder gives "
                         f"{model.config.image_seq_length} tokens per image")
    return model, processor


def dropped_by_release(key: str, layout: OfficialLayout) -> bool:
    """Model tensors the released checkpoint legitimately lacks (it deleted them from the vision tower)."""
    if not key.startswith("vision_tower."):
        return False
    if (m := VISION_LAYER_RE.search(key)) and int(m.group(1)) >= layout.vision_layers:
        return True
    return ".head." in key or key.startswith("vision_tower.head") or "post_layernorm" in key


def load_official_tensors(model, tensors: dict[str, torch.Tensor], layout: OfficialLayout) -> dict:
    """Copy official tensors into `model` by mapped name; raise on any shape mismatch, unused or missing key."""
    target = model.state_dict()
    model_keys = set(target)
    unused_stage1 = []
    left_over, filled = [], set()
    for name, value in tensors.items():
        key = map_key(name, layout, model_keys)
        if key is None:
            m = LEARNER_RE.match(name)
            if m and m.group(2) == "attn_t_pool" and not layout.has_router:
                unused_stage1.append(name)  # the released stage-1 forward skips the textual learner
            else:
                left_over.append(name)
            continue
        dest = target[key]
        if key in EMBEDDING_KEYS and value.shape[1:] == dest.shape[1:] and value.shape[0] <= dest.shape[0]:
            # The LLM may have grown rows for `<image>` (the released model spliced it in by index instead);
            # the extra rows keep the base values and are never read for image positions.
            with torch.no_grad():
                dest[: value.shape[0]].copy_(value)
        elif value.shape != dest.shape:
            raise ValueError(f"shape mismatch for {name} -> {key}: checkpoint {tuple(value.shape)} vs model "
                             f"{tuple(dest.shape)}")
        else:
            with torch.no_grad():
                dest.copy_(value)
        filled.add(key)
    if left_over:
        raise ValueError(f"{len(left_over)} checkpoint tensors have no place in the model, e.g. {left_over[:5]}")
    missing = sorted(k for k in model_keys - filled if not dropped_by_release(k, layout) and not _tied(model, k))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors the model needs (truncated?), "
                         f"e.g. {missing[:5]}")
    return {
        "loaded": len(filled),
        "kept_from_base": sorted(k for k in model_keys - filled),
        "ignored_stage1_textual": len(unused_stage1),
    }


def _tied(model, key: str) -> bool:
    """True for `lm_head.weight` when the LLM ties it to the (already loaded) input embeddings."""
    return key == "language_model.lm_head.weight" and bool(model.config.tie_word_embeddings)


def checkpoint_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    counts = Counter(t.dtype for t in tensors.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def convert_official(src, out, llm_dir, vision_dir, dtype: str = "auto", overwrite: bool = False) -> dict:
    """Convert, validate and write atomically; returns a summary (also saved as conversion.json)."""
    from ..paths import Output, check_output_dir, guard_outputs

    # Refused before anything is read or deleted: OUT may never be (or contain, or sit inside) an input, and an
    # existing OUT is replaced only with --overwrite.
    guard_outputs([Output("OUT_DIR", Path(out))], [("SRC_DIR", src), ("--llm", llm_dir), ("--vision", vision_dir)])
    out = check_output_dir(out, "output directory", overwrite)
    tensors = read_safetensors_dir(src)
    layout = infer_layout(tensors)
    model, processor = build_model(layout, read_config(src), llm_dir, vision_dir)
    summary = load_official_tensors(model, tensors, layout)
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    target_dtype = checkpoint_dtype(tensors) if dtype == "auto" else names[dtype]
    model.to(target_dtype)
    tokenizer = processor.tokenizer
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.use_cache = False  # the official math cannot be cached (modeling/compat.py)
    summary.update(source=str(src), layout=vars(layout), dtype=str(target_dtype).removeprefix("torch."),
                   system_prompt_length=model.config.system_prompt_length)
    write_atomically(model, processor, summary, out, overwrite)
    return summary


def write_atomically(model, processor, summary: dict, out: Path, overwrite: bool) -> None:
    from ..atomic import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "conversion.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if out.exists() and not overwrite and any(out.iterdir()):
            raise ValueError(f"output directory {out} appeared while converting; not replacing it")
