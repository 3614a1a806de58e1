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
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dataorder.ghost import GhostGrads

__all__ = ["grad_norms"]


def grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               params: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖∇ loss_i‖₂ over the selected parameters, logits)`` for a batch, cross-entropy loss.

    ``params`` lists parameter names (None: every trainable parameter). The model is used as
    it is (call ``model.eval()`` first for scoring).
    """
    ghost = GhostGrads(model, params=None if params is None else list(params))
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the torch.func fallback of a layer is exact, only slower
            logits = model(x)
            # gradients w.r.t. the layers' outputs only: fills the records, computes and touches no .grad
            torch.autograd.grad(F.cross_entropy(logits, y), ghost.pending_outputs(), allow_unused=True)
            [batch] = ghost.collect()
            norms = batch.sq_norms()
    finally:
        ghost.remove()
    return norms.clamp_min(0).sqrt().to(logits.dtype), logits.detach()

