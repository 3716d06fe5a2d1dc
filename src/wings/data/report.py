"""Bad-record handling: the reasons, the `error` / `skip` policies, and the atomically written skip report."""

from __future__ import annotations

import json
import os
import sys
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
    "missing_image": "an image file does not exist (or is not a file)",
    "corrupt_image": "an image file cannot be decoded",
    "image_limits": "an image is beyond the size limits (bytes, pixels or aspect ratio), checked before decoding",
    "over_long": "after image expansion and truncation to max_length no assistant token is left to learn",
    "truncated_image": "truncation to max_length would cut off image tokens (the record would lose an image)",
    "over_context": "longer than the model takes (its position router's width) even after truncation to max_length",
    "image_in_text_mix": "a record of the text-only mixing file has images",
    "not_utf8": "the line is not UTF-8 text",
    "bad_unicode": "a field holds a lone surrogate (a JSON \\ud800-style escape that is no Unicode character)",
    "image_in_reply": "an `<image>` placeholder in an assistant turn (stock VLMs: a reply cannot be an image)",
    "template_mismatch": "the model's chat template renders a conversation's prefix differently inside the whole "
                         "(stock VLMs: the replies to learn cannot be located)",
}

# Records kept but changed on the way in: counted and listed too, so no change is silent.
CHANGES = {
    "truncated": "cut to max_length tokens (text only: a cut through an image is a `truncated_image` skip)",
}
# Records that passed the scan but failed to load during training; the next record stood in for each.
LOAD_FAILURE_NOTE = ("passed the scan but failed to load during training; the next record of the dataset was "
                     "used in its place (use data.policy=error to stop instead)")


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
    changes: list[dict] = field(default_factory=list)  # kept records that were changed (e.g. truncated)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"bad-record policy must be one of {POLICIES}, got {self.policy!r}")

    def bad(self, location: str, record_id, error: BadRecord) -> None:
        """Record (skip) or raise (error) one bad record."""
        message = f"{location} (record id={record_id!r}): {error.reason}: {error.detail}"
        if self.policy == "error":
            raise ValueError(f"bad training record at {message}")
        self.entries.append({"location": location, "id": record_id, "reason": error.reason, "detail": error.detail})

    def changed(self, location: str, record_id, reason: str, detail: str) -> None:
        """Count a kept record that was changed on the way in (one of `CHANGES`)."""
        if reason not in CHANGES:
            raise ValueError(f"unknown change {reason!r}")
        self.changes.append({"location": location, "id": record_id, "reason": reason, "detail": detail})

    @property
    def changed_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(e["reason"] for e in self.changes).items()))

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
            "changed": len(self.changes),
            "changed_by_reason": self.changed_by_reason,
            "changes": {r: CHANGES[r] for r in self.changed_by_reason},
            "changed_records": self.changes,
            **(extra or {}),
        }

    def summary(self) -> str:
        kept = sum(self.kept.values())
        if not self.entries:
            text = f"data: kept {kept} records, skipped none"
        else:
            reasons = ", ".join(f"{r}={n}" for r, n in self.by_reason.items())
            text = f"data: kept {kept} records, skipped {len(self.entries)} ({reasons})"
        if self.changes:
            text += "; changed " + ", ".join(f"{r}={n}" for r, n in self.changed_by_reason.items())
        return text

    def print_summary(self, report_path: str | Path | None = None) -> None:
        tail = f"; report: {report_path}" if report_path and (self.entries or self.changes) else ""
        print(self.summary() + tail, file=sys.stderr)


def write_json_atomic(path: str | Path, data) -> Path:
    """Write to a temp file in the same folder, then rename: readers never see a half-written report."""
    from ..atomic import write_json_atomic as write

    return write(path, data)


def log_load_failure(log: Path | None, location: str, record_id, error: BadRecord) -> None:
    """Append one load-time failure as a JSON line (one small `write` in append mode, so lines from several
    dataloader workers or ranks do not interleave)."""
    if log is None:
        return
    from ..atomic import json_text  # (a path that is not UTF-8 is written escaped)

    line = json_text({"location": location, "id": record_id, "reason": error.reason, "detail": error.detail},
                     default=str) + "\n"
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def merge_load_failures(report_path: Path, log: Path) -> dict | None:
    """Add the load-time failures logged in `log` to the report at `report_path` (`replaced_at_load`) and print a
    summary line; returns that section (None when nothing failed)."""
    if not log.is_file():
        return None
    entries = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash mid-append
    if not entries:
        return None
    section = {"count": len(entries), "records": len({(e.get("location"), str(e.get("id"))) for e in entries}),
               "by_reason": dict(sorted(Counter(e.get("reason") for e in entries).items())),
               "note": LOAD_FAILURE_NOTE, "failures": entries}
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    report["replaced_at_load"] = section
    write_json_atomic(report_path, report)
    reasons = ", ".join(f"{r}={n}" for r, n in section["by_reason"].items())
    print(f"data: {section['count']} sample loads failed during training and were replaced by the next record "
          f"({reasons}); report: {report_path}", file=sys.stderr)
    return section
