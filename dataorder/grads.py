"""Per-example gradients with ``torch.func``, and a CountSketch to shrink them.

:class:`PerExampleGrads` computes every example's loss and gradient in one vectorised pass
(``vmap(grad(...))`` over ``functional_call``), accumulates the mean of the per-example
gradients into the selected parameters' ``.grad`` (what ``loss.backward()`` gives for a loss
that is the plain mean of per-example losses), and returns the
per-example gradients flattened to ``(B, d)`` -- or sketched to ``(B, k)`` by a
:class:`CountSketch` that never materialises a ``d × k`` matrix.

>>> import torch
>>> from torch import nn
>>> model = nn.Linear(4, 3)
>>> out = PerExampleGrads(model, nn.functional.cross_entropy)(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
>>> out.losses.shape, out.grads.shape, model.weight.grad.shape
(torch.Size([5]), torch.Size([5, 15]), torch.Size([3, 4]))
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from dataorder._validate import check_seed

__all__ = ["CountSketch", "PerExampleGrads", "PerExampleResult", "flatten_per_example", "per_example_rows",
           "select_names", "select_parameters"]

ParamSelection = None | Iterable[str] | Callable[[str, nn.Parameter], bool]


def flatten_per_example(grads: Mapping[str, Tensor]) -> Tensor:
    """Flatten torch.func's dict of per-example gradients (each ``(B, *shape)``) to ``(B, d)``.

    Columns follow the dict's order, each parameter's entries in row-major order.

    >>> g = {"w": torch.ones(2, 3, 2), "b": torch.zeros(2, 3)}
    >>> flatten_per_example(g)
    tensor([[1., 1., 1., 1., 1., 1., 0., 0., 0.],
            [1., 1., 1., 1., 1., 1., 0., 0., 0.]])
    """
    if not isinstance(grads, Mapping) or not grads:
        raise ValueError("grads must be a non-empty dict of per-example gradients {name: (B, *shape)}")
    batch = {value.shape[0] if value.dim() else None for value in grads.values()}
    if len(batch) != 1 or None in batch:
        raise ValueError(f"every per-example gradient needs the same leading batch dim, got {sorted(map(str, batch))}")
    return torch.cat([per_example_rows(value) for value in grads.values()], dim=1)


class CountSketch:
    """A seeded CountSketch ``R^d → R^k``: coordinate ``i`` goes to bucket ``h(i)`` with sign ``s(i)``.

    ``<S x, S y>`` is an unbiased estimate of ``<x, y>`` with variance
    ``(1/k) Σ_{i<j} (x_i y_j + x_j y_i)²``. Only two length-``d`` vectors are stored (the
    bucket of each coordinate and its sign); applying it is one ``index_add_``. Half and
    bfloat16 inputs are accumulated and returned in float32.

    >>> sketch = CountSketch(1000, 64, seed=0)
    >>> x = torch.randn(8, 1000)
    >>> sketch(x).shape
    torch.Size([8, 64])
    >>> torch.allclose(sketch(x).sum(-1), (x * sketch.signs).sum(-1), atol=1e-4)
    True
    """

    def __init__(self, dim_in: int, dim_out: int, *, seed: int = 0, device: torch.device | str | None = None) -> None:
        self.dim_in = _check_positive(dim_in, "dim_in")
        self.dim_out = _check_positive(dim_out, "dim_out")
        self.seed = check_seed(seed)
        # Drawn on the CPU so that the sketch is the same function of the seed on every device.
        generator = torch.Generator().manual_seed(self.seed)
        self.buckets = torch.randint(self.dim_out, (self.dim_in,), generator=generator).to(device)
        self.signs = (torch.randint(2, (self.dim_in,), generator=generator) * 2 - 1).float().to(device)
        # Positive and negative coordinates add into separate halves of a 2k accumulator, so
        # applying the sketch needs no (B, d) multiplication by the signs.
        self._slots = self.buckets + self.dim_out * (self.signs < 0)

    def to(self, device: torch.device | str) -> CountSketch:
        """Move the stored bucket and sign vectors to ``device``; returns ``self``.

        >>> CountSketch(10, 4).to("cpu").buckets.device
        device(type='cpu')
        """
        self.buckets, self.signs, self._slots = (t.to(device) for t in (self.buckets, self.signs, self._slots))
        return self

    def __call__(self, x: Tensor) -> Tensor:
        """Sketch the last dimension of ``x``: ``(..., dim_in)`` → ``(..., dim_out)``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"CountSketch takes a tensor (..., {self.dim_in}), got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.dim_in:
            raise ValueError(f"CountSketch expects a tensor (..., {self.dim_in}), got shape {tuple(x.shape)}")
        return self._sketch([x], x.shape[:-1])

    def sketch_blocks(self, blocks: Iterable[Tensor]) -> Tensor:
        """Sketch per-example blocks ``(B, *shape_i)`` as if flattened and concatenated.

        Equal to ``self(flatten_per_example(...))`` without forming the ``(B, d)`` matrix, so
        torch.func's dict of gradients can be sketched with ``sketch.sketch_blocks(g.values())``.

        >>> sketch = CountSketch(9, 4, seed=1)
        >>> g = {"w": torch.randn(2, 3, 2), "b": torch.randn(2, 3)}
        >>> torch.allclose(sketch.sketch_blocks(g.values()), sketch(flatten_per_example(g)))
        True
        """
        blocks = [per_example_rows(block) for block in blocks]
        if not blocks:
            raise ValueError("sketch_blocks needs at least one block (B, *shape)")
        width = sum(block.shape[1] for block in blocks)
        if width != self.dim_in or len({block.shape[0] for block in blocks}) != 1:
            shapes = [tuple(block.shape) for block in blocks]
            raise ValueError(f"blocks must share the batch dim and hold {self.dim_in} features in all, got {shapes}")
        return self._sketch(blocks, blocks[0].shape[:1])

    def _sketch(self, blocks: list[Tensor], batch_shape: torch.Size) -> Tensor:
        like = blocks[0]
        if like.is_complex() or not like.is_floating_point():
            raise TypeError(f"CountSketch needs a real floating-point tensor, got {like.dtype}")
        dtype = torch.promote_types(like.dtype, torch.float32)
        if self._slots.device != like.device:
            self.to(like.device)
        halves = torch.zeros(*batch_shape, 2 * self.dim_out, dtype=dtype, device=like.device)
        start = 0
        for block in blocks:
            stop = start + block.shape[-1]
            halves.index_add_(-1, self._slots[start:stop], block.to(dtype))
            start = stop
        return halves[..., : self.dim_out] - halves[..., self.dim_out :]

    def __repr__(self) -> str:
        return f"CountSketch(dim_in={self.dim_in}, dim_out={self.dim_out}, seed={self.seed})"


