"""Task files: JSONL records loaded, validated (errors name the file, line and record id) and turned into chats.

Record: {"id", "question", "answer", "options"?: [...], "image" | "images"?, "context"?: [{"question", "answer",
"image" | "images"?}], "config"?: "TTV"}. Image paths are relative to the task file's directory unless absolute.
Multiple choice when "options" is present ("answer" = an option's text, its index, or its letter A, B, ...);
otherwise open-ended ("answer" = a string or a list of accepted strings).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..data.records import check_image
from ..data.report import BadRecord
from ..images import ImageError, open_image
from ..paths import lone_surrogate, require_file, surrogate_message
from ..processing import IMAGE_TOKEN
from .answers import normalise_answer


class TaskError(ValueError):
    """A bad task file or record (a ValueError, so the CLI prints it as one line)."""


@dataclass
class Turn:
    question: str
    answer: str
    images: list[Path] = field(default_factory=list)


@dataclass
class TaskItem:
    id: str
    question: str
    answers: list[str]  # MC: [gold option]; open: accepted answers
    options: list[str] | None = None
    answer_index: int | None = None  # MC only
    images: list[Path] = field(default_factory=list)
    context: list[Turn] = field(default_factory=list)
    config: str | None = None

    @property
    def is_mc(self) -> bool:
        return self.options is not None

    @property
    def all_images(self) -> list[Path]:
        """Images in placeholder order: context turns first, then the scored question's."""
        return [p for turn in self.context for p in turn.images] + list(self.images)

    @property
    def gold(self) -> str:
        return self.answers[0]


@dataclass
class Task:
    name: str
    path: Path
    items: list[TaskItem]

    @property
    def has_images(self) -> bool:
        return any(item.all_images for item in self.items)


