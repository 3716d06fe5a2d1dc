"""Hostile input to `wings train`: bad configs and flags, wrong kinds of path, outputs over inputs, reruns that
would mix two runs, corrupt checkpoints, a full disk mid-save, Ctrl-C / SIGTERM, hardware the precision needs.
Each case: a clear error naming the setting or file (exit 2, no traceback), or a handled result; nothing
destroyed, nothing half-written taken for complete, no silent change."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

from hostile_support import (
    assert_ok,
    assert_refused,
    assert_refused_untouched,
    copy_dir,
    enospc_midway,
    hidden_leftovers,
    latin1,
    other_train_data,
    snapshot,
    train_args,
    train_data,
    truncate,
    wings,
    write_json,
)


def _file(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _config(tmp: Path, text: str | bytes) -> Path:
    path = tmp / "stage.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _set(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


# (id, argv builder (tmp, model_dir) -> argv, needles). All refused before a model is built or a file written.
CASES = [
    ("config_is_a_directory", lambda t, m: ["train", t], ["training config", "is a directory"]),
    ("config_missing", lambda t, m: ["train", t / "nope.yaml"], ["nope.yaml does not exist"]),
    ("config_latin1", lambda t, m: ["train", latin1(t / "s.yaml", "stage: caf\u00e9\n")], ["s.yaml", "not UTF-8"]),
    ("config_bad_yaml", lambda t, m: ["train", _config(t, "stage: [unclosed")], ["not valid YAML"]),
    ("config_a_list", lambda t, m: ["train", _config(t, "- a\n- b\n")], ["expected a mapping"]),
    ("config_unknown_key", lambda t, m: ["train", _config(t, "stagee: x\n")], ["unknown key", "stagee"]),
    ("set_without_equals", lambda t, m: train_args(m, train_data(), t / "o", "--set", "train.lr"), ["key=value"]),
    ("lr_not_a_number", lambda t, m: train_args(m, train_data(), t / "o", *_set("train.lr=fast")),
     ["train.lr must be a number"]),
    ("resume_yes", lambda t, m: train_args(m, train_data(), t / "o", "--resume", "yes"),
     ["train.resume 'yes'", "neither 'auto', 'none' nor an existing checkpoint"]),
    ("resume_yaml_true", lambda t, m: train_args(m, train_data(), t / "o", *_set("train.resume=yes")),
     ["train.resume must be a string", "YAML"]),
    ("resume_missing", lambda t, m: train_args(m, train_data(), t / "o", "--resume", t / "ckpt"),
     ["neither 'auto', 'none' nor an existing checkpoint"]),
    ("resume_a_file", lambda t, m: train_args(m, train_data(), t / "o", "--resume", _file(t / "ckpt")),
     ["train.resume", "is a file"]),
    ("resume_not_a_checkpoint", lambda t, m: train_args(m, train_data(), t / "o", "--resume", t),
     ["no trainer_state.json"]),
    ("max_steps_zero", lambda t, m: train_args(m, train_data(), t / "o", steps=0), ["--max-steps", "positive"]),
    ("batch_size_zero", lambda t, m: train_args(m, train_data(), t / "o", *_set("train.batch_size=0")),
     ["train.batch_size must be >= 1"]),
    ("max_length_tiny", lambda t, m: train_args(m, train_data(), t / "o", *_set("data.max_length=4")),
     ["data.max_length"]),
    ("policy_unknown", lambda t, m: train_args(m, train_data(), t / "o", *_set("data.policy=ignore")),
     ["data.policy"]),
    ("text_mix_ratio_one", lambda t, m: train_args(m, train_data(), t / "o", *_set("data.text_mix_ratio=1")),
     ["data.text_mix_ratio"]),
    ("override_typo", lambda t, m: train_args(m, train_data(), t / "o", *_set("model.overrides.use_routr=true")),
     ["unknown WingsConfig field", "use_routr"]),
    ("group_unknown", lambda t, m: train_args(m, train_data(), t / "o", *_set("groups.lm.train=true")),
     ["unknown parameter group"]),
    ("extra_args_unknown", lambda t, m: train_args(m, train_data(), t / "o", *_set("train.extra_args.lr=1")),
     ["train.extra_args", "'lr'"]),
    ("scheduler_unknown", lambda t, m: train_args(m, train_data(), t / "o", *_set("train.lr_scheduler=wavy")),
     ["train.lr_scheduler 'wavy'"]),
    ("seed_negative", lambda t, m: train_args(m, train_data(), t / "o", *_set("train.seed=-1")), ["train.seed"]),
    ("report_to_not_installed", lambda t, m: train_args(m, train_data(), t / "o",
                                                          *_set("train.report_to=[no_such_logger_pkg]")),
     ["train.report_to", "no_such_logger_pkg"]),
    ("deepspeed_missing", lambda t, m: train_args(m, train_data(), t / "o", "--deepspeed", t / "ds.json"),
     ["train.deepspeed", "does not exist"]),
    ("model_missing", lambda t, m: train_args(t / "nope", train_data(), t / "o"), ["model.path", "does not exist"]),
    ("model_a_file", lambda t, m: train_args(_file(t / "m.bin"), train_data(), t / "o"), ["model.path", "is a file"]),
    ("data_missing", lambda t, m: train_args(m, t / "nope.json", t / "o"), ["data.path", "does not exist"]),
    ("data_a_directory", lambda t, m: train_args(m, t, t / "o"), ["data.path", "is a directory"]),
    ("data_empty_path", lambda t, m: train_args(m, train_data(), t / "o", *_set("data.path=")), ["data.path"]),
    ("data_latin1_json", lambda t, m: train_args(m, latin1(t / "d.json", '[{"id": "caf\u00e9"}]'), t / "o"),
     ["d.json", "not UTF-8"]),
    ("data_not_json", lambda t, m: train_args(m, _file(t / "d.json", "[{"), t / "o"), ["not valid JSON"]),
    ("data_an_object", lambda t, m: train_args(m, _file(t / "d.json", "{}"), t / "o"), ["expected a list"]),
    ("data_empty_list", lambda t, m: train_args(m, _file(t / "d.json", "[]"), t / "o"), ["no usable record"]),
    ("data_all_bad", lambda t, m: train_args(m, write_json(t / "d.json", [{"id": 1}]), t / "o"),
     ["no usable record", "bad_fields=1"]),
    ("image_root_a_file", lambda t, m: train_args(m, train_data(), t / "o", "--image-root", _file(t / "root")),
     ["data.image_root", "is a file"]),
    ("text_mix_missing", lambda t, m: train_args(m, train_data(), t / "o", *_set(f"data.text_mix_path={t}/x.json")),
     ["data.text_mix_path", "does not exist"]),
    ("output_dir_a_file", lambda t, m: train_args(m, train_data(), _file(t / "o")), ["output_dir", "is a file"]),
    ("output_dir_is_the_model", lambda t, m: train_args(copy_dir(m, t / "m"), train_data(), t / "m"),
     ["is the model.path"]),
    ("output_dir_inside_the_model", lambda t, m: train_args(copy_dir(m, t / "m"), train_data(), t / "m" / "run"),
     ["inside the model.path"]),
    ("final_is_the_model", lambda t, m: train_args(copy_dir(m, t / "run" / "final"), train_data(), t / "run"),
     ["final/", "is the model.path"]),
    ("model_in_a_checkpoint", lambda t, m: train_args(copy_dir(m, t / "run" / "checkpoint-5" / "m"), train_data(),
                                                      t / "run"), ["checkpoint-5", "contains the model.path"]),
    ("data_is_the_report", lambda t, m: train_args(m, write_json(t / "run" / "data_report.json", []), t / "run"),
     ["data_report.json", "is the data.path"]),
]


@pytest.mark.parametrize(("build", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_or_paths_are_refused_before_anything_is_written(tmp_path, capsys, tiny_model_dir, build,
                                                                     needles):
    args = build(tmp_path, tiny_model_dir)
    # no train_config.yaml / data_report.json / run folder written
    assert_refused_untouched(capsys, tmp_path, args, "train", *needles)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_without_a_gpu_names_the_settings(tmp_path, capsys, monkeypatch, tiny_model_dir, precision):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sets = _set(f"train.precision={precision}", "train.use_cpu=false")
    assert_refused(wings(capsys, *train_args(tiny_model_dir, train_data(), tmp_path / "o", *sets)), "train",
                   f"train.precision={precision}", "train.use_cpu" if precision == "bf16" else "fp32")


def test_a_model_config_without_text_config_is_refused_not_built_default_sized(tmp_path, capsys, tiny_model_dir):
    model = copy_dir(tiny_model_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    del config["text_config"]
    (model / "config.json").write_text(json.dumps(config))
    assert_refused(wings(capsys, *train_args(model, train_data(), tmp_path / "o")), "train", "text_config",
                   "default-sized")


# ---------------------------------------------------------------------------------------------------------------
# Reruns and resumes: the same run continues; anything else is refused by name.


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A run of 2 steps with a checkpoint after each (one folder per module; tests copy it before changing it)."""
    from wings.cli import main

    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([str(a) for a in train_args(tiny_model_dir, train_data(), out, *_set("train.save_steps=1"))]) == 0
    assert (out / "checkpoint-2").is_dir() and (out / "final" / "model.safetensors").is_file()
    return out


