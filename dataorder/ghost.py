"""Ghost per-example gradients: inner products of per-example gradients without materialising them.

Gradient balancing needs only inner products of per-example gradients: the batch Gram
``<g_i, g_j>``, products ``<v, g_j>`` with a few parameter-shaped vectors (the running sum,
the stale mean) and weighted sums ``sum_j w_j g_j``. For a linear layer with inputs ``A``
and output gradients ``D``, ``g_j = D_j^T A_j``, so each of these costs about one matrix
product of the weight's size (the "ghost norm" trick of DP training, Goodfellow 2015;
Li et al. 2021). :class:`GhostGrads` captures ``A`` and ``D`` with hooks during an ordinary
``loss.backward()``; :class:`GhostBatch` answers the three questions from them.

Supported exactly: ``nn.Linear`` (any number of leading dims), ``nn.Conv1d``/``nn.Conv2d``
(``groups=1``, numeric padding, zero padding mode) via unfold, ``nn.Embedding`` (dense),
``nn.LayerNorm`` and ``nn.GroupNorm`` affine parameters, and biases. Any other module with
parameters of its own falls back to ``torch.func`` per-example gradients for that module
only (materialised, ``B × d_module``), with a one-time warning that names it.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> ghost = GhostGrads(model)
    >>> x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    >>> nn.functional.cross_entropy(model(x), y).backward()
    >>> [batch] = ghost.collect()
    >>> batch.gram().shape
    torch.Size([5, 5])
    >>> torch.allclose(batch.gram(), batch.materialize() @ batch.materialize().T, atol=1e-5)
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GhostBatch", "GhostGrads"]

Vector = Mapping[str, torch.Tensor]  # parameter name -> tensor of the parameter's shape


# -- per-layer kernels: pure functions on captured factors ------------------------------------
def _rows_gram(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Gram of g_j = d_j^T a_j for a:(B,T,I), d:(B,T,O), choosing the cheaper of two forms."""
    batch, steps, inputs = a.shape
    outputs = d.shape[2]
    if steps == 1:
        return (a[:, 0] @ a[:, 0].T) * (d[:, 0] @ d[:, 0].T)
    ghost_cost = batch * batch * steps * steps * (inputs + outputs)
    dense_cost = batch * steps * inputs * outputs + batch * batch * inputs * outputs
    if ghost_cost <= dense_cost:
        flat_a, flat_d = a.reshape(batch * steps, inputs), d.reshape(batch * steps, outputs)
        cross = (flat_a @ flat_a.T) * (flat_d @ flat_d.T)  # (B·T, B·T)
        return cross.reshape(batch, steps, batch, steps).sum(dim=(1, 3))
    dense = torch.einsum("bto,bti->boi", d, a).reshape(batch, -1)
    return dense @ dense.T


