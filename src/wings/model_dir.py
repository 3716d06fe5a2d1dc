"""Model and checkpoint directories checked before anything is loaded or allocated.

`check_model_dir` reads config.json (UTF-8, JSON, a mapping) and decides from it alone whether the directory is
the kind the command needs, so a plain HF LLM passed where a Wings model belongs is refused by name instead of
being read as a default-sized (7B) Wings config. It then checks that the weights are there and that every
safetensors header is whole (a truncated file fails here, named, not deep inside `from_pretrained`).
`check_checkpoint` does the same for an HF Trainer checkpoint, including its torch files (optimizer, scheduler,
RNG state), whose zip directory sits at the end of the file and so is gone when the file is truncated.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from .paths import read_json, require_dir

KINDS = ("wings", "mllm", "causal_lm", "vision", "vlm", "any")
JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "processor_config.json", "preprocessor_config.json")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
TORCH_STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt")
VISION_TYPES = ("siglip", "siglip_vision_model", "clip", "clip_vision_model", "siglip2", "siglip2_vision_model",
                "dinov2", "vit", "eva")


def _causal_lm_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _vlm_types() -> tuple[set[str], str]:
    """(stock VLM types Wings attaches to, the prefix of their Wings-attached types)."""
    from .vlm.registry import ARCHS, WINGS_PREFIX

    return set(ARCHS), WINGS_PREFIX


def is_wings_type(model_type: str | None) -> bool:
    """A Wings model: composed (`wings`) or a stock VLM with Wings attached (`wings_<type>`)."""
    stock, prefix = _vlm_types()
    return model_type == "wings" or (bool(model_type) and model_type.startswith(prefix)
                                     and model_type[len(prefix):] in stock)


def describe_kind(config: dict) -> str:
    """What a config.json describes, in words, for messages."""
    model_type = config.get("model_type")
    if model_type == "wings":
        return "a Wings model"
    if is_wings_type(model_type):
        return f"a {model_type[len('wings_'):]} VLM with Wings attached"
    if model_type in _vlm_types()[0]:
        return f"a stock {model_type} VLM"
    if model_type in VISION_TYPES:
        return f"a {model_type} vision encoder"
    if model_type in _causal_lm_types():
        return f"a plain {model_type} language model"
    return f"a {model_type!r} model" if model_type else "a model without a model_type"


def check_model_dir(path: str | Path, what: str, kind: str = "wings", weights: bool = True) -> dict:
    """Validate a model directory for `kind` and return its config.json. `what` names it in messages (a flag or
    config key, e.g. "--model" or "model.path")."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = require_dir(path, what)
    config = read_config(path, what)
    model_type = config.get("model_type")
    if kind == "wings":
        _require_wings(path, config, what)
    elif kind == "causal_lm":
        if model_type == "wings" or model_type in VISION_TYPES or model_type not in _causal_lm_types():
            raise ValueError(f"{what} {path} is {describe_kind(config)}, not a causal language model "
                             "(its config.json decides)")
    elif kind == "vision":
        if is_wings_type(model_type) or model_type in _causal_lm_types():
            raise ValueError(f"{what} {path} is {describe_kind(config)}, not a vision encoder")
    elif kind == "vlm":
        _require_stock_vlm(path, config, what)
    elif is_wings_type(model_type):
        _require_wings(path, config, what)
    elif model_type in _vlm_types()[0]:  # a stock VLM: the baseline Wings attaches to
        _require_stock_vlm(path, config, what)
    elif kind == "mllm":  # anything else is refused here, with the hint that fits it
        _require_wings(path, config, what, stock_vlm_ok=True)
    elif model_type not in _causal_lm_types():
        raise ValueError(f"{what} {path} is {describe_kind(config)}; expected a Wings model, a stock VLM or a "
                         "causal language model")
    for name in JSON_FILES[1:]:
        if (path / name).is_file():
            read_json(path / name, f"{what}:")
    if weights:
        check_weights(path, what)
    return config


def read_config(path: Path, what: str) -> dict:
    config_path = path / "config.json"
    if not config_path.exists():
        raise ValueError(f"{what} {path} has no config.json; expected a Hugging Face model directory")
    config = read_json(config_path, f"{what}:")
    if not isinstance(config, dict):
        raise ValueError(f"{what}: {config_path} holds a JSON {type(config).__name__}, expected an object")
    return config


