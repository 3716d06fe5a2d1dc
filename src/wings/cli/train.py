"""`wings train CONFIG.yaml [--set key=value ...]`: run one training stage (works under torchrun / accelerate)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Repo checkout: configs/ sits next to src/; lets `wings train wings_stage1` find configs/wings_stage1.yaml.
REPO_CONFIGS = Path(__file__).resolve().parents[3] / "configs"

# Convenience flags -> dotted config keys.
SHORTCUTS = {
    "model": "model.path",
    "data": "data.path",
    "image_root": "data.image_root",
    "output_dir": "output_dir",
    "max_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "resume": "train.resume",
    "deepspeed": "train.deepspeed",
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
    p.add_argument("--max-steps", type=int, help="optimizer steps (train.max_steps)")
    p.add_argument("--batch-size", type=int, help="per-device batch size (train.batch_size)")
    p.add_argument("--resume", help="'auto', a checkpoint dir, or 'none' (train.resume)")
    p.add_argument("--deepspeed", help="DeepSpeed JSON, e.g. configs/deepspeed/zero2.json (train.deepspeed)")
    p.set_defaults(func=run)


def resolve_config_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    candidate = REPO_CONFIGS / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml") and path.parent == Path(".") and candidate.is_file():
        return candidate
    raise FileNotFoundError(f"training config {name} does not exist")


def run(args: argparse.Namespace) -> int:
    from ..training import finish_distributed, load_config, train

    overrides = [f"{key}={getattr(args, flag)}" for flag, key in SHORTCUTS.items() if getattr(args, flag) is not None]
    config = load_config(resolve_config_path(args.config), overrides + list(args.overrides))
    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        last = f", last logged loss {result.losses[-1]:.4f}" if result.losses else ""
        print(f"[wings train] {config.stage}: {result.global_step} steps, mean loss {result.train_loss:.4f}{last}")
        print(f"[wings train] model + processor: {result.final_dir}")
        print(f"[wings train] checkpoints: {result.output_dir} ({len(result.checkpoints)} kept)")
        if result.log_dir is not None:
            print(f"[wings train] TensorBoard logs: {result.log_dir}  (tensorboard --logdir {result.log_dir})")
    finish_distributed(0)  # torchrun ranks: barrier, destroy group, flush, os._exit (no-op otherwise)
    return 0
