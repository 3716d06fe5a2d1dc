"""The `wings` command: one entry point, one module per subcommand (each exposes `register(subparsers)`)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Subcommand modules, in the order `wings --help` lists them.
COMMANDS = ["init_model", "smoke", "train", "evaluate", "forgetting", "iit", "laws", "chat", "convert_official",
            "serve", "demo", "study"]


class CLIError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wings", description="Wings multimodal LLMs: build, train, chat, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"wings.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import Terminated, close_progress_bars, message_for, sigterm_as_exception

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    name = " ".join(filter(None, [args.command, getattr(args, "iit_command", None)]))
    try:
        with sigterm_as_exception():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"wings {name}: interrupted{getattr(args, 'interrupt_hint', '')}", file=sys.stderr)
        return 130
    except Terminated as stop:
        close_progress_bars()
        print(f"wings {name}: terminated (SIGTERM){getattr(args, 'interrupt_hint', '')}", file=sys.stderr)
        return int(stop.code)
    except Exception as err:  # known kinds become one line (wings.cli.errors); anything else is a bug: traceback
        message = message_for(err)
        if message is None:
            raise
        close_progress_bars()
        print(f"wings {name}: error: {message}", file=sys.stderr)
        return 2
