"""Scoring: MC log-likelihood picks what the model prefers, batching/padding does not change scores, generation
stops at end-of-turn and exact match normalises, for a Wings MLLM (with images) and a plain causal LM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import randomize_wings_
from test_eval_common import boosted_logits, save_base_llm, vqa_records, write_jsonl
from wings.evaluation.models import EvalModel, Prompt, load_eval_model
from wings.evaluation.runner import TaskResult, evaluate_task
from wings.evaluation.scoring import LoglikelihoodRequest, exact_match, generate, loglikelihoods, normalise_answer
from wings.evaluation.tasks import Task, load_task
from wings.processing import CHATML_TEMPLATE


@pytest.fixture(scope="module")
def base_dir(tiny_llava_dir, tmp_path_factory):
    return save_base_llm(tiny_llava_dir, tmp_path_factory.mktemp("eval_base"))


@pytest.fixture(scope="module")
def random_wings(make_tiny):
    model, processor = make_tiny(seed=3)
    randomize_wings_(model, seed=1)
    return EvalModel(model.eval(), processor.tokenizer, processor, CHATML_TEMPLATE, "random-wings", Path("."))


def single_token(em: EvalModel, word: str) -> int:
    ids = em.encode_text(word)
    assert len(ids) == 1, f"{word!r} is not one token in the tiny vocabulary"
    return ids[0]


def shape_task(tmp_path: Path) -> Task:
    records = vqa_records(2)
    options = ["circle", "rectangle", "triangle"]
    records[0].update(options=options, answer="circle")
    records[1].update(options=options, answer=2)  # by index: triangle
    records.append({"id": "text-only", "question": "Name a shape.", "options": options, "answer": "C"})
    return load_task(write_jsonl(tmp_path / "shapes.jsonl", records))


@pytest.mark.parametrize("which", ["wings", "base"])
def test_mc_picks_the_option_the_model_prefers(which, tiny_model_dir, base_dir, tmp_path):
    em = load_eval_model(tiny_model_dir if which == "wings" else base_dir, device="cpu")
    task = shape_task(tmp_path)
    if which == "base":
        task.items = [i for i in task.items if not i.images]
    for boosted in ("circle", "triangle"):
        with boosted_logits(em.model, [single_token(em, boosted)]):
            result = evaluate_task(em, task, batch_size=2, progress=False)
        for pred, item in zip(result.predictions, task.items, strict=True):
            assert pred["prediction"] == boosted and pred["prediction_norm"] == boosted
            assert pred["correct"] == (item.gold == boosted)
            assert len(pred["logprobs"]) == 3


def reference_logprob(em: EvalModel, request: LoglikelihoodRequest) -> tuple[float, bool]:
    ids = torch.tensor([request.prompt.ids + request.continuation])
    kwargs = {"pixel_values": request.prompt.pixel_values} if request.prompt.pixel_values is not None else {}
    with torch.no_grad():
        logits = em.model(input_ids=ids, use_cache=False, **kwargs).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    c = len(request.continuation)
    rows = lp[-c - 1:-1]
    target = torch.tensor(request.continuation)
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_batched_left_padded_scores_equal_unpadded(random_wings, base_dir, tmp_path):
    task = load_task(write_jsonl(tmp_path / "mixed.jsonl", vqa_records(2, mc=True) + [
        {"id": "long-text", "question": "what is the color of the shape in the picture? " * 3, "answer": "x"},
        {"id": "ctx", "question": "and the shape?", "answer": "y", "context": vqa_records(1, offset=7)},
        {"id": "text-ctx", "question": "and?", "answer": "z", "context": [{"question": "hi", "answer": "hello"}]},
    ]))
    base = load_eval_model(base_dir, device="cpu")
    for em in (random_wings, base):
        items = [i for i in task.items if em.multimodal or not i.all_images]
        requests = []
        for item in items:
            prompt, chat = em.encode_item(item)
            for option in ("blue", "a rectangle shape"):
                requests.append(LoglikelihoodRequest(prompt, em.encode_text(em.reply_text(chat, option))))
        assert len({len(r.prompt.ids) + len(r.continuation) for r in requests}) > 2  # padding really happens
        got = loglikelihoods(em, requests, batch_size=4, progress=False)
        for r, g in zip(requests, got, strict=True):
            ref_lp, ref_greedy = reference_logprob(em, r)
            assert g.logprob == pytest.approx(ref_lp, abs=1e-3)
            assert g.is_greedy == ref_greedy


def test_reply_includes_end_of_turn(random_wings):
    chat = [{"role": "user", "content": "hi"}]
    assert random_wings.end_of_turn == "<|im_end|>"
    assert random_wings.reply_text(chat, "blue") == "blue<|im_end|>"
    assert random_wings.encode_text("blue<|im_end|>")[-1] == random_wings.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_generation_stops_at_end_of_turn_and_exact_match(tiny_model_dir, tmp_path):
    em = load_eval_model(tiny_model_dir, device="cpu")
    records = vqa_records(3)
    records[0]["answer"] = "The Circle."
    records[1]["answer"] = ["square", "circle"]
    records[2]["answer"] = "triangle"
    task = load_task(write_jsonl(tmp_path / "open.jsonl", records))
    eot = em.tokenizer.convert_tokens_to_ids("<|im_end|>")
    circle = single_token(em, "circle")
    with boosted_logits(em.model, [circle, circle, eot]):
        result = evaluate_task(em, task, batch_size=3, max_new_tokens=6, progress=False)
    assert [p["prediction"] for p in result.predictions] == ["circlecircle"] * 3
    with boosted_logits(em.model, [circle, eot]):
        texts = generate(em, [em.encode_item(i)[0] for i in task.items], max_new_tokens=6, batch_size=3,
                         progress=False)
    assert texts == ["circle"] * 3
    assert [exact_match(t, i.answers) for t, i in zip(texts, task.items, strict=True)] == [True, True, False]


def test_generate_cuts_at_stop_strings(random_wings):
    prompt = Prompt(random_wings.encode_text("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"))
    blue, red = single_token(random_wings, "blue"), single_token(random_wings, "red")
    with boosted_logits(random_wings.model, [blue, red, blue]):
        (text,) = generate(random_wings, [prompt], max_new_tokens=3, stop_strings=["red"], progress=False)
    assert text == "blue"


def test_normalise_answer():
    assert normalise_answer("  The  Red, circle!  ") == "red circle"
    assert normalise_answer("An apple a day") == "apple day"
    assert exact_match("theatre", ["atre"]) is False  # articles only as whole words
    assert exact_match("Yes.", ["yes"]) and not exact_match("yes no", ["yes"])


def test_headline_follows_length_normalisation(tmp_path):
    task = Task("t", tmp_path / "t.jsonl", [])
    preds = [{"id": str(k), "type": "mc", "correct": k < 1, "correct_norm": k < 3} for k in range(4)]
    raw = TaskResult(task, preds, length_normalised=False).metrics()
    norm = TaskResult(task, preds, length_normalised=True).metrics()
    assert (raw["accuracy"], raw["headline"]) == (0.25, "raw")
    assert (norm["accuracy"], norm["headline"]) == (0.75, "norm")
    assert raw["raw"] == norm["raw"] and raw["norm"] == norm["norm"]
