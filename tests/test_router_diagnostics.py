"""Router diagnostics in every `wings train` run with a router: per logged step, in the logs and in a JSONL file,
with values that are exact where the router mode fixes them."""

from __future__ import annotations

import json
import math

import pytest
from transformers import TrainerCallback

from test_training_stages import stage_config, write_records
from wings.training import train
from wings.training.router_diagnostics import LOG_FILE, read_rows

KEYS = ("router/w_v_image_tokens", "router/w_v_text_tokens", "router/w_v_std", "router/w_v_std_in_layer",
        "router/entropy", "router/logit_gap")


class LogCapture(TrainerCallback):
    """Every dict the Trainer logs, as the callbacks after the diagnostics see it."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("router_diag")
    return write_records(root / "mixed.json", n_image=8, n_text=8)


def run_stage2(model_dir, data, out, *sets):
    capture = LogCapture()
    config = stage_config("wings_stage2", model_dir, data, out, "train.max_steps=4", "train.batch_size=4",
                          "train.save_steps=100", "groups.router.lr=1e-2", "groups.textual_learner.lr=1e-2",
                          *sets)
    result = train(config, callbacks=[capture])
    return result, read_rows(result.output_dir / LOG_FILE), [log for log in capture.logs if "loss" in log]


def test_learned_router_is_logged_every_step(tiny_model_dir, mixed_data, tmp_path):
    result, rows, logs = run_stage2(tiny_model_dir, mixed_data, tmp_path / "learned")
    assert [row["step"] for row in rows] == [1, 2, 3, 4] == [log.get("step", i + 1) for i, log in enumerate(logs)]
    # group_by_modality: each batch is all-image or all-text; 8 + 8 records in batches of 4 give both kinds
    image_steps = [row for row in rows if "router/w_v_image_tokens" in row]
    text_steps = [row for row in rows if "router/w_v_text_only" in row]
    assert image_steps and text_steps
    for row in image_steps:
        assert all(0.0 <= row[k] <= 1.0 for k in KEYS if k.startswith("router/w_v"))
        assert row["router/w_v_std_in_layer"] <= row["router/w_v_std"] + 1e-9  # pooling adds the layers' spread
        assert 0.0 <= row["router/entropy"] <= math.log(2) + 1e-6
        assert row["router/grad_norm"] > 0.0  # the router trains on image batches
        assert set(row["per_layer_w_v"]) == {"0", "1"}
    for row, log in zip(rows, logs, strict=True):  # the same figures reach the logged dict
        assert {k: v for k, v in log.items() if k.startswith("router/")} == pytest.approx(
            {k: v for k, v in row.items() if k.startswith("router/")}, abs=1e-6)


@pytest.mark.parametrize("mode, image, text_only", [("fixed", 0.5, 0.5), ("modality", 1.0, 0.0)])
def test_ablation_modes_log_their_exact_weights(tiny_model_dir, mixed_data, tmp_path, mode, image, text_only):
    _, rows, _ = run_stage2(tiny_model_dir, mixed_data, tmp_path / mode, f"model.overrides.router_mode={mode}",
                            "groups.router.train=false")
    saved = json.loads((tmp_path / mode / "final" / "config.json").read_text())
    assert saved["router_mode"] == mode  # the trained model keeps routing the way it was trained
    seen = set()
    for row in rows:
        for key in ("router/w_v_image_tokens", "router/w_v_text_tokens"):
            if key in row:
                assert row[key] == image
                seen.add(key)
        if "router/w_v_text_only" in row:
            assert row["router/w_v_text_only"] == text_only
            seen.add("text_only")
        if "router/w_v_std" in row:
            assert row["router/w_v_std"] == 0.0 and row["router/w_v_std_in_layer"] == 0.0
        assert "router/grad_norm" not in row  # a frozen router has no gradient to report
    assert seen == {"router/w_v_image_tokens", "router/w_v_text_tokens", "text_only"}


def test_llava_runs_get_no_router_diagnostics(tiny_llava_dir, mixed_data, tmp_path):
    config = stage_config("llava_stage2", tiny_llava_dir, mixed_data, tmp_path / "llava", "train.max_steps=2",
                          "train.batch_size=4", "train.save_steps=100")
    result = train(config)
    assert not (result.output_dir / LOG_FILE).exists()
