"""The multi-process tests' launcher: :func:`dataorder.distributed.run_local_group` with a test folder."""

from __future__ import annotations

from dataorder.distributed import run_local_group


def run_distributed(fn, world_size: int, out_dir, *args, timeout: float = 120.0) -> list:
    """Call ``fn(rank, world_size, *args)`` on each rank (gloo, 127.0.0.1); results in rank order."""
    return run_local_group(fn, world_size, *args, timeout=timeout, workdir=out_dir)
