"""Wings as an adapter: only the learner and router weights, plus a JSON naming the base model and the settings.

    adapter_dir/wings_adapter.json           {"base_model": ..., "base_model_type": "llava", "wings": {...}, ...}
    adapter_dir/wings_adapter.safetensors    the Wings tensors, under the model's own parameter names

What peft users expect of a LoRA: a small directory that goes onto the stock checkpoint it was trained from.
`load_adapter(model, dir)` attaches to a loaded stock model and fills the learners; `from_adapter(dir)` loads the
base named in the JSON first. Both refuse a base of another type or shape, naming the tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_dir
from ..paths import read_json, require_dir
from .attach import attach_settings
from .classes import is_attached
from .registry import arch_for, base_model_type
from .settings import WingsSettings

CONFIG_NAME = "wings_adapter.json"
WEIGHTS_NAME = "wings_adapter.safetensors"
FORMAT = "wings-adapter"
FORMAT_VERSION = 1
WINGS_MARKERS = (".self_attn.visual.", ".self_attn.textual.", ".self_attn.router.")


def wings_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The learner and router tensors of an attached model, by parameter name."""
    return {name: p.detach() for name, p in model.named_parameters() if any(m in name for m in WINGS_MARKERS)}


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write the Wings tensors and `wings_adapter.json` to `out_dir` (atomically: a temp folder, then renamed).
    `base_model`: what the JSON names as the base (default: the path or hub id the model was loaded from)."""
    from safetensors.torch import save_file

    from .. import __version__
    from ..atomic import write_json_atomic

    if not is_attached(model):
        raise ValueError(f"{type(model).__name__} carries no Wings learners: nothing to save as an adapter")
    tensors = {name: t.contiguous().cpu() for name, t in wings_state_dict(model).items()}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "wings_version": __version__,
        "base_model": base_model or getattr(model, "name_or_path", None) or None,
        "base_model_type": base_model_type(model.config.model_type),
        "wings": model.config.wings, "tensors": len(tensors),
        "parameters": int(sum(t.numel() for t in tensors.values())),
    }
    out = Path(out_dir).expanduser()
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_NAME).is_file():
        raise ValueError(f"adapter directory {out} is not empty and holds no Wings adapter; refusing to replace it")
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json_atomic(tmp / CONFIG_NAME, meta)
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    path = require_dir(adapter_dir, "adapter directory")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise ValueError(f"adapter directory {path} has no {CONFIG_NAME}; is it a Wings adapter?")
    meta = read_json(config_file, f"{config_file}:")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{config_file} is not a Wings adapter config (format {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_file}: adapter format version {meta.get('format_version')!r}; this wings reads "
                         f"version {FORMAT_VERSION}")
    WingsSettings.from_dict(meta.get("wings"), f"{config_file} 'wings'")
    return meta


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Attach the adapter's Wings parts to a loaded stock `model` and load their weights (in place)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_adapter_config(adapter_dir)
    model_type = base_model_type(getattr(model.config, "model_type", None))
    arch_for(model_type)  # a clear refusal for an unsupported model
    if meta["base_model_type"] != model_type:
        raise ValueError(f"the adapter in {adapter_dir} was trained on a {meta['base_model_type']!r} model, "
                         f"not a {model_type!r} one")
    weights = Path(adapter_dir).expanduser() / WEIGHTS_NAME
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: cannot read the adapter weights ({' '.join(str(err).split())})") from None
    attach_settings(model, WingsSettings.from_dict(meta["wings"]))
    params = wings_state_dict(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ValueError(f"{weights} does not fit this model's Wings parts ({what}; {len(missing)} missing, "
                         f"{len(unexpected)} unexpected): another base model or settings?")
    with torch.no_grad():
        for name, param in params.items():
            value = tensors[name]
            if value.shape != param.shape:
                raise ValueError(f"{weights}: {name} has shape {tuple(value.shape)} but this model's is "
                                 f"{tuple(param.shape)}: another base model?")
            param.copy_(value.to(param.dtype))
    return model


def from_adapter(adapter_dir: str | Path, base_model: str | Path | None = None, **load_kwargs: Any) -> nn.Module:
    """Load the base named in the adapter's JSON (or `base_model`) with `AutoModelForImageTextToText`, then the
    adapter onto it. `load_kwargs` go to `from_pretrained` (dtype, device_map, ...)."""
    from transformers import AutoModelForImageTextToText

    meta = read_adapter_config(adapter_dir)
    base = base_model or meta.get("base_model")
    if not base:
        raise ValueError(f"the adapter in {adapter_dir} names no base model; pass base_model=")
    model = AutoModelForImageTextToText.from_pretrained(base, **load_kwargs)
    if is_attached(model):
        raise ValueError(f"the base {base} already carries Wings learners; an adapter goes onto the stock model")
    return load_adapter(model, adapter_dir)


__all__ = ["from_adapter", "load_adapter", "read_adapter_config", "save_adapter", "wings_state_dict"]