def rerun(capsys, model, run, *extra, data=None):
    return wings(capsys, *train_args(model, data or train_data(), run, *_set("train.save_steps=1"), *extra))


def test_rerunning_a_finished_run_trains_nothing_and_keeps_final(finished_run, tmp_path, capsys, tiny_model_dir):
    run = copy_dir(finished_run, tmp_path / "run")
    before = snapshot(run)
    out = assert_ok(rerun(capsys, tiny_model_dir, run)).out
    assert "nothing to do, the run finished at step 2" in out and "checkpoint-2" in out
    assert snapshot(run) == before  # final/, train_config.yaml, data_report.json: untouched


@pytest.mark.parametrize(("change", "needles"), [
    ("new_data_and_lr", ["data.path", "groups.projector.lr 2e-05 -> 0.003"]),
    ("edited_data", ["the contents of data.path changed"]),
    ("more_steps", ["train.max_steps 2 -> 3"]),
    ("new_seed", ["train.seed 42 -> 7"]),
    ("new_start_model", ["the start model's weights"]),
])
def test_a_rerun_with_other_settings_or_data_is_refused_naming_them(finished_run, tmp_path, capsys,
                                                                     tiny_model_dir, change, needles):
    run = copy_dir(finished_run, tmp_path / "run")
    model, data, extra = tiny_model_dir, train_data(), []
    if change == "new_data_and_lr":
        data, extra = other_train_data(), [*_set("groups.projector.lr=3e-3")]
    elif change == "edited_data":
        data = write_json(tmp_path / "d.json", json.loads(train_data().read_text()))
        run = _retarget(run, data)
        records = json.loads(data.read_text())
        records[0]["conversations"][1]["value"] = "a different answer"
        data.write_text(json.dumps(records))
    elif change == "more_steps":
        extra.append("--max-steps=3")
    elif change == "new_seed":
        extra += _set("train.seed=7")
    elif change == "new_start_model":
        model = copy_dir(tiny_model_dir, tmp_path / "m")
        run = _retarget(run, None, model)
        weights = model / "model.safetensors"
        data_bytes = bytearray(weights.read_bytes())
        data_bytes[-1000] ^= 0xFF
        weights.write_bytes(bytes(data_bytes))
    before = snapshot(run)
    line = assert_refused(rerun(capsys, model, run, *extra, data=data), "train", "started with other settings",
                          *needles)
    assert "--output-dir" in line and "--overwrite" in line and "checkpoint-2" in line
    assert snapshot(run) == before  # train_config.yaml and data_report.json still describe the old run


