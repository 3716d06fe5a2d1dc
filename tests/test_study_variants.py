"""Each study variant trains exactly what it says (on tiny models, a few steps), LoRA is sized like Wings' learners,
the interpolation is exact at its ends, and `--variants` is checked."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, TrainerCallback

from test_training_stages import stage_config, write_records
from wings.demo.interpolate import interpolate_dirs, interpolate_state
from wings.demo.variants import (
    VARIANTS,
    learner_parameter_count,
    lora_parameter_count,
    matched_lora_rank,
    parse_variants,
    stage2_sets,
    trained_groups,
)
from wings.training import classify, train
from wings.training.config import DEFAULT_LORA_TARGETS
from wings.training.stages import load_stage_model

TRAINED = [name for name, v in VARIANTS.items() if v.family != "interp"]
LRS = {"llm": 1e-3, "projector": 1e-2, "visual_learner": 1e-2, "textual_learner": 1e-2, "router": 1e-2}


class FinalWeights(TrainerCallback):
    """The model's parameters when training ends (before LoRA adapters are merged into the saved weights)."""

    def __init__(self):
        self.weights: dict[str, torch.Tensor] = {}
        self.trainable: dict[str, int] = {}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # a LoRA-wrapped layer keeps its own weight as `<layer>.base_layer.weight`: back to the stock name
        self.weights = {n.replace(".base_layer.", "."): p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_variants")
    return {"stage2": write_records(root / "stage2.json", n_image=8, n_text=4),
            "text": write_records(root / "text.json", n_image=0, n_text=8)}


@pytest.fixture(scope="module")
def stage1_dirs(make_tiny, tmp_path_factory):
    """Stage-1-shaped start models (as the study's shared stage 1 leaves them): LLaVA and Wings (visual only)."""
    from conftest import randomize_wings_
    from wings.builder import save

    root = tmp_path_factory.mktemp("study_starts")
    llava = save(*make_tiny(mode="llava"), root / "llava_stage1")
    # a trained stage 1 leaves non-zero visual learners (a fresh one's zero up-projections would hold its other
    # weights still for the first steps)
    model, processor = make_tiny(router="segment", use_textual_learner=False, use_router=False)
    wings = save(randomize_wings_(model, std=0.05), processor, root / "wings_stage1")
    return {"llava_stage1": llava, "wings_stage1": wings}


def lora_rank(stage1_dirs) -> tuple[int, int]:
    wings_config = AutoModelForImageTextToText.from_pretrained(stage1_dirs["wings_stage1"]).config
    target = learner_parameter_count(wings_config)
    llava = AutoModelForImageTextToText.from_pretrained(stage1_dirs["llava_stage1"])
    return matched_lora_rank(llava, target, DEFAULT_LORA_TARGETS), target


@pytest.mark.parametrize("name", TRAINED)
def test_variant_trains_exactly_its_groups(name, stage1_dirs, data, tmp_path):
    variant = VARIANTS[name]
    rank, learners = lora_rank(stage1_dirs)
    sets = ["train.max_steps=4", "train.batch_size=4", "train.save_steps=100", "train.seed=0",
            *(f"groups.{g}.lr={lr}" for g, lr in LRS.items() if variant.family == "wings" or g in ("llm", "projector"))]
    sets += stage2_sets(variant, LRS, data["text"], rank if name == "lora" else None)
    config = stage_config(f"{variant.family}_stage2", stage1_dirs[variant.start_stage], data["stage2"], tmp_path, *sets)
    torch.manual_seed(config.train.seed)  # the same fresh learners / router that train() adds on load
    before = {n: p.detach().clone() for n, p in load_stage_model(config).named_parameters()}
    final = FinalWeights()
    result = train(config, callbacks=[final])
    expected = trained_groups(variant)
    assert set(result.trainable) == expected, (name, result.trainable)
    moved = set()
    for param, value in final.weights.items():
        group = classify(param)
        if param not in before:  # only LoRA adapters appear during training
            assert group == "lora", param
            moved.add(group)
            continue
        if not torch.equal(before[param], value):
            assert group in expected, f"{name}: {param} ({group}) moved but the variant does not train it"
            moved.add(group)
    assert moved == expected, (name, moved)  # every group it trains moved, nothing else did
    parts = {classify(n) for n in final.weights}
    if name == "wings_no_textual":
        assert "textual_learner" not in parts and "router" not in parts
    if name == "wings_no_visual":
        assert "visual_learner" not in parts and "router" not in parts
    if name in ("frozen_llm", "wings_frozen_llm", "lora"):  # every base-LLM tensor bit-identical
        llm = [n for n in before if classify(n) == "llm"]
        assert llm and all(torch.equal(before[n], final.weights[n]) for n in llm)
    if name == "lora":
        lora = sum(n for p, n in final.trainable.items() if classify(p) == "lora")
        assert abs(lora - learners) <= 0.1 * learners, (lora, learners)
        assert set(classify(p) for p in final.trainable) == {"lora", "projector"}


def test_lora_count_formula_matches_the_adapters_peft_adds(stage1_dirs):
    from wings.training.config import load_config
    from wings.training.stages import add_lora

    model = AutoModelForImageTextToText.from_pretrained(stage1_dirs["llava_stage1"])
    config = load_config(None, ["lora.enabled=true", "lora.r=5", "groups.projector.train=true", "mode=llava"])
    add_lora(model, config)
    added = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    fresh = AutoModelForImageTextToText.from_pretrained(stage1_dirs["llava_stage1"])
    assert added == lora_parameter_count(fresh, 5, DEFAULT_LORA_TARGETS)


def test_interpolation_is_exact_at_both_ends(stage1_dirs, tmp_path, randomize):
    start = stage1_dirs["llava_stage1"]
    tuned = AutoModelForImageTextToText.from_pretrained(start)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tuned.save_pretrained(tmp_path / "tuned")
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(start).save_pretrained(tmp_path / "tuned")
    a = AutoModelForImageTextToText.from_pretrained(start).state_dict()
    b = tuned.state_dict()
    for alpha, expected in ((0.0, a), (1.0, b)):
        out = interpolate_dirs(start, tmp_path / "tuned", alpha, tmp_path / f"a{alpha}")
        got = AutoModelForImageTextToText.from_pretrained(out).state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected), alpha
    half = interpolate_state(a, b, 0.5)
    k = next(k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k]))
    torch.testing.assert_close(half[k], (a[k] + b[k]) / 2)
    with pytest.raises(ValueError, match="interpolation weight must be in"):
        interpolate_state(a, b, 1.5)


def test_variants_option_is_checked():
    assert parse_variants("all") == list(VARIANTS)
    assert parse_variants("interp,wings") == ["llava", "interp", "wings"]  # the curve needs the model it mixes
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['wingz'\]"):
        parse_variants("wings,wingz")
