"""Where a step's rows come from: dense rows, the exact ghost path, the sketched ghost path.

The rules of :mod:`dataorder.ordering.rules` ask four things of a batch of vectors ``c_j``:
``[S; C] @ C.T`` (the products with the running sums and the Gram, one host transfer, with
the largest magnitude of each row of the rule's tensors, to bound their update),
``T += W @ C`` into a few flat vectors at once, centring by a mean, and (for pair balance)
a dense copy of a trailing row and a dense row put in front. :class:`DenseRows` does these
on a ``(B, k)`` tensor with the kernels of :mod:`dataorder.ordering.kernels`;
:class:`GhostRows` does them from a :class:`dataorder.ghost.GhostBatch`, never materialising
the batch's ``B × d`` gradients. Both give the same numbers, so the rules cannot tell them apart.

A *source* turns what the training loop hands over into a list of such rows, one per
micro-batch: :func:`dense_rows` (``step(grads)``), :class:`GhostSource` (hooks, exact
products), :class:`ExactRowsSource` (hooks, exact rows built in the backward: the exact path
of a small model, :func:`exact_source`) and :class:`SketchSource` (hooks, per-layer sketched
rows); the last two are balanced as dense rows.

>>> import torch
>>> rows = DenseRows(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
>>> products, peaks = rows.products(torch.zeros(1, 2))
>>> products.tolist(), peaks.tolist()
([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0.0])
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dataorder._device import download, upload
from dataorder.distributed import gather_global_batch, gather_global_batches
from dataorder.ordering.kernels import apply_signs, balance_products

__all__ = ["DENSE_EXACT_MAX", "DenseRows", "ExactRowsSource", "GhostRows", "GhostSource", "HookSource",
           "SketchSource", "UnsupportedDeviceError", "check_device", "dense_rows", "exact_source", "grads_width"]


class UnsupportedDeviceError(ValueError):
    """Gradients live on a device that holds no values (``meta``): nothing can be balanced."""


def check_device(device: torch.device) -> None:
    """Refuse gradients on a device without data, before any state is touched.

    >>> check_device(torch.device("cpu"))
    >>> check_device(torch.device("meta"))
    Traceback (most recent call last):
    ...
    dataorder.ordering.sources.UnsupportedDeviceError: grads are on the meta device, which holds no values: compute them on a real device (cpu, cuda, ...)
    """
    if device.type == "meta":
        raise UnsupportedDeviceError("grads are on the meta device, which holds no values: compute them on a "
                                     "real device (cpu, cuda, ...)")


def grads_width(grads: Any) -> int:
    """``d`` of a (B, d) tensor or of torch.func's dict of per-example gradients (0 if neither).

    >>> grads_width(torch.zeros(2, 5)), grads_width({"w": torch.zeros(2, 3, 2)})
    (5, 6)
    """
    if isinstance(grads, Tensor):
        return int(grads.shape[-1]) if grads.dim() else 0
    if isinstance(grads, Mapping):
        return sum(int(v[0].numel()) for v in grads.values() if isinstance(v, Tensor) and v.dim())
    return 0


def dense_rows(grads: Any, dim: int | None, dtype: torch.dtype | None) -> Tensor:
    """``step(grads)``'s source: a ``(B, d)`` tensor or torch.func's dict, as checked rows.

    ``dim``/``dtype`` are the width and accumulation dtype of earlier steps (None at the
    first). Half precision is accumulated in float32, float64 stays float64.

    >>> dense_rows({"w": torch.ones(2, 2, 2), "b": torch.zeros(2, 2)}, None, None).shape
    torch.Size([2, 6])
    >>> dense_rows({"w": [1.0]}, None, None)
    Traceback (most recent call last):
    ...
    TypeError: grads['w'] must be a (B, *shape) tensor of per-example gradients, got list
    """
    if isinstance(grads, Mapping):
        from dataorder.grads import flatten_per_example

        for name, value in grads.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"grads[{name!r}] must be a (B, *shape) tensor of per-example gradients, "
                                f"got {type(value).__name__}")
            if value.layout != torch.strided:
                raise TypeError(f"grads[{name!r}] must be a dense tensor, got layout {value.layout}; pass .to_dense()")
        grads = flatten_per_example(grads)
    if not isinstance(grads, Tensor):
        raise TypeError(
            f"grads must be a (B, d) tensor or torch.func's dict of per-example gradients, got {type(grads).__name__}"
        )
    if grads.layout != torch.strided:
        raise TypeError(f"grads must be a dense tensor, got layout {grads.layout}; pass grads.to_dense()")
    check_device(grads.device)
    if grads.dim() != 2 or grads.shape[0] == 0 or grads.shape[1] == 0:
        raise ValueError(f"grads must be a non-empty (B, d) tensor, one row per example; got shape {tuple(grads.shape)}")
    if not grads.is_floating_point():
        raise TypeError(f"grads must be real floating point, got {grads.dtype}")
    if dim is not None and grads.shape[1] != dim:
        raise ValueError(
            f"grads have d={grads.shape[1]} but earlier steps had d={dim}; feed the same parameters "
            "(and the same sketch) every step"
        )
    dtype = dtype or (torch.float64 if grads.dtype == torch.float64 else torch.float32)
    return grads.detach().to(dtype)


#: The hook source each hooked module is attached to (both held weakly): see :meth:`HookSource.claim`.
_HOLDERS: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


class HookSource:
    """What the hook sources share: a :class:`~dataorder.ghost.GhostGrads`' hooks, held by one sampler.

    Every live source captures every backward through the modules it hooks, so a model
    balances for one sampler at a time: :meth:`claim` takes the hooked modules over from any
    other live source (whose hooks are removed and which is marked ``displaced``), and
    :meth:`release_with` removes the hooks when the owning sampler is garbage-collected.
    Without these, a sampler attached again in a notebook would leave the old one's hooks
    capturing (and, on the exact path, keeping) every batch for good.

    Example::

        >>> from torch import nn
        >>> model = nn.Linear(3, 2)
        >>> first, second = GhostSource(model), GhostSource(model)
        >>> first.claim(), second.claim() == [first], first.displaced
        ([], True, True)
        >>> second.remove()
    """

    def __init__(self, ghost: Any) -> None:
        self.ghost = ghost
        self.displaced = False  # another source claimed the modules: its owner must attach again
        self.removed = False
        self._release: weakref.finalize | None = None

    @property
    def sketch(self) -> int | None:
        """The ``k`` of the sketched rows, None for exact rows."""
        return self.ghost.sketch

    def claim(self) -> list[HookSource]:
        """Become the source of the hooked modules; the other live sources there are removed and returned."""
        displaced: list[HookSource] = []
        for module in self.ghost.hooked:
            holder = _HOLDERS.get(module)
            other = holder() if holder is not None else None
            if other is not None and other is not self and not other.removed and all(o is not other for o in displaced):
                displaced.append(other)
            _HOLDERS[module] = weakref.ref(self)
        for other in displaced:
            other.remove()
            other.displaced = True
        return displaced

    @property
    def model(self) -> torch.nn.Module:
        """The model whose modules are hooked."""
        return self.ghost.model

    @property
    def names(self) -> list[str]:
        """The selected parameters, in the rows' order (those left out included)."""
        return self.ghost.names

    @property
    def left_out(self) -> list[str]:
        """The parameters left out of the rows (their module's input is shared by the batch)."""
        return self.ghost.left_out

    def settle(self, left_out: list[str]) -> None:
        """Leave out exactly ``left_out`` from now on (the running sums' parameters, when resuming)."""
        self.ghost.settle(left_out)

    def discard(self) -> None:
        """Forget the captures since the last :meth:`collect` (a state was loaded over them)."""
        self.ghost.discard()

    def release_with(self, owner: object) -> None:
        """Remove the hooks when ``owner`` is garbage-collected (if :meth:`remove` has not run by then)."""
        self._release = weakref.finalize(owner, self.ghost.remove)

    def remove(self) -> None:
        self.removed = True
        if self._release is not None:
            self._release()  # runs ghost.remove() once: not again when the owner is collected
        else:
            self.ghost.remove()


