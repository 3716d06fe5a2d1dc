"""`wings study --resume` with a subset of variants keeps what earlier runs of the seed finished in its results.

A seed can then be completed a few variants at a time (the README's study ran its seeds that way) without the
last run's results.json forgetting the variants, or the interpolation curve, of the runs before it.
"""

import json

from wings.demo.study import _keep_earlier

PLAN = {"mode": "study", "stages": {"s": {"steps": 3, "lrs": {"llm": 0.001}}}, "llm_layers": 4}


def _write(seed_dir, variants, interp, seconds=10.0, plan=PLAN):
    seed_dir.mkdir(parents=True, exist_ok=True)
    (seed_dir / "results.json").write_text(json.dumps(
        {"seed": 0, "plan": plan, "variants": variants, "interp": interp, "seconds": seconds}))


def test_a_later_subset_keeps_the_earlier_variants_and_curve(tmp_path):
    llava, wings = {"scores": {"a": 1}}, {"scores": {"a": 2}}
    _write(tmp_path, {"llava": llava, "wings": wings}, {"0": {"x": 1}}, seconds=100.0)
    lora = {"scores": {"a": 3}}
    variants, curve, seconds = _keep_earlier(tmp_path, PLAN, {"lora": lora}, None)
    assert variants == {"llava": llava, "lora": lora, "wings": wings}
    assert curve == {"0": {"x": 1}} and seconds == [100.0]


def test_a_rerun_variant_replaces_the_earlier_one_and_a_new_llava_drops_the_old_curve(tmp_path):
    _write(tmp_path, {"llava": {"scores": {"a": 1}}, "wings": {"scores": {"a": 2}}}, {"0": {"x": 1}})
    new_llava = {"scores": {"a": 9}}
    variants, curve, _ = _keep_earlier(tmp_path, PLAN, {"llava": new_llava}, None)
    assert variants["llava"] == new_llava and variants["wings"] == {"scores": {"a": 2}}
    assert curve is None  # the old curve mixed toward the old llava


def test_another_plan_or_no_earlier_results_keeps_nothing(tmp_path):
    assert _keep_earlier(tmp_path, PLAN, {"lora": {}}, None) == ({"lora": {}}, None, [])
    _write(tmp_path, {"wings": {}}, {"0": {}}, plan={**PLAN, "llm_layers": 8})
    assert _keep_earlier(tmp_path, PLAN, {"lora": {}}, None) == ({"lora": {}}, None, [])
    (tmp_path / "results.json").write_text("{not json")
    assert _keep_earlier(tmp_path, PLAN, {"lora": {}}, None) == ({"lora": {}}, None, [])
