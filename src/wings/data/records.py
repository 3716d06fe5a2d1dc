"""LLaVA records on disk -> checked, normalised `Record`s (roles, placeholders, image paths), and image loading.

A record is `{"id", "image" | "images", "conversations": [{"from": "human"|"gpt"|"system", "value": str}]}`,
read from a JSON list (`.json`) or JSON Lines (`.jsonl`). `image` may be a string or a list, `images` a list;
no image field means a text-only record. `<image>` may appear anywhere in any turn, once per image, in the order
of the image list. Following LLaVA, a record that has images but no `<image>` at all gets one `<image>\\n` per
image prepended to its first human turn; any other count mismatch is a bad record.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..images import DEFAULT_LIMITS, ImageError, ImageLimits, check_size, open_image
from ..paths import lone_surrogate, read_text, require_file, surrogate_message
from ..processing import IMAGE_TOKEN
from .report import BadRecord, where

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_CHECKS = ("none", "exists", "verify", "load")


@dataclass(frozen=True, slots=True)
class Record:
    """One checked conversation. `messages` are chat-template messages (role, content with inline `<image>`)."""

    location: str  # `file:line N` or `file[index N]`, for messages and the report
    id: object
    messages: tuple[dict, ...]
    images: tuple[Path, ...]

    @property
    def is_multimodal(self) -> bool:
        return bool(self.images)


def iter_raw_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """Yield (location, parsed JSON value or BadRecord) for each record of a `.jsonl` or `.json` file.

    A malformed (or non-UTF-8) JSONL line is one bad record; a `.json` file that does not parse as a list is a
    file error.
    """
    path = require_file(path, "data file")
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for n, raw_line in enumerate(f, start=1):
                try:
                    line = raw_line.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    bad = BadRecord("not_utf8", f"the line is not UTF-8 text (byte 0x{raw_line[e.start]:02x} at "
                                                f"column {e.start + 1})")
                    yield where(path, line=n), bad
                    continue
                if not line.strip():
                    continue
                try:
                    yield where(path, line=n), json.loads(line)
                except json.JSONDecodeError as e:
                    bad = BadRecord("malformed_json", f"invalid JSON ({e.msg} at column {e.colno})")
                    yield where(path, line=n), bad
                except RecursionError:
                    yield where(path, line=n), BadRecord("malformed_json", "JSON nested too deeply to parse")
        return
    text = read_text(path, "data file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one record per line? name the file .jsonl)" if "Extra data" in e.msg else ""
        raise ValueError(f"data file {path} is not valid JSON: {e.msg} at line {e.lineno}{hint}") from e
    except RecursionError:
        raise ValueError(f"data file {path} holds JSON nested too deeply to parse") from None
    if not isinstance(data, list):
        raise ValueError(f"data file {path} holds a JSON {type(data).__name__}, expected a list of records")
    for i, raw in enumerate(data):
        yield where(path, index=i), raw


def record_id(raw: object) -> object:
    """The record's `id` for messages and the report; an id that is not Unicode text (a lone surrogate) is given
    with that character escaped (`bad \\ud800 id`), so the report stays writable as UTF-8."""
    rid = raw.get("id") if isinstance(raw, dict) else None
    if lone_surrogate(rid):
        return str(rid).encode("utf-8", "backslashreplace").decode("utf-8")
    return rid


def _image_list(raw: dict) -> list[str]:
    if "image" in raw and "images" in raw:
        raise BadRecord("bad_fields", "has both `image` and `images`; use one")
    value = raw.get("images", raw.get("image"))
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) and x.strip() and "\x00" not in x for x in items):
        shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "..."
        raise BadRecord("bad_fields", f"`image`/`images` must be a non-empty path or a list of them, got {shown}")
    return items


def _messages(conversations: object) -> list[dict]:
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord("bad_fields", "`conversations` must be a non-empty list")
    messages = []
    for t, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRecord("bad_fields", f"turn {t} needs `from` and `value`")
        if not isinstance(turn["value"], str):
            raise BadRecord("bad_fields", f"turn {t}: `value` must be a string, got {type(turn['value']).__name__}")
        role = ROLE_MAP.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise BadRecord("unknown_role", f"turn {t} has `from`={turn['from']!r}; expected human, gpt or system")
        if not turn["value"].strip():
            raise BadRecord("empty_turn", f"turn {t} ({turn['from']}) is empty")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _check_order(messages: list[dict]) -> None:
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
    if not body or body != expected or body[-1] != "assistant":
        shown = " -> ".join(roles)
        raise BadRecord("role_order", f"roles {shown}; expected [system ->] user -> assistant (alternating, "
                                      "ending with assistant)")


def normalize(raw: object, location: str, image_root: Path, default_system: str | None = None) -> Record:
    """Check one parsed record's structure and turn it into a `Record` (images are not opened here)."""
    if isinstance(raw, BadRecord):
        raise raw
    if not isinstance(raw, dict):
        raise BadRecord("malformed_json", f"the record is a JSON {type(raw).__name__}, expected an object")
    found = lone_surrogate(raw)  # text no tokenizer can take (a `\ud800` escape): the field is named
    if found:
        raise BadRecord("bad_unicode", surrogate_message(found))
    if "conversations" not in raw:
        raise BadRecord("bad_fields", "missing `conversations`")
    images = _image_list(raw)
    messages = _messages(raw["conversations"])
    _check_order(messages)
    placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if images and placeholders == 0:  # LLaVA's convention: the images go before the first question
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = f"{IMAGE_TOKEN}\n" * len(images) + first_user["content"]
    elif placeholders != len(images):
        raise BadRecord("placeholder_mismatch", f"{placeholders} `{IMAGE_TOKEN}` placeholders but {len(images)} images")
    if default_system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": default_system})
    paths = tuple(Path(p) if Path(p).is_absolute() else image_root / p for p in images)
    return Record(location=location, id=raw.get("id"), messages=tuple(messages), images=paths)


