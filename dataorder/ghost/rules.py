"""Per-layer ghost rules: one captured module call -> the factors of its per-example gradients.

A rule is called as ``rule(module, names, inputs, grad_output)`` where ``names`` maps the
module's own parameter names (``"weight"``, ``"bias"``) to the selected parameters' full
names, ``inputs`` are the module's positional tensor inputs (floating ones as float32) and
``grad_output`` the gradient of the loss with respect to its output (float32, the batch on
dim 0, *unscaled*: the ghost path multiplies by the batch size afterwards). It returns one
factor object of :mod:`dataorder.ghost.factors` or a list of them, together covering every
name in ``names``. The simplest is :class:`~dataorder.ghost.factors.DenseFactors` of the
per-example gradients ``{full name: (B, *shape)}``; layers that are linear in their weight
return :class:`~dataorder.ghost.factors.LinearFactors` (``out = a W^T``) and get the
factored forms and the sketch for free.

Modules with no rule fall back to ``torch.func`` per-example gradients for that module
only. :func:`register_ghost_rule` adds or replaces a rule; transformers' ``Conv1D`` gets one
on first use when ``transformers`` has been imported (this module never imports it).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from dataorder.ghost import GhostGrads
    >>> from dataorder.ghost.factors import DenseFactors
    >>> class Scale(nn.Module):                       # out = x * weight, elementwise
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.ones(n))
    ...     def forward(self, x):
    ...         return x * self.weight
    >>> def scale_rule(module, names, inputs, grad_output):
    ...     return DenseFactors({names["weight"]: inputs[0] * grad_output})
    >>> _ = register_ghost_rule(Scale, scale_rule)
    >>> model = nn.Sequential(nn.Linear(3, 3), Scale(3))
    >>> ghost = GhostGrads(model)                      # no fallback warning for Scale
    >>> model(torch.randn(4, 3)).square().mean().backward()
    >>> [batch] = ghost.collect(); batch.gram().shape
    torch.Size([4, 4])
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from dataorder.ghost.factors import ConvFactors, DenseFactors, EmbeddingFactors, LinearFactors

__all__ = ["GhostRule", "check_rule_output", "register_ghost_rule", "rule_for", "saved_statistics"]

GhostRule = Callable[..., object]  # (module, names, inputs, grad_output) -> factors or a list of factors


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., F) -> (B, T, F) with T the product of the middle dims (1 for 2-D input)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def linear_rule(module: nn.Linear, names: dict[str, str], inputs, delta) -> LinearFactors:
    return LinearFactors(names.get("weight"), names.get("bias"), _as_rows(inputs[0]), _as_rows(delta),
                         module.weight.shape)


def conv_rule(module: nn.Module, names: dict[str, str], inputs, delta) -> ConvFactors:
    x = inputs[0]
    if isinstance(module, nn.Conv1d):  # treat as a 1×k 2-D convolution
        x, delta = x.unsqueeze(2), delta.unsqueeze(2)
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        padding, stride = (0, *module.padding), (1, *module.stride)
    else:
        kernel, dilation, padding, stride = module.kernel_size, module.dilation, module.padding, module.stride
    return ConvFactors(names.get("weight"), names.get("bias"), x, delta, module.weight.shape,
                       (kernel, dilation, padding, stride))


def embedding_rule(module: nn.Embedding, names, inputs, delta) -> EmbeddingFactors:
    idx = inputs[0].reshape(inputs[0].shape[0], -1)
    d = delta.reshape(idx.shape[0], idx.shape[1], -1)
    if module.padding_idx is not None:
        d = d * (idx != module.padding_idx).unsqueeze(-1).to(d.dtype)
    return EmbeddingFactors(names["weight"], idx, d, module.num_embeddings)


def norm_rule(module: nn.Module, names, inputs, delta) -> DenseFactors:
    """LayerNorm and GroupNorm affine parameters: ``g_γ = Σ x̂ δ``, ``g_β = Σ δ`` per example.

    ``inputs`` may carry the forward's saved ``(mean, rstd)`` after the input
    (:func:`saved_statistics`); otherwise they are recomputed.
    """
    x = inputs[0]
    if isinstance(module, nn.GroupNorm):
        return _group_norm_factors(module, names, x, delta, inputs[1:])
    if len(inputs) == 3:  # x̂ from the forward's statistics: ~2.5x cheaper than normalising again
        mean, rstd = (t.to(x.dtype) for t in inputs[1:])
        normalized = (x - mean) * rstd
    else:
        normalized = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    reduce_dims = tuple(range(1, x.dim() - len(module.normalized_shape)))
    grads = {}
    if "weight" in names:
        grads[names["weight"]] = (normalized * delta).sum(dim=reduce_dims) if reduce_dims else normalized * delta
    if "bias" in names:
        grads[names["bias"]] = delta.sum(dim=reduce_dims) if reduce_dims else delta
    return DenseFactors(grads)


def _group_norm_factors(module: nn.GroupNorm, names, x, delta, statistics) -> DenseFactors:
    """Per-example GroupNorm affine gradients in one fused pass, from the forward's statistics.

    A GroupNorm of ``B`` examples, ``C`` channels and ``G`` groups is, value for value, a
    GroupNorm of one example with ``B·C`` channels and ``B·G`` groups, whose affine gradients
    are the per-example ones: so torch's own backward kernel computes them, reading the input
    and the output gradient once, without forming the normalised input.
    """
    batch, channels, groups = x.shape[0], x.shape[1], module.num_groups
    positions = x[0, 0].numel()
    if len(statistics) == 2:
        mean, rstd = (t.to(x.dtype) for t in statistics)
    else:
        _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, batch, channels, positions, groups,
                                                         module.eps)
    wanted = ["weight" in names, "bias" in names]
    _, weight_grads, bias_grads = torch.ops.aten.native_group_norm_backward(
        delta.reshape(1, batch * channels, positions), x.reshape(1, batch * channels, positions),
        mean.reshape(1, batch * groups), rstd.reshape(1, batch * groups), x.new_ones(batch * channels),
        1, batch * channels, positions, batch * groups, [False, *wanted])
    grads = {}
    if wanted[0]:
        grads[names["weight"]] = weight_grads.reshape(batch, channels)
    if wanted[1]:
        grads[names["bias"]] = bias_grads.reshape(batch, channels)
    return DenseFactors(grads)


def saved_statistics(module: nn.Module, output: torch.Tensor) -> tuple:
    """What the forward of ``module`` saved that its rule can reuse: a norm's ``(mean, rstd)``, else ``()``.

    Read from the output's autograd node at the forward hook (tiny tensors), so the rule
    never recomputes the normalisation (a GroupNorm's or a LayerNorm's).

    >>> gn, ln = nn.GroupNorm(2, 4), nn.LayerNorm(5)
    >>> [t.shape for t in saved_statistics(gn, gn(torch.randn(3, 4, 5)))]
    [torch.Size([3, 2]), torch.Size([3, 2])]
    >>> [t.shape for t in saved_statistics(ln, ln(torch.randn(3, 4, 5)))]
    [torch.Size([3, 4, 1]), torch.Size([3, 4, 1])]
    """
    if not isinstance(module, (nn.GroupNorm, nn.LayerNorm)) or rule_for(module) is not norm_rule:
        return ()
    node = output.grad_fn
    if type(node).__name__ not in ("NativeGroupNormBackward0", "NativeLayerNormBackward0"):
        return ()
    return (node._saved_result1.detach(), node._saved_result2.detach())


def hf_conv1d_rule(module: nn.Module, names: dict[str, str], inputs, delta) -> list:
    """transformers' ``Conv1D``: ``out = x @ W + b`` with ``W`` of shape ``(in, out)``, a transposed Linear.

    ``g_W = a^T δ`` is a :class:`LinearFactors` with the roles of input and output gradient
    swapped (its rows are the layer's inputs), so the flat layout is the parameter's own.
    """
    a, d = _as_rows(inputs[0]), _as_rows(delta)
    factors = []
    if "weight" in names:
        factors.append(LinearFactors(names["weight"], None, d, a, module.weight.shape))
    if "bias" in names:
        factors.append(DenseFactors({names["bias"]: d.sum(dim=1)}))
    return factors


def fallback_rule(module: nn.Module, names: dict[str, str], inputs, delta) -> DenseFactors:
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


def _conv_applies(module: nn.Module) -> bool:
    return module.groups == 1 and not isinstance(module.padding, str) and module.padding_mode == "zeros"


def _embedding_applies(module: nn.Embedding) -> bool:
    """Dense gradients, unscaled by frequency. ``max_norm`` renormalises the weight in place under
    ``no_grad`` before a plain lookup, so its gradient is the plain lookup's."""
    return not (module.sparse or module.scale_grad_by_freq)


# module type -> (rule, predicate saying whether the rule covers this instance's configuration)
_RULES: dict[type, tuple[GhostRule, Callable[[nn.Module], bool] | None]] = {
    nn.Linear: (linear_rule, None),
    nn.Conv1d: (conv_rule, _conv_applies),
    nn.Conv2d: (conv_rule, _conv_applies),
    nn.Embedding: (embedding_rule, _embedding_applies),
    nn.LayerNorm: (norm_rule, None),
    nn.GroupNorm: (norm_rule, None),
}
_TRANSFORMERS_REGISTERED = False
#: The rules this package ships (trusted: their output is not checked at every step).
_BUILT_IN = frozenset({*(rule for rule, _ in _RULES.values()), fallback_rule, hf_conv1d_rule})


def register_ghost_rule(module_type: type, rule: GhostRule, *,
                        applies: Callable[[nn.Module], bool] | None = None) -> GhostRule:
    """Give ``module_type`` (exactly that class, not its subclasses) an exact ghost rule.

    ``rule(module, names, inputs, grad_output)`` returns the factors of the module's
    per-example gradients (see :mod:`dataorder.ghost.rules`); ``applies(module)``, if given,
    says which instances it covers (the others fall back to ``torch.func``). Replaces any
    earlier rule for the type; returns ``rule``. Hooks already registered pick the new rule
    up at the next :meth:`~dataorder.ghost.GhostGrads.collect`.

    >>> from torch import nn
    >>> from dataorder.ghost.rules import linear_rule
    >>> class MyLinear(nn.Linear):
    ...     pass
    >>> register_ghost_rule(MyLinear, linear_rule) is linear_rule
    True
    >>> rule_for(MyLinear(2, 3)) is linear_rule
    True
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a torch.nn.Module subclass, got {module_type!r}")
    if not callable(rule):
        raise TypeError(f"rule must be callable as rule(module, names, inputs, grad_output), got {rule!r}")
    if applies is not None and not callable(applies):
        raise TypeError(f"applies must be None or a predicate module -> bool, got {applies!r}")
    _RULES[module_type] = (rule, applies)
    return rule


def rule_for(module: nn.Module) -> GhostRule | None:
    """The exact rule for ``module``, or None (the ``torch.func`` fallback applies).

    >>> rule_for(nn.Linear(2, 2)) is linear_rule, rule_for(nn.Conv2d(2, 2, 3, groups=2))
    (True, None)
    """
    if type(module) not in _RULES:
        _register_transformers()
    rule, applies = _RULES.get(type(module), (None, None))
    if rule is None or (applies is not None and not applies(module)):
        return None
    return rule


def check_rule_output(rule: GhostRule, where: str, names: dict[str, str], made: object, batch: int,
                      shapes: dict[str, torch.Size]) -> list:
    """A registered rule's output as a list of factor objects covering each of ``names`` once, or a clear error.

    Built-in rules are trusted; a user's rule is checked where it runs, so a wrong block does
    not reach the balance (as silently wrong products) or fail later in an unrelated product.
    ``where`` names the module, e.g. ``"Scale '1'"``.

    >>> check_rule_output(print, "Scale '1'", {"weight": "1.weight"}, DenseFactors({"1.weight": torch.ones(4, 2)}),
    ...                   4, {"1.weight": torch.Size([3])})
    Traceback (most recent call last):
    ...
    ValueError: the ghost rule print for Scale '1' returned a (4, 2) block for '1.weight': a DenseFactors block is (B, *param.shape) = (4, 3)
    """
    factors = list(made) if isinstance(made, (list, tuple)) else [made]
    if rule in _BUILT_IN:
        return factors
    label = f"the ghost rule {getattr(rule, '__qualname__', repr(rule))} for {where}"
    covered: list[str] = []
    for factor in factors:
        if isinstance(factor, DenseFactors):
            for name, block in factor.grads.items():
                want = (batch, *shapes.get(name, ()))
                if not isinstance(block, torch.Tensor) or not block.is_floating_point():
                    raise TypeError(f"{label} returned a {type(block).__name__} for {name!r}: a DenseFactors block "
                                    "is a floating-point tensor (B, *param.shape)")
                if name in shapes and tuple(block.shape) != want:
                    raise ValueError(f"{label} returned a {tuple(block.shape)} block for {name!r}: a DenseFactors "
                                     f"block is (B, *param.shape) = {want}")
                covered.append(name)
        elif isinstance(factor, (LinearFactors, EmbeddingFactors)):
            if factor.d.shape[0] != batch:
                raise ValueError(f"{label} returned factors of {factor.d.shape[0]} examples for a batch of {batch}")
            covered += [name for name in (factor.weight, getattr(factor, "bias", None)) if name is not None]
        else:
            raise TypeError(f"{label} returned a {type(factor).__name__}: a rule returns DenseFactors, LinearFactors "
                            "or EmbeddingFactors (or a list of them) from dataorder.ghost.factors")
    wanted = sorted(names.values())
    if sorted(covered) != wanted:
        twice = sorted({name for name in covered if covered.count(name) > 1})
        raise ValueError(f"{label} covered {sorted(covered)} but must cover each of {wanted} once"
                         + (f" ({twice} more than once)" if twice else ""))
    return factors


def _register_transformers() -> None:
    """Register ``transformers.pytorch_utils.Conv1D`` once, if the user's code has imported it."""
    global _TRANSFORMERS_REGISTERED
    if _TRANSFORMERS_REGISTERED:
        return
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    if conv1d is not None:
        _TRANSFORMERS_REGISTERED = True
        _RULES.setdefault(conv1d, (hf_conv1d_rule, None))
