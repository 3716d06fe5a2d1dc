"""`LlavaDataset`: LLaVA JSON/JSONL records checked once at construction, formatted to tensors on access.

The scan (with a progress bar) parses every record, checks its structure and its images (`PIL.Image.verify` by
default) and tokenises it once, so bad records are known up front, `len(dataset)` is exact and
`dataset.lengths` (tokens after image expansion and truncation) / `dataset.modality` ("image" | "text") are
ready for length-grouped sampling. Pixels are decoded lazily in `__getitem__`.

Text mixing: `text_mix_path` names a second file of text-only records; `text_mix_ratio` r in [0, 1) is the
fraction of the final dataset drawn from it, i.e. round(n * r / (1 - r)) records are added to the n kept main
records. They are drawn with `seed`: without replacement when the pool is large enough, otherwise every pool
record is repeated floor(k / pool) times plus a random subset for the rest (sampling with replacement, balanced).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .formatting import WingsFormatter
from .records import IMAGE_CHECKS, Record, check_image, iter_raw_records, normalize, record_id
from .report import BadRecord, SkipReport, log_load_failure, write_json_atomic


def scan_file(path: Path, formatter, report: SkipReport, image_root: Path | None,
              system_prompt: str | None, image_check: str, text_only: bool = False,
              progress: bool = True, context_length: int | None = None) -> list[tuple[Record, int, int]]:
    """Check every record of one file; returns (record, token length, images) for the good ones. Records longer
    than `context_length` after truncation (the model's hard limit) are skipped as `over_context`; records cut to
    `max_length` are kept and counted as changed (`truncated`)."""
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    max_length = formatter.max_length
    kept = []
    for location, raw in tqdm(iter_raw_records(path), desc=f"checking {path.name}", unit=" rec", disable=not progress):
        try:
            record = normalize(raw, location, root, system_prompt)
            if text_only and record.images:
                raise BadRecord("image_in_text_mix", f"{len(record.images)} images in a text-only mixing file")
            for image in record.images:  # (before encoding: a stock VLM's processor decodes them)
                check_image(image, image_check)
            enc = formatter.encode(record)
            if context_length is not None and len(enc.input_ids) > context_length:
                raise BadRecord("over_context", f"{len(enc.input_ids)} tokens (after truncation to max_length="
                                                f"{max_length}) but the model takes at most {context_length} (its "
                                                "position router's width); lower data.max_length")
        except BadRecord as e:
            report.bad(location, record_id(raw), e)
            continue
        report.kept[str(path)] += 1
        if enc.truncated:
            report.changed(location, record_id(raw), "truncated",
                           f"{enc.full_length} tokens cut to max_length={max_length}")
        kept.append((record, len(enc.input_ids), enc.n_images))
    return kept


def mix_count(n_main: int, ratio: float) -> int:
    """How many text-mix records make them a fraction `ratio` of the final dataset."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"text_mix_ratio must be in [0, 1), got {ratio}")
    return round(n_main * ratio / (1.0 - ratio))


def sample_pool(pool_size: int, k: int, seed: int) -> list[int]:
    """k indices into a pool, seeded; without replacement when possible, else balanced repeats."""
    if k and not pool_size:
        raise ValueError("the text mixing file has no usable record to sample from")
    rng = random.Random(seed)
    picks = list(range(pool_size)) * (k // pool_size) if pool_size else []
    picks += rng.sample(range(pool_size), k - len(picks))
    rng.shuffle(picks)
    return picks


class LlavaDataset(Dataset):
    """Map-style dataset of LLaVA conversations; items are dicts for `WingsDataCollator`. See `build_dataset`."""

    def __init__(self, paths: str | Path | Sequence[str | Path], processor, image_root: str | Path | None = None,
                 max_length: int = 2048, policy: str = "skip", report_path: str | Path | None = None,
                 text_mix_path: str | Path | None = None, text_mix_ratio: float = 0.0, seed: int = 0,
                 system_prompt: str | None = None, image_check: str = "verify", progress: bool = True,
                 context_length: int | None = None, failure_log: str | Path | None = None, formatter=None):
        paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not paths:
            raise ValueError("build_dataset needs at least one data file")
        if image_check not in IMAGE_CHECKS:
            raise ValueError(f"image_check must be one of {IMAGE_CHECKS}, got {image_check!r}")
        self.processor, self.max_length, self.policy = processor, max_length, policy
        self.formatter = formatter if formatter is not None else WingsFormatter(processor, max_length)
        report = SkipReport(policy)
        common = dict(formatter=self.formatter, report=report, image_root=image_root, system_prompt=system_prompt,
                      image_check=image_check, progress=progress, context_length=context_length)
        items = [item for path in paths for item in scan_file(path, **common)]
        mix_info = {}
        if text_mix_path is not None or text_mix_ratio:
            if text_mix_path is None:
                raise ValueError("text_mix_ratio > 0 needs text_mix_path")
            pool = scan_file(Path(text_mix_path), **common, text_only=True)
            picks = sample_pool(len(pool), mix_count(len(items), text_mix_ratio), seed)
            mix_info = {"text_mix": {"path": str(text_mix_path), "ratio": text_mix_ratio, "pool_size": len(pool),
                                     "added": len(picks), "with_replacement": len(picks) > len(pool)}}
            items += [pool[i] for i in picks]
        if not items:
            raise ValueError(f"no usable record in {', '.join(map(str, paths))} ({report.summary()})")
        self.records: list[Record] = [r for r, _, _ in items]
        self.lengths: list[int] = [n for _, n, _ in items]
        self.modality: list[str] = ["image" if k else "text" for _, _, k in items]
        self.report = report.as_dict({"max_length": max_length, "context_length": context_length,
                                      "image_check": image_check, **mix_info})
        if report_path is not None:
            write_json_atomic(report_path, self.report)
        report.print_summary(report_path)
        self.lazy_failures: list[str] = []
        self.failure_log = Path(failure_log) if failure_log is not None else None

    @property
    def is_multimodal(self) -> list[bool]:
        return [m == "image" for m in self.modality]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # Images passed the scan-time check; if one still fails to decode here, `error` raises and `skip` takes
        # the next record (deterministic: same index -> same substitute), warns, and logs the failure to
        # `failure_log`, which training folds into data_report.json (`replaced_at_load`): never silent.
        for offset in range(len(self.records)):
            record = self.records[(index + offset) % len(self.records)]
            try:
                return self.formatter.sample(record)
            except BadRecord as e:
                message = f"{record.location} (record id={record.id!r}): {e.reason}: {e.detail}"
                if self.policy == "error":
                    raise ValueError(f"bad training record at {message}") from e
                self.lazy_failures.append(message)
                log_load_failure(self.failure_log, record.location, record.id, e)
                warnings.warn(f"skipping at load time {message}", stacklevel=2)
        raise ValueError("no record of the dataset can be loaded")


def build_dataset(path: str | Path | Sequence[str | Path], processor, image_root: str | Path | None = None,
                  max_length: int = 2048, policy: str = "skip", report_path: str | Path | None = None,
                  text_mix_path: str | Path | None = None, text_mix_ratio: float = 0.0, seed: int = 0,
                  system_prompt: str | None = None, image_check: str = "verify",
                  progress: bool = True, context_length: int | None = None,
                  failure_log: str | Path | None = None, formatter=None) -> LlavaDataset:
    """LLaVA-format training data as a torch Dataset.

    Args:
        path: a `.json` (list) or `.jsonl` file, or several (concatenated in order).
        processor: a `WingsProcessor` (chat template, tokenizer, `image_seq_length`, `preprocess_images`).
        image_root: folder that relative image paths start from (default: each data file's folder).
        max_length: token budget after image expansion; see `wings.data.formatting` for the truncation policy.
        policy: "skip" (drop bad records, count them, report) or "error" (raise ValueError naming
            file:line / file[index], record id and reason).
        report_path: where to write the JSON report (atomically); a summary line is printed either way.
        text_mix_path, text_mix_ratio, seed: mix in text-only records (see the module docstring).
        system_prompt: inserted as the system turn of records that have none (None: no system turn).
        image_check: scan-time image check, "verify" (default), "load", "exists" or "none".
        progress: show a tqdm bar while scanning.
        context_length: the model's hard length limit (a position router's width); longer records are skipped at
            scan time (`over_context`) instead of failing mid-run.
        failure_log: JSONL file that records failing to load after the scan are appended to (see `__getitem__`).
        formatter: how records become samples; None = `WingsFormatter(processor, max_length)` (a Wings model's
            processor); a stock VLM's: `wings.vlm.data.VLMFormatter`.
    """
    return LlavaDataset(path, processor, image_root=image_root, max_length=max_length, policy=policy,
                        report_path=report_path, text_mix_path=text_mix_path, text_mix_ratio=text_mix_ratio,
                        seed=seed, system_prompt=system_prompt, image_check=image_check, progress=progress,
                        context_length=context_length, failure_log=failure_log, formatter=formatter)
