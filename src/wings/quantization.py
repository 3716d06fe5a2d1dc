"""Quantized weights for inference: the LLM's linear layers in 8-bit (LLM.int8) or 4-bit NF4, through bitsandbytes
and transformers' `from_pretrained(quantization_config=...)`.

Quantizers replace every `nn.Linear` they are not told to skip, and a Wings model's learners, router, projector and
vision tower are small next to the LLM but decide what the model does with images (and the router reads its
`linear.weight` directly): `wings_skip_modules` keeps them, and the LM head, in the loading dtype. What stays
unquantized is named per kind of model: the composed model's `vision_tower` / `projector`, a stock family's vision
encoder and connector (wings.vlm.registry), and the learners under every `self_attn` (`.visual`, `.textual`,
`.router`) in both.

    wings chat MODEL_DIR --quantize nf4
    load_model(path, quantize="int8")
    load_model(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))

A `quantization_config` whose skip list is unset gets the Wings one; a list given is used as it is.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from typing import Any

import torch
from torch import nn

METHODS = ("int8", "nf4")
INSTALL_HINT = "pip install 'wings-mllm[quantize]'"
# Device types bitsandbytes 0.50.2 ships kernels for, per method: its backends register 4-bit kernels for
# cpu/cuda/xpu/mps and the int8 matmul for cpu/cuda/xpu (`bitsandbytes/backends/*/ops.py`).
KERNELS = {"int8": ("cpu", "cuda", "xpu"), "nf4": ("cpu", "cuda", "xpu", "mps")}
# Learner and router modules, wherever the decoder sits (`language_model.model.layers.3.self_attn.visual`, ...):
# transformers matches a pattern as a regex from the start of the module name (quantizers_utils.should_convert_module).
LEARNERS = r".*\.self_attn\.(?:visual|textual|router)"
LM_HEAD = "lm_head"  # matched as a suffix; tied to the input embeddings in many LLMs, which are never quantized


class QuantizationError(ValueError):
    """A quantized load that cannot run here (method, backend, device, combination); the message is one line."""


def backend_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def wings_skip_modules(model_type: str | None) -> list[str]:
    """Module name patterns kept unquantized for a model of this `config.json` model_type: the learners and router,
    the vision encoder, the projector and the LM head."""
    if model_type == "wings":
        return [LEARNERS, "vision_tower", "projector", LM_HEAD]
    from .vlm.registry import arch_for

    arch = arch_for(model_type)
    return [LEARNERS, *arch.vision, *arch.projector, LM_HEAD]


def bnb_config(method: str, model_type: str | None, dtype: torch.dtype | None = None):
    """The `BitsAndBytesConfig` of `--quantize METHOD`: int8 (LLM.int8 with its default outlier threshold) or NF4
    (double quantization off: it saves ~0.4 bit/parameter at a second dequantization per matmul), computing in
    `dtype` (fp32 when unset), with the Wings parts skipped."""
    from transformers import BitsAndBytesConfig

    skip = wings_skip_modules(model_type)
    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if method == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=dtype or torch.float32, llm_int8_skip_modules=skip)
    raise QuantizationError(f"--quantize must be one of {', '.join(METHODS)}, got {method!r}")


def with_wings_skips(config: Any, model_type: str | None) -> Any:
    """A copy of a user's quantization config with the Wings skip list filled in where the config leaves it unset
    (`llm_int8_skip_modules` for bitsandbytes, `modules_to_not_convert` for the others)."""
    config = copy.deepcopy(config)
    for field in ("llm_int8_skip_modules", "modules_to_not_convert"):
        if hasattr(config, field):
            if getattr(config, field) is None:
                setattr(config, field, wings_skip_modules(model_type))
            break
    return config


def _method_of(config: Any) -> str | None:
    """"int8" / "nf4" / "fp4" for a bitsandbytes config, None for other quantizers (not checked here)."""
    if type(config).__name__ != "BitsAndBytesConfig":
        return None
    if config.load_in_8bit:
        return "int8"
    return config.bnb_4bit_quant_type if config.load_in_4bit else None


def check_backend(config: Any, device: torch.device) -> None:
    """Refuse, in one line, a bitsandbytes load that cannot run: the package missing, or no kernel for the device."""
    method = _method_of(config)
    if method is None:
        return
    if not backend_available():
        raise QuantizationError(f"{method} weights need bitsandbytes, which is not installed: {INSTALL_HINT}")
    kernels = KERNELS["int8" if method == "int8" else "nf4"]
    if device.type not in kernels:
        raise QuantizationError(f"bitsandbytes has no {method} kernels for device {device.type!r} "
                                f"(it has them for {', '.join(kernels)}); drop --quantize or pick another --device")
    quiet_backend()


def quiet_backend() -> None:
    """bitsandbytes logs on every int8 matmul of fp32/bf16 inputs that it casts them to fp16 (by design: LLM.int8
    quantizes fp16 activations), and on import, on CPUs with AVX512-BF16, that its optional hub kernel is missing;
    neither is actionable, and a chat's stderr is for the conversation."""
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)


def loading_kwargs(model_type: str | None, quantize: str | None, quantization_config: Any,
                   dtype: torch.dtype | None, device: torch.device | str | None) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for a quantized load on `device` (auto: CUDA when present, else CPU):
    the config (built from `quantize`, or the user's with the Wings skips filled in) and a one-device map."""
    if quantize is not None and quantization_config is not None:
        raise QuantizationError("give either quantize or quantization_config, not both")
    if quantize is not None:
        config = bnb_config(quantize, model_type, dtype)
    else:
        config = with_wings_skips(quantization_config, model_type)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    check_backend(config, device)
    return {"quantization_config": config, "device_map": {"": device}}


def after_load(model: nn.Module) -> nn.Module:
    """Fix-ups a quantized model needs before it runs; returns the model.

    On CPUs with AVX512-BF16, bitsandbytes 0.50.2 repacks an NF4 layer for its fused CPU kernel at the first
    forward, which assumes out_features % 32 == 0 and in_features % blocksize == 0 (`_convert_weight_packed_for_cpu`)
    and fails on other shapes (small test models); those layers keep the dequantizing path instead."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and getattr(module, "support_avx512bf16_for_cpu", False):
            blocksize = getattr(module.weight, "blocksize", 64)
            if module.out_features % 32 or module.in_features % blocksize:
                module.support_avx512bf16_for_cpu = False
    return model


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """Module name -> class name of every quantized linear layer (bitsandbytes' `Linear8bitLt` / `Linear4bit`)."""
    return {name: type(module).__name__ for name, module in model.named_modules()
            if type(module).__name__ in ("Linear8bitLt", "Linear4bit")}

