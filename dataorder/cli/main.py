"""The ``dataorder`` command: a thin layer over the library.

Each subcommand lives in ``dataorder/cli/commands/<name>.py`` and defines
``configure(parser)`` (its arguments) and ``run(args) -> int`` (its exit code); modules are
imported only when their subcommand runs, so ``dataorder --help`` is fast.

:func:`main` is the one error boundary: an argparse usage error (:class:`Parser`), a
:class:`~dataorder.cli.errors.UsageError`, a
library ``ValueError``/``TypeError`` (bad input), an ``OSError`` (a path) or a missing
optional package becomes one line on stderr and exit status 2 — never a traceback.

Example::

    $ dataorder compare --data digits --model logreg --orders rr,so --epochs 10 --seeds 3

>>> main(["schedule", "show", "no-such-file.yaml"])
2
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from dataorder.cli.errors import UsageError
from dataorder.errors import MissingExtraError

__all__ = ["CLI_PACKAGES", "SUBCOMMANDS", "ParseError", "Parser", "build_parser", "main"]

#: subcommand -> one-line help; the module is ``dataorder.cli.commands.<subcommand>``.
SUBCOMMANDS: dict[str, str] = {
    "compare": "train with several orderings side by side and print the final losses",
    "score": "train short runs and write per-example difficulty scores",
    "schedule": "show or plot a domain-mixture schedule (YAML)",
    "bench": "run the benchmarks in benchmarks/ and print their ratios",
}

#: import name -> distribution of the packages the ``[cli]`` extra installs.
CLI_PACKAGES: dict[str, str] = {
    "tqdm": "tqdm", "sklearn": "scikit-learn", "pyarrow": "pyarrow", "datasets": "datasets",
    "matplotlib": "matplotlib",
}


def missing_cli_packages() -> list[str]:
    """Distributions of the ``[cli]`` extra that are not installed (found without importing them).

    >>> isinstance(missing_cli_packages(), list)
    True
    """
    return [dist for module, dist in CLI_PACKAGES.items() if not _installed(module)]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as missing
        return False


class ParseError(Exception):
    """argparse refused the command line; ``prog`` is the (sub)command whose flags were wrong."""

    def __init__(self, prog: str, message: str) -> None:
        self.prog, self.message = prog, message
        super().__init__(f"{prog}: error: {message}")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors raise :class:`ParseError` (one line, printed by :func:`main`)
    instead of printing the usage block and exiting."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        raise ParseError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (each one's module imported to configure it)."""
    parser = Parser(prog="dataorder", description="Decide which examples a model sees, and in what order.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(f"dataorder.cli.commands.{name}")
        module.configure(command)
        command.set_defaults(module=module, command_parser=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), "dataorder")
    missing = missing_cli_packages()
    if missing:
        print(f"dataorder {command}: the command line needs the [cli] extra (missing {', '.join(missing)}): "
              "pip install 'dataorder[cli]'", file=sys.stderr)
        return 2
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra:  # flags the subcommand does not know: its error, not the top-level parser's
            args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except ParseError as error:
        usage = "dataorder --help" if error.prog == "dataorder" else f"{error.prog} --help"
        print(f"{error.prog}: error: {_one_line(error.message)} (see '{usage}' for usage)", file=sys.stderr)
        return 2
    try:
        return int(args.module.run(args) or 0)
    except (UsageError, MissingExtraError, ValueError, TypeError, OSError) as error:
        print(f"dataorder {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dataorder {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException, limit: int = 500) -> str:
    """The error's message on one line, at most ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
