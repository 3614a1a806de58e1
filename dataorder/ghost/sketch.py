"""Kronecker sketches of per-example gradients, built from the captured layer factors.

For a weight used as ``out = a W^T`` the per-example gradient is ``g_j = sum_t d_jt a_jt^T``
(``O × I``). With seeded random maps ``R_out`` (``k_out × O``) and ``R_in`` (``k_in × I``),
``E[R^T R] = I``, the sketch

    ``R_out g_j R_in^T = sum_t (R_out d_jt)(R_in a_jt)^T``   (``k_out × k_in``)

has inner products that estimate the true ones without bias, and costs only the projection
of the factors: ``k_in / O + k_out / I`` of one forward product. A side of size ``≤ k`` is
kept exact (the identity), and a parameter with at most ``k²`` values is kept exact as a
whole, so a large enough ``k`` reproduces the exact per-example gradients bit for bit in
the parameter's own flat layout. A vector parameter (bias, norm affine) with more than
``k²`` values is projected to ``k²``.

Each projection is a pure function of ``(seed, parameter name, shape, axis)``
(:func:`projection`): regenerated on demand, identical on every rank, never part of a
state. A side longer than :data:`DENSE_SIDE_MAX` uses a CountSketch (a seeded hash and sign
per coordinate, O(n) memory) instead of a Gaussian matrix -- a vocabulary, for instance.
The input side of an embedding is then the hash of the token id (a CountSketch of the
one-hot row); of a convolution, a convolution with ``k_in`` output channels. The dense maps'
products run in :mod:`dataorder.ghost.projections` (bfloat16 on a CPU with native bf16, a
convolution's input as shifted products).

A tied parameter's sketch is the sum of the sketches of its uses, made with the same maps
(the map depends on the parameter, not on the module): exact in expectation.

>>> import torch
>>> from dataorder.ghost.factors import LinearFactors
>>> a, d = torch.randn(5, 1, 40), torch.randn(5, 1, 30)
>>> factors = LinearFactors("w", None, a, d, torch.Size([30, 40]))
>>> rows = Sketcher(k=8, seed=0).rows([factors], {"w": torch.Size([30, 40])})
>>> rows.shape                                   # 8 × 8 values per example instead of 30 × 40
torch.Size([5, 64])
>>> exact = Sketcher(k=40, seed=0).rows([factors], {"w": torch.Size([30, 40])})
>>> torch.allclose(exact, factors.materialize()["w"].reshape(5, -1))
True
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from dataorder.ghost.factors import ConvFactors, DenseFactors, EmbeddingFactors, LinearFactors
from dataorder.ghost.projections import PatchMap, RowMap, low_precision_dtype
from dataorder.ghost.tied import TiedFactors

__all__ = ["DENSE_SIDE_MAX", "EXACT_SIDE", "GROUPED_CONV_COST", "Projection", "SketchRows", "Sketcher",
           "block_is_cheaper", "projection", "sketch_width"]

#: Longest side projected by a dense Gaussian matrix; longer sides use a CountSketch.
DENSE_SIDE_MAX = 4096

#: A ``k`` no parameter's side reaches: a :class:`Sketcher` of this size keeps every gradient exact.
EXACT_SIDE = 2 ** 31 - 1

#: How many times a multiply-add of the grouped per-example convolution weight gradient
#: costs one of a convolution or batched product (:func:`block_is_cheaper`).
GROUPED_CONV_COST = 4


@dataclass(frozen=True)
class Projection:
    """A seeded linear map ``R: R^size -> R^width`` with ``E[R^T R] = I`` (identity when ``size ≤ width``).

    Exactly one of ``matrix`` (Gaussian, entries ``N(0, 1/width)``) and ``buckets``/``signs``
    (CountSketch) is set, or neither (identity).

    >>> p = projection(seed=0, name="w", shape=(3, 100), axis="cols", width=4)
    >>> p.apply(torch.ones(2, 100)).shape, p.columns(torch.tensor([5, 7])).shape
    (torch.Size([2, 4]), torch.Size([2, 4]))
    >>> torch.allclose(p.apply(torch.eye(100)).T, p.dense())
    True
    """

    size: int
    width: int
    matrix: Tensor | None = None  # (width, size)
    buckets: Tensor | None = None  # (size,) long
    signs: Tensor | None = None  # (size,) ±1

    @property
    def identity(self) -> bool:
        return self.matrix is None and self.buckets is None

    def to(self, device: torch.device) -> Projection:
        move = (lambda t: None if t is None else t.to(device))
        return Projection(self.size, self.width, move(self.matrix), move(self.buckets), move(self.signs))

    def apply(self, x: Tensor) -> Tensor:
        """``(..., size) -> (..., width)``: ``R`` applied to the last dim."""
        if self.matrix is not None:
            return F.linear(x, self.matrix)
        if self.buckets is not None:
            return x.new_zeros(*x.shape[:-1], self.width).index_add_(-1, self.buckets, x * self.signs)
        return x

    def columns(self, idx: Tensor) -> Tensor:
        """``(...) -> (..., width)``: ``R e_i`` for each index ``i`` (the image of a one-hot row)."""
        if self.matrix is not None:
            return self.matrix.T[idx]
        if self.buckets is not None:
            return F.one_hot(self.buckets[idx], self.width).float() * self.signs[idx].unsqueeze(-1)
        return F.one_hot(idx, self.size).float()

    def dense(self) -> Tensor:
        """``(width, size)`` matrix of the map."""
        if self.matrix is not None:
            return self.matrix
        return self.columns(torch.arange(self.size, device=self._device())).T

    def _device(self) -> torch.device:
        held = self.matrix if self.matrix is not None else self.buckets
        return held.device if held is not None else torch.device("cpu")


def _stream_seed(seed: int, name: str, shape: tuple, axis: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}|{name}|{tuple(shape)}|{axis}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def projection(*, seed: int, name: str, shape: tuple, axis: str, width: int) -> Projection:
    """The map for one ``axis`` (``"rows"``, ``"cols"`` or ``"flat"``) of parameter ``name``: a pure function.

    Size of the axis: ``shape[0]`` (rows), ``prod(shape[1:])`` (cols), ``prod(shape)`` (flat).
    Generated on the CPU from a SHA-256 of the arguments, so every process gets the same.

    >>> a = projection(seed=1, name="w", shape=(64, 8), axis="rows", width=4)
    >>> b = projection(seed=1, name="w", shape=(64, 8), axis="rows", width=4)
    >>> torch.equal(a.matrix, b.matrix), projection(seed=1, name="w", shape=(64, 8), axis="cols", width=8).identity
    (True, True)
    """
    shape = tuple(int(s) for s in shape)
    size = {"rows": shape[0], "cols": math.prod(shape[1:]), "flat": math.prod(shape)}[axis]
    if size <= width:
        return Projection(size, size)
    generator = torch.Generator().manual_seed(_stream_seed(seed, name, shape, axis))
    if size <= DENSE_SIDE_MAX:
        return Projection(size, width, matrix=torch.randn(width, size, generator=generator) / math.sqrt(width))
    buckets = torch.randint(0, width, (size,), generator=generator)
    signs = torch.randint(0, 2, (size,), generator=generator).float().mul_(2).sub_(1)
    return Projection(size, width, buckets=buckets, signs=signs)


def _form(shape: tuple, k: int) -> str:
    """How a parameter is sketched: ``exact`` (≤ k² values), ``kron`` (a matrix), ``flat`` (a long vector)."""
    if math.prod(shape) <= k * k:
        return "exact"
    return "kron" if len(shape) >= 2 else "flat"


def sketch_width(shape: tuple, k: int) -> int:
    """Values per example a parameter of ``shape`` contributes to a sketch row.

    >>> sketch_width((30, 40), 8), sketch_width((5, 40), 8), sketch_width((10,), 8), sketch_width((1000,), 8)
    (64, 40, 10, 64)
    """
    form = _form(shape, k)
    if form == "exact":
        return math.prod(shape)
    if form == "flat":
        return k * k
    return min(shape[0], k) * min(math.prod(shape[1:]), k)


def block_is_cheaper(steps: int, inputs: int, outputs: int, k_in: int, k_out: int, conv: bool = False) -> bool:
    """Whether materialising an ``O × I`` weight's per-example gradient, then projecting it, beats
    projecting the factors (multiply-adds per example; ``steps`` rows per example).

    Projecting the factors: ``T·(I·k_in + O·k_out + k_out·k_in)`` (no ``O·k_out`` term when the
    output side is kept). Materialising: ``T·O·I`` and the projection of the ``O × I`` block.
    A convolution's block comes from one grouped weight-gradient call with a group per
    example, which runs at a quarter of the multiply-add rate of the projecting convolution
    and batched product or less (measured with 1 thread on LeNet's layers: 3-8×), so its
    ``T·O·I`` counts :data:`GROUPED_CONV_COST` times. A linear layer with few outputs over
    many rows is cheaper materialised; an MLP layer (``T`` = 1) never is, nor is LeNet's
    first convolution (``I`` = 75, ``O`` = 6, ``T`` = 784) once the grouped call's rate is counted.

    >>> block_is_cheaper(784, 75, 6, 16, 6), block_is_cheaper(784, 75, 6, 16, 6, conv=True)
    (True, False)
    >>> block_is_cheaper(1, 256, 256, 16, 16)
    False
    """
    out_cost = 0 if k_out == outputs else outputs * k_out
    factored = steps * (inputs * k_in + out_cost + k_out * k_in)
    in_cost = 0 if k_in == inputs else outputs * inputs * k_in
    block_rate = GROUPED_CONV_COST if conv else 1
    materialised = block_rate * steps * outputs * inputs + in_cost + (0 if k_out == outputs else k_in * outputs * k_out)
    return materialised < factored


@dataclass(frozen=True)
class _LinearPlan:
    """How one linear layer's sketch is added into a layout: its columns and maps (None: kept exact)."""

    weight_columns: slice | None
    bias_columns: slice | None
    block: bool  # materialise the per-example weight gradients, then project them
    rows: RowMap | None  # (k_out, O) output-side map
    cols: RowMap | None  # (k_in, I) input-side map
    out_width: int
    in_width: int
    bias_map: Tensor | None  # (k², O) when a long bias is projected


class SketchRows:
    """The ``(B, D)`` sketch rows of one batch, filled one layer call at a time.

    ``slots`` maps each parameter name to its columns. Every contribution is *added* to its
    slot -- the sketch is linear in the gradient, so a module called twice, or a tied
    parameter used by two modules, gets the sketch of the summed gradient -- and ``written``
    records which parameters received one.

    >>> rows = SketchRows({"w": slice(0, 2), "b": slice(2, 3)}, 3, batch=2, device=torch.device("cpu"))
    >>> rows.add("w", torch.ones(2, 2)); rows.add("w", torch.ones(2, 2))
    >>> rows.values.tolist(), sorted(rows.written)
    ([[2.0, 2.0, 0.0], [2.0, 2.0, 0.0]], ['w'])
    """

    def __init__(self, slots: Mapping[str, slice], width: int, batch: int, device: torch.device) -> None:
        self.slots = slots
        self.values = torch.zeros(batch, width, device=device)
        self.written: set[str] = set()

    def slot(self, name: str) -> Tensor | None:
        """The ``(B, width)`` columns of ``name`` (a view, marked written), or None if not laid out."""
        columns = self.slots.get(name)
        if columns is None:
            return None
        self.written.add(name)
        return self.values[:, columns]

    def add(self, name: str, block: Tensor) -> None:
        slot = self.slot(name)
        if slot is not None:
            slot.add_(block.reshape(len(block), -1))

    def columns(self, names: list[str]) -> Tensor:
        """The rows over ``names`` only, in that order (all of them: the buffer itself)."""
        if len(names) == len(self.slots):
            return self.values
        return torch.cat([self.values[:, self.slots[name]] for name in names], dim=1)


class Sketcher:
    """Adds the sketches of layer factors into :class:`SketchRows` for a fixed ``k`` and ``seed``.

    Caches its projections per device (they are regenerated, never saved). A parameter's
    slot holds :func:`sketch_width` values, in the order of the names it was laid out with.
    """

    def __init__(self, k: int, seed: int = 0) -> None:
        low_precision_dtype(torch.device("cpu"))  # a bad PROJECTION_DTYPE fails here, not inside a backward
        self.k, self.seed = int(k), int(seed)
        self._cache: dict[tuple, Projection] = {}
        self._plans: dict[tuple, tuple] = {}  # (name, shape, rows per example, device, conv) -> how to sketch it
        self._layouts: dict[tuple, tuple[dict[str, slice], int]] = {}
        self._linear_plans: dict[tuple, _LinearPlan] = {}  # (layout, weight, bias, rows per example, device)
        self._row_maps: dict[tuple, RowMap] = {}  # (name, shape, axis, device) -> a dense map's fast forms
        self._patch_maps: dict[tuple, PatchMap] = {}  # (name, shape, device, geometry) -> a convolution's input side

    def project(self, name: str, shape: tuple, axis: str, device: torch.device) -> Projection:
        key = (name, tuple(shape), axis, device)
        if key not in self._cache:
            width = self.k * self.k if axis == "flat" else self.k
            self._cache[key] = projection(seed=self.seed, name=name, shape=shape, axis=axis,
                                          width=width).to(device)
        return self._cache[key]

    def new_rows(self, names: list[str], shapes: Mapping[str, torch.Size], batch: int,
                 device: torch.device) -> SketchRows:
        """Zero rows for ``batch`` examples laid out over ``names`` (cached per list of names)."""
        key = tuple(names)
        if key not in self._layouts:
            slots, start = {}, 0
            for name in names:
                width = sketch_width(tuple(shapes[name]), self.k)
                slots[name], start = slice(start, start + width), start + width
            self._layouts[key] = (slots, start)
        slots, width = self._layouts[key]
        return SketchRows(slots, width, batch, device)

    def rows(self, factors: list, shapes: Mapping[str, torch.Size], names: list[str] | None = None,
             scale: float = 1.0) -> Tensor:
        """``(B, D)`` float32 sketch rows of ``factors`` over ``names`` (default: ``shapes``' order), times ``scale``."""
        order = list(shapes) if names is None else names
        target = self.new_rows(order, shapes, _batch_of(factors[0]), factors[0].device)
        for factor in factors:
            self.add(target, factor, shapes)
        out = target.values
        return out.mul_(scale) if scale != 1.0 else out

    # -- one factor object -> its slots ------------------------------------------------------
    def add(self, target: SketchRows, factor, shapes: Mapping[str, torch.Size]) -> None:
        """Add the sketch of one factor object's per-example gradients into ``target``."""
        if isinstance(factor, TiedFactors):
            for use in factor.uses:
                self.add(target, use, shapes)
        elif isinstance(factor, ConvFactors):
            if factor.weight:
                target.add(factor.weight, self._conv_weight(factor, tuple(shapes[factor.weight])))
            if factor.bias:
                target.add(factor.bias, self.block(factor.bias, tuple(shapes[factor.bias]), factor._bias_rows()))
        elif isinstance(factor, LinearFactors):
            self.add_linear(target, factor.weight, factor.bias, factor.a, factor.d, factor.weight_shape)
        elif isinstance(factor, EmbeddingFactors):
            target.add(factor.weight, self._embedding(factor, tuple(shapes[factor.weight])))
        else:
            grads = factor.grads if isinstance(factor, DenseFactors) else factor.materialize()
            for name, g in grads.items():
                target.add(name, self.block(name, tuple(shapes[name]), g))

    def add_linear(self, target: SketchRows, weight: str | None, bias: str | None, a: Tensor, d: Tensor,
                   weight_shape: torch.Size) -> None:
        """The sketches of ``out = a W^T + b`` added in place: ``a`` ``(B, ..., I)``, ``d`` ``(B, ..., O)``.

        One row per example (an MLP layer): ``slot += (R_out d) ⊗ (R_in a)``, two thin
        products and one fused multiply-add; several rows: one batched product. What to do
        is planned once per layer and layout (:class:`_LinearPlan`): a step runs only the products.
        ``a`` and ``d`` may be in a reduced dtype (``torch.autocast``): a projection takes them as
        they are (:class:`~dataorder.ghost.projections.RowMap`), anything else in float32.
        """
        batch = d.shape[0]
        single = d.dim() == 2
        if not single:
            a, d = a.reshape(batch, -1, a.shape[-1]), d.reshape(batch, -1, d.shape[-1])
        key = (id(target.slots), weight, bias, 1 if single else d.shape[1], d.device)
        plan = self._linear_plans.get(key)
        if plan is None:
            plan = self._linear_plans[key] = self._plan_linear(target.slots, weight, bias, tuple(weight_shape),
                                                               key[3], d.device)
        values = target.values
        if plan.weight_columns is not None:
            target.written.add(weight)
            slot = values[:, plan.weight_columns]
            if plan.block:
                a, d = a.float(), d.float()
                per_example = d[:, :, None] * a[:, None, :] if single else torch.bmm(d.transpose(1, 2), a)
                slot.add_(self.block(weight, tuple(weight_shape), per_example.reshape(batch, -1)))
            else:
                out_side = d.float() if plan.rows is None else plan.rows.right(d)
                in_side = a.float() if plan.cols is None else plan.cols.right(a)
                matrices = slot.view(batch, plan.out_width, plan.in_width)
                if single:
                    matrices.addcmul_(out_side[:, :, None], in_side[:, None, :])
                else:
                    matrices.baddbmm_(out_side.transpose(1, 2), in_side)
        if plan.bias_columns is not None:
            target.written.add(bias)
            rows = d.float() if single else d.sum(dim=1, dtype=torch.float32)
            values[:, plan.bias_columns].add_(rows if plan.bias_map is None else F.linear(rows, plan.bias_map))

    def _plan_linear(self, slots: Mapping[str, slice], weight: str | None, bias: str | None, shape: tuple,
                     steps: int, device: torch.device) -> _LinearPlan:
        weight_columns = slots.get(weight) if weight is not None else None
        bias_columns = slots.get(bias) if bias is not None else None
        rows = cols = bias_map = None
        block, out_width, in_width = False, shape[0], math.prod(shape[1:])
        if weight_columns is not None:
            form, row_map, col_map = self._weight_plan(weight, shape, steps, device, False)
            block = form == "block"
            if form != "exact":
                rows, cols = (None if m.matrix is None else self._fast_rows((weight, shape, axis, device), m)
                              for m, axis in ((row_map, "rows"), (col_map, "cols")))
                out_width, in_width = row_map.width, col_map.width
                if (not row_map.identity and rows is None) or (not col_map.identity and cols is None):
                    block = True  # a CountSketch side (longer than DENSE_SIDE_MAX): materialise, then project
        if bias_columns is not None and _form((shape[0],), self.k) == "flat":
            flat = self.project(bias, (shape[0],), "flat", device)
            bias_map = flat.matrix if flat.matrix is not None else flat.dense()
        return _LinearPlan(weight_columns, bias_columns, block, rows, cols, out_width, in_width, bias_map)

    def block(self, name: str, shape: tuple, per_example: Tensor) -> Tensor:
        """Sketch of materialised per-example gradients ``(B, *shape)`` (or ``(B, prod(shape))``)."""
        batch, form, device = len(per_example), _form(shape, self.k), per_example.device
        if form == "exact":
            return per_example.reshape(batch, -1)
        if form == "flat":
            return self.project(name, shape, "flat", device).apply(per_example.reshape(batch, -1))
        rows, cols = self.project(name, shape, "rows", device), self.project(name, shape, "cols", device)
        matrices = cols.apply(per_example.reshape(batch, shape[0], -1))  # (B, R, kc)
        return rows.apply(matrices.transpose(1, 2)).transpose(1, 2).reshape(batch, -1)  # (B, kr·kc)

    def _weight_plan(self, name: str, shape: tuple, steps: int, device: torch.device, conv: bool) -> tuple:
        """``(form, rows map, cols map)`` of a linear layer's weight, chosen once per name, shape and ``steps``.

        ``form``: ``exact`` (kept whole), ``block`` (materialise, then project), ``factors``
        (project the input and the output gradient, then sum their outer products).
        """
        key = (name, shape, steps, device, conv)
        plan = self._plans.get(key)
        if plan is None:
            if _form(shape, self.k) == "exact":
                plan = ("exact", None, None)
            else:
                rows, cols = self.project(name, shape, "rows", device), self.project(name, shape, "cols", device)
                cheaper = block_is_cheaper(steps, cols.size, rows.size, cols.width, rows.width, conv)
                plan = ("block" if cheaper else "factors", rows, cols)
            self._plans[key] = plan
        return plan

    def _conv_weight(self, factor: ConvFactors, shape: tuple) -> Tensor:
        """``sum_l (R_out δ_l)(R_in p_l)^T`` with channels-first tensors throughout (no transposed copies).

        The projected patches ``R_in p_l`` come from the input without forming the patches
        (:class:`~dataorder.ghost.projections.PatchMap`: a convolution with ``k_in`` output
        channels whose kernel is ``R_in``, or shifted products); the projected output
        gradient is one ``(k_out, O) @ (O, L)`` product per example.
        """
        form, rows, cols = self._weight_plan(factor.weight, shape, factor.d.shape[1], factor.d.device, True)
        if form == "exact":
            return factor._weight_block()
        if form == "block":
            return self.block(factor.weight, shape, factor._weight_block())
        batch = len(factor.x)
        delta = factor.delta.flatten(2)  # (B, O, L)
        out_side = delta  # (B, ko, L)
        if not rows.identity:
            out_side = self._fast_rows((factor.weight, shape, "rows", delta.device), rows).left(delta)
        in_side = factor.a.transpose(1, 2) if cols.identity else self._patches(factor, shape, cols)(factor.x)
        return torch.bmm(out_side, in_side.transpose(1, 2)).reshape(batch, -1)  # in_side: (B, ki, L)

    def _fast_rows(self, key: tuple, projection: Projection) -> RowMap:
        """``projection``'s matrix with its fast forms (a :class:`~dataorder.ghost.projections.RowMap`), made once."""
        if key not in self._row_maps:
            self._row_maps[key] = RowMap.of(projection.dense())
        return self._row_maps[key]

    def _patches(self, factor: ConvFactors, shape: tuple, cols: Projection) -> PatchMap:
        key = (factor.weight, shape, factor.x.device, factor.geometry)
        if key not in self._patch_maps:
            kernel = cols.dense().reshape(cols.width, factor.x.shape[1], *factor.geometry[0])
            self._patch_maps[key] = PatchMap.of(kernel, factor.geometry)
        return self._patch_maps[key]

    def _embedding(self, factor: EmbeddingFactors, shape: tuple) -> Tensor:
        batch, device = len(factor.idx), factor.d.device
        if _form(shape, self.k) == "exact":
            return factor.blocks()[factor.weight]
        rows, cols = self.project(factor.weight, shape, "rows", device), self.project(factor.weight, shape, "cols", device)
        hashed = rows.columns(factor.idx)  # (B, T, kr): R e_token
        if cols.matrix is None:  # a CountSketch (or the identity)
            projected = cols.apply(factor.d)
        else:
            projected = self._fast_rows((factor.weight, shape, "cols", device), cols).right(factor.d)
        return torch.bmm(hashed.transpose(1, 2), projected).reshape(batch, -1)


def _batch_of(factor) -> int:
    if isinstance(factor, TiedFactors):
        return _batch_of(factor.uses[0])
    if isinstance(factor, (LinearFactors, EmbeddingFactors)):
        return len(factor.d)
    grads = factor.grads if isinstance(factor, DenseFactors) else factor.materialize()
    return len(next(iter(grads.values())))
