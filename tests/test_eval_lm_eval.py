"""lm-evaluation-harness adapter: `--model wings` on local offline tasks gives the same log-likelihoods and
generations as lm-eval's own `hf` model on the same base LLM, and runs a Wings MLLM dir through the module CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

from test_eval_common import save_base_llm  # noqa: E402

MC_YAML = """task: wings_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""
GEN_YAML = """task: wings_test_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
  cache_dir: {cache}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n", "<|im_end|>"], do_sample: false, max_gen_toks: 6}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: true}}
metadata: {{version: 1.0}}
"""


@pytest.fixture(scope="module")
def harness(tiny_llava_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    (root / "data").mkdir()
    with open(root / "data" / "mc.jsonl", "w") as f:
        for k in range(6):
            f.write(json.dumps({"question": f"what is {k} + 3?", "choices": [str(k + 3), str(k + 4), " blue"],
                                "label": k % 3}) + "\n")
    with open(root / "data" / "gen.jsonl", "w") as f:
        for k in range(4):
            f.write(json.dumps({"question": f"what colour is shape {k}?", "answer": "red"}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    fmt = {"data": root / "data", "cache": root / "hf_cache"}
    (tasks / "wings_test_mc.yaml").write_text(MC_YAML.format(**fmt))
    (tasks / "wings_test_gen.yaml").write_text(GEN_YAML.format(**fmt))
    base = save_base_llm(tiny_llava_dir, root / "base")
    return root, tasks, base


def evaluate(model: str, pretrained, tasks_dir, **model_args):
    from lm_eval.tasks import TaskManager

    import wings.evaluation.lm_eval_adapter  # noqa: F401  (registers "wings")

    return lm_eval.simple_evaluate(
        model=model, model_args={"pretrained": str(pretrained), **model_args},
        tasks=["wings_test_mc", "wings_test_gen"], task_manager=TaskManager(include_path=str(tasks_dir)),
        device="cpu", batch_size=4, log_samples=True,
    )


@pytest.fixture(scope="module")
def ours(harness):
    root, tasks, base = harness
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(root / "hf_home"))
        return evaluate("wings", base, tasks)


def test_same_as_builtin_hf(harness, ours, monkeypatch):
    root, tasks, base = harness
    monkeypatch.setenv("HF_HOME", str(root / "hf_home"))
    theirs = evaluate("hf", base, tasks, dtype="float32")  # built-ins still resolve after our registration
    for task in ("wings_test_mc", "wings_test_gen"):
        a, b = ours["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) > 0
        for sa, sb in zip(a, b, strict=True):
            if task.endswith("mc"):
                for (lla, ga), (llb, gb) in zip([r[0] for r in sa["resps"]], [r[0] for r in sb["resps"]],
                                                strict=True):
                    assert float(lla) == pytest.approx(float(llb), abs=1e-4) and ga == gb
            else:
                assert sa["resps"] == sb["resps"]
        metrics = {k: v for k, v in theirs["results"][task].items() if isinstance(v, float)}
        assert metrics and all(ours["results"][task][k] == pytest.approx(v) for k, v in metrics.items())


def test_loglikelihood_rolling_matches_hf(harness):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from wings.evaluation.lm_eval_adapter import WingsLM

    _, _, base = harness
    text = "what is the colour of the shape in the picture? it is a red circle, then a blue triangle."
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0), Instance("loglikelihood_rolling", {}, ("hi",), 1)]
    for max_length in (8, 512):  # several windows, then one
        ours = WingsLM(pretrained=str(base), max_length=max_length).loglikelihood_rolling(requests, disable_tqdm=True)
        theirs = HFLM(pretrained=str(base), max_length=max_length, device="cpu", dtype="float32",
                      batch_size=2).loglikelihood_rolling(requests, disable_tqdm=True)
        assert ours == pytest.approx(theirs, abs=1e-3)


def test_module_cli_on_a_wings_dir(harness, ours, tiny_model_dir, tmp_path):
    root, tasks, base = harness
    env = {**os.environ, "HF_HOME": str(root / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "wings.evaluation.lm_eval_adapter", "run", "--model", "wings",
           "--model_args", f"pretrained={tiny_model_dir}", "--tasks", "wings_test_mc,wings_test_gen",
           "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result_file,) = tmp_path.rglob("results_*.json")
    results = json.loads(result_file.read_text())["results"]
    base_results = ours["results"]  # fresh learners: the Wings dir scores like its base LLM
    assert results["wings_test_mc"]["acc,none"] == base_results["wings_test_mc"]["acc,none"]
    assert results["wings_test_gen"]["exact_match,none"] == base_results["wings_test_gen"]["exact_match,none"]
