"""The `wings` command: one entry point, one module per subcommand (each exposes `register(subparsers)`)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Subcommand modules, in the order `wings --help` lists them.
COMMANDS = ["init_model", "smoke", "train", "evaluate", "forgetting", "iit", "laws", "chat", "convert_official",
            "serve", "demo"]


class CLIError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wings", description="Wings multimodal LLMs: build, train, chat, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"wings.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, OSError) as err:
        print(f"wings {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
