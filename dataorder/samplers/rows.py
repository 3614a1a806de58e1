"""A batch of per-example vectors as the balancing rules see it: dense, or ghost factors.

The GraB rules need five things of a batch of vectors ``c_j``: ``[S; C] @ C.T`` (the
products with the running sums and the Gram, one host transfer), ``S += W @ C``, their
plain sum, centring by a mean, and (for pair balance) a dense copy of a trailing row and a
dense row put in front. :class:`DenseRows` does these on a ``(B, k)`` tensor with the
kernels of :mod:`dataorder.samplers.balance`; :class:`GhostRows` does them from a
:class:`dataorder.ghost.GhostBatch`, never materialising the batch's ``B × d`` gradients.
Both give the same numbers, so the rules cannot tell them apart.

>>> import torch
>>> rows = DenseRows(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
>>> rows.products(torch.zeros(1, 2)).tolist()
[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dataorder.samplers.balance import apply_signs, balance_products

__all__ = ["DenseRows", "GhostRows"]


class DenseRows:
    """Rows held as a ``(B, k)`` tensor.

    >>> DenseRows(torch.ones(3, 2)).total().tolist()
    [3.0, 3.0]
    """

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rows.shape)

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    def products(self, sums: Tensor) -> np.ndarray:
        return balance_products(self.rows, sums)

    def add_weighted_to(self, sums: Tensor, weights: np.ndarray) -> None:
        apply_signs(sums, self.rows, weights)

    def total(self) -> Tensor:
        return self.rows.sum(0)

    def centred(self, mean: Tensor) -> DenseRows:
        return DenseRows(self.rows - mean.to(self.rows.device))

    def tail(self, start: int) -> Tensor:
        return self.rows[start:].clone()

    def prepend(self, dense: Tensor) -> DenseRows:
        return DenseRows(torch.cat([dense.to(self.rows.device), self.rows]))


class GhostRows:
    """Rows ``[prefix; g_j - mean]`` where the ``g_j`` are known only through ghost factors.

    ``prefix`` holds a few dense rows (a pair's first half carried over from the last
    step); ``mean`` (``(d,)`` or None) is subtracted from every ghost row. Cost per call:
    a few matrix products of each layer's weight size, and O((N + B)²) host scalars.
    """

    def __init__(self, batch, mean: Tensor | None = None, prefix: Tensor | None = None) -> None:
        self.batch = batch
        self.mean = mean
        dim = batch.dim
        self.prefix = prefix if prefix is not None else torch.zeros(0, dim, device=batch.device)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.prefix) + self.batch.batch_size, self.batch.dim)

    @property
    def device(self) -> torch.device:
        return self.batch.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # ghost products are formed in float32 whatever the model's dtype

    def products(self, sums: Tensor) -> np.ndarray:
        sums = sums.to(self.device, torch.float32)
        prefix = self.prefix.to(self.device, torch.float32)
        vectors = torch.cat([sums, prefix] + ([self.mean[None].float()] if self.mean is not None else []))
        dots = self.batch.dots([self.batch.unflatten(v) for v in vectors])  # (N + p [+1], B)
        gram = self.batch.gram()
        count, width = len(sums), len(prefix)
        with_sums, with_prefix = dots[:count], dots[count:count + width]
        if self.mean is not None:
            mean = self.mean.float()
            with_mean = dots[-1]  # <m, g_j>
            with_sums = with_sums - (sums @ mean)[:, None]
            with_prefix = with_prefix - (prefix @ mean)[:, None]
            gram = gram - with_mean[:, None] - with_mean[None, :] + mean @ mean
        top = torch.cat([sums @ prefix.T, with_sums], dim=1)  # <S_v, row>
        prefix_rows = torch.cat([prefix @ prefix.T, with_prefix], dim=1)
        ghost_rows = torch.cat([with_prefix.T, gram], dim=1)
        products = torch.cat([top, prefix_rows, ghost_rows])
        return products.to("cpu", torch.float64).numpy()

    def add_weighted_to(self, sums: Tensor, weights: np.ndarray) -> None:
        matrix = torch.as_tensor(np.asarray(weights, dtype=np.float32), device=self.device)
        width = len(self.prefix)
        update = self.batch.weighted_sums(matrix[:, width:])
        if width:
            update = update + matrix[:, :width] @ self.prefix.to(self.device, torch.float32)
        if self.mean is not None:
            update = update - matrix[:, width:].sum(1, keepdim=True) * self.mean.float()[None]
        sums.add_(update.to(sums.dtype))

    def total(self) -> Tensor:
        ones = torch.ones(1, self.batch.batch_size, device=self.device)
        total = self.batch.weighted_sums(ones)[0] + self.prefix.float().sum(0)
        if self.mean is not None:
            total = total - self.batch.batch_size * self.mean.float()
        return total

    def centred(self, mean: Tensor) -> GhostRows:
        if self.mean is not None or len(self.prefix):
            raise ValueError("GhostRows are centred once, before any prefix is added")
        return GhostRows(self.batch, mean.to(self.device), self.prefix)

    def tail(self, start: int) -> Tensor:
        width = len(self.prefix)
        dense = [self.prefix[start:]] if start < width else []
        first = max(0, start - width)
        if first < self.batch.batch_size:
            rows = self.batch.select(list(range(first, self.batch.batch_size))).materialize()
            if self.mean is not None:
                rows = rows - self.mean.float()[None]
            dense.append(rows.to(self.prefix.dtype))
        return torch.cat(dense) if dense else self.prefix[:0].clone()

    def prepend(self, dense: Tensor) -> GhostRows:
        return GhostRows(self.batch, self.mean, torch.cat([dense.to(self.device, torch.float32), self.prefix]))
