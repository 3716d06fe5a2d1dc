"""Both Wings stages on stock VLMs through their own processors, on real easy-vqa images: the loss drops, exactly
the declared groups move (frozen tensors bit-identical), stage 2 keeps stage 1's learners, resume is exact."""

from __future__ import annotations

import pytest
import torch

from test_training_stages import StopAt, mean, params, stage_config, write_records
from vlm_support import init_wings_dir
from wings.model_kinds import load_model
from wings.training import train
from wings.training.param_groups import classify, layout_of

FAMILIES = ["llava", "qwen2_vl", "smolvlm"]
LR = ["groups.projector.lr=1e-2", "groups.visual_learner.lr=1e-2", "data.max_length=256"]


def assert_only_groups_changed(before: dict, after: dict, trained: set[str], layout) -> None:
    assert before.keys() == after.keys()
    for name, old in before.items():
        group = classify(name, layout)
        same = torch.equal(old, after[name])
        assert same != (group in trained), f"{name} ({group}) {'frozen but changed' if not same else 'not trained'}"


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_train_data")
    return {"images": write_records(root / "stage1.json", n_image=8),
            "mixed": write_records(root / "stage2.json", n_image=8, n_text=4)}


@pytest.mark.parametrize("kind", FAMILIES)
def test_two_stages_train_exactly_the_declared_groups(kind, data_files, tmp_path):
    init = init_wings_dir(kind, tmp_path / "init")
    cfg1 = stage_config("wings_stage1", init, data_files["images"], tmp_path / "s1", "train.max_steps=8",
                        "train.batch_size=4", "train.save_steps=100", *LR)
    start = load_model(init)
    layout = layout_of(start)
    before1 = params(start)
    r1 = train(cfg1)
    stage1 = load_model(r1.final_dir)
    assert_only_groups_changed(before1, params(stage1), {"projector", "visual_learner"}, layout)
    assert mean(r1.losses[-3:]) < mean(r1.losses[:3])

    cfg2 = stage_config("wings_stage2", r1.final_dir, data_files["mixed"], tmp_path / "s2", "train.max_steps=6",
                        "train.batch_size=4", "train.save_steps=100", *LR, "groups.llm.lr=1e-3",
                        "groups.textual_learner.lr=1e-2", "groups.router.lr=1e-2")
    start2 = load_model(r1.final_dir, overrides=cfg2.model.overrides)
    before2 = params(start2)
    assert {classify(n, layout) for n in before2} >= {"textual_learner", "router"}  # fresh stage-2 parts
    for name, value in params(stage1).items():  # stage 1's training survives the stage-2 load
        assert torch.equal(before2[name], value)
    r2 = train(cfg2)
    after2 = params(load_model(r2.final_dir))
    trained = {"projector", "visual_learner", "textual_learner", "router", "llm"}
    assert_only_groups_changed(before2, after2, trained, layout)


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava"])
def test_resume_is_exact(kind, data_files, tmp_path):
    init = init_wings_dir(kind, tmp_path / "init")
    sets = ["train.max_steps=6", "train.batch_size=2", "train.save_steps=3", "train.warmup_ratio=0.2",
            "train.resume=auto", *LR]
    full = train(stage_config("wings_stage1", init, data_files["images"], tmp_path / "a", *sets))
    cfg = stage_config("wings_stage1", init, data_files["images"], tmp_path / "b", *sets)
    first = train(cfg, callbacks=[StopAt(3)])
    second = train(cfg)
    assert second.resumed_from == tmp_path / "b" / "checkpoint-3" and second.steps == [4, 5, 6]
    assert first.losses == full.losses[:3] and second.losses == full.losses[3:]  # bit-exact
    a, b = params(load_model(full.final_dir)), params(load_model(second.final_dir))
    assert all(torch.equal(a[n], b[n]) for n in a)
