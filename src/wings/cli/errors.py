"""Known exceptions -> one-line messages for `wings <cmd>: error: ...` (exit 2); anything else is a bug and keeps
its traceback. Also turns SIGTERM into an exception, so temp files are cleaned up as on Ctrl-C."""

from __future__ import annotations

import errno
import signal
import threading
from contextlib import contextmanager

DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system (or the process's file-size limit)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "is a directory, expected a file",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.EMFILE: "too many open files",
    errno.ENOMEM: "out of memory",
}
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def one_line(text: str) -> str:
    """Join a multi-line message into one line (HF and torch messages often span several)."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _os_message(err: OSError) -> str:
    names = " -> ".join(str(f) for f in (err.filename, err.filename2) if f)
    reason = DISK_ERRNOS.get(err.errno or -1) or err.strerror or str(err)
    if err.errno in WRITE_ERRNOS:
        tail = "; nothing half-written was kept (outputs are written to temp files, then renamed)"
        return f"cannot write {names or 'the output'}: {reason}{tail}"
    if names:
        return f"{names}: {reason}"
    return one_line(str(err)) or reason


def message_for(err: BaseException) -> str | None:
    """The user-facing message for a known kind of failure, or None (an unexpected error: let it raise)."""
    import pickle
    import zipfile

    import yaml

    from . import CLIError

    if isinstance(err, CLIError):
        return one_line(str(err))
    if isinstance(err, UnicodeDecodeError):  # a reader that did not name its file; say what we know
        return f"a file is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
    if isinstance(err, MemoryError):
        return "out of memory; lower --batch-size, or use a smaller model / shorter inputs"
    try:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            return f"out of accelerator memory ({one_line(str(err)).split(';')[0]}); lower --batch-size"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(err, (ValueError, LookupError)) and not isinstance(err, (KeyError, IndexError)):
        return one_line(str(err))
    if isinstance(err, OSError):
        return _os_message(err)
    if isinstance(err, (pickle.UnpicklingError, zipfile.BadZipFile, EOFError)):
        return f"a saved torch file is corrupt or truncated ({one_line(str(err))})"
    if isinstance(err, yaml.YAMLError):
        return f"not valid YAML: {one_line(str(err))}"
    if type(err).__name__ in ("SafetensorError", "DecompressionBombError"):
        return f"{type(err).__name__}: {one_line(str(err))}"
    if isinstance(err, RuntimeError) and "PytorchStreamReader" in str(err):
        return f"a saved torch file is corrupt or truncated ({one_line(str(err))})"
    if isinstance(err, ImportError) and getattr(err, "name", None):
        return f"the optional package {err.name!r} is needed here and is not installed ({one_line(str(err))})"
    return None


def close_progress_bars() -> None:
    """End any progress bar an exception left open (HF's training bar, a scan bar), so the message that follows
    starts on a line of its own instead of after the bar's last `\r` state."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    for bar in list(getattr(tqdm, "_instances", [])):
        try:
            bar.close()
        except Exception:  # noqa: BLE001  (a bar in a broken state must not hide the real error)
            pass


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread so `finally` blocks (temp file clean-up) run as on Ctrl-C."""


@contextmanager
def sigterm_as_exception():
    """While the command runs, SIGTERM raises `Terminated` (exit 143) instead of killing the process outright."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum, frame):
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
