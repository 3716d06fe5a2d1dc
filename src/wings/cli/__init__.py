"""The `wings` command: one entry point, one module per subcommand (each exposes `register(subparsers)`).

This package and its subcommand modules import only the standard library at module level (heavy imports happen
inside each command's `run`), so the parser can be built and `--help` or an argument error answered before
torch and transformers are imported: the `wings` console script (`wings_entry`) relies on it.
"""

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


# Commands that run as one job across the processes of a launcher (torchrun, accelerate launch, mpirun); every
# other command would run whole in each process, all writing the same outputs, so it refuses such a launch.
MULTI_PROCESS_COMMANDS = {"train"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (argparse exits with code 2 on a bad flag, 0 after --help)."""
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; known kinds of failure become one line on stderr and exit code 2."""
    from ..launch_env import keep_deepspeed_unloaded
    from .errors import Terminated, close_progress_bars, message_for, sigterm_as_exception

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print_paths_as_given()
    name = " ".join(filter(None, [args.command, getattr(args, "iit_command", None)]))
    try:
        with sigterm_as_exception():
            refuse_multi_process_launch(args.command)
            keep_deepspeed_unloaded()
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


def refuse_multi_process_launch(command: str) -> None:
    """A command that is not distributed, started N times by a launcher, would run N times over the same outputs."""
    if command in MULTI_PROCESS_COMMANDS:
        return
    from ..launch_env import launched_world_size, launcher_variables

    world = launched_world_size()
    if world > 1:
        raise CLIError(f"this command runs in one process, but a launcher started {world} ({launcher_variables()}): "
                       "each would run it whole and write the same outputs; run it without torchrun / accelerate "
                       "launch / mpirun (only `wings train` runs across processes)")


def print_paths_as_given() -> None:
    """A path whose name is not UTF-8 (Latin-1 `caf\\xe9`) reaches Python as a lone surrogate, and printing it to a
    strict UTF-8 stdout (`wrote PATH`) would fail after the work is done: print such names back as the bytes they
    were, as `ls` does. (stderr already escapes them.)"""
    stream = sys.stdout
    if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
        try:
            stream.reconfigure(errors="surrogateescape")
        except (ValueError, OSError):  # a stream that cannot change now: leave it
            pass
