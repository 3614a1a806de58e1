"""Orderings for the training loops of ``dataorder compare`` and the benchmarks.

An ordering couples a sampler with the backward pass it needs: the baselines use a plain
``loss.backward()``; gradient-balancing orderings also feed per-example information to
their sampler. Add an ordering by registering a factory in :data:`ORDERINGS`.

``grab-sketch`` (``grab-sketch:K``) is GraB balancing on per-layer Kronecker sketches of the
ghost factors, ``K`` values per side (default :data:`DEFAULT_SKETCH`), through
``GraBSampler.attach(model, sketch=K)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Sampler

from dataorder.samplers.shuffle import FlipFlop, RandomReshuffling, ShuffleOnce, WithReplacement

__all__ = ["DEFAULT_SKETCH", "ORDERINGS", "GradientOrdering", "Ordering", "SamplerOrdering",
           "SIZED_ORDERINGS", "make_ordering"]

#: sketch size per side of ``grab-sketch`` without ``:K`` (the issue's prototype kept 90% of
#: exact GraB's gain at 16 on the digits MLP)
DEFAULT_SKETCH = 16


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


class GradientOrdering(Ordering):
    """An ordering whose sampler learns from per-example gradients (GraB, herding).

    The backward pass is :class:`~dataorder.grads.PerExampleGrads` (which sets ``p.grad`` to
    the batch mean, as ``loss.backward()`` would) followed by ``sampler.step(grads)``. Models
    with more than ``sketch_above`` parameters feed a ``sketch_dim``-wide CountSketch instead
    of the full gradients when ``sketch_dim`` is set (herding's O(n·k) store needs it).

    ``ghost_sketch=k`` balances on the sketched ghost path (``sampler.attach(model, sketch=k)``);
    ``None`` is the exact ghost path, requested as ``sketch=None`` where ``attach`` takes one.

    >>> ordering = GradientOrdering("grab", balance="mean")
    >>> ordering.make_sampler(4, seed=0).balance
    'mean'
    """

    def __init__(self, name: str, *, balance: str | None = None, depth: int = 2,
                 sketch_dim: int | None = None, sketch_above: int = 4096, grads: str = "ghost",
                 ghost_sketch: int | None = None) -> None:
        if grads not in ("ghost", "vmap"):
            raise ValueError(f"grads must be 'ghost' or 'vmap', got {grads!r}")
        if ghost_sketch is not None:
            if isinstance(ghost_sketch, bool) or not isinstance(ghost_sketch, int) or ghost_sketch < 1:
                raise ValueError(f"ordering {name!r}: the sketch size must be a positive int, got {ghost_sketch!r}")
            if grads != "ghost" or balance is None:
                raise ValueError(f"ordering {name!r} balances on the ghost path: use grads='ghost' (--grads ghost)")
        self.name, self.balance, self.depth = name, balance, depth
        self.sketch_dim, self.sketch_above = sketch_dim, sketch_above
        self.ghost_sketch = ghost_sketch
        # herding stores per-example gradients, so it always materialises them
        self.ghost = grads == "ghost" and balance is not None
        self._per_example = None

    def make_sampler(self, n: int, seed: int) -> Sampler[int]:
        if self.balance is None:
            from dataorder.ordering import HerdingSampler

            return HerdingSampler(n, seed=seed)
        from dataorder.ordering import GraBSampler

        return GraBSampler(n, balance=self.balance, depth=self.depth, seed=seed)

    def attach(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], sampler: Sampler[int]) -> None:
        from dataorder.grads import PerExampleGrads

        if self.ghost:
            sampler.attach(model, sketch=self.ghost_sketch)  # None: exact, whatever attach's default
            return

        size = sum(p.numel() for p in model.parameters() if p.requires_grad)
        sketch = self.sketch_dim if self.sketch_dim is not None and size > self.sketch_above else None
        self._per_example = PerExampleGrads(model, loss_fn, sketch_dim=sketch, seed=getattr(sampler, "seed", 0))

    def backward(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor, sampler: Sampler[int]) -> torch.Tensor:
        if self.ghost:
            loss = loss_fn(model(x), y)
            loss.backward()
            sampler.step()  # balances from the factors the backward left behind
            return loss.detach()
        if self._per_example is None:
            self.attach(model, loss_fn, sampler)
        out = self._per_example(x, y)
        sampler.step(out.grads)
        return out.losses.mean()


#: name -> factory of an :class:`Ordering`, called with ``grads`` ("ghost" or "vmap"), the
#: gradient path of the orderings that learn from gradients (the others ignore it).
ORDERINGS: dict[str, Callable[[str], Ordering]] = {
    "rr": lambda grads: SamplerOrdering("rr", RandomReshuffling),
    "so": lambda grads: SamplerOrdering("so", ShuffleOnce),
    "wr": lambda grads: SamplerOrdering("wr", WithReplacement),
    "flipflop": lambda grads: SamplerOrdering("flipflop", FlipFlop),
    "grab": lambda grads: GradientOrdering("grab", balance="mean", grads=grads),
    "pair": lambda grads: GradientOrdering("pair", balance="pair", grads=grads),
    "recursive": lambda grads: GradientOrdering("recursive", balance="recursive", grads=grads),
    "herding": lambda grads: GradientOrdering("herding", sketch_dim=1024, grads=grads),
    "grab-sketch": lambda grads: GradientOrdering("grab-sketch", balance="mean", grads=grads,
                                                  ghost_sketch=DEFAULT_SKETCH),
}
#: orderings that take a size, as ``NAME:K``: name -> factory called with ``(grads, K)``
SIZED_ORDERINGS: dict[str, Callable[[str, int], Ordering]] = {
    "grab-sketch": lambda grads, k: GradientOrdering(f"grab-sketch:{k}", balance="mean", grads=grads,
                                                     ghost_sketch=k),
}


def make_ordering(name: str, *, grads: str = "ghost") -> Ordering:
    """The registered ordering ``name`` (or ``NAME:K`` for :data:`SIZED_ORDERINGS`, e.g.
    ``grab-sketch:8``); ``grads`` picks GraB's path: ``ghost`` or ``vmap``.

    Raises ``ValueError`` for an unknown name or a bad ``K``.

    >>> make_ordering("rr").make_sampler(4, seed=0)
    RandomReshuffling(n=4, seed=0, epoch=0, rank=0, world_size=1, drop_last=False)
    """
    base, colon, size = name.partition(":")
    if colon:
        if base not in SIZED_ORDERINGS:
            raise ValueError(f"ordering {name!r}: only {', '.join(SIZED_ORDERINGS)} take a size (NAME:K)")
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"ordering {name!r}: K must be a positive integer, e.g. {base}:16")
        return SIZED_ORDERINGS[base](grads, int(size))
    if name not in ORDERINGS:
        raise ValueError(f"unknown ordering {name!r}; choose from {', '.join(ORDERINGS)} "
                         f"(or {', '.join(f'{n}:K' for n in SIZED_ORDERINGS)})")
    return ORDERINGS[name](grads)