def test_a_moved_but_identical_data_file_or_model_is_the_same_run(finished_run, tmp_path, capsys, tiny_model_dir):
    run = copy_dir(finished_run, tmp_path / "run")
    data = write_json(tmp_path / "moved" / "train.json", json.loads(train_data().read_text()))
    data.write_bytes(train_data().read_bytes())  # byte-identical copy elsewhere
    model = copy_dir(tiny_model_dir, tmp_path / "moved_model")
    out = assert_ok(rerun(capsys, model, run, data=data)).out
    assert "nothing to do, the run finished at step 2" in out


def _retarget(run: Path, data: Path | None, model: Path | None = None) -> Path:
    """Make the copied run's recorded identity point at a copy of its data / model (same content)."""
    from wings.training.identity import IDENTITY_FILE

    identity = json.loads((run / IDENTITY_FILE).read_text())
    if data is not None:
        identity["settings"]["data.path"] = str(data.resolve())
    if model is not None:
        identity["settings"]["model.path"] = str(model.resolve())
    (run / IDENTITY_FILE).write_text(json.dumps(identity))
    return run


def test_a_fresh_start_over_an_old_run_needs_overwrite(finished_run, tmp_path, capsys, tiny_model_dir):
    run = copy_dir(finished_run, tmp_path / "run")
    before = snapshot(run)
    assert_refused(rerun(capsys, tiny_model_dir, run, "--resume", "none"), "train", "already holds a run",
                   "--overwrite", "--resume auto")
    assert snapshot(run) == before
    out = assert_ok(rerun(capsys, tiny_model_dir, run, "--resume", "none", "--overwrite",
                          data=other_train_data())).out
    assert "replacing the earlier run" in out and "trained 2 steps this run" in out
    report = json.loads((run / "data_report.json").read_text())
    assert str(other_train_data()) in report["kept_by_file"]  # the report describes the new data only


