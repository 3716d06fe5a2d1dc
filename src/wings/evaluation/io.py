"""Atomic writers for results: a crash never leaves a half-written JSON, JSONL or PNG behind."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from ..atomic import json_text, write_with_atomic


def _atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    return write_with_atomic(path, write)


def write_json(path: str | Path, data) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(json_text(data, indent=2) + "\n", encoding="utf-8")

    return _atomic(path, write)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json_text(row) + "\n")

    return _atomic(path, write)


def write_text(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib `Figure` as PNG atomically."""
    return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
