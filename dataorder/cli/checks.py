"""Flag checks shared by the subcommands: each raises a one-line :class:`UsageError` naming the flag.

>>> check_device("cpu")
'cpu'
>>> check_device("tpu")
Traceback (most recent call last):
...
dataorder.cli.errors.UsageError: --device must be cpu or cuda, got 'tpu'
>>> check_float32("--lr", 1e39, positive=True)
Traceback (most recent call last):
...
dataorder.cli.errors.UsageError: --lr must be a finite number > 0 and <= 3.4e+38 (float32's largest; torch trains in float32), got 1e+39
"""

from __future__ import annotations

import os
from pathlib import Path

from dataorder._validate import check_float32 as _check_float32
from dataorder.cli.errors import UsageError

__all__ = ["check_device", "check_figure", "check_float32", "check_unique"]


def check_device(device: str, flag: str = "--device") -> str:
    """``device`` if it names cpu, or cuda where CUDA is available."""
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"{flag} must be cpu or cuda, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {device}: CUDA is not available here; use {flag} cpu")
    return device


def check_float32(flag: str, value: float, *, positive: bool = False) -> float:
    """A float flag that torch takes as float32: finite, ``>= 0`` (``> 0`` if ``positive``), at most float32's max."""
    try:
        return _check_float32(value, flag, positive=positive)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


def check_figure(flag: str, path: str | os.PathLike, *, keep: str | os.PathLike | None = None) -> Path:
    """The path a figure asked for with ``flag`` is written to (see :func:`dataorder._plotting.check_figure_path`).

    ``keep`` is a file the figure must not overwrite (the command's input).
    """
    from dataorder._plotting import check_figure_path

    try:
        target = check_figure_path(path)
    except ValueError as error:
        raise UsageError(f"{flag}: {error}") from None
    if keep is not None and os.path.exists(keep) and target.exists() and os.path.samefile(target, keep):
        raise UsageError(f"{flag}: {target} is the input file {keep}; give another file name")
    return target


def check_unique(flag: str, names: list[str]) -> list[str]:
    """``names`` if none repeats.

    >>> check_unique("--orders", ["rr", "so", "rr"])
    Traceback (most recent call last):
    ...
    dataorder.cli.errors.UsageError: --orders names rr twice; give each once
    """
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UsageError(f"{flag} names {name} twice; give each once")
        seen.add(name)
    return names

