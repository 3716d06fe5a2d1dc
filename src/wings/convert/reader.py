"""Read a checkpoint directory in safetensors form, single file or sharded, with clear errors for broken ones."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..paths import read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _read_file(path: Path, wanted: set[str] | None = None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys()) if wanted is None else [k for k in f.keys() if k in wanted]
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err} (truncated or not a safetensors file?)") from err


def read_safetensors_dir(src: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of `src`: from `model.safetensors.index.json` (every listed shard and key must be there),
    else `model.safetensors`, else the directory's only `*.safetensors` files."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint directory {src} does not exist")
    if not src.is_dir():
        raise ValueError(f"checkpoint {src} is not a directory")
    index_path = src / INDEX_NAME
    if index_path.is_file():
        return _read_sharded(src, index_path)
    if (src / SINGLE_NAME).is_file():
        return _read_file(src / SINGLE_NAME)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src} holds no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        for name, value in _read_file(path).items():
            if name in tensors:
                raise ValueError(f"tensor {name} appears in more than one file of {src} (second: {path.name})")
            tensors[name] = value
    return tensors


def _read_sharded(src: Path, index_path: Path) -> dict[str, torch.Tensor]:
    index = read_json(index_path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path} is not a safetensors index (no valid weight_map)")
    by_file: dict[str, set[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, set()).add(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, names in sorted(by_file.items()):
        path = src / file
        if not path.resolve().is_relative_to(src.resolve()):
            raise ValueError(f"{index_path.name} lists shard {file!r}, which is outside {src}")
        if not path.is_file():
            raise FileNotFoundError(f"{index_path.name} lists shard {file}, which is missing from {src}")
        found = _read_file(path, names)
        missing = sorted(names - found.keys())
        if missing:
            raise ValueError(f"shard {path} lacks {len(missing)} tensors its index lists, e.g. {missing[:3]}")
        tensors.update(found)
    return tensors


def read_config(src: str | Path) -> dict:
    """The checkpoint's config.json as a dict ({} when absent)."""
    path = Path(src) / "config.json"
    if not path.exists():
        return {}
    config = read_json(path, "checkpoint config")
    if not isinstance(config, dict):
        raise ValueError(f"checkpoint config {path} holds a JSON {type(config).__name__}, expected an object")
    return config