def test_resuming_another_runs_checkpoint_checks_its_identity(finished_run, tmp_path, capsys, tiny_model_dir):
    ckpt = finished_run / "checkpoint-1"
    assert_refused(rerun(capsys, tiny_model_dir, tmp_path / "new", "--resume", ckpt, *_set("train.seed=3")),
                   "train", "train.seed 42 -> 3")
    out = assert_ok(rerun(capsys, tiny_model_dir, tmp_path / "new", "--resume", ckpt)).out
    assert f"resuming from {ckpt} (step 1 of 2)" in out and "trained 1 steps this run" in out


@pytest.mark.parametrize(("damage", "needles"), [
    ("truncated_optimizer", ["checkpoint-2", "optimizer.pt is corrupt or truncated"]),
    ("garbage_scheduler", ["scheduler.pt is corrupt or truncated"]),
    ("truncated_weights", ["checkpoint-2", "model.safetensors is corrupt or truncated"]),
])
def test_a_corrupt_checkpoint_is_named_not_loaded(finished_run, tmp_path, capsys, tiny_model_dir, damage, needles):
    run = copy_dir(finished_run, tmp_path / "run")
    ckpt = run / "checkpoint-2"
    if damage == "truncated_optimizer":
        truncate(ckpt / "optimizer.pt", 0.6)
    elif damage == "garbage_scheduler":
        (ckpt / "scheduler.pt").write_bytes(b"\x00" * 100)
    else:
        truncate(ckpt / "model.safetensors", 0.7)
    before = snapshot(run)
    assert_refused(rerun(capsys, tiny_model_dir, run), "train", *needles)
    assert snapshot(run) == before


def test_an_unfinished_checkpoint_save_is_skipped_and_cleared(finished_run, tmp_path, capsys, tiny_model_dir):
    run = copy_dir(finished_run, tmp_path / "run")
    (run / "checkpoint-2" / "trainer_state.json").unlink()  # the save stopped before its last file
    import shutil

    shutil.rmtree(run / "final")
    out = assert_ok(rerun(capsys, tiny_model_dir, run)).out
    assert "removing 1 incomplete checkpoint(s)" in out and "resuming from" in out and "checkpoint-1" in out
    assert "trained 1 steps this run, now at step 2" in out
    assert (run / "checkpoint-2" / "trainer_state.json").is_file() and (run / "final" / "config.json").is_file()


def test_a_run_from_before_identities_resumes_with_a_note(finished_run, tmp_path, capsys, tiny_model_dir):
    run = copy_dir(finished_run, tmp_path / "run")
    (run / "run_identity.json").unlink()
    out = assert_ok(rerun(capsys, tiny_model_dir, run)).out
    assert "cannot check" in out and "nothing to do" in out


