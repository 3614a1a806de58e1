"""Orderings for the training loops of ``dataorder compare`` and the benchmarks.

An ordering couples a sampler with the backward pass it needs: the baselines use a plain
``loss.backward()``; gradient-balancing orderings also feed per-example information to
their sampler. Add an ordering by registering a factory in :data:`ORDERINGS`.
"""

from __future__ import annotations

from collections.abc import Callable
import torch
from torch import nn
from torch.utils.data import Sampler

from dataorder.samplers.shuffle import FlipFlop, RandomReshuffling, ShuffleOnce, WithReplacement

__all__ = ["ORDERINGS", "Ordering", "SamplerOrdering", "make_ordering"]


class Ordering:
    """How one training run orders its data: a sampler plus the backward pass it needs."""

    name: str = "ordering"

    def make_sampler(self, n: int, seed: int) -> Sampler[int]:
        raise NotImplementedError

    def attach(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], sampler: Sampler[int]) -> None:
        """Called once before training (e.g. to build per-example gradient machinery)."""

    def backward(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor, sampler: Sampler[int]) -> torch.Tensor:
        """Set ``p.grad`` to the batch-mean gradient and return the batch's mean loss."""
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss.detach()


class SamplerOrdering(Ordering):
    """An ordering that only needs a sampler class (no per-example information)."""

    def __init__(self, name: str, sampler_cls: type) -> None:
        self.name, self.sampler_cls = name, sampler_cls

    def make_sampler(self, n: int, seed: int) -> Sampler[int]:
        return self.sampler_cls(n, seed=seed)


#: name -> factory of an :class:`Ordering`.
ORDERINGS: dict[str, Callable[[], Ordering]] = {
    "rr": lambda: SamplerOrdering("rr", RandomReshuffling),
    "so": lambda: SamplerOrdering("so", ShuffleOnce),
    "wr": lambda: SamplerOrdering("wr", WithReplacement),
    "flipflop": lambda: SamplerOrdering("flipflop", FlipFlop),
}


def make_ordering(name: str) -> Ordering:
    """The registered ordering ``name``.

    >>> make_ordering("rr").make_sampler(4, seed=0)
    RandomReshuffling(n=4, seed=0, epoch=0, rank=0, world_size=1, drop_last=False)
    """
    if name not in ORDERINGS:
        raise ValueError(f"unknown ordering {name!r}; choose from {', '.join(ORDERINGS)}")
    return ORDERINGS[name]()
