"""Atomic writers for results: a crash never leaves a half-written JSON, JSONL or PNG behind."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from ..atomic import write_with_atomic
from ..paths import lone_surrogate


def _atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    return write_with_atomic(path, write)


def dumps(data, indent: int | None = None) -> str:
    """JSON with text as text (UTF-8), except text that is not Unicode (a label from a folder name that is not
    UTF-8): a document holding such text is written with `\\uXXXX` escapes instead, which JSON allows."""
    text = json.dumps(data, indent=indent, ensure_ascii=False)
    return json.dumps(data, indent=indent) if lone_surrogate(text) else text


def write_json(path: str | Path, data) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(dumps(data, indent=2) + "\n", encoding="utf-8")

    return _atomic(path, write)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(dumps(row) + "\n")

    return _atomic(path, write)


def write_text(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib `Figure` as PNG atomically."""
    return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
