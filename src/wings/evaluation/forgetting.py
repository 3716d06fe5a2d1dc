"""Text-only forgetting: score the base LLM and each MLLM built on it on the same text tasks, side by side.

Per task and model: accuracy, delta = acc_model - acc_base, retention = acc_model / acc_base (None when the
base scores 0). A macro mean over tasks summarises each model.
"""

from __future__ import annotations

import gc
from pathlib import Path

from .io import write_json
from .models import load_eval_model, model_type_of
from .plots import accuracy_bars
from .runner import evaluate_task, load_tasks, write_results
from .tasks import Task


def check_text_only(tasks: list[Task]) -> None:
    for task in tasks:
        for item in task.items:
            if item.all_images:
                raise ValueError(f"task {task.name} ({task.path}) record {item.id!r} has images; the forgetting "
                                 "report compares with a text-only LLM, so give text-only tasks")


def model_labels(base_dir: str | Path, model_dirs: list[str | Path], labels: list[str] | None,
                 base_label: str | None) -> list[str]:
    """[base label, model labels...]: directory names unless given; they must be distinct (they key the report)."""
    if labels and len(labels) != len(model_dirs):
        raise ValueError(f"got {len(labels)} --label values for {len(model_dirs)} --model directories")
    names = [base_label or Path(base_dir).resolve().name, *(labels or [Path(p).resolve().name for p in model_dirs])]
    for name in names:  # each label names a results folder under --out
        if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"label {name!r} cannot name a results folder; use a non-empty name without slashes")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"several models are labelled {', '.join(dupes)}; give distinct --label / --base-label values")
    return names


def forgetting_table(base_label: str, scores: dict[str, dict[str, dict]]) -> dict:
    """scores: label -> task -> metrics (with "accuracy", "ci95"); the base is `scores[base_label]`."""
    base = scores[base_label]
    tasks = list(base)
    rows: dict[str, dict] = {}
    for task in tasks:
        b = base[task]["accuracy"]
        row = {"base": {"accuracy": b, "ci95": base[task]["ci95"], "n": base[task]["n"]}, "models": {}}
        for label, per_task in scores.items():
            if label == base_label:
                continue
            acc = per_task[task]["accuracy"]
            row["models"][label] = {
                "accuracy": acc, "ci95": per_task[task]["ci95"], "delta": acc - b,
                "retention": acc / b if b else None,
            }
        rows[task] = row
    means = {}
    for label in scores:
        accs = [scores[label][t]["accuracy"] for t in tasks]
        entry = {"accuracy": sum(accs) / len(accs)}
        if label != base_label:
            entry["delta"] = sum(rows[t]["models"][label]["delta"] for t in tasks) / len(tasks)
            rets = [rows[t]["models"][label]["retention"] for t in tasks]
            entry["retention"] = sum(rets) / len(rets) if all(r is not None for r in rets) else None
        means[label] = entry
    return {"base": base_label, "models": [m for m in scores if m != base_label], "tasks": rows,
            "macro_mean": means}


def check_outputs(out_dir: str | Path, labels: list[str], model_dirs: list, tasks: list[Task]) -> Path:
    """Refuse an --out that is (or would write into) a model directory or a task file, before anything runs."""
    from ..paths import Output, OutputError, expand, guard_outputs

    out_dir = expand(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} is a file, expected a directory")
    outputs = [Output("--out", out_dir, may_contain_inputs=True), Output("--out's forgetting.json",
               out_dir / "forgetting.json"), Output("--out's forgetting.png", out_dir / "forgetting.png")]
    outputs += [Output(f"--out's results folder for {label!r}", out_dir / label) for label in labels]
    inputs = [("model directory", p) for p in model_dirs] + [("--task", t.path) for t in tasks]
    guard_outputs(outputs, inputs)
    return out_dir


def run_forgetting(base_dir: str | Path, model_dirs: list[str | Path], task_paths: list[str | Path],
                   out_dir: str | Path,
                   labels: list[str] | None = None, base_label: str | None = None, batch_size: int = 8,
                   max_new_tokens: int = 32, length_normalised: bool = False, device: str | None = None,
                   dtype: str = "float32", progress: bool = True) -> dict:
    tasks = load_tasks(task_paths)
    check_text_only(tasks)
    if not model_dirs:
        raise ValueError("give at least one --model to compare with the base LLM")
    all_labels = model_labels(base_dir, model_dirs, labels, base_label)
    out_dir = check_outputs(out_dir, all_labels, [base_dir, *model_dirs], tasks)
    for flag, path in zip(["--base", *["--model"] * len(model_dirs)], [base_dir, *model_dirs], strict=True):
        model_type_of(path, flag)  # every directory checked before the first model is scored
    settings = {"batch_size": batch_size, "length_normalised": length_normalised, "max_new_tokens": max_new_tokens,
                "dtype": dtype}
    scores: dict[str, dict[str, dict]] = {}
    for label, path in zip(all_labels, [base_dir, *model_dirs], strict=True):
        em = load_eval_model(path, device=device, dtype=dtype, label=label)
        results = [evaluate_task(em, t, batch_size, max_new_tokens, length_normalised, progress) for t in tasks]
        scores[label] = write_results(em, results, out_dir / label / "results.json", settings)["tasks"]
        del em, results
        gc.collect()  # one model in memory at a time
    report = forgetting_table(all_labels[0], scores)
    report["settings"] = settings
    report["paths"] = {label: str(p) for label, p in zip(all_labels, [base_dir, *model_dirs], strict=True)}
    task_names = [t.name for t in tasks]
    png = accuracy_bars(task_names, {label: [scores[label][t] for t in task_names] for label in all_labels},
                        out_dir / "forgetting.png", title="text-only accuracy: base LLM vs MLLMs")
    report["plot"] = str(png)
    write_json(out_dir / "forgetting.json", report)
    return report
