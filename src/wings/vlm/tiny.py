"""Tiny random stock VLMs of every supported family, with working processors, built offline in seconds.

For tests, benchmarks and trying the CLI without downloads: `build_tiny_vlm("qwen2_vl")` gives a stock
`Qwen2VLForConditionalGeneration` (~40K parameters, hidden 32, 2 layers) and a processor that expands images the
way the family's real processor does (stock processor classes; those that also want a video processor, which
needs torchvision, get it left out: wings.vlm.processor). `save_tiny_vlm(kind, dir)` writes a directory in the
stock layout (config, weights, tokenizer, image processor, processor config, chat template).
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
from pathlib import Path

import torch

FAMILY_TOKENS = ["<|im_start|>", "<|im_end|>", "<image>", "<video>", "<|image_pad|>", "<|video_pad|>",
                 "<|vision_start|>", "<|vision_end|>", "<fake_token_around_image>", "<global-img>",
                 "<end_of_utterance>", "<img>", "</img>", "<IMG_CONTEXT>"]
GRID_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}

# What each family's chat template writes for an image part (the processor expands it).
PLACEHOLDERS = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "internvl": "<IMG_CONTEXT>"}
for _qwen in ("qwen2_5_vl", "qwen3_vl"):
    PLACEHOLDERS[_qwen] = PLACEHOLDERS["qwen2_vl"]


def chat_template(placeholder: str) -> str:
    """A ChatML template whose image parts render as `placeholder` (real checkpoints ship their own)."""
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{- '" + placeholder + "' -}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


@functools.lru_cache(maxsize=1)
def _base_tokenizer():
    from ..builder import tiny_corpus, train_tiny_tokenizer

    tok = train_tiny_tokenizer(600, corpus=tiny_corpus(), show_progress=False)
    tok.add_special_tokens({"additional_special_tokens": [t for t in FAMILY_TOKENS + GRID_TOKENS
                                                          if t not in tok.get_vocab()]})
    return tok


def tiny_tokenizer(kind: str):
    """The tiny BPE with every family's special tokens (InternVL's tokenizer also names its image tokens)."""
    from transformers import AutoTokenizer

    tok = copy.deepcopy(_base_tokenizer())
    if kind == "internvl":  # as real InternVL checkpoints do: named tokens in tokenizer_config.json
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            path = Path(tmp) / "tokenizer_config.json"
            config = json.loads(path.read_text())
            config["extra_special_tokens"] = INTERNVL_TOKENS
            path.write_text(json.dumps(config))
            tok = AutoTokenizer.from_pretrained(tmp)
    return tok


def _text(tok, **extra) -> dict:
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **extra)


_MROPE = dict(rope_parameters=dict(rope_type="default", mrope_section=[2, 1, 1], rope_theta=10000.0))
_CLIP = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2, image_size=32, patch_size=8)
_QWEN_VISION = dict(depth=1, num_heads=2, patch_size=2, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
_PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def tiny_config(kind: str, tok):
    """The stock config of a tiny `kind` model whose placeholder ids are the tokenizer's."""
    import transformers as tf

    ids = tok.convert_tokens_to_ids
    qwen_ids = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                    vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    if kind == "llava":
        return tf.LlavaConfig(text_config=dict(model_type="llama", **_text(tok)), vision_config=_CLIP,
                              image_token_id=ids("<image>"), vision_feature_layer=-1)
    if kind == "llava_next":
        return tf.LlavaNextConfig(text_config=dict(model_type="llama", **_text(tok)), vision_config=_CLIP,
                                  image_token_id=ids("<image>"), vision_feature_layer=-1,
                                  image_grid_pinpoints=_PINPOINTS)
    if kind == "llava_onevision":
        return tf.LlavaOnevisionConfig(text_config=dict(model_type="qwen2", **_text(tok)), vision_config=_SIGLIP,
                                       image_token_id=ids("<image>"), video_token_id=ids("<video>"),
                                       vision_feature_layer=-1, image_grid_pinpoints=_PINPOINTS)
    if kind == "qwen2_vl":
        return tf.Qwen2VLConfig(text_config=_text(tok, **_MROPE),
                                vision_config=dict(embed_dim=16, hidden_size=32, **_QWEN_VISION), **qwen_ids)
    if kind == "qwen2_5_vl":
        vision = dict(hidden_size=16, intermediate_size=32, out_hidden_size=32, fullatt_block_indexes=[0],
                      window_size=8, **_QWEN_VISION)
        return tf.Qwen2_5_VLConfig(text_config=_text(tok, **_MROPE), vision_config=vision, **qwen_ids)
    if kind == "qwen3_vl":
        rope = dict(rope_type="default", mrope_section=[2, 1, 1], rope_theta=10000.0, mrope_interleaved=True)
        vision = dict(hidden_size=16, intermediate_size=32, out_hidden_size=32, num_position_embeddings=16,
                      deepstack_visual_indexes=[0], **{k: v for k, v in _QWEN_VISION.items() if k != "embed_dim"})
        return tf.Qwen3VLConfig(text_config=_text(tok, head_dim=8, rope_parameters=rope), vision_config=vision,
                                **qwen_ids)
    if kind in ("idefics3", "smolvlm"):
        cls = tf.Idefics3Config if kind == "idefics3" else tf.SmolVLMConfig
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=8)
        return cls(text_config=dict(model_type="llama", **_text(tok)), vision_config=vision,
                   image_token_id=ids("<image>"), scale_factor=2)
    if kind == "internvl":
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=[32, 32], patch_size=[8, 8])
        return tf.InternVLConfig(text_config=dict(model_type="qwen2", **_text(tok)), vision_config=vision,
                                 image_token_id=ids("<IMG_CONTEXT>"), downsample_ratio=0.5)
    from .registry import arch_for

    arch_for(kind)  # refuses unknown types with the supported list
    raise ValueError(f"no tiny preset for {kind!r}")