# ---------------------------------------------------------------------------------------------------------------
# Interruptions and a full disk: checkpoints that are complete survive; nothing partial is taken for complete.


class Interrupt(TrainerCallback):
    def __init__(self, at_step: int, how: str):
        self.at_step, self.how = at_step, how

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["ctrl_c", "sigterm"])
def test_an_interrupted_run_exits_cleanly_and_resumes_where_it_stopped(tmp_path, capsys, monkeypatch,
                                                                         tiny_model_dir, how):
    import wings.training

    real_train = wings.training.train
    monkeypatch.setattr(wings.training, "train", lambda config: real_train(config, callbacks=[Interrupt(1, how)]))
    run = tmp_path / "run"
    outcome = rerun(capsys, tiny_model_dir, run, "--max-steps=3")
    assert "Traceback" not in outcome.err
    if how == "ctrl_c":
        assert outcome.rc == 130 and "interrupted" in outcome.err and "--resume auto" in outcome.err
    else:
        assert outcome.rc == 143 and "terminated (SIGTERM)" in outcome.err
    assert (run / "checkpoint-1" / "trainer_state.json").is_file() and not (run / "final").exists()
    if how == "sigterm":
        return
    monkeypatch.setattr(wings.training, "train", real_train)
    out = assert_ok(rerun(capsys, tiny_model_dir, run, "--max-steps=3")).out
    assert "resuming from" in out and "checkpoint-1 (step 1 of 3)" in out and "trained 2 steps this run" in out


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch, tiny_model_dir):
    import transformers.modeling_utils as mu

    real = mu.safe_save_file
    calls = []

    def fill_up_on_second_save(tensors, filename, metadata=None):
        calls.append(filename)
        real(tensors, filename, metadata=metadata)
        if len(calls) == 2:
            truncate(Path(filename))
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(mu, "safe_save_file", fill_up_on_second_save)
    run = tmp_path / "run"
    assert_refused(rerun(capsys, tiny_model_dir, run), "train", "cannot write", "no space left")
    assert (run / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (run / "checkpoint-2" / "trainer_state.json").exists() and not (run / "final").exists()
    monkeypatch.setattr(mu, "safe_save_file", real)
    out = assert_ok(rerun(capsys, tiny_model_dir, run)).out
    assert "removing 1 incomplete checkpoint(s) of an interrupted save: checkpoint-2" in out
    assert "checkpoint-1 (step 1 of 2)" in out and (run / "final" / "model.safetensors").is_file()


def test_a_full_disk_while_writing_final_leaves_no_half_final(finished_run, tmp_path, capsys, monkeypatch,
                                                               tiny_model_dir):
    import shutil

    run = copy_dir(finished_run, tmp_path / "run")
    shutil.rmtree(run / "final")  # as if the first attempt died before final/: the rerun writes it
    enospc_midway(monkeypatch)
    assert_refused(rerun(capsys, tiny_model_dir, run), "train", "no space left")
    assert not (run / "final").exists() and not hidden_leftovers(run)
    monkeypatch.undo()  # the disk has room again
    out = assert_ok(rerun(capsys, tiny_model_dir, run)).out
    assert "writing final/ from checkpoint-2" in out and (run / "final" / "model.safetensors").is_file()


def test_a_full_disk_at_the_first_write_leaves_no_run_files(tmp_path, capsys, monkeypatch, tiny_model_dir):
    from wings import atomic

    def no_space(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "_fsync", no_space)
    line = assert_refused(rerun(capsys, tiny_model_dir, tmp_path / "run"), "train", "no space left")
    assert "run_identity.json" in line and ".tmp" not in line  # the message names the file, not its temp copy
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]  # nothing (half-)written remains


def test_flag_values_stay_strings_in_the_config():
    """A path named like a YAML keyword (yes, null, 2024) stays a path: the flags quote their values."""
    from wings.cli.train import _yaml_value

    for flag, value in [("output_dir", "yes"), ("model", "null"), ("data", "2024"), ("resume", "on")]:
        assert yaml.safe_load(_yaml_value(flag, value)) == value