def _rows_sq_norms(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Squared norms of g_j = d_j^T a_j for a:(B,T,I), d:(B,T,O), by the cheaper of two forms."""
    batch, steps, inputs = a.shape
    outputs = d.shape[2]
    if steps == 1:
        return a[:, 0].square().sum(dim=1) * d[:, 0].square().sum(dim=1)
    if steps * (inputs + outputs) <= inputs * outputs:
        return ((a @ a.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum(dim=(1, 2))
    return torch.einsum("bto,bti->boi", d, a).square().sum(dim=(1, 2))


@dataclass
class _LinearFactors:
    """Factors of a weight used as ``out = a @ W^T (+ b)``: a:(B,T,I), d:(B,T,O)."""

    weight: str | None
    bias: str | None
    a: torch.Tensor
    d: torch.Tensor
    weight_shape: torch.Size | None = None

    def gram(self) -> torch.Tensor:
        total = _rows_gram(self.a, self.d) if self.weight else 0.0
        if self.bias:
            summed = self.d.sum(dim=1)
            total = total + summed @ summed.T
        return total

    def sq_norms(self) -> torch.Tensor:
        total = _rows_sq_norms(self.a, self.d) if self.weight else 0.0
        if self.bias:
            total = total + self.d.sum(dim=1).square().sum(dim=1)
        return total

    def dot(self, vector: Vector) -> torch.Tensor:
        total = 0.0
        if self.weight:
            w = vector[self.weight].reshape(self.d.shape[2], self.a.shape[2]).to(self.d.dtype)
            total = ((self.d @ w) * self.a).sum(dim=(1, 2))
        if self.bias:
            total = total + self.d.sum(dim=1) @ vector[self.bias].to(self.d.dtype)
        return total

    def select(self, rows: torch.Tensor) -> "_LinearFactors":
        return _LinearFactors(self.weight, self.bias, self.a[rows], self.d[rows], self.weight_shape)

    def weighted_sums(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``weights`` (N, B) -> name -> (N, *shape): N weighted sums in one product per parameter."""
        out = {}
        outputs, inputs = self.d.shape[2], self.a.shape[2]
        scaled = weights[:, :, None, None] * self.d[None]  # (N, B, T, O)
        if self.weight:
            flat = scaled.reshape(len(weights), -1, outputs).transpose(1, 2) @ self.a.reshape(-1, inputs)
            out[self.weight] = flat.reshape(len(weights), *self.weight_shape)
        if self.bias:
            out[self.bias] = scaled.sum(dim=(1, 2))
        return out

    def materialize(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.weight:
            out[self.weight] = torch.einsum("bto,bti->boi", self.d, self.a).reshape(len(self.a), *self.weight_shape)
        if self.bias:
            out[self.bias] = self.d.sum(dim=1)
        return out


@dataclass
class _EmbeddingFactors:
    """Factors of an embedding: row ``idx`` of the table receives ``d``; idx:(B,T), d:(B,T,E)."""

    weight: str
    idx: torch.Tensor
    d: torch.Tensor
    num_embeddings: int

    def gram(self) -> torch.Tensor:
        batch, steps = self.idx.shape
        flat_idx, flat_d = self.idx.reshape(-1), self.d.reshape(batch * steps, -1)
        same = (flat_idx[:, None] == flat_idx[None, :]).to(flat_d.dtype)
        return (same * (flat_d @ flat_d.T)).reshape(batch, steps, batch, steps).sum(dim=(1, 3))

    def sq_norms(self) -> torch.Tensor:
        same = (self.idx[:, :, None] == self.idx[:, None, :]).to(self.d.dtype)
        return (same * (self.d @ self.d.transpose(1, 2))).sum(dim=(1, 2))

    def dot(self, vector: Vector) -> torch.Tensor:
        return (vector[self.weight].to(self.d.dtype)[self.idx] * self.d).sum(dim=(1, 2))

    def select(self, rows: torch.Tensor) -> "_EmbeddingFactors":
        return _EmbeddingFactors(self.weight, self.idx[rows], self.d[rows], self.num_embeddings)

    def weighted_sums(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        width = self.d.shape[2]
        rows = (weights[:, :, None, None] * self.d[None]).reshape(len(weights), -1, width)  # (N, B·T, E)
        table = torch.zeros(len(weights), self.num_embeddings, width, dtype=self.d.dtype, device=self.d.device)
        return {self.weight: table.index_add_(1, self.idx.reshape(-1), rows)}

    def materialize(self) -> dict[str, torch.Tensor]:
        batch = len(self.idx)
        table = torch.zeros(batch, self.num_embeddings, self.d.shape[2], dtype=self.d.dtype, device=self.d.device)
        owner = torch.arange(batch, device=self.idx.device)[:, None].expand_as(self.idx)
        table.index_put_((owner.reshape(-1), self.idx.reshape(-1)), self.d.reshape(-1, self.d.shape[2]), accumulate=True)
        return {self.weight: table}


@dataclass
class _DenseFactors:
    """Materialised per-example gradients of a small module: name -> (B, *shape)."""

    grads: dict[str, torch.Tensor]

    def _flat(self) -> torch.Tensor:
        return torch.cat([g.reshape(len(g), -1) for g in self.grads.values()], dim=1)

    def gram(self) -> torch.Tensor:
        flat = self._flat()
        return flat @ flat.T

    def sq_norms(self) -> torch.Tensor:
        return self._flat().square().sum(dim=1)

    def dot(self, vector: Vector) -> torch.Tensor:
        return sum((g.reshape(len(g), -1) @ vector[name].reshape(-1).to(g.dtype)) for name, g in self.grads.items())

    def select(self, rows: torch.Tensor) -> "_DenseFactors":
        return _DenseFactors({name: g[rows] for name, g in self.grads.items()})

    def weighted_sums(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: torch.tensordot(weights, g, dims=1) for name, g in self.grads.items()}

    def materialize(self) -> dict[str, torch.Tensor]:
        return dict(self.grads)


# -- turning one captured call into factors ----------------------------------------------------
def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., F) -> (B, T, F) with T the product of the middle dims (1 for 2-D input)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _linear_factors(module: nn.Linear, names: dict[str, str], inputs, delta) -> _LinearFactors:
    return _LinearFactors(names.get("weight"), names.get("bias"), _as_rows(inputs[0]), _as_rows(delta),
                          module.weight.shape)


def _conv_factors(module: nn.Module, names: dict[str, str], inputs, delta) -> _LinearFactors:
    x = inputs[0]
    if isinstance(module, nn.Conv1d):  # treat as a 1×k 2-D convolution
        x, delta = x.unsqueeze(2), delta.unsqueeze(2)
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        padding, stride = (0, *module.padding), (1, *module.stride)
    else:
        kernel, dilation, padding, stride = module.kernel_size, module.dilation, module.padding, module.stride
    unfolded = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C·k·k, L)
    out_grad = delta.reshape(delta.shape[0], delta.shape[1], -1)  # (B, O, L)
    return _LinearFactors(names.get("weight"), names.get("bias"), unfolded.transpose(1, 2),
                          out_grad.transpose(1, 2), module.weight.shape)


def _embedding_factors(module: nn.Embedding, names, inputs, delta) -> _EmbeddingFactors:
    idx = inputs[0].reshape(inputs[0].shape[0], -1)
    d = delta.reshape(idx.shape[0], idx.shape[1], -1)
    if module.padding_idx is not None:
        d = d * (idx != module.padding_idx).unsqueeze(-1).to(d.dtype)
    return _EmbeddingFactors(names["weight"], idx, d, module.num_embeddings)


def _norm_factors(module: nn.Module, names, inputs, delta) -> _DenseFactors:
    x = inputs[0]
    if isinstance(module, nn.LayerNorm):
        normalized = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        reduce_dims = tuple(range(1, x.dim() - len(module.normalized_shape)))
    else:  # GroupNorm: affine parameters per channel (dim 1)
        normalized = F.group_norm(x, module.num_groups, None, None, module.eps)
        normalized, delta = normalized.movedim(1, -1), delta.movedim(1, -1)
        reduce_dims = tuple(range(1, x.dim() - 1))
    grads = {}
    if "weight" in names:
        grads[names["weight"]] = (normalized * delta).sum(dim=reduce_dims) if reduce_dims else normalized * delta
    if "bias" in names:
        grads[names["bias"]] = delta.sum(dim=reduce_dims) if reduce_dims else delta
    return _DenseFactors(grads)


def _fallback_factors(module: nn.Module, names: dict[str, str], inputs, delta) -> _DenseFactors:
    """Per-example gradients of this module's own parameters by torch.func (vmap over grad)."""
    from torch.func import functional_call, grad, vmap

    params = {local: p.detach() for local, p in module.named_parameters(recurse=False) if local in names}
    frozen = {local: p.detach() for local, p in module.named_parameters(recurse=False) if local not in names}
    buffers = {local: b for local, b in module.named_buffers(recurse=False)}

    def contribution(p, x, d):
        out = functional_call(module, {**p, **frozen, **buffers}, tuple(t.unsqueeze(0) for t in x))
        return (out * d.unsqueeze(0)).sum()

    per_example = vmap(grad(contribution), in_dims=(None, 0, 0))(params, tuple(inputs), delta)
    return _DenseFactors({names[local]: g for local, g in per_example.items()})


_EXACT: dict[type, Callable] = {
    nn.Linear: _linear_factors,
    nn.Conv1d: _conv_factors,
    nn.Conv2d: _conv_factors,
    nn.Embedding: _embedding_factors,
    nn.LayerNorm: _norm_factors,
    nn.GroupNorm: _norm_factors,
}


def _exact_rule(module: nn.Module) -> Callable | None:
    rule = _EXACT.get(type(module))
    if rule is _conv_factors and (module.groups != 1 or isinstance(module.padding, str)
                                  or module.padding_mode != "zeros"):
        return None
    if rule is _embedding_factors and (module.sparse or module.max_norm is not None or module.scale_grad_by_freq):
        return None
    return rule


def _add_parts(parts: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sum dicts of parameter-shaped pieces key by key (a parameter may come from several factors)."""
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, value in part.items():
            out[name] = out[name] + value if name in out else value
    return out


class GhostBatch:
    """Per-example gradient factors of one backward pass (one micro-batch).

    Answers the three questions gradient balancing asks, each at about the cost of one
    matrix product per layer; all results are float32 on the model's device.
    """

    def __init__(self, factors: list, names: list[str], batch_size: int,
                 shapes: dict[str, torch.Size] | None = None) -> None:
        self._factors, self.names, self.batch_size = factors, names, batch_size
        self.shapes = shapes or {}

    @property
    def dim(self) -> int:
        """Total number of selected parameter values ``d``."""
        return sum(math.prod(self.shapes[name]) for name in self.names)

    @property
    def device(self) -> torch.device:
        return self._device(self._factors[0])

    def select(self, rows: torch.Tensor | list[int]) -> "GhostBatch":
        """The factors of a subset of the batch's examples (e.g. one example, to materialise it)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        return GhostBatch([f.select(rows) for f in self._factors], self.names, len(rows), self.shapes)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat ``(..., d)`` tensor as parameter-shaped pieces, in ``names`` order."""
        sizes = [math.prod(self.shapes[name]) for name in self.names]
        pieces = torch.split(flat, sizes, dim=-1)
        return {name: piece.reshape(*flat.shape[:-1], *self.shapes[name]) for name, piece in zip(self.names, pieces)}

    def flatten(self, parts: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
        """Concatenate parameter-shaped ``parts`` (each ``(lead, *shape)``) into ``(lead, d)``."""
        return torch.cat([parts[name].reshape(lead, -1) for name in self.names], dim=1)

    def _weighted_parts(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        weights = weights.to(dtype=torch.float32)
        return _add_parts(f.weighted_sums(weights.to(self._device(f))) for f in self._factors)

    def weighted_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """``weights`` (N, B) -> (N, d): ``sum_j weights[v, j] * g_j`` for each row ``v``, flat."""
        return self.flatten(self._weighted_parts(weights), len(weights))

    def gram(self) -> torch.Tensor:
        """(B, B) Gram matrix ``<g_i, g_j>`` of the per-example gradients."""
        return sum(f.gram() for f in self._factors)

    def sq_norms(self) -> torch.Tensor:
        """(B,) squared norms ``||g_j||^2``: the Gram's diagonal, without the off-diagonal work."""
        return sum(f.sq_norms() for f in self._factors)

    def dots(self, vectors: Sequence[Vector]) -> torch.Tensor:
        """(len(vectors), B): ``<v, g_j>`` for each parameter-shaped vector ``v``."""
        return torch.stack([sum(f.dot(v) for f in self._factors) for v in vectors])

    def weighted_sum(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``sum_j weights[j] * g_j`` as a dict of parameter-shaped tensors."""
        return {name: value[0] for name, value in self._weighted_parts(weights[None]).items()}

    def materialize(self) -> torch.Tensor:
        """(B, d) per-example gradients in ``named_parameters()`` order (for tests and debugging)."""
        return self.flatten(_add_parts(f.materialize() for f in self._factors), self.batch_size)

    @staticmethod
    def _device(factor) -> torch.device:
        if isinstance(factor, _DenseFactors):
            return next(iter(factor.grads.values())).device
        return factor.d.device


class GhostGrads:
    """Capture per-example gradient factors of ``model`` during ordinary backward passes.

    Every forward of a module that owns trainable parameters records its input, and a hook
    on its output records the output gradient during ``loss.backward()``. :meth:`collect`
    turns the records into one :class:`GhostBatch` per forward of ``model`` that was
    followed by a backward (one per micro-batch under gradient accumulation), in order,
    and clears them.

    The loss is assumed mean-reduced over the batch: captured output gradients are
    multiplied by the batch size to give per-example gradients. Any other constant factor
    (e.g. ``1/accumulation_steps``) scales every per-example gradient alike.

    ``params`` selects parameters like :class:`~dataorder.grads.PerExampleGrads`: ``None``
    (all trainable), a list of names, or a predicate ``(name, param) -> bool``.

    Example::

        >>> model = nn.Linear(3, 2)
        >>> ghost = GhostGrads(model)
        >>> model(torch.randn(4, 3)).pow(2).mean().backward()
        >>> [batch] = ghost.collect(); batch.gram().shape
        torch.Size([4, 4])
        >>> ghost.remove()
    """

    def __init__(self, model: nn.Module, *, params=None) -> None:
        self.model = model
        selected = _select(model, params)
        if not selected:
            raise ValueError("params selects no trainable parameter of the model")
        self.names = [name for name, _ in model.named_parameters() if name in selected]
        self.shapes = {name: p.shape for name, p in model.named_parameters() if name in selected}
        self._forward_count = 0
        self._batch_sizes: dict[int, int | None] = {}  # forward -> batch size of the model's input
        self._records: list[_Record] = []
        self._warned: set[str] = set()
        self._handles = [model.register_forward_pre_hook(self._count_forward)]
        owners: dict[int, str] = {}
        for module_name, module in model.named_modules():
            names = {}
            for local, param in module.named_parameters(recurse=False):
                full = f"{module_name}.{local}" if module_name else local
                if id(param) in owners and param.requires_grad:
                    raise ValueError(f"parameter {full} is the same tensor as {owners[id(param)]}: ghost "
                                     "balancing does not support tied weights; use the materialised path")
                owners[id(param)] = full
                if full in selected:
                    names[local] = full
            if names:
                self._handles.append(module.register_forward_hook(self._make_hook(module_name, names)))

    def _count_forward(self, module, inputs) -> None:
        self._forward_count += 1
        first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        self._batch_sizes[self._forward_count] = None if first is None or first.dim() == 0 else first.shape[0]

    def _make_hook(self, module_name: str, names: dict[str, str]):
        def hook(module, inputs, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            if _inside_functorch(output):
                return  # a torch.func transform (e.g. PerExampleGrads) is running the model
            if _exact_rule(module) is None and module_name not in self._warned:
                self._warned.add(module_name)
                warnings.warn(f"ghost balancing has no exact rule for {type(module).__name__} "
                              f"('{module_name}'): using torch.func per-example gradients for this module only",
                              stacklevel=2)
            record = _Record(self._forward_count, module, names,
                             tuple(t.detach() for t in inputs if isinstance(t, torch.Tensor)), output)
            self._records.append(record)
            output.register_hook(record.add_grad)
        return hook

    def pending_outputs(self) -> list[torch.Tensor]:
        """Outputs of the recorded module calls still waiting for their gradient.

        ``torch.autograd.grad(loss, ghost.pending_outputs())`` fills the records without
        computing any parameter gradient (cheaper than a full backward when only the
        products are wanted, as for gradient norms).
        """
        return [record.output for record in self._records if record.grad is None]

    def collect(self) -> list[GhostBatch]:
        """One :class:`GhostBatch` per model forward followed by a backward; clears the records."""
        records, self._records = self._records, []
        sizes, self._batch_sizes = self._batch_sizes, {}
        groups: dict[int, list[_Record]] = {}
        for record in records:
            record.output = None
            if record.grad is not None:  # a forward with no backward (e.g. evaluation) is skipped
                groups.setdefault(record.forward, []).append(record)
        return [self._batch(group, sizes.get(forward)) for forward, group in sorted(groups.items())]

    def _batch(self, group: list[_Record], batch_size: int | None) -> GhostBatch:
        batch_size = batch_size or group[0].inputs[0].shape[0]
        by_module: dict[int, list] = {}
        for record in group:
            if record.inputs[0].dim() == 0 or record.inputs[0].shape[0] != batch_size:
                raise ValueError(
                    f"{type(record.module).__name__} got an input of shape {tuple(record.inputs[0].shape)} "
                    f"without the batch ({batch_size}) as dim 0, e.g. positions arange(T) shared by every "
                    "example: its per-example gradients cannot be separated. Expand the input to (B, ...), "
                    "or pass per-example gradients to step(grads)")
            delta = record.grad.float() * batch_size
            floats = tuple(t.float() if t.is_floating_point() else t for t in record.inputs)
            rule = _exact_rule(record.module) or _fallback_factors
            by_module.setdefault(id(record.module), []).append(rule(record.module, record.names, floats, delta))
        factors = [_merge_calls(calls) for calls in by_module.values()]
        covered = {name for record in group for name in record.names.values()}
        missing = [name for name in self.names if name not in covered]
        if missing:
            raise RuntimeError(f"no gradient was captured for {missing}: was every selected parameter used "
                               "in the forward pass?")
        return GhostBatch(factors, self.names, batch_size, self.shapes)

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._records = [], []


def _inside_functorch(tensor: torch.Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check and check(tensor))


class _Record:
    """One forward call of one module: its inputs and (after backward) its output gradient."""

    def __init__(self, forward: int, module: nn.Module, names: dict[str, str], inputs: tuple,
                 output: torch.Tensor) -> None:
        self.forward, self.module, self.names, self.inputs, self.output = forward, module, names, inputs, output
        self.grad: torch.Tensor | None = None

    def add_grad(self, grad: torch.Tensor) -> None:
        self.grad = grad.detach() if self.grad is None else self.grad + grad.detach()


def _merge_calls(calls: list):
    """Factors of a module called several times in one forward: its gradient is the sum."""
    if len(calls) == 1:
        return calls[0]
    first = calls[0]
    if isinstance(first, _LinearFactors):
        return _LinearFactors(first.weight, first.bias, torch.cat([c.a for c in calls], dim=1),
                              torch.cat([c.d for c in calls], dim=1), first.weight_shape)
    if isinstance(first, _EmbeddingFactors):
        return _EmbeddingFactors(first.weight, torch.cat([c.idx for c in calls], dim=1),
                                 torch.cat([c.d for c in calls], dim=1), first.num_embeddings)
    return _DenseFactors({name: sum(c.grads[name] for c in calls) for name in first.grads})


def _select(model: nn.Module, params) -> set[str]:
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return {name for name, _ in named}
    if callable(params):
        return {name for name, p in named if params(name, p)}
    wanted = set(params)
    unknown = wanted - {name for name, _ in named}
    if unknown:
        raise ValueError(f"params names unknown or frozen parameters {sorted(unknown)}")
    return wanted
