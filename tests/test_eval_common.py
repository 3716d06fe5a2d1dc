"""Shared helpers for the evaluation tests (no tests here): task records from real easy-vqa data, tiny dirs."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import easy_vqa
import torch


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def vqa_records(n: int, offset: int = 0, mc: bool = False, prefix: str = "v") -> list[dict]:
    """Real easy-vqa test questions with absolute image paths (open answers, or 3-way multiple choice)."""
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    pool = sorted(set(answers))
    records = []
    for k in range(offset, offset + n):
        rec = {"id": f"{prefix}{k}", "question": questions[k], "answer": answers[k], "image": paths[image_ids[k]]}
        if mc:
            distractors = [a for a in pool if a != answers[k]][k % 5: k % 5 + 2]
            rec["options"] = sorted([answers[k], *distractors])
        records.append(rec)
    return records


def text_records(n: int, prefix: str = "t") -> list[dict]:
    """Text-only multiple choice (and one open question every fourth record)."""
    records = []
    for k in range(n):
        if k % 4 == 3:
            records.append({"id": f"{prefix}{k}", "question": f"Say the number {k}.", "answer": str(k)})
        else:
            records.append({"id": f"{prefix}{k}", "question": f"What is {k} + 2?",
                            "options": [str(k + 2), str(k + 3), "blue"], "answer": k % 3})
    return records


def save_base_llm(llava_dir: Path, out: Path) -> Path:
    """The LLM inside an MLLM dir, saved as a plain causal LM dir with the same tokenizer (no chat template)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    import wings  # noqa: F401

    model = AutoModelForImageTextToText.from_pretrained(llava_dir)
    model.language_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(llava_dir).save_pretrained(out)
    return out


@contextmanager
def boosted_logits(model: torch.nn.Module, schedule: list[int], amount: float = 40.0):
    """Add `amount` to the logit of schedule[k] on the k-th LM-head call (the last entry repeats)."""
    calls = {"n": 0}

    def hook(module, args, output):
        token = schedule[min(calls["n"], len(schedule) - 1)]
        calls["n"] += 1
        output = output.clone()
        output[..., token] += amount
        return output

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()
