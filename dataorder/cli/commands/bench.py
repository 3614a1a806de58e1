"""``dataorder bench``: run the benchmark scripts of a source checkout (``benchmarks/*.py``).

The benchmarks live beside the package in the repository, not inside the installed
package; run this from the repository root (or pass ``--dir``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from dataorder.cli.errors import UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all), e.g. sampler_throughput")
    parser.add_argument("--dir", default="benchmarks", help="folder of the benchmark scripts (default: ./benchmarks)")
    parser.add_argument("--quick", action="store_true", help="pass --quick to each script (a small smoke run)")
    parser.add_argument("--list", action="store_true", help="list the available benchmarks and exit")


def available(folder: Path) -> list[str]:
    """Benchmark names in ``folder``: every ``*.py`` not starting with an underscore."""
    return sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_"))


def run(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if not folder.is_dir():
        raise UsageError(f"no benchmark folder {folder}/: run from the repository root or pass --dir")
    names = available(folder)
    if not names:
        raise UsageError(f"--dir {folder}/ holds no benchmark scripts (*.py): pass the repository's benchmarks folder")
    if args.list:
        print("\n".join(names))
        return 0
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        raise UsageError(f"unknown benchmark {', '.join(unknown)}; available: {', '.join(names)}")
    status = 0
    for name in args.names or names:
        print(f"== {name}", flush=True)
        command = [sys.executable, str(folder / f"{name}.py")] + (["--quick"] if args.quick else [])
        status = max(status, subprocess.call(command))
    return status
