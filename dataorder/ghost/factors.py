"""Per-layer kernels: inner products and weighted sums of per-example gradients from layer factors.

Each factor object holds what one layer's hooks captured (its input and its *unscaled*
output gradient) and answers four questions about the per-example gradients ``g_j`` of the
layer's parameters:

* ``gram()`` -- ``(B, B)`` of ``<g_i, g_j>``;
* ``sq_norms()`` -- ``(B,)`` of ``||g_j||²``;
* ``dots(views)`` -- ``(N, B)`` of ``<v, g_j>`` for ``N`` vectors given as parameter-shaped views;
* ``gathered(gather)`` -- the same layer for the global batch of a process group, each
  captured tensor passed through an all-gather (distributed GraB on the ghost path);
* ``add_weighted_(views, weights, groups)`` -- ``v += sum_j weights[v, j] g_j`` in place, for
  ``N`` views; ``groups`` (:class:`WeightGroups`) lists the weight matrix's distinct columns, so
  that a factored layer forms one product per group instead of one per row of weights.

A layer either keeps its factors (``out = a W^T``: ``g_j = d_j^T a_j``; every question costs
about one product of the weight's size) or materialises its ``B`` per-example gradients once
and answers every question from them, whichever costs fewer flops for one balancing step.
The choice is made per layer, from shapes only (:func:`prefer_dense`).

>>> import torch
>>> a, d = torch.randn(4, 1, 3), torch.randn(4, 1, 2)
>>> factors = LinearFactors("w", None, a, d, torch.Size([2, 3]))
>>> dense = torch.einsum("bto,bti->boi", d, a).reshape(4, -1)
>>> torch.allclose(factors.gram(), dense @ dense.T, atol=1e-5)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from dataorder._device import upload

__all__ = ["ConvFactors", "DenseFactors", "EmbeddingFactors", "LinearFactors", "WeightGroups", "prefer_dense",
           "prefer_dense_tables"]

Views = Mapping[str, Tensor]  # parameter name -> (N, *shape) view into N flat vectors
Gather = Callable[[Tensor], Tensor]  # rank-local (B, ...) -> the global batch's (W·B, ...), same on every rank

#: Weight-sized products one GraB step asks of a layer besides its Gram: the products with
#: the running sum and the stale mean, the signed update and the next epoch's sum.
PRODUCTS_PER_STEP = 4
#: Grouping a layer's weighted sums by weight column (:class:`WeightGroups`) must save at
#: least this many (speed-weighted) multiply-adds: below it, the extra gathers and calls
#: cost more than the products they save (measured on the digits MLP at B = 64, one thread).
GROUPED_MIN_SAVING = 2 ** 22
#: A product whose inner dimension (rows summed over) is below this runs memory-bound, at
#: about ``rows / FULL_SPEED_ROWS`` of full speed on a CPU: one group's sum of 64 rows costs
#: what two weighted sums of 128 rows do (measured: B = 128 in two groups was no faster).
FULL_SPEED_ROWS = 128
#: Largest per-example block (B × parameter size, values) a layer materialises; above it the
#: factored form is kept whatever its flops (memory over speed).
MAX_DENSE_VALUES = 2 ** 27


def prefer_dense(batch: int, steps: int, inputs: int, outputs: int) -> bool:
    """Whether materialising ``B`` per-example ``O × I`` gradients beats keeping the factors.

    ``steps`` is the number of rows each example contributes (sequence length, or output
    positions of a convolution). Factored: a ``(B·T)²`` Gram of ``I + O`` wide rows plus
    ``PRODUCTS_PER_STEP`` products of ``B·T·I·O``; dense: one ``B·T·I·O`` materialisation,
    a ``B² · I·O`` Gram and the products at ``B·I·O`` each.

    >>> prefer_dense(64, 1, 256, 256), prefer_dense(32, 128, 128, 384)
    (False, True)
    """
    factored = batch * batch * steps * steps * (inputs + outputs) + PRODUCTS_PER_STEP * batch * steps * inputs * outputs
    dense = batch * inputs * outputs * (steps + batch + PRODUCTS_PER_STEP)
    return _dense_is_cheaper(factored, dense, batch * inputs * outputs)


def prefer_dense_tables(batch: int, steps: int, width: int, num_embeddings: int) -> bool:
    """Whether per-example embedding tables ``(B, V·E)`` beat comparing the ``(B·T)²`` index pairs.

    >>> prefer_dense_tables(32, 128, 128, 1000), prefer_dense_tables(32, 16, 128, 50_000)
    (True, False)
    """
    table = batch * num_embeddings * width
    factored = (batch * steps) ** 2 * (width + 1) + PRODUCTS_PER_STEP * batch * steps * width
    return _dense_is_cheaper(factored, table * (1 + batch + PRODUCTS_PER_STEP), table)


def _dense_is_cheaper(factored_flops: int, dense_flops: int, dense_values: int) -> bool:
    """The one place the form is decided: fewer flops, and a block no larger than MAX_DENSE_VALUES."""
    return dense_values <= MAX_DENSE_VALUES and dense_flops < factored_flops


@dataclass(frozen=True)
class WeightGroups:
    """The examples of a batch grouped by their column of an ``(N, B)`` weight matrix.

    ``sum_j W[:, j] g_j = columns @ [sum of g_j over each group]``: a factored layer then
    forms ``K`` group sums -- together one product over the batch -- instead of ``N``
    weighted products. GraB's update has ``N = 2`` rows (signs, and ones for the next
    epoch's sum) but ``K = 2`` columns ``(±1, 1)``; recursive balance has ``N = 8`` rows
    and at most ``8`` paths.

    >>> groups = WeightGroups.of(np.array([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]), torch.device("cpu"))
    >>> groups.columns.tolist(), groups.order.tolist(), groups.counts
    ([[-1.0, 1.0], [1.0, 1.0]], [1, 0, 2], [1, 2])
    >>> WeightGroups.of(np.array([[0.0, 1.0, 0.0], [2.0, 1.0, 2.0]]), torch.device("cpu")).counts
    [2, 1]
    """

    columns: Tensor  # (N, K) the distinct columns
    order: Tensor  # (B,) example indices sorted by group
    counts: list[int]  # size of each group, in order

    @classmethod
    def of(cls, weights: np.ndarray, device: torch.device, scale: float = 1.0) -> WeightGroups:
        weights = np.asarray(weights, dtype=np.float32)
        order = np.lexsort(weights[::-1])  # columns sorted lexicographically, equal columns adjacent
        ordered = weights[:, order]
        starts = np.flatnonzero(np.r_[True, (ordered[:, 1:] != ordered[:, :-1]).any(axis=0)])
        columns = upload(ordered[:, starts] * np.float32(scale), device, torch.float32)
        return cls(columns, upload(order, device, torch.int64), np.diff(np.r_[starts, len(order)]).tolist())


# -- per-example blocks: the dense form shared by every factor type ---------------------------
def dense_gram(blocks: Mapping[str, Tensor]) -> Tensor:
    """``(B, B)`` Gram of per-example blocks ``name -> (B, n)``, summed over the blocks."""
    return sum(block @ block.T for block in blocks.values())


def dense_dots(blocks: Mapping[str, Tensor], views: Views) -> Tensor:
    """``(N, B)`` products of ``N`` vectors (``views``) with per-example blocks."""
    return sum(views[name].reshape(len(views[name]), -1) @ block.T for name, block in blocks.items())


def dense_add_weighted_(blocks: Mapping[str, Tensor], views: Views, weights: Tensor) -> None:
    """``views[name] += weights @ block`` in place, for each block."""
    for name, block in blocks.items():
        views[name].reshape(len(weights), -1).addmm_(weights, block)


class DenseFactors:
    """Per-example gradients held as blocks ``name -> (B, *shape)`` (norm layers, fallbacks).

    >>> factors = DenseFactors({"w": torch.tensor([[1.0, 0.0], [0.0, 2.0]])})
    >>> factors.gram().tolist(), factors.dots({"w": torch.ones(1, 2)}).tolist()
    ([[1.0, 0.0], [0.0, 4.0]], [[1.0, 2.0]])
    """

    def __init__(self, grads: dict[str, Tensor]) -> None:
        self.grads = grads
        self.blocks = {name: g.reshape(len(g), -1) for name, g in grads.items()}

    def gram(self) -> Tensor:
        return dense_gram(self.blocks)

    def sq_norms(self) -> Tensor:
        return sum(block.square().sum(dim=1) for block in self.blocks.values())

    def dots(self, views: Views) -> Tensor:
        return dense_dots(self.blocks, views)

    def add_weighted_(self, views: Views, weights: Tensor, groups: WeightGroups | None = None) -> None:
        dense_add_weighted_(self.blocks, views, weights)

    def groups_pay(self, count: int, columns: int) -> bool:
        return False  # a block's weighted sums read each row once whatever the weights

    def select(self, rows: Tensor) -> DenseFactors:
        return DenseFactors({name: g[rows] for name, g in self.grads.items()})

    def gathered(self, gather: Gather) -> DenseFactors:
        return DenseFactors({name: gather(g) for name, g in self.grads.items()})

    def materialize(self) -> dict[str, Tensor]:
        return dict(self.grads)

    @property
    def device(self) -> torch.device:
        return next(iter(self.grads.values())).device


# -- linear maps: nn.Linear (any leading dims) and convolutions -------------------------------
def _factored_gram(a: Tensor, d: Tensor) -> Tensor:
    """Gram of ``g_j = d_j^T a_j`` from the factors: ``(B·T)²`` cross terms summed per example."""
    batch, steps = a.shape[:2]
    if steps == 1:
        return (a[:, 0] @ a[:, 0].T) * (d[:, 0] @ d[:, 0].T)
    flat_a, flat_d = a.reshape(batch * steps, -1), d.reshape(batch * steps, -1)
    cross = (flat_a @ flat_a.T) * (flat_d @ flat_d.T)
    return cross.reshape(batch, steps, batch, steps).sum(dim=(1, 3))


def _factored_sq_norms(a: Tensor, d: Tensor) -> Tensor:
    """``||d_j^T a_j||²`` by the cheaper of the ``T × T`` cross terms and the per-example product."""
    steps, inputs, outputs = a.shape[1], a.shape[2], d.shape[2]
    if steps == 1:
        return a[:, 0].square().sum(dim=1) * d[:, 0].square().sum(dim=1)
    if steps * (inputs + outputs) <= inputs * outputs:
        return ((a @ a.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum(dim=(1, 2))
    return torch.bmm(d.transpose(1, 2), a).square().sum(dim=(1, 2))


class LinearFactors:
    """A weight used as ``out = a @ W^T (+ b)``: ``a`` (B, T, I), ``d`` (B, T, O); ``g_j = d_j^T a_j``.

    ``weight``/``bias`` are parameter names (None when not selected). The form (factored or
    dense) is chosen once by :func:`prefer_dense`; the dense blocks are built on first use.

    >>> a, d = torch.randn(3, 1, 2), torch.randn(3, 1, 4)
    >>> factors = LinearFactors("w", "b", a, d, torch.Size([4, 2]))
    >>> sums = torch.zeros(1, 4 * 2 + 4)
    >>> factors.add_weighted_({"w": sums[:, :8].view(1, 4, 2), "b": sums[:, 8:]}, torch.ones(1, 3))
    >>> torch.allclose(sums[0, :8], (d[:, 0].T @ a[:, 0]).reshape(-1), atol=1e-6)
    True
    """

    def __init__(self, weight: str | None, bias: str | None, a: Tensor | None, d: Tensor,
                 weight_shape: torch.Size) -> None:
        self.weight, self.bias, self.d, self.weight_shape = weight, bias, d, weight_shape
        self._a = a
        self._blocks: dict[str, Tensor] | None = None
        batch, steps, outputs = d.shape
        # (B, I) and (B, O) views when each example contributes one row (an MLP layer): taken once
        self._single = (a[:, 0], d[:, 0]) if steps == 1 and a is not None else None
        self.dense = weight is not None and prefer_dense(batch, steps, math.prod(weight_shape) // outputs, outputs)

    @property
    def a(self) -> Tensor:
        return self._a

    @property
    def device(self) -> torch.device:
        return self.d.device

    def _weight_block(self) -> Tensor:
        """``(B, O·I)`` per-example weight gradients."""
        return torch.bmm(self.d.transpose(1, 2), self.a).reshape(len(self.d), -1)

    def _bias_rows(self) -> Tensor:
        return self._single[1] if self._single is not None else self.d.sum(dim=1)

    def blocks(self) -> dict[str, Tensor]:
        """Per-example gradients ``name -> (B, n)``, built once (the dense form)."""
        if self._blocks is None:
            self._blocks = {}
            if self.weight:
                self._blocks[self.weight] = self._weight_block()
            if self.bias:
                self._blocks[self.bias] = self._bias_rows()
        return self._blocks

    def gram(self) -> Tensor:
        if self.dense:
            return dense_gram(self.blocks())
        if self.weight and self.bias and self._single is not None:  # (aa^T + 1) * dd^T: bias folded in
            a, d = self._single
            return (a @ a.T).add_(1.0).mul_(d @ d.T)
        total = _factored_gram(self.a, self.d) if self.weight else 0.0
        if self.bias:
            rows = self._bias_rows()
            total = total + rows @ rows.T
        return total

    def sq_norms(self) -> Tensor:
        if self._blocks is not None:
            return sum(block.square().sum(dim=1) for block in self._blocks.values())
        total = _factored_sq_norms(self.a, self.d) if self.weight else 0.0
        if self.bias:
            total = total + self._bias_rows().square().sum(dim=1)
        return total

    def dots(self, views: Views) -> Tensor:
        if self.dense:
            return dense_dots(self.blocks(), views)
        total = 0.0
        if self.weight:
            count, outputs = len(views[self.weight]), self.d.shape[2]
            matrices = views[self.weight].reshape(count, outputs, -1)  # (N, O, I)
            if self._single is not None:  # <W, d a^T> = d^T W a: (N, B, I) products with the inputs
                a, d = self._single
                total = (torch.matmul(d, matrices) * a).sum(dim=2)
            else:
                total = (torch.matmul(self.d[None], matrices[:, None]) * self.a[None]).sum(dim=(2, 3))
        if self.bias:
            total = total + views[self.bias] @ self._bias_rows().T
        return total

    def add_weighted_(self, views: Views, weights: Tensor, groups: WeightGroups | None = None) -> None:
        if self.dense:
            return dense_add_weighted_(self.blocks(), views, weights)
        count, (batch, steps, outputs) = len(weights), self.d.shape
        if self.weight:
            target = views[self.weight].reshape(count, outputs, -1)  # (N, O, I)
            inputs = self.a.reshape(batch * steps, -1)
            if groups is not None and self.groups_pay(count, len(groups.counts)):
                self._add_grouped_(target, groups)
            elif count == 1:
                scaled = (self.d * weights[0, :, None, None]).reshape(batch * steps, outputs)
                target[0].addmm_(scaled.T, inputs)
            else:
                scaled = (weights[:, :, None, None] * self.d[None]).reshape(count, batch * steps, outputs)
                target.baddbmm_(scaled.transpose(1, 2), inputs.expand(count, -1, -1))
        if self.bias:
            views[self.bias].addmm_(weights, self._bias_rows())

    def groups_pay(self, count: int, columns: int) -> bool:
        """Whether ``columns`` group sums save at least :data:`GROUPED_MIN_SAVING` (speed-weighted)
        multiply-adds over ``count`` weighted sums."""
        if self.dense or not self.weight:
            return False
        rows, size = self.d.shape[0] * self.d.shape[1], math.prod(self.weight_shape)
        separate = count * rows * size / _speed(rows)
        grouped = rows * size / _speed(rows / columns) + count * columns * size
        return separate - grouped >= GROUPED_MIN_SAVING

    def _add_grouped_(self, target: Tensor, groups: WeightGroups) -> None:
        """``target`` (N, O, I) ``+= columns @ group sums``: one product over the batch, split by group."""
        outputs, inputs = self.d.shape[2], self.a.shape[2]
        a, d = self.a[groups.order], self.d[groups.order]  # examples of one group are contiguous
        sums = self.d.new_empty(len(groups.counts), outputs, inputs)
        start = 0
        for group, size in enumerate(groups.counts):
            rows = slice(start, start + size)
            torch.mm(d[rows].reshape(-1, outputs).T, a[rows].reshape(-1, inputs), out=sums[group])
            start += size
        target.reshape(len(target), -1).addmm_(groups.columns, sums.reshape(len(groups.counts), -1))

    def select(self, rows: Tensor) -> LinearFactors:
        return LinearFactors(self.weight, self.bias, self.a[rows], self.d[rows], self.weight_shape)

    def gathered(self, gather: Gather) -> LinearFactors:
        return LinearFactors(self.weight, self.bias, gather(self.a), gather(self.d), self.weight_shape)

    def materialize(self) -> dict[str, Tensor]:
        batch = len(self.d)
        out = {}
        if self.weight:
            block = self._blocks[self.weight] if self._blocks is not None else self._weight_block()
            out[self.weight] = block.reshape(batch, *self.weight_shape)
        if self.bias:
            out[self.bias] = self._bias_rows()
        return out


def _speed(rows: float) -> float:
    """Relative speed of a product summing over ``rows`` (see :data:`FULL_SPEED_ROWS`)."""
    return min(1.0, rows / FULL_SPEED_ROWS)


class ConvFactors(LinearFactors):
    """A 2-D convolution (``groups=1``) from its input ``x`` (B, C, H, W) and output gradient.

    The convolution is a linear map of image patches, so it is a :class:`LinearFactors`
    with ``T`` = output positions and ``I`` = ``C·kh·kw``. The patch matrix (``unfold``,
    ``kh·kw`` times the input) is built only if the factored form is kept; the dense form
    gets its per-example gradients from one grouped weight-gradient call (:func:`_conv_per_example`).

    >>> x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    >>> delta = torch.randn(2, 4, 4, 4)  # the output gradient of conv2d(x, w)
    >>> factors = ConvFactors("w", None, x, delta, w.shape, ((3, 3), (1, 1), (0, 0), (1, 1)))
    >>> summed = factors.materialize()["w"].sum(0)
    >>> torch.allclose(summed, torch.nn.grad.conv2d_weight(x, w.shape, delta), atol=1e-4)
    True
    """

    def __init__(self, weight: str | None, bias: str | None, x: Tensor, delta: Tensor, weight_shape: torch.Size,
                 geometry: tuple) -> None:
        self.x, self.delta, self.geometry = x, delta, geometry  # geometry: kernel, dilation, padding, stride
        rows = delta.reshape(delta.shape[0], delta.shape[1], -1).transpose(1, 2)  # (B, L, O)
        super().__init__(weight, bias, None, rows, weight_shape)

    @property
    def a(self) -> Tensor:
        if self._a is None:
            kernel, dilation, padding, stride = self.geometry
            self._a = F.unfold(self.x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
        return self._a

    def _weight_block(self) -> Tensor:
        if self._a is not None:  # the patches are there already: one batched product
            return super()._weight_block()
        kernel, dilation, padding, stride = self.geometry
        return _conv_per_example(self.x, self.delta, kernel, dilation, padding, stride).reshape(len(self.x), -1)

    def select(self, rows: Tensor) -> ConvFactors:
        return ConvFactors(self.weight, self.bias, self.x[rows], self.delta[rows], self.weight_shape, self.geometry)

    def gathered(self, gather: Gather) -> ConvFactors:
        return ConvFactors(self.weight, self.bias, gather(self.x), gather(self.delta), self.weight_shape,
                           self.geometry)


def _conv_per_example(x: Tensor, delta: Tensor, kernel, dilation, padding, stride) -> Tensor:
    """``(B, O, C, kh, kw)`` per-example weight gradients of a 2-D convolution, in one kernel call.

    ``B`` examples through one convolution are one example through a grouped convolution
    with ``B`` groups (``B·C`` input and ``B·O`` output channels), whose weight gradient is
    the ``B`` per-example gradients side by side: torch's own weight-gradient kernel computes
    them without a patch matrix (2-3x faster than per-offset products at 16-64 channels).
    """
    batch, channels = x.shape[:2]
    outputs = delta.shape[1]
    weight = x.new_empty(batch * outputs, channels, *kernel)  # only its shape is read
    _, grads, _ = torch.ops.aten.convolution_backward(
        delta.reshape(1, batch * outputs, *delta.shape[2:]), x.reshape(1, batch * channels, *x.shape[2:]), weight,
        None, list(stride), list(padding), list(dilation), False, [0, 0], batch, [False, True, False])
    return grads.reshape(batch, outputs, channels, *kernel)


# -- embeddings -------------------------------------------------------------------------------
class EmbeddingFactors:
    """An embedding: row ``idx`` of the table receives ``d``; idx (B, T), d (B, T, E).

    Dense form: per-example tables ``(B, V·E)``, when :func:`prefer_dense_tables` says so.

    >>> idx, d = torch.tensor([[0, 2], [2, 2]]), torch.ones(2, 2, 1)
    >>> EmbeddingFactors("table", idx, d, num_embeddings=3).materialize()["table"][:, :, 0].tolist()
    [[1.0, 0.0, 1.0], [0.0, 0.0, 2.0]]
    """

    def __init__(self, weight: str, idx: Tensor, d: Tensor, num_embeddings: int) -> None:
        self.weight, self.idx, self.d, self.num_embeddings = weight, idx, d, num_embeddings
        self._blocks: dict[str, Tensor] | None = None
        self.dense = prefer_dense_tables(*d.shape, num_embeddings)

    @property
    def device(self) -> torch.device:
        return self.d.device

    def blocks(self) -> dict[str, Tensor]:
        if self._blocks is None:
            batch, steps, width = self.d.shape
            tables = torch.zeros(batch * self.num_embeddings, width, dtype=self.d.dtype, device=self.d.device)
            rows = self.idx + self.num_embeddings * torch.arange(batch, device=self.idx.device)[:, None]
            tables.index_add_(0, rows.reshape(-1), self.d.reshape(-1, width))
            self._blocks = {self.weight: tables.reshape(batch, -1)}
        return self._blocks

    def gram(self) -> Tensor:
        if self.dense:
            return dense_gram(self.blocks())
        batch, steps = self.idx.shape
        flat_idx, flat_d = self.idx.reshape(-1), self.d.reshape(batch * steps, -1)
        same = (flat_idx[:, None] == flat_idx[None, :]).to(flat_d.dtype)
        return (same * (flat_d @ flat_d.T)).reshape(batch, steps, batch, steps).sum(dim=(1, 3))

    def sq_norms(self) -> Tensor:
        if self._blocks is not None:
            return self._blocks[self.weight].square().sum(dim=1)
        same = (self.idx[:, :, None] == self.idx[:, None, :]).to(self.d.dtype)
        return (same * (self.d @ self.d.transpose(1, 2))).sum(dim=(1, 2))

    def dots(self, views: Views) -> Tensor:
        if self.dense:
            return dense_dots(self.blocks(), views)
        tables = views[self.weight]  # (N, V, E)
        return (tables[:, self.idx] * self.d[None]).sum(dim=(2, 3))

    def groups_pay(self, count: int, columns: int) -> bool:
        return False  # the update is a scatter of the rows, not a product

    def add_weighted_(self, views: Views, weights: Tensor, groups: WeightGroups | None = None) -> None:
        if self.dense:
            return dense_add_weighted_(self.blocks(), views, weights)
        width = self.d.shape[2]
        rows = (weights[:, :, None, None] * self.d[None]).reshape(len(weights), -1, width)  # (N, B·T, E)
        views[self.weight].index_add_(1, self.idx.reshape(-1), rows)

    def select(self, rows: Tensor) -> EmbeddingFactors:
        return EmbeddingFactors(self.weight, self.idx[rows], self.d[rows], self.num_embeddings)

    def gathered(self, gather: Gather) -> EmbeddingFactors:
        return EmbeddingFactors(self.weight, gather(self.idx), gather(self.d), self.num_embeddings)

    def materialize(self) -> dict[str, Tensor]:
        batch = len(self.idx)
        return {self.weight: self.blocks()[self.weight].reshape(batch, self.num_embeddings, -1)}
