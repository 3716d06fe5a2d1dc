"""IIT-style interleaved benchmark builder: multi-turn dialogues mixing text-only (T) and visual (V) turns.

A configuration is a string over {T, V}, read left to right as the dialogue's turns (the paper's six:
T, TT, TTT, TTV, TV, V). Earlier turns are context carried with their gold answers; the last turn is the
scored question. T turns are drawn from a text-only pool, V turns from a multimodal pool (their images go
into the record). Items within one dialogue are distinct. The draw for configuration c uses
`random.Random(f"{seed}:{c}")`, so the output is a function of (pools, seed, per-config count) and each
configuration's dialogues do not depend on which other configurations are built.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

from .io import write_jsonl
from .tasks import Task, TaskItem, load_task

PAPER_CONFIGS = ("T", "TT", "TTT", "TTV", "TV", "V")
MAX_PER_CONFIG = 1_000_000  # dialogues are built in memory; far beyond any benchmark's size


def parse_configs(spec: str | Sequence[str]) -> list[str]:
    configs = [c.strip().upper() for c in (spec.split(",") if isinstance(spec, str) else spec)]
    for c in configs:
        if not c or set(c) - {"T", "V"}:
            raise ValueError(f"IIT configuration {c!r} must be a non-empty string of T and V (e.g. TTV)")
    if len(set(configs)) != len(configs):
        raise ValueError(f"IIT configurations repeat: {configs}")
    return configs


def _check_pool(pool: Task, kind: str) -> None:
    for item in pool.items:
        where = f"{kind} pool {pool.path} record {item.id!r}"
        if item.context:
            raise ValueError(f"{where} already has context turns; pool records must be single questions")
        if kind == "text" and item.images:
            raise ValueError(f"{where} has images; the text pool must be text-only")
        if kind == "multimodal" and not item.images:
            raise ValueError(f"{where} has no image; every multimodal pool record needs one")


def _rel(path: Path, out_dir: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), out_dir.resolve())
    except ValueError:  # another drive (Windows): keep it absolute
        return str(path.resolve())


def _turn(item: TaskItem, out_dir: Path) -> dict:
    turn = {"question": item.question, "answer": item.gold}
    if item.images:
        turn["images"] = [_rel(p, out_dir) for p in item.images]
    return turn


def _dialogue(config: str, k: int, turns: list[TaskItem], out_dir: Path) -> dict:
    *context, last = turns
    record = {"id": f"{config}-{k:04d}", "config": config, "question": last.question}
    if last.is_mc:
        record["options"] = list(last.options)
        record["answer"] = last.answer_index
    else:
        record["answer"] = last.answers if len(last.answers) > 1 else last.gold
    if last.images:
        record["images"] = [_rel(p, out_dir) for p in last.images]
    if context:
        record["context"] = [_turn(t, out_dir) for t in context]
    record["sources"] = [t.id for t in turns]
    return record


def build_iit(text_pool: Task, mm_pool: Task, configs: Sequence[str], per_config: int, seed: int,
              out_dir: str | Path) -> list[dict]:
    """The dialogue records (image paths relative to `out_dir`, where the file will be written)."""
    configs = parse_configs(configs)
    if per_config < 1:
        raise ValueError(f"--per-config must be >= 1, got {per_config}")
    _check_pool(text_pool, "text")
    _check_pool(mm_pool, "multimodal")
    pools = {"T": text_pool.items, "V": mm_pool.items}
    for c in configs:
        for kind, name in (("T", "text"), ("V", "multimodal")):
            if c.count(kind) > len(pools[kind]):
                raise ValueError(f"configuration {c} needs {c.count(kind)} distinct {name} items per dialogue but "
                                 f"the {name} pool has {len(pools[kind])}")
        distinct = math.perm(len(pools["T"]), c.count("T")) * math.perm(len(pools["V"]), c.count("V"))
        if per_config > min(distinct, MAX_PER_CONFIG):
            why = (f"the pools allow only {distinct:,} distinct {c} dialogues, so some would be scored twice"
                   if per_config > distinct else f"the limit is {MAX_PER_CONFIG:,} per configuration")
            raise ValueError(f"--per-config {per_config:,} is too many for configuration {c}: {why}")
    out_dir = Path(out_dir)
    records = []
    for c in configs:
        rng = random.Random(f"{seed}:{c}")
        for k in range(per_config):
            drawn = {kind: iter(rng.sample(pools[kind], c.count(kind))) for kind in "TV"}
            records.append(_dialogue(c, k, [next(drawn[kind]) for kind in c], out_dir))
    return records


def build_iit_file(text_pool: str | Path, mm_pool: str | Path, configs: Sequence[str] | str, per_config: int,
                   seed: int, out: str | Path) -> list[dict]:
    from ..paths import Output, check_output_file, guard_outputs

    out = check_output_file(out, "--out")
    text, mm = load_task(text_pool), load_task(mm_pool)
    guard_outputs([Output("--out", out)], [("--text-pool", text.path), ("--mm-pool", mm.path)])
    records = build_iit(text, mm, parse_configs(configs), per_config, seed, out.parent)
    write_jsonl(out, records)
    return records
