"""Training config and parameter groups: YAML loading, typed overrides, validation, group classification, LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wings.training import GROUPS, classify, grouped_parameters, load_config
from wings.training.config import apply_override
from wings.training.param_groups import optimizer_param_groups, set_trainable
from wings.training.stages import add_lora, lora_target_regex, merge_lora

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = ["wings_stage1", "wings_stage2", "llava_stage1", "llava_stage2"]


@pytest.mark.parametrize("stage", STAGES)
def test_shipped_stage_configs_load(stage):
    config = load_config(CONFIGS / f"{stage}.yaml")
    assert config.stage == stage
    assert isinstance(config.train.lr, float)  # YAML's 2.0e-5 and friends arrive as floats
    assert config.train.max_grad_norm == 1.0 and config.train.lr_scheduler == "cosine"
    assert set(config.groups) <= set(GROUPS)


def test_released_recipes_are_declared():
    s1 = load_config(CONFIGS / "wings_stage1.yaml")
    assert {g for g in GROUPS if s1.trains(g)} == {"projector", "visual_learner"}
    assert s1.model.overrides == {"use_textual_learner": False, "use_router": False}
    assert s1.group_lr("projector") == 2e-5 and s1.train.warmup_ratio == 0.03
    s2 = load_config(CONFIGS / "wings_stage2.yaml")
    assert {g for g in GROUPS if s2.trains(g)} == {"llm", "projector", "visual_learner", "textual_learner", "router"}
    assert s2.group_lr("projector") == 1e-5
    assert all(s2.group_lr(g) == 2e-6 for g in ("llm", "visual_learner", "textual_learner", "router"))
    l1, l2 = load_config(CONFIGS / "llava_stage1.yaml"), load_config(CONFIGS / "llava_stage2.yaml")
    assert {g for g in GROUPS if l1.trains(g)} == {"projector"} and l1.group_lr("projector") == 1e-3
    assert l2.group_lr("llm") == 2e-5 and l2.group_lr("projector") == 1e-5


def test_overrides_are_typed_and_dotted():
    config = load_config(CONFIGS / "wings_stage1.yaml", [
        "train.max_steps=7", "groups.projector.lr=1e-3", "train.report_to=[]", "data.path=x.json",
        "model.overrides.router_type=segment", "train.gradient_checkpointing=false", "train.resume=null",
    ])
    assert config.train.max_steps == 7 and isinstance(config.train.max_steps, int)
    assert config.group_lr("projector") == 1e-3  # "1e-3" is a string to YAML; coerced to float
    assert config.train.report_to == [] and config.data.path == "x.json"
    assert config.model.overrides["router_type"] == "segment"
    assert config.train.gradient_checkpointing is False and config.train.resume is None


@pytest.mark.parametrize("value, expected", [("true", True), ("projections", "projections"), ("false", False)])
def test_learner_recompute_takes_a_bool_or_projections(value, expected):
    config = load_config(CONFIGS / "wings_stage2.yaml", [f"train.learner_recompute={value}",
                                                          "train.gradient_checkpointing=false"])
    assert config.train.learner_recompute == expected and type(config.train.learner_recompute) is type(expected)


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("train.max_steps=abc", "train.max_steps must be an integer"),
    ("train.precision=fp8", "train.precision"),
    ("groups.decoder.train=true", "unknown parameter group"),
    ("groups.textual_learner.train=true", "mode llava has no learners"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("data.policy=ignore", "data.policy"),
    ("novalue", "not key=value"),
    ("train.learner_recompute=attention", "train.learner_recompute must be false, true or projections"),
    ("train.learner_recompute=true", "learners would run a third time"),  # the llava_stage1 config checkpoints
])
def test_bad_config_values_are_named(override, message):
    with pytest.raises(ValueError, match=message) as err:
        load_config(CONFIGS / "llava_stage1.yaml", [override])
    if "not key=value" not in message:
        assert "llava_stage1.yaml" in str(err.value)  # the error names the file


def test_lora_with_full_llm_training_is_rejected():
    with pytest.raises(ValueError, match="groups.llm.train to false"):
        load_config(CONFIGS / "wings_stage2.yaml", ["lora.enabled=true"])


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="bad.yaml: expected a mapping"):
        load_config(tmp_path / "bad.yaml")


def test_apply_override_refuses_to_descend_into_a_value():
    data = {"train": 3}
    with pytest.raises(ValueError, match="is a value, not a section"):
        apply_override(data, "train.lr=1")


def test_every_parameter_has_a_group(make_tiny):
    model, _ = make_tiny()
    groups = grouped_parameters(model)
    assert set(groups) == set(GROUPS)
    assert classify("language_model.model.layers.0.self_attn.q_proj.weight") == "llm"
    assert classify("language_model.model.layers.0.self_attn.visual.q_proj.down.weight") == "visual_learner"
    assert classify("module.language_model.model.layers.1.self_attn.router.linear.bias") == "router"
    with pytest.raises(ValueError, match="belongs to no known group"):
        classify("something.else")


def test_stage_asking_for_absent_group_fails(make_tiny):
    model, _ = make_tiny(use_textual_learner=False, use_router=False)
    with pytest.raises(ValueError, match=r"\['router', 'textual_learner'\]"):
        set_trainable(model, {"projector", "textual_learner", "router"})
    counts = set_trainable(model, {"projector", "visual_learner"})
    assert set(counts) == {"projector", "visual_learner"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(classify(n) in counts for n in trainable)


def test_optimizer_groups_have_group_lrs_and_no_decay_on_biases_and_norms(make_tiny):
    from transformers import Trainer

    model, _ = make_tiny()
    set_trainable(model, {"projector", "llm", "router"})
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = optimizer_param_groups(model, {"projector": 1e-3, "llm": 2e-6, "router": 5e-4},
                                    {"projector": 0.1, "llm": 0.1, "router": 0.1}, decay)
    by_name = {g["group"]: g for g in groups}
    assert by_name["projector"]["lr"] == 1e-3 and by_name["llm"]["lr"] == 2e-6
    ids = {id(p): g["group"] for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in ids
            continue
        no_decay = name.endswith("bias") or "norm" in name
        assert ids[id(param)].endswith(".no_decay") == no_decay, name
    assert all(g["weight_decay"] == 0.0 for g in groups if g["group"].endswith(".no_decay"))
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_targets_only_base_llm_linears_and_merges_exactly(make_tiny, randomize, tiny_tokenizer):
    model, processor = make_tiny()
    randomize(model)
    config = load_config(CONFIGS / "wings_stage2.yaml", ["lora.enabled=true", "groups.llm.train=false", "lora.r=4"])
    n = add_lora(model, config)
    lora_names = [name for name, _ in model.named_parameters() if "lora_" in name]
    assert n == 2 * 7  # 2 layers x (attention q, k, v, o + MLP gate, up, down)
    assert all(".self_attn." in name or ".mlp." in name for name in lora_names)
    assert not any(g in name for name in lora_names for g in (".visual.", ".textual.", ".router."))
    with torch.no_grad():  # B starts at 0; give it values so the merge has something to fold in
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.eval()
    batch = processor(text=["What is 2 + 3? The answer is"])
    with torch.no_grad():
        before = model(**batch).logits
        merged = merge_lora(model)
        after = model(**batch).logits
    assert merged == n and not any("lora_" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_lora_regex_anchors_on_the_module_path():
    import re

    rx = re.compile(lora_target_regex(["q_proj", "down_proj"]))
    assert rx.fullmatch("language_model.model.layers.3.self_attn.q_proj")
    assert rx.fullmatch("language_model.model.layers.0.mlp.down_proj")
    assert not rx.fullmatch("language_model.model.layers.3.self_attn.visual.q_proj")
    assert not rx.fullmatch("language_model.model.layers.3.self_attn.visual.q_proj.down")
