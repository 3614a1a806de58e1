"""The ``dataorder`` command: a thin layer over the library.

Each subcommand lives in ``dataorder/commands/<name>.py`` and defines
``configure(parser)`` (its arguments) and ``run(args) -> int`` (its exit code); modules are
imported only when their subcommand runs, so ``dataorder --help`` is fast.

Example::

    $ dataorder compare --data digits --model logreg --orders rr,so --epochs 10 --seeds 3
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> one-line help; the module is ``dataorder.commands.<subcommand>``.
SUBCOMMANDS: dict[str, str] = {
    "compare": "train with several orderings side by side and print the final losses",
    "score": "train short runs and write per-example difficulty scores",
    "schedule": "show or plot a domain-mixture schedule (YAML)",
    "bench": "run the benchmarks in benchmarks/ and print their ratios",
}


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataorder", description="Decide which examples a model sees, and in what order.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(f"dataorder.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"dataorder.commands.{name}":
                raise
            command.set_defaults(module=None)
            continue
        module.configure(command)
        command.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.module is None:
        print(f"dataorder {args.command}: not available in this installation", file=sys.stderr)
        return 2
    try:
        return int(args.module.run(args) or 0)
    except UsageError as error:
        print(f"dataorder {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dataorder {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run through the package's module so that UsageError is the class the commands raise.
    from dataorder.cli import main as package_main

    sys.exit(package_main())
