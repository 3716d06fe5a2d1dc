"""`wings demo --seeds N`: mean and range per cell, every seed's row, and the command line's checks."""

from __future__ import annotations

import pytest

from wings.cli import main as wings_main
from wings.demo.seeds import aggregate, per_seed_table, seeds_table


def _fake_results(seed: int, text: float, vqa: float, yesno: float) -> dict:
    """One seed's results.json, with only the cells the summary reads."""
    def stat(acc: float) -> dict:
        return {"accuracy": acc, "ci95": [acc - 0.05, acc + 0.05]}

    mllm = {"text_heldout": stat(text), "text_seen": stat(text + 0.1),
            "vqa_test": {**stat(vqa), "per_category": {"yesno": yesno, "colour": 0.9, "shape": 0.6},
                         "yes_rate": 0.5}}
    return {"seed": seed, "mode": "quick",
            "scores": {"base": {"text_heldout": stat(0.8), "text_seen": stat(0.95)}, "llava": mllm, "wings": mllm},
            "iit": {m: {"overall": stat(0.6)} for m in ("llava", "wings")},
            "laws": {m: {"attention_shift": 1.0 + seed / 10} for m in ("llava", "wings")}}


def test_aggregate_gives_mean_and_range_of_every_cell():
    runs = [_fake_results(0, 0.70, 0.80, 0.85), _fake_results(1, 0.60, 0.60, 0.48), _fake_results(2, 0.80, 0.70, 0.70)]
    summary = aggregate(runs)
    vqa = summary["wings"]["vqa_test"]
    assert vqa["values"] == [0.80, 0.60, 0.70] and vqa["min"] == 0.60 and vqa["max"] == 0.80
    assert vqa["mean"] == pytest.approx(0.70)
    assert summary["wings"]["vqa_yesno"]["min"] == 0.48
    assert summary["llava"]["attention_shift"]["max"] == pytest.approx(1.2)
    assert "vqa_test" not in summary["base"] and summary["base"]["text_heldout"]["mean"] == pytest.approx(0.8)

    table = seeds_table(summary, 3)
    assert "3 seeds" in table and "0.700 [0.60-0.80]" in table and "yesno" in table
    rows = per_seed_table(runs)
    assert rows.count("| wings |") == 3 and "| 1 | wings | 0.600 | 0.600 | 0.480 |" in rows


@pytest.mark.parametrize("flags, message", [(["--seeds", "0"], "--seeds must be at least 1"),
                                            (["--stage2-steps", "0"], "--stage2-steps must be a positive")])
def test_demo_rejects_bad_counts(tmp_path, capsys, flags, message):
    assert wings_main(["demo", "--quick", "--out", str(tmp_path / "d"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()
