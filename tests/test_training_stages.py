"""End to end on a tiny model and real easy-vqa images: stage 1 -> stage 2, exact trainability, resume, LoRA, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

from wings.cli import main as wings_main
from wings.training import classify, load_config, train
from wings.training.stages import load_stage_model, prepare_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Small, fast, deterministic runs: fp32, no logging integrations, every step logged, no warmup.
FAST = ["train.precision=fp32", "train.report_to=[]", "train.use_cpu=true", "train.gradient_checkpointing=false",
        "train.logging_steps=1", "train.grad_accum=1", "train.warmup_ratio=0", "data.max_length=128",
        "train.save_total_limit=null"]


def write_records(path: Path, n_image: int, n_text: int = 0) -> Path:
    """LLaVA records over real easy-vqa PNGs (absolute paths), plus text-only arithmetic Q/A."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_train_questions()
    image_paths = easy_vqa.get_train_image_paths()
    records = [{"id": f"img{i}", "image": image_paths[image_ids[i]],
                "conversations": [{"from": "human", "value": f"<image>\n{questions[i]}"},
                                  {"from": "gpt", "value": answers[i]}]} for i in range(n_image)]
    records += [{"id": f"txt{i}", "conversations": [{"from": "human", "value": f"What is {i} + 2?"},
                                                    {"from": "gpt", "value": str(i + 2)}]} for i in range(n_text)]
    path.write_text(json.dumps(records))
    return path


def stage_config(stage: str, model_dir, data, out, *sets: str):
    base = [f"model.path={model_dir}", f"data.path={data}", f"output_dir={out}", *FAST]
    return load_config(CONFIGS / f"{stage}.yaml", base + list(sets))


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_only_groups_changed(before: dict, after: dict, trained: set[str]) -> None:
    assert before.keys() == after.keys()
    for name, old in before.items():
        same = torch.equal(old, after[name])
        if classify(name) in trained:
            assert not same, f"{name} ({classify(name)}) should have been trained"
        else:
            assert same, f"{name} ({classify(name)}) should be frozen, but changed"


def mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return {"images": write_records(root / "stage1.json", n_image=8),
            "mixed": write_records(root / "stage2.json", n_image=8, n_text=4)}


@pytest.fixture(scope="module")
def stage_runs(tiny_model_dir, data_files, tmp_path_factory):
    """Stage 1 from an init-model dir, then stage 2 from its result; 8 and 9 steps at a high lr."""
    root = tmp_path_factory.mktemp("stages")
    lr = ["groups.projector.lr=1e-2", "groups.visual_learner.lr=1e-2"]
    cfg1 = stage_config("wings_stage1", tiny_model_dir, data_files["images"], root / "s1",
                        "train.max_steps=8", "train.batch_size=4", "train.save_steps=100", *lr)
    before1 = params(load_stage_model(cfg1))
    r1 = train(cfg1)
    cfg2 = stage_config("wings_stage2", r1.final_dir, data_files["mixed"], root / "s2",
                        "train.max_steps=9", "train.batch_size=4", "train.save_steps=100",
                        "train.gradient_checkpointing=true", *lr, "groups.llm.lr=1e-3",
                        "groups.textual_learner.lr=5e-3", "groups.router.lr=5e-3")
    torch.manual_seed(cfg2.train.seed)  # the same fresh textual learners / router that train() starts from
    before2 = params(load_stage_model(cfg2))
    probe = CheckpointingProbe()
    r2 = train(cfg2, callbacks=[probe])
    return {"r1": r1, "r2": r2, "before1": before1, "before2": before2, "checkpointing": probe.seen}


class CheckpointingProbe(TrainerCallback):
    """Records whether the Trainer switched gradient checkpointing on in the decoder layers."""

    seen = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen = all(layer.gradient_checkpointing for layer in model.language_model.model.layers)


def test_stage1_then_stage2_losses_fall(stage_runs):
    r1, r2 = stage_runs["r1"], stage_runs["r2"]
    assert r1.steps == list(range(1, 9)) and r2.steps == list(range(1, 10))
    print("stage 1 losses", r1.losses, "\nstage 2 losses", r2.losses)
    # stage 1: 8 image records, 2 steps per epoch; stage 2: 12 records, 3 steps per epoch (2 image + 1 text)
    # Measured drops (first - last mean loss) over model/train seeds 0-4 x 1 and 2 threads: stage 1 0.45-0.69,
    # stage 2 0.47-0.56 (identical with either thread count at this size): the 0.3 bound keeps a >= 0.15 margin.
    assert mean(r1.losses[-2:]) < mean(r1.losses[:2]) - 0.3, r1.losses
    assert mean(r2.losses[-3:]) < mean(r2.losses[:3]) - 0.3, r2.losses


def test_stage1_trains_exactly_projector_and_visual_learners(stage_runs):
    r1 = stage_runs["r1"]
    assert set(r1.trainable) == {"projector", "visual_learner"}
    after = AutoModelForImageTextToText.from_pretrained(r1.final_dir)
    assert not after.config.use_textual_learner and not after.config.use_router
    assert_only_groups_changed(stage_runs["before1"], params(after), {"projector", "visual_learner"})


