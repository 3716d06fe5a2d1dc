"""Atomic writes: every file and directory a command produces appears whole under its final name, or not at all.

A file is written to a hidden temp file in the same folder, flushed to disk, then renamed over the target
(`os.replace` is atomic within one file system). A directory (a saved model, a converted checkpoint) is built in
a hidden temp directory next to the target and renamed into place; an existing target is first moved aside and
deleted only once the new one is in place. On any failure (a full disk, a read-only folder, Ctrl-C) the temp
file or directory is removed and the target is untouched, so nothing half-written is ever taken for complete.
Temp names start with "." and end with ".tmp", which every reader here ignores.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync(path: Path) -> None:
    """Flush the file's data to the disk before the rename (a full disk can surface only here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.ENOTSUP):  # file systems that cannot fsync; the rename still orders it
            return
        raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; whatever the block writes there replaces `path` when it succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename in (str(tmp), tmp):  # name the file being written, not its temp copy
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_text(data, indent: int | None = None, default: Callable | None = None) -> str:
    """JSON with non-ASCII text kept as text. A document holding text that is not Unicode (a path whose name is not
    UTF-8 reaches Python as lone surrogates) is written with `\\uXXXX` escapes instead, which JSON allows and which
    read back to the same str; UTF-8 could not encode it at all."""
    text = json.dumps(data, indent=indent, ensure_ascii=False, default=default)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, indent=indent, default=default)
    return text


def write_json_atomic(path: str | Path, data, indent: int | None = 2) -> Path:
    """JSON (UTF-8, non-ASCII kept, unknown types via str; see `json_text`) with a trailing newline, atomically."""
    return write_text_atomic(path, json_text(data, indent, default=str) + "\n")


def write_with_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` (any writer that takes a path: matplotlib, safetensors...) and rename on success."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def temp_dir_for(target: Path) -> Path:
    """A fresh hidden directory next to `target` (same file system, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished directory `tmp` at `target`, replacing what was there (moved aside first, deleted last)."""
    if not target.exists() and not target.is_symlink():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", suffix=".tmp", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the previous one back: the target is never left missing
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp directory; when the block succeeds it replaces `target` whole (see `replace_dir`)."""
    target = Path(target)
    tmp = temp_dir_for(target)
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

