"""Per-example gradient norms for GraNd, without materialising per-example gradients when possible.

For a linear layer ``out_i = W a_i + b`` the gradient of example ``i``'s loss is
``g_W = δ_i a_iᵀ`` and ``g_b = δ_i`` (``δ_i = ∂ℓ_i/∂out_i``), so
``‖g_W‖² = ‖a_i‖² ‖δ_i‖²`` and ``‖g_b‖² = ‖δ_i‖²`` — the "ghost norm" identity of DP
training (Goodfellow 2015; Li et al. 2021). A convolution is a linear layer over the ``T``
patches of its input, ``g_W = Σ_t δ_t a_tᵀ``; its norm is taken from whichever is cheaper,
the per-example gradients (one convolution grouped by example, Rochette et al. 2019) or
the ghost form ``Σ_{t,t'} (a_t·a_t')(δ_t·δ_t')``.

When every selected parameter belongs to an ``nn.Linear`` (applied to ``(B, features)``)
or an ``nn.Conv1d``/``nn.Conv2d`` (``groups=1``, zero padding given as numbers), each used
once per forward, :func:`grad_norms` costs one forward and one backward of the batch plus
these small products. Otherwise (other layers, shared layers, sequence inputs) it falls
back to :class:`dataorder.grads.PerExampleGrads` (``torch.func``), which materialises
``(B, d)`` gradients. Both paths are exact and leave every ``.grad`` untouched.

The model must treat examples independently (BatchNorm in eval mode), as for any
per-example gradient.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> norms, logits = grad_norms(model, x, y)
    >>> norms.shape, logits.shape
    (torch.Size([5]), torch.Size([5, 3]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ghost_layers", "grad_norms"]


def _ghost_rule(module: nn.Module) -> bool:
    """Whether the ghost identity covers ``module`` exactly (exact types: subclasses may change forward)."""
    if type(module) is nn.Linear:
        return True
    if type(module) in (nn.Conv1d, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return False


def ghost_layers(model: nn.Module, names: Sequence[str] | None) -> list[tuple[str, nn.Module]] | None:
    """The layers owning the selected trainable parameters, or None if one is not covered by the ghost identity.

    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2), nn.LayerNorm(2))
    >>> [name for name, _ in ghost_layers(model, ["0.weight", "2.bias"])], ghost_layers(model, None)
    (['0', '2'], None)
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    wanted = trainable if names is None else set(names) & trainable
    owners = []
    for prefix, module in model.named_modules():
        own = {f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters(recurse=False)}
        if own & wanted:
            if not _ghost_rule(module):
                return None
            owners.append((prefix, module))
    return owners


def grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               params: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖∇ loss_i‖₂ over the selected parameters, logits)`` for a batch, cross-entropy loss.

    ``params`` lists parameter names (None: every trainable parameter). The model is used as
    it is (call ``model.eval()`` first for scoring).
    """
    owners = ghost_layers(model, params)
    if owners:
        result = _ghost_norms(model, owners, params, x, y)
        if result is not None:
            return result
    from dataorder.grads import PerExampleGrads
    from dataorder.scores.functional import grand

    saved = [(p, p.grad) for p in model.parameters()]
    try:
        for p, _ in saved:  # PerExampleGrads adds the batch mean into .grad in place
            p.grad = None
        out = PerExampleGrads(model, F.cross_entropy, params=None if params is None else list(params))(x, y)
        return grand(out), out.outputs
    finally:
        for p, grad in saved:
            p.grad = grad


def _ghost_norms(model: nn.Module, owners: list[tuple[str, nn.Module]], params: Sequence[str] | None,
                 x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Norms from the ghost identity, or None when a layer sees an unexpected input shape or runs twice."""
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {prefix: [] for prefix, _ in owners}

    def recorder(prefix: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            calls[prefix].append((inputs[0].detach(), output))
        return hook

    handles = [module.register_forward_hook(recorder(prefix)) for prefix, module in owners]
    try:
        with torch.enable_grad():
            logits = model(x)
            expected = {prefix: 2 if type(module) is nn.Linear else module.weight.ndim for prefix, module in owners}
            if any(len(seen) != 1 or seen[0][0].ndim != expected[prefix] for prefix, seen in calls.items()):
                return None
            outputs = [calls[prefix][0][1] for prefix, _ in owners]
            loss = F.cross_entropy(logits, y, reduction="sum")  # per-example δ_i, no 1/B factor
            deltas = torch.autograd.grad(loss, outputs, allow_unused=True)  # touches no .grad
    finally:
        for handle in handles:
            handle.remove()
    selected = None if params is None else set(params)
    squared = torch.zeros(len(y), dtype=torch.float64, device=logits.device)
    for (prefix, module), delta in zip(owners, deltas):
        if delta is None:
            continue
        name = f"{prefix}." if prefix else ""
        weight = module.weight.requires_grad and (selected is None or name + "weight" in selected)
        bias = module.bias is not None and module.bias.requires_grad and (selected is None or name + "bias" in selected)
        inputs = calls[prefix][0][0]
        if type(module) is nn.Linear:
            squared += _linear_sq_norms(inputs, delta, weight, bias).double()
        else:
            squared += _conv_sq_norms(module, inputs, delta, weight, bias).double()
    return squared.sqrt().to(logits.dtype), logits.detach()


def _linear_sq_norms(a: torch.Tensor, delta: torch.Tensor, weight: bool, bias: bool) -> torch.Tensor:
    """Squared per-example gradient norms of a linear layer: a (B, I), delta (B, O)."""
    delta_sq = delta.square().sum(dim=1)
    return (a.square().sum(dim=1) * delta_sq if weight else 0.0) + (delta_sq if bias else 0.0)


def _conv_sq_norms(module: nn.Module, a: torch.Tensor, delta: torch.Tensor, weight: bool,
                   bias: bool) -> torch.Tensor:
    """Squared per-example gradient norms of a convolution: a (B, C, *in), delta (B, O, *out)."""
    batch, out_channels = delta.shape[:2]
    d = delta.reshape(batch, out_channels, -1)  # (B, O, T)
    total = d.sum(dim=2).square().sum(dim=1) if bias else torch.zeros(batch, dtype=d.dtype, device=d.device)
    if not weight:
        return total
    steps, width = d.shape[2], module.weight[0].numel()  # T patches of I·k values
    if steps * steps * (width + out_channels) < steps * width * out_channels:
        patches = _patches(module, a)  # (B, I·k, T): the ghost form, for few patches
        return total + ((patches.transpose(1, 2) @ patches) * (d.transpose(1, 2) @ d)).sum(dim=(1, 2))
    # every example's (O, I, k...) gradient at once: the weight gradient of a convolution grouped by example
    weight_grad = torch.nn.grad.conv2d_weight if type(module) is nn.Conv2d else torch.nn.grad.conv1d_weight
    per_example = weight_grad(a.reshape(1, -1, *a.shape[2:]), (batch * out_channels, *module.weight.shape[1:]),
                              delta.reshape(1, -1, *delta.shape[2:]), stride=module.stride, padding=module.padding,
                              dilation=module.dilation, groups=batch)
    return total + per_example.reshape(batch, -1).square().sum(dim=1)


def _patches(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    if type(module) is nn.Conv1d:  # as a 2-D convolution of height 1
        return F.unfold(a.unsqueeze(2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                        padding=(0, module.padding[0]), stride=(1, module.stride[0]))
    return F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