def tiny_processor(kind: str, tok):
    """The family's processor around the tiny tokenizer (image sizes chosen for few image tokens)."""
    import transformers as tf

    from .processor import images_only

    template = chat_template(PLACEHOLDERS.get(kind, "<image>"))
    square = {"height": 32, "width": 32}
    if kind == "llava":
        image = tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=square)
        return tf.LlavaProcessor(image, tok, patch_size=8, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=template)
    if kind == "llava_next":
        image = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size=square,
                                              image_grid_pinpoints=_PINPOINTS)
        return tf.LlavaNextProcessor(image, tok, patch_size=8, vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1, chat_template=template)
    if kind == "llava_onevision":
        image = tf.LlavaOnevisionImageProcessorPil(size=square, image_grid_pinpoints=_PINPOINTS)
        return images_only(tf.LlavaOnevisionProcessor)(image, tok, None, num_image_tokens=16,
                                                       vision_feature_select_strategy="full", chat_template=template)
    if kind in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        cls = {"qwen2_vl": tf.Qwen2VLProcessor, "qwen2_5_vl": tf.Qwen2_5_VLProcessor,
               "qwen3_vl": tf.Qwen3VLProcessor}[kind]
        # 16 x 16 pixels: an 8 x 8 grid of 2-pixel patches, merged 2 x 2 into 16 tokens
        image = tf.Qwen2VLImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": 16 * 16}, patch_size=2,
                                            merge_size=2, temporal_patch_size=2)
        return images_only(cls)(image, tok, None, chat_template=template)
    if kind in ("idefics3", "smolvlm"):
        image_cls = tf.Idefics3ImageProcessorPil if kind == "idefics3" else tf.SmolVLMImageProcessorPil
        image = image_cls(size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
        if kind == "idefics3":
            return tf.Idefics3Processor(image, tok, image_seq_len=4, chat_template=template)
        return images_only(tf.SmolVLMProcessor)(image, tok, None, image_seq_len=4, chat_template=template)
    if kind == "internvl":
        image = tf.GotOcr2ImageProcessorPil(size=square, crop_to_patches=False)
        return images_only(tf.InternVLProcessor)(image, tok, None, image_seq_length=4, chat_template=template)
    tiny_config(kind, tok)  # the same refusal
    raise ValueError(f"no tiny processor for {kind!r}")


def build_tiny_vlm(kind: str, seed: int = 0):
    """(stock model, processor) of a tiny random `kind` VLM (eval mode, float32)."""
    from transformers import AutoModelForImageTextToText

    tok = tiny_tokenizer(kind)
    config = tiny_config(kind, tok)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    return model.eval(), tiny_processor(kind, tok)


def save_tiny_vlm(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny `kind` VLM directory in the stock layout (what `wings init-model --vlm` reads)."""
    from .processor import save_processor

    model, processor = build_tiny_vlm(kind, seed)
    out = Path(out_dir)
    model.save_pretrained(out)
    save_processor(processor, out)
    return out
