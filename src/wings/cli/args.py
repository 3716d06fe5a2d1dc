"""Argument types and checks shared by the subcommands: numbers in range (argparse then prints
`wings <cmd>: error: argument --x: ...`), and devices that exist on this machine."""

from __future__ import annotations

import argparse
import sys


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def probability(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def text(value: str) -> str:
    """A text argument (a prompt, a stop string, a label, a name). Python hands bytes that are not valid in the
    terminal's encoding on as lone surrogates, which no tokenizer, UTF-8 file or HTTP response can carry: refused."""
    from ..paths import lone_surrogate

    found = lone_surrogate(value)
    if found:
        raise argparse.ArgumentTypeError(f"holds {found[1]}, which is not text (a byte that is not valid "
                                         f"{sys.getfilesystemencoding()}, or half of a UTF-16 pair)")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def check_device(name: str | None, flag: str = "--device") -> str | None:
    """Refuse a device string torch does not parse, or an accelerator this machine does not have, before any model
    is loaded (torch would fail later with an assertion or a driver message). None and "auto" pass through."""
    if name in (None, "auto"):
        return name
    import torch

    from . import CLIError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"{flag} {name!r} is not a device (use cpu, cuda, cuda:N, mps or auto): {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"{flag} {name}: no CUDA device is visible on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CLIError(f"{flag} {name}: Apple MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise CLIError(f"{flag} {name}: only cpu, cuda and mps devices are supported")
    return name