def test_stage2_adds_fresh_parts_and_trains_all_but_vision(stage_runs):
    r1, r2 = stage_runs["r1"], stage_runs["r2"]
    before = stage_runs["before2"]
    stage1 = params(AutoModelForImageTextToText.from_pretrained(r1.final_dir))
    for name, value in before.items():  # stage 2 starts from stage 1's weights, textual learners output 0
        if name in stage1:
            assert torch.equal(value, stage1[name]), name
        elif ".textual." in name and name.endswith("up.weight"):
            assert not value.any(), f"{name} should start at zero"
    trained = {"llm", "projector", "visual_learner", "textual_learner", "router"}
    assert set(r2.trainable) == trained
    after = AutoModelForImageTextToText.from_pretrained(r2.final_dir)
    assert after.config.use_textual_learner and after.config.use_router
    assert_only_groups_changed(before, params(after), trained)
    assert stage_runs["checkpointing"] is True  # stage 2 ran with (non-reentrant) gradient checkpointing
    processor = AutoProcessor.from_pretrained(r2.final_dir)
    assert processor.image_seq_length == after.config.image_seq_length
    assert json.loads((r2.output_dir / "data_report.json").read_text())


class StopAt(TrainerCallback):
    """Simulates an interruption: training stops right after step `step` (its checkpoint is written first)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, data_files, tmp_path):
    # 8 records, batch 2: 4 steps per epoch, so the resumed part crosses an epoch boundary.
    sets = ["train.max_steps=6", "train.batch_size=2", "train.save_steps=3", "groups.projector.lr=5e-3",
            "groups.visual_learner.lr=5e-3", "train.warmup_ratio=0.2", "train.resume=auto"]
    full = train(stage_config("wings_stage1", tiny_model_dir, data_files["images"], tmp_path / "a", *sets))
    cfg = stage_config("wings_stage1", tiny_model_dir, data_files["images"], tmp_path / "b", *sets)
    first = train(cfg, callbacks=[StopAt(3)])
    assert first.global_step == 3 and (tmp_path / "b" / "checkpoint-3" / "trainer_state.json").is_file()
    (tmp_path / "b" / "checkpoint-9").mkdir()  # a save killed halfway: no trainer_state.json, must be skipped
    second = train(cfg)
    assert second.resumed_from == tmp_path / "b" / "checkpoint-3"
    assert second.steps == [4, 5, 6]
    assert first.losses == full.losses[:3]
    assert second.losses == full.losses[3:]  # bit-exact, not approximately
    a = params(AutoModelForImageTextToText.from_pretrained(full.final_dir))
    b = params(AutoModelForImageTextToText.from_pretrained(second.final_dir))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not list((tmp_path / "b").glob(".final*"))  # the atomic final save left no temp dir behind


def test_cli_lora_stage2_saves_a_loadable_merged_model(stage_runs, data_files, tmp_path, capsys):
    stage1_dir = stage_runs["r1"].final_dir
    out = tmp_path / "lora"
    rc = wings_main([
        "train", "wings_stage2", "--model", str(stage1_dir), "--data", str(data_files["mixed"]),
        "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4",
        *[x for s in FAST for x in ("--set", s)], "--set", "train.save_steps=100",
        "--set", "lora.enabled=true", "--set", "groups.llm.train=false", "--set", "lora.r=4",
        "--set", "lora.lr=1e-2", "--set", "train.precision=bf16", "--set", "train.report_to=[tensorboard]",
    ])
    printed = capsys.readouterr().out
    assert rc == 0
    assert f"model + processor: {out / 'final'}" in printed and "lora" in printed
    assert f"TensorBoard logs: {out / 'runs'}" in printed and list((out / "runs").rglob("events.out.tfevents*"))
    merged = AutoModelForImageTextToText.from_pretrained(out / "final")
    after = params(merged)
    assert not any("lora_" in n for n in after)
    before = params(AutoModelForImageTextToText.from_pretrained(stage1_dir))
    attn = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[attn], before[attn])  # the adapters were folded into the base weights
    assert all(torch.equal(after[n], before[n]) for n in after if n.startswith("vision_tower."))
    assert merged.config.use_router


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert wings_main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    rc = wings_main(["train", "wings_stage1", "--model", str(tmp_path / "nope"), "--data", "x.json",
                     "--output-dir", str(tmp_path / "o"), "--set", "train.report_to=[]"])
    assert rc == 2 and "model.path" in (err := capsys.readouterr().err) and "nope does not exist" in err
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_llava_stage1_drops_learners_and_trains_only_the_projector(tiny_model_dir, data_files, tmp_path):
    cfg = stage_config("llava_stage1", tiny_model_dir, data_files["images"], tmp_path / "llava",
                       "train.max_steps=2", "train.batch_size=4", "train.save_steps=100")
    before = params(load_stage_model(cfg))  # a wings init dir, loaded with mode=llava
    assert not any(classify(n) in ("visual_learner", "textual_learner", "router") for n in before)
    result = train(cfg)
    after = AutoModelForImageTextToText.from_pretrained(result.final_dir)
    assert after.config.mode == "llava" and set(result.trainable) == {"projector"}
    assert_only_groups_changed(before, params(after), {"projector"})


def test_mode_switch_on_load_keeps_the_base_weights(tiny_llava_dir, tmp_path):
    cfg = load_config(CONFIGS / "wings_stage1.yaml", [f"model.path={tiny_llava_dir}", "model.overrides.mode=wings"])
    model = load_stage_model(cfg)
    base = params(AutoModelForImageTextToText.from_pretrained(tiny_llava_dir))
    loaded = params(model)
    for name, value in base.items():  # stock names in both modes
        assert torch.equal(value, loaded[name]), name
    assert any(".visual." in n for n in loaded) and not any(".textual." in n for n in loaded)


def test_learner_recompute_setting_reaches_the_model(tiny_model_dir):
    cfg = load_config(CONFIGS / "wings_stage2.yaml", [f"model.path={tiny_model_dir}",
                                                       "train.learner_recompute=projections",
                                                       "train.gradient_checkpointing=false"])
    model, _ = prepare_model(cfg)
    assert model.wings_kernels.learner_recompute == "projections"