class GhostSource(HookSource):
    """Rows from hooks: each backward since the last step becomes one :class:`GhostRows` (exact products).

    Example::

        >>> from torch import nn
        >>> model = nn.Linear(3, 2)
        >>> source = GhostSource(model)
        >>> model(torch.randn(4, 3)).pow(2).mean().backward()
        >>> [rows] = source.collect(); rows.shape
        (4, 8)
        >>> source.remove()
    """

    def __init__(self, model: torch.nn.Module, params: Any = None) -> None:
        from dataorder.ghost import GhostGrads

        super().__init__(GhostGrads(model, params=params))

    def collect(self) -> list[GhostRows]:
        """One rows object per micro-batch captured since the last call, in order."""
        return [GhostRows(batch) for batch in self.ghost.collect()]

    def globalise(self, batches: list[GhostRows], world: int) -> list[GhostRows]:
        """The global batch of each micro-batch: every layer's captured factors all-gathered (CD-GraB)."""
        return [GhostRows(rows.batch.gathered(gather_global_batches, world)) for rows in batches]


#: The exact path builds dense rows during the backward (:class:`ExactRowsSource`) when the
#: selected parameters hold at most this many values; above it, the ghost products
#: (:class:`GhostSource`), whose memory does not grow with ``B × d``. ``benchmarks/exact_rows.py``
#: (CPU, 1 thread, digits MLPs, a training step over a plain one): at B = 16 the rows cost
#: 1.88× against the products' 4.11× for d = 650 and 2.33× against 3.58× for d = 19210; at
#: B = 64, 1.35× against 2.29× for d = 650, even at d = 9610 (3.03× against 3.06×), and 4.10×
#: against 3.02× for d = 19210: the two cross near ``B·d`` ≈ 600k values. At 4096 the rows
#: should be the cheaper up to B ≈ 146 (extrapolated), and a batch of 1024 takes 16 MiB.
DENSE_EXACT_MAX = 4096