@dataclass(frozen=True)
class PerExampleResult:
    """What :class:`PerExampleGrads` returns; every tensor is detached and on the model's device.

    ``losses`` is ``(B,)``, ``grads`` is ``(B, d)`` (``(B, k)`` when sketched) and ``outputs``
    is the model's output for the batch, so scores need no second forward pass.
    """

    losses: Tensor
    grads: Tensor
    outputs: Tensor


class PerExampleGrads:
    """Per-example losses and gradients of ``loss_fn(model(x), y)`` in one vectorised pass.

    Calling ``per_example(inputs, targets)`` accumulates the mean over the ``B`` examples of
    the per-example gradients into each *selected* parameter's ``.grad`` (accumulated as
    ``loss.backward()`` does, so ``optimizer.zero_grad()`` and gradient accumulation work
    unchanged) and returns a :class:`PerExampleResult`. Parameters that are not selected get
    no ``.grad``.

    ``loss_fn`` is applied to each example alone, so ``.grad`` equals ``loss.backward()`` on
    ``loss_fn(model(x), y)`` only when that batch loss is the plain mean of the per-example
    losses. It is not for ``ignore_index`` targets (an ignored example's loss is NaN, its
    gradient 0, yet it still counts in the ``B`` of the mean) nor for class ``weight=`` (on
    one example the weight cancels out of a mean-reduced loss, and the batch loss divides by
    the sum of the weights, not by ``B``): drop ignored examples before the call; for class
    weights pass ``loss_fn`` with ``reduction="sum"`` and multiply ``.grad`` by
    ``B / weight[targets].sum()``.

    Args:
        model: the module; its buffers are passed through unchanged.
        loss_fn: an ordinary mean-reduced loss ``loss_fn(outputs, targets)`` such as
            ``torch.nn.functional.cross_entropy``; it is called on a batch of one per example.
        params: ``None`` (every parameter with ``requires_grad``), a list of parameter names, or
            a predicate ``(name, param) -> bool`` over the trainable parameters. ``.grads``
            columns follow ``model.named_parameters()`` order whatever the list's order.
        chunk_size: examples per vectorised chunk; bounds the memory of the intermediate
            per-example gradients (the result is the same). ``None`` takes the whole batch,
            except on the CPU when one parameter's per-example block would pass 24 MiB:
            then chunks of about 8 MiB (fresh large buffers cost page faults there).
        sketch_dim: if set, ``.grads`` is a ``(B, sketch_dim)`` :class:`CountSketch` of the
            gradients, unbiased for inner products.
        seed: the sketch's seed.

    Dropout draws independent masks per example (``randomness="different"``). BatchNorm must
    be in eval mode (train-mode batch statistics mix the examples); or use GroupNorm.

    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> last = PerExampleGrads(model, nn.functional.cross_entropy, params=["2.weight", "2.bias"])
    >>> out = last(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    >>> out.grads.shape, model[0].weight.grad is None, model[2].weight.grad.shape
    (torch.Size([6, 27]), True, torch.Size([3, 8]))
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        params: ParamSelection = None,
        chunk_size: int | None = None,
        sketch_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}")
        self.chunk_size = None if chunk_size is None else _check_positive(chunk_size, "chunk_size")
        self.sketch_dim = None if sketch_dim is None else _check_positive(sketch_dim, "sketch_dim")
        self.seed = check_seed(seed)
        self.model, self.loss_fn = model, loss_fn
        self.param_names: tuple[str, ...] = select_parameters(model, params)
        sizes = dict(model.named_parameters())
        self.num_params = sum(sizes[name].numel() for name in self.param_names)
        self._largest = max(sizes[name].numel() for name in self.param_names)
        self.sketch = None if self.sketch_dim is None else CountSketch(self.num_params, self.sketch_dim, seed=self.seed)
        self._per_example = vmap(
            grad(self._example_loss, has_aux=True), in_dims=(None, None, 0, 0), randomness="different"
        )

    @property
    def dim(self) -> int:
        """Width of ``.grads``: ``sketch_dim`` if sketching, else the selected parameter count."""
        return self.num_params if self.sketch_dim is None else self.sketch_dim

    def __call__(self, inputs: Tensor, targets: Tensor) -> PerExampleResult:
        """Per-example losses and gradients of a batch; accumulates the mean into ``.grad``."""
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise TypeError("inputs and targets must be tensors with the batch on dim 0")
        if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"inputs and targets need the same batch size on dim 0, got shapes "
                f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
            )
        if inputs.shape[0] == 0:
            raise ValueError("the batch is empty: pass at least one example")
        _check_batch_norm(self.model)
        named = dict(self.model.named_parameters())
        selected = {name: named[name].detach() for name in self.param_names}
        constants: dict[str, Tensor] = {
            name: value.detach() for name, value in named.items() if name not in selected
        }
        constants.update((name, value) for name, value in self.model.named_buffers())
        flat, sums, losses, outputs = self._compute(selected, constants, inputs, targets)
        # Everything is computed before any .grad is touched, so an error leaves no partial update.
        for name, total in sums.items():
            _accumulate_grad(named[name], total / inputs.shape[0])
        return PerExampleResult(losses=losses, grads=flat, outputs=outputs)

    def _compute(
        self, selected: dict[str, Tensor], constants: dict[str, Tensor], inputs: Tensor, targets: Tensor
    ) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        """Chunk by chunk: (flat or sketched grads, per-parameter gradient sums, losses, outputs)."""
        batch = inputs.shape[0]
        step = _chunk_rows(batch, self.chunk_size, self._largest, next(iter(selected.values())))
        flat = torch.empty(0)
        sums: dict[str, Tensor] = {}
        losses, outputs = [], []
        for start in range(0, batch, step):
            rows = slice(start, min(start + step, batch))
            grads, (loss, output) = self._per_example(selected, constants, inputs[rows], targets[rows])
            blocks = list(grads.values())
            if start == 0:  # one output buffer filled chunk by chunk: no (B, d) concatenation
                dtype = blocks[0].dtype if self.sketch is None else torch.promote_types(blocks[0].dtype, torch.float32)
                flat = torch.empty(batch, self.dim, dtype=dtype, device=blocks[0].device)
                _advise_huge_pages(flat)
            _write_rows(flat, rows, blocks, self.sketch)
            for name, value in grads.items():
                sums[name] = value.sum(0) if start == 0 else sums[name] + value.sum(0)
            losses.append(loss)
            outputs.append(output)
        return flat, sums, torch.cat(losses), torch.cat(outputs)

    def _example_loss(
        self, selected: dict[str, Tensor], constants: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        output = functional_call(self.model, (selected, constants), (x.unsqueeze(0),))
        loss = self.loss_fn(output, y.unsqueeze(0))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(
                "loss_fn must return a scalar (a mean-reduced loss) for a batch of one; "
                "use reduction='mean', not 'none'"
            )
        return loss, (loss.detach(), output.detach().squeeze(0))

    def __repr__(self) -> str:
        return (
            f"PerExampleGrads(params={len(self.param_names)} tensors / {self.num_params} values, "
            f"chunk_size={self.chunk_size}, sketch_dim={self.sketch_dim}, seed={self.seed})"
        )


def select_names(named: Mapping[str, Any], params: ParamSelection, *, frozen: Iterable[str] = ()) -> tuple[str, ...]:
    """The names of ``named`` (name -> tensor) that ``params`` selects, in ``named``'s order.

    The one rule for ``params`` wherever it picks parameters (:class:`PerExampleGrads`,
    :func:`dataorder.scores.grand`): ``None`` selects every name not in ``frozen``; a list of
    names selects those (an unknown or frozen name is a ``ValueError``); a predicate
    ``(name, tensor) -> bool`` is asked about each name not in ``frozen``. The result may be
    empty: the caller says what an empty selection means.

    >>> select_names({"w": torch.ones(2), "b": torch.ones(1)}, ["b"])
    ('b',)
    >>> select_names({"w": torch.ones(2)}, ["x"])
    Traceback (most recent call last):
    ValueError: params: unknown parameter 'x'; choose from ['w']
    """
    frozen = set(frozen)
    open_names = [name for name in named if name not in frozen]
    if params is None:
        return tuple(open_names)
    if callable(params):
        return tuple(name for name in open_names if params(name, named[name]))
    if isinstance(params, str):
        raise TypeError(f"params must be None, a list of parameter names or a predicate (name, param) -> bool, got "
                        f"the str {params!r}: a single name goes in a list, params=[{params!r}]")
    if not isinstance(params, Iterable):
        raise TypeError(f"params must be None, a list of parameter names or a predicate (name, param) -> bool, got {params!r}")
    wanted = list(params)
    for name in wanted:
        if not isinstance(name, str):
            raise TypeError(f"params must list parameter names (str), got {name!r}")
        if name not in named:
            raise ValueError(f"params: unknown parameter {name!r}; choose from {list(named)}")
        if name in frozen:
            raise ValueError(f"params: {name!r} is frozen (requires_grad=False); unfreeze it or leave it out")
    return tuple(name for name in open_names if name in set(wanted))


def select_parameters(model: nn.Module, params: ParamSelection) -> tuple[str, ...]:
    """Names of the selected trainable parameters, in ``named_parameters()`` order (see :func:`select_names`).

    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> select_parameters(model, None)
    ('0.weight', '0.bias', '1.weight', '1.bias')
    >>> select_parameters(model, lambda name, p: name.startswith("1."))
    ('1.weight', '1.bias')
    """
    named = dict(model.named_parameters())
    chosen = select_names(named, params, frozen=[name for name, p in named.items() if not p.requires_grad])
    if not chosen:
        raise ValueError("params selects no trainable parameter; select at least one with requires_grad=True")
    return chosen


def per_example_rows(value: Tensor) -> Tensor:
    """``value`` ``(B, *shape)`` as ``(B, prod(shape))``; an empty batch gives ``(0, prod(shape))``.

    >>> per_example_rows(torch.ones(0, 3, 2)).shape
    torch.Size([0, 6])
    """
    return value.reshape(value.shape[0], math.prod(value.shape[1:]))


def _chunk_rows(batch: int, chunk_size: int | None, largest: int, like: Tensor) -> int:
    """Examples per vectorised chunk: ``chunk_size``, else a CPU heuristic (whole batch elsewhere)."""
    if chunk_size is not None:
        return chunk_size
    block = largest * like.element_size()  # one example's gradient of the largest parameter
    if like.device.type != "cpu" or batch * block <= _WHOLE_BATCH_BYTES:
        return batch
    # glibc serves blocks over 32 MiB with fresh mmap'd pages, and faulting those in cost more
    # than the arithmetic (an MLP's per-example backward spent 2/3 of its time there); blocks
    # of a few MiB are reused from the heap. Smaller chunks cost more dispatch, so only here.
    return max(1, _CHUNK_BYTES // block)


_WHOLE_BATCH_BYTES = 24 * 2**20
_CHUNK_BYTES = 8 * 2**20


def _advise_huge_pages(buffer: Tensor) -> None:
    """Ask Linux to back a large, still untouched CPU buffer with huge pages (best effort).

    Faulting in a fresh (B, d) output 4 KiB at a time cost more than computing it (15 ms vs
    3 ms for 43 MB here); ``madvise(MADV_HUGEPAGE)`` is advisory, so failure changes nothing.
    """
    if buffer.device.type != "cpu" or buffer.numel() * buffer.element_size() < _HUGE_PAGE_BYTES:
        return
    madvise = _libc_madvise()
    if madvise is None:
        return
    page = mmap.PAGESIZE
    start = -(-buffer.data_ptr() // page) * page
    stop = (buffer.data_ptr() + buffer.numel() * buffer.element_size()) // page * page
    madvise(start, stop - start, _MADV_HUGEPAGE)


_HUGE_PAGE_BYTES = 32 * 2**20
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=1)
def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _write_rows(flat: Tensor, rows: slice, blocks: list[Tensor], sketch: CountSketch | None) -> None:
    if sketch is not None:
        flat[rows] = sketch.sketch_blocks(blocks)
        return
    start = 0
    for block in blocks:
        width = block[0].numel()
        flat[rows, start : start + width] = block.reshape(block.shape[0], width)
        start += width


def _check_batch_norm(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None):
            raise ValueError(
                f"{type(module).__name__} {name!r} uses batch statistics, which mix examples: per-example "
                "gradients need BatchNorm in eval mode with running stats (model.eval() or "
                "module.eval()), or replace it with GroupNorm"
            )


def _accumulate_grad(param: nn.Parameter, mean: Tensor) -> None:
    if param.grad is None:
        param.grad = mean
    else:
        param.grad.add_(mean)


def _check_positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)