# ImageError.reason (wings.images) -> the bad-record reason the data report counts it under.
IMAGE_REASONS = {"missing": "missing_image", "not_a_file": "missing_image", "too_large": "image_limits",
                 "too_many_pixels": "image_limits", "bad_aspect_ratio": "image_limits"}


def _bad_image(err: ImageError) -> BadRecord:
    return BadRecord(IMAGE_REASONS.get(err.reason, "corrupt_image"), str(err))


def check_image(path: Path, mode: str = "verify", limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """Scan-time image check. `verify` (default) checks the size limits on the header and the file's structure
    without decoding all pixels (cheap); `load` decodes fully through `open_image` (catches every corrupt file,
    slower); `exists` only stats it; `none` skips."""
    if mode not in IMAGE_CHECKS:
        raise ValueError(f"image_check must be one of {IMAGE_CHECKS}, got {mode!r}")
    if mode == "none":
        return
    if not path.exists():
        raise BadRecord("missing_image", f"image {path} does not exist")
    if not path.is_file():
        raise BadRecord("missing_image", f"image {path} is not a file")
    if mode == "exists":
        return
    if mode == "load":
        load_image(path, limits)
        return
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise BadRecord("image_limits", f"image {path} is {size:,} bytes, over the limit of {limits.max_bytes:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            with Image.open(path) as im:
                check_size(im.width, im.height, str(path), limits)  # from the header, before any decoding
                im.verify()
    except ImageError as e:
        raise _bad_image(e) from None
    except Image.DecompressionBombError as e:
        raise BadRecord("image_limits", f"image {path} claims too many pixels ({e})") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
        raise BadRecord("corrupt_image", f"image {path} cannot be decoded ({type(e).__name__}: {e})") from e


def load_image(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode one image to RGB through `wings.images.open_image` (limits checked before decoding); errors become
    `BadRecord` so the dataset's policy applies."""
    try:
        return open_image(Path(path), limits)
    except ImageError as e:
        raise _bad_image(e) from None