def load_task(path: str | Path, name: str | None = None) -> Task:
    path = require_file(path, "task file")
    items: list[TaskItem] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for lineno, raw_line in enumerate(f, 1):
            where = f"{path} line {lineno}"
            try:
                line = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise TaskError(f"{where}: not UTF-8 text (byte 0x{raw_line[err.start]:02x} at column "
                                f"{err.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{where}: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise TaskError(f"{where}: JSON nested too deeply to parse") from None
            item = parse_record(record, path.parent, where)
            if item.id in seen:
                raise TaskError(f"{where} (id {item.id!r}): duplicate id, first seen on line {seen[item.id]}")
            seen[item.id] = lineno
            items.append(item)
    if not items:
        raise TaskError(f"{path}: no records")
    return Task(name=name or path.stem, path=path, items=items)


def parse_record(record, base_dir: Path, where: str) -> TaskItem:
    if not isinstance(record, dict):
        raise TaskError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    found = lone_surrogate(record)  # a `\ud800` escape: no tokenizer (and no UTF-8 results file) can take it
    if found:
        rid = record.get("id")
        named = f" (id {rid!r})" if isinstance(rid, str | int) and found[0] != "id" else ""
        raise TaskError(f"{where}{named}: {surrogate_message(found)}")
    if "id" not in record or not isinstance(record["id"], str | int) or str(record["id"]) == "":
        raise TaskError(f"{where}: missing or empty field 'id'")
    rid = str(record["id"])
    where = f"{where} (id {rid!r})"

    def fail(msg: str) -> TaskError:
        return TaskError(f"{where}: {msg}")

    question = _text(record, "question", fail)
    images = _images(record, base_dir, fail, question)
    context = []
    raw_context = record.get("context", [])
    if not isinstance(raw_context, list):
        raise fail("'context' must be a list of {question, answer} turns")
    for k, turn in enumerate(raw_context):
        def turn_fail(msg: str, k: int = k) -> TaskError:
            return fail(f"context turn {k}: {msg}")

        if not isinstance(turn, dict):
            raise turn_fail("must be an object with 'question' and 'answer'")
        t_question = _text(turn, "question", turn_fail)
        t_answer = _text(turn, "answer", turn_fail)
        context.append(Turn(t_question, t_answer, _images(turn, base_dir, turn_fail, t_question)))
    config = record.get("config")
    if config is not None and (not isinstance(config, str) or not config or set(config) - {"T", "V"}):
        raise fail(f"'config' must be a string of T and V, got {config!r}")

    if "answer" not in record:
        raise fail("missing field 'answer'")
    answer = record["answer"]
    if "options" in record:
        options = record["options"]
        if not isinstance(options, list) or not options:
            raise fail("'options' must be a non-empty list of strings")
        if not all(isinstance(o, str) and o.strip() for o in options):
            raise fail("every option must be a non-empty string")
        if len(options) < 2:
            raise fail(f"a multiple-choice item needs at least 2 options to discriminate; with {len(options)} it "
                       "would always be scored correct")
        if len(set(options)) != len(options):
            raise fail("'options' has duplicates, so the answer would be ambiguous")
        folded = [" ".join(o.split()).casefold() for o in options]
        if len(set(folded)) != len(folded):
            raise fail(f"'options' {options} has options that differ only in case or spacing, so the answer "
                       "would be ambiguous")
        index = _answer_index(answer, options, fail)
        return TaskItem(rid, question, [options[index]], options, index, images, context, config)
    answers = answer if isinstance(answer, list) else [answer]
    if not answers or not all(isinstance(a, str | int | float) and not isinstance(a, bool) and str(a).strip()
                              for a in answers):
        raise fail("'answer' must be a non-empty string (or a list of them) for an open question")

    for a in answers:
        if not normalise_answer(str(a)):
            raise fail(f"the accepted answer {a!r} is empty once normalised (lowercase, no punctuation or "
                       "articles), so an empty reply would be scored correct")
    return TaskItem(rid, question, [str(a) for a in answers], None, None, images, context, config)


def _text(record: dict, key: str, fail) -> str:
    if key not in record:
        raise fail(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str | int | float) or not str(value).strip():
        raise fail(f"field {key!r} must be a non-empty string")
    return str(value)


def _images(record: dict, base_dir: Path, fail, question: str) -> list[Path]:
    if "image" in record and "images" in record:
        raise fail("give 'image' or 'images', not both")
    raw = record.get("images", [record["image"]] if "image" in record else [])
    if not isinstance(raw, list) or not all(isinstance(p, str) and p and "\x00" not in p for p in raw):
        raise fail("'image' must be a path string and 'images' a list of path strings")
    paths = []
    for p in raw:
        full = Path(p) if Path(p).is_absolute() else base_dir / p
        if not full.is_file():
            raise fail(f"unknown image {p!r} (looked for {full})")
        try:  # size limits on the header and the file's structure, now: not after the model has scored half
            check_image(full, "verify")
        except BadRecord as err:
            raise fail(err.detail) from None
        paths.append(full)
    n_placeholders = question.count(IMAGE_TOKEN)
    if n_placeholders and n_placeholders != len(paths):
        raise fail(f"the question has {n_placeholders} {IMAGE_TOKEN} placeholders but {len(paths)} images")
    return paths


def _answer_index(answer, options: list[str], fail) -> int:
    if isinstance(answer, bool):
        raise fail(f"'answer' {answer!r} is not an option")
    if isinstance(answer, int):
        if not 0 <= answer < len(options):
            raise fail(f"'answer' index {answer} is out of range for {len(options)} options")
        return answer
    if isinstance(answer, str):
        letter = answer.strip().upper()
        by_letter = string.ascii_uppercase.index(letter) if len(letter) == 1 and \
            letter in string.ascii_uppercase[: len(options)] else None
        if answer in options:
            by_text = options.index(answer)
            if by_letter is not None and by_letter != by_text:
                raise fail(f"'answer' {answer!r} is ambiguous: it is option {by_text} by its text and option "
                           f"{by_letter} by its letter; give the index instead")
            return by_text
        if by_letter is not None:
            return by_letter
    raise fail(f"'answer' {answer!r} is not one of the options {options}")


# ---------------------------------------------------------------------------------------------------------------
# Chats


def turn_content(question: str, n_images: int) -> str:
    """The user message: placeholders where the question puts them, else one `<image>` line per image first."""
    if IMAGE_TOKEN in question or not n_images:
        return question
    return f"{IMAGE_TOKEN}\n" * n_images + question


def messages(item: TaskItem) -> list[dict]:
    """Context turns (with their gold answers) then the scored question, as chat messages."""
    chat = []
    for turn in item.context:
        chat.append({"role": "user", "content": turn_content(turn.question, len(turn.images))})
        chat.append({"role": "assistant", "content": turn.answer})
    chat.append({"role": "user", "content": turn_content(item.question, len(item.images))})
    return chat


def open_images(item: TaskItem) -> list[Image.Image]:
    """The item's images through `wings.images.open_image` (size limits checked before decoding)."""
    out = []
    for path in item.all_images:
        try:
            out.append(open_image(path))
        except ImageError as err:
            raise TaskError(f"record {item.id!r}: {err}") from None
    return out
