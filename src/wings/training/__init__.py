"""Training: stage configs (YAML -> `TrainConfig`), parameter groups, the HF-Trainer glue, `train()`.

    from wings.training import load_config, train
    result = train(load_config("configs/wings_stage1.yaml", ["model.path=runs/init", "data.path=data.json"]))
    result.final_dir, result.losses
"""

from .config import GROUPS, DataConfig, GroupConfig, LoraSettings, ModelConfig, OptimConfig, TrainConfig, load_config
from .launch import TrainResult, finish_distributed, train
from .param_groups import classify, grouped_parameters
from .stages import add_lora, merge_lora, prepare_model
from .trainer import WingsTrainer, latest_complete_checkpoint

__all__ = [
    "GROUPS",
    "DataConfig",
    "GroupConfig",
    "LoraSettings",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "WingsTrainer",
    "add_lora",
    "classify",
    "finish_distributed",
    "grouped_parameters",
    "latest_complete_checkpoint",
    "load_config",
    "merge_lora",
    "prepare_model",
    "train",
]
