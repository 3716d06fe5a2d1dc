"""The demo's base LLM: a tiny Qwen2 causal LM taught the synthetic text-only knowledge, from scratch, on a CPU.

The tokenizer is trained locally on everything the demo will ever say (synthetic questions, easy-vqa questions
and answers, ChatML); training uses the ChatML format of `WingsProcessor` with labels only on the assistant
replies, through HF `Trainer`. Held-out accuracy is scored by `wings.evaluation` (multiple choice by summed
log-probability with the end-of-turn token, and greedy exact match).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Trainer, TrainingArguments

from ..builder import train_tiny_tokenizer
from ..data.synthetic import KnowledgeBase, tokenizer_corpus
from ..processing import CHATML_TEMPLATE
from .common import LossBar, atomic_dir, quiet_trainer, quiet_trainer_logs

IGNORE = -100


@dataclass
class BaseLLMSpec:
    """Size and schedule of the base LLM (defaults: ~1.1M parameters; ~45 ms/step on 2 idle cores).

    Measured on the seed-0 knowledge base: held-out MC accuracy 0.84 after 600 steps and 0.80-0.86 after
    1000 (seeds 0/1), chance 0.25. Without weight decay the model memorises the training phrasings (loss ->
    0.1) and held-out accuracy falls (0.59-0.73 at 1000 steps), so weight decay 0.1 is the default.
    """

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    vocab: int = 1000  # BPE vocabulary size (the chat and image tokens come on top)
    max_positions: int = 512  # also the width of a position router later, so keep it small
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3  # tiny models from scratch want a large LR
    warmup: float = 0.05  # a ratio of the steps
    weight_decay: float = 0.1
    seed: int = 0


def demo_tokenizer(kb: KnowledgeBase, vocab: int = 1000, extra_texts: list[str] | None = None):
    """Byte-level BPE (Qwen2 pre-tokenizer) trained on the synthetic text and the easy-vqa questions/answers."""
    import easy_vqa

    questions, answers, _ = easy_vqa.get_train_questions()
    chat = ["user", "assistant", "system", "\n"]
    corpus = tokenizer_corpus(kb) + list(questions) + list(answers) + chat * 50 + list(extra_texts or [])
    tokenizer = train_tiny_tokenizer(vocab, corpus, show_progress=False)  # the demo shows its own bars
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def to_messages(record: dict) -> list[dict]:
    """LLaVA `conversations` -> chat messages (human -> user, gpt -> assistant), naming the record on errors."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = []
    for turn in record.get("conversations", []):
        if turn.get("from") not in roles or not isinstance(turn.get("value"), str):
            raise ValueError(f"record {record.get('id')!r}: bad turn {turn!r} (need from=human|gpt|system, value=str)")
        messages.append({"role": roles[turn["from"]], "content": turn["value"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"record {record.get('id')!r} has no gpt turn to learn from")
    return messages


def encode_chat(tokenizer, records: list[dict]) -> list[dict]:
    """Tokenise ChatML conversations; labels are the token ids on assistant replies and -100 elsewhere."""
    encoded = []
    for record in records:
        out = tokenizer.apply_chat_template(to_messages(record), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = out["input_ids"], out["assistant_masks"]
        encoded.append({"input_ids": ids, "labels": [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]})
    return encoded


class PadCollator:
    """Right-pad `input_ids` (pad id) and `labels` (-100) to the longest sample of the batch."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], attn[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def build_base_llm(spec: BaseLLMSpec, tokenizer):
    torch.manual_seed(spec.seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(config)


def train_base_llm(records: list[dict], tokenizer, spec: BaseLLMSpec, progress: bool = True,
                   callbacks: list | None = None) -> tuple[torch.nn.Module, dict]:
    """Train a fresh tiny Qwen2 on chat records with HF Trainer; returns (model, stats with loss history).
    `callbacks` (e.g. the demo console's progress bar) replace the default loss bar that `progress` shows."""
    if not records:
        raise ValueError("train_base_llm got no records")
    model = build_base_llm(spec, tokenizer)
    data = encode_chat(tokenizer, records)
    with tempfile.TemporaryDirectory(prefix="wings_base_llm_") as scratch:  # Trainer wants an output_dir
        return _fit(model, data, tokenizer, spec, scratch, progress, callbacks)


def _fit(model, data: list[dict], tokenizer, spec: BaseLLMSpec, scratch: str, progress: bool,
         callbacks: list | None = None):
    args = TrainingArguments(
        output_dir=scratch,
        max_steps=spec.steps, per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.lr, lr_scheduler_type="cosine", warmup_steps=spec.warmup, weight_decay=spec.weight_decay,
        logging_steps=max(1, spec.steps // 20), save_strategy="no", report_to="none", use_cpu=True,
        seed=spec.seed, data_seed=spec.seed, optim="adamw_torch",
        dataloader_num_workers=0,
    )
    start = time.perf_counter()
    with quiet_trainer_logs():
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=PadCollator(tokenizer.pad_token_id))
        quiet_trainer(trainer, None if callbacks else LossBar("base LLM", enabled=progress))
        for callback in callbacks or []:
            trainer.add_callback(callback)
        trainer.train()
    seconds = time.perf_counter() - start
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    stats = {"seconds": round(seconds, 2), "steps": spec.steps, "ms_per_step": round(1000 * seconds / spec.steps, 1),
             "params": sum(p.numel() for p in model.parameters()), "losses": losses, "spec": asdict(spec)}
    return model.eval(), stats


def text_accuracy(model, tokenizer, tasks: list[dict], name: str = "model", generate: bool = True,
                  batch_size: int = 64) -> dict:
    """Multiple-choice accuracy (and greedy exact match) of an in-memory model on `{question, options, answer}`
    task records, scored by `wings.evaluation` exactly as `wings eval` / the forgetting report score them."""
    from ..evaluation.models import EvalModel
    from ..evaluation.runner import evaluate_task
    from ..evaluation.tasks import Task, parse_record

    em = EvalModel(model.eval(), tokenizer, None, tokenizer.chat_template or CHATML_TEMPLATE, name, Path("."))
    mc = [parse_record(t, Path("."), f"task {t.get('id')!r}") for t in tasks]
    mc_rows = evaluate_task(em, Task("text", Path("."), mc), batch_size, progress=False).predictions
    result = {"mc_accuracy": _mean(r["correct"] for r in mc_rows), "n": len(tasks),
              "mc_chance": _mean(1 / len(t["options"]) for t in tasks),
              "per_category": _per_category(tasks, [r["correct"] for r in mc_rows])}
    if generate:
        open_items = [parse_record({k: v for k, v in t.items() if k != "options"}, Path("."), f"task {t.get('id')!r}")
                      for t in tasks]
        rows = evaluate_task(em, Task("text-open", Path("."), open_items), batch_size, max_new_tokens=8,
                             progress=False).predictions
        result["exact_match"] = _mean(r["correct"] for r in rows)
    return result


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _per_category(tasks: list[dict], hits: list[bool]) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for task, hit in zip(tasks, hits, strict=True):
        groups.setdefault(task.get("category", "all"), []).append(hit)
    return {c: _mean(v) for c, v in sorted(groups.items())}


def save_base_llm(model, tokenizer, out_dir: str | Path, stats: dict | None = None) -> Path:
    """Save model + tokenizer (with the ChatML template) as an HF directory, atomically."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if stats is not None:
            (tmp / "train_stats.json").write_text(json.dumps(stats, indent=2))
    return Path(out_dir)
