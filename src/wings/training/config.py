"""Training configuration: stage YAML files -> a validated, typed `TrainConfig` (with `--set key=value` overrides).

A stage file has six sections (see configs/*.yaml for documented examples):

    stage: wings_stage1            # a name for logs
    mode: wings                    # the model mode this stage expects (wings | llava)
    output_dir: runs/wings_stage1
    model:  {path, overrides}      # start model dir; WingsConfig fields applied on load
    data:   {path, image_root, max_length, policy, text_mix_path, text_mix_ratio, group_by_modality}
    groups: {vision_tower|projector|llm|visual_learner|textual_learner|router: {train, lr, weight_decay}}
    lora:   {enabled, r, alpha, dropout, targets, lr}
    train:  {lr, weight_decay, lr_scheduler, warmup_ratio, max_grad_norm, epochs, max_steps, batch_size, ...}

Values are coerced to the declared field types, so YAML's `2e-5` (a string to PyYAML) becomes a float.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..paths import read_text, require_file

GROUPS = ("vision_tower", "projector", "llm", "visual_learner", "textual_learner", "router")
PRECISIONS = ("fp32", "bf16", "fp16")
DATA_POLICIES = ("skip", "error")
INTEGRATIONS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml"}
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class GroupConfig:
    """One parameter group: trained or frozen, with its own learning rate and weight decay.

    Args:
        train: whether the group's parameters get gradients.
        lr: learning rate; None = the run's `train.lr`.
        weight_decay: None = the run's `train.weight_decay` (biases and norms never decay).
    """

    train: bool = False
    lr: float | None = None
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class ModelConfig:
    """Where the run starts.

    Args:
        path: an HF-format Wings model directory (from `wings init-model` or an earlier stage's `final/`).
        overrides: WingsConfig fields applied on load, e.g. `{use_textual_learner: true, use_router: true}` to
            add fresh (zero-output) textual learners and a router to a stage-1 model, or `{mode: llava}`.
        dtype: weights' storage dtype on load (float32 | bfloat16); mixed precision is `train.precision`.
    """

    path: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.path = _expand(self.path)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class DataConfig:
    """Training data (LLaVA JSON/JSONL records), read by `wings.data.build_dataset`.

    Args:
        path: the record file.  image_root: folder that relative image paths resolve against (None: the file's).
        max_length: token budget per sample.  policy: "skip" bad records (counted, reported) or "error".
        text_mix_path / text_mix_ratio: optional text-only records mixed in (replay against forgetting).
        group_by_modality: batches hold one modality (image or text-only) and similar lengths.
        num_workers: dataloader worker processes.
    """

    path: str = ""
    image_root: str | None = None
    max_length: int = 2048
    policy: str = "skip"
    text_mix_path: str | None = None
    text_mix_ratio: float = 0.0
    group_by_modality: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        self.path, self.image_root, self.text_mix_path = map(_expand, (self.path, self.image_root, self.text_mix_path))
        if self.policy not in DATA_POLICIES:
            raise ValueError(f"data.policy must be one of {DATA_POLICIES}, got {self.policy!r}")
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8, got {self.max_length}")
        if not 0.0 <= self.text_mix_ratio < 1.0:
            raise ValueError(f"data.text_mix_ratio must be in [0, 1), got {self.text_mix_ratio}")


@dataclass
class LoraSettings:
    """Optional LoRA adapters (PEFT) on the base LLM's linear layers; learners and router are never targeted.

    Args:
        enabled: add adapters; the `llm` group must then stay frozen (the adapters train instead).
        r / alpha / dropout: LoRA rank, scaling numerator, dropout.
        targets: linear-layer names inside the decoder layers (the attention's own projections and the MLP).
        lr: the adapters' learning rate; None = the `llm` group's lr (or `train.lr`).
    """

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not self.targets:
            raise ValueError("lora.targets is empty")


@dataclass
class OptimConfig:
    """Optimisation, checkpointing and logging (mapped onto HF `TrainingArguments`).

    Args:
        lr / weight_decay: defaults for groups that set none.  lr_scheduler: any HF scheduler name (cosine, linear,
        constant_with_warmup ...).  warmup_ratio: fraction of steps spent warming up.  max_grad_norm: clipping.
        epochs / max_steps: length (max_steps > 0 wins).  batch_size: per device.  grad_accum: micro-batches per step.
        precision: fp32 | bf16 | fp16 (mixed precision; master weights stay fp32).
        gradient_checkpointing: recompute activations (non-reentrant).  seed: everything random.
        learner_recompute: without gradient_checkpointing, recompute only the Wings learners' activations in
            the backward: true (all of them, the least memory) or "projections" (keep their attention outputs:
            most of the saving for little time); docs/PERFORMANCE.md "Memory".
        save_steps / save_total_limit: checkpoints.  logging_steps: loss logging interval.
        report_to: HF integrations ("tensorboard", "wandb") or [] for none.
        resume: None (fresh), "auto" (latest complete checkpoint in output_dir, if any) or a checkpoint path.
        deepspeed: a DeepSpeed JSON (configs/deepspeed/zero2.json, zero3.json).
        fsdp: an HF `fsdp_config` JSON (configs/accelerate/fsdp.json, fsdp_sharded.json): FSDP instead of DDP.
        use_cpu: train on CPU even when a GPU is present.  ddp_backend: None (auto), "gloo" or "nccl".
        extra_args: anything else, passed to `TrainingArguments` verbatim.
    """

    lr: float = 2e-5
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    learner_recompute: bool | str = False
    seed: int = 42
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    resume: str | None = None
    deepspeed: str | None = None
    fsdp: str | None = None
    use_cpu: bool = False
    ddp_backend: str | None = None
    extra_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("batch_size", "grad_accum", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("set train.max_steps > 0 or train.epochs > 0")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"train.seed must be in [0, 2**32), got {self.seed}")
        if not isinstance(self.learner_recompute, (bool, str)) or self.learner_recompute not in (
                False, True, "projections"):
            raise ValueError(
                f"train.learner_recompute must be false, true or projections, got {self.learner_recompute!r}")
        if self.learner_recompute and self.gradient_checkpointing:
            raise ValueError("train.learner_recompute with train.gradient_checkpointing: the checkpointing already "
                             "recomputes whole layers, learners included, so the learners would run a third time; "
                             "set one of them (learner_recompute needs gradient_checkpointing=false)")
        check_scheduler(self.lr_scheduler)
        check_report_to(self.report_to)
        self.deepspeed = _expand(self.deepspeed)
        if self.deepspeed:
            require_file(self.deepspeed, "train.deepspeed")
        self._check_fsdp()
        if self.resume is not None and not self.resume.strip():
            self.resume = None

    def _check_fsdp(self) -> None:
        self.fsdp = _expand(self.fsdp)
        if not self.fsdp:
            return
        require_file(self.fsdp, "train.fsdp")
        if self.deepspeed:
            raise ValueError("train.fsdp and train.deepspeed are two engines: set one of them")


def check_scheduler(name: str) -> None:
    from transformers import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if name not in schedulers:
        raise ValueError(f"train.lr_scheduler {name!r} is not an HF scheduler; one of {schedulers}")


def check_report_to(names: list[str]) -> None:
    """Known logging integrations that are installed (HF would fail later, naming neither the key nor the fix)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK and n not in ("all", "none")]
    if unknown:
        raise ValueError(f"train.report_to {unknown}: unknown integration(s); known: "
                         f"{sorted(INTEGRATION_TO_CALLBACK)} (or [] for none)")
    missing = [n for n in names if n in INTEGRATIONS and importlib.util.find_spec(INTEGRATIONS[n]) is None]
    if missing:
        raise ValueError(f"train.report_to {missing}: not installed (pip install {' '.join(missing)}); "
                         "use train.report_to=[] for none")


@dataclass
class TrainConfig:
    """One training stage. See the module docstring and configs/*.yaml."""

    stage: str = "custom"
    mode: str = "wings"
    output_dir: str = "runs/train"
    overwrite: bool = False  # replace an earlier run in output_dir (its checkpoints and final/) instead of refusing
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    groups: dict[str, GroupConfig] = field(default_factory=dict)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.mode not in ("wings", "llava"):
            raise ValueError(f"mode must be 'wings' or 'llava', got {self.mode!r}")
        unknown = sorted(set(self.groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown parameter group(s) {unknown}; groups are {list(GROUPS)}")
        if self.mode == "llava":
            learner_groups = [g for g in ("visual_learner", "textual_learner", "router") if self.trains(g)]
            if learner_groups:
                raise ValueError(f"mode llava has no learners or router, but {learner_groups} are set to train")
        if self.lora.enabled and self.trains("llm"):
            raise ValueError("lora.enabled trains adapters instead of the LLM: set groups.llm.train to false")
        if not self.lora.enabled and not any(self.trains(g) for g in GROUPS):
            raise ValueError("no parameter group is set to train (groups.<name>.train: true)")
        if not self.output_dir:
            raise ValueError("output_dir is empty")
        self.output_dir = _expand(self.output_dir)

    def trains(self, group: str) -> bool:
        return group in self.groups and self.groups[group].train

    def group_lr(self, group: str) -> float:
        cfg = self.groups.get(group)
        return cfg.lr if cfg is not None and cfg.lr is not None else self.train.lr

    def group_weight_decay(self, group: str) -> float:
        cfg = self.groups.get(group)
        return cfg.weight_decay if cfg is not None and cfg.weight_decay is not None else self.train.weight_decay

    def lora_lr(self) -> float:
        return self.lora.lr if self.lora.lr is not None else self.group_lr("llm")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _expand(path: str | None) -> str | None:
    """`~` expanded in path fields (a `--flag=~/x` or a YAML value reaches us unexpanded by the shell)."""
    return str(Path(path).expanduser()) if path else path


# ---------------------------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> overrides -> typed dataclasses.


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> TrainConfig:
    """Read a stage YAML (or start from `base`), apply `key=value` overrides, and build a validated TrainConfig."""
    data: dict[str, Any] = dict(base or {})
    where = "config"
    if path is not None:
        where = str(path)
        p = require_file(path, "training config")
        try:
            loaded = yaml.safe_load(read_text(p, "training config")) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{p}: not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
        data.update(loaded)
    for item in overrides or []:
        apply_override(data, item)
    try:
        return build_dataclass(TrainConfig, data, "")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def apply_override(data: dict[str, Any], item: str) -> None:
    """`a.b.c=value` sets data["a"]["b"]["c"]; the value is parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build_dataclass(cls, data: Any, prefix: str):
    """Build dataclass `cls` from a mapping, coercing each value to its field type; unknown keys are errors."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {[prefix + k for k in unknown]}; known: {sorted(names)}")
    kwargs = {k: coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a YAML value to the annotated type (float from '2e-5', int from 3.0, ...) or raise naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(value, inner[0], name)
        for hint_option in inner:  # `bool | str`: the first type the value converts to
            try:
                return coerce(value, hint_option, name)
            except ValueError:
                pass
        allowed = " or ".join(getattr(a, "__name__", str(a)) for a in inner)
        raise ValueError(f"{name} must be a {allowed}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value if value is not None else {}, f"{name}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        vtype = args[1] if args else Any
        return {str(k): coerce(v, vtype, f"{name}.{k}") for k, v in value.items()}
    if origin is list:
        items = value if isinstance(value, list) else [value] if value not in (None, "") else []
        return [coerce(v, args[0] if args else Any, f"{name}[{i}]") for i, v in enumerate(items)]
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if hint is int:
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(as_float)
    if hint is str:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a string, got {str(value).lower()} (YAML reads yes/no/on/off/true/"
                             "false as booleans; quote the value if you mean the word)")
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def dump_config(config: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (temp file, then rename)."""
    from ..atomic import write_text_atomic

    return write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))
