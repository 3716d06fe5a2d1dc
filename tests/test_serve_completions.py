"""`/v1/completions`: log-probabilities (echoed prompt and generated tokens) equal the model's own, several
prompts per request, text-only; and lm-eval's `local-completions` model scores a multiple-choice task through the
server with the accuracy (and per-option log-likelihoods) `wings eval` gives on the same model and task."""
# ruff: noqa: F811  (pytest fixtures imported from test_serve_common are redefined as arguments)

from __future__ import annotations

import json

import pytest
import requests
import torch

from test_serve_common import running, wings_dir, wings_pair  # noqa: F401  (fixtures)

pytest.importorskip("fastapi")


def model_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(token_t | tokens_<t) at every position: [T, V] (row t predicts token t+1)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_completions_logprobs_are_the_models_own(wings_pair):
    model, processor = wings_pair
    tokenizer = processor.tokenizer
    text = "the colour of the sky at night is"
    ids = tokenizer(text)["input_ids"]
    with running([("tiny", wings_pair)]) as (url, _):
        reply = requests.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 4, "echo": True,
                                                              "logprobs": 3, "temperature": 0}, timeout=60)
        plain = requests.post(url + "/v1/completions", json={"prompt": [text, "hello"], "max_tokens": 3},
                              timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "text_completion" and body["usage"]["prompt_tokens"] == len(ids)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    n_new = body["usage"]["completion_tokens"]
    assert len(lp["token_logprobs"]) == len(ids) + n_new and lp["token_logprobs"][0] is None
    generated = []
    for _ in range(n_new):  # greedy, as the server decodes at temperature 0 (image placeholders never chosen)
        scores = model_logprobs(model, ids + generated)[-1]
        scores[model.config.image_token_id] = float("-inf")
        generated.append(int(scores.argmax()))
    whole = model_logprobs(model, ids + generated)
    assert lp["tokens"] == [tokenizer.decode([t]) for t in ids + generated]
    for t in range(1, len(ids) + n_new):
        token = (ids + generated)[t]
        assert lp["token_logprobs"][t] == pytest.approx(float(whole[t - 1, token]), abs=1e-4), t
        top = torch.topk(whole[t - 1], 3)
        best: dict[str, float] = {}
        for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True):  # pieces that decode alike: max
            best[tokenizer.decode([i])] = max(v, best.get(tokenizer.decode([i]), float("-inf")))
        for piece, value in best.items():
            assert lp["top_logprobs"][t][piece] == pytest.approx(value, abs=1e-4)
    for t in range(len(ids), len(ids) + n_new):  # greedy: each generated token is the most likely one
        assert lp["token_logprobs"][t] == pytest.approx(max(lp["top_logprobs"][t].values()), abs=1e-6)
    assert plain.status_code == 200 and [c["index"] for c in plain.json()["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in plain.json()["choices"])


REFUSED = [
    ({"prompt": "look: <image> here"}, "image placeholder"),
    ({"prompt": [1, 2, 10_000_000]}, "outside the vocabulary"),
    ({"prompt": "hi", "n": 2}, "n=2 is not supported"),
    ({"prompt": "hi", "stream": True, "logprobs": 1}, "stream"),
    ({"prompt": "hi", "max_tokens": 5000}, "context"),
    ({"prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"prompt": []}, "prompt"),
]


def test_completions_refuse_what_they_cannot_do(wings_pair):
    with running([("tiny", wings_pair)]) as (url, _):
        for body, message in REFUSED:
            reply = requests.post(url + "/v1/completions", json=body, timeout=60)
            assert reply.status_code == 400 and message in reply.json()["error"]["message"], (body, reply.text)
        ok = requests.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200, ok.text


MC_YAML = """task: wings_serve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""


def test_lm_eval_multiple_choice_through_the_server_scores_as_wings_eval(wings_pair, wings_dir, tmp_path,
                                                                        monkeypatch):
    """The same items, as a `wings eval` task file and as an lm-eval task whose context is the chat prompt `wings
    eval` renders and whose choices are the replies it scores (end of turn included)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from wings.evaluation.models import load_eval_model
    from wings.evaluation.runner import evaluate_task, load_tasks
    from wings.evaluation.tasks import messages

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    items = [{"id": f"q{k}", "question": f"what is {k} + 3?", "options": [str(k + 3), str(k + 4), "blue"],
              "answer": k % 3} for k in range(8)]
    with open(tmp_path / "mc.jsonl", "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    (task,) = load_tasks([tmp_path / "mc.jsonl"])
    em = load_eval_model(wings_dir, device="cpu")
    ours = evaluate_task(em, task, batch_size=4, progress=False)
    with open(tmp_path / "lm.jsonl", "w") as f:
        for item in task.items:
            chat = messages(item)
            f.write(json.dumps({"context": em.render(chat), "label": item.answer_index,
                                "choices": [em.reply_text(chat, o) for o in item.options]}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "wings_serve_mc.yaml").write_text(MC_YAML.format(data=tmp_path / "lm.jsonl", cache=tmp_path / "c"))
    with running([("tiny", wings_pair)], max_batch_size=4) as (url, _):
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": url + "/v1/completions", "model": "tiny", "tokenizer": str(wings_dir),
                        "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 2,
                        "max_retries": 1},
            tasks=["wings_serve_mc"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    accuracy = ours.metrics()["raw"]["accuracy"]
    assert 0 < accuracy < 1  # a task the model neither always passes nor always fails
    assert results["results"]["wings_serve_mc"]["acc,none"] == pytest.approx(accuracy)
    samples = sorted(results["samples"]["wings_serve_mc"], key=lambda s: s["doc_id"])
    for sample, prediction in zip(samples, ours.predictions, strict=True):
        served = [float(r[0][0]) for r in sample["resps"]]
        # lm-eval moves the context's trailing whitespace (the template's "\n" after "assistant") into every
        # continuation, so each served score holds that one token's log-probability more than ours: the same
        # amount for every option of an item. Differences between options are what `wings eval` has.
        offset = served[0] - prediction["logprobs"][0]
        assert offset < 0
        assert [v - offset for v in served] == pytest.approx(prediction["logprobs"], abs=1e-3)
