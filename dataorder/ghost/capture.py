"""GhostGrads: capture each layer's input and output gradient during an ordinary backward."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from dataorder.ghost.batch import GhostBatch
from dataorder.ghost.factors import ConvFactors, DenseFactors, EmbeddingFactors, LinearFactors

__all__ = ["GhostGrads"]


# -- turning one captured call into factors ----------------------------------------------------
def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., F) -> (B, T, F) with T the product of the middle dims (1 for 2-D input)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _linear_factors(module: nn.Linear, names: dict[str, str], inputs, delta) -> LinearFactors:
    return LinearFactors(names.get("weight"), names.get("bias"), _as_rows(inputs[0]), _as_rows(delta),
                         module.weight.shape)


def _conv_factors(module: nn.Module, names: dict[str, str], inputs, delta) -> ConvFactors:
    x = inputs[0]
    if isinstance(module, nn.Conv1d):  # treat as a 1×k 2-D convolution
        x, delta = x.unsqueeze(2), delta.unsqueeze(2)
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        padding, stride = (0, *module.padding), (1, *module.stride)
    else:
        kernel, dilation, padding, stride = module.kernel_size, module.dilation, module.padding, module.stride
    return ConvFactors(names.get("weight"), names.get("bias"), x, delta, module.weight.shape,
                       (kernel, dilation, padding, stride))


def _embedding_factors(module: nn.Embedding, names, inputs, delta) -> EmbeddingFactors:
    idx = inputs[0].reshape(inputs[0].shape[0], -1)
    d = delta.reshape(idx.shape[0], idx.shape[1], -1)
    if module.padding_idx is not None:
        d = d * (idx != module.padding_idx).unsqueeze(-1).to(d.dtype)
    return EmbeddingFactors(names["weight"], idx, d, module.num_embeddings)


def _norm_factors(module: nn.Module, names, inputs, delta) -> DenseFactors:
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
    return DenseFactors(grads)


def _fallback_factors(module: nn.Module, names: dict[str, str], inputs, delta) -> DenseFactors:
    """Per-example gradients of this module's own parameters by torch.func (vmap over grad)."""
    from torch.func import functional_call, grad, vmap

    params = {local: p.detach() for local, p in module.named_parameters(recurse=False) if local in names}
    frozen = {local: p.detach() for local, p in module.named_parameters(recurse=False) if local not in names}
    buffers = {local: b for local, b in module.named_buffers(recurse=False)}

    def contribution(p, x, d):
        out = functional_call(module, {**p, **frozen, **buffers}, tuple(t.unsqueeze(0) for t in x))
        return (out * d.unsqueeze(0)).sum()

    per_example = vmap(grad(contribution), in_dims=(None, 0, 0))(params, tuple(inputs), delta)
    return DenseFactors({names[local]: g for local, g in per_example.items()})


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
            delta = record.grad.float()  # per-example scale (batch_size) is applied by GhostBatch
            floats = tuple(t.float() if t.is_floating_point() else t for t in record.inputs)
            rule = _exact_rule(record.module) or _fallback_factors
            by_module.setdefault(id(record.module), []).append(rule(record.module, record.names, floats, delta))
        factors = [_merge_calls(calls) for calls in by_module.values()]
        covered = {name for record in group for name in record.names.values()}
        missing = [name for name in self.names if name not in covered]
        if missing:
            raise RuntimeError(f"no gradient was captured for {missing}: was every selected parameter used "
                               "in the forward pass?")
        return GhostBatch(factors, self.names, batch_size, self.shapes, scale=batch_size)

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
    if isinstance(first, LinearFactors):  # convolutions too: their patches are rows like any others
        return LinearFactors(first.weight, first.bias, torch.cat([c.a for c in calls], dim=1),
                             torch.cat([c.d for c in calls], dim=1), first.weight_shape)
    if isinstance(first, EmbeddingFactors):
        return EmbeddingFactors(first.weight, torch.cat([c.idx for c in calls], dim=1),
                                torch.cat([c.d for c in calls], dim=1), first.num_embeddings)
    return DenseFactors({name: sum(c.grads[name] for c in calls) for name in first.grads})


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
