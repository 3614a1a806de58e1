"""Per-example gradient norms for GraNd, without materialising per-example gradients.

The norms are the diagonal of the per-example Gram matrix that
:class:`dataorder.ghost.GhostGrads` computes from each layer's inputs and output gradients
(the "ghost norm" identity of DP training: for a linear layer ``‖g_W‖² = ‖a_i‖² ‖δ_i‖²``;
for sequences, convolutions and embeddings the cheaper of the ghost and the per-example
form). Layers with no exact rule use ``torch.func`` for that layer only; parameters tied
across layers get the exact sum of their uses. Every path is exact and leaves every
``.grad`` untouched.

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

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dataorder.ghost import GhostBatch, GhostGrads

__all__ = ["ghost_batch", "grad_norms"]


def ghost_batch(model: nn.Module, x: torch.Tensor, batch_loss: Callable[[torch.Tensor], torch.Tensor],
                params: Sequence[str] | None = None) -> tuple[GhostBatch, torch.Tensor]:
    """``(GhostBatch of the per-example gradients of batch_loss(model(x)), detached outputs)``.

    ``batch_loss`` maps the model's outputs to the **mean over the batch** of per-example
    losses (as :class:`~dataorder.ghost.GhostGrads` assumes); ``params`` lists parameter
    names (None: every trainable one). Only the gradients of the layers' outputs are
    computed: no parameter's ``.grad`` is touched. The model is used as it is (call
    ``model.eval()`` first for scoring).

    >>> model = nn.Linear(3, 2)
    >>> batch, out = ghost_batch(model, torch.randn(4, 3), lambda out: out.square().sum(1).mean())
    >>> batch.sq_norms().shape, out.requires_grad
    (torch.Size([4]), False)
    """
    ghost = GhostGrads(model, params=None if params is None else list(params), keep_outputs=True)
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the torch.func fallback of a layer is exact, only slower
            outputs = model(x)
            # gradients w.r.t. the layers' outputs only: fills the records, computes and touches no .grad
            torch.autograd.grad(batch_loss(outputs), ghost.pending_outputs(), allow_unused=True)
            [batch] = ghost.collect()
    finally:
        ghost.remove()
    return batch, outputs.detach()


def grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               params: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖∇ loss_i‖₂ over the selected parameters, logits)`` for a batch, cross-entropy loss.

    ``params`` lists parameter names (None: every trainable parameter). The model is used as
    it is (call ``model.eval()`` first for scoring).
    """
    batch, logits = ghost_batch(model, x, lambda logits: F.cross_entropy(logits, y), params)
    return batch.sq_norms().clamp_min(0).sqrt().to(logits.dtype), logits
