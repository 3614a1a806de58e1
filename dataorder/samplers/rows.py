"""A batch of per-example vectors as the balancing rules see it: dense, or ghost factors.

The GraB rules need four things of a batch of vectors ``c_j``: ``[S; C] @ C.T`` (the
products with the running sums and the Gram, one host transfer), ``T += W @ C`` into a
few flat vectors at once, centring by a mean, and (for pair balance) a dense copy of a
trailing row and a dense row put in front. :class:`DenseRows` does these on a ``(B, k)``
tensor with the kernels of :mod:`dataorder.samplers.balance`; :class:`GhostRows` does them
from a :class:`dataorder.ghost.GhostBatch`, never materialising the batch's ``B × d``
gradients. Both give the same numbers, so the rules cannot tell them apart.

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


def _stack_rows(blocks: list[Tensor]) -> Tensor:
    """``torch.cat(blocks)`` of 2-D float blocks, as a view when they are consecutive rows of one buffer.

    >>> buffer = torch.arange(6.0).reshape(3, 2)
    >>> _stack_rows([buffer[:1], buffer[1:]]).data_ptr() == buffer.data_ptr()
    True
    """
    first = blocks[0]
    offset, width = first.storage_offset(), first.shape[1]
    consecutive = all(b.is_contiguous() and b.dtype == first.dtype and b.shape[1] == width for b in blocks)
    for block in blocks:
        consecutive = consecutive and block.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() \
            and block.storage_offset() == offset
        offset += block.numel()
    if consecutive:
        return first.as_strided((sum(len(b) for b in blocks), width), (width, 1))
    return torch.cat(blocks)


class DenseRows:
    """Rows held as a ``(B, k)`` tensor.

    >>> targets = torch.zeros(2, 2)
    >>> DenseRows(torch.ones(3, 2)).add_weighted_to(targets, np.array([[1, -1, 1], [1, 1, 1]]))
    >>> targets.tolist()
    [[1.0, 1.0], [3.0, 3.0]]
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

    def add_weighted_to(self, targets: Tensor, weights: np.ndarray) -> None:
        """``targets += weights @ rows`` in place (``targets`` ``(N, k)``, ``weights`` ``(N, B)``)."""
        apply_signs(targets, self.rows, weights)

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
        self.prefix = prefix if prefix is not None else torch.zeros(0, batch.dim, device=batch.device)

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
        # device: the products of every dense vector (mean, sums, prefix) with the ghost rows and
        # with each other, and the Gram; host (float64): centring and assembly, on small arrays
        dense = ([self.mean[None]] if self.mean is not None else []) + [sums, self.prefix]
        vectors = _stack_rows([v.to(self.device, torch.float32) for v in dense if len(v)])
        dots, gram, pairs = self.batch.dots(vectors), self.batch.gram(), vectors @ vectors.T
        packed = torch.cat([dots.reshape(-1), gram.reshape(-1), pairs.reshape(-1)]).to("cpu", torch.float64)
        size, total = self.batch.batch_size, len(vectors)
        dots, gram, pairs = np.split(packed.numpy(), [total * size, total * size + size * size])
        dots, gram, pairs = dots.reshape(total, size), gram.reshape(size, size), pairs.reshape(total, total)
        if self.mean is not None:  # <v, g - m> = <v, g> - <v, m>; <g_i - m, g_j - m> likewise
            with_mean = dots[0]
            gram = gram - with_mean[:, None] - with_mean[None, :] + pairs[0, 0]
            dots, pairs = dots[1:] - pairs[1:, :1], pairs[1:, 1:]
        count = len(sums)
        top = np.hstack([pairs[:count, count:], dots[:count]])  # <S_v, row> for the prefix rows, then the ghost rows
        prefix_rows = np.hstack([pairs[count:, count:], dots[count:]])
        return np.vstack([top, prefix_rows, np.hstack([dots[count:].T, gram])])

    def add_weighted_to(self, targets: Tensor, weights: np.ndarray) -> None:
        """``targets += weights @ rows`` in place, without forming the rows (``targets`` float32)."""
        weights = np.asarray(weights, dtype=np.float32)
        width = len(self.prefix)
        self.batch.add_weighted_(targets, weights[:, width:])  # uploads the ghost rows' weights once

        def upload(host: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(host)).to(self.device)

        if width:
            targets.addmm_(upload(weights[:, :width]), self.prefix.to(self.device, torch.float32))
        if self.mean is not None:  # each row's weight sum, taken on the host
            targets.addr_(upload(weights[:, width:].sum(1)), self.mean.to(self.device, torch.float32), alpha=-1.0)

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
