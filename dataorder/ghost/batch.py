"""GhostBatch: the per-example gradients of one micro-batch, known only through layer factors."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from dataorder._device import upload
from dataorder.ghost.factors import WeightGroups

__all__ = ["GhostBatch"]


def _add_parts(parts: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Join per-factor dicts of parameter-shaped pieces (each parameter comes from one factor)."""
    out: dict[str, Tensor] = {}
    for part in parts:
        out.update(part)
    return out


class GhostBatch:
    """Per-example gradient factors of one backward pass (one micro-batch).

    Answers the questions gradient balancing asks -- the Gram matrix, products with a few
    flat ``(N, d)`` vectors, weighted sums added in place -- each at about the cost of one
    matrix product per layer, never holding ``B × d`` values unless a layer's own
    per-example block is the cheaper form. Results are float32 on the model's device.

    ``scale`` multiplies every per-example gradient (the batch size, for a mean-reduced loss
    whose captured output gradients carry a ``1/B``); it is applied to the small results,
    never to the captured tensors.

    Example::

        >>> from torch import nn
        >>> from dataorder.ghost import GhostGrads
        >>> model = nn.Linear(3, 2)
        >>> ghost = GhostGrads(model)
        >>> model(torch.randn(4, 3)).pow(2).mean().backward()
        >>> [batch] = ghost.collect()
        >>> sums = torch.zeros(1, batch.dim)
        >>> batch.add_weighted_(sums, torch.ones(1, 4))   # sums += the batch's summed gradient
        >>> torch.allclose(sums[0], batch.materialize().sum(0), atol=1e-6)
        True
    """

    def __init__(self, factors: list, names: list[str], batch_size: int, shapes: dict[str, torch.Size],
                 scale: float = 1.0) -> None:
        self._factors, self.names, self.batch_size, self.shapes = factors, names, batch_size, shapes
        self.scale = float(scale)
        self._sizes = [math.prod(shapes[name]) for name in names]

    @property
    def dim(self) -> int:
        """Total number of selected parameter values ``d``."""
        return sum(self._sizes)

    @property
    def device(self) -> torch.device:
        return self._factors[0].device

    def select(self, rows: Tensor | list[int]) -> GhostBatch:
        """The factors of a subset of the batch's examples (e.g. one example, to materialise it)."""
        rows = rows.to(self.device, torch.long) if isinstance(rows, Tensor) else \
            upload(np.asarray(rows, dtype=np.int64), self.device, torch.long)  # without blocking on CUDA
        return GhostBatch([f.select(rows) for f in self._factors], self.names, len(rows), self.shapes, self.scale)

    def gathered(self, gather_many: Callable[[list[Tensor]], list[Tensor]], copies: int) -> GhostBatch:
        """This batch's factors for the global batch of ``copies`` processes.

        ``gather_many`` maps a list of rank-local ``(B, ...)`` tensors to the global
        ``(copies·B, ...)`` ones, e.g. :func:`dataorder.distributed.gather_global_batches`
        (one all-gather for all of them). It is a collective: every rank calls it with the
        same layers in the same order (it does, for identical models). What travels is each
        layer's inputs and output gradients, never ``B × d`` per-example gradients.

        >>> from torch import nn
        >>> from dataorder.ghost import GhostGrads
        >>> model = nn.Linear(3, 2)
        >>> ghost = GhostGrads(model)
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> [batch] = ghost.collect()
        >>> both = batch.gathered(lambda tensors: [torch.cat([t, t]) for t in tensors], copies=2)
        >>> both.batch_size, torch.allclose(both.gram()[:4, :4], batch.gram())
        (8, True)
        """
        local: list[Tensor] = []
        for factor in self._factors:  # first pass: list what every layer sends, in order
            factor.gathered(lambda tensor: local.append(tensor) or tensor)
        received = iter(gather_many(local))
        factors = [factor.gathered(lambda tensor: next(received)) for factor in self._factors]
        return GhostBatch(factors, self.names, self.batch_size * copies, self.shapes, self.scale)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of a flat ``(..., d)`` tensor as parameter-shaped pieces, in ``names`` order."""
        if flat.dim() == 0 or flat.shape[-1] != self.dim:
            raise ValueError(f"expected flat vectors of width d={self.dim} (the selected parameters), "
                             f"got shape {tuple(flat.shape)}")
        pieces = torch.split(flat, self._sizes, dim=-1)
        return {name: piece.reshape(*flat.shape[:-1], *self.shapes[name]) for name, piece in zip(self.names, pieces)}

    def flatten(self, parts: dict[str, Tensor], lead: int) -> Tensor:
        """Concatenate parameter-shaped ``parts`` (each ``(lead, *shape)``) into ``(lead, d)``."""
        return torch.cat([parts[name].reshape(lead, -1) for name in self.names], dim=1)

    def gram(self) -> Tensor:
        """(B, B) Gram matrix ``<g_i, g_j>`` of the per-example gradients."""
        return sum(f.gram() for f in self._factors) * self.scale ** 2

    def sq_norms(self) -> Tensor:
        """(B,) squared norms ``||g_j||^2``: the Gram's diagonal, without the off-diagonal work."""
        return sum(f.sq_norms() for f in self._factors) * self.scale ** 2

    def dots(self, vectors: Tensor) -> Tensor:
        """(N, B): ``<v, g_j>`` for each row ``v`` of the flat ``(N, d)`` ``vectors``."""
        views = self.unflatten(self._float(vectors))
        return sum(f.dots(views) for f in self._factors) * self.scale

    def products(self, vectors: Tensor) -> tuple[Tensor, Tensor]:
        """``(dots(vectors), gram())`` -- what a balancing step asks first -- in one walk over the layers.

        >>> from dataorder.ghost.factors import LinearFactors
        >>> factors = LinearFactors("w", None, torch.randn(4, 1, 3), torch.randn(4, 1, 2), torch.Size([2, 3]))
        >>> batch = GhostBatch([factors], ["w"], 4, {"w": torch.Size([2, 3])})
        >>> vectors = torch.randn(2, batch.dim)
        >>> dots, gram = batch.products(vectors)
        >>> torch.allclose(dots, batch.dots(vectors)), torch.allclose(gram, batch.gram())
        (True, True)
        """
        views = self.unflatten(self._float(vectors))
        per_layer = [(factor.dots(views), factor.gram()) for factor in self._factors]
        return (sum(dots for dots, _ in per_layer) * self.scale,
                sum(gram for _, gram in per_layer) * self.scale ** 2)

    def add_weighted_(self, targets: Tensor, weights: Tensor | np.ndarray) -> None:
        """``targets[v] += sum_j weights[v, j] * g_j`` in place; ``targets`` is a float32 ``(N, d)``.

        Each layer adds its part through views of ``targets``, so nothing ``B × d`` (nor a
        second ``N × d``) is allocated. With several rows of weights, examples that share a
        column of weights share one product (:class:`~dataorder.ghost.factors.WeightGroups`).
        """
        if targets.dtype != torch.float32 or targets.stride(-1) != 1:
            raise ValueError("targets must be a float32 (N, d) tensor with contiguous rows")
        host = weights.detach().cpu().numpy() if isinstance(weights, Tensor) else np.asarray(weights, np.float32)
        if host.shape != (len(targets), self.batch_size):
            raise ValueError(f"weights must be (N, B) = ({len(targets)}, {self.batch_size}) for {len(targets)} "
                             f"target rows and this batch, got {host.shape}")
        # GraB's weights have at most as many distinct columns as rows: judge with that bound
        pays = len(host) > 1 and any(f.groups_pay(len(host), len(host)) for f in self._factors)
        groups = WeightGroups.of(host, self.device, self.scale) if pays else None
        views = self.unflatten(targets)
        scaled = upload(host, self.device, torch.float32) * self.scale
        for factor in self._factors:
            factor.add_weighted_(views, scaled, groups)

    def weighted_sums(self, weights: Tensor) -> Tensor:
        """``weights`` (N, B) -> (N, d): ``sum_j weights[v, j] * g_j`` for each row ``v``, flat."""
        out = torch.zeros(len(weights), self.dim, device=self.device)
        self.add_weighted_(out, weights)
        return out

    def weighted_sum(self, weights: Tensor) -> dict[str, Tensor]:
        """``sum_j weights[j] * g_j`` as a dict of parameter-shaped tensors."""
        return {name: value[0] for name, value in self.unflatten(self.weighted_sums(weights[None])).items()}

    def materialize(self) -> Tensor:
        """(B, d) per-example gradients in ``named_parameters()`` order (for tests and debugging)."""
        return self.flatten(_add_parts(f.materialize() for f in self._factors), self.batch_size) * self.scale

    def _float(self, tensor: Tensor) -> Tensor:
        return tensor.to(device=self.device, dtype=torch.float32)
