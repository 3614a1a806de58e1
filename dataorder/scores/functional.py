"""Per-batch difficulty scores: pure functions returning one value per example.

``loss``, ``confidence``, ``margin``, ``el2n`` and ``entropy`` take ``logits`` of shape
``(B, K)`` and integer ``targets`` of shape ``(B,)``; ``grand`` takes per-example gradients.
Each returns a detached float tensor of shape ``(B,)``: float64 for float64 inputs, float32
otherwise (half-precision inputs are computed in float32, where their scores do not degenerate).

Sign conventions (the same table is in ``docs/scores.md``):

==========  ==================  ============================================================
score       higher means        range / note
==========  ==================  ============================================================
loss        harder              ``[0, inf)``; cross-entropy of the true class
confidence  easier              ``[0, 1]``; softmax probability of the true class
margin      easier              true-class logit minus the largest other logit; < 0: misclassified
el2n        harder              ``[0, sqrt(2)]``; ``||softmax - onehot||_2`` (Paul et al. 2021)
entropy     harder (uncertain)  ``[0, log K]``; entropy of the softmax, ignores the label
grand       harder              ``[0, inf)``; ``||per-example gradient||_2`` (Paul et al. 2021)
==========  ==================  ============================================================

Example::

    >>> import torch
    >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
    >>> targets = torch.tensor([0, 0])
    >>> el2n(logits, targets) < el2n(logits, targets).flip(0)   # example 0 is the easy one
    tensor([ True, False])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from dataorder.grads import ParamSelection, per_example_rows, select_names

__all__ = ["confidence", "el2n", "entropy", "grand", "loss", "margin"]


def _check(logits: Any, targets: Any, *, min_classes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and return ``(logits, targets)`` as a float (B, K) and an int64 (B,) tensor.

    Half-precision logits (float16, bfloat16) are upcast to float32, so every score is
    computed and returned in float32 for them (float32 and float64 keep their dtype): in
    bfloat16 the loss of an easy example rounds to exactly 0 and its EL2N collapses.
    """
    logits = torch.as_tensor(logits)
    targets = torch.as_tensor(targets, device=logits.device)
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor of shape (batch, classes), got {tuple(logits.shape)} "
                         f"{logits.dtype}")
    if logits.shape[1] < min_classes:
        raise ValueError(f"logits need at least {min_classes} classes, got shape {tuple(logits.shape)}")
    if targets.ndim != 1 or targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of shape (batch,), got {tuple(targets.shape)} "
                         f"{targets.dtype}")
    if len(targets) != len(logits):
        raise ValueError(f"targets has {len(targets)} entries but logits has {len(logits)} rows; pass one "
                         "target per row")
    if len(targets) and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError(f"targets must be class ids in [0, {logits.shape[1]}), got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    logits = logits.detach()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits, targets.long()


@torch.no_grad()
def loss(logits: Any, targets: Any) -> torch.Tensor:
    """Cross-entropy of each example (higher = harder).

    >>> import math, torch
    >>> value = loss(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))
    >>> math.isclose(value.item(), math.log(2), rel_tol=1e-6)
    True
    """
    logits, targets = _check(logits, targets)
    return F.cross_entropy(logits, targets, reduction="none")


@torch.no_grad()
def confidence(logits: Any, targets: Any) -> torch.Tensor:
    """Softmax probability of the true class (higher = easier).

    >>> import torch
    >>> confidence(torch.tensor([[0.0, 0.0], [0.0, 100.0]]), torch.tensor([0, 1]))
    tensor([0.5000, 1.0000])
    """
    logits, targets = _check(logits, targets)
    return logits.softmax(dim=1).gather(1, targets[:, None]).squeeze(1)


@torch.no_grad()
def margin(logits: Any, targets: Any) -> torch.Tensor:
    """True-class logit minus the largest other logit (higher = easier; negative = misclassified).

    This is the per-update quantity that AUM (Pleiss et al. 2020) averages over training.

    >>> import torch
    >>> margin(torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([0]))
    tensor([1.])
    """
    logits, targets = _check(logits, targets, min_classes=2)
    true = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return true - others.max(dim=1).values


@torch.no_grad()
def el2n(logits: Any, targets: Any) -> torch.Tensor:
    """Error L2-norm ``||softmax(logits) - onehot(target)||_2`` (higher = harder).

    Paul, Ganguli and Dziugaite (2021) score examples early in training with it and
    average over a few initialisations.

    >>> import torch
    >>> el2n(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))   # ||(0.5, 0.5) - (1, 0)|| = sqrt(0.5)
    tensor([0.7071])
    """
    logits, targets = _check(logits, targets)
    error = logits.softmax(dim=1)
    error[torch.arange(len(targets), device=error.device), targets] -= 1.0
    return torch.linalg.vector_norm(error, dim=1)


@torch.no_grad()
def entropy(logits: Any, targets: Any = None) -> torch.Tensor:
    """Entropy (nats) of the predicted distribution (higher = more uncertain); ``targets`` is unused.

    >>> import math, torch
    >>> math.isclose(entropy(torch.zeros(1, 4)).item(), math.log(4), rel_tol=1e-6)
    True
    """
    if targets is None:
        targets = torch.zeros(len(torch.as_tensor(logits)), dtype=torch.long)
    logits, _ = _check(logits, targets)
    p = logits.softmax(dim=1)
    return -torch.special.xlogy(p, p).sum(dim=1)  # xlogy: 0·log 0 = 0 for classes at -inf


@torch.no_grad()
def grand(grads: Any, *, params: ParamSelection = None) -> torch.Tensor:
    """Gradient norm ``||grad of the example's loss||_2`` for each example (higher = harder).

    ``grads`` is one of

    * a ``(B, d)`` tensor of flattened per-example gradients (``PerExampleGrads(...).grads``);
    * a dict ``name -> (B, *param.shape)`` tensor, as ``torch.func.vmap(grad(...))`` returns;
    * the object returned by calling ``PerExampleGrads``, read through its ``.grads``.

    ``params`` restricts a dict to a parameter subset, e.g. the last layer, in the forms
    :class:`~dataorder.grads.PerExampleGrads` takes: ``None`` (every entry), a list of entry
    names (an unknown name is a ``ValueError``), or a predicate ``(name, grad) -> bool``
    called with each entry's name and per-example gradient. For a flat tensor, select the
    subset when computing the gradients (``PerExampleGrads(model, loss_fn, params=...)``).

    The norms are computed and returned in float32 (float64 if any selected gradient is
    float64), whatever the order of a dict's entries, so half-precision gradients do not
    overflow. An empty batch gives an empty tensor, as the other scores do.

    >>> import torch
    >>> grand(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    tensor([5., 1.])
    >>> grand({"w": torch.ones(2, 3, 3), "b": torch.ones(2, 3)}, params=["b"])
    tensor([1.7321, 1.7321])
    """
    if not isinstance(grads, (torch.Tensor, Mapping)) and hasattr(grads, "grads"):
        grads = grads.grads
    if isinstance(grads, Mapping):
        chosen = [grads[name] for name in select_names(grads, params)]
        if not chosen:
            raise ValueError(f"params selects none of the gradient entries {sorted(grads)}; select at least one")
    elif isinstance(grads, torch.Tensor):
        if params is not None:
            raise TypeError("params selects entries of a dict of gradients; for a flat (B, d) tensor, restrict the "
                            "parameters when computing it: PerExampleGrads(model, loss_fn, params=...)")
        chosen = [grads]
    else:
        raise TypeError(f"grads must be a (B, d) tensor, a dict of per-example gradients or a PerExampleGrads "
                        f"result, got {type(grads).__name__}")
    for g in chosen:
        if not isinstance(g, torch.Tensor) or g.ndim < 1 or not g.is_floating_point():
            got = f"{g.dtype} of shape {tuple(g.shape)}" if isinstance(g, torch.Tensor) else type(g).__name__
            raise TypeError(f"grads must hold float tensors (B, *shape) with a batch dimension, got {got}")
    if len({len(g) for g in chosen}) != 1:
        raise ValueError(f"every gradient entry needs the same batch dim, got {sorted({len(g) for g in chosen})}")
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in chosen) else torch.float32
    norms = [torch.linalg.vector_norm(per_example_rows(g.detach()), dim=1, dtype=dtype) for g in chosen]
    if len(norms) == 1:
        return norms[0]
    return torch.stack(norms).double().square().sum(dim=0).sqrt().to(dtype)
