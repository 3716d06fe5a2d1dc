"""The demo's quiet console: intended learner changes give a one-line note, real load problems still show."""

from __future__ import annotations

import io
import json
import sys

from safetensors.torch import load_file, save_file

from wings.demo.console import DemoConsole, expect_load_changes, intended_load_changes, load_note
from wings.modeling import WingsForConditionalGeneration


def _stage1_dir(make_tiny, tmp_path):
    """A saved stage-1-shaped Wings model: visual learners only (no textual learner, no router)."""
    from wings.builder import save

    model, processor = make_tiny(use_textual_learner=False, use_router=False)
    return save(model, processor, tmp_path / "stage1")


def _load_in_block(console: DemoConsole, path, overrides: dict):
    added, dropped = intended_load_changes(path, overrides)
    with console.block("load"), expect_load_changes(added, dropped):
        return WingsForConditionalGeneration.from_pretrained(path, **overrides)


def test_intended_changes_are_named_from_the_configs(make_tiny, tmp_path):
    stage1 = _stage1_dir(make_tiny, tmp_path)
    stage2 = {"use_textual_learner": True, "use_router": True}
    assert intended_load_changes(stage1, stage2) == (["textual", "router"], [])
    assert intended_load_changes(stage1, {"mode": "llava"}) == ([], ["visual"])
    assert intended_load_changes(stage1, {}) == ([], [])
    assert load_note("wings_stage2", ["textual", "router"], []) == (
        "wings_stage2: adds fresh textual learners and router (as the recipe intends)")
    assert load_note("llava_stage1", [], []) is None


def test_intended_load_is_quiet_and_a_really_missing_key_is_reported(make_tiny, tmp_path):
    stage1 = _stage1_dir(make_tiny, tmp_path)
    stage2 = {"use_textual_learner": True, "use_router": True}
    console_out = io.StringIO()
    console = DemoConsole(tmp_path / "logs", progress=False, stream=console_out, bar_stream=io.StringIO())

    # Stage 2 adds textual learners and a router on purpose: no load table anywhere on the console.
    model = _load_in_block(console, stage1, stage2)
    assert model.config.use_router and "LOAD REPORT" not in console_out.getvalue()
    assert "MISSING" not in console_out.getvalue()
    # The patterns are lifted again afterwards, and were never about other keys.
    assert WingsForConditionalGeneration._keys_to_ignore_on_load_missing is None

    # A checkpoint that lost a projector weight: that key should load and does not, so the console says so.
    weights_file = next(stage1.glob("*.safetensors"))
    weights = load_file(weights_file)
    lost = next(k for k in weights if k.startswith("projector."))
    save_file({k: v for k, v in weights.items() if k != lost}, weights_file, metadata={"format": "pt"})
    _load_in_block(console, stage1, stage2)
    shown = console_out.getvalue()
    assert "LOAD REPORT" in shown and "MISSING" in shown and lost.split(".")[0] in shown
    assert "self_attn.textual" not in shown and "self_attn.router" not in shown  # still only the real problem
    assert "LOAD REPORT" in (tmp_path / "logs" / "load.log").read_text()  # and the log file keeps it too


def test_block_sends_prints_and_library_chatter_to_its_log_file(tmp_path):
    console_out, bars = io.StringIO(), io.StringIO()
    console = DemoConsole(tmp_path / "logs", progress=True, stream=console_out, bar_stream=bars)
    real_stdout = sys.stdout
    with console.block("stage", total=3) as bar:
        print({"loss": 1.0, "grad_norm": 0.5})  # what the Trainer prints per step
        print("progress noise", file=sys.stderr)
        for _ in range(3):
            bar.update(1)
            bar.loss(0.25)
    assert sys.stdout is real_stdout
    console.note("stage: done")
    log = (tmp_path / "logs" / "stage.log").read_text()
    assert "'grad_norm': 0.5" in log and "progress noise" in log
    assert "grad_norm" not in console_out.getvalue() and console_out.getvalue() == "stage: done\n"
    assert "3/3" in bars.getvalue() and "loss=0.250" in bars.getvalue()
    assert json.dumps("stage: done")[1:-1] in (tmp_path / "logs" / "demo.log").read_text()
