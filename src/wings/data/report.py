"""Bad-record handling: the reasons, the `error` / `skip` policies, and the atomically written skip report."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

POLICIES = ("error", "skip")

# Every reason a record can be rejected for; the report counts them under these exact names.
REASONS = {
    "malformed_json": "the line is not valid JSON, or the record is not a JSON object",
    "bad_fields": "a required field is missing or has the wrong type",
    "unknown_role": "a turn's `from` is not human/gpt/system (or user/assistant)",
    "role_order": "turns must be [system], user, assistant, user, assistant, ... ending with assistant",
    "empty_turn": "a turn's value is empty or whitespace",
    "placeholder_mismatch": "the number of `<image>` placeholders differs from the number of images",
    "missing_image": "an image file does not exist",
    "corrupt_image": "an image file cannot be decoded",
    "over_long": "after image expansion and truncation to max_length no assistant token is left to learn",
    "image_in_text_mix": "a record of the text-only mixing file has images",
}


class BadRecord(Exception):
    """Raised by the record checks; carries one of `REASONS` and a human-readable detail."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def where(path: str | Path, line: int | None = None, index: int | None = None) -> str:
    """`file:line N` for JSONL (1-based line), `file[index N]` for a JSON list (0-based index)."""
    if line is not None:
        return f"{path}:line {line}"
    return f"{path}[index {index}]"


@dataclass
class SkipReport:
    """Collects the records a `skip` policy dropped (or raises at once under `error`)."""

    policy: str = "skip"
    entries: list[dict] = field(default_factory=list)
    kept: Counter = field(default_factory=Counter)  # per source file

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"bad-record policy must be one of {POLICIES}, got {self.policy!r}")

    def bad(self, location: str, record_id, error: BadRecord) -> None:
        """Record (skip) or raise (error) one bad record."""
        message = f"{location} (record id={record_id!r}): {error.reason}: {error.detail}"
        if self.policy == "error":
            raise ValueError(f"bad training record at {message}")
        self.entries.append({"location": location, "id": record_id, "reason": error.reason, "detail": error.detail})

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(e["reason"] for e in self.entries).items()))

    def as_dict(self, extra: dict | None = None) -> dict:
        return {
            "policy": self.policy,
            "kept": sum(self.kept.values()),
            "kept_by_file": dict(self.kept),
            "skipped": len(self.entries),
            "skipped_by_reason": self.by_reason,
            "reasons": {r: REASONS[r] for r in self.by_reason},
            "skipped_records": self.entries,
            **(extra or {}),
        }

    def summary(self) -> str:
        kept = sum(self.kept.values())
        if not self.entries:
            return f"data: kept {kept} records, skipped none"
        reasons = ", ".join(f"{r}={n}" for r, n in self.by_reason.items())
        return f"data: kept {kept} records, skipped {len(self.entries)} ({reasons})"

    def print_summary(self, report_path: str | Path | None = None) -> None:
        tail = f"; report: {report_path}" if report_path and self.entries else ""
        print(self.summary() + tail, file=sys.stderr)


def write_json_atomic(path: str | Path, data) -> Path:
    """Write to a temp file in the same folder, then rename: readers never see a half-written report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
