"""The ghost tests' reference: per-example gradients by torch.func (vmap over grad), flat."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      loss_fn=nn.functional.cross_entropy, output=lambda out: out) -> torch.Tensor:
    """(B, d) per-example gradients of the trainable parameters, in ``named_parameters`` order.

    ``output`` picks the tensor ``loss_fn`` takes from the model's return value (e.g. an HF
    model's ``.logits``). Tied parameters appear once, as in ``named_parameters``.
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def one(p, xi, yi):
        return loss_fn(output(functional_call(model, {**p, **buffers}, (xi[None],), tie_weights=True)), yi[None])

    grads = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    return torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1)
