"""lm-eval's `local-chat-completions` model scores a local generative task through `wings serve`, with
concurrent requests, unchanged: its answers are the server's answers and the score follows from them."""
# ruff: noqa: F811  (pytest fixtures imported from test_serve_common are redefined as arguments)

from __future__ import annotations

import json

import pytest
import requests

from test_serve_common import running, wings_pair  # noqa: F401

lm_eval = pytest.importorskip("lm_eval")

TASK = """task: wings_serve_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], do_sample: false, max_gen_toks: 6}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""
QUESTIONS = ["what is 2 + 3?", "name a colour", "what shape is a ball?", "is the sky green?", "count to three",
             "what is 7 + 1?"]


def server_answer(url: str, question: str) -> str:
    """What lm-eval's chat-completions model sends for one document (greedy, stop at a newline)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": 6, "temperature": 0,
            "stop": ["\n"], "seed": 1234}
    return requests.post(url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"][
        "content"]


def test_lm_eval_chat_completions_scores_a_task_through_the_server(wings_pair, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with running([("tiny", wings_pair)], max_batch_size=4) as (url, server):
        answers = [server_answer(url, q) for q in QUESTIONS]
        assert all(a and a.strip() == a for a in answers[::2]), answers  # usable as exact targets
        # even documents expect exactly the model's answer, odd ones something it never says: score 0.5
        with open(tmp_path / "gen.jsonl", "w") as f:
            for i, question in enumerate(QUESTIONS):
                f.write(json.dumps({"question": question, "answer": answers[i] if i % 2 == 0 else "zzz-never"}) + "\n")
        tasks = tmp_path / "tasks"
        tasks.mkdir()
        (tasks / "wings_serve_gen.yaml").write_text(TASK.format(data=tmp_path / "gen.jsonl", cache=tmp_path / "c"))
        waves_before = server.schedulers["tiny"].stats()["waves"]
        results = lm_eval.simple_evaluate(
            model="local-chat-completions",
            model_args={"base_url": url + "/v1/chat/completions", "model": "tiny", "num_concurrent": 3,
                        "max_retries": 1, "tokenized_requests": False},
            tasks=["wings_serve_gen"], task_manager=TaskManager(include_path=str(tasks)), apply_chat_template=True,
            log_samples=True,
        )
        served = server.schedulers["tiny"].stats()["waves"] - waves_before
    samples = sorted(results["samples"]["wings_serve_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == answers
    assert results["results"]["wings_serve_gen"]["exact_match,none"] == pytest.approx(0.5)
    assert 0 < served <= len(QUESTIONS)  # every document went through the server
