"""Engine settings without launching anything: the shipped DeepSpeed / FSDP configs say what the docs say, and the
checks that turn a silent engine fallback or a sure hang into a clear error."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from transformers import TrainingArguments

from wings.training import load_config
from wings.training.engines import (
    configure_fsdp_wrapping,
    deepspeed_zero_stage,
    engine_arguments,
    init_restarted_process_group,
    prepare_engine,
)
from wings.training.trainer import fsdp_shards_complete, is_complete_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def stage(*sets: str):
    return load_config(CONFIGS / "wings_stage2.yaml", ["model.path=m", "data.path=d.json", *sets])


def test_shipped_deepspeed_configs_leave_optimizer_and_batch_to_wings():
    assert deepspeed_zero_stage(CONFIGS / "deepspeed" / "zero2.json") == 2
    assert deepspeed_zero_stage(CONFIGS / "deepspeed" / "zero3.json") == 3
    for name in ("zero2.json", "zero3.json"):
        ds = json.loads((CONFIGS / "deepspeed" / name).read_text())
        assert "optimizer" not in ds and "scheduler" not in ds  # the per-group AdamW and the HF schedule
        assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
    zero3 = json.loads((CONFIGS / "deepspeed" / "zero3.json").read_text())
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # final/ is an HF dir
    assert deepspeed_zero_stage(None) is None


def test_deepspeed_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="train.deepspeed: .*ds.json is not a readable JSON"):
        deepspeed_zero_stage(bad)
    bad.write_text('{"zero_optimization": {"stage": 7}}')
    with pytest.raises(ValueError, match="stage=7"):
        deepspeed_zero_stage(bad)


@pytest.mark.parametrize("name, state_dict", [("fsdp.json", "FULL_STATE_DICT"),
                                              ("fsdp_sharded.json", "SHARDED_STATE_DICT")])
def test_fsdp_configs_become_fsdp2_training_arguments(name, state_dict, tmp_path):
    config = stage(f"train.fsdp={CONFIGS / 'accelerate' / name}")
    kwargs = engine_arguments(config)
    assert kwargs == {"fsdp": True, "fsdp_config": str(CONFIGS / "accelerate" / name)}
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["state_dict_type"] == state_dict
    assert "transformer_cls_names_to_wrap" not in args.fsdp_plugin_args  # filled from the model at run time
    assert engine_arguments(stage()) == {}


def test_fsdp_setting_errors():
    with pytest.raises(FileNotFoundError, match="train.fsdp:? .*nope.json does not exist"):
        stage("train.fsdp=nope.json")
    with pytest.raises(ValueError, match="train.fsdp and train.deepspeed"):
        stage(f"train.fsdp={CONFIGS / 'accelerate' / 'fsdp.json'}",
              f"train.deepspeed={CONFIGS / 'deepspeed' / 'zero2.json'}")


def fake_trainer(fsdp: bool = False, zero: int | None = None, world: int = 2, model=None, zero_config=None):
    """What prepare_engine reads of a WingsTrainer after accelerate set it up."""
    ds = SimpleNamespace(zero_stage=zero, deepspeed_config={"zero_optimization": zero_config or {"stage": zero}})
    state = SimpleNamespace(distributed_type=DistributedType.FSDP if fsdp else DistributedType.MULTI_CPU,
                            fsdp_plugin=SimpleNamespace(fsdp_version=2, transformer_cls_names_to_wrap=None),
                            deepspeed_plugin=ds)
    callbacks = []
    return SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=zero is not None, model=model,
                           accelerator=SimpleNamespace(state=state), args=SimpleNamespace(world_size=world),
                           callbacks=callbacks, add_callback=callbacks.append)


def test_fsdp_that_accelerate_dropped_is_an_error_not_a_silent_ddp_run(monkeypatch):
    config = stage(f"train.fsdp={CONFIGS / 'accelerate' / 'fsdp.json'}")
    with pytest.raises(ValueError, match="FSDP was requested .* MULTI_CPU run: accelerate runs FSDP on GPUs"):
        prepare_engine(config, fake_trainer(fsdp=False), dataset_with_modalities())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # `accelerate launch --config_file configs/accelerate/...`
    with pytest.raises(ValueError, match="FSDP was requested"):
        prepare_engine(stage(), fake_trainer(fsdp=False), dataset_with_modalities())


def dataset_with_modalities():
    return SimpleNamespace(lengths=[4, 5], is_multimodal=[True, False])


@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_sharded_engines_need_modality_aligned_steps(engine, make_tiny):
    model, _ = make_tiny()
    trainer = fake_trainer(fsdp=engine == "fsdp", zero=3 if engine == "zero3" else None, model=model)
    with pytest.raises(ValueError, match="same modality .* data.group_by_modality: true"):
        prepare_engine(stage("data.group_by_modality=false"), trainer, dataset_with_modalities())
    with pytest.raises(ValueError, match="same modality"):
        prepare_engine(stage(), trainer, [1, 2])  # a dataset without .lengths / .is_multimodal
    name = prepare_engine(stage(), trainer, dataset_with_modalities())
    assert name == {"zero3": "deepspeed-zero3", "fsdp": "fsdp2"}[engine]
    # ZeRO-3 gets the per-step reset of its gradient buffer (stale gradients of skipped parameters)
    assert [type(c).__name__ for c in trainer.callbacks] == (["FreshZero3Gradients"] if engine == "zero3" else [])
    assert prepare_engine(stage("data.group_by_modality=false"), fake_trainer(zero=2), [1]) == "deepspeed-zero2"
    assert prepare_engine(stage("data.group_by_modality=false"), fake_trainer(world=1), [1]) == "single"


def test_zero3_with_optimizer_offload_is_refused():
    trainer = fake_trainer(zero=3, zero_config={"stage": 3, "offload_optimizer": {"device": "cpu"}})
    with pytest.raises(ValueError, match="ZeRO-3 with offload_optimizer is not supported: .*stale"):
        prepare_engine(stage(), trainer, dataset_with_modalities())
    trainer = fake_trainer(zero=3, zero_config={"stage": 3, "offload_optimizer": {"device": "none"}})
    assert prepare_engine(stage(), trainer, dataset_with_modalities()) == "deepspeed-zero3"


def test_fsdp_wraps_the_layer_classes_the_model_really_has(make_tiny):
    model, _ = make_tiny()
    assert "SiglipTextEmbeddings" in model._no_split_modules  # HF's list names a class a vision tower lacks
    wrapped = configure_fsdp_wrapping(fake_trainer(fsdp=True, model=model))
    assert {"Qwen2DecoderLayer", "SiglipEncoderLayer"} <= set(wrapped)
    assert "SiglipTextEmbeddings" not in wrapped
    present = {type(m).__name__ for m in model.modules()}
    assert set(wrapped) <= present
    assert configure_fsdp_wrapping(fake_trainer(fsdp=False, model=model)) == []


def test_sharded_fsdp_checkpoint_is_complete_once_its_metadata_is_written(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    (ckpt / "pytorch_model_fsdp_0").mkdir(parents=True)
    (ckpt / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"x")
    (ckpt / "trainer_state.json").write_text("{}")
    assert not fsdp_shards_complete(ckpt) and not is_complete_checkpoint(ckpt)
    (ckpt / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"x")
    assert fsdp_shards_complete(ckpt) and is_complete_checkpoint(ckpt)
    (ckpt / "trainer_state.json").unlink()
    assert not is_complete_checkpoint(ckpt)


def test_only_a_restarted_torchrun_worker_gets_its_own_process_group(monkeypatch):
    """First attempts keep HF/accelerate's own init; a restart (exercised by test_scaleout_launchers) gets a store
    prefix of its own."""
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert init_restarted_process_group(stage()) is False
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert init_restarted_process_group(stage()) is False
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_restarted_process_group(stage()) is False
