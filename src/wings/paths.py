"""Input paths checked with messages that name the thing, and the one output-path guard every command uses.

Inputs: `require_file` / `require_dir` tell "does not exist", "is a directory" and "is a file" apart;
`read_text` / `read_json` name the file (and the byte and line) when it is not UTF-8 or not JSON.

Outputs: `guard_outputs` refuses, before anything is written or deleted, an output that is one of the command's
inputs, contains one (writing or replacing it would destroy the input), or lies inside one (commands never write
into their inputs). `check_output_dir` / `check_output_file` refuse an existing model or run folder unless the
caller passed its explicit overwrite flag, and a path of the wrong kind (a file where a folder goes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class OutputError(ValueError):
    """An output path that would destroy or overwrite something the command was not told to replace."""


def expand(path: str | Path) -> Path:
    """`~` expanded (a path given as `--flag=~/x` reaches us unexpanded by the shell)."""
    return Path(os.path.expanduser(str(path)))


def require_file(path: str | Path, what: str) -> Path:
    """`path` as an existing regular file, or FileNotFoundError / ValueError naming `what` and the problem."""
    path = expand(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, expected a file")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file")
    return path


def require_dir(path: str | Path, what: str) -> Path:
    path = expand(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{what} {path} is a file, expected a directory")
    return path


def decode_utf8(data: bytes, where: str) -> str:
    """Decode UTF-8 (a leading BOM is dropped) or raise ValueError naming `where`, the byte and its line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        byte = data[err.start:err.start + 1].hex()
        raise ValueError(f"{where} is not UTF-8 text (byte 0x{byte} at offset {err.start}, line {line}); "
                         "save it as UTF-8") from None


def read_text(path: str | Path, what: str) -> str:
    path = require_file(path, what)
    return decode_utf8(path.read_bytes(), f"{what} {path}")


def read_json(path: str | Path, what: str):
    path = require_file(path, what)
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err.msg} at line {err.lineno} "
                         f"column {err.colno}") from None
    except RecursionError:
        raise ValueError(f"{what} {path} holds JSON nested too deeply to parse") from None


# ---------------------------------------------------------------------------------------------------------------
# Text that is not Unicode


def lone_surrogate(value: object, path: str = "") -> tuple[str, str] | None:
    """Where a JSON value (or a command-line string) holds a lone surrogate, and which: `("messages[0].content",
    "U+D800 at character 4")`, or None. Checked without recursion; dict keys are checked too.

    JSON's `\\uD800` escapes can carry half of a UTF-16 pair, and Python decodes undecodable command-line or
    terminal bytes to U+DC80..U+DCFF: such a str is no Unicode text (no UTF-8 encoding exists), and tokenizers,
    UTF-8 writers and HTTP responses fail on it deep inside. Every place text enters refuses it with this.
    """
    stack = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if item.isascii():
                continue
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                return where or "the text", f"U+{ord(item[err.start]):04X} at character {err.start}"
        elif isinstance(item, dict):
            for key, sub in reversed(list(item.items())):
                sub_where = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and not key.isascii():
                    found = lone_surrogate(key, f"a key of {where or 'the object'}")
                    if found:
                        return found
                stack.append((sub_where, sub))
        elif isinstance(item, list | tuple):
            stack.extend((f"{where}[{i}]", sub) for i, sub in reversed(list(enumerate(item))))
    return None


def escaped(text: str) -> str:
    """`text`, or where it is not Unicode (a name taken from a folder whose name is not UTF-8) the same with those
    characters written as `\\udcff` escapes, so it can be shown, written as UTF-8 and sent over HTTP."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if lone_surrogate(text) else text


def surrogate_message(found: tuple[str, str]) -> str:
    """`FIELD holds a lone surrogate (U+D800 at character 4), which is not Unicode text: ...`."""
    where, which = found
    return (f"{where} holds a lone surrogate ({which}), which is not Unicode text (half of a UTF-16 pair, or a byte "
            "that was not valid in the input's encoding); fix or remove it")


# ---------------------------------------------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True)
class Output:
    """A path a command writes. `may_contain_inputs`: a run folder that holds other files (only its listed
    entries are written), so an input inside it is fine; a replaced directory (a model) may contain none."""

    label: str
    path: Path
    may_contain_inputs: bool = False


def _resolve(path: Path) -> Path:
    return expand(path).resolve(strict=False)


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def guard_outputs(outputs: Iterable[Output], inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """Raise OutputError if an output is an input, contains one, or lies inside one (checked on resolved paths,
    so symlinks and `..` do not hide an overlap)."""
    checked = [(label, Path(p), _resolve(Path(p))) for label, p in inputs if p not in (None, "")]
    for out in outputs:
        o = _resolve(out.path)
        for label, given, i in checked:
            if _same(o, i):
                raise OutputError(f"{out.label} {out.path} is the {label} {given}: a command never writes over its "
                                  "own input; choose another output path")
            if not out.may_contain_inputs and i.is_relative_to(o):
                raise OutputError(f"{out.label} {out.path} contains the {label} {given}: writing it would replace "
                                  "that input; choose an output path outside it")
            if o.is_relative_to(i) and i.is_dir():
                raise OutputError(f"{out.label} {out.path} is inside the {label} {given}: commands never write into "
                                  "their inputs; choose an output path outside it")


def check_output_dir(path: str | Path, label: str, overwrite: bool, flag: str = "--overwrite") -> Path:
    """A directory the command will create or replace whole: refuse a file there, and an existing non-empty
    directory unless `overwrite` (the caller's explicit flag, named in the message)."""
    path = expand(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputError(f"{label} {path} is a file, expected a directory (or a path that does not exist yet)")
        if any(path.iterdir()) and not overwrite:
            raise OutputError(f"{label} {path} exists and is not empty; pass {flag} to replace it, or choose "
                              "another path")
    _check_parent(path, label)
    return path


def check_output_file(path: str | Path, label: str) -> Path:
    """A file the command writes (atomically): refuse a directory there, or a parent that is a file."""
    path = expand(path)
    if path.is_dir():
        raise OutputError(f"{label} {path} is a directory, expected a file path")
    _check_parent(path, label)
    return path


def _check_parent(path: Path, label: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{label} {path}: {parent} is a file, so nothing can be written under it")
            return
