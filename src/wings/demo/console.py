"""The demo's console: one progress bar per block, one-line notes, the table; everything else to log files.

    console = DemoConsole(out / "logs")
    with console.block("wings_stage2") as bar:        # stdout/stderr and library logs -> logs/wings_stage2.log
        train(config, callbacks=[bar.trainer_callback()])

Inside a block the Trainer's printed log dictionaries, data-check bars and transformers' INFO chatter go to the
block's log file. Warnings from transformers still reach the console (and the file), so a weight that should
load and does not is reported where people look. The load tables transformers prints for learners a stage adds
or drops *on purpose* (stage 2 adds fresh textual learners and a router; the LLaVA baseline has none) are
replaced by a one-line note: `intended_load_changes` names those parts from the start model's config and the
stage's overrides, and `expect_load_changes` tells transformers to leave exactly them out of its report.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

# Key patterns of each Wings part, as the layers register them (`...layers.N.self_attn.visual.q_proj.down.weight`).
PART_PATTERNS = {"visual": r"\.self_attn\.visual\.", "textual": r"\.self_attn\.textual\.",
                 "router": r"\.self_attn\.router\."}
PART_FLAGS = {"visual": "use_visual_learner", "textual": "use_textual_learner", "router": "use_router"}
PART_NAMES = {"visual": "visual learners", "textual": "textual learners", "router": "router"}


def wings_parts(config: dict) -> set[str]:
    """The Wings parts a model with this config.json content carries (none in llava mode)."""
    if config.get("mode", "wings") != "wings":
        return set()
    return {part for part, flag in PART_FLAGS.items() if config.get(flag, True)}


def intended_load_changes(start_dir: str | Path, overrides: dict) -> tuple[list[str], list[str]]:
    """(parts the load adds fresh, parts it drops) when `start_dir` is loaded with config `overrides`."""
    saved = json.loads((Path(start_dir) / "config.json").read_text())
    before, after = wings_parts(saved), wings_parts({**saved, **overrides})
    return [p for p in PART_FLAGS if p in after - before], [p for p in PART_FLAGS if p in before - after]


@contextlib.contextmanager
def expect_load_changes(added: list[str], dropped: list[str]) -> Iterator[None]:
    """While active, transformers' load report of a Wings model leaves out the keys of `added` parts (missing
    from the checkpoint on purpose) and `dropped` parts (in the checkpoint, not in the model, on purpose).
    Any other missing, unexpected or mismatched key is still reported. Uses HF's own `_keys_to_ignore_on_load_*`
    hooks, set on the class for the duration and restored afterwards."""
    from ..modeling import WingsForConditionalGeneration as cls

    saved = cls._keys_to_ignore_on_load_missing, cls._keys_to_ignore_on_load_unexpected
    cls._keys_to_ignore_on_load_missing = [PART_PATTERNS[p] for p in added] or None
    cls._keys_to_ignore_on_load_unexpected = [PART_PATTERNS[p] for p in dropped] or None
    try:
        yield
    finally:
        cls._keys_to_ignore_on_load_missing, cls._keys_to_ignore_on_load_unexpected = saved


def load_note(stage: str, added: list[str], dropped: list[str]) -> str | None:
    """The one line that replaces the load tables of an intended change (None when nothing changes)."""
    parts = []
    if added:
        parts.append(f"adds fresh {' and '.join(PART_NAMES[p] for p in added)}")
    if dropped:
        parts.append(f"drops the start model's {' and '.join(PART_NAMES[p] for p in dropped)}")
    return f"{stage}: {'; '.join(parts)} (as the recipe intends)" if parts else None


class _ConsoleWarnings(logging.Handler):
    """transformers' warnings, one message per record, on the console (the full record also goes to the file)."""

    def __init__(self, stream: IO[str]):
        super().__init__(level=logging.WARNING)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(f"warning ({record.name}): {record.getMessage()}\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001  (logging handlers must never raise)
            self.handleError(record)


class BlockBar:
    """The progress bar of one block: `update(n)` / `loss(value)` directly, or as a Trainer callback."""

    def __init__(self, desc: str, stream: IO[str], enabled: bool, total: int | None = None):
        self.desc, self.stream, self.enabled = desc, stream, enabled
        self.bar = None
        if total is not None:
            self.start(total)

    def start(self, total: int) -> None:
        self.close()
        self.bar = tqdm(total=total, desc=f"{self.desc:<13}", file=self.stream, disable=not self.enabled,
                        dynamic_ncols=True, leave=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def advance_to(self, n: int) -> None:
        if self.bar is not None and n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def loss(self, value: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{value:.3f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def trainer_callback(self) -> TrainerCallback:
        return _BarCallback(self)


class _BarCallback(TrainerCallback):
    def __init__(self, bar: BlockBar):
        self.block_bar = bar

    def on_train_begin(self, args, state, control, **kwargs):
        self.block_bar.start(state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.block_bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.block_bar.loss(float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        self.block_bar.close()


class _BlockSink(io.TextIOBase):
    """What sys.stdout/sys.stderr are inside a block: writes go to the active block's log file. One object for
    the whole process, so a library that keeps a reference to sys.stdout from its import (DeepSpeed's logger
    does) keeps writing somewhere valid after that block's file is closed: to the next block's log, or to the
    real stderr between blocks."""

    def __init__(self):
        super().__init__()
        self.target: IO[str] | None = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        (self.target or sys.__stderr__).write(text)
        return len(text)

    def flush(self) -> None:
        (self.target or sys.__stderr__).flush()


_SINK = _BlockSink()


class DemoConsole:
    """Console output of a demo run (`stream`: notes and tables; `bar_stream`: progress bars) and its log files."""

    def __init__(self, log_dir: str | Path, progress: bool = True, stream: IO[str] | None = None,
                 bar_stream: IO[str] | None = None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.stream = stream or sys.stdout
        self.bar_stream = bar_stream or sys.stderr
        self.main_log = self.log_dir / "demo.log"

    def note(self, text: str) -> None:
        """One line on the console, also kept in logs/demo.log."""
        print(text, file=self.stream, flush=True)
        with self.main_log.open("a") as f:
            f.write(text + "\n")

    @contextlib.contextmanager
    def block(self, name: str, total: int | None = None) -> Iterator[BlockBar]:
        """Run a block with its output in logs/{name}.log; yields the block's progress bar."""
        bar = BlockBar(name, self.bar_stream, self.progress, total)
        with (self.log_dir / f"{name}.log").open("a") as log, _library_logs(log, self.stream), \
                contextlib.redirect_stdout(_SINK), contextlib.redirect_stderr(_SINK):
            outer, _SINK.target = _SINK.target, log
            try:
                yield bar
            finally:
                _SINK.target = outer
                bar.close()


def seed_consoles(out: Path, seeds: list[int], console: DemoConsole,
                  progress: bool) -> Iterator[tuple[int, DemoConsole]]:
    """(seed, that seed's console) for a multi-seed run: each seed logs to out/seed-N/logs/ and shares the run's
    console stream and progress bars."""
    for seed in seeds:
        console.note(f"seed {seed} -> {out / f'seed-{seed}'}")
        yield seed, DemoConsole(out / f"seed-{seed}" / "logs", progress=progress, stream=console.stream,
                                bar_stream=console.bar_stream)


@contextlib.contextmanager
def _library_logs(log: IO[str], console: IO[str]) -> Iterator[None]:
    """transformers' logs: INFO and up to `log`, WARNING and up also to `console`; its download/load bars off."""
    logger = logging.getLogger("transformers")
    file_handler = logging.StreamHandler(log)
    file_handler.setFormatter(logging.Formatter("[%(levelname)s %(name)s] %(message)s"))
    warn_handler = _ConsoleWarnings(console)
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_default_handler()
    hf_logging.set_verbosity_info()
    hf_logging.disable_progress_bar()
    logger.addHandler(file_handler)
    logger.addHandler(warn_handler)
    try:
        yield
    finally:
        logger.removeHandler(file_handler)
        logger.removeHandler(warn_handler)
        hf_logging.enable_default_handler()
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
