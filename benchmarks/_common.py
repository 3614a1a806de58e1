"""Shared helpers for the benchmark scripts: timing, machine description, table printing."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch


def machine() -> str:
    """One line naming the machine the numbers come from."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")


#: glibc malloc settings that keep freed memory in the process instead of returning it to the
#: system, so a training step does not fault in fresh pages for its tensors each time (what a
#: caching allocator -- jemalloc, tcmalloc, or CUDA's own -- gives). Read at process start.
STEADY_MALLOC = {"MALLOC_TRIM_THRESHOLD_": "1000000000", "MALLOC_MMAP_THRESHOLD_": "1000000000"}


def device_name(text: str) -> str:
    """An argparse ``type`` for ``--device``: ``text`` if torch knows the device, else a one-line usage error."""
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda or cuda:N") from None
    return text


def use_allocator(kind: str) -> str:
    """``"default"``: glibc malloc as it is; ``"steady"``: restart this script under :data:`STEADY_MALLOC`.

    On CPU, with the default settings, a step's large tensors are handed back to the system when
    freed and faulted in afresh on the next step: a cost that varies between processes by
    ±20 % of a small CNN's step and hides the arithmetic being compared. Returns a label for
    the output's first line.
    """
    if kind == "steady" and any(os.environ.get(key) != value for key, value in STEADY_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC})
    return "glibc malloc, freed memory kept (MALLOC_TRIM/MMAP_THRESHOLD_=1e9)" if kind == "steady" \
        else "glibc malloc, default settings"


def best_of(function: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``function`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