def _require_stock_vlm(path: Path, config: dict, what: str) -> None:
    from .vlm.registry import arch_for

    model_type = config.get("model_type")
    if is_wings_type(model_type):
        raise ValueError(f"{what} {path} is {describe_kind(config)} already; give the stock model's directory")
    arch_for(model_type)  # refuses an unsupported type, naming the supported ones
    _require_sub_configs(path, config, what)


def _require_wings(path: Path, config: dict, what: str, stock_vlm_ok: bool = False) -> None:
    model_type = config.get("model_type")
    if not is_wings_type(model_type):
        expected = "'wings', or a stock VLM with or without Wings attached" if stock_vlm_ok else \
            "'wings', or a stock VLM type with Wings attached"
        hint = ""
        if model_type in _causal_lm_types():
            hint = (f"; build a Wings model from it with `wings init-model --llm {path} --vision VISION_DIR "
                    "--out DIR`")
        elif model_type in _vlm_types()[0]:
            hint = f"; attach Wings to it with `wings init-model --vlm {path} --out DIR`"
        raise ValueError(f"{what} {path} is {describe_kind(config)}, not a Wings model (config.json model_type "
                         f"{model_type!r}, expected {expected}){hint}")
    if model_type != "wings" and not isinstance(config.get("wings"), dict):
        raise ValueError(f"{what} {path}: config.json has no `wings` settings; an unfinished save?")
    _require_sub_configs(path, config, what)


def _require_sub_configs(path: Path, config: dict, what: str) -> None:
    for sub in ("text_config", "vision_config"):
        value = config.get(sub)
        if not isinstance(value, dict) or not value.get("model_type"):
            raise ValueError(f"{what} {path}: config.json has no complete {sub} (with a model_type); loading it "
                             "would build a default-sized model instead of this one")


def check_weights(path: Path, what: str) -> list[Path]:
    """The weight files of a model directory (index shards or the single file), each header checked."""
    for index_name in INDEX_FILES:
        index = path / index_name
        if index.is_file():
            data = read_json(index, f"{what}:")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{what}: {index} has no weight_map")
            files = []
            for shard in sorted(set(weight_map.values())):
                file = path / str(shard)
                if not file.resolve().is_relative_to(path.resolve()):
                    raise ValueError(f"{what}: {index.name} lists shard {shard!r}, which is outside {path}")
                if not file.is_file():
                    raise ValueError(f"{what}: {index.name} lists {shard}, which is missing from {path} (an "
                                     "unfinished copy or save?)")
                files.append(file)
            for file in files:
                check_weight_file(file, what)
            return files
    for name in SINGLE_FILES:
        if (path / name).is_file():
            check_weight_file(path / name, what)
            return [path / name]
    raise ValueError(f"{what} {path} has no weights (model.safetensors or an index of shards); an unfinished save?")


def check_weight_file(file: Path, what: str) -> None:
    if file.suffix == ".safetensors":
        check_safetensors(file, what)
    else:
        check_torch_file(file, what)


def check_safetensors(file: Path, what: str) -> None:
    """Open the header only: a truncated or foreign file fails here (safetensors checks that the header's
    offsets cover the file exactly)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{what}: {file} is corrupt or truncated ({' '.join(str(err).split())})") from None


def check_torch_file(file: Path, what: str) -> None:
    """`torch.save` writes a zip whose directory is at the end: a truncated file has none."""
    try:
        with zipfile.ZipFile(file) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ValueError(f"{what}: {file} is corrupt or truncated ({err})") from None
    size = file.stat().st_size
    if not infos or any(i.header_offset + i.compress_size > size for i in infos):
        raise ValueError(f"{what}: {file} is corrupt or truncated (its zip directory points past the end)")


def check_checkpoint(path: str | Path, what: str = "train.resume") -> Path:
    """A complete HF Trainer checkpoint: trainer_state.json parses, weights and torch state files are whole."""
    path = require_dir(path, what)
    state = path / "trainer_state.json"
    if not state.is_file():
        raise ValueError(f"{what}: {path} is not a complete HF checkpoint (no trainer_state.json)")
    if not isinstance(read_json(state, f"{what}:"), dict):
        raise ValueError(f"{what}: {state} is not a trainer state (not a JSON object)")
    # DeepSpeed (global_step*/) and sharded FSDP (pytorch_model_fsdp_*/) checkpoints keep their own shards.
    if not any(path.glob("global_step*")) and not any(path.glob("pytorch_model_fsdp_*")):
        check_weights(path, what)
    for name in TORCH_STATE_FILES:
        if (path / name).is_file():
            check_torch_file(path / name, what)
    return path
