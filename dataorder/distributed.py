"""Collective helpers for samplers that learn from the batch (CD-GraB, herding) under torch.distributed.

Rank ``r`` of ``W`` holds positions ``r, r+W, r+2W, ...`` of each global batch (the strided
sharding of :func:`dataorder.samplers.base.shard`). :func:`gather_global_batch` all-gathers
the ranks' per-example rows and interleaves them back into global-batch order, so every
rank sees the same global batch and can run the same deterministic balancing on it: all
ranks then hold the identical state and next order without further messages.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["active_world", "check_same_on_all_ranks", "gather_global_batch"]


def active_world() -> int:
    """The process group's size when ``torch.distributed`` is initialised, else 1.

    >>> active_world()
    1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_global_batch(rows: torch.Tensor) -> torch.Tensor:
    """All-gather ``rows`` (B, ...) from every rank into (W·B, ...) in global-batch order.

    Row ``j`` of rank ``r`` lands at ``j·W + r``, matching strided sharding. Every rank
    must pass the same shape (check it first with :func:`check_same_on_all_ranks`). On the
    ``gloo`` backend tensors travel through the CPU; on ``nccl`` they stay on the GPU.
    Communication: each rank sends B·k elements and receives (W−1)·B·k.

    Without an initialised process group it returns ``rows`` unchanged.

    >>> gather_global_batch(torch.ones(2, 3)).shape
    torch.Size([2, 3])
    """
    world = active_world()
    if world == 1:
        return rows
    backend = dist.get_backend()
    source = rows.contiguous()
    device = source.device
    if backend == "gloo" and source.is_cuda:
        source = source.cpu()
    parts = [torch.empty_like(source) for _ in range(world)]
    dist.all_gather(parts, source)
    stacked = torch.stack(parts, dim=1)  # (B, W, ...): row j of rank r at [j, r]
    return stacked.reshape(-1, *source.shape[1:]).to(device)


def _digest(value: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:7], "little")


def check_same_on_all_ranks(what: str, **values: Any) -> None:
    """Raise ``ValueError`` on every rank if any of ``values`` differs between ranks.

    One all-gather of a few integers (digests of the values). The error names the first
    differing value and each rank's setting, e.g. mismatched seeds or batch sizes.

    >>> check_same_on_all_ranks("GraBSampler", seed=0, balance="mean")  # one process: nothing to compare
    """
    world = active_world()
    if world == 1:
        return
    names = sorted(values)
    local = torch.tensor([_digest(values[name]) for name in names], dtype=torch.int64)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    for column, name in enumerate(names):
        digests = [int(part[column]) for part in gathered]
        if len(set(digests)) > 1:
            settings: list[Any] = [None] * world
            dist.all_gather_object(settings, values[name])
            listing = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(settings))
            raise ValueError(f"{what}: {name} differs across ranks ({listing}); every rank must use the same {name}")
