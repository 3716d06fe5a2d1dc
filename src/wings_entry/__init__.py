"""The `wings` console script: `--help` and argument errors answered before torch and transformers are imported.

`wings.cli` lives inside the `wings` package, and `import wings` imports transformers and torch (seconds) to register
the Auto classes; a console script pointing at `wings.cli:main` would pay that before argparse even looks at the
arguments. This module sits outside the package. It binds the `wings` package object without running its
`__init__`, builds the parser from `wings.cli` (whose modules import only the standard library at module level) and
parses; only once the arguments are valid and a command is about to run does it run the package's `__init__` (the
ordinary `import wings`, Auto-class registration included) on that same package object, then the command.

`python -m wings.cli` (what torchrun runs) and `wings.cli.main` in-process keep the ordinary import order; they
are slower to answer `--help` but otherwise identical.
"""

from __future__ import annotations

import importlib.util
import sys


def main(argv: list[str] | None = None) -> int:
    if "wings" in sys.modules:  # already imported (called in-process): nothing to defer
        from wings.cli import main as wings_main

        return wings_main(argv)
    spec = importlib.util.find_spec("wings")
    if spec is None or spec.loader is None:
        raise ImportError("the wings package is not installed", name="wings")
    package = importlib.util.module_from_spec(spec)
    sys.modules["wings"] = package  # `wings.cli` can now be imported; the package's __init__ has not run yet
    try:
        from wings.cli import parse_args, run

        args = parse_args(argv)  # exits here on --help and on argument errors
    except BaseException:
        del sys.modules["wings"]  # never leave a half-made package behind
        raise
    spec.loader.exec_module(package)  # `import wings` proper: torch, transformers, the Auto registrations
    return run(args)
