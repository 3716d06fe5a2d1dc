"""`wings train CONFIG.yaml [--set key=value ...]`: run one training stage (works under torchrun / accelerate)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from .args import positive_int

# Repo checkout: configs/ sits next to src/; lets `wings train wings_stage1` find configs/wings_stage1.yaml.
REPO_CONFIGS = Path(__file__).resolve().parents[3] / "configs"

# Convenience flags -> dotted config keys. String flags are passed as quoted YAML strings, so a path named
# `yes`, `null` or `2024` stays a path (unquoted, YAML would read a boolean, None or a number).
STRING_FLAGS = ("model", "data", "image_root", "output_dir", "resume", "deepspeed")
SHORTCUTS = {
    "model": "model.path",
    "data": "data.path",
    "image_root": "data.image_root",
    "output_dir": "output_dir",
    "max_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "resume": "train.resume",
    "deepspeed": "train.deepspeed",
    "overwrite": "overwrite",
}


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train one stage from a YAML config (configs/wings_stage1.yaml, ...)",
        description="Train one stage. Every config field can be overridden with --set KEY=VALUE (dotted keys, "
                    "YAML-typed values), e.g. --set train.max_steps=100 --set groups.projector.lr=1e-4.",
    )
    p.add_argument("config", help="stage YAML file, or the name of one in configs/ (e.g. wings_stage1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--model", help="start model directory (model.path)")
    p.add_argument("--data", help="LLaVA JSON/JSONL training records (data.path)")
    p.add_argument("--image-root", help="folder relative image paths resolve against (data.image_root)")
    p.add_argument("--output-dir", help="run folder: checkpoints, logs, final/ (output_dir)")
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps (train.max_steps)")
    p.add_argument("--batch-size", type=positive_int, help="per-device batch size (train.batch_size)")
    p.add_argument("--resume", help="'auto', a checkpoint dir, or 'none' (train.resume)")
    p.add_argument("--deepspeed", help="DeepSpeed JSON, e.g. configs/deepspeed/zero2.json (train.deepspeed)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an earlier run in the output dir (its checkpoints and final/) instead of refusing")
    p.set_defaults(func=run)


def resolve_config_path(name: str) -> Path:
    from ..paths import require_file

    path = Path(name).expanduser()
    if path.exists():
        return require_file(path, "training config")
    candidate = REPO_CONFIGS / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml") and path.parent == Path(".") and candidate.is_file():
        return candidate
    raise FileNotFoundError(f"training config {name} does not exist")


def run(args: argparse.Namespace) -> int:
    from ..training import finish_distributed, load_config, train

    overrides = [f"{key}={_yaml_value(flag, getattr(args, flag))}" for flag, key in SHORTCUTS.items()
                 if getattr(args, flag) is not None]
    config = load_config(resolve_config_path(args.config), overrides + list(args.overrides))
    args.interrupt_hint = (f"; complete checkpoints in {config.output_dir} are kept: continue with --resume auto "
                           "(the same settings and data)")
    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(config, result)
    finish_distributed(0)  # torchrun ranks: barrier, destroy group, flush, os._exit (no-op otherwise)
    return 0


def _yaml_value(flag: str, value) -> str:
    return json.dumps(str(value)) if flag in STRING_FLAGS else str(value).lower() if isinstance(value, bool) else value


def print_summary(config, result) -> None:
    if result.already_finished:
        print(f"[wings train] {config.stage}: nothing to do, the run finished at step {result.global_step} "
              f"({result.resumed_from}); final/ left unchanged")
    else:
        trained = result.global_step - result.start_step
        losses = f", mean loss {result.train_loss:.4f}" if trained > 0 and math.isfinite(result.train_loss) else ""
        losses += f", last logged loss {result.losses[-1]:.4f}" if result.losses else ""
        since = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
        print(f"[wings train] {config.stage}: trained {trained} steps this run, now at step {result.global_step}"
              f"{since}{losses}")
    print(f"[wings train] model + processor: {result.final_dir}")
    print(f"[wings train] checkpoints: {result.output_dir} ({len(result.checkpoints)} kept)")
    if result.log_dir is not None:
        print(f"[wings train] TensorBoard logs: {result.log_dir}  (tensorboard --logdir {result.log_dir})")
