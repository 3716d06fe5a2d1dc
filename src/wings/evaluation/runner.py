"""Score a task with a model: multiple choice by log-likelihood, open questions by greedy exact match.

Multiple choice: each option is scored as the assistant's reply, *including* the template's end-of-turn token
(`<|im_end|>` for ChatML), so an option that is only the prefix of what the model would say is not favoured.
`raw`  = argmax_k sum_t log p(reply_k tokens);  `norm` = argmax_k (that sum) / len(option_k in characters).
Open questions: greedy generation until end-of-turn, then normalised exact match against the accepted answers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .models import EvalModel
from .scoring import LoglikelihoodRequest, exact_match, generate, loglikelihoods
from .stats import accuracy
from .tasks import Task, TaskItem

CHUNK_BATCHES = 4  # encode prompts (and images) a few batches at a time: a whole task's pixel values may not fit


@dataclass
class TaskResult:
    task: Task
    predictions: list[dict] = field(default_factory=list)
    length_normalised: bool = False

    def metrics(self) -> dict:
        key = "correct_norm" if self.length_normalised else "correct"
        main = accuracy([p[key] for p in self.predictions])
        out = {
            "file": str(self.task.path),
            **main.as_dict(),
            "headline": "norm" if self.length_normalised else "raw",
            "raw": accuracy([p["correct"] for p in self.predictions]).as_dict(),
            "norm": accuracy([p["correct_norm"] for p in self.predictions]).as_dict(),
            "n_multiple_choice": sum(p["type"] == "mc" for p in self.predictions),
            "n_open": sum(p["type"] == "open" for p in self.predictions),
        }
        configs: dict[str, list[bool]] = defaultdict(list)
        for p in self.predictions:
            if p.get("config"):
                configs[p["config"]].append(p[key])
        if configs:
            # file order (the builder writes T, TT, TTT, TTV, TV, V in the order asked)
            out["per_config"] = {c: accuracy(flags).as_dict() for c, flags in configs.items()}
        return out


def evaluate_task(em: EvalModel, task: Task, batch_size: int = 8, max_new_tokens: int = 32,
                  length_normalised: bool = False, progress: bool = True) -> TaskResult:
    result = TaskResult(task, length_normalised=length_normalised)
    bar = tqdm(total=len(task.items), desc=f"{em.name} | {task.name}", disable=not progress)
    chunk_items = max(16, CHUNK_BATCHES * batch_size)
    for start in range(0, len(task.items), chunk_items):
        chunk = task.items[start:start + chunk_items]
        result.predictions.extend(_score_chunk(em, chunk, batch_size, max_new_tokens))
        bar.update(len(chunk))
    bar.close()
    return result


def _score_chunk(em: EvalModel, items: list[TaskItem], batch_size: int, max_new_tokens: int) -> list[dict]:
    encoded = [em.encode_item(item) for item in items]
    requests, owners = [], []
    for k, (item, (prompt, chat)) in enumerate(zip(items, encoded, strict=True)):
        for option in item.options or []:
            requests.append(LoglikelihoodRequest(prompt, em.encode_text(em.reply_text(chat, option))))
            owners.append(k)
    scores = loglikelihoods(em, requests, batch_size, progress=False) if requests else []
    per_item = defaultdict(list)
    for k, score in zip(owners, scores, strict=True):
        per_item[k].append(score.logprob)
    open_idx = [k for k, item in enumerate(items) if not item.is_mc]
    texts = generate(em, [encoded[k][0] for k in open_idx], max_new_tokens, batch_size, progress=False)
    generated = dict(zip(open_idx, texts, strict=True))

    rows = []
    for k, item in enumerate(items):
        row = {"id": item.id}
        if item.config:
            row["config"] = item.config
        if item.is_mc:
            lps = per_item[k]
            norm = [lp / max(1, len(o)) for lp, o in zip(lps, item.options, strict=True)]
            pick = max(range(len(lps)), key=lps.__getitem__)
            pick_norm = max(range(len(norm)), key=norm.__getitem__)
            row.update(type="mc", answer=item.gold, prediction=item.options[pick],
                       prediction_norm=item.options[pick_norm], correct=pick == item.answer_index,
                       correct_norm=pick_norm == item.answer_index, logprobs=lps)
        else:
            ok = exact_match(generated[k], item.answers)
            row.update(type="open", answer=item.answers, prediction=generated[k], correct=ok, correct_norm=ok)
        rows.append(row)
    return rows


def load_tasks(paths) -> list[Task]:
    """Load task files; their names (file stems) must be distinct since they key the results."""
    from .tasks import load_task

    tasks = [load_task(p) for p in paths]
    names: dict[str, str] = {}
    for t in tasks:
        if t.name in names:
            raise ValueError(f"two task files are both named {t.name!r}: {names[t.name]} and {t.path}; rename one")
        names[t.name] = str(t.path)
    return tasks


def result_paths(out, tasks: list[Task]) -> list:
    """Every file `write_results` writes for these tasks (for the output-path guard, before anything is run)."""
    from pathlib import Path

    out = Path(out)
    paths = [out]
    for task in tasks:
        paths.append(out.with_name(f"{out.stem}.{task.name}.predictions.jsonl"))
        if any(item.config for item in task.items):
            paths.append(out.with_name(f"{out.stem}.{task.name}.iit.png"))
    return paths


def write_results(em: EvalModel, results: list[TaskResult], out, settings: dict) -> dict:
    """results JSON at `out`; next to it `<stem>.<task>.predictions.jsonl` (and `<stem>.<task>.iit.png` for IIT)."""
    from pathlib import Path

    from .io import write_json, write_jsonl
    from .plots import accuracy_bars

    out = Path(out)
    summary = {"model": str(em.path), "label": em.name, "settings": settings, "tasks": {}}
    for r in results:
        metrics = r.metrics()
        pred_path = write_jsonl(out.with_name(f"{out.stem}.{r.task.name}.predictions.jsonl"), r.predictions)
        metrics["predictions"] = str(pred_path)
        if "per_config" in metrics:
            configs = list(metrics["per_config"])
            png = out.with_name(f"{out.stem}.{r.task.name}.iit.png")
            accuracy_bars(configs, {em.name: [metrics["per_config"][c] for c in configs]}, png,
                          title=f"{em.name}: {r.task.name} accuracy per IIT configuration")
            metrics["per_config_plot"] = str(png)
        summary["tasks"][r.task.name] = metrics
    write_json(out, summary)
    return summary