def exact_source(model: torch.nn.Module, params: Any = None) -> HookSource:
    """The exact path's source for ``model``: dense rows built in the backward for a model with
    at most :data:`DENSE_EXACT_MAX` selected values, the ghost products otherwise.

    >>> from torch import nn
    >>> type(exact_source(nn.Linear(3, 2))).__name__, type(exact_source(nn.Linear(100, 100))).__name__
    ('ExactRowsSource', 'GhostSource')
    """
    from dataorder.grads import select_parameters

    named = dict(model.named_parameters())
    size = sum(named[name].numel() for name in select_parameters(model, params))
    return ExactRowsSource(model, params) if size <= DENSE_EXACT_MAX else GhostSource(model, params)


class SketchSource(HookSource):
    """Rows from hooks as per-layer Kronecker sketches (at most ``sketch²`` values per weight), balanced densely.

    The sketch is a pure function of ``seed`` and each parameter's name and shape, so every
    rank (and every resumed run) draws the same one; under ``torch.distributed`` the dense
    sketch rows are all-gathered like ``step(grads)``'s.

    Example::

        >>> from torch import nn
        >>> source = SketchSource(nn.Linear(30, 20), None, sketch=4, seed=0)
        >>> source.ghost.model(torch.randn(5, 30)).pow(2).mean().backward()
        >>> [rows] = source.collect(); rows.shape       # 4 × 4 weight values, 20 bias values projected to 16
        (5, 32)
        >>> source.remove()
    """

    def __init__(self, model: torch.nn.Module, params: Any, sketch: int, seed: int) -> None:
        from dataorder.ghost import GhostGrads

        super().__init__(GhostGrads(model, params=params, sketch=sketch, seed=seed))

    def collect(self) -> list[DenseRows]:
        return [DenseRows(block.detach().float()) for block in self.ghost.collect_sketch()]

    def globalise(self, batches: list[DenseRows], world: int) -> list[DenseRows]:
        return [DenseRows(gather_global_batch(rows.rows)) for rows in batches]


