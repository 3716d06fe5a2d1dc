"""Read a checkpoint directory in safetensors form, single file or sharded, with clear errors for broken ones."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

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
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_path} is not a safetensors index (no valid weight_map): {err}") from err
    by_file: dict[str, set[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, set()).add(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, names in sorted(by_file.items()):
        path = src / file
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
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