class ExactRowsSource(SketchSource):
    """Rows from hooks as the exact per-example gradients, ``(B, d)``, built during the backward.

    The exact path (``attach(model, sketch=None)``) for models with few parameters
    (:func:`exact_source`): the same numbers as :class:`GhostSource`'s products, balanced as
    dense rows (on the CPU in one fused call), without the products' fixed cost per layer.

    Example::

        >>> from torch import nn
        >>> model = nn.Linear(3, 2)
        >>> source = ExactRowsSource(model, None)
        >>> model(torch.randn(4, 3)).pow(2).mean().backward()
        >>> [rows] = source.collect(); rows.shape, source.sketch
        ((4, 8), None)
        >>> source.remove()
    """

    def __init__(self, model: torch.nn.Module, params: Any) -> None:
        from dataorder.ghost import GhostGrads

        HookSource.__init__(self, GhostGrads(model, params=params, dense=True))


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
        return first.as_strided((sum(b.shape[0] for b in blocks), width), (width, 1))
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

    def head(self, count: int) -> DenseRows:
        """The first ``count`` rows (the global batch without the sharding's padded duplicates)."""
        return DenseRows(self.rows[:count])

    def cpu_rows(self) -> Tensor | None:
        """The rows as a contiguous CPU tensor, for the fused one-pass kernels (None off the CPU)."""
        return self.rows.contiguous() if self.rows.device.type == "cpu" else None

    def products(self, sums: Tensor, watched: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``[sums; rows] @ rows.T`` on the host, and each row's peak of ``watched`` (one transfer)."""
        return balance_products(self.rows, sums, watched)

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
        return (self.prefix.shape[0] + self.batch.batch_size, self.batch.dim)

    @property
    def device(self) -> torch.device:
        return self.batch.device

    def head(self, count: int) -> GhostRows:
        """The first ``count`` examples (the global batch without the sharding's padded duplicates)."""
        if self.mean is not None or self.prefix.shape[0]:
            raise ValueError("GhostRows are cut before they are centred or prefixed")
        return self if count >= self.batch.batch_size else GhostRows(self.batch.select(list(range(count))))

    def cpu_rows(self) -> None:
        return None  # the rows are never formed

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # ghost products are formed in float32 whatever the model's dtype

    def products(self, sums: Tensor, watched: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`DenseRows.products`, from the factors: ``[sums; rows] @ rows.T`` and the peaks of ``watched``."""
        # device: the products of every dense vector (mean, sums, prefix) with the ghost rows and
        # with each other, and the Gram; host (float64): centring and assembly, on small arrays
        dense = ([self.mean[None]] if self.mean is not None else []) + [sums, self.prefix]
        vectors = _stack_rows([v.to(self.device, torch.float32) for v in dense if v.shape[0]])
        size, total = self.batch.batch_size, vectors.shape[0]
        batch_dots, batch_gram = self.batch.products(vectors)  # one walk over the layers
        peaks = (sums if watched is None else watched).abs().amax(dim=1).to(self.device, torch.float32)
        packed = download(torch.cat([batch_dots.reshape(-1), batch_gram.reshape(-1),
                                     (vectors @ vectors.T).reshape(-1), peaks]))  # one transfer
        dots = packed[:total * size].reshape(total, size)
        gram = packed[total * size:(total + size) * size].reshape(size, size)
        pairs = packed[(total + size) * size:(total + size) * size + total * total].reshape(total, total)
        if self.mean is not None:  # <v, g - m> = <v, g> - <v, m>; <g_i - m, g_j - m> likewise
            with_mean = dots[0]
            gram = gram - with_mean[:, None] - with_mean[None, :] + pairs[0, 0]
            dots, pairs = dots[1:] - pairs[1:, :1], pairs[1:, 1:]
        count, width = sums.shape[0], self.prefix.shape[0]
        out = np.empty((count + width + size, width + size))  # [sums; prefix; ghost rows] x [prefix; ghost rows]
        out[:count, :width], out[:count, width:] = pairs[:count, count:], dots[:count]
        out[count:count + width, :width], out[count:count + width, width:] = pairs[count:, count:], dots[count:]
        out[count + width:, :width], out[count + width:, width:] = dots[count:].T, gram
        return out, packed[len(packed) - len(peaks):]

    def add_weighted_to(self, targets: Tensor, weights: np.ndarray) -> None:
        """``targets += weights @ rows`` in place, without forming the rows (``targets`` float32)."""
        weights = np.asarray(weights, dtype=np.float32)
        width = self.prefix.shape[0]
        self.batch.add_weighted_(targets, weights[:, width:])  # uploads the ghost rows' weights once
        if width:
            targets.addmm_(upload(weights[:, :width], self.device, torch.float32),
                           self.prefix.to(self.device, torch.float32))
        if self.mean is not None:  # each row's weight sum, taken on the host
            targets.addr_(upload(weights[:, width:].sum(1), self.device, torch.float32),
                          self.mean.to(self.device, torch.float32), alpha=-1.0)

    def centred(self, mean: Tensor) -> GhostRows:
        if self.mean is not None or self.prefix.shape[0]:
            raise ValueError("GhostRows are centred once, before any prefix is added")
        return GhostRows(self.batch, mean.to(self.device), self.prefix)

    def tail(self, start: int) -> Tensor:
        width = self.prefix.shape[0]
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
